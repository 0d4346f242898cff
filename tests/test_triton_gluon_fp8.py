"""The Gluon FP8 sparse MLA of the ``triton`` backend (the ping-pong kernel with a dequantizing producer):
its sm_90 compile (no spills, no serialized wgmma, the register split, Hopper's shared memory, the
dequantization and the barrier protocol in the PTX), its switch (off by default, the environment
variable), its refusals and split plan, and on a Hopper GPU its results against the float64 reference
and the ``tl.dot`` kernel on the awkward cases.

The compile runs in a subprocess without the interpreter (this process may have imported triton
with TRITON_INTERPRET=1, under which nothing compiles for a GPU target).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from triton_ptxas import ptxas_report, run_compiled_report

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsa_ref import reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import sparse_mla, sparse_mla_gluon, sparse_mla_gluon_fp8  # noqa: E402

pytest.register_assert_rewrite("gluon_forward_cases")
from gluon_forward_cases import (  # noqa: E402
    H100_SHARED_MEMORY_PER_BLOCK,
    assert_matches_reference,
    awkward_case,
    require_hopper,
    to_numpy,
)

fp8 = sparse_mla_gluon_fp8
COMPILE_CASES = (True, False)  # HAS_TOPK_LENGTH


# --------------------------------------------------------------------------- sm_90 compile
def _compile_fp8() -> dict[str, dict]:
    """What ptxas and the PTX say of each case compiled for sm_90, with the launch's own options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = fp8._sparse_mla_gluon_fp8_kernel
    names = kernel.arg_names
    used = {}
    for has_topk_length in COMPILE_CASES:
        constants = dict(HAS_TOPK_LENGTH=has_topk_length, BLOCK_H=fp8.BLOCK_H, BLOCK_T=fp8.BLOCK_T, D_V=fp8.D_V,
                         D_R=fp8.D_R, NUM_BUFFERS=fp8.NUM_BUFFERS, CONSUMER_REGISTERS=fp8.CONSUMER_REGISTERS,
                         PRODUCER_REGISTERS=fp8.PRODUCER_REGISTERS)
        signature = {arg: "constexpr" if arg in constants else ("fp32" if "scale" in arg else "i32") for arg in names}
        signature.update({arg: "*fp32" for arg in names if arg.startswith("p_")})
        signature.update(p_q="*bf16", p_kv="*u8", p_indices="*i32", p_topk_length="*i32")
        # The launcher's tensors are contiguous and 16-byte aligned; the cache's row stride, 656 bytes, and
        # the other strides are multiples of 16.
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(names) if arg.startswith(("p_", "stride_"))}
        source = GluonASTSource(fn=kernel, signature=signature, attrs=aligned,
                                constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=fp8.NUM_WARPS, maxnreg=fp8.MAX_REGISTERS))
        ptx = compiled.asm["ptx"]
        report = ptxas_report(ptx)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
        last_widening = ptx.rindex("cvt.rn.f16x2.e4m3x2")
        fence = ptx.index("fence.proxy.async.shared::cta", last_widening)
        used[str(has_topk_length)] = dict(
            shared=compiled.metadata.shared, registers=int(re.search(r"Used (\d+) registers", report).group(1)),
            spill_bytes=sum(spills), spill_lines=len(spills),
            serialized=[line for line in report.splitlines() if "serialized" in line],
            threads=int(re.search(r"\.reqntid (\d+)", ptx).group(1)),
            maxnreg=int(re.search(r"\.maxnreg (\d+)", ptx).group(1)),
            setmaxnreg=[(kind, int(n))
                        for kind, n in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)],
            wgmma_s=len(re.findall(r"wgmma\.mma_async\S*m64n32k16", ptx)),
            wgmma_o=len(re.findall(r"wgmma\.mma_async\S*m64n256k16", ptx)),
            wgmma_other=len(re.findall(r"wgmma\.mma_async\S*m64n(?!32k16|256k16)", ptx)),
            cp_async=len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)),
            cp_async_arrive=len(re.findall(r"cp\.async\.mbarrier\.arrive\.noinc", ptx)),
            widenings=len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", ptx)),
            vector_loads=len(re.findall(r"ld\.global\.v4\.b32", ptx)),
            barrier_counts=sorted(int(n) for n in re.findall(r"mbarrier\.init\.shared::cta\.b64 \[[^\]]+\], (\d+);", ptx)),
            # The last block's stores between its widening and the proxy fence, then the producer's partition
            # barrier and the arrival.
            stores_before_fence=len(re.findall(r"st\.shared\.v4", ptx[last_widening:fence])),
            release_order=[m.group(0).split()[0] for m in re.finditer(
                r"fence\.proxy\.async\.shared::cta|bar\.sync\s+\d+, 128|mbarrier\.arrive\.shared::cta|st\.shared",
                ptx[fence:])][:3])
    return used


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    if sparse_mla_gluon.gluon_release_reasons():
        pytest.skip("; ".join(sparse_mla_gluon.gluon_release_reasons()))
    return run_compiled_report(__file__)


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_fp8_sm90_compile_has_no_spills_and_fits_shared_memory(compiled, case):
    usage = compiled[case]
    assert usage["spill_lines"] == 2, f"{case}: ptxas reported no spill counts: {usage}"
    assert usage["spill_bytes"] == 0, f"{case}: {usage}"
    assert usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {usage}"


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_fp8_sm90_compile_keeps_wgmma_asynchronous_with_the_consumers_products(compiled, case):
    usage = compiled[case]
    assert usage["serialized"] == [], usage["serialized"]
    # The consumers are the bf16 ping-pong kernel's: the same products in the same places.
    assert (usage["wgmma_s"], usage["wgmma_o"], usage["wgmma_other"]) == (4 * 36, 9 * 2, 0), usage


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_fp8_register_split_fits_the_register_file(compiled, case):
    usage = compiled[case]
    assert usage["threads"] == 3 * 128 and usage["maxnreg"] == fp8.MAX_REGISTERS, usage
    # setmaxnreg.inc waits for registers the block was never given: the shares must fit what it holds.
    assert 2 * fp8.CONSUMER_REGISTERS + fp8.PRODUCER_REGISTERS <= 3 * fp8.MAX_REGISTERS
    targets = {n for _, n in usage["setmaxnreg"]}
    assert {fp8.CONSUMER_REGISTERS, fp8.PRODUCER_REGISTERS} <= targets, usage["setmaxnreg"]
    assert max(targets) <= 256 and all(n % 8 == 0 for n in targets), usage["setmaxnreg"]


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_fp8_producer_dequantizes_and_signals_after_its_stores(compiled, case):
    usage = compiled[case]
    # A tile's 32 x 512 latent bytes over 128 threads: 128 a thread, in 8 16-byte loads, widened two at a
    # time (64 conversions); Q by copies (32 + 4 a thread) and a tile's RoPE values (2).
    assert usage["vector_loads"] == 8 and usage["widenings"] == 64, usage
    assert usage["cp_async"] == 36 + 2 and usage["cp_async_arrive"] == 2, usage
    # Q: 128 copy arrivals; each rows barrier: 128 copy arrivals and the producer's one; rows free and
    # P free: 2 consumers; P ready: 1.
    assert usage["barrier_counts"] == sorted([128] + [129] * fp8.NUM_BUFFERS + [2] * fp8.NUM_BUFFERS
                                             + [1, 1, 2, 2]), usage
    # The consumers' tensor cores read the stores through the async proxy: the last block's 4 stores, the
    # fence, then every producer thread past the partition's barrier, then the one arrival (no store between).
    assert usage["stores_before_fence"] == 4, usage
    assert usage["release_order"] == ["fence.proxy.async.shared::cta", "bar.sync", "mbarrier.arrive.shared::cta"], \
        usage["release_order"]


