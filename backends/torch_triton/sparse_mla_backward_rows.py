"""Deterministic mode of the Gluon sparse MLA backward: the kernel of :mod:`.sparse_mla_backward_gluon`
with ``ROW_STORES`` stores each valid slot's row gradient (one per 64-head block) to a float32
contribution buffer instead of adding it to ``dkv`` atomically, and :func:`_row_sum_kernel` (plain
Triton) adds each kv row's buffer entries in a fixed order with a plain read-modify-write.

The order is the one of the CuPy backend's deterministic mma path (backends/cupy_cuda/NOTES.md,
"deterministic mma backward"): by kv row, then by (query, slot) pair, then by head block. It comes from
one stable sort of the pairs' rows per *plan* of queries (a whole number of chunks) and two
``searchsorted`` a chunk over the unique keys ``row * pairs + pair``; nothing is counted on the host,
so the launches of a call are queued without a sync (and can be captured in a CUDA graph).

The buffer ``[chunk queries, topk, h / 64, 576]`` takes 2304 B per (query, head block, slot), so queries
go in chunks of at most :data:`BUFFER_BYTES`, each chunk a whole number of waves of the block kernel
(one 224 KiB program per SM): a chunk's launch ends when its last program does, and a partial wave
per chunk would idle SMs at every chunk. The chunks reuse one buffer in stream order, and each adds
into ``dkv`` after the previous one, so the order of every row's float32 additions is fixed: two runs
with the same chunking are bitwise equal. No float atomic touches ``dkv``; dq is stored once per
(query, head block) by the unchanged epilogue, so it is bitwise the default kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CachedLauncher

#: Bytes of float32 contributions one chunk of queries may take (the buffer, reused by every chunk);
#: tests lower it to run several chunks.
BUFFER_BYTES = 1 << 30
#: Bytes the sort of one plan may take: per (query, slot) pair the int32 rows, their sorted copy, the
#: sort's int64 order, the int64 keys and the sort's scratch.
PLAN_BYTES = 1 << 29
PLAN_BYTES_PER_PAIR = 40
D_QK = 576
D_V = 512
BLOCK_H = 64


def chunk_queries(s_q: int, h: int, topk: int, multiprocessors: int = 132) -> int:
    """Queries per launch: the most within :data:`BUFFER_BYTES`, rounded down to whole waves of
    ``multiprocessors`` programs (``h / 64`` a query) when at least one wave fits; at least one query."""
    head_blocks = max(1, h // BLOCK_H)
    per_query = head_blocks * max(1, topk) * D_QK * 4
    fits = max(1, BUFFER_BYTES // per_query)
    wave = multiprocessors // head_blocks if multiprocessors % head_blocks == 0 else 0
    if wave and fits >= wave:
        fits -= fits % wave
    return max(1, min(s_q, fits))


def plan_queries(step: int, topk: int) -> int:
    """Queries sorted together: a whole number of chunks, as many as keep the sort within :data:`PLAN_BYTES`."""
    return step * max(1, PLAN_BYTES // max(1, PLAN_BYTES_PER_PAIR * max(1, topk) * step))


def valid_slots(indices, topk_length, s_kv: int):
    """bool ``[s_q, topk]``: the slots that read a kv row (index in ``[0, s_kv)``, before ``topk_length``)."""
    valid = (indices >= 0) & (indices < s_kv)
    if topk_length is not None:
        slot = torch.arange(indices.shape[1], device=indices.device)
        valid &= slot[None, :] < topk_length.to(torch.int64)[:, None]
    return valid


def entry_table(valid, step: int):
    """int32 ``[s_q, topk]``: a valid slot's pair within its chunk (``(query % step) * topk + slot``: the
    buffer entry of its head block 0, in units of ``h / 64`` entries), -1 elsewhere."""
    s_q, topk = valid.shape
    local = (torch.arange(s_q, device=valid.device, dtype=torch.int32) % step)[:, None] * topk
    pair = local + torch.arange(topk, device=valid.device, dtype=torch.int32)[None, :]
    return torch.where(valid, pair, -1).to(torch.int32).contiguous()


def sorted_row_keys(rows, s_kv: int):
    """int64 ``[pairs]``: the keys ``row * pairs + pair`` of a plan's ``rows`` (int ``[n, topk]``, -1 where a
    slot reads nothing: it sorts after every row's, as row ``s_kv``), in increasing order. A stable sort
    of the int32 rows gives the order (the keys are unique: any correct sort gives this one)."""
    pairs = rows.numel()
    flat = rows.reshape(-1)
    flat = torch.where(flat >= 0, flat, s_kv).to(torch.int32)
    sorted_rows, order = torch.sort(flat, stable=True)
    return sorted_rows.to(torch.int64) * pairs + order


def row_bounds(sorted_keys, s_kv: int, firsts):
    """int64 ``[len(firsts), s_kv]``: for each pair ``f`` of ``firsts`` (int64 on the keys' device: the
    chunks' first pairs in the plan, then the plan's end) and each row, the position in ``sorted_keys`` of
    the row's first pair ``>= f``. Chunk ``k``'s pairs of row ``r`` are positions ``[bounds[k, r],
    bounds[k + 1, r])``, in increasing pair. One search for the whole plan, not a launch a chunk."""
    pairs = sorted_keys.numel()
    row_base = torch.arange(s_kv, device=sorted_keys.device, dtype=torch.int64) * pairs
    return torch.searchsorted(sorted_keys, (firsts[:, None] + row_base[None, :]).contiguous())


def row_ranges(sorted_keys, s_kv: int, first_pair: int, end_pair: int):
    """``(begin, end)`` int64 ``[s_kv]``: the positions in ``sorted_keys`` of the pairs
    ``first_pair <= p < end_pair`` (one chunk of the plan) that read each row, in increasing ``p``."""
    firsts = torch.arange(2, device=sorted_keys.device, dtype=torch.int64) * (end_pair - first_pair) + first_pair
    bounds = row_bounds(sorted_keys, s_kv, firsts)
    return bounds[0], bounds[1]


@triton.jit
def _row_sum_kernel(p_contributions, p_sorted_keys, p_row_begin, p_row_end, p_dkv, pairs, first_pair, stride_dkv,
                    HEAD_BLOCKS: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr):
    """``dkv[row] += Σ`` the buffer entries of the chunk's pairs that read ``row`` (axis 0): by pair, then
    head block, summed in registers, then one read-modify-write (no other program writes the row in
    this launch). A row no pair of the chunk reads is not touched."""
    row = tl.program_id(0)
    begin = tl.load(p_row_begin + row)
    end = tl.load(p_row_end + row)
    if begin < end:
        row_key = row.to(tl.int64) * pairs + first_pair
        o_v = tl.arange(0, D_V)
        o_r = tl.arange(0, D_R)
        b_value = tl.zeros([D_V], tl.float32)
        b_rest = tl.zeros([D_R], tl.float32)
        for position in range(begin, end):
            pair = tl.load(p_sorted_keys + position) - row_key  # within the chunk
            for head_block in tl.static_range(HEAD_BLOCKS):
                p_entry = p_contributions + (pair * HEAD_BLOCKS + head_block) * (D_V + D_R)
                b_value += tl.load(p_entry + o_v)
                b_rest += tl.load(p_entry + D_V + o_r)
        p_row = p_dkv + row.to(tl.int64) * stride_dkv
        tl.store(p_row + o_v, tl.load(p_row + o_v) + b_value)
        tl.store(p_row + D_V + o_r, tl.load(p_row + D_V + o_r) + b_rest)


_row_sum_launch = CachedLauncher(_row_sum_kernel)


def row_sums(dkv, contributions, sorted_keys, first_pair: int, begin, end, head_blocks: int) -> None:
    """Adds one chunk's buffer (float32 ``[chunk pairs, head_blocks, 576]``, from pair ``first_pair`` of the
    plan of ``sorted_keys``; row ``r``'s pairs at positions ``[begin[r], end[r])``) to ``dkv`` float32
    ``[s_kv, 576]`` in the plan's order."""
    s_kv = dkv.shape[0]
    if s_kv == 0:
        return
    _row_sum_launch((s_kv,), contributions, sorted_keys, begin, end, dkv, sorted_keys.numel(), first_pair,
                    dkv.stride(0), HEAD_BLOCKS=head_blocks, D_V=D_V, D_R=D_QK - D_V, num_warps=2)


