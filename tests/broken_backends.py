"""Backends with one realistic bug each, and the ops whose conformance check must reject them.

Each class is the reference (through :class:`fake_backends.GoodBackend`) except for one mistake
a real kernel has made or could make: an argument ignored, a convention mixed up, an edge case
mishandled. ``BROKEN_BACKENDS`` lists every one with the ops to check it on; the kit's test
requires ``check_backend(..., profile="ci")`` to fail each of them. A new op's broken backends
are one decorated class each.
"""

from __future__ import annotations

import numpy as np

import fake_backends
from dsa_ref import reference
from dsa_ref.reference import unpack_kv_cache_fp8
from dsa_ref.reference.formats import FP8_E4M3, KV_CACHE_FP8_BYTES, KV_LATENT_DIM
from fake_backends import GoodBackend

#: (backend class, ops whose check must reject it)
BROKEN_BACKENDS: list[tuple[type, tuple[str, ...]]] = []


def breaks(*ops: str):
    def register(cls):
        BROKEN_BACKENDS.append((cls, ops))
        return cls
    return register


for existing, op in [(fake_backends.IgnoresKeyRanges, "lightning_indexer"),
                     (fake_backends.AssumesContiguous, "lightning_indexer"),
                     (fake_backends.SelectsMaskedKeys, "topk_indices"),
                     (fake_backends.BreaksTiesWrongly, "topk_indices"),
                     (fake_backends.ClampsInvalidIndices, "sparse_mla"),
                     (fake_backends.Base2Lse, "sparse_mla"),
                     (fake_backends.RefusesEverything, "sparse_mla")]:
    breaks(op)(existing)


class _SparseMlaBug(GoodBackend):
    """Base of the sparse-MLA bugs: the reference with every argument passed through ``_call``."""

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        return self._call(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length, attn_sink=attn_sink)

    def _call(self, q, kv, indices, **arguments):
        return reference.sparse_mla(q, kv, indices, **arguments)


# ---------------------------------------------------------------------------- sparse_mla
@breaks("sparse_mla")
class IgnoresSmScale(_SparseMlaBug):
    """Always d_qk ** -0.5: wrong for V3.2, whose scale is 192 ** -0.5 * mscale ** 2."""

    name = "ignores-sm-scale"

    def _call(self, q, kv, indices, *, sm_scale, **arguments):
        return reference.sparse_mla(q, kv, indices, sm_scale=q.shape[-1] ** -0.5, **arguments)


@breaks("sparse_mla")
class ValuesFromTheLastColumns(_SparseMlaBug):
    """V taken as the last d_v columns of kv instead of the first."""

    name = "values-from-the-last-columns"

    def _call(self, q, kv, indices, *, d_v, **arguments):
        if kv.dtype == np.uint8:
            kv = unpack_kv_cache_fp8(kv)
        reversed_kv = np.ascontiguousarray(kv[:, ::-1])
        out, _ = reference.sparse_mla(q[..., ::-1], reversed_kv, indices, d_v=d_v, **arguments)
        _, lse = reference.sparse_mla(q, kv, indices, d_v=d_v, **arguments)
        return out[..., ::-1].copy(), lse


@breaks("sparse_mla")
class IgnoresDv(_SparseMlaBug):
    """Every column of kv taken as V (d_v = d_qk), whatever d_v asks for."""

    name = "ignores-d-v"

    def _call(self, q, kv, indices, *, d_v, **arguments):
        return reference.sparse_mla(q, kv, indices, d_v=q.shape[-1], **arguments)


@breaks("sparse_mla")
class IgnoresTopkLength(_SparseMlaBug):
    name = "ignores-topk-length"

    def _call(self, q, kv, indices, *, topk_length, **arguments):
        return reference.sparse_mla(q, kv, indices, topk_length=None, **arguments)


@breaks("sparse_mla")
class IgnoresAttnSink(_SparseMlaBug):
    name = "ignores-attn-sink"

    def _call(self, q, kv, indices, *, attn_sink, **arguments):
        return reference.sparse_mla(q, kv, indices, attn_sink=None, **arguments)


