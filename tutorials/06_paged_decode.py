# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 6: paged decode
#
# A serving engine does not give each sequence one contiguous cache: it hands out fixed-size
# **blocks** (pages) of token slots from a shared pool, on demand, in whatever order they come
# free. A per-sequence **block table** maps logical block $b$ of a sequence to a physical block.
# Token $t$ of sequence $r$ lives in slot
#
# $$
# \mathrm{slot}(r, t) = \mathrm{block\_table}[r,\ \lfloor t / B \rfloor] \cdot B + (t \bmod B)
# $$
#
# of the flattened pool `[num_blocks * B, 656]`. FlashMLA's sparse decode takes its top-k indices
# already in slot coordinates (the block table folded in), so paged decode is plain
# `sparse_mla` on the flattened pool. We build the pool, the indices and one decode step, and
# check that it computes exactly what a contiguous cache would.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 6 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

import dsa_ref

rng = np.random.default_rng(6)
block_size, num_blocks = 16, 24
lengths = np.array([70, 150])  # tokens already cached per sequence
h, topk = 8, 32

# %% [markdown]
# ## Step 1: a pool and a block table
#
# Blocks are handed out in a shuffled order, so logical and physical order differ, as they do in
# a real engine. Unallocated entries of the table are −1.

# %%
free_blocks = list(rng.permutation(num_blocks))
max_blocks = -(-lengths.max() // block_size)
block_table = np.full((len(lengths), max_blocks), -1, np.int32)
for r, length in enumerate(lengths):
    for logical in range(-(-length // block_size)):
        block_table[r, logical] = free_blocks.pop()
print(block_table)

# The sequences' latent rows, written into the pool (packed FP8, 656 bytes per slot).
sequences = [rng.standard_normal((length, 576)).astype(np.float32) for length in lengths]
pool = np.zeros((num_blocks * block_size, dsa_ref.KV_CACHE_FP8_BYTES), np.uint8)
for r, rows in enumerate(sequences):
    t = np.arange(len(rows))
    slots = block_table[r, t // block_size] * block_size + t % block_size
    pool[slots] = dsa_ref.pack_kv_cache_fp8(rows)

# %%
owner = np.full(num_blocks, -1)
logical_of = np.full(num_blocks, -1)
for r in range(len(lengths)):
    for logical, physical in enumerate(block_table[r]):
        if physical >= 0:
            owner[physical], logical_of[physical] = r, logical
figure, axis = plt.subplots(figsize=(10, 1.8))
colors = np.where(owner < 0, 0.0, 0.35 + 0.4 * owner)
axis.bar(np.arange(num_blocks), np.ones(num_blocks), color=plt.cm.viridis(colors), edgecolor="white")
for physical in range(num_blocks):
    label = "free" if owner[physical] < 0 else f"s{owner[physical]}:{logical_of[physical]}"
    axis.text(physical, 0.5, label, ha="center", va="center", fontsize=7, color="white", rotation=90)
axis.set_yticks([])
axis.set_xlabel("physical block of the pool (label: sequence:logical block)")
axis.set_title(f"A paged cache: {num_blocks} blocks of {block_size} slots, two sequences")
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 2: token indices → slot indices
#
# The indexer and top-k work in each sequence's own token positions (0 … length−1). Before the
# attention, every selected position is mapped to its slot; −1 (padding) stays −1, and so does a
# position whose block is not allocated.

# %%
token_indices = np.full((len(lengths), 1, topk), -1, np.int32)  # [b, s_q = 1, topk]
for r, length in enumerate(lengths):
    chosen = rng.choice(length, min(topk, length), replace=False)
    token_indices[r, 0, :len(chosen)] = chosen
token_indices[0, 0, -3:] = -1  # padding, as top-k produces for short rows


def slots_by_hand(tokens, table, block):
    logical = tokens // block
    inside = (tokens >= 0) & (logical < table.shape[1])
    physical = np.take_along_axis(table, np.where(inside, logical, 0).reshape(len(table), -1), 1).reshape(tokens.shape)
    return np.where(inside & (physical >= 0), physical * block + tokens % block, -1).astype(np.int32)


slots = dsa_ref.slot_indices(token_indices, block_table, block_size)
assert np.array_equal(slots, slots_by_hand(token_indices, block_table, block_size))
assert np.array_equal(slots < 0, token_indices < 0)
print("token positions:", token_indices[0, 0, :6], "-> slots:", slots[0, 0, :6])

# %% [markdown]
# ## Step 3: one decode step over the pool
#
# Queries of the two sequences are packed along the token axis, as everywhere in dsa-ref; each
# carries its slot indices. The result must equal attention over each sequence's *contiguous*
# rows with its *token* indices: the pages are invisible to the math.

# %%
q = rng.standard_normal((len(lengths), h, 576)).astype(np.float32)  # one new query per sequence
out, lse = dsa_ref.sparse_mla(q, pool, slots[:, 0, :])  # [b, h, 512]

for r, rows in enumerate(sequences):
    contiguous = dsa_ref.pack_kv_cache_fp8(rows)  # the same fp8 bytes, laid out in token order
    expected_out, expected_lse = dsa_ref.sparse_mla(q[r:r + 1], contiguous, token_indices[r, :, :])
    assert np.array_equal(out[r:r + 1], expected_out) and np.array_equal(lse[r:r + 1], expected_lse)
print("paged decode == contiguous decode, bit for bit")

# %% [markdown]
# ## Step 4: several new tokens per step (MTP)
#
# With multi-token prediction a decode step carries $n > 1$ new queries per sequence, and each
# must see only itself and the past: the $i$-th new token of a sequence of length $L$ sees
# $L - n + i + 1$ keys. `causal_key_ranges(n, L)` gives exactly these ranges; a mask that lets
# all $n$ queries see all $L$ keys is a real bug peers have had.

# %%
n, length = 2, lengths[1]
key_start, key_end = dsa_ref.causal_key_ranges(n, length)
print("2 new queries of a 150-token sequence see keys", list(zip(key_start.tolist(), key_end.tolist())))
assert key_end.tolist() == [length - 1, length]

q_index = rng.standard_normal((n, 4, 64)).astype(np.float32)
k_index = rng.standard_normal((length, 64)).astype(np.float32)
weights = rng.random((n, 4)).astype(np.float32)
scores = dsa_ref.lightning_indexer(q_index, weights, k_index, key_start=key_start, key_end=key_end)
chosen = dsa_ref.topk_indices(scores, topk)  # token positions
assert not np.any(chosen[0] == length - 1)  # the first new token never selects the second
mtp_slots = dsa_ref.slot_indices(chosen[None], block_table[1:2], block_size)[0]  # [n, topk]
out_mtp, _ = dsa_ref.sparse_mla(rng.standard_normal((n, h, 576)).astype(np.float32), pool, mtp_slots)
print("MTP step:", out_mtp.shape)

# %% [markdown]
# The `dsa_ref.layer` cache (`DSACache`) does this bookkeeping for a whole layer, with the
# indexer's key cache paged the same way. Next: [training the indexer](07_training_the_indexer.py).
