"""The cupy backend's Hopper sparse-MLA forwards over the packed FP8 cache (``sparse_mla_fwd_wgmma_fp8`` in
csrc/sparse_mla_wgmma.cu: the wgmma kernel whose producer warpgroup dequantizes the gathered 656-byte rows
into its bf16 tiles; sm_90a only, the default there, ``CupyBackend.hopper_fp8_decode``; and
``sparse_mla_fwd_wgmma_fp8_v2`` in csrc/sparse_mla_wgmma_v2.cu, the same rows on the second wgmma schedule,
``CupyBackend.hopper_fp8_decode_v2``, the default since measured on the H200).

CPU part: which inputs the wrapper routes to it (only when chosen, only on compute capability 9.0, only the
packed cache with bf16 q at d_qk 576, d_v 512 and h a multiple of 64; everything else as before), the
environment variable, and the kernel's row layout against the spec's. GPU part (``@pytest.mark.gpu``, the
switch set by the tests): against the float64 reference on the unpacked cache with the kit's bf16
tolerance, on invalid indices of every kind, duplicates, topk_length with 0 and cuts inside a tile,
attn_sink, a query without a valid slot, unread rows filled with NaN bytes, h 64 and 128, topk not a
multiple of 64, decode-like batches of one and two queries a sequence; a cache view off a 16-byte
boundary; bitwise-equal reruns; one V3.2-size decode (b 64, s_q 2, T 32K, h 128, topk 2048). Each runs on
both kernels and checks which one ran; the second kernel's outputs equal the first's bit for bit.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from cupy_hopper import hopper_backend
from cupy_launches import record_launches

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.reference import formats
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.tolerances import tolerance_for
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_wgmma_problems")  # its asserts report as this file's do
from cupy_wgmma_problems import FORWARD_CASES, compare_forward, forward_problem, poison_unread_rows  # noqa: E402

H200_SMEM = 232448  # MaxSharedMemoryPerBlockOptin of sm_90
A100_SMEM = 166912  # ... of sm_80
KERNEL = "sparse_mla_fwd_wgmma_fp8"
KERNEL_V2 = "sparse_mla_fwd_wgmma_fp8_v2"
KERNEL_PAIR = "sparse_mla_fwd_wgmma_fp8_pair"
V2_SOURCE = "sparse_mla_wgmma_v2.cu"
V2_ENV = "DSA_REF_CUPY_WGMMA_FP8_V2"
PAIR_ENV = "DSA_REF_CUPY_WGMMA_FP8_PAIR"


@pytest.fixture(autouse=True)
def _v2_consumers(monkeypatch):
    """These are the v2 consumers' tests: their split-V twins, the default on Hopper, are off here
    (tests/test_cupy_wgmma_v3.py has theirs)."""
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_SPLIT_V", "0")


# ----------------------------------------------------------------------------- CPU: routing
def _path(**changes):
    arguments = dict(q_dtype="bfloat16", kv_dtype="uint8", d_qk=576, kv_width=656, d_v=512, h=128,
                     compute_capability=90, smem_limit=H200_SMEM, hopper_forward=True, hopper_fp8_decode=True)
    arguments.update(changes)
    return cupy_backend.forward_kernel_path(arguments.pop("q_dtype"), arguments.pop("kv_dtype"), **arguments)


def test_chosen_packed_cache_forward_on_hopper_routes_to_the_fp8_wgmma_kernel():
    assert _path() == "wgmma_fp8"
    assert _path(h=64) == "wgmma_fp8"
    assert _path(h=192) == "wgmma_fp8"
    assert _path(hopper_forward=False) == "wgmma_fp8"  # the two switches are independent


def test_fp8_wgmma_forward_is_the_default_on_hopper():
    assert cupy_backend.CupyBackend.hopper_fp8_decode is True, "the default since measured on the H200"
    assert _path(hopper_fp8_decode=False) == "mma"
    # forward_kernel_path's own default is the switch off (its callers pass the backend's switch)
    assert cupy_backend.forward_kernel_path("bfloat16", "uint8", d_qk=576, kv_width=656, d_v=512, h=128,
                                            compute_capability=90, smem_limit=H200_SMEM,
                                            hopper_forward=True) == "mma"


def test_the_environment_variable_overrides_the_attribute(monkeypatch):
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "1")
    assert cupy_backend.kernel_switch(False, "DSA_REF_CUPY_WGMMA_FP8") is True
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "0")
    assert cupy_backend.kernel_switch(True, "DSA_REF_CUPY_WGMMA_FP8") is False
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "")
    assert cupy_backend.kernel_switch(True, "DSA_REF_CUPY_WGMMA_FP8") is True


@pytest.mark.parametrize("changes", [
    dict(compute_capability=80), dict(compute_capability=89), dict(compute_capability=100),
    dict(compute_capability=0),  # what the wrapper passes when no Hopper switch is on
    dict(h=16), dict(h=100), dict(h=20), dict(h=1),
])
def test_packed_inputs_the_fp8_wgmma_kernel_does_not_take_keep_the_mma_kernel(changes):
    assert _path(**changes) == "mma"
    assert _path(**changes, hopper_fp8_decode=False) == "mma"


@pytest.mark.parametrize("changes", [
    dict(q_dtype="float16"), dict(q_dtype="float32"), dict(d_v=256), dict(smem_limit=A100_SMEM),
    dict(compute_capability=80, smem_limit=A100_SMEM),
])
def test_other_packed_inputs_keep_the_float32_kernel(changes):
    assert _path(**changes) == "simt"
    assert _path(**changes, hopper_fp8_decode=False) == "simt"


def test_bf16_rows_are_unaffected_by_the_fp8_switch():
    for fp8 in (False, True):
        assert _path(kv_dtype="bfloat16", kv_width=576, hopper_fp8_decode=fp8) == "wgmma"
        assert _path(kv_dtype="bfloat16", kv_width=576, hopper_forward=False, hopper_fp8_decode=fp8) == "mma"
        assert _path(kv_dtype="float32", kv_width=576, hopper_fp8_decode=fp8) == "simt"


def test_the_kernel_is_listed_and_its_row_layout_is_the_specs():
    assert KERNEL in kernels.KERNELS["sparse_mla_wgmma.cu"]
    assert kernels.template_kernels("sparse_mla_wgmma.cu") == ()  # built as a cubin: extern "C" only
    text = kernels.source_text("sparse_mla_wgmma.cu")
    assert re.search(r'extern "C" __global__ void __launch_bounds__\(mla_wgmma::THREADS, 1\)\s*' + KERNEL + r"\(",
                     text)
    assert '#include "fp8_rows.cuh"' in text and '#include "fp8_rows.cuh"' in kernels.source_text(V2_SOURCE)
    text = kernels.source_text("fp8_rows.cuh")  # the row format both kernels read

    def constant(name):
        found = re.search(rf"constexpr int {name} = (\d+);", text)
        assert found is not None, name
        return int(found.group(1))

    assert constant("FP8_ROW_BYTES") == formats.KV_CACHE_FP8_BYTES == cupy_backend.FP8_CACHE_ROW_BYTES
    assert constant("FP8_SCALES_OFFSET") == formats.KV_LATENT_DIM
    assert constant("FP8_ROPE_OFFSET") == formats.KV_LATENT_DIM + 4 * (formats.KV_LATENT_DIM // formats.KV_SCALE_BLOCK)
    assert constant("FP8_SCALE_BLOCK") == formats.KV_SCALE_BLOCK
    assert formats.KV_CACHE_FP8_BYTES % 16 == 0  # every row of an aligned cache starts 16-byte aligned


# ----------------------------------------------------------------------------- CPU: the second kernel
def test_the_second_fp8_kernel_is_the_default_and_takes_only_the_first_ones_inputs(monkeypatch):
    assert cupy_backend.CupyBackend.hopper_fp8_decode_v2 is True, "the default since measured on the H200"
    monkeypatch.delenv(V2_ENV, raising=False)
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_fp8_decode_v2, V2_ENV)
    monkeypatch.setenv(V2_ENV, "0")
    assert not cupy_backend.kernel_switch(True, V2_ENV)
    monkeypatch.setenv(V2_ENV, "1")
    assert cupy_backend.kernel_switch(False, V2_ENV)
    backend = cupy_backend.CupyBackend()
    backend.hopper_fp8_decode_pair = False  # the pair has its own test below
    # Only where forward_kernel_path chose the first FP8 kernel; the same launch (threads, shared memory,
    # head blocks) and its 16-byte row loads.
    first = ("sparse_mla_wgmma.cu", KERNEL, 384, cupy_backend.WGMMA_FORWARD_SMEM, 2, True)
    assert _plan(backend, monkeypatch, h=128) == (V2_SOURCE, KERNEL_V2, *first[2:])
    monkeypatch.setenv(V2_ENV, "0")
    assert _plan(backend, monkeypatch, h=128) == first
    monkeypatch.delenv(V2_ENV)
    backend.hopper_fp8_decode = False
    assert _plan(backend, monkeypatch, h=128)[1] == "sparse_mla_fwd_mma<true>"
    assert KERNEL_V2 in kernels.KERNELS[V2_SOURCE] and kernels.template_kernels(V2_SOURCE) == ()


def test_the_second_fp8_kernels_register_handover_fits_what_the_launch_allocates():
    """setmaxnreg.inc takes only what setmaxnreg.dec gave back (168 a thread at launch): the FP8 producer's
    and consumers' counts must fit in it, and the compiled kernel has no stack or spill."""
    text = kernels.source_text(V2_SOURCE)
    number = {name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))
              for name in ("LAUNCH_REGISTERS", "FP8_PRODUCER_REGISTERS", "FP8_CONSUMER_REGISTERS", "THREADS")}
    producer, consumer = number["FP8_PRODUCER_REGISTERS"], number["FP8_CONSUMER_REGISTERS"]
    assert producer % 8 == 0 and consumer % 8 == 0 and consumer >= 176  # the consumers spill under 176
    assert 128 * producer + 256 * consumer <= number["THREADS"] * number["LAUNCH_REGISTERS"]
    report = compile_check.report_path(V2_SOURCE, "sm_90a").read_text().splitlines()
    (line,) = [line for line in report if line.startswith(f"{KERNEL_V2} ")]
    assert line.split()[1:5] == [str(number["LAUNCH_REGISTERS"]), "0", "0", "0"], line


