"""``dsa-ref demo``: one DSA step on a small problem, narrated, on the active backend.

The problem has structure, so that selection means something: every query is built to attend to a
few planted earlier tokens, and the indexer sees a cheap random projection of the same vectors —
a stand-in for a trained indexer, which learns to approximate the main attention (paper §2.1).
"""

from __future__ import annotations

import argparse

import numpy as np

from . import ops, registry
from .cost import attention_flops, indexer_flops
from .reference import causal_key_ranges

D_LATENT, D_ROPE = 512, 64
D_QK = D_LATENT + D_ROPE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", help="backend name (default: the active one)")
    parser.add_argument("--tokens", type=int, default=384, help="sequence length (default 384)")
    parser.add_argument("--heads", type=int, default=16, help="main attention heads (default 16)")
    parser.add_argument("--topk", type=int, default=48, help="keys kept per query (default 48)")
    parser.add_argument("--seed", type=int, default=0)


def build_problem(rng: np.random.Generator, tokens: int, heads: int, index_heads: int = 4, index_dim: int = 64,
                  planted: int = 4):
    """Latent rows, queries that each favour ``planted`` earlier tokens, and indexer inputs."""
    kv = rng.standard_normal((tokens, D_QK))  # [s, 576]
    position = np.arange(tokens)  # [s]
    favourite = (rng.random((tokens, planted)) * (position[:, None] + 1)).astype(np.int64)  # [s, planted]
    target = kv[favourite].mean(axis=1)  # [s, 576]
    q = 1.5 * target[:, None, :] + 0.5 * rng.standard_normal((tokens, heads, D_QK))  # [s, h, 576]
    projection = rng.standard_normal((D_QK, index_dim)) / np.sqrt(D_QK)  # [576, d_i]
    k_index = kv @ projection  # [s, d_i]
    head_of = np.arange(index_heads) * heads // index_heads  # [h_i]   each indexer head reads one query head
    q_index = q[:, head_of, :] @ projection  # [s, h_i, d_i]
    weights = np.full((tokens, index_heads), 1.0 / index_heads)  # [s, h_i]
    return kv, q, q_index, k_index, weights, favourite


def _dense_attention_over(q, kv, keep, sm_scale, d_v):
    """Plain masked softmax attention in float64 (independent of the sparse code path)."""
    logits = sm_scale * np.einsum("shd,td->sht", q, kv)  # [s_q, h, s_kv]
    logits = np.where(keep[:, None, :], logits, -np.inf)  # [s_q, h, s_kv]
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))  # [s_q, h, s_kv]
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("sht,tv->shv", probs, kv[:, :d_v]), probs  # [s_q, h, d_v], [s_q, h, s_kv]


def _pick_dtype(backend) -> str:
    supported = backend.supported_dtypes.get("sparse_mla", frozenset({"float32"}))
    return "float32" if "float32" in supported else "bfloat16"


