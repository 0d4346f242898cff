"""Sparse MLA in MQA mode: attention of each query over its selected latent rows (paper eq. 2)."""

from __future__ import annotations

import numpy as np

from ._common import as_float64, query_chunks, result_dtype
from .formats import KV_CACHE_FP8_BYTES, unpack_kv_cache_fp8


def valid_slots(indices, s_kv: int, topk_length=None) -> np.ndarray:
    """Boolean ``[s_q, topk]``: which index slots take part in attention.

    A slot is valid when its index lies in ``[0, s_kv)`` and, with ``topk_length``, when it is
    one of the first ``topk_length[i]`` slots of its row. Invalid slots are never read.
    """
    indices = np.asarray(indices)  # [s_q, topk]
    valid = (indices >= 0) & (indices < s_kv)  # [s_q, topk]
    if topk_length is not None:
        slot = np.arange(indices.shape[1])[None, :]  # [1, topk]
        valid &= slot < np.asarray(topk_length)[:, None]  # [s_q, topk]
    return valid


def sparse_mla(q, kv, indices, *, sm_scale=None, d_v: int = 512, topk_length=None, attn_sink=None):
    r"""Attention of each query over the latent KV rows it selected (DeepSeek-V3.2-Exp, eq. 2).

    MQA mode of MLA: every query head attends to the same latent row per token.

    .. math::

        \ell_{i,h,t} = \mathrm{sm\_scale}\; q_{i,h} \cdot kv_{\mathrm{idx}_{i,t}}, \qquad
        \mathrm{lse}_{i,h} = \log \sum_{t\ \mathrm{valid}} e^{\ell_{i,h,t}}, \qquad
        \mathrm{out}_{i,h} = \sum_{t\ \mathrm{valid}} e^{\ell_{i,h,t} - \mathrm{lse}_{i,h}}\,
                             kv_{\mathrm{idx}_{i,t},\,:d_v}

    Args:
        q: ``[s_q, h, d_qk]`` queries, W_UK already absorbed (d_qk = 512 latent + 64 RoPE = 576).
        kv: ``[s_kv, d_qk]`` latent KV, one row per token shared by all heads; V is ``kv[:, :d_v]``.
            Or the packed FP8 cache, uint8 ``[s_kv, 656]``, which is dequantized first
            (:func:`~dsa_ref.unpack_kv_cache_fp8`).
        indices: int ``[s_q, topk]`` selected rows. An index ``< 0`` or ``>= s_kv`` is invalid:
            it is ignored and never read (FlashMLA's convention). A valid index that appears twice
            counts twice, as two slots of the softmax.
        sm_scale: softmax scale, default ``d_qk ** -0.5``.
        d_v: width of V, default 512.
        topk_length: int ``[s_q]``, optional: only the first ``topk_length[i]`` slots of row i count
            (FlashMLA's ``topk_length``).
        attn_sink: ``[h]``, optional: a per-head logit with no value, which only absorbs
            probability mass: ``out *= 1 / (1 + exp(attn_sink - lse))``; lse is unchanged.

    Returns:
        ``(out, lse)``: float32 ``[s_q, h, d_v]`` and float32 ``[s_q, h]`` (float64 for float64 ``q``),
        lse in natural log.
        A row with no valid slot (``topk = 0`` included: every row is empty) gets ``out = 0``
        and ``lse = -inf``: the log of an empty sum,
        which keeps ``exp(lse)`` equal to the softmax denominator and merges correctly with other
        partial results. FlashMLA reports ``+inf`` there instead (so that ``exp(-lse)`` stays
        finite in its combine kernel); compare against it with that in mind.

    Computed in float64, in chunks of queries so that the gathered ``[chunk, topk, d_qk]`` rows
    stay under :data:`~dsa_ref.reference._common.CHUNK_BYTES`.
    """
    kv = np.asarray(kv)
    if kv.dtype == np.uint8 and kv.shape[-1] == KV_CACHE_FP8_BYTES:
        kv = unpack_kv_cache_fp8(kv)  # [s_kv, 576]
    dtype = result_dtype(q)
    q = as_float64(q)  # [s_q, h, d_qk]
    kv = as_float64(kv)  # [s_kv, d_qk]
    indices = np.asarray(indices)  # [s_q, topk]
    s_q, h, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[1]
    if sm_scale is None:
        sm_scale = d_qk**-0.5

    valid = valid_slots(indices, s_kv, topk_length)  # [s_q, topk]
    # Invalid slots read an all-zero row appended after the last token, never a row of kv:
    # nothing of another token (not even a NaN) can leak in, and the gather needs no branch.
    kv_and_zero_row = np.concatenate([kv, np.zeros((1, d_qk))])  # [s_kv + 1, d_qk]
    rows_to_read = np.where(valid, indices, s_kv)  # [s_q, topk]
    out = np.zeros((s_q, h, d_v), np.float64)  # [s_q, h, d_v]
    lse = np.full((s_q, h), -np.inf, np.float64)  # [s_q, h]

    for rows in query_chunks(s_q, bytes_per_query=8 * topk * (d_qk + 2 * h)):
        chunk_valid = valid[rows]  # [c, topk]
        selected = np.take(kv_and_zero_row, rows_to_read[rows], axis=0)  # [c, topk, d_qk]
        logits = sm_scale * np.matmul(q[rows], selected.transpose(0, 2, 1))  # [c, h, topk]
        logits = np.where(chunk_valid[:, None, :], logits, -np.inf)  # [c, h, topk]
        row_max = logits.max(axis=-1, keepdims=True, initial=-np.inf)  # [c, h, 1]   -inf when topk = 0
        row_max = np.where(np.isneginf(row_max), 0.0, row_max)  # [c, h, 1]   empty rows stay finite
        probs = np.exp(logits - row_max)  # [c, h, topk]   unnormalized, 0 at invalid slots
        denom = probs.sum(axis=-1)  # [c, h]
        weighted = np.matmul(probs, selected[:, :, :d_v])  # [c, h, d_v]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[rows] = np.where(denom[..., None] == 0, 0.0, weighted / denom[..., None])  # [c, h, d_v]   NaN propagates
            lse[rows] = np.log(denom) + row_max[..., 0]  # [c, h]   log(0) = -inf for empty rows

    if attn_sink is not None:
        sink = as_float64(attn_sink)[None, :]  # [1, h]
        with np.errstate(over="ignore"):
            out *= (1.0 / (1.0 + np.exp(sink - lse)))[..., None]  # [s_q, h, d_v]
    return out.astype(dtype), lse.astype(dtype)


