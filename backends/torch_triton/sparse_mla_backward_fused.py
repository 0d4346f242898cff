"""Sparse MLA backward (paper eq. 2, MQA mode) in one FlashAttention-2-style kernel: the scores,
probabilities and their gradients are computed once per (query, head, slot), and ``dq`` and the
row contributions come from the same tiles. See :mod:`.sparse_mla_backward` for the formulas and
:func:`dsa_ref.sparse_mla_backward` for the spec.

How the work is laid out. One program takes one query and ``BLOCK_H`` of its heads (the forward's
tiling: q as a ``[BLOCK_H, D_V]`` value part and a ``[BLOCK_H, D_R]`` rest part) and walks over the
query's slots ``BLOCK_T`` at a time. For each slot block it gathers the rows once and computes

* ``P = exp(sm_scale q K^T - lse)`` and ``dP = dout V^T`` ``[BLOCK_H, BLOCK_T]``, then
  ``dS = P (f (dP - D) + dlse)``;
* ``dq += dS K`` into a float32 ``[BLOCK_H, d_qk]`` accumulator kept for the whole walk (the
  forward's ``out`` accumulator, widened by the rest part) and written once at the end;
* the slots' row contributions ``sm_scale dS^T q + [:d_v] f P^T dout`` ``[BLOCK_T, d_qk]``, one
  static column chunk at a time (``CHUNK`` columns of the value part, then of the rest part):
  each chunk is at most two tensor-core products ``[BLOCK_T, BLOCK_H] x [BLOCK_H, CHUNK]`` whose
  result is sent out and dropped, so no ``[BLOCK_T, d_qk]`` float32 tile ever lives beside the ``dq`` one. The q
  and dout column chunks are re-read per slot block; they are this program's own loop-invariant
  rows, so the reads hit L1/L2, not HBM.

Compared with the split kernels (:mod:`.sparse_mla_backward`), this does the counted FLOP
``2 h topk (3 d_qk + 2 d_v)`` per query once, instead of recomputing ``q K^T`` and ``dout V^T`` in a
second kernel (~1.4x), and it brings each query's q and dout from HBM once per head block instead
of once per 32 slots. The price is ``ceil(h / BLOCK_H)`` row contributions per (query, slot) instead of one.

Where they go:

* default: ``tl.atomic_add`` into a float32 ``dkv`` (the order of the adds, and so the last bits,
  changes from run to run);
* deterministic: each (query, head block, slot) contribution is stored to a buffer (chunks of
  queries bound its size), and the existing stable sort by row + :func:`segment_sum` adds each row's
  contributions in the fixed (query, head block, slot) order: no float atomics, bitwise repeatable.
  This was chosen over keeping the split kernels' deterministic path because it keeps the fused
  kernel's single pass (the split path pays the ~1.4x recomputation and its spilling dkv kernel);
  its extra cost is the buffer traffic, ``ceil(h / BLOCK_H)`` x 4 d_qk bytes written and read once
  per (query, slot): at h 128 and 32 heads a block, 4x the split path's buffer. Predicted (not
  yet measured) at ~1.5-2x the default's time, so over the 1.3x one would like, but under the
  split deterministic path, which also pays the recomputation.

Invalid slots (index ``< 0`` or ``>= s_kv``, or past ``topk_length``) point at row 0 and are masked:
they load zeros, contribute exactly 0 and are never dereferenced or written; padded heads load lse
``+inf`` (so ``P = 0``) and zeros, and add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .precision import dot_precision
from .sparse_mla import _COMPUTE_DTYPES, LOG2E, _load_rows, _slot_count
from .sparse_mla_backward import _head_stats, _load_head_stats, _prepare, _probabilities, segment_sum

#: Bytes of float32 row contributions the deterministic mode buffers at a time (chunks of queries).
CONTRIBUTION_BUFFER_BYTES = 1024 * 1024 * 1024


@triton.jit
def _fused_backward_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_lse, p_delta, p_share, p_d_lse, p_d_out, p_dq, p_dkv,
    p_contributions,
    h, s_kv, topk, d_v, d_qk, query_begin, scale_log2, sm_scale,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_do_m, stride_do_h, stride_dq_m, stride_dq_h,
    stride_dkv, stride_c_b, stride_c_t,
    HAS_TOPK_LENGTH: tl.constexpr, HAS_D_LSE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr, CHUNK: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``dq`` of ``BLOCK_H`` heads (axis 1) of query ``query_begin + axis 0``, and the row
    contributions of all its slots from those heads: added atomically to ``dkv``, or
    (``DETERMINISTIC``) stored to buffer entry ``axis 0 * n_head_blocks + axis 1``."""
    local_query = tl.program_id(0)
    query = query_begin + local_query
    head_block = tl.program_id(1)
    o_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < h
    o_dv = tl.arange(0, D_V)
    o_dr = tl.arange(0, D_R)
    m_dv = o_dv < d_v
    m_dr = o_dr < d_qk - d_v

    p_q_rows = p_q + query.to(tl.int64) * stride_q_m + o_h[:, None] * stride_q_h
    b_q_value = tl.load(p_q_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0).to(COMPUTE_DTYPE)
    b_q_rest = tl.load(p_q_rows + d_v + o_dr[None, :], mask=m_h[:, None] & m_dr[None, :], other=0.0).to(COMPUTE_DTYPE)
    p_d_out_rows = p_d_out + query.to(tl.int64) * stride_do_m + o_h[:, None] * stride_do_h
    b_d_out = tl.load(p_d_out_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0).to(COMPUTE_DTYPE)
    b_lse, b_delta, b_share, b_d_lse = _load_head_stats(p_lse, p_delta, p_share, p_d_lse, query.to(tl.int64) * h,
                                                        o_h, m_h, HAS_D_LSE)

    n_slots = _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH)
    b_dq_value = tl.zeros((BLOCK_H, D_V), tl.float32)
    b_dq_rest = tl.zeros((BLOCK_H, D_R), tl.float32)
    p_index_row = p_indices + query.to(tl.int64) * stride_i_m
    p_block = p_contributions + (local_query.to(tl.int64) * tl.num_programs(1) + head_block) * stride_c_b
    for t in range(0, n_slots, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        b_index = tl.load(p_index_row + o_t, mask=o_t < n_slots, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_row = tl.where(m_valid, b_index, 0)  # invalid slots point at row 0 and load nothing
        b_value, b_rest = _load_rows(p_kv, b_row, m_valid, d_v, d_qk, stride_kv, o_dv, o_dr,
                                     False, BLOCK_T, D_V, D_R, 1, COMPUTE_DTYPE)
        b_prob = _probabilities(b_q_value, b_q_rest, b_value, b_rest, b_lse, m_valid, scale_log2, DOT_PRECISION)
        b_d_prob = tl.dot(b_d_out, tl.trans(b_value), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T] dout.V
        b_d_logits = b_prob * (b_share[:, None] * (b_d_prob - b_delta[:, None]) + b_d_lse[:, None])
        b_d_queries = b_d_logits.to(COMPUTE_DTYPE)
        b_dq_value = tl.dot(b_d_queries, b_value, b_dq_value, input_precision=DOT_PRECISION)
        b_dq_rest = tl.dot(b_d_queries, b_rest, b_dq_rest, input_precision=DOT_PRECISION)

        b_d_keys = tl.trans((b_d_logits * sm_scale).to(COMPUTE_DTYPE))  # [BLOCK_T, BLOCK_H]
        b_shared_prob = tl.trans((b_prob * b_share[:, None]).to(COMPUTE_DTYPE))  # [BLOCK_T, BLOCK_H] f P^T
        if DETERMINISTIC:
            p_slots = p_block + o_t.to(tl.int64)[:, None] * stride_c_t
            m_slot = (o_t < topk)[:, None]
        else:
            # One lane per (slot, column): a row selected twice in this block gets both adds.
            p_slots = p_dkv + b_row.to(tl.int64)[:, None] * stride_dkv
            m_slot = m_valid[:, None]
        for c in tl.static_range(0, D_V, CHUNK):
            o_c = c + tl.arange(0, CHUNK)
            m_c = o_c < d_v
            b_q_chunk = tl.load(p_q_rows + o_c[None, :], mask=m_h[:, None] & m_c[None, :], other=0.0)
            b_d_out_chunk = tl.load(p_d_out_rows + o_c[None, :], mask=m_h[:, None] & m_c[None, :], other=0.0)
            b_part = tl.dot(b_d_keys, b_q_chunk.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
            b_part = tl.dot(b_shared_prob, b_d_out_chunk.to(COMPUTE_DTYPE), b_part, input_precision=DOT_PRECISION)
            if DETERMINISTIC:
                tl.store(p_slots + o_c[None, :], b_part, mask=m_slot & m_c[None, :])
            else:
                tl.atomic_add(p_slots + o_c[None, :], b_part, mask=m_slot & m_c[None, :], sem="relaxed")
        for c in tl.static_range(0, D_R, CHUNK):  # the rest columns are keys only: sm_scale dS^T q
            o_c = c + tl.arange(0, CHUNK)
            m_c = o_c < d_qk - d_v
            b_q_chunk = tl.load(p_q_rows + d_v + o_c[None, :], mask=m_h[:, None] & m_c[None, :], other=0.0)
            b_part = tl.dot(b_d_keys, b_q_chunk.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
            if DETERMINISTIC:
                tl.store(p_slots + d_v + o_c[None, :], b_part, mask=m_slot & m_c[None, :])
            else:
                tl.atomic_add(p_slots + d_v + o_c[None, :], b_part, mask=m_slot & m_c[None, :], sem="relaxed")

    p_dq_rows = p_dq + query.to(tl.int64) * stride_dq_m + o_h[:, None] * stride_dq_h
    tl.store(p_dq_rows + o_dv[None, :], b_dq_value * sm_scale, mask=m_h[:, None] & m_dv[None, :])
    tl.store(p_dq_rows + d_v + o_dr[None, :], b_dq_rest * sm_scale, mask=m_h[:, None] & m_dr[None, :])


def fused_backward_config(h: int, topk: int, d_v: int, d_qk: int, dtype) -> dict:
    """Block sizes of :func:`_fused_backward_kernel`.

    At the V3.2 shape (bf16, d_v 512 + 64) the sm_90 compile fits 32 heads x 16 slots at 8 warps
    without spilling (249 registers): the ``[32, 576]`` float32 dq is 72 registers a thread, the
    loop-invariant q and dout operands 68 more, and 32-column contribution chunks keep the
    per-element atomic addresses few. 64 heads (half the atomics) spill kilobytes whatever the slot
    block or chunk; 32 slots spill 56 bytes. float32 operands (3xTF32) take 16 x 16. Checked in
    tests/test_triton_backward_fused.py (registers, spills, shared memory).
    """
    d_v_pad = max(16, triton.next_power_of_2(d_v))
    d_rest_pad = max(16, triton.next_power_of_2(max(d_qk - d_v, 1)))
    wide = d_v_pad >= 256
    fp32 = dtype == torch.float32
    block_h = max(16, min(16 if fp32 else 32, triton.next_power_of_2(max(h, 1))))
    block_t = 16 if wide or fp32 else max(16, min(32, triton.next_power_of_2(max(topk, 1))))
    return dict(BLOCK_H=block_h, BLOCK_T=block_t, D_V=d_v_pad, D_R=d_rest_pad, CHUNK=min(32, d_v_pad, d_rest_pad),
                num_warps=8 if wide else 4, num_stages=1)


def fused_sparse_mla_backward(q, kv, indices, out, lse, d_out, sm_scale: float, d_v: int, topk_length=None,
                              attn_sink=None, d_lse=None, *, deterministic: bool = False,
                              config: dict | None = None):
    """``(dq, dkv)`` float32, plus ``d_attn_sink`` ``[h]`` with ``attn_sink``; see
    :func:`dsa_ref.sparse_mla_backward`. ``config`` overrides :func:`fused_backward_config`."""
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    q, kv, indices, topk_length = _prepare(q, kv, indices, topk_length)
    d_out = d_out if d_out.stride(-1) == 1 else d_out.contiguous()
    lse, delta, share = _head_stats(out, lse, d_out, attn_sink)
    d_lse = None if d_lse is None else d_lse.to(torch.float32).contiguous()
    dq = torch.empty((s_q, h, d_qk), dtype=torch.float32, device=q.device)
    dkv = torch.zeros((s_kv, d_qk), dtype=torch.float32, device=q.device)
    results = (dq, dkv)
    if attn_sink is not None:
        d_sink = -torch.where(torch.isneginf(lse), 0.0, delta * (1.0 - share)).sum(dim=0)
        results += (d_sink.to(torch.float32),)
    if s_q == 0 or h == 0:
        return results
    if topk == 0:
        dq.zero_()
        return results

    launch = {**fused_backward_config(h, topk, d_v, d_qk, q.dtype), **(config or {})}
    head_blocks = triton.cdiv(h, launch["BLOCK_H"])
    dummy = lse
    arguments = dict(HAS_TOPK_LENGTH=topk_length is not None, HAS_D_LSE=d_lse is not None,
                     COMPUTE_DTYPE=_COMPUTE_DTYPES[q.dtype], DOT_PRECISION=dot_precision(q.dtype), **launch)

    def run(query_begin, n_queries, contributions, stride_c_b, stride_c_t):
        _fused_backward_kernel[(n_queries, head_blocks)](
            q, kv, indices, topk_length if topk_length is not None else dummy, lse, delta, share,
            d_lse if d_lse is not None else dummy, d_out, dq, dkv, contributions,
            h, s_kv, topk, d_v, d_qk, query_begin, sm_scale * LOG2E, sm_scale,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
            dq.stride(0), dq.stride(1), dkv.stride(0), stride_c_b, stride_c_t,
            DETERMINISTIC=contributions is not dkv, **arguments)

    if not deterministic:
        run(0, s_q, dkv, 0, 0)
        return results

    per_query = 4 * head_blocks * topk * d_qk
    chunk = max(1, min(s_q, CONTRIBUTION_BUFFER_BYTES // per_query))
    contributions = torch.empty((chunk, head_blocks, topk, d_qk), dtype=torch.float32, device=q.device)
    slot = torch.arange(topk, device=q.device)
    for begin in range(0, s_q, chunk):
        end = min(s_q, begin + chunk)
        run(begin, end - begin, contributions, contributions.stride(1), contributions.stride(2))
        rows = indices[begin:end].to(torch.int64)
        if topk_length is not None:
            rows = torch.where(slot[None, :] < topk_length[begin:end, None], rows, -1)
        rows = rows[:, None, :].expand(end - begin, head_blocks, topk)  # the buffer's (query, head block, slot) order
        segment_sum(dkv, contributions[: end - begin].view(-1, d_qk), rows.reshape(-1))
    return results
