"""Moving arrays between NumPy, PyTorch and CuPy without importing the ones not in use.

NumPy has no native bfloat16 or float8 types: dsa-ref uses :mod:`ml_dtypes` for them
(``ml_dtypes.bfloat16``, ``ml_dtypes.float8_e4m3fn``). Torch and CuPy are imported only
when an array of theirs is seen or a backend of theirs asks for one, so
``import dsa_ref`` stays light.

Conversions use DLPack where a copy can be avoided (torch <-> cupy on the same GPU,
torch CPU <-> numpy share memory through ``from_numpy``). bfloat16 and float8 travel as
same-width integer views, because neither NumPy's DLPack nor ``torch.from_numpy`` knows
the ml_dtypes types.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

from .reference.formats import KV_CACHE_FP8_BYTES

ARRAY_KINDS = ("numpy", "torch", "cupy")

#: NumPy dtypes of the names dsa-ref uses; ml_dtypes supplies the 16- and 8-bit floats.
NUMPY_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
}

#: Integer views used to carry types that an array library or DLPack does not know.
_CARRIER = {"bfloat16": "int16", "float8_e4m3fn": "uint8"}

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def array_kind(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"cupy"`` for an array of that library, else ``None``."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):  # subclasses too: Parameter, FakeTensor under compile
        return "torch"
    root = type(x).__module__.split(".", 1)[0]
    if root == "cupy" and type(x).__name__ == "ndarray":
        return "cupy"
    return None


def is_array(x: Any) -> bool:
    return array_kind(x) is not None


def dtype_name(x: Any) -> str:
    """The dtype of an array as a plain name: ``"bfloat16"``, ``"float8_e4m3fn"``, ``"int32"``."""
    name = str(x.dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


#: CuPy has no bfloat16 or float8 dtype: dsa-ref carries them in cupy arrays as same-width
#: integers (this is what :func:`convert` produces), and reads such arrays back that way.
CUPY_CARRIERS = {"int16": "bfloat16", "uint8": "float8_e4m3fn"}


def logical_dtype_name(x: Any, *, packed_kv: bool = False) -> str:
    """The dtype an array stands for: :func:`dtype_name`, except that a cupy ``int16`` / ``uint8``
    array carries bfloat16 / float8_e4m3fn (:data:`CUPY_CARRIERS`). With ``packed_kv``, a
    ``uint8 [..., 656]`` array of any library is the packed FP8 KV cache and stays ``"uint8"``."""
    name = dtype_name(x)
    if packed_kv and name == "uint8" and x.shape[-1:] == (KV_CACHE_FP8_BYTES,):
        return name
    if array_kind(x) == "cupy" and name in CUPY_CARRIERS:
        return CUPY_CARRIERS[name]
    return name


def device_of(x: Any) -> str:
    """``"cpu"`` or ``"cuda:N"``."""
    kind = array_kind(x)
    if kind == "torch":
        return str(x.device)
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    return "cpu"


# ---------------------------------------------------------------------------- to numpy
def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array with the same values and dtype (ml_dtypes for bf16/fp8). Copies off GPUs."""
    kind = array_kind(x)
    if kind == "numpy":
        return x
    if kind == "torch":
        name = dtype_name(x)
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if name in _CARRIER:
            import torch

            carrier = getattr(torch, _CARRIER[name])
            return t.view(carrier).numpy().view(NUMPY_DTYPES[name])
        return t.numpy()
    if kind == "cupy":
        return x.get()
    if isinstance(x, (list, tuple, int, float)):
        return np.asarray(x)
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


# ---------------------------------------------------------------------------- to torch
def _numpy_to_torch(x: np.ndarray, device: Any):
    import torch

    name = x.dtype.name
    if name in _CARRIER:
        carrier = NUMPY_DTYPES["uint8"] if _CARRIER[name] == "uint8" else np.dtype(np.int16)
        t = torch.from_numpy(np.ascontiguousarray(x).view(carrier)).view(getattr(torch, name))
    else:
        # from_numpy refuses negative strides; a contiguous copy is cheap next to a host->device copy.
        t = torch.from_numpy(x if x.flags.c_contiguous or x.flags.f_contiguous else np.ascontiguousarray(x))
    return t.to(device) if device is not None else t


def _to_torch(x: Any, device: Any):
    kind = array_kind(x)
    if kind == "torch":
        return x if device is None or x.device == _torch_device(device) else x.to(device)
    if kind == "numpy":
        return _numpy_to_torch(x, device)
    if kind == "cupy":
        import torch

        tensor = torch.from_dlpack(x)
        name = logical_dtype_name(x, packed_kv=True)
        return tensor.view(getattr(torch, name)) if name != dtype_name(x) else tensor
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


def _torch_device(device: Any):
    import torch

    return torch.device(device)


# ---------------------------------------------------------------------------- to cupy
def _to_cupy(x: Any, device: Any):
    import cupy

    kind = array_kind(x)
    if kind == "cupy":
        return x
    if kind == "torch":
        # DLPack refuses a tensor that requires grad; detach() shares its memory (no copy), and the
        # differentiable ops of dsa_ref.torch record the gradient themselves.
        x = x.detach()
        name = dtype_name(x)
        if name in _CARRIER:  # cupy has no bf16/fp8: carry as integers, the kernels reinterpret
            import torch

            return cupy.from_dlpack(x.view(getattr(torch, _CARRIER[name])))
        return cupy.from_dlpack(x)
    if kind == "numpy":
        name = x.dtype.name
        if name in _CARRIER:
            x = np.ascontiguousarray(x).view(np.int16 if _CARRIER[name] == "int16" else np.uint8)
        with cupy.cuda.Device(device or 0):
            return cupy.asarray(x)
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


def convert(x: Any, kind: str, device: Any = None) -> Any:
    """Convert ``x`` to an array of library ``kind`` (on ``device`` where that means anything).

    ``None`` passes through, so optional arguments need no special case.
    """
    if x is None:
        return None
    if kind == "numpy":
        return to_numpy(x)
    if kind == "torch":
        return _to_torch(x, device)
    if kind == "cupy":
        return _to_cupy(x, device)
    raise ValueError(f"kind must be one of {ARRAY_KINDS}, got {kind!r}")


def from_numpy_like(x: np.ndarray, like: Any) -> Any:
    """Put a NumPy result into the array library (and device) of ``like``."""
    kind = array_kind(like)
    if kind in (None, "numpy"):
        return x
    if kind == "torch":
        return _numpy_to_torch(x, like.device)
    return _to_cupy(x, like.device.id)


def convert_like(x: Any, like: Any) -> Any:
    """Convert a backend's result ``x`` to the array library and device of ``like``."""
    if x is None:
        return None
    kind = array_kind(like)
    if kind == array_kind(x):
        return x
    if kind in (None, "numpy"):
        return to_numpy(x)
    if kind == "torch":
        return _to_torch(x, like.device)
    return _to_cupy(x, like.device.id)


def module_loaded(name: str) -> bool:
    """Whether a library has been imported already (used to prove ``import dsa_ref`` stays light)."""
    return name in sys.modules