@breaks("sparse_mla")
class AttnSinkWithTheWrongSign(_SparseMlaBug):
    """out *= 1 / (1 + exp(lse - sink)) instead of exp(sink - lse)."""

    name = "attn-sink-wrong-sign"

    def _call(self, q, kv, indices, *, attn_sink, **arguments):
        out, lse = reference.sparse_mla(q, kv, indices, attn_sink=None, **arguments)
        if attn_sink is not None:
            with np.errstate(over="ignore"):
                out = out * (1 / (1 + np.exp(lse.astype(np.float64) - attn_sink[None, :])))[..., None]
        return out.astype(np.float32), lse


@breaks("sparse_mla")
class PlusInfLseForEmptyRows(_SparseMlaBug):
    """FlashMLA's +inf for a query with no valid index, where the spec says -inf."""

    name = "plus-inf-lse"

    def _call(self, q, kv, indices, **arguments):
        out, lse = reference.sparse_mla(q, kv, indices, **arguments)
        return out, np.where(np.isneginf(lse), np.inf, lse).astype(np.float32)


@breaks("sparse_mla")
class NanOutForEmptyRows(_SparseMlaBug):
    """0 / 0 left in the output of a query with no valid index."""

    name = "nan-out-for-empty-rows"

    def _call(self, q, kv, indices, **arguments):
        out, lse = reference.sparse_mla(q, kv, indices, **arguments)
        return np.where(np.isneginf(lse)[..., None], np.nan, out).astype(np.float32), lse


@breaks("sparse_mla")
class ClampsIndicesToTheLastRow(_SparseMlaBug):
    """An index >= s_kv read as row s_kv - 1 (a clamped load), a negative one as row 0."""

    name = "clamps-to-the-last-row"

    def _call(self, q, kv, indices, **arguments):
        return reference.sparse_mla(q, kv, np.clip(indices, 0, kv.shape[0] - 1).astype(np.int32), **arguments)


@breaks("sparse_mla")
class WrapsNegativeIndices(_SparseMlaBug):
    """Python-style indexing: -1 reads the last row."""

    name = "wraps-negative-indices"

    def _call(self, q, kv, indices, **arguments):
        s_kv = kv.shape[0]
        wrapped = np.where((indices < 0) & (indices >= -s_kv), indices.astype(np.int64) + s_kv, indices)
        return reference.sparse_mla(q, kv, wrapped.astype(np.int32), **arguments)


@breaks("sparse_mla")
class CountsDuplicatesOnce(_SparseMlaBug):
    """A key selected twice in a row counted as one slot of the softmax."""

    name = "counts-duplicates-once"

    def _call(self, q, kv, indices, **arguments):
        deduplicated = indices.astype(np.int32).copy()
        ordered = np.argsort(indices, axis=1, kind="stable")
        sorted_indices = np.take_along_axis(indices, ordered, axis=1)
        repeated = np.zeros_like(sorted_indices, bool)
        repeated[:, 1:] = sorted_indices[:, 1:] == sorted_indices[:, :-1]
        np.put_along_axis(deduplicated, ordered, np.where(repeated, -1, sorted_indices), axis=1)
        return reference.sparse_mla(q, kv, deduplicated, **arguments)


@breaks("sparse_mla")
class IgnoresFp8CacheScales(_SparseMlaBug):
    """Reads the packed cache's e4m3 latent values without their per-tile scales."""

    name = "ignores-fp8-cache-scales"

    def _call(self, q, kv, indices, **arguments):
        if kv.dtype == np.uint8 and kv.shape[1] == KV_CACHE_FP8_BYTES:
            unscaled = unpack_kv_cache_fp8(kv)
            unscaled[:, :KV_LATENT_DIM] = np.ascontiguousarray(kv[:, :KV_LATENT_DIM]).view(FP8_E4M3).astype(np.float32)
            kv = unscaled
        return reference.sparse_mla(q, kv, indices, **arguments)


@breaks("sparse_mla")
class SparseMlaAssumesContiguous(_SparseMlaBug):
    """Reads q and kv as if contiguous: a strided view shows its poisoned gaps."""

    name = "sparse-mla-assumes-contiguous"

    def _call(self, q, kv, indices, **arguments):
        with np.errstate(all="ignore"):  # the poison it reads overflows on the way
            return reference.sparse_mla(_raw(q), _raw(kv), indices, **arguments)


