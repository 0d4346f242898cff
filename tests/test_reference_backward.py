"""The backward ops of the spec against an independent float64 torch implementation under autograd.

The torch versions below are written from the equations (gather, mask, softmax, sink, KL), not
from the reference's code; ``torch.autograd`` differentiates them. Awkward cases are on purpose:
duplicate indices, every kind of invalid index, empty rows, ``topk_length``, ``attn_sink``, rows of
kv read by nobody, NaN in an input.
"""

from __future__ import annotations

import numpy as np
import pytest

from dsa_ref import reference

torch = pytest.importorskip("torch")

INVALID = np.array([-(2**31), -1, 10**6, 2**31 - 1])


def _indices(rng, s_q, s_kv, topk, invalid_fraction=0.2, duplicate_fraction=0.2):
    indices = rng.integers(0, s_kv, size=(s_q, topk))
    dup = rng.random((s_q, topk)) < duplicate_fraction
    indices = np.where(dup, np.roll(indices, 1, axis=1), indices)
    bad = rng.random((s_q, topk)) < invalid_fraction
    indices = np.where(bad, rng.choice(np.append(INVALID, s_kv), size=(s_q, topk)), indices)
    indices[0] = -1  # an empty row
    return indices.astype(np.int64)


def _torch_sparse_mla(q, kv, indices, sm_scale, d_v, topk_length, attn_sink):
    s_kv = kv.shape[0]
    valid = (indices >= 0) & (indices < s_kv)
    if topk_length is not None:
        valid &= torch.arange(indices.shape[1])[None, :] < topk_length[:, None]
    rows = torch.where(valid, indices, 0)
    keys = kv[rows] * valid[..., None]  # [s_q, topk, d_qk]
    logits = sm_scale * torch.einsum("ihd,itd->iht", q, keys)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf for empty rows
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    probs = torch.where(torch.isinf(lse)[..., None], 0.0, probs)
    out = torch.einsum("iht,itd->ihd", probs, keys[..., :d_v])
    if attn_sink is not None:
        out = out * torch.sigmoid(lse - attn_sink[None, :])[..., None]
    return out, lse


