"""Moving arrays between NumPy, PyTorch and CuPy without importing the ones not in use.

NumPy has no native bfloat16 or float8 types: dsa-ref uses :mod:`ml_dtypes` for them
(``ml_dtypes.bfloat16``, ``ml_dtypes.float8_e4m3fn``). Torch and CuPy are imported only
when an array of theirs is seen or a backend of theirs asks for one, so
``import dsa_ref`` stays light.

Conversions share memory where a copy can be avoided: a torch CUDA tensor becomes a CuPy array
over its memory directly where CuPy would run on torch's current stream anyway (DLPack
otherwise), cupy -> torch goes through DLPack, and torch CPU <-> numpy share memory through
``from_numpy``. bfloat16 and float8 travel as same-width integer views, because neither NumPy's
DLPack nor ``torch.from_numpy`` knows the ml_dtypes types.
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


#: The kinds of the three exact array types, learnt as each is first seen: one dict lookup per call
#: on the hot path (an op converts and inspects every argument several times). Only exact types are
#: learnt, for which the checks below always give that answer; a subclass always takes the checks.
_EXACT_KINDS: dict[type, str] = {np.ndarray: "numpy"}


def array_kind(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"cupy"`` for an array of that library, else ``None``."""
    cls = type(x)
    kind = _EXACT_KINDS.get(cls)
    if kind is not None:
        return kind
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    if torch is not None and isinstance(x, torch.Tensor):  # subclasses too: Parameter, FakeTensor under compile
        if cls is torch.Tensor:
            _EXACT_KINDS[cls] = "torch"
        return "torch"
    root = cls.__module__.split(".", 1)[0]
    if root == "cupy" and cls.__name__ == "ndarray":
        cupy = sys.modules.get("cupy")
        if cupy is not None and cls is getattr(cupy, "ndarray", None):
            _EXACT_KINDS[cls] = "cupy"
        return "cupy"
    return None


def is_array(x: Any) -> bool:
    return array_kind(x) is not None


#: Names of torch's dtypes, each made once: ``str()`` of a torch dtype and its slicing, per call, were
#: a visible part of an op's host time.
_TORCH_DTYPE_NAMES: dict[Any, str] = {}

