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
# # Tutorial 1: the lightning indexer from scratch
#
# DSA keeps dense attention's quality at sparse attention's cost by asking a *cheap* question
# first: for query token $t$, which of the past tokens $s$ matter? The answer is the lightning
# indexer's score (DeepSeek-V3.2-Exp, eq. 1):
#
# $$
# I_{t,s} = \sum_{j=1}^{H_I} w_{t,j}\,\mathrm{ReLU}\!\left(q_{t,j} \cdot k_s\right)
# $$
#
# $H_I$ small heads (64 in V3.2, each $d_I = 128$ wide) with their own queries $q_{t,j}$, **one**
# key $k_s$ per token shared by all heads, a per-query weight $w_{t,j}$ for each head, and a ReLU
# instead of a softmax. We build it in NumPy, one step at a time, and check each step against
# `dsa_ref.lightning_indexer`.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 1 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

import dsa_ref
from dsa_ref.testing import assert_close, tolerance_for

rng = np.random.default_rng(0)
s, h_i, d_i = 48, 4, 32  # tokens, indexer heads, indexer head width (small, to read the numbers)
q = rng.standard_normal((s, h_i, d_i))  # [s_q, h_i, d_i]   one query per head per token
k = rng.standard_normal((s, d_i))  # [s_kv, d_i]   one key per token, shared by the heads
w = rng.random((s, h_i))  # [s_q, h_i]   per-query head weights (positive here)
print("backend:", dsa_ref.active_backend_name())

# %% [markdown]
# ## Step 1: one dot product per (query, head, key)
#
# $\ell_{t,j,s} = q_{t,j} \cdot k_s$. Because the key is shared by the heads, this is one matrix
# product of all $s\,H_I$ query vectors with the $s$ keys: the indexer is as cheap as MQA.

# %%
logits = np.einsum("tjd,sd->tjs", q, k)  # [s_q, h_i, s_kv]
assert logits.shape == (s, h_i, s)
assert np.isclose(logits[5, 2, 7], q[5, 2] @ k[7])  # one entry, by hand

# %% [markdown]
# ## Step 2: ReLU, then the weighted sum over heads
#
# A head whose query points away from a key contributes nothing (ReLU), instead of pulling the
# score down. The heads are then mixed with the per-query weights $w_{t,j}$.

# %%
gated = np.maximum(logits, 0.0)  # [s_q, h_i, s_kv]
scores = np.einsum("tj,tjs->ts", w, gated)  # [s_q, s_kv]

library = dsa_ref.lightning_indexer(q.astype(np.float32), w.astype(np.float32), k.astype(np.float32))
print(assert_close(library, scores, tolerance_for("float32"), name="scores"))

# %% [markdown]
# `assert_close` is the conformance kit's comparison: it checks that special values (NaN, ±inf)
# sit in the same places, then reports the worst element as a ratio to the tolerance (≤ 1 passes).
#
# ## Step 3: each query sees only its range of keys
#
# dsa-ref has no batch axis and no mask tensor. Each query carries a half-open key range
# `[key_start, key_end)` (DeepGEMM's `ks`/`ke`); scores outside it are $-\infty$. For one causal
# sequence, query $t$ sees keys $[0, t+1)$.

# %%
key_start, key_end = dsa_ref.causal_key_ranges(s, s)  # [s], [s]
print(f"query 0 sees keys [{key_start[0]}, {key_end[0]}), query 47 sees keys [{key_start[47]}, {key_end[47]})")

visible = (np.arange(s)[None, :] >= key_start[:, None]) & (np.arange(s)[None, :] < key_end[:, None])  # [s_q, s_kv]
causal_scores = np.where(visible, scores, -np.inf)  # [s_q, s_kv]

library = dsa_ref.lightning_indexer(q.astype(np.float32), w.astype(np.float32), k.astype(np.float32),
                                    key_start=key_start, key_end=key_end)
assert np.array_equal(np.isneginf(library), ~visible)  # masked exactly where we masked
print(assert_close(library, causal_scores, tolerance_for("float32"), name="causal scores"))

# %% [markdown]
# ## Step 4: a packed batch
#
# Two sequences of 20 and 28 tokens are concatenated along the token axis (as FlashMLA and
# DeepGEMM do). `varlen_key_ranges` gives each query the keys of its own sequence, causally.
# The picture shows what the indexer computes: a causal triangle per sequence, $-\infty$
# (white) everywhere else.

