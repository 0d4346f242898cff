"""Sparse MLA forward for Hopper (sm_90) in Gluon, warp-specialized: a producer warpgroup gathers the
rows, two consumer warpgroups take the slot tiles in turn (ping-pong).

Same contract and inputs as :mod:`.sparse_mla_gluon` (q bf16 ``[s_q, h, 576]`` with ``h`` a multiple
of 64, dense rows bf16 ``[s_kv, 576]``, ``d_v = 512``; :func:`.sparse_mla_gluon.gluon_applies` says
when it applies), the default there since its measurement on the H200 (NOTES.md, version 12: 325 -> 445
TFLOP/s at h 64); ``TritonBackend.hopper_forward_pingpong = False`` or ``DSA_REF_TRITON_GLUON_PINGPONG=0``
runs the first Gluon kernel; at the module level ``sparse_mla.sparse_mla(...,
kernel="gluon_pingpong")``.

Why another schedule. The first Gluon kernel (NOTES.md, version 6) splits every 64-slot tile over
both warpgroups, so both run the same phases at the same time: while they compute the softmax, the
tensor cores idle (ncu: 75 % of cycles with no eligible warp). Here one program (one query x 64
heads) has three warpgroups:

- the producer (``worker 1``, 4 warps, few registers) gathers the rows of 32-slot tiles with
  16-byte ``cp.async`` (invalid slots zero-filled, never read) into a ring of four buffers and
  signals each tile's mbarrier when its copies land (``cp.async.mbarrier.arrive.noinc``): no
  consumer thread issues a copy or waits for one;
- consumer ``w`` (the default partition for tile parity 0, ``worker 0`` for parity 1) computes
  ``S = Q K^T`` of its own tiles alone (``[64 heads, 32 slots]``), their softmax, and writes ``P``
  (bf16), the new row max, the rescale factor and the tile's row sum to shared memory; both consumers
  multiply every tile's ``P`` into their half of ``O`` (``[64, 256]`` float32, the d_v split of version 6).

While one consumer runs its softmax, the other's ``S`` and the ``P V`` products are on the tensor
cores: a consumer issues ``P V`` of the other's previous tile (asynchronous ``warpgroup_mma``) just
before its own softmax, which runs under it, while the other consumer computes the ``S`` of the next
tile. The row max is carried from tile to tile through shared memory, so both consumers scale ``O``
with the same factors, and each adds every tile's row sum (its own, or the other's as published) to
the same running sum: no exchange at the end. A consumer's own ``P V`` stays in flight into its next
step, under the wait for the next rows and their ``S``; the indices that mask a tile's scores are loaded a step ahead.

Shared memory: Q 72 KiB (resident), four row buffers of 32 x 576 (144 KiB), two ``P`` tiles
(``[64, 32]``, 8 KiB) and two sets of row statistics: ~226 KiB. 32-slot tiles (rather than 64)
buy the ring's depth: a tile's buffer is held from its ``S`` to the last ``P V`` that reads it,
about two tile periods, and four buffers leave the gather two more.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier,
                                                                   warpgroup_mma, warpgroup_mma_wait)

from .launch import CachedLauncher
from .sparse_mla_gluon import BLOCK_H, D_R, D_V, LOG2E, launch_inputs

BLOCK_T = 32  # slots a tile
NUM_BUFFERS = 4  # row buffers in the producer's ring
PARTITION_WARPS = 4  # every partition is one warpgroup
NUM_WARPS = PARTITION_WARPS  # the launch's num_warps: the default partition's
#: Registers a thread: the second consumer's and the producer's (setmaxnreg); the default partition
#: (the first consumer) gets what the launch's ``MAX_REGISTERS`` x 3 warpgroups leaves: 504 - 232 - 40.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
MAX_REGISTERS = 168  # 65536 / 384 threads, rounded down to a multiple of 8
_BLOCK_H = gl.constexpr(BLOCK_H)
_BLOCK_T = gl.constexpr(BLOCK_T)
_D_V = gl.constexpr(D_V)
_D_R = gl.constexpr(D_R)
_NUM_BUFFERS = gl.constexpr(NUM_BUFFERS)


@gluon.jit
def _consumer(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
              q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads, W: gl.constexpr):
    """Consumer ``W``: S and softmax of the tiles ``t`` with ``t % 2 == W``, ``O[:, 256 W : 256 W + 256]``
    over all tiles; writes its half of out (and, for ``W == 0``, lse)."""
    BLOCK_H: gl.constexpr = _BLOCK_H
    BLOCK_T: gl.constexpr = _BLOCK_T
    D_V: gl.constexpr = _D_V
    NUM_BUFFERS: gl.constexpr = _NUM_BUFFERS
    D_HALF: gl.constexpr = D_V // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_T, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D_HALF, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_ready = barriers.index(0)

    n_tiles = gl.cdiv(slot_end, BLOCK_T)
    b_max = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=row_s)
    b_sum = gl.zeros([BLOCK_H], gl.float32, layout=row_s)  # the row sum over every tile so far
    b_acc = gl.zeros([BLOCK_H, D_HALF], gl.float32, layout=o_layout)
    b_zero_logits = gl.zeros([BLOCK_H, BLOCK_T], gl.float32, layout=s_layout)
    mbarrier.wait(q_ready, 0)

    # A consumer's own P V stays in flight into its next step (under the wait for the next rows and
    # that S). ptxas serializes every wgmma of the kernel (C7515) where an in-flight product meets a
    # value no wgmma wrote (the zeros of a loop that ran no step, or of a branch not taken), so each
    # loop starts from a first step written out, whose own product is in flight, and the loop sits
    # in a branch that retires it.
    if W == 0:
        if n_tiles > 0:
            # Tile 0 has no tile before it: its S alone, its P into an unused buffer.
            b_logits, b_max, b_rescale, b_sum, b_tile_sum = _own_scores(
                0, p_indices_row, slot_end, s_kv, scale_log2, q_value, q_rest, kv_value, kv_rest, barriers,
                b_max, b_sum, b_zero_logits, BLOCK_T, NUM_BUFFERS, s_layout)
            _publish(0, b_logits, b_max, b_rescale, b_tile_sum, prob, stats, barriers, BLOCK_T, NUM_BUFFERS, row_s)
            b_pending = warpgroup_mma(prob.index(0), _value_half(kv_value, 0, W, NUM_BUFFERS, D_HALF), b_acc,
                                      is_async=True)
            b_index = _tile_indices(2, p_indices_row, slot_end, s_layout)
            for tile in range(2, n_tiles, 2):
                b_pending, b_max, b_sum, b_index = _own_step(
                    tile, b_pending, b_max, b_sum, b_index, p_indices_row, slot_end, s_kv, scale_log2, q_value, q_rest,
                    kv_value, kv_rest, prob, stats, barriers, b_zero_logits, n_tiles, W, True)
            b_acc = warpgroup_mma_wait(0, deps=[b_pending])
            _release(n_tiles - 1 - (n_tiles - 1) % 2, barriers, NUM_BUFFERS, True)
    else:
        if n_tiles > 1:
            b_pending, b_max, b_sum, b_index = _own_step(
                1, b_acc, b_max, b_sum, _tile_indices(1, p_indices_row, slot_end, s_layout), p_indices_row,
                slot_end, s_kv, scale_log2, q_value, q_rest, kv_value, kv_rest, prob, stats, barriers,
                b_zero_logits, n_tiles, W, False)
            for tile in range(3, n_tiles, 2):
                b_pending, b_max, b_sum, b_index = _own_step(
                    tile, b_pending, b_max, b_sum, b_index, p_indices_row, slot_end, s_kv, scale_log2, q_value, q_rest,
                    kv_value, kv_rest, prob, stats, barriers, b_zero_logits, n_tiles, W, True)
            b_acc = warpgroup_mma_wait(0, deps=[b_pending])
            _release(n_tiles - 1 - n_tiles % 2, barriers, NUM_BUFFERS, True)
    # The last tile is the other consumer's: its P V still to do.
    if (n_tiles > 0) & ((n_tiles - 1) % 2 != W):
        b_acc, b_max, b_sum = _foreign_tile(n_tiles - 1, b_acc, b_max, b_sum, kv_value, prob, stats, barriers,
                                            W, NUM_BUFFERS, D_HALF, row_s, row_o)
        b_acc = warpgroup_mma_wait(0, deps=[b_acc])  # retired inside the branch, as above

    # b_sum is the whole row sum: each tile's own sum is published with its P, and both consumers add
    # the same float32 values in the same order (their halves of out normalize by one sum, to rounding).
    m_empty = b_sum == 0.0
    b_lse = gl.where(m_empty, float("-inf"), (b_max + gl.log2(gl.where(m_empty, 1.0, b_sum))) / 1.4426950408889634)
    b_norm = gl.where(m_empty, 0.0, 1.0 / gl.where(m_empty, 1.0, b_sum))
    o_h = gl.arange(0, BLOCK_H, layout=row_s)
    if sink_heads != 0:
        b_sink = gl.load(p_sink + head_begin + o_h)
        b_norm = b_norm * (1.0 / (1.0 + gl.exp(b_sink - b_lse)))
    if W == 0:
        gl.store(p_lse_row + o_h, b_lse)
    b_out = b_acc * gl.convert_layout(b_norm, row_o)[:, None]
    o_h = gl.arange(0, BLOCK_H, layout=row_o)
    o_dv = W * D_HALF + gl.arange(0, D_HALF, layout=gl.SliceLayout(0, o_layout))
    gl.store(p_out_rows + o_h[:, None] * stride_o_h + o_dv[None, :], b_out)


@gluon.jit
def _own_step(tile, b_acc, b_max, b_sum, b_index, p_indices_row, slot_end, s_kv, scale_log2, q_value, q_rest,
              kv_value, kv_rest, prob, stats, barriers, b_zero_logits, n_tiles, W: gl.constexpr,
              IN_FLIGHT: gl.constexpr):
    """One step of consumer ``W`` at its own ``tile``: S of the tile, the other consumer's ``tile - 1``
    (its P V issued, running under this softmax), the softmax and P of ``tile``, and its P V issued
    and left in flight. ``b_acc``: O with the own P V of ``tile - 2`` in flight (``IN_FLIGHT``) or
    retired; ``b_index``: the tile's indices, loaded a step earlier (an L2 round trip is longer than
    a 32-slot S). Returns the indices of this consumer's next tile as well."""
    BLOCK_T: gl.constexpr = _BLOCK_T
    NUM_BUFFERS: gl.constexpr = _NUM_BUFFERS
    D_HALF: gl.constexpr = _D_V // 2
    s_layout: gl.constexpr = b_zero_logits.type.layout
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D_HALF, 16])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = tile % NUM_BUFFERS
    same = tile // n_tiles  # 0, which the compiler cannot prove: the descriptors stay in the loop
    mbarrier.wait(barriers.index(1 + rows), (tile // NUM_BUFFERS) & 1)
    fence_async_shared()
    b_logits = warpgroup_mma(q_value.index(same), kv_value.index(rows).permute((1, 0)), b_zero_logits,
                             use_acc=False, is_async=True)
    b_logits = warpgroup_mma(q_rest.index(same), kv_rest.index(rows).permute((1, 0)), b_logits, is_async=True)
    o_t = (tile + 2) * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, s_layout))
    b_index_next = gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)
    m_valid = (b_index >= 0) & (b_index < s_kv)
    if IN_FLIGHT:
        b_logits, b_acc = warpgroup_mma_wait(0, deps=[b_logits, b_acc])
        _release(tile - 2, barriers, NUM_BUFFERS, True)
    else:
        b_logits = warpgroup_mma_wait(0, deps=[b_logits])

    # The other consumer's tile - 1: its statistics, then its P times this consumer's half of V,
    # which runs under this consumer's softmax.
    b_acc, b_max, b_sum = _foreign_tile(tile - 1, b_acc, b_max, b_sum, kv_value, prob, stats, barriers,
                                        W, NUM_BUFFERS, D_HALF, row_s, row_o)
    b_logits, b_max, b_rescale, b_sum, b_tile_sum = _softmax(b_logits, m_valid, b_max, b_sum, scale_log2)
    # P's buffer of tile - 2 is free once both consumers have retired its P V.
    mbarrier.wait(barriers.index(1 + 2 * NUM_BUFFERS + 2 + tile % 2), ((tile - 2) // 2) & 1, pred=tile >= 2)
    _publish(tile, b_logits, b_max, b_rescale, b_tile_sum, prob, stats, barriers, BLOCK_T, NUM_BUFFERS, row_s)
    b_acc = warpgroup_mma_wait(0, deps=[b_acc])  # the P V of tile - 1
    _release(tile - 1, barriers, NUM_BUFFERS, True)
    b_acc = b_acc * gl.convert_layout(b_rescale, row_o)[:, None]
    b_acc = warpgroup_mma(prob.index(tile % 2), _value_half(kv_value, rows, W, NUM_BUFFERS, D_HALF), b_acc,
                          is_async=True)
    return b_acc, b_max, b_sum, b_index_next


@gluon.jit
def _tile_indices(tile, p_indices_row, slot_end, s_layout: gl.constexpr):
    """The indices of ``tile``'s slots (-1 past ``slot_end``), one per column of S."""
    o_t = tile * _BLOCK_T + gl.arange(0, _BLOCK_T, layout=gl.SliceLayout(0, s_layout))
    return gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)


@gluon.jit
def _value_half(kv_value, rows, W: gl.constexpr, NUM_BUFFERS: gl.constexpr, D_HALF: gl.constexpr):
    """This consumer's half of the values of buffer ``rows`` (the B operand of ``O += P V``)."""
    return kv_value.index(rows).slice(W * D_HALF, D_HALF, dim=1)


@gluon.jit
def _release(tile, barriers, NUM_BUFFERS: gl.constexpr, pred):
    """This consumer has retired its P V of ``tile``: P's buffer and the rows' buffer may be reused."""
    mbarrier.arrive(barriers.index(1 + 2 * NUM_BUFFERS + 2 + tile % 2), count=1, pred=pred)  # P empty
    mbarrier.arrive(barriers.index(1 + NUM_BUFFERS + tile % NUM_BUFFERS), count=1, pred=pred)  # rows empty


@gluon.jit
def _own_scores(tile, p_indices_row, slot_end, s_kv, scale_log2, q_value, q_rest, kv_value, kv_rest, barriers,
                b_max, b_sum, b_zero_logits, BLOCK_T: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                s_layout: gl.constexpr):
    """S of ``tile`` (waited here) and its softmax: ``(P float32, new max, rescale, new row sum, tile's sum)``."""
    rows = tile % NUM_BUFFERS
    mbarrier.wait(barriers.index(1 + rows), (tile // NUM_BUFFERS) & 1)
    fence_async_shared()
    b_logits = warpgroup_mma(q_value.index(0), kv_value.index(rows).permute((1, 0)), b_zero_logits, use_acc=False,
                             is_async=True)
    b_logits = warpgroup_mma(q_rest.index(0), kv_rest.index(rows).permute((1, 0)), b_logits, is_async=True)
    o_t = tile * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, s_layout))
    b_index = gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)
    m_valid = (b_index >= 0) & (b_index < s_kv)
    b_logits = warpgroup_mma_wait(0, deps=[b_logits])
    return _softmax(b_logits, m_valid, b_max, b_sum, scale_log2)


