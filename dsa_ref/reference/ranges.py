"""Key ranges for the token-packed layout, and paged-cache slot indices.

Like FlashMLA and DeepGEMM, dsa-ref has no batch dimension in its core ops: the sequences of a
batch are concatenated along the token axis, and each query carries the half-open range of keys
it may see, ``[key_start, key_end)`` (DeepGEMM's ``ks`` / ``ke``).
"""

from __future__ import annotations

import numpy as np


def causal_key_ranges(s_q: int, s_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """Causal ranges for one sequence whose ``s_q`` queries are its last ``s_q`` positions.

    Query ``i`` sits at position ``s_kv - s_q + i`` and sees keys ``[0, s_kv - s_q + i + 1)``:
    with ``s_q == s_kv`` this is the usual lower-triangular mask; with ``s_q < s_kv`` it is a
    chunked prefill or a multi-token decode step (MTP), where several new queries share a step and
    each must still see only itself and the past.

    Returns:
        ``(key_start, key_end)``, int32 ``[s_q]`` each.
    """
    if s_q > s_kv:
        raise ValueError(f"s_q must be <= s_kv for causal ranges (queries are the last s_q keys), got s_q={s_q}, s_kv={s_kv}")
    key_end = np.arange(s_kv - s_q + 1, s_kv + 1, dtype=np.int32)  # [s_q]
    return np.zeros(s_q, np.int32), key_end


def varlen_key_ranges(cu_seqlens_q, cu_seqlens_k, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Key ranges for a packed batch of sequences (FlashAttention's ``cu_seqlens`` convention).

    Sequence ``b`` owns queries ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and keys
    ``[cu_seqlens_k[b], cu_seqlens_k[b+1])`` of the packed arrays. Its queries are its last
    positions, so with ``causal`` query ``j`` of the sequence (0-based) sees the sequence's first
    ``len_k - len_q + j + 1`` keys; without it, all of the sequence's keys.

    Returns:
        ``(key_start, key_end)``, int32 ``[total_q]``, in packed-key coordinates, ready for
        :func:`lightning_indexer`; top-k indices are then packed-key indices for :func:`sparse_mla`.
    """
    cu_q = np.asarray(cu_seqlens_q, np.int64)  # [b + 1]
    cu_k = np.asarray(cu_seqlens_k, np.int64)  # [b + 1]
    len_q, len_k = np.diff(cu_q), np.diff(cu_k)  # [b], [b]
    if causal and np.any(len_q > len_k):
        bad = int(np.argmax(len_q > len_k))
        raise ValueError(
            f"cu_seqlens_q/cu_seqlens_k: causal sequence {bad} has {int(len_q[bad])} queries but only "
            f"{int(len_k[bad])} keys (queries are the last positions of their sequence)")
    sequence = np.repeat(np.arange(len(len_q)), len_q)  # [total_q]   sequence of each query
    position = np.arange(cu_q[-1] - cu_q[0]) - (cu_q[sequence] - cu_q[0])  # [total_q]   j within its sequence
    key_start = cu_k[sequence]  # [total_q]
    if causal:
        key_end = key_start + len_k[sequence] - len_q[sequence] + position + 1  # [total_q]
    else:
        key_end = cu_k[sequence + 1]  # [total_q]
    return key_start.astype(np.int32), key_end.astype(np.int32)


def slot_indices(token_indices, block_table, block_size: int) -> np.ndarray:
    """Map per-sequence token indices to slots of a paged cache (FlashMLA decode's index form).

    A paged cache stores token ``t`` of sequence ``b`` in physical block ``block_table[b, t //
    block_size]`` at offset ``t % block_size``; its slot in the flattened cache
    ``[num_blocks * block_size, ...]`` is ``block * block_size + offset``. With the block table
    folded into the indices this way, paged decode is :func:`sparse_mla` on the flattened cache.

    Args:
        token_indices: int ``[b, ..., topk]`` token positions within each sequence; ``-1`` (or any
            negative value, or a position past the block table) marks an empty slot.
        block_table: int ``[b, max_blocks]`` physical block of each logical block; negative
            entries mark unallocated blocks.
        block_size: tokens per block.

    Returns:
        int32, the shape of ``token_indices``; invalid entries stay ``-1``.
    """
    tokens = np.asarray(token_indices)  # [b, ..., topk]
    table = np.asarray(block_table)  # [b, max_blocks]
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim < 2:
        raise TypeError(f"token_indices must be an integer array [b, ..., topk], got {tokens.dtype} {tokens.shape}")
    if not np.issubdtype(table.dtype, np.integer) or table.ndim != 2 or table.shape[0] != tokens.shape[0]:
        raise ValueError(f"block_table must be an integer array [b={tokens.shape[0]}, max_blocks], "
                         f"got {table.dtype} {table.shape}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    tokens, table = tokens.astype(np.int64), table.astype(np.int64)
    batch = tokens.shape[0]
    flat = tokens.reshape(batch, -1)  # [b, n]
    logical_block = flat // block_size  # [b, n]
    in_table = (flat >= 0) & (logical_block < table.shape[1])  # [b, n]
    physical = np.take_along_axis(table, np.where(in_table, logical_block, 0), axis=1)  # [b, n]
    valid = in_table & (physical >= 0)  # [b, n]
    slots = np.where(valid, physical * block_size + flat % block_size, -1)  # [b, n]
    return slots.reshape(tokens.shape).astype(np.int32)
