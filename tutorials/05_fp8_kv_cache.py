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
# # Tutorial 5: the FP8 KV cache
#
# A DSA decode step reads, per token of context, one indexer key and (for the $k$ selected
# tokens) one 576-wide latent row. V3.2 stores both in fp8 e4m3: the latent row as a
# **656-byte** record instead of 1152 bytes of bfloat16. This tutorial builds the format byte
# by byte and checks it against `dsa_ref.pack_kv_cache_fp8`.
#
# Block-scaled fp8: each block of 128 values gets one scale $\sigma$ so that the block's largest
# magnitude lands at e4m3's largest finite value, 448:
#
# $$
# \sigma = \frac{\max(\mathrm{amax}, 10^{-4})}{448},\qquad
# \sigma_{\mathrm{ue8m0}} = 2^{\lceil \log_2 \sigma \rceil},\qquad
# \hat x = \mathrm{e4m3}(x / \sigma),\qquad x \approx \sigma\, \hat x
# $$
#
# The ue8m0 variant (an unsigned 8-bit exponent, DeepGEMM's and FlashMLA's scale format) rounds
# the scale *up* to a power of two: $x/\sigma$ still fits, and dequantization is an exact shift.

# %%
try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError:
    raise SystemExit("Tutorial 5 plots with matplotlib, which is not installed: pip install 'dsa-ref[plot]'") from None

import ml_dtypes
import numpy as np

import dsa_ref
from dsa_ref.testing import assert_close, tolerance_for

rng = np.random.default_rng(5)
tokens = 64
kv = rng.standard_normal((tokens, 576)) * np.linspace(0.05, 3.0, 576)  # columns of very different scale

# %% [markdown]
# ## Step 1: block scales and e4m3 rounding
#
# Rounding to e4m3 is left to `ml_dtypes` (round to nearest even), never done by hand.