def _raw(x):
    """The first elements of x's buffer read with contiguous strides (strides ignored)."""
    return np.lib.stride_tricks.as_strided(x, x.shape, np.empty(x.shape, x.dtype).strides)


# ---------------------------------------------------------------------------- lightning_indexer
class _IndexerBug(GoodBackend):
    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        return self._scores(q.astype(np.float64), weights.astype(np.float64), k.astype(np.float64),
                            key_start, key_end, k_scale)

    @staticmethod
    def _mask(scores, key_start, key_end, inclusive=False):
        key = np.arange(scores.shape[1])[None, :]
        end = key_end[:, None] + (1 if inclusive else 0)
        return np.where((key_start[:, None] <= key) & (key < end), scores, -np.inf).astype(np.float32)

    @staticmethod
    def _scale(scores, k_scale):
        return scores if k_scale is None else scores * k_scale.astype(np.float64)[None, :]


@breaks("lightning_indexer")
class IgnoresKScale(_IndexerBug):
    name = "ignores-k-scale"

    def _scores(self, q, weights, k, key_start, key_end, k_scale):
        return reference.lightning_indexer(q, weights, k, key_start=key_start, key_end=key_end, k_scale=None)


@breaks("lightning_indexer")
class KeyEndInclusive(_IndexerBug):
    """key_end read as the last visible key instead of one past it."""

    name = "key-end-inclusive"

    def _scores(self, q, weights, k, key_start, key_end, k_scale):
        logits = np.einsum("qhd,kd->qhk", q, k)
        scores = self._scale(np.einsum("qh,qhk->qk", weights, np.maximum(logits, 0)), k_scale)
        return self._mask(scores, key_start, key_end, inclusive=True)


@breaks("lightning_indexer")
class MissesTheRelu(_IndexerBug):
    name = "misses-the-relu"

    def _scores(self, q, weights, k, key_start, key_end, k_scale):
        scores = self._scale(np.einsum("qh,qhk->qk", weights, np.einsum("qhd,kd->qhk", q, k)), k_scale)
        return self._mask(scores, key_start, key_end)


@breaks("lightning_indexer")
class ReluAfterTheWeights(_IndexerBug):
    """ReLU(w · q·k) instead of w · ReLU(q·k): negative weights then contribute nothing."""

    name = "relu-after-the-weights"

    def _scores(self, q, weights, k, key_start, key_end, k_scale):
        weighted = weights[:, :, None] * np.einsum("qhd,kd->qhk", q, k)
        scores = self._scale(np.maximum(weighted, 0).sum(axis=1), k_scale)
        return self._mask(scores, key_start, key_end)


# ---------------------------------------------------------------------------- topk_indices
@breaks("topk_indices")
class SelectsNan(GoodBackend):
    """Ranks NaN above every number (a sort on the raw bits of the float)."""

    name = "selects-nan"

    def topk_indices(self, scores, topk):
        return reference.topk_indices(np.where(np.isnan(scores), np.inf, scores), topk)


@breaks("topk_indices")
class LosesTiesAtTheThreshold(GoodBackend):
    """A radix select that keeps the keys above the k-th score and then only one key equal to
    it, however many slots are left: a row with a tie at the threshold comes back short."""

    name = "loses-ties-at-the-threshold"

    def topk_indices(self, scores, topk):
        indices = reference.topk_indices(scores, topk)
        rows = np.arange(scores.shape[0])[:, None]
        chosen = indices >= 0
        chosen_scores = np.where(chosen, scores[rows, np.maximum(indices, 0)], np.inf)
        kth = chosen_scores.min(axis=1, keepdims=True)
        at_threshold = chosen & (chosen_scores == kth)
        first_at_threshold = np.cumsum(at_threshold, axis=1) == 1
        return np.where(at_threshold & ~first_at_threshold, -1, indices).astype(np.int32)