def _sink_factor(attn_sink, lse: np.ndarray) -> np.ndarray:
    """``f = 1 / (1 + exp(attn_sink - lse))`` per (query, head): the share of the probability mass the
    sink leaves to the tokens; 1 without a sink, 0 for an empty row (lse = -inf)."""
    if attn_sink is None:
        return np.where(np.isneginf(lse), 0.0, 1.0)  # [s_q, h]
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(as_float64(attn_sink)[None, :] - lse))  # [s_q, h]


def sparse_mla_backward(q, kv, indices, out, lse, d_out, *, sm_scale=None, d_v: int = 512, topk_length=None,
                        attn_sink=None, d_lse=None):
    r"""Gradients of :func:`sparse_mla` with respect to ``q``, ``kv`` (and ``attn_sink``).

    The backward of eq. (2), written as FlashAttention's: the probabilities are recomputed from the
    forward's ``lse``, and ``D = Σ_d dout · out`` replaces the sum over slots. With
    :math:`P_t = e^{\ell_t - \mathrm{lse}}` over the valid slots, :math:`K_t = kv_{\mathrm{idx}_t}`,
    :math:`V_t = K_{t,:d_v}` and the sink's share :math:`f = 1/(1 + e^{\mathrm{sink} - \mathrm{lse}})`
    (``out = f · Σ_t P_t V_t``; f = 1 without a sink):

    .. math::

        d\ell_t = P_t \big( f\,(dout \cdot V_t - D) + d\mathrm{lse} \big), \qquad
        dq = \mathrm{sm\_scale} \sum_t d\ell_t\, K_t, \qquad
        dkv_{\mathrm{idx}_t} \mathrel{+}= \mathrm{sm\_scale}\; d\ell_t\, q
            + [\,:d_v\,]\; f\,P_t\, dout, \qquad
        d\mathrm{sink} = -\sum_i D_i\,(1 - f_i)

    summed over heads (all heads share one latent row per token). ``dkv`` of a row accumulates every
    slot that read it: several queries, or one query twice (a duplicate index is two softmax slots
    in the forward, so two contributions here). Invalid slots (index ``< 0`` or ``>= s_kv``, or past
    ``topk_length``) contribute nothing and are never read; a row of ``kv`` that no valid slot reads
    gets exactly 0, and a query with no valid slot gets ``dq = 0``.

    Args:
        q, kv, indices, sm_scale, d_v, topk_length, attn_sink: as for :func:`sparse_mla` (``kv`` in a
            float dtype: the packed FP8 cache is an inference format and has no gradient).
        out, lse: the forward's results (``out`` with the sink applied, natural-log ``lse``).
        d_out: ``[s_q, h, d_v]`` gradient of the loss with respect to ``out``.
        d_lse: ``[s_q, h]`` optional gradient with respect to ``lse``.

    Returns:
        ``(dq, dkv)``: float32 ``[s_q, h, d_qk]`` and float32 ``[s_kv, d_qk]``; with ``attn_sink``
        also ``d_attn_sink``, float32 ``[h]`` (all float64 for float64 ``q``).

    Computed in float64, in chunks of queries so that the ``[chunk, h, topk]`` intermediates stay
    under :data:`~dsa_ref.reference._common.CHUNK_BYTES`.
    """
    dtype = result_dtype(q)
    q = as_float64(q)  # [s_q, h, d_qk]
    kv = as_float64(kv)  # [s_kv, d_qk]
    indices = np.asarray(indices)  # [s_q, topk]
    out, lse, d_out = as_float64(out), as_float64(lse), as_float64(d_out)  # [s_q, h, d_v], [s_q, h], [s_q, h, d_v]
    s_q, h, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[1]
    if sm_scale is None:
        sm_scale = d_qk**-0.5
    d_lse = np.zeros((s_q, h)) if d_lse is None else as_float64(d_lse)  # [s_q, h]

    valid = valid_slots(indices, s_kv, topk_length)  # [s_q, topk]
    kv_and_zero_row = np.concatenate([kv, np.zeros((1, d_qk))])  # [s_kv + 1, d_qk]   invalid slots read zeros
    rows_to_read = np.where(valid, indices, s_kv)  # [s_q, topk]
    share = _sink_factor(attn_sink, lse)  # [s_q, h]   f
    delta = np.einsum("ihd,ihd->ih", d_out, out)  # [s_q, h]   D = Σ_d dout · out

    dq = np.zeros((s_q, h, d_qk))  # [s_q, h, d_qk]
    dkv = np.zeros((s_kv + 1, d_qk))  # [s_kv + 1, d_qk]   the last row collects the invalid slots' zeros
    for rows in query_chunks(s_q, bytes_per_query=8 * topk * (d_qk + 4 * h)):
        chunk_valid = valid[rows][:, None, :]  # [c, 1, topk]
        selected = np.take(kv_and_zero_row, rows_to_read[rows], axis=0)  # [c, topk, d_qk]
        # NaN in an input propagates to what it touches, silently, as in the forward.
        with np.errstate(over="ignore", invalid="ignore"):
            logits = sm_scale * np.matmul(q[rows], selected.transpose(0, 2, 1))  # [c, h, topk]
            probs = np.where(chunk_valid, np.exp(logits - lse[rows][..., None]), 0.0)  # [c, h, topk]   P_t
            d_probs = np.matmul(d_out[rows], selected[:, :, :d_v].transpose(0, 2, 1))  # [c, h, topk]   dout · V_t
            d_logits = probs * (share[rows][..., None] * (d_probs - delta[rows][..., None])
                                + d_lse[rows][..., None])  # [c, h, topk]   dℓ_t
            dq[rows] = sm_scale * np.matmul(d_logits, selected)  # [c, h, d_qk]
            d_selected = sm_scale * np.matmul(d_logits.transpose(0, 2, 1), q[rows])  # [c, topk, d_qk]   as keys
            d_selected[:, :, :d_v] += np.matmul((share[rows][..., None] * probs).transpose(0, 2, 1),
                                                d_out[rows])  # [c, topk, d_v]   as values: f P_t dout
            np.add.at(dkv, rows_to_read[rows].reshape(-1), d_selected.reshape(-1, d_qk))  # duplicates accumulate

    dkv = dkv[:s_kv]  # [s_kv, d_qk]   drop the invalid slots' row
    if attn_sink is None:
        return dq.astype(dtype), dkv.astype(dtype)
    d_sink = -np.sum(np.where(np.isneginf(lse), 0.0, delta * (1.0 - share)), axis=0)  # [h]
    return dq.astype(dtype), dkv.astype(dtype), d_sink.astype(dtype)