@gluon.jit
def _softmax(b_logits, m_valid, b_max, b_sum, scale_log2):
    """One tile's online softmax step (base 2): ``(P, new max, rescale of what came before, new row sum,
    the tile's own row sum)``."""
    b_logits = gl.where(m_valid[None, :], b_logits * scale_log2, float("-inf"))
    b_max_new = gl.maximum(b_max, gl.max(b_logits, axis=1))
    # A head that has seen no valid slot keeps max -inf; subtract 0 instead so exp2 stays 0, not NaN.
    b_shift = gl.where(b_max_new == float("-inf"), 0.0, b_max_new)
    b_rescale = gl.exp2(b_max - b_shift)
    b_prob = gl.exp2(b_logits - b_shift[:, None])  # 0 at invalid slots
    b_tile_sum = gl.sum(b_prob, axis=1)
    return b_prob, b_max_new, b_rescale, b_sum * b_rescale + b_tile_sum, b_tile_sum


@gluon.jit
def _publish(tile, b_prob, b_max, b_rescale, b_tile_sum, prob, stats, barriers, BLOCK_T: gl.constexpr,
             NUM_BUFFERS: gl.constexpr, row_s: gl.constexpr):
    """P, the row max, the rescale factor and the row sum of ``tile`` into their buffers, for both
    consumers' P V and running sums."""
    prob.index(tile % 2).store(b_prob.to(gl.bfloat16))
    stats.index(3 * (tile % 2)).store(b_max)
    stats.index(3 * (tile % 2) + 1).store(b_rescale)
    stats.index(3 * (tile % 2) + 2).store(b_tile_sum)
    fence_async_shared()  # P is read by the tensor cores (the async proxy)
    mbarrier.arrive(barriers.index(1 + 2 * NUM_BUFFERS + tile % 2), count=1)