def _plan(backend, monkeypatch, *, h: int, kv_dtype: str = "uint8", kv_width: int = 656):
    """What the backend launches for bf16 q over ``kv_dtype`` rows on an H200 (CupyBackend._tensor_core_forward)."""
    monkeypatch.setattr(cupy_backend, "_compute_capability", lambda: 90)
    monkeypatch.setattr(cupy_backend, "_smem_optin", lambda: H200_SMEM)
    return backend._tensor_core_forward("bfloat16", kv_dtype, h=h, d_qk=576, kv_width=kv_width, d_v=512)


def test_the_pair_kernel_takes_the_second_kernels_inputs_with_h_a_multiple_of_128_when_chosen(monkeypatch):
    # The default (None) pairs the split-V consumers only (tests/test_cupy_wgmma_v3.py): the pair of these
    # consumers measured a little slower than v2 alone, so it runs where it is asked for.
    assert cupy_backend.CupyBackend.hopper_fp8_decode_pair is None
    for variable in (V2_ENV, PAIR_ENV):
        monkeypatch.delenv(variable, raising=False)
    backend = cupy_backend.CupyBackend()
    assert _plan(backend, monkeypatch, h=128)[1] == KERNEL_V2
    backend.hopper_fp8_decode_pair = True
    assert _plan(backend, monkeypatch, h=128)[1] == KERNEL_PAIR
    backend.hopper_fp8_decode_pair = None
    monkeypatch.setenv(PAIR_ENV, "0")
    assert _plan(backend, monkeypatch, h=128)[1] == KERNEL_V2
    monkeypatch.setenv(PAIR_ENV, "1")
    pair = _plan(backend, monkeypatch, h=128)
    assert pair == (V2_SOURCE, KERNEL_PAIR, 384, cupy_backend.WGMMA_FORWARD_SMEM, 2, True)  # v2's launch
    assert _plan(backend, monkeypatch, h=256)[1] == KERNEL_PAIR
    assert _plan(backend, monkeypatch, h=64)[1] == _plan(backend, monkeypatch, h=192)[1] == KERNEL_V2  # no pairs
    assert _plan(backend, monkeypatch, h=128, kv_dtype="bfloat16", kv_width=576)[1] != KERNEL_PAIR  # FP8 rows only
    monkeypatch.setenv(V2_ENV, "0")
    assert _plan(backend, monkeypatch, h=128)[1] == KERNEL  # inside the second kernel's choice
    monkeypatch.delenv(PAIR_ENV)
    monkeypatch.delenv(V2_ENV)
    backend.hopper_fp8_decode_pair = False
    assert _plan(backend, monkeypatch, h=128)[1] == KERNEL_V2
    assert KERNEL_PAIR in kernels.KERNELS[V2_SOURCE]


