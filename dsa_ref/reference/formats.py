"""FP8 formats of DeepSeek-V3.2: block-scaled e4m3 and the 656-byte KV cache row.

e4m3 rounding is done by :mod:`ml_dtypes` (round to nearest even), never by hand.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ._common import as_float64

FP8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_E4M3_MAX = 448.0
#: The official quantizer clamps each block's amax here so an all-zero block gets a usable scale.
AMAX_FLOOR = 1e-4
SCALE_FORMATS = ("fp32", "ue8m0")

#: V3.2 FP8 KV cache row: 512 e4m3 latent values, 4 float32 scales (one per 128 values),
#: then the 64 RoPE dims in bf16, unquantized (RoPE dims are outlier-prone and tiny).
KV_LATENT_DIM = 512
KV_ROPE_DIM = 64
KV_SCALE_BLOCK = 128
KV_CACHE_FP8_BYTES = KV_LATENT_DIM + 4 * (KV_LATENT_DIM // KV_SCALE_BLOCK) + 2 * KV_ROPE_DIM  # 656


def _check_blocks(name: str, x, block: int, scale_format: str = "fp32") -> None:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be >= 1 (an int), got {block!r}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    shape = np.shape(x)
    if len(shape) == 0 or shape[-1] % block:
        raise ValueError(f"{name} must have a last axis that is a multiple of block={block}, got shape {shape}")


def fp8_block_scales(x, block: int = 128, scale_format: str = "fp32") -> np.ndarray:
    r"""One scale per ``block`` consecutive values of the last axis.

    .. math:: s = \max(\mathrm{amax}, 10^{-4}) / 448, \qquad
              s_{\mathrm{ue8m0}} = 2^{\lceil \log_2 s \rceil}

    ue8m0 (an unsigned 8-bit exponent, the format of DeepGEMM's and FlashMLA's scales) rounds
    the scale *up* to a power of two, so ``x / s`` still fits in e4m3 and dequantization is exact
    scaling by a power of two.

    Returns float32 ``[..., n // block]``.
    """
    blocks = as_float64(x).reshape(*np.shape(x)[:-1], -1, block)  # [..., n/block, block]
    amax = np.maximum(np.abs(blocks).max(axis=-1), AMAX_FLOOR)  # [..., n/block]
    scale = amax / FP8_E4M3_MAX  # [..., n/block]
    if scale_format == "ue8m0":
        scale = np.exp2(np.ceil(np.log2(scale)))  # [..., n/block]
    return scale.astype(np.float32)


def quantize_fp8(x, block: int = 128, scale_format: str = "fp32"):
    """Block-scaled fp8 e4m3 quantization of the last axis (the official ``act_quant``).

    Args:
        x: float ``[..., n]`` with ``n`` a multiple of ``block``.
        block: values per scale (128 in V3.2).
        scale_format: ``"fp32"`` (scale = amax / 448) or ``"ue8m0"`` (rounded up to a power of two).

    Returns:
        ``(x_fp8, scales)``: ``ml_dtypes.float8_e4m3fn [..., n]`` and float32 ``[..., n // block]``,
        with ``dequantize_fp8(x_fp8, scales) ≈ x`` (relative error <= 2^-4 per element, the e4m3
        half-ulp, for values above the subnormal range).
    """
    _check_blocks("x", x, block, scale_format)
    x = as_float64(x)  # [..., n]
    scales = fp8_block_scales(x, block, scale_format)  # [..., n/block]
    blocks = x.reshape(*x.shape[:-1], -1, block)  # [..., n/block, block]
    scaled = blocks / scales.astype(np.float64)[..., None]  # [..., n/block, block], |.| <= 448
    x_fp8 = scaled.astype(np.float32).astype(FP8_E4M3).reshape(x.shape)  # [..., n]
    return x_fp8, scales


def dequantize_fp8(x_fp8, scales, block: int = 128) -> np.ndarray:
    """Inverse of :func:`quantize_fp8`: float32 ``[..., n]`` = ``x_fp8 * scale`` per block."""
    _check_blocks("x_fp8", x_fp8, block)
    if np.shape(scales) != np.shape(x_fp8)[:-1] + (np.shape(x_fp8)[-1] // block,):
        raise ValueError(f"scales must have shape {np.shape(x_fp8)[:-1] + (np.shape(x_fp8)[-1] // block,)} "
                         f"(one per block of x_fp8), got {np.shape(scales)}")
    values = as_float64(x_fp8)  # [..., n]
    blocks = values.reshape(*values.shape[:-1], -1, block)  # [..., n/block, block]
    restored = blocks * as_float64(scales)[..., None]  # [..., n/block, block]
    return restored.reshape(values.shape).astype(np.float32)  # [..., n]


def pack_kv_cache_fp8(kv) -> np.ndarray:
    """Pack latent KV rows into the V3.2 FP8 cache layout, 656 bytes per token.

    Layout of one row (little-endian): bytes ``[0, 512)`` the e4m3 latent values; ``[512, 528)``
    four float32 ue8m0 scales, one per 128 latent values; ``[528, 656)`` the 64 RoPE dims in bf16.

    The scale of each tile is ``2^ceil(log2(max(amax, 1e-4) / 448))`` (the official quantizer's
    amax clamp); FlashMLA clamps the scale itself at 1e-4 instead. The two differ only for tiles
    with amax < 0.0448, and any reader dequantizes with the stored scale, so caches written
    either way read back correctly.

    Args:
        kv: float ``[..., 576]`` (512 latent + 64 RoPE).

    Returns:
        uint8 ``[..., 656]``.
    """
    if np.shape(kv)[-1:] != (KV_LATENT_DIM + KV_ROPE_DIM,):
        raise ValueError(f"kv must have shape [..., {KV_LATENT_DIM + KV_ROPE_DIM}] (512 latent + 64 RoPE), "
                         f"got {np.shape(kv)}")
    kv = as_float64(kv)  # [..., 576]
    latent, rope = kv[..., :KV_LATENT_DIM], kv[..., KV_LATENT_DIM:]  # [..., 512], [..., 64]
    latent_fp8, scales = quantize_fp8(latent, KV_SCALE_BLOCK, "ue8m0")  # [..., 512], [..., 4]
    parts = (
        latent_fp8.view(np.uint8),  # [..., 512]
        scales.astype("<f4").view(np.uint8),  # [..., 16]
        rope.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint8),  # [..., 128]
    )
    return np.concatenate(parts, axis=-1)  # [..., 656]


def unpack_kv_cache_fp8(packed) -> np.ndarray:
    """Dequantize V3.2 FP8 cache rows (uint8 ``[..., 656]``) to float32 ``[..., 576]``.

    Exact: e4m3 times a power of two, and bf16, are all representable in float32.
    """
    packed = np.ascontiguousarray(packed)  # [..., 656]
    if packed.dtype != np.uint8 or packed.shape[-1:] != (KV_CACHE_FP8_BYTES,):
        raise ValueError(f"packed must be uint8 [..., {KV_CACHE_FP8_BYTES}], got {packed.dtype} {packed.shape}")
    latent_end = KV_LATENT_DIM
    scales_end = latent_end + 4 * (KV_LATENT_DIM // KV_SCALE_BLOCK)
    latent_fp8 = packed[..., :latent_end].view(FP8_E4M3)  # [..., 512]
    scales = packed[..., latent_end:scales_end].copy().view("<f4")  # [..., 4]
    rope = packed[..., scales_end:].copy().view(ml_dtypes.bfloat16)  # [..., 64]
    latent = dequantize_fp8(latent_fp8, scales, KV_SCALE_BLOCK)  # [..., 512]
    return np.concatenate([latent, rope.astype(np.float32)], axis=-1)  # [..., 576]
