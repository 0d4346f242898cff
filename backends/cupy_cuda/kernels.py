"""The CUDA sources of the cupy backend, the template instances it launches, and their loading.

Each ``.cu`` file under ``csrc/`` is compiled at run time by NVRTC through ``cupy.RawModule``;
templated kernels are retrieved through *name expressions* (``"indexer_mma<2, 4>"``), plain ones
(``extern "C"``) by name. :data:`KERNELS` is the single list of what is launched: the CI compile
test (tests/test_cuda_compile.py) instantiates exactly these with nvcc, so a kernel the backend
uses cannot escape the warning, register and spill checks.

This module imports nothing from CuPy at import time.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

CSRC = Path(__file__).resolve().parent / "csrc"

#: Element kinds of the tensor-core kernels (``ElementKind`` in common.cuh).
ELEM_BF16, ELEM_F16, ELEM_E4M3 = 0, 1, 2

#: For each source: the kernels the backend launches. Template instances are written as the
#: name expressions NVRTC is given; names without ``<`` are ``extern "C"`` kernels.
KERNELS: dict[str, tuple[str, ...]] = {
    "indexer.cu": tuple(f"indexer_mma<{elem}, {m_tiles}>" for elem in (ELEM_BF16, ELEM_F16, ELEM_E4M3)
                        for m_tiles in (1, 2, 3, 4))
                  + tuple(f"indexer_paged_mma<{m_tiles}>" for m_tiles in (1, 2, 3, 4)) + ("indexer_simt",),
    "topk.cu": ("topk_select",),
    "sparse_mla.cu": ("sparse_mla_fwd_mma<false>", "sparse_mla_fwd_mma<true>", "sparse_mla_fwd_simt"),
    "sparse_mla_backward.cu": ("sparse_mla_bwd_query_simt", "sparse_mla_bwd_dkv_simt", "attention_probs_simt"),
    "sparse_mla_backward_mma.cu": ("sparse_mla_bwd_mma", "sparse_mla_bwd_mma_deterministic",
                                   "sparse_mla_bwd_mma_row_sum"),
    "indexer_loss.cu": ("indexer_entry_scores_simt", "indexer_loss_bwd_query_simt", "indexer_loss_bwd_dk_simt"),
    "sparse_mla_wgmma.cu": ("sparse_mla_fwd_wgmma", "sparse_mla_fwd_wgmma_fp8"),
    "indexer_wgmma.cu": ("indexer_paged_wgmma_q1", "indexer_paged_wgmma_q2", "indexer_dense_wgmma_q2"),
    "indexer_wgmma_v2.cu": ("indexer_paged_wgmma_v2_q1", "indexer_paged_wgmma_v2_q2"),
    "sparse_mla_backward_wgmma.cu": ("sparse_mla_bwd_wgmma", "sparse_mla_bwd_wgmma_deterministic"),
    "sparse_mla_wgmma_v2.cu": ("sparse_mla_fwd_wgmma_v2", "sparse_mla_fwd_wgmma_fp8_v2", "sparse_mla_fwd_wgmma_fp8_pair",
                               "sparse_mla_fwd_wgmma_v3", "sparse_mla_fwd_wgmma_fp8_v3", "sparse_mla_fwd_wgmma_fp8_pair_v3"),
}

#: Sources written for one architecture's own instructions, compiled for it alone (by NVRTC at run
#: time and by nvcc in CI): wgmma and setmaxnreg exist only on the ``a`` target of sm_90, whose code
#: runs on compute capability 9.0 and nowhere else. Every other source is compiled for the device
#: it runs on (CuPy picks the architecture) and, in CI, for compile_check.ARCHITECTURES.
SOURCE_ARCHITECTURES: dict[str, str] = {"sparse_mla_wgmma.cu": "sm_90a", "indexer_wgmma.cu": "sm_90a",
                                        "sparse_mla_backward_wgmma.cu": "sm_90a", "sparse_mla_wgmma_v2.cu": "sm_90a",
                                        "indexer_wgmma_v2.cu": "sm_90a"}

#: Kernels on the hot path: the compile test fails if any of them spills registers.
#: (All kernels of the package are in fact spill-free; the general float32 kernels are checked too.)
HOT_KERNELS = tuple(name for names in KERNELS.values() for name in names)

#: Compiler options shared by NVRTC (run time) and nvcc (CI).
COMPILE_OPTIONS = ("-std=c++17",)


def template_kernels(source: str) -> tuple[str, ...]:
    return tuple(name for name in KERNELS[source] if "<" in name)


# ----------------------------------------------------------------------------- fp8 helpers
def _e4m3_values() -> np.ndarray:
    import ml_dtypes

    return np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # [256]


#: float32 value of every e4m3 byte (NaN for the two NaN patterns); exact.
E4M3_TO_FLOAT32 = _e4m3_values().astype(np.float32)
#: f16 bit pattern of every e4m3 byte; exact (every e4m3 value is an f16 value).
E4M3_TO_FLOAT16_BITS = _e4m3_values().astype(np.float16).view(np.uint16)


def query_permutation(d_i: int) -> np.ndarray:
    """Column order of the f16-widened fp8 indexer queries (see the fp8 note in indexer.cu).

    Within each group of 32 dims, f16 "k slot" j of the first 16 (and, shifted by 16, of the
    second 16) holds dim ``4 ((j % 8) // 2) + 2 (j // 8) + j % 2``: the order in which a widened
    fp8 key fragment presents its dims to the f16 tensor-core instruction.
    """
    slot = np.arange(16)
    within_half = 4 * ((slot % 8) // 2) + 2 * (slot // 8) + slot % 2  # [16]
    group = np.concatenate([within_half, 16 + within_half])  # [32]
    return (np.arange(0, d_i, 32)[:, None] + group[None, :]).reshape(-1)  # [d_i]


# ----------------------------------------------------------------------------- loading
def source_text(source: str) -> str:
    return (CSRC / source).read_text()


def nvrtc_options(source: str) -> tuple[str, ...]:
    """The NVRTC options of one source: the shared ones, the include path, and, for a source of
    :data:`SOURCE_ARCHITECTURES`, its architecture (for the others CuPy adds the device's own)."""
    options = COMPILE_OPTIONS + (f"--include-path={CSRC}",)
    if source in SOURCE_ARCHITECTURES:
        options += (f"--gpu-architecture={SOURCE_ARCHITECTURES[source]}",)
    return options


@functools.lru_cache(maxsize=None)
def module(source: str, device_id: int):
    """The compiled module of one source on one device (compiled on first use): a ``cupy.RawModule``,
    or, for a source of :data:`SOURCE_ARCHITECTURES`, a ``cupy.cuda.function.Module`` loaded from the
    cubin NVRTC builds for that architecture. Both answer ``get_function(name)``."""
    import cupy

    with cupy.cuda.Device(device_id):
        if source in SOURCE_ARCHITECTURES:
            from cupy_backends.cuda.libs import nvrtc

            loaded = cupy.cuda.function.Module()
            loaded.load(compile_cubin(source, nvrtc))
            return loaded
        return cupy.RawModule(
            code=source_text(source),
            options=nvrtc_options(source),
            name_expressions=list(template_kernels(source)),
        )


def compile_cubin(source: str, nvrtc) -> bytes:
    """The cubin of a source of :data:`SOURCE_ARCHITECTURES`, compiled by NVRTC (``nvrtc``: CuPy's
    ``cupy_backends.cuda.libs.nvrtc`` binding) with :func:`nvrtc_options`.

    ``cupy.RawModule`` cannot build it: CuPy appends ``-arch=sm_<device>`` to the options, and NVRTC
    refuses a second architecture option, so the ``a`` target is unreachable through it. Its kernels
    are ``extern "C"``: no name expressions are needed to find them in the cubin.
    """
    if template_kernels(source):
        raise ValueError(f"{source}: kernels compiled through compile_cubin must be extern \"C\", "
                         f"got templates {template_kernels(source)}")
    program = nvrtc.createProgram(source_text(source), source, (), ())
    try:
        try:
            nvrtc.compileProgram(program, list(nvrtc_options(source)))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed on {source} with {nvrtc_options(source)}:\n"
                               f"{nvrtc.getProgramLog(program)}") from error
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def kernel(source: str, name: str, device_id: int, dynamic_smem: int = 0):
    """A launchable kernel allowed at least ``dynamic_smem`` bytes of dynamic shared memory.

    Without a raised limit, static plus dynamic shared memory may not pass 48 KB and the launch
    fails. The limit belongs to the compiled function, which every caller shares, so it only ever
    grows: a launch that asks for less must not shrink it under another's feet.
    """
    if name not in KERNELS[source]:
        raise KeyError(f"{name!r} is not listed in KERNELS[{source!r}]; add it so CI compiles it")
    function = _function(source, name, device_id)
    if hasattr(function, "max_dynamic_shared_size_bytes"):  # a cupy.RawKernel
        if dynamic_smem > function.max_dynamic_shared_size_bytes:
            function.max_dynamic_shared_size_bytes = dynamic_smem
    elif dynamic_smem > 0:  # a cupy.cuda.function.Function of a loaded cubin: the driver holds its limit
        from cupy.cuda import driver

        attribute = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
        if dynamic_smem > driver.funcGetAttribute(attribute, function.ptr):
            driver.funcSetAttribute(function.ptr, attribute, dynamic_smem)
    return function


@functools.lru_cache(maxsize=None)
def _function(source: str, name: str, device_id: int):
    return module(source, device_id).get_function(name)
