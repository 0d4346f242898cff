"""The signals that train the lightning indexer (DeepSeek-V3.2-Exp, section 2.1 "continued pre-training").

*Dense warm-up* (eq. 3): the main model is frozen and only the indexer learns, to match the main
attention. For query t, the target is the main attention summed over all heads and L1-normalized,

.. math:: p_{t,:} = \\frac{\\sum_h A_{t,h,:}}{\\lVert \\sum_h A_{t,h,:} \\rVert_1}, \\qquad
          \\mathcal L^I = \\sum_t D_{KL}\\big(p_{t,:} \\,\\Vert\\, \\mathrm{Softmax}(I_{t,:})\\big).

*Sparse training* (eq. 4): the same divergence restricted to the selected set S_t,
:math:`\\sum_t D_{KL}(p_{t,S_t} \\Vert \\mathrm{Softmax}(I_{t,S_t}))`.

The indexer's input is detached: its gradient comes only from this loss and reaches only the
indexer's own parameters; the hidden states and c^Q it reads are constants here, and so is the
target p (the main model learns from the language-modelling loss alone). The functions below
therefore return gradients for the indexer parameters and nothing else.
"""

from __future__ import annotations

import numpy as np

from dsa_ref.reference import topk_indices

from .backward import (
    hadamard_backward,
    index_scores_backward,
    index_scores_float64,
    layer_norm_backward,
    rope_first_dims_backward,
)
from .config import DSAConfig
from .indexer import indexer_head_weights, indexer_keys, indexer_queries
from .rope import rope_angles

#: The parameters the indexer loss trains (official per-layer names).
INDEXER_PARAMETERS = (
    "indexer.wq_b.weight",
    "indexer.wk.weight",
    "indexer.k_norm.weight",
    "indexer.k_norm.bias",
    "indexer.weights_proj.weight",
)


def attention_target(probs) -> np.ndarray:
    """Eq. 3's target: main attention ``[n, h, s_kv]`` summed over heads and L1-normalized, ``[n, s_kv]``.

    A row with no attention at all stays zero.
    """
    summed = np.asarray(probs, np.float64).sum(axis=1)  # [n, s_kv]
    total = summed.sum(axis=-1, keepdims=True)  # [n, 1]
    return np.divide(summed, total, out=np.zeros_like(summed), where=total > 0)  # [n, s_kv]


def indexer_kl_loss(scores, target, selected=None):
    """The indexer loss, eq. 3 (dense) or eq. 4 (with ``selected``), and its gradient on the scores.

    Args:
        scores: ``[n, s_kv]`` indexer scores, ``-inf`` where a key is not visible (causal mask).
        target: ``[n, s_kv]`` main attention distribution per query (:func:`attention_target`).
        selected: bool ``[n, s_kv]``, optional: the sparse stage's set S_t. Both distributions are
            restricted to it; the target's mass outside S_t is dropped and the rest renormalized
            (it is already 1 when the target comes from the sparse main attention itself).

    Returns:
        ``(loss, d_scores)``: the sum over queries of KL(p_t || softmax(I_t)), and
        ``dL/dI = softmax(I_t) - p_t`` on the allowed keys, 0 elsewhere (float64 ``[n, s_kv]``).
        Queries whose target has no mass on their allowed keys contribute nothing.
    """
    scores = np.asarray(scores, np.float64)  # [n, s_kv]
    allowed = np.isfinite(scores) if selected is None else np.isfinite(scores) & np.asarray(selected, bool)
    target = np.where(allowed, np.asarray(target, np.float64), 0.0)  # [n, s_kv]
    mass = target.sum(axis=-1, keepdims=True)  # [n, 1]
    target = np.divide(target, mass, out=np.zeros_like(target), where=mass > 0)  # [n, s_kv]   p_t (over S_t)
    active = mass[:, 0] > 0  # [n]

    logits = np.where(allowed, scores, -np.inf)  # [n, s_kv]
    row_max = np.where(active[:, None], logits.max(axis=-1, keepdims=True), 0.0)  # [n, 1]
    shifted = np.where(allowed, logits - row_max, -np.inf)  # [n, s_kv]
    log_normalizer = np.log(np.exp(shifted).sum(axis=-1, keepdims=True), where=active[:, None],
                            out=np.zeros_like(row_max))  # [n, 1]
    log_q = np.where(allowed, shifted - log_normalizer, 0.0)  # [n, s_kv]   log Softmax(I_t)
    log_p = np.log(target, where=target > 0, out=np.zeros_like(target))  # [n, s_kv]   0 log 0 = 0
    loss = float(np.sum(target * (log_p - log_q)))  # Σ_t KL(p_t || q_t)
    d_scores = np.where(allowed & active[:, None], np.exp(log_q) - target, 0.0)  # [n, s_kv]
    return loss, d_scores


def causal_mask(n: int) -> np.ndarray:
    """bool ``[n, n]``: token t sees keys s <= t (one sequence starting at position 0)."""
    return np.tril(np.ones((n, n), bool))


