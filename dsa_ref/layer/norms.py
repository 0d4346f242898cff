"""RMSNorm (MLA's latents), LayerNorm (the indexer key) and the Hadamard rotation (the indexer's q and k)."""

from __future__ import annotations

import numpy as np

#: The official layer's epsilon for both norms.
NORM_EPS = 1e-6


def rms_norm(x, weight, eps: float = NORM_EPS) -> np.ndarray:
    r""":math:`\mathrm{RMSNorm}(x) = x / \sqrt{\overline{x^2} + \epsilon} \odot g`, float64 ``[..., n]``."""
    x = np.asarray(x, np.float64)  # [..., n]
    inverse_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    return x * inverse_rms * np.asarray(weight, np.float64)  # [..., n]


def layer_norm(x, weight, bias, eps: float = NORM_EPS) -> np.ndarray:
    r""":math:`\mathrm{LayerNorm}(x) = (x - \bar x) / \sqrt{\mathrm{Var}\,x + \epsilon} \odot g + b`, float64 ``[..., n]``."""
    x = np.asarray(x, np.float64)  # [..., n]
    centered = x - x.mean(axis=-1, keepdims=True)  # [..., n]
    inverse_std = 1.0 / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + eps)  # [..., 1]
    return centered * inverse_std * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)  # [..., n]


def hadamard_matrix(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix ``[n, n]`` of ±1 (``n`` a power of two), symmetric, natural order
    (the order of the fast Walsh–Hadamard transform the official code calls)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two for a Sylvester Hadamard matrix, got {n}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])  # doubles: H_2m = [[H, H], [H, -H]]
    return matrix


def hadamard_rotate(x) -> np.ndarray:
    r"""Orthonormal Hadamard rotation of the last axis, :math:`x H / \sqrt{n}`.

    Being orthonormal it leaves every dot product :math:`q \cdot k` unchanged; it only spreads
    outlier channels across all dims so that fp8 block quantization loses less. It is its own
    inverse (``H`` is symmetric and ``H H = n I``).
    """
    x = np.asarray(x, np.float64)  # [..., n]
    n = x.shape[-1]
    return x @ hadamard_matrix(n) * n ** -0.5  # [..., n]
