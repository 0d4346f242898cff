"""Sparse MLA in MQA mode: attention of each query over its selected latent rows (paper eq. 2)."""

from __future__ import annotations

import numpy as np

from ._common import as_float64, query_chunks
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
        ``(out, lse)``: float32 ``[s_q, h, d_v]`` and float32 ``[s_q, h]``, lse in natural log.
        A row with no valid slot gets ``out = 0`` and ``lse = -inf``: the log of an empty sum,
        which keeps ``exp(lse)`` equal to the softmax denominator and merges correctly with other
        partial results. FlashMLA reports ``+inf`` there instead (so that ``exp(-lse)`` stays
        finite in its combine kernel); compare against it with that in mind.

    Computed in float64, in chunks of queries so that the gathered ``[chunk, topk, d_qk]`` rows
    stay under :data:`~dsa_ref.reference._common.CHUNK_BYTES`.
    """
    kv = np.asarray(kv)
    if kv.dtype == np.uint8 and kv.shape[-1] == KV_CACHE_FP8_BYTES:
        kv = unpack_kv_cache_fp8(kv)  # [s_kv, 576]
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
        row_max = logits.max(axis=-1, keepdims=True)  # [c, h, 1]
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
    return out.astype(np.float32), lse.astype(np.float32)
