"""The Gluon (Hopper) sparse MLA forward of the ``triton`` backend: its sm_90 compile (no spills,
Hopper's shared memory, wgmma with the d_v split), when it applies, and on a Hopper GPU its results
against the float64 reference on the awkward cases.

The compile runs in a subprocess without the interpreter (this process may have imported triton
with TRITON_INTERPRET=1, under which nothing compiles for a GPU target).
"""

from __future__ import annotations

import json
import re

import pytest
from triton_ptxas import compile_gluon_for_sm90, ptxas_usage, run_compiled_report

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsa_ref_backends.torch_triton import sparse_mla, sparse_mla_gluon  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402

pytest.register_assert_rewrite("gluon_forward_cases")  # its asserts report as this file's do
from gluon_forward_cases import (  # noqa: E402
    H100_SHARED_MEMORY_PER_BLOCK,
    awkward_case,
    check_awkward_case,
    check_int64_indices_and_views,
    require_hopper,
    zero_inputs,
)

COMPILE_CASES = [(True, True), (False, False)]  # (topk_length, attn_sink)


# --------------------------------------------------------------------------- sm_90 compile


def _compile_gluon() -> dict[str, dict[str, int]]:
    """Registers, spills, shared memory and tensor-core instructions of each case, compiled for sm_90."""
    used = {}
    for has_topk_length, has_sink in COMPILE_CASES:
        constants = dict(HAS_TOPK_LENGTH=has_topk_length, HAS_SINK=has_sink, BLOCK_H=sparse_mla_gluon.BLOCK_H,
                         BLOCK_T=sparse_mla_gluon.BLOCK_T, D_V=sparse_mla_gluon.D_V, D_R=sparse_mla_gluon.D_R)
        ptx, shared = compile_gluon_for_sm90(
            sparse_mla_gluon._sparse_mla_gluon_kernel, constants,
            dict(p_q="*bf16", p_kv="*bf16", p_indices="*i32", p_topk_length="*i32"), sparse_mla_gluon.NUM_WARPS.value)
        used[f"{has_topk_length}-{has_sink}"] = dict(
            shared=shared, **ptxas_usage(ptx),
            wgmma_s=len(re.findall(r"wgmma\.mma_async\S*m64n32k16", ptx)),
            wgmma_o=len(re.findall(r"wgmma\.mma_async\S*m64n256k16", ptx)),
            cp_async=len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)))
    return used


@pytest.fixture(scope="module")
def compiled_gluon() -> dict[str, dict[str, int]]:
    if sparse_mla_gluon.gluon_release_reasons():
        pytest.skip("; ".join(sparse_mla_gluon.gluon_release_reasons()))
    return run_compiled_report(__file__)


@pytest.mark.parametrize("case", [f"{length}-{sink}" for length, sink in COMPILE_CASES])
def test_gluon_sm90_compile_has_no_spills_and_fits_shared_memory(compiled_gluon, case):
    usage = compiled_gluon[case]
    assert usage["spill_lines"] == 2, f"{case}: ptxas reported no spill counts: {usage}"
    assert usage["spill_bytes"] == 0, f"{case}: {usage}"
    assert usage["registers"] <= 255 and usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {usage}"


@pytest.mark.parametrize("case", [f"{length}-{sink}" for length, sink in COMPILE_CASES])
def test_gluon_sm90_compile_uses_wgmma_with_d_v_split_and_async_gathers(compiled_gluon, case):
    usage = compiled_gluon[case]
    # S: each warpgroup's 64 heads x 32 slots over 576 / 16 = 36 k-steps; O: each warpgroup's
    # [64, 256] half of d_v over the 64 slots / 16 = 4 k-steps. Anything else means the layout of
    # the products is not the designed one.
    assert usage["wgmma_s"] == 36 and usage["wgmma_o"] == 4, f"{case}: {usage}"
    # 16-byte cp.async copies, 16 (512 columns) + 2 (64 columns) a thread for a [64, 576] tile,
    # issued in three places: Q, the first tile before the loop, the next tile inside it.
    assert usage["cp_async"] == 3 * (16 + 2), f"{case}: {usage}"


# --------------------------------------------------------------------------- when it applies
def _environment_reasons(device="cpu") -> list[str]:
    reasons = []
    if interpreter_enabled():
        reasons.append("TRITON_INTERPRET=1 (Gluon kernels do not run on Triton's interpreter)")
    if device == "cpu":
        reasons.append("device=cpu (needs a CUDA GPU)")
    return reasons


def test_gluon_applies_names_only_the_machine_for_supported_inputs():
    q, kv, indices = zero_inputs()
    reasons = sparse_mla_gluon.gluon_applies(q, kv, 512, indices, torch.zeros(2, dtype=torch.int32), torch.zeros(64))
    assert reasons == _environment_reasons()


