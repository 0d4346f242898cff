"""The lightning indexer's projections: where q_I, k_I and the head weights w come from.

The scores themselves (paper eq. 1) are the core op :func:`dsa_ref.lightning_indexer`; this file
computes its inputs as the official DeepSeek-V3.2-Exp inference code does since its 2025-11-17
fix, which made the indexer's RoPE non-interleaved (the first release rotated interleaved pairs;
vLLM PR 28968 and SGLang PR 13495 carry the same fix). Checked against it to 1.3e-6, and against
transformers 5.24's ``DeepseekV32Attention`` to 4e-7 (ties at the top-k boundary aside; that
indexer has no Hadamard rotation and no fp8):

1. ``q_I = wq_b_I(c^Q)`` per head and ``k_I = LayerNorm(wk_I(h))``, one key per token;
2. RoPE on the **first** ``qk_rope_head_dim`` dims, half-split (non-interleaved) pairs;
3. an orthonormal Hadamard rotation of q_I and k_I;
4. optionally fp8 e4m3 quantization, one scale per 128-wide head vector (the official block of 128);
5. ``w = weights_proj(h) · H_I^-0.5 · d_I^-0.5``, times each head's q scale when quantized.
"""

from __future__ import annotations

import numpy as np

from dsa_ref.reference import quantize_fp8

from .norms import hadamard_rotate, layer_norm
from .rope import apply_rope


def _rope_first_dims(x, angles, rope_dim: int) -> np.ndarray:
    """Half-split RoPE on the first ``rope_dim`` dims of the last axis; the rest pass through."""
    rotated = apply_rope(x[..., :rope_dim], angles, interleaved=False)  # [n, ..., r]
    return np.concatenate([rotated, x[..., rope_dim:]], axis=-1)  # [n, ..., d_I]


def indexer_queries(qr, wq_b, angles, *, n_heads: int, head_dim: int, rope_dim: int) -> np.ndarray:
    """Indexer queries before quantization, float64 ``[n, H_I, d_I]``.

    Args:
        qr: ``[n, q_lora_rank]`` the normalized query latent c^Q (shared with MLA's query path).
        wq_b: ``[H_I * d_I, q_lora_rank]`` (``indexer.wq_b.weight``).
        angles: ``[n, rope_dim / 2]`` RoPE angles of the tokens' positions.
    """
    q = (np.asarray(qr, np.float64) @ np.asarray(wq_b, np.float64).T).reshape(-1, n_heads, head_dim)  # [n, H_I, d_I]
    q = _rope_first_dims(q, angles, rope_dim)  # [n, H_I, d_I]
    return hadamard_rotate(q)  # [n, H_I, d_I]


def indexer_keys(x, wk, k_norm_weight, k_norm_bias, angles, *, rope_dim: int) -> np.ndarray:
    """Indexer keys before quantization, float64 ``[n, d_I]``: one key per token, shared by all heads.

    Args:
        x: ``[n, dim]`` the layer's input h.
        wk: ``[d_I, dim]`` (``indexer.wk.weight``); k_norm_weight, k_norm_bias: ``[d_I]``.
    """
    k = layer_norm(np.asarray(x, np.float64) @ np.asarray(wk, np.float64).T, k_norm_weight, k_norm_bias)  # [n, d_I]
    k = _rope_first_dims(k, angles, rope_dim)  # [n, d_I]
    return hadamard_rotate(k)  # [n, d_I]


def indexer_head_weights(x, weights_proj, *, n_heads: int, head_dim: int) -> np.ndarray:
    r"""Per-head weights :math:`w_{t,j} = (W_w h_t)_j \cdot H_I^{-1/2} d_I^{-1/2}`, float64 ``[n, H_I]``.

    The factors are positive, so they could equally sit inside the ReLU; the official code folds
    the attention-style ``d_I^-0.5`` here rather than into q.
    """
    w = np.asarray(x, np.float64) @ np.asarray(weights_proj, np.float64).T  # [n, H_I]
    return w * n_heads ** -0.5 * head_dim ** -0.5  # [n, H_I]


def quantize_indexer_queries(q, weights, scale_format: str):
    """fp8 queries with one scale per head vector; the scales move into the weights.

    Because ReLU is positively homogeneous, ``w · ReLU((s · q8) · k) = (w · s) · ReLU(q8 · k)``.

    Returns:
        ``(q_fp8 [n, H_I, d_I] float8_e4m3fn, weights [n, H_I] float64)``.
    """
    head_dim = q.shape[-1]
    q_fp8, q_scale = quantize_fp8(q, block=head_dim, scale_format=scale_format)  # [n, H_I, d_I], [n, H_I, 1]
    return q_fp8, np.asarray(weights, np.float64) * q_scale[..., 0].astype(np.float64)  # [n, H_I]


def quantize_indexer_keys(k, scale_format: str):
    """fp8 keys with one scale per key (DeepGEMM's ``kv_scales``).

    Returns:
        ``(k_fp8 [n, d_I] float8_e4m3fn, k_scale [n] float32)``.
    """
    k_fp8, k_scale = quantize_fp8(k, block=k.shape[-1], scale_format=scale_format)  # [n, d_I], [n, 1]
    return k_fp8, k_scale[:, 0]
