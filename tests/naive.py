"""Independent, deliberately naive loop versions of the ops, for testing the vectorized reference.

They share no code with dsa_ref: plain Python loops over queries, keys and heads, math.exp,
float64 throughout. Slow, so tests use them on small shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def indexer(q, weights, k, key_start, key_end, k_scale=None):
    q, weights, k = (np.asarray(a).astype(np.float64) for a in (q, weights, k))
    s_q, h_i, _ = q.shape
    s_kv = k.shape[0]
    scores = np.full((s_q, s_kv), -np.inf)
    for i in range(s_q):
        for j in range(int(key_start[i]), int(key_end[i])):
            total = 0.0
            for h in range(h_i):
                total += weights[i, h] * max(0.0, float(np.dot(q[i, h], k[j])))
            scores[i, j] = total * (1.0 if k_scale is None else float(k_scale[j]))
    return scores


def topk(scores, count):
    scores = np.asarray(scores, np.float64)
    out = np.full((scores.shape[0], count), -1, np.int64)
    for i, row in enumerate(scores):
        candidates = [(-float(v), j) for j, v in enumerate(row) if not math.isnan(v) and v != -math.inf]
        candidates.sort()
        for slot, (_, j) in enumerate(candidates[:count]):
            out[i, slot] = j
    return out


def sparse_mla(q, kv, indices, sm_scale, d_v, topk_length=None, attn_sink=None):
    q, kv = np.asarray(q).astype(np.float64), np.asarray(kv).astype(np.float64)
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    out = np.zeros((s_q, h, d_v))
    lse = np.full((s_q, h), -np.inf)
    for i in range(s_q):
        slots = range(indices.shape[1] if topk_length is None else int(topk_length[i]))
        rows = [int(indices[i, t]) for t in slots if 0 <= int(indices[i, t]) < s_kv]
        for head in range(h):
            if not rows:
                continue
            logits = [sm_scale * float(np.dot(q[i, head], kv[r])) for r in rows]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            lse[i, head] = top + math.log(total)
            for w, r in zip(weights, rows):
                out[i, head] += (w / total) * kv[r, :d_v]
            if attn_sink is not None:
                out[i, head] *= 1.0 / (1.0 + math.exp(float(attn_sink[head]) - lse[i, head]))
    return out, lse
