"""The layer's building blocks: config, RoPE (both pairings, YaRN), norms, Hadamard, indexer inputs."""

import math

import numpy as np
import pytest

from dsa_ref.layer import DSAConfig, DSALayer
from dsa_ref.layer.indexer import quantize_indexer_keys, quantize_indexer_queries
from dsa_ref.layer.norms import hadamard_matrix, hadamard_rotate, layer_norm, rms_norm
from dsa_ref.layer.rope import apply_rope, inverse_frequencies, rope_angles


def test_v32_defaults_and_softmax_scale():
    config = DSAConfig()
    assert (config.dim, config.n_heads, config.q_lora_rank, config.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (64, 128, 2048)
    assert config.qk_head_dim == 192 and config.latent_dim == 576
    # 192^-0.5 * (0.1 ln 40 + 1)^2, worked out by hand: 0.0721688 * 1.873860
    assert config.softmax_scale == pytest.approx(0.135235, rel=1e-5)
    assert DSAConfig(max_seq_len=4096).softmax_scale == pytest.approx(192 ** -0.5)  # no YaRN, no mscale


@pytest.mark.parametrize("field, value, fragment", [
    ("index_head_dim", 96, "power of two"),
    ("qk_rope_head_dim", 63, "even"),
    ("n_heads", 0, "positive int"),
    ("scale_fmt", "e5m2", "scale_fmt"),
])
def test_config_rejects_bad_values(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        DSAConfig.tiny(**{field: value})


def test_yarn_frequencies_of_v32():
    config = DSAConfig()
    plain = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    freqs = inverse_frequencies(config)
    # Correction range for V3.2: floor(10.47) = 10 and ceil(22.5) = 23 (beta_fast 32, beta_slow 1, 4096 tokens).
    np.testing.assert_allclose(freqs[:11], plain[:11], rtol=1e-15)  # fast pairs kept
    np.testing.assert_allclose(freqs[23:], plain[23:] / 40, rtol=1e-15)  # slow pairs interpolated by 40
    assert np.all((freqs[11:23] < plain[11:23]) & (freqs[11:23] > plain[11:23] / 40))  # the ramp
    np.testing.assert_allclose(inverse_frequencies(config.replace(max_seq_len=4096)), plain, rtol=1e-15)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_complex_rotation(interleaved):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 8))
    angles = rng.uniform(-3, 3, (5, 4))
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., :4] + 1j * x[..., 4:]
    rotated = z * np.exp(1j * angles[:, None, :])
    expected = (np.stack([rotated.real, rotated.imag], -1).reshape(x.shape) if interleaved
                else np.concatenate([rotated.real, rotated.imag], -1))
    np.testing.assert_allclose(apply_rope(x, angles, interleaved=interleaved), expected, rtol=1e-13, atol=1e-13)


def test_rope_pairings_differ_and_scores_depend_on_relative_position():
    config = DSAConfig.tiny()
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(64), rng.standard_normal(64)
    for interleaved in (True, False):
        def score(m, n):
            return apply_rope(q[None], rope_angles(config, [m]), interleaved=interleaved)[0] @ \
                apply_rope(k[None], rope_angles(config, [n]), interleaved=interleaved)[0]
        assert score(9, 4) == pytest.approx(score(30, 25), rel=1e-10)
        assert abs(score(9, 4) - score(9, 8)) > 1e-3
    angles = rope_angles(config, [7])
    assert not np.allclose(apply_rope(q[None], angles, interleaved=True), apply_rope(q[None], angles, interleaved=False))