@gluon.jit
def _foreign_tile(tile, b_acc, b_max, b_sum, kv_value, prob, stats, barriers, W: gl.constexpr,
                  NUM_BUFFERS: gl.constexpr, D_HALF: gl.constexpr, row_s: gl.constexpr, row_o: gl.constexpr):
    """The other consumer's ``tile``: its max and rescale, then ``O = O r + P V`` issued (not waited).
    ``b_acc`` must be retired."""
    mbarrier.wait(barriers.index(1 + 2 * NUM_BUFFERS + tile % 2), (tile // 2) & 1)
    rows = tile % NUM_BUFFERS
    # Its rows landed before the other consumer's S read them; waiting here too (a completed phase)
    # gives this warpgroup's own acquire of the producer's copies before its fence and products.
    mbarrier.wait(barriers.index(1 + rows), (tile // NUM_BUFFERS) & 1)
    fence_async_shared()
    b_max = stats.index(3 * (tile % 2)).load(row_s)
    b_sum = b_sum * stats.index(3 * (tile % 2) + 1).load(row_s) + stats.index(3 * (tile % 2) + 2).load(row_s)
    b_acc = b_acc * stats.index(3 * (tile % 2) + 1).load(row_o)[:, None]
    b_acc = warpgroup_mma(prob.index(tile % 2), _value_half(kv_value, rows, W, NUM_BUFFERS, D_HALF), b_acc,
                          is_async=True)
    return b_acc, b_max, b_sum


@gluon.jit
def _consumer_0(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
                q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
                p_kv, stride_kv, p_q_rows, stride_q_h):
    _consumer(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
              q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads, 0)


@gluon.jit
def _consumer_1(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
                q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
                p_kv, stride_kv, p_q_rows, stride_q_h):
    _consumer(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
              q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads, 1)


@gluon.jit
def _producer(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
              q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
              p_kv, stride_kv, p_q_rows, stride_q_h):
    """Q once, then the rows of every tile into the ring, each tile's arrival on its mbarrier when its
    copies have landed (every producer thread arrives: the barriers count 128)."""
    BLOCK_H: gl.constexpr = _BLOCK_H
    BLOCK_T: gl.constexpr = _BLOCK_T
    D_V: gl.constexpr = _D_V
    D_R: gl.constexpr = _D_R
    NUM_BUFFERS: gl.constexpr = _NUM_BUFFERS
    # 16-byte copies: a warp covers one row of 256 values (or 8 rows of 32), the 4 warps 4 (32) rows.
    value_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    rest_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, value_layout))
    o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, value_layout))
    async_copy.async_copy_global_to_shared(q_value.index(0), p_q_rows + o_h[:, None] * stride_q_h + o_dv[None, :])
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, rest_layout))
    o_dr = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_layout))
    async_copy.async_copy_global_to_shared(q_rest.index(0), p_q_rows + D_V + o_h[:, None] * stride_q_h + o_dr[None, :])
    async_copy.mbarrier_arrive(barriers.index(0), increment_count=False)

    n_tiles = gl.cdiv(slot_end, BLOCK_T)
    for tile in range(0, n_tiles):
        rows = tile % NUM_BUFFERS
        # The indices are loaded before the wait for the buffer: their latency hides under it.
        o_t = tile * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, value_layout))
        b_index = gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)
        o_t = tile * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, rest_layout))
        b_index_rest = gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)
        mbarrier.wait(barriers.index(1 + NUM_BUFFERS + rows), ((tile - NUM_BUFFERS) // NUM_BUFFERS) & 1,
                      pred=tile >= NUM_BUFFERS)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        p_rows = p_kv + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_kv
        o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, value_layout))
        async_copy.async_copy_global_to_shared(kv_value.index(rows), p_rows[:, None] + o_dv[None, :],
                                               mask=m_valid[:, None])
        m_valid = (b_index_rest >= 0) & (b_index_rest < s_kv)
        p_rows = p_kv + D_V + gl.where(m_valid, b_index_rest, 0).to(gl.int64) * stride_kv
        o_dr = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_layout))
        async_copy.async_copy_global_to_shared(kv_rest.index(rows), p_rows[:, None] + o_dr[None, :],
                                               mask=m_valid[:, None])
        async_copy.mbarrier_arrive(barriers.index(1 + rows), increment_count=False)
    async_copy.commit_group()
    async_copy.wait_group(0)