def test_the_pair_kernel_is_a_cluster_of_two_sharing_half_tiles_and_compiles_like_the_second():
    """Its blocks are declared as clusters of two (so the host launch needs nothing else), each block sends
    the peer 32 rows a tile, and the compile report shows the second kernel's registers, no stack, no spill."""
    text = kernels.source_text(V2_SOURCE)
    assert re.search(rf"__cluster_dims__\(2, 1, 1\)[^\n]*\n{KERNEL_PAIR}\(", text)
    assert "PAIR_PEER_BYTES == BLOCK_T / 2 * D_QK * 2" in text
    report = compile_check.report_path(V2_SOURCE, "sm_90a").read_text().splitlines()
    (pair,) = [line for line in report if line.startswith(f"{KERNEL_PAIR} ")]
    (second,) = [line for line in report if line.startswith(f"{KERNEL_V2} ")]
    assert pair.split()[1:5] == second.split()[1:5] == ["168", "0", "0", "0"], (pair, second)


def test_every_consumer_thread_of_a_pair_releases_its_own_blocks_stage():
    """racecheck follows a thread's own mbarrier arrival, not a __syncwarp before one lane's: each consumer
    thread arrives on its block's `empty` barrier (which then counts the block's 256 threads and a lane of each
    of the peer's 8 consumer warps), and only the arrival on the peer's barrier is one lane's for its warp."""
    text = kernels.source_text(V2_SOURCE)
    assert "constexpr u32 PAIR_EMPTY_ARRIVALS = CONSUMER_THREADS + CONSUMER_THREADS / 32;" in text
    helper = text[text.index("void release_stage("):text.index("void consumers_meet(")]
    body = helper[helper.index("{") + 1:]
    assert body.split(";")[1].strip() == "mbarrier_arrive(empty_barrier)", body  # first, for every thread
    assert "if (lane == 0) mbarrier_arrive_cluster(peer_shared_address(empty_barrier, peer));" in body
    assert body.count("mbarrier_arrive(") == 1


