"""The indexer's training loss (DeepSeek-V3.2-Exp, eqs. 3 and 4) and its backward.

The indexer learns to predict where the main attention goes: for each query, the KL divergence
from the main attention's head-summed distribution ``target`` (:func:`~dsa_ref.reference.attention_target`)
to the softmax of the index scores. The target is a constant (the indexer's input is detached from
the main model, and the main model does not learn from this loss), so only the indexer's
inputs receive gradients.

* Dense warm-up (eq. 3): the softmax runs over every key the query may see, ``[key_start, key_end)``;
  ``target`` is ``[s_q, s_kv]``.
* Sparse stage (eq. 4): the softmax runs over the query's selected slots ``indices`` only;
  ``target`` is ``[s_q, topk]``, one entry per slot.
"""

from __future__ import annotations

import numpy as np

from ._common import as_float64, full_key_ranges, query_chunks, result_dtype, visible_keys


def _allowed_and_keys(q, k, indices, key_start, key_end):
    """Which entries of a row take part in the softmax, and which key each entry scores.

    Returns ``(allowed bool [s_q, n], keys int [s_q, n])`` with ``n = topk`` (sparse) or ``s_kv``
    (dense). Entries that are not allowed point at key ``s_kv``: an all-zero row appended to the keys,
    so nothing of a real key (not even a NaN) reaches them, and their gradient lands outside ``dk``.
    """
    s_q, s_kv = q.shape[0], k.shape[0]
    if indices is not None:
        indices = np.asarray(indices).astype(np.int64)  # [s_q, topk]
        allowed = (indices >= 0) & (indices < s_kv)  # [s_q, topk]
        return allowed, np.where(allowed, indices, s_kv)
    if key_start is None or key_end is None:
        default_start, default_end = full_key_ranges(s_q, s_kv)
        key_start = default_start if key_start is None else key_start
        key_end = default_end if key_end is None else key_end
    allowed = visible_keys(key_start, key_end, s_kv)  # [s_q, s_kv]
    return allowed, np.where(allowed, np.arange(s_kv)[None, :], s_kv)


def _scores_and_distributions(q, weights, k, target, allowed, keys, k_scale):
    """Index scores of the allowed entries, log-softmax over them, and the target restricted to them
    and L1-normalized. All float64 ``[s_q, n]``; ``active`` marks rows whose target has mass there."""
    q, weights, k = as_float64(q), as_float64(weights), as_float64(k)  # [s_q, h_i, d_i], [s_q, h_i], [s_kv, d_i]
    k = np.concatenate([k, np.zeros((1, k.shape[1]))])  # [s_kv + 1, d_i]   the row entries outside the set read
    s_q, h_i, _ = q.shape
    n = allowed.shape[1]
    gate = np.zeros((s_q, h_i, n))  # [s_q, h_i, n]   q_{i,j} · k_key
    for rows in query_chunks(s_q, bytes_per_query=8 * n * (2 * h_i + k.shape[1])):
        selected = k[keys[rows]]  # [c, n, d_i]
        gate[rows] = np.matmul(q[rows], selected.transpose(0, 2, 1))  # [c, h_i, n]
    key_scale = np.ones(allowed.shape) if k_scale is None else np.append(as_float64(k_scale), 0.0)[keys]  # [s_q, n]
    scores = key_scale * np.einsum("ij,ijn->in", weights, np.maximum(gate, 0.0))  # [s_q, n]   eq. 1
    logits = np.where(allowed, scores, -np.inf)  # [s_q, n]

    target = np.where(allowed, as_float64(target), 0.0)  # [s_q, n]   mass outside the set is dropped
    mass = target.sum(axis=1, keepdims=True)  # [s_q, 1]
    active = mass[:, 0] > 0  # [s_q]
    target = np.divide(target, mass, out=np.zeros_like(target), where=mass > 0)  # [s_q, n]   p_t over the set
    row_max = logits.max(axis=1, keepdims=True, initial=-np.inf)  # [s_q, 1]   NaN stays NaN
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)  # [s_q, 1]   a row with no entry stays finite
    shifted = np.where(allowed, logits - row_max, -np.inf)  # [s_q, n]
    with np.errstate(divide="ignore", invalid="ignore"):  # a row with no entry: log 0, then -inf - -inf
        log_normalizer = np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # [s_q, 1]
        log_softmax = np.where(allowed, shifted - log_normalizer, 0.0)  # [s_q, n]   log Softmax(I_t)
    return q, weights, k, gate, key_scale, target, log_softmax, active