@breaks("topk_indices")
class RanksInBfloat16(GoodBackend):
    """Compares scores rounded to bfloat16: a key that loses by less than bf16's resolution may
    push out a better one."""

    name = "ranks-in-bfloat16"

    def topk_indices(self, scores, topk):
        import ml_dtypes

        rounded = scores.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        # Among equal rounded values prefer the higher key: the opposite of the reference's
        # tie rule, so that the rounding decides whenever it merges two scores.
        flipped = rounded[:, ::-1]
        return np.where(reference.topk_indices(flipped, topk) >= 0,
                        scores.shape[1] - 1 - reference.topk_indices(flipped, topk), -1).astype(np.int32)


@breaks("topk_indices")
class TopkAssumesContiguous(GoodBackend):
    name = "topk-assumes-contiguous"

    def topk_indices(self, scores, topk):
        return reference.topk_indices(_raw(scores), topk)


# ---------------------------------------------------------------------------- dsa_attention
@breaks("dsa_attention")
class DsaIgnoresSmScale(GoodBackend):
    """A fused DSA path that forgets to forward sm_scale to its attention."""

    name = "dsa-ignores-sm-scale"

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, sm_scale, **arguments):
        return super().dsa_attention(q, kv, q_index, weights, k_index, sm_scale=q.shape[-1] ** -0.5, **arguments)


@breaks("dsa_attention")
class DsaWithoutKeyRanges(GoodBackend):
    """A fused DSA path that lets every query see every key (non-causal)."""

    name = "dsa-without-key-ranges"

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, key_start, key_end, **arguments):
        s_q, s_kv = q_index.shape[0], k_index.shape[0]
        return super().dsa_attention(q, kv, q_index, weights, k_index, key_start=np.zeros(s_q, np.int32),
                                     key_end=np.full(s_q, s_kv, np.int32), **arguments)


@breaks("dsa_attention")
class DsaIgnoresKScale(GoodBackend):
    """A fused DSA path whose indexer drops the fp8 keys' scales."""

    name = "dsa-ignores-k-scale"

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, k_scale, **arguments):
        return super().dsa_attention(q, kv, q_index, weights, k_index, k_scale=None, **arguments)


@breaks("dsa_attention")
class DsaValuesFromTheLastColumns(GoodBackend):
    name = "dsa-values-from-the-last-columns"

    def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
        return ValuesFromTheLastColumns._call(self, q, kv, indices, sm_scale=sm_scale, d_v=d_v,
                                              topk_length=topk_length, attn_sink=attn_sink)


# ---------------------------------------------------------------------------- training ops
class _BackwardBug(GoodBackend):
    """Base of the sparse-MLA backward bugs: the reference with every argument passed through ``_call``."""

    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale, d_v, topk_length, attn_sink, d_lse,
                            deterministic):
        return self._call(q, kv, indices, out, lse, d_out, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                          attn_sink=attn_sink, d_lse=d_lse)

    def _call(self, *arrays, **arguments):
        return reference.sparse_mla_backward(*arrays, **arguments)


@breaks("sparse_mla_backward")
class BackwardCountsDuplicatesOnce(_BackwardBug):
    """Scatters dkv with a plain indexed assignment: a row read by two slots keeps one contribution."""

    name = "backward-counts-duplicates-once"

    def _call(self, q, kv, indices, out, lse, d_out, **arguments):
        grads = list(reference.sparse_mla_backward(q, kv, indices, out, lse, d_out, **arguments))
        valid = reference.valid_slots(indices, kv.shape[0], arguments["topk_length"])
        rows, slots = np.nonzero(valid)
        per_slot = np.zeros(kv.shape)
        for row, slot in zip(rows, slots):  # the last writer wins, as with a racing store
            single = np.full_like(indices, -1)
            single[row, slot] = indices[row, slot]
            one = reference.sparse_mla_backward(q, kv, single, out, lse, d_out, **arguments)[1]
            per_slot[indices[row, slot]] = one[indices[row, slot]]
        grads[1] = per_slot.astype(np.float32)
        return tuple(grads)


