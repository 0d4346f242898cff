"""The custom ops behind :mod:`dsa_ref.torch`, each with its fake function and its backward.

Every op follows one pattern (PyTorch's custom-op tutorial): ``torch.library.custom_op`` runs the
active backend's kernel; ``register_fake`` gives the output shapes to ``torch.compile`` and to
meta tensors; ``register_autograd`` saves what the backward needs (the forward's ``out`` and
``lse``, as FlashAttention does) and calls the backward op, itself a custom op. The math lives in
the reference and the kernels; this file only moves tensors.

Arguments are checked inside the ops, by the same functions as the public NumPy-facing API, with
data checks off: shapes and dtypes are checked (also while tracing, on fake tensors), and key
ranges and ``topk_length`` are clamped on the device instead of being read.
"""

# No ``from __future__ import annotations``: custom_op reads the type hints to build the schemas.

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import interop, modes, registry
from ..backend import Backend
from .. import ops as checked

_NAMESPACE = "dsa_ref"


# ---------------------------------------------------------------------------- plumbing
def _result_dtype(x: Tensor) -> torch.dtype:
    """The dtype of float results: float32, or float64 for float64 inputs (which only the NumPy
    reference takes, and keeps in float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch._dynamo.assume_constant_result
def _active_backend() -> str:
    # Resolved when a call is traced, like any other Python constant of the step.
    return registry.active_backend_name()


def _backend_name(backend) -> str:
    if backend is None:
        return _active_backend()
    if isinstance(backend, str):
        return backend
    raise TypeError(f"backend must be a backend name (str) or None in dsa_ref.torch, got {type(backend).__name__}")


#: Signatures (op, backend, every input's shape, dtype, device and strides, the scalars) of calls whose
#: checks and backend support passed: a repeated call (every decode step) skips them. Nothing in
#: them reads data (the torch ops run with data checks off), so the signature decides them.
_ACCEPTED: set = set()
_ACCEPTED_LIMIT = 4096


def _signature(op: str, backend, inputs: dict) -> tuple:
    """One flat tuple: a tensor gives its shape (a ``torch.Size``), dtype, device and strides, any
    other input its name and value. The inputs of one op come in one order, so two signatures of it
    part at the first input that differs (a ``torch.Size`` never equals a name)."""
    key = [op, backend]
    append = key.append
    for name, value in inputs.items():
        if value.__class__ is Tensor or isinstance(value, Tensor):
            append(value.shape)
            append(value.dtype)
            append(value.device)
            append(value.stride())
        else:
            append(name)
            append(value)
    return tuple(key)


def _tensor_signature(x: Optional[Tensor]):
    return None if x is None else (x.shape, x.dtype, x.device, x.stride())


def _sparse_mla_details(q, kv, indices, topk_length, attn_sink, sm_scale, d_v) -> tuple:
    """What :func:`_signature` holds of a sparse MLA forward's inputs, written out (the op of every
    decode step); ``q``, ``kv`` and ``indices`` are tensors (the op's schema, or the eager path's test)."""
    return ("sparse_mla", q.shape, q.dtype, q.device, q.stride(), kv.shape, kv.dtype, kv.device, kv.stride(),
            indices.shape, indices.dtype, indices.device, indices.stride(), _tensor_signature(topk_length),
            _tensor_signature(attn_sink), sm_scale, d_v)


def _accepted(op: str, backend_name: str, inputs: dict, check, details: Optional[tuple] = None):
    """``(backend, seen)``: ``seen`` when a call of this signature passed before (the backend could
    run then, and a device does not go away); else the backend is looked up with its availability
    check, ``check()`` runs (it raises on bad input) and the signature is remembered. ``details``:
    the inputs' part of the signature where the op writes it out (it starts with the op's name, so
    it never equals another op's), else :func:`_signature` of ``inputs``."""
    backend = registry._load(backend_name)
    signature = _signature(op, backend, inputs) if details is None else (backend, details)
    if signature in _ACCEPTED:
        return backend, True
    backend = registry.get_backend(backend_name)
    check()
    if len(_ACCEPTED) >= _ACCEPTED_LIMIT:
        _ACCEPTED.clear()
    _ACCEPTED.add(signature)
    return backend, False


