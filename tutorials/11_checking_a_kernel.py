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
# # Tutorial 11: Checking someone else's kernel with the kit
#
# You have a sparse-MLA kernel — yours, a colleague's, a peer's — and want to know whether it
# computes DSA's sparse attention, on every awkward input and not just the one in its test. The
# conformance kit (`dsa_ref.testing`) answers that: wrap the kernel as a `dsa_ref.Backend` in a
# few lines, run `check_backend`, and read the report. Here the kernel is a small torch function
# with one subtle bug; we find it from the report, fix it, and pass.

# %%
try:
    import matplotlib.pyplot as plt
    import torch
    import hypothesis  # noqa: F401 - check_backend draws its inputs with hypothesis
except ModuleNotFoundError as missing:
    raise SystemExit(f"Tutorial 11 needs {missing.name}, which is not installed: "
                     "pip install 'dsa-ref[plot,triton]' hypothesis") from None

import math

import numpy as np

import dsa_ref
from dsa_ref.testing import check_backend, check_problem, sparse_mla_problem

# %% [markdown]
# ## Someone's kernel
#
# Sparse MLA of query $i$, head $h$ over its index slots: $\ell_{i,h,t} = \sigma\, q_{i,h}\cdot
# kv_{\mathrm{idx}_{i,t}}$, softmax over the *valid* slots, times the first $d_v$ columns. The
# kernel below gathers the rows, masks slots marked `-1` (and those past `topk_length`), takes the
# softmax, and folds in the attention sink.

# %%
def finish(logits, rows, masked, d_v, topk_length, attn_sink):
    """Softmax over the unmasked slots (the first topk_length[i] only), times V; the sink in the denominator."""
    if topk_length is not None:
        masked = masked | (torch.arange(masked.shape[1])[None, :] >= topk_length[:, None])
    logits = logits.masked_fill(masked[:, None, :], -math.inf)  # [s_q, h, topk]
    lse = torch.logsumexp(logits, dim=-1)  # [s_q, h]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("iht,itd->ihd", probs, rows[..., :d_v].float())  # [s_q, h, d_v]
    if attn_sink is not None:
        out = out * torch.sigmoid(lse - attn_sink.float()[None, :])[..., None].nan_to_num(0.0)
    return out, lse


def someones_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length=None, attn_sink=None):
    rows = kv[indices.long()]  # [s_q, topk, d_qk]
    logits = sm_scale * torch.einsum("ihd,itd->iht", q.float(), rows.float())  # [s_q, h, topk]
    return finish(logits, rows, indices == -1, d_v, topk_length, attn_sink)


# %% [markdown]
# ## Wrapping it as a backend
#
# A backend declares what it consumes (torch tensors on the CPU), which dtypes it takes, and
# implements the op. dsa-ref validates and converts the arguments before calling it.

# %%
class SomeonesBackend(dsa_ref.Backend):
    name = "someones"
    array_kind = "torch"
    devices = ("cpu",)
    supported_dtypes = {"sparse_mla": frozenset({"float32", "bfloat16", "float16"})}
    kernel = staticmethod(someones_sparse_mla)

    def not_supported_reasons(self, op, **inputs):
        reasons = super().not_supported_reasons(op, **inputs)
        kv = inputs.get("kv")
        if kv is not None and dsa_ref.interop.dtype_name(kv) == "uint8":
            reasons.append("kv is the packed FP8 cache (this kernel reads float rows)")
        return reasons

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        return self.kernel(q, kv, indices, sm_scale, d_v, topk_length, attn_sink)


report = check_backend(SomeonesBackend(), "ci", ops_to_check=["sparse_mla"])
print(report)
assert not report.ok

# %% [markdown]
# ## Reading the report
#
# The report says what failed and on which input, shrunk by hypothesis to a small one (a wrong value
# would show the worst element and its error ratio; here the kernel raised). The input has *invalid indices*: the kit draws them from
# $\{-2^{31}, -1, s_{kv}, 2^{31}-1\}$, and the kernel masks only `-1`. Worse, torch reads
# `kv[-1]` as the last row and `kv[-2**31]` raises. Run that input once by hand:

# %%
failure = report.ops[0].failures[0]
print(failure)
problem = sparse_mla_problem(np.random.default_rng(0), s_q=6, s_kv=10, h=2, d_qk=16, d_v=8, topk=6,
                             dtype="float32", invalid_fraction=0.5)
indices = torch.from_numpy(problem.inputs["indices"])
q, kv = torch.from_numpy(problem.inputs["q"]), torch.from_numpy(problem.inputs["kv"])
invalid = (indices < 0) | (indices >= kv.shape[0])
assert invalid.any()
expected_out, _ = dsa_ref.reference.sparse_mla(**problem.inputs)
safe = torch.where(invalid, -1, indices)  # the one pattern this kernel handles
out, _ = someones_sparse_mla(q, kv, safe, problem.inputs.get("sm_scale") or 16**-0.5, 8)
assert np.allclose(out.numpy(), expected_out, atol=1e-5)  # -1 alone is handled ...
try:
    someones_sparse_mla(q, kv, indices, problem.inputs.get("sm_scale") or 16**-0.5, 8)
    raised = None
except IndexError as error:  # ... any other invalid index is read
    raised = error
print("with the kit's invalid indices:", raised)

# %% [markdown]
# ## The fix, and a pass
#
# An index is invalid when it is outside $[0, s_{kv})$, whatever its value: mask it, and never
# read it (gather a safe row 0 in its place).

# %%
def fixed_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length=None, attn_sink=None):
    invalid = (indices < 0) | (indices >= kv.shape[0])  # [s_q, topk]
    rows = kv[torch.where(invalid, 0, indices).long()]  # [s_q, topk, d_qk]   never read an invalid index
    logits = sm_scale * torch.einsum("ihd,itd->iht", q.float(), rows.float())
    return finish(logits, rows, invalid, d_v, topk_length, attn_sink)


class FixedBackend(SomeonesBackend):
    name = "someones-fixed"
    kernel = staticmethod(fixed_sparse_mla)


fixed = check_backend(FixedBackend(), "ci", ops_to_check=["sparse_mla"])
print(fixed)
assert fixed.ok and fixed.ops[0].ran > 0
check_problem(FixedBackend(), problem)

# %% [markdown]
# How close the fixed kernel is, per example kind: the error ratio is the worst element's error
# over what the tolerance allows (1 is the limit).

# %%
ratios = [op.worst_error_ratio for op in fixed.ops]
plt.bar(["sparse_mla (fixed)"], ratios)
plt.axhline(1.0, color="red", linestyle="--", label="tolerance")
plt.ylabel("worst error ratio")
plt.legend()
plt.show()

# %% [markdown]
# ## The same for FlashMLA, TileLang, DeepGEMM and sglang on a GPU
#
# `dsa_ref.testing.adapters` holds such wrappers for the peers' kernels, imported from your own
# installation and translating their conventions explicitly (FlashMLA's base-2 prefill `lse` and
# `+inf` empty rows, `[s_q, 1, topk]` indices, the `[blocks, 64, 1, 656]` decode cache; TileLang's
# causal positions and `s_kv` sentinel). On a GPU machine with the peer installed:
#
# ```sh
# dsa-ref check --backend module://dsa_ref.testing.adapters:FlashMLA --ops sparse_mla
# TL_EXAMPLES=path/to/examples dsa-ref check --backend module://dsa_ref.testing.adapters:TileLangSparseMLA --ops sparse_mla
# python tools/peers_check.py --out docs/pages/results/peers.json   # every adapter whose peer imports
# ```
#
# Here, without the peers, an adapter says why it cannot run:

# %%
from dsa_ref.testing import adapters

reasons = adapters.FlashMLA().unavailable_reasons()
print("\n".join(reasons) or "FlashMLA imports here")
assert isinstance(reasons, list)
