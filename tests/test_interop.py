"""Every op accepts NumPy arrays under any backend and returns results in the caller's array type."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import problems

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn", "int32", "uint8"])
def test_numpy_torch_round_trip_keeps_dtype_and_values(dtype):
    x = (np.arange(24).reshape(2, 3, 4) % 7).astype(interop.NUMPY_DTYPES[dtype])
    t = interop.convert(x, "torch")
    assert interop.dtype_name(t) == dtype and tuple(t.shape) == x.shape
    back = interop.to_numpy(t)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))


def test_non_contiguous_numpy_reaches_torch_with_its_values():
    x = np.arange(40, dtype=np.float32).reshape(4, 10)[:, ::3]
    np.testing.assert_array_equal(interop.convert(x, "torch").numpy(), x)
    reversed_rows = np.arange(12, dtype=np.float32).reshape(3, 4)[::-1]
    np.testing.assert_array_equal(interop.convert(reversed_rows, "torch").numpy(), reversed_rows)


def test_torch_inputs_on_the_numpy_backend_give_torch_outputs():
    p = problems.sparse_mla_problem(np.random.default_rng(0), s_q=3, s_kv=9, h=2, d_qk=16, d_v=8, topk=4,
                                    dtype="bfloat16").inputs
    q, kv, idx = (interop.convert(p[k], "torch") for k in ("q", "kv", "indices"))
    assert q.dtype == torch.bfloat16
    out, lse = dsa_ref.sparse_mla(q, kv, idx, d_v=8, backend="numpy")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and isinstance(lse, torch.Tensor)
    want_out, want_lse = reference.sparse_mla(p["q"], p["kv"], p["indices"], d_v=8)
    np.testing.assert_array_equal(out.numpy(), want_out)
    np.testing.assert_array_equal(lse.numpy(), want_lse)


def test_torch_errors_name_arguments_too():
    with pytest.raises(TypeError, match="q.dtype must be one of .* got int64"):
        dsa_ref.sparse_mla(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_end must be <= s_kv=5"):
        dsa_ref.lightning_indexer(torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(5, 4),
                                  key_end=torch.tensor([5, 6], dtype=torch.int32))


def test_bfloat16_numpy_is_ml_dtypes():
    assert interop.NUMPY_DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)


def test_cupy_carriers_are_read_as_the_dtypes_they_carry():
    class ndarray:  # stands in for cupy.ndarray: same module root and class name
        __module__ = "cupy._core.core"

        def __init__(self, dtype, shape):
            self.dtype, self.shape = np.dtype(dtype), shape

    assert interop.array_kind(ndarray("int16", (2,))) == "cupy"
    assert interop.logical_dtype_name(ndarray("int16", (2, 3))) == "bfloat16"
    assert interop.logical_dtype_name(ndarray("uint8", (2, 3))) == "float8_e4m3fn"
    assert interop.logical_dtype_name(ndarray("uint8", (2, 656)), packed_kv=True) == "uint8"
    assert interop.logical_dtype_name(ndarray("float32", (2, 3))) == "float32"
    assert interop.logical_dtype_name(np.zeros(3, np.int16)) == "int16"  # only cupy arrays carry


def test_a_torch_tensor_already_on_the_device_is_handed_back_as_it_is():
    torch = pytest.importorskip("torch")
    x = torch.zeros(3)
    assert interop.convert(x, "torch", "cpu") is x
    assert interop.convert(x, "torch", torch.device("cpu")) is x
    moved = interop.convert(x, "torch", "meta")
    assert moved is not x and moved.device.type == "meta"


# ---------------------------------------------------------------------------- per-call shortcuts
@pytest.mark.parametrize("dtype", list(interop._NUMPY_DTYPE_NAMES))
def test_numpy_dtype_names_come_from_the_table_and_equal_str(dtype):
    x = np.zeros(2, dtype)
    assert interop.dtype_name(x) == str(dtype)
    assert interop.dtype_name(x) is interop._NUMPY_DTYPE_NAMES[dtype]  # looked up, not made by str()


class _Holding:
    """An array's stand-in holding any dtype (an array of a subarray dtype takes its base dtype)."""

    def __init__(self, dtype):
        self.dtype = dtype


