"""The skips of a CuPy GPU test whose kernel runs on Hopper (sm_90a) only."""

from __future__ import annotations

import pytest

from dsa_ref_backends.cupy_cuda import backend as cupy_backend


def hopper_backend(kernel: str, smem: int | None = None):
    """A new ``CupyBackend``, or a skip: without CuPy or a usable GPU, on a compute capability other than 9.0,
    and (given ``smem``) where a block cannot have ``smem`` bytes of shared memory. ``kernel`` names the
    kernel in the skip's reason."""
    pytest.importorskip("cupy")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    if cupy_backend._compute_capability() != 90:
        pytest.skip(f"{kernel} runs on compute capability 9.0 only")
    if smem is not None and cupy_backend._smem_optin() < smem:
        pytest.skip(f"{kernel} needs sm_90's shared memory per block")
    return backend