def run(args: argparse.Namespace) -> int:
    backend = registry.get_backend(args.backend)
    tokens, heads, topk = args.tokens, args.heads, args.topk
    if tokens < 2 or heads < 1 or topk < 1:
        raise ValueError(f"--tokens must be >= 2 and --heads, --topk >= 1, got {tokens}, {heads}, {topk}")
    rng = np.random.default_rng(args.seed)
    kv, q, q_index, k_index, weights, favourite = build_problem(rng, tokens, heads)
    dtype = _pick_dtype(backend)
    cast = np.float32 if dtype == "float32" else __import__("ml_dtypes").bfloat16
    q_in, kv_in = q.astype(np.float32).astype(cast), kv.astype(np.float32).astype(cast)
    key_start, key_end = causal_key_ranges(tokens, tokens)
    sm_scale = D_QK**-0.5
    last = tokens - 1

    print(f"DSA demo on backend {backend.name!r} ({backend.description}); {dtype} inputs")
    print(f"  {tokens} tokens, {heads} heads, d_qk {D_QK} (512 latent + 64 RoPE), d_v {D_LATENT}, "
          f"indexer {q_index.shape[1]} heads x {q_index.shape[2]}, top-k {topk}\n")

    scores = ops.lightning_indexer(q_index.astype(np.float32), weights.astype(np.float32), k_index.astype(np.float32),
                                   key_start=key_start, key_end=key_end, backend=backend)
    masked = int(np.isneginf(scores).sum())
    print("Step 1 - lightning indexer (eq. 1): I[t,s] = sum_j w[t,j] * ReLU(q_I[t,j] . k_I[s]), causal")
    print(f"  scores {list(scores.shape)} float32; {masked:,} entries above the diagonal are -inf")
    best = np.argsort(-scores[last])[:6]
    print(f"  query {last}: best keys " + ", ".join(f"{k} ({scores[last, k]:.2f})" for k in best))
    print(f"  (the tokens it was built to attend to: {sorted(set(favourite[last].tolist()))})\n")

    indices = ops.topk_indices(scores, topk, backend=backend)
    early = min(topk // 2, tokens - 1)
    kept_last = np.sort(indices[last][indices[last] >= 0])
    print(f"Step 2 - top-k selection (k={topk}): the only keys the main attention will read")
    print(f"  query {last} keeps {kept_last.size} of {tokens} keys: {kept_last[:16].tolist()}"
          f"{' ...' if kept_last.size > 16 else ''}")
    print(f"  query {early} sees only {early + 1} keys: {int((indices[early] >= 0).sum())} kept, "
          f"{int((indices[early] < 0).sum())} slots padded with -1\n")

    out, lse = ops.sparse_mla(q_in, kv_in, indices, sm_scale=sm_scale, d_v=D_LATENT, backend=backend)
    keep = np.zeros((tokens, tokens + 1), bool)
    keep[np.arange(tokens)[:, None], np.where(indices >= 0, indices, tokens)] = True
    exact_q, exact_kv = q_in.astype(np.float64), kv_in.astype(np.float64)
    dense_same_keys, _ = _dense_attention_over(exact_q, exact_kv, keep[:, :tokens], sm_scale, D_LATENT)
    print("Step 3 - sparse MLA in MQA mode (eq. 2): all heads share each gathered 576-wide latent row")
    print(f"  out {list(out.shape)}, lse {list(lse.shape)} (natural log)")
    print(f"  vs dense attention over the same keys (float64): max |diff| = "
          f"{np.abs(out - dense_same_keys).max():.2e}\n")

    causal = np.tril(np.ones((tokens, tokens), bool))
    _, dense_probs = _dense_attention_over(exact_q, exact_kv, causal, sm_scale, D_LATENT)
    head_mass = dense_probs.mean(axis=1)  # [s_q, s_kv]   head-averaged attention of dense causal MLA
    captured = (head_mass * keep[:, :tokens]).sum(axis=1)  # [s_q]
    long_rows = np.arange(tokens) + 1 > topk
    print("Attention mass captured: share of dense causal attention that falls on the selected keys")
    if long_rows.any():
        print(f"  queries with more than {topk} visible keys: mean {100 * captured[long_rows].mean():.1f}%, "
              f"min {100 * captured[long_rows].min():.1f}%")
        print(f"  a random choice of {topk} keys would capture {100 * np.mean(topk / (np.arange(tokens)[long_rows] + 1)):.1f}%"
              " on average\n")
    else:
        print(f"  every query sees at most {topk} keys, so the selection keeps everything: 100%\n")

    context = np.arange(1, tokens + 1)
    dense = attention_flops(context, heads=heads, d_qk=D_QK, d_v=D_LATENT)
    sparse = attention_flops(np.minimum(context, topk), heads=heads, d_qk=D_QK, d_v=D_LATENT)
    index = indexer_flops(context, index_heads=q_index.shape[1], index_dim=q_index.shape[2])
    print("FLOPs (2 x multiply-adds) of this step")
    print(f"  dense causal MLA: {dense / 1e9:.3f} GFLOP;  DSA: indexer {index / 1e9:.3f} + sparse MLA "
          f"{sparse / 1e9:.3f} = {(index + sparse) / 1e9:.3f} GFLOP")
    at = 128 * 1024
    dense_v32 = attention_flops(np.array([at]), heads=128, d_qk=D_QK, d_v=D_LATENT)
    dsa_v32 = (indexer_flops(np.array([at]), index_heads=64, index_dim=128)
               + attention_flops(np.array([2048]), heads=128, d_qk=D_QK, d_v=D_LATENT))
    print(f"  DeepSeek-V3.2 scale, one token at position 128K: dense {dense_v32 / 1e9:.1f} GFLOP, "
          f"DSA {dsa_v32 / 1e9:.2f} GFLOP ({dense_v32 / dsa_v32:.0f}x fewer)")
    return 0
