"""The fused sparse MLA backward kernel (one pass per query and head block) against the float64
reference, and its sm_90 compile (no spills, shared memory within Hopper's).

Without a GPU the kernel runs on Triton's CPU interpreter (tiny shapes). Outputs the kernel
allocates start as NaN (``poisoned_torch_outputs``), so an element nothing writes fails. Tolerances
as in tests/test_triton_training.py: judged against the largest |expected| of each output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from triton_ptxas import ptxas_usage

torch = pytest.importorskip("torch")
COMPILING = __name__ == "__main__"  # run as a script: the sm_90 compile, which the interpreter cannot do
if not torch.cuda.is_available() and not COMPILING:
    # Before triton is first imported: it decides at import whether kernels are interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.problems import sparse_mla_problem  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import sparse_mla_backward as kernels  # noqa: E402
from dsa_ref_backends.torch_triton.backend import TritonBackend  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available() and not COMPILING:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = TritonBackend().device()
H100_SHARED_MEMORY_PER_BLOCK = 232448  # 227 KiB, the opt-in maximum of sm_90


def _case(dtype, *, s_q=5, h=3, d_qk=40, d_v=32, s_kv=24, topk=20, seed=0, sink=True, with_d_lse=True,
          topk_length=True, invalid_fraction=0.25, duplicate_fraction=0.3):
    """Inputs with the forward's results and upstream gradients; the last query has no valid slot."""
    rng = np.random.default_rng(seed)
    problem = sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                 invalid_fraction=invalid_fraction, duplicate_fraction=duplicate_fraction,
                                 topk_length=topk_length, attn_sink=sink, causal=False)
    inputs = dict(problem.inputs)
    if topk_length:
        inputs["topk_length"][0] = topk  # one row with every slot counted
    inputs["indices"][-1] = -1
    inputs.setdefault("topk_length", None)
    inputs.setdefault("attn_sink", None)
    sm_scale = inputs.get("sm_scale") or d_qk**-0.5
    out, lse = reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], sm_scale=sm_scale, d_v=d_v,
                                    topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"])
    inputs.update(sm_scale=sm_scale, d_v=d_v, out=out, lse=lse,
                  d_out=rng.standard_normal((s_q, h, d_v)).astype(np.float32),
                  d_lse=rng.standard_normal((s_q, h)).astype(np.float32) if with_d_lse else None)
    return inputs


def _expected(inputs):
    return reference.sparse_mla_backward(inputs["q"], inputs["kv"], inputs["indices"], inputs["out"], inputs["lse"],
                                         inputs["d_out"], sm_scale=inputs["sm_scale"], d_v=inputs["d_v"],
                                         topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"],
                                         d_lse=inputs["d_lse"])


def _fused(inputs, *, deterministic=False, kernel="fused"):
    def tensor(name):
        return None if inputs[name] is None else interop.convert(inputs[name], "torch", DEVICE)

    results = kernels.sparse_mla_backward(
        tensor("q"), tensor("kv"), tensor("indices"), tensor("out"), tensor("lse"), tensor("d_out"),
        float(inputs["sm_scale"]), int(inputs["d_v"]), tensor("topk_length"), tensor("attn_sink"), tensor("d_lse"),
        deterministic=deterministic, kernel=kernel)
    return tuple(result.cpu().numpy() for result in results)


def _check(inputs, actual, dtype):
    expected = _expected(inputs)
    assert len(actual) == len(expected)
    for got, want, name in zip(actual, expected, ("dq", "dkv", "d_attn_sink")):
        assert_close(got, want, tolerance_for(dtype), name=f"{name} {dtype}")
    dq, dkv = actual[:2]
    valid = reference.valid_slots(inputs["indices"], inputs["kv"].shape[0], inputs["topk_length"])
    unread = np.setdiff1d(np.arange(inputs["kv"].shape[0]), inputs["indices"][valid])
    assert unread.size > 0 and np.all(dkv[unread] == 0.0), "rows no valid slot reads get exactly 0"
    assert np.all(dq[-1] == 0.0), "a query with no valid slot gets dq = 0"