def indexer_scores(params, x, qr, positions, config: DSAConfig, visible) -> np.ndarray:
    """Unquantized float64 indexer scores of one sequence from the indexer's parameters, ``[n, n]``.

    Args:
        params: at least the :data:`INDEXER_PARAMETERS` by name.
        x: ``[n, dim]`` hidden states; qr: ``[n, q_lora_rank]`` c^Q; positions: ``[n]``.
        visible: bool ``[n, n]`` (e.g. :func:`causal_mask`).
    """
    q, weights, k = _indexer_inputs(params, x, qr, rope_angles(config, positions), config)
    return index_scores_float64(q, weights, k, visible)


def _indexer_inputs(params, x, qr, angles, config: DSAConfig):
    c = config
    q = indexer_queries(qr, params["indexer.wq_b.weight"], angles, n_heads=c.index_n_heads,
                        head_dim=c.index_head_dim, rope_dim=c.qk_rope_head_dim)  # [n, H_I, d_I]
    weights = indexer_head_weights(x, params["indexer.weights_proj.weight"], n_heads=c.index_n_heads,
                                   head_dim=c.index_head_dim)  # [n, H_I]
    k = indexer_keys(x, params["indexer.wk.weight"], params["indexer.k_norm.weight"], params["indexer.k_norm.bias"],
                     angles, rope_dim=c.qk_rope_head_dim)  # [n, d_I]
    return q, weights, k


def indexer_loss_and_gradients(params, x, qr, positions, target, config: DSAConfig, *, visible=None, selected=None):
    """The indexer loss of one sequence and its gradients with respect to the indexer's parameters.

    Forward: q_I, w, k_I from the (detached) inputs, scores (eq. 1, unquantized), KL loss (eq. 3, or
    eq. 4 with ``selected``). Backward, by hand: scores -> (q_I, w, k_I) -> Hadamard -> RoPE ->
    (LayerNorm) -> the linear maps.

    Args:
        params: the layer's parameters (at least :data:`INDEXER_PARAMETERS`).
        x ``[n, dim]``, qr ``[n, q_lora_rank]``, positions ``[n]``: constants (the input is detached).
        target: ``[n, n]`` main attention distribution (:func:`attention_target`).
        visible: bool ``[n, n]``, default causal.
        selected: bool ``[n, n]`` for the sparse stage (eq. 4).

    Returns:
        ``(loss, grads, scores)``: float, ``{name: array}`` for :data:`INDEXER_PARAMETERS`, ``[n, n]``.
    """
    c = config
    x, qr = np.asarray(x, np.float64), np.asarray(qr, np.float64)
    n = x.shape[0]
    visible = causal_mask(n) if visible is None else visible
    angles = rope_angles(c, positions)  # [n, r/2]
    q, weights, k = _indexer_inputs(params, x, qr, angles, c)
    scores = index_scores_float64(q, weights, k, visible)  # [n, n]
    loss, d_scores = indexer_kl_loss(scores, target, selected)

    dq, d_weights, dk = index_scores_backward(q, weights, k, visible, d_scores)
    head_scale = c.index_n_heads ** -0.5 * c.index_head_dim ** -0.5
    dq_linear = rope_first_dims_backward(hadamard_backward(dq), angles, c.qk_rope_head_dim)  # [n, H_I, d_I]
    dk_normed = rope_first_dims_backward(hadamard_backward(dk), angles, c.qk_rope_head_dim)  # [n, d_I]
    k_linear = x @ np.asarray(params["indexer.wk.weight"], np.float64).T  # [n, d_I]
    dk_linear, d_norm_weight, d_norm_bias = layer_norm_backward(k_linear, params["indexer.k_norm.weight"], dk_normed)
    grads = {
        "indexer.wq_b.weight": dq_linear.reshape(n, -1).T @ qr,  # [H_I d_I, q_lora]
        "indexer.wk.weight": dk_linear.T @ x,  # [d_I, dim]
        "indexer.k_norm.weight": d_norm_weight,  # [d_I]
        "indexer.k_norm.bias": d_norm_bias,  # [d_I]
        "indexer.weights_proj.weight": (d_weights * head_scale).T @ x,  # [H_I, dim]
    }
    return loss, grads, scores


def captured_attention_mass(scores, target, topk: int) -> np.ndarray:
    """Per query, the share of the main attention ``target [n, s_kv]`` that falls on the ``topk``
    keys the ``scores`` select: ``Σ_{s ∈ TopK(I_t)} p_{t,s}``, float64 ``[n]``. 1 means the sparse
    attention sees everything the dense one attends to."""
    chosen = topk_indices(scores, topk)  # [n, topk]
    gathered = np.take_along_axis(np.asarray(target, np.float64), np.maximum(chosen, 0), axis=1)  # [n, topk]
    return np.where(chosen >= 0, gathered, 0.0).sum(axis=1)  # [n]