# ----------------------------------------------------------------------------- GPU
def _backend(kernel: str = KERNEL):
    backend = hopper_backend(kernel)
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.hopper_fp8_decode = True
    backend.hopper_fp8_decode_v2 = kernel in (KERNEL_V2, KERNEL_PAIR)
    backend.hopper_fp8_decode_pair = kernel == KERNEL_PAIR
    return backend


@pytest.fixture(params=[KERNEL, KERNEL_V2, KERNEL_PAIR])
def kernel(request):
    """Each GPU test on the three FP8 wgmma kernels (the pair kernel's problems with h not a multiple of 128
    run the second kernel, and the tests check that they do)."""
    return request.param


def _expected_launch(kernel: str, h: int) -> str:
    return KERNEL_V2 if kernel == KERNEL_PAIR and h % 128 else kernel


def _problem(seed: int, **arguments):
    """A packed-cache V3.2 forward problem (cupy_wgmma_problems.forward_problem's arguments)."""
    return forward_problem(seed, packed_fp8=True, **arguments)


def _decode_problem(seed: int, *, batch: int, next_n: int, context: int, h: int, topk: int,
                    invalid_fraction: float = 0.0, attn_sink: bool = False):
    """A decode step's attention: ``batch`` sequences of ``context`` tokens in one packed cache (sequence b's
    token p is row b * context + p), ``next_n`` queries a sequence at its last positions, each taking topk
    random tokens at or before its own position (with repeats when it sees fewer), V3.2's softmax scale."""
    rng = np.random.default_rng(seed)
    cache = reference.pack_kv_cache_fp8(rng.standard_normal((batch * context, 576)))
    q = rng.standard_normal((batch * next_n, h, 576)).astype(np.float32).astype(interop.NUMPY_DTYPES["bfloat16"])
    position = np.tile(context - next_n + np.arange(next_n), batch)  # [b * next_n]
    first_row = np.repeat(np.arange(batch) * context, next_n)  # [b * next_n]
    tokens = np.floor(rng.random((batch * next_n, topk)) * (position[:, None] + 1)).astype(np.int64)
    indices = (first_row[:, None] + tokens).astype(np.int32)
    if invalid_fraction > 0:
        invalid = rng.random(indices.shape) < invalid_fraction
        adversarial = rng.choice(np.array([problems.INT32_MIN, -1, batch * context, problems.INT32_MAX], np.int64),
                                 size=indices.shape)
        indices = np.where(invalid, adversarial, indices).astype(np.int32)
    inputs = dict(q=q, kv=cache, indices=indices, sm_scale=problems.V32_SM_SCALE, d_v=512, topk_length=None,
                  attn_sink=rng.standard_normal(h).astype(np.float32) if attn_sink else None)
    poison_unread_rows(inputs)
    return problems.Problem("sparse_mla", inputs, dict(batch=batch, next_n=next_n, context=context), "bfloat16")