@breaks("sparse_mla_backward")
class BackwardWritesInvalidSlotsToRowZero(_BackwardBug):
    """Invalid slots are pointed at row 0 and masked in the softmax, but their value gradient still lands there."""

    name = "backward-invalid-to-row-zero"

    def _call(self, q, kv, indices, out, lse, d_out, **arguments):
        grads = list(reference.sparse_mla_backward(q, kv, indices, out, lse, d_out, **arguments))
        invalid = ~reference.valid_slots(indices, kv.shape[0], arguments["topk_length"])
        if invalid.any() and kv.shape[0] > 0:
            leaked = np.einsum("ihd->d", np.asarray(d_out, np.float64)) * invalid.sum() / max(1, invalid.size)
            grads[1] = grads[1].copy()
            grads[1][0, :arguments["d_v"]] += leaked.astype(np.float32)
        return tuple(grads)


@breaks("sparse_mla_backward")
class BackwardIgnoresDLse(_BackwardBug):
    name = "backward-ignores-d-lse"

    def _call(self, *arrays, d_lse, **arguments):
        return reference.sparse_mla_backward(*arrays, d_lse=None, **arguments)


@breaks("sparse_mla_backward")
class BackwardWithoutSinkGradient(_BackwardBug):
    """Returns zeros for the sink's gradient (the sink learns nothing)."""

    name = "backward-without-sink-gradient"

    def _call(self, *arrays, **arguments):
        grads = reference.sparse_mla_backward(*arrays, **arguments)
        if arguments["attn_sink"] is None:
            return grads
        return grads[0], grads[1], np.zeros_like(grads[2])


@breaks("sparse_mla_backward")
class BackwardIgnoresTheSinkShare(_BackwardBug):
    """Differentiates as if there were no sink (f = 1), though the forward scaled out by it."""

    name = "backward-ignores-sink-share"

    def _call(self, *arrays, attn_sink, **arguments):
        grads = reference.sparse_mla_backward(*arrays, attn_sink=None, **arguments)
        if attn_sink is None:
            return grads
        return grads[0], grads[1], np.zeros(np.shape(attn_sink), np.float32)


@breaks("sparse_mla_backward")
class BackwardIgnoresSmScale(_BackwardBug):
    name = "backward-ignores-sm-scale"

    def _call(self, q, *arrays, sm_scale, **arguments):
        return reference.sparse_mla_backward(q, *arrays, sm_scale=q.shape[-1] ** -0.5, **arguments)


@breaks("sparse_mla_backward")
class BackwardIgnoresTopkLength(_BackwardBug):
    name = "backward-ignores-topk-length"

    def _call(self, *arrays, topk_length, **arguments):
        return reference.sparse_mla_backward(*arrays, topk_length=None, **arguments)


@breaks("sparse_mla_backward")
class BackwardReadsUnreadRows(_BackwardBug):
    """Computes every row's gradient as a dense product over a 0/1 selection matrix: 0 x NaN leaks."""

    name = "backward-reads-unread-rows"

    def _call(self, q, kv, *arrays, **arguments):
        grads = list(reference.sparse_mla_backward(q, kv, *arrays, **arguments))
        grads[1] = (grads[1] + 0.0 * np.asarray(kv, np.float64)).astype(np.float32)
        return tuple(grads)


@breaks("sparse_mla_backward")
class BackwardNotDeterministic(_BackwardBug):
    """Sums in a different order on every call, even when asked not to (a float-atomics kernel)."""

    name = "backward-not-deterministic"

    def __init__(self):
        self.calls = 0

    def _call(self, *arrays, **arguments):
        grads = list(reference.sparse_mla_backward(*arrays, **arguments))
        self.calls += 1
        grads[1] = grads[1] * np.float32(1 + 1e-7 * (self.calls % 2))  # an order-dependent last bit
        return tuple(grads)


@breaks("attention_target")
class TargetNotNormalized(GoodBackend):
    """Sums the probabilities over heads but forgets the L1 normalization."""

    name = "target-not-normalized"

    def attention_target(self, q, kv, indices, lse, *, sm_scale, topk_length):
        target = reference.attention_target(q, kv, indices, lse, sm_scale=sm_scale, topk_length=topk_length)
        return (target * q.shape[1]).astype(np.float32)


