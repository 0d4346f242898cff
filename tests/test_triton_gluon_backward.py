"""The Triton backend's Gluon sparse MLA backward for Hopper (``sparse_mla_backward_gluon``).

On any machine: its sm_90 compile (the products it was designed with, the shared memory it lays
out, its registers) and when it applies. On a Hopper GPU: its gradients against the float64
reference on awkward inputs (every kind of invalid slot, duplicates, empty rows, ``topk_length``,
the sink, ``d_lse``, float32 and bf16 ``d_out``), rows read by nobody exactly 0.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from triton_ptxas import compile_gluon_for_sm90, ptxas_usage, run_compiled_report

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.tolerances import gradient_tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import sparse_mla_backward, sparse_mla_backward_gluon, sparse_mla_gluon  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402


H100_SHARED_MEMORY_PER_BLOCK = 232448  # 227 KiB, the opt-in maximum of sm_90
COMPILE_CASES = [(True, True, "fp32"), (False, False, "bf16")]  # (topk_length, d_lse, d_out dtype)


# --------------------------------------------------------------------------- sm_90 compile
def _compile_backward() -> dict[str, dict[str, int]]:
    """Registers, spills, shared memory and instruction counts of each case, compiled for sm_90."""
    module = sparse_mla_backward_gluon
    used = {}
    for has_topk_length, has_d_lse, d_out_dtype in COMPILE_CASES:
        constants = dict(HAS_TOPK_LENGTH=has_topk_length, HAS_D_LSE=has_d_lse, BLOCK_H=module.BLOCK_H,
                         BLOCK_T=module.BLOCK_T, D_V=module.D_V, D_R=module.D_R, D_CHUNK=module.D_CHUNK,
                         ROW_STORES=False)
        ptx, shared = compile_gluon_for_sm90(
            module._sparse_mla_backward_gluon_kernel, constants,
            dict(p_q="*bf16", p_kv="*bf16", p_indices="*i32", p_topk_length="*i32", p_d_out=f"*{d_out_dtype}",
                 p_entries="*i32"),
            sparse_mla_gluon.NUM_WARPS.value)
        used[f"{has_topk_length}-{has_d_lse}-{d_out_dtype}"] = dict(
            shared=shared, **ptxas_usage(ptx),
            wgmma_n32=len(re.findall(r"wgmma\.mma_async\S*m64n32k16", ptx)),
            wgmma_n256=len(re.findall(r"wgmma\.mma_async\S*m64n256k16", ptx)),
            wgmma_n64=len(re.findall(r"wgmma\.mma_async\S*m64n64k16", ptx)),
            atomics_v2=len(re.findall(r"atom\.global\.gpu\.relaxed\.add\.v2\.f32", ptx)),
            atomics_other=len(re.findall(r"\b(?:atom|red)\.global(?!\.gpu\.relaxed\.add\.v2\.f32)", ptx)),
            cp_async=len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)))
    return used


@pytest.fixture(scope="module")
def compiled_backward() -> dict[str, dict[str, int]]:
    if sparse_mla_gluon.gluon_release_reasons():
        pytest.skip("; ".join(sparse_mla_gluon.gluon_release_reasons()))
    return run_compiled_report(__file__)


CASE_IDS = [f"{length}-{d_lse}-{dtype}" for length, d_lse, dtype in COMPILE_CASES]


@pytest.mark.parametrize("case", CASE_IDS)
def test_gluon_backward_sm90_compile_has_no_spills_and_fits_shared_memory(compiled_backward, case):
    usage = compiled_backward[case]
    assert usage["spill_lines"] == 2, f"{case}: ptxas reported no spill counts: {usage}"
    # Spills came back (~500 bytes) when the buffers' descriptors were loop invariants (see the kernel).
    assert usage["spill_bytes"] == 0, f"{case}: {usage}"
    assert usage["registers"] <= 255 and usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {usage}"


@pytest.mark.parametrize("case", CASE_IDS)
def test_gluon_backward_sm90_compile_has_the_designed_products(compiled_backward, case):
    usage = compiled_backward[case]
    # n32: each warpgroup's half of S (576 / 16 = 36 k-steps) and of dP (512 / 16 = 32), of dq's rope
    # columns (64 slots / 16 = 4) and of the rows' rope contributions (64 heads / 16 = 4): 76.
    # n256: each warpgroup's half of dq's 512 columns, 4 k-steps. n64: the rows' contributions, 4 chunks
    # of 128 columns, two products (dS^T q and (fP)^T dout) of 4 k-steps each: 32.
    assert (usage["wgmma_n32"], usage["wgmma_n256"], usage["wgmma_n64"]) == (76, 4, 32), f"{case}: {usage}"
    # The row contributions leave as pairs of float32 adds: a thread's 32 values of a [64, 128] chunk
    # (16 pairs) x 4 chunks, and 8 pairs of the rope columns; nothing else is atomic.
    assert usage["atomics_v2"] == 72 and usage["atomics_other"] == 0, f"{case}: {usage}"
    # 16-byte copies of q (once) and of the rows (before the loop and inside it): 16 + 2 a thread each.
    assert usage["cp_async"] == 3 * (16 + 2), f"{case}: {usage}"


# --------------------------------------------------------------------------- when it applies
@pytest.fixture(autouse=True)
def _release_it_is_written_for(monkeypatch):
    monkeypatch.setattr(sparse_mla_gluon, "gluon_release_reasons", lambda: [])


def _environment_reasons() -> list[str]:
    reasons = ["TRITON_INTERPRET=1 (Gluon kernels do not run on Triton's interpreter)"] if interpreter_enabled() else []
    return reasons + ["device=cpu (needs a CUDA GPU)"]


def _inputs(*, h=64, d_out_dtype=torch.float32, d_out_width=512):
    q = torch.zeros(2, h, 576, dtype=torch.bfloat16)
    kv = torch.zeros(16, 576, dtype=torch.bfloat16)
    indices = torch.zeros(2, 8, dtype=torch.int32)
    d_out = torch.zeros(2, h, d_out_width, dtype=d_out_dtype)
    return q, kv, indices, d_out


def test_gluon_backward_applies_names_the_forward_reasons_dout_and_the_mode():
    q, kv, indices, d_out = _inputs()
    assert sparse_mla_backward_gluon.gluon_backward_applies(q, kv, 512, indices, None, None, d_out) == \
        _environment_reasons()
    reasons = sparse_mla_backward_gluon.gluon_backward_applies(q, kv, 512, indices, None, None, d_out,
                                                               deterministic=True)
    assert any(r.startswith("deterministic=True") for r in reasons)
    q, kv, indices, d_out = _inputs(d_out_dtype=torch.float64, d_out_width=256)
    reasons = sparse_mla_backward_gluon.gluon_backward_applies(q, kv, 512, indices, None, None, d_out)
    assert "d_out dtype=torch.float64 (supported: float32, bfloat16, float16)" in reasons
    assert "d_out shape=(2, 64, 256) (supported: [s_q, h, 512])" in reasons
    q, kv, indices, d_out = _inputs(h=96)
    assert "h=96 (supported: a multiple of 64)" in sparse_mla_backward_gluon.gluon_backward_applies(q, kv, 512)


def test_gluon_backward_refuses_to_run_where_it_does_not_apply():
    q, kv, indices, d_out = _inputs()
    out, lse = torch.zeros(2, 64, 512), torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"Gluon sparse MLA backward does not apply: .*deterministic=True"):
        sparse_mla_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, 0.05, 512, deterministic=True,
                                                kernel="gluon")


def test_the_backend_routes_to_the_gluon_backward_only_when_chosen_and_it_applies(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    q, kv, indices, d_out = _inputs()
    args = (q, kv, 512, indices, None, None, d_out)
    assert triton_backend.backward_kernel(False, *args, False) is None
    assert triton_backend.backward_kernel(True, *args, False) is None  # chosen, but not on this machine
    monkeypatch.setattr(sparse_mla_backward_gluon, "gluon_backward_applies", lambda *a, **k: [])
    assert triton_backend.backward_kernel(True, *args, False) == "gluon"
    assert triton_backend.backward_kernel(True, *args, True) is None  # deterministic: the split kernels
    assert triton_backend.backward_kernel(True, q.float(), kv.float(), *args[2:], False) is None
    assert triton_backend.TritonBackend.hopper_backward, "the default since measured on the H200"


# --------------------------------------------------------------------------- on a Hopper GPU
def _np(x):
    return None if x is None else interop.to_numpy(x)


def _awkward_backward_case(h, s_kv, topk, *, seed, sink, with_topk_length, d_out_dtype):
    """bf16 q and kv whose index rows hold every kind of invalid slot, duplicates, an empty row and a
    row of invalid slots only; out and lse from the float64 reference; d_out and d_lse random."""
    generator = torch.Generator().manual_seed(seed)
    s_q = 6
    q = torch.randn(s_q, h, 576, generator=generator).to(torch.bfloat16)
    kv = torch.randn(s_kv, 576, generator=generator).to(torch.bfloat16)
    indices = torch.randint(0, s_kv // 2, (s_q, topk), generator=generator).to(torch.int32)  # rows >= s_kv/2: read by nobody
    for n, bad in enumerate((-(2**31), -1, s_kv, 2**31 - 1)):
        indices[:, n::13] = bad
    indices[1, : topk // 2] = indices[1, 0].clamp(min=0)  # duplicates: one row counted many times
    indices[2] = -1  # no valid slot: dq 0
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (s_q,), generator=generator, dtype=torch.int32)
        topk_length[0], topk_length[3] = topk, 0
        topk_length[4] = min(topk, 65)  # a step cut after one slot
    attn_sink = torch.randn(h, generator=generator) if sink else None
    out, lse = reference.sparse_mla(_np(q), _np(kv), indices.numpy(), d_v=512, topk_length=_np(topk_length),
                                    attn_sink=_np(attn_sink))
    d_out = torch.randn(s_q, h, 512, generator=generator).to(d_out_dtype)
    d_lse = torch.randn(s_q, h, generator=generator) if sink else None
    return q, kv, indices, torch.from_numpy(out).float(), torch.from_numpy(lse).float(), d_out, topk_length, \
        attn_sink, d_lse


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
@pytest.mark.parametrize("h, s_kv, topk", [(64, 300, 64), (128, 1000, 100), (64, 4096, 577), (128, 8192, 2048)])
@pytest.mark.parametrize("sink, with_topk_length, d_out_dtype", [(False, False, torch.float32),
                                                                  (True, True, torch.bfloat16)])
def test_gluon_backward_matches_the_reference_on_awkward_cases(h, s_kv, topk, sink, with_topk_length, d_out_dtype):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper (sm_90) GPU")
    case = _awkward_backward_case(h, s_kv, topk, seed=h + s_kv + topk, sink=sink, with_topk_length=with_topk_length,
                                  d_out_dtype=d_out_dtype)
    q, kv, indices, out, lse, d_out, topk_length, attn_sink, d_lse = case
    cuda = [None if x is None else x.cuda() for x in case]
    got = sparse_mla_backward.sparse_mla_backward(*cuda[:6], 576**-0.5, 512, *cuda[6:], kernel="gluon")
    expected = reference.sparse_mla_backward(_np(q), _np(kv), indices.numpy(), _np(out), _np(lse), _np(d_out),
                                             d_v=512, topk_length=_np(topk_length), attn_sink=_np(attn_sink),
                                             d_lse=_np(d_lse))
    tolerance = gradient_tolerance_for("bfloat16")
    for name, value, want in zip(("dq", "dkv", "d_attn_sink"), got, expected):
        assert_close(_np(value), want, tolerance, name=name)
    dkv = _np(got[1])
    assert np.all(dkv[s_kv // 2:] == 0.0), "a row read by no valid slot got a gradient"
    assert np.all(_np(got[0])[2] == 0.0), "a query with no valid slot must get dq = 0"


if __name__ == "__main__":
    print(json.dumps(_compile_backward()))