#: Names of the NumPy dtypes that arrays of the ops have (CuPy's arrays carry NumPy dtypes too), by
#: dtype: ``str()`` of a NumPy dtype runs Python code in NumPy, ~3 us a call, several times per op
#: on CuPy arrays. Native byte order only: a dtype that compares equal to one of these has its name
#: (metadata aside, which ``str()`` does not show); any other dtype is named by ``str()``.
_NUMPY_DTYPE_NAMES: dict[np.dtype, str] = {
    dtype: str(dtype) for dtype in map(np.dtype, (
        "float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "bool", "complex64", "complex128", ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn))}


def dtype_name(x: Any) -> str:
    """The dtype of an array as a plain name: ``"bfloat16"``, ``"float8_e4m3fn"``, ``"int32"``."""
    dtype = x.dtype
    torch_dtype = dtype.__class__.__module__ == "torch"
    if torch_dtype:
        name = _TORCH_DTYPE_NAMES.get(dtype)
        if name is not None:
            return name
    elif isinstance(dtype, np.dtype):
        name = _NUMPY_DTYPE_NAMES.get(dtype)
        if name is not None:
            return name
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
        if torch_dtype:
            _TORCH_DTYPE_NAMES[dtype] = name
    return name


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
        return x if device is None or _on_device(x, _torch_device(device)) else x.to(device)
    if kind == "numpy":
        return _numpy_to_torch(x, device)
    if kind == "cupy":
        return _cupy_to_torch(x)
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


def _cupy_to_torch(x: Any):
    """A torch tensor over a CuPy array's memory, in the dtype the array carries
    (:func:`logical_dtype_name` with ``packed_kv``)."""
    import torch

    tensor = _torch_from_dlpack(torch, x)
    name = dtype_name(x)
    carried = CUPY_CARRIERS.get(name)
    if carried is None or (name == "uint8" and x.shape[-1:] == (KV_CACHE_FP8_BYTES,)):
        return tensor
    return tensor.view(getattr(torch, carried))


_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA


def _torch_from_dlpack(torch, x: Any):
    """``torch.from_dlpack(x)``, with the consumer's half of the exchange done here for a CUDA array:
    the same stream is handed to CuPy (torch's current stream on the array's device; 1, DLPack's
    legacy default stream, for torch's default stream 0), so CuPy orders its stream before it
    exactly as it would for ``torch.from_dlpack``, which only adds Python around these calls (device
    objects, a ``torch.cuda.Stream``, retries of ``__dlpack__`` with fewer arguments)."""
    device_type, device = x.__dlpack_device__()
    if device_type != _DLPACK_CUDA or torch.version.hip:  # managed memory, ROCm: torch's own rules
        return torch.from_dlpack(x)
    stream = torch_stream_pointer(device)
    return torch.from_dlpack(x.__dlpack__(stream=stream or 1))


#: torch's reader of the current raw stream, once found (a CUDA op reads it several times a call).
_raw_current_stream = None


def torch_stream_pointer(device: int) -> int:
    """The ``cudaStream_t`` of torch's current stream on CUDA device ``device`` (an index), read
    without making a ``torch.cuda.Stream``."""
    global _raw_current_stream
    raw = _raw_current_stream
    if raw is None:
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is None:
            return torch.cuda.current_stream(device).cuda_stream
        _raw_current_stream = raw
    return raw(device)


class _StreamPointer:
    """A ``cudaStream_t`` offered through the CUDA stream protocol (``cupy.cuda.Stream.from_external``)."""

    __slots__ = ("pointer",)

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return 0, self.pointer


#: CuPy's stream objects for torch's streams, by (device, stream pointer). One is reused for every
#: call on that stream: it is only the pointer (CuPy neither creates nor destroys an external
#: stream, and entering one only pushes it on a per-thread stack), while making one per call cost
#: host time, and CuPy 14 deprecates ``ExternalStream``. A pointer that torch reuses for a new
#: stream names that stream, so its entry stays right.
_CUPY_STREAMS: dict = {}
_CUPY_STREAMS_LIMIT = 64


def cupy_stream(device: int, pointer: int):
    """CuPy's stream object for the CUDA stream ``pointer`` of device ``device`` (torch's, from
    :func:`torch_stream_pointer`), made once: enter it to make it CuPy's current stream, or pass it to
    a kernel launch as ``stream=``."""
    key = (device, pointer)
    stream = _CUPY_STREAMS.get(key)
    if stream is None:
        import cupy

        from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy >= 14
        stream = (from_external(_StreamPointer(pointer)) if from_external is not None
                  else cupy.cuda.ExternalStream(pointer))
        if len(_CUPY_STREAMS) >= _CUPY_STREAMS_LIMIT:
            _CUPY_STREAMS.clear()
        _CUPY_STREAMS[key] = stream
    return stream


def _torch_device(device: Any):
    import torch

    return device if device.__class__ is torch.device else torch.device(device)


#: CUDA devices by index, made once (a ``torch.device`` costs a few hundred nanoseconds to make).
_CUDA_DEVICES: dict[int, Any] = {}
#: Devices (as given: a ``torch.device`` or a string) that need no resolving, as torch devices.
_FIXED_DEVICES: dict[Any, Any] = {}
_FIXED_DEVICES_LIMIT = 64


def resolved_torch_device(device: Any):
    """``device`` as a ``torch.device`` that names its index where ``Tensor.to`` would pick one: an
    index-less ``cuda`` is the current CUDA device once CUDA is initialized (before, it stays as given,
    which no tensor's device equals). A tensor whose ``device`` equals the result is on ``device`` for
    :func:`convert`, which hands it back as it is; for any other, :func:`convert` decides."""
    fixed = _FIXED_DEVICES.get(device)
    if fixed is not None:
        return fixed
    import torch

    given, device = device, _torch_device(device)
    if device.type != "cuda" or device.index is not None:
        if len(_FIXED_DEVICES) >= _FIXED_DEVICES_LIMIT:
            _FIXED_DEVICES.clear()
        _FIXED_DEVICES[given] = device
        return device
    if not torch.cuda.is_initialized():
        return device
    # Initialized: current_device() would only repeat that check before reading the index.
    index = torch._C._cuda_getDevice()
    resolved = _CUDA_DEVICES.get(index)
    if resolved is None:
        resolved = _CUDA_DEVICES[index] = torch.device("cuda", index)
    return resolved


def _on_device(x: Any, device: Any) -> bool:
    """Whether ``x.to(device)`` would hand ``x`` back as it is: an index-less ``cuda`` equals no
    tensor's device, and ``to`` reads it as the current CUDA device."""
    if x.device == device:
        return True
    if device.type == "cuda" and device.index is None and x.is_cuda:
        import torch

        return x.device.index == torch.cuda.current_device()
    return False


# ---------------------------------------------------------------------------- to cupy
#: Torch dtypes a CUDA tensor of which CuPy wraps in place, with the CuPy dtype of the array: the
#: one DLPack gives, or for bf16 / fp8 their carriers (:data:`_CARRIER`). Any other dtype goes
#: through DLPack.
_WRAPPED_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "int64", "int32", "int16",
                         "int8", "uint8", "bool")
_CUPY_DTYPE_OF_TORCH: dict[Any, np.dtype] = {}


def _cupy_dtype_of_torch(torch, dtype) -> np.dtype | None:
    if not _CUPY_DTYPE_OF_TORCH:
        for name in _WRAPPED_TORCH_DTYPES:
            _CUPY_DTYPE_OF_TORCH[getattr(torch, name)] = np.dtype(_CARRIER.get(name, name))
    return _CUPY_DTYPE_OF_TORCH.get(dtype)


def _wrapped_cuda_tensor(cupy, x: Any, stream_device: int | None = None):
    """A CuPy array over the memory of torch CUDA tensor ``x``, without DLPack; ``None`` where DLPack
    must decide (a CPU tensor, a subclass, an unusual dtype or layout, another stream).

    DLPack's exchange is mostly Python (a stream handshake on both sides: most of the host time of a
    decode call), and here it would do nothing: it synchronizes only where CuPy's current stream on
    the tensor's device is not torch's current stream there. This wraps only where the two are the
    same stream (as in dsa_ref.torch's ops, which run CuPy on torch's stream), so nothing needs
    synchronizing either: torch orders the tensor's producers on that stream, and CuPy queues the
    reads and writes of the array behind them on it.

    ``stream_device``: a device on which the caller has just made CuPy's current stream torch's
    current stream (:func:`to_cupy_on_torch_stream`); a tensor there needs no comparison.
    """
    torch = sys.modules["torch"]
    if not x.is_cuda:
        return None
    if x.requires_grad or type(x) is not torch.Tensor:
        x = x.detach()  # a Parameter becomes a plain tensor over the same memory
        if type(x) is not torch.Tensor:
            return None
    dtype = _CUPY_DTYPE_OF_TORCH.get(x.dtype) if _CUPY_DTYPE_OF_TORCH else _cupy_dtype_of_torch(torch, x.dtype)
    if dtype is None or x.layout is not torch.strided or x.is_nested or x.is_neg() or x.is_conj():
        return None
    device = x.get_device()
    if device != stream_device and _cupy_current_stream_pointer(cupy, device) != torch_stream_pointer(device):
        return None
    return _cupy_array_over(cupy, x, dtype, device)


def _cupy_current_stream_pointer(cupy, device: int) -> int:
    """CuPy's current stream on ``device``: ``get_current_stream`` takes a device from CuPy 13 on;
    before, only the current device's stream can be asked for."""
    try:
        return cupy.cuda.get_current_stream(device).ptr
    except TypeError:
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream().ptr


def _cupy_array_over(cupy, x: Any, dtype: np.dtype, device: int):
    """``cupy.ndarray`` over tensor ``x``'s elements: ``data_ptr()`` includes the storage offset, and
    strides become bytes (torch's are never negative). The memory's owner is the tensor, so the
    array keeps it alive."""
    itemsize = dtype.itemsize
    shape = tuple(x.shape)
    if x.is_contiguous():  # also every empty tensor
        strides, nbytes = None, x.numel() * itemsize
    else:
        stride = x.stride()
        strides = tuple(s * itemsize for s in stride)
        nbytes = itemsize * (1 + sum((n - 1) * s for n, s in zip(shape, stride))) if x.numel() else 0
    # The device given, CuPy does not look the pointer up (an empty tensor's may be 0).
    memory = cupy.cuda.UnownedMemory(x.data_ptr(), nbytes, x, device)
    return cupy.ndarray(shape, dtype, memptr=cupy.cuda.MemoryPointer(memory, 0), strides=strides)


def to_cupy_on_torch_stream(x: Any, device: Any, stream_device: int) -> Any:
    """``convert(x, "cupy", device)`` where the caller has made CuPy's current stream on CUDA device
    ``stream_device`` torch's current stream there, and changed neither since (as dsa_ref.torch's ops
    do around a CuPy backend's call): a torch tensor on that device is wrapped with no stream
    comparison (two stream reads a tensor); any other input converts as :func:`convert` does."""
    if x is None:
        return None
    return _to_cupy(x, device, stream_device)


def _to_cupy(x: Any, device: Any, stream_device: int | None = None):
    import cupy

    kind = array_kind(x)
    if kind == "cupy":
        return x
    if kind == "torch":
        wrapped = _wrapped_cuda_tensor(cupy, x, stream_device)
        if wrapped is not None:
            return wrapped
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
    x_kind = array_kind(x)
    if kind == x_kind:
        return x
    if kind in (None, "numpy"):
        return to_numpy(x)
    if kind == "torch":
        return _cupy_to_torch(x) if x_kind == "cupy" else _to_torch(x, like.device)
    return _to_cupy(x, like.device.id)


def module_loaded(name: str) -> bool:
    """Whether a library has been imported already (used to prove ``import dsa_ref`` stays light)."""
    return name in sys.modules
