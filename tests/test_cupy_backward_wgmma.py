"""The cupy backend's Hopper sparse-MLA backward (csrc/sparse_mla_backward_wgmma.cu, wgmma, sm_90a only).

CPU part: which inputs the wrapper routes to the wgmma kernel (only when chosen, only in default mode,
only on compute capability 9.0, only bf16 q and rows of 576 with d_v 512 and h a multiple of 64), that
the switch is on by default and follows its environment variable, that the host's shared memory and
thread count are the kernel's (read from the source and checked by the compiler), and the kernel's
SASS: the designed number of each wgmma shape and of 16-byte float32 reductions, and nothing else
atomic. GPU part (``@pytest.mark.gpu``, with ``CupyBackend.hopper_backward`` set): dq, dkv and
d_attn_sink against the float64 reference with the kit's bf16 gradient tolerance and term scales on
awkward inputs (every kind of invalid index, duplicates, a query without a valid slot, topk_length with
0 and a cut inside a step, attn_sink, d_lse, float32 and bf16 d_out, h 64 and 128, topk not a multiple
of 64, strided inputs), rows nobody reads filled with NaN and required to get exactly 0, outputs
poisoned with NaN; one V3.2-size case; each test checks that the wgmma kernel ran.
"""

from __future__ import annotations

import re
import subprocess
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
    assert_gradients_match,
    backward_path,
    count_matches,
    wgmma_backward_backend,
    wgmma_backward_problem,
)

SOURCE = "sparse_mla_backward_wgmma.cu"


# ----------------------------------------------------------------------------- CPU: routing
def _path(**changes):
    return backward_path(changes, deterministic=False, h=128, compute_capability=90, hopper_backward=True)


def test_chosen_v32_bf16_backward_on_hopper_routes_to_the_wgmma_kernel():
    assert _path() == "wgmma"
    assert _path(h=64) == "wgmma"
    assert _path(h=256) == "wgmma"


def test_the_wgmma_backward_is_the_default_and_follows_its_environment_variable(monkeypatch):
    assert cupy_backend.CupyBackend.hopper_backward is True, "the default since measured on the H200"
    assert _path(hopper_backward=False) == "mma"
    # The defaults of backward_kernel_path are the mma kernel's routing, as before the switch existed.
    assert cupy_backend.backward_kernel_path("bfloat16", "bfloat16", d_qk=576, kv_width=576, d_v=512,
                                             deterministic=False, smem_limit=H200_SMEM) == "mma"
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "1")
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_backward, "DSA_REF_CUPY_WGMMA_BACKWARD")
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "0")
    assert not cupy_backend.kernel_switch(True, "DSA_REF_CUPY_WGMMA_BACKWARD")
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "yes")  # any other value: the attribute decides
    assert cupy_backend.kernel_switch(True, "DSA_REF_CUPY_WGMMA_BACKWARD")
    assert not cupy_backend.kernel_switch(False, "DSA_REF_CUPY_WGMMA_BACKWARD")


def test_the_backend_reads_the_switch_with_its_environment_variable():
    import inspect

    text = inspect.getsource(cupy_backend.CupyBackend.sparse_mla_backward)
    assert 'kernel_switch(self.hopper_backward, "DSA_REF_CUPY_WGMMA_BACKWARD")' in text
    assert "hopper_backward=hopper" in text and '"sparse_mla_bwd_wgmma"' in text


@pytest.mark.parametrize("changes", [
    dict(compute_capability=80), dict(compute_capability=89), dict(compute_capability=100), dict(compute_capability=0),
    dict(h=16), dict(h=100), dict(h=96), dict(h=32),
])
def test_inputs_the_wgmma_backward_does_not_take_keep_the_mma_kernel(changes):
    assert _path(**changes) == "mma"


def test_deterministic_mode_never_takes_the_wgmma_backward():
    assert _path(deterministic=True, deterministic_tensor_cores=True) == "mma_deterministic"
    assert _path(deterministic=True, deterministic_tensor_cores=False) == "simt"


@pytest.mark.parametrize("changes", [
    dict(q_dtype="float16"), dict(q_dtype="float32"), dict(kv_dtype="float32"), dict(kv_dtype="float16"),
    dict(d_qk=64, kv_width=64), dict(kv_width=512), dict(d_v=256), dict(d_v=576), dict(smem_limit=A100_SMEM),
])
def test_other_backward_inputs_keep_the_float32_kernels(changes):
    assert _path(**changes) == "simt"


