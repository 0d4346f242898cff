"""torch <-> CuPy without DLPack's per-call cost: a torch CUDA tensor wrapped in place as a CuPy array,
CuPy's results back through DLPack with the stream chosen here, CuPy's stream objects for torch's
streams cached, and the array-kind and dtype-name shortcuts.

CPU part: the shortcuts against the plain checks, the wrapping's pointer, size and strides against a
stand-in CuPy, what falls back to DLPack, the stream cache. GPU part (``@pytest.mark.gpu``): the
wrapped array aliases the tensor and matches DLPack's, byte for byte, for every dtype and for strided,
offset and empty views; work queued behind a slow producer on a side stream reads its result; the
array keeps the tensor alive; the torch ops run without DLPack on their inputs.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import types
import warnings

import numpy as np
import pytest

from dsa_ref import interop

torch = pytest.importorskip("torch")

from dsa_ref.torch import ops as torch_ops  # noqa: E402


# ----------------------------------------------------------------------------- CPU: the shortcuts
def _plain_array_kind(x):
    """array_kind as it was before its exact-type shortcut."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, torch.Tensor):
        return "torch"
    if type(x).__module__.split(".", 1)[0] == "cupy" and type(x).__name__ == "ndarray":
        return "cupy"
    return None


class _CupyLookalike:  # stands in for cupy.ndarray: same module root and class name
    __module__ = "cupy._core.core"


_CupyLookalike.__name__ = "ndarray"


class _TensorSubclass(torch.Tensor):
    pass


class _NumpySubclass(np.ndarray):
    pass


def _arrays_of_every_kind():
    t = torch.zeros(2, 3)
    return [np.zeros(3), np.zeros(3).view(_NumpySubclass), np.float32(1.0), t, t[:, 1], torch.nn.Parameter(t.clone()),
            t.as_subclass(_TensorSubclass), _CupyLookalike(), [1, 2], 3, None, "x", torch.float32]


def test_array_kind_shortcut_equals_the_plain_checks(monkeypatch):
    monkeypatch.setattr(interop, "_EXACT_KINDS", {np.ndarray: "numpy"})
    for _ in range(2):  # the second round takes the shortcut where one was learnt
        for x in _arrays_of_every_kind():
            assert interop.array_kind(x) == _plain_array_kind(x), type(x)
    # Only exact types are learnt: a subclass's answer always comes from the checks.
    assert set(interop._EXACT_KINDS) == {np.ndarray, torch.Tensor}


def test_array_kind_learns_only_the_real_cupy_type(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.ndarray = _CupyLookalike
    monkeypatch.setattr(interop, "_EXACT_KINDS", {np.ndarray: "numpy"})
    assert interop.array_kind(_CupyLookalike()) == "cupy"
    assert _CupyLookalike not in interop._EXACT_KINDS  # no cupy imported: not learnt
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert interop.array_kind(_CupyLookalike()) == "cupy"
    assert interop._EXACT_KINDS[_CupyLookalike] == "cupy"
    assert interop.array_kind(_CupyLookalike()) == "cupy"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.int64,
                                   torch.bool, torch.complex64])
def test_dtype_name_of_torch_dtypes_is_cached_and_unchanged(dtype):
    t = torch.zeros(2, dtype=dtype)
    expected = str(dtype)[len("torch."):]
    assert interop.dtype_name(t) == expected
    assert interop._TORCH_DTYPE_NAMES[dtype] == expected
    assert interop.dtype_name(t) == expected


def test_dtype_name_of_other_arrays_is_not_cached():
    for x in (np.zeros(2, np.float32), np.zeros(2, interop.NUMPY_DTYPES["bfloat16"]),
              types.SimpleNamespace(dtype="int16")):
        assert interop.dtype_name(x) == str(x.dtype)
    assert all(type(key).__module__ == "torch" for key in interop._TORCH_DTYPE_NAMES)


