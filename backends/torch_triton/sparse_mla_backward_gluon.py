"""Sparse MLA backward for Hopper (sm_90) written in Gluon: one pass, every operand of the tensor
cores in shared memory.

Same contract as :func:`.sparse_mla_backward.sparse_mla_backward` (see
:func:`dsa_ref.sparse_mla_backward` for the math, the gradient of paper eq. 2 in MQA mode), for the
shape family of the Gluon forward (:mod:`.sparse_mla_gluon`): q bf16 ``[s_q, h, 576]`` with ``h`` a
multiple of 64, dense latent rows kv bf16 ``[s_kv, 576]``, ``d_v = 512``; the default (atomic) mode
only; ``ROW_STORES`` makes it the block kernel of deterministic mode (:mod:`.sparse_mla_backward_rows`).
:func:`gluon_backward_applies` says why it does not apply to given inputs.

Why a third backward. The ``tl.dot`` kernels keep their accumulators *and* their operands in
registers: the split kernels recompute the scores twice and their dkv kernel reaches 255 registers
for a ``[32, 576]`` float32 tile; the fused kernel had to take 32 heads and 16 slots a step to fit
(NOTES.md, versions 4 and 5), which puts its products on ``mma.sync`` and doubles the atomics.
Here q, dout, the gathered rows and the two ``[64, 64]`` probability tiles live in shared memory
(224 KiB of Hopper's 227), so one program takes 64 heads (the M of a warpgroup's ``wgmma``) and 64
slots a step, computes each product once, and keeps only ``dq`` and one output chunk in registers.

One program = one query and 64 of its heads, 8 warps = two warpgroups; a step of 64 slots:

1. ``S = q K^T`` and ``dP = dout V^T`` (``[64 heads, 64 slots]``; the two warpgroups side by side
   along the slots, as in the forward), asynchronous ``warpgroup_mma`` over shared memory.
2. ``P = exp(sm_scale S - lse)`` (0 at invalid slots), ``dS = P (f (dP - D) + dlse)``;
   ``f P`` and ``sm_scale dS`` go to shared memory as bf16 (each warpgroup writes its 32 slots).
3. ``dq += (sm_scale dS) K`` into the ``[64, 576]`` float32 accumulator, split along the columns
   over the two warpgroups (``[64, 256]`` + ``[64, 32]`` each: 144 registers a thread).
4. The rows' buffer is free: the gather of the next step's rows starts (``cp.async``), and travels
   while step 5 runs.
5. The rows' contributions ``dkv[idx] += (sm_scale dS)^T q + [:512] (f P)^T dout``, M = 64 slots,
   K = 64 heads, in chunks of 128 columns (``[64, 128]`` float32: 32 registers a thread), each
   added to the float32 ``dkv`` with ``atomic_add`` (the rows of invalid slots are masked: never
   written). With 64-head programs, a (slot, column) gets h / 64 adds from a query.

In deterministic mode the split kernels (:mod:`.sparse_mla_backward`) sort the contributions instead;
``kernel="gluon_deterministic"`` (the backend's deterministic mode on Hopper since its measurement on the
H200, NOTES.md version 14; ``DSA_REF_TRITON_GLUON_DETERMINISTIC=0`` for the split kernels) runs this kernel with ``ROW_STORES``: each contribution of a
valid slot is written once to a buffer (a plain store, no atomic), then summed per row in a fixed
order (:mod:`.sparse_mla_backward_rows`).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

from .launch import CachedLauncher
from .sparse_mla_gluon import (BLOCK_H, D_QK, D_R, D_V, LOG2E, NUM_WARPS, _aligned, _issue_row_gather,
                               gluon_applies)

BLOCK_T = 64  # slots a step: the M of the rows' contributions
D_CHUNK = 128  # columns of the rows' contributions a product (and a round of atomics)


@gluon.jit
def _load_to_shared(p_rows, stride_h, buffer, COLUMNS: gl.constexpr, BLOCK_H: gl.constexpr,
                    layout: gl.constexpr):
    """``buffer[:, :COLUMNS] = rows`` (``[BLOCK_H, COLUMNS]`` of any float dtype, rows ``stride_h``
    apart), cast to bf16 through registers."""
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, layout))
    o_d = gl.arange(0, COLUMNS, layout=gl.SliceLayout(0, layout))
    b_rows = gl.load(p_rows + o_h[:, None] * stride_h + o_d[None, :])
    buffer.store(b_rows.to(gl.bfloat16))


@gluon.jit
def _row_slots(p_index_row, p_entry_row, o_t, slot_end, s_kv, ROW_STORES: gl.constexpr):
    """``(row, valid)`` of slots ``o_t``: the kv row of ``dkv`` a slot adds to, or (``ROW_STORES``) its
    buffer entry from the host's entry table (-1 at an invalid slot). A table instead of the entry's
    arithmetic here: computed in the kernel, the offsets spilled 92-460 bytes at 255 registers."""
    if ROW_STORES:
        b_row = gl.load(p_entry_row + o_t, mask=o_t < slot_end, other=-1)
        m_valid = b_row >= 0
    else:
        b_row = gl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
        m_valid = (b_row >= 0) & (b_row < s_kv)
    return b_row, m_valid


@gluon.jit
def _add_rows(p_rows, b_rows, mask, ROW_STORES: gl.constexpr):
    if ROW_STORES:
        # Each buffer element is written once: a plain store, evict-first (the buffer is read once, by the
        # row sums, after the launch). ptxas spills ~170 bytes around it (it moves the stores among the next
        # chunk's products and keeps more of them live), which the exchanges it replaced did not; measured,
        # the stores take the whole backward from 105.1 to 33.8 ms at S 4096, h 128 (NOTES.md, version 15).
        gl.store(p_rows, b_rows, mask=mask, cache_modifier=".cs")
    else:
        gl.atomic_add(p_rows, b_rows, mask=mask, sem="relaxed")


@gluon.jit
def _sparse_mla_backward_gluon_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_lse, p_delta, p_share, p_d_lse, p_d_out, p_dq, p_dkv, p_entries,
    h, s_kv, topk, query_begin, scale_log2, sm_scale,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_do_m, stride_do_h, stride_dq_m, stride_dq_h, stride_dkv,
    HAS_TOPK_LENGTH: gl.constexpr, HAS_D_LSE: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_T: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr, D_CHUNK: gl.constexpr,
    ROW_STORES: gl.constexpr = False,
):
    """``dq`` of query ``query_begin + axis 0`` and ``BLOCK_H`` heads (axis 1), and their rows' contributions
    to ``dkv``: added with atomics, or (``ROW_STORES``, deterministic mode) stored to the contribution buffer
    ``p_dkv`` ``[chunk queries, topk, h / BLOCK_H, 576]`` (``stride_dkv`` = ``h / BLOCK_H * 576``) at entry
    ``p_entries[axis 0, slot] * (h / BLOCK_H) + axis 1``, valid slots only (their entry >= 0;
    :mod:`.sparse_mla_backward_rows` sums them per row)."""
    # 16-byte copies of bf16 rows (as the forward); dout of any float dtype in [BLOCK_H, D_CHUNK] pieces.
    value_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0])
    rest_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])
    d_out_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NUM_WARPS, 1], [1, 0])
    # wgmma accumulators, the two warpgroups side by side along N: slots for S and dP, columns for dq
    # and for the rows' contributions.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_T // 2, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, D_V // 2, 16])
    rest_acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                              instr_shape=[16, D_R // 2, 16])
    dkv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                         instr_shape=[16, D_CHUNK // 2, 16])
    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_V], gl.bfloat16)
    rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_R], gl.bfloat16)
    prob_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_T], gl.bfloat16)

    query = query_begin + gl.program_id(0)
    head_begin = gl.program_id(1) * BLOCK_H
    # Each buffer is the one entry of a [1, ...] allocation, indexed again at every step by a zero the
    # compiler cannot prove (see the loop): with fixed addresses, the 150 shared-memory descriptors of
    # the products are loop invariants, hoisted out of the loop as 64-bit values, and 500 bytes of
    # them spill; computed in the loop they cost a few uniform adds each.
    q_value_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_V], value_smem)
    q_rest_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_R], rest_smem)
    d_out_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_V], value_smem)
    kv_value_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_T, D_V], value_smem)
    kv_rest_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_T, D_R], rest_smem)
    prob_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, BLOCK_T], prob_smem)  # f P
    d_logits_at = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, BLOCK_T], prob_smem)  # sm_scale dS
    q_value, q_rest, d_out = q_value_at.index(0), q_rest_at.index(0), d_out_at.index(0)
    kv_value, kv_rest = kv_value_at.index(0), kv_rest_at.index(0)

    # q joins the first step's commit group; dout goes through registers (it may be float32).
    p_q_rows = p_q + query.to(gl.int64) * stride_q_m + head_begin * stride_q_h
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, value_layout))
    o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, value_layout))
    async_copy.async_copy_global_to_shared(q_value, p_q_rows + o_h[:, None] * stride_q_h + o_dv[None, :])
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, rest_layout))
    o_dr = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_layout))
    async_copy.async_copy_global_to_shared(q_rest, p_q_rows + D_V + o_h[:, None] * stride_q_h + o_dr[None, :])

    slot_end = topk
    if HAS_TOPK_LENGTH:
        slot_end = gl.minimum(gl.maximum(gl.load(p_topk_length + query), 0), topk)
    p_index_row = p_indices + query.to(gl.int64) * stride_i_m
    p_dkv_at = p_dkv
    p_entry_row = p_entries
    if ROW_STORES:
        p_dkv_at = p_dkv + gl.program_id(1) * (D_V + D_R)
        p_entry_row = p_entries + gl.program_id(0) * topk
    _issue_row_gather(p_kv, p_index_row, 0, slot_end, s_kv, stride_kv, kv_value, kv_rest,
                      BLOCK_T, D_V, D_R, value_layout, rest_layout)
    p_d_out_rows = p_d_out + query.to(gl.int64) * stride_do_m + head_begin * stride_do_h
    for c in gl.static_range(D_V // D_CHUNK):
        _load_to_shared(p_d_out_rows + c * D_CHUNK, stride_do_h, d_out.slice(c * D_CHUNK, D_CHUNK, dim=1),
                        D_CHUNK, BLOCK_H, d_out_layout)

    # The per-head statistics, in the layout of S's rows.
    o_h = head_begin + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
    p_stats = query.to(gl.int64) * h + o_h
    b_lse2 = gl.load(p_lse + p_stats) * 1.4426950408889634  # base 2, as the scores
    b_delta = gl.load(p_delta + p_stats)
    b_share = gl.load(p_share + p_stats)
    if HAS_D_LSE:
        b_d_lse = gl.load(p_d_lse + p_stats)
    else:
        b_d_lse = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))

    b_dq_value = gl.zeros([BLOCK_H, D_V], gl.float32, layout=dq_layout)
    b_dq_rest = gl.zeros([BLOCK_H, D_R], gl.float32, layout=rest_acc_layout)
    n_tiles = gl.cdiv(slot_end, BLOCK_T)
    for tile in range(0, n_tiles):
        t = tile * BLOCK_T
        same = tile // n_tiles  # always 0
        q_value, q_rest, d_out = q_value_at.index(same), q_rest_at.index(same), d_out_at.index(same)
        kv_value, kv_rest = kv_value_at.index(same), kv_rest_at.index(same)
        prob, d_logits = prob_at.index(same), d_logits_at.index(same)
        # This thread's copies are done; the fence hands them (and dout's stores) to the tensor cores'
        # proxy; the barrier waits for every thread's, and tells that every warp is past the previous
        # step's reads of prob and d_logits, which this step overwrites.
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        b_logits = warpgroup_mma(q_value, kv_value.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_T], gl.float32, layout=s_layout), use_acc=False, is_async=True)
        b_logits = warpgroup_mma(q_rest, kv_rest.permute((1, 0)), b_logits, is_async=True)
        b_d_prob = warpgroup_mma(d_out, kv_value.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_T], gl.float32, layout=s_layout), use_acc=False, is_async=True)
        o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, s_layout))
        b_index = gl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_logits, b_d_prob = warpgroup_mma_wait(0, deps=[b_logits, b_d_prob])
        b_prob = gl.where(m_valid[None, :], gl.exp2(b_logits * scale_log2 - b_lse2[:, None]), 0.0)
        b_d_logits = b_prob * (b_share[:, None] * (b_d_prob - b_delta[:, None]) + b_d_lse[:, None])
        prob.store((b_prob * b_share[:, None]).to(gl.bfloat16))
        d_logits.store((b_d_logits * sm_scale).to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of the two tiles are written

        b_dq_value = warpgroup_mma(d_logits, kv_value, b_dq_value, is_async=True)
        b_dq_rest = warpgroup_mma(d_logits, kv_rest, b_dq_rest, is_async=True)
        b_dq_value, b_dq_rest = warpgroup_mma_wait(0, deps=[b_dq_value, b_dq_rest])
        gl.thread_barrier()  # every warp is done with the rows' buffer
        _issue_row_gather(p_kv, p_index_row, t + BLOCK_T, slot_end, s_kv, stride_kv, kv_value, kv_rest,
                          BLOCK_T, D_V, D_R, value_layout, rest_layout)

        # The rows' contributions, while the next rows travel.
        o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, dkv_layout))
        b_index, m_valid = _row_slots(p_index_row, p_entry_row, o_t, slot_end, s_kv, ROW_STORES)
        p_dkv_rows = p_dkv_at + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_dkv
        o_d = gl.arange(0, D_CHUNK, layout=gl.SliceLayout(0, dkv_layout))
        for chunk in gl.static_range(D_V // D_CHUNK):
            b_rows = warpgroup_mma(d_logits.permute((1, 0)), q_value.slice(chunk * D_CHUNK, D_CHUNK, dim=1),
                                   gl.zeros([BLOCK_T, D_CHUNK], gl.float32, layout=dkv_layout), use_acc=False)
            b_rows = warpgroup_mma(prob.permute((1, 0)), d_out.slice(chunk * D_CHUNK, D_CHUNK, dim=1), b_rows)
            _add_rows(p_dkv_rows[:, None] + (chunk * D_CHUNK + o_d)[None, :], b_rows, m_valid[:, None], ROW_STORES)
        b_rows = warpgroup_mma(d_logits.permute((1, 0)), q_rest, gl.zeros([BLOCK_T, D_R], gl.float32, layout=rest_acc_layout), use_acc=False)
        o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, rest_acc_layout))
        b_index, m_valid = _row_slots(p_index_row, p_entry_row, o_t, slot_end, s_kv, ROW_STORES)
        p_dkv_rows = p_dkv_at + D_V + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_dkv
        o_rest = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_acc_layout))
        _add_rows(p_dkv_rows[:, None] + o_rest[None, :], b_rows, m_valid[:, None], ROW_STORES)
    async_copy.wait_group(0)  # the last (empty) gather; q's copies when there was no step

    p_dq_rows = p_dq + query.to(gl.int64) * stride_dq_m + head_begin * stride_dq_h
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, dq_layout))
    o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, dq_layout))
    gl.store(p_dq_rows + o_h[:, None] * stride_dq_h + o_dv[None, :], b_dq_value)
    o_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, rest_acc_layout))
    o_dr = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_acc_layout))
    gl.store(p_dq_rows + D_V + o_h[:, None] * stride_dq_h + o_dr[None, :], b_dq_rest)


# After a signature's first call, the launch skips Triton's argument processing (see .launch).
_gluon_backward_launch = CachedLauncher(_sparse_mla_backward_gluon_kernel)


def gluon_backward_applies(q, kv, d_v: int, indices=None, topk_length=None, attn_sink=None, d_out=None,
                           *, deterministic: bool = False) -> list[str]:
    """Why :func:`sparse_mla_backward_gluon` cannot run these inputs: the forward's reasons
    (:func:`.sparse_mla_gluon.gluon_applies`, the same shape family), dout's, and the mode's; empty
    when it can."""
    reasons = gluon_applies(q, kv, d_v, indices, topk_length, attn_sink)
    if d_out is not None:
        if d_out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(f"d_out dtype={d_out.dtype} (supported: float32, bfloat16, float16)")
        if d_out.dim() != 3 or tuple(d_out.shape) != (q.shape[0], q.shape[1], D_V):
            reasons.append(f"d_out shape={tuple(d_out.shape)} (supported: [s_q, h, {D_V}])")
    if deterministic:
        reasons.append("deterministic=True (its row contributions are float32 atomics; the split kernels "
                       "sort them instead, and kernel='gluon_deterministic' stores and sums them in order)")
    return reasons


def _multiprocessors(device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def sparse_mla_backward_gluon(q, kv, indices, d_out, lse, delta, share, sm_scale: float, topk_length=None,
                              d_lse=None, *, dq=None, dkv=None, deterministic: bool = False):
    """``(dq float32 [s_q, h, 576], dkv float32 [s_kv, 576])`` from the per-(query, head) statistics
    of :func:`.sparse_mla_backward._head_stats` (lse, ``D = Σ dout · out`` and the sink share ``f``,
    float32 ``[s_q, h]`` contiguous). ``dq`` (any contents) and ``dkv`` (zeros), contiguous float32,
    receive the results when given. ``deterministic``: the row gradients are stored and summed per row
    in a fixed order (:mod:`.sparse_mla_backward_rows`), bitwise repeatable. The caller checks
    :func:`gluon_backward_applies` (without ``deterministic``)."""
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    q, kv = _aligned(q), _aligned(kv)
    if indices.dtype == torch.int64:
        # An int64 index past int32 would wrap into a valid row; it is invalid, so it becomes -1 first.
        indices = torch.where((indices < 0) | (indices >= s_kv), -1, indices)
    indices = indices.to(torch.int32).contiguous()
    d_out = d_out.contiguous()
    device = q.device
    if dq is None:
        dq = torch.empty((s_q, h, D_QK), dtype=torch.float32, device=device)
    if dkv is None:
        dkv = torch.zeros((s_kv, D_QK), dtype=torch.float32, device=device)
    if s_q == 0 or h == 0:
        return dq, dkv
    if topk_length is not None:
        topk_length = topk_length.to(device=device, dtype=torch.int32).contiguous()
    if deterministic:
        from . import sparse_mla_backward_rows

        def launch_block(begin, end, contributions, entries):
            _gluon_backward_launch(
                (end - begin, h // BLOCK_H), q, kv, indices, lse if topk_length is None else topk_length, lse,
                delta, share, lse if d_lse is None else d_lse, d_out, dq, contributions, entries, h, s_kv, topk,
                begin, float(sm_scale) * LOG2E, float(sm_scale),
                q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
                dq.stride(0), dq.stride(1), contributions.stride(0),
                HAS_TOPK_LENGTH=topk_length is not None, HAS_D_LSE=d_lse is not None,
                BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, D_V=D_V, D_R=D_R, D_CHUNK=D_CHUNK, ROW_STORES=True,
                num_warps=NUM_WARPS.value)

        sparse_mla_backward_rows.deterministic_backward(launch_block, s_q, h, s_kv, indices, topk_length, dkv,
                                                        _multiprocessors(device))
        return dq, dkv
    _gluon_backward_launch(
        (s_q, h // BLOCK_H), q, kv, indices, lse if topk_length is None else topk_length, lse, delta, share,
        lse if d_lse is None else d_lse, d_out, dq, dkv, indices, h, s_kv, topk, 0, float(sm_scale) * LOG2E,
        float(sm_scale),
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), d_out.stride(0), d_out.stride(1),
        dq.stride(0), dq.stride(1), dkv.stride(0),
        HAS_TOPK_LENGTH=topk_length is not None, HAS_D_LSE=d_lse is not None,
        BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, D_V=D_V, D_R=D_R, D_CHUNK=D_CHUNK, num_warps=NUM_WARPS.value)
    return dq, dkv
