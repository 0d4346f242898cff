"""Backward passes written out in NumPy (float64): sparse MLA, the indexer scores, and the indexer's
projections (LayerNorm, RoPE, Hadamard, linear maps).

Each ``*_backward`` takes the forward's inputs and the gradient of a scalar loss with respect to
the forward's output, and returns the gradients with respect to the inputs. They are checked
against finite differences of the float64 forwards beside them (``tests/test_training_gradients.py``).
"""

from __future__ import annotations

import numpy as np

from dsa_ref.reference import valid_slots

from .norms import NORM_EPS, hadamard_rotate
from .rope import apply_rope


# ---------------------------------------------------------------------------- sparse MLA
def _sparse_attention(q, kv, indices, sm_scale, topk_length):
    """Shared forward of sparse MLA: validity, gathered rows and probabilities, all float64."""
    q = np.asarray(q, np.float64)  # [s_q, h, d_qk]
    kv = np.asarray(kv, np.float64)  # [s_kv, d_qk]
    indices = np.asarray(indices, np.int64)  # [s_q, topk]
    valid = valid_slots(indices, kv.shape[0], topk_length)  # [s_q, topk]
    rows = np.where(valid, indices, 0)  # [s_q, topk]   invalid slots read row 0, then are zeroed
    selected = np.where(valid[:, :, None], kv[rows], 0.0)  # [s_q, topk, d_qk]
    logits = np.where(valid[:, None, :], sm_scale * np.einsum("ihd,itd->iht", q, selected), -np.inf)  # [s_q, h, topk]
    row_max = logits.max(axis=-1, keepdims=True)  # [s_q, h, 1]
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)  # [s_q, h, topk]
    total = weights.sum(axis=-1, keepdims=True)  # [s_q, h, 1]
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # [s_q, h, topk]
    with np.errstate(divide="ignore"):
        lse = np.log(total[..., 0]) + row_max[..., 0]  # [s_q, h]   -inf for a row with no valid slot
    return q, kv, valid, rows, selected, probs, lse


def sparse_mla_float64(q, kv, indices, *, sm_scale=None, d_v: int = 512, topk_length=None):
    """:func:`dsa_ref.sparse_mla` kept in float64 (no attention sink): ``(out [s_q, h, d_v], lse [s_q, h])``.

    The function the backward below differentiates; it equals the reference op up to the op's
    final rounding to float32.
    """
    sm_scale = np.shape(q)[-1] ** -0.5 if sm_scale is None else sm_scale
    _, _, _, _, selected, probs, lse = _sparse_attention(q, kv, indices, sm_scale, topk_length)
    return np.einsum("iht,itd->ihd", probs, selected[:, :, :d_v]), lse  # [s_q, h, d_v], [s_q, h]


def sparse_mla_backward(q, kv, indices, d_out, *, sm_scale=None, d_v: int = 512, topk_length=None, d_lse=None):
    r"""Gradients of sparse MLA (MQA mode, V = ``kv[:, :d_v]``) with respect to q and kv.

    With :math:`P` the softmax over the valid slots, :math:`\ell = s\,q\cdot K`, :math:`o = \sum_t P_t V_t`:

    .. math::

        dP_t = d o \cdot V_t,\quad
        d\ell_t = P_t\,(dP_t - d o \cdot o) + P_t\, d\mathrm{lse},\quad
        dq = s \sum_t d\ell_t K_t,\quad
        dK_t = s\, d\ell_t\, q,\quad dV_t = P_t\, d o

    summed over heads for the shared rows. A key selected by several queries, or twice by one,
    receives the sum of all its contributions (``np.add.at``: the atomics of a GPU backward).
    Invalid slots get nothing.

    Args:
        q ``[s_q, h, d_qk]``, kv ``[s_kv, d_qk]``, indices ``[s_q, topk]``: as :func:`dsa_ref.sparse_mla`.
        d_out: ``[s_q, h, d_v]`` gradient of the loss with respect to ``out``.
        d_lse: ``[s_q, h]`` optional gradient with respect to ``lse``.

    Returns:
        ``(dq [s_q, h, d_qk], dkv [s_kv, d_qk])``, float64.
    """
    sm_scale = np.shape(q)[-1] ** -0.5 if sm_scale is None else sm_scale
    q, kv, valid, rows, selected, probs, _ = _sparse_attention(q, kv, indices, sm_scale, topk_length)
    d_out = np.asarray(d_out, np.float64)  # [s_q, h, d_v]
    values = selected[:, :, :d_v]  # [s_q, topk, d_v]
    out = np.einsum("iht,itd->ihd", probs, values)  # [s_q, h, d_v]
    d_probs = np.einsum("ihd,itd->iht", d_out, values)  # [s_q, h, topk]
    delta = np.einsum("ihd,ihd->ih", d_out, out)[..., None]  # [s_q, h, 1]   Σ_t P_t dP_t
    d_logits = probs * (d_probs - delta)  # [s_q, h, topk]   softmax backward
    if d_lse is not None:
        d_logits += probs * np.asarray(d_lse, np.float64)[..., None]  # [s_q, h, topk]
    dq = sm_scale * np.einsum("iht,itd->ihd", d_logits, selected)  # [s_q, h, d_qk]
    d_selected = sm_scale * np.einsum("iht,ihd->itd", d_logits, q)  # [s_q, topk, d_qk]   as keys
    d_selected[:, :, :d_v] += np.einsum("iht,ihd->itd", probs, d_out)  # [s_q, topk, d_v]   as values
    dkv = np.zeros_like(kv)  # [s_kv, d_qk]
    np.add.at(dkv, rows[valid], d_selected[valid])  # scatter-add; duplicates accumulate
    return dq, dkv


