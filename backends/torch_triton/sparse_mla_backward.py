"""Sparse MLA backward (paper eq. 2, MQA mode) and the indexer's attention target, FlashAttention-2
style over the gathered rows of each query.

.. math::

    P_t = e^{\\ell_t - \\mathrm{lse}}, \\quad
    dS_t = P_t\\,\\big(f\\,(dout\\cdot V_t - D) + d\\mathrm{lse}\\big), \\quad
    dq = \\mathrm{sm\\_scale}\\sum_t dS_t K_t, \\quad
    dkv_{\\mathrm{idx}_t} \\mathrel{+}= \\mathrm{sm\\_scale}\\sum_h dS_t\\, q + [:d_v]\\ f\\,P_t\\, dout

with ``D = Σ_d dout · out`` and ``f = 1 / (1 + exp(sink - lse))`` (1 without a sink) precomputed per
(query, head); see :func:`dsa_ref.reference.sparse_mla_backward` for the spec.

How the work is laid out. The probabilities are recomputed from the forward's lse (base 2, log2 e
folded into the scale, as the forward). Two kernels share that recomputation, so neither holds
both a ``[heads, d_qk]`` and a ``[slots, d_qk]`` float32 accumulator (the forward's ``[64, 512]``
one is already the register limit):

* :func:`_dq_kernel`: one query and ``BLOCK_H`` heads per program, walking over the slots; it
  accumulates ``dq`` ``[BLOCK_H, d_qk]`` and writes it once.
* :func:`_dkv_kernel`: one query and ``BLOCK_T`` slots per program, walking over *all* heads of the
  query in a fixed order; it accumulates the slots' row contributions ``[BLOCK_T, d_qk]`` summed
  over heads, then either adds them to a float32 ``dkv`` with ``tl.atomic_add`` (default: the
  order of the adds, and so the last bits, changes from run to run), or, deterministic, stores
  them to a buffer (chunks of queries bound its size). The buffer's (row, slot) pairs are then
  sorted by row with a stable sort and :func:`segment_sum` adds each row's contributions in that
  fixed order: no float atomics anywhere, so two runs are bitwise equal.

Invalid slots (index ``< 0`` or ``>= s_kv``, or past ``topk_length``) point at row 0 and are masked:
they load zeros, contribute exactly 0 and are never dereferenced or written.

These two kernels are the ``kernel="split"`` path, the default; the one-pass kernel of
:mod:`.sparse_mla_backward_fused` (``kernel="fused"``) is measured beside it (see :func:`default_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_ref.reference.formats import KV_LATENT_DIM, KV_ROPE_DIM, KV_SCALE_BLOCK

from .precision import dot_precision
from .sparse_mla import _COMPUTE_DTYPES, LOG2E, _load_rows, _slot_count

#: Bytes of float32 row contributions the deterministic mode buffers at a time (chunks of queries).
CONTRIBUTION_BUFFER_BYTES = 512 * 1024 * 1024


@triton.jit
def _probabilities(b_q_value, b_q_rest, b_value, b_rest, b_lse, m_valid, scale_log2,
                   DOT_PRECISION: tl.constexpr):
    """``P = exp(sm_scale q.K - lse)`` ``[heads, slots]``, 0 at invalid slots and padded heads
    (their lse is loaded as +inf)."""
    b_logits = tl.dot(b_q_value, tl.trans(b_value), input_precision=DOT_PRECISION)
    b_logits = tl.dot(b_q_rest, tl.trans(b_rest), b_logits, input_precision=DOT_PRECISION)
    b_prob = tl.exp2(b_logits * scale_log2 - b_lse[:, None] * 1.4426950408889634)
    return tl.where(m_valid[None, :], b_prob, 0.0)


@triton.jit
def _load_head_stats(p_lse, p_delta, p_share, p_d_lse, row, o_h, m_h, HAS_D_LSE: tl.constexpr):
    """lse, D, f and dlse of heads ``o_h`` of one query (all float32 ``[s_q, h]`` contiguous).
    Padded heads get lse = +inf (so P = 0) and zeros elsewhere."""
    b_lse = tl.load(p_lse + row + o_h, mask=m_h, other=float("inf"))
    b_delta = tl.load(p_delta + row + o_h, mask=m_h, other=0.0)
    b_share = tl.load(p_share + row + o_h, mask=m_h, other=0.0)
    if HAS_D_LSE:
        b_d_lse = tl.load(p_d_lse + row + o_h, mask=m_h, other=0.0)
    else:
        b_d_lse = tl.zeros_like(b_delta)
    return b_lse, b_delta, b_share, b_d_lse


@triton.jit
def _query_tiles(p_q, p_d_out, query, o_h, m_h, o_dv, o_dr, m_dv, m_dr, d_v,
                 stride_q_m, stride_q_h, stride_do_m, stride_do_h, COMPUTE_DTYPE: tl.constexpr):
    """One query's q (value and rest columns) and dout for heads ``o_h``, in the compute dtype;
    masked heads and columns load 0."""
    p_q_rows = p_q + query.to(tl.int64) * stride_q_m + o_h[:, None] * stride_q_h
    b_q_value = tl.load(p_q_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0).to(COMPUTE_DTYPE)
    b_q_rest = tl.load(p_q_rows + d_v + o_dr[None, :], mask=m_h[:, None] & m_dr[None, :], other=0.0).to(COMPUTE_DTYPE)
    p_d_out_rows = p_d_out + query.to(tl.int64) * stride_do_m + o_h[:, None] * stride_do_h
    b_d_out = tl.load(p_d_out_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0).to(COMPUTE_DTYPE)
    return b_q_value, b_q_rest, b_d_out


@triton.jit
def _dq_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_lse, p_delta, p_share, p_d_lse, p_d_out, p_dq,
    h, s_kv, topk, d_v, d_qk, scale_log2, sm_scale,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_do_m, stride_do_h, stride_dq_m, stride_dq_h,
    HAS_TOPK_LENGTH: tl.constexpr, HAS_D_LSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``dq`` of one query (axis 0) and ``BLOCK_H`` heads (axis 1)."""
    query = tl.program_id(0)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < h
    o_dv = tl.arange(0, D_V)
    o_dr = tl.arange(0, D_R)
    m_dv = o_dv < d_v
    m_dr = o_dr < d_qk - d_v

    b_q_value, b_q_rest, b_d_out = _query_tiles(p_q, p_d_out, query, o_h, m_h, o_dv, o_dr, m_dv, m_dr, d_v,
                                                 stride_q_m, stride_q_h, stride_do_m, stride_do_h, COMPUTE_DTYPE)
    b_lse, b_delta, b_share, b_d_lse = _load_head_stats(p_lse, p_delta, p_share, p_d_lse, query.to(tl.int64) * h,
                                                        o_h, m_h, HAS_D_LSE)

    n_slots = _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH)
    b_dq_value = tl.zeros((BLOCK_H, D_V), tl.float32)
    b_dq_rest = tl.zeros((BLOCK_H, D_R), tl.float32)
    p_index_row = p_indices + query.to(tl.int64) * stride_i_m
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
        b_d_logits = b_d_logits.to(COMPUTE_DTYPE)
        b_dq_value = tl.dot(b_d_logits, b_value, b_dq_value, input_precision=DOT_PRECISION)
        b_dq_rest = tl.dot(b_d_logits, b_rest, b_dq_rest, input_precision=DOT_PRECISION)

    p_dq_rows = p_dq + query.to(tl.int64) * stride_dq_m + o_h[:, None] * stride_dq_h
    tl.store(p_dq_rows + o_dv[None, :], b_dq_value * sm_scale, mask=m_h[:, None] & m_dv[None, :])
    tl.store(p_dq_rows + d_v + o_dr[None, :], b_dq_rest * sm_scale, mask=m_h[:, None] & m_dr[None, :])


