"""The NumPy reference of DeepSeek Sparse Attention: the spec every backend is checked against.

Each function computes one equation in float64 and returns float32 (float64 for float64 inputs;
indices int32); each backward sits beside its forward (``sparse_mla_backward``,
``indexer_loss_backward``). They take
the same arguments as the public, dispatched functions in :mod:`dsa_ref` but do no argument
checking: call those for validated input, or these directly to read or step through the math.

They stay usable at realistic sizes: with s_q = s_kv = 4096 (causal), an indexer of 64 heads x 128,
top-k 512, and sparse MLA over h = 16 heads of d_qk = 576 (bf16 inputs), the three took 5.3 s,
0.7 s and 6.0 s on a 2-core CPU (2026-11-27), their chunked intermediates peaking under 0.8 GB.
"""

from .formats import (
    FP8_E4M3,
    FP8_E4M3_MAX,
    KV_CACHE_FP8_BYTES,
    dequantize_fp8,
    fp8_block_scales,
    pack_kv_cache_fp8,
    quantize_fp8,
    unpack_kv_cache_fp8,
)
from .indexer import lightning_indexer
from .indexer_loss import indexer_loss, indexer_loss_backward
from .paged import lightning_indexer_paged, pack_indexer_cache_fp8, unpack_indexer_cache_fp8
from .ranges import causal_key_ranges, slot_indices, varlen_key_ranges
from .sparse_mla import attention_target, sparse_mla, sparse_mla_backward, valid_slots
from .topk import topk_indices

__all__ = [
    "FP8_E4M3",
    "FP8_E4M3_MAX",
    "KV_CACHE_FP8_BYTES",
    "attention_target",
    "causal_key_ranges",
    "dequantize_fp8",
    "fp8_block_scales",
    "indexer_loss",
    "indexer_loss_backward",
    "lightning_indexer",
    "lightning_indexer_paged",
    "pack_indexer_cache_fp8",
    "pack_kv_cache_fp8",
    "quantize_fp8",
    "slot_indices",
    "sparse_mla",
    "sparse_mla_backward",
    "topk_indices",
    "unpack_indexer_cache_fp8",
    "unpack_kv_cache_fp8",
    "valid_slots",
    "varlen_key_ranges",
]
