"""Key ranges for the token-packed layout, and paged-cache slot indices.

Like FlashMLA and DeepGEMM, dsa-ref has no batch dimension in its core ops: the sequences of a
batch are concatenated along the token axis, and each query carries the half-open range of keys
it may see, ``[key_start, key_end)`` (DeepGEMM's ``ks`` / ``ke``).
"""

from __future__ import annotations

import numpy as np

from .. import _checks

#: Packed positions are returned as int32, the index type of the kernels.
INT32_MAX = 2**31 - 1


def causal_key_ranges(s_q: int, s_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """Causal ranges for one sequence whose ``s_q`` queries are its last ``s_q`` positions.

    Query ``i`` sits at position ``s_kv - s_q + i`` and sees keys ``[0, s_kv - s_q + i + 1)``:
    with ``s_q == s_kv`` this is the usual lower-triangular mask; with ``s_q < s_kv`` it is a
    chunked prefill or a multi-token decode step (MTP), where several new queries share a step and
    each must still see only itself and the past.

    Args:
        s_q: queries, an int ``>= 0``.
        s_kv: keys, an int ``>= s_q``.

    Returns:
        ``(key_start, key_end)``, int32 ``[s_q]`` each.
    """
    s_q = _checks.int_at_least("s_q", s_q, 0)
    s_kv = _checks.int_at_least("s_kv", s_kv, 0)
    if s_kv > INT32_MAX:
        raise ValueError(f"s_kv must be <= {INT32_MAX} (key positions are int32), got {s_kv}")
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

    Args:
        cu_seqlens_q, cu_seqlens_k: integer arrays (of any library) or lists of ints, ``[b + 1]``
            each (so ``b = 0`` is ``[0]``): non-decreasing offsets, starting anywhere ``>= 0``.
        causal: see above.

    Returns:
        ``(key_start, key_end)``, int32 ``[total_q]``, in packed-key coordinates, ready for
        :func:`lightning_indexer`; top-k indices are then packed-key indices for :func:`sparse_mla`.
    """
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q)  # [b + 1]
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k)  # [b + 1]
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length b + 1 (one offset per "
                         f"sequence boundary), got {cu_q.shape[0]} and {cu_k.shape[0]}")
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


def _cu_seqlens(name: str, cu_seqlens) -> np.ndarray:
    """Checked offsets, int64 ``[b + 1]``."""
    offsets = _checks.host_array(name, cu_seqlens, "[b + 1]")
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{name} must have shape [b + 1] (one axis, at least one offset), "
                         f"got shape {offsets.shape}")
    _checks.integer_array(name, offsets, "[b + 1]")
    offsets = offsets.astype(np.int64)
    if offsets[0] < 0:
        raise ValueError(f"{name} must start at an offset >= 0, got {name}[0]={int(offsets[0])}")
    steps = np.diff(offsets)  # [b]
    if np.any(steps < 0):
        bad = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got "
                         f"{name}[{bad}]={int(offsets[bad])} > {name}[{bad + 1}]={int(offsets[bad + 1])}")
    if offsets[-1] > INT32_MAX:
        raise ValueError(f"{name} must end at an offset <= {INT32_MAX} (packed positions are int32), "
                         f"got {int(offsets[-1])}")
    return offsets


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
    tokens = _checks.host_array("token_indices", token_indices, "[b, ..., topk]")  # [b, ..., topk]
    if tokens.ndim < 2:
        raise ValueError(f"token_indices must have shape [b, ..., topk] (at least 2 axes), got shape {tokens.shape}")
    _checks.integer_array("token_indices", tokens, "[b, ..., topk]")
    table = _checks.host_array("block_table", block_table, "[b, max_blocks]")  # [b, max_blocks]
    if table.ndim != 2 or table.shape[0] != tokens.shape[0]:
        raise ValueError(f"block_table must have shape [b, max_blocks] with b={tokens.shape[0]} "
                         f"(token_indices' b), got shape {table.shape}")
    _checks.integer_array("block_table", table, "[b, max_blocks]")
    block_size = _checks.positive_int("block_size", block_size)
    tokens, table = tokens.astype(np.int64), table.astype(np.int64)
    batch = tokens.shape[0]
    flat = tokens.reshape(batch, -1)  # [b, n]
    logical_block = flat // block_size  # [b, n]
    in_table = (flat >= 0) & (logical_block < table.shape[1])  # [b, n]
    physical = np.take_along_axis(table, np.where(in_table, logical_block, 0), axis=1)  # [b, n]
    valid = in_table & (physical >= 0)  # [b, n]
    slots = np.where(valid, physical * block_size + flat % block_size, -1)  # [b, n]
    return slots.reshape(tokens.shape).astype(np.int32)
