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
        "topk_indices": _ALL_FLOATS - {"float8_e4m3fn"},
        "sparse_mla": _ALL_FLOATS - {"float8_e4m3fn"} | {"uint8"},
    }
    # The reference against itself differs only by the final rounding to float32.
    tolerances = {dtype: Tolerance(rtol=1e-6, atol=1e-6) for dtype in _ALL_FLOATS}

    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        return reference.lightning_indexer(q, weights, k, key_start=key_start, key_end=key_end, k_scale=k_scale)

    def topk_indices(self, scores, topk):
        return reference.topk_indices(scores, topk)

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        return reference.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                                    attn_sink=attn_sink)
