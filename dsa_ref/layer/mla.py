"""Multi-head latent attention (MLA): its projections and its two equivalent modes.

Query path: ``c^Q = RMSNorm(W_DQ h)``, ``q = W_UQ c^Q`` split into ``q_nope`` and ``q_pe``, with
interleaved RoPE (YaRN frequencies) on ``q_pe``. KV path: ``W_DKV h`` split into the latent
``c^KV`` (RMSNorm'd) and ``k_pe`` (RoPE'd), one of each per token, shared by all heads.
``wkv_b`` holds, per head, W_UK (latent -> k_nope) and W_UV (latent -> v).

* **MHA mode** expands the latent into per-head ``k = [W_UK c^KV ; k_pe]`` and ``v = W_UV c^KV``:
  an ordinary attention with 192-wide keys. Training and short prefills use it.
* **MQA mode** absorbs W_UK into the query, ``q' = [W_UK^T q_nope ; q_pe]`` (576 wide), so every head
  attends to the same 576-wide latent row, and applies W_UV after attention. Since
  ``q_nope · (W_UK c) = (W_UK^T q_nope) · c``, both modes compute the same function; DSA's sparse
  kernels use MQA mode because one latent row per token is all they read.
"""

from __future__ import annotations

import numpy as np

from .config import DSAConfig
from .norms import rms_norm
from .rope import apply_rope


def mla_queries(x, wq_a, q_norm_weight, wq_b, angles, config: DSAConfig):
    """The query path.

    Args:
        x: ``[n, dim]`` hidden states.
        wq_a: ``[q_lora_rank, dim]``.
        q_norm_weight: ``[q_lora_rank]``.
        wq_b: ``[n_heads * (nope + rope), q_lora_rank]``.
        angles: ``[n, rope / 2]`` RoPE angles of the tokens' positions.
        config: the layer's shapes.

    Returns:
        ``(q_nope [n, h, nope], q_pe [n, h, rope], qr [n, q_lora_rank])``, float64; ``qr`` (c^Q) also
        feeds the indexer.
    """
    qr = rms_norm(np.asarray(x, np.float64) @ np.asarray(wq_a, np.float64).T, q_norm_weight)  # [n, q_lora]
    q = (qr @ np.asarray(wq_b, np.float64).T).reshape(-1, config.n_heads, config.qk_head_dim)  # [n, h, nope+rope]
    q_nope, q_pe = q[..., :config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]  # [n, h, nope], [n, h, rope]
    return q_nope, apply_rope(q_pe, angles, interleaved=True), qr


def mla_latent_kv(x, wkv_a, kv_norm_weight, angles, config: DSAConfig):
    """The KV path: what the latent cache stores for each token.

    Args:
        x: ``[n, dim]`` hidden states.
        wkv_a: ``[kv_lora_rank + rope, dim]``.
        kv_norm_weight: ``[kv_lora_rank]``.
        angles: ``[n, rope / 2]`` RoPE angles of the tokens' positions.
        config: the layer's shapes.

    Returns:
        ``(latent [n, kv_lora_rank], k_pe [n, rope])``, float64.
    """
    kv = np.asarray(x, np.float64) @ np.asarray(wkv_a, np.float64).T  # [n, c + rope]
    latent = rms_norm(kv[:, :config.kv_lora_rank], kv_norm_weight)  # [n, c]
    k_pe = apply_rope(kv[:, config.kv_lora_rank:], angles, interleaved=True)  # [n, rope]
    return latent, k_pe


def split_wkv_b(wkv_b, config: DSAConfig):
    """W_UK ``[h, nope, c]`` and W_UV ``[h, v, c]`` out of ``wkv_b [h * (nope + v), c]``."""
    per_head = np.asarray(wkv_b, np.float64).reshape(config.n_heads, config.qk_nope_head_dim + config.v_head_dim, -1)
    return per_head[:, :config.qk_nope_head_dim], per_head[:, config.qk_nope_head_dim:]


