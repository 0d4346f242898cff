"""Hand-written backward passes against central finite differences, all in float64."""

import numpy as np
import pytest

from dsa_ref.layer import DSAConfig, DSALayer
from dsa_ref.layer.backward import (
    index_scores_backward,
    index_scores_float64,
    layer_norm_backward,
    sparse_mla_backward,
    sparse_mla_float64,
)
from dsa_ref.layer.norms import layer_norm
from dsa_ref.layer.training import (
    INDEXER_PARAMETERS,
    attention_target,
    causal_mask,
    indexer_kl_loss,
    indexer_loss_and_gradients,
)
from dsa_ref.reference import sparse_mla

MICRO = DSAConfig(dim=8, n_heads=2, q_lora_rank=6, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                  v_head_dim=4, index_n_heads=3, index_head_dim=8, index_topk=3, max_seq_len=16, max_batch_size=1,
                  original_seq_len=4, rope_factor=4.0, indexer_fp8=False)


def directional_check(loss, x, grad, rng, eps=1e-6, trials=3, rtol=1e-6):
    """<grad, v> against (L(x + eps v) - L(x - eps v)) / 2 eps for random directions v."""
    for _ in range(trials):
        direction = rng.standard_normal(x.shape)
        numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
        analytic = float(np.sum(grad * direction))
        assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-8), (analytic, numeric)


def elementwise_check(loss, x, grad, eps=1e-6, rtol=1e-5):
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        numeric[index] = (loss(x + step) - loss(x - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=rtol, atol=1e-8)


@pytest.fixture
def sparse_problem():
    rng = np.random.default_rng(0)
    s_q, h, d_qk, d_v, s_kv = 5, 3, 10, 6, 7
    q, kv = rng.standard_normal((s_q, h, d_qk)), rng.standard_normal((s_kv, d_qk))
    indices = np.array([[0, 3, 3, 6],        # key 3 twice: counts twice
                        [2, -1, 5, 7],       # -1 and s_kv are invalid
                        [3, 1, 0, 2],
                        [-2**31, 2**31 - 1, 4, 3],
                        [-1, -1, -1, -1]])   # no valid key: out 0, no gradient
    topk_length = np.array([4, 4, 2, 4, 4])
    return q, kv, indices, topk_length, d_v, rng


def test_sparse_mla_float64_is_the_reference_op(sparse_problem):
    q, kv, indices, topk_length, d_v, _ = sparse_problem
    out, lse = sparse_mla_float64(q, kv, indices, sm_scale=0.4, d_v=d_v, topk_length=topk_length)
    ref_out, ref_lse = sparse_mla(q, kv, indices, sm_scale=0.4, d_v=d_v, topk_length=topk_length)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-6)


def test_sparse_mla_backward_matches_finite_differences(sparse_problem):
    q, kv, indices, topk_length, d_v, rng = sparse_problem
    d_out = rng.standard_normal((q.shape[0], q.shape[1], d_v))
    d_lse = rng.standard_normal(q.shape[:2])

    def loss(q_, kv_):
        out, lse = sparse_mla_float64(q_, kv_, indices, sm_scale=0.4, d_v=d_v, topk_length=topk_length)
        return float(np.sum(out * d_out) + np.sum(np.where(np.isfinite(lse), lse, 0.0) * d_lse))

    dq, dkv = sparse_mla_backward(q, kv, indices, d_out, sm_scale=0.4, d_v=d_v, topk_length=topk_length, d_lse=d_lse)
    elementwise_check(lambda x: loss(x, kv), q, dq)
    elementwise_check(lambda x: loss(q, x), kv, dkv)
    assert np.all(dq[4] == 0)
    assert np.any(dkv[3] != 0)


def test_sparse_mla_backward_accumulates_over_queries():
    """Every query selecting the same key: dkv of that key is the sum of the per-query gradients."""
    rng = np.random.default_rng(1)
    q, kv = rng.standard_normal((4, 2, 8)), rng.standard_normal((5, 8))
    indices = np.tile([[1, 3]], (4, 1))
    d_out = rng.standard_normal((4, 2, 6))
    _, dkv = sparse_mla_backward(q, kv, indices, d_out, sm_scale=0.5, d_v=6)
    per_query = sum(sparse_mla_backward(q[i:i + 1], kv, indices[i:i + 1], d_out[i:i + 1], sm_scale=0.5, d_v=6)[1]
                    for i in range(4))
    np.testing.assert_allclose(dkv, per_query, rtol=1e-12)
    assert np.all(dkv[[0, 2, 4]] == 0)