# ---------------------------------------------------------------------------- indexer scores
def index_scores_float64(q, weights, k, visible) -> np.ndarray:
    r"""Unquantized indexer scores in float64 (eq. 1), ``-inf`` where not ``visible``: ``[s_q, s_kv]``.

    :math:`I_{t,s} = \sum_j w_{t,j}\,\mathrm{ReLU}(q_{t,j}\cdot k_s)`. Training uses this exact form;
    fp8 is an inference format.
    """
    logits = np.einsum("tjd,sd->tjs", np.asarray(q, np.float64), np.asarray(k, np.float64))  # [s_q, H_I, s_kv]
    scores = np.einsum("tj,tjs->ts", np.asarray(weights, np.float64), np.maximum(logits, 0.0))  # [s_q, s_kv]
    return np.where(visible, scores, -np.inf)  # [s_q, s_kv]


def index_scores_backward(q, weights, k, visible, d_scores):
    r"""Gradients of :func:`index_scores_float64` with respect to q, weights and k.

    .. math::

        dw_{t,j} = \sum_s dI_{t,s}\,\mathrm{ReLU}(\ell_{t,j,s}),\quad
        d\ell_{t,j,s} = dI_{t,s}\, w_{t,j}\, [\ell_{t,j,s} > 0],\quad
        dq_{t,j} = \sum_s d\ell_{t,j,s}\, k_s,\quad dk_s = \sum_{t,j} d\ell_{t,j,s}\, q_{t,j}

    ReLU passes no gradient where its input is <= 0 (the subgradient 0 at exactly 0).
    Masked (not visible) pairs pass none.

    Returns:
        ``(dq [s_q, H_I, d_I], d_weights [s_q, H_I], dk [s_kv, d_I])``, float64.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    weights = np.asarray(weights, np.float64)  # [s_q, H_I]
    d_scores = np.where(visible, np.asarray(d_scores, np.float64), 0.0)  # [s_q, s_kv]
    logits = np.einsum("tjd,sd->tjs", q, k)  # [s_q, H_I, s_kv]
    d_weights = np.einsum("ts,tjs->tj", d_scores, np.maximum(logits, 0.0))  # [s_q, H_I]
    d_logits = d_scores[:, None, :] * weights[:, :, None] * (logits > 0)  # [s_q, H_I, s_kv]
    dq = np.einsum("tjs,sd->tjd", d_logits, k)  # [s_q, H_I, d_I]
    dk = np.einsum("tjs,tjd->sd", d_logits, q)  # [s_kv, d_I]
    return dq, d_weights, dk


# ---------------------------------------------------------------------------- building blocks
def layer_norm_backward(x, weight, d_y, eps: float = NORM_EPS):
    r"""Gradients of :func:`~dsa_ref.layer.norms.layer_norm` with respect to x, weight and bias.

    With :math:`\hat x = (x - \bar x)\,r`, :math:`r = (\mathrm{Var}\,x + \epsilon)^{-1/2}`, :math:`g = d y \odot w`:
    :math:`dx = r\,(g - \bar g - \hat x\,\overline{g \hat x})`, :math:`dw = \sum d y\,\hat x`, :math:`db = \sum d y`.
    """
    x = np.asarray(x, np.float64)  # [n, d]
    centered = x - x.mean(axis=-1, keepdims=True)  # [n, d]
    inverse_std = 1.0 / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + eps)  # [n, 1]
    normalized = centered * inverse_std  # [n, d]
    g = d_y * np.asarray(weight, np.float64)  # [n, d]
    dx = inverse_std * (g - g.mean(axis=-1, keepdims=True)
                        - normalized * np.mean(g * normalized, axis=-1, keepdims=True))  # [n, d]
    return dx, np.sum(d_y * normalized, axis=0), np.sum(d_y, axis=0)


def rope_first_dims_backward(d_y, angles, rope_dim: int) -> np.ndarray:
    """Backward of half-split RoPE on the first ``rope_dim`` dims: a rotation's transpose is its inverse."""
    undone = apply_rope(d_y[..., :rope_dim], -np.asarray(angles), interleaved=False)  # [n, ..., r]
    return np.concatenate([undone, d_y[..., rope_dim:]], axis=-1)  # [n, ..., d]


def hadamard_backward(d_y) -> np.ndarray:
    """Backward of the orthonormal Hadamard rotation: the rotation itself (symmetric and orthogonal)."""
    return hadamard_rotate(d_y)
