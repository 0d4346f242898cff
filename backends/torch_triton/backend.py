"""The ``triton`` backend: Triton kernels on torch tensors (CUDA, or the CPU interpreter)."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from dsa_ref import interop
from dsa_ref.backend import Backend
from dsa_ref_backends import kernel_switch

_INDEXER_DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn"})
_TOPK_DTYPES = frozenset({"float32", "float16", "bfloat16"})  # widened to float32 exactly
_MLA_DTYPES = frozenset({"float32", "float16", "bfloat16"})
_INDEXER_LOSS_DTYPES = frozenset({"float32", "float16", "bfloat16"})

#: Largest padded widths the sparse MLA kernel keeps on chip (V columns, and the rest of d_qk).
MAX_D_V = 512
MAX_D_REST = 256


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class TritonBackend(Backend):
    """Triton kernels for the lightning indexer (bf16/fp16/fp32 and fp8 e4m3 with per-key scales),
    radix top-k, sparse MLA (bf16/fp16/fp32 rows or the packed FP8 cache) and a fused DSA step.

    Runs on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (slow; for tests).
    """

    name = "triton"
    description = "Triton kernels on torch tensors: tensor-core indexer, radix top-k, sparse MLA (bf16/FP8 cache)"
    array_kind = "torch"
    devices = ("cuda", "cpu")
    # On the CPU interpreter the training ops' kernels take seconds per example; their own
    # interpreter tests (tests/test_triton_training.py) cover each edge case, and the GPU runs the
    # thorough profile. The forward ops keep the profile's 30.
    ci_max_examples = {"sparse_mla_backward": 12, "attention_target": 12, "indexer_loss": 12,
                       "indexer_loss_backward": 12, "lightning_indexer_paged": 12}
    #: The sparse MLA forward on the Gluon Hopper kernel (:mod:`.sparse_mla_gluon`) for the inputs it
    #: covers (bf16, d_qk 576, d_v 512, h a multiple of 64, dense rows, sm_90, the Triton release its
    #: API is written for), the ``tl.dot`` kernel for the rest: 1.26x its speed on the H200 (NOTES.md,
    #: version 6). Set this to False, or DSA_REF_TRITON_GLUON=0, to run the ``tl.dot`` kernel everywhere.
    hopper_forward: bool = True
    #: Top-k in two passes (:func:`.topk.topk_indices_in_chunks`) for rows too few to fill the GPU and
    #: long enough to split (the decode step: 64 rows of 128K scores), where the one-pass kernel's one
    #: program per row leaves SMs idle: 1.07 -> 0.60 ms on the decode step's scores on the H200
    #: (NOTES.md, version 8). Set this to False, or DSA_REF_TRITON_CHUNKED_TOPK=0, for one pass.
    chunked_topk: bool = True
    #: The sparse MLA backward on the Gluon Hopper kernel (:mod:`.sparse_mla_backward_gluon`) for the
    #: inputs the Gluon forward covers, in the default (atomic) mode; the split ``tl.dot`` kernels for
    #: the rest and for deterministic mode: 45 -> 293 TFLOP/s at S 4096, h 128, topk 2048 on the H200
    #: (NOTES.md, version 11). Set this to False, or DSA_REF_TRITON_GLUON_BACKWARD=0, for the split kernels.
    hopper_backward: bool = True
    #: The inputs :attr:`hopper_forward` sends to the Gluon kernel run on its warp-specialized ping-pong
    #: variant instead (:mod:`.sparse_mla_gluon_pingpong`: a producer warpgroup gathering the rows, two
    #: consumers taking the slot tiles in turn): 325 -> 445 TFLOP/s at S 4096, SKV 8192, h 64, topk 2048
    #: on the H200 (NOTES.md, version 12). False, or DSA_REF_TRITON_GLUON_PINGPONG=0, runs the first one.
    hopper_forward_pingpong: bool = True
    #: The FP8 decode (bf16 q over the packed FP8 cache, h a multiple of 64, d_v 512, sm_90) on the Gluon
    #: ping-pong kernel whose producer dequantizes the rows (:mod:`.sparse_mla_gluon_fp8`) instead of the
    #: ``tl.dot`` kernel (188 TFLOP/s at b 64, s_q 2, T 32K on the H200; NOTES.md, version 16). Off until
    #: its GPU tests and speed are measured on the H200; True, or DSA_REF_TRITON_GLUON_FP8=1, runs it.
    hopper_fp8_decode: bool = False
    supported_dtypes = {
        "lightning_indexer": _INDEXER_DTYPES,
        "topk_indices": _TOPK_DTYPES,
        "sparse_mla": _MLA_DTYPES,
        "sparse_mla_backward": _MLA_DTYPES,
        "attention_target": _MLA_DTYPES,
        "indexer_loss": _INDEXER_LOSS_DTYPES,
        "indexer_loss_backward": _INDEXER_LOSS_DTYPES,
    }

    # ------------------------------------------------------------------ availability
    def unavailable_reasons(self) -> list[str]:
        try:
            import torch
        except ImportError:
            return ["torch is not installed (pip install 'dsa-ref[triton]')"]
        # Only look for triton here: importing it fixes whether its kernels run on the CPU
        # interpreter (TRITON_INTERPRET is read at import), which the caller may still set.
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install 'dsa-ref[triton]')"]
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"]
        return []

    def device(self) -> Any:
        # Read every call (the interpreter is chosen by the environment); the device objects are made once.
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        device = _DEVICES.get(interpret)
        if device is None:
            import torch

            device = _DEVICES[interpret] = torch.device("cpu" if interpret else "cuda")
        return device

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)
        if op in ("lightning_indexer", "dsa_attention"):
            k = inputs.get("k" if op == "lightning_indexer" else "k_index")
            if k is not None and interop.dtype_name(k) not in _INDEXER_DTYPES:
                reasons.append(f"k.dtype={interop.dtype_name(k)} (supported: {', '.join(sorted(_INDEXER_DTYPES))})")
            q_index = inputs.get("q" if op == "lightning_indexer" else "q_index")
            if op == "dsa_attention" and q_index is not None and interop.dtype_name(q_index) not in _INDEXER_DTYPES:
                reasons.append(f"q_index.dtype={interop.dtype_name(q_index)} "
                               f"(supported: {', '.join(sorted(_INDEXER_DTYPES))})")
        if op in ("sparse_mla", "dsa_attention", "sparse_mla_backward"):
            reasons += self._sparse_mla_reasons(inputs.get("q"), inputs.get("kv"), inputs.get("d_v", 512))
        if op == "attention_target":
            reasons += self._attention_target_reasons(inputs.get("q"), inputs.get("kv"))
        if op in ("indexer_loss", "indexer_loss_backward"):
            reasons += self._indexer_loss_reasons(inputs.get("q_index"), inputs.get("k_index"))
        return reasons

    @classmethod
    def _attention_target_reasons(cls, q, kv) -> list[str]:
        """The target splits d_qk like the forward: the first min(512, d_qk) columns, then the rest."""
        if q is None or kv is None:
            return []
        d_qk = q.shape[-1]
        if interop.dtype_name(kv) == "uint8":
            return cls._sparse_mla_reasons(q, kv, MAX_D_V)
        return cls._sparse_mla_reasons(q, kv, min(MAX_D_V, d_qk))

    @staticmethod
    def _indexer_loss_reasons(q_index, k_index) -> list[str]:
        if q_index is None:
            return []
        from .indexer_loss import MAX_D_I, MAX_H_I

        reasons = []
        if k_index is not None and interop.dtype_name(k_index) not in _INDEXER_LOSS_DTYPES:
            reasons.append(f"k_index.dtype={interop.dtype_name(k_index)} "
                           f"(supported: {', '.join(sorted(_INDEXER_LOSS_DTYPES))})")
        if q_index.shape[1] > MAX_H_I:
            reasons.append(f"h_i={q_index.shape[1]} (supported: h_i <= {MAX_H_I})")
        if q_index.shape[2] > MAX_D_I:
            reasons.append(f"d_i={q_index.shape[2]} (supported: d_i <= {MAX_D_I})")
        return reasons

    @staticmethod
    def _sparse_mla_reasons(q, kv, d_v) -> list[str]:
        if q is None or kv is None:
            return []
        reasons = []
        kv_dtype = interop.dtype_name(kv)
        d_qk = q.shape[-1]
        if kv_dtype == "uint8":
            if d_v != 512:
                reasons.append(f"d_v={d_v} with the packed FP8 cache (supported: 512)")
            return reasons
        if kv_dtype not in _MLA_DTYPES:
            reasons.append(f"kv.dtype={kv_dtype} (supported: {', '.join(sorted(_MLA_DTYPES | {'uint8'}))})")
        if _next_power_of_2(d_v) > MAX_D_V:
            reasons.append(f"d_v={d_v} (supported: d_v <= {MAX_D_V})")
        if _next_power_of_2(d_qk - d_v) > MAX_D_REST:
            reasons.append(f"d_qk - d_v={d_qk - d_v} (supported: <= {MAX_D_REST})")
        return reasons

    # ------------------------------------------------------------------ the ops
    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        from . import indexer

        q, k = _common_dot_dtype(q, k)
        return indexer.lightning_indexer(q, weights, k, _ranges(key_start), _ranges(key_end), _scale(k_scale))

    def reads_pages_in_place(self, q, k_cache) -> bool:
        from . import indexer_paged

        return not indexer_paged.paged_indexer_reasons(q, k_cache)

    def lightning_indexer_paged(self, q, weights, k_cache, block_table, context_lens, *, next_n: int,
                                max_context_len: int):
        """The paged kernel (:mod:`.indexer_paged`: one launch for the batch, pages read in place) for
        e4m3 queries; the composed op (a dense indexer launch per sequence) for the other dtypes."""
        from . import indexer_paged

        if self.reads_pages_in_place(q, k_cache):
            return indexer_paged.lightning_indexer_paged(q, weights, k_cache, block_table, context_lens,
                                                         int(next_n), int(max_context_len))
        return super().lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, next_n=next_n,
                                               max_context_len=max_context_len)

    #: Top-k from a sampled cut (:mod:`.topk_radix`: one read of a row, counts instead of 256-bin
    #: histograms), in one pass or in the two of ``chunked_topk``: 1.636 -> 0.562 ms at 4096 x 32768,
    #: k 2048 on the H200 (NOTES.md, version 13), the default since the thorough conformance passed it there
    #: (2026-12-03). False, or DSA_REF_TRITON_RADIX_TOPK=0, runs the histogram kernels of :mod:`.topk`.
    radix_topk: bool = True

    def topk_indices(self, scores, topk: int):
        from . import topk as topk_kernel

        kernels = topk_kernel
        if kernel_switch(self.radix_topk, "DSA_REF_TRITON_RADIX_TOPK"):
            from . import topk_radix as kernels
        if kernel_switch(self.chunked_topk, "DSA_REF_TRITON_CHUNKED_TOPK"):
            chunk = topk_kernel.chunked_topk_plan(int(scores.shape[0]), int(scores.shape[1]), int(topk),
                                                  _multiprocessors(scores.device))
            if chunk is not None:
                return kernels.topk_indices_in_chunks(scores, int(topk), chunk)
        return kernels.topk_indices(scores, int(topk))

    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        import torch

        kernels = _sparse_mla_module or _load_sparse_mla_module()
        q, kv = _sparse_mla_operands(q, kv)
        d_v = int(d_v)
        kernel = "tl"
        if q.dtype == kv.dtype == torch.bfloat16:
            kernel = forward_kernel(kernel_switch(self.hopper_forward, "DSA_REF_TRITON_GLUON"),
                                    q, kv, d_v, indices, topk_length, attn_sink,
                                    pingpong=kernel_switch(self.hopper_forward_pingpong,
                                                           "DSA_REF_TRITON_GLUON_PINGPONG"))
        elif kv.dtype == torch.uint8 and kernel_switch(self.hopper_fp8_decode, "DSA_REF_TRITON_GLUON_FP8"):
            kernel = fp8_forward_kernel(q, kv, d_v, indices, topk_length, attn_sink)
        return kernels.sparse_mla(q, kv, indices, float(sm_scale), d_v, topk_length, attn_sink, kernel=kernel)

    def sparse_mla_torch(self, q, kv, indices, topk_length, attn_sink, sm_scale: float, d_v: int):
        """:meth:`sparse_mla` as :func:`dsa_ref.torch.sparse_mla` calls it (Backend.sparse_mla_torch): the
        plain tensors already on the device the kernels run on go to the kernel module as they are, with
        none of the general path's conversions; None for any other input (it converts them)."""
        import torch

        target = interop.resolved_torch_device(self.device())
        tensor = torch.Tensor
        for x in (q, kv, indices, topk_length, attn_sink):
            if x is not None and (x.__class__ is not tensor or x.device != target):
                return None
        q_dtype = q.dtype
        if (kv.dtype is torch.uint8 and (q_dtype is torch.bfloat16 or q_dtype is torch.float32)
                and type(self).sparse_mla is TritonBackend.sparse_mla
                and not kernel_switch(self.hopper_fp8_decode, "DSA_REF_TRITON_GLUON_FP8")):
            # The FP8 decode: :meth:`sparse_mla` would keep these operands as they are and pick the tl
            # kernel, and dsa_ref.torch passes the scale and d_v as float and int already.
            kernels = _sparse_mla_module or _load_sparse_mla_module()
            return kernels.sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)
        return self.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                               attn_sink=attn_sink)

    #: Deterministic mode on the Gluon backward kernel storing its row gradients, then summing them per
    #: row in a fixed order (:mod:`.sparse_mla_backward_rows`), for the inputs default mode sends to the
    #: Gluon kernel (with :attr:`hopper_backward`): 136.8 -> 106.4 ms at S 4096, SKV 8192, h 128,
    #: topk 2048 on the H200 (NOTES.md, version 14), 33.8 ms with plain stores of the row gradients
    #: (version 15: 1.57x the default mode's 21.5). False, or DSA_REF_TRITON_GLUON_DETERMINISTIC=0, runs
    #: the split deterministic kernels.
    hopper_deterministic_backward: bool = True

    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale: float, d_v: int, topk_length,
                            attn_sink, d_lse, deterministic: bool):
        from . import sparse_mla_backward

        q, kv = _common_dot_dtype(q, kv)
        # Deterministic mode on the Gluon kernel takes the inputs default mode sends there.
        gluon_deterministic = bool(deterministic) and kernel_switch(self.hopper_deterministic_backward,
                                                                    "DSA_REF_TRITON_GLUON_DETERMINISTIC")
        kernel = backward_kernel(kernel_switch(self.hopper_backward, "DSA_REF_TRITON_GLUON_BACKWARD"), q, kv,
                                 int(d_v), indices, topk_length, attn_sink, d_out,
                                 bool(deterministic) and not gluon_deterministic)
        if gluon_deterministic and kernel:
            kernel = "gluon_deterministic"
        return sparse_mla_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, float(sm_scale), int(d_v),
                                                       topk_length, attn_sink, d_lse,
                                                       deterministic=bool(deterministic), kernel=kernel)

    def attention_target(self, q, kv, indices, lse, *, sm_scale: float, topk_length):
        from . import sparse_mla_backward

        q, kv = _sparse_mla_operands(q, kv)
        return sparse_mla_backward.attention_target(q, kv, indices, lse, float(sm_scale), topk_length)

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        from . import indexer_loss

        q_index, k_index = _common_dot_dtype(q_index, k_index)
        return indexer_loss.indexer_loss(q_index, weights, k_index, target, indices=indices, key_start=key_start,
                                         key_end=key_end, k_scale=_scale(k_scale))

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic: bool):
        from . import indexer_loss

        q_index, k_index = _common_dot_dtype(q_index, k_index)
        return indexer_loss.indexer_loss_backward(q_index, weights, k_index, target, d_loss, indices=indices,
                                                  key_start=key_start, key_end=key_end, k_scale=_scale(k_scale),
                                                  deterministic=bool(deterministic))

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, topk: int, key_start, key_end,
                      k_scale, sm_scale: float, d_v: int):
        """Fused path: indexer and top-k by chunks of queries (no full score matrix), then sparse MLA."""
        from . import dsa

        q_index, k_index = _common_dot_dtype(q_index, k_index)
        q, kv = _sparse_mla_operands(q, kv)
        return dsa.dsa_attention(q, kv, q_index, weights, k_index, topk=int(topk), key_start=_ranges(key_start),
                                 key_end=_ranges(key_end), k_scale=_scale(k_scale), sm_scale=float(sm_scale),
                                 d_v=int(d_v))