# ----------------------------------------------------------------------------- CPU: the source
def test_host_launch_constants_agree_with_the_source():
    assert kernels.KERNELS[SOURCE] == ("sparse_mla_bwd_wgmma", "sparse_mla_bwd_wgmma_deterministic")
    assert kernels.SOURCE_ARCHITECTURES[SOURCE] == "sm_90a"
    assert compile_check.architectures(SOURCE) == ("sm_90a",)
    text = kernels.source_text(SOURCE)
    assert 'extern "C" __global__' in text and "sparse_mla_bwd_wgmma(" in text
    total = re.search(r"TOTAL = .*; (\d+)", text)
    assert total is not None and int(total.group(1)) == cupy_backend.WGMMA_BACKWARD_SMEM
    threads = re.search(r"THREADS = (\d+);", text)
    assert threads is not None and int(threads.group(1)) == cupy_backend.WGMMA_BACKWARD_THREADS
    assert cupy_backend.BACKWARD_MMA_SMEM <= cupy_backend.WGMMA_BACKWARD_SMEM <= H200_SMEM


def test_the_register_handover_fits_what_the_launch_allocates():
    """setmaxnreg.inc takes registers only from those setmaxnreg.dec gave back: the consumers' 240 must
    come out of the 168 a thread the launch allocates (65536 / 384, in steps of 8), or they wait forever."""
    text = kernels.source_text(SOURCE)
    number = {name: int(re.search(rf"{name} = (\d+);", text).group(1))
              for name in ("LAUNCH_REGISTERS", "PRODUCER_REGISTERS", "CONSUMER_REGISTERS", "THREADS")}
    launch, producer, consumer = number["LAUNCH_REGISTERS"], number["PRODUCER_REGISTERS"], number["CONSUMER_REGISTERS"]
    assert launch == 65536 // number["THREADS"] // 8 * 8 == 168
    assert producer % 8 == 0 and consumer % 8 == 0 and 24 <= producer <= launch <= consumer <= 256
    assert 128 * producer + 256 * consumer <= number["THREADS"] * launch
    report = compile_check.report_path(SOURCE, "sm_90a").read_text().splitlines()
    (line,) = [line for line in report if line.startswith("sparse_mla_bwd_wgmma ")]
    assert line.split()[1:5] == [str(launch), "0", "0", "0"], line  # registers at launch, no stack, no spills


@pytest.fixture(scope="module")
def nvcc():
    found = compile_check.find_nvcc()
    if found is None:
        pytest.skip("needs nvcc (tests/test_cuda_compile.py fails without it)")
    return found


