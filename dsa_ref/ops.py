"""The public DSA ops: validate once, pick a backend, convert arrays, run, convert back.

Each op accepts NumPy arrays under any backend, and the chosen backend's own arrays (torch
tensors, cupy arrays) without a host round-trip; results come back in the array library of the
op's first array argument. The precise definition of every op is its reference function in
:mod:`dsa_ref.reference`; the docstrings here repeat the contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks, interop
from .backend import Backend
from .reference.formats import KV_CACHE_FP8_BYTES, KV_LATENT_DIM, KV_ROPE_DIM
from .registry import UnsupportedInputError, get_backend


#: Ops whose results carry no gradient by nature (integer indices, as ``torch.topk``'s), so a
#: differentiable input loses nothing there.
_OPS_WITHOUT_GRADIENTS = ("topk_indices",)


def _refuse_untracked_gradients(op: str, inputs: dict[str, Any]) -> None:
    """A torch input that requires grad would get a result with no ``grad_fn``, silently: refuse it."""
    if op in _OPS_WITHOUT_GRADIENTS:
        return
    for name, value in inputs.items():
        # array_kind first: no torch import unless a torch tensor was passed.
        if interop.array_kind(value) == "torch" and value.requires_grad:
            import torch

            if torch.is_grad_enabled():
                raise TypeError(
                    f"dsa_ref.{op} does not record gradients, but {name} requires grad (and grad mode is on): "
                    f"use the differentiable ops in dsa_ref.torch (e.g. dsa_ref.torch.sparse_mla), "
                    f"or pass {name}.detach() (or call under torch.no_grad()) if no gradient is needed")


def _supporting_backend(op: str, backend: str | Backend | None, inputs: dict[str, Any]) -> Backend:
    """Refuse untracked gradients, pick the backend and make sure it takes ``inputs``."""
    _refuse_untracked_gradients(op, inputs)
    chosen = get_backend(backend)
    reasons = chosen.not_supported_reasons(op, **inputs)
    if reasons:
        raise UnsupportedInputError(f"backend {chosen.name!r} does not support these {op} inputs: "
                                    + "; ".join(reasons))
    return chosen


def _run(op: str, backend: str | Backend | None, like: Any, inputs: dict[str, Any]):
    """Ask the backend whether it takes ``inputs``, convert them, run ``op``, convert results back."""
    chosen = _supporting_backend(op, backend, inputs)
    native = {key: chosen.to_native(value) if interop.is_array(value) else value
              for key, value in inputs.items()}
    result = getattr(chosen, op)(**native)
    if isinstance(result, tuple):
        return tuple(interop.convert_like(part, like) for part in result)
    return interop.convert_like(result, like)


def _default_key_ranges(key_start, key_end, s_q: int, s_kv: int):
    if key_start is None:
        key_start = np.zeros(s_q, np.int32)
    if key_end is None:
        key_end = np.full(s_q, s_kv, np.int32)
    _checks.key_ranges(key_start, key_end, s_q, s_kv)
    return key_start, key_end


def _check_indexer_inputs(q, weights, k, key_start, key_end, k_scale):
    _checks.array("q", q, "[s_q, h_i, d_i]", _checks.FLOATS_AND_FP8)
    s_q, h_i, d_i = q.shape
    _checks.array("weights", weights, "[s_q, h_i]", _checks.FLOATS)
    _checks.axis("weights", weights, 0, s_q, "[s_q, h_i]", "q's s_q")
    _checks.axis("weights", weights, 1, h_i, "[s_q, h_i]", "q's h_i")
    _checks.array("k", k, "[s_kv, d_i]", _checks.FLOATS_AND_FP8)
    _checks.axis("k", k, 1, d_i, "[s_kv, d_i]", "q's d_i")
    s_kv = k.shape[0]
    _checks.optional_array("k_scale", k_scale, "[s_kv]", _checks.FLOATS)
    _checks.axis("k_scale", k_scale, 0, s_kv, "[s_kv]", "k's s_kv")
    return _default_key_ranges(key_start, key_end, s_q, s_kv)


def lightning_indexer(q, weights, k, *, key_start=None, key_end=None, k_scale=None, backend=None):
    r"""Lightning-indexer scores (paper eq. 1), dispatched to a backend.

    **Not causal by default**: without ``key_start`` / ``key_end`` every query scores every key,
    future ones included. For a causal model pass the ranges of
    :func:`~dsa_ref.causal_key_ranges` (one sequence) or :func:`~dsa_ref.varlen_key_ranges`
    (a packed batch).

    ``scores[i, j] = k_scale[j] · Σ_h weights[i, h] · ReLU(q[i, h] · k[j])`` for
    ``key_start[i] <= j < key_end[i]``, else ``-inf``. ``s_q = 0`` or ``s_kv = 0`` give an
    empty ``[s_q, s_kv]`` result.

    Args:
        q: ``[s_q, h_i, d_i]``, float64/32/16, bfloat16 or float8_e4m3fn.
        weights: ``[s_q, h_i]`` float.
        k: ``[s_kv, d_i]`` float or float8_e4m3fn.
        key_start, key_end: int32/int64 ``[s_q]`` with ``0 <= key_start <= key_end <= s_kv``
            (DeepGEMM's ``ks``/``ke``); default: every key (non-causal).
        k_scale: ``[s_kv]`` per-key scale of fp8 keys, optional.
        backend: backend name or object; default the active one.

    Returns:
        float32 ``[s_q, s_kv]``. See :func:`dsa_ref.reference.lightning_indexer`.

    Raises:
        TypeError: a torch input requires grad while grad mode is on: this op records no
            gradients (use :mod:`dsa_ref.torch`, or ``.detach()``).
    """
    key_start, key_end = _check_indexer_inputs(q, weights, k, key_start, key_end, k_scale)
    return _run("lightning_indexer", backend, q, dict(q=q, weights=weights, k=k, key_start=key_start,
                                                       key_end=key_end, k_scale=k_scale))


def topk_indices(scores, topk: int, *, backend=None):
    """The ``topk`` best keys of each row of ``scores``, dispatched to a backend.

    Args:
        scores: float ``[s_q, s_kv]``; ``-inf`` and NaN are never selected. It may require grad:
            integer indices carry no gradient (as ``torch.topk``'s indices).
        topk: slots per row, ``>= 1`` (may exceed ``s_kv``: the rest is ``-1``).

    Returns:
        int32 ``[s_q, topk]``. The reference orders each row by descending score, ties to the
        lower key; other backends may return the same set in another order. See
        :func:`dsa_ref.reference.topk_indices`.
    """
    _checks.array("scores", scores, "[s_q, s_kv]", _checks.FLOATS)
    topk = _checks.positive_int("topk", topk)
    return _run("topk_indices", backend, scores, dict(scores=scores, topk=topk))


def _check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, topk_length, attn_sink):
    _checks.array("q", q, "[s_q, h, d_qk]", _checks.FLOATS)
    s_q, h, d_qk = q.shape
    _checks.array("kv", kv, "[s_kv, d_qk]", _checks.FLOATS + ("uint8",))
    if interop.dtype_name(kv) == "uint8":
        if kv.shape[1] != KV_CACHE_FP8_BYTES:
            raise ValueError(f"kv of dtype uint8 must be the packed FP8 cache [s_kv, {KV_CACHE_FP8_BYTES}], "
                             f"got shape {tuple(kv.shape)}")
        if d_qk != KV_LATENT_DIM + KV_ROPE_DIM:
            raise ValueError(f"q must have d_qk={KV_LATENT_DIM + KV_ROPE_DIM} to read the packed FP8 cache, "
                             f"got shape {tuple(q.shape)}")
    else:
        _checks.axis("kv", kv, 1, d_qk, "[s_kv, d_qk]", "q's d_qk")
    _checks.array("indices", indices, "[s_q, topk]", _checks.INDEX_INTS)
    _checks.axis("indices", indices, 0, s_q, "[s_q, topk]", "q's s_q")
    d_v = _checks.positive_int("d_v", d_v)
    if d_v > d_qk:
        raise ValueError(f"d_v must be <= d_qk={d_qk} (V is the first d_v columns of kv), got d_v={d_v}")
    sm_scale = d_qk**-0.5 if sm_scale is None else _checks.finite_float("sm_scale", sm_scale)
    _checks.optional_array("topk_length", topk_length, "[s_q]", _checks.INDEX_INTS)
    _checks.axis("topk_length", topk_length, 0, s_q, "[s_q]", "q's s_q")
    _checks.int_range("topk_length", topk_length, 0, indices.shape[1])
    _checks.optional_array("attn_sink", attn_sink, "[h]", _checks.FLOATS)
    _checks.axis("attn_sink", attn_sink, 0, h, "[h]", "q's h")
    return sm_scale, d_v


def sparse_mla(q, kv, indices, *, sm_scale=None, d_v: int = 512, topk_length=None, attn_sink=None,
               backend=None):
    r"""Sparse MLA forward in MQA mode (paper eq. 2), dispatched to a backend.

    Args:
        q: ``[s_q, h, d_qk]`` float queries (W_UK absorbed).
        kv: ``[s_kv, d_qk]`` latent rows (one shared head), or the packed FP8 cache uint8
            ``[s_kv, 656]`` (then ``d_qk`` must be 576).
        indices: int32/int64 ``[s_q, topk]``; values ``< 0`` or ``>= s_kv`` are ignored, never read.
            ``topk = 0`` is allowed and means no slot (FlashMLA's ``topk_length = 0``): every row
            gets the empty-row result below, without launching the backend (its dtype refusals
            still apply).
        sm_scale: default ``d_qk ** -0.5``.
        d_v: V width, ``1 <= d_v <= d_qk`` (default 512).
        topk_length: int ``[s_q]`` in ``[0, topk]``: only the first ``topk_length[i]`` slots count.
        attn_sink: float ``[h]``: ``out *= 1 / (1 + exp(attn_sink - lse))``.
        backend: backend name or object; default the active one.

    Returns:
        ``(out, lse)``: float32 ``[s_q, h, d_v]``, float32 ``[s_q, h]`` (natural log; ``-inf`` and
        ``out = 0`` for a row with no valid slot). See :func:`dsa_ref.reference.sparse_mla`.

    Raises:
        TypeError: a torch input requires grad while grad mode is on: this op records no
            gradients (use :mod:`dsa_ref.torch`, e.g. ``dsa_ref.torch.sparse_mla``, or ``.detach()``).
    """
    sm_scale, d_v = _check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
    inputs = dict(q=q, kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                  attn_sink=attn_sink)
    if indices.shape[1] == 0:
        # Nothing to attend to, and kernels cannot launch with an empty slot axis.
        _supporting_backend("sparse_mla", backend, inputs)
        return _no_slot_attention(q.shape[0], q.shape[1], d_v, like=q)
    return _run("sparse_mla", backend, q, inputs)


def _no_slot_attention(s_q: int, h: int, d_v: int, like: Any):
    """``(out = 0, lse = -inf)``, the result of rows without a valid slot (an attention sink keeps out = 0)."""
    out = np.zeros((s_q, h, d_v), np.float32)  # [s_q, h, d_v]
    lse = np.full((s_q, h), -np.inf, np.float32)  # [s_q, h]
    return interop.from_numpy_like(out, like), interop.from_numpy_like(lse, like)


def dsa_attention(q, kv, q_index, weights, k_index, *, topk: int, key_start=None, key_end=None,
                  k_scale=None, sm_scale=None, d_v: int = 512, backend=None):
    """One DSA attention step: lightning indexer, then top-k, then sparse MLA.

    **Not causal by default**: without ``key_start`` / ``key_end`` every query may select any
    key, future ones included. For a causal model pass the ranges of
    :func:`~dsa_ref.causal_key_ranges` (one sequence) or :func:`~dsa_ref.varlen_key_ranges`
    (a packed batch).

    Args:
        q, kv: the main attention's queries ``[s_q, h, d_qk]`` and latent rows ``[s_kv, d_qk]``
            (or the packed FP8 cache).
        q_index, weights, k_index: the indexer's queries ``[s_q, h_i, d_i]``, head weights
            ``[s_q, h_i]`` and keys ``[s_kv, d_i]``.
        topk: keys each query keeps, ``>= 1``.
        key_start, key_end: int ``[s_q]``, the keys each query may select; default: every key
            (non-causal), as in :func:`lightning_indexer`.
        k_scale: as in :func:`lightning_indexer`.
        sm_scale, d_v: as in :func:`sparse_mla`.
        backend: backend name or object; a backend may run a fused path.

    Returns:
        ``(out, lse, indices)`` as from :func:`sparse_mla` and :func:`topk_indices`.

    Raises:
        TypeError: a torch input requires grad while grad mode is on: this op records no
            gradients (use :mod:`dsa_ref.torch`, or ``.detach()``).
    """
    key_start, key_end = _check_indexer_inputs(q_index, weights, k_index, key_start, key_end, k_scale)
    topk = _checks.positive_int("topk", topk)
    s_q, s_kv = q_index.shape[0], k_index.shape[0]
    _checks.array("q", q, "[s_q, h, d_qk]", _checks.FLOATS)
    _checks.axis("q", q, 0, s_q, "[s_q, h, d_qk]", "q_index's s_q")
    placeholder = np.zeros((s_q, topk), np.int32)  # checks the main-attention inputs with the real shapes
    sm_scale, d_v = _check_sparse_mla_inputs(q, kv, placeholder, sm_scale, d_v, None, None)
    _checks.axis("kv", kv, 0, s_kv, "[s_kv, d_qk]", "k_index's s_kv")
    return _run("dsa_attention", backend, q, dict(q=q, kv=kv, q_index=q_index, weights=weights,
                                                   k_index=k_index, topk=topk, key_start=key_start,
                                                   key_end=key_end, k_scale=k_scale, sm_scale=sm_scale,
                                                   d_v=d_v))
