"""Deterministic mode's wgmma sparse-MLA backward (``sparse_mla_bwd_wgmma_deterministic`` in
csrc/sparse_mla_backward_wgmma.cu: the default kernel's body with its row-gradient reductions turned into
stores to the contribution buffer, then ``sparse_mla_bwd_mma_row_sum``'s ordered sums).

CPU part: routing (only in deterministic mode, only with ``hopper_backward``, the tensor-core deterministic
path and the new switch ``CupyBackend.hopper_deterministic_backward``, which is off by default and follows
``DSA_REF_CUPY_WGMMA_DETERMINISTIC``; only where the default mode would take the wgmma kernel), the host's
launch of the block kernel (the wgmma kernel's shared memory and threads, the shared plan), the sm_90a
compile without spills at the launch's 168 registers, and the SASS: the default kernel's products and
waits, and on the row-gradient path 16-byte stores in place of the reductions, no float atomic at all.
GPU part (``@pytest.mark.gpu``, both switches set): dq, dkv and d_attn_sink against the float64
reference on the default kernel's awkward inputs, dq bitwise equal to the default mode's wgmma kernel
(the same body), bitwise-equal reruns over several chunks and plans, and which kernels ran.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from cupy_launches import record_launches

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import problems
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_backward_problems")  # its asserts report as this file's do
from cupy_backward_problems import (  # noqa: E402
    A100_SMEM,
    H200_SMEM,
    WGMMA_BACKWARD_CASES,
    assert_bitwise_equal,
    assert_gradients_match,
    backward_path,
    count_chunks,
    count_matches,
    wgmma_backward_backend,
    wgmma_backward_problem,
)

SOURCE = "sparse_mla_backward_wgmma.cu"
KERNEL = "sparse_mla_bwd_wgmma_deterministic"
SWITCH = "DSA_REF_CUPY_WGMMA_DETERMINISTIC"


# ----------------------------------------------------------------------------- CPU: routing
def _path(**changes):
    return backward_path(changes, deterministic=True, deterministic_tensor_cores=True, h=128, compute_capability=90,
                         hopper_backward=True, hopper_deterministic_backward=True)


def test_chosen_deterministic_v32_backward_on_hopper_routes_to_the_wgmma_deterministic_kernel():
    assert _path() == "wgmma_deterministic"
    assert _path(h=64) == "wgmma_deterministic"
    assert _path(h=256) == "wgmma_deterministic"


def test_the_switch_is_on_by_default_and_follows_its_environment_variable(monkeypatch):
    assert cupy_backend.CupyBackend.hopper_deterministic_backward is True, "the default since measured on the H200"
    assert _path(hopper_deterministic_backward=False) == "mma_deterministic"
    # backward_kernel_path's own default keeps deterministic mode on the mma.sync kernels.
    assert cupy_backend.backward_kernel_path("bfloat16", "bfloat16", d_qk=576, kv_width=576, d_v=512,
                                             deterministic=True, smem_limit=H200_SMEM,
                                             deterministic_tensor_cores=True, h=128, compute_capability=90,
                                             hopper_backward=True) == "mma_deterministic"
    monkeypatch.delenv(SWITCH, raising=False)
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_deterministic_backward, SWITCH)
    assert not cupy_backend.kernel_switch(False, SWITCH)
    monkeypatch.setenv(SWITCH, "1")
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_deterministic_backward, SWITCH)
    monkeypatch.setenv(SWITCH, "0")
    assert not cupy_backend.kernel_switch(True, SWITCH)


def test_the_backend_reads_the_switch_with_its_environment_variable():
    text = inspect.getsource(cupy_backend.CupyBackend.sparse_mla_backward)
    assert f'kernel_switch(self.hopper_deterministic_backward,\n                                                 "{SWITCH}")' in text
    assert "hopper_deterministic_backward=hopper_deterministic" in text
    assert 'kernel_path in ("mma_deterministic", "wgmma_deterministic")' in text


def test_default_mode_never_takes_the_deterministic_kernel():
    assert _path(deterministic=False) == "wgmma"
    assert _path(deterministic=False, hopper_backward=False) == "mma"


@pytest.mark.parametrize("changes", [
    dict(hopper_backward=False), dict(compute_capability=80), dict(compute_capability=100), dict(compute_capability=0),
    dict(h=16), dict(h=96), dict(h=100),
])
def test_inputs_the_wgmma_kernel_does_not_take_keep_the_deterministic_mma_kernels(changes):
    assert _path(**changes) == "mma_deterministic"


@pytest.mark.parametrize("changes", [
    dict(deterministic_tensor_cores=False), dict(q_dtype="float16"), dict(kv_dtype="float32"), dict(d_v=256),
    dict(d_qk=64, kv_width=64), dict(smem_limit=A100_SMEM),
])
def test_other_deterministic_inputs_keep_the_float32_kernels(changes):
    assert _path(**changes) == "simt"


# ----------------------------------------------------------------------------- CPU: the host launch
def test_the_kernel_is_listed_and_launched_with_the_wgmma_kernels_layout():
    assert KERNEL in kernels.KERNELS[SOURCE]
    text = kernels.source_text(SOURCE)
    assert f'extern "C" __global__ void __launch_bounds__(mla_bwd_wgmma::THREADS, 1)\n{KERNEL}(' in text
    # One body: both kernels are instances of backward_block, whose shared memory the host passes.
    assert "backward_block<false>(" in text and "backward_block<true>(" in text
    host = inspect.getsource(cupy_backend._deterministic_mma_backward)
    assert f'"{SOURCE}", "{KERNEL}"' in host
    assert "WGMMA_BACKWARD_THREADS, WGMMA_BACKWARD_SMEM" in host
    # The mma path's plan and row sums serve both block kernels.
    assert '"sparse_mla_bwd_mma_row_sum"' in host and "_sorted_row_keys(" in host and "_row_ranges(" in host


def test_the_buffer_entry_is_the_one_the_row_sum_reads():
    """The row sum reads entry ((query * head blocks + head block) * topk + slot) of rows of 576; the kernel
    computes the same index from its block (query * head blocks + head block, as launched per chunk)."""
    text = kernels.source_text(SOURCE)
    assert "(u64)blockIdx.x * args.topk + step * BLOCK_T + slot_in_step" in text
    row_sum = kernels.source_text("sparse_mla_backward_mma.cu")
    assert "const u64 entry = ((u64)query * head_blocks + head_block) * topk + slot;" in row_sum
    assert "contributions + entry * D_QK" in row_sum


def test_the_resource_report_has_no_spills_at_the_launch_registers():
    report = compile_check.report_path(SOURCE, "sm_90a").read_text().splitlines()
    (line,) = [line for line in report if line.startswith(f"{KERNEL} ")]
    launch = int(re.search(r"LAUNCH_REGISTERS = (\d+);", kernels.source_text(SOURCE)).group(1))
    assert line.split()[1:5] == [str(launch), "0", "0", "0"], line


@pytest.fixture(scope="module")
def sass(tmp_path_factory) -> dict[str, str]:
    nvcc = compile_check.find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (tests/test_cuda_compile.py fails without it)")
    result = compile_check.compile_source(nvcc, SOURCE, "sm_90a", Path(tmp_path_factory.mktemp("wgmma_det")))
    assert result.returncode == 0, result.log  # -Werror all-warnings: a spill or serialized wgmma fails here
    usage = {u.name: u for u in result.usages}
    assert not usage[KERNEL].spills and usage[KERNEL].registers == 168, result.report()
    if result.sass is None:
        pytest.skip("needs cuobjdump (tests/test_cuda_compile.py fails without it)")
    return {name: compile_check.kernel_sass(result.sass, name) for name in ("sparse_mla_bwd_wgmma", KERNEL)}


def test_sass_keeps_the_default_kernels_products_and_waits(sass):
    deterministic, default = sass[KERNEL], sass["sparse_mla_bwd_wgmma"]
    for pattern in (r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\], ",
                    r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ",
                    r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ",
                    r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ",
                    r"HGMMA\.64x64x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ",
                    r"HGMMA\S* R\d+, gdesc\[UR\d+\]\S*, RZ, !UPT",
                    r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", r"USETMAXREG",
                    r"SHFL\.BFLY"):
        assert count_matches(deterministic, pattern) == count_matches(default, pattern), pattern
    assert count_matches(deterministic, r"HGMMA") == 2 * (68 + 8 + 36)


def test_sass_stores_the_row_gradients_with_no_float_atomic(sass):
    deterministic = sass[KERNEL]
    # No reduction or atomic of any kind: the sums happen in the row-sum kernel, in a fixed order.
    assert count_matches(deterministic, r"\b(?:RED|REDG|ATOM|ATOMG|ATOMS)\.") == 0
    # Where the default kernel has one 16-byte reduction a thread's slot takes per 8 columns (8 in each of
    # four value chunks, 4 in the rope half, per consumer instance), this one has a 16-byte evict-first store.
    assert count_matches(sass["sparse_mla_bwd_wgmma"], r"REDG\.E\.ADD\.F32x4\.") == 2 * (4 * 8 + 4)
    assert count_matches(deterministic, r"STG\.E\.EF\.128 ") == 2 * (4 * 8 + 4)
    # Besides them only dq's float2 stores (32 + 4 per accumulator row pair and consumer), as in default mode.
    assert count_matches(deterministic, r"\bSTG\.E\.64 ") == \
        count_matches(sass["sparse_mla_bwd_wgmma"], r"\bSTG\.E\.64 ") == 144
    assert count_matches(deterministic, r"\bSTG\.") == 72 + 144
    assert count_matches(deterministic, r"\b(?:LDL|STL)\b") == 0


# ----------------------------------------------------------------------------- GPU
def _backend():
    # Outputs poisoned: dq and the contribution buffer start NaN, so a missed write or a stray read shows.
    backend = wgmma_backward_backend()
    backend.deterministic_tensor_cores = True
    backend.hopper_deterministic_backward = True
    return backend


def _run(problem, backend, monkeypatch, *, deterministic=True):
    launched = record_launches(monkeypatch)
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    return actual, launched


def _check(problem, monkeypatch, backend=None):
    backend = backend or _backend()
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    actual, launched = _run(problem, backend, monkeypatch)
    assert launched[0] == KERNEL and set(launched) == {KERNEL, "sparse_mla_bwd_mma_row_sum"}, launched
    assert_gradients_match(actual, expected, inputs, backend)
    return actual, launched


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(WGMMA_BACKWARD_CASES))
def test_wgmma_deterministic_backward_matches_reference(name, monkeypatch):
    _check(wgmma_backward_problem(len(name), **WGMMA_BACKWARD_CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_wgmma_deterministic_dq_is_the_default_kernels_and_dkv_agrees(monkeypatch):
    """dq comes out of the same body untouched by the row-gradient stores: bitwise the default mode's."""
    problem = wgmma_backward_problem(9, s_kv=3000, h=128, topk=512, sink=True, d_lse=True, with_topk_length=True)
    backend = _backend()
    deterministic, _ = _check(problem, monkeypatch, backend)
    default, launched = _run(problem, backend, monkeypatch, deterministic=False)
    assert launched == ["sparse_mla_bwd_wgmma"], launched
    assert interop.to_numpy(deterministic[0]).tobytes() == interop.to_numpy(default[0]).tobytes()
    a, b = interop.to_numpy(deterministic[1]), interop.to_numpy(default[1])
    assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-30)  # the order of the float32 sums only