# %%
def quantize_by_hand(x, block=128, ue8m0=False):
    blocks = x.reshape(*x.shape[:-1], -1, block)  # [..., n/block, block]
    scale = np.maximum(np.abs(blocks).max(-1), 1e-4) / 448.0  # [..., n/block]
    if ue8m0:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    x_fp8 = (blocks / scale[..., None].astype(np.float64)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    return x_fp8.reshape(x.shape), scale


latent = kv[:, :512]
for ue8m0 in (False, True):
    ours, our_scales = quantize_by_hand(latent, ue8m0=ue8m0)
    lib, lib_scales = dsa_ref.quantize_fp8(latent, block=128, scale_format="ue8m0" if ue8m0 else "fp32")
    assert np.array_equal(our_scales, lib_scales)
    assert np.array_equal(ours.view(np.uint8), lib.view(np.uint8))  # bit for bit
print("scales of token 0, fp32:", dsa_ref.quantize_fp8(latent[:1])[1][0])
print("scales of token 0, ue8m0:", dsa_ref.quantize_fp8(latent[:1], scale_format="ue8m0")[1][0],
      "(powers of two)")

# %% [markdown]
# ## Step 2: what fp8 costs
#
# e4m3 has 3 mantissa bits: a relative rounding error of at most $2^{-4}$ for values in its normal
# range. Values far below their block's largest one fall into the subnormals and lose more; the
# ue8m0 scale, rounded up, uses the range slightly less well than the exact fp32 scale.

# %%
relative = {}
for fmt in ("fp32", "ue8m0"):
    x_fp8, scales = dsa_ref.quantize_fp8(latent, scale_format=fmt)
    restored = dsa_ref.dequantize_fp8(x_fp8, scales).astype(np.float64)
    relative[fmt] = np.abs(restored - latent) / np.abs(latent)
    normal = np.abs(latent) / np.repeat(scales, 128, axis=-1) >= 2.0 ** -6  # e4m3's smallest normal
    assert relative[fmt][normal].max() <= 2.0 ** -4 + 1e-12
    print(f"{fmt:6s}: median relative error {np.median(relative[fmt]):.4f}, "
          f"max over normal values {relative[fmt][normal].max():.4f} (bound 0.0625)")

plt.figure(figsize=(7, 3.4))
bins = np.linspace(-6, 0, 80)
for fmt, errors in relative.items():
    plt.hist(np.log10(errors[errors > 0]), bins=bins, alpha=0.6, label=f"{fmt} scales")
plt.axvline(np.log10(2.0 ** -4), color="gray", linestyle=":", label="e4m3 half-ulp, 2^-4")
plt.xlabel("log10 relative error of a dequantized latent value")
plt.ylabel("values")
plt.legend()
plt.title("Block-scaled e4m3, 128 values per scale")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Step 3: the 656-byte row
#
# | bytes | what |
# | --- | --- |
# | 0–511 | the 512 latent values, e4m3 |
# | 512–527 | 4 float32 scales (ue8m0: powers of two), one per 128 latent values |
# | 528–655 | the 64 RoPE dims, **bfloat16**, not quantized (few, and outlier-prone) |
#
# $512 + 16 + 128 = 656$ bytes, against $576 \times 2 = 1152$ for a bfloat16 row.

# %%
def pack_by_hand(kv):
    latent_fp8, scales = quantize_by_hand(kv[:, :512], ue8m0=True)
    rope = kv[:, 512:].astype(np.float32).astype(ml_dtypes.bfloat16)
    return np.concatenate([latent_fp8.view(np.uint8),
                           scales.astype("<f4").view(np.uint8),
                           rope.view(np.uint8)], axis=-1)


packed = pack_by_hand(kv)
assert packed.shape == (tokens, 656) and packed.dtype == np.uint8 and dsa_ref.KV_CACHE_FP8_BYTES == 656
assert np.array_equal(packed, dsa_ref.pack_kv_cache_fp8(kv))  # byte for byte
print("first scale of token 0, read from bytes 512..515:", packed[0, 512:516].view("<f4")[0])
print(f"bytes per token: fp8 row {packed.shape[1]}, bf16 row {576 * 2} ({576 * 2 / 656:.2f}x more)")

# %% [markdown]
# ## Step 4: reading it back, and attending over it
#
# Unpacking is exact arithmetic: an e4m3 value times a power of two, and a bfloat16, are both
# representable in float32. So sparse MLA over the packed cache must equal sparse MLA over the
# unpacked floats, and `dsa_ref.sparse_mla` accepts the uint8 `[s_kv, 656]` cache directly.

# %%
unpacked = dsa_ref.unpack_kv_cache_fp8(packed)  # [tokens, 576] float32
latent_back = packed[:, :512].view(ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(tokens, 4, 128)
latent_back = (latent_back * packed[:, 512:528].copy().view("<f4")[..., None]).reshape(tokens, 512)
assert np.array_equal(unpacked[:, :512], latent_back)
assert np.array_equal(unpacked[:, 512:], kv[:, 512:].astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))

q = rng.standard_normal((4, 8, 576)).astype(np.float32)
indices = np.stack([rng.choice(tokens, 16, replace=False) for _ in range(4)]).astype(np.int32)
from_packed, lse_packed = dsa_ref.sparse_mla(q, packed, indices)
from_floats, lse_floats = dsa_ref.sparse_mla(q, unpacked, indices)
assert np.array_equal(from_packed, from_floats) and np.array_equal(lse_packed, lse_floats)
exact, _ = dsa_ref.sparse_mla(q, kv.astype(np.float32), indices)
drift = np.abs(from_packed - exact).max() / np.abs(exact).max()
print(f"attention over the fp8 cache vs the unquantized rows: max error {drift:.2%} of the largest output")

# %% [markdown]
# The attention output moves by about fp8's rounding (a few percent at worst, element-wise):
# this is a *format* error, the same for every correct implementation, which is why the
# conformance kit compares backends against the reference on the **dequantized** values and
# with the tolerance of the query's dtype (`tolerance_for("float32")` here).

# %%
print(assert_close(from_packed, from_floats, tolerance_for("float32"), name="out over the packed cache"))

# %% [markdown]
# Next: the cache as a serving engine lays it out, in pages: [paged decode](06_paged_decode.py).
