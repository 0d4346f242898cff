"""The layer on every available backend besides the reference (GPU backends, or Triton's CPU interpreter)."""

import numpy as np
import pytest

import dsa_ref
from dsa_ref.layer import DSAConfig, DSALayer

OTHER_BACKENDS = [name for name in dsa_ref.available_backends() if name != "numpy"]


def test_layer_dispatches_through_the_public_ops():
    layer = DSALayer(DSAConfig.tiny(), seed=0, backend="no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        layer.forward(np.zeros((1, 3, 64)))


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no backend other than numpy is available here")
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("cache", [dict(), dict(kv_cache_dtype="fp8", block_size=4)])
def test_layer_on_backend_matches_reference(backend, cache):
    config = DSAConfig.tiny()
    x = np.random.default_rng(0).standard_normal((2, 24, config.dim))
    expected_layer = DSALayer(config, seed=1, **cache)
    expected = expected_layer.forward(x)
    layer = DSALayer(config, seed=1, backend=backend, **cache)
    actual = layer.forward(x)
    # Exact-zero index scores (every head's ReLU closed) make ties, so a backend may pick another
    # key among equals; compare the tokens whose selected sets agree, and require nearly all do.
    same_set = np.array([[set(a.tolist()) == set(b.tolist()) for a, b in zip(row_a, row_b)]
                         for row_a, row_b in zip(layer.last_topk, expected_layer.last_topk)])
    assert same_set.mean() > 0.9
    scale = np.abs(expected).max()
    assert np.abs(actual - expected)[same_set].max() <= 2e-3 * scale