pytestmark = pytest.mark.usefixtures("poisoned_torch_outputs")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_matches_reference_with_duplicates_invalid_topk_length_sink_and_d_lse(dtype, deterministic):
    inputs = _case(dtype, seed=1)
    assert (inputs["indices"] < 0).any() and (inputs["topk_length"] < inputs["indices"].shape[1]).any()
    _check(inputs, _fused(inputs, deterministic=deterministic), dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_fused_heads_not_a_multiple_of_the_block_several_slot_blocks_no_sink_no_d_lse(deterministic):
    """37 heads (two head blocks, the second masked), 40 slots (several slot blocks), 8 rest columns
    padded to 16; also indices out of range on both sides."""
    inputs = _case("bfloat16", h=37, topk=40, s_kv=90, seed=2, sink=False, with_d_lse=False, topk_length=False)
    inputs["indices"][1, :4] = [inputs["kv"].shape[0], np.iinfo(np.int32).max, np.iinfo(np.int32).min, -7]
    actual = _fused(inputs, deterministic=deterministic)
    assert len(actual) == 2
    _check(inputs, actual, "bfloat16")


def test_fused_one_row_read_by_every_slot():
    """Every valid slot of every query selects the same row: all contributions land on it."""
    inputs = _case("float16", h=4, topk=24, seed=3, invalid_fraction=0.0, duplicate_fraction=0.0)
    inputs["indices"][:-1] = 5
    _check(inputs, _fused(inputs), "float16")
    _check(inputs, _fused(inputs, deterministic=True), "float16")


def test_fused_deepseek_widths():
    """d_qk 576 = 512 value + 64 rest columns, the V3.2 split."""
    inputs = _case("bfloat16", s_q=3, h=2, d_qk=576, d_v=512, s_kv=16, topk=8, seed=4)
    _check(inputs, _fused(inputs), "bfloat16")


def test_fused_deterministic_is_bitwise_repeatable():
    inputs = _case("bfloat16", h=37, topk=24, seed=5)
    first = _fused(inputs, deterministic=True)
    second = _fused(inputs, deterministic=True)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def test_fused_deterministic_sums_over_query_chunks(monkeypatch):
    """A contribution buffer smaller than all queries: the chunks are summed in order, still correct."""
    from dsa_ref_backends.torch_triton import sparse_mla_backward_fused

    inputs = _case("float32", seed=6)
    monkeypatch.setattr(sparse_mla_backward_fused, "CONTRIBUTION_BUFFER_BYTES", 4 * 20 * 40 * 2)  # two queries
    _check(inputs, _fused(inputs, deterministic=True), "float32")


def test_kernel_choice_default_and_refusal():
    # The split kernels stay the default until the fused one is faster on the GPU (NOTES.md, version 5).
    assert kernels.default_kernel(torch.bfloat16) == "split"
    assert kernels.default_kernel(torch.float32) == "split"
    q, kv = torch.zeros((1, 1, 24), dtype=torch.bfloat16), torch.zeros((4, 24), dtype=torch.bfloat16)
    indices, out, lse = torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 16)), torch.zeros((1, 1))
    with pytest.raises(ValueError, match="kernel='fast'"):
        kernels.sparse_mla_backward(q, kv, indices, out, lse, out, 0.1, 16, kernel="fast")


def test_fused_and_split_agree_and_empty_shapes():
    inputs = _case("bfloat16", seed=7)
    for fused, split in zip(_fused(inputs), _fused(inputs, kernel="split")):
        assert_close(fused, split, tolerance_for("bfloat16"))
    for s_q, topk in ((0, 8), (3, 0)):
        q = torch.ones((s_q, 2, 24), dtype=torch.bfloat16, device=DEVICE)
        kv = torch.ones((10, 24), dtype=torch.bfloat16, device=DEVICE)
        indices = torch.zeros((s_q, topk), dtype=torch.int32, device=DEVICE)
        out = torch.zeros((s_q, 2, 16), device=DEVICE)
        lse = torch.zeros((s_q, 2), device=DEVICE)
        dq, dkv = kernels.sparse_mla_backward(q, kv, indices, out, lse, out, 0.2, 16, kernel="fused")
        assert dq.shape == (s_q, 2, 24) and bool((dq == 0).all()) and bool((dkv == 0).all())


# --------------------------------------------------------------------------- sm_90 compile
# (dtype, heads, deterministic): the V3.2 shape, d_qk 576, d_v 512, topk 2048.
COMPILE_CASES = [("bfloat16", 64, False), ("bfloat16", 128, False), ("bfloat16", 64, True),
                 ("bfloat16", 128, True)]




def _compile_fused() -> dict[str, dict[str, int]]:
    """Registers, spills and shared memory of every case, compiled for sm_90 (no interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsa_ref_backends.torch_triton import sparse_mla_backward_fused as fused
    from dsa_ref_backends.torch_triton.precision import dot_precision
    from dsa_ref_backends.torch_triton.sparse_mla import _COMPUTE_DTYPES

    kernel = fused._fused_backward_kernel
    used = {}
    for dtype_name, heads, deterministic in COMPILE_CASES:
        dtype = getattr(torch, dtype_name)
        config = fused.fused_backward_config(heads, 2048, 512, 576, dtype)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        constants = dict(HAS_TOPK_LENGTH=True, HAS_D_LSE=True, DETERMINISTIC=deterministic,
                         COMPUTE_DTYPE=_COMPUTE_DTYPES[dtype], DOT_PRECISION=dot_precision(dtype), **config)
        signature = {arg: "constexpr" if arg in constants else ("fp32" if "scale" in arg else "i32")
                     for arg in kernel.arg_names}
        signature.update({arg: "*fp32" for arg in kernel.arg_names if arg.startswith("p_")})
        signature.update(p_q="*bf16", p_kv="*bf16", p_indices="*i32", p_topk_length="*i32")
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        used[f"{dtype_name}-{heads}-{deterministic}"] = dict(shared=compiled.metadata.shared,
                                                             **ptxas_usage(compiled.asm["ptx"]))
    return used


@pytest.fixture(scope="module")
def compiled_fused() -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{d}-{h}-{det}" for d, h, det in COMPILE_CASES])
def test_fused_sm90_compile_has_no_spills_and_fits_shared_memory(compiled_fused, case):
    usage = compiled_fused[case]
    assert usage["spill_lines"] == 2, f"{case}: ptxas reported no spill counts: {usage}"
    assert usage["spill_bytes"] == 0, f"{case}: {usage}"
    assert usage["registers"] <= 255 and usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {usage}"


if __name__ == "__main__":
    print(json.dumps(_compile_fused()))
