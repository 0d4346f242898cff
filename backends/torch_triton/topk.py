"""Top-k selection kernel: a radix select over order-preserving integer keys, two reads of a row.

Each program owns one row. Scores become unsigned 32-bit keys whose integer order is the float
order (flip every bit of a negative float, set the sign bit of a positive one); ``-inf`` and NaN,
which may never be selected, become key 0 and ``-0.0`` is folded into ``+0.0`` so that equal
scores get equal keys.

1. Coarse pass (the one read from device memory): a 256-bin histogram of a coarse digit, the top
   byte of the order key of the score rounded to float16 (sign, 5 exponent bits, 2 mantissa
   bits). Rounding is monotone, so the digit is too, and its bins are narrow where scores live:
   for 32768 normal scores and k 2048 the threshold bin holds about 900 keys (the top byte of the
   float32 itself, sign and 7 exponent bits, would leave about 4500).
2. Compaction (the second read, mostly from L2): keys in bins above the threshold bin are written
   out, compacted with a prefix sum; the threshold bin's keys (the candidates) go, in index
   order, to a scratch row of ``CANDIDATES`` slots.
3. Refinement in registers: the candidates are loaded once and the classic radix select, 8 bits a
   pass from the most significant, pins down the exact threshold key ``T``; a pass stops early
   once the chosen bin is taken whole. Candidates above ``T`` are written, then the first
   ``topk - (number above T)`` equal to it, lower index first (the spec's tie rule).

A row whose threshold bin holds more than ``CANDIDATES`` keys refines over the row itself instead
(the same passes, each a read of the row). Slots beyond the number of selectable keys get ``-1``.

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
BINS = 1 << RADIX_BITS
#: Scratch slots of a program for the candidates (rows whose candidates do not fit take the fallback).
CANDIDATES = 8192
#: The sample that sets the cut: this many runs of 32 consecutive scores, spread over the row.
SAMPLE_RUNS = 32
#: Programs per SM: each loops over rows (so that the scratch rows stay few).
PROGRAMS_PER_SM = 8


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
def _coarse_digit(b_scores):
    """int32 in [0, 256): top byte of the order key of the score rounded to float16; monotone."""
    b_scores = tl.where(b_scores == 0.0, 0.0, b_scores)
    b_scores = tl.minimum(tl.maximum(b_scores, -65504.0), 65504.0)  # float16's finite range (monotone)
    b_half = b_scores.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    b_key = tl.where((b_half >> 15) != 0, b_half ^ 0xFFFF, b_half | 0x8000)
    return (b_key >> 8).to(tl.int32)


@triton.jit
def _choose_bin(b_hist, k_left, BINS: tl.constexpr):
    """(bin, keys in higher bins, keys in the bin) of the k_left-th largest key of a histogram."""
    o_bin = tl.arange(0, BINS)
    total = tl.sum(b_hist, axis=0)
    b_above = total - tl.cumsum(b_hist, axis=0)  # [BINS] keys in higher bins
    m_bin = (b_above < k_left) & (b_above + b_hist >= k_left)
    chosen = tl.max(tl.where(m_bin, o_bin, -1), axis=0)
    above = tl.sum(tl.where(o_bin == chosen, b_above, 0), axis=0)
    in_bin = tl.sum(tl.where(o_bin == chosen, b_hist, 0), axis=0)
    return chosen, above, in_bin


@triton.jit
def _select_by_coarse_histogram(p_row, p_out, p_cand_key, p_cand_index, begin, end, topk,
                                BLOCK: tl.constexpr, RADIX: tl.constexpr, BINS: tl.constexpr,
                                CANDIDATES: tl.constexpr):
    """The fallback when the sampled cut fails: two more reads of the row (see the module docstring)."""
    # ---- coarse histogram of the whole row
    b_hist = tl.zeros((BINS,), tl.int32)
    for start in range(begin, end, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
        b_hist += tl.histogram(_coarse_digit(b_scores), BINS, mask=_order_preserving_key(b_scores) != 0)
    selectable = tl.sum(b_hist, axis=0)
    if selectable <= topk:
        coarse = tl.zeros((), tl.int32)  # every selectable key: take the whole of bins >= 0
        in_bin = selectable
        k_left = selectable
    else:
        coarse, above, in_bin = _choose_bin(b_hist, topk, BINS)
        k_left = topk - above  # keys still to take from the threshold bin
    whole_bin = in_bin == k_left
    copy = (in_bin <= CANDIDATES) & (in_bin > k_left)

    # ---- keys above the threshold bin out (the whole bin too if it is taken whole); the
    # threshold bin's keys to the scratch row when they fit
    written = tl.zeros((), tl.int32)
    copied = tl.zeros((), tl.int32)
    for start in range(begin, end, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
        b_key = _order_preserving_key(b_scores)
        b_digit = _coarse_digit(b_scores)
        m_out = (b_key != 0) & ((b_digit > coarse) | (whole_bin & (b_digit == coarse)))
        b_slot = written + tl.cumsum(m_out.to(tl.int32), axis=0) - 1
        tl.store(p_out + b_slot, o_j, mask=m_out)
        written += tl.sum(m_out.to(tl.int32), axis=0)
        if copy:
            m_cand = (b_key != 0) & (b_digit == coarse)
            b_cand_slot = copied + tl.cumsum(m_cand.to(tl.int32), axis=0) - 1
            tl.store(p_cand_key + b_cand_slot, b_key.to(tl.int32, bitcast=True), mask=m_cand)
            tl.store(p_cand_index + b_cand_slot, o_j, mask=m_cand)
            copied += tl.sum(m_cand.to(tl.int32), axis=0)
    tl.debug_barrier()  # the scratch row, written above, is read below by other threads

    if copy:
        # ---- refine among the threshold bin's keys, held in registers
        o_c = tl.arange(0, CANDIDATES)
        m_c = o_c < in_bin
        b_ckey = tl.load(p_cand_key + o_c, mask=m_c, other=0).to(tl.uint32, bitcast=True)
        threshold, k_left = _kth_largest(b_ckey, m_c, k_left)
        _write_selected(p_out + written, b_ckey, m_c, threshold, k_left, p_cand_index + o_c)
    elif in_bin > k_left:
        # ---- the threshold bin does not fit the scratch row: radix passes over the row itself
        prefix = tl.zeros((), tl.uint32)
        done = tl.zeros((), tl.int32)
        for digit_pass in tl.static_range(32 // RADIX):
            shift = 32 - RADIX * (digit_pass + 1)
            if done == 0:
                b_rhist = tl.zeros((BINS,), tl.int32)
                for start in range(begin, end, BLOCK):
                    o_j = start + tl.arange(0, BLOCK)
                    b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
                    b_key = _order_preserving_key(b_scores)
                    m_match = (b_key != 0) & (_coarse_digit(b_scores) == coarse)
                    if digit_pass > 0:
                        m_match = m_match & ((b_key >> (shift + RADIX)) == prefix)
                    b_rhist += tl.histogram(((b_key >> shift) & (BINS - 1)).to(tl.int32), BINS, mask=m_match)
                chosen, r_above, r_in_bin = _choose_bin(b_rhist, k_left, BINS)
                k_left = k_left - r_above
                prefix = (prefix << RADIX) | chosen.to(tl.uint32)
                if r_in_bin == k_left:
                    done = tl.full((), 1, tl.int32)
                    k_left = tl.zeros((), tl.int32)
            else:
                prefix = prefix << RADIX
        # ---- the bin's keys above T, then the first k_left equal to T (k_left == 0: all >= T)
        ties_seen = tl.zeros((), tl.int32)
        for start in range(begin, end, BLOCK):
            o_j = start + tl.arange(0, BLOCK)
            b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
            b_key = _order_preserving_key(b_scores)
            m_cand = (b_key != 0) & (_coarse_digit(b_scores) == coarse)
            m_tie = m_cand & (b_key == prefix)
            b_tie_rank = ties_seen + tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
            m_take = tl.where(k_left == 0, m_cand & (b_key >= prefix),
                              m_cand & ((b_key > prefix) | (m_tie & (b_tie_rank < k_left))))
            b_slot = written + tl.cumsum(m_take.to(tl.int32), axis=0) - 1
            tl.store(p_out + b_slot, o_j, mask=m_take)
            written += tl.sum(m_take.to(tl.int32), axis=0)
            ties_seen += tl.sum(m_tie.to(tl.int32), axis=0)


@triton.jit
def _kth_largest(b_key, m_valid, k):
    """(T, ties): the k-th largest of the valid keys (k <= their number), by bisection on the key,
    and how many keys equal to T the top k hold."""
    b_key64 = b_key.to(tl.int64)
    low = tl.zeros((), tl.int64)  # invariant: at least k valid keys >= low
    high = tl.full((), 0xFFFFFFFF, tl.int64)
    for _ in range(32):
        middle = (low + high + 1) // 2
        enough = tl.sum((m_valid & (b_key64 >= middle)).to(tl.int32), axis=0) >= k
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle - 1)
    greater = tl.sum((m_valid & (b_key64 > low)).to(tl.int32), axis=0)
    return low.to(tl.uint32), k - greater


@triton.jit
def _write_selected(p_out, b_key, m_valid, threshold, ties, p_index):
    """Write (compacted) the indices of the valid keys above threshold and the first `ties` equal to it."""
    m_tie = m_valid & (b_key == threshold)
    b_tie_rank = tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
    m_take = (m_valid & (b_key > threshold)) | (m_tie & (b_tie_rank < ties))
    b_slot = tl.cumsum(m_take.to(tl.int32), axis=0) - 1
    tl.store(p_out + b_slot, tl.load(p_index, mask=m_take, other=0), mask=m_take)


@triton.jit
def _topk_row(p_row, p_out, p_cand_key, p_cand_index, begin, end, topk,
              BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, RADIX: tl.constexpr, BINS: tl.constexpr,
              CANDIDATES: tl.constexpr, SAMPLE_RUNS: tl.constexpr):
    length = end - begin + tl.zeros((), tl.int32)  # a tensor even when both bounds are plain ints
    # ---- 0. a cut from a sample: SAMPLE_RUNS runs of 32 consecutive keys spread over the row
    # (the whole row when it is that short). The cut is the coarse bin that holds the sample's
    # m-th largest key, m = 1.5 x the sample's expected share of the top k, plus a margin.
    o_s = tl.arange(0, SAMPLE_RUNS * 32)
    o_spread = (o_s // 32).to(tl.int64) * tl.maximum(length - 32, 0) // (SAMPLE_RUNS - 1) + o_s % 32
    o_sample = tl.where(length <= SAMPLE_RUNS * 32, o_s.to(tl.int64), o_spread)
    b_sample = tl.load(p_row + begin + o_sample, mask=o_sample < length, other=float("-inf"))
    b_sample_hist = tl.histogram(_coarse_digit(b_sample), BINS, mask=_order_preserving_key(b_sample) != 0)
    sampled = tl.minimum(length, SAMPLE_RUNS * 32).to(tl.int64)
    cut_rank = ((3 * topk * sampled) // (2 * tl.maximum(length, 1)) + 32).to(tl.int32)
    cut = tl.zeros((), tl.int32)  # 0: every selectable key
    if tl.sum(b_sample_hist, axis=0) >= cut_rank:
        cut, _, _ = _choose_bin(b_sample_hist, cut_rank, BINS)

    # ---- 1. the one read of the row: keys in the cut's bin or above to the scratch row, in index order
    n_cut = tl.zeros((), tl.int32)
    selectable = tl.zeros((), tl.int32)
    for start in range(begin, end, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
        b_key = _order_preserving_key(b_scores)
        m_cand = (b_key != 0) & (_coarse_digit(b_scores) >= cut)
        b_slot = n_cut + tl.cumsum(m_cand.to(tl.int32), axis=0) - 1
        m_store = m_cand & (b_slot < CANDIDATES)
        tl.store(p_cand_key + b_slot, b_key.to(tl.int32, bitcast=True), mask=m_store)
        tl.store(p_cand_index + b_slot, o_j, mask=m_store)
        n_cut += tl.sum(m_cand.to(tl.int32), axis=0)
        selectable += tl.sum((b_key != 0).to(tl.int32), axis=0)
    tl.debug_barrier()  # the scratch row, written above, is read below by other threads

    o_c = tl.arange(0, CANDIDATES)
    m_c = o_c < n_cut
    if (selectable <= topk) & (n_cut == selectable) & (n_cut <= CANDIDATES):
        # ---- every selectable key is taken, and all are in the scratch row
        tl.store(p_out + o_c, tl.load(p_cand_index + o_c, mask=m_c, other=0), mask=m_c)
    elif (n_cut >= topk) & (n_cut <= CANDIDATES):
        # ---- 2. the k-th largest candidate T; 3. the candidates above T, then ties, lower index first
        b_ckey = tl.load(p_cand_key + o_c, mask=m_c, other=0).to(tl.uint32, bitcast=True)
        threshold, ties = _kth_largest(b_ckey, m_c, topk)
        _write_selected(p_out, b_ckey, m_c, threshold, ties, p_cand_index + o_c)
    else:
        # ---- the sample misjudged the row (or it has at most k selectable keys, not all copied)
        _select_by_coarse_histogram(p_row, p_out, p_cand_key, p_cand_index, begin, end, topk,
                                    BLOCK, RADIX, BINS, CANDIDATES)
    for start in range(tl.minimum(selectable, topk), topk, BLOCK_K):
        o_slot = start + tl.arange(0, BLOCK_K)
        tl.store(p_out + o_slot, tl.full((BLOCK_K,), -1, tl.int32), mask=o_slot < topk)
    tl.debug_barrier()  # the next row of this program reuses the scratch row


@triton.jit
def _topk_kernel(
    p_scores, p_key_start, p_key_end, p_indices, p_cand_key, p_cand_index,
    rows, s_kv, topk, stride_s_m, stride_i_m,
    HAS_RANGES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, RADIX: tl.constexpr,
    BINS: tl.constexpr, CANDIDATES: tl.constexpr, SAMPLE_RUNS: tl.constexpr,
):
    # Persistent: program p takes rows p, p + programs, ...; its scratch row is its own.
    program = tl.program_id(0)
    p_cand_key += program.to(tl.int64) * CANDIDATES
    p_cand_index += program.to(tl.int64) * CANDIDATES
    for row in range(program, rows, tl.num_programs(0)):
        if HAS_RANGES:
            begin = tl.load(p_key_start + row)
            end = tl.load(p_key_end + row)
        else:
            begin = 0
            end = s_kv
        row64 = row + tl.zeros((), tl.int64)  # 64-bit offsets (a plain int under the interpreter)
        _topk_row(p_scores + row64 * stride_s_m, p_indices + row64 * stride_i_m,
                  p_cand_key, p_cand_index, begin, end, topk,
                  BLOCK, BLOCK_K, RADIX, BINS, CANDIDATES, SAMPLE_RUNS)


def topk_config(row_length: int) -> dict:
    block = max(16, min(2048, triton.next_power_of_2(max(row_length, 1))))
    return dict(BLOCK=block, BLOCK_K=256, RADIX=RADIX_BITS, BINS=BINS, CANDIDATES=CANDIDATES,
                SAMPLE_RUNS=SAMPLE_RUNS, PROGRAMS_PER_SM=PROGRAMS_PER_SM, num_warps=8 if block >= 2048 else 4,
                num_stages=2)


def topk_indices(scores, topk: int, key_start=None, key_end=None, *, out=None, config: dict | None = None):
    """int32 ``[rows, topk]``: each row's top-k set (any order), ``-1`` padding.

    Args:
        scores: float32 ``[rows, s_kv]`` (any row stride; unit column stride).
        key_start, key_end: optional int32 ``[rows]``: read only ``[key_start, key_end)`` of a row.
        out: optional int32 ``[rows, topk]`` view to write into.
        config: overrides of :func:`topk_config` (for tuning; ``CANDIDATES`` sets the scratch row).
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
    per_sm = config.pop("PROGRAMS_PER_SM")
    sms = torch.cuda.get_device_properties(scores.device).multi_processor_count if scores.is_cuda else 1
    programs = min(rows, per_sm * sms)
    candidates = config["CANDIDATES"]
    cand_key = torch.empty((programs, candidates), dtype=torch.int32, device=scores.device)  # uint32 keys
    cand_index = torch.empty((programs, candidates), dtype=torch.int32, device=scores.device)
    _topk_kernel[(programs,)](
        scores, key_start if has_ranges else scores, key_end if has_ranges else scores, out, cand_key, cand_index,
        rows, s_kv, topk, scores.stride(0), out.stride(0),
        HAS_RANGES=has_ranges, **config,
    )
    return out
