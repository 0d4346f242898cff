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
# # Tutorial 10: training DSA, the backward of sparse MLA and the indexer loss
#
# DeepSeek-V3.2 was not trained sparse from scratch: it was made from a dense model in two
# stages of continued pre-training (DeepSeek-V3.2-Exp, §2.1).
#
# 1. **Dense warm-up.** The main model is frozen and attention stays dense. Only the lightning
#    indexer learns, to imitate the main attention: for query $t$ the target $p_{t,:}$ is the main
#    attention summed over heads and L1-normalized, and the loss is eq. 3 below.
# 2. **Sparse training.** Top-k selection is switched on and the whole model trains. The main
#    attention reads only the selected keys $S_t$, and the indexer's loss is restricted to them
#    (eq. 4).
#
# $$
# \mathcal L^I = \sum_t D_{\mathrm{KL}}\!\left(p_{t,:} \,\Vert\, \mathrm{Softmax}(I_{t,:})\right) \ \text{(eq. 3)},
# \qquad
# \mathcal L^I = \sum_t D_{\mathrm{KL}}\!\left(p_{t,S_t} \,\Vert\, \mathrm{Softmax}(I_{t,S_t})\right) \ \text{(eq. 4)}
# $$
#
# In the sparse stage the indexer's input is **detached**: the indexer learns from $\mathcal L^I$
# alone, and the main model learns from the language-modelling loss alone, whose gradient flows
# through sparse MLA but never through the (integer) selection.
#
# So a DSA training step needs two backward passes that inference never runs: sparse MLA's
# (the language-modelling loss reaching $q$ and the latent rows $kv$) and the indexer loss's.
# This tutorial writes both out in NumPy, checks every step against the float64 reference
# (`dsa_ref.reference.sparse_mla_backward`, `indexer_loss_backward`), then runs them through
# torch autograd with `dsa_ref.torch` and trains a small indexer.
# [Tutorial 3](03_sparse_mla.py) built the forward, [tutorial 7](07_training_the_indexer.py)
# the warm-up on a whole layer.

# %%
try:
    import matplotlib.pyplot as plt
    import torch
except ModuleNotFoundError as missing:
    raise SystemExit(f"Tutorial 10 needs torch and matplotlib, and {missing.name} is not installed: "
                     "pip install 'dsa-ref[triton,plot]'") from None

import importlib.util
import json
from pathlib import Path

import numpy as np

import dsa_ref
import dsa_ref.torch as dsa_torch
from dsa_ref import reference
from dsa_ref.testing import assert_close
from dsa_ref.testing.tolerances import gradient_tolerance_for


def check(name, mine, spec):
    """``mine`` equals ``spec`` (the float64 reference, or an identity) up to float64 rounding."""
    mine, spec = np.asarray(mine, np.float64), np.asarray(spec, np.float64)
    worst = float(np.max(np.abs(mine - spec), initial=0.0))
    assert mine.shape == spec.shape and worst <= 1e-12 * max(1.0, float(np.max(np.abs(spec), initial=0.0))), \
        (name, mine.shape, spec.shape, worst)
    print(f"{name:<34} equal (max |diff| {worst:.1e})")


rng = np.random.default_rng(10)
s_q, s_kv, h, d_qk, d_v, topk = 6, 40, 4, 48, 32, 12  # small: the math does not care
q = rng.standard_normal((s_q, h, d_qk))  # [s_q, h, d_qk]   float64: compared with the reference exactly
kv = rng.standard_normal((s_kv, d_qk))  # [s_kv, d_qk]   one latent row per token; V = kv[:, :d_v]
indices = np.stack([rng.choice(s_kv, topk, replace=False) for _ in range(s_q)]).astype(np.int32)  # [s_q, topk]
indices[0, 1] = indices[0, 0]  # a duplicate: two softmax slots reading one row
indices[1, :4] = [-1, s_kv, np.iinfo(np.int32).min, np.iinfo(np.int32).max]  # invalid: ignored, never read
sm_scale = d_qk ** -0.5
out, lse = reference.sparse_mla(q, kv, indices, d_v=d_v)  # [s_q, h, d_v], [s_q, h]

# Some loss of the attention's results; its gradients with respect to out and lse are the backward's inputs.
d_out = rng.standard_normal((s_q, h, d_v))  # [s_q, h, d_v]   dL/dout
d_lse = rng.standard_normal((s_q, h))  # [s_q, h]   dL/dlse (a loss that uses lse, e.g. the indexer's target)
dq_spec, dkv_spec = reference.sparse_mla_backward(q, kv, indices, out, lse, d_out, d_v=d_v, d_lse=d_lse)

# %% [markdown]
# ## Step 1: recompute the probabilities from lse
#
# The forward kept only `out` and `lse` ($h$ numbers per query), not the $[s_q, h, k]$
# probabilities: FlashAttention's trick. With $\ell_t = \sigma\, q \cdot K_t$ the logit of slot $t$
# (its row $K_t = kv_{\mathrm{idx}_t}$, value $V_t = K_{t,:d_v}$), the backward gets them back exactly:
#
# $$
# P_t = e^{\ell_t - \mathrm{lse}}, \qquad \sum_t P_t = 1, \qquad \mathrm{out} = \sum_t P_t V_t
# $$