# %%
cu_seqlens = np.array([0, 20, 48])
packed_start, packed_end = dsa_ref.varlen_key_ranges(cu_seqlens, cu_seqlens)
packed = dsa_ref.lightning_indexer(q.astype(np.float32), w.astype(np.float32), k.astype(np.float32),
                                   key_start=packed_start, key_end=packed_end)
assert np.isneginf(packed[25, :20]).all()  # a query of sequence 2 never sees sequence 1
assert np.isfinite(packed[25, 20:26]).all() and np.isneginf(packed[25, 26:]).all()

figure, axes = plt.subplots(1, 2, figsize=(10, 4))
for axis, data, title in ((axes[0], library, "one causal sequence"), (axes[1], packed, "packed batch: 20 + 28 tokens")):
    image = axis.imshow(np.where(np.isfinite(data), data, np.nan), cmap="viridis")
    axis.set_title(f"indexer scores, {title}")
    axis.set_xlabel("key s")
    axis.set_ylabel("query t")
    figure.colorbar(image, ax=axis, shrink=0.8)
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 5: ReLU makes exact zeros, and exact zeros make ties
#
# When every head's logit is negative, the score is exactly `0.0`. With random vectors that is
# the fate of a key whenever all $H_I$ heads point away from it; in a trained model it is common.
# Many keys then share the same score, and *which* of them top-k keeps must be defined:
# [tutorial 2](02_topk_selection.py) does that.

# %%
finite = causal_scores[np.isfinite(causal_scores)]
zero_share = np.mean(finite == 0.0)
print(f"{100 * zero_share:.1f}% of visible scores are exactly 0.0")
assert zero_share > 0
assert np.array_equal(library[np.isfinite(library)] == 0.0, finite == 0.0)  # the same zeros, not just near zero

# %% [markdown]
# ## Step 6: fp8 keys and their scales
#
# V3.2 stores indexer keys in fp8 e4m3 with one float32 scale per key. Because ReLU is
# positively homogeneous, $\mathrm{ReLU}(q \cdot (\sigma\,\hat k)) = \sigma\,\mathrm{ReLU}(q \cdot \hat k)$
# for $\sigma > 0$: the scale can be applied *after* the head sum, once per key, which is how
# DeepGEMM's kernel uses it (`k_scale` here).

# %%
k_fp8, k_scale = dsa_ref.quantize_fp8(k, block=d_i)  # [s_kv, d_i] e4m3, [s_kv, 1]
k_scale = k_scale[:, 0]  # [s_kv]
k_dequantized = k_fp8.astype(np.float64) * k_scale[:, None]  # [s_kv, d_i]

ours = np.einsum("tj,tjs->ts", w, np.maximum(np.einsum("tjd,sd->tjs", q, k_fp8.astype(np.float64)), 0.0))
ours = ours * k_scale[None, :]  # scale after the head sum
direct = np.einsum("tj,tjs->ts", w, np.maximum(np.einsum("tjd,sd->tjs", q, k_dequantized), 0.0))
np.testing.assert_allclose(ours, direct, rtol=1e-12)  # the algebra holds

library = dsa_ref.lightning_indexer(q.astype(np.float32), w.astype(np.float32), k_fp8, k_scale=k_scale)
print(assert_close(library, ours, tolerance_for("float32"), name="fp8-key scores"))
error = np.abs(ours - scores) / np.abs(scores).max()
print(f"fp8 keys move the scores by at most {error.max():.3%} of the largest score")

# %%
plt.figure(figsize=(6, 3))
plt.hist(error.ravel(), bins=60)
plt.xlabel("|score(fp8 keys) - score(exact keys)| / max |score|")
plt.ylabel("(query, key) pairs")
plt.title("What fp8 keys cost the indexer")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What you built
#
# `scores = k_scale · Σ_j w[:, j] · ReLU(q[:, j] · kᵀ)`, masked to each query's key range: the
# whole of `dsa_ref.reference.lightning_indexer`, which you can now read top to bottom. Its cost
# is $2\,H_I\,d_I$ FLOPs per (query, key) pair, about $1/17$ of MLA's in V3.2
# ([tutorial 9](09_cost_model.py)). Next: [top-k selection](02_topk_selection.py).