def _eager(*tensors: Optional[Tensor]) -> bool:
    """A plain eager call that records no gradient: no tracing, no tensor subclass (fake, functional),
    no dispatch or function mode. Such a call can run the op's implementation directly, without
    ``torch.library``'s dispatch (a large part of the host time of a decode step)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


def _run(backend_name, op: str, like: Tensor, *, checked_signature: bool = False, **inputs):
    """Run ``op`` on the backend (a name, or the backend :func:`_accepted` returned) with ``inputs``
    (torch tensors), results as torch tensors beside ``like``. ``checked_signature``: a call of the
    same signature passed the backend's support check already."""
    backend = backend_name if isinstance(backend_name, Backend) else registry.get_backend(backend_name)
    return _run_inputs(backend, op, like, inputs, checked_signature)


def _run_inputs(backend: Backend, op: str, like: Tensor, inputs: dict, checked_signature: bool):
    """:func:`_run` with the backend object and the inputs' dict as they are (not copied)."""
    reasons = [] if checked_signature else backend.not_supported_reasons(op, **inputs)
    if reasons:
        raise registry.UnsupportedInputError(f"backend {backend.name!r} does not support these {op} inputs: "
                                             + "; ".join(reasons))
    if backend.array_kind == "cupy" and like.is_cuda:
        # The conversions too run on torch's stream: a CUDA tensor then becomes a CuPy array over its
        # memory with no stream to synchronize with (which a CUDA graph capture would refuse), and the
        # results go back through DLPack with none either: inside the block, where CuPy's current stream
        # is torch's (outside it, CuPy would record an event on its own stream for torch's to wait on,
        # which a CUDA graph capture refuses: cudaErrorStreamCaptureIsolation).
        with _on_torch_stream(backend, like):
            return _results_like(getattr(backend, op)(**_native_inputs(backend, inputs, like.get_device())), like)
    return _results_like(getattr(backend, op)(**_native_inputs(backend, inputs)), like)


def _results_like(result, like: Tensor):
    """A backend's result, or each of a tuple of them, through :func:`_like`."""
    if isinstance(result, tuple):
        return tuple([_like(part, like) for part in result])
    return _like(result, like)


_BASE_TO_NATIVE = Backend.to_native


def _native_inputs(backend, inputs: dict, stream_device: Optional[int] = None) -> dict:
    """``inputs`` with each tensor through ``backend.to_native``; for the base class's ``to_native``
    (``interop.convert(x, array_kind, device())``) the device is looked up once for all of them, a
    plain tensor already there is kept as it is, and ``stream_device`` is a CUDA device on which
    CuPy's current stream was made torch's (:func:`_on_torch_stream`; see
    :func:`interop.to_cupy_on_torch_stream`)."""
    to_native = backend.to_native
    if getattr(to_native, "__func__", None) is not _BASE_TO_NATIVE:
        return {key: to_native(value) if isinstance(value, Tensor) else value for key, value in inputs.items()}
    kind, device = backend.array_kind, backend.device()
    native = {}
    if kind == "torch" and device is not None:
        target = interop.resolved_torch_device(device)
        for key, value in inputs.items():
            if value.__class__ is Tensor and value.device == target:
                native[key] = value
            else:
                native[key] = interop.convert(value, kind, device) if isinstance(value, Tensor) else value
        return native
    if kind == "cupy" and stream_device is not None:
        for key, value in inputs.items():
            native[key] = (interop.to_cupy_on_torch_stream(value, device, stream_device)
                           if isinstance(value, Tensor) else value)
        return native
    return {key: interop.convert(value, kind, device) if isinstance(value, Tensor) else value
            for key, value in inputs.items()}


def _like(x, like: Tensor):
    """``interop.convert_like(x, like)``; a plain tensor on ``like``'s device beside a plain tensor is
    already that (one on another device, from inputs moved to the backend's, goes back)."""
    if x.__class__ is Tensor and like.__class__ is Tensor and x.device == like.device:
        return x
    return interop.convert_like(x, like)


def _on_torch_stream(backend, like: Tensor):
    """A context manager: CuPy kernels on torch's current stream on ``like``'s device (made CuPy's
    current device too), ordered with the torch work around them. Inside a CUDA graph capture that
    is the capturing stream, and CuPy's memory comes from torch's caching allocator, which gives the
    graph's pool (CuPy's own pool would call cudaMalloc, which a capture forbids); outside, CuPy's
    pool is cheaper per call. The usual call (the current device, no capture) enters only the
    cached CuPy stream (a generator-based context manager around it adds about a microsecond per call)."""
    if backend.array_kind != "cupy" or not like.is_cuda:
        return contextlib.nullcontext()
    import cupy

    device = like.get_device()
    stream = interop.cupy_stream(device, interop.torch_stream_pointer(device))
    if device != cupy.cuda.runtime.getDevice():
        return _on_device(cupy, device, stream)
    if torch.cuda.is_current_stream_capturing():
        return _capturing(cupy, stream)
    return stream