# %%
valid = (indices >= 0) & (indices < s_kv)  # [s_q, topk]
rows = kv[np.where(valid, indices, 0)]  # [s_q, topk, d_qk]   invalid slots read row 0 and are masked next
logits = sm_scale * np.einsum("ihd,itd->iht", q, rows)  # [s_q, h, topk]
probs = np.where(valid[:, None, :], np.exp(logits - lse[..., None]), 0.0)  # [s_q, h, topk]   P
check("sum_t P", probs.sum(-1), np.ones((s_q, h)))
check("sum_t P V = out", np.einsum("iht,itd->ihd", probs, rows[..., :d_v]), out)

# %% [markdown]
# ## Step 2: from dout to the logits
#
# $\mathrm{out} = \sum_t P_t V_t$, so $dP_t = dout \cdot V_t$. The softmax's Jacobian
# $\partial P_t / \partial \ell_u = P_t(\delta_{tu} - P_u)$ turns that into
# $d\ell_t = P_t\,(dP_t - \sum_u P_u\, dP_u)$, and the sum needs no pass over the slots:
#
# $$
# D = \sum_u P_u\,(dout \cdot V_u) = dout \cdot \mathrm{out},
# $$
#
# one dot product per (query, head) of two things the backward already holds. `lse` adds its own
# term: $\partial\,\mathrm{lse}/\partial \ell_t = P_t$. Altogether
#
# $$
# d\ell_t = P_t\,\big(dP_t - D + d\mathrm{lse}\big)
# $$

# %%
d_probs = np.einsum("ihd,itd->iht", d_out, rows[..., :d_v])  # [s_q, h, topk]   dP_t = dout . V_t
delta = np.einsum("ihd,ihd->ih", d_out, out)  # [s_q, h]   D = rowsum(dout * out)
check("D = sum_t P dP", delta, np.einsum("iht,iht->ih", probs, d_probs))
d_logits = probs * (d_probs - delta[..., None] + d_lse[..., None])  # [s_q, h, topk]   dS
assert not d_logits[~np.broadcast_to(valid[:, None, :], d_logits.shape)].any()  # invalid slots: exactly 0

# %% [markdown]
# ## Step 3: dq
#
# $\ell_t = \sigma\, q \cdot K_t$, so $dq = \sigma \sum_t d\ell_t\, K_t$, a
# $[h, k] \times [k, d_{qk}]$ product per query: the first output the reference gives.

# %%
dq = sm_scale * np.einsum("iht,itd->ihd", d_logits, rows)  # [s_q, h, d_qk]
check("dq", dq, dq_spec)

# %% [markdown]
# ## Step 4: dkv, a scatter-add
#
# A row $K_t$ appears in two roles: as a key in every head's logit ($\sigma\, d\ell_t\, q$) and,
# its first $d_v$ columns, as a value ($P_t\, dout$). Each slot's contribution, summed over the
# heads (they share one latent row), must then be **added** to the row it read:
#
# $$
# dkv_{\mathrm{idx}_t} \mathrel{+}= \sum_h \big(\sigma\, d\ell_{h,t}\, q_h + [\,{:}d_v\,]\; P_{h,t}\, dout_h\big)
# $$
#
# over every query and every slot: a row selected by 5 queries receives 5 contributions, a
# duplicate index within one query 2. `np.add.at` is the unbuffered scatter-add that does this.

# %%
per_slot = sm_scale * np.einsum("iht,ihd->itd", d_logits, q)  # [s_q, topk, d_qk]   as keys
per_slot[..., :d_v] += np.einsum("iht,ihd->itd", probs, d_out)  # [s_q, topk, d_v]   as values
dkv = np.zeros((s_kv, d_qk))  # [s_kv, d_qk]
np.add.at(dkv, indices[valid], per_slot[valid])  # invalid slots contribute nothing and are never touched
check("dkv (scatter-add)", dkv, dkv_spec)
read_by = np.bincount(indices[valid], minlength=s_kv)  # [s_kv]   how many slots read each row
assert np.all(dkv[read_by == 0] == 0)  # a row nobody selected gets exactly 0

# %% [markdown]
# A finite-difference check of the whole chain, on the duplicated row of query 0: the
# gradient of $\mathcal L = \sum dout \cdot \mathrm{out} + \sum d\mathrm{lse} \cdot \mathrm{lse}$.

# %%
def loss_of(q, kv):
    o, l = reference.sparse_mla(q, kv, indices, d_v=d_v)
    return np.sum(d_out * o) + np.sum(d_lse * l)


