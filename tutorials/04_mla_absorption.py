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
# # Tutorial 4: MLA, absorbing W_UK and W_UV (MHA → MQA)
#
# Multi-head latent attention caches **one** small latent vector $c^{KV}_s$ per token (512 wide
# in V3.2) plus one shared RoPE key $k^{pe}_s$ (64 wide). Per-head keys and values are linear
# images of the latent: $k^{nope}_{s,h} = W^{UK}_h c^{KV}_s$ and $v_{s,h} = W^{UV}_h c^{KV}_s$.
# MLA can be computed in two ways that give the same function:
#
# * **MHA mode**: expand keys and values per head, then ordinary attention with 192-wide keys
#   (128 + 64) and 128-wide values. Cheap in FLOPs: good for training and prefill.
# * **MQA mode**: move $W^{UK}$ onto the query side,
#   $q^{nope}_{h} \cdot (W^{UK}_h c_s) = \big((W^{UK}_h)^{\top} q^{nope}_h\big) \cdot c_s$, so every head
#   attends to the *same* 576-wide row $[c^{KV}_s; k^{pe}_s]$, and apply $W^{UV}$ after the
#   attention, $\sum_s p_s W^{UV}_h c_s = W^{UV}_h \sum_s p_s c_s$. One row read per token,
#   whatever the number of heads: good for decode, and what DSA's sparse kernels gather.
#
# We derive the MQA form from the MHA form step by step, check it against `dsa_ref.layer`, then
# run it through `dsa_ref.sparse_mla`.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 4 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

import dsa_ref
from dsa_ref.layer import DSAConfig, DSALayer
from dsa_ref.layer.mla import absorb_queries, mha_attention, mqa_attention, split_wkv_b

config = DSAConfig.tiny()  # few heads, small hidden size, but V3.2's 512 + 64 latent
print(f"heads {config.n_heads}, latent {config.kv_lora_rank} + rope {config.qk_rope_head_dim}, "
      f"MHA key {config.qk_head_dim}, value {config.v_head_dim}")
layer = DSALayer(config, seed=0)
rng = np.random.default_rng(4)
s = 24
tokens = rng.standard_normal((s, config.dim))
proj = layer.projections(tokens, np.arange(s))  # q_nope, q_pe, latent c^KV, k_pe (RoPE applied)
w_uk, w_uv = split_wkv_b(layer.weights["wkv_b.weight"], config)  # [h, nope, c], [h, v, c]
scale = config.softmax_scale  # 192^-0.5 (x YaRN's mscale^2): the MHA width, in both modes
causal = np.tril(np.ones((s, s), bool))

# %% [markdown]
# ## Step 1: MHA mode, by hand

# %%
k_nope = np.einsum("hdc,sc->shd", w_uk, proj.latent)  # [s, h, nope]   per-head keys from the latent
values = np.einsum("hvc,sc->shv", w_uv, proj.latent)  # [s, h, v]      per-head values
logits_mha = scale * (np.einsum("nhd,shd->nhs", proj.q_nope, k_nope)
                      + np.einsum("nhr,sr->nhs", proj.q_pe, proj.k_pe))  # [n, h, s]
