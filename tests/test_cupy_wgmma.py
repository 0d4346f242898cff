"""The cupy backend's Hopper sparse-MLA forward (csrc/sparse_mla_wgmma.cu, wgmma, sm_90a only).

CPU part: which inputs the wrapper routes to the wgmma kernel (only when chosen, only on compute
capability 9.0, only bf16 rows of 576 with h a multiple of 64), that the host's shared memory and
thread count are the kernel's, and that NVRTC is asked for the sm_90a architecture for this source
alone (the options inspected through a stand-in NVRTC binding). GPU part (``@pytest.mark.gpu``,
with ``CupyBackend.hopper_forward`` set, as by default): against the float64 reference with the kit's
bf16 tolerance on invalid indices of every kind, duplicates, topk_length with 0 and cuts inside a
tile, attn_sink, a query without a valid slot, unread rows filled with NaN, h 64 and 128, topk 64 to
2048, outputs poisoned with NaN; bitwise-equal reruns; one V3.2-size case; each test checks that
the wgmma kernel ran.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
from cupy_hopper import hopper_backend
from cupy_launches import record_launches

from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import kernels

pytest.register_assert_rewrite("cupy_wgmma_problems")  # its asserts report as this file's do
from cupy_wgmma_problems import FORWARD_CASES, check_forward, forward_problem, run_forward  # noqa: E402

H200_SMEM = 232448  # MaxSharedMemoryPerBlockOptin of sm_90
A100_SMEM = 166912  # ... of sm_80


# ----------------------------------------------------------------------------- CPU: routing
def _path(**changes):
    arguments = dict(q_dtype="bfloat16", kv_dtype="bfloat16", d_qk=576, kv_width=576, d_v=512, h=128,
                     compute_capability=90, smem_limit=H200_SMEM, hopper_forward=True)
    arguments.update(changes)
    return cupy_backend.forward_kernel_path(arguments.pop("q_dtype"), arguments.pop("kv_dtype"), **arguments)


def test_chosen_v32_bf16_forward_on_hopper_routes_to_the_wgmma_kernel():
    assert _path() == "wgmma"
    assert _path(h=64) == "wgmma"


def test_wgmma_forward_is_the_backends_default_and_can_be_turned_off(monkeypatch):
    assert cupy_backend.CupyBackend.hopper_forward is True
    assert _path(hopper_forward=False) == "mma"
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA", "0")
    assert cupy_backend.kernel_switch(True, "DSA_REF_CUPY_WGMMA") is False


@pytest.mark.parametrize("changes", [
    dict(compute_capability=80), dict(compute_capability=89), dict(compute_capability=100),
    dict(h=16), dict(h=100), dict(h=20), dict(kv_dtype="uint8", kv_width=656),
])
def test_inputs_the_wgmma_kernel_does_not_take_keep_the_mma_kernel(changes):
    assert _path(**changes) == "mma"
    assert _path(**changes, hopper_forward=False) == "mma"


@pytest.mark.parametrize("changes", [
    dict(q_dtype="float16"), dict(q_dtype="float32"), dict(kv_dtype="float32"), dict(d_qk=64, kv_width=64),
    dict(kv_width=512), dict(d_v=256), dict(smem_limit=A100_SMEM), dict(compute_capability=80, smem_limit=A100_SMEM),
])
def test_other_forward_inputs_keep_the_float32_kernel(changes):
    assert _path(**changes) == "simt"


def test_host_launch_constants_agree_with_the_source():
    # the bf16 kernel and its packed-cache sibling (tests/test_cupy_wgmma_fp8.py), on one body
    assert kernels.KERNELS["sparse_mla_wgmma.cu"] == ("sparse_mla_fwd_wgmma", "sparse_mla_fwd_wgmma_fp8")
    text = kernels.source_text("sparse_mla_wgmma.cu")
    assert 'extern "C" __global__' in text and "sparse_mla_fwd_wgmma(" in text
    total = re.search(r"TOTAL = .*; (\d+)", text)
    assert total is not None and int(total.group(1)) == cupy_backend.WGMMA_FORWARD_SMEM
    threads = re.search(r"THREADS = (\d+);", text)
    assert threads is not None and int(threads.group(1)) == cupy_backend.WGMMA_FORWARD_THREADS
    assert cupy_backend.WGMMA_FORWARD_SMEM <= H200_SMEM


# ----------------------------------------------------------------------------- CPU: NVRTC options
def test_only_the_hopper_sources_name_an_architecture():
    hopper = {"sparse_mla_wgmma.cu", "indexer_wgmma.cu", "sparse_mla_backward_wgmma.cu", "sparse_mla_wgmma_v2.cu",
              "indexer_wgmma_v2.cu"}
    assert kernels.SOURCE_ARCHITECTURES == {source: "sm_90a" for source in hopper}
    for source in hopper:
        assert "--gpu-architecture=sm_90a" in kernels.nvrtc_options(source)
    for source in kernels.KERNELS:
        if source not in hopper:
            # CuPy appends the device's own -arch to these; a second one would make NVRTC fail.
            assert not any(o.startswith(("-arch", "--gpu-architecture")) for o in kernels.nvrtc_options(source))


def test_the_sources_built_as_cubins_launch_only_extern_c_kernels():
    # compile_cubin takes no name expressions: a template instance listed for such a source would
    # only fail on the GPU, at the first launch.
    for source in kernels.SOURCE_ARCHITECTURES:
        assert kernels.template_kernels(source) == (), source


class _RecordingNvrtc:
    """Stands in for cupy_backends.cuda.libs.nvrtc: records what compile_cubin asks of it."""

    class NVRTCError(Exception):
        pass

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def createProgram(self, src, name, headers, include_names):  # noqa: N802 (NVRTC's names)
        self.calls.append(("create", name, src))
        return 7

    def compileProgram(self, program, options):  # noqa: N802
        self.calls.append(("compile", program, list(options)))
        if self.fail:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def getProgramLog(self, program):  # noqa: N802
        return "error: identifier wgmma is undefined"

    def getCUBIN(self, program):  # noqa: N802
        self.calls.append(("cubin", program))
        return b"\x7fELF cubin"

    def destroyProgram(self, program):  # noqa: N802
        self.calls.append(("destroy", program))


def test_compile_cubin_asks_nvrtc_for_sm_90a():
    nvrtc = _RecordingNvrtc()
    assert kernels.compile_cubin("sparse_mla_wgmma.cu", nvrtc) == b"\x7fELF cubin"
    (create, compile_call, cubin, destroy) = nvrtc.calls
    assert create[1] == "sparse_mla_wgmma.cu" and "sparse_mla_fwd_wgmma" in create[2]
    assert "--gpu-architecture=sm_90a" in compile_call[2] and "-std=c++17" in compile_call[2]
    assert any(o.startswith("--include-path=") and o.endswith("csrc") for o in compile_call[2])
    assert cubin == ("cubin", 7) and destroy == ("destroy", 7)


def test_compile_cubin_reports_the_nvrtc_log_and_frees_the_program():
    nvrtc = _RecordingNvrtc(fail=True)
    with pytest.raises(RuntimeError, match="sparse_mla_wgmma.cu.*sm_90a(.|\n)*wgmma is undefined"):
        kernels.compile_cubin("sparse_mla_wgmma.cu", nvrtc)
    assert nvrtc.calls[-1] == ("destroy", 7)


def test_compile_cubin_refuses_template_kernels():
    with pytest.raises(ValueError, match='extern "C"'):
        kernels.compile_cubin("sparse_mla.cu", _RecordingNvrtc())


def test_module_loads_the_sm_90a_cubin_instead_of_a_raw_module(monkeypatch):
    """kernels.module() with stand-in cupy modules: the Hopper source goes through compile_cubin and
    a plain cupy.cuda.function.Module, never through cupy.RawModule (which would add -arch=sm_90)."""
    nvrtc = _RecordingNvrtc()
    loaded = []

    class Module:
        def load(self, cubin):
            loaded.append(cubin)

    class Device:
        def __init__(self, device_id):
            self.device_id = device_id

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def raw_module(**kwargs):
        raise AssertionError(f"RawModule used for the sm_90a source: {kwargs}")

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=Device, function=types.SimpleNamespace(Module=Module))
    cupy.RawModule = raw_module
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.nvrtc = nvrtc
    for name, module in {"cupy": cupy, "cupy_backends": types.ModuleType("cupy_backends"),
                         "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
                         "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.nvrtc": nvrtc}.items():
        monkeypatch.setitem(sys.modules, name, module)
    kernels.module.cache_clear()
    try:
        result = kernels.module("sparse_mla_wgmma.cu", 0)
    finally:
        kernels.module.cache_clear()
    assert isinstance(result, Module) and loaded == [b"\x7fELF cubin"]
    assert "--gpu-architecture=sm_90a" in nvrtc.calls[1][2]


# ----------------------------------------------------------------------------- GPU
def _backend():
    backend = hopper_backend("the wgmma forward")
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.hopper_forward = True  # the default on Hopper; set here so the tests hold whatever the environment says
    backend.hopper_forward_v2 = False  # the first wgmma kernel; test_cupy_wgmma_v2.py has the default, the second
    return backend


def _check(problem, monkeypatch):
    return check_forward(problem, monkeypatch, _backend(), "sparse_mla_fwd_wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_wgmma_forward_matches_reference(name, monkeypatch):
    _check(forward_problem(len(name), **FORWARD_CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_wgmma_forward_reruns_are_bitwise_equal(monkeypatch):
    problem = forward_problem(5, s_q=6, s_kv=2000, h=128, topk=512, invalid_fraction=0.1, duplicate_fraction=0.1,
                              topk_length=True, attn_sink=True)
    first = _check(problem, monkeypatch)
    second = run_forward(problem, _backend())
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.gpu
def test_wgmma_forward_follows_the_environment_variable(monkeypatch):
    backend = _backend()
    backend.hopper_forward = False
    monkeypatch.setenv("DSA_REF_CUPY_WGMMA", "1")
    launched = record_launches(monkeypatch)
    run_forward(forward_problem(2, s_q=2, s_kv=100, h=64, topk=64), backend)
    assert launched == ["sparse_mla_fwd_wgmma"], launched


@pytest.mark.gpu
def test_wgmma_forward_at_the_v32_size(monkeypatch):
    _check(forward_problem(11, s_q=32, s_kv=8192, h=128, topk=2048, invalid_fraction=0.02, duplicate_fraction=0.02,
                           topk_length=True, attn_sink=True, distribution="recent"), monkeypatch)