row, col, eps = indices[0, 0], 3, 1e-6
bumped, lowered = kv.copy(), kv.copy()
bumped[row, col] += eps
lowered[row, col] -= eps
numeric = (loss_of(q, bumped) - loss_of(q, lowered)) / (2 * eps)
assert abs(numeric - dkv[row, col]) < 1e-7 * max(1.0, abs(numeric)), (numeric, dkv[row, col])
print(f"dkv[{row}, {col}] = {dkv[row, col]:.6f}, central difference {numeric:.6f}")

# %% [markdown]
# ## Step 5: what a plain assignment gets wrong
#
# The tempting `dkv[idx] += contribution` (or `dkv[idx] = ...`) is a *buffered* fancy-index
# assignment in NumPy and PyTorch alike: when `idx` holds a row twice, one contribution wins and
# the others are lost. In sparse attention that is not a corner case: top-k sets of nearby
# queries overlap heavily, so most rows are read by several slots. Every row read more than once
# comes out wrong, and only those. (The unbuffered forms are `np.add.at` and torch's
# `index_add_` / `index_put_(..., accumulate=True)`; a GPU kernel uses atomics or a segmented sum.)

# %%
dkv_assigned = np.zeros((s_kv, d_qk))
dkv_assigned[indices[valid]] += per_slot[valid]  # buffered: duplicates counted once
wrong = ~np.all(np.isclose(dkv_assigned, dkv_spec, rtol=1e-9, atol=1e-12), axis=1)  # [s_kv]
assert np.array_equal(wrong, read_by > 1), "exactly the rows read more than once are wrong"
print(f"{wrong.sum()} of {s_kv} rows wrong with a plain assignment: the rows read by 2+ slots")

figure, axes = plt.subplots(1, 2, figsize=(11, 3.4))
axes[0].bar(np.arange(s_kv), read_by, color=np.where(wrong, "tab:red", "tab:blue"))
axes[0].set_title("slots that read each row (red: wrong with a plain assignment)")
axes[0].set_xlabel("kv row")
axes[1].scatter(read_by, np.linalg.norm(dkv_assigned - dkv_spec, axis=1) / np.linalg.norm(dkv_spec, axis=1).max())
axes[1].set_xlabel("slots that read the row")
axes[1].set_ylabel("|dkv error| / max |dkv|")
axes[1].set_title("what the lost contributions cost")
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 6: float atomics and `dsa_ref.use_deterministic`
#
# On a GPU the scatter-add is a `float32` `atomic_add` per element: thousands of programs add
# into the same rows in whatever order they happen to finish. Float addition is not associative,
# so the sum's last bits depend on that order, which changes from run to run: two identical
# training steps give gradients that differ in the last bits, and a run cannot be replayed bit
# for bit. Below, each row's float32 contributions are added in a random order, as atomics
# would, three times.

# %%
contributions = per_slot[valid].astype(np.float32)  # [n_slots, d_qk]
targets = indices[valid]  # [n_slots]


def sum_in_order(order):
    total = np.zeros((s_kv, d_qk), np.float32)
    for slot in order:
        total[targets[slot]] += contributions[slot]  # one slot at a time: one "atomic" per slot
    return total


runs = [sum_in_order(rng.permutation(len(targets))) for _ in range(3)]
bits_differ = [int(np.sum(runs[0] != other)) for other in runs[1:]]
print(f"elements whose bits differ from run 0: {bits_differ} of {runs[0].size}")
assert all(n > 0 for n in bits_differ)
assert_close(runs[1], runs[0], gradient_tolerance_for("float32"), name="dkv, another order")  # tiny differences
fixed = [sum_in_order(np.argsort(targets, kind="stable")) for _ in range(2)]  # a fixed order: row, then slot
assert np.array_equal(fixed[0], fixed[1])

# %% [markdown]
# In **deterministic** mode a backend must add each row's contributions in a fixed order (the
# Triton backend buffers them, sorts the slots by row with a stable sort and sums each segment:
# no float atomics), so two runs on the same inputs and device are **bitwise equal**, at some
# cost in speed. That is all it promises: results still differ from the reference, and between
# backends, by rounding (within the tolerance policy). It is on under `dsa_ref.use_deterministic()`
# (a context manager or a plain call) or `torch.use_deterministic_algorithms(True)`. The NumPy
# reference always sums in a fixed order.

# %%
q32, kv32, out32, lse32, d_out32 = (x.astype(np.float32) for x in (q, kv, out, lse, d_out))
with dsa_ref.use_deterministic():
    assert dsa_ref.deterministic_enabled()
    first = dsa_ref.sparse_mla_backward(q32, kv32, indices, out32, lse32, d_out32, d_v=d_v)
    second = dsa_ref.sparse_mla_backward(q32, kv32, indices, out32, lse32, d_out32, d_v=d_v)
assert all(np.array_equal(a, b) for a, b in zip(first, second))
assert not dsa_ref.deterministic_enabled()  # leaving the block restores the previous setting
print(f"deterministic: two runs bitwise equal on backend {dsa_ref.active_backend_name()!r}")

