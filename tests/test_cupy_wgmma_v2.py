"""The cupy backend's second wgmma sparse-MLA forward (csrc/sparse_mla_wgmma_v2.cu, sm_90a only).

``sparse_mla_fwd_wgmma_v2`` keeps ``sparse_mla_fwd_wgmma``'s contract, shared-memory layout, launch and
consumer loop; its producer loads a tile's indices one tile ahead and copies every row with 8 threads,
so that no copy waits for an index load.

CPU part: the switch (``CupyBackend.hopper_forward_v2``, DSA_REF_CUPY_WGMMA_V2) is off by default and
follows its environment variable; the backend sends the wgmma path, and only it, to the new kernel;
the host's constants are the kernel's (read from the source and checked by the compiler, the layout
equal to the first kernel's); the register handover fits what the launch allocates; the SASS has the
designed products, waits and register moves, and the producer's 36 copies a tile come without an
index load among them (the check fails on the first kernel, whose copies wait on one per row). GPU
part (``@pytest.mark.gpu``): against the float64 reference on awkward inputs (invalid indices of every
kind, duplicates, topk_length 0 and cuts inside a tile, attn_sink, a query without a valid slot,
unread rows NaN, outputs poisoned with NaN, h 64 and 128), bit for bit equal to the first kernel, the
environment variable, one V3.2-size case; each test checks which kernel ran.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cupy_hopper import hopper_backend
from cupy_launches import record_launches

from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_wgmma_problems")  # its asserts report as this file's do
from cupy_wgmma_problems import FORWARD_CASES, check_forward, forward_problem, run_forward  # noqa: E402

SOURCE = "sparse_mla_wgmma_v2.cu"
KERNEL = "sparse_mla_fwd_wgmma_v2"
ENV = "DSA_REF_CUPY_WGMMA_V2"


@pytest.fixture(autouse=True)
def _v2_consumers(monkeypatch):
    """These are the v2 consumers' tests: their split-V twins, the default on Hopper, are off here
    (tests/test_cupy_wgmma_v3.py has theirs)."""
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA_SPLIT_V", "0")


# ----------------------------------------------------------------------------- CPU: the switch
def test_the_v2_forward_is_the_default_and_follows_its_environment_variable(monkeypatch):
    assert cupy_backend.CupyBackend.hopper_forward_v2 is True, "the default since measured on the H200"
    monkeypatch.delenv(ENV, raising=False)
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_forward_v2, ENV)
    assert not cupy_backend.kernel_switch(False, ENV)
    monkeypatch.setenv(ENV, "1")
    assert cupy_backend.kernel_switch(cupy_backend.CupyBackend.hopper_forward_v2, ENV)
    monkeypatch.setenv(ENV, "0")
    assert not cupy_backend.kernel_switch(True, ENV)


def test_the_backend_sends_only_the_wgmma_path_to_the_v2_kernel(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_compute_capability", lambda: 90)
    monkeypatch.setattr(cupy_backend, "_smem_optin", lambda: 232448)
    for variable in (ENV, "DSA_REF_CUPY_WGMMA"):
        monkeypatch.delenv(variable, raising=False)
    backend = cupy_backend.CupyBackend()

    def chosen(**changes):
        arguments = dict(h=128, d_qk=576, kv_width=576, d_v=512)
        arguments.update(changes)
        return backend._tensor_core_forward("bfloat16", "bfloat16", **arguments)

    assert chosen() == (SOURCE, KERNEL, 384, cupy_backend.WGMMA_FORWARD_SMEM, 2, False)  # the first one's launch
    monkeypatch.setenv(ENV, "0")
    assert chosen()[:2] == ("sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma")
    monkeypatch.setenv(ENV, "1")
    # The v2 switch alone does not reroute: the inputs the wgmma kernel takes, with its switch on.
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA", "0")
    assert chosen()[1] == "sparse_mla_fwd_mma<false>"
    monkeypatch.delenv("DSA_REF_CUPY_WGMMA")
    assert chosen(h=96)[1] == "sparse_mla_fwd_mma<false>" and chosen(d_v=256) is None


# ----------------------------------------------------------------------------- CPU: the source
def test_host_launch_constants_agree_with_the_source():
    # The FP8 ones: test_cupy_wgmma_fp8.py
    assert kernels.KERNELS[SOURCE][:3] == (KERNEL, "sparse_mla_fwd_wgmma_fp8_v2", "sparse_mla_fwd_wgmma_fp8_pair")
    assert kernels.SOURCE_ARCHITECTURES[SOURCE] == "sm_90a"
    assert compile_check.architectures(SOURCE) == ("sm_90a",)
    assert (SOURCE, "sm_90a") in compile_check.compile_jobs()
    assert kernels.template_kernels(SOURCE) == ()
    text = kernels.source_text(SOURCE)
    assert 'extern "C" __global__' in text and f"{KERNEL}(" in text
    total = re.search(r"TOTAL = .*; (\d+)", text)
    assert total is not None and int(total.group(1)) == cupy_backend.WGMMA_FORWARD_SMEM
    threads = re.search(r"THREADS = (\d+);", text)
    assert threads is not None and int(threads.group(1)) == cupy_backend.WGMMA_FORWARD_THREADS


def _numbers() -> dict[str, int]:
    text = kernels.source_text(SOURCE)
    return {name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))
            for name in ("LAUNCH_REGISTERS", "PRODUCER_REGISTERS", "CONSUMER_REGISTERS", "THREADS")}


def test_the_register_handover_fits_what_the_launch_allocates():
    """setmaxnreg.inc takes registers only from those setmaxnreg.dec gave back: the consumers' count must
    come out of the 168 a thread the launch allocates (65536 / 384, in steps of 8), or they wait forever."""
    number = _numbers()
    launch, producer, consumer = number["LAUNCH_REGISTERS"], number["PRODUCER_REGISTERS"], number["CONSUMER_REGISTERS"]
    assert launch == 65536 // number["THREADS"] // 8 * 8 == 168
    assert producer % 8 == 0 and consumer % 8 == 0 and 24 <= producer <= launch <= consumer <= 256
    assert 128 * producer + 256 * consumer <= number["THREADS"] * launch
    report = compile_check.report_path(SOURCE, "sm_90a").read_text().splitlines()
    (line,) = [line for line in report if line.startswith(f"{KERNEL} ")]
    assert line.split()[1:5] == [str(launch), "0", "0", "0"], line  # registers at launch, no stack, no spills


@pytest.fixture(scope="module")
def nvcc():
    found = compile_check.find_nvcc()
    if found is None:
        pytest.skip("needs nvcc (tests/test_cuda_compile.py fails without it)")
    return found


def test_the_compiler_agrees_with_the_host_and_with_the_first_kernels_layout(nvcc, tmp_path):
    """static_assert in a unit that includes both sources: the host's constants, and every offset of the
    layout equal to sparse_mla_wgmma.cu's (the backend gives both kernels the same launch)."""
    unit = tmp_path / "constants.cu"
    fields = ("Q_OFFSET", "KV_OFFSET", "P_OFFSET", "VALID_OFFSET", "MAX_OFFSET", "SUM_OFFSET", "BARRIER_OFFSET",
              "USED", "TOTAL")
    same = "".join(f"static_assert(mla_wgmma_v2::Smem::{f} == mla_wgmma::Smem::{f}, \"{f}\");\n" for f in fields)
    unit.write_text(f'#include "{kernels.CSRC / "sparse_mla_wgmma.cu"}"\n#include "{kernels.CSRC / SOURCE}"\n'
                    f"static_assert(mla_wgmma_v2::Smem::TOTAL == {cupy_backend.WGMMA_FORWARD_SMEM}, \"smem\");\n"
                    f"static_assert(mla_wgmma_v2::THREADS == {cupy_backend.WGMMA_FORWARD_THREADS}, \"threads\");\n"
                    f"static_assert(mla_wgmma_v2::THREADS == mla_wgmma::THREADS, \"threads\");\n" + same)
    done = subprocess.run([nvcc, *kernels.COMPILE_OPTIONS, "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
                           f"-I{kernels.CSRC}", "-o", str(tmp_path / "constants.cubin"), str(unit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _compiled_sass(nvcc, source, name, workdir) -> str:
    result = compile_check.compile_source(nvcc, source, "sm_90a", workdir)
    assert result.returncode == 0, result.log
    if result.sass is None:
        pytest.skip("needs cuobjdump (tests/test_cuda_compile.py fails without it)")
    assert not any(usage.spills for usage in result.usages), result.report()
    return compile_check.kernel_sass(result.sass, name)


@pytest.fixture(scope="module")
def sass(nvcc, tmp_path_factory) -> str:
    return _compiled_sass(nvcc, SOURCE, KERNEL, Path(tmp_path_factory.mktemp("wgmma_v2")))


def _count(sass: str, pattern: str) -> int:
    return len(re.findall(pattern, sass))


def _producer(sass: str) -> str:
    """The producer's code: what follows its setmaxnreg.dec (the consumers' loop comes before it)."""
    (start,) = [m.start() for m in re.finditer(r"USETMAXREG\.DEALLOC", sass)]
    return sass[start:]


def _copies_wait_on_no_index_load(producer: str) -> bool:
    """True when the producer's copies of a tile are one straight run with no global load and no branch
    between the first and the last: every index a copy needs was loaded before the run began (a tile
    ahead), and no loop inside the run can go back to a load."""
    copies = [m.start() for m in re.finditer(r"\bLDGSTS\b", producer)]
    return bool(copies) and re.search(r"\b(?:LDG|BRA)\b", producer[copies[0]:copies[-1]]) is None


def test_sass_has_the_designed_products_waits_and_register_moves(sass):
    # Per tile and consumer: S as 36 k-steps of 16 dims at N = 32 (both operands K-major), P V as 4 k-steps
    # of 16 slots at N = 256 (V MN-major); one wait for each.
    assert _count(sass, r"HGMMA\.64x32x16\.F32\.BF16 R\d+, gdesc\[UR\d+\], ") == 36
    assert _count(sass, r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc\[UR\d+\]\.tnspB, ") == 4
    assert _count(sass, r"HGMMA") == 40
    assert _count(sass, r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0") == 2
    number = _numbers()
    assert _count(sass, rf"USETMAXREG\.DEALLOC\.CTAPOOL {number['PRODUCER_REGISTERS']:#x}\b") == 1
    assert _count(sass, rf"USETMAXREG\.TRY_ALLOC\.CTAPOOL UP\d, {number['CONSUMER_REGISTERS']:#x}\b") == 1
    # The O rescale a warp skips when none of its factors differs from 1: one warp vote.
    assert _count(sass, r"\bVOTE\.ALL\b") == 1
    assert _count(sass, r"\b(?:LDL|STL)\b") == 0


def test_sass_producer_copies_a_tile_without_waiting_on_an_index(sass):
    producer = _producer(sass)
    # 4 rows x 9 column blocks of 16 bytes per thread and tile, each a cp.async (LDGSTS).
    assert _count(producer, r"\bLDGSTS\.E\.BYPASS\.128\b") == 36
    # The 4 indices of the next tile: independent loads, not one before each row's copies.
    assert _count(producer, r"\bLDG\.E\.CONSTANT\b") == 4
    assert _copies_wait_on_no_index_load(producer)


def test_the_index_check_fails_on_the_first_kernel(nvcc, tmp_path):
    """The check above can fail: sparse_mla_fwd_wgmma's producer loops over its rows, each row's copies
    after that row's index load."""
    first = _compiled_sass(nvcc, "sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma", tmp_path)
    assert not _copies_wait_on_no_index_load(_producer(first))


# ----------------------------------------------------------------------------- GPU
def _backend(v2: bool = True):
    backend = hopper_backend("the wgmma forward", cupy_backend.WGMMA_FORWARD_SMEM)
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.hopper_forward = True
    backend.hopper_forward_v2 = v2
    return backend


def _check(problem, monkeypatch, backend=None):
    return check_forward(problem, monkeypatch, backend or _backend(), KERNEL)


#: The first kernel's cases, and tile counts 1, 2 and 3 around the two stages, cuts one slot into a tile
#: and one slot short of one.
CASES = dict(FORWARD_CASES)
CASES["h128-topk192-cuts"] = dict(s_q=5, s_kv=900, h=128, topk=192, invalid_fraction=0.1, attn_sink=True,
                                  topk_lengths=[1, 64, 65, 127, 192])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_wgmma_v2_forward_matches_reference(name, monkeypatch):
    _check(forward_problem(len(name), **CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_wgmma_v2_forward_is_bitwise_the_first_kernel(monkeypatch):
    """The consumers' arithmetic is the first kernel's, operation for operation (a skipped rescale
    multiplies by exactly 1), and both producers write the same tiles: out and lse agree bit for bit."""
    problem = forward_problem(5, s_q=6, s_kv=2000, h=128, topk=512, invalid_fraction=0.1, duplicate_fraction=0.1,
                              topk_length=True, attn_sink=True)
    second = _check(problem, monkeypatch)
    launched = record_launches(monkeypatch)
    first = run_forward(problem, _backend(v2=False))
    assert launched == ["sparse_mla_fwd_wgmma"], launched
    for a, b in zip(second, first):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.gpu
def test_wgmma_v2_forward_follows_the_environment_variable(monkeypatch):
    backend = _backend(v2=False)
    monkeypatch.setenv(ENV, "1")
    _check(forward_problem(2, s_q=2, s_kv=100, h=64, topk=64), monkeypatch, backend)
    monkeypatch.setenv(ENV, "0")
    launched = record_launches(monkeypatch)
    run_forward(forward_problem(2, s_q=2, s_kv=100, h=64, topk=64), _backend(v2=True))
    assert launched == ["sparse_mla_fwd_wgmma"], launched


@pytest.mark.gpu
def test_wgmma_v2_forward_at_the_v32_size(monkeypatch):
    _check(forward_problem(11, s_q=32, s_kv=8192, h=128, topk=2048, invalid_fraction=0.02, duplicate_fraction=0.02,
                           topk_length=True, attn_sink=True, distribution="recent"), monkeypatch)
