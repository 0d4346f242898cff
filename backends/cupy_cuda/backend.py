"""The ``cupy`` backend: DSA as CUDA C++ kernels (threads, warps, shared memory, tensor cores).

Arrays are CuPy arrays. CuPy has no bfloat16 or float8 dtype, so, as everywhere in dsa-ref
(:mod:`dsa_ref.interop`), those travel as same-width integer views: a CuPy ``int16`` array
*is* bfloat16 data and a CuPy ``uint8`` array *is* float8_e4m3fn data, except for the latent
KV of :meth:`sparse_mla`, where ``uint8 [s_kv, 656]`` is the packed FP8 cache. No other meaning
of those integer dtypes is valid for the float inputs of these ops, so the carrier dtype alone
says what the data is; nothing needs to travel beside the array. The methods also accept NumPy
and PyTorch arrays (a PyTorch CUDA tensor's memory is wrapped in place where CuPy runs on torch's
stream, through DLPack otherwise; without a copy either way: :mod:`dsa_ref.interop`).

Which kernel runs (all compute the same function; see csrc/*.cu):

* indexer: tensor cores for bf16 / f16 / fp8 with H_I <= 64 and d_I a multiple of 16 (32 for
  fp8, at most 256); float32 CUDA cores for float32 and for every other shape.
* top-k: radix select, one block per row.
* sparse MLA: tensor cores for bf16 queries with bf16 rows or the packed FP8 cache at
  d_qk = 576, d_v = 512 (on sm_90, bf16 rows and h a multiple of 64: Hopper's wgmma with a producer
  warpgroup, csrc/sparse_mla_wgmma_v2.cu (its first schedule csrc/sparse_mla_wgmma.cu), and the packed
  cache on the same kernels, dequantized by their producers, ``CupyBackend.hopper_fp8_decode`` and
  ``hopper_fp8_decode_v2``; otherwise mma.sync, csrc/sparse_mla.cu); float32 CUDA cores for every other
  shape and dtype.
* sparse MLA backward: tensor cores (csrc/sparse_mla_backward_mma.cu) for bf16 queries and rows at
  d_qk = 576, d_v = 512 on a device with 219 KiB of shared memory per block (sm_90), row gradients
  added with fp32 atomics (on sm_90 with h a multiple of 64: Hopper's wgmma,
  csrc/sparse_mla_backward_wgmma.cu, 16-byte fp32 reductions, ``CupyBackend.hopper_backward``); float32 CUDA cores
  (csrc/sparse_mla_backward.cu) for every other input
  and for deterministic mode, the same tensor cores with the row gradients stored and then summed
  per row in a sorted order (``CupyBackend.deterministic_tensor_cores``; float32 CUDA cores without).
* attention target, indexer loss and its backward: float32 CUDA cores for every dtype
  (csrc/sparse_mla_backward.cu, csrc/indexer_loss.cu).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

from dsa_ref import interop
from dsa_ref.backend import OPS, Backend
from dsa_ref_backends import kernel_switch

from . import kernels

#: Threads of a top-k block (topk::THREADS in csrc/topk.cu).
TOPK_THREADS = 512
_FLOAT_INPUTS = frozenset({"float32", "bfloat16", "float16", "float8_e4m3fn"})


def logical_dtype(x: Any, *, kv: bool = False) -> str:
    """The dtype an array stands for (see :func:`dsa_ref.interop.logical_dtype_name`): CuPy's
    ``int16`` / ``uint8`` carriers are bfloat16 / float8; with ``kv``, a ``uint8 [..., 656]``
    array is the packed FP8 cache (``"uint8"``)."""
    return interop.logical_dtype_name(x, packed_kv=kv)


class CupyBackend(Backend):
    """CUDA C++ kernels loaded with ``cupy.RawModule``; see the module docstring."""

    name = "cupy"
    description = "CUDA C++ kernels through CuPy (mma.sync tensor cores, radix-select top-k)"
    array_kind = "cupy"
    devices = ("cuda",)
    supported_dtypes = {
        "lightning_indexer": frozenset({"float32", "bfloat16", "float16", "float8_e4m3fn"}),
        "topk_indices": frozenset({"float32", "bfloat16", "float16"}),
        "sparse_mla": frozenset({"float32", "bfloat16", "float16"}),
        "sparse_mla_backward": frozenset({"float32", "bfloat16", "float16"}),
        "attention_target": frozenset({"float32", "bfloat16", "float16"}),
        "indexer_loss": frozenset({"float32", "bfloat16", "float16", "float8_e4m3fn"}),
        "indexer_loss_backward": frozenset({"float32", "bfloat16", "float16"}),
    }

    #: Fill fresh outputs with NaN before the kernels run, so that an element a kernel forgets to
    #: write fails every comparison (tests set this, or the environment variable below).
    poison_outputs: bool = False

    #: Deterministic mode's sparse-MLA backward on the tensor-core kernels (row gradients stored, then
    #: summed per row in a sorted order) instead of the float32 kernels, for the inputs the default's
    #: tensor-core kernel takes: 43-45x the float32 kernels on the H200 (backends/cupy_cuda/NOTES.md). Set
    #: this to False, or DSA_REF_CUPY_DETERMINISTIC_MMA=0, to run the float32 kernels.
    deterministic_tensor_cores: bool = True

    #: The default mode's sparse-MLA backward for bf16 q and rows at d_qk 576, d_v 512 with h a multiple of
    #: 64 on Hopper's wgmma kernel (``sparse_mla_bwd_wgmma`` in csrc/sparse_mla_backward_wgmma.cu, compute
    #: capability 9.0 only) instead of ``sparse_mla_bwd_mma`` (:func:`backward_kernel_path`): 2.5x its speed
    #: on the H200 (backends/cupy_cuda/NOTES.md). Set this to False, or DSA_REF_CUPY_WGMMA_BACKWARD=0, to
    #: run the mma.sync kernel on Hopper too.
    hopper_backward: bool = True

    #: Deterministic mode's sparse-MLA backward, where ``hopper_backward`` would run the wgmma kernel in
    #: default mode, on ``sparse_mla_bwd_wgmma_deterministic`` (the same wgmma kernel, its row gradients
    #: stored to the contribution buffer; then the mma path's ordered row sums) instead of
    #: ``sparse_mla_bwd_mma_deterministic`` (:func:`backward_kernel_path`): 73.6 -> 41.6 ms at S 4096,
    #: SKV 8192, h 128, topk 2048 on the H200, 1.65x the default mode's wgmma kernel (NOTES.md). Set this
    #: to False, or DSA_REF_CUPY_WGMMA_DETERMINISTIC=0, for the mma.sync deterministic kernel.
    hopper_deterministic_backward: bool = True

    #: The bf16 V3.2-width sparse-MLA forward (d_qk 576, d_v 512, bf16 rows, h a multiple of 64) on
    #: Hopper's wgmma kernel (csrc/sparse_mla_wgmma.cu, compute capability 9.0 only) instead of the
    #: mma.sync kernel: 1.09x its speed on the H200 (backends/cupy_cuda/NOTES.md). Set this to False,
    #: or DSA_REF_CUPY_WGMMA=0, to run the mma.sync kernel on Hopper too.
    hopper_forward: bool = True

    #: Where that wgmma kernel would run (``hopper_forward`` or DSA_REF_CUPY_WGMMA, and its inputs), run
    #: ``sparse_mla_fwd_wgmma_v2`` (csrc/sparse_mla_wgmma_v2.cu) instead: the same contract, layout and
    #: launch, with a producer whose gather does not wait on one index load per row: 198.8 -> 456.9 TFLOP/s
    #: at S 4096, SKV 8192, h 128, topk 2048 on the H200 (backends/cupy_cuda/NOTES.md). Set this to False,
    #: or DSA_REF_CUPY_WGMMA_V2=0, for the first wgmma kernel.
    hopper_forward_v2: bool = True

    #: The sparse-MLA forward over the packed FP8 cache (V3.2's decode: bf16 q, d_qk 576, d_v 512, h a
    #: multiple of 64) on Hopper's wgmma kernel (``sparse_mla_fwd_wgmma_fp8`` in csrc/sparse_mla_wgmma.cu,
    #: compute capability 9.0 only: its producer warpgroup dequantizes the gathered rows to bf16 tiles)
    #: instead of ``sparse_mla_fwd_mma<true>``: 1.8x its speed on the H200 (backends/cupy_cuda/NOTES.md).
    #: Set this to False, or DSA_REF_CUPY_WGMMA_FP8=0, to run the mma.sync kernel on Hopper too.
    hopper_fp8_decode: bool = True

    #: Where that FP8 kernel would run (``hopper_fp8_decode`` or DSA_REF_CUPY_WGMMA_FP8, and its inputs),
    #: run ``sparse_mla_fwd_wgmma_fp8_v2`` (csrc/sparse_mla_wgmma_v2.cu) instead: the same contract, layout
    #: and launch on the second wgmma schedule, with a producer whose first row loads of a tile travel during
    #: its wait for a free stage: 0.294 -> 0.266 ms at b 64, s_q 2, T 32K, h 128, topk 2048 on the H200,
    #: outputs bitwise equal (backends/cupy_cuda/NOTES.md). Set this to False, or DSA_REF_CUPY_WGMMA_FP8_V2=0,
    #: for the first FP8 kernel.
    hopper_fp8_decode_v2: bool = True

    #: Where the FP8 v2 kernel would run and h is a multiple of 128, run ``sparse_mla_fwd_wgmma_fp8_pair``
    #: (csrc/sparse_mla_wgmma_v2.cu) instead: the two head blocks of a query as a cluster of two blocks that
    #: share their dequantized tiles, each producer loading and dequantizing half of every tile's rows
    #: (FlashMLA's Hopper FP8 decode shares them the same way). Outputs bitwise equal to v2's. With the split-V
    #: consumers (``hopper_split_v``) this runs ``sparse_mla_fwd_wgmma_fp8_pair_v3``, the fastest FP8 decode on the
    #: H200: 0.235-0.261 ms against the non-pair split-V kernel's 0.244-0.265 at b 64, s_q 2, T 32K, h 128, topk
    #: 2048 (faster in four processes of five), 0.446-0.466 against 0.466-0.490 at b 128 (in each), in the same
    #: processes (backends/cupy_cuda/NOTES.md). The pair of the v2 consumers is a little slower than v2 alone
    #: (0.278-0.281 against 0.267-0.272 ms), so None (the default) runs the pair with the split-V consumers
    #: only; True runs it with either consumers, False (or DSA_REF_CUPY_WGMMA_FP8_PAIR=0) never: one block a
    #: head block. DSA_REF_CUPY_WGMMA_FP8_PAIR=1 is True for the whole process.
    hopper_fp8_decode_pair: bool | None = None

    #: Where a v2 wgmma forward would run (bf16 rows, the FP8 cache, the FP8 pair), run its split-V twin
    #: (``sparse_mla_fwd_wgmma_v3``, ``..._fp8_v3``, ``..._fp8_pair_v3`` in csrc/sparse_mla_wgmma_v2.cu): the same
    #: producers and launch, FlashMLA's Hopper decode schedule for the consumers (one takes S over all 64 slots
    #: of a tile and the softmax, the other only its half of P V, so the second's product overlaps the first's
    #: softmax): 4.985 -> 4.305 ms at S 4096, SKV 8192, h 128, topk 2048 and 0.266 -> 0.242 ms for the FP8
    #: decode at b 64, s_q 2, T 32K on the H200, outputs equal to v2's to rounding (backends/cupy_cuda/NOTES.md).
    #: The pair's twin runs where ``hopper_fp8_decode_pair`` picks the pair. Set this to False, or
    #: DSA_REF_CUPY_WGMMA_SPLIT_V=0, for the v2 consumers.
    hopper_split_v: bool = True

    #: The decode step's indexer over a paged fp8 key cache on one launch for the batch
    #: (``indexer_paged_mma`` in csrc/indexer.cu: the keys read out of their pages in place) instead
    #: of one dense launch per sequence: 1.47 ms against 33.0 at b 64, T 128K on the H200, the whole
    #: decode step 33.5 -> 2.92 ms (backends/cupy_cuda/NOTES.md). Set this to False, or
    #: DSA_REF_CUPY_PAGED_INDEXER=0, for the per-sequence launches.
    paged_indexer_kernel: bool = True

    #: The paged indexer on Hopper's fp8 wgmma (``indexer_paged_wgmma`` in csrc/indexer_wgmma.cu: keys
    #: on the product's rows, the heads of one or two queries on its columns) instead of
    #: ``indexer_paged_mma``, for the inputs it covers (:func:`paged_indexer_path`): 1.74 -> 0.76 ms at
    #: b 64, T 128K on the H200 (backends/cupy_cuda/NOTES.md). Set this to False, or
    #: DSA_REF_CUPY_PAGED_INDEXER_WGMMA=0, for the mma.sync kernel.
    paged_indexer_wgmma: bool = True

    #: Where ``indexer_paged_wgmma`` would run, run ``indexer_paged_wgmma_v2`` (csrc/indexer_wgmma_v2.cu)
    #: instead: the same contract and output, about a third of the instructions a 64-key step (pages read
    #: once a block, fixed copy offsets, a second accumulator so the epilogue overlaps the next product,
    #: two instructions an element): 0.687 -> 0.652 ms at b 64, next_n 1, T 128K and 0.929 -> 0.637 ms at
    #: next_n 2 on the H200 (backends/cupy_cuda/NOTES.md). Set this to False, or
    #: DSA_REF_CUPY_PAGED_INDEXER_V2=0, for the first wgmma kernel.
    paged_indexer_wgmma_v2: bool = True

    #: The dense indexer for fp8 queries and keys on Hopper's fp8 wgmma (``indexer_dense_wgmma`` in
    #: csrc/indexer_wgmma.cu: the paged kernel's tiles over a contiguous ``k``) instead of
    #: ``indexer_mma``, for the inputs :func:`dense_indexer_path` gives it: 244 -> 509 TFLOP/s at 4096 x 32K
    #: causal-end on the H200. Set this to False, or DSA_REF_CUPY_INDEXER_WGMMA=0, for the mma.sync kernel.
    indexer_wgmma: bool = True

    #: Candidate keys top-k keeps in shared memory (8 bytes each, with the index): about 1.5 k are
    #: taken from one read of a row; rows the sample misjudges take slower paths (see topk.cu).
    #: Tests lower it to run those paths.
    topk_candidate_capacity: int = 8192

    def __init__(self) -> None:
        self._unavailable: list[str] | None = None
        self._torch_launches: dict = {}  # sparse_mla_torch's launches by signature

    # ------------------------------------------------------------------ availability
    def unavailable_reasons(self) -> list[str]:
        if self._unavailable is None:
            self._unavailable = _probe_device()
        return list(self._unavailable)

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)  # availability, op, main input's dtype
        if op not in OPS:
            return reasons
        for other in ("k", "kv", "q_index", "k_index", "weights"):
            x = inputs.get(other)
            if x is not None and interop.is_array(x):
                got = logical_dtype(x, kv=other == "kv")
                if got not in _FLOAT_INPUTS and not (other == "kv" and got == "uint8"):
                    reasons.append(f"{other}.dtype={got} (supported: {', '.join(sorted(_FLOAT_INPUTS))}"
                                   + (", uint8 [s_kv, 656] FP8 cache" if other == "kv" else "") + ")")
        if not self._unavailable:
            capability = _compute_capability()
            for key in ("q", "k", "q_index", "k_index"):
                x = inputs.get(key)
                if (x is not None and interop.is_array(x) and logical_dtype(x) == "float8_e4m3fn"
                        and capability < 89):
                    reasons.append(f"{key}.dtype=float8_e4m3fn needs compute capability >= 8.9 (got {capability / 10:.1f})")
            reasons += self._shape_reasons(op, inputs)
        return reasons

    def _shape_reasons(self, op: str, inputs: dict) -> list[str]:
        """Limits of the general float32 kernels: their per-block shared memory."""
        reasons = []
        limit = _smem_optin()
        q = inputs.get("q_index" if op == "dsa_attention" else "q")
        if op in ("lightning_indexer", "dsa_attention") and q is not None and getattr(q, "ndim", 0) == 3:
            h_i, d_i = int(q.shape[1]), int(q.shape[2])
            if (h_i * d_i + h_i) * 4 > limit:
                reasons.append(f"h_i * d_i = {h_i * d_i} (the float32 indexer keeps one query in "
                               f"{limit} bytes of shared memory: at most {limit // 4 - h_i})")
        if op in ("sparse_mla", "dsa_attention"):
            q = inputs.get("q")
            d_v = int(inputs.get("d_v") or 512)
            if q is not None and getattr(q, "ndim", 0) == 3:
                d_qk = int(q.shape[2])
                if (d_qk + d_v) * 4 > limit:
                    reasons.append(f"d_qk + d_v = {d_qk + d_v} (at most {limit // 4} in the float32 kernel)")
        if op in ("sparse_mla_backward", "attention_target"):
            reasons += _training_attention_reasons(op, inputs, limit)
        if op in ("indexer_loss", "indexer_loss_backward"):
            q_index = inputs.get("q_index")
            if q_index is not None and getattr(q_index, "ndim", 0) == 3:
                h_i, d_i = int(q_index.shape[1]), int(q_index.shape[2])
                if h_i > INDEXER_LOSS_MAX_HEADS:
                    reasons.append(f"h_i = {h_i} (the indexer-loss kernels keep at most "
                                   f"{INDEXER_LOSS_MAX_HEADS} heads of a query in registers)")
                if d_i > INDEXER_LOSS_MAX_DIMS:
                    reasons.append(f"d_i = {d_i} (the indexer-loss kernels hold at most {INDEXER_LOSS_MAX_DIMS} "
                                   f"dims of a key, 4 per lane of a warp)")
        return reasons

    # ------------------------------------------------------------------ arrays
    def device(self) -> Any:
        return None

    def _native(self, x: Any):
        """A C-contiguous CuPy array (a torch CUDA tensor's memory wrapped in place, see
        :mod:`dsa_ref.interop`; one copy for strided input)."""
        import cupy

        if x is None:
            return None
        if type(x) is not cupy.ndarray:  # the ops pass arrays converted already: skip the lookups
            x = interop.convert(x, "cupy", self.device())
        return cupy.ascontiguousarray(x)

    def _empty(self, shape, dtype):
        import cupy

        if self.poison_outputs or os.environ.get("DSA_REF_POISON_OUTPUTS") == "1":
            return cupy.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype)
        return cupy.empty(shape, dtype)

    # ------------------------------------------------------------------ lightning indexer
    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        import cupy

        q_dtype, k_dtype = logical_dtype(q), logical_dtype(k)
        q, weights, k, k_scale = self._native(q), self._native(weights), self._native(k), self._native(k_scale)
        s_q, h_i, d_i = (int(n) for n in q.shape)
        s_kv = int(k.shape[0])
        key_start = self._native(key_start).astype(cupy.int32, copy=False)
        key_end = self._native(key_end).astype(cupy.int32, copy=False)
        weights = _to_float32(weights, logical_dtype(weights))
        if k_scale is not None:
            k_scale = _to_float32(k_scale, logical_dtype(k_scale))
        scores = self._empty((s_q, s_kv), cupy.float32)
        if s_q == 0 or s_kv == 0:
            return scores
        device_id = q.device.id
        elem = {"bfloat16": kernels.ELEM_BF16, "float16": kernels.ELEM_F16,
                "float8_e4m3fn": kernels.ELEM_E4M3}.get(q_dtype)
        dims_multiple = 32 if q_dtype == "float8_e4m3fn" else 16
        wgmma = kernel_switch(self.indexer_wgmma, "DSA_REF_CUPY_INDEXER_WGMMA")
        path = dense_indexer_path(q_dtype, k_dtype, h_i, d_i, _compute_capability() if wgmma else 0, wgmma)
        if path == "wgmma":
            k = k if k.data.ptr % 16 == 0 else k.copy()  # the kernel copies key rows 16 bytes at a time
            function = kernels.kernel("indexer_wgmma.cu", "indexer_dense_wgmma_q2", device_id, INDEXER_WGMMA_SMEM[2])
            grid = (-(-s_q // 2), -(-s_kv // INDEXER_WGMMA_POSITIONS))
            function(grid, (128,), (q, weights, k, _nullable(k_scale), key_start, key_end, scores, np.int32(s_q),
                                    np.int32(h_i), np.int32(s_kv)),
                     shared_mem=INDEXER_WGMMA_SMEM[2])
            return scores
        if elem is not None and q_dtype == k_dtype and 0 < h_i <= 64 and d_i % dims_multiple == 0 and d_i <= 256:
            m_tiles = (h_i + 15) // 16
            if elem == kernels.ELEM_E4M3:
                q = _widened_e4m3_queries(q, d_i, device_id)
            smem, grid, tiles_per_block = _indexer_mma_plan(m_tiles, d_i, 1 if elem == kernels.ELEM_E4M3 else 2,
                                                            s_kv, (s_q + 1) // 2)
            function = kernels.kernel("indexer.cu", f"indexer_mma<{elem}, {m_tiles}>", device_id, smem)
            function(grid, (256,), (q, weights, k, _nullable(k_scale), key_start, key_end, scores, np.int32(s_q),
                                    np.int32(h_i), np.int32(s_kv), np.int32(d_i), np.int32(tiles_per_block)),
                     shared_mem=smem)
            return scores
        q32, k32 = _to_float32(q, q_dtype), _to_float32(k, k_dtype)
        smem = (h_i * d_i + h_i) * 4
        function = kernels.kernel("indexer.cu", "indexer_simt", device_id, smem)
        function((s_q, (s_kv + 127) // 128), (128,), (q32, weights, k32, _nullable(k_scale), key_start, key_end, scores,
                                                      np.int32(h_i), np.int32(s_kv), np.int32(d_i)),
                 shared_mem=smem)
        return scores

    def reads_pages_in_place(self, q, k_cache) -> bool:
        if not kernel_switch(self.paged_indexer_kernel, "DSA_REF_CUPY_PAGED_INDEXER"):
            return False
        h_i, d_i = int(q.shape[1]), int(q.shape[2])
        # The kernel copies key rows 16 bytes at a time from each block's start: a block of a number
        # of bytes that is not a multiple of 16 (block_size not a multiple of 4) would misalign them.
        block_bytes = int(k_cache.shape[1]) if len(k_cache.shape) == 2 else 0
        return (logical_dtype(q) == "float8_e4m3fn" and 0 < h_i <= 64 and d_i % 32 == 0 and d_i <= 256
                and block_bytes % 16 == 0)

    def lightning_indexer_paged(self, q, weights, k_cache, block_table, context_lens, *, next_n: int,
                                max_context_len: int):
        """``indexer_paged_mma`` (one launch for the batch) where :meth:`reads_pages_in_place`; the
        composed op (a dense launch per sequence) otherwise."""
        if not self.reads_pages_in_place(q, k_cache):
            return super().lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, next_n=next_n,
                                                   max_context_len=max_context_len)
        import cupy

        q, weights, k_cache = self._native(q), self._native(weights), cupy.ascontiguousarray(self._native(k_cache))
        if k_cache.data.ptr % 16:  # a view that starts inside a block: the kernel's copies need 16 bytes
            k_cache = k_cache.copy()
        weights = cupy.ascontiguousarray(_to_float32(weights, logical_dtype(weights)))
        rows, h_i, d_i = (int(n) for n in q.shape)
        num_blocks, batch, next_n = int(k_cache.shape[0]), int(context_lens.shape[0]), int(next_n)
        block_size = int(k_cache.shape[1]) // (d_i + 4)
        table = self._native(block_table)
        # Entries outside the cache hold no key; narrowed to int32 only after that (a wide entry must
        # not wrap onto a real block).
        table = cupy.ascontiguousarray(cupy.where((table < 0) | (table >= num_blocks), -1, table).astype(cupy.int32))
        lens = cupy.ascontiguousarray(self._native(context_lens).astype(cupy.int32))
        scores = self._empty((rows, int(max_context_len)), cupy.float32)
        if rows == 0 or max_context_len == 0:
            return scores
        device_id = q.device.id
        wgmma = kernel_switch(self.paged_indexer_wgmma, "DSA_REF_CUPY_PAGED_INDEXER_WGMMA")
        path = paged_indexer_path(h_i, d_i, block_size, _compute_capability() if wgmma else 0, wgmma)
        if path == "wgmma":
            queries = 1 if next_n == 1 else 2
            if kernel_switch(self.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2"):
                source, name = "indexer_wgmma_v2.cu", f"indexer_paged_wgmma_v2_q{queries}"
                smem, positions = INDEXER_WGMMA_V2_SMEM[queries], INDEXER_WGMMA_V2_POSITIONS
            else:
                source, name = "indexer_wgmma.cu", f"indexer_paged_wgmma_q{queries}"
                smem, positions = INDEXER_WGMMA_SMEM[queries], INDEXER_WGMMA_POSITIONS
            function = kernels.kernel(source, name, device_id, smem)
            grid = (batch, -(-int(max_context_len) // positions), -(-next_n // queries))
            function(grid, (128,), (cupy.ascontiguousarray(q), weights, k_cache, table, lens, scores,
                                    np.int32(num_blocks), np.int32(table.shape[1]), np.int32(block_size),
                                    np.int32(next_n), np.int32(max_context_len), np.int32(h_i)),
                     shared_mem=smem)
            return scores
        m_tiles = (h_i + 15) // 16
        parts = (next_n + 1) // 2  # two queries of a sequence per block
        smem, grid, tiles_per_block = _indexer_mma_plan(m_tiles, d_i, 1, int(max_context_len), batch * parts)
        function = kernels.kernel("indexer.cu", f"indexer_paged_mma<{m_tiles}>", device_id, smem)
        function(grid, (256,), (_widened_e4m3_queries(q, d_i, device_id), weights, k_cache, table, lens, scores,
                                np.int32(num_blocks), np.int32(table.shape[1]), np.int32(block_size),
                                np.int32(next_n), np.int32(max_context_len), np.int32(h_i), np.int32(d_i),
                                np.int32(tiles_per_block)),
                 shared_mem=smem)
        return scores

    # ------------------------------------------------------------------ top-k
    def topk_indices(self, scores, topk: int):
        import cupy

        scores = _to_float32(self._native(scores), logical_dtype(scores))
        s_q, s_kv = (int(n) for n in scores.shape)
        topk = int(topk)
        indices = self._empty((s_q, topk), cupy.int32)
        if s_q == 0 or topk == 0:
            return indices
        if s_kv == 0:
            indices.fill(-1)
            return indices
        capacity = int(self.topk_candidate_capacity)
        smem = capacity * 8  # a key and an index per candidate
        function = kernels.kernel("topk.cu", "topk_select", scores.device.id, smem)
        function((s_q,), (TOPK_THREADS,), (scores, indices, np.int32(s_kv), np.int32(topk), np.int32(capacity)),
                 shared_mem=smem)
        return indices

    # ------------------------------------------------------------------ sparse MLA
    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        import cupy

        q_dtype, kv_dtype = logical_dtype(q), logical_dtype(kv, kv=True)
        q, kv = self._native(q), self._native(kv)
        s_q, h, d_qk = (int(n) for n in q.shape)
        s_kv, d_v = int(kv.shape[0]), int(d_v)
        indices = _valid_int32_indices(self._native(indices), s_kv)
        topk = int(indices.shape[1])
        if topk_length is not None:
            topk_length = cupy.clip(self._native(topk_length), 0, topk).astype(cupy.int32)
        if attn_sink is not None:
            attn_sink = _to_float32(self._native(attn_sink), logical_dtype(attn_sink))
        out = self._empty((s_q, h, d_v), cupy.float32)
        lse = self._empty((s_q, h), cupy.float32)
        if s_q == 0 or h == 0:
            return out, lse
        device_id = q.device.id
        packed = kv_dtype == "uint8"
        plan = self._tensor_core_forward(q_dtype, kv_dtype, h=h, d_qk=d_qk, kv_width=int(kv.shape[1]), d_v=d_v)
        if plan is not None:
            source, name, threads, smem, head_blocks, rows_16_bytes = plan
            if rows_16_bytes:
                # The producer reads the packed rows 16 bytes at a time: a view that starts off a 16-byte
                # boundary (rows themselves are 656 = 41 x 16 bytes) is copied, never read misaligned.
                q, kv = _aligned_16(q), _aligned_16(kv)
            function = kernels.kernel(source, name, device_id, smem)
            function((s_q * head_blocks,), (threads,),
                     (q, kv, indices, _nullable(topk_length), _nullable(attn_sink), out, lse, np.int32(h),
                      np.int32(s_kv), np.int32(topk), np.float32(float(sm_scale) * _LOG2_E)),
                     shared_mem=smem)
            return out, lse
        q32 = _to_float32(q, q_dtype)
        kv32 = _unpack_fp8_cache(kv) if packed else _to_float32(kv, kv_dtype)
        d_row = int(kv32.shape[1])
        smem = (d_qk + d_v) * 4
        function = kernels.kernel("sparse_mla.cu", "sparse_mla_fwd_simt", device_id, smem)
        function((s_q * h,), (128,), (q32, kv32, indices, _nullable(topk_length), _nullable(attn_sink), out, lse, np.int32(h),
                                      np.int32(s_kv), np.int32(topk), np.int32(d_row), np.int32(d_v),
                                      np.float32(sm_scale)),
                 shared_mem=smem)
        return out, lse

    def _tensor_core_forward(self, q_dtype: str, kv_dtype: str, *, h: int, d_qk: int, kv_width: int, d_v: int):
        """The tensor-core sparse-MLA forward these inputs take, as ``(source, kernel, threads, shared memory,
        head blocks a query, reads rows 16 bytes at a time)``, or None for the float32 kernel. Every wgmma
        kernel keeps the first one's launch (csrc/sparse_mla_wgmma_v2.cu keeps its layout, Smem::TOTAL, and
        threads)."""
        hopper = kernel_switch(self.hopper_forward, "DSA_REF_CUPY_WGMMA")
        hopper_fp8 = kernel_switch(self.hopper_fp8_decode, "DSA_REF_CUPY_WGMMA_FP8")
        kernel_path = forward_kernel_path(q_dtype, kv_dtype, d_qk=d_qk, kv_width=kv_width, d_v=d_v, h=h,
                                          compute_capability=_compute_capability() if hopper or hopper_fp8 else 0,
                                          smem_limit=_smem_optin(), hopper_forward=hopper,
                                          hopper_fp8_decode=hopper_fp8)
        head_blocks = (h + 63) // 64
        # The split-V consumers replace v2's in each v2 kernel: the same source and launch.
        split_v = kernel_path in ("wgmma", "wgmma_fp8") and kernel_switch(self.hopper_split_v, "DSA_REF_CUPY_WGMMA_SPLIT_V")
        if kernel_path == "wgmma":
            if kernel_switch(self.hopper_forward_v2, "DSA_REF_CUPY_WGMMA_V2"):
                name = "sparse_mla_fwd_wgmma_v3" if split_v else "sparse_mla_fwd_wgmma_v2"
                return "sparse_mla_wgmma_v2.cu", name, WGMMA_FORWARD_THREADS, WGMMA_FORWARD_SMEM, head_blocks, False
            return "sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma", WGMMA_FORWARD_THREADS, WGMMA_FORWARD_SMEM, head_blocks, False
        if kernel_path == "wgmma_fp8":
            source, name = "sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma_fp8"
            if kernel_switch(self.hopper_fp8_decode_v2, "DSA_REF_CUPY_WGMMA_FP8_V2"):
                source, name = "sparse_mla_wgmma_v2.cu", "sparse_mla_fwd_wgmma_fp8_v2"
                # A query's head blocks pair up in clusters of two consecutive blocks: h % 128 == 0 only.
                pair = split_v if self.hopper_fp8_decode_pair is None else self.hopper_fp8_decode_pair
                if h % 128 == 0 and kernel_switch(pair, "DSA_REF_CUPY_WGMMA_FP8_PAIR"):
                    name = "sparse_mla_fwd_wgmma_fp8_pair"
                if split_v:
                    name = "sparse_mla_fwd_wgmma_fp8_pair_v3" if name.endswith("_pair") else "sparse_mla_fwd_wgmma_fp8_v3"
            return source, name, WGMMA_FORWARD_THREADS, WGMMA_FORWARD_SMEM, head_blocks, True
        if kernel_path == "mma":
            packed = kv_dtype == "uint8"
            return ("sparse_mla.cu", f"sparse_mla_fwd_mma<{'true' if packed else 'false'}>", 256, _MMA_SMEM[packed],
                    head_blocks, False)
        return None

    def sparse_mla_torch(self, q, kv, indices, topk_length, attn_sink, sm_scale: float, d_v: int):
        """:meth:`sparse_mla` for torch CUDA tensors that the tensor-core kernels read as they are (bf16 q, bf16
        rows or the packed FP8 cache, int32 indices, int32 topk_length and float32 attn_sink if given, all
        contiguous on the current CUDA device): the kernel is launched on torch's current stream with the
        tensors' addresses, and ``(out, lse)`` are torch tensors from its caching allocator (a CUDA graph
        capture's pool while capturing). No CuPy array is made on this path, which is what a decode step's
        host time per call was spent on (backends/cupy_cuda/NOTES.md, "host cost"). None where the inputs
        need the general path (other dtypes or layouts, the float32 kernel, poisoned outputs); the caller
        (:mod:`dsa_ref.torch`) has checked shapes and dtypes and clamped ``topk_length``."""
        import torch

        if (self.poison_outputs or q.dtype != torch.bfloat16 or indices.dtype != torch.int32 or not q.is_cuda
                or not (q.is_contiguous() and kv.is_contiguous() and indices.is_contiguous())):
            return None
        if topk_length is not None and (topk_length.dtype != torch.int32 or not topk_length.is_contiguous()):
            return None
        if attn_sink is not None and (attn_sink.dtype != torch.float32 or not attn_sink.is_contiguous()):
            return None
        import cupy

        device = q.get_device()
        environment = os.environ
        # The current device too: a kernel is loaded on one device, and launches where that one is current.
        key = (q.shape, kv.shape, kv.dtype, int(d_v), device, cupy.cuda.runtime.getDevice(),
               self.hopper_forward, self.hopper_forward_v2, self.hopper_fp8_decode, self.hopper_fp8_decode_v2,
               self.hopper_fp8_decode_pair, self.hopper_split_v, *[environment.get(name) for name in _FORWARD_SWITCHES])
        launch = self._torch_launches.get(key)
        if launch is None:
            launch = self._torch_launch(q, kv, d_v, device)
            if len(self._torch_launches) >= 256:
                self._torch_launches.clear()
            self._torch_launches[key] = launch
        if launch is False:
            return None
        function, grid, threads, smem, rows_16_bytes = launch
        if rows_16_bytes and (kv.data_ptr() % 16 or q.data_ptr() % 16):
            return None  # the general path copies such views
        s_q, h = q.shape[0], q.shape[1]
        out = torch.empty((s_q, h, d_v), dtype=torch.float32, device=q.device)
        lse = torch.empty((s_q, h), dtype=torch.float32, device=q.device)
        if s_q == 0 or h == 0:
            return out, lse
        stream = interop.cupy_stream(device, interop.torch_stream_pointer(device))
        null = _NULL_POINTER
        function((s_q * grid,), (threads,),
                 (np.uint64(q.data_ptr()), np.uint64(kv.data_ptr()), np.uint64(indices.data_ptr()),
                  null if topk_length is None else np.uint64(topk_length.data_ptr()),
                  null if attn_sink is None else np.uint64(attn_sink.data_ptr()),
                  np.uint64(out.data_ptr()), np.uint64(lse.data_ptr()), np.int32(h), np.int32(kv.shape[0]),
                  np.int32(indices.shape[1]), np.float32(float(sm_scale) * _LOG2_E)),
                 shared_mem=smem, stream=stream)
        return out, lse

    def _torch_launch(self, q, kv, d_v: int, device: int):
        """What :meth:`sparse_mla_torch` launches for inputs of this signature: ``(function, head blocks, threads,
        shared memory, reads rows 16 bytes at a time)``, or False where it takes the general path."""
        import cupy
        import torch

        if (self.unavailable_reasons() or device != cupy.cuda.runtime.getDevice()
                or os.environ.get("DSA_REF_POISON_OUTPUTS") == "1"):
            return False
        kv_dtype = {torch.bfloat16: "bfloat16", torch.uint8: "uint8"}.get(kv.dtype)
        if kv_dtype is None or q.dim() != 3 or kv.dim() != 2:
            return False
        plan = self._tensor_core_forward("bfloat16", kv_dtype, h=int(q.shape[1]), d_qk=int(q.shape[2]),
                                         kv_width=int(kv.shape[1]), d_v=int(d_v))
        if plan is None:
            return False
        source, name, threads, smem, head_blocks, rows_16_bytes = plan
        return kernels.kernel(source, name, device, smem), head_blocks, threads, smem, rows_16_bytes

    # ------------------------------------------------------------------ training: sparse MLA backward
    def _float32(self, x):
        """A C-contiguous float32 CuPy copy/view of any float input (None stays None)."""
        if x is None:
            return None
        x = self._native(x)
        return _to_float32(x, logical_dtype(x))

    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale: float, d_v: int, topk_length,
                            attn_sink, d_lse, deterministic: bool):
        import cupy

        q, kv = self._native(q), self._native(kv)
        q_dtype, kv_dtype = logical_dtype(q), logical_dtype(kv)
        s_q, h, d_qk = (int(n) for n in q.shape)
        s_kv, d_v = int(kv.shape[0]), int(d_v)
        kernel_path = "simt"
        if s_q > 0 and h > 0:
            tensor_cores = kernel_switch(self.deterministic_tensor_cores, "DSA_REF_CUPY_DETERMINISTIC_MMA")
            hopper = kernel_switch(self.hopper_backward, "DSA_REF_CUPY_WGMMA_BACKWARD")
            hopper_deterministic = kernel_switch(self.hopper_deterministic_backward,
                                                 "DSA_REF_CUPY_WGMMA_DETERMINISTIC")
            kernel_path = backward_kernel_path(q_dtype, kv_dtype, d_qk=d_qk, kv_width=int(kv.shape[1]), d_v=d_v,
                                               deterministic=deterministic, smem_limit=_smem_optin(),
                                               deterministic_tensor_cores=tensor_cores, h=h,
                                               compute_capability=_compute_capability() if hopper else 0,
                                               hopper_backward=hopper,
                                               hopper_deterministic_backward=hopper_deterministic)
        q32 = kv32 = None  # the tensor-core kernel reads the bf16 inputs as they are
        if kernel_path == "simt":
            q32, kv32 = _to_float32(q, q_dtype), _to_float32(kv, kv_dtype)
        indices = _valid_int32_indices(self._native(indices), s_kv)
        topk = int(indices.shape[1])
        if topk_length is not None:
            topk_length = cupy.clip(self._native(topk_length), 0, topk).astype(cupy.int32)
        sink = self._float32(attn_sink)
        out32, lse32, d_out32, d_lse32 = (self._float32(x) for x in (out, lse, d_out, d_lse))
        delta = cupy.sum(d_out32 * out32, axis=-1)  # [s_q, h]   D
        if sink is None:
            share = cupy.where(cupy.isneginf(lse32), 0.0, 1.0).astype(cupy.float32)  # [s_q, h]   f
        else:
            share = (1.0 / (1.0 + cupy.exp(sink[None, :] - lse32))).astype(cupy.float32)  # exp overflow: f = 0
        dq = self._empty((s_q, h, d_qk), cupy.float32)
        dkv = cupy.zeros((s_kv, d_qk), cupy.float32)  # an accumulator: rows no slot reads stay exactly 0
        if kernel_path == "wgmma":
            # dout as it came when it is bf16 (the kernel rounds float32 to bf16 itself: the same values).
            d_out_native = self._native(d_out)
            d_out_bf16 = logical_dtype(d_out_native) == "bfloat16"
            function = kernels.kernel("sparse_mla_backward_wgmma.cu", "sparse_mla_bwd_wgmma", q.device.id,
                                      WGMMA_BACKWARD_SMEM)
            function((s_q * (h // 64),), (WGMMA_BACKWARD_THREADS,),
                     (q, kv, indices, _nullable(topk_length), lse32, d_out_native if d_out_bf16 else d_out32,
                      delta, share, _nullable(d_lse32), dq, dkv, np.int32(h), np.int32(s_kv), np.int32(topk),
                      np.int32(d_out_bf16), np.float32(sm_scale), np.float32(float(sm_scale) * _LOG2_E)),
                     shared_mem=WGMMA_BACKWARD_SMEM)
        elif kernel_path == "mma":
            function = kernels.kernel("sparse_mla_backward_mma.cu", "sparse_mla_bwd_mma", q.device.id,
                                      BACKWARD_MMA_SMEM)
            head_blocks = (h + 63) // 64
            function((s_q * head_blocks,), (512,),
                     (q, kv, indices, _nullable(topk_length), lse32, d_out32, delta, share, _nullable(d_lse32), dq,
                      dkv, np.int32(h), np.int32(s_kv), np.int32(topk), np.float32(sm_scale),
                      np.float32(float(sm_scale) * _LOG2_E)),
                     shared_mem=BACKWARD_MMA_SMEM)
        elif kernel_path in ("mma_deterministic", "wgmma_deterministic"):
            _deterministic_mma_backward(q, kv, indices, topk_length, lse32, d_out32, delta, share, d_lse32, dq, dkv,
                                        sm_scale=float(sm_scale), empty=self._empty,
                                        wgmma_d_out=self._native(d_out) if kernel_path == "wgmma_deterministic"
                                        else None)
        elif s_q > 0 and h > 0:
            device_id = q32.device.id
            query_smem = (2 * d_qk + d_v) * 4
            query_kernel = kernels.kernel("sparse_mla_backward.cu", "sparse_mla_bwd_query_simt", device_id, query_smem)
            dkv_kernel = kernels.kernel("sparse_mla_backward.cu", "sparse_mla_bwd_dkv_simt", device_id, d_qk * 4)
            dims = (np.int32(h), np.int32(s_kv), np.int32(topk), np.int32(d_qk), np.int32(d_v), np.float32(sm_scale))
            # dl_t and f P_t of a chunk ([c, h, topk] each) plus the sort keys of deterministic mode.
            for rows in _query_chunks(s_q, bytes_per_query=8 * h * topk + 32 * topk):
                c = rows.stop - rows.start
                chunk_length = None if topk_length is None else topk_length[rows]
                d_logits = cupy.empty((c, h, topk), cupy.float32)
                value_weights = cupy.empty((c, h, topk), cupy.float32)
                query_kernel((c * h,), (128,),
                             (q32[rows], kv32, indices[rows], _nullable(chunk_length), lse32[rows], d_out32[rows],
                              delta[rows], share[rows], _nullable(None if d_lse32 is None else d_lse32[rows]),
                              dq[rows], d_logits, value_weights) + dims,
                             shared_mem=query_smem)
                work = _scatter_work(_read_rows(indices[rows], chunk_length, s_kv), s_kv, deterministic)
                if work is not None:
                    blocks, pair_order, segment_start = work
                    dkv_kernel((blocks,), (128,),
                               (q32[rows], d_out32[rows], d_logits, value_weights, indices[rows],
                                _nullable(chunk_length), _nullable(pair_order), _nullable(segment_start), dkv) + dims,
                               shared_mem=d_qk * 4)
        if sink is None:
            return dq, dkv
        d_sink = -cupy.sum(cupy.where(cupy.isneginf(lse32), 0.0, delta * (1.0 - share)), axis=0)  # [h]
        return dq, dkv, d_sink.astype(cupy.float32)

    def attention_target(self, q, kv, indices, lse, *, sm_scale: float, topk_length):
        import cupy

        kv_dtype = logical_dtype(kv, kv=True)
        q32 = self._float32(q)
        kv32 = _unpack_fp8_cache(self._native(kv)) if kv_dtype == "uint8" else self._float32(kv)
        lse32 = self._float32(lse)
        s_q, h, d_qk = (int(n) for n in q32.shape)
        s_kv = int(kv32.shape[0])
        indices = _valid_int32_indices(self._native(indices), s_kv)
        topk = int(indices.shape[1])
        if topk_length is not None:
            topk_length = cupy.clip(self._native(topk_length), 0, topk).astype(cupy.int32)
        target = self._empty((s_q, topk), cupy.float32)
        if s_q == 0 or topk == 0:
            return target
        if h == 0:
            target.fill(0)
            return target
        smem = d_qk * 4
        function = kernels.kernel("sparse_mla_backward.cu", "attention_probs_simt", q32.device.id, smem)
        for rows in _query_chunks(s_q, bytes_per_query=4 * h * topk + 16 * topk):
            c = rows.stop - rows.start
            probs = cupy.empty((c, h, topk), cupy.float32)
            function((c * h,), (128,),
                     (q32[rows], kv32, indices[rows], _nullable(None if topk_length is None else topk_length[rows]),
                      lse32[rows], probs, np.int32(h), np.int32(s_kv), np.int32(topk), np.int32(d_qk),
                      np.float32(sm_scale)),
                     shared_mem=smem)
            head_sum = probs.sum(axis=1)  # [c, topk]   sum over heads, in a fixed order
            total = head_sum.sum(axis=1, keepdims=True)  # [c, 1]
            normalized = cupy.where(total > 0, head_sum / cupy.where(total > 0, total, 1.0), 0.0)
            target[rows] = cupy.where(cupy.isnan(total), cupy.nan, normalized)  # NaN in an input is reported
        return target

    # ------------------------------------------------------------------ training: indexer loss
    def _indexer_loss_inputs(self, q_index, weights, k_index, target, indices, key_start, key_end, k_scale):
        import cupy

        q32, w32, k32, target32 = (self._float32(x) for x in (q_index, weights, k_index, target))
        ks32 = self._float32(k_scale)
        s_kv = int(k32.shape[0])
        if indices is not None:
            sparse_keys = _read_rows(self._native(indices), None, s_kv)  # -1: not a slot of the softmax

            def keys_of(rows):
                return sparse_keys[rows]
        else:
            start = self._native(key_start).astype(cupy.int64)
            end = self._native(key_end).astype(cupy.int64)
            key = cupy.arange(s_kv, dtype=cupy.int64)[None, :]

            def keys_of(rows):
                visible = (start[rows, None] <= key) & (key < end[rows, None])  # [c, s_kv]
                return cupy.where(visible, key, -1).astype(cupy.int32)
        return q32, w32, k32, ks32, target32, keys_of

    def _indexer_entry_scores(self, q32, w32, k32, ks32, keys):
        """Index scores [c, n] of a chunk's entries, -inf off the softmax's set."""
        import cupy

        c, n = (int(x) for x in keys.shape)
        h_i, d_i = int(q32.shape[1]), int(q32.shape[2])
        scores = cupy.empty((c, n), cupy.float32)
        if c == 0 or n == 0:
            return scores
        smem = (h_i * d_i + h_i) * 4
        function = kernels.kernel("indexer_loss.cu", "indexer_entry_scores_simt", q32.device.id, smem)
        function((c, (n + 63) // 64), (256,), (q32, w32, k32, _nullable(ks32), keys, scores, np.int32(h_i),
                                               np.int32(d_i), np.int32(n)),
                 shared_mem=smem)
        return scores

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        import cupy

        q32, w32, k32, ks32, target32, keys_of = self._indexer_loss_inputs(q_index, weights, k_index, target,
                                                                          indices, key_start, key_end, k_scale)
        s_q, n = int(q32.shape[0]), int(target32.shape[1])
        loss = self._empty((s_q,), cupy.float32)
        if n == 0:
            loss.fill(0)
            return loss
        for rows in _query_chunks(s_q, bytes_per_query=40 * n):
            keys = keys_of(rows)
            scores = self._indexer_entry_scores(q32[rows], w32[rows], k32, ks32, keys)
            p_hat, log_softmax, active = _indexer_distributions(scores, keys, target32[rows])
            log_p = cupy.log(cupy.where(p_hat > 0, p_hat, 1.0))
            terms = cupy.where(p_hat > 0, p_hat * (log_p - log_softmax), 0.0)
            loss[rows] = cupy.where(active, terms.sum(axis=1), 0.0)
        return loss

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic: bool):
        import cupy

        q32, w32, k32, ks32, target32, keys_of = self._indexer_loss_inputs(q_index, weights, k_index, target,
                                                                          indices, key_start, key_end, k_scale)
        d_loss32 = self._float32(d_loss)
        s_q, h_i, d_i = (int(x) for x in q32.shape)
        s_kv, n = int(k32.shape[0]), int(target32.shape[1])
        dq = self._empty((s_q, h_i, d_i), cupy.float32)
        d_weights = self._empty((s_q, h_i), cupy.float32)
        dk = cupy.zeros((s_kv, d_i), cupy.float32)  # an accumulator: keys nobody scored stay exactly 0
        if s_q == 0:
            return dq, d_weights, dk
        if n == 0 or h_i == 0:
            dq.fill(0)
            d_weights.fill(0)
            return dq, d_weights, dk
        device_id = q32.device.id
        query_kernel = kernels.kernel("indexer_loss.cu", "indexer_loss_bwd_query_simt", device_id)
        dk_kernel = kernels.kernel("indexer_loss.cu", "indexer_loss_bwd_dk_simt", device_id)
        dims = (np.int32(h_i), np.int32(d_i), np.int32(n))
        for rows in _query_chunks(s_q, bytes_per_query=64 * n):
            c = rows.stop - rows.start
            keys = keys_of(rows)
            scores = self._indexer_entry_scores(q32[rows], w32[rows], k32, ks32, keys)
            p_hat, log_softmax, active = _indexer_distributions(scores, keys, target32[rows])
            row_d_loss = cupy.where(active, d_loss32[rows], 0.0)[:, None]  # [c, 1]   inactive rows pass nothing
            d_scores = cupy.where(keys >= 0, row_d_loss * (cupy.exp(log_softmax) - p_hat), 0.0).astype(cupy.float32)
            query_kernel((c,), (256,), (q32[rows], w32[rows], k32, _nullable(ks32), keys, d_scores, dq[rows],
                                        d_weights[rows]) + dims)
            work = _scatter_work(keys, s_kv, deterministic)
            if work is not None:
                blocks, pair_order, segment_start = work
                dk_kernel((blocks,), (128,), (q32[rows], w32[rows], k32, _nullable(ks32), keys, d_scores,
                                              _nullable(pair_order), _nullable(segment_start), dk) + dims)
        return dq, d_weights, dk


# Shared memory of sparse_mla_fwd_mma (Smem<FP8_CACHE>::TOTAL in sparse_mla.cu).
_MMA_SMEM = {False: 73728 * 3 + 9216 + 3 * 512, True: 73728 * 2 + 41984 + 9216 + 3 * 512}

#: Shared memory and threads of sparse_mla_fwd_wgmma and sparse_mla_fwd_wgmma_fp8 (mla_wgmma::Smem::TOTAL,
#: mla_wgmma::THREADS in csrc/sparse_mla_wgmma.cu; the FP8 kernel dequantizes into the same bf16 tiles):
#: Q, two KV tiles, P, flags, maxima, sums, barriers, and 1 KB to align.
WGMMA_FORWARD_SMEM = 73728 * 3 + 8192 + 3 * 512 + 32 + 1024
WGMMA_FORWARD_THREADS = 384
#: Bytes of a packed FP8 cache row (mla_wgmma::FP8_ROW_BYTES; dsa_ref.reference.formats.KV_CACHE_FP8_BYTES).
FP8_CACHE_ROW_BYTES = 656


def forward_kernel_path(q_dtype: str, kv_dtype: str, *, d_qk: int, kv_width: int, d_v: int, h: int,
                        compute_capability: int, smem_limit: int, hopper_forward: bool = False,
                        hopper_fp8_decode: bool = False) -> str:
    """Which sparse-MLA forward runs. For bf16 q at the V3.2 widths d_qk = 576, d_v = 512, with bf16 rows
    of 576 or the packed FP8 cache (``kv_dtype`` "uint8"), where the device gives a block its shared
    memory: ``"mma"`` (csrc/sparse_mla.cu, mma.sync). On compute capability 9.0 with h a multiple of 64,
    the wgmma kernels of csrc/sparse_mla_wgmma.cu instead: ``"wgmma"`` for bf16 rows with
    ``hopper_forward`` (see :attr:`CupyBackend.hopper_forward`), ``"wgmma_fp8"`` for the packed cache with
    ``hopper_fp8_decode`` (:attr:`CupyBackend.hopper_fp8_decode`). ``"simt"`` (float32) for everything else."""
    v32 = q_dtype == "bfloat16" and d_qk == 576 and d_v == 512
    bf16_rows = kv_dtype == "bfloat16" and kv_width == 576
    packed_rows = kv_dtype == "uint8" and kv_width == FP8_CACHE_ROW_BYTES
    hopper = v32 and h % 64 == 0 and compute_capability == 90 and WGMMA_FORWARD_SMEM <= smem_limit
    if hopper and hopper_forward and bf16_rows:
        return "wgmma"
    if hopper and hopper_fp8_decode and packed_rows:
        return "wgmma_fp8"
    if v32 and (bf16_rows or kv_dtype == "uint8") and _MMA_SMEM[kv_dtype == "uint8"] <= smem_limit:
        return "mma"
    return "simt"


# ---------------------------------------------------------------------------- device helpers
def _probe_device() -> list[str]:
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA install
        # The extras named here are pyproject.toml's; tests/test_packaging.py keeps the two in step.
        return [f"cupy is not importable ({type(error).__name__}: {error}); "
                "pip install 'dsa-ref[cupy]' (CUDA 13; 'dsa-ref[cupy12]' for CUDA 12)"]
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return [f"no CUDA device ({type(error).__name__}: {error})"]
    if count == 0:
        return ["no CUDA device"]
    capability = _compute_capability()
    if capability < 80:
        return [f"compute capability {capability / 10:.1f} (needs >= 8.0: cp.async, ldmatrix, bf16 mma.sync)"]
    return []


def _attribute(name: str) -> int:
    import cupy

    return _device_attributes(cupy.cuda.Device().id)[name]


@functools.lru_cache(maxsize=None)
def _device_attributes(device_id: int) -> dict:
    """Attributes of a device, read once (reading them all costs about a millisecond)."""
    import cupy

    return {name: int(value) for name, value in cupy.cuda.Device(device_id).attributes.items()}


#: Dynamic shared memory of the wgmma indexers for QUERIES stacked queries (indexer_wgmma::Layout<QUERIES>::TOTAL:
#: the queries' heads, four stages of 64 keys and their scales, and 1024 bytes to align the start).
INDEXER_WGMMA_SMEM = {1: 64 * 128 + 4 * (64 * 128 + 64 * 4) + 1024,
                      2: 128 * 128 + 4 * (64 * 128 + 64 * 4) + 1024}
#: Key positions a block of the wgmma indexers covers (STEPS x KEYS in indexer_wgmma.cu).
INDEXER_WGMMA_POSITIONS = 16 * 64
#: The same for indexer_paged_wgmma_v2 (indexer_wgmma_v2::Layout<QUERIES, STAGES>::TOTAL, STEPS x KEYS in
#: csrc/indexer_wgmma_v2.cu): five stages at one query (four blocks an SM), eight at two (two blocks an SM).
INDEXER_WGMMA_V2_SMEM = {1: 64 * 128 + 5 * (64 * 128 + 64 * 4) + 1024,
                         2: 128 * 128 + 8 * (64 * 128 + 64 * 4) + 1024}
INDEXER_WGMMA_V2_POSITIONS = 16 * 64


def paged_indexer_path(h_i: int, d_i: int, block_size: int, compute_capability: int, wgmma: bool) -> str:
    """Which kernel scores a paged e4m3 cache that ``reads_pages_in_place`` took: ``"wgmma"`` (Hopper's
    fp8 tensor cores; sm_90 only, one 128-byte row a key, at most 64 heads, a step's 64 positions in
    one page) where chosen and possible, else ``"mma"``."""
    if wgmma and compute_capability == 90 and d_i == 128 and 0 < h_i <= 64 and block_size % 64 == 0:
        return "wgmma"
    return "mma"


def dense_indexer_path(q_dtype: str, k_dtype: str, h_i: int, d_i: int, compute_capability: int, wgmma: bool) -> str:
    """``"wgmma"`` where the dense indexer runs on ``indexer_dense_wgmma`` (chosen; sm_90; e4m3 queries and
    keys of 128 dims, one 128-byte row each; at most 64 heads), else ``"other"`` (the mma.sync or
    float32 kernels, as :meth:`CupyBackend.lightning_indexer` picks)."""
    if (wgmma and compute_capability == 90 and q_dtype == k_dtype == "float8_e4m3fn" and d_i == 128
            and 0 < h_i <= 64):
        return "wgmma"
    return "other"


def _compute_capability() -> int:
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def _smem_optin() -> int:
    return _attribute("MaxSharedMemoryPerBlockOptin")


def _multiprocessors() -> int:
    return _attribute("MultiProcessorCount")


# ---------------------------------------------------------------------------- conversions
@functools.lru_cache(maxsize=None)
def _on_device(table: str, device_id: int):
    """The e4m3 lookup tables, copied to a device once."""
    import cupy

    host = {"e4m3_to_f32": kernels.E4M3_TO_FLOAT32, "e4m3_to_f16": kernels.E4M3_TO_FLOAT16_BITS}[table]
    with cupy.cuda.Device(device_id):
        return cupy.asarray(host)


@functools.lru_cache(maxsize=None)
def _permutation_on_device(d_i: int, device_id: int):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.asarray(kernels.query_permutation(d_i))


def _widened_e4m3_queries(q, d_i: int, device_id: int):
    """e4m3 indexer queries as f16 with their dims permuted as indexer.cu's fp8 B fragments hold them."""
    import cupy

    return _on_device("e4m3_to_f16", device_id)[q.view(cupy.uint8)[..., _permutation_on_device(d_i, device_id)]]