# %% [markdown]
# ## Step 7: the attention sink
#
# With a per-head sink logit (FlashMLA's `attn_sink`, a slot with no value) the tokens keep only
# the share $f = 1/(1 + e^{\mathrm{sink} - \mathrm{lse}})$ of the probability mass:
# $\mathrm{out} = f \sum_t P_t V_t$, and `lse` is unchanged. Two paths reach the logits now:
# through $\sum_t P_t V_t$ (scaled by $f$) and through $f$ itself, which depends on lse,
# $\partial f / \partial\,\mathrm{lse} = f(1-f)$. With $D = dout \cdot \mathrm{out}$ (the sunk
# output) the first gives $P_t(f\,dP_t - D)$ and the second adds $P_t\, D(1 - f)$:
#
# $$
# d\ell_t = P_t\,\big(f\,(dP_t - D) + d\mathrm{lse}\big), \qquad
# d\mathrm{sink} = -\sum_i D_i\,(1 - f_i)
# $$
#
# and every value contribution to `dkv` is scaled by $f$.

# %%
sink = rng.standard_normal(h)  # [h]
out_s, lse_s = reference.sparse_mla(q, kv, indices, d_v=d_v, attn_sink=sink)
share = 1.0 / (1.0 + np.exp(sink[None, :] - lse_s))  # [s_q, h]   f
check("lse unchanged by the sink", lse_s, lse)
check("out = f * out without sink", out_s, share[..., None] * out)

delta_s = np.einsum("ihd,ihd->ih", d_out, out_s)  # [s_q, h]   D with the sunk out
d_logits_s = probs * (share[..., None] * (d_probs - delta_s[..., None]) + d_lse[..., None])  # [s_q, h, topk]
dq_s = sm_scale * np.einsum("iht,itd->ihd", d_logits_s, rows)  # [s_q, h, d_qk]
per_slot_s = sm_scale * np.einsum("iht,ihd->itd", d_logits_s, q)  # [s_q, topk, d_qk]
per_slot_s[..., :d_v] += np.einsum("iht,ihd->itd", share[..., None] * probs, d_out)  # f P dout
dkv_s = np.zeros((s_kv, d_qk))
np.add.at(dkv_s, indices[valid], per_slot_s[valid])
d_sink = -np.sum(delta_s * (1.0 - share), axis=0)  # [h]

dq_s_spec, dkv_s_spec, d_sink_spec = reference.sparse_mla_backward(q, kv, indices, out_s, lse_s, d_out, d_v=d_v,
                                                                    d_lse=d_lse, attn_sink=sink)
check("dq with a sink", dq_s, dq_s_spec)
check("dkv with a sink", dkv_s, dkv_s_spec)
check("d_sink", d_sink, d_sink_spec)

# %% [markdown]
# ## Step 8: the indexer's target
#
# The target of eqs. 3-4 is the main attention over the selected slots, summed over heads and
# normalized per query. Again recomputed from `lse`, never stored:
#
# $$
# p_{i,t} = \frac{\sum_h P_{i,h,t}}{\sum_{t'} \sum_h P_{i,h,t'}}
# $$
#
# (without the sink: it takes mass from every token alike, and the normalization removes it.)
# A duplicate index is two slots, each with its own share.

# %%
target = probs.sum(axis=1) / probs.sum(axis=(1, 2))[:, None]  # [s_q, topk]   p, 0 at invalid slots
check("attention_target", target, reference.attention_target(q, kv, indices, lse))
check("attention_target (dispatched)", dsa_ref.attention_target(q, kv, indices, lse), target)
check("rows of p sum to 1", target.sum(1), np.ones(s_q))

# %% [markdown]
# ## Step 9: the KL loss and $dI = \mathrm{Softmax}(I) - p$
#
# The indexer scores slot $t$ of query $i$ with eq. 1,
# $I_{i,t} = \sum_j w_{i,j}\, \mathrm{ReLU}(g_{i,j,t})$, $g_{i,j,t} = q^I_{i,j} \cdot k^I_{\mathrm{idx}_{i,t}}$.
# With $s = \mathrm{Softmax}(I_{i,:})$ over the valid slots and $p$ a constant,
#
# $$
# \mathcal L_i = \sum_t p_t\,(\log p_t - \log s_t), \qquad
# \frac{\partial \mathcal L_i}{\partial I_{i,t}} = s_t - p_t
# $$
#
# (the $\log p$ term is a constant; $\partial \log s_t / \partial I_u = \delta_{tu} - s_u$ and
# $\sum_t p_t = 1$). Positive where the indexer over-rates a slot, negative where the main
# attention looks more than the indexer expects; each row sums to 0.

# %%
h_i, d_i = 4, 16
q_index = rng.standard_normal((s_q, h_i, d_i))  # [s_q, h_i, d_i]
weights = rng.standard_normal((s_q, h_i)) * h_i ** -0.5  # [s_q, h_i]
k_index = rng.standard_normal((s_kv, d_i))  # [s_kv, d_i]   one indexer key per token
d_loss = np.ones(s_q)  # [s_q]   the loss is the plain sum over queries