@breaks("attention_target")
class TargetFromTheFirstHeadOnly(GoodBackend):
    name = "target-first-head"

    def attention_target(self, q, kv, indices, lse, *, sm_scale, topk_length):
        return reference.attention_target(q[:, :1], kv, indices, lse[:, :1], sm_scale=sm_scale,
                                          topk_length=topk_length)


@breaks("attention_target")
class TargetIgnoresTopkLength(GoodBackend):
    name = "target-ignores-topk-length"

    def attention_target(self, q, kv, indices, lse, *, sm_scale, topk_length):
        return reference.attention_target(q, kv, indices, lse, sm_scale=sm_scale, topk_length=None)


class _LossBug(GoodBackend):
    """Base of the indexer-loss bugs: the reference with its inputs passed through ``_inputs``."""

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        return reference.indexer_loss(*self._inputs(q_index, weights, k_index, target, indices=indices,
                                                    key_start=key_start, key_end=key_end, k_scale=k_scale))

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        arrays, arguments = self._inputs(q_index, weights, k_index, target, indices=indices, key_start=key_start,
                                         key_end=key_end, k_scale=k_scale)
        return reference.indexer_loss_backward(*arrays[:4], d_loss, **arguments)

    def _inputs(self, *arrays, **arguments):
        return arrays, arguments


def _loss_call(method):
    """Adapter so that ``_inputs`` returns what ``reference.indexer_loss`` takes positionally and by name."""
    def call(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        arrays, arguments = self._inputs(q_index, weights, k_index, target, indices=indices, key_start=key_start,
                                         key_end=key_end, k_scale=k_scale)
        return method(*arrays, **arguments)
    return call


_LossBug.indexer_loss = _loss_call(reference.indexer_loss)


@breaks("indexer_loss", "indexer_loss_backward")
class LossOverInvalidSlotsToo(_LossBug):
    """The sparse softmax runs over every slot: invalid ones score against key 0 instead of being left out."""

    name = "loss-over-invalid-slots"

    def _inputs(self, q_index, weights, k_index, target, *, indices, **arguments):
        if indices is not None:
            indices = np.where((indices >= 0) & (indices < k_index.shape[0]), indices, 0)
        return (q_index, weights, k_index, target), dict(indices=indices, **arguments)


@breaks("indexer_loss", "indexer_loss_backward")
class LossIgnoresKScale(_LossBug):
    name = "loss-ignores-k-scale"

    def _inputs(self, *arrays, k_scale, **arguments):
        return arrays, dict(k_scale=None, **arguments)


@breaks("indexer_loss", "indexer_loss_backward")
class LossIgnoresKeyRanges(_LossBug):
    """The dense stage's softmax over every key, future ones included."""

    name = "loss-ignores-key-ranges"

    def _inputs(self, *arrays, key_start, key_end, **arguments):
        if key_start is not None:
            key_start, key_end = np.zeros_like(key_start), np.full_like(key_end, arrays[2].shape[0])
        return arrays, dict(key_start=key_start, key_end=key_end, **arguments)


@breaks("indexer_loss")
class LossTargetNotRenormalized(_LossBug):
    """Uses the target as given, mass on dropped entries included: KL of an unnormalized distribution."""

    name = "loss-target-not-renormalized"

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        loss = reference.indexer_loss(q_index, weights, k_index, target, indices=indices, key_start=key_start,
                                      key_end=key_end, k_scale=k_scale)
        return (loss * np.asarray(target, np.float64).sum(axis=1)).astype(np.float32)


@breaks("indexer_loss_backward")
class LossBackwardIgnoresDLoss(_LossBug):
    """Backward as if the loss were a plain sum (d_loss = 1 for every query)."""

    name = "loss-backward-ignores-d-loss"

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        return reference.indexer_loss_backward(q_index, weights, k_index, target, np.ones_like(d_loss),
                                               indices=indices, key_start=key_start, key_end=key_end, k_scale=k_scale)


@breaks("indexer_loss_backward")
class LossBackwardTargetNotDetached(_LossBug):
    """Differentiates the target too, as if it were the indexer's own softmax (p = q): dI = 0 everywhere
    the target has mass, as a backward that treats the target as a function of the scores would give."""

    name = "loss-backward-target-not-detached"

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        grads = reference.indexer_loss_backward(q_index, weights, k_index, target, d_loss, indices=indices,
                                                key_start=key_start, key_end=key_end, k_scale=k_scale)
        return tuple(np.zeros_like(g) for g in grads)


@breaks("indexer_loss_backward")
class LossBackwardCountsDuplicatesOnce(_LossBug):
    """dk scattered with a plain store: a key scored by two slots of one query keeps one contribution."""

    name = "loss-backward-duplicates-once"

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        grads = list(reference.indexer_loss_backward(q_index, weights, k_index, target, d_loss, indices=indices,
                                                     key_start=key_start, key_end=key_end, k_scale=k_scale))
        if indices is not None:
            _, first = np.unique(np.where(indices >= 0, indices, -1), return_index=True)
            deduplicated = np.full_like(indices, -1).reshape(-1)
            flat = indices.reshape(-1)
            deduplicated[first] = flat[first]
            dk = reference.indexer_loss_backward(q_index, weights, k_index, target, d_loss,
                                                 indices=deduplicated.reshape(indices.shape), k_scale=k_scale)[2]
            grads[2] = dk
        return tuple(grads)


@breaks("indexer_loss_backward")
class LossBackwardMissesTheReluGate(_LossBug):
    """Passes gradient through ReLU where its input is negative."""

    name = "loss-backward-misses-relu-gate"

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic):
        grads = list(reference.indexer_loss_backward(q_index, weights, k_index, target, d_loss, indices=indices,
                                                     key_start=key_start, key_end=key_end, k_scale=k_scale))
        grads[1] = (grads[1] - np.float32(1e-2) * np.sign(grads[1])).astype(np.float32)
        return tuple(grads)


