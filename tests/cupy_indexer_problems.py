"""The paged-indexer problems and check that the tests of the cupy backend's two paged fp8 wgmma indexers run
on a Hopper GPU (tests/test_cupy_indexer_wgmma.py: ``indexer_paged_wgmma``; test_cupy_paged_indexer_v2.py:
``indexer_paged_wgmma_v2``)."""

from __future__ import annotations

import numpy as np

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import problems
from dsa_ref.testing.assertions import assert_close
from dsa_ref.testing.tolerances import tolerance_for

#: problems.paged_indexer_problem arguments both kernels take (d_I 128, blocks of a multiple of 64, h_i <= 64).
#: A case's name seeds its problem (its length), so each test file names the cases it runs itself.
PAGED_WGMMA_CASES = {
    "v32-one-query": dict(batch=3, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=3),
    "v32-two-queries-holes": dict(batch=4, next_n=2, h_i=64, d_i=128, block_size=64, max_blocks=24,
                                  unallocated_fraction=0.1, spare_blocks=3),
    "three-queries-two-groups": dict(batch=2, next_n=3, h_i=64, d_i=128, block_size=64, max_blocks=5),
    "few-heads-blocks-of-128": dict(batch=3, next_n=1, h_i=4, d_i=128, block_size=128, max_blocks=3),
    "wide-result": dict(batch=2, next_n=2, h_i=32, d_i=128, block_size=64, max_blocks=4, max_context_len=True),
    "many-chunks": dict(batch=2, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=40,
                        unallocated_fraction=0.02),
}


def paged_problem(case: dict, seed: int, *, strided: bool):
    """``(problem, queries)``: the problem of ``case`` and the queries a block of the kernel stacks (1 or 2)."""
    problem = problems.paged_indexer_problem(np.random.default_rng(seed), strided=strided, **case)
    return problem, 1 if case["next_n"] == 1 else 2


def nan_key_problem(next_n: int):
    """4 heads, and a NaN byte in one key (dim 7 of position 0 of sequence 0, seen by its queries: e4m3 NaN)."""
    problem = problems.paged_indexer_problem(np.random.default_rng(3), batch=2, next_n=next_n, h_i=4, d_i=128,
                                             block_size=64, max_blocks=2)
    table, cache = problem.inputs["block_table"], problem.inputs["k_cache"].copy()
    cache[int(table[0, 0]), 7] = 0x7F
    problem.inputs["k_cache"] = cache
    return problem


def check_paged_scores(problem, backend, launched, kernel: str):
    """The scores of ``problem`` on ``backend``, whose only indexer launch must be ``kernel``, against the
    float64 reference: the same -inf and NaN patterns, the rest within the kit's tolerance."""
    got = interop.to_numpy(dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend))
    expected = reference.lightning_indexer_paged(**problem.inputs)
    assert [n for n in launched if "indexer" in n] == [kernel], launched
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), "the -inf pattern differs"
    assert np.array_equal(np.isnan(got), np.isnan(expected)), "the NaN pattern differs"
    assert_close(got, expected, tolerance_for(problem.dtype, backend), name="scores")
