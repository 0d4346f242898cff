"""Backends for testing the registry and the conformance kit: each one is wrong in one way."""

from __future__ import annotations

import numpy as np

from dsa_ref import reference
from dsa_ref_backends.numpy_reference import NumpyBackend


class GoodBackend(NumpyBackend):
    """Correct: the reference under another name (loaded through module://)."""

    name = "good"
    description = "test backend"


class NoGpuBackend(GoodBackend):
    name = "nogpu"

    def unavailable_reasons(self):
        return ["no CUDA device"]


class IgnoresKeyRanges(GoodBackend):
    name = "ignores-key-ranges"

    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        full = np.zeros_like(key_start), np.full_like(key_end, k.shape[0])
        return reference.lightning_indexer(q, weights, k, key_start=full[0], key_end=full[1], k_scale=k_scale)


class SelectsMaskedKeys(GoodBackend):
    """Top-k by plain argsort: picks -inf keys instead of padding with -1."""

    name = "selects-masked"

    def topk_indices(self, scores, topk):
        order = np.argsort(-np.nan_to_num(scores.astype(np.float64), nan=-np.inf), axis=1, kind="stable")[:, :topk]
        padded = np.full((scores.shape[0], topk), -1, np.int32)
        padded[:, :order.shape[1]] = order
        return padded


class BreaksTiesWrongly(GoodBackend):
    """Drops the last selected key for another one with a strictly lower score."""

    name = "breaks-ties-wrongly"

    def topk_indices(self, scores, topk):
        indices = reference.topk_indices(scores, topk + 1)
        keep = indices[:, :topk].copy()
        swap = (indices[:, topk] >= 0) & (keep[:, -1] >= 0)
        rows = np.flatnonzero(swap)
        lower = scores[rows, indices[rows, topk]] < scores[rows, keep[rows, -1]]
        keep[rows[lower], -1] = indices[rows[lower], topk]
        return keep


class ClampsInvalidIndices(GoodBackend):
    """Reads row 0 for every invalid index (the out-of-range read the peers warn about)."""

    name = "clamps-invalid"

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        s_kv = kv.shape[0]
        clamped = np.where((indices >= 0) & (indices < s_kv), indices, 0).astype(np.int32)
        return super().sparse_mla(q, kv, clamped, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                                  attn_sink=attn_sink)


class Base2Lse(GoodBackend):
    name = "base2-lse"

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        out, lse = super().sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                                      attn_sink=attn_sink)
        return out, (lse / np.log(2)).astype(np.float32)


class AssumesContiguous(GoodBackend):
    """Reads inputs as if they were contiguous: a strided view then shows its poisoned gaps."""

    name = "assumes-contiguous"

    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        def raw(x):
            return np.lib.stride_tricks.as_strided(x, x.shape, np.empty(x.shape, x.dtype).strides) if x is not None else x
        return super().lightning_indexer(raw(q), raw(weights), raw(k), key_start=key_start, key_end=key_end,
                                         k_scale=k_scale)


class RefusesEverything(GoodBackend):
    name = "refuses-everything"

    def not_supported_reasons(self, op, **inputs):
        return ["nothing (this backend supports no inputs)"]