def test_norms():
    rng = np.random.default_rng(2)
    x = 3.0 + 2.0 * rng.standard_normal((4, 16))
    weight, bias = rng.standard_normal(16), rng.standard_normal(16)
    y = rms_norm(x, np.ones(16))
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, -1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(rms_norm(x, weight), y * weight, rtol=1e-13)
    z = layer_norm(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(layer_norm(x, weight, bias), z * weight + bias, rtol=1e-12)


def _fast_walsh_hadamard(x):
    """The butterfly of the fast transform, independent of the matrix construction."""
    x = x.copy()
    h = 1
    while h < x.shape[-1]:
        for start in range(0, x.shape[-1], 2 * h):
            a, b = x[..., start:start + h].copy(), x[..., start + h:start + 2 * h].copy()
            x[..., start:start + h], x[..., start + h:start + 2 * h] = a + b, a - b
        h *= 2
    return x


def test_hadamard_is_the_orthonormal_walsh_transform():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 128))
    np.testing.assert_allclose(hadamard_rotate(x), _fast_walsh_hadamard(x) / np.sqrt(128), rtol=1e-12, atol=1e-12)
    h = hadamard_matrix(16)
    np.testing.assert_array_equal(h @ h.T, 16 * np.eye(16))
    y = rng.standard_normal((2, 128))
    np.testing.assert_allclose(hadamard_rotate(x) @ hadamard_rotate(y).T, x @ y.T, rtol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_fp8_indexer_scores_follow_the_exact_ones():
    """Quantized q (scale folded into w) and k (per-key scale) approximate the exact scores."""
    config = DSAConfig.tiny()
    layer = DSALayer(config, seed=4)
    tokens = np.random.default_rng(4).standard_normal((12, config.dim))
    proj = layer.projections(tokens, np.arange(12))
    exact = np.einsum("tj,tjs->ts", proj.index_weights,
                      np.maximum(np.einsum("tjd,sd->tjs", proj.index_q, proj.index_k), 0))
    for scale_format in ("fp32", "ue8m0"):
        q8, w8 = quantize_indexer_queries(proj.index_q, proj.index_weights, scale_format)
        k8, k_scale = quantize_indexer_keys(proj.index_k, scale_format)
        if scale_format == "ue8m0":
            assert np.all(np.log2(k_scale) == np.round(np.log2(k_scale)))
        logits = np.einsum("tjd,sd->tjs", q8.astype(np.float64), k8.astype(np.float64))
        quantized = np.einsum("tj,tjs->ts", w8, np.maximum(logits, 0)) * k_scale[None, :]
        assert np.abs(quantized - exact).max() < 0.08 * np.abs(exact).max()


def test_hadamard_leaves_unquantized_index_scores_unchanged():
    config = DSAConfig.tiny(indexer_fp8=False)
    layer = DSALayer(config, seed=5)
    proj = layer.projections(np.random.default_rng(5).standard_normal((6, config.dim)), np.arange(6))
    undo = hadamard_rotate  # the rotation is its own inverse
    rotated = np.einsum("tjd,sd->tjs", proj.index_q, proj.index_k)
    plain = np.einsum("tjd,sd->tjs", undo(proj.index_q), undo(proj.index_k))
    np.testing.assert_allclose(rotated, plain, rtol=1e-10, atol=1e-12)
    assert not np.allclose(undo(proj.index_k), proj.index_k)


def test_indexer_rope_sits_on_the_first_dims():
    """Shifting every position leaves exact indexer logits unchanged only because RoPE rotates
    q and k alike; the last d_I - rope dims carry no position at all."""
    config = DSAConfig.tiny(indexer_fp8=False)
    layer = DSALayer(config, seed=6)
    tokens = np.random.default_rng(6).standard_normal((5, config.dim))
    a, b = layer.projections(tokens, np.arange(5)), layer.projections(tokens, np.arange(5) + 17)
    np.testing.assert_allclose(np.einsum("tjd,sd->tjs", a.index_q, a.index_k),
                               np.einsum("tjd,sd->tjs", b.index_q, b.index_k), rtol=1e-9, atol=1e-12)
    undo_a, undo_b = hadamard_rotate(a.index_k), hadamard_rotate(b.index_k)
    np.testing.assert_allclose(undo_a[:, 64:], undo_b[:, 64:], rtol=1e-12)
    assert not np.allclose(undo_a[:, :64], undo_b[:, :64])
