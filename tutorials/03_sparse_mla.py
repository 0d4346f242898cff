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
# # Tutorial 3: sparse MLA and online softmax
#
# With the selected keys $S_t$ in hand, DSA runs the model's own attention over just those
# (DeepSeek-V3.2-Exp, eq. 2):
#
# $$
# u_t = \mathrm{Attn}\!\left(h_t,\ \{c_s \mid I_{t,s} \in \operatorname{Top\text{-}k}(I_{t,:})\}\right)
# $$
#
# In MLA's MQA mode ([tutorial 4](04_mla_absorption.py)) every head reads the **same** latent row
# $c_s$ per token, 576 wide (512 latent + 64 RoPE dims), and the value is its first 512 dims.
# For a query $i$, head $h$ and its index slots $\mathrm{idx}_{i,1..k}$:
#
# $$
# \ell_{i,h,t} = \sigma\, q_{i,h} \cdot c_{\mathrm{idx}_{i,t}},\qquad
# \mathrm{lse}_{i,h} = \log \sum_{t\ \text{valid}} e^{\ell_{i,h,t}},\qquad
# o_{i,h} = \sum_{t\ \text{valid}} e^{\ell_{i,h,t} - \mathrm{lse}_{i,h}}\; c_{\mathrm{idx}_{i,t},\,:512}
# $$

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 3 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

import dsa_ref
from dsa_ref.testing import assert_close, tolerance_for

rng = np.random.default_rng(2)
s_q, s_kv, h, d_qk, d_v, topk = 6, 200, 8, 576, 512, 64
q = rng.standard_normal((s_q, h, d_qk)).astype(np.float32)  # absorbed queries, one per head
kv = rng.standard_normal((s_kv, d_qk)).astype(np.float32)  # one latent row per token, all heads
indices = np.stack([rng.choice(s_kv, topk, replace=False) for _ in range(s_q)]).astype(np.int32)  # [s_q, topk]
sm_scale = d_qk ** -0.5

# %% [markdown]
# ## Step 1: gather, then ordinary attention
#
# Sparse attention is dense attention over gathered rows: `kv[indices]` is `[s_q, topk, 576]`,
# shared by the heads.

# %%
def sparse_mla_by_hand(q, kv, indices, sm_scale, d_v):
    q, kv = q.astype(np.float64), kv.astype(np.float64)
    valid = (indices >= 0) & (indices < kv.shape[0])  # [s_q, topk]   anything else is ignored
    rows = kv[np.where(valid, indices, 0)]  # [s_q, topk, d_qk]   invalid slots read row 0 ...
    logits = sm_scale * np.einsum("ihd,itd->iht", q, rows)  # [s_q, h, topk]
    logits = np.where(valid[:, None, :], logits, -np.inf)  # ... and are masked before any use
    row_max = np.max(logits, axis=-1, keepdims=True)  # [s_q, h, 1]
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # a row with no valid slot
    p = np.exp(logits - row_max)  # [s_q, h, topk]
    total = p.sum(-1)  # [s_q, h]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total[..., None] > 0, np.einsum("iht,itd->ihd", p, rows[..., :d_v]) / total[..., None], 0.0)
        lse = np.log(total) + row_max[..., 0]  # [s_q, h]   log(0) = -inf for an empty row
    return out, lse


out, lse = sparse_mla_by_hand(q, kv, indices, sm_scale, d_v)
lib_out, lib_lse = dsa_ref.sparse_mla(q, kv, indices)
print(assert_close(lib_out, out, tolerance_for("float32"), name="out"))
print(assert_close(lib_lse, lse, tolerance_for("float32"), name="lse", scale_by_max=False))

# %% [markdown]
# ## Step 2: the index conventions
#
# FlashMLA's rules, which dsa-ref's spec adopts: an index `< 0` or `>= s_kv` is **invalid**: it is
# ignored and never read (a kernel must not even load it: $2^{31}-1$ would fault). A valid index
# that appears twice counts twice. A row with no valid index gives `out = 0` and
# `lse = -inf` (the log of an empty sum).