def _run(inputs, backend):
    out, lse = dsa_ref.sparse_mla(**inputs, backend=backend)
    return interop.to_numpy(out), interop.to_numpy(lse)


def _check(problem, monkeypatch, kernel):
    monkeypatch.delenv(V2_ENV, raising=False)  # the backend's attribute chooses, not the environment
    monkeypatch.delenv(PAIR_ENV, raising=False)
    backend = _backend(kernel)
    launched = record_launches(monkeypatch)
    out, lse = _run(problem.native_inputs(backend), backend)
    assert launched == [_expected_launch(kernel, problem.inputs["q"].shape[1])], launched
    compare_forward(out, lse, problem.inputs, backend)
    return out, lse


# The bf16 kernels' cases (cupy_wgmma_problems.FORWARD_CASES) and two more.
SMALL_CASES = dict(FORWARD_CASES)
SMALL_CASES["h128-topk200-sink"] = dict(s_q=5, s_kv=900, h=128, topk=200, topk_length=True, attn_sink=True,
                                        invalid_fraction=0.1)
SMALL_CASES["h128-v32-scale"] = dict(s_q=4, s_kv=3000, h=128, topk=512, sm_scale=problems.V32_SM_SCALE,
                                     distribution="recent", duplicate_fraction=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_fp8_wgmma_forward_matches_reference(name, monkeypatch, kernel):
    _check(_problem(len(name), **SMALL_CASES[name]), monkeypatch, kernel)


DECODE_CASES = {
    "b8-next1-h128": dict(batch=8, next_n=1, context=3000, h=128, topk=2048),
    "b8-next2-h128": dict(batch=8, next_n=2, context=3000, h=128, topk=2048, invalid_fraction=0.02, attn_sink=True),
    "b4-next2-h64-short": dict(batch=4, next_n=2, context=700, h=64, topk=1000),  # repeats: 700 tokens, 1000 slots
    "b3-next1-h64-topk129": dict(batch=3, next_n=1, context=5000, h=64, topk=129),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_fp8_wgmma_forward_matches_reference_on_decode_batches(name, monkeypatch, kernel):
    _check(_decode_problem(len(name), **DECODE_CASES[name]), monkeypatch, kernel)


@pytest.mark.gpu
def test_fp8_wgmma_forward_reruns_are_bitwise_equal(monkeypatch, kernel):
    problem = _problem(5, s_q=6, s_kv=2000, h=128, topk=512, invalid_fraction=0.1, duplicate_fraction=0.1,
                       topk_length=True, attn_sink=True)
    first = _check(problem, monkeypatch, kernel)
    second = _run(problem.native_inputs(_backend(kernel)), _backend(kernel))
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _assert_bitwise_equal_kernels(name: str, monkeypatch, first_kernel: str, second_kernel: str):
    """Case ``name`` (of DECODE_CASES or SMALL_CASES) on both kernels, each against the reference: out and lse
    equal to the last bit."""
    problem = (_decode_problem(len(name), **DECODE_CASES[name]) if name in DECODE_CASES
               else _problem(len(name), **SMALL_CASES[name]))
    first = _check(problem, monkeypatch, first_kernel)
    second = _check(problem, monkeypatch, second_kernel)
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["b8-next2-h128", "h64-topk2048", "h128-topk200-sink"])
def test_fp8_wgmma_v2_outputs_are_the_first_kernels_bit_for_bit(name, monkeypatch):
    """The same dequantized bf16 tiles and the same consumer arithmetic (v2 skips only O rescales by exactly
    1): out and lse equal to the last bit."""
    _assert_bitwise_equal_kernels(name, monkeypatch, KERNEL, KERNEL_V2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["b8-next2-h128", "b8-next1-h128", "h128-topk200-sink", "h128-v32-scale"])
def test_fp8_wgmma_pair_outputs_are_the_second_kernels_bit_for_bit(name, monkeypatch):
    """The pair's blocks hold the same bf16 tiles as the second kernel's (each dequantized once, by one of
    the two) and run its consumers: out and lse equal to the last bit."""
    _assert_bitwise_equal_kernels(name, monkeypatch, KERNEL_V2, KERNEL_PAIR)


@pytest.mark.gpu
def test_fp8_wgmma_forward_copies_a_cache_view_off_a_16_byte_boundary(monkeypatch, kernel):
    import cupy

    backend = _backend(kernel)
    problem = _problem(9, s_q=3, s_kv=400, h=64, topk=128, invalid_fraction=0.1)
    inputs = problem.native_inputs(backend)
    cache = inputs["kv"]
    buffer = cupy.zeros(cache.size + 16, cupy.uint8)
    offset = (8 - buffer.data.ptr) % 16  # the view starts 8 bytes past a 16-byte boundary
    shifted = buffer[offset:offset + cache.size].reshape(cache.shape)
    shifted[...] = cache
    assert shifted.data.ptr % 16 == 8
    inputs["kv"] = shifted
    launched = record_launches(monkeypatch)
    out, lse = _run(inputs, backend)
    assert launched == [_expected_launch(kernel, 64)], launched
    compare_forward(out, lse, problem.inputs, backend)


@pytest.mark.gpu
def test_fp8_wgmma_forward_follows_the_environment_variable(monkeypatch):
    monkeypatch.delenv(V2_ENV, raising=False)
    backend = _backend()
    problem = _problem(2, s_q=2, s_kv=100, h=64, topk=64)
    backend.hopper_fp8_decode = False
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "1")
    launched = record_launches(monkeypatch)
    _run(problem.native_inputs(backend), backend)
    assert launched == [KERNEL], launched
    backend.hopper_fp8_decode = True
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "0")
    launched.clear()
    _run(problem.native_inputs(backend), backend)
    assert launched == ["sparse_mla_fwd_mma<true>"], launched


