"""Lightning indexer kernel (paper eq. 1): tensor-core scores with the ReLU, the head-weighted
sum and the key-range mask fused into the epilogue.

.. math:: I_{i,j} = \\mathrm{k\\_scale}_j \\sum_h w_{i,h}\\,\\mathrm{ReLU}(q_{i,h}\\cdot k_j)
          \\quad\\text{for key\\_start}_i \\le j < \\mathrm{key\\_end}_i,\\ \\text{else } -\\infty

How the work is laid out. One indexer key is shared by all ``h_i`` heads of a query, so a
program takes ``BLOCK_M`` queries and stacks their heads into one ``[BLOCK_M * HEADS, d_i]``
operand that stays on chip while the program walks over the keys ``BLOCK_N`` at a time. Each
step is one tensor-core product ``[BLOCK_M*HEADS, d_i] x [d_i, BLOCK_N]`` (fp8 e4m3 x e4m3 or
bf16/fp16/fp32, fp32 accumulate); the epilogue applies ReLU, multiplies by the head weights and
sums the ``HEADS`` rows of each query, then scales by ``k_scale`` and masks the key range. With
``H_I = 64`` and ``BLOCK_M = 2`` the product is 128 rows tall, a full Hopper warpgroup tile.

Only the keys inside the union of the block's ranges are computed; the rest of the row is
filled with ``-inf`` (or left unwritten on the fused path, whose top-k reads only each row's
range). DeepGEMM's ``fp8_mqa_logits`` computes the same thing (its ``ks``/``ke`` are our
``key_start``/``key_end``, its ``kv_scales`` our ``k_scale``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_ref_backends import kernel_switch

from .precision import dot_precision

#: Keys on the rows of the product and the stacked heads on its columns (``KEYS_ON_ROWS``) for the
#: 16-bit and fp8 operands: the head sum stays inside a quad of threads, as in the paged kernel
#: (indexer_paged.py), whose same change took it from 0.92 to 0.39 ms on the H200 (NOTES.md, version
#: 9). The default: on the H200 it runs the fp8 indexer at 4096 x 32K causal-end 2.65x faster than
#: heads on the rows (NOTES.md, version 10); set this False, or DSA_REF_TRITON_INDEXER_KEYS_ON_ROWS=0,
#: for the heads-on-rows product.
KEYS_ON_ROWS = True


@triton.jit
def _indexer_kernel(
    p_q, p_weights, p_k, p_k_scale, p_key_start, p_key_end, p_scores,
    s_q, s_kv, h_i, d_i, row_begin,
    stride_q_m, stride_q_h, stride_w_m, stride_k_n, stride_s_m,
    HAS_K_SCALE: tl.constexpr, FILL_MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KEYS_ON_ROWS: tl.constexpr = False,
):
    """Scores of queries ``row_begin + [pid*BLOCK_M, (pid+1)*BLOCK_M)`` against all their keys.

    ``p_scores`` row ``r`` holds query ``row_begin + r`` (the fused path passes a chunk buffer).
    """
    pid = tl.program_id(0)
    # Rows of the stacked operand: row r is head (r % HEADS) of query (r // HEADS).
    o_r = tl.arange(0, BLOCK_M * HEADS)
    o_query = row_begin + pid * BLOCK_M + o_r // HEADS
    o_head = o_r % HEADS
    m_r = (o_query < s_q) & (o_head < h_i)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i

    p_q_rows = p_q + o_query.to(tl.int64)[:, None] * stride_q_m + o_head[:, None] * stride_q_h + o_d[None, :]
    b_q = tl.load(p_q_rows, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M*HEADS, BLOCK_D]
    # Padded heads get weight 0 and q = 0, so they add exactly 0 to the sum.
    b_w = tl.load(p_weights + o_query.to(tl.int64) * stride_w_m + o_head, mask=m_r, other=0.0).to(tl.float32)

    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this program, relative to row_begin
    m_m = row_begin + o_m < s_q
    # Rows past s_q get an empty range, so they widen nothing below.
    b_start = tl.load(p_key_start + row_begin + o_m, mask=m_m, other=s_kv)  # [BLOCK_M]
    b_end = tl.load(p_key_end + row_begin + o_m, mask=m_m, other=0)  # [BLOCK_M]
    lo = tl.min(b_start, axis=0)
    hi = tl.max(b_end, axis=0)
    tile_lo = (lo // BLOCK_N) * BLOCK_N
    tile_hi = tl.where(hi > lo, hi, tile_lo)
    p_scores_rows = p_scores + o_m.to(tl.int64)[:, None] * stride_s_m  # [BLOCK_M, 1]
    p_scores_cols = p_scores + o_m.to(tl.int64)[None, :] * stride_s_m  # [1, BLOCK_M]

    for n in range(tile_lo, tile_hi, BLOCK_N):
        o_n = n + tl.arange(0, BLOCK_N)
        m_n = o_n < s_kv
        b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_k_n + o_d[None, :],
                      mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if KEYS_ON_ROWS:
            # Keys on the product's rows, the stacked heads on its columns: the sum over a query's
            # heads runs along an accumulator row, inside the four threads of a quad, instead of
            # across the warps that hold the rows of one query's heads (NOTES.md, version 10).
            b_logits = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M*HEADS]   k_j . q_{i,h}
            b_gated = tl.maximum(b_logits, 0.0, propagate_nan=tl.PropagateNan.ALL) * b_w[None, :]
            b_scores = tl.sum(tl.reshape(b_gated, (BLOCK_N, BLOCK_M, HEADS)), axis=2)  # [BLOCK_N, BLOCK_M]
            if HAS_K_SCALE:
                b_scale = tl.load(p_k_scale + o_n, mask=m_n, other=0.0).to(tl.float32)
                b_scores = b_scores * b_scale[:, None]
            m_visible = (o_n[:, None] >= b_start[None, :]) & (o_n[:, None] < b_end[None, :])
            b_scores = tl.where(m_visible, b_scores, float("-inf"))
            tl.store(p_scores_cols + o_n[:, None], b_scores, mask=m_n[:, None] & m_m[None, :])
        else:
            b_logits = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BLOCK_M*HEADS, BLOCK_N]   q_{i,h} . k_j, fp32
            # ReLU that keeps NaN (the reference's np.maximum does), then the head weight.
            b_gated = tl.maximum(b_logits, 0.0, propagate_nan=tl.PropagateNan.ALL) * b_w[:, None]
            b_scores = tl.sum(tl.reshape(b_gated, (BLOCK_M, HEADS, BLOCK_N)), axis=1)  # [BLOCK_M, BLOCK_N]
            if HAS_K_SCALE:
                b_scale = tl.load(p_k_scale + o_n, mask=m_n, other=0.0).to(tl.float32)
                b_scores = b_scores * b_scale[None, :]
            m_visible = (o_n[None, :] >= b_start[:, None]) & (o_n[None, :] < b_end[:, None])
            b_scores = tl.where(m_visible, b_scores, float("-inf"))
            tl.store(p_scores_rows + o_n[None, :], b_scores, mask=m_m[:, None] & m_n[None, :])

    if FILL_MASKED:
        # Keys outside every range of the block: -inf without computing anything.
        b_masked = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        for n in range(0, tile_lo, BLOCK_N):
            o_n = n + tl.arange(0, BLOCK_N)
            tl.store(p_scores_rows + o_n[None, :], b_masked, mask=m_m[:, None] & (o_n < s_kv)[None, :])
        tile_end = tl.cdiv(tile_hi, BLOCK_N) * BLOCK_N
        for n in range(tile_end, s_kv, BLOCK_N):
            o_n = n + tl.arange(0, BLOCK_N)
            tl.store(p_scores_rows + o_n[None, :], b_masked, mask=m_m[:, None] & (o_n < s_kv)[None, :])


def indexer_config(h_i: int, d_i: int, s_kv: int, dtype) -> dict:
    """Block sizes: ~128 stacked rows per program (one warpgroup tile), keys 64 at a time.

    Measured on an H100 (causal 16K, H_I 64, d_I 128): BLOCK_N 64 with 4 warps ran at 382 TFLOP/s
    (fp8) and 275 (bf16); BLOCK_N 128 with 8 warps at 321 and 267; BLOCK_N 256 at 228 (fp8).
    float32 operands (3xTF32) keep a high and a low half of every tile in shared memory: with
    BLOCK_N 64 that needs 256 KiB at d_I 128, over the H100's 227 KiB, so they take keys 32 at a
    time (192 KiB; the compiler's count, checked in tests/test_triton_resources.py).
    """
    fp8 = dtype == torch.float8_e4m3fn
    heads = triton.next_power_of_2(max(h_i, 1))
    block_m = max(1, 128 // heads)
    # tl.dot needs K >= 16 (>= 32 for fp8 on Hopper); padded columns are masked to 0.
    block_d = max(32 if fp8 else 16, triton.next_power_of_2(max(d_i, 1)))
    widest_n = 32 if dtype == torch.float32 else 64
    block_n = max(16, min(widest_n, triton.next_power_of_2(max(s_kv, 1))))
    # float32 keeps the heads on the rows: its 32-key tiles are too short for a warpgroup's 64 rows.
    keys_on_rows = dtype != torch.float32 and kernel_switch(KEYS_ON_ROWS, "DSA_REF_TRITON_INDEXER_KEYS_ON_ROWS")
    return dict(BLOCK_M=block_m, HEADS=heads, BLOCK_N=block_n, BLOCK_D=block_d, KEYS_ON_ROWS=keys_on_rows,
                num_warps=4, num_stages=3)


def lightning_indexer(q, weights, k, key_start, key_end, k_scale=None, *, out=None,
                      row_begin: int = 0, row_end: int | None = None, fill_masked: bool = True,
                      config: dict | None = None):
    """Launch the indexer on rows ``[row_begin, row_end)`` of ``q``.

    Args:
        q: ``[s_q, h_i, d_i]``; weights ``[s_q, h_i]``; k ``[s_kv, d_i]`` (same dtype as q; fp8
            e4m3 for both on the quantized path); key_start/key_end int32 ``[s_q]``;
            k_scale float32 ``[s_kv]`` or None.
        out: float32 ``[row_end - row_begin, >= s_kv]`` buffer to write into (allocated if None).
        fill_masked: write ``-inf`` outside each block's key ranges (False on the fused path).
        config: overrides of :func:`indexer_config` (for tuning).

    Returns:
        ``out``: float32 scores, row r for query ``row_begin + r``.
    """
    s_q, h_i, d_i = q.shape
    s_kv = k.shape[0]
    row_end = s_q if row_end is None else row_end
    rows = row_end - row_begin
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    if out is None:
        out = torch.empty((rows, s_kv), dtype=torch.float32, device=q.device)
    if rows == 0 or s_kv == 0:
        return out
    config = {**indexer_config(h_i, d_i, s_kv, q.dtype), **(config or {})}
    grid = (triton.cdiv(rows, config["BLOCK_M"]),)
    has_scale = k_scale is not None
    _indexer_kernel[grid](
        q, weights, k, k_scale if has_scale else weights, key_start, key_end, out,
        row_end, s_kv, h_i, d_i, row_begin,
        q.stride(0), q.stride(1), weights.stride(0), k.stride(0), out.stride(0),
        HAS_K_SCALE=has_scale, FILL_MASKED=fill_masked, DOT_PRECISION=dot_precision(q.dtype), **config,
    )
    return out
