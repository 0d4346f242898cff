"""Sparse MLA forward for Hopper (sm_90) written in Gluon, Triton's lower-level dialect.

Same contract as :func:`.sparse_mla.sparse_mla` (see :func:`dsa_ref.sparse_mla` for the math,
paper eq. 2 in MQA mode), for exactly one shape family: q bf16 ``[s_q, h, 576]`` with ``h`` a
multiple of 64, dense latent rows kv bf16 ``[s_kv, 576]``, ``d_v = 512``. The triton backend runs
it by default for those inputs on a Hopper GPU (``TritonBackend.hopper_forward``; at the module
level, ``sparse_mla.sparse_mla(..., kernel="gluon")``); never on the interpreter.
:func:`gluon_applies` says why it does not apply to given inputs.

Why a second kernel. The ``tl.dot`` kernel keeps the ``[64, 512]`` float32 accumulator, the q
tile and the gathered rows in registers and spills (255 registers, ~930 bytes of stack: NOTES.md,
version 1). Here every operand that is read by the tensor cores lives in shared memory, and only
the accumulator and the small ``[64, 64]`` score tile live in registers.

How the work is laid out (one program = one query and 64 heads, 8 warps = two warpgroups):

- Shared memory: ``Q`` (``[64, 512]`` + ``[64, 64]``, 72 KiB, loaded once), two buffers of the
  gathered rows (``[64, 512]`` + ``[64, 64]`` each, 72 KiB each), ``P`` (``[64, 64]`` bf16,
  8 KiB): 224 KiB of Hopper's 227. The 576 columns are split 512 + 64 because tensor shapes are
  powers of two; the first 512 columns of a gathered row are both its key part and its value.
- Gather: each thread issues 16-byte ``cp.async`` copies of its part of the 64 selected rows
  (an invalid slot is masked: its copy reads nothing and fills zeros), one commit group a
  tile, two tiles in flight: the rows of tile ``i + 1`` travel while tile ``i`` is computed.
  The gather of tile ``i + 1`` is issued while the S product of tile ``i`` runs (asynchronous
  ``warpgroup_mma``), so the L2 latency of the index loads that address it hides under S.
- ``S = Q K^T`` (``warpgroup_mma``, both operands in shared memory) runs with the two
  warpgroups side by side along the slots: each computes the 64 heads x 32 slots of its half
  of the tile, so S is not computed twice. The row max and row sum of the online softmax
  (base 2, log2 e folded into the scale) need both halves; the compiler's cross-warp
  reduction exchanges them through shared memory (a few hundred bytes).
- ``P`` (bf16) goes through shared memory: each warpgroup writes its 32 columns, and both read
  all 64 as the A operand of ``O += P V``. The alternative, each warpgroup computing the whole
  S so P stays in its registers, doubles the S products (53 % of the FLOP); exchanging 8 KiB
  through shared memory costs a barrier instead.
- ``O`` (``[64, 512]`` float32) is split along d_v: warpgroup ``w`` owns columns
  ``[256 w, 256 w + 256)``, 128 registers a thread (FlashMLA's split of d_v over two consumer
  warpgroups).

Not done here (the next steps): a producer warp (``gl.warp_specialize``) that gathers while the
consumers compute, asynchronous ``warpgroup_mma`` so that S of tile ``i + 1`` overlaps the
softmax of tile ``i``, and the FP8 cache.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

from ._interpreter import interpreter_enabled
from .launch import CachedLauncher

LOG2E = 1.4426950408889634
BLOCK_H = 64  # heads a program: the M of one warpgroup's wgmma
BLOCK_T = 64  # slots a tile
D_QK = 576
D_V = 512
D_R = D_QK - D_V  # the RoPE columns, the part of a row that is a key but not a value
NUM_WARPS = gl.constexpr(8)  # two warpgroups (a constexpr global: the kernel reads it)
#: The Triton release whose Gluon API this kernel is written against (the GPU machine's). Gluon is
#: experimental and changes between releases (3.9 removed ``async_copy_global_to_shared``).
GLUON_TRITON_RELEASE = "3.6"


def gluon_release_reasons() -> list[str]:
    """Why the installed Triton cannot build this kernel (empty when it is the release it targets)."""
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    if release != GLUON_TRITON_RELEASE:
        return [f"triton {triton.__version__} (this Gluon kernel is written against Triton "
                f"{GLUON_TRITON_RELEASE}'s Gluon API, which later releases changed)"]
    return []


@gluon.jit
def _issue_row_gather(p_kv, p_index_row, t, slot_end, s_kv, stride_kv, value_buffer, rest_buffer,
                      BLOCK_T: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                      value_layout: gl.constexpr, rest_layout: gl.constexpr):
    """Start the copies of the rows of slots ``[t, t + BLOCK_T)`` into the two buffers (one commit group).

    A slot past ``slot_end`` or with an index outside ``[0, s_kv)`` copies nothing and leaves
    zeros (cp.async's zero fill), so its row never is dereferenced.
    """
    o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, value_layout))
    b_index = gl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
    m_valid = (b_index >= 0) & (b_index < s_kv)
    p_rows = p_kv + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_kv
    o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, value_layout))
    async_copy.async_copy_global_to_shared(value_buffer, p_rows[:, None] + o_dv[None, :], mask=m_valid[:, None])

    o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, rest_layout))
    b_index = gl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
    m_valid = (b_index >= 0) & (b_index < s_kv)
    p_rows = p_kv + D_V + gl.where(m_valid, b_index, 0).to(gl.int64) * stride_kv
    o_dr = gl.arange(0, D_R, layout=gl.SliceLayout(0, rest_layout))
    async_copy.async_copy_global_to_shared(rest_buffer, p_rows[:, None] + o_dr[None, :], mask=m_valid[:, None])
    async_copy.commit_group()


@gluon.jit
def _sparse_mla_gluon_kernel(
    p_q, p_kv, p_indices, p_topk_length, p_sink, p_out, p_lse,
    h, s_kv, topk, scale_log2,
    stride_q_m, stride_q_h, stride_kv, stride_i_m, stride_o_m, stride_o_h, stride_l_m,
    HAS_TOPK_LENGTH: gl.constexpr, HAS_SINK: gl.constexpr,
    BLOCK_H: gl.constexpr, BLOCK_T: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
):
    """One query (axis 0) and ``BLOCK_H`` of its heads (axis 1); writes the final out and lse."""
    # 16-byte copies: a warp covers one row of 256 values (or 8 rows of 32), the 8 warps 8 (64) rows.
    value_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0])
    rest_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])
    # wgmma accumulators: warps [4, 2] = the two warpgroups side by side along N (slots for S, d_v for O).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_T // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, D_V // 2, 16])
    value_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_V], gl.bfloat16)
    rest_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, D_R], gl.bfloat16)
    prob_smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_T], gl.bfloat16)

    query = gl.program_id(0)
    head_begin = gl.program_id(1) * BLOCK_H
    q_value = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_V], value_smem)
    q_rest = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_R], rest_smem)
    kv_value = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_T, D_V], value_smem)
    kv_rest = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_T, D_R], rest_smem)
    prob = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_T], prob_smem)

    # Q joins the first tile's commit group: one wait covers both.
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
    _issue_row_gather(p_kv, p_index_row, 0, slot_end, s_kv, stride_kv, kv_value.index(0), kv_rest.index(0),
                      BLOCK_T, D_V, D_R, value_layout, rest_layout)

    b_max = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    b_sum = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
    b_acc = gl.zeros([BLOCK_H, D_V], gl.float32, layout=o_layout)
    b_zero_logits = gl.zeros([BLOCK_H, BLOCK_T], gl.float32, layout=s_layout)
    n_tiles = gl.cdiv(slot_end, BLOCK_T)
    for tile in range(0, n_tiles):
        buffer = tile % 2
        t = tile * BLOCK_T
        # This thread's copies of tile `tile` are done; the fence hands them to the tensor cores'
        # (async) proxy, the barrier waits for every thread's copies, and tells that every warp is
        # past tile `tile - 1`, whose buffer the next gather overwrites.
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()
        rows_value = kv_value.index(buffer)
        rows_rest = kv_rest.index(buffer)
        # S runs on the tensor cores while this thread loads the indices that address the next
        # gather and mask these scores (their L2 latency would otherwise stand alone every tile).
        b_logits = warpgroup_mma(q_value, rows_value.permute((1, 0)), b_zero_logits, use_acc=False, is_async=True)
        b_logits = warpgroup_mma(q_rest, rows_rest.permute((1, 0)), b_logits, is_async=True)
        _issue_row_gather(p_kv, p_index_row, t + BLOCK_T, slot_end, s_kv, stride_kv,
                          kv_value.index(1 - buffer), kv_rest.index(1 - buffer),
                          BLOCK_T, D_V, D_R, value_layout, rest_layout)
        o_t = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, s_layout))
        b_index = gl.load(p_index_row + o_t, mask=o_t < slot_end, other=-1)
        m_valid = (b_index >= 0) & (b_index < s_kv)
        b_logits = warpgroup_mma_wait(0, deps=[b_logits])  # [BLOCK_H, BLOCK_T]
        b_logits = gl.where(m_valid[None, :], b_logits * scale_log2, float("-inf"))
        b_max_new = gl.maximum(b_max, gl.max(b_logits, axis=1))
        # A head that has seen no valid slot keeps max -inf; subtract 0 instead so exp2 stays 0, not NaN.
        b_shift = gl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_rescale = gl.exp2(b_max - b_shift)
        b_prob = gl.exp2(b_logits - b_shift[:, None])  # 0 at invalid slots
        b_sum = b_sum * b_rescale + gl.sum(b_prob, axis=1)
        b_max = b_max_new
        prob.store(b_prob.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of P are written
        b_acc = b_acc * gl.convert_layout(b_rescale, gl.SliceLayout(1, o_layout))[:, None]
        b_acc = warpgroup_mma(prob, rows_value, b_acc)
    async_copy.wait_group(0)  # the last (empty) gather

    m_empty = b_sum == 0.0
    b_lse = gl.where(m_empty, float("-inf"), (b_max + gl.log2(gl.where(m_empty, 1.0, b_sum))) / 1.4426950408889634)
    b_norm = gl.where(m_empty, 0.0, 1.0 / gl.where(m_empty, 1.0, b_sum))
    o_h = head_begin + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
    if HAS_SINK:
        b_sink = gl.load(p_sink + o_h)
        b_norm = b_norm * (1.0 / (1.0 + gl.exp(b_sink - b_lse)))
    gl.store(p_lse + query.to(gl.int64) * stride_l_m + o_h, b_lse)
    b_out = b_acc * gl.convert_layout(b_norm, gl.SliceLayout(1, o_layout))[:, None]
    o_h = head_begin + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
    o_dv = gl.arange(0, D_V, layout=gl.SliceLayout(0, o_layout))
    p_out_rows = p_out + query.to(gl.int64) * stride_o_m + o_h[:, None] * stride_o_h
    gl.store(p_out_rows + o_dv[None, :], b_out)


# After a signature's first call, the launch skips Triton's argument processing (see .launch).
_gluon_launch = CachedLauncher(_sparse_mla_gluon_kernel)


def gluon_applies(q, kv, d_v: int, indices=None, topk_length=None, attn_sink=None) -> list[str]:
    """Why :func:`sparse_mla_gluon` cannot run these inputs: short reasons with their values, empty when it can."""
    # The inputs' reasons depend on shapes and dtypes alone, and a bf16 call asks twice (the backend's
    # kernel choice, then the launch): listing them took ~27 us of a call's host time on the H200
    # (under cProfile), so they are cached. The machine's reasons are read every call: the
    # environment, and the installed Triton, may change between calls.
    reasons = list(_input_reasons(q.dim(), q.shape, q.dtype, kv.dim(), kv.shape, kv.dtype, d_v,
                                  None if indices is None else (indices.dim(), indices.shape, indices.dtype),
                                  None if topk_length is None else (topk_length.dim(), topk_length.shape),
                                  None if attn_sink is None else (attn_sink.dim(), attn_sink.shape)))
    reasons += gluon_release_reasons()
    if interpreter_enabled():
        reasons.append("TRITON_INTERPRET=1 (Gluon kernels do not run on Triton's interpreter)")
    q_device, kv_device = q.device, kv.device
    reasons += _device_reasons(q_device)
    if kv_device != q_device:
        reasons.append(f"kv device={kv_device}, q device={q_device} (must be the same)")
    return reasons


@functools.lru_cache(maxsize=1024)
def _input_reasons(q_dim, q_shape, q_dtype, kv_dim, kv_shape, kv_dtype, d_v, indices, topk_length,
                   attn_sink) -> tuple[str, ...]:
    """The reasons of :func:`gluon_applies` that the inputs' shapes and dtypes decide (``indices``:
    ``(dim, shape, dtype)``, ``topk_length`` and ``attn_sink``: ``(dim, shape)``, or None)."""
    reasons = []
    if q_dtype != torch.bfloat16:
        reasons.append(f"q dtype={q_dtype} (supported: torch.bfloat16)")
    if kv_dtype == torch.uint8:
        reasons.append("kv is the packed FP8 cache (supported: dense bfloat16 rows)")
    elif kv_dtype != torch.bfloat16:
        reasons.append(f"kv dtype={kv_dtype} (supported: torch.bfloat16)")
    if q_dim != 3 or q_shape[-1] != D_QK:
        reasons.append(f"q shape={tuple(q_shape)} (supported: [s_q, h, {D_QK}])")
    elif q_shape[1] % BLOCK_H != 0:
        reasons.append(f"h={q_shape[1]} (supported: a multiple of {BLOCK_H})")
    if kv_dtype != torch.uint8 and (kv_dim != 2 or kv_shape[-1] != D_QK):  # the cache's width is its own
        reasons.append(f"kv shape={tuple(kv_shape)} (supported: [s_kv, {D_QK}])")
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


@functools.lru_cache(maxsize=None)
def _device_reasons(device) -> tuple[str, ...]:
    """The device's reasons of :func:`gluon_applies` (a device's compute capability does not change)."""
    if device.type != "cuda":
        return (f"device={device} (needs a CUDA GPU)",)
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return (f"compute capability {major}.{minor} (needs Hopper, sm_90: wgmma)",)
    return ()


def _aligned(x):
    """``x`` contiguous and 16-byte aligned: the kernel gathers rows with 16-byte copies."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def launch_inputs(kernel: str, q, kv, indices, topk_length, attn_sink, d_v: int):
    """``(q, kv, indices, topk_length, attn_sink, out, lse)`` as the Gluon forwards read them: q and kv
    contiguous and 16-byte aligned, int32 indices with every invalid int64 index -1, topk_length int32 and
    attn_sink float32 on q's device, and the float32 outputs allocated. Raises ValueError naming ``kernel``
    with every reason of :func:`gluon_applies` when the inputs are not the kernels' shape family."""
    reasons = gluon_applies(q, kv, d_v, indices, topk_length, attn_sink)
    if reasons:
        raise ValueError(f"{kernel} does not apply: " + "; ".join(reasons))
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    q, kv = _aligned(q), _aligned(kv)
    if indices.dtype == torch.int64:
        # An int64 index past int32 would wrap into a valid row; it is invalid, so it becomes -1 first.
        indices = torch.where((indices < 0) | (indices >= s_kv), -1, indices)
    indices = indices.to(torch.int32).contiguous()
    device = q.device
    out = torch.empty((s_q, h, D_V), dtype=torch.float32, device=device)
    lse = torch.empty((s_q, h), dtype=torch.float32, device=device)
    if s_q and h:
        if topk_length is not None:
            topk_length = topk_length.to(device=device, dtype=torch.int32).contiguous()
        if attn_sink is not None:
            attn_sink = attn_sink.to(device=device, dtype=torch.float32).contiguous()
    return q, kv, indices, topk_length, attn_sink, out, lse


