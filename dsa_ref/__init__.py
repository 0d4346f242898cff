"""dsa-ref: the reference of DeepSeek Sparse Attention (DSA), the attention of DeepSeek-V3.2.

The three ops of DSA, each defined by a readable float64 NumPy function in
:mod:`dsa_ref.reference` and dispatched to interchangeable backends:

* :func:`lightning_indexer` — eq. (1): cheap scores of every query against every past token;
* :func:`topk_indices` — the ``topk`` best tokens of each query;
* :func:`sparse_mla` — eq. (2): MLA attention (MQA mode) over only those tokens;
* :func:`dsa_attention` — the three in a row.

Choose a backend with ``backend=`` on a call, ``with use_backend(name):`` or ``DSA_BACKEND``.
Importing this package imports neither torch nor cupy.
"""

from .backend import OPS, Backend, Tolerance
from .ops import dsa_attention, lightning_indexer, sparse_mla, topk_indices
from .reference.formats import (
    FP8_E4M3_MAX,
    KV_CACHE_FP8_BYTES,
    dequantize_fp8,
    pack_kv_cache_fp8,
    quantize_fp8,
    unpack_kv_cache_fp8,
)
from .reference.ranges import causal_key_ranges, slot_indices, varlen_key_ranges
from .registry import (
    BackendInfo,
    BackendUnavailableError,
    UnsupportedInputError,
    active_backend_name,
    available_backends,
    get_backend,
    list_backends,
    use_backend,
)

__version__ = "0.1.0"

_LAYER_EXPORTS = ("DSAConfig", "DSALayer", "load_layer")


def __getattr__(name):
    # The full attention layer is larger and optional reading: load it on first use.
    if name in _LAYER_EXPORTS:
        from . import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'dsa_ref' has no attribute {name!r}")


__all__ = [
    "OPS",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "FP8_E4M3_MAX",
    "KV_CACHE_FP8_BYTES",
    "Tolerance",
    "UnsupportedInputError",
    "active_backend_name",
    "available_backends",
    "causal_key_ranges",
    "dequantize_fp8",
    "dsa_attention",
    "get_backend",
    "lightning_indexer",
    "list_backends",
    "pack_kv_cache_fp8",
    "quantize_fp8",
    "slot_indices",
    "sparse_mla",
    "topk_indices",
    "unpack_kv_cache_fp8",
    "use_backend",
    "varlen_key_ranges",
    *_LAYER_EXPORTS,
]
