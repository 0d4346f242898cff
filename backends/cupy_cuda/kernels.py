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
                        for m_tiles in (1, 2, 3, 4)) + ("indexer_simt",),
    "topk.cu": ("topk_select",),
    "sparse_mla.cu": ("sparse_mla_fwd_mma<false>", "sparse_mla_fwd_mma<true>", "sparse_mla_fwd_simt"),
    "sparse_mla_backward.cu": ("sparse_mla_bwd_query_simt", "sparse_mla_bwd_dkv_simt", "attention_probs_simt"),
    "sparse_mla_backward_mma.cu": ("sparse_mla_bwd_mma", "sparse_mla_bwd_mma_deterministic",
                                   "sparse_mla_bwd_mma_row_sum"),
    "indexer_loss.cu": ("indexer_entry_scores_simt", "indexer_loss_bwd_query_simt", "indexer_loss_bwd_dk_simt"),
}

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


@functools.lru_cache(maxsize=None)
def module(source: str, device_id: int):
    """The compiled ``cupy.RawModule`` of one source on one device (compiled on first use)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=source_text(source),
            options=COMPILE_OPTIONS + (f"--include-path={CSRC}",),
            name_expressions=list(template_kernels(source)),
        )


def kernel(source: str, name: str, device_id: int, dynamic_smem: int = 0):
    """A launchable kernel allowed at least ``dynamic_smem`` bytes of dynamic shared memory.

    Without a raised limit, static plus dynamic shared memory may not pass 48 KB and the launch
    fails. The limit belongs to the compiled function, which every caller shares, so it only ever
    grows: a launch that asks for less must not shrink it under another's feet.
    """
    if name not in KERNELS[source]:
        raise KeyError(f"{name!r} is not listed in KERNELS[{source!r}]; add it so CI compiles it")
    function = _function(source, name, device_id)
    if dynamic_smem > function.max_dynamic_shared_size_bytes:
        function.max_dynamic_shared_size_bytes = dynamic_smem
    return function


@functools.lru_cache(maxsize=None)
def _function(source: str, name: str, device_id: int):
    return module(source, device_id).get_function(name)
