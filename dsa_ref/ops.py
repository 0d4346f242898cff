"""The public DSA ops: validate once, pick a backend, convert arrays, run, convert back.

Each op accepts NumPy arrays under any backend, and the chosen backend's own arrays (torch
tensors, cupy arrays) without a host round-trip; results come back in the array library of the
op's first array argument. The precise definition of every op is its reference function in
:mod:`dsa_ref.reference`; the docstrings here repeat the contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks, interop, modes
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
    return _checks.key_ranges(key_start, key_end, s_q, s_kv)


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
    topk_length = _checks.int_range("topk_length", topk_length, 0, indices.shape[1])
    _checks.optional_array("attn_sink", attn_sink, "[h]", _checks.FLOATS)
    _checks.axis("attn_sink", attn_sink, 0, h, "[h]", "q's h")
    return sm_scale, d_v, topk_length


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
    sm_scale, d_v, topk_length = _check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
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
    sm_scale, d_v, _ = _check_sparse_mla_inputs(q, kv, placeholder, sm_scale, d_v, None, None)
    _checks.axis("kv", kv, 0, s_kv, "[s_kv, d_qk]", "k_index's s_kv")
    return _run("dsa_attention", backend, q, dict(q=q, kv=kv, q_index=q_index, weights=weights,
                                                   k_index=k_index, topk=topk, key_start=key_start,
                                                   key_end=key_end, k_scale=k_scale, sm_scale=sm_scale,
                                                   d_v=d_v))


# ---------------------------------------------------------------------------- training ops
def _check_float_like(name: str, x, like_shape: tuple[int, ...], layout: str) -> None:
    """``x`` is a float array of exactly ``like_shape`` (``layout`` names its axes in the message)."""
    _checks.array(name, x, layout, _checks.FLOATS)
    if tuple(x.shape) != tuple(like_shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(like_shape)}, got shape {tuple(x.shape)}")


def _refuse_packed_kv(op: str, kv) -> None:
    if interop.is_array(kv) and interop.dtype_name(kv) == "uint8":
        raise TypeError(f"{op}: kv is the packed FP8 cache (uint8 [s_kv, {KV_CACHE_FP8_BYTES}]), an inference "
                        f"format with no gradient; pass the latent rows in a float dtype [s_kv, d_qk]")


def sparse_mla_backward(q, kv, indices, out, lse, d_out, *, sm_scale=None, d_v: int = 512, topk_length=None,
                        attn_sink=None, d_lse=None, backend=None):
    r"""Gradients of :func:`sparse_mla` with respect to ``q`` and ``kv`` (and ``attn_sink``), dispatched
    to a backend.

    Args:
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink: as given to :func:`sparse_mla` (``kv``
            in a float dtype: the packed FP8 cache has no gradient and is refused).
        out, lse: :func:`sparse_mla`'s results for these inputs (float ``[s_q, h, d_v]``, ``[s_q, h]``).
        d_out: float ``[s_q, h, d_v]``, the gradient of the loss with respect to ``out``.
        d_lse: float ``[s_q, h]``, optional: the gradient with respect to ``lse``.
        backend: backend name or object; default the active one.

    Returns:
        ``(dq, dkv)``: float32 ``[s_q, h, d_qk]`` and ``[s_kv, d_qk]``; with ``attn_sink`` also
        ``d_attn_sink``, float32 ``[h]``. A row of ``kv`` read by several slots accumulates every
        contribution; invalid slots contribute nothing; a query with no valid slot gets ``dq = 0``.
        Under :func:`dsa_ref.use_deterministic` two runs are bitwise equal. See
        :func:`dsa_ref.reference.sparse_mla_backward`.
    """
    _refuse_packed_kv("sparse_mla_backward", kv)
    sm_scale, d_v, topk_length = _check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
    s_q, h, _ = q.shape
    _check_float_like("out", out, (s_q, h, d_v), "[s_q, h, d_v]")
    _check_float_like("lse", lse, (s_q, h), "[s_q, h]")
    _check_float_like("d_out", d_out, (s_q, h, d_v), "[s_q, h, d_v]")
    if d_lse is not None:
        _check_float_like("d_lse", d_lse, (s_q, h), "[s_q, h]")
    return _run("sparse_mla_backward", backend, q,
                dict(q=q, kv=kv, indices=indices, out=out, lse=lse, d_out=d_out, sm_scale=sm_scale, d_v=d_v,
                     topk_length=topk_length, attn_sink=attn_sink, d_lse=d_lse,
                     deterministic=modes.deterministic_enabled()))


def attention_target(q, kv, indices, lse, *, sm_scale=None, topk_length=None, backend=None):
    r"""The indexer's training target (paper eqs. 3-4): the main attention over the selected slots,
    summed over heads and L1-normalized per query, dispatched to a backend.

    Args:
        q, kv, indices, sm_scale, topk_length: as given to :func:`sparse_mla` (``kv`` may be the
            packed FP8 cache).
        lse: float ``[s_q, h]``, :func:`sparse_mla`'s lse for these inputs.
        backend: backend name or object; default the active one.

    Returns:
        float32 ``[s_q, topk]``: rows sum to 1 over their valid slots; 0 at invalid slots; an all-zero
        row where no slot is valid. See :func:`dsa_ref.reference.attention_target`.
    """
    *_, topk_length = _check_sparse_mla_inputs(q, kv, indices, sm_scale, 1, topk_length, None)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else _checks.finite_float("sm_scale", sm_scale)
    _check_float_like("lse", lse, tuple(q.shape[:2]), "[s_q, h]")
    return _run("attention_target", backend, q, dict(q=q, kv=kv, indices=indices, lse=lse, sm_scale=sm_scale,
                                                      topk_length=topk_length))


def _check_indexer_loss_inputs(q_index, weights, k_index, target, indices, key_start, key_end, k_scale):
    """Validated inputs of the indexer loss: either the sparse stage (``indices``) or the dense one."""
    if indices is not None:
        if key_start is not None or key_end is not None:
            raise ValueError("key_start/key_end set the dense stage's softmax; with indices (the sparse stage) "
                             "the softmax runs over the selected slots: pass indices or key ranges, not both")
        _check_indexer_inputs(q_index, weights, k_index, None, None, k_scale)
        _checks.array("indices", indices, "[s_q, topk]", _checks.INDEX_INTS)
        _checks.axis("indices", indices, 0, q_index.shape[0], "[s_q, topk]", "q_index's s_q")
        _check_float_like("target", target, tuple(indices.shape), "[s_q, topk] (one entry per selected slot)")
        return None, None
    key_start, key_end = _check_indexer_inputs(q_index, weights, k_index, key_start, key_end, k_scale)
    _check_float_like("target", target, (q_index.shape[0], k_index.shape[0]), "[s_q, s_kv]")
    return key_start, key_end


def indexer_loss(q_index, weights, k_index, target, *, indices=None, key_start=None, key_end=None, k_scale=None,
                 backend=None):
    r"""Per-query ``KL(target ‖ softmax(I))`` of the index scores I (paper eq. 3, or eq. 4 with ``indices``),
    dispatched to a backend.

    Args:
        q_index, weights, k_index, k_scale: as for :func:`lightning_indexer`.
        target: non-negative float: ``[s_q, topk]`` with ``indices`` (e.g. :func:`attention_target`),
            else ``[s_q, s_kv]``. It is restricted to the entries the softmax runs over and L1-normalized.
        indices: int ``[s_q, topk]``, optional: the sparse stage. The softmax runs over each query's
            valid selected slots (``0 <= index < s_kv``).
        key_start, key_end: the dense stage's key ranges (default: every key, non-causal; use
            :func:`causal_key_ranges`). Not allowed together with ``indices``.
        backend: backend name or object; default the active one.

    Returns:
        float32 ``[s_q]``; 0 for a query whose target has no mass on its entries.
        See :func:`dsa_ref.reference.indexer_loss`.
    """
    key_start, key_end = _check_indexer_loss_inputs(q_index, weights, k_index, target, indices, key_start, key_end,
                                                    k_scale)
    return _run("indexer_loss", backend, q_index,
                dict(q_index=q_index, weights=weights, k_index=k_index, target=target, indices=indices,
                     key_start=key_start, key_end=key_end, k_scale=k_scale))


def indexer_loss_backward(q_index, weights, k_index, target, d_loss, *, indices=None, key_start=None, key_end=None,
                          k_scale=None, backend=None):
    r"""Gradients of :func:`indexer_loss` with respect to ``q_index``, ``weights`` and ``k_index``
    (the target is a constant), dispatched to a backend.

    Args:
        q_index, weights, k_index, target, indices, key_start, key_end, k_scale: as for
            :func:`indexer_loss`, in float dtypes (fp8 inputs have no gradient and are refused).
        d_loss: float ``[s_q]``, the gradient of the total loss with respect to each query's loss.
        backend: backend name or object; default the active one.

    Returns:
        ``(dq_index [s_q, h_i, d_i], dweights [s_q, h_i], dk_index [s_kv, d_i])``, float32. Under
        :func:`dsa_ref.use_deterministic` two runs are bitwise equal. See
        :func:`dsa_ref.reference.indexer_loss_backward`.
    """
    for name, x in (("q_index", q_index), ("k_index", k_index)):
        if interop.is_array(x) and interop.dtype_name(x) == "float8_e4m3fn":
            raise TypeError(f"indexer_loss_backward: {name} is float8_e4m3fn, a quantized inference format with "
                            f"no gradient; train the indexer on float inputs")
    key_start, key_end = _check_indexer_loss_inputs(q_index, weights, k_index, target, indices, key_start, key_end,
                                                    k_scale)
    _check_float_like("d_loss", d_loss, (q_index.shape[0],), "[s_q]")
    return _run("indexer_loss_backward", backend, q_index,
                dict(q_index=q_index, weights=weights, k_index=k_index, target=target, d_loss=d_loss,
                     indices=indices, key_start=key_start, key_end=key_end, k_scale=k_scale,
                     deterministic=modes.deterministic_enabled()))


# ---------------------------------------------------------------------------- paged decode
def _check_paged_indexer_inputs(q, weights, k_cache, block_table, context_lens, next_n, max_context_len):
    """Validated ``(context_lens, next_n, max_context_len)`` of :func:`lightning_indexer_paged`."""
    next_n = _checks.positive_int("next_n", next_n)
    _checks.array("q", q, "[b * next_n, h_i, d_i]", _checks.FLOATS_AND_FP8)
    rows, h_i, d_i = q.shape
    _checks.array("context_lens", context_lens, "[b]", _checks.INDEX_INTS)
    batch = context_lens.shape[0]
    if rows != batch * next_n:
        raise ValueError(f"q must have shape [b * next_n, h_i, d_i] with b * next_n = {batch} * {next_n} = "
                         f"{batch * next_n} (context_lens' b times next_n), got shape {tuple(q.shape)}")
    _checks.array("weights", weights, "[b * next_n, h_i]", _checks.FLOATS)
    _checks.axis("weights", weights, 0, rows, "[b * next_n, h_i]", "q's b * next_n")
    _checks.axis("weights", weights, 1, h_i, "[b * next_n, h_i]", "q's h_i")
    _checks.array("block_table", block_table, "[b, max_blocks]", _checks.INDEX_INTS)
    _checks.axis("block_table", block_table, 0, batch, "[b, max_blocks]", "context_lens' b")
    if not interop.is_array(k_cache):
        raise TypeError(f"k_cache must be an array (numpy.ndarray, torch.Tensor or cupy.ndarray) of shape "
                        f"[num_blocks, block_size * (d_i + 4)], got {type(k_cache).__name__}")
    if interop.dtype_name(k_cache) != "uint8":
        raise TypeError(f"k_cache.dtype must be uint8 (the paged fp8 indexer cache's bytes), "
                        f"got {interop.dtype_name(k_cache)}")
    key_bytes = d_i + 4
    if k_cache.ndim != 2 or k_cache.shape[1] == 0 or k_cache.shape[1] % key_bytes:
        raise ValueError(f"k_cache must have shape [num_blocks, block_size * (d_i + 4)] = [num_blocks, "
                         f"block_size * {key_bytes}] (d_i={d_i} from q: per block the keys' e4m3 values, "
                         f"then their float32 scales), got shape {tuple(k_cache.shape)}")
    capacity = block_table.shape[1] * (k_cache.shape[1] // key_bytes)
    max_context_len = capacity if max_context_len is None else _checks.int_at_least("max_context_len",
                                                                                     max_context_len, 0)
    if batch == 0:
        return context_lens, next_n, max_context_len
    if not modes.data_checks_enabled():
        return context_lens.clip(next_n, max(next_n, min(capacity, max_context_len))), next_n, max_context_len
    shortest, longest = int(context_lens.min()), int(context_lens.max())
    if shortest < next_n:
        raise ValueError(f"context_lens must be >= next_n={next_n} (the step's next_n queries are the last "
                         f"positions of each context), got min(context_lens)={shortest}")
    if longest > capacity:
        raise ValueError(f"context_lens must be <= max_blocks * block_size = {capacity} (the positions "
                         f"block_table can address), got max(context_lens)={longest}")
    if longest > max_context_len:
        raise ValueError(f"max_context_len must be >= max(context_lens)={longest} (one column per key "
                         f"position), got {max_context_len}")
    return context_lens, next_n, max_context_len


def lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, *, next_n: int = 1,
                            max_context_len: int | None = None, backend=None):
    r"""Indexer scores of a decode step over a paged fp8 key cache (DeepGEMM's paged layout), dispatched
    to a backend.

    Sequence ``b`` holds ``context_lens[b]`` tokens (this step's included); its ``next_n`` queries are
    its last positions, so query ``j`` sees keys ``[0, context_lens[b] - next_n + j]`` (causal, also
    for ``next_n > 1``). A backend without its own kernel gathers the pages on its device and runs
    its :func:`lightning_indexer`.

    Args:
        q: ``[b * next_n, h_i, d_i]`` float8_e4m3fn or float, sequence-major (DeepGEMM's
            ``[b, next_n, h, d]`` reshaped).
        weights: ``[b * next_n, h_i]`` float.
        k_cache: uint8 ``[num_blocks, block_size * (d_i + 4)]``: per block, the e4m3 values of its
            ``block_size`` keys (key t at bytes ``[t * d_i, (t + 1) * d_i)``), then their float32
            scales (key t at byte ``block_size * d_i + 4 * t``). Built by
            :func:`dsa_ref.reference.pack_indexer_cache_fp8`; see :mod:`dsa_ref.reference.paged`.
        block_table: int32/int64 ``[b, max_blocks]``, the block of each ``block_size`` tokens of a
            sequence. An entry outside ``[0, num_blocks)`` (``-1`` padding past a context) holds no key:
            its positions score ``-inf`` and are never read.
        context_lens: int32/int64 ``[b]``, each in ``[next_n, max_blocks * block_size]``.
        next_n: queries per sequence, ``>= 1`` (``> 1`` with multi-token prediction).
        max_context_len: columns of the result (DeepGEMM's ``max_model_len``), ``>= max(context_lens)``;
            default ``max_blocks * block_size``.
        backend: backend name or object; default the active one.

    Returns:
        float32 ``[b * next_n, max_context_len]``, ``-inf`` past each query's causal bound.
        See :func:`dsa_ref.reference.lightning_indexer_paged`.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or dtype; ``context_lens`` outside
            ``[next_n, max_blocks * block_size]`` or above ``max_context_len`` (values are read only
            with :func:`~dsa_ref.use_data_checks` on; off, they are clamped into that range).
    """
    context_lens, next_n, max_context_len = _check_paged_indexer_inputs(q, weights, k_cache, block_table,
                                                                        context_lens, next_n, max_context_len)
    return _run("lightning_indexer_paged", backend, q,
                dict(q=q, weights=weights, k_cache=k_cache, block_table=block_table, context_lens=context_lens,
                     next_n=next_n, max_context_len=max_context_len))