def _indexer_mma_plan(m_tiles: int, d_i: int, key_bytes: int, columns: int, groups: int):
    """``(shared memory, grid, tiles_per_block)`` of the tensor-core indexer kernels: the block's two
    queries' head rows and a double-buffered tile of 128 keys in shared memory, and runs of key tiles
    long enough that the grid holds about 8 blocks per SM (at most 16 tiles a block)."""
    smem = 2 * m_tiles * 16 * (2 * d_i + 16) + 2 * 128 * (key_bytes * d_i + 16) + 2 * m_tiles * 16 * 4
    n_tiles = (columns + 127) // 128
    tiles_per_block = min(n_tiles, max(1, min(16, math.ceil(n_tiles * groups / (8 * _multiprocessors())))))
    return smem, (groups, (n_tiles + tiles_per_block - 1) // tiles_per_block), tiles_per_block


def _aligned_16(x):
    """``x``, or a copy of it where its first byte is not 16-byte aligned (a view into a larger buffer):
    for kernels that read rows 16 bytes at a time."""
    return x if x.data.ptr % 16 == 0 else x.copy()


#: A null pointer as a kernel argument: 8 zero bytes passed by value.
_NULL_POINTER = np.uint64(0)


def _nullable(x):
    """An optional array argument: the array, or a null pointer."""
    return _NULL_POINTER if x is None else x


_LOG2_E = math.log2(math.e)
#: The environment variables that choose a sparse-MLA forward kernel (CupyBackend._tensor_core_forward).
_FORWARD_SWITCHES = ("DSA_REF_CUPY_WGMMA", "DSA_REF_CUPY_WGMMA_V2", "DSA_REF_CUPY_WGMMA_FP8",
                     "DSA_REF_CUPY_WGMMA_FP8_V2", "DSA_REF_CUPY_WGMMA_FP8_PAIR", "DSA_REF_CUPY_WGMMA_SPLIT_V",
                     "DSA_REF_POISON_OUTPUTS")


def _to_float32(x, dtype_name: str):
    """float32 copy of a CuPy array holding ``dtype_name`` data (bf16 / fp8 as their carriers)."""
    import cupy

    if dtype_name == "float32":
        return cupy.ascontiguousarray(x)
    if dtype_name == "bfloat16":  # bf16 is the top half of a float32
        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    if dtype_name == "float8_e4m3fn":
        return _on_device("e4m3_to_f32", x.device.id)[x.view(cupy.uint8)]
    if dtype_name in ("float16", "float64", "int32", "int64"):
        return x.astype(cupy.float32)
    raise TypeError(f"cannot use dtype {dtype_name} as float input of the cupy backend")


def _unpack_fp8_cache(packed):
    """uint8 [s_kv, 656] -> float32 [s_kv, 576], exactly as dsa_ref.unpack_kv_cache_fp8."""
    import cupy

    s_kv = packed.shape[0]
    latent = _on_device("e4m3_to_f32", packed.device.id)[packed[:, :512]].reshape(s_kv, 4, 128)  # [s_kv, 4, 128]
    scales = cupy.ascontiguousarray(packed[:, 512:528]).view(cupy.float32)  # [s_kv, 4]
    rope = _to_float32(cupy.ascontiguousarray(packed[:, 528:]).view(cupy.int16), "bfloat16")  # [s_kv, 64]
    return cupy.concatenate([(latent * scales[:, :, None]).reshape(s_kv, 512), rope], axis=1)  # [s_kv, 576]


def _valid_int32_indices(indices, s_kv: int):
    """int32 indices; any value outside [0, s_kv) (even one that int32 cannot hold) becomes -1."""
    import cupy

    if indices.dtype == cupy.int32:
        return indices
    valid = (indices >= 0) & (indices < s_kv)
    return cupy.where(valid, indices, -1).astype(cupy.int32)


# ---------------------------------------------------------------------------- training ops
#: Heads the sparse-MLA backward takes (mla_bwd::MAX_HEADS in csrc/sparse_mla_backward.cu).
TRAINING_MAX_HEADS = 128
#: Limits of the indexer-loss kernels (indexer_loss::MAX_HEADS, 32 * LANE_DIMS in csrc/indexer_loss.cu).
INDEXER_LOSS_MAX_HEADS, INDEXER_LOSS_MAX_DIMS = 64, 128
#: Scratch memory one chunk of queries of a training op may take (intermediates, sort keys).
CHUNK_BYTES = 1 << 28


#: Shared memory of sparse_mla_bwd_mma (mla_bwd_mma::Smem::TOTAL in csrc/sparse_mla_backward_mma.cu):
#: Q, dout, two gathered tiles, the staged dl and f P tiles, tile rows, per-head values.
BACKWARD_MMA_SMEM = 73728 + 65536 + 2 * 36864 + 2 * 5120 + 2 * 32 * 4 + 4 * 64 * 4


#: Contribution buffer one chunk of queries of the deterministic mma backward may take (float32
#: [chunk, head blocks, topk, 576]: 2.3 KB per (query, head block, slot)); tests lower it to run
#: several chunks.
DETERMINISTIC_MMA_BUFFER_BYTES = 1 << 30
#: Threads of sparse_mla_bwd_mma_row_sum (mla_bwd_mma::ROW_SUM_THREADS): one float4 of a 576-wide row each.
DETERMINISTIC_ROW_SUM_THREADS = 576 // 4


#: Shared memory and threads of sparse_mla_bwd_wgmma (mla_bwd_wgmma::Smem::TOTAL, mla_bwd_wgmma::THREADS in
#: csrc/sparse_mla_backward_wgmma.cu): Q, dout, the rows, the staged dl and f P tiles, the rows' indices,
#: per-head values, two barriers, and 1 KB to align.
WGMMA_BACKWARD_SMEM = 73728 + 65536 + 73728 + 2 * 8192 + 64 * 4 + 4 * 64 * 4 + 16 + 1024
WGMMA_BACKWARD_THREADS = 384


def backward_kernel_path(q_dtype: str, kv_dtype: str, *, d_qk: int, kv_width: int, d_v: int, deterministic: bool,
                         smem_limit: int, deterministic_tensor_cores: bool = False, h: int = 0,
                         compute_capability: int = 0, hopper_backward: bool = False,
                         hopper_deterministic_backward: bool = False) -> str:
    """Which sparse-MLA backward runs. For bf16 q and kv rows at the V3.2 widths d_qk = 576, d_v = 512,
    where the device gives a block its shared memory, the tensor-core kernels of
    csrc/sparse_mla_backward_mma.cu: ``"mma"`` (row gradients added with atomics) by default, and, in
    deterministic mode with ``deterministic_tensor_cores`` (see :attr:`CupyBackend.deterministic_tensor_cores`),
    ``"mma_deterministic"`` (row gradients stored, then summed per row in a sorted order). In default mode
    with ``hopper_backward`` (see :attr:`CupyBackend.hopper_backward`), h a multiple of 64 and compute
    capability 9.0: ``"wgmma"`` (csrc/sparse_mla_backward_wgmma.cu); in deterministic mode, where that holds
    with ``deterministic_tensor_cores`` and ``hopper_deterministic_backward`` too (see
    :attr:`CupyBackend.hopper_deterministic_backward`): ``"wgmma_deterministic"`` (the wgmma kernel storing
    the row gradients, then the same row sums). ``"simt"`` (csrc/sparse_mla_backward.cu, float32, both
    modes) for everything else."""
    if (q_dtype == "bfloat16" and kv_dtype == "bfloat16" and d_qk == 576 and kv_width == 576 and d_v == 512
            and BACKWARD_MMA_SMEM <= smem_limit):
        hopper = (hopper_backward and h > 0 and h % 64 == 0 and compute_capability == 90
                  and WGMMA_BACKWARD_SMEM <= smem_limit)
        if not deterministic:
            return "wgmma" if hopper else "mma"
        if deterministic_tensor_cores:
            return "wgmma_deterministic" if hopper and hopper_deterministic_backward else "mma_deterministic"
    return "simt"


def deterministic_mma_chunk_queries(s_q: int, h: int, topk: int) -> int:
    """Queries per launch of the deterministic mma backward: as many as keep the contribution buffer
    ``[chunk, head blocks, topk, 576]`` float32 within :data:`DETERMINISTIC_MMA_BUFFER_BYTES` (at least one)."""
    bytes_per_query = ((h + 63) // 64) * topk * 576 * 4
    return max(1, min(s_q, DETERMINISTIC_MMA_BUFFER_BYTES // max(1, bytes_per_query)))


#: Bytes per (query, slot) pair of the deterministic plan: the int64 keys, their temporaries while they
#: are built, the sorted copy and the sort's scratch.
_PLAN_BYTES_PER_PAIR = 40


def deterministic_mma_plan_queries(chunk_queries: int, topk: int) -> int:
    """Queries sorted together by the deterministic mma backward: a whole number of chunks, as many as
    keep the sort within :data:`CHUNK_BYTES` (at least one chunk)."""
    chunks = CHUNK_BYTES // max(1, _PLAN_BYTES_PER_PAIR * topk * chunk_queries)
    return chunk_queries * max(1, chunks)


def _sorted_row_keys(rows, s_kv: int, xp=None):
    """The order of the deterministic row sums: int64 keys ``row * pairs + p``, sorted.

    ``rows`` is int ``[n, topk]``: the kv row pair ``p`` (flat index: query p // topk, slot p % topk)
    reads, or -1 (its key then sorts after every row's, as row ``s_kv``). The keys are unique, so any
    correct sort gives the one order: by row, then by pair. One sort serves every chunk of the
    plan (:func:`_row_ranges`), and nothing is counted on the host, so the launches of a call are
    queued without waiting for the device.
    """
    if xp is None:
        import cupy as xp
    pairs = int(rows.size)
    flat = rows.reshape(-1).astype(xp.int64)
    return xp.sort(xp.where(flat >= 0, flat, s_kv) * pairs + xp.arange(pairs, dtype=xp.int64))


def _row_ranges(sorted_keys, s_kv: int, first_pair: int, end_pair: int, xp=None):
    """``(row_begin, row_end)``, int64 ``[s_kv]``: the positions in ``sorted_keys`` of the pairs
    ``first_pair <= p < end_pair`` (one chunk of the plan) that read each row, in increasing ``p``."""
    if xp is None:
        import cupy as xp
    pairs = int(sorted_keys.size)
    row_base = xp.arange(s_kv, dtype=xp.int64) * pairs
    return (xp.searchsorted(sorted_keys, row_base + first_pair).astype(xp.int64),
            xp.searchsorted(sorted_keys, row_base + end_pair).astype(xp.int64))


def _deterministic_mma_backward(q, kv, indices, topk_length, lse32, d_out32, delta, share, d_lse32, dq, dkv, *,
                                sm_scale: float, empty, wgmma_d_out=None):
    """dq and dkv of bf16 V3.2 inputs, bitwise repeatable: per chunk of queries, the tensor-core kernel
    writes dq and stores every valid slot's row gradient (per head block) to the contribution buffer,
    then one block per kv row adds that row's entries to ``dkv`` in the order of :func:`_sorted_row_keys`.
    Chunks run in stream order and reuse one buffer, allocated by ``empty`` (the backend's: poisoned with
    NaN in tests, so that a row sum reading an entry no slot wrote shows in dkv). With ``wgmma_d_out``
    (d_out as it came, C-contiguous) the block kernel is ``sparse_mla_bwd_wgmma_deterministic``: the same
    buffer layout and plan; a bf16 d_out is read as it is (the kernel rounds float32 to the same values)."""
    import cupy

    s_q, h = int(q.shape[0]), int(q.shape[1])
    s_kv, topk = int(kv.shape[0]), int(indices.shape[1])
    head_blocks = (h + 63) // 64
    device_id = q.device.id
    wgmma = wgmma_d_out is not None
    if wgmma:
        d_out_bf16 = logical_dtype(wgmma_d_out) == "bfloat16"
        d_out_blocks = wgmma_d_out if d_out_bf16 else d_out32
        block_kernel = kernels.kernel("sparse_mla_backward_wgmma.cu", "sparse_mla_bwd_wgmma_deterministic",
                                      device_id, WGMMA_BACKWARD_SMEM)
        block_threads, block_smem = WGMMA_BACKWARD_THREADS, WGMMA_BACKWARD_SMEM
    else:
        d_out_blocks = d_out32
        block_kernel = kernels.kernel("sparse_mla_backward_mma.cu", "sparse_mla_bwd_mma_deterministic", device_id,
                                      BACKWARD_MMA_SMEM)
        block_threads, block_smem = 512, BACKWARD_MMA_SMEM
    row_sum = kernels.kernel("sparse_mla_backward_mma.cu", "sparse_mla_bwd_mma_row_sum", device_id)
    step = deterministic_mma_chunk_queries(s_q, h, topk)
    plan_step = deterministic_mma_plan_queries(step, topk)
    contributions = empty((step, head_blocks, topk, 576), cupy.float32)
    scales = (np.int32(h), np.int32(s_kv), np.int32(topk)) + ((np.int32(d_out_bf16),) if wgmma else ()) + (
        np.float32(sm_scale), np.float32(sm_scale * _LOG2_E))
    scatters = s_kv > 0 and topk > 0  # otherwise no slot is valid and dkv stays 0
    for plan_start in range(0, s_q, plan_step):
        plan = slice(plan_start, min(s_q, plan_start + plan_step))
        if scatters:
            plan_length = None if topk_length is None else topk_length[plan]
            sorted_keys = _sorted_row_keys(_read_rows(indices[plan], plan_length, s_kv), s_kv)
        for start in range(plan.start, plan.stop, step):
            rows = slice(start, min(plan.stop, start + step))
            c = rows.stop - rows.start
            chunk_length = None if topk_length is None else topk_length[rows]
            block_kernel((c * head_blocks,), (block_threads,),
                         (q[rows], kv, indices[rows], _nullable(chunk_length), lse32[rows], d_out_blocks[rows],
                          delta[rows], share[rows], _nullable(None if d_lse32 is None else d_lse32[rows]), dq[rows],
                          contributions) + scales,
                         shared_mem=block_smem)
            if not scatters:
                continue
            first_pair, end_pair = (rows.start - plan.start) * topk, (rows.stop - plan.start) * topk
            row_begin, row_end = _row_ranges(sorted_keys, s_kv, first_pair, end_pair)
            row_sum((s_kv,), (DETERMINISTIC_ROW_SUM_THREADS,),
                    (contributions, sorted_keys, row_begin, row_end, dkv, np.int64(sorted_keys.size),
                     np.int64(first_pair), np.int32(head_blocks), np.int32(topk)))


def _training_attention_reasons(op: str, inputs: dict, limit: int) -> list[str]:
    q = inputs.get("q")
    if q is None or getattr(q, "ndim", 0) != 3:
        return []
    h, d_qk = int(q.shape[1]), int(q.shape[2])
    reasons = []
    if op == "sparse_mla_backward":
        d_v = int(inputs.get("d_v") or 512)
        if h > TRAINING_MAX_HEADS:
            reasons.append(f"h = {h} (the backward keeps two coefficients per head of a slot in shared memory: "
                           f"at most {TRAINING_MAX_HEADS})")
        if (2 * d_qk + d_v) * 4 > limit:
            reasons.append(f"2 * d_qk + d_v = {2 * d_qk + d_v} (at most {limit // 4}: a query row, its "
                           f"output gradient and its dq accumulator in shared memory)")
    elif d_qk * 4 > limit:
        reasons.append(f"d_qk = {d_qk} (at most {limit // 4}: the query row in shared memory)")
    return reasons


def _query_chunks(s_q: int, bytes_per_query: int):
    """Slices of queries whose scratch stays under :data:`CHUNK_BYTES`."""
    step = max(1, min(s_q, CHUNK_BYTES // max(1, bytes_per_query)))
    for start in range(0, s_q, step):
        yield slice(start, min(s_q, start + step))


def _read_rows(indices, topk_length, s_kv: int):
    """int32 ``[c, topk]``: the row each slot reads, -1 where it reads none (an index outside
    ``[0, s_kv)``, INT32_MIN / INT32_MAX included, or a slot past ``topk_length``)."""
    import cupy

    read = (indices >= 0) & (indices < s_kv)
    if topk_length is not None:
        read &= cupy.arange(indices.shape[1], dtype=cupy.int32)[None, :] < topk_length[:, None]
    return cupy.where(read, indices, -1).astype(cupy.int32)


def _scatter_work(rows, s_kv: int, deterministic: bool):
    """How the scattered row gradients of a chunk are launched: ``(blocks, pair_order, segment_start)``,
    or None when no pair adds anything.

    ``rows`` is int ``[c, n]``: the row pair ``p`` (flat index) adds to, or -1. By default every pair is
    a block that adds with atomics (``pair_order`` None). Deterministic: the pairs that add to a row
    form one segment, in pair order; the order comes from sorting the unique composite keys
    ``row * pairs + p`` (any correct sort gives the one permutation of unique keys), and each segment
    is summed by one block without atomics.
    """
    import cupy

    pairs = int(rows.size)
    if pairs == 0:
        return None
    if not deterministic:
        return pairs, None, None
    flat = rows.reshape(-1).astype(cupy.int64)
    used = flat >= 0
    n_used = int(used.sum())
    if n_used == 0:
        return None
    keys = cupy.where(used, flat, s_kv) * pairs + cupy.arange(pairs, dtype=cupy.int64)
    order = cupy.argsort(keys)[:n_used]  # unused pairs sort last (row s_kv) and are dropped
    sorted_rows = flat[order]
    first = cupy.ones(n_used, dtype=cupy.bool_)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    starts = cupy.flatnonzero(first)
    segment_start = cupy.concatenate([starts, cupy.array([n_used])]).astype(cupy.int32)
    return int(starts.size), order.astype(cupy.int32), segment_start


def _indexer_distributions(scores, keys, target):
    """The softmax of the index scores and the restricted target of a chunk, as the spec builds them:
    ``(p_hat, log_softmax, active)``; scores are -inf off the set (``keys < 0``)."""
    import cupy

    allowed = keys >= 0
    restricted = cupy.where(allowed, target, 0.0)  # [c, n]   mass outside the set is dropped
    mass = restricted.sum(axis=1, keepdims=True)  # [c, 1]
    active = mass[:, 0] > 0
    p_hat = cupy.where(mass > 0, restricted / cupy.where(mass > 0, mass, 1.0), 0.0)
    row_max = scores.max(axis=1, keepdims=True)  # NaN stays NaN
    row_max = cupy.where(cupy.isneginf(row_max), 0.0, row_max)  # a row with no entry stays finite
    shifted = cupy.where(allowed, scores - row_max, -cupy.inf)
    log_normalizer = cupy.log(cupy.exp(shifted).sum(axis=1, keepdims=True))
    log_softmax = cupy.where(allowed, shifted - log_normalizer, 0.0)
    return p_hat.astype(cupy.float32), log_softmax.astype(cupy.float32), active