@gluon.jit
def _sparse_mla_gluon_pingpong_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_sink, p_out, p_lse,
    h, s_kv, topk, scale_log2,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_o_m, stride_o_h, stride_l_m, sink_heads,
    HAS_TOPK_LENGTH: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_T: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
    NUM_BUFFERS: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):
    """One query (axis 0) and ``BLOCK_H`` of its heads (axis 1); writes the final out and lse."""
    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_V], gl.bfloat16)
    rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_R], gl.bfloat16)
    q_value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_V], gl.bfloat16)
    q_rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_R], gl.bfloat16)
    prob_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_T], gl.bfloat16)
    stats_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

    query = gl.program_id(0)
    head_begin = gl.program_id(1) * BLOCK_H
    # Q is the one entry of a [1, ...] allocation, indexed in the loop by a zero the compiler cannot
    # prove (the Gluon backward's fix, NOTES.md version 11): fixed addresses make the products'
    # descriptors loop invariants, hoisted and spilled.
    q_value = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_V], q_value_smem)
    q_rest = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_R], q_rest_smem)
    kv_value = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUFFERS, BLOCK_T, D_V], value_smem)
    kv_rest = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUFFERS, BLOCK_T, D_R], rest_smem)
    prob = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_T], prob_smem)
    stats = gl.allocate_shared_memory(gl.float32, [6, BLOCK_H], stats_smem)  # (max, rescale, sum) x P's two buffers
    # [0] Q landed (128 producer arrivals); [1, 1 + B) rows landed (128); [1 + B, 1 + 2B) rows free
    # (one arrival per consumer); then P ready x 2 (1) and P free x 2 (2).
    barriers = gl.allocate_shared_memory(gl.int64, [1 + 2 * NUM_BUFFERS + 4, 1], mbarrier.MBarrierLayout())
    mbarrier.init(barriers.index(0), count=128)
    for b in gl.static_range(NUM_BUFFERS):
        mbarrier.init(barriers.index(1 + b), count=128)
        mbarrier.init(barriers.index(1 + NUM_BUFFERS + b), count=2)
    for b in gl.static_range(2):
        mbarrier.init(barriers.index(1 + 2 * NUM_BUFFERS + b), count=1)
        mbarrier.init(barriers.index(1 + 2 * NUM_BUFFERS + 2 + b), count=2)

    slot_end = topk
    if HAS_TOPK_LENGTH:
        slot_end = gl.minimum(gl.maximum(gl.load(p_topk_length + query), 0), topk)
    p_indices_row = p_indices + query.to(gl.int64) * stride_i_m
    p_out_rows = p_out + query.to(gl.int64) * stride_o_m + head_begin * stride_o_h
    p_lse_row = p_lse + query.to(gl.int64) * stride_l_m + head_begin
    p_q_rows = p_q + query.to(gl.int64) * stride_q_m + head_begin * stride_q_h
    # Worker partitions take one signature: every partition gets every argument. Constexprs do not
    # pass into a partition as constexprs (and a constant one breaks the lowering of a partition's
    # arguments in Triton 3.6): the shapes are module constants, the sink a runtime count of heads.
    arguments = (p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
                 q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
                 p_kv, stride_kv, p_q_rows, stride_q_h)
    gl.warp_specialize([
        (_consumer_0, arguments),
        (_consumer_1, arguments),
        (_producer, arguments),
    ], [4, 4], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


# After a signature's first call, the launch skips Triton's argument processing (see .launch).
_pingpong_launch = CachedLauncher(_sparse_mla_gluon_pingpong_kernel)


def sparse_mla_gluon_pingpong(q, kv, indices, sm_scale: float, topk_length=None, attn_sink=None, *, d_v: int = D_V):
    """``(out float32 [s_q, h, 512], lse float32 [s_q, h])``; see :func:`dsa_ref.sparse_mla`.

    Raises ValueError listing every reason of :func:`.sparse_mla_gluon.gluon_applies` when it cannot
    run the inputs (the same shape family as the first Gluon kernel).
    """
    q, kv, indices, topk_length, attn_sink, out, lse = launch_inputs(
        "the Gluon ping-pong sparse MLA kernel", q, kv, indices, topk_length, attn_sink, d_v)
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    if s_q == 0 or h == 0:
        return out, lse
    q_stride, out_stride = q.stride(), out.stride()
    _pingpong_launch(
        (s_q, h // BLOCK_H), q, kv, indices, lse if topk_length is None else topk_length,
        lse if attn_sink is None else attn_sink, out, lse, h, s_kv, topk, float(sm_scale) * LOG2E,
        q_stride[0], q_stride[1], kv.stride(0), indices.stride(0), out_stride[0], out_stride[1], lse.stride(0),
        0 if attn_sink is None else h, HAS_TOPK_LENGTH=topk_length is not None,
        BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, D_V=D_V, D_R=D_R, NUM_BUFFERS=NUM_BUFFERS,
        CONSUMER_REGISTERS=CONSUMER_REGISTERS, PRODUCER_REGISTERS=PRODUCER_REGISTERS,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    return out, lse