def attention_target(q, kv, indices, lse, *, sm_scale=None, topk_length=None) -> np.ndarray:
    r"""The indexer's training target over the selected slots (DeepSeek-V3.2-Exp, eqs. 3-4):
    the main attention's probabilities summed over heads and L1-normalized per query.

    .. math:: p_{i,t} = \frac{\sum_h P_{i,h,t}}{\sum_{t'} \sum_h P_{i,h,t'}}, \qquad
              P_{i,h,t} = e^{\,\mathrm{sm\_scale}\; q_{i,h} \cdot kv_{\mathrm{idx}_{i,t}} - \mathrm{lse}_{i,h}}

    The probabilities are recomputed from the forward's ``lse`` (no ``[s_q, h, topk]`` tensor is kept
    between the two), without the attention sink: the sink takes mass from every token alike, and the
    normalization removes it. A duplicate index is two slots, each with its own probability.

    Args:
        q, kv, indices, sm_scale, topk_length: as for :func:`sparse_mla` (``kv`` may be the packed
            FP8 cache: the target needs no gradient).
        lse: ``[s_q, h]`` the forward's natural-log lse.

    Returns:
        float32 ``[s_q, topk]`` (float64 for float64 ``q``): each row sums to 1 over its valid slots,
        0 at invalid slots; a row with no valid slot is all 0.
    """
    kv = np.asarray(kv)
    if kv.dtype == np.uint8 and kv.shape[-1] == KV_CACHE_FP8_BYTES:
        kv = unpack_kv_cache_fp8(kv)  # [s_kv, 576]
    dtype = result_dtype(q)
    q, kv, lse = as_float64(q), as_float64(kv), as_float64(lse)  # [s_q, h, d_qk], [s_kv, d_qk], [s_q, h]
    indices = np.asarray(indices)  # [s_q, topk]
    s_q, h, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[1]
    if sm_scale is None:
        sm_scale = d_qk**-0.5
    valid = valid_slots(indices, s_kv, topk_length)  # [s_q, topk]
    kv_and_zero_row = np.concatenate([kv, np.zeros((1, d_qk))])  # [s_kv + 1, d_qk]
    rows_to_read = np.where(valid, indices, s_kv)  # [s_q, topk]
    head_sum = np.zeros((s_q, topk))  # [s_q, topk]
    for rows in query_chunks(s_q, bytes_per_query=8 * topk * (d_qk + 2 * h)):
        selected = np.take(kv_and_zero_row, rows_to_read[rows], axis=0)  # [c, topk, d_qk]
        logits = sm_scale * np.matmul(q[rows], selected.transpose(0, 2, 1))  # [c, h, topk]
        with np.errstate(over="ignore", invalid="ignore"):
            probs = np.where(valid[rows][:, None, :], np.exp(logits - lse[rows][..., None]), 0.0)  # [c, h, topk]
        head_sum[rows] = probs.sum(axis=1)  # [c, topk]   Σ_h P
    total = head_sum.sum(axis=1, keepdims=True)  # [s_q, 1]
    with np.errstate(invalid="ignore"):
        target = np.where(total > 0, head_sum / np.where(total > 0, total, 1.0), 0.0)  # [s_q, topk]
    target = np.where(np.isnan(total), np.nan, target)  # NaN in an input is reported, not hidden
    return target.astype(dtype)