def sparse_mla_gluon(q, kv, indices, sm_scale: float, topk_length=None, attn_sink=None, *, d_v: int = D_V):
    """``(out float32 [s_q, h, 512], lse float32 [s_q, h])``; see :func:`dsa_ref.sparse_mla`.

    Raises ValueError listing every reason of :func:`gluon_applies` when it cannot run the inputs
    (``d_v`` is there to be checked: only 512 runs).
    """
    q, kv, indices, topk_length, attn_sink, out, lse = launch_inputs(
        "the Gluon sparse MLA kernel", q, kv, indices, topk_length, attn_sink, d_v)
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[1]
    if s_q == 0 or h == 0:
        return out, lse
    q_stride, out_stride = q.stride(), out.stride()
    _gluon_launch(
        (s_q, h // BLOCK_H), q, kv, indices, lse if topk_length is None else topk_length,
        lse if attn_sink is None else attn_sink, out, lse, h, s_kv, topk, float(sm_scale) * LOG2E,
        q_stride[0], q_stride[1], kv.stride(0), indices.stride(0), out_stride[0], out_stride[1], lse.stride(0),
        HAS_TOPK_LENGTH=topk_length is not None, HAS_SINK=attn_sink is not None,
        BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, D_V=D_V, D_R=D_R, num_warps=NUM_WARPS.value)
    return out, lse