gate = np.einsum("ijd,itd->ijt", q_index, k_index[np.where(valid, indices, 0)])  # [s_q, h_i, topk]   g
scores = np.einsum("ij,ijt->it", weights, np.maximum(gate, 0.0))  # [s_q, topk]   I (eq. 1)
masked = np.where(valid, scores, -np.inf)  # [s_q, topk]
log_s = masked - masked.max(1, keepdims=True)
log_s -= np.log(np.exp(log_s).sum(1, keepdims=True))  # [s_q, topk]   log Softmax(I), -inf at invalid slots
with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.sum(np.where(target > 0, target * (np.log(target) - log_s), 0.0), axis=1)  # [s_q]   0 log 0 = 0
check("indexer_loss (eq. 4)", kl, reference.indexer_loss(q_index, weights, k_index, target, indices=indices))

d_scores = d_loss[:, None] * np.where(valid, np.exp(log_s) - target, 0.0)  # [s_q, topk]   dI = s - p
check("rows of dI sum to 0", d_scores.sum(1), np.zeros(s_q))

# %% [markdown]
# $dI$ checked by central differences of the loss as a function of the scores:

# %%
def kl_of_scores(scores_row, i):
    logit = np.where(valid[i], scores_row, -np.inf)
    log_soft = logit - logit.max() - np.log(np.exp(logit - logit.max()).sum())
    return np.sum(np.where(target[i] > 0, target[i] * (np.log(np.where(target[i] > 0, target[i], 1)) - log_soft), 0))


for i, t in [(0, 0), (2, 5), (5, 11)]:
    up, down = scores[i].copy(), scores[i].copy()
    up[t] += 1e-6
    down[t] -= 1e-6
    numeric = (kl_of_scores(up, i) - kl_of_scores(down, i)) / 2e-6
    assert abs(numeric - d_scores[i, t]) < 1e-8, (i, t, numeric, d_scores[i, t])
print("dI = Softmax(I) - p matches central differences")

# %% [markdown]
# ## Step 10: back through the ReLU to `weights`, `q_index`, `k_index`
#
# $$
# dw_{i,j} = \sum_t dI_{i,t}\, \mathrm{ReLU}(g_{i,j,t}), \qquad
# dg_{i,j,t} = dI_{i,t}\, w_{i,j}\, [g_{i,j,t} > 0],
# $$
# $$
# dq^I_{i,j} = \sum_t dg_{i,j,t}\, k^I_{\mathrm{idx}_{i,t}}, \qquad
# dk^I_{\mathrm{idx}_{i,t}} \mathrel{+}= \sum_j dg_{i,j,t}\, q^I_{i,j}
# $$
#
# The ReLU passes nothing where its input was $\le 0$ (a head that did not fire for a slot learns
# nothing from it), and $dk^I$ is the same scatter-add as $dkv$: the same duplicate and atomics
# story, the same deterministic mode.

# %%
dq_index_spec, dweights_spec, dk_index_spec = reference.indexer_loss_backward(
    q_index, weights, k_index, target, d_loss, indices=indices)
d_weights = np.einsum("it,ijt->ij", d_scores, np.maximum(gate, 0.0))  # [s_q, h_i]
check("dweights", d_weights, dweights_spec)
d_gate = d_scores[:, None, :] * weights[:, :, None] * (gate > 0)  # [s_q, h_i, topk]
dq_index = np.einsum("ijt,itd->ijd", d_gate, k_index[np.where(valid, indices, 0)])  # [s_q, h_i, d_i]
check("dq_index", dq_index, dq_index_spec)
dk_index = np.zeros((s_kv, d_i))  # [s_kv, d_i]
np.add.at(dk_index, indices[valid], np.einsum("ijt,ijd->itd", d_gate, q_index)[valid])
check("dk_index (scatter-add)", dk_index, dk_index_spec)
print(f"ReLU blocked {np.mean(gate <= 0):.0%} of the (head, slot) gradients")

# %% [markdown]
# The dense warm-up (eq. 3) is the same function over a different set: every key the query may
# see instead of the selected slots, with the target `[s_q, s_kv]` of dense attention. Written
# as "sparse" indices that list every visible key, the two stages agree:

# %%
key_start, key_end = dsa_ref.causal_key_ranges(s_q, s_kv)  # the s_q queries are the last s_q tokens
every_key = np.where(np.arange(s_kv)[None, :] < key_end[:, None], np.arange(s_kv)[None, :], -1).astype(np.int32)
_, dense_lse = reference.sparse_mla(q, kv, every_key, d_v=d_v)
dense_target = reference.attention_target(q, kv, every_key, dense_lse)  # [s_q, s_kv]: slot t is key t
dense = reference.indexer_loss(q_index, weights, k_index, dense_target, key_start=key_start, key_end=key_end)
check("eq. 3 = eq. 4 over every key", dense,
      reference.indexer_loss(q_index, weights, k_index, dense_target, indices=every_key))

