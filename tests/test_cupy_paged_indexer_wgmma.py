"""The CuPy backend's paged indexer on Hopper's fp8 wgmma (``indexer_paged_wgmma`` in
backends/cupy_cuda/csrc/indexer_wgmma.cu; ``CupyBackend.paged_indexer_wgmma``).

On the CPU: which inputs take it (``paged_indexer_path``), that its instances are compiled in CI (the
SASS check of ``compile_check.REQUIRED_SASS`` asks for its QGMMA shapes), and that the host's shared
memory sizes follow the kernel's layout constants. On a GPU (``@pytest.mark.gpu``, sm_90 only):
against the float64 reference on ragged batches with holes, one and two stacked queries, more
queries than a block stacks, few heads, a result wider than the table, NaN keys, strided inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

torch = pytest.importorskip("torch")

SOURCE = Path(cupy_backend.__file__).resolve().parent / "csrc" / "indexer_wgmma.cu"

#: problems.paged_indexer_problem arguments the kernel takes (d_I 128, blocks of a multiple of 64).
WGMMA_CASES = {
    "v32-one-query": dict(batch=3, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=3),
    "v32-two-queries-holes": dict(batch=4, next_n=2, h_i=64, d_i=128, block_size=64, max_blocks=24,
                                  unallocated_fraction=0.1, spare_blocks=3),
    "three-queries-two-groups": dict(batch=2, next_n=3, h_i=64, d_i=128, block_size=64, max_blocks=5),
    "few-heads-blocks-of-128": dict(batch=3, next_n=1, h_i=4, d_i=128, block_size=128, max_blocks=3),
    "wide-result": dict(batch=2, next_n=2, h_i=32, d_i=128, block_size=64, max_blocks=4, max_context_len=True),
    "many-chunks": dict(batch=2, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=40,
                        unallocated_fraction=0.02),
}


@pytest.mark.parametrize(("h_i", "d_i", "block_size", "capability", "chosen", "expected"), [
    (64, 128, 64, 90, True, "wgmma"),
    (4, 128, 128, 90, True, "wgmma"),
    (64, 128, 64, 90, False, "mma"),     # not chosen
    (64, 128, 64, 89, True, "mma"),      # wgmma exists on sm_90 only
    (64, 128, 64, 100, True, "mma"),
    (64, 64, 64, 90, True, "mma"),       # a key is one 128-byte row
    (65, 128, 64, 90, True, "mma"),      # one query's heads fill at most 64 columns
    (64, 128, 32, 90, True, "mma"),      # a step's 64 positions must lie in one page
])
def test_which_inputs_take_the_wgmma_kernel(h_i, d_i, block_size, capability, chosen, expected):
    assert cupy_backend.paged_indexer_path(h_i, d_i, block_size, capability, chosen) == expected


def test_the_wgmma_kernel_is_opt_in(monkeypatch):
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER_WGMMA", raising=False)
    assert cupy_backend.CupyBackend().paged_indexer_wgmma is False


def test_its_instances_are_compiled_for_sm90a_with_their_qgmma_shapes():
    assert set(kernels.KERNELS["indexer_wgmma.cu"]) == {"indexer_paged_wgmma<1>", "indexer_paged_wgmma<2>"}
    assert kernels.SOURCE_ARCHITECTURES["indexer_wgmma.cu"] == "sm_90a"
    shapes = compile_check.REQUIRED_SASS[("indexer_wgmma.cu", "sm_90a")]
    assert any("QGMMA.64x64x32" in s for s in shapes) and any("QGMMA.64x128x32" in s for s in shapes)


def test_the_host_asks_for_the_shared_memory_the_kernel_lays_out():
    text = SOURCE.read_text()
    constant = {name: int(value) for name, value in re.findall(r"constexpr int (\w+) = (\d+);", text)}
    keys, row, stages = constant["KEYS"], constant["ROW"], constant["STAGES"]
    for queries in (1, 2):
        expected = 64 * queries * row + stages * (keys * row + keys * 4) + 1024
        assert cupy_backend.PAGED_INDEXER_WGMMA_SMEM[queries] == expected
    assert cupy_backend.PAGED_INDEXER_WGMMA_POSITIONS == constant["STEPS"] * keys


# ----------------------------------------------------------------------------- GPU
def _hopper_backend(monkeypatch):
    pytest.importorskip("cupy")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    if cupy_backend._compute_capability() != 90:
        pytest.skip("indexer_paged_wgmma runs on compute capability 9.0 only")
    backend.paged_indexer_wgmma = True
    backend.poison_outputs = True
    launched = []
    original = kernels.kernel

    def recording(source, name, *args, **kwargs):
        launched.append(name)
        return original(source, name, *args, **kwargs)

    monkeypatch.setattr(kernels, "kernel", recording)
    return backend, launched


def _check(problem, backend, launched, queries):
    import dsa_ref
    from dsa_ref import interop, reference
    from dsa_ref.testing.assertions import assert_close
    from dsa_ref.testing.tolerances import tolerance_for

    got = interop.to_numpy(dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend))
    expected = reference.lightning_indexer_paged(**problem.inputs)
    assert [n for n in launched if "indexer" in n] == [f"indexer_paged_wgmma<{queries}>"], launched
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), "the -inf pattern differs"
    assert np.array_equal(np.isnan(got), np.isnan(expected)), "the NaN pattern differs"
    assert_close(got, expected, tolerance_for(problem.dtype, backend), name="scores")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(WGMMA_CASES))
@pytest.mark.parametrize("strided", [False, True])
def test_wgmma_kernel_matches_the_reference(name, strided, monkeypatch):
    from dsa_ref.testing import problems

    backend, launched = _hopper_backend(monkeypatch)
    case = WGMMA_CASES[name]
    problem = problems.paged_indexer_problem(np.random.default_rng(len(name)), strided=strided, **case)
    _check(problem, backend, launched, 1 if case["next_n"] == 1 else 2)


@pytest.mark.gpu
def test_a_nan_key_poisons_its_own_scores_and_no_other(monkeypatch):
    """A NaN byte in one key gives NaN at that key's position for every query that sees it, also with
    4 of the 64 head columns in use (the absent ones must not turn 0 x NaN into the sum)."""
    from dsa_ref.testing import problems

    backend, launched = _hopper_backend(monkeypatch)
    problem = problems.paged_indexer_problem(np.random.default_rng(3), batch=2, next_n=1, h_i=4, d_i=128,
                                             block_size=64, max_blocks=2)
    table, cache = problem.inputs["block_table"], problem.inputs["k_cache"].copy()
    cache[int(table[0, 0]), 7] = 0x7F  # dim 7 of position 0 of sequence 0 (seen by its query): e4m3 NaN
    problem.inputs["k_cache"] = cache
    _check(problem, backend, launched, 1)
