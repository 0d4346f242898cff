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
#: Scratch slots per row for the threshold bin's keys (rows whose bin holds more re-read the row).
CANDIDATES = 2048


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
def _narrow_prefix(b_hist, k_left, prefix, BINS: tl.constexpr, RADIX: tl.constexpr):
    """One radix pass's decision from the histogram of its digit: append the digit of the
    k_left-th largest matching key to the prefix. Returns (prefix, k_left, done); once that digit's
    bin is taken whole, done is 1 and k_left 0: every key >= the prefix is selected."""
    chosen, above, in_bin = _choose_bin(b_hist, k_left, BINS)
    k_left = k_left - above
    prefix = (prefix << RADIX) | chosen.to(tl.uint32)
    done = tl.zeros((), tl.int32)
    if in_bin == k_left:
        done = tl.full((), 1, tl.int32)
        k_left = tl.zeros((), tl.int32)
    return prefix, k_left, done


@triton.jit
def _topk_kernel(
    p_scores, p_key_start, p_key_end, p_indices, p_cand_key, p_cand_index,
    s_kv, topk, stride_s_m, stride_i_m,
    HAS_RANGES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, RADIX: tl.constexpr,
    BINS: tl.constexpr, CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0)
    p_row = p_scores + row.to(tl.int64) * stride_s_m
    p_out = p_indices + row.to(tl.int64) * stride_i_m
    p_cand_key += row.to(tl.int64) * CANDIDATES
    p_cand_index += row.to(tl.int64) * CANDIDATES
    if HAS_RANGES:
        begin = tl.load(p_key_start + row)
        end = tl.load(p_key_end + row)
    else:
        begin = 0
        end = s_kv

    # ---- 1. coarse histogram
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
    # Pass 2 writes out every key whose digit is >= lowest_out: the bins above the threshold bin,
    # and the threshold bin too when it is taken whole. One integer compare per key, so the mask
    # needs no scalar predicate broadcast against the block (Triton's interpreter materializes such
    # a broadcast as int32, which Triton >= 3.9 refuses as a load/store mask).
    lowest_out = tl.where(in_bin == k_left, coarse, coarse + 1)
    copy = (in_bin <= CANDIDATES) & (in_bin > k_left)

    # ---- 2. keys above the threshold bin out (the whole bin too if it is taken whole); the
    # candidates to the scratch row when they fit
    written = tl.zeros((), tl.int32)
    copied = tl.zeros((), tl.int32)
    for start in range(begin, end, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_scores = tl.load(p_row + o_j, mask=o_j < end, other=float("-inf"))
        b_key = _order_preserving_key(b_scores)
        b_digit = _coarse_digit(b_scores)
        m_out = (b_key != 0) & (b_digit >= lowest_out)
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
        # ---- 3. refine among the candidates, held in registers
        o_c = tl.arange(0, CANDIDATES)
        m_c = o_c < in_bin
        b_ckey = tl.load(p_cand_key + o_c, mask=m_c, other=0).to(tl.uint32, bitcast=True)
        prefix = tl.zeros((), tl.uint32)
        done = tl.zeros((), tl.int32)
        for digit_pass in tl.static_range(32 // RADIX):
            shift = 32 - RADIX * (digit_pass + 1)
            if done == 0:
                m_match = m_c
                if digit_pass > 0:
                    m_match = m_match & ((b_ckey >> (shift + RADIX)) == prefix)
                b_chist = tl.histogram(((b_ckey >> shift) & (BINS - 1)).to(tl.int32), BINS, mask=m_match)
                prefix, k_left, done = _narrow_prefix(b_chist, k_left, prefix, BINS, RADIX)
            else:
                prefix = prefix << RADIX
        # ---- 4. candidates above T, then the first k_left equal to T (k_left == 0: all >= T)
        m_tie = m_c & (b_ckey == prefix)
        b_tie_rank = tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
        m_take = tl.where(k_left == 0, m_c & (b_ckey >= prefix), m_c & ((b_ckey > prefix) | (m_tie & (b_tie_rank < k_left))))
        b_slot = written + tl.cumsum(m_take.to(tl.int32), axis=0) - 1
        b_index = tl.load(p_cand_index + o_c, mask=m_take, other=0)
        tl.store(p_out + b_slot, b_index, mask=m_take)
    elif in_bin > k_left:
        # ---- 3'. the threshold bin does not fit the scratch row: refine over the row itself
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
                prefix, k_left, done = _narrow_prefix(b_rhist, k_left, prefix, BINS, RADIX)
            else:
                prefix = prefix << RADIX
        # ---- 4'. as 4, over the row
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
    n_selected = tl.minimum(selectable, topk)
    for start in range(n_selected, topk, BLOCK_K):
        o_slot = start + tl.arange(0, BLOCK_K)
        tl.store(p_out + o_slot, tl.full((BLOCK_K,), -1, tl.int32), mask=o_slot < topk)


def topk_config(row_length: int) -> dict:
    # 1024-key blocks at 4 warps: the fastest of the sweep in docs/reports/topk_gpu_2026-11-28.md
    # (4096 rows x 32768, k 2048, H100: 1.65 ms, against 2.2 ms at 4096-key blocks and 8 warps).
    block = max(16, min(1024, triton.next_power_of_2(max(row_length, 1))))
    return dict(BLOCK=block, BLOCK_K=256, RADIX=RADIX_BITS, BINS=BINS, CANDIDATES=CANDIDATES,
                num_warps=4, num_stages=2)


def topk_indices(scores, topk: int, key_start=None, key_end=None, *, out=None, config: dict | None = None):
    """int32 ``[rows, topk]``: each row's top-k set (any order), ``-1`` padding.

    Args:
        scores: float32 ``[rows, s_kv]`` (any row stride; unit column stride).
        key_start, key_end: optional int32 ``[rows]``: read only ``[key_start, key_end)`` of a row.
        out: optional int32 ``[rows, topk]`` view to write into.
        config: overrides of :func:`topk_config` (for tuning; ``CANDIDATES`` sets the scratch row).

    The kernel takes ``CANDIDATES`` int32 key/index pairs of scratch per row (16 KB by default).
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
    candidates = config["CANDIDATES"]
    cand_key = torch.empty((rows, candidates), dtype=torch.int32, device=scores.device)  # uint32 keys
    cand_index = torch.empty((rows, candidates), dtype=torch.int32, device=scores.device)
    _topk_kernel[(rows,)](
        scores, key_start if has_ranges else scores, key_end if has_ranges else scores, out, cand_key, cand_index,
        s_kv, topk, scores.stride(0), out.stride(0),
        HAS_RANGES=has_ranges, **config,
    )
    return out


def chunked_topk_plan(rows: int, s_kv: int, topk: int, programs: int) -> int | None:
    """The chunk length of :func:`topk_indices_in_chunks` for these rows, or None for the one-pass
    kernel. The kernel runs one program per row, so rows fewer than the GPU's ``programs`` (its SMs)
    leave SMs idle while each program walks its whole row: the decode step's 64 rows of 128K scores
    use half an H200. Chunks are powers of two of at least 8192 and 8·topk, and a row must hold at
    least two of them: on the H200, 64 rows of the paged indexer's 128K scores at k 2048 took 0.587 /
    0.441 / 0.428 ms in chunks of 8192 / 16384 / 32768 against 1.072 in one pass (NOTES.md, version 8)."""
    chunk = triton.next_power_of_2(max(8192, 8 * topk))
    if rows >= programs or s_kv < 2 * chunk:
        return None
    return chunk


def topk_indices_in_chunks(scores, topk: int, chunk: int, *, select=None):
    """:func:`topk_indices` in two passes, for few long rows: the top-k of every ``chunk`` of a row (one
    program each), then the top-k of those ``ceil(s_kv / chunk) * topk`` candidates. ``select`` runs
    both passes instead of :func:`topk_indices` (a kernel with the same output order on ties).

    Exact: a key of the row's top-k is beaten by fewer than ``topk`` keys of the row, so by fewer than
    ``topk`` keys of its chunk, and is among its chunk's candidates. Ties keep the lower index: the first
    pass writes a chunk's keys of one score in index order (they share a coarse bin, and each bin's keys
    are written in index order), padding last, and the chunks are laid out in order, so among equal
    scores the second pass's lower candidate position is the lower key index; no sort is needed. Device
    work only (no host synchronization).
    """
    rows, s_kv = scores.shape
    chunks = triton.cdiv(s_kv, chunk)
    if scores.dtype != torch.float32:
        scores = scores.float()
    if s_kv != chunks * chunk or scores.stride(0) != s_kv or scores.stride(1) != 1:
        padded = torch.full((rows, chunks * chunk), float("-inf"), dtype=torch.float32, device=scores.device)
        padded[:, :s_kv] = scores  # [rows, chunks * chunk]   -inf past the row: never selected
        scores = padded
    select = select or topk_indices
    local = select(scores.view(rows * chunks, chunk), topk).view(rows, chunks, topk)  # -1 padding last
    offset = torch.arange(chunks, device=scores.device, dtype=torch.int32).mul_(chunk)[None, :, None]
    candidates = torch.where(local >= 0, local + offset, -1).view(rows, chunks * topk)  # [rows, C]   key indices
    candidate_scores = torch.where(candidates >= 0, scores.gather(1, candidates.clamp(min=0).long()),
                                   float("-inf"))  # [rows, C]
    chosen = select(candidate_scores, topk)  # [rows, topk]   candidate positions, -1 padding
    return torch.where(chosen >= 0, candidates.gather(1, chosen.clamp(min=0).long()), -1).to(torch.int32)
