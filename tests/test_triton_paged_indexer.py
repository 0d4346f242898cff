"""The Triton backend's paged indexer kernel (backends/torch_triton/indexer_paged.py).

On the CPU interpreter: against the float64 reference on ragged batches, several block sizes, next_n
1-3, holes in the block table, max_context_len past the table, strided inputs; that the backend runs
the kernel (one launch for the batch) for e4m3 queries and the composed op for the others. Compiled
for sm_90 (a subprocess without the interpreter): registers, no spills, shared memory. On a GPU
(``@pytest.mark.gpu``): the reference at a decode-sized problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import dsa_ref  # noqa: E402
from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing import problems  # noqa: E402
from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import indexer_paged  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402
from paged_indexer_cases import PAGED_INDEXER_CASES  # noqa: E402
from triton_ptxas import ptxas_usage  # noqa: E402

H100_SHARED_MEMORY_PER_BLOCK = 232448

def _backend():
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    backend = TritonBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    return backend


def _launches(monkeypatch) -> list[str]:
    launched = []
    original = indexer_paged.lightning_indexer_paged

    def recording(*args, **kwargs):
        launched.append("paged")
        return original(*args, **kwargs)

    monkeypatch.setattr(indexer_paged, "lightning_indexer_paged", recording)
    return launched


def _check(problem, backend, monkeypatch, *, expect_kernel: bool):
    launched = _launches(monkeypatch)
    got = interop.to_numpy(dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend))
    expected = reference.lightning_indexer_paged(**problem.inputs)
    assert launched == (["paged"] if expect_kernel else []), launched
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), "the -inf pattern differs"
    assert_close(got, expected, tolerance_for(problem.dtype, backend), name="scores")


@pytest.mark.parametrize("name", list(PAGED_INDEXER_CASES))
@pytest.mark.parametrize("strided", [False, True])
def test_paged_kernel_matches_the_reference(name, strided, monkeypatch):
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    case = PAGED_INDEXER_CASES[name]
    problem = problems.paged_indexer_problem(np.random.default_rng(len(name)), strided=strided, **case)
    _check(problem, _backend(), monkeypatch, expect_kernel=True)


@pytest.mark.parametrize("name", ["v32-one-query", "two-queries-holes"])
def test_scales_read_as_bytes_where_blocks_do_not_start_on_a_word(name, monkeypatch):
    """The kernel reads a key's scale as one float32 word where every block starts on a word; the
    four-byte path it takes otherwise must give the same scores."""
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    monkeypatch.setattr(indexer_paged, "_as_words", lambda k_cache: None)
    problem = problems.paged_indexer_problem(np.random.default_rng(len(name)), **PAGED_INDEXER_CASES[name])
    _check(problem, _backend(), monkeypatch, expect_kernel=True)


def test_the_cache_is_viewed_as_words_only_where_every_block_starts_on_one():
    assert indexer_paged._as_words(torch.zeros((3, 8 * 36), dtype=torch.uint8)).shape == (3, 8 * 9)
    assert indexer_paged._as_words(torch.zeros((3, 63), dtype=torch.uint8)) is None  # rows of 63 bytes
    assert indexer_paged._as_words(torch.zeros((3, 65), dtype=torch.uint8)[:, :64]) is None  # a row stride of 65
    assert indexer_paged._as_words(torch.zeros((3 * 64 + 1,), dtype=torch.uint8)[1:].view(3, 64)) is None  # offset


def test_other_query_dtypes_take_the_composed_op(monkeypatch):
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    problem = problems.paged_indexer_problem(np.random.default_rng(1), batch=2, next_n=1, h_i=8, d_i=32,
                                             block_size=8, max_blocks=3, dtype="bfloat16")
    _check(problem, _backend(), monkeypatch, expect_kernel=False)


def test_a_table_of_no_blocks_scores_every_position_minus_inf():
    q = torch.zeros((2, 4, 32), dtype=torch.float8_e4m3fn)
    scores = indexer_paged.lightning_indexer_paged(q, torch.ones((2, 4)), torch.zeros((3, 8 * 36), dtype=torch.uint8),
                                                   torch.zeros((2, 0), dtype=torch.int32),
                                                   torch.ones(2, dtype=torch.int32), 1, 16)
    assert scores.shape == (2, 16) and torch.isneginf(scores).all()


def test_reasons_name_the_dtype_and_the_head_count():
    q = torch.zeros((2, 64, 128), dtype=torch.bfloat16)
    cache = torch.zeros((4, 64 * 132), dtype=torch.uint8)
    assert "q dtype=torch.bfloat16" in indexer_paged.paged_indexer_reasons(q, cache)[0]
    assert indexer_paged.paged_indexer_reasons(q.to(torch.float8_e4m3fn), cache) == []
    wide = torch.zeros((2, 200, 128), dtype=torch.float8_e4m3fn)
    assert "h_i=200" in indexer_paged.paged_indexer_reasons(wide, cache)[0]


@pytest.mark.parametrize(("h_i", "next_n", "rows", "groups"),
                         [(64, 1, 64, 1), (64, 2, 128, 1), (4, 1, 16, 1), (3, 3, 16, 1), (64, 3, 128, 2),
                          (128, 2, 128, 2)])
def test_config_stacks_at_least_16_and_at_most_128_rows(h_i, next_n, rows, groups):
    config = indexer_paged.paged_indexer_config(h_i, 128, next_n)
    assert config["NEXT_N"] * config["HEADS"] == rows
    assert config["HEADS"] >= h_i and -(-next_n // config["NEXT_N"]) == groups


def test_the_decode_step_on_triton_scores_through_the_paged_kernel(monkeypatch):
    """dsa_ref.sparse_decode_step on torch tensors asks the backend whether it reads the pages in place:
    on triton (e4m3 queries) the step's scores come from one paged launch, and the step equals the
    NumPy reference's (the same selected slots per row, outputs within the fp8 cache's tolerance)."""
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    from test_decode_step import SM_SCALE, make_decode_step

    from dsa_ref.decode import sparse_decode_step

    backend = _backend()
    step = make_decode_step([70, 130, 5], 2, num_blocks=60, seed=4)
    expected_out, expected_lse, expected_slots = sparse_decode_step(**step, topk=16, next_n=2, sm_scale=SM_SCALE,
                                                                    backend="numpy")
    launched = _launches(monkeypatch)
    tensors = {name: backend.to_native(value) for name, value in step.items()}
    out, lse, slots = sparse_decode_step(**tensors, topk=16, next_n=2, sm_scale=SM_SCALE, backend="triton")
    assert launched == ["paged"], launched
    for row, (got_row, expected_row) in enumerate(zip(interop.to_numpy(slots), expected_slots)):
        assert sorted(got_row.tolist()) == sorted(expected_row.tolist()), f"row {row}"
    tolerance = tolerance_for("bfloat16", backend)
    assert_close(interop.to_numpy(out), expected_out, tolerance, name="out")
    assert_close(interop.to_numpy(lse), expected_lse, tolerance, name="lse", scale_by_max=False)


# --------------------------------------------------------------------------- sm_90 compile
# (h_i, next_n, block_size): V3.2's decode with and without MTP on pages of 64 (a step's keys in one
# page), and pages smaller than a step (every position looks its page up).
COMPILE_CASES = [(64, 1, 64), (64, 2, 64), (64, 1, 16)]


def _compile() -> dict[str, dict[str, int]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = indexer_paged._paged_indexer_kernel
    used = {}
    for h_i, next_n, block_size in COMPILE_CASES:
        config = indexer_paged.paged_indexer_config(h_i, 128, next_n, block_size)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        config["WORD_SCALES"] = True
        if next_n == 1:  # Triton specializes an integer argument equal to 1 as a constant
            config["next_n"] = 1
        signature = {name: "constexpr" if name in config else "i32" for name in kernel.arg_names}
        signature.update(p_q="*fp8e4nv", p_weights="*fp32", p_cache="*u8", p_cache_words="*fp32", p_table="*i32",
                         p_lens="*i32", p_scores="*fp32")
        # As a launch at V3.2's sizes specializes them: every pointer and integer a multiple of 16.
        divisible = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                     for name, kind in signature.items() if kind != "constexpr"}
        source = ASTSource(fn=kernel, signature=signature, attrs=divisible,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in config.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        used[f"{h_i}-{next_n}-{block_size}"] = dict(shared=compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"]))
    return used


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                            timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{h}-{n}-{b}" for h, n, b in COMPILE_CASES])
def test_paged_kernel_compiles_for_sm90_without_spills(compiled, case):
    usage = compiled[case]
    assert usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, usage
    assert usage["spill_lines"] > 0 and usage["spill_bytes"] == 0, usage
    assert usage["registers"] <= 255, usage


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_paged_kernel_at_a_decode_size(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    problem = problems.paged_indexer_problem(np.random.default_rng(7), batch=8, next_n=2, h_i=64, d_i=128,
                                             block_size=64, max_blocks=64, unallocated_fraction=0.02)
    _check(problem, _backend(), monkeypatch, expect_kernel=True)


if __name__ == "__main__":
    print(json.dumps(_compile()))
