"""Top-k selection kernel: a radix select over order-preserving integer keys.

Each program owns one row. Scores become unsigned 32-bit keys whose integer order is the float
order (flip every bit of a negative float, set the sign bit of a positive one); ``-inf`` and NaN,
which may never be selected, become key 0 and ``-0.0`` is folded into ``+0.0`` so that equal
scores get equal keys. The ``topk``-th largest key is then found one 8-bit digit at a time,
most significant first: a 256-bin histogram of the digit over the keys that match the digits
found so far says which bin holds the ``topk``-th key (count from the top). Four passes pin
down the threshold key ``T`` exactly; a final pass writes the index of every key above ``T`` and
of the first ``topk - (number above T)`` keys equal to ``T`` (lower index first, the spec's tie
rule), compacted with a prefix sum. A pass stops early once the chosen bin is taken whole.
Slots beyond the number of selectable keys get ``-1``.

The result is the top-k *set*, not sorted by score (as TileLang's radix top-k and FlashMLA's
consumers use it); the dsa-ref spec allows any order within a row.

With ``key_start``/``key_end`` a row reads only its range (the fused indexer -> top-k path,
whose score buffer is not written outside the ranges).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RADIX_BITS = 8


@triton.jit
def _order_preserving_key(b_scores):
    """float32 -> uint32, monotone in the float order; -inf and NaN -> 0 (never selected)."""
    b_scores = tl.where(b_scores == 0.0, 0.0, b_scores)  # -0.0 and +0.0 must tie
    b_bits = b_scores.to(tl.uint32, bitcast=True)
    # Negative floats: flip every bit (larger magnitude -> smaller key); positive: set the sign bit.
    b_flip = tl.where((b_bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    b_key = b_bits ^ b_flip
    return tl.where(b_scores > float("-inf"), b_key, 0)  # False for -inf and NaN


@triton.jit
def _topk_kernel(
    p_scores, p_key_start, p_key_end, p_indices,
    s_kv, topk, stride_s_m, stride_i_m,
    HAS_RANGES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, RADIX: tl.constexpr,
    BINS: tl.constexpr,
):
    row = tl.program_id(0)
    p_row = p_scores + row.to(tl.int64) * stride_s_m
    if HAS_RANGES:
        begin = tl.load(p_key_start + row)
        end = tl.load(p_key_end + row)
    else:
        begin = 0
        end = s_kv
    o_bin = tl.arange(0, BINS)

    # Radix passes: prefix = the digits of T found so far, k_left = how many of the keys that
    # match the prefix must still be taken, done = 1 once the remaining passes cannot change them.
    prefix = tl.zeros((), tl.uint32)
    k_left = topk + tl.zeros((), tl.int32)
    n_selected = tl.zeros((), tl.int32)  # min(topk, number of selectable keys), from the first pass
    done = tl.zeros((), tl.int32)
    for digit_pass in tl.static_range(32 // RADIX):
        shift = 32 - RADIX * (digit_pass + 1)  # bits below the digit of this pass
        if done == 0:
            b_hist = tl.zeros((BINS,), tl.int32)
            for start in range(begin, end, BLOCK):
                o_j = start + tl.arange(0, BLOCK)
                b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < end, other=float("-inf")))
                m_match = b_key != 0
                if digit_pass > 0:
                    m_match = m_match & ((b_key >> (shift + RADIX)) == prefix)
                b_digit = ((b_key >> shift) & (BINS - 1)).to(tl.int32)
                b_hist += tl.histogram(b_digit, BINS, mask=m_match)
            total = tl.sum(b_hist, axis=0)
            if digit_pass == 0:
                n_selected = tl.minimum(total, topk)
            if total <= k_left:
                # Fewer selectable keys than topk (first pass only): take them all (prefix 0).
                done = tl.full((), 1, tl.int32)
                k_left = tl.zeros((), tl.int32)
                prefix = prefix << RADIX
            else:
                b_above = total - tl.cumsum(b_hist, axis=0)  # [BINS] matching keys with a larger digit
                m_bin = (b_above < k_left) & (b_above + b_hist >= k_left)
                chosen = tl.max(tl.where(m_bin, o_bin, -1), axis=0)
                above = tl.sum(tl.where(o_bin == chosen, b_above, 0), axis=0)
                in_bin = tl.sum(tl.where(o_bin == chosen, b_hist, 0), axis=0)
                k_left = k_left - above
                prefix = (prefix << RADIX) | chosen.to(tl.uint32)
                if in_bin == k_left:
                    # The whole bin is taken: every key >= (prefix << shift) is selected.
                    done = tl.full((), 1, tl.int32)
                    k_left = tl.zeros((), tl.int32)
        else:
            prefix = prefix << RADIX
    # Now prefix is a full 32-bit key T. k_left == 0: take every selectable key >= T.
    # Otherwise: every key > T, and the first k_left keys equal to T in index order.
    p_out = p_indices + row.to(tl.int64) * stride_i_m
    written = tl.zeros((), tl.int32)
    ties_seen = tl.zeros((), tl.int32)
    for start in range(begin, end, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < end, other=float("-inf")))
        m_tie = (b_key == prefix) & (b_key != 0)
        b_tie_rank = ties_seen + tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
        m_take = tl.where(k_left == 0, (b_key >= prefix) & (b_key != 0),
                          (b_key > prefix) | (m_tie & (b_tie_rank < k_left)))
        b_slot = written + tl.cumsum(m_take.to(tl.int32), axis=0) - 1
        tl.store(p_out + b_slot, o_j, mask=m_take)
        written += tl.sum(m_take.to(tl.int32), axis=0)
        ties_seen += tl.sum(m_tie.to(tl.int32), axis=0)
    for start in range(n_selected, topk, BLOCK_K):
        o_slot = start + tl.arange(0, BLOCK_K)
        tl.store(p_out + o_slot, tl.full((BLOCK_K,), -1, tl.int32), mask=o_slot < topk)


def topk_config(row_length: int) -> dict:
    block = max(16, min(4096, triton.next_power_of_2(max(row_length, 1))))
    return dict(BLOCK=block, BLOCK_K=256, RADIX=RADIX_BITS, BINS=1 << RADIX_BITS,
                num_warps=8 if block >= 2048 else 4, num_stages=2)


def topk_indices(scores, topk: int, key_start=None, key_end=None, *, out=None, config: dict | None = None):
    """int32 ``[rows, topk]``: each row's top-k set (any order), ``-1`` padding.

    Args:
        scores: float32 ``[rows, s_kv]`` (any row stride; unit column stride).
        key_start, key_end: optional int32 ``[rows]``: read only ``[key_start, key_end)`` of a row.
        out: optional int32 ``[rows, topk]`` view to write into.
        config: overrides of :func:`topk_config` (for tuning).
    """
    rows, s_kv = scores.shape
    if scores.dtype != torch.float32:
        scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if out is None:
        out = torch.empty((rows, topk), dtype=torch.int32, device=scores.device)
    if rows == 0 or topk == 0:
        return out
    has_ranges = key_start is not None
    config = {**topk_config(s_kv), **(config or {})}
    _topk_kernel[(rows,)](
        scores, key_start if has_ranges else scores, key_end if has_ranges else scores, out,
        s_kv, topk, scores.stride(0), out.stride(0),
        HAS_RANGES=has_ranges, **config,
    )
    return out
