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
# # Tutorial 8: reading the Triton sparse-MLA kernel, step by step
#
# [Tutorial 3](03_sparse_mla.py) wrote sparse MLA and its online softmax in NumPy. Here we read
# the `triton` backend's kernel (`dsa_ref_backends/torch_triton/sparse_mla.py`) piece by piece,
# mirror each piece in NumPy, and run the real kernel against the mirror and the reference.
# Without a GPU the kernel runs on Triton's CPU interpreter (`TRITON_INTERPRET=1`), which
# executes each program with NumPy: slow, so the shapes are tiny, but it is the same kernel.
#
# Naming, as in every kernel of dsa-ref: `p_` pointers, `b_` block values, `m_` masks, `o_`
# offsets, block sizes in capitals.

# %%
import inspect
import os

try:
    import matplotlib.pyplot as plt
    import torch
except ModuleNotFoundError as missing:
    raise SystemExit(f"Tutorial 8 needs torch, triton and matplotlib, and {missing.name} is not installed: "
                     "pip install 'dsa-ref[triton,plot]'") from None

if not torch.cuda.is_available():
    # Before triton is imported: Triton decides when a kernel is defined whether to interpret it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401  (imported by the backend below; checked here to say what to install)
except ModuleNotFoundError:
    raise SystemExit("Tutorial 8 needs torch, triton and matplotlib, and triton is not installed: "
                     "pip install 'dsa-ref[triton,plot]'") from None
import numpy as np

import dsa_ref
from dsa_ref.testing import assert_close, tolerance_for
from dsa_ref_backends.torch_triton import TritonBackend
from dsa_ref_backends.torch_triton import sparse_mla as kernels

