"""The warp-specialized (ping-pong) Gluon sparse MLA forward of the ``triton`` backend: its sm_90
compile (no spills, no serialized wgmma, the register split of the three warpgroups, Hopper's shared
memory, the designed products), its switch (off by default, the environment variable), its refusals,
and on a Hopper GPU its results against the float64 reference on the awkward cases.

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

from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import sparse_mla, sparse_mla_gluon, sparse_mla_gluon_pingpong  # noqa: E402

pytest.register_assert_rewrite("gluon_forward_cases")  # its asserts report as this file's do
from gluon_forward_cases import (  # noqa: E402
    H100_SHARED_MEMORY_PER_BLOCK,
    assert_matches_reference,
    awkward_case,
    check_awkward_case,
    check_int64_indices_and_views,
    require_hopper,
    to_numpy,
    zero_inputs,
)

pingpong = sparse_mla_gluon_pingpong
REGISTER_FILE = 65536  # 32-bit registers of an SM, all of them this kernel's (one CTA an SM)
COMPILE_CASES = (True, False)  # HAS_TOPK_LENGTH


# --------------------------------------------------------------------------- sm_90 compile


def _compile_pingpong() -> dict[str, dict]:
    """What ptxas and the PTX say of each case compiled for sm_90, with the launch's own options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = pingpong._sparse_mla_gluon_pingpong_kernel
    names = kernel.arg_names
    used = {}
    for has_topk_length in COMPILE_CASES:
        constants = dict(HAS_TOPK_LENGTH=has_topk_length, BLOCK_H=pingpong.BLOCK_H, BLOCK_T=pingpong.BLOCK_T,
                         D_V=pingpong.D_V, D_R=pingpong.D_R, NUM_BUFFERS=pingpong.NUM_BUFFERS,
                         CONSUMER_REGISTERS=pingpong.CONSUMER_REGISTERS,
                         PRODUCER_REGISTERS=pingpong.PRODUCER_REGISTERS)
        signature = {arg: "constexpr" if arg in constants else ("fp32" if "scale" in arg else "i32") for arg in names}
        signature.update({arg: "*fp32" for arg in names if arg.startswith("p_")})
        signature.update(p_q="*bf16", p_kv="*bf16", p_indices="*i32", p_topk_length="*i32")
        # The launcher's tensors are contiguous and 16-byte aligned, their strides multiples of 16.
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(names) if arg.startswith(("p_", "stride_"))}
        source = GluonASTSource(fn=kernel, signature=signature, attrs=aligned,
                                constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=pingpong.NUM_WARPS, maxnreg=pingpong.MAX_REGISTERS))
        ptx = compiled.asm["ptx"]
        report = ptxas_report(ptx)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
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
            cp_async_arrive=len(re.findall(r"cp\.async\.mbarrier\.arrive\.noinc", ptx)))
    return used


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    if sparse_mla_gluon.gluon_release_reasons():
        pytest.skip("; ".join(sparse_mla_gluon.gluon_release_reasons()))
    return run_compiled_report(__file__)


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_pingpong_sm90_compile_has_no_spills_and_fits_shared_memory(compiled, case):
    usage = compiled[case]
    assert usage["spill_lines"] == 2, f"{case}: ptxas reported no spill counts: {usage}"
    assert usage["spill_bytes"] == 0, f"{case}: {usage}"
    assert usage["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {usage}"


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_pingpong_sm90_compile_keeps_wgmma_asynchronous(compiled, case):
    # ptxas serializes every wgmma of the kernel (C7514 / C7515) when an accumulator is touched while a
    # product that writes it may be in flight: the kernel would run, each product waited alone.
    assert compiled[case]["serialized"] == [], compiled[case]["serialized"]


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_pingpong_register_split_fits_the_register_file(compiled, case):
    usage = compiled[case]
    # Three warpgroups, one CTA an SM: the launch's registers a thread are what the file holds for 384.
    assert usage["threads"] == 3 * 128 and usage["maxnreg"] == pingpong.MAX_REGISTERS, usage
    assert usage["registers"] <= pingpong.MAX_REGISTERS and pingpong.MAX_REGISTERS * 384 <= REGISTER_FILE, usage
    # setmaxnreg.inc waits for registers the block was never given: the consumers' two shares and the
    # producer's must fit in what the launch holds, or the kernel hangs.
    assert 2 * pingpong.CONSUMER_REGISTERS + pingpong.PRODUCER_REGISTERS <= 3 * pingpong.MAX_REGISTERS
    targets = {n for _, n in usage["setmaxnreg"]}
    assert {pingpong.CONSUMER_REGISTERS, pingpong.PRODUCER_REGISTERS} <= targets, usage["setmaxnreg"]
    assert max(targets) <= 256 and all(n % 8 == 0 for n in targets), usage["setmaxnreg"]


@pytest.mark.parametrize("case", [str(c) for c in COMPILE_CASES])
def test_pingpong_sm90_compile_has_the_designed_products_and_gathers(compiled, case):
    usage = compiled[case]
    # S of a 32-slot tile: 64 heads x 32 slots over 576 / 16 = 36 k-steps, written four times (each
    # consumer's first step and its loop); P V: [64, 256] over 32 / 16 = 2 k-steps, in nine places (the
    # first consumer's tile 0; two in each of the other three steps; each consumer's last tile of the
    # other's).
    assert (usage["wgmma_s"], usage["wgmma_o"], usage["wgmma_other"]) == (4 * 36, 9 * 2, 0), usage
    # The producer's 16-byte copies: Q (32 + 4 a thread), a tile (16 + 2), each signalled on an mbarrier.
    assert usage["cp_async"] == 36 + 18 and usage["cp_async_arrive"] == 2, usage


# --------------------------------------------------------------------------- the switch, the refusals
class _RecordingKernels:
    """Stands in for the sparse MLA module: records the kernel the backend chose."""

    def __init__(self):
        self.kernels = []

    def sparse_mla(self, q, kv, indices, sm_scale, d_v, topk_length, attn_sink, *, kernel):
        self.kernels.append(kernel)
        return None, None


@pytest.fixture
def recording(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    kernels = _RecordingKernels()
    monkeypatch.setattr(triton_backend, "_sparse_mla_module", kernels)
    monkeypatch.setattr(sparse_mla_gluon, "gluon_applies", lambda *args: [])  # as on a Hopper GPU
    for variable in ("DSA_REF_TRITON_GLUON", "DSA_REF_TRITON_GLUON_PINGPONG"):
        monkeypatch.delenv(variable, raising=False)
    return kernels


def _chosen(kernels, backend=None) -> str:
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    q, kv, indices = zero_inputs(topk=64)
    (backend or TritonBackend()).sparse_mla(q, kv, indices, sm_scale=0.05, d_v=512, topk_length=None, attn_sink=None)
    return kernels.kernels[-1]


def test_pingpong_is_the_default(recording):
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    assert TritonBackend.hopper_forward_pingpong is True
    assert _chosen(recording) == "gluon_pingpong"
    first = TritonBackend()
    first.hopper_forward_pingpong = False
    assert _chosen(recording, first) == "gluon"


def test_pingpong_switch_attribute_and_environment(recording, monkeypatch):
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    chosen = TritonBackend()
    chosen.hopper_forward_pingpong = True
    assert _chosen(recording, chosen) == "gluon_pingpong"
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_PINGPONG", "1")
    assert _chosen(recording) == "gluon_pingpong"
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_PINGPONG", "0")
    assert _chosen(recording, chosen) == "gluon"  # the environment wins over the attribute
    # It only replaces the Gluon kernel: with the Hopper forward off, the tl.dot kernel runs.
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_PINGPONG", "1")
    monkeypatch.setenv("DSA_REF_TRITON_GLUON", "0")
    assert _chosen(recording) == "tl"


def test_pingpong_only_where_the_gluon_kernel_applies(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    q, kv, indices = zero_inputs(topk=64)
    # On the CPU (or the interpreter) the Gluon kernel does not apply, so neither does its variant.
    assert sparse_mla_gluon.gluon_applies(q, kv, 512, indices)
    assert triton_backend.forward_kernel(True, q, kv, 512, indices, None, None, pingpong=True) == "tl"
    monkeypatch.setattr(sparse_mla_gluon, "gluon_applies", lambda *args: [])
    assert triton_backend.forward_kernel(True, q, kv, 512, indices, None, None, pingpong=True) == "gluon_pingpong"
    assert triton_backend.forward_kernel(True, q, kv, 512, indices, None, None) == "gluon"
    q32 = q.to(torch.float32)
    assert triton_backend.forward_kernel(True, q32, kv, 512, indices, None, None, pingpong=True) == "tl"


def test_pingpong_refuses_what_the_gluon_kernel_refuses():
    q, kv, indices = zero_inputs(topk=64)
    with pytest.raises(ValueError, match=r"ping-pong sparse MLA kernel does not apply: .*q dtype=torch\.float32"):
        pingpong.sparse_mla_gluon_pingpong(q.to(torch.float32), kv, indices, 576**-0.5)
    with pytest.raises(ValueError, match=r"ping-pong sparse MLA kernel does not apply: .*h=96 \(supported: a multiple"):
        pingpong.sparse_mla_gluon_pingpong(torch.zeros(2, 96, 576, dtype=torch.bfloat16), kv, indices, 576**-0.5)
    with pytest.raises(ValueError, match=r"does not apply: .*d_v=256 \(supported: 512\)"):
        sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 256, kernel="gluon_pingpong")
    with pytest.raises(ValueError, match="kernel='gluon_pingpong' takes neither"):
        sparse_mla.sparse_mla(q, kv, indices, 576**-0.5, 512, kernel="gluon_pingpong", num_splits=2)


def test_pingpong_register_constants_are_the_launch_ones():
    # The kernel receives them as constexprs (the setmaxnreg values), the launch as maxnreg.
    assert pingpong.MAX_REGISTERS == (REGISTER_FILE // (3 * 128)) // 8 * 8
    assert pingpong.BLOCK_H == sparse_mla_gluon.BLOCK_H and pingpong.D_V == sparse_mla_gluon.D_V


@pytest.fixture(autouse=True)
def _release_it_is_written_for(monkeypatch):
    """The reasons above are the inputs'; the Triton release is tested with the first Gluon kernel."""
    monkeypatch.setattr(sparse_mla_gluon, "gluon_release_reasons", lambda: [])


# --------------------------------------------------------------------------- on a Hopper GPU
def _awkward_case(h, s_kv, topk, *, seed, sink, with_topk_length, index_dtype=torch.int32):
    """awkward_case of 10 queries, row 5 valid in its first tile only, and (with topk_length) lengths that
    end a tile anywhere, both consumers' last tile included."""
    lengths = (topk, 0, 1, 31, 32, 33, 64, 65)  # the whole row, an empty row, tiles cut and whole
    case = awkward_case(h, s_kv, topk, seed=seed, sink=sink, with_topk_length=with_topk_length,
                        index_dtype=index_dtype, s_q=10, lengths=dict(zip((0, 3, 4, 6, 7, 8, 9, 5), lengths)))
    case[2][5, 32:] = -1  # only the first tile valid: the second consumer's tiles all masked
    return case


@pytest.mark.gpu
def test_pingpong_finishes_on_small_inputs():
    """A mistake in the mbarrier protocol hangs the GPU rather than failing: run a few launches in a
    child process with a time limit first."""
    require_hopper()
    script = textwrap.dedent("""
        import torch
        from dsa_ref_backends.torch_triton.sparse_mla_gluon_pingpong import sparse_mla_gluon_pingpong
        for topk, length in ((32, None), (64, None), (96, 1), (2048, None), (100, 0)):
            q = torch.randn(3, 128, 576, device="cuda").to(torch.bfloat16)
            kv = torch.randn(4096, 576, device="cuda").to(torch.bfloat16)
            indices = torch.randint(0, 4096, (3, topk), device="cuda", dtype=torch.int32)
            lengths = None if length is None else torch.full((3,), length, device="cuda", dtype=torch.int32)
            sparse_mla_gluon_pingpong(q, kv, indices, 0.05, lengths)
        torch.cuda.synchronize()
        print("finished")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the ping-pong kernel did not finish in 300 s (a hang: the mbarrier protocol)")
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
@pytest.mark.parametrize("h, s_kv, topk", [(64, 300, 32), (64, 300, 64), (128, 1000, 100), (64, 4096, 577),
                                           (128, 8192, 2048), (64, 65536, 2048), (128, 2048, 96)])
@pytest.mark.parametrize("sink, with_topk_length", [(False, False), (True, True)])
def test_pingpong_matches_reference_on_awkward_cases(h, s_kv, topk, sink, with_topk_length):
    require_hopper()
    case = _awkward_case(h, s_kv, topk, seed=h + s_kv + topk, sink=sink, with_topk_length=with_topk_length)
    cuda, out, lse = check_awkward_case(case, "gluon_pingpong")
    if with_topk_length:
        assert np.all(to_numpy(out)[3] == 0.0) and np.all(np.isneginf(to_numpy(lse)[3])), "topk_length 0"
    # The first Gluon kernel on the same inputs: the same math, another order of the sums.
    gluon_out, gluon_lse = sparse_mla.sparse_mla(cuda[0], cuda[1], cuda[2], 576**-0.5, 512, cuda[3], cuda[4],
                                                 kernel="gluon")
    assert_close(to_numpy(out), to_numpy(gluon_out), tolerance_for("bfloat16"),
                 name="out against the first Gluon kernel")


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_torch_outputs")
def test_pingpong_int64_indices_past_int32_are_invalid_and_views_are_accepted():
    require_hopper()
    case = _awkward_case(128, 2048, 256, seed=7, sink=True, with_topk_length=True, index_dtype=torch.int64)
    check_int64_indices_and_views(pingpong.sparse_mla_gluon_pingpong, case)


@pytest.mark.gpu
def test_pingpong_through_the_backend_switch(monkeypatch):
    require_hopper()
    import dsa_ref

    case = _awkward_case(64, 1000, 200, seed=3, sink=True, with_topk_length=True)
    cuda = [None if x is None else x.cuda() for x in case]
    monkeypatch.setenv("DSA_REF_TRITON_GLUON_PINGPONG", "1")
    out, lse = dsa_ref.sparse_mla(cuda[0], cuda[1], cuda[2], topk_length=cuda[3], attn_sink=cuda[4], backend="triton")
    assert_matches_reference(out, lse, *case)


if __name__ == "__main__":
    print(json.dumps(_compile_pingpong()))