@pytest.mark.gpu
def test_wgmma_deterministic_backward_follows_the_environment_variable(monkeypatch):
    backend = _backend()
    backend.hopper_deterministic_backward = False
    monkeypatch.setenv(SWITCH, "1")
    _check(wgmma_backward_problem(2, s_q=3, s_kv=100, h=64, topk=64), monkeypatch, backend)
    monkeypatch.setenv(SWITCH, "0")
    backend.hopper_deterministic_backward = True
    _, launched = _run(wgmma_backward_problem(2, s_q=3, s_kv=100, h=64, topk=64), backend, monkeypatch)
    assert set(launched) == {"sparse_mla_bwd_mma_deterministic", "sparse_mla_bwd_mma_row_sum"}, launched


@pytest.mark.gpu
@pytest.mark.parametrize("several_plans", [False, True])
@pytest.mark.parametrize("h", [64, 128])
def test_wgmma_deterministic_backward_is_bitwise_repeatable_over_several_chunks(monkeypatch, h, several_plans):
    # Few rows, each read by many (query, head block, slot) pairs: the sums an atomic order would change.
    problem = wgmma_backward_problem(5, s_q=10, s_kv=40, h=h, topk=128, sink=True, d_lse=True, with_topk_length=True)
    head_blocks = h // 64
    monkeypatch.setattr(cupy_backend, "DETERMINISTIC_MMA_BUFFER_BYTES", 3 * head_blocks * 128 * 576 * 4)
    if several_plans:  # two chunks a sort: queries 0-5 and 6-9
        monkeypatch.setattr(cupy_backend, "CHUNK_BYTES", 2 * 3 * 128 * cupy_backend._PLAN_BYTES_PER_PAIR)
        assert cupy_backend.deterministic_mma_plan_queries(3, 128) == 6
    chunks = count_chunks(monkeypatch, topk=128)
    first, _ = _check(problem, monkeypatch)  # the kernels are fetched once a call; the chunks count the launches
    assert chunks == [3, 3, 3, 1]
    second, _ = _check(problem, monkeypatch)
    assert chunks == [3, 3, 3, 1] * 2
    assert_bitwise_equal(first, second)


@pytest.mark.gpu
def test_wgmma_deterministic_backward_is_bitwise_repeatable_at_the_v32_size(monkeypatch):
    rng = np.random.default_rng(11)
    problem = problems.sparse_mla_backward_problem(rng, s_q=24, s_kv=8192, h=128, d_qk=576, d_v=512, topk=2048,
                                                   invalid_fraction=0.02, duplicate_fraction=0.02, topk_length=True,
                                                   attn_sink=True, d_lse=True, unread_nan=True, distribution="recent")
    monkeypatch.setattr(cupy_backend, "DETERMINISTIC_MMA_BUFFER_BYTES", 5 * 2 * 2048 * 576 * 4)  # 5 queries a chunk
    chunks = count_chunks(monkeypatch, topk=2048)
    first, _ = _check(problem, monkeypatch)
    second, _ = _check(problem, monkeypatch)
    assert chunks == [5, 5, 5, 5, 4] * 2
    assert_bitwise_equal(first, second)
