"""FlashMLA- and DeepGEMM-shaped entry points that run on any dsa-ref backend.

Kernel engineers call DSA's kernels with FlashMLA's and DeepGEMM's layouts; dsa-ref's ops take
token-packed arrays. These functions take the peers' arguments, in the peers' order and shapes,
translate them to dsa-ref's ops (dispatched like any op: ``backend=``, default the active one), and
return the peers' layouts. Where the peers' conventions differ from dsa-ref's spec, or between
builds of a peer, the choice is an explicit argument, never a silent guess:

| function | convention | argument (default) |
|---|---|---|
| `flash_mla_sparse_fwd` | base of `lse` and unit of `max_logits` | `lse_base="e"` |
| `flash_mla_sparse_fwd`, `flash_mla_with_kvcache` | `lse` of a row with no valid index | `empty_lse=math.inf` |
| `fp8_mqa_logits`, `fp8_paged_mqa_logits` | logits outside each query's keys | `clean_logits=True` |

Other differences, documented per function: ``out`` is float32 (FlashMLA returns bfloat16: cast it
to compare bits); the scheduling arguments (``tile_scheduler_metadata``, ``num_splits``,
``schedule_meta``) are accepted and ignored, since dsa-ref's backends schedule themselves.

The results come back in the array library of the first array argument, like every dsa-ref op.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _checks, interop, ops
from .reference import paged as _paged
from .reference.formats import KV_CACHE_FP8_BYTES, KV_LATENT_DIM, KV_ROPE_DIM

#: ``log2(e)``: a natural-log lse times this is the base-2 lse (FlashMLA's SM90 prefill build).
LOG2_E = math.log2(math.e)
LSE_BASES = ("e", 2)
#: FlashMLA's decode kernels read pages of 64 tokens.
FLASH_MLA_PAGE_SIZE = 64
#: Bytes of a chunk of gathered rows when computing ``max_logits`` (bounds its memory).
_MAX_LOGITS_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------- FlashMLA
def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None, topk_length=None, *,
                         lse_base: str | int = "e", empty_lse: float = math.inf, backend=None):
    r"""FlashMLA's sparse prefill, ``flash_mla_sparse_fwd``, computed by :func:`dsa_ref.sparse_mla`.

    .. math::

        P_{i,h,t} = \mathrm{sm\_scale}\; q_{i,h} \cdot kv_{\mathrm{idx}_{i,t}}, \quad
        \mathrm{max\_logits}_{i,h} = c \max_{t\ \mathrm{valid}} P_{i,h,t}, \quad
        \mathrm{lse}_{i,h} = c \log \sum_{t\ \mathrm{valid}} e^{P_{i,h,t}}

    with ``c = 1`` for ``lse_base="e"`` and ``c = log2(e)`` for ``lse_base=2`` (then ``lse`` is
    ``log2 Σ 2^(c P)``, the definition in FlashMLA's ``tests/ref.py`` of 2025: logits pre-multiplied by
    ``log2(e)``, so ``max_logits`` is in the same base-2 units). ``out`` is the softmax over the valid
    slots times V, with the attention sink folded into the denominator
    (``out *= 1 / (1 + exp(attn_sink - lse))``); ``lse`` itself leaves the sink out, as FlashMLA's.

    Args:
        q: ``[s_q, h_q, d_qk]`` float (FlashMLA: bfloat16, h_q 64 or 128, d_qk 576 or 512).
        kv: ``[s_kv, h_kv, d_qk]`` float with ``h_kv = 1`` (MQA: one latent row per token).
        indices: int32/int64 ``[s_q, h_kv, topk]``; an index ``< 0`` or ``>= s_kv`` is invalid: ignored,
            never read.
        sm_scale: softmax scale (required, as in FlashMLA).
        d_v: V width, the first ``d_v`` columns of ``kv`` (FlashMLA supports 512 only).
        attn_sink: float ``[h_q]``, optional.
        topk_length: int ``[s_q]``, optional: only the first ``topk_length[i]`` slots of row i count.
        lse_base: ``"e"`` (default) or ``2``, the base of ``lse`` and the unit of ``max_logits``. The
            default is the natural log that FlashMLA's README (2026-09) and its current ``tests/ref.py``
            (``torch.logsumexp``) define, dsa-ref's own, and what FlashMLA's decode returns on every build.
            Pass ``2`` to compare with the SM90 build shipped in sglang-kernel 0.4.3, measured to return
            base-2 ``lse`` from sparse prefill.
        empty_lse: the ``lse`` of a row with no valid slot: ``+inf`` (default, FlashMLA's, which keeps
            ``exp(-lse) = 0`` finite in its combine step) or ``-inf`` (dsa-ref's spec, the log of an
            empty sum). Its ``out`` is 0 and its ``max_logits`` ``-inf`` either way (FlashMLA's
            reference takes the max over an all ``-inf`` row).
        backend: dsa-ref backend name or object; default the active one.

    Returns:
        ``(out, max_logits, lse)``: float32 ``[s_q, h_q, d_v]`` (FlashMLA: bfloat16), float32
        ``[s_q, h_q]``, float32 ``[s_q, h_q]``. ``out`` and ``lse`` come from the backend;
        ``max_logits`` is computed beside them in the array library of ``q`` (torch on its device;
        NumPy in float64 on the host for other libraries).

    Raises:
        ValueError, TypeError: a wrong layout (``h_kv != 1``, ``indices`` without the ``h_kv`` axis,
            the packed FP8 cache as ``kv``), an unknown ``lse_base`` or ``empty_lse``, or what
            :func:`dsa_ref.sparse_mla` refuses.
    """
    lse_base, empty_lse = _lse_base(lse_base), _empty_lse(empty_lse)
    sm_scale = _checks.finite_float("sm_scale", sm_scale)
    _checks.array("q", q, "[s_q, h_q, d_qk]", _checks.FLOATS)
    _checks.array("kv", kv, "[s_kv, h_kv, d_qk]", _checks.FLOATS + ("uint8",))
    if interop.dtype_name(kv) == "uint8":
        raise TypeError("kv is uint8 (the packed FP8 cache): FlashMLA's sparse prefill reads float latent rows "
                        "[s_kv, 1, d_qk]; for the FP8 cache use flash_mla_with_kvcache (sparse decode)")
    if kv.shape[1] != 1:
        raise ValueError(f"kv must have shape [s_kv, h_kv, d_qk] with h_kv=1 (DSA's sparse MLA is MQA: one latent "
                         f"row per token shared by every query head), got shape {tuple(kv.shape)}")
    _checks.array("indices", indices, "[s_q, h_kv, topk]", _checks.INDEX_INTS)
    _checks.axis("indices", indices, 1, 1, "[s_q, h_kv, topk]", "kv's h_kv")
    kv_rows, selected = kv[:, 0, :], indices[:, 0, :]  # [s_kv, d_qk], [s_q, topk]
    out, lse = ops.sparse_mla(q, kv_rows, selected, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                              attn_sink=attn_sink, backend=backend)
    max_logits = _max_logits(q, kv_rows, selected, sm_scale, topk_length)  # [s_q, h_q], natural units
    if lse_base == 2:
        lse, max_logits = lse * LOG2_E, max_logits * LOG2_E  # -inf stays -inf
    lse[lse == -math.inf] = empty_lse
    return out, max_logits, lse


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, num_heads_q=None,
                     is_fp8_kvcache: bool = False, topk=None):
    """FlashMLA's scheduling call, for call sites that make it before :func:`flash_mla_with_kvcache`.

    dsa-ref's backends schedule their own work, so there is nothing to plan: it returns
    ``(None, None)`` (``tile_scheduler_metadata``, ``num_splits``), which :func:`flash_mla_with_kvcache`
    accepts and ignores. The arguments are FlashMLA's, accepted as given.
    """
    return None, None


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = True, indices=None, attn_sink=None, extra_k_cache=None,
                           extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None, *,
                           empty_lse: float = math.inf, backend=None):
    r"""FlashMLA's sparse FP8 decode, ``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``,
    computed by :func:`dsa_ref.sparse_mla` on the flattened cache.

    The cache holds DeepSeek-V3.2's 656-byte rows (:func:`dsa_ref.pack_kv_cache_fp8`: bytes
    ``[0, 512)`` e4m3 latent, ``[512, 528)`` four float32 scales, ``[528, 656)`` 64 bf16 RoPE dims)
    in pages: slot ``block * page_block_size + offset``. ``indices`` are in those *cache-slot*
    coordinates (FlashMLA's sparse decode folds the block table into them, see
    :func:`dsa_ref.slot_indices`), so this is sparse MLA of each query over the flattened cache
    ``[num_blocks * page_block_size, 656]``.

    Args:
        q: ``[b, s_q, h_q, 576]`` float (FlashMLA: bfloat16; ``s_q > 1`` with multi-token prediction).
        k_cache: ``[num_blocks, page_block_size, h_k, 656]`` with ``h_k = 1``, uint8 or a float8_e4m3fn
            view of the same bytes.
        block_table, cache_seqlens: accepted and not needed: the sparse path reads the slots that
            ``indices`` name (FlashMLA uses them for dense decode only). Checked for shape when given
            (``[b, max_blocks]``, ``[b]``).
        head_dim_v: 512 (V is the latent part of the row).
        tile_scheduler_metadata, num_splits: FlashMLA's split-KV schedule; accepted and ignored.
        softmax_scale: default ``576 ** -0.5`` (FlashMLA's ``1 / sqrt(head_dim)``).
        causal: must be False: in sparse decode ``indices`` say what each query sees.
        is_fp8_kvcache: must be True (FlashMLA's default is False; its sparse decode requires True).
        indices: int32/int64 ``[b, s_q, topk]`` cache slots; ``-1`` (any value outside the cache) is
            invalid: ignored, never read. Required: dense decode (``indices=None``) is not supported.
        attn_sink: float ``[h_q]``, optional: ``out *= 1 / (1 + exp(attn_sink - lse))``.
        extra_k_cache, extra_indices_in_kvcache, extra_topk_length: FlashMLA's second cache (a model
            after V3.2); must be None.
        topk_length: int ``[b]``, optional: only the first ``topk_length[i]`` slots of batch entry i's
            queries count.
        empty_lse: ``lse`` of a query with no valid slot: ``+inf`` (default, FlashMLA's) or ``-inf``
            (dsa-ref's spec); its ``out`` is 0.
        backend: dsa-ref backend name or object; default the active one.

    Returns:
        ``(out, lse)``: float32 ``[b, s_q, h_q, 512]`` (FlashMLA: bfloat16) and float32
        ``[b, h_q, s_q]`` in natural log (FlashMLA decode's layout and base, on every build measured),
        ``lse`` a transposed view as FlashMLA's.

    Raises:
        ValueError, TypeError: dense decode, ``is_fp8_kvcache=False``, ``causal=True``, ``h_k != 1``, a cache
            width other than 656 bytes, ``head_dim_v != 512``, an extra cache, or a wrong shape or dtype.
    """
    empty_lse = _empty_lse(empty_lse)
    if indices is None:
        raise ValueError("flash_mla_with_kvcache: dense decode (indices=None) is not supported; dsa-ref runs "
                         "the sparse FP8 decode of DeepSeek-V3.2 only: pass indices [b, s_q, topk] in cache-slot "
                         "coordinates with is_fp8_kvcache=True and a [num_blocks, page_block_size, 1, 656] cache")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache must be True: the sparse decode reads the 656-byte FP8 cache "
                         "(FlashMLA's own sparse decode requires it too)")
    if causal:
        raise ValueError("causal must be False for the sparse decode: indices already say which keys each query "
                         "sees (FlashMLA asserts the same)")
    for name, extra in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length)):
        if extra is not None:
            raise ValueError(f"{name} must be None: DeepSeek-V3.2's decode reads one cache (the extra cache is "
                             f"FlashMLA's for a later model, not supported here)")
    d_qk = KV_LATENT_DIM + KV_ROPE_DIM
    _checks.array("q", q, f"[b, s_q, h_q, {d_qk}]", _checks.FLOATS)
    batch, s_q, h_q, q_width = q.shape
    if q_width != d_qk:
        raise ValueError(f"q must have shape [b, s_q, h_q, {d_qk}] (512 latent + 64 RoPE dims, to read the FP8 "
                         f"cache), got shape {tuple(q.shape)}")
    if head_dim_v != KV_LATENT_DIM:
        raise ValueError(f"head_dim_v must be {KV_LATENT_DIM} (V is the latent part of the cache row), "
                         f"got {head_dim_v!r}")
    slots = _fp8_cache_slots(k_cache)  # uint8 [num_blocks · page_block_size, 656]
    _checks.array("indices", indices, "[b, s_q, topk]", _checks.INDEX_INTS)
    _checks.axis("indices", indices, 0, batch, "[b, s_q, topk]", "q's b")
    _checks.axis("indices", indices, 1, s_q, "[b, s_q, topk]", "q's s_q")
    if block_table is not None:
        _checks.array("block_table", block_table, "[b, max_blocks]", _checks.INDEX_INTS)
        _checks.axis("block_table", block_table, 0, batch, "[b, max_blocks]", "q's b")
    if cache_seqlens is not None:
        _checks.array("cache_seqlens", cache_seqlens, "[b]", _checks.INDEX_INTS)
        _checks.axis("cache_seqlens", cache_seqlens, 0, batch, "[b]", "q's b")
    per_query_length = None
    topk = indices.shape[2]
    if topk_length is not None:
        _checks.array("topk_length", topk_length, "[b]", _checks.INDEX_INTS)
        _checks.axis("topk_length", topk_length, 0, batch, "[b]", "q's b")
        if topk > 0:
            # Broadcast against an integer array of q's batch layout: no library-specific repeat.
            per_query_length = (topk_length.reshape(batch, 1) + indices[:, :, 0] * 0).reshape(batch * s_q)  # [b·s_q]
    out, lse = ops.sparse_mla(q.reshape(batch * s_q, h_q, d_qk), slots, indices.reshape(batch * s_q, topk),
                              sm_scale=softmax_scale, d_v=head_dim_v, topk_length=per_query_length,
                              attn_sink=attn_sink, backend=backend)  # [b · s_q, h_q, 512], [b · s_q, h_q]
    lse[lse == -math.inf] = empty_lse
    return out.reshape(batch, s_q, h_q, head_dim_v), lse.reshape(batch, s_q, h_q).swapaxes(1, 2)


# ---------------------------------------------------------------------------- DeepGEMM
def fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits: bool = True, *, backend=None):
    r"""DeepGEMM's ``fp8_mqa_logits`` (the prefill indexer), computed by :func:`dsa_ref.lightning_indexer`.

    ``logits[i, j] = Σ_h weights[i, h] · ReLU(q[i, h] · kv_fp8[j]) · kv_scales[j]`` for
    ``cu_seqlen_ks[i] <= j < cu_seqlen_ke[i]`` (dsa-ref's ``key_start`` / ``key_end``).

    Args:
        q: ``[M, H, D]`` float8_e4m3fn (or float).
        kv: the tuple ``(kv_fp8 [N, D] float8_e4m3fn, kv_scales [N] float32)``, one scale per key.
        weights: ``[M, H]`` float32.
        cu_seqlen_ks, cu_seqlen_ke: int32 ``[M]``, each query's half-open key range, ``0 <= ks <= ke <= N``.
        clean_logits: True: ``-inf`` outside each range (DeepGEMM's). False: DeepGEMM leaves those
            entries unspecified (whatever its tiles wrote); dsa-ref writes NaN there, so that a consumer
            that reads outside its range fails loudly instead of seeing plausible numbers.
        backend: dsa-ref backend name or object; default the active one.

    Returns:
        float32 ``[M, N]`` (contiguous; DeepGEMM may return a strided view).
    """
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError(f"kv must be the tuple (kv_fp8 [N, D], kv_scales [N]) of DeepGEMM's fp8_mqa_logits, "
                        f"got {type(kv).__name__}" + (f" of length {len(kv)}" if isinstance(kv, (tuple, list)) else ""))
    clean_logits = _flag("clean_logits", clean_logits)
    keys, key_scales = kv
    _checks.array("kv[0] (kv_fp8)", keys, "[N, D]", _checks.FLOATS_AND_FP8)
    _checks.array("kv[1] (kv_scales)", key_scales, "[N]", _checks.FLOATS)
    _checks.axis("kv[1] (kv_scales)", key_scales, 0, keys.shape[0], "[N]", "kv_fp8's N")
    logits = ops.lightning_indexer(q, weights, keys, key_start=cu_seqlen_ks, key_end=cu_seqlen_ke,
                                   k_scale=key_scales, backend=backend)  # [M, N]
    if not clean_logits:
        columns = interop.from_numpy_like(np.arange(logits.shape[1]), logits)[None, :]  # [1, N]
        starts = interop.convert_like(cu_seqlen_ks, logits)[:, None]  # [M, 1]
        ends = interop.convert_like(cu_seqlen_ke, logits)[:, None]  # [M, 1]
        logits[(columns < starts) | (columns >= ends)] = math.nan
    return logits


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta=None,
                         max_context_len: int | None = None, clean_logits: bool = True, *, backend=None):
    r"""DeepGEMM's ``fp8_paged_mqa_logits`` (the decode indexer over a paged key cache), computed by
    :func:`dsa_ref.lightning_indexer_paged`.

    The cache is DeepGEMM's fused layout, per block of ``block_size`` keys (``D`` values each):
    bytes ``[0, block_size · D)`` the keys' e4m3 values (key t at ``[t · D, (t + 1) · D)``), then bytes
    ``[block_size · D, block_size · (D + 4))`` their float32 scales (key t at ``block_size · D + 4 t``).
    DeepGEMM shapes those bytes ``[num_blocks, block_size, 1, D + 4]`` (row t of that view is *not*
    key t). With D = 128 and block_size = 64 a block is 8448 bytes. :func:`pack_indexer_cache_fp8`
    builds one.

    Query ``j`` of sequence ``b`` sits at position ``context_lens[b] - next_n + j`` and sees the keys
    at positions ``[0, context_lens[b] - next_n + j]``; position ``t`` is key ``t % block_size`` of
    block ``block_table[b, t // block_size]``.

    Args:
        q: ``[b, next_n, H, D]`` float8_e4m3fn (or float).
        kv_cache: uint8 ``[num_blocks, block_size, 1, D + 4]``.
        weights: ``[b * next_n, H]`` float32.
        context_lens: int32 ``[b]``, each in ``[next_n, max_blocks * block_size]``.
        block_table: int32 ``[b, max_blocks]``; entries past a context may be ``-1`` (or any value
            outside ``[0, num_blocks)``): those positions are never read.
        schedule_meta: DeepGEMM's ``get_paged_mqa_logits_metadata`` result; accepted and ignored.
        max_context_len: columns of the result (DeepGEMM's ``max_model_len``); default
            ``max_blocks * block_size``.
        clean_logits: True: ``-inf`` past each query's causal bound (DeepGEMM's). False: DeepGEMM leaves
            them unspecified; dsa-ref writes NaN there (see :func:`fp8_mqa_logits`).
        backend: dsa-ref backend name or object; default the active one.

    Returns:
        float32 ``[b * next_n, max_context_len]``.
    """
    clean_logits = _flag("clean_logits", clean_logits)
    _checks.array("q", q, "[b, next_n, H, D]", _checks.FLOATS_AND_FP8)
    batch, next_n, heads, d_i = q.shape
    if not interop.is_array(kv_cache):
        raise TypeError(f"kv_cache must be an array of shape [num_blocks, block_size, 1, D + 4], "
                        f"got {type(kv_cache).__name__}")
    if kv_cache.ndim != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != d_i + _paged.INDEXER_SCALE_BYTES:
        raise ValueError(f"kv_cache must have shape [num_blocks, block_size, 1, D + 4] = [num_blocks, block_size, "
                         f"1, {d_i + _paged.INDEXER_SCALE_BYTES}] (DeepGEMM's fused fp8 layout, D={d_i} from q), "
                         f"got shape {tuple(kv_cache.shape)}")
    if interop.dtype_name(kv_cache) != "uint8":
        raise TypeError(f"kv_cache.dtype must be uint8 (DeepGEMM's fused values-then-scales bytes), "
                        f"got {interop.dtype_name(kv_cache)}")
    num_blocks, block_size = kv_cache.shape[:2]
    block_bytes = kv_cache.reshape(num_blocks, block_size * (d_i + _paged.INDEXER_SCALE_BYTES))
    logits = ops.lightning_indexer_paged(q.reshape(batch * next_n, heads, d_i), weights, block_bytes, block_table,
                                         context_lens, next_n=next_n, max_context_len=max_context_len,
                                         backend=backend)  # [b · next_n, max_context_len]
    if not clean_logits:
        columns = interop.from_numpy_like(np.arange(logits.shape[1]), logits)[None, :]  # [1, L]
        lengths = interop.convert_like(context_lens, logits).reshape(batch, 1)  # [b, 1]
        last_key = lengths + interop.from_numpy_like(np.arange(-next_n, 0), logits)[None, :]  # [b, next_n]
        logits[columns > last_key.reshape(batch * next_n, 1)] = math.nan
    return logits


def pack_indexer_cache_fp8(keys, block_size: int = 64, scale_format: str = "ue8m0") -> np.ndarray:
    """Build DeepGEMM's paged indexer cache from float keys (per-key fp8 quantization, the official quantizer).

    Args:
        keys: float ``[num_blocks * block_size, D]`` (any library) in slot order: slot ``s`` is key
            ``s % block_size`` of block ``s // block_size``.
        block_size: keys per block (64 typical).
        scale_format: ``"ue8m0"`` (power-of-two scales, DeepSeek-V3.2's ``scale_fmt``) or ``"fp32"``
            (``amax / 448``, the quantizer of DeepGEMM's tests); see
            :func:`dsa_ref.reference.pack_indexer_cache_fp8`.

    Returns:
        NumPy uint8 ``[num_blocks, block_size, 1, D + 4]``, the layout of :func:`fp8_paged_mqa_logits`.
    """
    packed = _paged.pack_indexer_cache_fp8(keys, block_size, scale_format)  # [blocks, bs · (D + 4)]
    return packed.reshape(packed.shape[0], block_size, 1, -1)


# ---------------------------------------------------------------------------- helpers
def _lse_base(lse_base: Any) -> str | int:
    if isinstance(lse_base, bool) or lse_base not in LSE_BASES:
        raise ValueError(f'lse_base must be "e" (natural log) or 2 (FlashMLA SM90 prefill builds), got {lse_base!r}')
    return lse_base


def _empty_lse(empty_lse: Any) -> float:
    if isinstance(empty_lse, bool) or not isinstance(empty_lse, (int, float)) or empty_lse not in (math.inf,
                                                                                                  -math.inf):
        raise ValueError(f"empty_lse must be math.inf (FlashMLA's) or -math.inf (dsa-ref's spec), got {empty_lse!r}")
    return float(empty_lse)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _fp8_cache_slots(k_cache):
    """FlashMLA's paged FP8 cache ``[num_blocks, page_block_size, 1, 656]`` as uint8 slots ``[n, 656]``."""
    layout = f"[num_blocks, page_block_size, h_k, {KV_CACHE_FP8_BYTES}]"
    if not interop.is_array(k_cache):
        raise TypeError(f"k_cache must be an array of shape {layout}, got {type(k_cache).__name__}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must have shape {layout} (4 axes), got shape {tuple(k_cache.shape)}")
    if k_cache.shape[2] != 1:
        raise ValueError(f"k_cache must have h_k=1 (the sparse decode is MQA: one latent row per token), "
                         f"got shape {tuple(k_cache.shape)}")
    if k_cache.shape[3] != KV_CACHE_FP8_BYTES:
        raise ValueError(f"k_cache must have {KV_CACHE_FP8_BYTES} bytes per token (DeepSeek-V3.2's FP8 row: 512 "
                         f"e4m3, 4 float32 scales, 64 bf16), got shape {tuple(k_cache.shape)}")
    name = interop.dtype_name(k_cache)
    if name not in ("uint8", "float8_e4m3fn"):
        raise TypeError(f"k_cache.dtype must be uint8 or float8_e4m3fn (a view of the cache's bytes), got {name}")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if name == "float8_e4m3fn":
        k_cache = _bytes_of(k_cache)
    return k_cache.reshape(num_slots, KV_CACHE_FP8_BYTES)


def _bytes_of(x):
    """A float8_e4m3fn array's bytes as uint8, same shape."""
    if interop.array_kind(x) == "torch":
        import torch

        return x.view(torch.uint8)
    return x.view(np.uint8)


def _max_logits(q, kv, indices, sm_scale: float, topk_length):
    """``max_t sm_scale · q[i, h] · kv[indices[i, t]]`` over the valid slots, ``-inf`` where none is:
    float32 ``[s_q, h]`` in the array library of ``q``."""
    if interop.array_kind(q) == "torch":
        return _max_logits_torch(q, kv, indices, sm_scale, topk_length)
    from .reference._common import as_float64
    from .reference.sparse_mla import valid_slots

    q_host = as_float64(interop.to_numpy(q))  # [s_q, h, d_qk]
    kv_host = as_float64(interop.to_numpy(kv))  # [s_kv, d_qk]
    indices_host = interop.to_numpy(indices)  # [s_q, topk]
    lengths = None if topk_length is None else interop.to_numpy(topk_length)
    valid = valid_slots(indices_host, kv_host.shape[0], lengths)  # [s_q, topk]
    safe = np.where(valid, indices_host, 0)  # [s_q, topk]   invalid slots read row 0, then count -inf
    s_q, h, d_qk = q_host.shape
    result = np.full((s_q, h), -np.inf)  # [s_q, h]
    rows_per_chunk = max(1, _MAX_LOGITS_CHUNK_BYTES // max(1, 8 * indices_host.shape[1] * (d_qk + h)))
    if kv_host.shape[0] > 0 and indices_host.shape[1] > 0:
        for begin in range(0, s_q, rows_per_chunk):
            rows = slice(begin, begin + rows_per_chunk)
            selected = kv_host[safe[rows]]  # [c, topk, d_qk]
            logits = sm_scale * np.matmul(q_host[rows], selected.transpose(0, 2, 1))  # [c, h, topk]
            result[rows] = np.where(valid[rows][:, None, :], logits, -np.inf).max(axis=-1)  # [c, h]
    return interop.from_numpy_like(result.astype(np.float32), q)


def _max_logits_torch(q, kv, indices, sm_scale: float, topk_length):
    import torch

    s_q, h, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[1]
    result = torch.full((s_q, h), -math.inf, dtype=torch.float32, device=q.device)  # [s_q, h]
    if s_kv == 0 or topk == 0:
        return result
    indices = indices.to(q.device)
    valid = (indices >= 0) & (indices < s_kv)  # [s_q, topk]
    if topk_length is not None:
        slot = torch.arange(topk, device=q.device)[None, :]  # [1, topk]
        valid &= slot < topk_length.to(q.device)[:, None]  # [s_q, topk]
    safe = torch.where(valid, indices, torch.zeros_like(indices)).long()  # [s_q, topk]   invalid read row 0
    kv32 = kv.to(q.device, torch.float32)  # [s_kv, d_qk]
    rows_per_chunk = max(1, _MAX_LOGITS_CHUNK_BYTES // max(1, 4 * topk * (d_qk + h)))
    for begin in range(0, s_q, rows_per_chunk):
        rows = slice(begin, begin + rows_per_chunk)
        selected = kv32[safe[rows]]  # [c, topk, d_qk]
        logits = sm_scale * torch.matmul(q[rows].to(torch.float32), selected.transpose(1, 2))  # [c, h, topk]
        logits = logits.masked_fill(~valid[rows][:, None, :], -math.inf)  # [c, h, topk]
        result[rows] = logits.amax(dim=-1)  # [c, h]
    return result