# %%
adversarial = indices.copy()
adversarial[0, :4] = [-1, s_kv, np.iinfo(np.int32).min, np.iinfo(np.int32).max]
adversarial[1, 1] = adversarial[1, 0]  # a duplicate
adversarial[2, :] = -1  # nothing valid
out2, lse2 = sparse_mla_by_hand(q, kv, adversarial, sm_scale, d_v)
lib_out2, lib_lse2 = dsa_ref.sparse_mla(q, kv, adversarial)
assert_close(lib_out2, out2, tolerance_for("float32"), name="out")
assert_close(lib_lse2, lse2, tolerance_for("float32"), name="lse", scale_by_max=False)
assert np.all(lib_out2[2] == 0) and np.all(np.isneginf(lib_lse2[2]))
# Dropping the four invalid slots of row 0 changes nothing:
same, _ = dsa_ref.sparse_mla(q[:1], kv, adversarial[:1, 4:])
np.testing.assert_allclose(lib_out2[:1], same, rtol=1e-5, atol=1e-6)
print("invalid indices ignored, duplicates counted twice, empty row -> out 0, lse -inf")

# %% [markdown]
# ## Step 3: online softmax, the way a kernel does it
#
# A kernel cannot hold all $k$ logits of all heads at once. It walks the slots in blocks of
# `BLOCK_T`, keeping per head a running max $m$, a running denominator $\ell$ and an
# unnormalized accumulator $a$. A new block with logits $x$ updates them as
#
# $$
# m' = \max(m, \max x),\quad \ell' = \ell\, e^{m - m'} + \textstyle\sum e^{x - m'},\quad
# a' = a\, e^{m - m'} + \textstyle\sum e^{x - m'} v
# $$
#
# and at the end $o = a / \ell$, $\mathrm{lse} = m + \log \ell$. The factor $e^{m - m'}$ rescales
# what was accumulated under the old max.

# %%
def online_sparse_mla(q, kv, indices, sm_scale, d_v, block_t=16, trace_head=None):
    s_q, h, _ = q.shape
    out, lse = np.zeros((s_q, h, d_v)), np.full((s_q, h), -np.inf)
    trace = []
    for i in range(s_q):
        m = np.full(h, -np.inf)  # [h]   running max
        denom = np.zeros(h)  # [h]   running sum of exp(logit - m)
        acc = np.zeros((h, d_v))  # [h, d_v]
        for start in range(0, indices.shape[1], block_t):
            block = indices[i, start:start + block_t]  # [BLOCK_T]
            valid = (block >= 0) & (block < kv.shape[0])
            rows = kv[np.where(valid, block, 0)].astype(np.float64)  # [BLOCK_T, d_qk]
            x = np.where(valid[None, :], sm_scale * q[i].astype(np.float64) @ rows.T, -np.inf)  # [h, BLOCK_T]
            m_new = np.maximum(m, x.max(axis=1))
            shift = np.where(np.isneginf(m_new), 0.0, m_new)  # no valid slot yet: keep exp() at 0, not NaN
            rescale = np.exp(m - shift)
            p = np.exp(x - shift[:, None])  # [h, BLOCK_T]
            denom = denom * rescale + p.sum(axis=1)
            acc = acc * rescale[:, None] + p @ rows[:, :d_v]
            if trace_head is not None and i == 0:
                trace.append((m_new[trace_head], rescale[trace_head]))
            m = m_new
        with np.errstate(divide="ignore"):
            out[i] = np.where(denom[:, None] > 0, acc / np.where(denom > 0, denom, 1)[:, None], 0.0)
            lse[i] = np.where(denom > 0, m + np.log(np.where(denom > 0, denom, 1)), -np.inf)
    return out, lse, trace


