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
# # Tutorial 7: training the indexer (the KL warm-up)
#
# A lightning indexer with random weights selects random keys. DeepSeek-V3.2 was made from
# V3.1 by first training the indexer alone, for a short **dense warm-up**, to imitate the main
# attention (DeepSeek-V3.2-Exp, §2.1). For query $t$, the target is the main attention summed over
# heads and L1-normalized, and the loss is a KL divergence to the softmax of the indexer scores:
#
# $$
# p_{t,:} = \frac{\sum_h A_{t,h,:}}{\big\lVert \sum_h A_{t,h,:} \big\rVert_1},\qquad
# \mathcal{L}^I = \sum_t D_{\mathrm{KL}}\!\left(p_{t,:} \,\Vert\, \mathrm{Softmax}(I_{t,:})\right) \quad \text{(eq. 3)}
# $$
#
# In the following **sparse** stage, the same loss is restricted to the selected set $S_t$
# (eq. 4). The main model stays frozen during the warm-up and the indexer's input is detached:
# only the indexer's parameters learn. We build the loss and its gradient, check them against
# `dsa_ref.layer.training`, and watch an indexer learn.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 7 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

from dsa_ref.layer import DSAConfig, DSALayer
from dsa_ref.layer.experiment import indexer_warmup_experiment
from dsa_ref.layer.mla import mha_probabilities, split_wkv_b
from dsa_ref.layer.training import (
    INDEXER_PARAMETERS,
    attention_target,
    captured_attention_mass,
    causal_mask,
    indexer_kl_loss,
    indexer_loss_and_gradients,
    indexer_scores,
)

seed, seq_len, topk, sharpness = 0, 48, 6, 2.0
config = DSAConfig.tiny(max_seq_len=64, index_topk=topk, indexer_fp8=False)
layer = DSALayer(config, seed=seed)
rng = np.random.default_rng(seed + 1)
x = rng.standard_normal((seq_len, config.dim))
positions = np.arange(seq_len)
mask = causal_mask(seq_len)

# %% [markdown]
# ## Step 1: the target distribution
#
# The main attention of the frozen layer, $A_{t,h,s}$ (made a little sharper than the random
# layer's own, `sharpness`, so that there is something to find), summed over heads and
# normalized per query.

# %%
proj = layer.projections(x, positions)
w_uk, _ = split_wkv_b(layer.weights["wkv_b.weight"], config)
probs = mha_probabilities(proj.q_nope, proj.q_pe, proj.latent, proj.k_pe, w_uk, mask,
                          config.softmax_scale * sharpness)  # [n, h, n]
summed = probs.sum(axis=1)  # [n, n]
target = summed / summed.sum(axis=1, keepdims=True)  # [n, n]
np.testing.assert_allclose(target, attention_target(probs), rtol=1e-12)
np.testing.assert_allclose(target.sum(axis=1), 1.0)

# %% [markdown]
# ## Step 2: the KL loss and its gradient, by hand
#
# With $q_t = \mathrm{Softmax}(I_{t,:})$ over the visible keys,
# $D_{\mathrm{KL}}(p_t \Vert q_t) = \sum_s p_{t,s}(\log p_{t,s} - \log q_{t,s})$, and since $p$ is a constant,
# $\partial \mathcal{L}^I / \partial I_{t,s} = q_{t,s} - p_{t,s}$: the indexer is pushed up where the
# main attention is stronger than its own softmax, down elsewhere.

# %%
params = {name: layer.weights[name].copy() for name in INDEXER_PARAMETERS}
scores = indexer_scores(params, x, proj.qr, positions, config, mask)  # [n, n], -inf above the diagonal


def kl_by_hand(scores, target):
    logits = np.where(np.isfinite(scores), scores, -np.inf)
    log_q = logits - logits.max(1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(1, keepdims=True))
    finite_log_q = np.where(np.isfinite(log_q), log_q, 0.0)  # masked keys have p = 0: they add nothing
    terms = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1)) - finite_log_q), 0.0)
    return terms.sum(), np.where(np.isfinite(scores), np.exp(log_q) - target, 0.0)


loss, grad = kl_by_hand(scores, target)
lib_loss, lib_grad = indexer_kl_loss(scores, target)
np.testing.assert_allclose(lib_loss, loss, rtol=1e-12)
np.testing.assert_allclose(lib_grad, grad, atol=1e-14)

# The gradient, checked by central differences on a few visible entries:
for t, s in [(10, 3), (30, 30), (47, 0)]:
    bumped = scores.copy()
    bumped[t, s] += 1e-6
    lowered = scores.copy()
    lowered[t, s] -= 1e-6
    numeric = (kl_by_hand(bumped, target)[0] - kl_by_hand(lowered, target)[0]) / 2e-6
    assert abs(numeric - grad[t, s]) < 1e-7, (t, s, numeric, grad[t, s])
print(f"KL at initialisation: {loss / seq_len:.3f} per query; gradient matches finite differences")

# %% [markdown]
# ## Step 3: the sparse stage (eq. 4)
#
# Restricted to the selected keys $S_t$, both distributions are renormalized over $S_t$; keys
# outside it get no gradient at all.

# %%
from dsa_ref.reference import topk_indices

