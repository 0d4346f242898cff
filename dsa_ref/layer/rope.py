"""Rotary position embedding with YaRN frequencies, in both pairings DeepSeek-V3.2 uses.

MLA rotates *interleaved* pairs ``(x[2i], x[2i+1])``; the indexer rotates *half-split* pairs
``(x[i], x[i + r/2])``. Mixing them up was a real bug in two serving engines.
"""

from __future__ import annotations

import math

import numpy as np

from .config import DSAConfig


def _correction_dim(rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The frequency index whose wavelength makes ``rotations`` full turns over ``seq_len``."""
    return dim * math.log(seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(config: DSAConfig) -> np.ndarray:
    r"""Per-pair rotation speeds, float64 ``[qk_rope_head_dim / 2]``.

    Plain RoPE: :math:`\omega_i = \theta^{-2i/r}`. With YaRN (``max_seq_len > original_seq_len``),
    low frequencies (index above the correction range) are divided by ``rope_factor``, high ones kept,
    and a linear ramp blends them in between (YaRN's "NTK-by-parts").
    """
    r = config.qk_rope_head_dim
    freqs = 1.0 / config.rope_theta ** (np.arange(0, r, 2, dtype=np.float64) / r)  # [r/2]
    if not config.yarn_enabled:
        return freqs
    low = max(math.floor(_correction_dim(config.beta_fast, r, config.rope_theta, config.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(config.beta_slow, r, config.rope_theta, config.original_seq_len)), r - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [r/2]
    keep = 1.0 - ramp  # [r/2]   1: keep the frequency, 0: interpolate it by rope_factor
    return freqs / config.rope_factor * (1.0 - keep) + freqs * keep  # [r/2]


def rope_angles(config: DSAConfig, positions) -> np.ndarray:
    """Rotation angle of every pair at every position: float64 ``[n, qk_rope_head_dim / 2]``."""
    return np.asarray(positions, np.float64)[:, None] * inverse_frequencies(config)[None, :]  # [n, r/2]


def apply_rope(x, angles, *, interleaved: bool) -> np.ndarray:
    r"""Rotate pairs of ``x`` by ``angles``: :math:`(a, b) \mapsto (a\cos\phi - b\sin\phi,\ a\sin\phi + b\cos\phi)`.

    Args:
        x: ``[n, ..., r]`` (token axis first; any head axes in between).
        angles: ``[n, r/2]`` from :func:`rope_angles`. Negated angles undo the rotation.
        interleaved: pairs ``(x[2i], x[2i+1])`` (MLA) or ``(x[i], x[i + r/2])`` (the indexer).

    Returns:
        float64, the shape of ``x``.
    """
    x = np.asarray(x, np.float64)  # [n, ..., r]
    angles = np.asarray(angles, np.float64).reshape(angles.shape[0], *([1] * (x.ndim - 2)), -1)  # [n, 1.., r/2]
    cos, sin = np.cos(angles), np.sin(angles)
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])  # [n, ..., r/2] each
    rotated_a = a * cos - b * sin  # [n, ..., r/2]
    rotated_b = a * sin + b * cos  # [n, ..., r/2]
    if interleaved:
        return np.stack([rotated_a, rotated_b], axis=-1).reshape(x.shape)  # [n, ..., r]
    return np.concatenate([rotated_a, rotated_b], axis=-1)  # [n, ..., r]
