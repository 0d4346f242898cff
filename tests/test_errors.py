"""Error inputs of every public op: the exception type and a message that names the argument."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref
from dsa_ref_backends.numpy_reference import NumpyBackend

rng = np.random.default_rng(0)
Q = rng.standard_normal((4, 2, 8)).astype(np.float32)  # indexer q [s_q, h_i, d_i]
W = rng.random((4, 2)).astype(np.float32)
K = rng.standard_normal((6, 8)).astype(np.float32)
MQ = rng.standard_normal((4, 3, 16)).astype(np.float32)  # sparse MLA q [s_q, h, d_qk]
KV = rng.standard_normal((6, 16)).astype(np.float32)
IDX = np.zeros((4, 5), np.int32)
I32 = np.int32


def indexer(**changes):
    args = dict(q=Q, weights=W, k=K)
    args.update(changes)
    return lambda: dsa_ref.lightning_indexer(**args)


def mla(**changes):
    args = dict(q=MQ, kv=KV, indices=IDX, d_v=8)
    args.update(changes)
    return lambda: dsa_ref.sparse_mla(**args)


def dsa(**changes):
    args = dict(q=MQ, kv=KV, q_index=Q, weights=W, k_index=K, topk=3, d_v=8)
    args.update(changes)
    return lambda: dsa_ref.dsa_attention(**args)


ERROR_INPUTS = [
    # lightning_indexer
    ("indexer: q wrong rank", indexer(q=Q[0]), ValueError, r"q must have shape \[s_q, h_i, d_i\]"),
    ("indexer: q not an array", indexer(q=Q.tolist()), TypeError, "q must be an array"),
    ("indexer: q integer", indexer(q=Q.astype(np.int32)), TypeError, "q.dtype must be one of"),
    ("indexer: weights s_q", indexer(weights=W[:3]), ValueError, r"weights must have shape \[s_q, h_i\] with s_q=4"),
    ("indexer: weights h_i", indexer(weights=W[:, :1]), ValueError, "weights .* with h_i=2"),
    ("indexer: k d_i", indexer(k=K[:, :7]), ValueError, r"k must have shape \[s_kv, d_i\] with d_i=8"),
    ("indexer: weights fp8", indexer(weights=W.astype(dsa_ref.reference.FP8_E4M3)), TypeError, "weights.dtype"),
    ("indexer: k_scale length", indexer(k_scale=np.ones(5, np.float32)), ValueError, r"k_scale must have shape \[s_kv\] with s_kv=6"),
    ("indexer: key_start float", indexer(key_start=np.zeros(4)), TypeError, "key_start.dtype must be one of int32, int64"),
    ("indexer: key_end length", indexer(key_end=np.full(3, 6, I32)), ValueError, r"key_end must have shape \[s_q\] with s_q=4"),
    ("indexer: key_end > s_kv", indexer(key_end=np.full(4, 7, I32)), ValueError, "key_end must be <= s_kv=6"),
    ("indexer: key_start < 0", indexer(key_start=np.full(4, -1, I32)), ValueError, "key_start must be >= 0"),
    ("indexer: start > end", indexer(key_start=np.full(4, 3, I32), key_end=np.full(4, 2, I32)), ValueError,
     "key_start must be <= key_end"),
    # topk_indices
    ("topk: scores rank", lambda: dsa_ref.topk_indices(np.zeros(5, np.float32), 2), ValueError, r"scores must have shape \[s_q, s_kv\]"),
    ("topk: topk zero", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.float32), 0), ValueError, "topk must be >= 1, got 0"),
    ("topk: topk negative", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.float32), -3), ValueError, "topk must be >= 1"),
    ("topk: topk float", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.float32), 2.0), TypeError, "topk must be an int"),
    ("topk: topk bool", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.float32), True), TypeError, "topk must be an int"),
    ("topk: int scores", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.int32), 2), TypeError, "scores.dtype"),
    # sparse_mla
    ("mla: q rank", mla(q=MQ[0]), ValueError, r"q must have shape \[s_q, h, d_qk\]"),
    ("mla: kv d_qk", mla(kv=KV[:, :15]), ValueError, r"kv must have shape \[s_kv, d_qk\] with d_qk=16"),
    ("mla: kv rank", mla(kv=KV[None]), ValueError, r"kv must have shape \[s_kv, d_qk\]"),
    ("mla: indices float", mla(indices=IDX.astype(np.float32)), TypeError, "indices.dtype must be one of int32, int64"),
    ("mla: indices s_q", mla(indices=IDX[:2]), ValueError, r"indices must have shape \[s_q, topk\] with s_q=4"),
    ("mla: d_v > d_qk", mla(d_v=17), ValueError, "d_v must be <= d_qk=16"),
    ("mla: d_v zero", mla(d_v=0), ValueError, "d_v must be >= 1"),
    ("mla: sm_scale nan", mla(sm_scale=float("nan")), ValueError, "sm_scale must be finite"),
    ("mla: sm_scale str", mla(sm_scale="0.1"), TypeError, "sm_scale must be a real number"),
    ("mla: topk_length range", mla(topk_length=np.full(4, 6, I32)), ValueError, r"topk_length values must lie in \[0, 5\]"),
    ("mla: topk_length dtype", mla(topk_length=np.ones(4)), TypeError, "topk_length.dtype"),
    ("mla: attn_sink length", mla(attn_sink=np.zeros(2, np.float32)), ValueError, r"attn_sink must have shape \[h\] with h=3"),
    ("mla: packed cache width", mla(kv=np.zeros((6, 600), np.uint8)), ValueError, r"packed FP8 cache \[s_kv, 656\]"),
    ("mla: packed cache q width", mla(kv=np.zeros((6, 656), np.uint8)), ValueError, "q must have d_qk=576"),
    ("mla: fp8 q", mla(q=MQ.astype(dsa_ref.reference.FP8_E4M3)), TypeError, "q.dtype must be one of"),
    # dsa_attention
    ("dsa: kv tokens != k_index tokens", dsa(kv=KV[:5]), ValueError, r"kv must have shape \[s_kv, d_qk\] with s_kv=6"),
    ("dsa: q tokens != q_index tokens", dsa(q=MQ[:3]), ValueError, r"q must have shape \[s_q, h, d_qk\] with s_q=4"),
    ("dsa: topk zero", dsa(topk=0), ValueError, "topk must be >= 1"),
    ("dsa: d_v > d_qk", dsa(d_v=20), ValueError, "d_v must be <= d_qk=16"),
]


@pytest.mark.parametrize("call,error,fragment", [case[1:] for case in ERROR_INPUTS],
                         ids=[case[0] for case in ERROR_INPUTS])
def test_error_inputs(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_nan_inputs_propagate_rather_than_raise():
    """Documented behaviour: NaN is data, not an argument error. It reaches exactly the outputs that
    read it: an indexer score, an attention row; top-k never selects a NaN score."""
    q = Q.copy()
    q[1, 0, 0] = np.nan
    scores = dsa_ref.lightning_indexer(q, W, K)
    assert np.isnan(scores[1]).all() and np.isfinite(np.delete(scores, 1, axis=0)).all()
    indices = dsa_ref.topk_indices(scores, 3)
    assert (indices[1] == -1).all() and (indices[0] >= 0).all()


def test_unsupported_inputs_name_the_backend_and_the_reason():
    class Fussy(NumpyBackend):
        name = "fussy"
        supported_dtypes = {"topk_indices": frozenset({"float16"})}

    with pytest.raises(dsa_ref.UnsupportedInputError, match=r"backend 'fussy' .*scores.dtype=float32 \(supported: float16\)"):
        dsa_ref.topk_indices(np.zeros((2, 3), np.float32), 2, backend=Fussy())