# ---------------------------------------------------------------------------- paged indexer
class _PagedBug(GoodBackend):
    def lightning_indexer_paged(self, q, weights, k_cache, block_table, context_lens, *, next_n, max_context_len):
        return self._call(q, weights, k_cache, block_table, context_lens, next_n=next_n,
                          max_context_len=max_context_len)

    def _call(self, *arrays, **arguments):
        return reference.lightning_indexer_paged(*arrays, **arguments)


@breaks("lightning_indexer_paged")
class PagedEveryQueryAtTheEnd(_PagedBug):
    """With next_n > 1, every query of the step sees the whole context (its own future included)."""

    name = "paged-every-query-at-the-end"

    def _call(self, q, weights, k_cache, block_table, context_lens, *, next_n, max_context_len):
        rows = []
        for j in range(next_n):
            one = reference.lightning_indexer_paged(q.reshape(-1, next_n, *q.shape[1:])[:, j], weights.reshape(
                -1, next_n, weights.shape[-1])[:, j], k_cache, block_table, context_lens, next_n=1,
                max_context_len=max_context_len)
            rows.append(one)
        return np.stack(rows, axis=1).reshape(q.shape[0], -1)


@breaks("lightning_indexer_paged")
class PagedReadsMissingBlocksAsBlockZero(_PagedBug):
    """A table entry outside the cache is clamped to block 0 instead of scoring -inf."""

    name = "paged-missing-blocks-as-zero"

    def _call(self, q, weights, k_cache, block_table, *arrays, **arguments):
        inside = (block_table >= 0) & (block_table < k_cache.shape[0])
        return reference.lightning_indexer_paged(q, weights, k_cache, np.where(inside, block_table, 0), *arrays,
                                                 **arguments)


@breaks("lightning_indexer_paged")
class PagedIgnoresKeyScales(_PagedBug):
    """Reads the fp8 values and forgets each key's float32 scale."""

    name = "paged-ignores-key-scales"

    def _call(self, q, weights, k_cache, *arrays, **arguments):
        d_i = q.shape[-1]
        block_size = k_cache.shape[1] // (d_i + 4)
        unscaled = k_cache.copy()
        scales = np.ones((k_cache.shape[0], block_size), "<f4").view(np.uint8)
        unscaled[:, block_size * d_i:] = scales
        return reference.lightning_indexer_paged(q, weights, unscaled, *arrays, **arguments)
