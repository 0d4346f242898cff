"""Sparse MLA over the packed FP8 cache for Hopper (sm_90) in Gluon: the ping-pong kernel of
:mod:`.sparse_mla_gluon_pingpong` with a producer that dequantizes the rows it gathers.

Inputs: q bf16 ``[s_q, h, 576]`` with ``h`` a multiple of 64, the FP8 cache uint8 ``[s_kv, 656]``
(bytes ``[0, 512)`` e4m3 latent values, ``[512, 528)`` four float32 power-of-two scales, one per 128
values, ``[528, 656)`` the 64 RoPE values in bf16), ``d_v = 512``; :func:`fp8_applies` says when it
applies. Results as :func:`dsa_ref.sparse_mla`: out float32 ``[s_q, h, 512]``, lse ``[s_q, h]``.
It runs when ``TritonBackend.hopper_fp8_decode`` (or ``DSA_REF_TRITON_GLUON_FP8=1``) asks for it; at the
module level ``sparse_mla.sparse_mla(..., kernel="gluon_fp8")``.

Why. The FP8 decode on the ``tl.dot`` kernel runs at 188 TFLOP/s on the H200 against FlashMLA's 416
(b 64, s_q 2, T 32K; NOTES.md, host cost, fifth step): the kernel keeps the ``[64, 512]`` float32
accumulator, the dequantized rows and Q in registers and spills, as the bf16 forward did before its
Gluon kernels. The bf16 ping-pong kernel (436 TFLOP/s at S 4096, h 128 in the same run) already
keeps every tensor-core operand in shared memory and leaves its producer warpgroup mostly waiting;
here that producer also does the dequantization, so the consumers see the same bf16 tiles and run
unchanged (this module calls the ping-pong module's consumer partitions).

The producer, per 32-slot tile:

- the 64 RoPE values of each row (bf16 already) go straight to shared memory with 16-byte
  ``cp.async``, as in the bf16 kernel, completing on the tile's mbarrier;
- the latent bytes come into registers as four ``[32, 128]`` blocks (two 16-byte loads a thread a
  block), with the block's scale a row; each block is widened (e4m3 -> float32), multiplied by its
  scale and rounded to bf16 -- exact, an e4m3 value times a power of two fits in bf16 -- and stored
  into the tile's buffer, whose layout is the one the consumers' ``warpgroup_mma`` reads;
- then a proxy fence (the tensor cores read shared memory through the async proxy) and one arrival
  on the tile's mbarrier (Gluon synchronizes the partition's warps before a single-thread arrive):
  the barrier counts the 128 copy arrivals and this one.

The next tile's latent bytes are loaded right after a tile's stores, and the indices that address
them a tile before that, so the gather's two dependent L2 round trips hide under the wait for a
free buffer rather than in front of the dequantization. An invalid slot loads nothing and fills
zeros (value 0, scale 0), as the bf16 kernel's zero-filled copies do.

Decode leaves the GPU idle when queries are few (one program per query and 64 heads, one program an
SM for the shared memory): the slots then split over programs (flash-decoding), each writes a partial
``(out, lse)`` and :func:`.sparse_mla._combine_kernel` merges them.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, mbarrier

from dsa_ref.reference.formats import KV_CACHE_FP8_BYTES, KV_LATENT_DIM, KV_ROPE_DIM, KV_SCALE_BLOCK

from ._interpreter import interpreter_enabled
from .launch import CachedLauncher, launch_options
from .sparse_mla_gluon import BLOCK_H, D_QK, D_R, D_V, LOG2E, _aligned, _device_reasons, gluon_release_reasons
from .sparse_mla_gluon_pingpong import (BLOCK_T, MAX_REGISTERS, NUM_BUFFERS, NUM_WARPS, _consumer_0,
                                        _consumer_1)

#: Registers a thread (setmaxnreg): the second consumer's and the producer's; the first consumer gets
#: what ``MAX_REGISTERS`` x 3 warpgroups leaves (504 - 208 - 88). The bf16 kernel's producer needs 40;
#: this one holds a tile's latent bytes (32 registers), their scales and a block being widened.
CONSUMER_REGISTERS = 208
PRODUCER_REGISTERS = 88
SCALE_BLOCKS = KV_LATENT_DIM // KV_SCALE_BLOCK  # 4 scales a row
#: Fewest slots a split takes: below 8 tiles a program's pipeline fill (Q, the first rows) outweighs it.
MIN_SPLIT_SLOTS = 8 * BLOCK_T
_BLOCK_H = gl.constexpr(BLOCK_H)
_BLOCK_T = gl.constexpr(BLOCK_T)
_D_V = gl.constexpr(D_V)
_D_R = gl.constexpr(D_R)
_NUM_BUFFERS = gl.constexpr(NUM_BUFFERS)
_SCALE_BLOCK = gl.constexpr(KV_SCALE_BLOCK)
_ROPE_BYTE = gl.constexpr(KV_LATENT_DIM + 4 * SCALE_BLOCKS)  # where a row's RoPE values start: byte 528


@gluon.jit
def _latent_blocks(b_index, s_kv, p_kv, stride_kv):
    """The latent bytes of the rows ``b_index`` (``[32]``, -1 or out of range: invalid) as four
    ``[32, 128]`` uint8 blocks and their four ``[32]`` float32 scales; zeros where a slot is invalid."""
    D_V: gl.constexpr = _D_V
    SCALE_BLOCK: gl.constexpr = _SCALE_BLOCK
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    m_valid = (b_index >= 0) & (b_index < s_kv)
    p_rows = p_kv + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_kv
    o_c = gl.arange(0, SCALE_BLOCK, layout=gl.SliceLayout(0, layout))
    p_block = p_rows[:, None] + o_c[None, :]
    m_block = m_valid[:, None]
    b_bytes_0 = gl.load(p_block, mask=m_block, other=0)
    b_bytes_1 = gl.load(p_block + SCALE_BLOCK, mask=m_block, other=0)
    b_bytes_2 = gl.load(p_block + 2 * SCALE_BLOCK, mask=m_block, other=0)
    b_bytes_3 = gl.load(p_block + 3 * SCALE_BLOCK, mask=m_block, other=0)
    p_scales = (p_rows + D_V).to(gl.pointer_type(gl.float32))
    b_scale_0 = gl.load(p_scales, mask=m_valid, other=0.0)
    b_scale_1 = gl.load(p_scales + 1, mask=m_valid, other=0.0)
    b_scale_2 = gl.load(p_scales + 2, mask=m_valid, other=0.0)
    b_scale_3 = gl.load(p_scales + 3, mask=m_valid, other=0.0)
    return b_bytes_0, b_bytes_1, b_bytes_2, b_bytes_3, b_scale_0, b_scale_1, b_scale_2, b_scale_3


@gluon.jit
def _tile_rows(tile, p_indices_row, slot_end):
    """The indices of ``tile``'s slots (-1 past ``slot_end``), one per row of a latent block."""
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    o_t = tile * _BLOCK_T + gl.arange(0, _BLOCK_T, layout=gl.SliceLayout(1, layout))
    return gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)