chosen = topk_indices(scores.astype(np.float32), topk)  # [n, topk]
selected = np.zeros((seq_len, seq_len), bool)
rows = np.repeat(np.arange(seq_len), topk)
selected[rows[chosen.ravel() >= 0], chosen.ravel()[chosen.ravel() >= 0]] = True
sparse_target = np.where(selected, target, 0.0)
sparse_target /= sparse_target.sum(1, keepdims=True)
sparse_loss, sparse_grad = kl_by_hand(np.where(selected, scores, -np.inf), sparse_target)
lib_sparse_loss, lib_sparse_grad = indexer_kl_loss(scores, target, selected)
np.testing.assert_allclose(lib_sparse_loss, sparse_loss, rtol=1e-12)
np.testing.assert_allclose(lib_sparse_grad, sparse_grad, atol=1e-14)
assert not lib_sparse_grad[~selected].any()

# %% [markdown]
# ## Step 4: a training loop
#
# The gradient reaches the indexer's parameters through its projections (linear maps,
# LayerNorm, RoPE, the Hadamard rotation); `indexer_loss_and_gradients` writes that backward pass
# out by hand. Below, plain Adam on one sequence; after each step we measure the **captured
# attention mass**, the share of $p$ that falls on the indexer's top-$k$ keys (1 = the sparse
# attention sees everything the dense one attends to).

# %%
def captured(params):
    current = indexer_scores(params, x, proj.qr, positions, config, mask)
    return captured_attention_mass(current, target, topk)[topk:].mean()  # rows with more than k keys


moments = {name: (np.zeros_like(v), np.zeros_like(v)) for name, v in params.items()}
history = []
for step in range(60):
    loss, grads, _ = indexer_loss_and_gradients(params, x, proj.qr, positions, target, config, visible=mask)
    history.append((step, loss / seq_len, captured(params)))
    for name, g in grads.items():
        first, second = moments[name]
        first[:] = 0.9 * first + 0.1 * g / seq_len
        second[:] = 0.999 * second + 0.001 * (g / seq_len) ** 2
        params[name] -= 1e-2 * (first / (1 - 0.9 ** (step + 1))) / (np.sqrt(second / (1 - 0.999 ** (step + 1))) + 1e-8)
steps, losses, masses = map(np.array, zip(*history))
print(f"KL per query {losses[0]:.3f} -> {losses[-1]:.3f}; captured mass {masses[0]:.2f} -> {masses[-1]:.2f}")
assert losses[-1] < 0.5 * losses[0] and masses[-1] > masses[0] + 0.2

# %%
after = indexer_scores(params, x, proj.qr, positions, config, mask)
before_softmax = np.exp(scores - np.nanmax(np.where(mask, scores, np.nan), 1, keepdims=True))
after_softmax = np.exp(after - np.nanmax(np.where(mask, after, np.nan), 1, keepdims=True))
figure, axes = plt.subplots(1, 4, figsize=(15, 3.6))
for axis, data, title in ((axes[0], target, "target p (main attention)"),
                          (axes[1], before_softmax / before_softmax.sum(1, keepdims=True), "Softmax(I), step 0"),
                          (axes[2], after_softmax / after_softmax.sum(1, keepdims=True), "Softmax(I), step 60")):
    axis.imshow(np.where(mask, data, np.nan), cmap="magma", vmin=0, vmax=np.quantile(target[mask], 0.99))
    axis.set_title(title)
    axis.set_xlabel("key s")
axes[0].set_ylabel("query t")
axes[3].plot(steps, masses, label="captured mass")
axes[3].plot(steps, losses / losses[0], label="KL / KL at step 0")
axes[3].set_xlabel("Adam step")
axes[3].legend()
axes[3].set_title("warm-up on one sequence")
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 5: the packaged experiment
#
# `dsa-ref train-indexer` (`dsa_ref.layer.experiment`) does the same on several sequences and
# also evaluates held-out ones, against three references: $k$ random keys, the $k$ most recent
# keys (a sliding window), and the best possible $k$ keys (top-$k$ of $p$ itself).
#
# Read the held-out curve honestly: the "main attention" of a *random* layer on *random* inputs
# has no rule that transfers to new sequences, so the indexer fits the pattern it is shown and
# stays at the random level elsewhere. The point here is the loss and its gradients; with a real
# model's attention, the pattern is what the indexer learns.

# %%
result = indexer_warmup_experiment(steps=120, seq_len=seq_len, topk=topk, train_sequences=3, eval_sequences=2,
                                   learning_rate=1e-2, sharpness=sharpness, seed=seed, eval_every=10, config=config)
refs = result["references"]
assert result["train_mass"][-1] > refs["train"]["random"] + 0.2  # it learned the training pattern
plt.figure(figsize=(7, 4))
plt.plot(result["steps"], result["train_mass"], label="indexer top-k, training sequences")
plt.plot(result["steps"], result["eval_mass"], label="indexer top-k, held-out sequences")
for key, style in (("oracle", ":"), ("recent_window", "--"), ("random", "-.")):
    plt.axhline(refs["train"][key], color="gray", linestyle=style, label=f"{key.replace('_', ' ')} (training)")
plt.ylim(0, 1)
plt.xlabel("Adam step (KL loss of eq. 3)")
plt.ylabel(f"attention mass captured by top-{topk}")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"training mass {result['train_mass'][0]:.2f} -> {result['train_mass'][-1]:.2f} "
      f"(oracle {refs['train']['oracle']:.2f}); held-out {result['eval_mass'][-1]:.2f} "
      f"(random {refs['eval']['random']:.2f})")

# %% [markdown]
# Next: how a GPU kernel computes sparse MLA, [the Triton kernel step by step](08_triton_sparse_mla.py).