def absorb_queries(q_nope, q_pe, w_uk) -> np.ndarray:
    """MQA-mode queries ``[n, h, c + rope]``: ``[W_UK^T q_nope ; q_pe]`` (576 wide in V3.2)."""
    q_latent = np.einsum("nhd,hdc->nhc", q_nope, w_uk)  # [n, h, c]
    return np.concatenate([q_latent, q_pe], axis=-1)  # [n, h, c + rope]


def project_values(out_latent, w_uv) -> np.ndarray:
    """MQA mode's last step: per-head values out of the attended latent, ``[n, h, v]`` = W_UV · out."""
    return np.einsum("nhc,hvc->nhv", np.asarray(out_latent, np.float64), w_uv)  # [n, h, v]


def _masked_softmax(logits, visible) -> np.ndarray:
    """Softmax over the last axis restricted to ``visible``; an all-hidden row gives all zeros."""
    logits = np.where(visible, logits, -np.inf)  # [n, h, s]
    row_max = logits.max(axis=-1, keepdims=True)  # [n, h, 1]
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)  # [n, h, s]   0 where hidden
    total = weights.sum(axis=-1, keepdims=True)  # [n, h, 1]
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # [n, h, s]


def mha_probabilities(q_nope, q_pe, latent, k_pe, w_uk, visible, sm_scale: float) -> np.ndarray:
    """MHA-mode attention probabilities ``[n, h, s_kv]`` (float64): per-head keys expanded from the latent.

    Args:
        q_nope: ``[n, h, nope]``.
        q_pe: ``[n, h, rope]``, RoPE applied.
        latent: ``[s_kv, c]`` the cached c^KV.
        k_pe: ``[s_kv, rope]``, RoPE applied.
        w_uk: ``[h, nope, c]``.
        visible: bool ``[n, s_kv]`` (causal and/or selected keys).
        sm_scale: softmax scale.
    """
    k_nope = np.einsum("hdc,sc->shd", w_uk, latent)  # [s_kv, h, nope]   W_UK c^KV per head
    logits = np.einsum("nhd,shd->nhs", q_nope, k_nope) + np.einsum("nhr,sr->nhs", q_pe, k_pe)  # [n, h, s_kv]
    return _masked_softmax(sm_scale * logits, np.asarray(visible)[:, None, :])  # [n, h, s_kv]


def mha_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, visible, sm_scale: float) -> np.ndarray:
    """MHA mode: dense attention with per-head k = [W_UK c ; k_pe], v = W_UV c. float64 ``[n, h, v]``.

    Rows with no visible key give 0 (as :func:`dsa_ref.sparse_mla` does).
    """
    probs = mha_probabilities(q_nope, q_pe, latent, k_pe, w_uk, visible, sm_scale)  # [n, h, s_kv]
    values = np.einsum("hvc,sc->shv", w_uv, latent)  # [s_kv, h, v]   W_UV c^KV per head
    return np.einsum("nhs,shv->nhv", probs, values)  # [n, h, v]


def mqa_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, visible, sm_scale: float) -> np.ndarray:
    """MQA mode, dense and in float64: absorbed queries over the shared 576-wide latent rows, then W_UV.

    The same function as :func:`mha_attention` (paper's MQA mode of MLA); the layer runs this mode
    through the sparse core op :func:`dsa_ref.sparse_mla` with the top-k indices instead of a mask.
    """
    q = absorb_queries(q_nope, q_pe, w_uk)  # [n, h, c + rope]
    kv = np.concatenate([latent, k_pe], axis=-1)  # [s_kv, c + rope]   one row per token, all heads
    probs = _masked_softmax(sm_scale * np.einsum("nhc,sc->nhs", q, kv), np.asarray(visible)[:, None, :])  # [n, h, s_kv]
    out_latent = np.einsum("nhs,sc->nhc", probs, latent)  # [n, h, c]   V = the latent itself
    return project_values(out_latent, w_uv)  # [n, h, v]