@gluon.jit
def _store_dequantized(b_bytes, b_scale, kv_value_rows, block: gl.constexpr):
    """``bf16(e4m3(bytes) * scale)`` into columns ``[128 block, 128 block + 128)`` of the tile's buffer."""
    b_value = b_bytes.to(gl.float8e4nv, bitcast=True).to(gl.float32) * b_scale[:, None]
    kv_value_rows.slice(block * _SCALE_BLOCK, _SCALE_BLOCK, dim=1).store(b_value.to(gl.bfloat16))


@gluon.jit
def _producer_fp8(p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
                  q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
                  p_kv, stride_kv, p_q_rows, stride_q_h):
    """Q once, then every tile's rows dequantized into the ring (see the module's docstring); a tile's
    barrier completes with the 128 arrivals of its RoPE copies and the producer's one after its stores."""
    BLOCK_H: gl.constexpr = _BLOCK_H
    BLOCK_T: gl.constexpr = _BLOCK_T
    D_V: gl.constexpr = _D_V
    D_R: gl.constexpr = _D_R
    NUM_BUFFERS: gl.constexpr = _NUM_BUFFERS
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
    b_index = _tile_rows(0, p_indices_row, slot_end)
    for tile in range(0, n_tiles):
        rows = tile % NUM_BUFFERS
        # The tile's latent bytes and the next tile's indices are loaded before the wait for the buffer:
        # their latency hides under it.
        b_bytes_0, b_bytes_1, b_bytes_2, b_bytes_3, b_scale_0, b_scale_1, b_scale_2, b_scale_3 = _latent_blocks(
            b_index, s_kv, p_kv, stride_kv)
        b_index = _tile_rows(tile + 1, p_indices_row, slot_end)
        o_t = tile * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, rest_layout))
        b_index_rest = gl.load(p_indices_row + o_t, mask=o_t < slot_end, other=-1)
        mbarrier.wait(barriers.index(1 + NUM_BUFFERS + rows), ((tile - NUM_BUFFERS) // NUM_BUFFERS) & 1,
                      pred=tile >= NUM_BUFFERS)
        # The RoPE values first: their copies land while the latent blocks are widened.
        m_valid = (b_index_rest >= 0) & (b_index_rest < s_kv)
        p_rope = (p_kv + _ROPE_BYTE + gl.where(m_valid, b_index_rest, 0).to(gl.int64) * stride_kv
                  ).to(gl.pointer_type(gl.bfloat16))
        async_copy.async_copy_global_to_shared(kv_rest.index(rows), p_rope[:, None] + o_dr[None, :],
                                               mask=m_valid[:, None])
        async_copy.mbarrier_arrive(barriers.index(1 + rows), increment_count=False)
        kv_value_rows = kv_value.index(rows)
        _store_dequantized(b_bytes_0, b_scale_0, kv_value_rows, 0)
        _store_dequantized(b_bytes_1, b_scale_1, kv_value_rows, 1)
        _store_dequantized(b_bytes_2, b_scale_2, kv_value_rows, 2)
        _store_dequantized(b_bytes_3, b_scale_3, kv_value_rows, 3)
        fence_async_shared()  # the consumers' tensor cores read the stores through the async proxy
        mbarrier.arrive(barriers.index(1 + rows), count=1)
    async_copy.commit_group()
    async_copy.wait_group(0)


@gluon.jit
def _sparse_mla_gluon_fp8_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_sink, p_out, p_lse,
    h, s_kv, topk, slots_per_split, scale_log2,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_o_s, stride_o_m, stride_o_h, stride_l_s, stride_l_m,
    sink_heads,
    HAS_TOPK_LENGTH: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_T: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
    NUM_BUFFERS: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr,
):
    """One query (axis 0), ``BLOCK_H`` of its heads (axis 1) and one slot range (axis 2): out and lse
    over that range (the final ones with one split, partials for the combine kernel otherwise)."""
    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_V], gl.bfloat16)
    rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_R], gl.bfloat16)
    q_value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_V], gl.bfloat16)
    q_rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_R], gl.bfloat16)
    prob_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_T], gl.bfloat16)
    stats_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

    query = gl.program_id(0)
    head_begin = gl.program_id(1) * BLOCK_H
    split = gl.program_id(2)
    # The same shared memory as the bf16 kernel (its docstring: ~226 KiB); Q a [1, ...] allocation for
    # the same reason as there.
    q_value = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_V], q_value_smem)
    q_rest = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_R], q_rest_smem)
    kv_value = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUFFERS, BLOCK_T, D_V], value_smem)
    kv_rest = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUFFERS, BLOCK_T, D_R], rest_smem)
    prob = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_T], prob_smem)
    stats = gl.allocate_shared_memory(gl.float32, [6, BLOCK_H], stats_smem)
    # [0] Q landed (128 copy arrivals); [1, 1 + B) rows landed (128 copy arrivals and the producer's
    # one after its stores); [1 + B, 1 + 2B) rows free (one arrival per consumer); then P ready x 2 (1)
    # and P free x 2 (2): the consumers' barriers as in the bf16 kernel.
    barriers = gl.allocate_shared_memory(gl.int64, [1 + 2 * NUM_BUFFERS + 4, 1], mbarrier.MBarrierLayout())
    mbarrier.init(barriers.index(0), count=128)
    for b in gl.static_range(NUM_BUFFERS):
        mbarrier.init(barriers.index(1 + b), count=128 + 1)
        mbarrier.init(barriers.index(1 + NUM_BUFFERS + b), count=2)
    for b in gl.static_range(2):
        mbarrier.init(barriers.index(1 + 2 * NUM_BUFFERS + b), count=1)
        mbarrier.init(barriers.index(1 + 2 * NUM_BUFFERS + 2 + b), count=2)

    n_slots = topk
    if HAS_TOPK_LENGTH:
        n_slots = gl.minimum(gl.maximum(gl.load(p_topk_length + query), 0), topk)
    slot_begin = split * slots_per_split
    # The partitions count the slots of this program from 0: its indices' row starts at slot_begin.
    slot_end = gl.maximum(gl.minimum(slot_begin + slots_per_split, n_slots) - slot_begin, 0)
    p_indices_row = p_indices + query.to(gl.int64) * stride_i_m + slot_begin
    p_out_rows = (p_out + split.to(gl.int64) * stride_o_s + query.to(gl.int64) * stride_o_m
                  + head_begin * stride_o_h)
    p_lse_row = p_lse + split.to(gl.int64) * stride_l_s + query.to(gl.int64) * stride_l_m + head_begin
    p_q_rows = p_q + query.to(gl.int64) * stride_q_m + head_begin * stride_q_h
    arguments = (p_indices_row, p_sink, p_out_rows, p_lse_row, slot_end, s_kv, scale_log2, stride_o_h, head_begin,
                 q_value, q_rest, kv_value, kv_rest, prob, stats, barriers, sink_heads,
                 p_kv, stride_kv, p_q_rows, stride_q_h)
    gl.warp_specialize([
        (_consumer_0, arguments),
        (_consumer_1, arguments),
        (_producer_fp8, arguments),
    ], [4, 4], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


_fp8_launch = CachedLauncher(_sparse_mla_gluon_fp8_kernel)


def fp8_applies(q, kv, d_v: int, indices=None, topk_length=None, attn_sink=None) -> list[str]:
    """Why :func:`sparse_mla_gluon_fp8` cannot run these inputs: short reasons with their values, empty when it can."""
    reasons = list(_input_reasons(q.dim(), q.shape, q.dtype, kv.dim(), kv.shape, kv.dtype, d_v,
                                  None if indices is None else (indices.dim(), indices.shape, indices.dtype),
                                  None if topk_length is None else (topk_length.dim(), topk_length.shape),
                                  None if attn_sink is None else (attn_sink.dim(), attn_sink.shape)))
    reasons += gluon_release_reasons()
    if interpreter_enabled():
        reasons.append("TRITON_INTERPRET=1 (Gluon kernels do not run on Triton's interpreter)")
    reasons += _device_reasons(q.device)
    if kv.device != q.device:
        reasons.append(f"kv device={kv.device}, q device={q.device} (must be the same)")
    return reasons


@functools.lru_cache(maxsize=1024)
def _input_reasons(q_dim, q_shape, q_dtype, kv_dim, kv_shape, kv_dtype, d_v, indices, topk_length,
                   attn_sink) -> tuple[str, ...]:
    """The reasons of :func:`fp8_applies` that the inputs' shapes and dtypes decide."""
    reasons = []
    if q_dtype != torch.bfloat16:
        reasons.append(f"q dtype={q_dtype} (supported: torch.bfloat16)")
    if q_dim != 3 or q_shape[-1] != D_QK:
        reasons.append(f"q shape={tuple(q_shape)} (supported: [s_q, h, {D_QK}])")
    elif q_shape[1] % BLOCK_H != 0:
        reasons.append(f"h={q_shape[1]} (supported: a multiple of {BLOCK_H})")
    if kv_dtype != torch.uint8:
        reasons.append(f"kv dtype={kv_dtype} (supported: torch.uint8, the packed FP8 cache)")
    if kv_dim != 2 or kv_shape[-1] != KV_CACHE_FP8_BYTES:
        reasons.append(f"kv shape={tuple(kv_shape)} (supported: [s_kv, {KV_CACHE_FP8_BYTES}])")
    if d_v != D_V:
        reasons.append(f"d_v={d_v} (supported: {D_V})")
    if indices is not None:
        indices_dim, indices_shape, indices_dtype = indices
        if indices_dtype not in (torch.int32, torch.int64):
            reasons.append(f"indices dtype={indices_dtype} (supported: torch.int32, torch.int64)")
        if indices_dim != 2 or (q_dim == 3 and indices_shape[0] != q_shape[0]):
            reasons.append(f"indices shape={tuple(indices_shape)} (supported: [s_q, topk])")
    if topk_length is not None and (topk_length[0] != 1 or (q_dim == 3 and topk_length[1][0] != q_shape[0])):
        reasons.append(f"topk_length shape={tuple(topk_length[1])} (supported: [s_q])")
    if attn_sink is not None and (attn_sink[0] != 1 or (q_dim == 3 and attn_sink[1][0] != q_shape[1])):
        reasons.append(f"attn_sink shape={tuple(attn_sink[1])} (supported: [h])")
    return tuple(reasons)


def fp8_splits(s_q: int, h: int, topk: int, multiprocessors: int) -> int:
    """Slot splits of a launch: doubled while twice the programs (one an SM) still run at once and each
    split keeps :data:`MIN_SPLIT_SLOTS` slots."""
    programs = s_q * (h // BLOCK_H)
    splits = 1
    while programs * splits * 2 <= multiprocessors and topk // (splits * 2) >= MIN_SPLIT_SLOTS:
        splits *= 2
    return splits


def sparse_mla_gluon_fp8(q, kv, indices, sm_scale: float, topk_length=None, attn_sink=None, *, d_v: int = D_V,
                         num_splits: int | None = None):
    """``(out float32 [s_q, h, 512], lse float32 [s_q, h])`` over the FP8 cache; see :func:`dsa_ref.sparse_mla`.

    ``num_splits`` overrides :func:`fp8_splits` (for tuning). Raises ValueError listing every reason of
    :func:`fp8_applies` when it cannot run the inputs.
    """
    from .sparse_mla import _combine_launch, _multiprocessors

    reasons = fp8_applies(q, kv, d_v, indices, topk_length, attn_sink)
    if reasons:
        raise ValueError("the Gluon FP8 sparse MLA kernel does not apply: " + "; ".join(reasons))
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    device = q.device
    q, kv = _aligned(q), _aligned(kv)
    if indices.dtype == torch.int64:
        # An int64 index past int32 would wrap into a valid row; it is invalid, so it becomes -1 first.
        indices = torch.where((indices < 0) | (indices >= s_kv), -1, indices)
    indices = indices.to(torch.int32).contiguous()
    out = torch.empty((s_q, h, D_V), dtype=torch.float32, device=device)
    lse = torch.empty((s_q, h), dtype=torch.float32, device=device)
    if s_q == 0 or h == 0:
        return out, lse
    if topk_length is not None:
        topk_length = topk_length.to(device=device, dtype=torch.int32).contiguous()
    if attn_sink is not None:
        attn_sink = attn_sink.to(device=device, dtype=torch.float32).contiguous()
    splits = fp8_splits(s_q, h, topk, _multiprocessors(device)) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"num_splits={num_splits} (expected a positive int)")
    slots_per_split = -(-max(topk, 1) // (splits * BLOCK_T)) * BLOCK_T
    lengths = lse if topk_length is None else topk_length
    sink = lse if attn_sink is None else attn_sink
    grid = (s_q, h // BLOCK_H, splits)
    constants = dict(HAS_TOPK_LENGTH=topk_length is not None, BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, D_V=D_V, D_R=D_R,
                     NUM_BUFFERS=NUM_BUFFERS, CONSUMER_REGISTERS=CONSUMER_REGISTERS,
                     PRODUCER_REGISTERS=PRODUCER_REGISTERS, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    scale_log2 = float(sm_scale) * LOG2E
    common = (h, s_kv, topk, slots_per_split, scale_log2, q.stride(0), q.stride(1), kv.stride(0), indices.stride(0))
    if splits == 1:
        _fp8_launch(grid, q, kv, indices, lengths, sink, out, lse, *common, 0, h * D_V, D_V, 0, h,
                    0 if attn_sink is None else h, **constants)
        return out, lse
    # Partials normalized over their own slots, merged with their lse weights (the sink applied there).
    part_out = torch.empty((splits, s_q, h, D_V), dtype=torch.float32, device=device)
    part_lse = torch.empty((splits, s_q, h), dtype=torch.float32, device=device)
    _fp8_launch(grid, q, kv, indices, lengths, sink, part_out, part_lse, *common,
                s_q * h * D_V, h * D_V, D_V, s_q * h, h, 0, **constants)
    _combine_launch.launch(launch_options(HAS_SINK=attn_sink is not None, BLOCK_H=BLOCK_H, D_V=D_V, num_warps=4),
                           grid[:2], part_out, part_lse, sink, out, lse, h, D_V, splits,
                           s_q * h * D_V, h * D_V, D_V, s_q * h, h, h * D_V, D_V, h)
    return out, lse

