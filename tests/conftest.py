"""Shared test setup: GPU tests skip without a CUDA device; backend choice is reset per test."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the naive loop versions in tests/naive.py

# Triton reads TRITON_INTERPRET when it is first imported: without a GPU, its kernels run on the
# CPU interpreter, so the Triton backend is tested on every machine.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_choice(monkeypatch):
    from dsa_ref import registry

    registry._env_choice.clear()
    yield
    registry._env_choice.clear()


@pytest.fixture
def poisoned_torch_outputs(monkeypatch):
    """Every tensor allocated with ``torch.empty`` starts as NaN (floats) or -12345 (integers), so an
    output element a kernel forgets to write fails the comparison."""
    import torch

    original_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = original_empty(*args, **kwargs)
        if tensor.dtype.is_floating_point:
            tensor.fill_(float("nan"))
        elif tensor.dtype in (torch.int32, torch.int64):
            tensor.fill_(-12345)
        return tensor

    monkeypatch.setattr(torch, "empty", empty)
