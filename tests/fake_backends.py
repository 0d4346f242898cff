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


class LowPrecisionTraining(GoodBackend):
    """A correct training backend in the precision of a GPU kernel: float32 arithmetic, and for 16-bit
    inputs the probabilities and dS rounded to the input dtype before the products, as tensor-core
    kernels do. The kit must accept it: a gradient that cancels to a tiny value is judged by the size
    of its terms (a float32 rounding residue is not a bug)."""

    name = "low-precision-training"

    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale, d_v, topk_length, attn_sink, d_lse,
                            deterministic):
        rounding = {"bfloat16": q.dtype, "float16": q.dtype}.get(q.dtype.name, np.float32)
        q32, kv32 = q.astype(np.float32), kv.astype(np.float32)
        s_kv = kv.shape[0]
        valid = reference.valid_slots(indices, s_kv, topk_length)
        rows = np.where(valid, indices, 0)
        keys = np.where(valid[..., None], kv32[rows], np.float32(0))  # [s_q, topk, d_qk]
        with np.errstate(over="ignore", invalid="ignore"):
            probs = np.where(valid[:, None, :], np.exp(np.float32(sm_scale) * np.einsum("ihd,itd->iht", q32, keys)
                                                       - lse[..., None]), np.float32(0)).astype(np.float32)
        share = (np.ones_like(lse) if attn_sink is None else
                 (1 / (1 + np.exp(attn_sink[None, :].astype(np.float32) - lse))).astype(np.float32))
        share = np.where(np.isneginf(lse), np.float32(0), share)
        delta = np.einsum("ihd,ihd->ih", d_out, out).astype(np.float32)
        d_probs = np.einsum("ihd,itd->iht", d_out.astype(rounding).astype(np.float32), keys[..., :d_v])
        d_lse32 = np.zeros_like(lse) if d_lse is None else d_lse.astype(np.float32)
        d_logits = probs * (share[..., None] * (d_probs - delta[..., None]) + d_lse32[..., None])
        d_logits = d_logits.astype(rounding).astype(np.float32)  # dS to the input dtype before the products
        rounded_probs = (share[..., None] * probs).astype(rounding).astype(np.float32)
        dq = np.float32(sm_scale) * np.einsum("iht,itd->ihd", d_logits, keys)
        contributions = np.float32(sm_scale) * np.einsum("iht,ihd->itd", d_logits, q32)
        contributions[..., :d_v] += np.einsum("iht,ihd->itd", rounded_probs, d_out.astype(np.float32))
        dkv = np.zeros((s_kv + 1, kv.shape[1]), np.float32)
        np.add.at(dkv, np.where(valid, indices, s_kv).reshape(-1), contributions.reshape(-1, kv.shape[1]))
        grads = (dq.astype(np.float32), dkv[:s_kv])
        if attn_sink is None:
            return grads
        d_sink = -np.sum(np.where(np.isneginf(lse), np.float32(0), delta * (1 - share)), axis=0)
        return grads + (d_sink.astype(np.float32),)

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        # The float64 reference's gradient, rounded to float32 at every intermediate a kernel would keep.
        grads = reference.indexer_loss_backward(q_index.astype(np.float32), weights.astype(np.float32),
                                                k_index.astype(np.float32), target.astype(np.float32),
                                                d_loss.astype(np.float32), indices=indices, key_start=key_start,
                                                key_end=key_end, k_scale=k_scale)
        noise = np.float32(1 + 2**-22)  # a float32 kernel's last-bits difference on every element
        return tuple(np.where(g != 0, g * noise + np.float32(1e-7) * np.abs(g).max(initial=0), g).astype(np.float32)
                     for g in grads)