@pytest.mark.parametrize("with_sink,with_length", [(False, False), (True, False), (False, True), (True, True)])
def test_sparse_mla_backward_equals_autograd(with_sink, with_length):
    rng = np.random.default_rng(7)
    s_q, s_kv, h, d_qk, d_v, topk, sm_scale = 6, 9, 3, 12, 8, 7, 0.37
    q = rng.standard_normal((s_q, h, d_qk))
    kv = rng.standard_normal((s_kv, d_qk))
    kv[4] = np.nan  # a NaN row that no valid slot reads must not leak
    indices = _indices(rng, s_q, s_kv, topk)
    indices[indices == 4] = 5
    topk_length = rng.integers(0, topk + 1, size=s_q) if with_length else None
    sink = rng.standard_normal(h) if with_sink else None
    d_out = rng.standard_normal((s_q, h, d_v))
    d_lse = rng.standard_normal((s_q, h))

    tq, tkv = torch.tensor(q, requires_grad=True), torch.tensor(np.nan_to_num(kv), requires_grad=True)
    tsink = torch.tensor(sink, requires_grad=True) if with_sink else None
    tlen = torch.tensor(topk_length) if with_length else None
    out, lse = _torch_sparse_mla(tq, tkv, torch.tensor(indices), sm_scale, d_v, tlen, tsink)
    finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
    (out * torch.tensor(d_out)).sum().add((finite_lse * torch.tensor(d_lse)).sum()).backward()

    ref_out, ref_lse = reference.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=topk_length,
                                            attn_sink=sink)
    np.testing.assert_allclose(ref_out, out.detach().numpy(), rtol=1e-5, atol=1e-6)
    grads = reference.sparse_mla_backward(q, kv, indices, ref_out, ref_lse, d_out, sm_scale=sm_scale, d_v=d_v,
                                          topk_length=topk_length, attn_sink=sink, d_lse=d_lse)
    assert len(grads) == (3 if with_sink else 2)
    dq, dkv = grads[:2]
    assert dq.dtype == np.float64 and dq.shape == q.shape and dkv.shape == kv.shape  # float64 in, float64 out
    np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dkv, tkv.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.all(dkv[4] == 0.0), "a row read by no valid slot gets exactly 0"
    assert np.all(dq[0] == 0.0), "a query with no valid slot gets dq = 0"
    if with_sink:
        np.testing.assert_allclose(grads[2], tsink.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_sparse_mla_backward_counts_a_duplicate_twice():
    rng = np.random.default_rng(1)
    q, kv = rng.standard_normal((1, 2, 4)), rng.standard_normal((3, 4))
    d_out = rng.standard_normal((1, 2, 4))
    twice = np.array([[2, 2]])
    out, lse = reference.sparse_mla(q, kv, twice, d_v=4)
    _, dkv = reference.sparse_mla_backward(q, kv, twice, out, lse, d_out, d_v=4)
    once = np.array([[2, -1]])
    out1, lse1 = reference.sparse_mla(q, kv, once, d_v=4)
    _, dkv1 = reference.sparse_mla_backward(q, kv, once, out1, lse1, d_out, d_v=4)
    # Two equal slots: each has half the probability; the value gradients add up to the single slot's,
    # and the key gradient is the same too (the softmax of two equal logits splits evenly).
    np.testing.assert_allclose(dkv, dkv1, rtol=1e-5, atol=1e-6)
    assert np.abs(dkv[2]).sum() > 0


def test_attention_target_is_the_head_summed_normalized_attention():
    rng = np.random.default_rng(3)
    s_q, s_kv, h, d, topk = 5, 8, 4, 6, 6
    q, kv = rng.standard_normal((s_q, h, d)), rng.standard_normal((s_kv, d))
    indices = _indices(rng, s_q, s_kv, topk)
    topk_length = np.array([6, 3, 0, 6, 2])
    out, lse = reference.sparse_mla(q, kv, indices, sm_scale=0.5, d_v=d, topk_length=topk_length)
    target = reference.attention_target(q, kv, indices, lse, sm_scale=0.5, topk_length=topk_length)
    with torch.no_grad():
        tq, tkv, ti = torch.tensor(q), torch.tensor(kv), torch.tensor(indices)
        valid = (ti >= 0) & (ti < s_kv) & (torch.arange(topk)[None, :] < torch.tensor(topk_length)[:, None])
        logits = 0.5 * torch.einsum("ihd,itd->iht", tq, tkv[torch.where(valid, ti, 0)])
        probs = torch.softmax(logits.masked_fill(~valid[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
        summed = probs.sum(dim=1)
        expected = summed / summed.sum(dim=1, keepdim=True).clamp_min(1e-300)
    assert target.dtype == np.float64 and target.shape == (s_q, topk)
    np.testing.assert_allclose(target, expected.numpy(), rtol=1e-5, atol=1e-7)
    assert np.all(target[0] == 0) and np.all(target[2] == 0)  # empty rows
    np.testing.assert_allclose(target[3:].sum(axis=1), 1.0, rtol=1e-6)


def _torch_indexer_loss(q, w, k, target, allowed_keys, allowed, k_scale):
    gate = torch.einsum("ijd,ind->ijn", q, k[allowed_keys])
    scores = torch.einsum("ij,ijn->in", w, torch.relu(gate)) * k_scale[allowed_keys]
    log_sm = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=1)
    p = torch.where(allowed, target, 0.0)
    mass = p.sum(dim=1, keepdim=True)
    p = torch.where(mass > 0, p / mass.clamp_min(1e-300), 0.0)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.where(allowed, log_sm, 0.0)), 0.0)
    return terms.sum(dim=1)


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_and_backward_equal_autograd(sparse):
    rng = np.random.default_rng(11)
    s_q, s_kv, h_i, d_i, topk = 6, 10, 3, 5, 5
    q, w = rng.standard_normal((s_q, h_i, d_i)), rng.standard_normal((s_q, h_i))
    k, k_scale = rng.standard_normal((s_kv, d_i)), rng.uniform(0.5, 2.0, s_kv)
    k[7] = np.nan  # a key nobody may use
    d_loss = rng.standard_normal(s_q)
    if sparse:
        indices = _indices(rng, s_q, s_kv, topk)
        indices[indices == 7] = 2
        allowed = (indices >= 0) & (indices < s_kv)
        keys = np.where(allowed, indices, 0)
        target = rng.random((s_q, topk)) * (rng.random((s_q, topk)) < 0.7)
        kwargs = dict(indices=indices)
    else:
        start = np.array([0, 0, 2, 3, 5, 0]); end = np.array([1, 3, 6, 3, 7, 7])
        allowed = (np.arange(s_kv)[None] >= start[:, None]) & (np.arange(s_kv)[None] < end[:, None])
        keys = np.broadcast_to(np.arange(s_kv), (s_q, s_kv)).copy()
        keys[:, 7] = 0  # the NaN key is outside every range
        target = rng.random((s_q, s_kv))
        kwargs = dict(key_start=start, key_end=end)
    tq, tw = torch.tensor(q, requires_grad=True), torch.tensor(w, requires_grad=True)
    tk = torch.tensor(np.nan_to_num(k), requires_grad=True)
    loss = _torch_indexer_loss(tq, tw, tk, torch.tensor(target), torch.tensor(keys), torch.tensor(allowed),
                               torch.tensor(k_scale))
    (loss * torch.tensor(d_loss)).sum().backward()

    ref_loss = reference.indexer_loss(q, w, k, target, k_scale=k_scale, **kwargs)
    assert ref_loss.dtype == np.float64 and ref_loss.shape == (s_q,)
    np.testing.assert_allclose(ref_loss, loss.detach().numpy(), rtol=1e-5, atol=1e-6)
    dq, dw, dk = reference.indexer_loss_backward(q, w, k, target, d_loss, k_scale=k_scale, **kwargs)
    np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dk, tk.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.all(dk[7] == 0.0), "a key nobody scored gets exactly 0"


def test_indexer_loss_is_zero_when_the_indexer_matches_the_target():
    rng = np.random.default_rng(5)
    q, w, k = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2)), rng.standard_normal((6, 4))
    indices = np.array([[0, 1, 2], [3, 4, -1], [5, 5, 0]])
    scores = reference.lightning_indexer(q, w, k)
    picked = np.take_along_axis(scores, np.maximum(indices, 0), axis=1).astype(np.float64)
    target = np.where(indices >= 0, np.exp(picked - picked.max(axis=1, keepdims=True)), 0.0)
    loss = reference.indexer_loss(q, w, k, target, indices=indices)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    assert reference.indexer_loss(q, w, k, np.roll(target, 1, axis=1), indices=indices).max() > 1e-3


def test_results_are_float32_for_narrower_inputs_and_float64_for_float64():
    rng = np.random.default_rng(2)
    q, kv = rng.standard_normal((2, 2, 8)), rng.standard_normal((4, 8))
    indices = np.array([[0, 1], [2, 3]])
    for dtype, expected in ((np.float32, np.float32), (np.float64, np.float64)):
        out, lse = reference.sparse_mla(q.astype(dtype), kv.astype(dtype), indices, d_v=8)
        grads = reference.sparse_mla_backward(q.astype(dtype), kv.astype(dtype), indices, out, lse, out, d_v=8)
        target = reference.attention_target(q.astype(dtype), kv.astype(dtype), indices, lse)
        loss = reference.indexer_loss(q.astype(dtype), rng.standard_normal((2, 2)), kv.astype(dtype), target,
                                      indices=indices)
        assert {x.dtype for x in (out, lse, *grads, target, loss)} == {np.dtype(expected)}