# ----------------------------------------------------------------------------- CPU: the wrapping
def _recording_cupy():
    """The parts of CuPy that the wrapping calls, recording their arguments."""
    cuda = types.SimpleNamespace(
        UnownedMemory=lambda ptr, size, owner, device_id: types.SimpleNamespace(ptr=ptr, size=size, owner=owner,
                                                                               device_id=device_id),
        MemoryPointer=lambda mem, offset: types.SimpleNamespace(mem=mem, offset=offset))
    return types.SimpleNamespace(
        cuda=cuda, ndarray=lambda shape, dtype, memptr=None, strides=None: types.SimpleNamespace(
            shape=shape, dtype=dtype, memptr=memptr, strides=strides))


def _span_bytes(t):
    """Bytes from a tensor's first element to the end of its last (what DLPack's consumer maps)."""
    if t.numel() == 0:
        return 0
    return t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def _views():
    base = torch.arange(6 * 20, dtype=torch.float32).reshape(6, 20)
    return {"contiguous": base, "offset rows": base[2:], "strided": base[1:, 3::4], "transposed": base.t(),
            "one element": base[4:5, 7:8], "expanded": torch.arange(5.0).expand(4, 5), "empty": base[:0],
            "empty strided": base[:, 3:3], "scalar": base[2, 3]}


