"""FP8 quantization and the 656-byte KV cache layout."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_ref import reference

rngs = st.integers(0, 2**32 - 1).map(np.random.default_rng)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(rngs, st.sampled_from(["fp32", "ue8m0"]), st.floats(1e-3, 1e4))
def test_quantize_round_trip_error_is_within_half_an_e4m3_step(rng, scale_format, magnitude):
    x = rng.standard_normal((6, 256)) * magnitude
    x_fp8, scales = reference.quantize_fp8(x, 128, scale_format)
    assert x_fp8.dtype == ml_dtypes.float8_e4m3fn and scales.shape == (6, 2) and scales.dtype == np.float32
    restored = reference.dequantize_fp8(x_fp8, scales, 128)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; below the smallest
    # normal (2^-6 after scaling) the absolute error is <= half a subnormal step, 2^-10 x scale.
    bound = np.maximum(np.abs(x) * 2.0**-4, 2.0**-10 * np.repeat(scales, 128, axis=1))
    assert np.all(np.abs(restored - x) <= bound * (1 + 1e-6))


def test_ue8m0_scales_are_powers_of_two_that_round_up():
    x = np.array([[448.0 * 3] + [0.0] * 127, [1e-9] * 128])
    _, scales = reference.quantize_fp8(x, 128, "ue8m0")
    assert scales[0, 0] == 4.0  # amax/448 = 3 rounds up to 4
    assert scales[1, 0] == 2.0 ** np.ceil(np.log2(1e-4 / 448))  # amax clamped at 1e-4
    mantissa, _ = np.frexp(scales)
    assert np.all(mantissa == 0.5)


def test_quantized_values_never_exceed_e4m3_max():
    x = np.linspace(-1000, 1000, 128)[None, :]
    for fmt in ("fp32", "ue8m0"):
        x_fp8, _ = reference.quantize_fp8(x, 128, fmt)
        assert np.abs(x_fp8.astype(np.float32)).max() <= 448.0


def test_kv_cache_row_layout_is_656_bytes_in_the_v32_order():
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((3, 576)).astype(np.float32)
    packed = reference.pack_kv_cache_fp8(kv)
    assert packed.dtype == np.uint8 and packed.shape == (3, 656)
    latent_fp8, scales = reference.quantize_fp8(kv[:, :512], 128, "ue8m0")
    np.testing.assert_array_equal(packed[:, :512], latent_fp8.view(np.uint8))
    np.testing.assert_array_equal(packed[:, 512:528].copy().view("<f4"), scales)
    np.testing.assert_array_equal(packed[:, 528:].copy().view(ml_dtypes.bfloat16), kv[:, 512:].astype(ml_dtypes.bfloat16))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(rngs, st.floats(1e-2, 1e3))
def test_kv_cache_round_trip_error_is_bounded(rng, magnitude):
    kv = rng.standard_normal((5, 576)) * magnitude
    restored = reference.unpack_kv_cache_fp8(reference.pack_kv_cache_fp8(kv))
    assert restored.shape == (5, 576) and restored.dtype == np.float32
    amax = np.abs(kv[:, :512]).reshape(5, 4, 128).max(-1)
    step = np.repeat(2.0 ** np.ceil(np.log2(amax / 448)), 128, axis=1)  # the ue8m0 scale
    assert np.all(np.abs(restored[:, :512] - kv[:, :512]) <= np.maximum(np.abs(kv[:, :512]) * 2.0**-4, step * 2.0**-10))
    np.testing.assert_allclose(restored[:, 512:], kv[:, 512:], rtol=2.0**-8)  # bf16 RoPE dims


def test_sparse_mla_reads_the_packed_cache_as_its_dequantized_rows():
    rng = np.random.default_rng(1)
    kv = rng.standard_normal((10, 576))
    q = rng.standard_normal((3, 2, 576)).astype(np.float32)
    indices = np.array([[0, 4, 9], [1, -1, 3], [2, 2, 5]], np.int32)
    packed = reference.pack_kv_cache_fp8(kv)
    got = reference.sparse_mla(q, packed, indices)
    want = reference.sparse_mla(q, reference.unpack_kv_cache_fp8(packed), indices)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(x=np.ones((2, 100))), ValueError, "x must have a last axis that is a multiple of block=128"),
    (dict(x=np.ones((2, 128)), scale_format="e8m0"), ValueError, "scale_format must be one of"),
    (dict(x=np.ones((2, 128)), block=0), ValueError, "block must be >= 1"),
])
def test_quantize_errors(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        reference.quantize_fp8(**kwargs)


def test_unpack_refuses_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"packed must be uint8 \[..., 656\]"):
        reference.unpack_kv_cache_fp8(np.zeros((2, 600), np.uint8))
    with pytest.raises(ValueError, match=r"kv must have shape \[..., 576\]"):
        reference.pack_kv_cache_fp8(np.zeros((2, 512)))