@pytest.mark.gpu
def test_fp8_wgmma_v2_follows_its_environment_variable(monkeypatch):
    monkeypatch.delenv("DSA_REF_CUPY_WGMMA_FP8", raising=False)
    backend = _backend(KERNEL)
    problem = _problem(2, s_q=2, s_kv=100, h=64, topk=64)
    monkeypatch.setenv(V2_ENV, "1")
    launched = record_launches(monkeypatch)
    _run(problem.native_inputs(backend), backend)
    assert launched == [KERNEL_V2], launched
    backend.hopper_fp8_decode_v2 = True
    monkeypatch.setenv(V2_ENV, "0")
    launched.clear()
    _run(problem.native_inputs(backend), backend)
    assert launched == [KERNEL], launched
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_FP8", "0")  # off with the first kernel's switch, as its inputs are
    launched.clear()
    _run(problem.native_inputs(backend), backend)
    assert launched == ["sparse_mla_fwd_mma<true>"], launched


def _random_packed_cache(cupy, rows: int, chunk_rows: int = 1 << 18):
    """A packed cache of ``rows`` rows made on the device (numpy would need gigabytes of float64 at the V3.2
    size): e4m3 latents with the top exponent bit clear (|v| < 2, never NaN), per-block scales 2^-2 .. 2^1,
    bf16 RoPE values of magnitude 2^-7 .. 2."""
    cache = cupy.empty((rows, 656), cupy.uint8)
    for begin in range(0, rows, chunk_rows):
        part = cache[begin:begin + chunk_rows]
        n = part.shape[0]
        part[:, :512] = (cupy.random.randint(0, 256, size=(n, 512), dtype=cupy.int32) & 0xBF).astype(cupy.uint8)
        scales = cupy.exp2(cupy.random.randint(-2, 2, size=(n, 4)).astype(cupy.float32))
        part[:, 512:528] = scales.view(cupy.uint8)
        sign = cupy.random.randint(0, 2, size=(n, 64), dtype=cupy.int32) << 15
        exponent = cupy.random.randint(120, 128, size=(n, 64), dtype=cupy.int32) << 7
        mantissa = cupy.random.randint(0, 128, size=(n, 64), dtype=cupy.int32)
        part[:, 528:] = (sign | exponent | mantissa).astype(cupy.uint16).view(cupy.uint8)
    return cache


