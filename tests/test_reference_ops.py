"""The vectorized reference against independent naive loops, on generated problems."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
from dsa_ref import reference
from dsa_ref.testing import problems

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def seeds():
    return st.integers(0, 2**32 - 1).map(np.random.default_rng)


@SETTINGS
@given(seeds(), st.integers(1, 9), st.integers(1, 12), st.integers(1, 4), st.sampled_from([1, 5, 16]),
       st.sampled_from(["float32", "bfloat16", "float8_e4m3fn"]), st.sampled_from(problems.RANGE_KINDS),
       st.booleans())
def test_indexer_matches_loops(rng, s_q, s_kv, h_i, d_i, dtype, ranges, plateau):
    p = problems.indexer_problem(rng, s_q=s_q, s_kv=s_kv, h_i=h_i, d_i=d_i, dtype=dtype, ranges=ranges,
                                 empty_fraction=0.2, plateau=plateau).inputs
    got = reference.lightning_indexer(**p)
    want = naive.indexer(p["q"], p["weights"], p["k"], p["key_start"], p["key_end"], p["k_scale"])
    assert got.dtype == np.float32 and got.shape == (s_q, s_kv)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(seeds(), st.integers(1, 8), st.integers(1, 30), st.integers(1, 35), st.booleans(),
       st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.1]))
def test_topk_matches_loops_including_tie_order(rng, s_q, s_kv, topk, plateau, masked, nan):
    scores = problems.topk_problem(rng, s_q=s_q, s_kv=s_kv, topk=topk, masked_fraction=masked,
                                   plateau=plateau, nan_fraction=nan).inputs["scores"]
    got = reference.topk_indices(scores, topk)
    assert got.dtype == np.int32 and got.shape == (s_q, topk)
    np.testing.assert_array_equal(got, naive.topk(scores, topk))


@SETTINGS
@given(seeds(), st.integers(1, 6), st.integers(1, 12), st.integers(1, 3), st.sampled_from([4, 9, 24]),
       st.integers(1, 14), st.sampled_from(["float32", "bfloat16"]), st.sampled_from([0.0, 0.3]),
       st.booleans(), st.booleans(), st.booleans())
def test_sparse_mla_matches_loops(rng, s_q, s_kv, h, d_qk, topk, dtype, invalid, duplicates, topk_length, sink):
    d_v = int(rng.integers(1, d_qk + 1))
    p = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                    causal=False, invalid_fraction=invalid,
                                    duplicate_fraction=0.3 if duplicates else 0.0,
                                    topk_length=topk_length, attn_sink=sink, logit_scale=2.0).inputs
    out, lse = reference.sparse_mla(**p, sm_scale=0.3)
    want_out, want_lse = naive.sparse_mla(p["q"], p["kv"], p["indices"], 0.3, d_v, p["topk_length"], p["attn_sink"])
    assert out.dtype == lse.dtype == np.float32
    assert out.shape == (s_q, h, d_v) and lse.shape == (s_q, h)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-6, atol=1e-6)


def test_row_without_valid_index_gives_zero_output_and_minus_inf_lse():
    rng = np.random.default_rng(1)
    q, kv = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8))
    indices = np.array([[-1, 5, 2**31 - 1], [0, -(2**31), 4]], np.int32)
    out, lse = reference.sparse_mla(q, kv, indices, d_v=8)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(lse[1]))


def test_invalid_rows_are_never_read_so_their_nan_cannot_leak():
    rng = np.random.default_rng(2)
    q, kv = rng.standard_normal((1, 2, 8)), rng.standard_normal((4, 8))
    kv[0] = np.nan  # only invalid slots would reach row 0 through a clamp-to-zero gather
    out, lse = reference.sparse_mla(q, kv, np.array([[-1, 2, 3, 9]], np.int32), d_v=8)
    assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_nan_in_a_selected_row_propagates_to_that_query_only():
    rng = np.random.default_rng(3)
    q, kv = rng.standard_normal((2, 1, 4)), rng.standard_normal((3, 4))
    kv[1, 0] = np.nan
    out, _ = reference.sparse_mla(q, kv, np.array([[1, 2], [0, 2]], np.int32), d_v=4)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_topk_never_selects_nan_or_masked_and_pads_with_minus_one():
    scores = np.array([[np.nan, 1.0, -np.inf, 0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(reference.topk_indices(scores, 5), [[1, 4, 3, -1, -1]])


@pytest.mark.parametrize("s_q,s_kv", [(1, 1), (3, 7), (5, 5)])
def test_causal_ranges_put_queries_at_the_end(s_q, s_kv):
    start, end = reference.causal_key_ranges(s_q, s_kv)
    assert start.tolist() == [0] * s_q
    assert end.tolist() == list(range(s_kv - s_q + 1, s_kv + 1))


def test_varlen_ranges_of_a_packed_batch():
    start, end = reference.varlen_key_ranges([0, 2, 3, 6], [0, 4, 5, 8])
    # sequence 0: 2 queries over keys [0, 4); 1: one query over [4, 5); 2: 3 queries over [5, 8)
    assert start.tolist() == [0, 0, 4, 5, 5, 5]
    assert end.tolist() == [3, 4, 5, 6, 7, 8]
    start, end = reference.varlen_key_ranges([0, 2, 3, 6], [0, 4, 5, 8], causal=False)
    assert end.tolist() == [4, 4, 5, 8, 8, 8]


def test_varlen_refuses_more_queries_than_keys():
    with pytest.raises(ValueError, match="cu_seqlens_q/cu_seqlens_k: causal sequence 1"):
        reference.varlen_key_ranges([0, 1, 4], [0, 2, 4])


def test_reference_memory_stays_bounded_by_chunking():
    import tracemalloc

    rng = np.random.default_rng(4)
    q = rng.standard_normal((256, 8, 64)).astype(np.float32)
    kv = rng.standard_normal((2048, 64)).astype(np.float32)
    indices = rng.integers(0, 2048, size=(256, 1024)).astype(np.int32)
    tracemalloc.start()
    reference.sparse_mla(q, kv, indices, d_v=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    unchunked = 256 * 1024 * 64 * 8  # the whole gathered [s_q, topk, d_qk] in float64: 134 MB
    assert peak < unchunked / 2
