"""FP8 formats of DeepSeek-V3.2: block-scaled e4m3 and the 656-byte KV cache row.

e4m3 rounding is done by :mod:`ml_dtypes` (round to nearest even), never by hand.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .. import _checks
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


#: Input dtypes of the quantizers and the packer (ml_dtypes names for the 16-bit ones).
_FLOAT_INPUTS = ("float64", "float32", "float16", "bfloat16")


def _host_array(name: str, x, layout: str, dtypes: tuple[str, ...]) -> np.ndarray:
    """``x`` (an array of any library) as a NumPy array of one of ``dtypes`` with at least one axis."""
    if not _checks.interop.is_array(x):
        raise TypeError(f"{name} must be an array (numpy.ndarray, torch.Tensor or cupy.ndarray) of shape "
                        f"{layout}, got {type(x).__name__}")
    got = _checks.interop.logical_dtype_name(x, packed_kv=name == "packed")
    if got not in dtypes:
        raise TypeError(f"{name}.dtype must be one of {', '.join(dtypes)}, got {got}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have shape {layout} (at least one axis), got a 0-d array")
    host = _checks.interop.to_numpy(x)
    # A cupy array carries bf16 / fp8 as same-width integers: read its bytes as what they stand for.
    return host if host.dtype.name == got else host.view(_checks.interop.NUMPY_DTYPES[got])


def _check_blocks(name: str, x: np.ndarray, block: int, scale_format: str = "fp32") -> None:
    block = _checks.positive_int("block", block)
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    if x.shape[-1] % block:
        raise ValueError(f"{name} must have a last axis that is a multiple of block={block}, got shape {x.shape}")


def fp8_block_scales(x, block: int = 128, scale_format: str = "fp32") -> np.ndarray:
    r"""One scale per ``block`` consecutive values of the last axis.

    .. math:: s = \max(\mathrm{amax}, 10^{-4}) / 448, \qquad
              s_{\mathrm{ue8m0}} = 2^{\lceil \log_2 s \rceil}

    ue8m0 (an unsigned 8-bit exponent, the format of DeepGEMM's and FlashMLA's scales) rounds
    the scale *up* to a power of two, so ``x / s`` still fits in e4m3 and dequantization is exact
    scaling by a power of two.

    Returns float32 ``[..., n // block]``.
    """
    x = _host_array("x", x, "[..., n]", _FLOAT_INPUTS)
    _check_blocks("x", x, block, scale_format)
    # Explicit block count: -1 cannot be inferred when a leading axis is empty.
    blocks = as_float64(x).reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., n/block, block]
    amax = np.maximum(np.abs(blocks).max(axis=-1), AMAX_FLOOR)  # [..., n/block]
    scale = amax / FP8_E4M3_MAX  # [..., n/block]
    if scale_format == "ue8m0":
        scale = np.exp2(np.ceil(np.log2(scale)))  # [..., n/block]
    return scale.astype(np.float32)


def quantize_fp8(x, block: int = 128, scale_format: str = "fp32"):
    """Block-scaled fp8 e4m3 quantization of the last axis (the official ``act_quant``).

    Args:
        x: float ``[..., n]`` (float64/32/16 or bfloat16, an array of any library) with ``n`` a
            multiple of ``block``.
        block: values per scale (128 in V3.2).
        scale_format: ``"fp32"`` (scale = amax / 448) or ``"ue8m0"`` (rounded up to a power of two).

    Returns:
        ``(x_fp8, scales)``: ``ml_dtypes.float8_e4m3fn [..., n]`` and float32 ``[..., n // block]``,
        with ``dequantize_fp8(x_fp8, scales) ≈ x`` (relative error <= 2^-4 per element, the e4m3
        half-ulp, for values above the subnormal range).
    """
    x = _host_array("x", x, "[..., n]", _FLOAT_INPUTS)
    _check_blocks("x", x, block, scale_format)
    scales = fp8_block_scales(x, block, scale_format)  # [..., n/block]
    x = as_float64(x)  # [..., n]
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., n/block, block]
    scaled = blocks / scales.astype(np.float64)[..., None]  # [..., n/block, block], |.| <= 448
    x_fp8 = scaled.astype(np.float32).astype(FP8_E4M3).reshape(x.shape)  # [..., n]
    return x_fp8, scales


def dequantize_fp8(x_fp8, scales, block: int = 128) -> np.ndarray:
    """Inverse of :func:`quantize_fp8`: float32 ``[..., n]`` = ``x_fp8 * scale`` per block.

    Args:
        x_fp8: float8_e4m3fn ``[..., n]`` with ``n`` a multiple of ``block``.
        scales: float ``[..., n // block]`` (float32 from :func:`quantize_fp8`).
        block: values per scale.
    """
    x_fp8 = _host_array("x_fp8", x_fp8, "[..., n]", ("float8_e4m3fn",))
    _check_blocks("x_fp8", x_fp8, block)
    scales = _host_array("scales", scales, "[..., n // block]", _FLOAT_INPUTS)
    expected = x_fp8.shape[:-1] + (x_fp8.shape[-1] // block,)
    if scales.shape != expected:
        raise ValueError(f"scales must have shape {expected} (one per block of x_fp8), got shape {scales.shape}")
    values = as_float64(x_fp8)  # [..., n]
    blocks = values.reshape(*expected, block)  # [..., n/block, block]
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
        kv: float ``[..., 576]`` (512 latent + 64 RoPE; float64/32/16 or bfloat16).

    Returns:
        uint8 ``[..., 656]``.
    """
    kv = _host_array("kv", kv, f"[..., {KV_LATENT_DIM + KV_ROPE_DIM}]", _FLOAT_INPUTS)
    if kv.shape[-1:] != (KV_LATENT_DIM + KV_ROPE_DIM,):
        raise ValueError(f"kv must have shape [..., {KV_LATENT_DIM + KV_ROPE_DIM}] (512 latent + 64 RoPE), "
                         f"got {kv.shape}")
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
    packed = _host_array("packed", packed, f"[..., {KV_CACHE_FP8_BYTES}]", ("uint8",))
    packed = np.ascontiguousarray(packed)  # [..., 656]
    if packed.shape[-1:] != (KV_CACHE_FP8_BYTES,):
        raise ValueError(f"packed must be uint8 [..., {KV_CACHE_FP8_BYTES}], got {packed.dtype} {packed.shape}")
    latent_end = KV_LATENT_DIM
    scales_end = latent_end + 4 * (KV_LATENT_DIM // KV_SCALE_BLOCK)
    latent_fp8 = packed[..., :latent_end].view(FP8_E4M3)  # [..., 512]
    scales = packed[..., latent_end:scales_end].copy().view("<f4")  # [..., 4]
    rope = packed[..., scales_end:].copy().view(ml_dtypes.bfloat16)  # [..., 64]
    latent = dequantize_fp8(latent_fp8, scales, KV_SCALE_BLOCK)  # [..., 512]
    return np.concatenate([latent, rope.astype(np.float32)], axis=-1)  # [..., 576]
