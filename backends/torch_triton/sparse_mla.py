"""Sparse MLA forward kernel (paper eq. 2, MQA mode) over bf16/fp16/fp32 latent rows or the
packed FP8 cache (656 bytes a token), with an online softmax.

.. math:: \\mathrm{out}_{i,h} = \\sum_{t\\ \\mathrm{valid}}
          \\mathrm{softmax}_t(\\mathrm{sm\\_scale}\\; q_{i,h}\\cdot kv_{\\mathrm{idx}_{i,t}})\\,
          kv_{\\mathrm{idx}_{i,t},:d_v}

How the work is laid out. A program takes one query and ``BLOCK_H`` of its heads, and walks
over its index slots ``BLOCK_T`` at a time: it gathers the ``BLOCK_T`` selected latent rows once
(an invalid index is replaced by row 0 *and* masked, so it is never dereferenced), and every
head of the block uses them: ``S = Q K^T`` is a ``[BLOCK_H, d_qk] x [d_qk, BLOCK_T]`` tensor-core
product and ``O += P V`` a ``[BLOCK_H, BLOCK_T] x [BLOCK_T, d_v]`` one, with ``V`` the first
``d_v`` columns of the same gathered rows. The ``d_qk`` columns are split into the ``d_v`` value
columns and the rest (the 64 RoPE columns of DeepSeek's 576 = 512 + 64), so each product runs
on power-of-two blocks. The softmax runs in base 2 with a running max (FlashAttention's online
softmax); P is rounded to the input dtype before the P V product, as in FlashAttention.

FP8 cache rows (uint8 ``[s_kv, 656]``: 512 e4m3 values, 4 float32 power-of-two scales, 64 bf16
RoPE values) are dequantized to bf16 on the fly; this is exact (e4m3 times a power of two fits
in bf16), so the tensor-core products see exactly the reference's dequantized values.

Decode (few queries, many heads) leaves most of the GPU idle with one program per query and
head block, so the slots can be split over ``NUM_SPLITS`` programs (flash-decoding); each
writes a partial ``(out, lse)`` and :func:`_combine_kernel` merges them with their lse weights.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from dsa_ref.reference.formats import KV_LATENT_DIM, KV_ROPE_DIM, KV_SCALE_BLOCK

from .launch import CachedLauncher, direct_stream, launch_options
from .precision import dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH: tl.constexpr):
    """The slots of ``query`` that count: ``topk``, or its ``topk_length`` clamped into ``[0, topk]``."""
    n_slots = topk
    if HAS_TOPK_LENGTH:
        n_slots = tl.minimum(tl.maximum(tl.load(p_topk_length + query), 0), topk)
    return n_slots


@triton.jit
def _load_rows(p_kv, b_row, m_valid, d_v, d_qk, stride_kv,
               o_dv, o_dr, KV_FP8: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
               SCALE_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Gather latent rows ``b_row`` as (value part ``[BLOCK_T, D_V]``, rest ``[BLOCK_T, D_R]``).

    Masked slots load zeros and touch no memory.
    """
    p_rows = p_kv + b_row.to(tl.int64)[:, None] * stride_kv
    if KV_FP8:
        # bytes [0, 512): e4m3 latent; [512, 528): 4 fp32 scales; [528, 656): 64 bf16 RoPE values.
        b_bytes = tl.load(p_rows + o_dv[None, :], mask=m_valid[:, None], other=0)
        b_latent = b_bytes.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # [BLOCK_T, D_V]
        p_scales = (p_rows + D_V).to(tl.pointer_type(tl.float32))
        o_scale = tl.arange(0, SCALE_BLOCKS)
        b_scales = tl.load(p_scales + o_scale[None, :], mask=m_valid[:, None], other=0.0)  # [BLOCK_T, 4]
        b_latent = tl.reshape(b_latent, (BLOCK_T, SCALE_BLOCKS, D_V // SCALE_BLOCKS)) * b_scales[:, :, None]
        b_value = tl.reshape(b_latent, (BLOCK_T, D_V)).to(COMPUTE_DTYPE)
        p_rope = (p_rows + D_V + 4 * SCALE_BLOCKS).to(tl.pointer_type(tl.bfloat16))
        b_rest = tl.load(p_rope + o_dr[None, :], mask=m_valid[:, None], other=0.0).to(COMPUTE_DTYPE)
    else:
        b_value = tl.load(p_rows + o_dv[None, :], mask=m_valid[:, None] & (o_dv < d_v)[None, :], other=0.0)
        b_rest = tl.load(p_rows + d_v + o_dr[None, :], mask=m_valid[:, None] & (o_dr < d_qk - d_v)[None, :],
                         other=0.0)
    return b_value, b_rest


@triton.jit
def _sparse_mla_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_sink, p_out, p_lse,
    s_q, h, s_kv, topk, d_v, d_qk, slots_per_split, scale_log2,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_o_s, stride_o_m, stride_o_h, stride_l_s, stride_l_m,
    HAS_TOPK_LENGTH: tl.constexpr, HAS_SINK: tl.constexpr, KV_FP8: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
    SCALE_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query (axis 0), ``BLOCK_H`` heads (axis 1), one slot range (axis 2, ``SPLIT`` only).

    Without ``SPLIT`` it writes the final out/lse (sink applied); with it, the partial out
    (normalized over its own slots) and partial lse of its slot range, for the combine kernel.
    """
    query = tl.program_id(0)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < h
    o_dv = tl.arange(0, D_V)
    o_dr = tl.arange(0, D_R)
    m_dv = o_dv < d_v
    m_dr = o_dr < d_qk - d_v

    p_q_rows = p_q + query.to(tl.int64) * stride_q_m + o_h[:, None] * stride_q_h
    b_q_value = tl.load(p_q_rows + o_dv[None, :], mask=m_h[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_H, D_V]
    b_q_rest = tl.load(p_q_rows + d_v + o_dr[None, :], mask=m_h[:, None] & m_dr[None, :], other=0.0)
    b_q_value = b_q_value.to(COMPUTE_DTYPE)
    b_q_rest = b_q_rest.to(COMPUTE_DTYPE)

    n_slots = _slot_count(p_topk_length, query, topk, HAS_TOPK_LENGTH)
    slot_begin = tl.program_id(2) * slots_per_split
    slot_end = tl.minimum(slot_begin + slots_per_split, n_slots)

    b_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max of the base-2 logits
    b_sum = tl.zeros((BLOCK_H,), tl.float32)  # running softmax denominator
    b_acc = tl.zeros((BLOCK_H, D_V), tl.float32)
    p_index_row = p_indices + query.to(tl.int64) * stride_i_m
    for t in range(slot_begin, slot_end, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        b_index = tl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_row = tl.where(m_valid, b_index, 0)  # invalid slots point at row 0 and load nothing
        b_value, b_rest = _load_rows(p_kv, b_row, m_valid, d_v, d_qk, stride_kv, o_dv, o_dr,
                                     KV_FP8, BLOCK_T, D_V, D_R, SCALE_BLOCKS, COMPUTE_DTYPE)
        b_logits = tl.dot(b_q_value, tl.trans(b_value), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T]
        b_logits = tl.dot(b_q_rest, tl.trans(b_rest), b_logits, input_precision=DOT_PRECISION)
        b_logits = tl.where(m_valid[None, :], b_logits * scale_log2, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_logits, axis=1))
        # A head that has seen no valid slot keeps max -inf; subtract 0 instead so exp2 stays 0, not NaN.
        b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_rescale = tl.exp2(b_max - b_shift)
        b_prob = tl.exp2(b_logits - b_shift[:, None])  # [BLOCK_H, BLOCK_T], 0 at invalid slots
        b_sum = b_sum * b_rescale + tl.sum(b_prob, axis=1)
        b_acc = b_acc * b_rescale[:, None] + tl.dot(b_prob.to(COMPUTE_DTYPE), b_value,
                                                           input_precision=DOT_PRECISION)
        b_max = b_max_new

    m_empty = b_sum == 0.0
    b_out = tl.where(m_empty[:, None], 0.0, b_acc / tl.where(m_empty, 1.0, b_sum)[:, None])
    # Natural-log lse; an empty softmax (no valid slot) has lse = log(0) = -inf.
    b_lse = tl.where(m_empty, float("-inf"), (b_max + tl.log2(tl.where(m_empty, 1.0, b_sum))) / 1.4426950408889634)
    if HAS_SINK and not SPLIT:
        b_sink = tl.load(p_sink + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_out = b_out * (1.0 / (1.0 + tl.exp(b_sink - b_lse)))[:, None]
    p_out_rows = p_out + tl.program_id(2).to(tl.int64) * stride_o_s + query.to(tl.int64) * stride_o_m
    tl.store(p_out_rows + o_h[:, None] * stride_o_h + o_dv[None, :], b_out, mask=m_h[:, None] & m_dv[None, :])
    p_lse_row = p_lse + tl.program_id(2).to(tl.int64) * stride_l_s + query.to(tl.int64) * stride_l_m
    tl.store(p_lse_row + o_h, b_lse, mask=m_h)


@triton.jit
def _combine_kernel(p_part_out, p_part_lse, p_sink, p_out, p_lse, h, d_v, num_splits,
                    stride_po_s, stride_po_m, stride_po_h, stride_pl_s, stride_pl_m,
                    stride_o_m, stride_o_h, stride_l_m,
                    HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr, D_V: tl.constexpr):
    """Merge the split partials of one query: lse = log sum_s exp(lse_s), out = sum_s e^(lse_s - lse) out_s."""
    query = tl.program_id(0)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < h
    o_dv = tl.arange(0, D_V)
    m_out = m_h[:, None] & (o_dv < d_v)[None, :]
    b_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for split in range(0, num_splits):
        b_part = tl.load(p_part_lse + split * stride_pl_s + query * stride_pl_m + o_h, mask=m_h, other=float("-inf"))
        b_max = tl.maximum(b_max, b_part)
    b_shift = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_sum = tl.zeros((BLOCK_H,), tl.float32)
    b_acc = tl.zeros((BLOCK_H, D_V), tl.float32)
    for split in range(0, num_splits):
        b_part = tl.load(p_part_lse + split * stride_pl_s + query * stride_pl_m + o_h, mask=m_h, other=float("-inf"))
        b_weight = tl.exp(b_part - b_shift)  # 0 for an empty split
        p_part = p_part_out + split * stride_po_s + query.to(tl.int64) * stride_po_m
        b_part_out = tl.load(p_part + o_h[:, None] * stride_po_h + o_dv[None, :], mask=m_out, other=0.0)
        b_acc += b_weight[:, None] * b_part_out
        b_sum += b_weight
    m_empty = b_sum == 0.0
    b_out = tl.where(m_empty[:, None], 0.0, b_acc / tl.where(m_empty, 1.0, b_sum)[:, None])
    b_lse = tl.where(m_empty, float("-inf"), b_shift + tl.log(tl.where(m_empty, 1.0, b_sum)))
    if HAS_SINK:
        b_sink = tl.load(p_sink + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_out = b_out * (1.0 / (1.0 + tl.exp(b_sink - b_lse)))[:, None]
    tl.store(p_out + query.to(tl.int64) * stride_o_m + o_h[:, None] * stride_o_h + o_dv[None, :], b_out, mask=m_out)
    tl.store(p_lse + query.to(tl.int64) * stride_l_m + o_h, b_lse, mask=m_h)


# The launches of every call: after a signature's first call they skip Triton's argument processing.
_sparse_mla_launch = CachedLauncher(_sparse_mla_kernel)
_combine_launch = CachedLauncher(_combine_kernel)

_COMPUTE_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@functools.lru_cache(maxsize=None)
def _multiprocessors(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def sparse_mla_config(s_q: int, h: int, topk: int, d_v: int, d_qk: int, kv_fp8: bool, dtype, device) -> dict:
    """Block sizes, and the number of slot splits that fills the GPU when queries are few (a new dict
    each call: callers may edit it)."""
    return dict(_sparse_mla_config(s_q, h, topk, d_v, d_qk, kv_fp8, dtype, device))


@functools.lru_cache(maxsize=4096)  # every decode step asks again for the same shapes
def _sparse_mla_config(s_q: int, h: int, topk: int, d_v: int, d_qk: int, kv_fp8: bool, dtype, device) -> dict:
    """See :func:`sparse_mla_config`.

    float32 operands (3xTF32) keep a high and a low half of the query and row tiles in shared
    memory: 64 heads at d_v 512 would need 488 KiB, over the H100's 227 KiB, so they take 16 heads
    at a time (144 KiB; the compiler's count, checked in tests/test_triton_resources.py).
    """
    block_h = max(16, min(16 if dtype == torch.float32 else 64, triton.next_power_of_2(h)))
    d_v_pad = max(16, triton.next_power_of_2(d_v))
    d_rest_pad = max(16, triton.next_power_of_2(max(d_qk - d_v, 1)))
    block_t = 32 if dtype == torch.float32 else 64
    block_t = max(16, min(block_t, triton.next_power_of_2(max(topk, 1))))
    programs = s_q * triton.cdiv(h, block_h)
    # Split only when the queries leave most multiprocessors idle. Measured on an H100 (FP8 decode,
    # b 64, s_q 1, h 128 = 128 programs for 132 SMs): 1 split 0.201 ms, 2 splits 0.365, 4 splits
    # 0.483: one program per SM already beats writing and merging partials there.
    num_splits = 1
    while programs * num_splits * 4 <= _multiprocessors(device) and topk // (num_splits * 2) >= 4 * block_t:
        num_splits *= 2
    return dict(BLOCK_H=block_h, BLOCK_T=block_t, D_V=d_v_pad, D_R=d_rest_pad,
                num_splits=num_splits, num_warps=8 if d_v_pad >= 256 else 4, num_stages=2)


SPARSE_MLA_KERNELS = ("tl", "gluon", "gluon_pingpong", "gluon_fp8")


def sparse_mla(q, kv, indices, sm_scale: float, d_v: int, topk_length=None, attn_sink=None, *,
               num_splits: int | None = None, config: dict | None = None, kernel: str = "tl"):
    """``(out float32 [s_q, h, d_v], lse float32 [s_q, h])``; see :func:`dsa_ref.sparse_mla`.

    ``kv`` is ``[s_kv, d_qk]`` (same dtype as ``q``) or the packed FP8 cache, uint8 ``[s_kv, 656]``.
    ``num_splits`` and ``config`` override the launch choices of :func:`sparse_mla_config` (for tuning).
    ``kernel="gluon"`` runs the Hopper kernel of :mod:`.sparse_mla_gluon` instead of this module's
    ``tl.dot`` one (the backend's default on Hopper where it applies; called here directly, it raises
    ValueError with the reasons when it does not apply); ``kernel="gluon_pingpong"`` its warp-specialized
    variant (:mod:`.sparse_mla_gluon_pingpong`, same inputs; the backend's default where the Gluon kernel
    applies since its measurement on the H200, NOTES.md version 12); ``kernel="gluon_fp8"`` the ping-pong
    kernel over the packed FP8 cache (:mod:`.sparse_mla_gluon_fp8`, bf16 q; it takes ``num_splits``).
    """
    if kernel != "tl":
        if kernel not in SPARSE_MLA_KERNELS:
            raise ValueError(f"kernel={kernel!r} is not a valid sparse MLA kernel; "
                             f"available: {list(SPARSE_MLA_KERNELS)}")
        if kernel == "gluon_fp8":
            if config is not None:
                raise ValueError("config tunes the 'tl' kernel; kernel='gluon_fp8' takes num_splits only")
            from .sparse_mla_gluon_fp8 import sparse_mla_gluon_fp8

            return sparse_mla_gluon_fp8(q, kv, indices, sm_scale, topk_length, attn_sink, d_v=d_v,
                                        num_splits=num_splits)
        if num_splits is not None or config is not None:
            raise ValueError(f"num_splits and config tune the 'tl' kernel; kernel={kernel!r} takes neither")
        if kernel == "gluon_pingpong":
            from .sparse_mla_gluon_pingpong import sparse_mla_gluon_pingpong

            return sparse_mla_gluon_pingpong(q, kv, indices, sm_scale, topk_length, attn_sink, d_v=d_v)
        from .sparse_mla_gluon import sparse_mla_gluon

        return sparse_mla_gluon(q, kv, indices, sm_scale, topk_length, attn_sink, d_v=d_v)
    default_plan = config is None and num_splits is None
    if default_plan:
        repeat = _REPEATED.get(_repeat_key(q, kv, indices, d_v, topk_length, attn_sink))
        if repeat is not None:
            result = _launch_again(repeat, q, kv, indices, sm_scale, topk_length, attn_sink)
            if result is not None:
                return result
    given = (q, kv, indices, topk_length, attn_sink)
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    kv_fp8 = kv.dtype == torch.uint8
    device = q.device
    # Each stride read once: a decode call is a few microseconds of GPU work, and every Python call
    # on the host counts against it.
    q_stride = q.stride()
    if q_stride[-1] != 1:
        q = q.contiguous()
        q_stride = q.stride()
    kv_stride = kv.stride()
    if kv_stride[-1] != 1:
        kv = kv.contiguous()
        kv_stride = kv.stride()
    index_stride = indices.stride()
    if index_stride[-1] != 1 or indices.dtype not in (torch.int32, torch.int64):
        indices = indices.contiguous()
        index_stride = indices.stride()
    compute_dtype = q.dtype  # with the FP8 cache: bf16 or float32 (the cache dequantizes exactly into either)
    # The outputs are the caller's, one allocation each: a custom op's outputs may not share memory.
    out = torch.empty((s_q, h, d_v), dtype=torch.float32, device=device)
    lse = torch.empty((s_q, h), dtype=torch.float32, device=device)
    if s_q == 0 or h == 0:
        return out, lse
    if topk_length is not None:
        topk_length = topk_length.to(torch.int32).contiguous()
    if attn_sink is not None:
        attn_sink = attn_sink.to(torch.float32).contiguous()
    if default_plan:  # every decode step: the same launch, computed once
        splits, slots_per_split, common, options, combine_options = _launch_plan(
            s_q, h, topk, d_v, d_qk, kv_fp8, compute_dtype, device, topk_length is not None, attn_sink is not None)
    else:
        splits, slots_per_split, common = _plan(s_q, h, topk, d_v, d_qk, kv_fp8, compute_dtype, device,
                                                topk_length is not None, attn_sink is not None, num_splits, config)
        options, combine_options = _launch_options(splits, common, attn_sink is not None)
    block_h = common["BLOCK_H"]
    grid = (s_q, (h + block_h - 1) // block_h, splits)  # not triton.cdiv: a constexpr function, ~3 us a call
    scale_log2 = sm_scale * LOG2E
    dummy = lse  # for the pointers the kernel does not read
    lengths = dummy if topk_length is None else topk_length
    sink = dummy if attn_sink is None else attn_sink
    # The strides of the fresh contiguous outputs, as torch gives them (a size-0 dimension counts as 1).
    row = max(d_v, 1)
    head_stride, query_stride = row, h * row
    if splits == 1:
        split_args = (q, kv, indices, lengths, sink, out, lse,
                      s_q, h, s_kv, topk, d_v, d_qk, slots_per_split, scale_log2,
                      q_stride[0], q_stride[1], kv_stride[0], index_stride[0], 0, query_stride, head_stride, 0, h)
        _sparse_mla_launch.launch(options, grid, *split_args)
        if default_plan and _unconverted(given, q, kv, indices, topk_length, attn_sink):
            _remember(given, d_v, options, grid, split_args, None, None, (out, lse))
        return out, lse
    # The partials are the kernels' own: one allocation, the lse after the outputs at a 16-byte
    # boundary (so both pointers keep the alignment Triton specializes on, as two allocations had).
    # The kernels read a partial through its pointer and the strides passed here, never its shape.
    split_stride = s_q * query_stride
    part_out_size = (splits * split_stride + 3) & ~3
    part_out = torch.empty(part_out_size + splits * s_q * h, dtype=torch.float32, device=device)
    part_lse = part_out[part_out_size:]
    split_args = (q, kv, indices, lengths, sink, part_out, part_lse,
                  s_q, h, s_kv, topk, d_v, d_qk, slots_per_split, scale_log2,
                  q_stride[0], q_stride[1], kv_stride[0], index_stride[0],
                  split_stride, query_stride, head_stride, s_q * h, h)
    combine_args = (part_out, part_lse, sink, out, lse, h, d_v, splits,
                    split_stride, query_stride, head_stride, s_q * h, h, query_stride, head_stride, h)
    _sparse_mla_launch.launch(options, grid, *split_args)
    _combine_launch.launch(combine_options, grid[:2], *combine_args)
    if default_plan and _unconverted(given, q, kv, indices, topk_length, attn_sink):
        _remember(given, d_v, options, grid, split_args, combine_options, combine_args, (out, lse, part_out))
    return out, lse


def _repeat_key(q, kv, indices, d_v, topk_length, attn_sink) -> tuple:
    """What decides a default-plan call's launches, short of its pointers' alignment (which
    :func:`_launch_again` tests) and its scale's type: the shapes, strides and dtypes behind every int
    and tensor argument and the plan (``q``'s device: the SM count), and which optional inputs there are.
    Exact values where a kernel specializes on codes only: a new value makes one more entry, never a
    stale one."""
    return (q.shape, q.stride(), q.dtype, q.device, kv.shape, kv.stride(), kv.dtype, indices.shape,
            indices.stride(), indices.dtype, d_v, topk_length is None, attn_sink is None)


class _Repeat:
    """A default-plan call's launches, kept for the calls of its :func:`_repeat_key`: the launchers and
    their :class:`~.launch.DirectLaunch` es, the grids and options, and the launch arguments that follow
    from the key (everything but the tensors and the scale), as the general path passed them."""

    __slots__ = ("split_launcher", "combine_launcher", "split", "combine", "launches", "options",
                 "combine_options", "grid", "combine_grid", "out_shape", "lse_shape", "part_numel",
                 "part_lse_offset", "split_head", "split_strides", "combine_scalars")


#: :class:`_Repeat` of each :func:`_repeat_key` seen: a decode loop's calls are a dict lookup, the
#: outputs' allocations and the launches.
_REPEATED: dict = {}
#: Keys kept before the table starts over (a decode loop uses a handful).
REPEATED_LIMIT = 1024
#: Where the scale sits among the split kernel's arguments (the ints before it, the strides after).
_SCALE_ARGUMENT = 14


def _unconverted(given, q, kv, indices, topk_length, attn_sink) -> bool:
    """True when the general path launched the caller's own tensors (no copy made contiguous or cast),
    which a repeated call hands the kernels as they are."""
    return all(a is b for a, b in zip(given, (q, kv, indices, topk_length, attn_sink)))


def _remember(given, d_v, options, grid, split_args, combine_options, combine_args, buffers):
    """Keep the launches just made for the calls of the same :func:`_repeat_key`, when a repeated call
    can make them as they are: the cached launchers (not a stand-in), every pointer 16-byte aligned (the
    one class :func:`_launch_again` launches), a float scale, and both kernels' compiled launches found."""
    if not (isinstance(_sparse_mla_launch, CachedLauncher) and isinstance(_combine_launch, CachedLauncher)):
        return
    pointers = 0
    for tensor in (*split_args[:5], *buffers):
        pointers |= tensor.data_ptr()
    if pointers & 15 or split_args[_SCALE_ARGUMENT].__class__ is not float:
        return
    split = _sparse_mla_launch.direct(options, split_args)
    combine = None if combine_args is None else _combine_launch.direct(combine_options, combine_args)
    if split is None or (combine_args is not None and combine is None):
        return
    repeat = _Repeat()
    repeat.split_launcher, repeat.combine_launcher = _sparse_mla_launch, _combine_launch
    repeat.split, repeat.combine = split, combine
    repeat.launches = (split,) if combine is None else (split, combine)
    repeat.options, repeat.combine_options = options, combine_options
    repeat.grid, repeat.combine_grid = grid, grid[:2]
    out, lse = buffers[:2]
    repeat.out_shape, repeat.lse_shape = out.shape, lse.shape
    if combine is not None:
        part_out, part_lse = split_args[5:7]
        repeat.part_numel, repeat.part_lse_offset = part_out.numel(), part_lse.storage_offset()
        repeat.combine_scalars = combine_args[5:]
    repeat.split_head, repeat.split_strides = split_args[7:_SCALE_ARGUMENT], split_args[_SCALE_ARGUMENT + 1:]
    if len(_REPEATED) >= REPEATED_LIMIT:
        _REPEATED.clear()
    _REPEATED[_repeat_key(*given[:3], d_v, *given[3:])] = repeat


def _launch_again(repeat: _Repeat, q, kv, indices, sm_scale, topk_length, attn_sink):
    """``(out, lse)`` of a call of ``repeat``'s key, launched as the general path would launch it; None,
    before allocating anything, for a call it does not cover (the general path then runs)."""
    if repeat.split_launcher is not _sparse_mla_launch or repeat.combine_launcher is not _combine_launch:
        return None  # the module's launchers were replaced (a tool's or a test's stand-in)
    scale_log2 = sm_scale * LOG2E
    if scale_log2.__class__ is not float:
        return None
    pointers = q.data_ptr() | kv.data_ptr() | indices.data_ptr()
    if topk_length is not None:  # what the general path's conversions would leave as it is
        if topk_length.dtype is not torch.int32 or not topk_length.is_contiguous():
            return None
        pointers |= topk_length.data_ptr()
    if attn_sink is not None:
        if attn_sink.dtype is not torch.float32 or not attn_sink.is_contiguous():
            return None
        pointers |= attn_sink.data_ptr()
    if pointers & 15:
        return None  # another kernel (Triton specializes on 16-byte alignment): the general path's
    device = q.device
    out = torch.empty(repeat.out_shape, dtype=torch.float32, device=device)
    lse = torch.empty(repeat.lse_shape, dtype=torch.float32, device=device)
    lengths = lse if topk_length is None else topk_length
    sink = lse if attn_sink is None else attn_sink
    combine = repeat.combine
    if combine is None:
        split_args = (q, kv, indices, lengths, sink, out, lse, *repeat.split_head, scale_log2, *repeat.split_strides)
        buffers = out.data_ptr() | lse.data_ptr()
    else:
        part_out = torch.empty(repeat.part_numel, dtype=torch.float32, device=device)
        part_lse = part_out[repeat.part_lse_offset:]
        split_args = (q, kv, indices, lengths, sink, part_out, part_lse, *repeat.split_head, scale_log2,
                      *repeat.split_strides)
        buffers = part_out.data_ptr() | out.data_ptr() | lse.data_ptr()
    stream = None if buffers & 15 else direct_stream(*repeat.launches)
    if stream is None:  # through the launchers, which find (or compile) what this call needs
        _sparse_mla_launch.launch(repeat.options, repeat.grid, *split_args)
        if combine is not None:
            _combine_launch.launch(repeat.combine_options, repeat.combine_grid, part_out, part_lse, sink, out, lse,
                                   *repeat.combine_scalars)
        return out, lse
    split = repeat.split
    grid_0, grid_1, grid_2 = repeat.grid
    split.run(grid_0, grid_1, grid_2, stream, split.function, split.metadata, None, None, None, *split_args,
              *split.tail)
    if combine is not None:
        combine.run(grid_0, grid_1, 1, stream, combine.function, combine.metadata, None, None, None,
                    part_out, part_lse, sink, out, lse, *repeat.combine_scalars, *combine.tail)
    return out, lse


def _plan(s_q, h, topk, d_v, d_qk, kv_fp8, compute_dtype, device, has_topk_length, has_sink, num_splits=None,
          config=None):
    """``(splits, slots per split, the kernel's constexpr arguments)`` of one launch."""
    config = {**sparse_mla_config(s_q, h, topk, d_v, d_qk, kv_fp8, compute_dtype, device), **(config or {})}
    splits = config.pop("num_splits") if num_splits is None else num_splits
    config.pop("num_splits", None)
    slots_per_split = triton.cdiv(max(topk, 1), splits * config["BLOCK_T"]) * config["BLOCK_T"]
    common = dict(HAS_TOPK_LENGTH=has_topk_length, HAS_SINK=has_sink, KV_FP8=kv_fp8,
                  SCALE_BLOCKS=KV_LATENT_DIM // KV_SCALE_BLOCK, COMPUTE_DTYPE=_COMPUTE_DTYPES[compute_dtype],
                  DOT_PRECISION=dot_precision(compute_dtype), **config)
    if kv_fp8:
        common["D_V"], common["D_R"] = KV_LATENT_DIM, KV_ROPE_DIM
    return splits, slots_per_split, common


def _launch_options(splits, common, has_sink):
    """The keyword arguments of the forward kernel's launch and of the combine's (None without splits)."""
    options = launch_options(SPLIT=splits != 1, **common)
    if splits == 1:
        return options, None
    return options, launch_options(HAS_SINK=has_sink, BLOCK_H=common["BLOCK_H"], D_V=common["D_V"], num_warps=4)


@functools.lru_cache(maxsize=4096)
def _launch_plan(*key):
    """:func:`_plan` of the default launch choices and the launches' :func:`_launch_options`, cached
    (callers only read them)."""
    splits, slots_per_split, common = _plan(*key)
    return (splits, slots_per_split, common) + _launch_options(splits, common, key[-1])


def default_sm_scale(d_qk: int) -> float:
    return 1.0 / math.sqrt(d_qk)
