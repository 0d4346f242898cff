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
# # Tutorial 9: complexity and cost — when DSA pays
#
# Dense attention makes the token at position $t$ look at all $t$ keys: $O(t)$ per token,
# $O(L^2)$ per sequence. DSA looks at all $t$ keys *only with the indexer*, and at
# $\min(t, k)$ keys with the real attention: still $O(t)$ per token, but with a much smaller
# constant. This tutorial counts both, for DeepSeek-V3.2's shapes, checks the counts against
# `dsa_ref.cost`, and finds where the two lines cross: the shape of the paper's Figure 3.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 9 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import numpy as np

from dsa_ref import cost

h, d_qk, d_v = 128, 576, 512  # MLA in MQA mode: 128 heads over a 512 + 64 latent, values 512 wide
h_mha, d_qk_mha, d_v_mha = 128, 192, 128  # MHA mode: per-head keys 128 + 64, values 128
h_i, d_i, k = 64, 128, 2048  # the lightning indexer and the top-k

# %% [markdown]
# ## Step 1: FLOPs per token
#
# A multiply-add is 2 FLOPs. Per key, attention costs $d_{qk}$ multiply-adds for $q\cdot k$ and
# $d_v$ for $p\,v$, in each of $h$ heads; the indexer costs $d_I$ in each of $H_I$ heads:
#
# $$
# F_{\text{dense}}(t) = 2 h t (d_{qk} + d_v), \qquad
# F_{\text{DSA}}(t) = 2 H_I d_I\, t + 2 h \min(t, k)(d_{qk} + d_v)
# $$

# %%
t = np.arange(1, 131073)
dense_decode = 2 * h * t * (d_qk + d_v)
dsa = 2 * h_i * d_i * t + 2 * h * np.minimum(t, k) * (d_qk + d_v)
np.testing.assert_array_equal(cost.dense_token_cost(t).flops, dense_decode)
np.testing.assert_array_equal(cost.dsa_token_cost(t).flops, dsa)
print(f"per key: MLA {2 * h * (d_qk + d_v):,} FLOPs, indexer {2 * h_i * d_i:,} FLOPs "
      f"({(d_qk + d_v) * h / (h_i * d_i):.0f}x cheaper)")

# %% [markdown]
# ## Step 2: the crossover
#
# For $t \le k$, DSA does *all* of dense attention's work plus the indexer's: it never pays there.
# Beyond $k$ its attention term is constant, and it pays once
# $2h(d_{qk}+d_v)\,t > 2H_Id_I\,t + 2h(d_{qk}+d_v)\,k$, that is for
# $t > k \cdot \frac{h(d_{qk}+d_v)}{h(d_{qk}+d_v) - H_I d_I}$.

# %%
mla_per_key, index_per_key = 2 * h * (d_qk + d_v), 2 * h_i * d_i
decode_crossover = int(np.floor(mla_per_key * k / (mla_per_key - index_per_key))) + 1
assert decode_crossover == cost.crossover(phase="decode", metric="flops")
print(f"decode: DSA needs fewer FLOPs from {decode_crossover:,} keys of context on")

# Prefill runs dense attention in the cheaper MHA mode (192-wide keys): the crossover moves out.
mha_per_key = 2 * h_mha * (d_qk_mha + d_v_mha)
prefill_crossover = int(np.floor(mla_per_key * k / (mha_per_key - index_per_key))) + 1
assert prefill_crossover == cost.crossover(phase="prefill", metric="flops")
print(f"prefill: from {prefill_crossover:,} keys on (dense prefill in MHA mode)")

# %% [markdown]
# ## Step 3: bytes per decode step
#
# Decode is bound by memory more than by arithmetic. Dense MLA reads every cached latent row
# (656 bytes each in the FP8 cache, [tutorial 5](05_fp8_kv_cache.py)); DSA reads every indexer
# key (128 fp8 bytes + a 4-byte scale), writes and re-reads a float32 score per key for top-k,
# and reads only $\min(t, k)$ latent rows.