logits_mha = np.where(causal[:, None, :], logits_mha, -np.inf)
p = np.exp(logits_mha - logits_mha.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
out_mha = np.einsum("nhs,shv->nhv", p, values)  # [n, h, v]
np.testing.assert_allclose(out_mha, mha_attention(proj.q_nope, proj.q_pe, proj.latent, proj.k_pe,
                                                  w_uk, w_uv, causal, scale), rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## Step 2: absorb $W^{UK}$ into the query
#
# $q' = [(W^{UK}_h)^{\top} q^{nope}_h ;\ q^{pe}_h]$ is 512 + 64 = 576 wide, and the key row
# $[c^{KV}_s; k^{pe}_s]$ is shared by every head. The logits are the same numbers.

# %%
q_absorbed = np.concatenate([np.einsum("nhd,hdc->nhc", proj.q_nope, w_uk), proj.q_pe], axis=-1)  # [n, h, 576]
kv_rows = np.concatenate([proj.latent, proj.k_pe], axis=-1)  # [s, 576]   the cache row
assert q_absorbed.shape[-1] == kv_rows.shape[-1] == 576
np.testing.assert_allclose(q_absorbed, absorb_queries(proj.q_nope, proj.q_pe, w_uk), rtol=1e-12)
logits_mqa = np.where(causal[:, None, :], scale * np.einsum("nhc,sc->nhs", q_absorbed, kv_rows), -np.inf)
np.testing.assert_allclose(logits_mqa, logits_mha, rtol=1e-9, atol=1e-9)
visible = np.broadcast_to(causal[:, None, :], logits_mha.shape)
print(f"logits equal in both modes: max |diff| = {np.abs(logits_mqa[visible] - logits_mha[visible]).max():.1e}")

# %% [markdown]
# ## Step 3: attend over the latent, then apply $W^{UV}$
#
# The value is the latent itself (the first 512 columns of the row); each head's 512-wide
# result is mapped to its 128-wide value space afterwards.

# %%
out_latent = np.einsum("nhs,sc->nhc", p, proj.latent)  # [n, h, 512]
out_mqa = np.einsum("hvc,nhc->nhv", w_uv, out_latent)  # [n, h, v]
np.testing.assert_allclose(out_mqa, out_mha, rtol=1e-9, atol=1e-12)
np.testing.assert_allclose(out_mqa, mqa_attention(proj.q_nope, proj.q_pe, proj.latent, proj.k_pe,
                                                  w_uk, w_uv, causal, scale), rtol=1e-9, atol=1e-12)

# %% [markdown]
# ## Step 4: the MQA form is exactly `sparse_mla`'s input
#
# Index every visible key (no sparsity yet) and `dsa_ref.sparse_mla` computes step 3's
# `out_latent`. Note the explicit `sm_scale`: the default, $576^{-1/2}$, is the MQA width, but
# MLA's scale is the MHA one ($192^{-1/2}$, times YaRN's factor) in both modes.

# %%
all_keys = np.where(causal, np.arange(s)[None, :], -1).astype(np.int32)  # [n, s]
lib_latent, _ = dsa_ref.sparse_mla(q_absorbed.astype(np.float32), kv_rows.astype(np.float32), all_keys,
                                   sm_scale=scale, d_v=512)
np.testing.assert_allclose(lib_latent, out_latent, rtol=2e-3, atol=2e-3 * np.abs(out_latent).max())
print("sparse_mla over all visible keys == MQA-mode attention (float32 inputs)")

# %% [markdown]
# ## Step 5: the whole layer in both modes
#
# `DSALayer` runs the indexer and top-k, then either MQA mode (sparse MLA over the selected
# latent rows, read from the cache) or MHA mode (per-head keys, restricted to the same keys).
# Same selection, same output.

# %%
x = rng.standard_normal((1, s, config.dim))
outputs = {}
for mode in ("mqa", "mha"):
    layer_mode = DSALayer(config, seed=0, mode=mode)
    outputs[mode] = layer_mode(x)
    selected = layer_mode.last_topk
np.testing.assert_allclose(outputs["mqa"], outputs["mha"], rtol=1e-4, atol=1e-4 * np.abs(outputs["mha"]).max())
print("layer output, MQA vs MHA mode: max |diff| =", f"{np.abs(outputs['mqa'] - outputs['mha']).max():.1e}",
      f"(top-{config.index_topk} of {s} tokens)")

# %% [markdown]
# ## Step 6: why decode uses MQA mode and prefill MHA mode
#
# Per key and per token, at V3.2's sizes ($h = 128$): MHA mode does fewer multiply-adds
# ($h(192 + 128)$ against $h(576 + 512)$), but it needs per-head keys and values, which are
# either cached ($h \cdot 320$ values per token) or recomputed from the latent for every
# query. MQA mode reads one 576-wide row per token for all heads. Decode reads the whole
# cache for a single query per sequence, so bytes dominate; prefill has many queries per key,
# so FLOPs dominate.

# %%
h = 128
flops = {"MHA mode": 2 * h * (192 + 128), "MQA mode": 2 * h * (576 + 512)}
cache_bytes = {"MHA mode": 2 * h * (192 + 128), "MQA mode": 2 * 576}  # bf16 per token, expanded vs latent
figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].bar(list(flops), list(flops.values()), color=["tab:blue", "tab:orange"])
axes[0].set_title("FLOPs per (query, key), all heads")
axes[1].bar(list(cache_bytes), list(cache_bytes.values()), color=["tab:blue", "tab:orange"])
axes[1].set_title("bytes of K and V per cached token (bf16)")
for axis in axes:
    axis.grid(axis="y", alpha=0.3)
figure.tight_layout()
plt.show()
print({mode: f"{flops[mode]:,} FLOPs, {cache_bytes[mode]:,} bytes" for mode in flops})

# %% [markdown]
# Next: make that 576-wide row smaller still, [the FP8 KV cache](05_fp8_kv_cache.py).