@pytest.mark.parametrize("name", list(_views()))
def test_the_wrapped_array_covers_the_tensors_elements(name):
    t = _views()[name]
    cupy = _recording_cupy()
    a = interop._cupy_array_over(cupy, t, np.dtype(np.float32), 3)
    memory = a.memptr.mem
    assert memory.ptr == t.data_ptr() and a.memptr.offset == 0  # data_ptr(): the storage offset included
    assert memory.owner is t and memory.device_id == 3
    assert memory.size == _span_bytes(t)
    assert a.shape == tuple(t.shape) and a.dtype == np.float32
    if t.is_contiguous():
        assert a.strides is None
    else:
        assert a.strides == tuple(4 * s for s in t.stride())
    # NumPy's view of the same bytes with those strides reads the tensor's values.
    storage = np.arange(5.0 if name == "expanded" else 6 * 20, dtype=np.float32)
    if t.numel():
        offset = t.data_ptr() - t.untyped_storage().data_ptr()
        strides = a.strides or tuple(4 * s for s in torch.empty(t.shape).stride())
        view = np.lib.stride_tricks.as_strided(storage[offset // 4:], shape=a.shape, strides=strides)
        np.testing.assert_array_equal(view, t.numpy())


def test_carrier_dtypes_are_the_ones_dlpack_gets():
    dtypes = {name: interop._cupy_dtype_of_torch(torch, getattr(torch, name)) for name in interop._WRAPPED_TORCH_DTYPES}
    assert dtypes["bfloat16"] == np.int16 and dtypes["float8_e4m3fn"] == np.uint8
    for name, dtype in dtypes.items():
        assert dtype.itemsize == getattr(torch, name).itemsize
        if name not in ("bfloat16", "float8_e4m3fn"):
            assert dtype == np.dtype(name)
    for other in (torch.complex64, torch.float8_e5m2, torch.uint16, torch.qint8):
        assert interop._cupy_dtype_of_torch(torch, other) is None


class _DlpackCupy(types.ModuleType):
    """A stand-in ``cupy`` whose ``from_dlpack`` records what it is given."""

    def __init__(self):
        super().__init__("cupy")
        self.given = []

    def from_dlpack(self, x):
        self.given.append(x)
        return x


@pytest.mark.parametrize("dtype,carrier", [(torch.float32, torch.float32), (torch.bfloat16, torch.int16),
                                           (torch.float8_e4m3fn, torch.uint8)])
def test_a_cpu_tensor_still_goes_through_dlpack(monkeypatch, dtype, carrier):
    fake = _DlpackCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    t = torch.zeros(3, 4).to(dtype).requires_grad_(dtype is torch.float32)
    interop.convert(t, "cupy")
    (given,) = fake.given
    assert given.dtype == carrier and not given.requires_grad and given.data_ptr() == t.data_ptr()


# ----------------------------------------------------------------------------- CPU: cupy -> torch
class _CupyResult:
    """Stands in for a CuPy result array: hands out a NumPy array's DLPack capsule."""

    __module__ = "cupy._core.core"

    def __init__(self, values: np.ndarray, device_type: int = 2):
        self.values, self.dtype, self.shape = values, values.dtype, values.shape
        self.device_type, self.streams = device_type, []

    def __dlpack_device__(self):
        return self.device_type, 0

    def __dlpack__(self, stream=None, **kwargs):
        self.streams.append(stream)
        return self.values.__dlpack__()


_CupyResult.__name__ = "ndarray"


@pytest.mark.parametrize("torch_stream,handed", [(0, 1), (0x7F00, 0x7F00)])
def test_results_hand_cupy_torchs_current_stream(monkeypatch, torch_stream, handed):
    monkeypatch.setattr(interop, "torch_stream_pointer", lambda device: torch_stream)
    x = _CupyResult(np.arange(6, dtype=np.float32).reshape(2, 3))
    t = interop.convert_like(x, torch.zeros(1))
    assert x.streams == [handed]  # 1: DLPack's legacy default stream, which torch's stream 0 is
    torch.testing.assert_close(t, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_results_keep_their_carried_dtypes(monkeypatch):
    monkeypatch.setattr(interop, "torch_stream_pointer", lambda device: 0)
    bf16 = interop.convert_like(_CupyResult(np.array([0x3F80, -0x4080], np.int16)), torch.zeros(1))
    assert bf16.dtype == torch.bfloat16 and bf16.tolist() == [1.0, -1.0]
    assert interop.convert_like(_CupyResult(np.zeros((2, 3), np.uint8)), torch.zeros(1)).dtype == torch.float8_e4m3fn
    packed = interop.convert_like(_CupyResult(np.zeros((2, 656), np.uint8)), torch.zeros(1))
    assert packed.dtype == torch.uint8  # the packed FP8 cache


def test_managed_memory_results_take_torchs_own_exchange(monkeypatch):
    monkeypatch.setattr(interop, "torch_stream_pointer", lambda device: pytest.fail("stream chosen here"))
    seen = []
    monkeypatch.setattr(torch, "from_dlpack", lambda x: seen.append(x) or torch.zeros(1))
    x = _CupyResult(np.zeros(2, np.float32), device_type=13)  # kDLCUDAManaged
    interop._torch_from_dlpack(torch, x)
    assert seen == [x]


# ----------------------------------------------------------------------------- CPU: the stream cache
def _stream_cupy(from_external: bool, device: int = 0):
    made = []

    class Stream:
        def __init__(self, pointer):
            self.ptr = pointer
            made.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return None

    if from_external:
        Stream.from_external = classmethod(lambda cls, obj: cls(obj.__cuda_stream__()[1]))

    class Device:
        entered = []

        def __init__(self, index):
            self.index = index

        def __enter__(self):
            Device.entered.append(self.index)

        def __exit__(self, *args):
            return None

    def external_stream(pointer):
        warnings.warn("ExternalStream is deprecated", DeprecationWarning)
        return Stream(pointer)

    cuda = types.SimpleNamespace(Stream=Stream, ExternalStream=external_stream, Device=Device,
                                 runtime=types.SimpleNamespace(getDevice=lambda: device))
    return types.SimpleNamespace(cuda=cuda), made


@pytest.mark.parametrize("from_external", [True, False])
def test_one_cupy_stream_per_torch_stream(monkeypatch, from_external):
    monkeypatch.setattr(interop, "_CUPY_STREAMS", {})
    cupy, made = _stream_cupy(from_external)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if from_external else "ignore", DeprecationWarning)
        first = interop.cupy_stream(0, 0x1000)
        assert interop.cupy_stream(0, 0x1000) is first and first.ptr == 0x1000
        other = interop.cupy_stream(0, 0x2000)
        on_device_1 = interop.cupy_stream(1, 0x1000)
    assert len({id(first), id(other), id(on_device_1)}) == 3 and other.ptr == 0x2000
    assert len(made) == 3


def test_the_stream_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(interop, "_CUPY_STREAMS", {})
    cupy, _ = _stream_cupy(True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    for pointer in range(interop._CUPY_STREAMS_LIMIT + 5):
        interop.cupy_stream(0, pointer + 1)
    assert len(interop._CUPY_STREAMS) <= interop._CUPY_STREAMS_LIMIT


class _CudaLike:
    """What _on_torch_stream reads of ``like``: a CUDA tensor on ``device``."""

    is_cuda = True

    def __init__(self, device):
        self.device = device

    def get_device(self):
        return self.device


@pytest.mark.parametrize("current", [0, 1])
def test_on_torch_stream_enters_the_cached_stream(monkeypatch, current):
    monkeypatch.setattr(interop, "_CUPY_STREAMS", {})
    cupy, made = _stream_cupy(True, device=current)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(interop, "torch_stream_pointer", lambda device: 0x5000 + device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    backend = types.SimpleNamespace(array_kind="cupy")
    contexts = [torch_ops._on_torch_stream(backend, _CudaLike(0)) for _ in range(2)]
    assert len(made) == 1 and made[0].ptr == 0x5000
    if current == 0:  # the usual call: the stream object itself
        assert contexts[0] is contexts[1] is made[0]
    for context in contexts:
        with context:
            pass
    assert cupy.cuda.Device.entered == ([] if current == 0 else [0, 0])
    cpu = torch_ops._on_torch_stream(backend, torch.zeros(1))
    with cpu:
        pass
    assert len(made) == 1


# ----------------------------------------------------------------------------- GPU
def _cupy():
    cupy = pytest.importorskip("cupy")
    from dsa_ref_backends.cupy_cuda import CupyBackend

    reasons = CupyBackend().unavailable_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))
    return cupy


def _dlpack_array(cupy, t):
    """The CuPy array DLPack gives for ``t`` (bf16 / fp8 through their carriers), as before the wrapping."""
    name = interop.dtype_name(t)
    carrier = interop._CARRIER.get(name)
    return cupy.from_dlpack(t.view(getattr(torch, carrier)) if carrier else t)


def _wrapped(cupy, t):
    a = interop.convert(t, "cupy")
    assert isinstance(a.data.mem, cupy.cuda.UnownedMemory), "the tensor went through DLPack"
    return a


@pytest.mark.gpu
def test_the_wrapped_array_aliases_the_tensor():
    cupy = _cupy()
    t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    a = _wrapped(cupy, t)
    assert a.data.ptr == t.data_ptr() and a.device.id == t.device.index
    assert interop.array_kind(a) == "cupy" == _plain_array_kind(a)
    a[1, 2] = 100.0
    assert t[1, 2].item() == 100.0
    t[0, 0] = -5.0
    assert float(a[0, 0].get()) == -5.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", interop._WRAPPED_TORCH_DTYPES)
def test_every_dtype_gives_dlpacks_array(name):
    cupy = _cupy()
    t = (torch.randn(5, 7, device="cuda") * 3).to(getattr(torch, name))
    a, b = _wrapped(cupy, t), _dlpack_array(cupy, t)
    assert a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides and a.data.ptr == b.data.ptr
    assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["offset rows", "strided", "transposed", "one element", "expanded", "empty",
                                  "empty strided", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_views_give_dlpacks_elements(name, dtype):
    cupy = _cupy()
    base = torch.arange(6 * 20, dtype=torch.float32, device="cuda").reshape(6, 20).to(dtype)
    views = {"offset rows": base[2:], "strided": base[1:, 3::4], "transposed": base.t(), "one element": base[4:5, 7:8],
             "expanded": base[0, :5].expand(4, 5), "empty": base[:0], "empty strided": base[:, 3:3],
             "scalar": base[2, 3]}
    t = views[name]
    a, b = _wrapped(cupy, t), _dlpack_array(cupy, t)
    assert a.shape == b.shape and a.dtype == b.dtype and a.size == t.numel()
    if t.numel():
        assert a.data.ptr == b.data.ptr == t.data_ptr()
    assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()
    assert cupy.asnumpy(cupy.ascontiguousarray(a)).tobytes() == interop.to_numpy(t.contiguous()).tobytes()


@contextlib.contextmanager
def _slowly_filled_on_a_side_stream():
    """``(side, x)`` inside ``torch.cuda.stream(side)``: ``x`` is written with 3.0 after the side stream
    sleeps, so work on any other stream that does not wait for it reads the zeros before."""
    side = torch.cuda.Stream()
    x = torch.zeros(1 << 20, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.fill_(3.0)
        yield side, x


@pytest.mark.gpu
def test_a_kernel_after_a_slow_producer_on_torchs_stream_reads_its_result():
    """The producer sleeps on a side stream before writing: a kernel on any other stream would read the
    old values. The wrapped array is only used on torch's stream (as dsa_ref.torch's ops use it)."""
    cupy = _cupy()
    backend = types.SimpleNamespace(array_kind="cupy")
    with _slowly_filled_on_a_side_stream() as (side, x):
        with torch_ops._on_torch_stream(backend, x):
            a = _wrapped(cupy, x)
            y = interop.convert_like(a + 1, x)
        side.synchronize()
    assert torch.all(y == 4.0)


@pytest.mark.gpu
def test_another_stream_falls_back_to_dlpacks_handshake():
    """CuPy on its own stream, torch on a side stream: DLPack (not the wrapping) orders them."""
    cupy = _cupy()
    with _slowly_filled_on_a_side_stream() as (side, x):
        a = interop.convert(x, "cupy")
        assert not isinstance(a.data.mem, cupy.cuda.UnownedMemory)
        b = a + 1  # on CuPy's current stream, which DLPack made wait for the side stream
    assert bool((b == 4.0).all())


@pytest.mark.gpu
def test_the_wrapped_array_keeps_the_tensor_alive():
    cupy = _cupy()
    t = torch.full((1 << 22,), 7.0, device="cuda")
    pointer = t.data_ptr()
    a = _wrapped(cupy, t)
    del t
    gc.collect()
    others = [torch.full((1 << 22,), -1.0, device="cuda") for _ in range(4)]  # would reuse a freed block
    assert all(o.data_ptr() != pointer for o in others)
    assert bool((a == 7.0).all())
    del a
    gc.collect()
    assert any(torch.empty(1 << 22, device="cuda").data_ptr() == pointer for _ in range(2))


@pytest.mark.gpu
def test_cupy_streams_are_cached_per_torch_stream_without_deprecation():
    cupy = _cupy()
    interop._CUPY_STREAMS.clear()
    backend = types.SimpleNamespace(array_kind="cupy")
    x = torch.zeros(4, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        first = torch_ops._on_torch_stream(backend, x)
        assert torch_ops._on_torch_stream(backend, x) is first
        assert first.ptr == torch.cuda.current_stream().cuda_stream
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            other = torch_ops._on_torch_stream(backend, x)
            with other:
                assert cupy.cuda.get_current_stream().ptr == side.cuda_stream
    assert other is not first and other.ptr == side.cuda_stream


@pytest.mark.gpu
def test_the_torch_ops_wrap_their_inputs_without_dlpack(monkeypatch):
    """An FP8 decode call of dsa_ref.torch on the cupy backend: no input goes through DLPack, and the
    result equals the public API's on NumPy copies of the inputs."""
    cupy = _cupy()
    import dsa_ref
    import dsa_ref.torch as dt
    from dsa_ref_backends.bench import make_indices, random_fp8_cache

    torch.manual_seed(0)
    cache = random_fp8_cache(torch, 4096, "cuda")
    q = torch.randn(2, 128, 576, device="cuda", dtype=torch.bfloat16)
    slots = make_indices(torch, 2, 4096, 2048, "uniform", "cuda")
    expected = dsa_ref.sparse_mla(*(interop.to_numpy(x) for x in (q, cache, slots)), backend="cupy")

    def refuse(x):
        raise AssertionError("an input went through DLPack")

    monkeypatch.setattr(cupy, "from_dlpack", refuse)
    with torch.no_grad():
        for _ in range(2):  # the second call: the accepted signature's shortcut
            out, lse = dt.sparse_mla(q, cache, slots, backend="cupy")
            np.testing.assert_array_equal(out.cpu().numpy(), expected[0])
            np.testing.assert_array_equal(lse.cpu().numpy(), expected[1])


def _decode_inputs(*, batch: int = 2, context: int = 4096, h: int = 128, topk: int = 2048):
    from dsa_ref_backends.bench import make_indices, random_fp8_cache

    torch.manual_seed(0)
    cache = random_fp8_cache(torch, batch * context, "cuda")
    q = torch.randn(batch * 2, h, 576, device="cuda", dtype=torch.bfloat16)
    slots = make_indices(torch, batch * 2, batch * context, topk, "uniform", "cuda")
    topk_length = torch.randint(0, topk + 1, (batch * 2,), device="cuda", dtype=torch.int32)
    attn_sink = torch.randn(h, device="cuda")
    return q, cache, slots, topk_length, attn_sink


def _public(q, cache, slots, topk_length=None, attn_sink=None):
    import dsa_ref

    numpy = [None if x is None else interop.to_numpy(x) for x in (q, cache, slots, topk_length, attn_sink)]
    return dsa_ref.sparse_mla(numpy[0], numpy[1], numpy[2], topk_length=numpy[3], attn_sink=numpy[4], backend="cupy")


def _no_cupy_arrays(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CuPy array was made on the decode path")

    monkeypatch.setattr(interop, "_to_cupy", refuse)
    monkeypatch.setattr(interop, "_cupy_to_torch", refuse)


@pytest.mark.gpu
@pytest.mark.parametrize("options", ["plain", "topk_length and sink", "bf16 rows"])
def test_the_decode_call_launches_on_the_tensors_with_no_cupy_array(monkeypatch, options):
    """dsa_ref.torch.sparse_mla on the cupy backend (CupyBackend.sparse_mla_torch): no input or output
    becomes a CuPy array, the kernel runs on torch's stream, and out / lse equal the public API's bit for bit."""
    _cupy()
    import dsa_ref.torch as dt

    q, cache, slots, topk_length, attn_sink = _decode_inputs()
    if options == "bf16 rows":
        cache = torch.randn(cache.shape[0], 576, device="cuda").to(torch.bfloat16)
    if options != "topk_length and sink":
        topk_length = attn_sink = None
    expected = _public(q, cache, slots, topk_length, attn_sink)
    _no_cupy_arrays(monkeypatch)
    with torch.no_grad():
        for _ in range(2):  # the second call: the accepted signature's and the launch's caches
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out, lse = dt.sparse_mla(q, cache, slots, topk_length=topk_length, attn_sink=attn_sink, backend="cupy")
            side.synchronize()
            np.testing.assert_array_equal(out.cpu().numpy(), expected[0])
            np.testing.assert_array_equal(lse.cpu().numpy(), expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["strided q", "cache off a 16-byte boundary", "int64 indices", "poisoned outputs",
                                  "float32 q"])
def test_inputs_the_kernels_cannot_read_as_they_are_take_the_general_path(monkeypatch, case):
    _cupy()
    import dsa_ref.torch as dt
    from dsa_ref import registry

    q, cache, slots, _, _ = _decode_inputs(batch=1, context=3000, h=64, topk=512)
    if case == "strided q":
        q = torch.randn(576, q.shape[1], q.shape[0], device="cuda").to(torch.bfloat16).permute(2, 1, 0)
    elif case == "cache off a 16-byte boundary":
        buffer = torch.zeros(cache.numel() + 8, dtype=torch.uint8, device="cuda")
        buffer[8:] = cache.reshape(-1)
        cache = buffer[8:].view(cache.shape)
    elif case == "int64 indices":
        slots = slots.to(torch.int64)
    elif case == "poisoned outputs":
        monkeypatch.setenv("DSA_REF_POISON_OUTPUTS", "1")
    elif case == "float32 q":
        q = q.float()
    backend = registry.get_backend("cupy")
    assert backend.sparse_mla_torch(q, cache, slots, None, None, 576**-0.5, 512) is None
    expected = _public(q, cache, slots)
    with torch.no_grad():
        out, lse = dt.sparse_mla(q, cache, slots, backend="cupy")
    np.testing.assert_array_equal(out.cpu().numpy(), expected[0])
    np.testing.assert_array_equal(lse.cpu().numpy(), expected[1])


@pytest.mark.gpu
def test_the_decode_call_replays_in_a_cuda_graph(monkeypatch):
    """Captured on a side stream (its outputs from the graph's pool) and replayed on new inputs written in
    place: equal to eager calls on them."""
    _cupy()
    import dsa_ref
    import dsa_ref.torch as dt

    q, cache, slots, topk_length, attn_sink = _decode_inputs()
    _no_cupy_arrays(monkeypatch)
    with torch.no_grad(), dsa_ref.use_data_checks(False):
        def step():
            return dt.sparse_mla(q, cache, slots, topk_length=topk_length, attn_sink=attn_sink, backend="cupy")

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        q.copy_(torch.randn_like(q))
        slots.copy_(slots.flip(1))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_a_tensor_on_another_device():
    cupy = _cupy()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import dsa_ref.torch as dt

    t = torch.arange(10, dtype=torch.float32, device="cuda:1")
    assert torch.cuda.current_device() == 0
    a = interop.convert(t, "cupy")
    assert a.device.id == 1 and a.data.ptr == t.data_ptr()
    with cupy.cuda.Device(1):
        assert cupy.asnumpy(a).tolist() == list(range(10))
    q = torch.randn(3, 2, 8, device="cuda:1")
    kv = torch.randn(7, 8, device="cuda:1")
    indices = torch.tensor([[0, 1], [3, -1], [6, 0]], dtype=torch.int32, device="cuda:1")
    with torch.no_grad():
        out, lse = dt.sparse_mla(q, kv, indices, d_v=4, backend="cupy")
        ref_out, ref_lse = dt.sparse_mla(q.cpu().double(), kv.cpu().double(), indices.cpu(), d_v=4, backend="numpy")
    assert out.device == q.device
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("takes_a_device", [True, False])
def test_cupys_current_stream_is_read_on_the_tensors_device_on_every_cupy(takes_a_device):
    """CuPy 13+ takes the device; CuPy 12's get_current_stream takes none (the device is made current)."""
    entered = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    def get_current_stream(*device):
        if device and not takes_a_device:
            raise TypeError("get_current_stream() takes no arguments (1 given)")
        return types.SimpleNamespace(ptr=1000 + (device[0] if device else entered[-1]))

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=get_current_stream, Device=Device))
    assert interop._cupy_current_stream_pointer(fake, 3) == 1003
    assert entered == ([] if takes_a_device else [3])