# %% [markdown]
# ## Step 11: the same with torch autograd
#
# `dsa_ref.torch` wraps each op as a `torch.library.custom_op` with its backward registered
# beside it: the forward saves `out` and `lse`, the backward calls the backend's
# `sparse_mla_backward` / `indexer_loss_backward`. On CPU tensors the NumPy reference runs, and
# keeps float64 in float64, so autograd's gradients must equal the hand-written ones above.

# %%
t = torch.from_numpy
q_t, kv_t, sink_t = (t(x).requires_grad_() for x in (q, kv, sink))
out_t, lse_t = dsa_torch.sparse_mla(q_t, kv_t, t(indices), d_v=d_v, attn_sink=sink_t, backend="numpy")
(torch.sum(t(d_out) * out_t) + torch.sum(t(d_lse) * lse_t)).backward()
check("autograd dq", q_t.grad, dq_s)
check("autograd dkv", kv_t.grad, dkv_s)
check("autograd d_sink", sink_t.grad, d_sink)

target_t = dsa_torch.attention_target(q_t, kv_t, t(indices), lse_t, backend="numpy")
assert not target_t.requires_grad  # a constant of the indexer's loss: the main model gets nothing from it
q_index_t, weights_t, k_index_t = (t(x).requires_grad_() for x in (q_index, weights, k_index))
dsa_torch.indexer_loss(q_index_t, weights_t, k_index_t, target_t, indices=t(indices), backend="numpy").sum().backward()
check("autograd dq_index", q_index_t.grad, dq_index)
check("autograd dweights", weights_t.grad, d_weights)
check("autograd dk_index", k_index_t.grad, dk_index)

# %% [markdown]
# `torch.autograd.gradcheck` compares the registered backward with finite differences of the
# forward, element by element, in float64 (tiny shapes: it calls the forward twice per input
# element).

# %%
small = np.random.default_rng(11)
g_indices = t(np.array([[0, 3, 3, -1], [1, 2, 5, 4], [5, 9, 0, s_kv]], np.int32))  # a duplicate, two invalid
g_q = t(small.standard_normal((3, 2, 12))).requires_grad_()
g_kv = t(small.standard_normal((10, 12))).requires_grad_()
g_sink = t(small.standard_normal(2)).requires_grad_()
assert torch.autograd.gradcheck(
    lambda q, kv, sink: dsa_torch.sparse_mla(q, kv, g_indices, d_v=8, attn_sink=sink, backend="numpy"),
    (g_q, g_kv, g_sink))
g_target = t(small.dirichlet(np.ones(4), 3)) * t(np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]))
g_qi = t(small.standard_normal((3, 2, 6))).requires_grad_()
g_w = t(small.standard_normal((3, 2))).requires_grad_()
g_ki = t(small.standard_normal((10, 6))).requires_grad_()
assert torch.autograd.gradcheck(
    lambda qi, w, ki: dsa_torch.indexer_loss(qi, w, ki, g_target, indices=g_indices, backend="numpy"),
    (g_qi, g_w, g_ki))
print("gradcheck passes: sparse_mla (q, kv, attn_sink) and indexer_loss (q_index, weights, k_index)")

# %% [markdown]
# ## Step 12: training an indexer against a frozen attention
#
# Now whole training steps, on one sequence of $n$ tokens with hidden states $x$. The main
# attention's $q$ and $kv$ come from frozen projections; the indexer has three trainable ones
# ($q^I = x W_q$, $k^I = x W_k$, $w = x W_w$), and the KL loss is the only loss that reaches them.
# Both stages of the paper, one after the other:
#
# * **warm-up** (eq. 3): the target is the dense attention over every visible key, and the loss's
#   softmax runs over the same keys (`key_start`, `key_end`);
# * **sparse** (eq. 4): `dsa_torch.dsa_attention` runs indexer, top-k and sparse MLA in one op (its
#   output would feed the rest of the model and the language-modelling loss), `attention_target`
#   turns its `lse` into $p$ over the selected slots, and the loss runs over those slots only.
#
# Progress is the **captured attention mass**: the share of the dense attention's target that
# falls on the indexer's top-$k$ keys (1 would mean the sparse attention misses nothing).

# %%
n, dim, heads, d_main, d_value, index_heads, index_dim, k_sel = 64, 32, 4, 48, 32, 4, 16, 8
warmup_steps, sparse_steps = 30, 30


