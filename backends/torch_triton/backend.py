"""The ``triton`` backend: Triton kernels on torch tensors (CUDA, or the CPU interpreter)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from dsa_ref import interop
from dsa_ref.backend import Backend

_INDEXER_DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn"})
_TOPK_DTYPES = frozenset({"float32", "float16", "bfloat16"})  # widened to float32 exactly
_MLA_DTYPES = frozenset({"float32", "float16", "bfloat16"})

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
    supported_dtypes = {
        "lightning_indexer": _INDEXER_DTYPES,
        "topk_indices": _TOPK_DTYPES,
        "sparse_mla": _MLA_DTYPES,
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
        import torch

        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return torch.device("cpu")
        return torch.device("cuda")

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
        if op in ("sparse_mla", "dsa_attention"):
            reasons += self._sparse_mla_reasons(inputs.get("q"), inputs.get("kv"), inputs.get("d_v", 512))
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

    def topk_indices(self, scores, topk: int):
        from . import topk as topk_kernel

        return topk_kernel.topk_indices(scores, int(topk))

    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        from . import sparse_mla

        q, kv = _sparse_mla_operands(q, kv)
        return sparse_mla.sparse_mla(q, kv, indices, float(sm_scale), int(d_v), topk_length, attn_sink)

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, topk: int, key_start, key_end,
                      k_scale, sm_scale: float, d_v: int):
        """Fused path: indexer and top-k by chunks of queries (no full score matrix), then sparse MLA."""
        from . import dsa

        q_index, k_index = _common_dot_dtype(q_index, k_index)
        q, kv = _sparse_mla_operands(q, kv)
        return dsa.dsa_attention(q, kv, q_index, weights, k_index, topk=int(topk), key_start=_ranges(key_start),
                                 key_end=_ranges(key_end), k_scale=_scale(k_scale), sm_scale=float(sm_scale),
                                 d_v=int(d_v))


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