@pytest.mark.parametrize("change, expected", [
    (dict(q_dtype=torch.float16), "q dtype=torch.float16 (supported: torch.bfloat16)"),
    (dict(kv_dtype=torch.float32), "kv dtype=torch.float32 (supported: torch.bfloat16)"),
    (dict(kv_fp8=True), "kv is the packed FP8 cache (supported: dense bfloat16 rows)"),
    (dict(h=96), "h=96 (supported: a multiple of 64)"),
    (dict(q_width=512), "q shape=(2, 64, 512) (supported: [s_q, h, 576])"),
    (dict(kv_width=512), "kv shape=(16, 512) (supported: [s_kv, 576])"),
    (dict(d_v=256), "d_v=256 (supported: 512)"),
    (dict(indices_dtype=torch.float32), "indices dtype=torch.float32 (supported: torch.int32, torch.int64)"),
    (dict(indices_rows=3), "indices shape=(3, 8) (supported: [s_q, topk])"),
    (dict(topk_length_rows=3), "topk_length shape=(3,) (supported: [s_q])"),
    (dict(sink_heads=32), "attn_sink shape=(32,) (supported: [h])"),
])
def test_gluon_applies_gives_each_reason_with_its_value(change, expected):
    h = change.get("h", 64)
    q = torch.zeros(2, h, change.get("q_width", 576), dtype=change.get("q_dtype", torch.bfloat16))
    kv = torch.zeros(16, change.get("kv_width", 576), dtype=change.get("kv_dtype", torch.bfloat16))
    if change.get("kv_fp8"):
        kv = torch.zeros(16, 656, dtype=torch.uint8)
    indices = torch.zeros(change.get("indices_rows", 2), 8).to(change.get("indices_dtype", torch.int32))
    topk_length = torch.zeros(change.get("topk_length_rows", 2), dtype=torch.int32)
    attn_sink = torch.zeros(change.get("sink_heads", h))
    reasons = sparse_mla_gluon.gluon_applies(q, kv, change.get("d_v", 512), indices, topk_length, attn_sink)
    assert expected in reasons
    # The FP8 cache is one reason, not also a wrong width.
    assert [r for r in reasons if r not in _environment_reasons()] == [expected]


def test_gluon_refuses_to_launch_where_it_does_not_apply():
    q, kv, indices = zero_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"does not apply: q dtype=torch\.float32.*needs a CUDA GPU"):
        sparse_mla_gluon.sparse_mla_gluon(q, kv, indices, 576**-0.5)
    with pytest.raises(ValueError, match=r"does not apply: .*d_v=256 \(supported: 512\)"):
        sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 256, kernel="gluon")


def test_sparse_mla_kernel_choice_is_checked():
    q, kv, indices = zero_inputs()
    with pytest.raises(ValueError,
                       match=(r"kernel='cuda' is not a valid sparse MLA kernel; "
                              r"available: \['tl', 'gluon', 'gluon_pingpong', 'gluon_fp8'\]")):
        sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 512, kernel="cuda")
    with pytest.raises(ValueError, match="kernel='gluon' takes neither"):
        sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 512, kernel="gluon", num_splits=2)


# --------------------------------------------------------------------------- on a Hopper GPU
def _awkward_case(h, s_kv, topk, *, seed, sink, with_topk_length, index_dtype=torch.int32):
    """awkward_case of 6 queries; with topk_length, row 0 whole, row 3 empty, row 4 a tile cut after one slot."""
    return awkward_case(h, s_kv, topk, seed=seed, sink=sink, with_topk_length=with_topk_length,
                        index_dtype=index_dtype, s_q=6, lengths={0: topk, 3: 0, 4: 65})


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
@pytest.mark.parametrize("h, s_kv, topk", [(64, 300, 64), (128, 1000, 100), (64, 4096, 577), (128, 8192, 2048),
                                           (64, 65536, 2048)])
@pytest.mark.parametrize("sink, with_topk_length", [(False, False), (True, True)])
def test_gluon_matches_reference_on_awkward_cases(h, s_kv, topk, sink, with_topk_length):
    require_hopper()
    case = _awkward_case(h, s_kv, topk, seed=h + s_kv + topk, sink=sink, with_topk_length=with_topk_length)
    check_awkward_case(case, "gluon")


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
def test_gluon_int64_indices_past_int32_are_invalid_and_views_are_accepted():
    require_hopper()
    case = _awkward_case(128, 2048, 256, seed=7, sink=True, with_topk_length=True, index_dtype=torch.int64)
    check_int64_indices_and_views(sparse_mla_gluon.sparse_mla_gluon, case)


if __name__ == "__main__":
    print(json.dumps(_compile_gluon()))


@pytest.fixture(autouse=True)
def _release_it_is_written_for(request, monkeypatch):
    """The reasons of the tests below are the inputs'; the Triton release (a reason of its own on
    another release than the kernel's, as in CI's newest-Triton pass) is tested by itself."""
    if "release" not in request.node.name:
        monkeypatch.setattr(sparse_mla_gluon, "gluon_release_reasons", lambda: [])


def test_gluon_refuses_a_triton_release_it_is_not_written_for(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.9.0")
    reasons = sparse_mla_gluon.gluon_release_reasons()
    assert reasons and "triton 3.9.0" in reasons[0] and sparse_mla_gluon.GLUON_TRITON_RELEASE in reasons[0]
    q, kv = torch.zeros((1, 64, 576), dtype=torch.bfloat16), torch.zeros((4, 576), dtype=torch.bfloat16)
    assert any("triton 3.9.0" in reason for reason in sparse_mla_gluon.gluon_applies(q, kv, 512))



def test_the_backend_routes_to_the_gluon_kernel_only_when_chosen_and_it_applies(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    q, kv = torch.zeros((2, 64, 576), dtype=torch.bfloat16), torch.zeros((8, 576), dtype=torch.bfloat16)
    indices = torch.zeros((2, 64), dtype=torch.int32)
    assert triton_backend.forward_kernel(False, q, kv, 512, indices, None, None) == "tl"
    # Chosen, but here (the CPU, or the interpreter) it does not apply: the tl.dot kernel runs.
    assert sparse_mla_gluon.gluon_applies(q, kv, 512, indices)
    assert triton_backend.forward_kernel(True, q, kv, 512, indices, None, None) == "tl"
    monkeypatch.setattr(sparse_mla_gluon, "gluon_applies", lambda *args: [])
    assert triton_backend.forward_kernel(True, q, kv, 512, indices, None, None) == "gluon"
