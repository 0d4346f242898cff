"""The ``numpy`` backend: the reference itself, so that it can be selected like any other."""

from __future__ import annotations

from dsa_ref import reference
from dsa_ref.backend import Backend, Tolerance

_ALL_FLOATS = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn"})


class NumpyBackend(Backend):
    """Runs the float64 NumPy reference of :mod:`dsa_ref.reference` on the CPU."""

    name = "numpy"
    description = "the float64 NumPy reference (the spec); CPU"
    array_kind = "numpy"
    devices = ("cpu",)
    supported_dtypes = {
        "lightning_indexer": _ALL_FLOATS,
        "lightning_indexer_paged": _ALL_FLOATS,
        "topk_indices": _ALL_FLOATS - {"float8_e4m3fn"},
        "sparse_mla": _ALL_FLOATS - {"float8_e4m3fn"} | {"uint8"},
        "sparse_mla_backward": _ALL_FLOATS - {"float8_e4m3fn"},
        "attention_target": _ALL_FLOATS - {"float8_e4m3fn"},
        "indexer_loss": _ALL_FLOATS,
        "indexer_loss_backward": _ALL_FLOATS - {"float8_e4m3fn"},
    }
    # The reference against itself differs only by the final rounding to float32.
    tolerances = {dtype: Tolerance(rtol=1e-6, atol=1e-6) for dtype in _ALL_FLOATS}

    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        return reference.lightning_indexer(q, weights, k, key_start=key_start, key_end=key_end, k_scale=k_scale)

    def lightning_indexer_paged(self, q, weights, k_cache, block_table, context_lens, *, next_n, max_context_len):
        return reference.lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, next_n=next_n,
                                                 max_context_len=max_context_len)

    def topk_indices(self, scores, topk):
        return reference.topk_indices(scores, topk)

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        return reference.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                                    attn_sink=attn_sink)

    # The reference sums in a fixed order: deterministic whether asked or not.
    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale, d_v, topk_length, attn_sink, d_lse,
                            deterministic):
        return reference.sparse_mla_backward(q, kv, indices, out, lse, d_out, sm_scale=sm_scale, d_v=d_v,
                                             topk_length=topk_length, attn_sink=attn_sink, d_lse=d_lse)

    def attention_target(self, q, kv, indices, lse, *, sm_scale, topk_length):
        return reference.attention_target(q, kv, indices, lse, sm_scale=sm_scale, topk_length=topk_length)

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        return reference.indexer_loss(q_index, weights, k_index, target, indices=indices, key_start=key_start,
                                      key_end=key_end, k_scale=k_scale)

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        return reference.indexer_loss_backward(q_index, weights, k_index, target, d_loss, indices=indices,
                                               key_start=key_start, key_end=key_end, k_scale=k_scale)