def make_problem(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=generator)  # [n, dim]
    w_q = torch.randn(dim, heads * d_main, generator=generator) * 0.6  # frozen; sharper than random attention
    w_kv = torch.randn(dim, d_main, generator=generator) * 0.6
    main = ((x @ w_q).reshape(n, heads, d_main).to(device), (x @ w_kv).to(device))  # q [n, h, d], kv [n, d]
    indexer = {name: (torch.randn(*shape, generator=generator) * dim ** -0.5).to(device).requires_grad_()
               for name, shape in (("w_q", (dim, index_heads * index_dim)), ("w_k", (dim, index_dim)),
                                   ("w_w", (dim, index_heads)))}
    ranges = [torch.from_numpy(r).to(device) for r in dsa_ref.causal_key_ranges(n, n)]  # key_start, key_end
    return x.to(device), main, indexer, ranges


def index_inputs(x, indexer):
    q_index = (x @ indexer["w_q"]).reshape(n, index_heads, index_dim)  # [n, h_i, d_i]
    return q_index, x @ indexer["w_w"] * index_heads ** -0.5, x @ indexer["w_k"]  # weights [n, h_i], k [n, d_i]


def dense_target(main, ranges, backend):
    """p over every visible key (eq. 3): the warm-up's target, and what the top-k should capture."""
    keys = torch.arange(n, device=ranges[1].device)
    every = torch.where(keys[None, :] < ranges[1][:, None], keys[None, :], -1).to(torch.int32)  # [n, n]
    _, lse_all = dsa_torch.sparse_mla(*main, every, d_v=d_value, backend=backend)
    return dsa_torch.attention_target(*main, every, lse_all, backend=backend)  # [n, n]


def training_step(x, main, indexer, optimizer, ranges, full_target, stage, backend):
    q_index, weights, k_index = index_inputs(x, indexer)
    if stage == "warm-up":
        loss = dsa_torch.indexer_loss(q_index, weights, k_index, full_target, key_start=ranges[0],
                                      key_end=ranges[1], backend=backend)
        scores = dsa_torch.lightning_indexer(q_index, weights, k_index, key_start=ranges[0], key_end=ranges[1],
                                             backend=backend)
        selected = dsa_torch.topk_indices(scores, k_sel, backend=backend)  # only to measure the selection
    else:
        out, lse, selected = dsa_torch.dsa_attention(*main, q_index, weights, k_index, topk=k_sel,
                                                     key_start=ranges[0], key_end=ranges[1], d_v=d_value,
                                                     backend=backend)
        target = dsa_torch.attention_target(*main, selected, lse, backend=backend)  # [n, k_sel]   p over S_t
        loss = dsa_torch.indexer_loss(q_index, weights, k_index, target, indices=selected, backend=backend)
    optimizer.zero_grad()
    loss.mean().backward()
    optimizer.step()
    return loss.mean().item(), selected


def captured_mass(selected, full_target):
    chosen = torch.zeros(n, n + 1, device=selected.device)  # [n, n + 1]   column n collects the -1 padding
    chosen.scatter_(1, torch.where(selected >= 0, selected, n).long(), 1.0)
    captured = (full_target * chosen[:, :n]).sum(1)  # [n]   share of p on the selected keys
    return captured[k_sel:].mean().item()  # the rows that see more than k keys (the others capture all)


def train(device, backend):
    x, main, indexer, ranges = make_problem(device)
    full_target = dense_target(main, ranges, backend)
    optimizer = torch.optim.Adam(indexer.values(), lr=3e-2)
    history = []
    for stage, steps in (("warm-up", warmup_steps), ("sparse", sparse_steps)):
        for _ in range(steps):
            loss, selected = training_step(x, main, indexer, optimizer, ranges, full_target, stage, backend)
            history.append((loss, captured_mass(selected, full_target)))
    return np.array(history)  # [steps, 2]   loss, captured mass


losses, masses = train("cpu", "numpy").T
random_mass = np.mean([k_sel / (i + 1) for i in range(k_sel, n)])  # k keys drawn at random from the i + 1 visible
print(f"warm-up KL (eq. 3) {losses[0]:.3f} -> {losses[warmup_steps - 1]:.3f}; captured mass {masses[0]:.2f} -> "
      f"{masses[-1]:.2f} after the sparse stage (k = {k_sel} keys of up to {n}; random keys: {random_mass:.2f})")
assert losses[1] < losses[0]  # one step already lowers the loss
assert losses[warmup_steps - 1] < 0.7 * losses[0]
assert masses[-5:].mean() > masses[0] + 0.15 and masses[-5:].mean() > 2 * random_mass

# %%
figure, axes = plt.subplots(1, 2, figsize=(11, 3.4))
steps = np.arange(len(losses))
axes[0].plot(steps[:warmup_steps], losses[:warmup_steps], label="warm-up: over every visible key (eq. 3)")
axes[0].plot(steps[warmup_steps:], losses[warmup_steps:], label="sparse: over its own top-k (eq. 4)")
axes[0].set_xlabel("Adam step")
axes[0].set_title("indexer KL, mean per query")
axes[0].legend(fontsize=8)
axes[1].plot(steps, masses, color="tab:green")
axes[1].axvline(warmup_steps - 0.5, color="gray", linestyle="--", label="top-k switched on")
axes[1].axhline(random_mass, color="gray", linestyle=":", label=f"{k_sel} random keys")
axes[1].set_ylim(0, 1)
axes[1].set_xlabel("Adam step")
axes[1].set_title(f"dense attention mass captured by the top-{k_sel}")
axes[1].legend(fontsize=8)
figure.tight_layout()
plt.show()

