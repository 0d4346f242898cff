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
# # Tutorial 2: top-k selection, ties and −1 padding
#
# The indexer scored every past token; DSA now keeps, for each query $t$, the set
#
# $$
# S_t = \operatorname{Top\text{-}k}_s \, I_{t,s}
# $$
#
# of the $k$ best keys ($k = 2048$ in V3.2), and the main attention reads only those. Three
# details decide whether two implementations agree: which scores can be selected at all, what
# happens when fewer than $k$ can, and what to do with **ties**, which the ReLU of the indexer
# makes common (exact zeros, [tutorial 1](01_lightning_indexer.py)).

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 2 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

import dsa_ref
from dsa_ref.reference import topk_indices as reference_topk
from dsa_ref.testing import check_topk

rng = np.random.default_rng(1)

# %% [markdown]
# ## Step 1: the rule, on one row you can read
#
# dsa-ref's definition (the spec, `dsa_ref.reference.topk_indices`):
#
# * a key is **selectable** when its score is neither $-\infty$ (masked) nor NaN;
# * the selected keys come in descending score order, **ties broken by the lower key index**;
# * slots beyond the number of selectable keys hold **−1** (so $k$ may exceed the row length).

# %%
row = np.array([[3.0, 0.0, 0.0, 0.0, 5.0, -np.inf, 0.0, np.nan]], np.float32)


def topk_by_hand(scores, topk):
    """Sort each row by (-score, index), keep the first topk selectable keys, pad with -1."""
    out = np.full((scores.shape[0], topk), -1, np.int32)  # [s_q, topk]
    for i, values in enumerate(scores.astype(np.float64)):
        selectable = np.flatnonzero(values > -np.inf)  # drops -inf and NaN (NaN > x is False)
        order = selectable[np.lexsort((selectable, -values[selectable]))]  # score desc, then index asc
        kept = order[:topk]
        out[i, :kept.size] = kept
    return out


print("k=3:", topk_by_hand(row, 3)[0], "  k=8:", topk_by_hand(row, 8)[0])
assert topk_by_hand(row, 3).tolist() == [[4, 0, 1]]  # 5, then 3, then the first of the tied zeros
assert topk_by_hand(row, 8).tolist() == [[4, 0, 1, 2, 3, 6, -1, -1]]  # 6 selectable keys, 2 slots padded
assert np.array_equal(dsa_ref.topk_indices(row, 3), topk_by_hand(row, 3))
assert np.array_equal(dsa_ref.topk_indices(row, 8), topk_by_hand(row, 8))

# %% [markdown]
# ## Step 2: a real causal problem
#
# Indexer scores of one causal sequence of 96 tokens, $k = 16$. The first 16 queries see fewer
# than 16 keys: their rows end in −1 padding. The main attention must ignore those slots and
# never read the row they point to (index −1 is *not* "the last row").

# %%
s, h_i, d_i, k = 96, 4, 32, 16
q = rng.standard_normal((s, h_i, d_i)).astype(np.float32)
keys = rng.standard_normal((s, d_i)).astype(np.float32)
w = rng.random((s, h_i)).astype(np.float32)
key_start, key_end = dsa_ref.causal_key_ranges(s, s)
scores = dsa_ref.lightning_indexer(q, w, keys, key_start=key_start, key_end=key_end)

ours = topk_by_hand(scores, k)
assert np.array_equal(ours, reference_topk(scores, k))  # identical, slot by slot
assert np.array_equal(dsa_ref.topk_indices(scores, k), ours)
padding = (ours < 0).sum(axis=1)  # [s]
assert padding.tolist()[:k] == list(range(k - 1, -1, -1)) and not padding[k:].any()
print("padding of the first rows:", padding[:18].tolist())

# %% [markdown]
# ## Step 3: what selection looks like
#
# Left: which keys each query keeps (a dot per selected key). Right: how many keys tie with the
# $k$-th best score of each row. Where that count is above 1, the row's selected *set* depends
# on the tie-break rule.

# %%
mask = np.zeros((s, s), bool)
rows = np.repeat(np.arange(s), k)
mask[rows[ours.ravel() >= 0], ours.ravel()[ours.ravel() >= 0]] = True

kth = np.array([scores[i, ours[i, min(k, i + 1) - 1]] for i in range(s)])  # k-th best score per row
ties_at_kth = np.array([(scores[i] == kth[i]).sum() for i in range(s)])

figure, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].imshow(mask, cmap="Greys", interpolation="nearest")
axes[0].plot(np.arange(s), np.arange(s), color="tab:red", linewidth=0.8, label="diagonal (causal limit)")
axes[0].set_title(f"selected keys, k = {k}")
axes[0].set_xlabel("key s")
axes[0].set_ylabel("query t")
axes[0].legend(loc="lower left", fontsize=8)
axes[1].bar(np.arange(s), ties_at_kth)
axes[1].set_title("keys sharing the k-th best score")
axes[1].set_xlabel("query t")
axes[1].set_ylabel("count")
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 4: ties, and how to compare two implementations
#
# A GPU radix select (TileLang's, or the `triton` backend's) returns the same *set* in any
# order, and may break ties differently if its rule differs. So comparing index arrays slot by
# slot is wrong twice over. The conformance kit's `check_topk` compares sets with a tie-aware
# rule: with `kth` the $k$-th best score, nothing above `kth` may be missing and nothing below
# it may be selected; which of the keys *at* `kth` are kept is free.
#
# Here is a row where four keys tie at zero and only two fit:

# %%
tied = np.array([[2.0, 0.0, 0.0, 1.0, 0.0, 0.0]], np.float32)
lower_index_first = np.array([[0, 3, 1, 2]])  # the reference's choice
higher_index_first = np.array([[3, 0, 5, 4]])  # another valid choice, another order
check_topk(lower_index_first, tied, 4)
check_topk(higher_index_first, tied, 4)
print("both tie-breaks pass check_topk")

try:
    check_topk(np.array([[0, 1, 2, 4]]), tied, 4)  # drops key 3 (score 1.0) for a zero
except AssertionError as failure:
    print("rejected:", str(failure).split(";")[0])
else:
    raise AssertionError("check_topk accepted a set missing a better key")

# %% [markdown]
# ## Step 5: the awkward values
#
# `+inf` (an overflowed score) is selectable and ranks first; NaN and $-\infty$ never are; a row
# with nothing selectable is all −1.

# %%
awkward = np.array([[np.nan, 1.0, np.inf, -np.inf],
                    [-np.inf, -np.inf, np.nan, -np.inf]], np.float32)
result = dsa_ref.topk_indices(awkward, 3)
print(result)
assert result.tolist() == [[2, 1, -1], [-1, -1, -1]]
assert np.array_equal(result, topk_by_hand(awkward, 3))

# %% [markdown]
# ## What you built
#
# A top-k that is fully defined: selectable = not $-\infty$ and not NaN, descending, ties to the
# lower index, −1 padding. (The official inference code takes `topk(min(k, end_pos))` with no
# padding; dsa-ref pads so that every row has exactly $k$ slots, the layout FlashMLA's kernels
# take.) Next: the attention over the selected keys, [sparse MLA](03_sparse_mla.py).
