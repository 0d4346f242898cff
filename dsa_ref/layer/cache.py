"""The layer's two caches, contiguous or paged: the latent KV cache and the indexer key cache.

Both are stored as flat pools of *slots* (one row per token) addressed through a block table,
the layout of paged serving engines: token ``t`` of sequence ``b`` lives in slot
``block_table[b, t // block_size] * block_size + t % block_size``. A contiguous cache is the
special case of one block of ``max_seq_len`` tokens per sequence, ``block_table[b] = [b]``,
so the same code reads both.

Latent rows are stored as float32, bfloat16, or the V3.2 FP8 row (uint8 ``[656]``,
:func:`dsa_ref.pack_kv_cache_fp8`). Indexer keys are stored as fp8 e4m3 with one float32 scale
per key when the config quantizes the indexer, else float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsa_ref.reference import (
    FP8_E4M3,
    KV_CACHE_FP8_BYTES,
    pack_kv_cache_fp8,
    slot_indices,
    unpack_kv_cache_fp8,
)

from .config import DSAConfig

KV_CACHE_DTYPES = ("float32", "bfloat16", "fp8")


class DSACache:
    """Latent KV cache and indexer key cache of one layer, for ``max_batch_size`` sequences.

    Args:
        config: the layer's config (sizes: ``max_batch_size`` x ``max_seq_len`` tokens).
        kv_cache_dtype: ``"float32"``, ``"bfloat16"`` or ``"fp8"`` (the 656-byte V3.2 row; needs
            ``kv_lora_rank == 512`` and ``qk_rope_head_dim == 64``).
        block_size: ``None`` for a contiguous cache; else tokens per block of a paged cache, whose
            blocks are handed out on demand in a shuffled order (``seed``) so that logical and
            physical order differ, as they do in a serving engine.
    """

    def __init__(self, config: DSAConfig, *, kv_cache_dtype: str = "float32", block_size: int | None = None,
                 seed: int = 0):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8" and (config.kv_lora_rank, config.qk_rope_head_dim) != (512, 64):
            raise ValueError("kv_cache_dtype='fp8' is the V3.2 656-byte row and needs kv_lora_rank=512 and "
                             f"qk_rope_head_dim=64, got {config.kv_lora_rank} and {config.qk_rope_head_dim}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be None (contiguous) or a positive int, got {block_size!r}")
        self.config = config
        self.kv_cache_dtype = kv_cache_dtype
        self.paged = block_size is not None
        self.block_size = block_size if self.paged else config.max_seq_len
        self.blocks_per_sequence = -(-config.max_seq_len // self.block_size)
        num_blocks = config.max_batch_size * self.blocks_per_sequence
        num_slots = num_blocks * self.block_size
        self._seed = seed

        if kv_cache_dtype == "fp8":
            self.kv = np.zeros((num_slots, KV_CACHE_FP8_BYTES), np.uint8)  # [slots, 656]
        else:
            dtype = np.float32 if kv_cache_dtype == "float32" else ml_dtypes.bfloat16
            self.kv = np.zeros((num_slots, config.latent_dim), dtype)  # [slots, c + rope]
        if config.indexer_fp8:
            self.index_keys = np.zeros((num_slots, config.index_head_dim), FP8_E4M3)  # [slots, d_I]
            self.index_key_scales = np.ones(num_slots, np.float32)  # [slots]
        else:
            self.index_keys = np.zeros((num_slots, config.index_head_dim), np.float32)  # [slots, d_I]
            self.index_key_scales = None
        self.reset()

    def reset(self) -> None:
        """Forget every sequence (the stored rows are left in place and overwritten later)."""
        batch = self.config.max_batch_size
        self.lengths = np.zeros(batch, np.int64)  # tokens written per sequence
        if self.paged:
            self.block_table = np.full((batch, self.blocks_per_sequence), -1, np.int32)  # [b, max_blocks]
            order = np.random.default_rng(self._seed).permutation(batch * self.blocks_per_sequence)
            self._free_blocks = [int(block) for block in order]
        else:
            self.block_table = np.arange(batch, dtype=np.int32)[:, None]  # [b, 1]

    # ------------------------------------------------------------------ addressing
    def reserve(self, sequence: int, end: int) -> None:
        """Make positions ``[0, end)`` of ``sequence`` addressable (allocates blocks when paged)."""
        if not self.paged:
            return
        for logical in range(-(-end // self.block_size)):
            if self.block_table[sequence, logical] < 0:
                self.block_table[sequence, logical] = self._free_blocks.pop()

    def slots(self, sequences, positions) -> np.ndarray:
        """Cache slots, int32 ``[n, ...]``, of ``positions [n, ...]`` of ``sequences [n]``; -1 stays -1."""
        table = self.block_table[np.asarray(sequences)]  # [n, max_blocks]
        return slot_indices(positions, table, self.block_size)  # [n, ...]

    # ------------------------------------------------------------------ writing
    def write(self, sequences, positions, latent, k_pe, index_keys, index_key_scales=None) -> None:
        """Store new tokens: latent ``[n, c]``, k_pe ``[n, rope]``, indexer keys ``[n, d_I]`` (+ scales ``[n]``)."""
        slots = self.slots(sequences, np.asarray(positions)[:, None])[:, 0]  # [n]
        row = np.concatenate([latent, k_pe], axis=-1)  # [n, c + rope]
        self.kv[slots] = pack_kv_cache_fp8(row) if self.kv_cache_dtype == "fp8" else row.astype(self.kv.dtype)
        self.index_keys[slots] = index_keys
        if self.index_key_scales is not None:
            self.index_key_scales[slots] = index_key_scales

    # ------------------------------------------------------------------ reading
    def _logical_slots(self, sequence: int, end: int) -> np.ndarray:
        return self.slots(np.array([sequence]), np.arange(end)[None, :])[0]  # [end]

    def read_kv(self, sequence: int, end: int) -> np.ndarray:
        """Latent rows of positions ``[0, end)``, dequantized, float64 ``[end, c + rope]``."""
        rows = self.kv[self._logical_slots(sequence, end)]  # [end, 576] or [end, 656]
        if self.kv_cache_dtype == "fp8":
            rows = unpack_kv_cache_fp8(rows)  # [end, 576]
        return rows.astype(np.float64)

    def read_index_keys(self, sequence: int, end: int):
        """Indexer keys of positions ``[0, end)`` in their stored dtype ``[end, d_I]``, and scales ``[end]`` or None.

        This gather is what a paged indexer kernel (DeepGEMM's paged ``fp8_mqa_logits``) does
        through the block table.
        """
        slots = self._logical_slots(sequence, end)  # [end]
        scales = None if self.index_key_scales is None else self.index_key_scales[slots]
        return self.index_keys[slots], scales