def deterministic_backward(launch_block, s_q: int, h: int, s_kv: int, indices, topk_length, dkv,
                           multiprocessors: int = 132) -> None:
    """The chunked plan: for each chunk of queries ``[begin, end)``, ``launch_block(begin, end, buffer,
    entries)`` runs the block kernel (``ROW_STORES``: dq of the chunk, its row gradients to ``buffer``
    at ``entries``), then the chunk's row sums add the buffer to ``dkv``, all in stream order."""
    topk = indices.shape[1]
    head_blocks = h // BLOCK_H
    step = chunk_queries(s_q, h, topk, multiprocessors)
    plan_step = plan_queries(step, topk)
    valid = valid_slots(indices, topk_length, s_kv)
    entries = entry_table(valid, step)
    rows = torch.where(valid, indices.to(torch.int32), -1)
    contributions = torch.empty((step * topk, head_blocks, D_QK), dtype=torch.float32, device=dkv.device)
    for plan_start in range(0, s_q, plan_step):
        plan_end = min(s_q, plan_start + plan_step)
        sorted_keys = sorted_row_keys(rows[plan_start:plan_end], s_kv)
        starts = list(range(plan_start, plan_end, step))
        # Made on the device: a host list copied there would wait for the queued work.
        firsts = torch.arange(len(starts) + 1, device=dkv.device, dtype=torch.int64) * (step * topk)
        bounds = row_bounds(sorted_keys, s_kv, firsts.clamp_(max=(plan_end - plan_start) * topk))
        for k, begin in enumerate(starts):
            end = min(plan_end, begin + step)
            launch_block(begin, end, contributions, entries[begin:end])
            row_sums(dkv, contributions, sorted_keys, (begin - plan_start) * topk, bounds[k], bounds[k + 1],
                     head_blocks)
