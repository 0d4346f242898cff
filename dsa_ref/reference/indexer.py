"""The lightning indexer, paper eq. (1): which past tokens each query should look at."""

from __future__ import annotations

import numpy as np

from ._common import as_float64, full_key_ranges, query_chunks, result_dtype, visible_keys


def lightning_indexer(q, weights, k, *, key_start=None, key_end=None, k_scale=None) -> np.ndarray:
    r"""Index scores of every query against every key (DeepSeek-V3.2-Exp, eq. 1).

    .. math::

        I_{i,j} = \mathrm{k\_scale}_j \sum_{h=1}^{H_I} w_{i,h}\,
                  \mathrm{ReLU}(q_{i,h} \cdot k_j)
        \quad\text{for } \mathrm{key\_start}_i \le j < \mathrm{key\_end}_i,
        \text{ else } -\infty

    Args:
        q: ``[s_q, h_i, d_i]`` indexer queries (any float dtype; fp8 e4m3 for the quantized path).
        weights: ``[s_q, h_i]`` per-head weights. The official model folds
            ``h_i^-0.5 · d_i^-0.5`` and the per-token fp8 q scale into them.
        k: ``[s_kv, d_i]`` indexer keys, one per token, shared by all heads.
        key_start, key_end: int ``[s_q]``, the half-open range of keys query i may see
            (DeepGEMM's ``ks`` / ``ke``). Default: every key.
        k_scale: ``[s_kv]`` per-key dequantization scale of fp8 keys (DeepGEMM's ``kv_scales``).
            Because ReLU is positively homogeneous, the scale can be applied after the ReLU.

    Returns:
        float32 ``[s_q, s_kv]`` scores (float64 for float64 ``q``), ``-inf`` outside each query's range. NaN in an input
        propagates to the scores it touches.

    Computed in float64, in chunks of queries so that the ``[chunk, h_i, s_kv]`` logits stay
    under :data:`~dsa_ref.reference._common.CHUNK_BYTES`.
    """
    dtype = result_dtype(q)
    q = as_float64(q)  # [s_q, h_i, d_i]
    weights = as_float64(weights)  # [s_q, h_i]
    k = as_float64(k)  # [s_kv, d_i]
    s_q, h_i, _ = q.shape
    s_kv = k.shape[0]
    if key_start is None or key_end is None:
        default_start, default_end = full_key_ranges(s_q, s_kv)
        key_start = default_start if key_start is None else key_start
        key_end = default_end if key_end is None else key_end

    key_start, key_end = np.asarray(key_start), np.asarray(key_end)
    scores = np.zeros((s_q, s_kv), np.float64)  # [s_q, s_kv]
    for rows in query_chunks(s_q, bytes_per_query=2 * h_i * s_kv * 8):
        if key_end[rows].max() <= key_start[rows].min():
            continue  # no query of the chunk sees any key
        # Only the keys some query of the chunk can see (half the work for causal ranges).
        cols = slice(int(key_start[rows].min()), int(key_end[rows].max()))
        logits = np.matmul(q[rows], k[cols].T)  # [c, h_i, n]   q_{i,h} · k_j
        gated = np.maximum(logits, 0.0)  # [c, h_i, n]   ReLU
        scores[rows, cols] = np.einsum("ch,chn->cn", weights[rows], gated)  # [c, n]   Σ_h w_{i,h} · ReLU(...)
    if k_scale is not None:
        scores *= as_float64(k_scale)[None, :]  # [s_q, s_kv]
    visible = visible_keys(key_start, key_end, s_kv)  # [s_q, s_kv]
    return np.where(visible, scores, -np.inf).astype(dtype)  # [s_q, s_kv]
