"""dsa-ref: the reference of DeepSeek Sparse Attention (DSA), the attention of DeepSeek-V3.2.

The three ops of DSA, each defined by a readable float64 NumPy function in
:mod:`dsa_ref.reference` and dispatched to interchangeable backends:

* :func:`lightning_indexer` — eq. (1): cheap scores of every query against every past token;
* :func:`topk_indices` — the ``topk`` best tokens of each query;
* :func:`sparse_mla` — eq. (2): MLA attention (MQA mode) over only those tokens;
* :func:`dsa_attention` — the three in a row;
* :func:`sparse_decode_step` — a decode step of a batch over paged FP8 caches (indexer, top-k,
  sparse MLA through the block table), capturable in a CUDA graph on torch tensors.

and the ops that train it: :func:`sparse_mla_backward`, :func:`attention_target` (the indexer's
target, eqs. 3-4), :func:`indexer_loss` and :func:`indexer_loss_backward`; :mod:`dsa_ref.torch`
wraps them all as differentiable torch ops. :func:`use_deterministic` makes the backward ops
bitwise repeatable.

Choose a backend with ``backend=`` on a call, ``with use_backend(name):`` or ``DSA_BACKEND``.
Importing this package imports neither torch nor cupy.
"""

from .backend import OPS, Backend, Tolerance
from .decode import sparse_decode_step
from .modes import data_checks_enabled, deterministic_enabled, use_data_checks, use_deterministic
from .ops import (
    attention_target,
    dsa_attention,
    indexer_loss,
    indexer_loss_backward,
    lightning_indexer,
    lightning_indexer_paged,
    sparse_mla,
    sparse_mla_backward,
    topk_indices,
)
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
    "attention_target",
    "available_backends",
    "causal_key_ranges",
    "data_checks_enabled",
    "dequantize_fp8",
    "deterministic_enabled",
    "dsa_attention",
    "get_backend",
    "indexer_loss",
    "indexer_loss_backward",
    "lightning_indexer",
    "lightning_indexer_paged",
    "list_backends",
    "pack_kv_cache_fp8",
    "quantize_fp8",
    "slot_indices",
    "sparse_decode_step",
    "sparse_mla",
    "sparse_mla_backward",
    "topk_indices",
    "unpack_kv_cache_fp8",
    "use_backend",
    "use_data_checks",
    "use_deterministic",
    "varlen_key_ranges",
    *_LAYER_EXPORTS,
]