# %% [markdown]
# The two losses are not on one scale: eq. 4 compares the distributions over the indexer's *own*
# choice $S_t$, which changes from step to step, and is low as soon as the indexer ranks its
# chosen keys as the attention does, whether or not it chose the right ones. The captured mass,
# measured against the dense attention, is the honest gauge.
#
# ## Step 13: the same step on a GPU
#
# The step is backend-agnostic: on CUDA tensors with `backend="triton"` the Triton kernels run
# the forward, both backward passes and the target (float32 here; bf16 in real training). This
# cell runs when a GPU and Triton are present, and says that it skipped when they are not.

# %%
if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    gpu_losses, gpu_masses = train("cuda", "triton").T
    print(f"triton on {torch.cuda.get_device_name()}: warm-up KL {gpu_losses[0]:.3f} -> "
          f"{gpu_losses[warmup_steps - 1]:.3f}, captured mass {gpu_masses[0]:.2f} -> {gpu_masses[-1]:.2f}")
    assert gpu_losses[1] < gpu_losses[0] and gpu_masses[-5:].mean() > gpu_masses[0] + 0.15
    # The kernels' gradients against the reference's on the same float32 inputs and the same selection.
    x, main, indexer, ranges = make_problem("cuda")
    index_in = [v.detach() for v in index_inputs(x, indexer)]
    _, _, selected = dsa_torch.dsa_attention(*main, *index_in, topk=k_sel, key_start=ranges[0], key_end=ranges[1],
                                             d_v=d_value, backend="triton")
    grads = {}
    for backend, device in (("triton", "cuda"), ("numpy", "cpu")):
        leaves = [v.detach().to(device).requires_grad_() for v in (*main, *index_in)]
        out, lse = dsa_torch.sparse_mla(*leaves[:2], selected.to(device), d_v=d_value, backend=backend)
        target = dsa_torch.attention_target(*leaves[:2], selected.to(device), lse, backend=backend)
        loss = dsa_torch.indexer_loss(*leaves[2:], target, indices=selected.to(device), backend=backend)
        (out.square().sum() + loss.sum()).backward()
        grads[backend] = [leaf.grad.cpu() for leaf in leaves]
    for name, mine, spec in zip(("dq", "dkv", "dq_index", "dweights", "dk_index"), grads["triton"], grads["numpy"]):
        print(assert_close(mine, spec, gradient_tolerance_for("float32"), name=f"triton {name}"))
else:
    print("no CUDA GPU with Triton here: skipped the GPU step (backend 'triton')")

# %% [markdown]
# ## Where the numbers are
#
# Sparse MLA's backward does five matrix products per slot where the forward does two: the
# logits again ($q K^\top$), $dP = dout\, V^\top$, $dq = dS\, K$, and $dkv$ as key ($dS^\top q$)
# and as value ($P^\top dout$), so
# $\text{FLOP}_{\text{bwd}} = 2\, s_q\, h\, k\,(3 d_{qk} + 2 d_v)$ against
# $2\, s_q\, h\, k\,(d_{qk} + d_v)$ forward. `dsa-ref bench` measures the backward kernels (default
# and deterministic), the attention target and the indexer loss on a GPU with these formulas;
# the results are on the documentation site's [benchmark page](../../results/benchmarks/),
# generated from the committed `docs/bench/bench.json`.

# %%
d_qk_v32, d_v_v32 = 576, 512  # DeepSeek-V3.2's MQA widths
ratio = (3 * d_qk_v32 + 2 * d_v_v32) / (d_qk_v32 + d_v_v32)
print(f"backward / forward FLOP at d_qk {d_qk_v32}, d_v {d_v_v32}: {ratio:.2f}x")
bench = Path(dsa_ref.__file__).resolve().parents[1] / "docs" / "bench" / "bench.json"
rows = json.loads(bench.read_text())["rows"] if bench.exists() else []
training_rows = [r for r in rows if r.get("group") == "training" and r.get("ms")]
for r in training_rows:
    rate = f"{r['tflops']:.0f} TFLOP/s" if r.get("tflops") else ""
    print(f"{r['case']:<55} {r['impl']:<28} {r['ms']:8.3f} ms  {rate}")
if not training_rows:
    print("no training measurements committed in docs/bench/bench.json yet: run `dsa-ref bench` on a GPU")

# %% [markdown]
# ## What you built
#
# Sparse MLA's backward from `out` and `lse` alone ($P$ recomputed, $D = dout \cdot out$, a
# scatter-add into the shared latent rows, the sink's share), the indexer's target and KL
# gradient back through the ReLU, and both as torch autograd ops that train an indexer on the
# CPU, with the same step ready for the Triton kernels on a GPU.