@triton.jit
def _dkv_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_lse, p_delta, p_share, p_d_lse, p_d_out, p_dkv, p_contributions,
    h, s_kv, topk, d_v, d_qk, query_begin, scale_log2, sm_scale,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_do_m, stride_do_h, stride_dkv, stride_c_m, stride_c_t,
    HAS_TOPK_LENGTH: tl.constexpr, HAS_D_LSE: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Row contributions of ``BLOCK_T`` slots (axis 1) of query ``query_begin + axis 0``, summed over
    all heads in a fixed order; added atomically to ``dkv``, or (``DETERMINISTIC``) stored to the
    contribution buffer row ``axis 0``."""
    local_query = tl.program_id(0)
    query = query_begin + local_query
    o_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_dv = tl.arange(0, D_V)
    o_dr = tl.arange(0, D_R)
    m_dv = o_dv < d_v
    m_dr = o_dr < d_qk - d_v
    n_slots = _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH)
    # A block past topk_length has no valid slot: its buffer entries are never read.
    if tl.program_id(1) * BLOCK_T < n_slots:
        b_index = tl.load(p_indices + query.to(tl.int64) * stride_i_m + o_t, mask=o_t < n_slots, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_row = tl.where(m_valid, b_index, 0)
        b_value, b_rest = _load_rows(p_kv, b_row, m_valid, d_v, d_qk, stride_kv, o_dv, o_dr,
                                     False, BLOCK_T, D_V, D_R, 1, COMPUTE_DTYPE)
        b_dkv_value = tl.zeros((BLOCK_T, D_V), tl.float32)
        b_dkv_rest = tl.zeros((BLOCK_T, D_R), tl.float32)
        for head_begin in range(0, h, BLOCK_H):
            o_h = head_begin + tl.arange(0, BLOCK_H)
            m_h = o_h < h
            b_q_value, b_q_rest, b_d_out = _query_tiles(p_q, p_d_out, query, o_h, m_h, o_dv, o_dr, m_dv, m_dr, d_v,
                                                         stride_q_m, stride_q_h, stride_do_m, stride_do_h,
                                                         COMPUTE_DTYPE)
            b_lse, b_delta, b_share, b_d_lse = _load_head_stats(p_lse, p_delta, p_share, p_d_lse,
                                                                query.to(tl.int64) * h, o_h, m_h, HAS_D_LSE)
            b_prob = _probabilities(b_q_value, b_q_rest, b_value, b_rest, b_lse, m_valid, scale_log2,
                                    DOT_PRECISION)
            b_d_prob = tl.dot(b_d_out, tl.trans(b_value), input_precision=DOT_PRECISION)
            b_d_logits = b_prob * (b_share[:, None] * (b_d_prob - b_delta[:, None]) + b_d_lse[:, None])
            b_d_keys = tl.trans((b_d_logits * sm_scale).to(COMPUTE_DTYPE))  # [BLOCK_T, BLOCK_H]
            b_dkv_value = tl.dot(b_d_keys, b_q_value, b_dkv_value, input_precision=DOT_PRECISION)
            b_dkv_value = tl.dot(tl.trans((b_prob * b_share[:, None]).to(COMPUTE_DTYPE)), b_d_out, b_dkv_value,
                                 input_precision=DOT_PRECISION)  # V's share: f P^T dout
            b_dkv_rest = tl.dot(b_d_keys, b_q_rest, b_dkv_rest, input_precision=DOT_PRECISION)
        if DETERMINISTIC:
            p_rows = p_contributions + local_query.to(tl.int64) * stride_c_m + o_t.to(tl.int64)[:, None] * stride_c_t
            m_slot = (o_t < topk)[:, None]
            tl.store(p_rows + o_dv[None, :], b_dkv_value, mask=m_slot & m_dv[None, :])
            tl.store(p_rows + d_v + o_dr[None, :], b_dkv_rest, mask=m_slot & m_dr[None, :])
        else:
            # One lane per (slot, column): a row selected twice in this block gets both adds.
            p_rows = p_dkv + b_row.to(tl.int64)[:, None] * stride_dkv
            tl.atomic_add(p_rows + o_dv[None, :], b_dkv_value, mask=m_valid[:, None] & m_dv[None, :], sem="relaxed")
            tl.atomic_add(p_rows + d_v + o_dr[None, :], b_dkv_rest, mask=m_valid[:, None] & m_dr[None, :],
                          sem="relaxed")


@triton.jit
def _segment_sum_kernel(p_contributions, p_order, p_bounds, p_out, width, stride_c, stride_o,
                        BLOCK_D: tl.constexpr):
    """``out[row] += Σ contributions[order[j]]`` for ``j`` in ``[bounds[row], bounds[row + 1])``, in
    that order: each row (axis 0) and column block (axis 1) belongs to one program."""
    row = tl.program_id(0)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < width
    begin = tl.load(p_bounds + row)
    end = tl.load(p_bounds + row + 1)
    p_out_row = p_out + row.to(tl.int64) * stride_o + o_d
    b_sum = tl.load(p_out_row, mask=m_d, other=0.0)
    for j in range(begin, end):
        source = tl.load(p_order + j)
        b_sum += tl.load(p_contributions + source.to(tl.int64) * stride_c + o_d, mask=m_d, other=0.0)
    tl.store(p_out_row, b_sum, mask=m_d)


def segment_sum(out, contributions, rows) -> None:
    """``out[rows[j]] += contributions[j]`` for every ``j`` with ``0 <= rows[j] < out.shape[0]``,
    each row's contributions added in increasing ``j``: bitwise repeatable, no atomics.

    Args:
        out: float32 ``[n_rows, width]``, updated in place.
        contributions: float32 ``[n, width]`` (row stride free, columns contiguous).
        rows: int ``[n]``; entries outside ``[0, n_rows)`` are skipped (and their contributions never read).
    """
    n_rows, width = out.shape
    if rows.numel() == 0 or n_rows == 0:
        return
    rows = torch.where((rows >= 0) & (rows < n_rows), rows, n_rows).to(torch.int64)
    # A stable sort keeps each row's contributions in increasing j, whatever the sort's internals.
    sorted_rows, order = torch.sort(rows, stable=True)
    bounds = torch.searchsorted(sorted_rows, torch.arange(n_rows + 1, device=out.device, dtype=torch.int64))
    block_d = min(256, triton.next_power_of_2(max(width, 16)))
    _segment_sum_kernel[(n_rows, triton.cdiv(width, block_d))](
        contributions, order, bounds, out, width, contributions.stride(0), out.stride(0),
        BLOCK_D=block_d, num_warps=2)


def backward_config(h: int, topk: int, d_v: int, d_qk: int, dtype) -> dict:
    """Block sizes of the two kernels.

    ``dq``: 16 heads a program keep its ``[16, d_qk]`` float32 accumulator at 72 registers a thread
    (4 warps). ``dkv``: 32 slots a program, ``[32, d_v]`` float32 at 8 warps is 64 registers a
    thread; the heads go 32 at a time (16 for float32 operands, whose 3xTF32 halves double the
    shared memory). The sm_90 compile of these is checked in tests/test_triton_resources.py.
    """
    d_v_pad = max(16, triton.next_power_of_2(d_v))
    d_rest_pad = max(16, triton.next_power_of_2(max(d_qk - d_v, 1)))
    wide = d_v_pad >= 256
    fp32 = dtype == torch.float32
    slots = max(16, min(16 if fp32 else 32, triton.next_power_of_2(max(topk, 1))))
    return dict(
        dq=dict(BLOCK_H=16, BLOCK_T=slots, D_V=d_v_pad, D_R=d_rest_pad, num_warps=8 if wide else 4, num_stages=1),
        dkv=dict(BLOCK_H=16 if fp32 else 32, BLOCK_T=slots, D_V=d_v_pad, D_R=d_rest_pad,
                 num_warps=8 if wide else 4, num_stages=1),
    )


def _head_stats(out, lse, d_out, attn_sink):
    """``D = Σ_d dout · out`` and the sink share ``f`` per (query, head), float32 ``[s_q, h]``."""
    lse = lse.to(torch.float32).contiguous()
    delta = (d_out.to(torch.float32) * out.to(torch.float32)).sum(dim=-1).contiguous()
    if attn_sink is None:
        share = torch.where(torch.isneginf(lse), 0.0, 1.0)
    else:
        share = torch.sigmoid(lse - attn_sink.to(torch.float32)[None, :])  # 1 / (1 + exp(sink - lse))
    return lse, delta, share.to(torch.float32).contiguous()


def _prepare(q, kv, indices, topk_length):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    if indices.stride(-1) != 1 or indices.dtype not in (torch.int32, torch.int64):
        indices = indices.contiguous()
    if topk_length is not None:
        topk_length = topk_length.to(torch.int32).contiguous()
    return q, kv, indices, topk_length


KERNELS = ("fused", "split", "gluon", "gluon_deterministic")


def default_kernel(dtype) -> str:
    """The split kernels, for every dtype. The fused one-pass kernel (:mod:`.sparse_mla_backward_fused`,
    ``kernel="fused"``) does no recomputation but ran slower on the H200 (2026-12-01, S 4096, SKV 8192,
    topk 2048, bf16, same run as TileLang's 189-192 TFLOP/s): 34.0 / 34.1 TFLOP/s at h 64 / 128
    against the split kernels' 53.7 / 57.4 (an earlier run of the same day), and its deterministic
    mode took 1.37-1.38x its default, over the 1.3x goal the split kernels meet (1.07-1.13x).
    It takes 32 heads per program (64 spill registers), which quadruples the float32 atomics at
    h 128 and keeps the products on mma.sync: see NOTES.md, version 5. float32 operands spill in
    the fused tile as well."""
    del dtype  # one choice for every dtype today; the argument is where a measured exception goes
    return "split"


def sparse_mla_backward(q, kv, indices, out, lse, d_out, sm_scale: float, d_v: int, topk_length=None,
                        attn_sink=None, d_lse=None, *, deterministic: bool = False, config: dict | None = None,
                        kernel: str | None = None):
    """``(dq, dkv)`` float32, plus ``d_attn_sink`` ``[h]`` with ``attn_sink``; see
    :func:`dsa_ref.sparse_mla_backward`. ``q`` and ``kv`` share one float dtype.

    ``kernel``: ``"fused"`` (:func:`.sparse_mla_backward_fused.fused_sparse_mla_backward`),
    ``"split"`` (the dq and dkv kernels below), ``"gluon"`` (the Hopper kernel of
    :mod:`.sparse_mla_backward_gluon`; ValueError with its reasons where it does not apply),
    ``"gluon_deterministic"`` (that kernel storing its row gradients, summed per row in a fixed order by
    :mod:`.sparse_mla_backward_rows`: bitwise repeatable in either mode; same inputs) or None
    (:func:`default_kernel`). ``config``
    overrides the chosen kernel's block sizes: :func:`backward_config`'s ``{"dq": {...}, "dkv": {...}}``
    for the split kernels, :func:`.sparse_mla_backward_fused.fused_backward_config`'s keys for the fused one."""
    if kernel is None:
        kernel = default_kernel(q.dtype)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not a sparse MLA backward kernel (expected one of {KERNELS} or None)")
    if kernel == "fused":
        from .sparse_mla_backward_fused import fused_sparse_mla_backward

        return fused_sparse_mla_backward(q, kv, indices, out, lse, d_out, sm_scale, d_v, topk_length, attn_sink,
                                         d_lse, deterministic=deterministic, config=config)
    if kernel in ("gluon", "gluon_deterministic"):
        from .sparse_mla_backward_gluon import gluon_backward_applies

        reasons = gluon_backward_applies(q, kv, d_v, indices, topk_length, attn_sink, d_out,
                                         deterministic=deterministic and kernel == "gluon")
        if reasons:
            raise ValueError("the Gluon sparse MLA backward does not apply: " + "; ".join(reasons))
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
    if kernel in ("gluon", "gluon_deterministic"):
        from .sparse_mla_backward_gluon import sparse_mla_backward_gluon

        sparse_mla_backward_gluon(q, kv, indices, d_out, lse, delta, share, sm_scale, topk_length, d_lse,
                                  dq=dq, dkv=dkv, deterministic=kernel == "gluon_deterministic")
        return results

    configs = backward_config(h, topk, d_v, d_qk, q.dtype)
    for name, overrides in (config or {}).items():
        configs[name] = {**configs[name], **overrides}
    common = dict(HAS_TOPK_LENGTH=topk_length is not None, HAS_D_LSE=d_lse is not None,
                  COMPUTE_DTYPE=_COMPUTE_DTYPES[q.dtype], DOT_PRECISION=dot_precision(q.dtype))
    dummy = lse
    topk_length_arg = topk_length if topk_length is not None else dummy
    d_lse_arg = d_lse if d_lse is not None else dummy
    scale_log2 = sm_scale * LOG2E

    dq_config = configs["dq"]
    _dq_kernel[(s_q, triton.cdiv(h, dq_config["BLOCK_H"]))](
        q, kv, indices, topk_length_arg, lse, delta, share, d_lse_arg, d_out, dq,
        h, s_kv, topk, d_v, d_qk, scale_log2, sm_scale,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
        dq.stride(0), dq.stride(1), **common, **dq_config)

    dkv_config = configs["dkv"]
    slot_blocks = triton.cdiv(topk, dkv_config["BLOCK_T"])
    launch = dict(HAS_D_LSE=d_lse is not None, **{k: v for k, v in common.items() if k != "HAS_D_LSE"},
                  **dkv_config)
    if not deterministic:
        _dkv_kernel[(s_q, slot_blocks)](
            q, kv, indices, topk_length_arg, lse, delta, share, d_lse_arg, d_out, dkv, dkv,
            h, s_kv, topk, d_v, d_qk, 0, scale_log2, sm_scale,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
            dkv.stride(0), 0, 0, DETERMINISTIC=False, **launch)
        return results

    chunk = max(1, min(s_q, CONTRIBUTION_BUFFER_BYTES // (4 * topk * d_qk)))
    contributions = torch.empty((chunk, topk, d_qk), dtype=torch.float32, device=q.device)
    slot = torch.arange(topk, device=q.device)
    for begin in range(0, s_q, chunk):
        end = min(s_q, begin + chunk)
        _dkv_kernel[(end - begin, slot_blocks)](
            q, kv, indices, topk_length_arg, lse, delta, share, d_lse_arg, d_out, dkv, contributions,
            h, s_kv, topk, d_v, d_qk, begin, scale_log2, sm_scale,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
            dkv.stride(0), contributions.stride(0), contributions.stride(1), DETERMINISTIC=True, **launch)
        rows = indices[begin:end].to(torch.int64)
        if topk_length is not None:
            rows = torch.where(slot[None, :] < topk_length[begin:end, None], rows, -1)
        segment_sum(dkv, contributions[: end - begin].view(-1, d_qk), rows.reshape(-1))
    return results


# --------------------------------------------------------------------------- attention target
@triton.jit
def _head_sum_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_lse, p_head_sum,
    h, s_kv, topk, d_v, d_qk, scale_log2,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_s_m,
    HAS_TOPK_LENGTH: tl.constexpr, KV_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
    SCALE_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``Σ_h P[query, h, t]`` for ``BLOCK_T`` slots (axis 1) of one query (axis 0); 0 at invalid slots."""
    query = tl.program_id(0)
    o_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_dv = tl.arange(0, D_V)
    o_dr = tl.arange(0, D_R)
    m_dv = o_dv < d_v
    m_dr = o_dr < d_qk - d_v
    n_slots = _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH)
    b_index = tl.load(p_indices + query.to(tl.int64) * stride_i_m + o_t, mask=o_t < n_slots, other=-1)
    m_valid = (b_index >= 0) & (b_index < s_kv)
    b_row = tl.where(m_valid, b_index, 0)
    b_value, b_rest = _load_rows(p_kv, b_row, m_valid, d_v, d_qk, stride_kv, o_dv, o_dr,
                                 KV_FP8, BLOCK_T, D_V, D_R, SCALE_BLOCKS, COMPUTE_DTYPE)
    b_head_sum = tl.zeros((BLOCK_T,), tl.float32)
    for head_begin in range(0, h, BLOCK_H):
        o_h = head_begin + tl.arange(0, BLOCK_H)
        m_h = o_h < h
        p_q_rows = p_q + query.to(tl.int64) * stride_q_m + o_h[:, None] * stride_q_h
        b_q_value = tl.load(p_q_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0).to(COMPUTE_DTYPE)
        b_q_rest = tl.load(p_q_rows + d_v + o_dr[None, :], mask=m_h[:, None] & m_dr[None, :], other=0.0)
        b_lse = tl.load(p_lse + query.to(tl.int64) * h + o_h, mask=m_h, other=float("inf"))
        b_prob = _probabilities(b_q_value, b_q_rest.to(COMPUTE_DTYPE), b_value, b_rest, b_lse, m_valid, scale_log2,
                                DOT_PRECISION)
        b_head_sum += tl.sum(tl.where(m_h[:, None], b_prob, 0.0), axis=0)
    tl.store(p_head_sum + query.to(tl.int64) * stride_s_m + o_t, b_head_sum, mask=o_t < topk)


def attention_target(q, kv, indices, lse, sm_scale: float, topk_length=None):
    """float32 ``[s_q, topk]``; see :func:`dsa_ref.attention_target`. ``kv`` in q's dtype or the packed
    FP8 cache (uint8 ``[s_kv, 656]``, with bf16 or float32 queries)."""
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    kv_fp8 = kv.dtype == torch.uint8
    d_v = KV_LATENT_DIM if kv_fp8 else min(512, d_qk)
    q, kv, indices, topk_length = _prepare(q, kv, indices, topk_length)
    lse = lse.to(torch.float32).contiguous()
    head_sum = torch.empty((s_q, topk), dtype=torch.float32, device=q.device)
    if s_q == 0 or topk == 0:
        return head_sum.zero_()
    if h == 0:
        head_sum.zero_()
    else:
        fp32 = q.dtype == torch.float32
        d_v_pad = KV_LATENT_DIM if kv_fp8 else max(16, triton.next_power_of_2(d_v))
        d_rest_pad = KV_ROPE_DIM if kv_fp8 else max(16, triton.next_power_of_2(max(d_qk - d_v, 1)))
        block_t = max(16, min(32, triton.next_power_of_2(topk)))
        _head_sum_kernel[(s_q, triton.cdiv(topk, block_t))](
            q, kv, indices, topk_length if topk_length is not None else lse, lse, head_sum,
            h, s_kv, topk, d_v, d_qk, sm_scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), head_sum.stride(0),
            HAS_TOPK_LENGTH=topk_length is not None, KV_FP8=kv_fp8,
            BLOCK_H=16 if fp32 else 32, BLOCK_T=block_t, D_V=d_v_pad, D_R=d_rest_pad,
            SCALE_BLOCKS=KV_LATENT_DIM // KV_SCALE_BLOCK, COMPUTE_DTYPE=_COMPUTE_DTYPES[q.dtype],
            DOT_PRECISION=dot_precision(q.dtype), num_warps=8 if d_v_pad >= 256 else 4, num_stages=1)
    total = head_sum.sum(dim=1, keepdim=True)  # [s_q, 1]
    target = torch.where(total > 0, head_sum / torch.where(total > 0, total, 1.0), 0.0)
    return torch.where(torch.isnan(total), float("nan"), target)  # NaN in an input is reported, not hidden