online_out, online_lse, trace = online_sparse_mla(q, kv, indices, sm_scale, d_v, trace_head=0)
np.testing.assert_allclose(online_out, out, rtol=1e-10, atol=1e-12)
np.testing.assert_allclose(online_lse, lse, rtol=1e-12)
online_out2, online_lse2, _ = online_sparse_mla(q, kv, adversarial, sm_scale, d_v)
np.testing.assert_allclose(online_out2, out2, rtol=1e-10, atol=1e-12)
assert np.array_equal(np.isneginf(online_lse2), np.isneginf(lse2))
print("online softmax == two-pass softmax (float64, 1e-10)")

# %%
maxima, rescales = np.array(trace).T
figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].step(np.arange(len(maxima)), maxima, where="post")
axes[0].set_title("running max m after each block (query 0, head 0)")
axes[0].set_xlabel("block of 16 slots")
axes[1].bar(np.arange(len(rescales)), rescales)
axes[1].set_title("rescale factor exp(m - m') applied to the accumulator")
axes[1].set_xlabel("block of 16 slots")
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 4: merging partial results with the lse
#
# Decode has few queries and many keys, so kernels split a row's slots across several programs
# (flash-decoding) and merge the partial `(out, lse)` pairs at the end:
# $\mathrm{lse} = \log \sum_j e^{\mathrm{lse}_j}$ and $o = \sum_j e^{\mathrm{lse}_j - \mathrm{lse}}\, o_j$.
# This is why dsa-ref returns lse, and why an empty part has $\mathrm{lse} = -\infty$: it gets
# weight $e^{-\infty} = 0$.

# %%
first = dsa_ref.sparse_mla(q, kv, indices[:, :40])
second = dsa_ref.sparse_mla(q, kv, indices[:, 40:])
empty = dsa_ref.sparse_mla(q, kv, np.full((s_q, 8), -1, np.int32))
parts = [first, second, empty]
lses = np.stack([part_lse for _, part_lse in parts]).astype(np.float64)  # [3, s_q, h]
merged_lse = np.logaddexp.reduce(lses, axis=0)  # [s_q, h]
weights = np.exp(lses - merged_lse)  # [3, s_q, h]
merged_out = sum(wt[..., None] * part_out for wt, (part_out, _) in zip(weights, parts))
print(assert_close(merged_out, out, tolerance_for("float32"), name="merged out"))
print(assert_close(merged_lse, lse, tolerance_for("float32"), name="merged lse", scale_by_max=False))

# %% [markdown]
# ## Step 5: sparse equals dense when nothing is dropped
#
# If a query's indices are exactly its visible keys, sparse MLA *is* dense causal attention.
# The errors of float32 inputs against the float64 reference stay far inside the policy.

# %%
s = 40
q_small = rng.standard_normal((s, h, d_qk)).astype(np.float32)
kv_small = rng.standard_normal((s, d_qk)).astype(np.float32)
all_visible = np.where(np.arange(s)[None, :] <= np.arange(s)[:, None], np.arange(s)[None, :], -1).astype(np.int32)
sparse_out, _ = dsa_ref.sparse_mla(q_small, kv_small, all_visible)
logits = sm_scale * np.einsum("ihd,jd->ihj", q_small.astype(np.float64), kv_small.astype(np.float64))
logits = np.where(np.tril(np.ones((s, s), bool))[:, None, :], logits, -np.inf)
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
dense_out = np.einsum("ihj,jd->ihd", probs, kv_small[:, :d_v].astype(np.float64))
errors = np.abs(sparse_out - dense_out).ravel()
print(assert_close(sparse_out, dense_out, tolerance_for("float32"), name="sparse vs dense"))

plt.figure(figsize=(6, 3))
plt.hist(np.log10(errors + 1e-12), bins=60)
plt.xlabel("log10 |sparse (float32 out) - dense (float64)|")
plt.ylabel("elements")
plt.title("sparse MLA over all visible keys = dense causal attention")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What you built
#
# Gather, masked softmax, and the online form kernels use, with FlashMLA's index rules and a
# natural-log lse that merges partial results. Next: where the 576-wide queries come from,
# [MLA's two modes](04_mla_absorption.py).
