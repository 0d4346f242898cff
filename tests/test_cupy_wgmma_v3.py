"""The cupy backend's split-V sparse-MLA forwards on Hopper (``sparse_mla_fwd_wgmma_v3``,
``sparse_mla_fwd_wgmma_fp8_v3``, ``sparse_mla_fwd_wgmma_fp8_pair_v3`` in csrc/sparse_mla_wgmma_v2.cu,
``CupyBackend.hopper_split_v``, the default on Hopper): the v2 kernels' producers and launch with FlashMLA's
decode schedule for the consumers (one takes S over a tile's 64 slots and the softmax, handing P to the other,
which adds only its half of P V).

CPU part: the routing (the default where a v2 kernel would run, and only there; its environment variable), the
compile report (no spills, the launch's registers), the barriers the consumers meet at, and the SASS (N = 64
products, P V with P from registers). GPU part
(``@pytest.mark.gpu``): against the float64 reference on the bf16 kernels' cases and the FP8 ones, over bf16
rows, the packed cache and the cluster pair, within rounding of v2, bitwise-equal reruns, and one V3.2-size
decode.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cupy_hopper import hopper_backend
from cupy_launches import record_launches

from dsa_ref.testing import problems
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_wgmma_problems")
from cupy_wgmma_problems import FORWARD_CASES, compare_forward, forward_problem, run_forward  # noqa: E402

SOURCE = "sparse_mla_wgmma_v2.cu"
ENV = "DSA_REF_CUPY_WGMMA_SPLIT_V"
V3 = {"bf16": "sparse_mla_fwd_wgmma_v3", "fp8": "sparse_mla_fwd_wgmma_fp8_v3", "pair": "sparse_mla_fwd_wgmma_fp8_pair_v3"}
V2 = {"bf16": "sparse_mla_fwd_wgmma_v2", "fp8": "sparse_mla_fwd_wgmma_fp8_v2", "pair": "sparse_mla_fwd_wgmma_fp8_pair"}
H200_SMEM = 232448


# ----------------------------------------------------------------------------- CPU
def _chosen(backend, monkeypatch, *, rows: str, h: int = 128):
    monkeypatch.setattr(cupy_backend, "_compute_capability", lambda: 90)
    monkeypatch.setattr(cupy_backend, "_smem_optin", lambda: H200_SMEM)
    kv_dtype, width = ("bfloat16", 576) if rows == "bf16" else ("uint8", 656)
    return backend._tensor_core_forward("bfloat16", kv_dtype, h=h, d_qk=576, kv_width=width, d_v=512)


def test_the_split_v_kernels_are_the_default_and_replace_the_v2_kernels_only(monkeypatch):
    for variable in (ENV, "DSA_REF_CUPY_WGMMA_V2", "DSA_REF_CUPY_WGMMA_FP8_V2", "DSA_REF_CUPY_WGMMA_FP8_PAIR"):
        monkeypatch.delenv(variable, raising=False)
    backend = cupy_backend.CupyBackend()
    assert cupy_backend.CupyBackend.hopper_split_v is True
    assert _chosen(backend, monkeypatch, rows="bf16")[1] == V3["bf16"]
    assert _chosen(backend, monkeypatch, rows="fp8")[1] == V3["pair"]  # h 128: the pair's twin
    assert _chosen(backend, monkeypatch, rows="fp8", h=64)[1] == V3["fp8"]  # no pairs at 64 heads
    backend.hopper_fp8_decode_pair = False
    assert _chosen(backend, monkeypatch, rows="fp8")[1] == V3["fp8"]
    backend.hopper_split_v = False
    assert _chosen(backend, monkeypatch, rows="bf16")[1] == V2["bf16"]
    backend.hopper_fp8_decode_pair = None  # the default pairs the split-V consumers only
    assert _chosen(backend, monkeypatch, rows="fp8")[1] == V2["fp8"]
    backend.hopper_fp8_decode_pair = False
    monkeypatch.setenv(ENV, "1")
    for rows in ("bf16", "fp8"):
        v3, v2 = _chosen(backend, monkeypatch, rows=rows), None
        monkeypatch.setenv(ENV, "0")
        v2 = _chosen(backend, monkeypatch, rows=rows)
        monkeypatch.setenv(ENV, "1")
        assert v3[1] == V3[rows] and v2[1] == V2[rows]
        assert v3[0] == v2[0] == SOURCE and v3[2:] == v2[2:]  # the same source, threads, memory, grid, row reads
    backend.hopper_fp8_decode_pair = True
    assert _chosen(backend, monkeypatch, rows="fp8")[1] == V3["pair"]
    assert _chosen(backend, monkeypatch, rows="fp8", h=64)[1] == V3["fp8"]  # no pairs at 64 heads
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8_V2", "0")
    assert _chosen(backend, monkeypatch, rows="fp8")[1] == "sparse_mla_fwd_wgmma_fp8"  # the first kernel stays
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_V2", "0")
    assert _chosen(backend, monkeypatch, rows="bf16")[1] == "sparse_mla_fwd_wgmma"
    assert all(name in kernels.KERNELS[SOURCE] for name in V3.values())


def test_the_split_v_kernels_compile_without_spills_at_the_launchs_registers():
    report = compile_check.report_path(SOURCE, "sm_90a").read_text().splitlines()
    for name in V3.values():
        (line,) = [line for line in report if line.startswith(f"{name} ")]
        assert line.split()[1:5] == ["168", "0", "0", "0"], line
    text = kernels.source_text(SOURCE)
    number = {name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))
              for name in ("PRODUCER_REGISTERS", "FP8_PRODUCER_REGISTERS", "SPLIT_V_FIRST_REGISTERS",
                           "SPLIT_V_SECOND_REGISTERS", "FP8_SPLIT_V_PRODUCER_REGISTERS", "FP8_SPLIT_V_FIRST_REGISTERS",
                           "FP8_SPLIT_V_SECOND_REGISTERS", "FP8_PAIR_SPLIT_V_PRODUCER_REGISTERS",
                           "FP8_PAIR_SPLIT_V_FIRST_REGISTERS")}
    # setmaxnreg.inc takes only what the decreases gave back: 384 threads x 168 at launch.
    assert 128 * (number["PRODUCER_REGISTERS"] + number["SPLIT_V_FIRST_REGISTERS"] + number["SPLIT_V_SECOND_REGISTERS"]) <= 384 * 168
    assert 128 * (number["FP8_SPLIT_V_PRODUCER_REGISTERS"] + number["FP8_SPLIT_V_FIRST_REGISTERS"]
                  + number["FP8_SPLIT_V_SECOND_REGISTERS"]) <= 384 * 168
    assert 128 * (number["FP8_PAIR_SPLIT_V_PRODUCER_REGISTERS"] + number["FP8_PAIR_SPLIT_V_FIRST_REGISTERS"]
                  + number["FP8_SPLIT_V_SECOND_REGISTERS"]) <= 384 * 168
    assert all(value % 8 == 0 for value in number.values())  # setmaxnreg takes multiples of 8
    assert re.search(r"__cluster_dims__\(2, 1, 1\)[^\n]*\nsparse_mla_fwd_wgmma_fp8_pair_v3\(", text)


@pytest.fixture(scope="module")
def sass():
    nvcc = compile_check.find_nvcc()
    if nvcc is None or compile_check.find_cuobjdump(nvcc) is None:
        pytest.skip("needs nvcc and cuobjdump")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        result = compile_check.compile_source(nvcc, SOURCE, "sm_90a", Path(folder))
    assert result.returncode == 0, result.log
    return result.sass


@pytest.mark.parametrize("rows", list(V3))
def test_sass_has_64_slot_products_and_p_v_from_registers(sass, rows):
    body = compile_check.kernel_sass(sass, V3[rows])
    assert len(re.findall(r"HGMMA\.64x64x16\.F32\.BF16", body)) == 36  # S: 36 steps of 16 dims, N = 64
    assert len(re.findall(r"HGMMA\.64x32x16", body)) == 0  # v2's N = 32 halves are gone
    products = re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, (\S+)", body)
    assert len(products) == 8  # P V: 4 steps a consumer
    assert sum(operand.startswith("R") for operand in products) == 4  # the first consumer's A from registers
    assert not re.search(r"\b(?:LDL|STL)\b", body)
    # The named-barrier hand-offs (P ready, the final factors) are rendezvous: each consumer waits at each, so
    # four named-barrier waits beside the block's start, and no one-sided arrival (P free is an mbarrier).
    assert not re.search(r"\bBAR\.ARV\b", body)
    assert len(re.findall(r"\bBAR\.SYNC\.DEFER_BLOCKING 0x[34], 0x100\b", body)) >= 4
    assert not re.search(r"\bBAR\.SYNC\.DEFER_BLOCKING 0x5\b", body)


def test_the_consumers_meet_through_unaligned_barriers_on_both_sides():
    """The SASS of bar.sync and barrier.sync is the same, so the source is what can be checked here: each of the
    four named-barrier meetings of consume_split_v is consumers_meet (barrier.sync, both sides waiting), and the
    one one-sided hand-off (P free) is an mbarrier, which racecheck follows. bar.sync from the two warpgroups'
    different instructions fails synccheck, a one-sided barrier.arrive racecheck (tools/named_barrier_check.py,
    backends/cupy_cuda/NOTES.md)."""
    text = kernels.source_text(SOURCE)
    body = text[text.index("void consume_split_v("):text.index("// PAIR (FP8_CACHE only)")]
    assert body.count("consumers_meet(") == 4
    assert "named_barrier_sync(" not in body and "named_barrier_arrive(" not in body
    first, second = body.split("} else {", 1)
    assert first.count("mbarrier_wait(p_free_barrier") == 1 and "mbarrier_arrive(p_free_barrier" not in first
    assert second.count("mbarrier_arrive(p_free_barrier)") == 1 and "mbarrier_wait(p_free_barrier" not in second
    helper = text[text.index("void consumers_meet("):text.index("void consume_split_v(")]
    assert "named_barrier_sync_unaligned(id, CONSUMER_THREADS)" in helper
    assert 'asm volatile("barrier.sync %0, %1;' in kernels.source_text("hopper.cuh")


# ----------------------------------------------------------------------------- GPU
def _backend(rows: str):
    backend = hopper_backend("the split-V wgmma forwards", cupy_backend.WGMMA_FORWARD_SMEM)
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.hopper_forward = backend.hopper_forward_v2 = True
    backend.hopper_fp8_decode = backend.hopper_fp8_decode_v2 = True
    backend.hopper_fp8_decode_pair = rows == "pair"
    backend.hopper_split_v = True
    return backend


def _expected(rows: str, h: int) -> str:
    return V3["fp8"] if rows == "pair" and h % 128 else V3[rows]


def _check(problem, monkeypatch, rows: str):
    monkeypatch.delenv(ENV, raising=False)
    backend = _backend(rows)
    launched = record_launches(monkeypatch)
    out, lse = run_forward(problem, backend)
    assert launched == [_expected(rows, problem.inputs["q"].shape[1])], launched
    compare_forward(out, lse, problem.inputs, backend)
    return out, lse


CASES = dict(FORWARD_CASES)
CASES["h128-topk192-cuts"] = dict(s_q=5, s_kv=900, h=128, topk=192, invalid_fraction=0.1, attn_sink=True,
                                  topk_lengths=[1, 64, 65, 127, 192])
CASES["h128-v32-scale"] = dict(s_q=4, s_kv=3000, h=128, topk=512, sm_scale=problems.V32_SM_SCALE,
                               distribution="recent", duplicate_fraction=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", list(V3))
@pytest.mark.parametrize("name", list(CASES))
def test_split_v_forward_matches_reference(name, rows, monkeypatch):
    _check(forward_problem(len(name), packed_fp8=rows != "bf16", **CASES[name]), monkeypatch, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", list(V3))
def test_split_v_forward_is_v2_to_rounding_and_reruns_bitwise(rows, monkeypatch):
    """The same tiles and products as v2; only a row's denominator is summed in another order (one running
    sum over 64 slots, not two halves of 32): out and lse within a few float32 ulps of v2's."""
    problem = forward_problem(5, s_q=6, s_kv=2000, h=128, topk=512, invalid_fraction=0.1, duplicate_fraction=0.1,
                              topk_length=True, attn_sink=True, packed_fp8=rows != "bf16")
    first = _check(problem, monkeypatch, rows)
    again = run_forward(problem, _backend(rows))
    for a, b in zip(first, again):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    v2_backend = _backend(rows)
    v2_backend.hopper_split_v = False
    launched = record_launches(monkeypatch)
    v2 = run_forward(problem, v2_backend)
    assert launched == [V2[rows]], launched
    finite = np.isfinite(v2[1])
    np.testing.assert_allclose(first[0], v2[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first[1][finite], v2[1][finite], rtol=1e-6, atol=1e-6)
    assert (np.isneginf(first[1]) == np.isneginf(v2[1])).all()


#: The register moves each kernel's warpgroups make from the launch's 168 (setmaxnreg): (allocations,
#: releases) in hex as the SASS prints them. The second consumer grows beside the bf16 rows' 56-register
#: producer and shrinks beside the FP8 rows' 152-register one (144 in the pair, whose first consumer has 200).
REGISTER_MOVES = {"bf16": ({"0xd0", "0xf0"}, {"0x38"}), "fp8": ({"0xc0"}, {"0xa0", "0x98"}),
                  "pair": ({"0xc8"}, {"0xa0", "0x90"})}


@pytest.mark.parametrize("rows", list(V3))
def test_sass_moves_registers_to_the_consumers_as_designed(sass, rows):
    body = compile_check.kernel_sass(sass, V3[rows])
    allocations = set(re.findall(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL UP\d, (0x[0-9a-f]+)", body))
    releases = set(re.findall(r"USETMAXREG\.DEALLOC\.CTAPOOL (0x[0-9a-f]+)", body))
    assert (allocations, releases) == REGISTER_MOVES[rows], (allocations, releases)