# --------------------------------------------------------------------------- the switch, the refusals, the plan
def _fp8_inputs(*, s_q=2, h=64, s_kv=16, topk=8, device="cpu"):
    q = torch.zeros(s_q, h, 576, dtype=torch.bfloat16, device=device)
    cache = torch.zeros(s_kv, 656, dtype=torch.uint8, device=device)
    indices = torch.zeros(s_q, topk, dtype=torch.int32, device=device)
    return q, cache, indices


class _RecordingKernels:
    """Stands in for the sparse MLA module: records the kernel the backend chose."""

    def __init__(self):
        self.kernels = []

    def sparse_mla(self, q, kv, indices, sm_scale, d_v, topk_length, attn_sink, *, kernel="tl"):
        self.kernels.append(kernel)
        return None, None


@pytest.fixture
def recording(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    kernels = _RecordingKernels()
    monkeypatch.setattr(triton_backend, "_sparse_mla_module", kernels)
    monkeypatch.setattr(fp8, "fp8_applies", lambda *args: [])  # as on a Hopper GPU
    monkeypatch.delenv("DSA_REF_TRITON_GLUON_FP8", raising=False)
    return kernels


def _chosen(kernels, backend=None) -> str:
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    q, cache, indices = _fp8_inputs(topk=64)
    (backend or TritonBackend()).sparse_mla(q, cache, indices, sm_scale=0.05, d_v=512, topk_length=None,
                                            attn_sink=None)
    return kernels.kernels[-1]


def test_fp8_kernel_is_off_by_default_and_switched_by_attribute_or_environment(recording, monkeypatch):
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    assert TritonBackend.hopper_fp8_decode is False
    assert _chosen(recording) == "tl"
    chosen = TritonBackend()
    chosen.hopper_fp8_decode = True
    assert _chosen(recording, chosen) == "gluon_fp8"
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_FP8", "1")
    assert _chosen(recording) == "gluon_fp8"
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_FP8", "0")
    assert _chosen(recording, chosen) == "tl"  # the environment wins over the attribute


def test_fp8_switch_also_routes_the_torch_ops_hook(recording, monkeypatch):
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    backend = TritonBackend()
    q, cache, indices = _fp8_inputs(topk=64)
    device = q.device
    monkeypatch.setattr("dsa_ref.interop.resolved_torch_device", lambda _: device)
    # Off: the hook sends the FP8 decode straight to the kernel module (its default, the tl kernel).
    backend.sparse_mla_torch(q, cache, indices, None, None, 0.05, 512)
    assert recording.kernels[-1] == "tl"
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_FP8", "1")
    backend.sparse_mla_torch(q, cache, indices, None, None, 0.05, 512)
    assert recording.kernels[-1] == "gluon_fp8"


def test_fp8_kernel_only_where_it_applies():
    from dsa_ref_backends.torch_triton import backend as triton_backend

    q, cache, indices = _fp8_inputs(topk=64)
    reasons = fp8.fp8_applies(q, cache, 512, indices)
    assert any("needs a CUDA GPU" in r for r in reasons), reasons
    assert triton_backend.fp8_forward_kernel(q, cache, 512, indices, None, None) == "tl"


def test_fp8_kernel_refuses_with_reasons():
    q, cache, indices = _fp8_inputs(topk=64)
    cases = [
        ((q.to(torch.float32), cache, 512), r"q dtype=torch\.float32 \(supported: torch\.bfloat16\)"),
        ((torch.zeros(2, 96, 576, dtype=torch.bfloat16), cache, 512), r"h=96 \(supported: a multiple of 64\)"),
        ((q, torch.zeros(16, 576, dtype=torch.bfloat16), 512), r"kv dtype=torch\.bfloat16 \(supported: torch\.uint8"),
        ((q, torch.zeros(16, 640, dtype=torch.uint8), 512), r"kv shape=\(16, 640\) \(supported: \[s_kv, 656\]\)"),
        ((q, cache, 256), r"d_v=256 \(supported: 512\)"),
    ]
    for (q_in, kv_in, d_v), message in cases:
        with pytest.raises(ValueError, match=r"Gluon FP8 sparse MLA kernel does not apply: .*" + message):
            fp8.sparse_mla_gluon_fp8(q_in, kv_in, indices, 0.05, d_v=d_v)
    with pytest.raises(ValueError, match=r"indices shape=\(3, 64\) \(supported: \[s_q, topk\]\)"):
        sparse_mla.sparse_mla(q, cache, torch.zeros(3, 64, dtype=torch.int32), 0.05, 512, kernel="gluon_fp8")
    with pytest.raises(ValueError, match="kernel='gluon_fp8' takes num_splits only"):
        sparse_mla.sparse_mla(q, cache, indices, 0.05, 512, kernel="gluon_fp8", config={})


def test_fp8_split_plan():
    # Enough programs (b 64, s_q 2, h 128 = 256 programs of one SM each): no split.
    assert fp8.fp8_splits(128, 128, 2048, 132) == 1
    # One query, 128 heads: 2 programs; split until the programs fill half the GPU or a split would
    # keep fewer than MIN_SPLIT_SLOTS slots.
    assert fp8.fp8_splits(1, 128, 2048, 132) == 2048 // fp8.MIN_SPLIT_SLOTS
    assert fp8.fp8_splits(8, 128, 2048, 132) == 8  # 16 programs x 8 = 128 of 132 SMs; x 16 would queue
    assert fp8.fp8_splits(1, 64, 256, 132) == 1  # 256 slots: no split keeps 8 tiles
    for s_q, h, topk in ((1, 64, 2048), (3, 128, 700), (40, 64, 4096)):
        splits = fp8.fp8_splits(s_q, h, topk, 132)
        assert splits & (splits - 1) == 0 and (splits == 1 or topk // splits >= fp8.MIN_SPLIT_SLOTS)


def test_fp8_register_constants_are_the_launch_ones():
    assert fp8.MAX_REGISTERS == (65536 // (3 * 128)) // 8 * 8
    assert fp8.BLOCK_H == sparse_mla_gluon.BLOCK_H and fp8.D_V == 512 and fp8.SCALE_BLOCKS == 4


@pytest.fixture(autouse=True)
def _release_it_is_written_for(monkeypatch):
    """The reasons above are the inputs'; the Triton release is tested with the first Gluon kernel."""
    monkeypatch.setattr(sparse_mla_gluon, "gluon_release_reasons", lambda: [])
    monkeypatch.setattr(fp8, "gluon_release_reasons", lambda: [])


# --------------------------------------------------------------------------- on a Hopper GPU
def _fp8_case(h, s_kv, topk, *, seed, sink, with_topk_length, index_dtype=torch.int32):
    """The ping-pong tests' awkward case with its rows packed into the FP8 cache (a row of small values
    included, whose scale is far below 1)."""
    lengths = (topk, 0, 1, 31, 32, 33, 64, 65)
    q, kv, indices, topk_length, attn_sink = awkward_case(
        h, s_kv, topk, seed=seed, sink=sink, with_topk_length=with_topk_length, index_dtype=index_dtype, s_q=10,
        lengths=dict(zip((0, 3, 4, 6, 7, 8, 9, 5), lengths)))
    indices[5, 32:] = -1
    latent = kv.float().numpy()
    latent[1] *= 1e-3
    cache = torch.from_numpy(reference.pack_kv_cache_fp8(latent))
    return q, cache, indices, topk_length, attn_sink


@pytest.mark.gpu
def test_fp8_finishes_on_small_inputs():
    """A mistake in the mbarrier protocol hangs the GPU rather than failing: a few launches in a child
    process with a time limit first."""
    require_hopper()
    script = textwrap.dedent("""
        import torch
        from dsa_ref_backends.torch_triton.sparse_mla_gluon_fp8 import sparse_mla_gluon_fp8
        for topk, length, splits in ((32, None, 1), (64, None, 1), (96, 1, 1), (2048, None, 1), (100, 0, 1),
                                     (2048, None, 4), (300, 7, 2)):
            q = torch.randn(3, 128, 576, device="cuda").to(torch.bfloat16)
            cache = torch.randint(0, 120, (4096, 656), device="cuda", dtype=torch.uint8)
            indices = torch.randint(0, 4096, (3, topk), device="cuda", dtype=torch.int32)
            lengths = None if length is None else torch.full((3,), length, device="cuda", dtype=torch.int32)
            sparse_mla_gluon_fp8(q, cache, indices, 0.05, lengths, num_splits=splits)
        torch.cuda.synchronize()
        print("finished")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the Gluon FP8 kernel did not finish in 300 s (a hang: the mbarrier protocol)")
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
@pytest.mark.parametrize("h, s_kv, topk", [(64, 300, 32), (64, 300, 64), (128, 1000, 100), (64, 4096, 577),
                                           (128, 8192, 2048), (128, 2048, 96)])
@pytest.mark.parametrize("sink, with_topk_length", [(False, False), (True, True)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_matches_reference_on_awkward_cases(h, s_kv, topk, sink, with_topk_length, num_splits):
    require_hopper()
    case = _fp8_case(h, s_kv, topk, seed=h + s_kv + topk, sink=sink, with_topk_length=with_topk_length)
    cuda = [None if x is None else x.cuda() for x in case]
    run = lambda: sparse_mla.sparse_mla(cuda[0], cuda[1], cuda[2], 576**-0.5, 512, cuda[3], cuda[4],  # noqa: E731
                                        kernel="gluon_fp8", num_splits=num_splits)
    out, lse = run()
    again_out, again_lse = run()
    assert torch.equal(out.view(torch.int32), again_out.view(torch.int32)), "repeated run differs"
    assert torch.equal(lse.view(torch.int32), again_lse.view(torch.int32)), "repeated run differs"
    assert_matches_reference(out, lse, *case)
    assert np.all(to_numpy(out)[2] == 0.0) and np.all(np.isneginf(to_numpy(lse)[2])), "a row with no valid slot"
    if with_topk_length:
        assert np.all(to_numpy(out)[3] == 0.0) and np.all(np.isneginf(to_numpy(lse)[3])), "topk_length 0"
    # The tl.dot kernel on the same cache: the same dequantized values, another order of the sums.
    tl_out, _ = sparse_mla.sparse_mla(cuda[0], cuda[1], cuda[2], 576**-0.5, 512, cuda[3], cuda[4])
    assert_close(to_numpy(out), to_numpy(tl_out), tolerance_for("bfloat16"), name="out against the tl.dot kernel")


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
def test_fp8_int64_indices_past_int32_are_invalid_and_views_are_accepted():
    require_hopper()
    q, cache, indices, topk_length, attn_sink = _fp8_case(128, 2048, 256, seed=7, sink=True, with_topk_length=True,
                                                          index_dtype=torch.int64)
    wide_q = torch.cat([q, q], dim=-1).cuda()[..., 576:]  # not contiguous: the launcher copies it
    out, lse = fp8.sparse_mla_gluon_fp8(wide_q, cache.cuda()[1:], (indices - 1).cuda(), 0.05, topk_length.cuda(),
                                        attn_sink.cuda())
    assert_matches_reference(out, lse, q, cache[1:], indices - 1, topk_length, attn_sink, sm_scale=0.05)


@pytest.mark.gpu
def test_fp8_through_the_backend_switch_and_the_torch_op(monkeypatch):
    require_hopper()
    import dsa_ref
    import dsa_ref.torch as dsa_torch

    case = _fp8_case(128, 1000, 200, seed=3, sink=True, with_topk_length=True)
    cuda = [None if x is None else x.cuda() for x in case]
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_FP8", "1")
    out, lse = dsa_ref.sparse_mla(cuda[0], cuda[1], cuda[2], topk_length=cuda[3], attn_sink=cuda[4], backend="triton")
    assert_matches_reference(out, lse, *case)
    with dsa_ref.use_backend("triton"):
        out, lse = dsa_torch.sparse_mla(cuda[0], cuda[1], cuda[2], topk_length=cuda[3], attn_sink=cuda[4])
    assert_matches_reference(out, lse, *case)


if __name__ == "__main__":
    print(json.dumps(_compile_fp8()))
