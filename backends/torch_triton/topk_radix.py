"""Top-k selection from a sampled cut: one read of a row, no histogram on the common path.

Measured on the H200 (NOTES.md, version 13: 1.636 -> 0.562 ms at 4096 x 32768, k 2048); the Triton
backend's top-k since the thorough conformance passed it there (``TritonBackend.radix_topk = False`` or
``DSA_REF_TRITON_RADIX_TOPK=0`` runs the histogram kernels of :mod:`.topk`).

The kernel of :mod:`.topk` spends most of its time in ``tl.histogram``: Triton lowers a 256-bin
histogram to nine warp ballots and, per lane, eight masked popcounts over them, about 90 instructions
per key and pass, so its two reads of a row are bound by instruction issue, not bytes (NOTES.md,
versions 1 and 3). This kernel keeps the order-preserving ``uint32`` keys of :mod:`.topk` (``-inf``
and NaN -> 0, never selected; ``-0.0`` tied with ``+0.0``) and replaces the histograms by counts,
each a compare and a block sum. One program per row:

0. A cut ``C`` from a sample of ``SAMPLE`` keys (runs of 32 consecutive ones spread over the row,
   coalesced; the whole row when it is that short): the key of the sample's rank that puts about
   ``(topk + CAP) / 2`` keys of the row at or above it, found by bisection on counts.
1. The one read of the row: keys above ``C`` (class A) go to a scratch row of ``CAP`` slots with
   their indices (one 8-byte store, ``key << 32 | index``), in index order, their slots from a
   prefix sum; keys equal to ``C`` (class B, a plateau at the cut) are only counted.
2. Then, with ``gt`` A keys and ``eq`` B keys:

   * ``topk < gt <= CAP``: the threshold key ``T`` (the topk-th largest) is above ``C``; the A keys
     are loaded into registers and ``T`` is bisected on their counts; A keys above ``T`` are taken,
     then the first of those equal to it, lower index first (the spec's tie rule).
   * ``gt <= topk <= gt + eq`` (or ``C`` is the lowest key, so the row has at most ``gt`` selectable
     keys): every A key and the first ``topk - gt`` B keys are taken, the B keys found by a second
     read of the row that stops once they are written.
   * otherwise the sample misjudged the row (fewer than ``topk`` keys at or above the cut, or more
     than ``CAP`` above it): the row is selected by a radix select over the row itself, 8 bits a
     pass from the top with ``tl.histogram`` (up to five reads; none of 1000 simulated normal rows of
     32768 keys at topk 2048 came here).

Selected keys of one score come out in index order, as with :mod:`.topk`, so the two-pass path of
:func:`.topk.topk_indices_in_chunks` keeps the lower index on ties with this kernel too. Slots beyond
the number of selectable keys get ``-1``. The result is the top-k *set*, unsorted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import topk as topk_onepass
from .topk import _narrow_prefix, _order_preserving_key

RADIX_BITS = 8
BINS = 1 << RADIX_BITS
#: Keys sampled for the cut. At 32768 keys and k 2048 the cut sits at the sample's 192nd key, so the
#: count above it has a relative spread of ~7% (binomial) and [k, CAP] is over four spreads wide.
SAMPLE = 2048
#: Largest scratch row (keys held in registers while the threshold is bisected); a larger topk
#: goes to :func:`.topk.topk_indices`.
MAX_CAP = 8192


@triton.jit
def _bisect_kth(b_key, rank, lo, hi, slack):
    """A key value t in [lo, hi] with ``rank <= count(b_key >= t) <= rank + slack``, or, if no
    value has such a count, the largest t with count(b_key >= t) >= rank (uint32; the caller ensures
    count(b_key >= lo) >= rank). Each step is one compare per key and one block sum; a step whose
    count lands in the window ends the search (normal scores, 32768 keys, k 2048, simulated on
    the CPU: ~12 steps for the cut and ~13 for T, of the 31 and 24 a full search takes)."""
    while lo < hi:
        mid = hi - ((hi - lo) >> 1)  # upper middle: the loop ends with lo == hi
        count = tl.sum((b_key >= mid).to(tl.int32), axis=0)
        enough = count >= rank
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, tl.where(count <= rank + slack, mid, hi), mid - 1)
    return lo


# topk is never specialized: Triton would pass a topk of 1 as a constant int, which has no .to().
@triton.jit(do_not_specialize=["topk"])
def _radix_topk_kernel(
    p_scores, p_indices, p_cand, p_path,
    s_kv, topk, stride_s_m, stride_i_m,
    BLOCK: tl.constexpr, SAMPLE: tl.constexpr, CAP: tl.constexpr, BLOCK_K: tl.constexpr,
    RADIX: tl.constexpr, BINS: tl.constexpr, RECORD_PATH: tl.constexpr,
):
    row = tl.program_id(0)
    p_row = p_scores + row.to(tl.int64) * stride_s_m
    p_out = p_indices + row.to(tl.int64) * stride_i_m
    p_cand += row.to(tl.int64) * CAP  # int64 slots: key << 32 | index
    p_cand32 = p_cand.to(tl.pointer_type(tl.int32))  # slot s: index at 2 s, key at 2 s + 1

    # ---- 0. the cut
    RUNS: tl.constexpr = SAMPLE // 32
    o_s = tl.arange(0, SAMPLE)
    # Run r starts at floor(r * s_kv / RUNS) rounded down to 32: runs are disjoint and inside the row
    # once s_kv >= SAMPLE; a shorter row is its own sample.
    run_start = (((o_s // 32).to(tl.int64) * s_kv) // RUNS).to(tl.int32) & -32
    o_pos = tl.where(s_kv > SAMPLE, run_start + o_s % 32, o_s)
    b_skey = _order_preserving_key(tl.load(p_row + o_pos, mask=o_pos < s_kv, other=float("-inf")))
    if s_kv > SAMPLE:
        # The rank that puts (topk + CAP) / 2 of the row's keys at or above the cut, on average; any
        # cut within a window of an eighth of it, centred there, will do (the sampling spread is larger).
        rank = ((SAMPLE * (topk.to(tl.int64) + CAP) + 2 * s_kv - 1) // (2 * s_kv)).to(tl.int32)
        slack = rank // 8
        rank -= slack // 2
    else:
        rank = topk  # the sample is the row: the cut is the threshold itself
        slack = tl.zeros((), tl.int32)
    cut = tl.full((), 1, tl.uint32)  # the lowest key of a selectable score: take every one
    if tl.sum((b_skey != 0).to(tl.int32), axis=0) >= rank:
        cut = _bisect_kth(b_skey, rank, cut, tl.max(b_skey, axis=0), slack)

    # ---- 1. the one read: A keys (> cut) with their indices to the scratch row, one 8-byte store
    # each; B keys (== cut) are only counted. Each scattered store costs Triton a conversion of its
    # pointers, values and mask to one key a thread through shared memory: one store instead of three
    # takes the loop from 313 to 225 instructions a block (ptxas sm_90).
    gt = tl.zeros((), tl.int32)
    eq = tl.zeros((), tl.int32)
    # The next block is loaded before this one is classified: Triton does not pipeline a loop
    # without a dot, and one block's loads alone leave the memory latency exposed.
    o_j = tl.arange(0, BLOCK)
    b_next = tl.load(p_row + o_j, mask=o_j < s_kv, other=float("-inf"))
    for start in range(0, s_kv, BLOCK):
        o_j = start + tl.arange(0, BLOCK)
        b_key = _order_preserving_key(b_next)
        b_next = tl.load(p_row + BLOCK + o_j, mask=o_j + BLOCK < s_kv, other=float("-inf"))
        b_packed = (b_key > cut).to(tl.int32) | ((b_key == cut).to(tl.int32) << 16)  # A | B << 16
        b_before = tl.cumsum(b_packed, axis=0) - b_packed  # BLOCK < 65536: the halves never carry
        block_total = tl.sum(b_packed, axis=0)
        b_slot = gt + (b_before & 0xFFFF)
        m_a = (b_key > cut) & (b_slot < CAP)
        tl.store(p_cand + b_slot, (b_key.to(tl.int64) << 32) | o_j.to(tl.int64), mask=m_a)
        gt += block_total & 0xFFFF
        eq += block_total >> 16
    tl.debug_barrier()  # the scratch row, written above, is read below by other threads

    n_out = topk
    path = tl.full((), 2, tl.int32)
    if (gt > topk) & (gt <= CAP):
        path = tl.full((), 0, tl.int32)
        # ---- 2a. T above the cut: bisect it among the A keys, held in registers; then take them in
        # blocks, re-read from the scratch row (L1), so that no index or address block of CAP lives
        # beside the keys
        o_cap = tl.arange(0, CAP)
        b_ckey = tl.load(p_cand32 + 2 * o_cap + 1, mask=o_cap < gt, other=0).to(tl.uint32, bitcast=True)
        # A value with exactly topk A keys at or above it ends the search early: every one is taken.
        threshold = _bisect_kth(b_ckey, topk, cut + 1, tl.max(b_ckey, axis=0), 0)
        ties = topk - tl.sum((b_ckey > threshold).to(tl.int32), axis=0)  # keys equal to T to take
        written = tl.zeros((), tl.int32)
        ties_seen = tl.zeros((), tl.int32)
        for start in range(0, gt, BLOCK):
            o_c = start + tl.arange(0, BLOCK)
            b_key = tl.load(p_cand32 + 2 * o_c + 1, mask=o_c < gt, other=0).to(tl.uint32, bitcast=True)  # 0 < T
            m_tie = b_key == threshold
            b_tie_rank = ties_seen + tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
            m_take = (b_key > threshold) | (m_tie & (b_tie_rank < ties))
            b_slot = written + tl.cumsum(m_take.to(tl.int32), axis=0) - 1
            tl.store(p_out + b_slot, tl.load(p_cand32 + 2 * o_c, mask=m_take, other=0), mask=m_take)
            written += tl.sum(m_take.to(tl.int32), axis=0)
            ties_seen += tl.sum(m_tie.to(tl.int32), axis=0)
    elif (gt <= topk) & ((gt + eq >= topk) | (cut == 1)):
        # ---- 2b. T is the cut (or every selectable key is taken): all A keys, then the first B keys in
        # index order, found by a second read of the row that stops once they are all written (a plateau
        # at the cut: rows of tied scores, or a row shorter than the sample, whose cut is T)
        for start in range(0, gt, BLOCK_K):
            o_k = start + tl.arange(0, BLOCK_K)
            m_k = o_k < gt
            tl.store(p_out + o_k, tl.load(p_cand32 + 2 * o_k, mask=m_k, other=0), mask=m_k)
        ties = tl.minimum(topk - gt, eq)
        ties_seen = tl.zeros((), tl.int32)
        start = tl.zeros((), tl.int32)
        while ties_seen < ties:
            o_j = start + tl.arange(0, BLOCK)
            b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < s_kv, other=float("-inf")))
            m_tie = b_key == cut
            b_tie = m_tie.to(tl.int32)
            b_rank = ties_seen + tl.cumsum(b_tie, axis=0) - b_tie
            tl.store(p_out + gt + b_rank, o_j, mask=m_tie & (b_rank < ties))
            ties_seen += tl.sum(b_tie, axis=0)
            start += BLOCK
        n_out = gt + ties
        path = tl.full((), 1, tl.int32)
    else:
        # ---- 2c. the sample misjudged the row: radix select over the row, 8 bits a pass
        b_hist = tl.zeros((BINS,), tl.int32)
        for start in range(0, s_kv, BLOCK):
            o_j = start + tl.arange(0, BLOCK)
            b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < s_kv, other=float("-inf")))
            b_hist += tl.histogram((b_key >> (32 - RADIX)).to(tl.int32), BINS, mask=b_key != 0)
        selectable = tl.sum(b_hist, axis=0)
        threshold = tl.full((), 1, tl.uint32)
        k_left = tl.zeros((), tl.int32)  # 0: every key >= threshold is taken
        if selectable > topk:
            prefix, k_left, done = _narrow_prefix(b_hist, topk, tl.zeros((), tl.uint32), BINS, RADIX)
            for digit_pass in tl.static_range(1, 32 // RADIX):
                shift = 32 - RADIX * (digit_pass + 1)
                if done == 0:
                    b_rhist = tl.zeros((BINS,), tl.int32)
                    for start in range(0, s_kv, BLOCK):
                        o_j = start + tl.arange(0, BLOCK)
                        b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < s_kv, other=float("-inf")))
                        m_match = (b_key != 0) & ((b_key >> (shift + RADIX)) == prefix)
                        b_rhist += tl.histogram(((b_key >> shift) & (BINS - 1)).to(tl.int32), BINS, mask=m_match)
                    prefix, k_left, done = _narrow_prefix(b_rhist, k_left, prefix, BINS, RADIX)
                else:
                    prefix = prefix << RADIX
            threshold = prefix
        written = tl.zeros((), tl.int32)
        ties_seen = tl.zeros((), tl.int32)
        for start in range(0, s_kv, BLOCK):
            o_j = start + tl.arange(0, BLOCK)
            b_key = _order_preserving_key(tl.load(p_row + o_j, mask=o_j < s_kv, other=float("-inf")))
            m_tie = (b_key != 0) & (b_key == threshold)
            b_tie_rank = ties_seen + tl.cumsum(m_tie.to(tl.int32), axis=0) - 1
            m_take = tl.where(k_left == 0, (b_key != 0) & (b_key >= threshold),
                              (b_key > threshold) | (m_tie & (b_tie_rank < k_left)))
            b_slot = written + tl.cumsum(m_take.to(tl.int32), axis=0) - 1
            tl.store(p_out + b_slot, o_j, mask=m_take)
            written += tl.sum(m_take.to(tl.int32), axis=0)
            ties_seen += tl.sum(m_tie.to(tl.int32), axis=0)
        n_out = tl.minimum(selectable, topk)
    for start in range(n_out, topk, BLOCK_K):
        o_slot = start + tl.arange(0, BLOCK_K)
        tl.store(p_out + o_slot, tl.full((BLOCK_K,), -1, tl.int32), mask=o_slot < topk)
    if RECORD_PATH:  # for tests: 0, 1 or 2 for 2a, 2b or 2c
        tl.store(p_path + row, path)


def scratch_slots(topk: int) -> int:
    """``CAP``: A keys the scratch row holds; twice topk (at least 1024) leaves the sampled cut a
    margin of half of it on either side of its aim, (topk + CAP) / 2."""
    return max(1024, triton.next_power_of_2(2 * max(int(topk), 1)))


def radix_topk_config(row_length: int, topk: int) -> dict:
    # 1024-key blocks at 4 warps: 8 keys a thread (two 16-byte loads, and the next block's in flight) and 93
    # registers (ptxas, sm_90), so five programs share an SM by registers. Tuned on the H200 at 4096 x 32768,
    # k 2048 (tools/topk_tune.py, 2026-12-03): 0.476 ms, against 0.557 at 8 warps, 0.645 with 2048-key
    # blocks at 8 warps and 0.990 at 16; 512-key blocks at 4 warps 0.473; samples of 1024 or 4096 keys slower.
    block = max(16, min(1024, triton.next_power_of_2(max(row_length, 1))))
    return dict(BLOCK=block, SAMPLE=SAMPLE, CAP=scratch_slots(topk), BLOCK_K=256, RADIX=RADIX_BITS, BINS=BINS,
                num_warps=4, num_stages=1)


def applies(topk: int) -> bool:
    """Whether :func:`topk_indices` runs this kernel for ``topk`` (its A keys fit in registers)."""
    return scratch_slots(topk) <= MAX_CAP


def topk_indices(scores, topk: int, *, out=None, config: dict | None = None, paths=None):
    """int32 ``[rows, topk]``: each row's top-k set (any order), ``-1`` padding.

    Args:
        scores: float ``[rows, s_kv]`` (any row stride; widened to float32).
        out: optional int32 ``[rows, topk]`` view to write into.
        config: overrides of :func:`radix_topk_config` (for tuning and tests).
        paths: optional int32 ``[rows]`` the kernel fills with the step each row took (0: 2a,
            1: 2b, 2: 2c), for tests.

    A topk whose scratch row would exceed ``MAX_CAP`` runs :func:`.topk.topk_indices`. The kernel
    takes ``CAP`` int32 key/index pairs of scratch per row (32 KB at topk 2048).
    """
    rows, s_kv = scores.shape
    if not applies(topk) and not config:
        return topk_onepass.topk_indices(scores, topk, out=out)
    if scores.dtype != torch.float32:
        scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if out is None:
        out = torch.empty((rows, topk), dtype=torch.int32, device=scores.device)
    if rows == 0 or topk == 0:
        return out
    config = {**radix_topk_config(s_kv, topk), **(config or {})}
    cap = config["CAP"]
    if cap <= topk:
        raise ValueError(f"CAP {cap} must exceed topk {topk}")
    candidates = torch.empty((rows, cap), dtype=torch.int64, device=scores.device)  # key << 32 | index
    _radix_topk_kernel[(rows,)](
        scores, out, candidates, out if paths is None else paths, s_kv, topk, scores.stride(0),
        out.stride(0), RECORD_PATH=paths is not None, **config,
    )
    return out


def topk_indices_in_chunks(scores, topk: int, chunk: int):
    """:func:`.topk.topk_indices_in_chunks` (few long rows: the top-k of each chunk, then of their
    candidates) with this kernel for both passes; exact with the lower index kept on ties, as there."""
    return topk_onepass.topk_indices_in_chunks(scores, topk, chunk, select=topk_indices)
