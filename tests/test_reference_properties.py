"""Properties the reference must have, whatever the inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_ref import reference
from dsa_ref.testing import problems

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
rngs = st.integers(0, 2**32 - 1).map(np.random.default_rng)


def dense_masked_attention(q, kv, visible, sm_scale, d_v):
    logits = sm_scale * np.einsum("ihd,jd->ihj", q, kv)  # [s_q, h, s_kv]
    logits = np.where(visible[:, None, :], logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    weights = np.exp(logits - top)
    return np.einsum("ihj,jv->ihv", weights / weights.sum(-1, keepdims=True), kv[:, :d_v])


@SETTINGS
@given(rngs, st.integers(1, 10), st.integers(1, 16), st.integers(1, 3), st.integers(0, 6))
def test_topk_covering_every_visible_key_equals_dense_causal_attention(rng, s_q, s_kv, h, extra):
    s_q = min(s_q, s_kv)
    q, kv = rng.standard_normal((s_q, h, 12)), rng.standard_normal((s_kv, 12))
    start, end = reference.causal_key_ranges(s_q, s_kv)
    scores = reference.lightning_indexer(rng.standard_normal((s_q, 2, 4)), rng.random((s_q, 2)),
                                         rng.standard_normal((s_kv, 4)), key_start=start, key_end=end)
    indices = reference.topk_indices(scores, s_kv + extra)  # room for every visible key
    out, _ = reference.sparse_mla(q, kv, indices, sm_scale=0.4, d_v=7)
    visible = np.arange(s_kv)[None, :] < end[:, None]
    np.testing.assert_allclose(out, dense_masked_attention(q, kv, visible, 0.4, 7), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(rngs, st.integers(1, 6), st.integers(2, 12), st.integers(1, 10))
def test_order_and_duplicates_of_invalid_indices_do_not_matter(rng, s_q, s_kv, topk):
    p = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=2, d_qk=8, d_v=8, topk=topk, dtype="float32",
                                    causal=False, invalid_fraction=0.4).inputs
    out, lse = reference.sparse_mla(**p)
    indices = p["indices"]
    invalid = [-(2**31), -1, s_kv, 2**31 - 1]
    padded = np.concatenate([indices, rng.choice(invalid, size=(s_q, 5)).astype(np.int32)], axis=1)
    shuffled = rng.permuted(padded, axis=1)  # valid slots keep their multiset; invalid ones move and repeat
    out2, lse2 = reference.sparse_mla(**{**p, "indices": shuffled})
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lse2, lse, rtol=1e-6)


@SETTINGS
@given(rngs, st.integers(1, 6), st.integers(1, 12), st.integers(1, 8))
def test_lse_is_the_log_sum_exp_of_the_scaled_logits(rng, s_q, s_kv, topk):
    p = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=3, d_qk=10, d_v=4, topk=topk, dtype="float32",
                                    causal=False, logit_scale=3.0).inputs
    _, lse = reference.sparse_mla(**p, sm_scale=0.7)
    q, kv, indices = (p[k].astype(np.float64) if k != "indices" else p[k] for k in ("q", "kv", "indices"))
    for i in range(s_q):
        rows = indices[i][indices[i] >= 0]
        if rows.size == 0:
            assert np.isneginf(lse[i]).all()
            continue
        logits = 0.7 * q[i] @ kv[rows].T  # [h, n]
        np.testing.assert_allclose(lse[i], np.log(np.exp(logits).sum(-1)), rtol=1e-6)


@SETTINGS
@given(rngs, st.floats(1e-3, 1e3))
def test_positive_scaling_of_weights_scales_scores(rng, factor):
    p = problems.indexer_problem(rng, s_q=5, s_kv=7, h_i=3, d_i=8, ranges="ragged").inputs
    base = reference.lightning_indexer(**p)
    scaled = reference.lightning_indexer(**{**p, "weights": p["weights"] * np.float32(factor)})
    finite = np.isfinite(base)
    np.testing.assert_array_equal(np.isneginf(scaled), np.isneginf(base))
    np.testing.assert_allclose(scaled[finite], base[finite] * factor, rtol=1e-5, atol=1e-6 * factor)


def test_attn_sink_scales_output_and_keeps_lse():
    rng = np.random.default_rng(5)
    p = problems.sparse_mla_problem(rng, s_q=4, s_kv=9, h=3, d_qk=8, d_v=8, topk=5, dtype="float32").inputs
    sink = np.array([-1.0, 0.0, 2.0], np.float32)
    out, lse = reference.sparse_mla(**p)
    out_sink, lse_sink = reference.sparse_mla(**{**p, "attn_sink": sink})
    np.testing.assert_array_equal(lse_sink, lse)
    factor = 1 / (1 + np.exp(sink[None, :] - lse.astype(np.float64)))
    np.testing.assert_allclose(out_sink, out * factor[..., None], rtol=1e-5, atol=1e-7)


def test_topk_length_equals_truncating_the_indices():
    rng = np.random.default_rng(6)
    p = problems.sparse_mla_problem(rng, s_q=5, s_kv=12, h=2, d_qk=8, d_v=8, topk=8, dtype="float32").inputs
    lengths = np.array([0, 1, 3, 8, 5], np.int32)
    out, lse = reference.sparse_mla(**{**p, "topk_length": lengths})
    truncated = np.where(np.arange(8)[None, :] < lengths[:, None], p["indices"], -1).astype(np.int32)
    out2, lse2 = reference.sparse_mla(**{**p, "indices": truncated})
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)


def test_paged_cache_with_shuffled_block_table_gives_the_contiguous_result():
    rng = np.random.default_rng(7)
    batch, block_size, blocks_per_seq, h, topk = 3, 4, 5, 2, 6
    seq_lens = np.array([17, 9, 20])
    latent = [rng.standard_normal((n, 576)) for n in seq_lens]
    q = rng.standard_normal((batch, h, 576))
    tokens = np.stack([problems.selected_indices(rng, s_q=1, s_kv=int(n), topk=topk)[0] for n in seq_lens])
    tokens[0, -1] = -1  # an empty slot stays empty

    physical = rng.permutation(batch * blocks_per_seq)  # blocks handed out in shuffled order
    block_table = physical.reshape(batch, blocks_per_seq)
    cache = np.full((batch * blocks_per_seq * block_size, 576), np.nan)  # unwritten slots hold NaN
    for b, rows in enumerate(latent):
        for t in range(rows.shape[0]):
            cache[block_table[b, t // block_size] * block_size + t % block_size] = rows[t]
    slots = reference.slot_indices(tokens, block_table, block_size)  # [batch, topk]
    assert (slots[tokens < 0] == -1).all()
    paged_out, paged_lse = reference.sparse_mla(q, cache, slots)
    for b in range(batch):
        out, lse = reference.sparse_mla(q[b:b + 1], latent[b], tokens[b:b + 1].astype(np.int32))
        np.testing.assert_allclose(paged_out[b], out[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(paged_lse[b], lse[0], rtol=1e-6)


def test_slot_indices_mark_tokens_past_the_table_or_unallocated_as_invalid():
    table = np.array([[2, -1]])
    slots = reference.slot_indices(np.array([[0, 3, 4, 9, -1]]), table, block_size=4)
    assert slots.tolist() == [[8, 11, -1, -1, -1]]