def test_numpy_dtypes_outside_the_table_are_named_by_str():
    for dtype in (np.dtype(">i2"), np.dtype(">f4"), np.dtype([("a", "i2")]), np.dtype(("i2", (2,))),
                  np.dtype("datetime64[s]"), np.dtype("U3")):
        assert interop.dtype_name(_Holding(dtype)) == str(dtype), dtype
    assert interop.dtype_name(_Holding(np.dtype(np.int16, metadata={"unit": "m"}))) == "int16"
    # A numpy dtype that a torch dtype's key could meet is never compared with it.
    assert interop.dtype_name(torch.zeros(1, dtype=torch.int16)) == "int16"


def test_logical_dtype_names_of_cupy_carriers_after_the_table():
    class ndarray:  # stands in for cupy.ndarray
        __module__ = "cupy._core.core"

        def __init__(self, dtype, shape):
            self.dtype, self.shape = np.dtype(dtype), shape

    for _ in range(2):
        assert interop.logical_dtype_name(ndarray("int16", (2,))) == "bfloat16"
        assert interop.logical_dtype_name(ndarray(">i2", (2,))) == ">i2"  # no carrier: another byte order


def test_resolved_torch_device_names_the_current_cuda_device(monkeypatch):
    assert interop.resolved_torch_device("cpu") == torch.device("cpu")
    assert interop.resolved_torch_device(torch.device("cpu")) is interop.resolved_torch_device(torch.device("cpu"))
    assert interop.resolved_torch_device("meta") == torch.device("meta")
    assert interop.resolved_torch_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert interop.resolved_torch_device("cuda") == torch.device("cuda")  # no index before CUDA starts
    current = [1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)
    assert interop.resolved_torch_device("cuda") == torch.device("cuda", 1)
    current[0] = 0  # read every call: the current device is no part of a cache
    assert interop.resolved_torch_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert interop.resolved_torch_device("cuda") == torch.device("cuda", 0)


def test_the_raw_stream_reader_is_found_once(monkeypatch):
    found = []

    def raw(device):
        return 0x100 + device

    monkeypatch.setattr(interop, "_raw_current_stream", None)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", raw, raising=False)
    assert interop.torch_stream_pointer(2) == 0x102
    assert interop._raw_current_stream is raw
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: found.append(device), raising=False)
    assert interop.torch_stream_pointer(3) == 0x103 and not found


def _cuda_lookalike_tensors(monkeypatch, device: int):
    """CPU tensors that the wrapping reads as CUDA tensors on ``device``."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: device)


def _fake_cupy(monkeypatch):
    import types

    class ndarray:
        __module__ = "cupy._core.core"

        def __init__(self, shape, dtype, memptr=None, strides=None):
            self.shape, self.dtype, self.memptr, self.strides = shape, dtype, memptr, strides

    dlpacked = []
    cuda = types.SimpleNamespace(
        UnownedMemory=lambda ptr, size, owner, device_id: types.SimpleNamespace(ptr=ptr, size=size, owner=owner,
                                                                               device_id=device_id),
        MemoryPointer=lambda mem, offset: types.SimpleNamespace(mem=mem, offset=offset))
    fake = types.ModuleType("cupy")
    fake.cuda, fake.ndarray = cuda, ndarray
    fake.from_dlpack = lambda x: dlpacked.append(x) or x
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    return fake, dlpacked


@pytest.mark.parametrize("stream_device, reads_streams", [(0, False), (1, True), (None, True)])
def test_a_tensor_on_the_callers_stream_device_is_wrapped_without_reading_streams(monkeypatch, stream_device,
                                                                                   reads_streams):
    fake, dlpacked = _fake_cupy(monkeypatch)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    _cuda_lookalike_tensors(monkeypatch, 0)
    reads = []
    monkeypatch.setattr(interop, "_cupy_current_stream_pointer", lambda cupy, device: reads.append(device) or 0x10)
    monkeypatch.setattr(interop, "torch_stream_pointer", lambda device: 0x20)  # streams differ
    if stream_device is None:
        a = interop.convert(t, "cupy")
    else:
        a = interop.to_cupy_on_torch_stream(t, None, stream_device)
    assert reads == ([0] if reads_streams else [])
    if reads_streams:  # another stream: DLPack's handshake orders them
        assert len(dlpacked) == 1 and dlpacked[0].data_ptr() == t.data_ptr()
    else:
        assert not dlpacked and isinstance(a, fake.ndarray) and a.memptr.mem.owner is t
        assert a.memptr.mem.ptr == t.data_ptr() and a.shape == (2, 3) and a.dtype == np.float32
    assert interop.to_cupy_on_torch_stream(None, None, 0) is None