device = TritonBackend().device()
print("running on", device, "(Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
source = inspect.getsource(kernels._sparse_mla_kernel.fn).splitlines()


def show(first: str, last: str) -> None:
    """Print the kernel's lines from the first containing ``first`` to the next containing ``last``."""
    start = next(i for i, line in enumerate(source) if first in line)
    end = next(i for i in range(start, len(source)) if last in source[i])
    print("\n".join(source[start:end + 1]))

# %% [markdown]
# ## Step 1: the grid, and the launch choices
#
# One program per (query, block of `BLOCK_H` heads, slot split). All heads of a query share
# the gathered latent rows, so a program takes many heads at once: the products become
# `[BLOCK_H, 576] x [576, BLOCK_T]` matrix products that tensor cores can run.

# %%
s_q, h, s_kv, topk, d_qk, d_v = 3, 16, 96, 48, 576, 512
launch = kernels.sparse_mla_config(s_q, h, topk, d_v, d_qk, False, torch.float32, device)
print(launch)
print("grid = (queries, head blocks, splits) =", (s_q, -(-h // launch["BLOCK_H"]), launch["num_splits"]))
show("query = tl.program_id(0)", "b_q_rest = b_q_rest.to")

# %% [markdown]
# The 576 columns are split into the first `d_v` = 512 (which are also the value) and the rest
# (the 64 RoPE columns, padded to a power of two `D_R`): Triton's blocks have power-of-two
# sizes, and 576 is not one. The logit is the sum of the two partial products.
#
# ## Step 2: gather without ever reading an invalid row
#
# Each iteration loads `BLOCK_T` indices. An invalid one (`< 0` or `>= s_kv`) is replaced by row
# 0 **and** masked, so the load touches no memory for it (the masked load returns zeros), and
# its logit is set to $-\infty$.

# %%
show("for t in range(slot_begin", "b_logits = tl.where(m_valid")

# %% [markdown]
# ## Step 3: the online softmax, in base 2
#
# `exp2` is the GPU's native exponential, so the kernel folds $\log_2 e$ into the scale once
# (`scale_log2 = sm_scale * log2(e)`) and works with base-2 logits. The running max of a head
# that has seen no valid slot stays $-\infty$; subtracting 0 instead keeps `exp2` at 0, not NaN.

# %%
show("b_max_new = tl.maximum", "b_max = b_max_new")

# %% [markdown]
# ## Step 4: finishing: normalize, lse back to natural log, sink
#
# $\mathrm{lse} = (m_2 + \log_2 \ell) / \log_2 e$ converts back to the natural log that dsa-ref's
# contract promises. A head with no valid slot writes `out = 0`, `lse = -inf`.

# %%
show("m_empty = b_sum == 0.0", "tl.store(p_lse_row")

# %% [markdown]
# ## Step 5: the same program in NumPy
#
# A line-for-line mirror of one program (one query, one block of heads, all slots), with the
# kernel's block sizes, base-2 softmax and split columns.

# %%
def program_in_numpy(q_row, kv, index_row, sm_scale, d_v, block_t):
    """q_row [BLOCK_H, d_qk], index_row [topk] -> (out [BLOCK_H, d_v], lse [BLOCK_H])."""
    scale_log2 = sm_scale * np.log2(np.e)
    b_q_value, b_q_rest = q_row[:, :d_v], q_row[:, d_v:]
    b_max = np.full(len(q_row), -np.inf)
    b_sum = np.zeros(len(q_row))
    b_acc = np.zeros((len(q_row), d_v))
    for t in range(0, len(index_row), block_t):
        b_index = index_row[t:t + block_t]
        m_valid = (b_index >= 0) & (b_index < len(kv))
        b_row = np.where(m_valid, b_index, 0)
        b_rows = np.where(m_valid[:, None], kv[b_row], 0.0)  # the masked load: zeros, nothing read
        b_value, b_rest = b_rows[:, :d_v], b_rows[:, d_v:]
        b_logits = b_q_value @ b_value.T + b_q_rest @ b_rest.T  # two products, one logit
        b_logits = np.where(m_valid[None, :], b_logits * scale_log2, -np.inf)
        b_max_new = np.maximum(b_max, b_logits.max(axis=1))
        b_shift = np.where(b_max_new == -np.inf, 0.0, b_max_new)
        b_rescale = np.exp2(b_max - b_shift)
        b_prob = np.exp2(b_logits - b_shift[:, None])
        b_sum = b_sum * b_rescale + b_prob.sum(axis=1)
        b_acc = b_acc * b_rescale[:, None] + b_prob @ b_value
        b_max = b_max_new
    m_empty = b_sum == 0.0
    out = np.where(m_empty[:, None], 0.0, b_acc / np.where(m_empty, 1.0, b_sum)[:, None])
    with np.errstate(divide="ignore"):
        lse = np.where(m_empty, -np.inf, (b_max + np.log2(np.where(m_empty, 1.0, b_sum))) / np.log2(np.e))
    return out, lse


rng = np.random.default_rng(8)
q = rng.standard_normal((s_q, h, d_qk)).astype(np.float32)
kv = rng.standard_normal((s_kv, d_qk)).astype(np.float32)
indices = np.stack([rng.choice(s_kv, topk, replace=False) for _ in range(s_q)]).astype(np.int32)
indices[0, 5] = -1  # padding
indices[1, :] = np.where(np.arange(topk) % 2 == 0, indices[1], s_kv + 7)  # half out of range
indices[2, :] = -1  # nothing valid
sm_scale = d_qk ** -0.5

mirror = [program_in_numpy(q[i].astype(np.float64), kv.astype(np.float64), indices[i], sm_scale, d_v,
                           launch["BLOCK_T"]) for i in range(s_q)]
mirror_out = np.stack([o for o, _ in mirror])
mirror_lse = np.stack([lse for _, lse in mirror])
reference_out, reference_lse = dsa_ref.reference.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v)
print(assert_close(mirror_out, reference_out, tolerance_for("float64"), name="NumPy mirror vs reference"))

# %% [markdown]
# ## Step 6: run the kernel
#
# The wrapper `sparse_mla(q, kv, indices, sm_scale, d_v)` allocates the outputs and launches the
# grid; `dsa_ref.sparse_mla(..., backend="triton")` reaches it through the public dispatch.

# %%
to_torch = lambda array: torch.from_numpy(array).to(device)  # noqa: E731
kernel_out, kernel_lse = kernels.sparse_mla(to_torch(q), to_torch(kv), to_torch(indices), sm_scale, d_v)
kernel_out, kernel_lse = kernel_out.cpu().numpy(), kernel_lse.cpu().numpy()
print(assert_close(kernel_out, mirror_out, tolerance_for("float32"), name="kernel out vs mirror"))
print(assert_close(kernel_lse, mirror_lse, tolerance_for("float32"), name="kernel lse vs mirror", scale_by_max=False))
assert np.all(kernel_out[2] == 0) and np.all(np.isneginf(kernel_lse[2]))  # the empty row

public_out, _ = dsa_ref.sparse_mla(q, kv, indices, backend="triton")
assert np.array_equal(public_out, kernel_out)

# %% [markdown]
# ## Step 7: split the slots (flash-decoding) and the FP8 cache
#
# With few queries the grid is too small to fill a GPU, so the wrapper can split each row's
# slots over `num_splits` programs that write partial `(out, lse)`; `_combine_kernel` merges
# them with their lse weights (tutorial 3, step 4). The same kernel also reads the packed
# 656-byte FP8 cache, dequantizing each gathered row on the fly (exactly, into bf16/fp32).

# %%
split_out, split_lse = kernels.sparse_mla(to_torch(q), to_torch(kv), to_torch(indices), sm_scale, d_v, num_splits=3)
print(assert_close(split_out.cpu().numpy(), reference_out, tolerance_for("float32"), name="3 splits vs reference"))

packed = dsa_ref.pack_kv_cache_fp8(kv)
fp8_out, _ = kernels.sparse_mla(to_torch(q), to_torch(packed), to_torch(indices), sm_scale, d_v)
fp8_reference, _ = dsa_ref.reference.sparse_mla(q, packed, indices, sm_scale=sm_scale, d_v=d_v)
print(assert_close(fp8_out.cpu().numpy(), fp8_reference, tolerance_for("float32"), name="FP8 cache vs reference"))

# %% [markdown]
# ## Step 8: how close, and why
#
# The kernel accumulates in float32 in a different order than the float64 reference, and rounds
# the probabilities to the input dtype before the $P\,V$ product, as FlashAttention does. With
# bfloat16 inputs, that rounding dominates. The histograms show the errors the tolerance policy
# (`dsa_ref.testing.tolerances`) has to allow.

# %%
import ml_dtypes

q_bf16, kv_bf16 = q.astype(ml_dtypes.bfloat16), kv.astype(ml_dtypes.bfloat16)
bf16_out, _ = dsa_ref.sparse_mla(q_bf16, kv_bf16, indices, backend="triton")
bf16_reference, _ = dsa_ref.reference.sparse_mla(q_bf16, kv_bf16, indices, sm_scale=sm_scale, d_v=d_v)
print(assert_close(bf16_out, bf16_reference, tolerance_for("bfloat16"), name="bfloat16 kernel vs reference"))

scale = np.abs(reference_out).max()
plt.figure(figsize=(7, 3.5))
for label, got, want in (("float32 inputs", kernel_out, reference_out), ("bfloat16 inputs", bf16_out, bf16_reference)):
    rows = slice(0, 2)  # the rows with valid slots
    error = np.abs(got[rows] - want[rows]).ravel() / np.abs(want).max()
    plt.hist(np.log10(error + 1e-12), bins=60, alpha=0.6, label=label)
plt.axvline(np.log10(tolerance_for("bfloat16").atol), color="gray", linestyle=":", label="bfloat16 atol (x max)")
plt.axvline(np.log10(tolerance_for("float32").atol), color="black", linestyle=":", label="float32 atol (x max)")
plt.xlabel("log10 |kernel - reference| / max |reference|")
plt.ylabel("output elements")
plt.legend(fontsize=8)
plt.title("Triton sparse MLA against the float64 reference")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the Hopper kernel adds
#
# The kernel read above runs on every GPU and on the interpreter. On Hopper (sm_90), for the
# V3.2 shape, the backend runs a second one by default: `sparse_mla_gluon.py`, written in Gluon
# (`triton.experimental.gluon`, Triton's lower-level dialect, against the API of Triton 3.6). In
# Gluon a kernel states where each tile lives (registers or shared memory, in which layout) and
# which instruction multiplies it; with `tl.dot` the compiler decides.
#
# **What limits the `tl.dot` kernel.** Each program keeps the `[64, 512]` float32 accumulator,
# the q tile and the gathered rows in registers. Compiled for sm_90 it uses 255 registers, the
# most a thread can have, and spills the rest to local memory, which every tile writes and reads
# again (`backends/torch_triton/NOTES.md`, version 1). The other `tl.dot` tilings that were tried
# spilled more or ran slower.
#
# **What the Gluon kernel does instead.** A program is still one query and 64 heads, on 8 warps
# = two warpgroups, but every operand the tensor cores read lives in shared memory:
#
# - Q (`[64, 512]` + `[64, 64]` bf16) is loaded once into shared memory: 72 KiB.
# - The gathered rows go to two shared-memory buffers, filled with 16-byte `cp.async` copies
#   issued by every thread (an invalid slot is masked: its copy reads nothing and fills zeros).
#   The copies of the next tile travel while this one is computed.
# - $S = QK^\top$ runs on `warpgroup_mma` (wgmma) with both operands in shared memory. The two
#   warpgroups split the tile's 64 slots (32 each), so S is computed once.
# - P (bf16) is exchanged through 8 KiB of shared memory: each warpgroup writes its half of the
#   columns, and both read all of P as the A operand of $O \mathrel{+}= PV$.
# - For $O \mathrel{+}= PV$ the two warpgroups split d_v: each owns 256 columns of O, 128 float32
#   accumulator registers a thread. Only this accumulator and the score tile stay in registers.
#
# In all: 224 KiB of shared memory, 255 registers, and no spills.
#
# **Measured** on one H200 (2026-12-02, torch 2.11.0+cu130, triton 3.6.0; S 4096, SKV 8192,
# top-k 2048, bf16, FLOP $= 2 \cdot S \cdot h \cdot \mathrm{topk} \cdot (576 + 512)$), in TFLOP/s:
#
# | run | h | `tl.dot` kernel | Gluon kernel | FlashMLA (SM90, sglang-kernel 0.4.3) |
# | --- | ---: | ---: | ---: | ---: |
# | SKV 8192 | 64 | 258.4 | 325.4 (1.26x) | |
# | SKV 8192 | 128 | 263.9 | 334.5 (1.27x) | |
# | another process, beside FlashMLA, SKV 8192 | 128 | | 333.2 (0.52x FlashMLA) | 641.2 |
# | the same, SKV 32768 | 128 | | 332.6 (0.54x FlashMLA) | 619.0 |
#
# So the kernel is faster than the `tl.dot` one by a quarter, and about half as fast as
# FlashMLA. What FlashMLA's kernel does that this one does not yet, as listed among the next
# steps of `NOTES.md` (version 6): producer warps that gather the rows with mbarrier-completed
# copies, instead of every thread issuing `cp.async` and the CTA-wide barriers that follow; more
# pipeline stages (a third buffer of rows does not fit beside Q in 224 KiB); and P kept in
# registers instead of the round trip through shared memory. Which of these limits the kernel
# has not been profiled yet.
#
# **When it runs.** The `triton` backend runs the Gluon kernel for the inputs it covers (bf16 q
# and rows, d_qk 576, d_v 512, h a multiple of 64, an sm_90 GPU, Triton 3.6) and the `tl.dot`
# kernel everywhere else, the interpreter included. `TritonBackend.hopper_forward = False`, or
# `DSA_REF_TRITON_GLUON=0` in the environment, selects the `tl.dot` kernel everywhere. At the
# module level, `sparse_mla(..., kernel="gluon")` or `kernel="tl"` picks one (`"tl"` by default;
# `"gluon"` raises `ValueError` with the reasons when it does not apply). Gluon kernels do not
# run on the interpreter, so here `gluon_applies` only lists why the kernel does not apply, for
# the tutorial's inputs and for bf16 inputs with 64 heads; on a Hopper GPU the cell runs the
# kernel against the reference.

# %%
from dsa_ref_backends import kernel_switch
from dsa_ref_backends.torch_triton import sparse_mla_gluon
from dsa_ref_backends.torch_triton.backend import forward_kernel

q_h64 = rng.standard_normal((s_q, 64, d_qk)).astype(np.float32).astype(ml_dtypes.bfloat16)
from_bf16 = lambda array: torch.from_numpy(array.astype(np.float32)).to(device, torch.bfloat16)  # noqa: E731 (exact)
indices_t = to_torch(indices)
hopper_forward = kernel_switch(TritonBackend.hopper_forward, "DSA_REF_TRITON_GLUON")  # as the backend reads it
cases = {"the tutorial's float32 inputs, 16 heads": (to_torch(q), to_torch(kv)),
         "bf16 inputs, 64 heads": (from_bf16(q_h64), from_bf16(kv_bf16))}
for label, (q_t, kv_t) in cases.items():
    reasons = sparse_mla_gluon.gluon_applies(q_t, kv_t, d_v, indices_t)
    chosen = forward_kernel(hopper_forward, q_t, kv_t, d_v, indices_t, None, None)
    print(f"{label}: the backend runs the {chosen!r} kernel")
    for reason in reasons:
        print("   not Gluon:", reason)
    assert (chosen == "gluon") == (hopper_forward and not reasons)

q_gluon, kv_gluon = cases["bf16 inputs, 64 heads"]
reasons = sparse_mla_gluon.gluon_applies(q_gluon, kv_gluon, d_v, indices_t)
if os.environ.get("TRITON_INTERPRET") == "1":
    assert any("TRITON_INTERPRET" in reason for reason in reasons)
if torch.cuda.is_available() and not reasons:  # a Hopper GPU: run it
    gluon_out, gluon_lse = kernels.sparse_mla(q_gluon, kv_gluon, indices_t, sm_scale, d_v, kernel="gluon")
    h64_reference, _ = dsa_ref.reference.sparse_mla(q_h64, kv_bf16, indices, sm_scale=sm_scale, d_v=d_v)
    print(assert_close(gluon_out.cpu().numpy(), h64_reference, tolerance_for("bfloat16"),
                       name="Gluon kernel vs reference"))
    assert np.all(gluon_out[2].cpu().numpy() == 0) and bool(torch.isneginf(gluon_lse[2]).all())  # the empty row

# %% [markdown]
# On a GPU the same cells run the compiled kernel. To see how fast it is, and against what
# ceilings, read the [benchmarks](../../results/benchmarks/). Next:
# [when DSA pays](09_cost_model.py).
