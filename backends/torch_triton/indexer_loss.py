"""The indexer's training loss (paper eqs. 3 and 4) and its backward: KL divergence from the main
attention's head-summed distribution to the softmax of the index scores.

.. math::

    I_{t,s} = \\mathrm{ks}_s \\sum_j w_{t,j}\\,\\mathrm{ReLU}(q_{t,j}\\cdot k_s), \\qquad
    \\mathcal L_t = \\sum_s \\hat p_{t,s}\\big(\\log \\hat p_{t,s} - \\log\\mathrm{Softmax}(I_t)_s\\big),

    dI_{t,s} = d\\mathcal L_t\\,(\\mathrm{Softmax}(I_t)_s - \\hat p_{t,s}), \\quad
    dg_{t,j,s} = dI_{t,s}\\,\\mathrm{ks}_s\\,w_{t,j}\\,[q_{t,j}\\cdot k_s > 0]

with :math:`\\hat p` the target restricted to the entries of the softmax and L1-normalized; see
:func:`dsa_ref.reference.indexer_loss` and :func:`dsa_ref.reference.indexer_loss_backward`.

How the work is laid out. The scores of a query's entries go to a float32 row buffer (``topk``
entries, or the key range of a chunk of queries in the dense stage), :func:`_kl_kernel` runs the
log-softmax and the KL over each row and overwrites the row with ``dI`` for the backward.

* Sparse stage (eq. 4): :func:`_sparse_scores_kernel` gathers the selected ``k_index`` rows per
  query (all ``h_i`` heads of the query form one ``[h_i, d_i] x [d_i, BLOCK_T]`` tensor-core
  product); :func:`_sparse_backward_kernel` recomputes the gate ``q . k``, accumulates ``dq`` and
  ``dw`` per query and each slot's ``dk`` contribution summed over heads, which is added with
  float32 atomics (default) or, deterministic, buffered and summed per key in a fixed order by
  :func:`~.sparse_mla_backward.segment_sum` (no float atomics).
* Dense stage (eq. 3): the scores come from the lightning indexer kernel, by chunks of queries so
  that the ``[chunk, s_kv]`` buffer stays bounded; :func:`_dense_dq_kernel` walks over the keys of a
  block of queries (``dq``, ``dw``) and :func:`_dense_dk_kernel` over the queries of a block of keys
  (``dk``), FlashAttention-2's split: every output element has one owner, so the dense backward is
  bitwise repeatable in both modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import indexer
from .precision import dot_precision
from .sparse_mla import _COMPUTE_DTYPES
from .sparse_mla_backward import segment_sum

#: Bytes of float32 the row buffers (dense scores, deterministic dk contributions) take at a time.
ROW_BUFFER_BYTES = 512 * 1024 * 1024

#: Largest indexer shapes the loss kernels keep on chip (heads of one query, and d_i).
MAX_H_I = 64
MAX_D_I = 128


@triton.jit
def _gate(b_q, p_k, b_key, m_key, m_d, o_d, stride_k, DOT_PRECISION: tl.constexpr):
    """Gathered key rows ``[BLOCK_T, BLOCK_D]`` (zeros where ``m_key`` is off, never read) and the
    gate ``q . k`` ``[HEADS, BLOCK_T]`` in float32."""
    b_k = tl.load(p_k + b_key.to(tl.int64)[:, None] * stride_k + o_d[None, :], mask=m_key[:, None] & m_d[None, :],
                  other=0.0)
    return b_k, tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)


@triton.jit
def _query_and_weights(p_q, p_weights, query, o_h, m_h, o_d, m_d, stride_q_m, stride_q_h, stride_w_m):
    """One query's index vectors ``[HEADS, BLOCK_D]`` and float32 head weights ``[HEADS]``; masked
    heads and dims load 0."""
    b_q = tl.load(p_q + query.to(tl.int64) * stride_q_m + o_h[:, None] * stride_q_h + o_d[None, :],
                  mask=m_h[:, None] & m_d[None, :], other=0.0)
    b_w = tl.load(p_weights + query.to(tl.int64) * stride_w_m + o_h, mask=m_h, other=0.0).to(tl.float32)
    return b_q, b_w


@triton.jit
def _sparse_scores_kernel(
    p_q, p_weights, p_k, p_k_scale, p_indices, p_scores,
    h_i, d_i, s_kv, topk,
    stride_q_m, stride_q_h, stride_w_m, stride_k, stride_i_m, stride_s_m,
    HAS_K_SCALE: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Index scores of every slot of one query (axis 0); ``-inf`` at invalid slots."""
    query = tl.program_id(0)
    o_h = tl.arange(0, HEADS)
    m_h = o_h < h_i
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    b_q, b_w = _query_and_weights(p_q, p_weights, query, o_h, m_h, o_d, m_d, stride_q_m, stride_q_h, stride_w_m)
    for t in range(0, topk, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        b_index = tl.load(p_indices + query.to(tl.int64) * stride_i_m + o_t, mask=o_t < topk, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_key = tl.where(m_valid, b_index, 0)
        _, b_gate = _gate(b_q, p_k, b_key, m_valid, m_d, o_d, stride_k, DOT_PRECISION)
        b_scores = tl.sum(tl.maximum(b_gate, 0.0, propagate_nan=tl.PropagateNan.ALL) * b_w[:, None], axis=0)
        if HAS_K_SCALE:
            b_scores = b_scores * tl.load(p_k_scale + b_key, mask=m_valid, other=0.0)
        tl.store(p_scores + query.to(tl.int64) * stride_s_m + o_t, tl.where(m_valid, b_scores, float("-inf")),
                 mask=o_t < topk)


@triton.jit
def _kl_kernel(
    p_scores, p_target, p_indices, p_key_start, p_key_end, p_d_loss, p_loss,
    s_kv, topk, row_begin, stride_s_m, stride_t_m, stride_i_m,
    SPARSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """KL of query ``row_begin + axis 0``; with ``WRITE_GRAD`` its score row becomes ``dI``.

    Entries of the softmax: the valid slots (``SPARSE``, row of ``topk``), or ``[key_start, key_end)``.
    Score and target rows are indexed from ``row_begin`` for the scores (a chunk buffer in the dense
    stage) and by the query for the target.
    """
    local = tl.program_id(0)
    query = row_begin + local
    p_score_row = p_scores + local.to(tl.int64) * stride_s_m
    p_target_row = p_target + query.to(tl.int64) * stride_t_m
    if SPARSE:
        lo = 0
        hi = topk
    else:
        lo = tl.load(p_key_start + query)
        hi = tl.load(p_key_end + query)
    b_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max per lane
    b_sum = tl.zeros((BLOCK_N,), tl.float32)
    b_mass = tl.zeros((BLOCK_N,), tl.float32)
    for n in range(lo, hi, BLOCK_N):
        o_n = n + tl.arange(0, BLOCK_N)
        m_allowed = _allowed(p_indices, query, o_n, hi, s_kv, stride_i_m, SPARSE)
        b_logit = tl.load(p_score_row + o_n, mask=m_allowed, other=float("-inf"))
        b_mass += tl.load(p_target_row + o_n, mask=m_allowed, other=0.0).to(tl.float32)
        b_max_new = tl.maximum(b_max, b_logit, propagate_nan=tl.PropagateNan.ALL)
        b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_sum = b_sum * tl.exp(b_max - b_shift) + tl.exp(b_logit - b_shift)
        b_max = b_max_new
    row_max = tl.max(b_max, axis=0)
    row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_normalizer = row_shift + tl.log(tl.sum(b_sum * tl.exp(b_max - row_shift), axis=0))
    mass = tl.sum(b_mass, axis=0)
    active = mass > 0
    inverse_mass = tl.where(active, 1.0 / tl.where(active, mass, 1.0), 0.0)
    if WRITE_GRAD:
        d_loss = tl.where(active, tl.load(p_d_loss + query), 0.0)
    b_loss = tl.zeros((BLOCK_N,), tl.float32)
    for n in range(lo, hi, BLOCK_N):
        o_n = n + tl.arange(0, BLOCK_N)
        m_allowed = _allowed(p_indices, query, o_n, hi, s_kv, stride_i_m, SPARSE)
        b_log_softmax = tl.load(p_score_row + o_n, mask=m_allowed, other=0.0) - log_normalizer
        b_target = tl.load(p_target_row + o_n, mask=m_allowed, other=0.0).to(tl.float32) * inverse_mass
        m_mass = m_allowed & (b_target > 0)  # 0 log 0 = 0
        b_loss += tl.where(m_mass, b_target * (tl.log(tl.where(m_mass, b_target, 1.0)) - b_log_softmax), 0.0)
        if WRITE_GRAD:
            b_grad = tl.where(m_allowed, d_loss * (tl.exp(b_log_softmax) - b_target), 0.0)
            tl.store(p_score_row + o_n, b_grad, mask=o_n < hi)
    tl.store(p_loss + query, tl.where(active, tl.sum(b_loss, axis=0), 0.0))


@triton.jit
def _allowed(p_indices, query, o_n, hi, s_kv, stride_i_m, SPARSE: tl.constexpr):
    m_in = o_n < hi
    if SPARSE:
        b_index = tl.load(p_indices + query.to(tl.int64) * stride_i_m + o_n, mask=m_in, other=-1)
        m_in = m_in & (b_index >= 0) & (b_index < s_kv)
    return m_in


@triton.jit
def _sparse_backward_kernel(
    p_q, p_weights, p_k, p_k_scale, p_indices, p_d_scores, p_dq, p_dweights, p_dk, p_contributions,
    h_i, d_i, s_kv, topk, query_begin,
    stride_q_m, stride_q_h, stride_w_m, stride_k, stride_i_m, stride_s_m, stride_dq_m, stride_dq_h,
    stride_dw_m, stride_dk, stride_c_m, stride_c_t,
    HAS_K_SCALE: tl.constexpr, DETERMINISTIC: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq, dweights of query ``query_begin + axis 0``, and each slot's dk contribution (all heads summed)."""
    local_query = tl.program_id(0)
    query = query_begin + local_query
    o_h = tl.arange(0, HEADS)
    m_h = o_h < h_i
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    b_q, b_w = _query_and_weights(p_q, p_weights, query, o_h, m_h, o_d, m_d, stride_q_m, stride_q_h, stride_w_m)
    b_dq = tl.zeros((HEADS, BLOCK_D), tl.float32)
    b_dw = tl.zeros((HEADS,), tl.float32)
    for t in range(0, topk, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        b_index = tl.load(p_indices + query.to(tl.int64) * stride_i_m + o_t, mask=o_t < topk, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_key = tl.where(m_valid, b_index, 0)
        b_k, b_gate = _gate(b_q, p_k, b_key, m_valid, m_d, o_d, stride_k, DOT_PRECISION)
        b_d_scaled = tl.load(p_d_scores + query.to(tl.int64) * stride_s_m + o_t, mask=m_valid, other=0.0)
        if HAS_K_SCALE:
            b_d_scaled = b_d_scaled * tl.load(p_k_scale + b_key, mask=m_valid, other=0.0)
        b_dw += tl.sum(tl.maximum(b_gate, 0.0) * b_d_scaled[None, :], axis=1)
        b_d_gate = tl.where(b_gate > 0, b_d_scaled[None, :] * b_w[:, None], 0.0).to(COMPUTE_DTYPE)  # [HEADS, BLOCK_T]
        b_dq = tl.dot(b_d_gate, b_k, b_dq, input_precision=DOT_PRECISION)
        b_dk = tl.dot(tl.trans(b_d_gate), b_q, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_D]
        if DETERMINISTIC:
            p_rows = p_contributions + local_query.to(tl.int64) * stride_c_m + o_t.to(tl.int64)[:, None] * stride_c_t
            tl.store(p_rows + o_d[None, :], b_dk, mask=(o_t < topk)[:, None] & m_d[None, :])
        else:
            # One lane per (slot, column): a key selected twice in this block gets both adds.
            tl.atomic_add(p_dk + b_key.to(tl.int64)[:, None] * stride_dk + o_d[None, :], b_dk,
                          mask=m_valid[:, None] & m_d[None, :], sem="relaxed")
    tl.store(p_dq + query.to(tl.int64) * stride_dq_m + o_h[:, None] * stride_dq_h + o_d[None, :], b_dq,
             mask=m_h[:, None] & m_d[None, :])
    tl.store(p_dweights + query.to(tl.int64) * stride_dw_m + o_h, b_dw, mask=m_h)


@triton.jit
def _stacked_rows(p_q, p_weights, p_key_start, p_key_end, first_query, row_end,
                  h_i, d_i, stride_q_m, stride_q_h, stride_w_m,
                  BLOCK_M: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``BLOCK_M`` queries from ``first_query`` with their heads stacked (row r: head r % HEADS of query
    r // HEADS), as the indexer kernel lays them out; rows past ``row_end`` get an empty key range."""
    o_r = tl.arange(0, BLOCK_M * HEADS)
    o_query = first_query + o_r // HEADS
    o_head = o_r % HEADS
    m_r = (o_query < row_end) & (o_head < h_i)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    b_q = tl.load(p_q + o_query.to(tl.int64)[:, None] * stride_q_m + o_head[:, None] * stride_q_h + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.0)
    b_w = tl.load(p_weights + o_query.to(tl.int64) * stride_w_m + o_head, mask=m_r, other=0.0).to(tl.float32)
    b_start = tl.load(p_key_start + o_query, mask=m_r, other=0)
    b_end = tl.load(p_key_end + o_query, mask=m_r, other=0)
    return o_query, o_head, m_r, b_q, b_w, b_start, b_end


@triton.jit
def _dense_d_gate(b_q, b_w, b_k, p_d_scores, p_k_scale, o_query, o_n, m_n, b_start, b_end, row_begin, stride_s_m,
                  HAS_K_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``dI · ks`` ``[rows, BLOCK_N]`` (0 outside each query's range), the gate and its gradient."""
    b_gate = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [rows, BLOCK_N]
    m_visible = (o_n[None, :] >= b_start[:, None]) & (o_n[None, :] < b_end[:, None])
    b_d_scaled = tl.load(p_d_scores + (o_query - row_begin).to(tl.int64)[:, None] * stride_s_m + o_n[None, :],
                         mask=m_visible, other=0.0)
    if HAS_K_SCALE:
        b_d_scaled = b_d_scaled * tl.load(p_k_scale + o_n, mask=m_n, other=0.0)[None, :]
    b_d_gate = tl.where(b_gate > 0, b_d_scaled * b_w[:, None], 0.0)
    return b_gate, b_d_scaled, b_d_gate


@triton.jit
def _dense_dq_kernel(
    p_q, p_weights, p_k, p_k_scale, p_key_start, p_key_end, p_d_scores, p_dq, p_dweights,
    h_i, d_i, s_kv, row_begin, row_end,
    stride_q_m, stride_q_h, stride_w_m, stride_k, stride_s_m, stride_dq_m, stride_dq_h, stride_dw_m,
    HAS_K_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq and dweights of ``BLOCK_M`` queries from ``row_begin + axis 0 * BLOCK_M``, over their keys."""
    first_query = row_begin + tl.program_id(0) * BLOCK_M
    o_query, o_head, m_r, b_q, b_w, b_start, b_end = _stacked_rows(
        p_q, p_weights, p_key_start, p_key_end, first_query, row_end, h_i, d_i, stride_q_m, stride_q_h, stride_w_m,
        BLOCK_M, HEADS, BLOCK_D)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    lo = tl.min(tl.where(m_r, b_start, s_kv), axis=0)
    hi = tl.max(tl.where(m_r, b_end, 0), axis=0)
    b_dq = tl.zeros((BLOCK_M * HEADS, BLOCK_D), tl.float32)
    b_dw = tl.zeros((BLOCK_M * HEADS,), tl.float32)
    for n in range(lo, hi, BLOCK_N):
        o_n = n + tl.arange(0, BLOCK_N)
        m_n = o_n < s_kv
        b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_k + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                      other=0.0)
        # A key no query of the block may see contributes nothing, not even a NaN through 0 * NaN.
        m_seen = (o_n[None, :] >= b_start[:, None]) & (o_n[None, :] < b_end[:, None]) & m_r[:, None]
        b_k = tl.where((tl.max(m_seen.to(tl.int32), axis=0) > 0)[:, None], b_k, 0.0)
        b_gate, b_d_scaled, b_d_gate = _dense_d_gate(b_q, b_w, b_k, p_d_scores, p_k_scale, o_query, o_n, m_n,
                                                     b_start, b_end, row_begin, stride_s_m, HAS_K_SCALE,
                                                     DOT_PRECISION)
        b_dw += tl.sum(tl.maximum(b_gate, 0.0) * b_d_scaled, axis=1)
        b_dq = tl.dot(b_d_gate.to(COMPUTE_DTYPE), b_k, b_dq, input_precision=DOT_PRECISION)
    tl.store(p_dq + o_query.to(tl.int64)[:, None] * stride_dq_m + o_head[:, None] * stride_dq_h + o_d[None, :], b_dq,
             mask=m_r[:, None] & m_d[None, :])
    tl.store(p_dweights + o_query.to(tl.int64) * stride_dw_m + o_head, b_dw, mask=m_r)


@triton.jit
def _dense_dk_kernel(
    p_q, p_weights, p_k, p_k_scale, p_key_start, p_key_end, p_d_scores, p_dk,
    h_i, d_i, s_kv, row_begin, row_end,
    stride_q_m, stride_q_h, stride_w_m, stride_k, stride_s_m, stride_dk,
    HAS_K_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``dk[keys] += Σ_{t, j} dg q`` for ``BLOCK_N`` keys (axis 0) over queries ``[row_begin, row_end)``,
    in increasing query order; the program owns its keys' rows of ``dk``."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < s_kv
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_k + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                  other=0.0)
    b_dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    key_lo = tl.program_id(0) * BLOCK_N
    for first_query in range(row_begin, row_end, BLOCK_M):
        o_query, o_head, m_r, b_q, b_w, b_start, b_end = _stacked_rows(
            p_q, p_weights, p_key_start, p_key_end, first_query, row_end, h_i, d_i, stride_q_m, stride_q_h,
            stride_w_m, BLOCK_M, HEADS, BLOCK_D)
        # Query blocks whose ranges miss these keys add exactly 0: skip them.
        overlaps = tl.max(tl.where(m_r & (b_start < key_lo + BLOCK_N) & (b_end > key_lo), 1, 0), axis=0)
        if overlaps > 0:
            _, _, b_d_gate = _dense_d_gate(b_q, b_w, b_k, p_d_scores, p_k_scale, o_query, o_n, m_n, b_start, b_end,
                                           row_begin, stride_s_m, HAS_K_SCALE, DOT_PRECISION)
            b_dk = tl.dot(tl.trans(b_d_gate.to(COMPUTE_DTYPE)), b_q, b_dk, input_precision=DOT_PRECISION)
    p_dk_rows = p_dk + o_n.to(tl.int64)[:, None] * stride_dk + o_d[None, :]
    m_dk = m_n[:, None] & m_d[None, :]
    tl.store(p_dk_rows, tl.load(p_dk_rows, mask=m_dk, other=0.0) + b_dk, mask=m_dk)


def loss_config(h_i: int, d_i: int, dtype) -> dict:
    """Block sizes: all heads of a query (padded to 16, tl.dot's least M) times ``BLOCK_T`` slots in the
    sparse kernels; ~64 stacked rows in the dense ones (fewer than the indexer's 128: these also hold
    a ``[rows, d_i]`` float32 dq accumulator)."""
    heads = max(16, triton.next_power_of_2(max(h_i, 1)))
    block_d = max(16, triton.next_power_of_2(max(d_i, 1)))
    fp32 = dtype == torch.float32
    return dict(HEADS=heads, BLOCK_D=block_d, BLOCK_T=32 if fp32 else 64,
                BLOCK_M=max(1, 64 // heads), BLOCK_N=32 if fp32 else 64, num_warps=4)


def _operands(q_index, weights, k_index, target, k_scale, indices):
    q_index = q_index if q_index.stride(-1) == 1 else q_index.contiguous()
    k_index = k_index if k_index.stride(-1) == 1 else k_index.contiguous()
    weights = weights.to(torch.float32)
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    target = target.to(torch.float32)
    target = target if target.stride(-1) == 1 else target.contiguous()
    k_scale = None if k_scale is None else k_scale.to(torch.float32).contiguous()
    if indices is not None and (indices.stride(-1) != 1 or indices.dtype not in (torch.int32, torch.int64)):
        indices = indices.contiguous()
    return q_index, weights, k_index, target, k_scale, indices


def _sparse_scores(q, weights, k, k_scale, indices, config):
    s_q, h_i, d_i = q.shape
    topk = indices.shape[1]
    scores = torch.empty((s_q, topk), dtype=torch.float32, device=q.device)
    _sparse_scores_kernel[(s_q,)](
        q, weights, k, k_scale if k_scale is not None else weights, indices, scores,
        h_i, d_i, k.shape[0], topk,
        q.stride(0), q.stride(1), weights.stride(0), k.stride(0), indices.stride(0), scores.stride(0),
        HAS_K_SCALE=k_scale is not None, HEADS=config["HEADS"], BLOCK_T=config["BLOCK_T"],
        BLOCK_D=config["BLOCK_D"], DOT_PRECISION=dot_precision(q.dtype), num_warps=config["num_warps"])
    return scores


def _kl(scores, target, loss, s_kv: int, *, indices=None, key_start=None, key_end=None, d_loss=None, row_begin=0):
    """Loss of the ``scores.shape[0]`` queries from ``row_begin``; with ``d_loss``, ``scores`` becomes dI."""
    rows = scores.shape[0]
    if rows == 0:
        return
    sparse = indices is not None
    dummy = loss
    _kl_kernel[(rows,)](
        scores, target, indices if sparse else dummy, key_start if not sparse else dummy,
        key_end if not sparse else dummy, d_loss if d_loss is not None else dummy, loss,
        s_kv, indices.shape[1] if sparse else 0, row_begin,
        scores.stride(0), target.stride(0), indices.stride(0) if sparse else 0,
        SPARSE=sparse, WRITE_GRAD=d_loss is not None, BLOCK_N=128, num_warps=4)


def _dense_chunk(s_q: int, s_kv: int) -> int:
    return max(1, min(s_q, ROW_BUFFER_BYTES // (4 * max(s_kv, 1))))


def indexer_loss(q_index, weights, k_index, target, *, indices=None, key_start=None, key_end=None, k_scale=None):
    """float32 ``[s_q]``; see :func:`dsa_ref.indexer_loss`. ``q_index`` and ``k_index`` share a dtype."""
    q, weights, k, target, k_scale, indices = _operands(q_index, weights, k_index, target, k_scale, indices)
    s_q, h_i, d_i = q.shape
    s_kv = k.shape[0]
    loss = torch.empty((s_q,), dtype=torch.float32, device=q.device)
    if s_q == 0:
        return loss
    config = loss_config(h_i, d_i, q.dtype)
    if indices is not None:
        if indices.shape[1] == 0 or h_i == 0:
            return loss.zero_()
        _kl(_sparse_scores(q, weights, k, k_scale, indices, config), target, loss, s_kv, indices=indices)
        return loss
    key_start, key_end = key_start.to(torch.int32).contiguous(), key_end.to(torch.int32).contiguous()
    chunk = _dense_chunk(s_q, s_kv)
    buffer = torch.empty((chunk, max(s_kv, 1)), dtype=torch.float32, device=q.device)
    for begin in range(0, s_q, chunk):
        end = min(s_q, begin + chunk)
        scores = indexer.lightning_indexer(q, weights, k, key_start, key_end, k_scale, out=buffer[: end - begin],
                                           row_begin=begin, row_end=end, fill_masked=False)
        _kl(scores, target, loss, s_kv, key_start=key_start, key_end=key_end, row_begin=begin)
    return loss


def indexer_loss_backward(q_index, weights, k_index, target, d_loss, *, indices=None, key_start=None, key_end=None,
                          k_scale=None, deterministic: bool = False):
    """``(dq_index, dweights, dk_index)`` float32; see :func:`dsa_ref.indexer_loss_backward`."""
    q, weights, k, target, k_scale, indices = _operands(q_index, weights, k_index, target, k_scale, indices)
    s_q, h_i, d_i = q.shape
    s_kv = k.shape[0]
    d_loss = d_loss.to(torch.float32).contiguous()
    dq = torch.empty((s_q, h_i, d_i), dtype=torch.float32, device=q.device)
    dweights = torch.empty((s_q, h_i), dtype=torch.float32, device=q.device)
    dk = torch.zeros((s_kv, d_i), dtype=torch.float32, device=q.device)
    loss = torch.empty((s_q,), dtype=torch.float32, device=q.device)
    if s_q == 0:
        return dq, dweights, dk
    config = loss_config(h_i, d_i, q.dtype)
    common = dict(HAS_K_SCALE=k_scale is not None, COMPUTE_DTYPE=_COMPUTE_DTYPES[q.dtype],
                  DOT_PRECISION=dot_precision(q.dtype), num_warps=config["num_warps"])
    k_scale_arg = k_scale if k_scale is not None else weights
    if indices is not None:
        topk = indices.shape[1]
        if topk == 0 or h_i == 0:
            return dq.zero_(), dweights.zero_(), dk
        d_scores = _sparse_scores(q, weights, k, k_scale, indices, config)
        _kl(d_scores, target, loss, s_kv, indices=indices, d_loss=d_loss)
        blocks = dict(HEADS=config["HEADS"], BLOCK_T=config["BLOCK_T"], BLOCK_D=config["BLOCK_D"])
        chunk = s_q if not deterministic else max(1, min(s_q, ROW_BUFFER_BYTES // (4 * topk * d_i)))
        contributions = (torch.empty((chunk, topk, d_i), dtype=torch.float32, device=q.device)
                         if deterministic else dk)
        for begin in range(0, s_q, chunk):
            end = min(s_q, begin + chunk)
            _sparse_backward_kernel[(end - begin,)](
                q, weights, k, k_scale_arg, indices, d_scores, dq, dweights, dk, contributions,
                h_i, d_i, s_kv, topk, begin,
                q.stride(0), q.stride(1), weights.stride(0), k.stride(0), indices.stride(0), d_scores.stride(0),
                dq.stride(0), dq.stride(1), dweights.stride(0), dk.stride(0),
                contributions.stride(0) if deterministic else 0, contributions.stride(1) if deterministic else 0,
                DETERMINISTIC=deterministic, **blocks, **common)
            if deterministic:
                segment_sum(dk, contributions[: end - begin].view(-1, d_i), indices[begin:end].reshape(-1))
        return dq, dweights, dk

    key_start, key_end = key_start.to(torch.int32).contiguous(), key_end.to(torch.int32).contiguous()
    if h_i == 0:
        return dq.zero_(), dweights.zero_(), dk
    blocks = dict(BLOCK_M=config["BLOCK_M"], HEADS=config["HEADS"], BLOCK_N=config["BLOCK_N"],
                  BLOCK_D=config["BLOCK_D"])
    chunk = _dense_chunk(s_q, s_kv)
    buffer = torch.empty((chunk, max(s_kv, 1)), dtype=torch.float32, device=q.device)
    for begin in range(0, s_q, chunk):
        end = min(s_q, begin + chunk)
        d_scores = indexer.lightning_indexer(q, weights, k, key_start, key_end, k_scale, out=buffer[: end - begin],
                                             row_begin=begin, row_end=end, fill_masked=False)
        _kl(d_scores, target, loss, s_kv, key_start=key_start, key_end=key_end, d_loss=d_loss, row_begin=begin)
        _dense_dq_kernel[(triton.cdiv(end - begin, config["BLOCK_M"]),)](
            q, weights, k, k_scale_arg, key_start, key_end, d_scores, dq, dweights,
            h_i, d_i, s_kv, begin, end,
            q.stride(0), q.stride(1), weights.stride(0), k.stride(0), d_scores.stride(0),
            dq.stride(0), dq.stride(1), dweights.stride(0), **blocks, **common)
        if s_kv:
            _dense_dk_kernel[(triton.cdiv(s_kv, config["BLOCK_N"]),)](
                q, weights, k, k_scale_arg, key_start, key_end, d_scores, dk,
                h_i, d_i, s_kv, begin, end,
                q.stride(0), q.stride(1), weights.stride(0), k.stride(0), d_scores.stride(0), dk.stride(0),
                **blocks, **common)
    return dq, dweights, dk