def fp8_forward_kernel(q, kv, d_v: int, indices, topk_length, attn_sink) -> str:
    """``"gluon_fp8"`` when the Gluon FP8 kernel covers these inputs (:func:`.sparse_mla_gluon_fp8.fp8_applies`),
    else ``"tl"``."""
    from .sparse_mla_gluon_fp8 import fp8_applies

    return "tl" if fp8_applies(q, kv, d_v, indices, topk_length, attn_sink) else "gluon_fp8"


def forward_kernel(hopper_forward: bool, q, kv, d_v: int, indices, topk_length, attn_sink, *,
                   pingpong: bool = False) -> str:
    """``"gluon"`` (``"gluon_pingpong"`` with ``pingpong``) when the Hopper forward is chosen and covers
    these inputs, else ``"tl"``."""
    import torch

    # The dtypes first: they rule out the FP8 decode cache and the other dtypes in two attribute reads,
    # where the full list of reasons costs tens of microseconds a call.
    if not hopper_forward or q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        return "tl"
    from .sparse_mla_gluon import gluon_applies

    if gluon_applies(q, kv, d_v, indices, topk_length, attn_sink):
        return "tl"
    return "gluon_pingpong" if pingpong else "gluon"


def backward_kernel(hopper_backward: bool, q, kv, d_v: int, indices, topk_length, attn_sink, d_out,
                    deterministic: bool) -> str | None:
    """``"gluon"`` when the Hopper backward is chosen and covers these inputs, else None (the module's
    :func:`.sparse_mla_backward.default_kernel`)."""
    import torch

    if not hopper_backward or deterministic or q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        return None
    from .sparse_mla_backward_gluon import gluon_backward_applies

    return None if gluon_backward_applies(q, kv, d_v, indices, topk_length, attn_sink, d_out) else "gluon"