@contextlib.contextmanager
def _on_device(cupy, device: int, stream):
    # The stream is made current on the device it belongs to, and the kernels run there; the
    # capture check reads that device's current stream.
    with cupy.cuda.Device(device):
        with _capturing(cupy, stream) if torch.cuda.is_current_stream_capturing() else stream:
            yield


@contextlib.contextmanager
def _capturing(cupy, stream):
    with stream, cupy.cuda.using_allocator(_torch_allocation):
        yield


class _TorchBlock:
    """A block of torch's caching allocator lent to a CuPy array; given back when the array goes."""

    __slots__ = ("pointer",)

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __del__(self):
        torch.cuda.caching_allocator_delete(self.pointer)


def _torch_allocation(size: int):
    """A CuPy allocator (``cupy.cuda.using_allocator``) drawing from torch's caching allocator on the
    current device and torch's current stream."""
    import cupy

    device = cupy.cuda.Device().id
    pointer = torch.cuda.caching_allocator_alloc(max(size, 1), device, torch.cuda.current_stream(device))
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(pointer, size, _TorchBlock(pointer), device), 0)


def _fresh(t: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """A custom op's output may not alias an input (a backend could hand one back): copy if it does."""
    if not t.numel():
        return t
    memory = t.untyped_storage().data_ptr()
    for x in inputs:
        if x is not None and x.untyped_storage().data_ptr() == memory:
            return t.clone()
    return t


def _fresh_pair(out: Tensor, lse: Tensor, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
    """``(_fresh(out, q, kv), _fresh(lse, q, kv))``, each input's memory read once."""
    inputs = (q.untyped_storage().data_ptr(), kv.untyped_storage().data_ptr())
    if out.numel() and out.untyped_storage().data_ptr() in inputs:
        out = out.clone()
    if lse.numel() and lse.untyped_storage().data_ptr() in inputs:
        lse = lse.clone()
    return out, lse


def _sparse_mla_checks(q, kv, indices, topk_length, attn_sink, sm_scale, d_v):
    with modes.use_data_checks(False):
        return checked._check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)


def _key_ranges(key_start: Optional[Tensor], key_end: Optional[Tensor], s_q: int, s_kv: int, like: Tensor):
    if key_start is None:
        key_start = torch.zeros(s_q, dtype=torch.int32, device=like.device)
    if key_end is None:
        key_end = torch.full((s_q,), s_kv, dtype=torch.int32, device=like.device)
    return key_start, key_end


# ---------------------------------------------------------------------------- sparse MLA
def _sparse_mla_forward(q, kv, indices, topk_length, attn_sink, sm_scale: float, d_v: int, backend_name: str):
    backend = registry._load(backend_name)
    signature = (backend, _sparse_mla_details(q, kv, indices, topk_length, attn_sink, sm_scale, d_v))
    seen = signature in _ACCEPTED
    if not seen:
        inputs = dict(q=q, kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                      attn_sink=attn_sink)
        backend, _ = _accepted("sparse_mla", backend_name, inputs, lambda: (
            _sparse_mla_checks(q, kv, indices, topk_length, attn_sink, sm_scale, d_v),
            _run_checks(backend_name, "sparse_mla", inputs)), signature[1])
    if topk_length is not None:
        topk_length = topk_length.clip(0, indices.shape[1])  # on the device, never read
    # A backend may take torch tensors as they are (Backend.sparse_mla_torch): no conversion either way.
    launch = backend.sparse_mla_torch
    if launch is not None:
        result = launch(q, kv, indices, topk_length, attn_sink, sm_scale, d_v)
        if result is not None:
            return _fresh_pair(result[0], result[1], q, kv)
    # The general path's inputs, built only here: a decode call that the backend's hook took needs none.
    inputs = dict(q=q, kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                  attn_sink=attn_sink)
    out, lse = _run_inputs(backend, "sparse_mla", q, inputs, seen)
    return _fresh_pair(out, lse, q, kv)


def _run_checks(backend_name: str, op: str, inputs: dict) -> None:
    backend = registry.get_backend(backend_name)
    reasons = backend.not_supported_reasons(op, **inputs)
    if reasons:
        raise registry.UnsupportedInputError(f"backend {backend.name!r} does not support these {op} inputs: "
                                             + "; ".join(reasons))


@torch.library.custom_op(f"{_NAMESPACE}::sparse_mla", mutates_args=())
def _sparse_mla(q: Tensor, kv: Tensor, indices: Tensor, topk_length: Optional[Tensor], attn_sink: Optional[Tensor],
                sm_scale: float, d_v: int, backend: str) -> tuple[Tensor, Tensor]:
    return _sparse_mla_forward(q, kv, indices, topk_length, attn_sink, sm_scale, d_v, backend)


@_sparse_mla.register_fake
def _(q, kv, indices, topk_length, attn_sink, sm_scale, d_v, backend):
    _sparse_mla_checks(q, kv, indices, topk_length, attn_sink, sm_scale, d_v)
    s_q, h, _ = q.shape
    return q.new_empty((s_q, h, d_v), dtype=_result_dtype(q)), q.new_empty((s_q, h), dtype=_result_dtype(q))


@torch.library.custom_op(f"{_NAMESPACE}::sparse_mla_backward", mutates_args=())
def _sparse_mla_backward(q: Tensor, kv: Tensor, indices: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                         d_lse: Optional[Tensor], topk_length: Optional[Tensor], attn_sink: Optional[Tensor],
                         sm_scale: float, d_v: int, deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    sm_scale, d_v, topk_length = _sparse_mla_checks(q, kv, indices, topk_length, attn_sink, sm_scale, d_v)
    grads = _run(backend, "sparse_mla_backward", q, q=q, kv=kv, indices=indices, out=out, lse=lse, d_out=d_out,
                 sm_scale=sm_scale, d_v=d_v, topk_length=topk_length, attn_sink=attn_sink, d_lse=d_lse,
                 deterministic=deterministic)
    d_sink = grads[2] if attn_sink is not None else q.new_zeros((0,), dtype=_result_dtype(q))
    return grads[0], grads[1], d_sink


@_sparse_mla_backward.register_fake
def _(q, kv, indices, out, lse, d_out, d_lse, topk_length, attn_sink, sm_scale, d_v, deterministic, backend):
    dtype = _result_dtype(q)
    sinks = q.shape[1] if attn_sink is not None else 0
    return q.new_empty(q.shape, dtype=dtype), q.new_empty(kv.shape, dtype=dtype), q.new_empty((sinks,), dtype=dtype)


def _save_sparse_mla(ctx, q, kv, indices, topk_length, attn_sink, out, lse, sm_scale, d_v, backend):
    ctx.save_for_backward(q, kv, indices, topk_length, attn_sink, out, lse)
    ctx.sm_scale, ctx.d_v, ctx.backend = sm_scale, d_v, backend


def _sparse_mla_grads(ctx, d_out, d_lse):
    """dq, dkv, d_sink (None where the input needs none), cast to the inputs' dtypes."""
    q, kv, indices, topk_length, attn_sink, out, lse = ctx.saved_tensors
    dq, dkv, d_sink = _sparse_mla_backward(q, kv, indices, out, lse, d_out.contiguous(), d_lse, topk_length,
                                           attn_sink, ctx.sm_scale, ctx.d_v, modes.deterministic_enabled(),
                                           ctx.backend)
    return (dq.to(q.dtype) if ctx.needs_input_grad[0] else None,
            dkv.to(kv.dtype) if ctx.needs_input_grad[1] else None,
            d_sink.to(attn_sink.dtype) if attn_sink is not None and ctx.needs_input_grad[4] else None)


def _sparse_mla_setup(ctx, inputs, output):
    q, kv, indices, topk_length, attn_sink, sm_scale, d_v, backend = inputs
    _save_sparse_mla(ctx, q, kv, indices, topk_length, attn_sink, *output, sm_scale, d_v, backend)


def _sparse_mla_autograd(ctx, d_out, d_lse):
    dq, dkv, d_sink = _sparse_mla_grads(ctx, d_out, d_lse)
    return dq, dkv, None, None, d_sink, None, None, None


_sparse_mla.register_autograd(_sparse_mla_autograd, setup_context=_sparse_mla_setup)


def sparse_mla(q: Tensor, kv: Tensor, indices: Tensor, *, sm_scale: Optional[float] = None, d_v: int = 512,
               topk_length: Optional[Tensor] = None, attn_sink: Optional[Tensor] = None, backend=None):
    r"""Differentiable sparse MLA (paper eq. 2, MQA mode): :func:`dsa_ref.sparse_mla` for torch tensors.

    Args:
        q: ``[s_q, h, d_qk]``; kv: ``[s_kv, d_qk]`` (or the packed FP8 cache, uint8 ``[s_kv, 656]``,
            which has no backward: refused while a gradient is being recorded); indices: int ``[s_q, topk]``
            (no gradient).
        sm_scale, d_v, topk_length, attn_sink: as for :func:`dsa_ref.sparse_mla`; ``topk_length`` is
            clamped into ``[0, topk]`` on the device.
        backend: a backend name; default the active one.

    Returns:
        ``(out, lse)``, float32 (float64 for float64 inputs), both differentiable: gradients reach ``q``,
        ``kv`` and ``attn_sink`` through the backend's :func:`dsa_ref.sparse_mla_backward`
        (bitwise repeatable under :func:`dsa_ref.use_deterministic` or
        ``torch.use_deterministic_algorithms(True)``).
    """
    if kv.dtype == torch.uint8 and torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        raise TypeError("dsa_ref.torch.sparse_mla: kv is the packed FP8 cache (uint8 [s_kv, 656]), an inference "
                        "format with no backward; call it under torch.no_grad() (decode), or pass the latent rows "
                        "in a float dtype [s_kv, d_qk] to train")
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if _eager(q, kv, indices, topk_length, attn_sink):
        return _sparse_mla_forward(q, kv, indices, topk_length, attn_sink, float(sm_scale), int(d_v),
                                   _backend_name(backend))
    return _sparse_mla(q, kv, indices, topk_length, attn_sink, float(sm_scale), int(d_v), _backend_name(backend))


# ---------------------------------------------------------------------------- the selection
def _indexer_checks(q, weights, k, key_start, key_end, k_scale):
    with modes.use_data_checks(False):
        return checked._check_indexer_inputs(q, weights, k, key_start, key_end, k_scale)


def _lightning_indexer_forward(q, weights, k, key_start, key_end, k_scale, backend_name: str):
    inputs = dict(q=q, weights=weights, k=k, key_start=key_start, key_end=key_end, k_scale=k_scale)

    def check():
        _indexer_checks(q, weights, k, key_start, key_end, k_scale)
        _run_checks(backend_name, "lightning_indexer", inputs)

    backend, seen = _accepted("lightning_indexer", backend_name, inputs, check)
    # Key ranges clamped on the device, never read (as the checks do with data checks off).
    inputs["key_start"], inputs["key_end"] = checked._checks.clamp_key_ranges(key_start, key_end, k.shape[0])
    return _fresh(_run(backend, "lightning_indexer", q, checked_signature=seen, **inputs), q, k)


@torch.library.custom_op(f"{_NAMESPACE}::lightning_indexer", mutates_args=())
def _lightning_indexer(q: Tensor, weights: Tensor, k: Tensor, key_start: Tensor, key_end: Tensor,
                       k_scale: Optional[Tensor], backend: str) -> Tensor:
    return _lightning_indexer_forward(q, weights, k, key_start, key_end, k_scale, backend)


@_lightning_indexer.register_fake
def _(q, weights, k, key_start, key_end, k_scale, backend):
    _indexer_checks(q, weights, k, key_start, key_end, k_scale)
    return q.new_empty((q.shape[0], k.shape[0]), dtype=_result_dtype(q))


def lightning_indexer(q: Tensor, weights: Tensor, k: Tensor, *, key_start: Optional[Tensor] = None,
                      key_end: Optional[Tensor] = None, k_scale: Optional[Tensor] = None, backend=None) -> Tensor:
    """Index scores (eq. 1), :func:`dsa_ref.lightning_indexer` as a torch op. No gradient: the scores
    only choose the keys; the indexer learns from :func:`indexer_loss`. Default key ranges: every
    key (non-causal)."""
    key_start, key_end = _key_ranges(key_start, key_end, q.shape[0], k.shape[0], q)
    args = (q.detach(), weights.detach(), k.detach(), key_start, key_end, None if k_scale is None else k_scale.detach(),
            _backend_name(backend))
    if _eager(*args[:6]):
        return _lightning_indexer_forward(*args)
    return _lightning_indexer(*args)


def _topk_indices_forward(scores, topk: int, backend_name: str):
    inputs = dict(scores=scores, topk=topk)

    def check():
        checked._checks.array("scores", scores, "[s_q, s_kv]", checked._checks.FLOATS)
        checked._checks.positive_int("topk", topk)
        _run_checks(backend_name, "topk_indices", inputs)

    backend, seen = _accepted("topk_indices", backend_name, inputs, check)
    return _run(backend, "topk_indices", scores, checked_signature=seen, **inputs)


@torch.library.custom_op(f"{_NAMESPACE}::topk_indices", mutates_args=())
def _topk_indices(scores: Tensor, topk: int, backend: str) -> Tensor:
    return _topk_indices_forward(scores, topk, backend)


@_topk_indices.register_fake
def _(scores, topk, backend):
    return scores.new_empty((scores.shape[0], topk), dtype=torch.int32)


def topk_indices(scores: Tensor, topk: int, *, backend=None) -> Tensor:
    """The ``topk`` best keys of each row, int32 ``[s_q, topk]`` (``-1`` padding); see :func:`dsa_ref.topk_indices`."""
    if _eager(scores):
        return _topk_indices_forward(scores.detach(), int(topk), _backend_name(backend))
    return _topk_indices(scores.detach(), int(topk), _backend_name(backend))


def _lightning_indexer_paged_forward(q, weights, k_cache, block_table, context_lens, next_n: int,
                                     max_context_len: int, backend_name: str):
    inputs = dict(q=q, weights=weights, k_cache=k_cache, block_table=block_table, context_lens=context_lens,
                  next_n=next_n, max_context_len=max_context_len)

    def check():
        with modes.use_data_checks(False):
            checked._check_paged_indexer_inputs(q, weights, k_cache, block_table, context_lens, next_n,
                                                max_context_len)
        _run_checks(backend_name, "lightning_indexer_paged", inputs)

    backend, seen = _accepted("lightning_indexer_paged", backend_name, inputs, check)
    # Context lengths clamped on the device, never read (as the checks do with data checks off).
    capacity = block_table.shape[1] * (k_cache.shape[1] // (q.shape[-1] + 4))
    inputs["context_lens"] = context_lens.clamp(next_n, max(next_n, min(capacity, max_context_len)))
    return _fresh(_run(backend, "lightning_indexer_paged", q, checked_signature=seen, **inputs), q)


@torch.library.custom_op(f"{_NAMESPACE}::lightning_indexer_paged", mutates_args=())
def _lightning_indexer_paged(q: Tensor, weights: Tensor, k_cache: Tensor, block_table: Tensor,
                             context_lens: Tensor, next_n: int, max_context_len: int, backend: str) -> Tensor:
    return _lightning_indexer_paged_forward(q, weights, k_cache, block_table, context_lens, next_n,
                                            max_context_len, backend)


@_lightning_indexer_paged.register_fake
def _(q, weights, k_cache, block_table, context_lens, next_n, max_context_len, backend):
    with modes.use_data_checks(False):
        checked._check_paged_indexer_inputs(q, weights, k_cache, block_table, context_lens, next_n, max_context_len)
    return q.new_empty((q.shape[0], max_context_len), dtype=_result_dtype(q))


def lightning_indexer_paged(q: Tensor, weights: Tensor, k_cache: Tensor, block_table: Tensor, context_lens: Tensor,
                            *, next_n: int = 1, max_context_len: Optional[int] = None, backend=None) -> Tensor:
    """Index scores of a decode step over a paged fp8 key cache, :func:`dsa_ref.lightning_indexer_paged`
    as a torch op (no gradient; no host synchronization: ``context_lens`` are clamped on the device
    into ``[next_n, max_blocks * block_size]``, never read)."""
    if max_context_len is None:
        max_context_len = block_table.shape[1] * (k_cache.shape[1] // (q.shape[-1] + 4))
    args = (q.detach(), weights.detach(), k_cache, block_table, context_lens, int(next_n), int(max_context_len),
            _backend_name(backend))
    if _eager(*args[:5]):
        return _lightning_indexer_paged_forward(*args)
    return _lightning_indexer_paged(*args)


# ---------------------------------------------------------------------------- DSA attention
@torch.library.custom_op(f"{_NAMESPACE}::dsa_attention", mutates_args=())
def _dsa_attention(q: Tensor, kv: Tensor, q_index: Tensor, weights: Tensor, k_index: Tensor, key_start: Tensor,
                   key_end: Tensor, k_scale: Optional[Tensor], topk: int, sm_scale: float, d_v: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    key_start, key_end = _indexer_checks(q_index, weights, k_index, key_start, key_end, k_scale)
    out, lse, indices = _run(backend, "dsa_attention", q, q=q, kv=kv, q_index=q_index, weights=weights,
                             k_index=k_index, topk=topk, key_start=key_start, key_end=key_end, k_scale=k_scale,
                             sm_scale=sm_scale, d_v=d_v)
    return _fresh(out, q, kv), _fresh(lse, q, kv), indices.to(torch.int32)


@_dsa_attention.register_fake
def _(q, kv, q_index, weights, k_index, key_start, key_end, k_scale, topk, sm_scale, d_v, backend):
    _indexer_checks(q_index, weights, k_index, key_start, key_end, k_scale)
    s_q, h, _ = q.shape
    dtype = _result_dtype(q)
    return (q.new_empty((s_q, h, d_v), dtype=dtype), q.new_empty((s_q, h), dtype=dtype),
            q.new_empty((s_q, topk), dtype=torch.int32))


def _dsa_attention_setup(ctx, inputs, output):
    q, kv, *_, topk, sm_scale, d_v, backend = inputs
    out, lse, indices = output
    _save_sparse_mla(ctx, q, kv, indices, None, None, out, lse, sm_scale, d_v, backend)
    ctx.mark_non_differentiable(indices)


def _dsa_attention_autograd(ctx, d_out, d_lse, d_indices):
    dq, dkv, _ = _sparse_mla_grads(ctx, d_out, d_lse)
    return (dq, dkv) + (None,) * 10


_dsa_attention.register_autograd(_dsa_attention_autograd, setup_context=_dsa_attention_setup)


def dsa_attention(q: Tensor, kv: Tensor, q_index: Tensor, weights: Tensor, k_index: Tensor, *, topk: int,
                  key_start: Optional[Tensor] = None, key_end: Optional[Tensor] = None,
                  k_scale: Optional[Tensor] = None, sm_scale: Optional[float] = None, d_v: int = 512, backend=None):
    r"""One differentiable DSA step: indexer, top-k, sparse MLA (:func:`dsa_ref.dsa_attention` for torch).

    Gradients reach ``q`` and ``kv`` only: the selected ``indices`` are integers, and the indexer's
    inputs are detached from the main attention, as in the paper (the indexer learns from
    :func:`indexer_loss` with :func:`attention_target`). Default key ranges: every key (non-causal);
    pass :func:`dsa_ref.causal_key_ranges` for a causal model (clamped on the device).

    Returns:
        ``(out, lse, indices)``: differentiable float32 ``[s_q, h, d_v]`` and ``[s_q, h]``, and int32
        ``[s_q, topk]``.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    key_start, key_end = _key_ranges(key_start, key_end, q_index.shape[0], k_index.shape[0], q_index)
    return _dsa_attention(q, kv, q_index.detach(), weights.detach(), k_index.detach(), key_start, key_end,
                          None if k_scale is None else k_scale.detach(), int(topk), float(sm_scale), int(d_v),
                          _backend_name(backend))


# ---------------------------------------------------------------------------- the indexer's training
@torch.library.custom_op(f"{_NAMESPACE}::attention_target", mutates_args=())
def _attention_target(q: Tensor, kv: Tensor, indices: Tensor, lse: Tensor, topk_length: Optional[Tensor],
                      sm_scale: float, backend: str) -> Tensor:
    *_, topk_length = _sparse_mla_checks(q, kv, indices, topk_length, None, sm_scale, 1)
    return _run(backend, "attention_target", q, q=q, kv=kv, indices=indices, lse=lse, sm_scale=sm_scale,
                topk_length=topk_length)


@_attention_target.register_fake
def _(q, kv, indices, lse, topk_length, sm_scale, backend):
    _sparse_mla_checks(q, kv, indices, topk_length, None, sm_scale, 1)
    return q.new_empty(tuple(indices.shape), dtype=_result_dtype(q))


def attention_target(q: Tensor, kv: Tensor, indices: Tensor, lse: Tensor, *, sm_scale: Optional[float] = None,
                     topk_length: Optional[Tensor] = None, backend=None) -> Tensor:
    """The indexer's target ``p`` over the selected slots (eqs. 3-4); see :func:`dsa_ref.attention_target`.

    The result never requires grad: in the paper the target is a constant of the indexer's loss,
    and the main model learns from the language-modelling loss alone.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return _attention_target(q.detach(), kv.detach(), indices, lse.detach(), topk_length, float(sm_scale),
                             _backend_name(backend))


def _indexer_loss_checks(q_index, weights, k_index, target, indices, key_start, key_end, k_scale):
    with modes.use_data_checks(False):
        return checked._check_indexer_loss_inputs(q_index, weights, k_index, target, indices, key_start, key_end,
                                                  k_scale)


@torch.library.custom_op(f"{_NAMESPACE}::indexer_loss", mutates_args=())
def _indexer_loss(q_index: Tensor, weights: Tensor, k_index: Tensor, target: Tensor, indices: Optional[Tensor],
                  key_start: Optional[Tensor], key_end: Optional[Tensor], k_scale: Optional[Tensor],
                  backend: str) -> Tensor:
    key_start, key_end = _indexer_loss_checks(q_index, weights, k_index, target, indices, key_start, key_end,
                                              k_scale)
    return _run(backend, "indexer_loss", q_index, q_index=q_index, weights=weights, k_index=k_index, target=target,
                indices=indices, key_start=key_start, key_end=key_end, k_scale=k_scale)


@_indexer_loss.register_fake
def _(q_index, weights, k_index, target, indices, key_start, key_end, k_scale, backend):
    _indexer_loss_checks(q_index, weights, k_index, target, indices, key_start, key_end, k_scale)
    return q_index.new_empty((q_index.shape[0],), dtype=_result_dtype(q_index))


@torch.library.custom_op(f"{_NAMESPACE}::indexer_loss_backward", mutates_args=())
def _indexer_loss_backward(q_index: Tensor, weights: Tensor, k_index: Tensor, target: Tensor, d_loss: Tensor,
                           indices: Optional[Tensor], key_start: Optional[Tensor], key_end: Optional[Tensor],
                           k_scale: Optional[Tensor], deterministic: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    key_start, key_end = _indexer_loss_checks(q_index, weights, k_index, target, indices, key_start, key_end,
                                              k_scale)
    return _run(backend, "indexer_loss_backward", q_index, q_index=q_index, weights=weights, k_index=k_index,
                target=target, d_loss=d_loss, indices=indices, key_start=key_start, key_end=key_end,
                k_scale=k_scale, deterministic=deterministic)


@_indexer_loss_backward.register_fake
def _(q_index, weights, k_index, target, d_loss, indices, key_start, key_end, k_scale, deterministic, backend):
    dtype = _result_dtype(q_index)
    return (q_index.new_empty(q_index.shape, dtype=dtype), q_index.new_empty(weights.shape, dtype=dtype),
            q_index.new_empty(k_index.shape, dtype=dtype))


def _indexer_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.backend = inputs[8]


def _indexer_loss_autograd(ctx, d_loss):
    q_index, weights, k_index, target, indices, key_start, key_end, k_scale = ctx.saved_tensors
    dq, dw, dk = _indexer_loss_backward(q_index, weights, k_index, target, d_loss.contiguous(), indices, key_start,
                                        key_end, k_scale, modes.deterministic_enabled(), ctx.backend)
    return dq.to(q_index.dtype), dw.to(weights.dtype), dk.to(k_index.dtype), None, None, None, None, None, None


_indexer_loss.register_autograd(_indexer_loss_autograd, setup_context=_indexer_loss_setup)


def indexer_loss(q_index: Tensor, weights: Tensor, k_index: Tensor, target: Tensor, *,
                 indices: Optional[Tensor] = None, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None, k_scale: Optional[Tensor] = None, backend=None) -> Tensor:
    r"""Differentiable per-query ``KL(target ‖ softmax(I))`` (eq. 3, or eq. 4 with ``indices``); see
    :func:`dsa_ref.indexer_loss`.

    Gradients reach ``q_index``, ``weights`` and ``k_index`` (through the backend's
    :func:`dsa_ref.indexer_loss_backward`); ``target`` is detached, as the paper's target is a constant.
    Without ``indices`` the default key ranges are every key (non-causal).

    Returns:
        float32 ``[s_q]`` (float64 for float64 inputs): sum or average it into the training loss.
    """
    if indices is None:
        key_start, key_end = _key_ranges(key_start, key_end, q_index.shape[0], k_index.shape[0], q_index)
    return _indexer_loss(q_index, weights, k_index, target.detach(), indices, key_start, key_end,
                         None if k_scale is None else k_scale.detach(), _backend_name(backend))