def test_the_compiler_agrees_with_the_host_launch_constants(nvcc, tmp_path):
    """The kernel's own constants, checked by static_assert in a unit that includes the source: the
    comment the test above reads cannot drift from them."""
    unit = tmp_path / "constants.cu"
    unit.write_text(f'#include "{kernels.CSRC / SOURCE}"\n'
                    f"static_assert(mla_bwd_wgmma::Smem::TOTAL == {cupy_backend.WGMMA_BACKWARD_SMEM}, \"smem\");\n"
                    f"static_assert(mla_bwd_wgmma::THREADS == {cupy_backend.WGMMA_BACKWARD_THREADS}, \"threads\");\n")
    done = subprocess.run([nvcc, *kernels.COMPILE_OPTIONS, "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
                           f"-I{kernels.CSRC}", "-o", str(tmp_path / "constants.cubin"), str(unit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def sass(nvcc, tmp_path_factory) -> str:
    result = compile_check.compile_source(nvcc, SOURCE, "sm_90a", Path(tmp_path_factory.mktemp("wgmma_backward")))
    assert result.returncode == 0, result.log
    if result.sass is None:
        pytest.skip("needs cuobjdump (tests/test_cuda_compile.py fails without it)")
    assert result.usages and not any(usage.spills for usage in result.usages), result.report()
    return compile_check.kernel_sass(result.sass, "sparse_mla_bwd_wgmma")


def test_sass_has_the_designed_products(sass):
    # Each consumer warpgroup runs its own instance of the loop (the descriptors stay uniform), so every
    # count is twice a consumer's: per step, S (576 / 16 = 36 k-steps) and dP (512 / 16 = 32) at N = 32,
    # K-major; dq as 4 k-steps of 16 slots at N = 256 plus 4 at N = 32 (the rope half), B MN-major; the
    # rows' contributions with both operands MN-major (A = the staged tiles read transposed): four value
    # blocks of 2 x 4 k-steps at N = 64 and the rope half, 4 k-steps at N = 32.
    assert count_matches(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\], ") == 2 * (36 + 32)
    assert count_matches(sass, r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ") == 2 * 4
    assert count_matches(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ") == 2 * 4
    assert count_matches(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ") == 2 * 4
    assert count_matches(sass, r"HGMMA\.64x64x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ") == 2 * 32
    assert count_matches(sass, r"HGMMA") == 2 * (68 + 8 + 36)
    # A fresh accumulator is not zeroed: its first product ignores it (scale-d = 0): S, dP, 5 chunks.
    assert count_matches(sass, r"HGMMA\S* R\d+, gdesc\[UR\d+\]\S*, RZ, !UPT") == 2 * 7


def test_sass_adds_the_rows_as_16_byte_reductions_only(sass):
    # A thread's slot: 8 groups of 4 columns in each of four value chunks, 4 in the rope half.
    assert count_matches(sass, r"REDG\.E\.ADD\.F32x4\.") == 2 * (4 * 8 + 4)
    assert count_matches(sass, r"\b(?:RED|REDG|ATOM|ATOMG)\.") == count_matches(sass, r"REDG\.E\.ADD\.F32x4\.")
    # One pair of shuffles per reduction (the even lane takes the row of its quad's first row, the odd
    # lane the row 8 below) and no local memory.
    assert count_matches(sass, r"SHFL\.BFLY") == 2 * 2 * (4 * 8 + 4)
    assert count_matches(sass, r"\b(?:LDL|STL)\b") == 0



def test_sass_keeps_the_slot_rows_addresses_out_of_the_constant_bank(sass):
    # The row addresses of a step come from registers kept across the loop: nvcc 13.0 gives 69 constant
    # loads in the whole kernel. With the target pointer always computed (dkv + 0 for an invalid slot,
    # as the deterministic instance needs), the default instance rebuilt them from the kernel's
    # parameters every step (139 constant loads, 441 -> 581 LEA); NVRTC's build timed the same on the H200
    # either way, so this bounds the SASS the CI compile sees, not a measured speed.
    assert count_matches(sass, r"\bLDC(?:\.\w+)*\b") <= 90

def test_sass_waits_for_the_products_only_where_the_design_does(sass):
    # Per step and consumer: one wait for S and dP, five that leave the newest group in flight (dq's
    # completion, then each chunk's while the next one runs), one for the last chunk.
    assert count_matches(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0") == 2 * 2
    assert count_matches(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1") == 2 * 5
    assert count_matches(sass, r"USETMAXREG") == 2


# ----------------------------------------------------------------------------- GPU
def _check(problem, monkeypatch, backend=None):
    backend = backend or wgmma_backward_backend()
    launched = record_launches(monkeypatch)
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    with dsa_ref.use_deterministic(False):
        actual = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert launched == ["sparse_mla_bwd_wgmma"], launched
    assert_gradients_match(actual, expected, inputs, backend)
    return actual


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(WGMMA_BACKWARD_CASES))
def test_wgmma_backward_matches_reference(name, monkeypatch):
    _check(wgmma_backward_problem(len(name), **WGMMA_BACKWARD_CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_wgmma_backward_of_queries_without_a_step(monkeypatch):
    # Every topk_length 0: no step runs; dq must still be written (0) and dkv stay 0.
    problem = wgmma_backward_problem(7, s_q=5, s_kv=200, h=64, topk=64, sink=True, with_topk_length=True)
    problem.inputs["topk_length"] = np.zeros(5, np.int32)
    problem.inputs["out"], problem.inputs["lse"] = reference.sparse_mla(
        **{k: v for k, v in problem.inputs.items() if k not in ("out", "lse", "d_out", "d_lse")})
    backend = wgmma_backward_backend()
    record_launches(monkeypatch)
    dq, dkv, _ = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert (interop.to_numpy(dq) == 0).all() and (interop.to_numpy(dkv) == 0).all()


@pytest.mark.gpu
def test_wgmma_backward_follows_the_environment_variable(monkeypatch):
    backend = wgmma_backward_backend()
    backend.hopper_backward = False
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "1")
    _check(wgmma_backward_problem(2, s_q=3, s_kv=100, h=64, topk=64), monkeypatch, backend)
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "0")
    backend.hopper_backward = True
    launched = record_launches(monkeypatch)
    problem = wgmma_backward_problem(2, s_q=3, s_kv=100, h=64, topk=64)
    with dsa_ref.use_deterministic(False):
        dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert launched == ["sparse_mla_bwd_mma"], launched


@pytest.mark.gpu
def test_wgmma_backward_agrees_with_the_mma_kernel(monkeypatch):
    """The same roundings (dout, P and dl to bf16, float32 products): the two kernels differ only in the
    order of their float32 sums."""
    problem = wgmma_backward_problem(9, s_kv=3000, h=128, topk=512, sink=True, d_lse=True, with_topk_length=True)
    backend = wgmma_backward_backend()
    wgmma = _check(problem, monkeypatch, backend)
    backend.hopper_backward = False
    mma = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    for name, a, b in zip(("dq", "dkv", "d_attn_sink"), wgmma, mma):
        a, b = interop.to_numpy(a), interop.to_numpy(b)
        assert np.abs(a - b).max() <= 2e-3 * max(np.abs(b).max(), 1e-30), name


@pytest.mark.gpu
def test_wgmma_backward_at_the_v32_size(monkeypatch):
    rng = np.random.default_rng(11)
    problem = problems.sparse_mla_backward_problem(rng, s_q=24, s_kv=8192, h=128, d_qk=576, d_v=512, topk=2048,
                                                   invalid_fraction=0.02, duplicate_fraction=0.02, topk_length=True,
                                                   attn_sink=True, d_lse=True, unread_nan=True, distribution="recent")
    _check(problem, monkeypatch)