def indexer_loss(q_index, weights, k_index, target, *, indices=None, key_start=None, key_end=None,
                 k_scale=None) -> np.ndarray:
    r"""Per-query KL divergence from the main attention to the indexer (eq. 3, or eq. 4 with ``indices``).

    .. math::

        \mathcal L_t = D_{KL}\big(p_{t} \,\Vert\, \mathrm{Softmax}(I_{t})\big)
                     = \sum_s p_{t,s}\,\big(\log p_{t,s} - \log \mathrm{Softmax}(I_t)_s\big)

    with :math:`I_{t,s}` the index score of eq. 1 (``k_scale[s] · Σ_j w[t,j] · ReLU(q[t,j] · k[s])``)
    and the sum over the entries the query may use: its selected slots (``indices``), or its key
    range. The target is restricted to those entries and L1-normalized over them (mass it puts
    elsewhere is dropped, as eq. 4 restricts both distributions to the selected set); ``0 log 0 = 0``.
    A query whose target has no mass on its entries (or that has none) contributes 0.

    Args:
        q_index: ``[s_q, h_i, d_i]`` indexer queries; weights ``[s_q, h_i]``; k_index ``[s_kv, d_i]``;
            k_scale ``[s_kv]`` optional: as for :func:`~dsa_ref.reference.lightning_indexer`.
        target: ``[s_q, topk]`` with ``indices`` (e.g. :func:`~dsa_ref.reference.attention_target`),
            else ``[s_q, s_kv]``; non-negative.
        indices: int ``[s_q, topk]``, optional: the sparse stage's selected keys; an index ``< 0`` or
            ``>= s_kv`` is not a slot of the softmax. A duplicate index is two slots.
        key_start, key_end: int ``[s_q]`` key ranges of the dense stage (ignored with ``indices``);
            default: every key.

    Returns:
        float32 ``[s_q]`` (float64 for float64 ``q_index``), the loss of each query (sum or average them as the training loop wants).
    """
    dtype = result_dtype(q_index)
    allowed, keys = _allowed_and_keys(q_index, k_index, indices, key_start, key_end)
    *_, target, log_softmax, active = _scores_and_distributions(q_index, weights, k_index, target, allowed,
                                                                keys, k_scale)
    log_target = np.log(target, where=target > 0, out=np.zeros_like(target))  # [s_q, n]   0 log 0 = 0
    loss = np.sum(np.where(target > 0, target * (log_target - log_softmax), 0.0), axis=1)  # [s_q]
    return np.where(active, loss, 0.0).astype(dtype)


def indexer_loss_backward(q_index, weights, k_index, target, d_loss, *, indices=None, key_start=None,
                          key_end=None, k_scale=None):
    r"""Gradients of :func:`indexer_loss` with respect to ``q_index``, ``weights`` and ``k_index``.

    The target is a constant. With :math:`\hat p` the restricted, normalized target and
    :math:`g_{t,j,s} = q_{t,j} \cdot k_s`:

    .. math::

        dI_{t,s} = d\mathcal L_t\,\big(\mathrm{Softmax}(I_t)_s - \hat p_{t,s}\big), \qquad
        dw_{t,j} = \sum_s dI_{t,s}\, \mathrm{ks}_s\, \mathrm{ReLU}(g_{t,j,s}),

        dg_{t,j,s} = dI_{t,s}\, \mathrm{ks}_s\, w_{t,j}\, [g_{t,j,s} > 0], \qquad
        dq_{t,j} = \sum_s dg_{t,j,s}\, k_s, \qquad dk_s \mathrel{+}= \sum_{t,j} dg_{t,j,s}\, q_{t,j}

    ReLU passes no gradient where its input is ``<= 0``. ``dk`` of a key accumulates every query and
    slot that scored it (duplicates twice); a key scored by nobody gets exactly 0. Inactive queries
    (no target mass on their entries) pass no gradient.

    Args:
        q_index, weights, k_index, target, indices, key_start, key_end, k_scale: as for :func:`indexer_loss`.
        d_loss: ``[s_q]`` gradient of the total loss with respect to each query's loss (ones for a plain sum).

    Returns:
        ``(dq_index [s_q, h_i, d_i], dweights [s_q, h_i], dk_index [s_kv, d_i])``, float32 (float64 for
        float64 ``q_index``).
    """
    dtype = result_dtype(q_index)
    allowed, keys = _allowed_and_keys(q_index, k_index, indices, key_start, key_end)
    q, weights, k, gate, key_scale, target, log_softmax, active = _scores_and_distributions(
        q_index, weights, k_index, target, allowed, keys, k_scale)
    d_loss = np.where(active, as_float64(d_loss), 0.0)[:, None]  # [s_q, 1]
    d_scores = np.where(allowed, d_loss * (np.exp(log_softmax) - target), 0.0)  # [s_q, n]   dI
    d_scaled = d_scores * key_scale  # [s_q, n]   dI · ks
    d_weights = np.einsum("in,ijn->ij", d_scaled, np.maximum(gate, 0.0))  # [s_q, h_i]
    d_gate = d_scaled[:, None, :] * weights[:, :, None] * (gate > 0)  # [s_q, h_i, n]
    dq = np.zeros_like(q)  # [s_q, h_i, d_i]
    dk = np.zeros_like(k)  # [s_kv + 1, d_i]   the last row collects the entries outside the set
    for rows in query_chunks(q.shape[0], bytes_per_query=8 * allowed.shape[1] * (2 * q.shape[1] + k.shape[1])):
        dq[rows] = np.matmul(d_gate[rows], k[keys[rows]])  # [c, h_i, d_i]
        d_selected = np.matmul(d_gate[rows].transpose(0, 2, 1), q[rows])  # [c, n, d_i]
        np.add.at(dk, keys[rows].reshape(-1), d_selected.reshape(-1, k.shape[1]))  # duplicates accumulate
    return dq.astype(dtype), d_weights.astype(dtype), dk[:-1].astype(dtype)