@pytest.mark.gpu
def test_fp8_wgmma_forward_at_the_v32_decode_size(monkeypatch, kernel):
    """b 64, s_q 2, T 32K, h 128, topk 2048: the whole batch in one launch over a 1.4 GB cache; the float64
    reference on a sample of the queries (both ends of the batch, a few between) over the rows they read."""
    cupy = pytest.importorskip("cupy")
    backend = _backend(kernel)
    batch, next_n, context, h, topk = 64, 2, 32768, 128, 2048
    cupy.random.seed(11)
    rng = np.random.default_rng(11)
    cache = _random_packed_cache(cupy, batch * context)
    queries = batch * next_n
    q = rng.standard_normal((queries, h, 576)).astype(np.float32).astype(interop.NUMPY_DTYPES["bfloat16"])
    position = np.tile(context - next_n + np.arange(next_n), batch)
    first_row = np.repeat(np.arange(batch) * context, next_n)
    indices = (first_row[:, None] + np.floor(rng.random((queries, topk)) * (position[:, None] + 1))).astype(np.int32)
    invalid = rng.random(indices.shape) < 0.01
    indices = np.where(invalid, rng.choice(np.array([-1, batch * context], np.int32), size=indices.shape), indices)
    topk_length = np.where(rng.random(queries) < 0.25, rng.integers(1, topk + 1, size=queries), topk).astype(np.int32)
    attn_sink = rng.standard_normal(h).astype(np.float32)
    launched = record_launches(monkeypatch)
    out, lse = _run(dict(q=cupy.asarray(q.view(np.int16)), kv=cache, indices=cupy.asarray(indices),
                         sm_scale=problems.V32_SM_SCALE, d_v=512, topk_length=cupy.asarray(topk_length),
                         attn_sink=cupy.asarray(attn_sink)), backend)
    assert launched == [kernel], launched
    assert np.isfinite(out).all() and np.isfinite(lse).all()

    sample = np.array([0, 1, 2, 37, 64, 65, 100, queries - 2, queries - 1])
    sample_indices, sample_length = indices[sample], topk_length[sample]
    valid = reference.valid_slots(sample_indices, batch * context, sample_length)
    rows = np.unique(sample_indices[valid])
    compact = np.where(valid, np.searchsorted(rows, np.where(valid, sample_indices, 0)), -1).astype(np.int32)
    inputs = dict(q=q[sample], kv=cupy.asnumpy(cache[cupy.asarray(rows)]), indices=compact,
                  sm_scale=problems.V32_SM_SCALE, d_v=512, topk_length=sample_length, attn_sink=attn_sink)
    compare_forward(out[sample], lse[sample], inputs, backend)
