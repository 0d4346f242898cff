"""The lightning indexer over a paged FP8 key cache: one decode step of a batch (DeepGEMM's paged layout).

In decode, the indexer keys of every sequence live in a paged cache: fixed-size blocks of
``block_size`` tokens, handed out by a block table. This module defines that cache's byte layout
(DeepGEMM's fused one, read by its ``fp8_paged_mqa_logits``) and the indexer scores of a decode
step over it, as :func:`~dsa_ref.reference.lightning_indexer` on the gathered keys.

Layout of one block, ``block_size · (d_i + 4)`` bytes (little-endian)::

    bytes [0, block_size · d_i)                         key t's d_i e4m3 values at [t · d_i, (t + 1) · d_i)
    bytes [block_size · d_i, block_size · (d_i + 4))    key t's float32 scale at block_size · d_i + 4 · t

that is, all the block's values first, then all its scales; not ``d_i + 4`` bytes per key, even
where a ``[num_blocks, block_size, 1, d_i + 4]`` view of the cache (DeepGEMM's) suggests it.
With d_i = 128 and block_size = 64: 8192 value bytes, then 256 scale bytes, 8448 bytes a block.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ._common import result_dtype
from .formats import FP8_E4M3, quantize_fp8
from .indexer import lightning_indexer
from .ranges import causal_key_ranges, slot_indices

#: Bytes of one key's scale (float32) in the paged indexer cache.
INDEXER_SCALE_BYTES = 4


def pack_indexer_cache_fp8(keys, block_size: int = 64, scale_format: str = "ue8m0") -> np.ndarray:
    """Quantize indexer keys per key to e4m3 and pack them into the paged cache layout (module docs).

    Args:
        keys: float ``[num_blocks · block_size, d_i]`` (any library), in slot order: the key of slot
            ``s`` is the token at offset ``s % block_size`` of block ``s // block_size``.
        block_size: tokens per block (64 in DeepGEMM's tests and in V3.2 deployments).
        scale_format: the scale of each key, from the official quantizer
            (:func:`~dsa_ref.reference.quantize_fp8` with one block of ``d_i`` values per key):
            ``"ue8m0"`` (a power of two, DeepSeek-V3.2's ``scale_fmt``) or ``"fp32"``
            (``amax / 448``, DeepGEMM's tests).

    Returns:
        uint8 ``[num_blocks, block_size · (d_i + 4)]``.
    """
    block_size = _checks.positive_int("block_size", block_size)
    keys_host = _checks.host_array("keys", keys, "[num_blocks * block_size, d_i]")
    if keys_host.ndim != 2 or keys_host.shape[0] % block_size:
        raise ValueError(f"keys must have shape [num_blocks * block_size, d_i] with a first axis that is a "
                         f"multiple of block_size={block_size}, got shape {keys_host.shape}")
    num_slots, d_i = keys_host.shape
    if d_i == 0:
        raise ValueError(f"keys must have d_i >= 1 values per key, got shape {keys_host.shape}")
    values, scales = quantize_fp8(keys, block=d_i, scale_format=scale_format)  # [n, d_i] e4m3, [n, 1]
    num_blocks = num_slots // block_size
    value_bytes = values.view(np.uint8).reshape(num_blocks, block_size * d_i)  # [blocks, bs · d_i]
    scale_bytes = scales.astype("<f4").view(np.uint8).reshape(num_blocks, block_size * INDEXER_SCALE_BYTES)
    return np.concatenate([value_bytes, scale_bytes], axis=1)  # [blocks, bs · (d_i + 4)]


def unpack_indexer_cache_fp8(k_cache, d_i: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys and scales of every slot of a paged indexer cache (the inverse of the packing's layout).

    Args:
        k_cache: uint8 ``[num_blocks, block_size · (d_i + 4)]``.
        d_i: values per key.

    Returns:
        ``(keys, key_scales)``: e4m3 ``[num_blocks · block_size, d_i]`` and float32
        ``[num_blocks · block_size]``, slot ``s`` = block ``s // block_size``, offset ``s % block_size``.
    """
    k_cache = np.ascontiguousarray(k_cache)  # [blocks, bs · (d_i + 4)]
    num_blocks, block_bytes = k_cache.shape
    block_size = block_bytes // (d_i + INDEXER_SCALE_BYTES)
    keys = k_cache[:, :block_size * d_i].reshape(num_blocks * block_size, d_i).view(FP8_E4M3)  # [n, d_i]
    key_scales = k_cache[:, block_size * d_i:].copy().view("<f4").reshape(-1)  # [n]
    return keys, key_scales


def lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, *, next_n: int = 1,
                            max_context_len: int | None = None) -> np.ndarray:
    r"""Indexer scores of a decode step whose keys sit in a paged FP8 cache (eq. 1, DeepGEMM's paged layout).

    Sequence ``b`` has ``context_lens[b]`` tokens, the last ``next_n`` of which are this step's
    queries (``next_n > 1``: multi-token prediction): its query ``j`` sits at position
    ``context_lens[b] - next_n + j`` and sees the keys at positions ``[0, context_lens[b] - next_n + j]``.
    Token ``t`` of sequence ``b`` is slot ``t % block_size`` of block ``block_table[b, t // block_size]``.

    .. math::

        \mathrm{logits}_{b \cdot \mathrm{next\_n} + j,\ t} =
            \mathrm{lightning\_indexer}(q_{b,j},\ w_{b,j},\ k_{\mathrm{slot}(b, t)})
        \quad\text{for } t \le \mathrm{context\_lens}_b - \mathrm{next\_n} + j,
        \text{ else } -\infty

    Args:
        q: ``[b · next_n, h_i, d_i]`` indexer queries (fp8 e4m3 or float), sequence-major.
        weights: ``[b · next_n, h_i]`` per-head weights.
        k_cache: uint8 ``[num_blocks, block_size · (d_i + 4)]``, the layout of the module docs
            (:func:`pack_indexer_cache_fp8`); ``block_size`` follows from the width and ``d_i``.
        block_table: int ``[b, max_blocks]``. An entry that is not a block of the cache (``< 0``, as
            the ``-1`` padding past a context, or ``>= num_blocks``) holds no key: its positions score
            ``-inf`` and are never read.
        context_lens: int ``[b]``, each in ``[next_n, max_blocks · block_size]``.
        next_n: queries per sequence in this step.
        max_context_len: columns of the result (DeepGEMM's ``max_model_len``), ``>= max(context_lens)``;
            default ``max_blocks · block_size``.

    Returns:
        float32 ``[b · next_n, max_context_len]`` (float64 for float64 ``q``), ``-inf`` past each
        query's causal bound.
    """
    dtype = result_dtype(q)
    q = np.asarray(q)  # [b · next_n, h_i, d_i]
    weights = np.asarray(weights)  # [b · next_n, h_i]
    block_table = np.asarray(block_table)  # [b, max_blocks]
    context_lens = np.asarray(context_lens)  # [b]
    d_i = q.shape[-1]
    keys, key_scales = unpack_indexer_cache_fp8(k_cache, d_i)  # [n, d_i], [n]
    block_size = np.shape(k_cache)[1] // (d_i + INDEXER_SCALE_BYTES)
    if max_context_len is None:
        max_context_len = block_table.shape[1] * block_size

    logits = np.full((q.shape[0], max_context_len), -np.inf, dtype)  # [b · next_n, max_context_len]
    for sequence, length in enumerate(context_lens.tolist()):
        rows = slice(sequence * next_n, (sequence + 1) * next_n)
        slots = slot_indices(np.arange(length)[None, :], block_table[sequence:sequence + 1], block_size)[0]  # [len]
        present = (slots >= 0) & (slots < keys.shape[0])  # [len]   a block of the cache
        if not present.any():
            continue  # no key to score: the rows stay -inf (also when the cache has no block)
        safe_slots = np.where(present, slots, 0)  # [len]   absent keys read slot 0, then score -inf
        key_start, key_end = causal_key_ranges(next_n, length)  # [next_n] each: [0, len - next_n + j + 1)
        scores = lightning_indexer(q[rows], weights[rows], keys[safe_slots], key_start=key_start,
                                   key_end=key_end, k_scale=key_scales[safe_slots])  # [next_n, len]
        logits[rows, :length] = np.where(present[None, :], scores, -np.inf)
    return logits
