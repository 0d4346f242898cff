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
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.conformance import _sparse_mla_backward_term_scales
from dsa_ref.testing.tolerances import gradient_tolerance_for
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

SOURCE = "sparse_mla_backward_wgmma.cu"
H200_SMEM = 232448  # MaxSharedMemoryPerBlockOptin of sm_90
A100_SMEM = 166912  # ... of sm_80


# ----------------------------------------------------------------------------- CPU: routing
def _path(**changes):
    arguments = dict(q_dtype="bfloat16", kv_dtype="bfloat16", d_qk=576, kv_width=576, d_v=512, deterministic=False,
                     smem_limit=H200_SMEM, h=128, compute_capability=90, hopper_backward=True)
    arguments.update(changes)
    return cupy_backend.backward_kernel_path(arguments.pop("q_dtype"), arguments.pop("kv_dtype"), **arguments)


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


def _count(sass: str, pattern: str) -> int:
    return len(re.findall(pattern, sass))


def test_sass_has_the_designed_products(sass):
    # Each consumer warpgroup runs its own instance of the loop (the descriptors stay uniform), so every
    # count is twice a consumer's: per step, S (576 / 16 = 36 k-steps) and dP (512 / 16 = 32) at N = 32,
    # K-major; dq as 4 k-steps of 16 slots at N = 256 plus 4 at N = 32 (the rope half), B MN-major; the
    # rows' contributions with both operands MN-major (A = the staged tiles read transposed): four value
    # blocks of 2 x 4 k-steps at N = 64 and the rope half, 4 k-steps at N = 32.
    assert _count(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\], ") == 2 * (36 + 32)
    assert _count(sass, r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ") == 2 * 4
    assert _count(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ") == 2 * 4
    assert _count(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ") == 2 * 4
    assert _count(sass, r"HGMMA\.64x64x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspA\.tnspB, ") == 2 * 32
    assert _count(sass, r"HGMMA") == 2 * (68 + 8 + 36)
    # A fresh accumulator is not zeroed: its first product ignores it (scale-d = 0): S, dP, 5 chunks.
    assert _count(sass, r"HGMMA\S* R\d+, gdesc\[UR\d+\]\S*, RZ, !UPT") == 2 * 7


def test_sass_adds_the_rows_as_16_byte_reductions_only(sass):
    # A thread's slot: 8 groups of 4 columns in each of four value chunks, 4 in the rope half.
    assert _count(sass, r"REDG\.E\.ADD\.F32x4\.") == 2 * (4 * 8 + 4)
    assert _count(sass, r"\b(?:RED|REDG|ATOM|ATOMG)\.") == _count(sass, r"REDG\.E\.ADD\.F32x4\.")
    # One pair of shuffles per reduction (the even lane takes the row of its quad's first row, the odd
    # lane the row 8 below) and no local memory.
    assert _count(sass, r"SHFL\.BFLY") == 2 * 2 * (4 * 8 + 4)
    assert _count(sass, r"\b(?:LDL|STL)\b") == 0


def test_sass_waits_for_the_products_only_where_the_design_does(sass):
    # Per step and consumer: one wait for S and dP, five that leave the newest group in flight (dq's
    # completion, then each chunk's while the next one runs), one for the last chunk.
    assert _count(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0") == 2 * 2
    assert _count(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1") == 2 * 5
    assert _count(sass, r"USETMAXREG") == 2


# ----------------------------------------------------------------------------- GPU
def _backend():
    pytest.importorskip("cupy")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    if cupy_backend._compute_capability() != 90:
        pytest.skip("the wgmma backward runs on compute capability 9.0 only")
    if cupy_backend._smem_optin() < cupy_backend.WGMMA_BACKWARD_SMEM:
        pytest.skip("the wgmma backward needs sm_90's shared memory per block")
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.hopper_backward = True
    return backend


def _problem(seed: int, *, s_q=6, s_kv, h, topk, sink=False, d_lse=False, with_topk_length=False,
             d_out_dtype="float32", strided=False, **features):
    """A bf16 V3.2 backward problem whose index rows hold every kind of invalid slot, duplicates, a query
    without a valid slot (query 2) and, with ``with_topk_length``, lengths topk, 0 and 65 (a cut one slot
    into the second step); rows >= s_kv / 2 are read by nobody and are NaN."""
    if s_q < 3 or (with_topk_length and s_q < 4):
        raise ValueError(f"s_q={s_q}: the problem needs queries 0-2 (3 with with_topk_length) for its special rows")
    rng = np.random.default_rng(seed)
    forward = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=576, d_v=512, topk=topk,
                                          dtype="bfloat16", attn_sink=sink, **features)
    inputs = dict(forward.inputs)
    indices = rng.integers(0, s_kv // 2, size=(s_q, topk)).astype(np.int32)
    for n, bad in enumerate((problems.INT32_MIN, -1, s_kv, problems.INT32_MAX)):
        indices[:, n::13] = bad
    indices[1, : topk // 2] = max(int(indices[1, 0]), 0)  # duplicates: one row counted many times
    indices[2] = rng.choice(np.array([-1, s_kv, problems.INT32_MIN, problems.INT32_MAX], np.int32), size=topk)
    inputs["indices"] = indices
    if with_topk_length:
        lengths = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
        lengths[0], lengths[3], lengths[4 % s_q] = topk, 0, min(topk, 65)
        inputs["topk_length"] = lengths
    else:
        inputs["topk_length"] = None
    kv = inputs["kv"].copy()
    kv[problems.unread_rows(indices, s_kv, inputs["topk_length"])] = np.nan
    assert np.isnan(kv[s_kv // 2:]).all()
    inputs["kv"] = kv
    out, lse = reference.sparse_mla(**inputs)
    inputs["out"], inputs["lse"] = out, lse
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    inputs["d_out"] = d_out.astype(interop.NUMPY_DTYPES[d_out_dtype])
    inputs["d_lse"] = rng.standard_normal(lse.shape).astype(np.float32) if d_lse else None
    return problems.Problem("sparse_mla_backward", inputs, dict(forward.params), "bfloat16", strided)


def _check(problem, monkeypatch, backend=None):
    backend = backend or _backend()
    launched = record_launches(monkeypatch)
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    with dsa_ref.use_deterministic(False):
        actual = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert launched == ["sparse_mla_bwd_wgmma"], launched
    assert len(actual) == len(expected)
    tolerance = gradient_tolerance_for("bfloat16", backend)
    scales = _sparse_mla_backward_term_scales(inputs)
    for name, a, e in zip(("dq", "dkv", "d_attn_sink"), actual, expected):
        assert_close(interop.to_numpy(a), e, tolerance, name=name, scale_floor=scales[name])
    dq, dkv = interop.to_numpy(actual[0]), interop.to_numpy(actual[1])
    s_kv = inputs["kv"].shape[0]
    valid = reference.valid_slots(inputs["indices"], s_kv, inputs["topk_length"])  # [s_q, topk]
    unread = problems.unread_rows(inputs["indices"], s_kv, inputs["topk_length"])
    assert unread.any() and (dkv[unread] == 0).all(), "rows no valid slot reads must get exactly 0"
    assert (dq[~valid.any(axis=1)] == 0).all(), "queries without a valid slot must get dq = 0"
    return actual


CASES = {
    "h64-topk64-plain": dict(s_kv=300, h=64, topk=64),
    "h64-topk100-everything": dict(s_kv=300, h=64, topk=100, sink=True, d_lse=True, with_topk_length=True),
    "h128-topk100-bf16-dout": dict(s_kv=1000, h=128, topk=100, sink=True, d_lse=True, with_topk_length=True,
                                   d_out_dtype="bfloat16"),
    "h64-topk577-bf16-dout": dict(s_kv=4096, h=64, topk=577, d_out_dtype="bfloat16", with_topk_length=True),
    "h128-topk320-v32-scale": dict(s_kv=2000, h=128, topk=320, sink=True, sm_scale=problems.V32_SM_SCALE,
                                   logit_scale=2.0),
    "h128-topk64-strided": dict(s_kv=500, h=128, topk=64, d_lse=True, strided=True),
    "h64-topk64-few-rows": dict(s_kv=40, h=64, topk=64, d_lse=True),  # each of 20 rows read by many slots
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_wgmma_backward_matches_reference(name, monkeypatch):
    _check(_problem(len(name), **CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_wgmma_backward_of_queries_without_a_step(monkeypatch):
    # Every topk_length 0: no step runs; dq must still be written (0) and dkv stay 0.
    problem = _problem(7, s_q=5, s_kv=200, h=64, topk=64, sink=True, with_topk_length=True)
    problem.inputs["topk_length"] = np.zeros(5, np.int32)
    problem.inputs["out"], problem.inputs["lse"] = reference.sparse_mla(
        **{k: v for k, v in problem.inputs.items() if k not in ("out", "lse", "d_out", "d_lse")})
    backend = _backend()
    record_launches(monkeypatch)
    dq, dkv, _ = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert (interop.to_numpy(dq) == 0).all() and (interop.to_numpy(dkv) == 0).all()


@pytest.mark.gpu
def test_wgmma_backward_follows_the_environment_variable(monkeypatch):
    backend = _backend()
    backend.hopper_backward = False
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "1")
    _check(_problem(2, s_q=3, s_kv=100, h=64, topk=64), monkeypatch, backend)
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_BACKWARD", "0")
    backend.hopper_backward = True
    launched = record_launches(monkeypatch)
    problem = _problem(2, s_q=3, s_kv=100, h=64, topk=64)
    with dsa_ref.use_deterministic(False):
        dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert launched == ["sparse_mla_bwd_mma"], launched


@pytest.mark.gpu
def test_wgmma_backward_agrees_with_the_mma_kernel(monkeypatch):
    """The same roundings (dout, P and dl to bf16, float32 products): the two kernels differ only in the
    order of their float32 sums."""
    problem = _problem(9, s_kv=3000, h=128, topk=512, sink=True, d_lse=True, with_topk_length=True)
    backend = _backend()
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