def test_index_scores_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    q, w, k = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3)), rng.standard_normal((6, 4))
    visible = rng.random((5, 6)) < 0.7
    d_scores = rng.standard_normal((5, 6))

    def loss(q_, w_, k_):
        return float(np.sum(np.where(visible, index_scores_float64(q_, w_, k_, visible), 0.0) * d_scores))

    dq, dw, dk = index_scores_backward(q, w, k, visible, d_scores)
    elementwise_check(lambda x: loss(x, w, k), q, dq)
    elementwise_check(lambda x: loss(q, x, k), w, dw)
    elementwise_check(lambda x: loss(q, w, x), k, dk)


def test_layer_norm_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    x, weight, bias, d_y = rng.standard_normal((4, 8)), rng.standard_normal(8), rng.standard_normal(8), rng.standard_normal((4, 8))
    dx, dw, db = layer_norm_backward(x, weight, d_y)
    elementwise_check(lambda v: float(np.sum(layer_norm(v, weight, bias) * d_y)), x, dx)
    elementwise_check(lambda v: float(np.sum(layer_norm(x, v, bias) * d_y)), weight, dw)
    elementwise_check(lambda v: float(np.sum(layer_norm(x, weight, v) * d_y)), bias, db)


def test_kl_loss_value_and_gradient():
    rng = np.random.default_rng(4)
    visible = causal_mask(6)
    target = attention_target(np.where(visible[:, None, :], rng.random((6, 2, 6)), 0.0))
    np.testing.assert_allclose(target.sum(-1), 1.0)
    perfect = np.where(visible, np.log(np.where(visible, target, 1.0)) + 3.0, -np.inf)  # softmax(I) = p
    assert indexer_kl_loss(perfect, target)[0] == pytest.approx(0.0, abs=1e-12)
    scores = np.where(visible, rng.standard_normal((6, 6)), -np.inf)
    loss, d_scores = indexer_kl_loss(scores, target)
    assert loss > 0
    elementwise_check(lambda s: indexer_kl_loss(np.where(visible, s, -np.inf), target)[0],
                      np.where(visible, scores, 0.0), d_scores)
    selected = rng.random((6, 6)) < 0.6
    selected[np.arange(6), np.arange(6)] = True
    sparse_loss, d_sparse = indexer_kl_loss(scores, target, selected)
    assert np.all(d_sparse[~selected] == 0)
    elementwise_check(lambda s: indexer_kl_loss(np.where(visible, s, -np.inf), target, selected)[0],
                      np.where(visible, scores, 0.0), d_sparse)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_parameter_gradients_match_finite_differences(stage):
    """Gradients of eq. 3 / eq. 4 reach wq_b, wk, k_norm and weights_proj through ReLU, the Hadamard
    rotation, the half-split RoPE and the LayerNorm."""
    rng = np.random.default_rng(5)
    layer = DSALayer(MICRO, seed=5)
    n = 7
    x = rng.standard_normal((n, MICRO.dim))
    positions = np.arange(3, 3 + n)
    qr = layer.projections(x, positions).qr
    visible = causal_mask(n)
    target = attention_target(np.where(visible[:, None, :], rng.random((n, 2, n)) ** 4, 0.0))
    selected = None
    if stage == "sparse":
        selected = (rng.random((n, n)) < 0.6) | np.eye(n, dtype=bool)
    params = {name: layer.weights[name] for name in INDEXER_PARAMETERS}
    loss, grads, _ = indexer_loss_and_gradients(params, x, qr, positions, target, MICRO, selected=selected)
    assert loss > 0
    for name in INDEXER_PARAMETERS:
        def loss_of(value, name=name):
            return indexer_loss_and_gradients({**params, name: value}, x, qr, positions, target, MICRO,
                                              selected=selected)[0]
        directional_check(loss_of, params[name], grads[name], rng)
        assert np.abs(grads[name]).max() > 0
