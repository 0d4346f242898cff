"""Top-k selection: the keys each query keeps (paper eq. 2's Top-k)."""

from __future__ import annotations

import numpy as np

from ._common import query_chunks


def topk_indices(scores, topk: int) -> np.ndarray:
    r"""The ``topk`` highest-scoring keys of each query row.

    .. math:: S_i = \operatorname{Top\text{-}k}_j\,(I_{i,j})

    A key is *selectable* when its score is not ``-inf`` (masked) and not NaN. The result holds
    the selectable keys in descending score order, ties broken by the lower key index, and
    ``-1`` in the slots beyond the number of selectable keys of that row (so ``topk`` may exceed
    ``s_kv``). ``+inf`` (an overflowed score) is selectable and ranks first.

    Peers: the official inference code calls ``scores.topk(min(topk, end_pos))`` with no
    padding; TileLang's and FlashMLA-adjacent radix selects return the same *set* unordered.
    Backends of dsa-ref may also return the set in any order; the conformance kit compares
    sets with a tie-aware rule (:func:`dsa_ref.testing.check_topk`).

    Args:
        scores: float ``[s_q, s_kv]``.
        topk: number of slots per row, ``>= 1``.

    Returns:
        int32 ``[s_q, topk]``.
    """
    scores = np.asarray(scores)  # [s_q, s_kv]
    s_q, s_kv = scores.shape
    indices = np.full((s_q, topk), -1, np.int32)  # [s_q, topk]
    kept = min(topk, s_kv)
    for rows in query_chunks(s_q, bytes_per_query=3 * 8 * s_kv):
        row_scores = scores[rows].astype(np.float64)  # [c, s_kv]
        selectable = row_scores > -np.inf  # [c, s_kv]   False for -inf and NaN
        # Ascending stable sort of the negated score: descending score, lower index first on ties;
        # unselectable keys sort last with +inf.
        sort_key = np.where(selectable, -row_scores, np.inf)  # [c, s_kv]
        order = np.argsort(sort_key, axis=1, kind="stable")[:, :kept]  # [c, kept]
        count = selectable.sum(axis=1, keepdims=True)  # [c, 1]
        slot = np.arange(kept)[None, :]  # [1, kept]
        indices[rows, :kept] = np.where(slot < count, order, -1)  # [c, kept]
    return indices