def _multiprocessors(device) -> int:
    """SMs of a CUDA device (the programs one wave of a one-program-per-row kernel fills); 132 (an H100 /
    H200) elsewhere, so that the interpreter takes the paths the GPU would."""
    import torch

    if device.type != "cuda":
        return 132
    return _device_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def _ranges(x):
    import torch

    return x.to(torch.int32).contiguous()


def _scale(k_scale):
    import torch

    return None if k_scale is None else k_scale.to(torch.float32).contiguous()


def _common_dot_dtype(a, b):
    """Both operands of a tensor-core product in one dtype. Mixed dtypes go to float32, which
    the kernels multiply float32-accurately (3xTF32, see :mod:`.precision`)."""
    import torch

    if a.dtype == b.dtype:
        return a, b
    return a.to(torch.float32), b.to(torch.float32)


def _sparse_mla_operands(q, kv):
    """q in the dtype the kernel multiplies in. With the packed FP8 cache, bf16 queries stay bf16
    (dequantized cache values are exact in bf16); fp16 queries go to float32, because a
    dequantized value times a small power-of-two scale can fall below fp16's range."""
    import torch

    if kv.dtype == torch.uint8:
        return (q if q.dtype in (torch.bfloat16, torch.float32) else q.to(torch.float32)), kv
    return _common_dot_dtype(q, kv)


#: The devices :meth:`TritonBackend.device` returns, by "under the interpreter" (torch imported late).
_DEVICES: dict = {}
#: The kernel module of the sparse MLA forward, once imported: a ``from . import`` in the method would
#: run importlib's Python code every call (this module imports no kernel module until one runs).
_sparse_mla_module = None


def _load_sparse_mla_module():
    global _sparse_mla_module
    from . import sparse_mla

    _sparse_mla_module = sparse_mla
    return sparse_mla
