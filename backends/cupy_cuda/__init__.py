"""dsa-ref's ``cupy`` backend: DSA written as CUDA C++ kernels, compiled at run time by NVRTC
through ``cupy.RawModule``. See :mod:`.backend` for what runs where and :mod:`.kernels` for the
list of kernels; the sources are in ``csrc/``."""

from .backend import CupyBackend, logical_dtype

__all__ = ["CupyBackend", "logical_dtype"]