# %%
dense_bytes = 656 * t
dsa_bytes = (132 + 8) * t + 8 * k + 656 * np.minimum(t, k)
np.testing.assert_array_equal(cost.dense_token_cost(t).bytes, dense_bytes)
np.testing.assert_array_equal(cost.dsa_token_cost(t).bytes, dsa_bytes)
bytes_crossover = cost.crossover(metric="bytes")
assert dsa_bytes[bytes_crossover - 2] >= dense_bytes[bytes_crossover - 2] and dsa_bytes[bytes_crossover - 1] < dense_bytes[bytes_crossover - 1]
fused = cost.crossover(cost.V32.replace(score_bytes=0), metric="bytes")
print(f"decode bytes: DSA reads less from {bytes_crossover:,} keys on ({fused:,} with a fused indexer + top-k)")

# %% [markdown]
# ## Step 4: the picture
#
# Per-token cost against position, as in the paper's Figure 3 (which plots measured cost per
# million tokens on H800s; here the counts). Both DSA lines bend at $k = 2048$ and then rise at
# the indexer's slope only.

# %%
positions = np.unique(np.geomspace(64, 131072, 300).astype(np.int64))
figure, axes = plt.subplots(1, 3, figsize=(14, 4))
for axis, (phase, metric, unit, label) in zip(axes, [("decode", "flops", 1e9, "GFLOP / token, decode"),
                                                      ("prefill", "flops", 1e9, "GFLOP / token, prefill"),
                                                      ("decode", "bytes", 1e6, "MB read / token, decode")]):
    dense_cost = getattr(cost.dense_token_cost(positions, phase=phase), metric) / unit
    dsa_cost = getattr(cost.dsa_token_cost(positions, phase=phase), metric) / unit
    axis.plot(positions / 1024, dense_cost, label="dense MLA")
    axis.plot(positions / 1024, dsa_cost, label="DSA")
    point = cost.crossover(phase=phase, metric=metric)
    axis.axvline(point / 1024, color="gray", linestyle=":", label=f"crossover {point:,}")
    axis.set_xlabel("position (K tokens)")
    axis.set_title(label)
    axis.legend(fontsize=8)
figure.tight_layout()
plt.show()

# %% [markdown]
# ## Step 5: a whole sequence, and where it does *not* pay
#
# Summed over a causal prefill of $L$ tokens, dense costs $\propto L^2/2$ and DSA
# $\propto H_Id_I L^2/2 + h(d_{qk}+d_v)\,kL$: the ratio tends to $h(d_{qk}+d_v)/(H_Id_I)$ (17 in
# MQA terms, 5 against MHA-mode prefill) but only slowly. Short prompts (a few thousand tokens)
# gain nothing, and the paper's deployment indeed keeps a dense (masked MHA) path for short
# prefills. A kernel that is not fast makes all of this moot: DSA's FLOP savings only show up in
# time when its indexer, top-k and gather run near the hardware's rates (see the benchmarks).

# %%
lengths = np.array([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
dense_total = np.array([cost.attention_flops(np.arange(1, L + 1), h_mha, d_qk_mha, d_v_mha) for L in lengths])
dsa_total = np.array([cost.indexer_flops(np.arange(1, L + 1), h_i, d_i)
                      + cost.attention_flops(np.minimum(np.arange(1, L + 1), k), h, d_qk, d_v) for L in lengths])
for L, dense_flop, dsa_flop in zip(lengths, dense_total, dsa_total):
    print(f"prefill of {L:>7,} tokens: dense (MHA) {dense_flop / 1e12:9.2f} TFLOP, DSA {dsa_flop / 1e12:8.2f} TFLOP, "
          f"ratio {dense_flop / dsa_flop:5.2f}")
assert dense_total[0] < dsa_total[0] and dense_total[-1] > 3 * dsa_total[-1]

plt.figure(figsize=(6, 3.5))
plt.semilogx(lengths, dense_total / dsa_total, marker="o")
plt.axhline(1, color="gray", linestyle=":")
plt.xlabel("prefill length L (tokens)")
plt.ylabel("dense FLOPs / DSA FLOPs")
plt.title("Whole-sequence prefill: DSA pays from about 16K tokens")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What you built
#
# The cost model of `dsa_ref.cost`, line by line: FLOPs and bytes per token for dense MLA and
# DSA, their crossovers, and the sequence totals. The [cost model page](../../concepts/cost-model/)
# shows the same numbers for V3.2 with the roofline estimate.
