"""The cost model: its formulas against hand counts, its crossover against the algebra."""

import math

import numpy as np
import pytest

from dsa_ref import cost


def test_attention_flops_counts_multiply_adds_of_both_products():
    # One query, one head, 3 keys, d_qk 4, d_v 2: QK^T is 3*4 multiply-adds, PV 3*2.
    assert cost.attention_flops(3, 1, 4, 2) == 2 * (3 * 4 + 3 * 2)
    # A causal prefill of 5 tokens sums 1 + 2 + ... + 5 = 15 keys.
    assert cost.attention_flops(np.arange(1, 6), heads=2, d_qk=4, d_v=2) == 2 * 2 * 15 * 6


def test_indexer_flops_counts_query_key_products_per_head():
    assert cost.indexer_flops(10, index_heads=3, index_dim=8) == 2 * 10 * 3 * 8
    assert cost.indexer_flops(np.array([1, 2]), 1, 1) == 6


def test_dense_and_dsa_costs_match_hand_counts_for_v32():
    t = np.array([1, 2048, 5000, 131072])
    dense = cost.dense_token_cost(t)
    dsa = cost.dsa_token_cost(t)
    for i, context in enumerate(t.tolist()):
        assert dense.flops[i] == 2 * 128 * context * (576 + 512)
        assert dense.bytes[i] == 656 * context
        selected = min(context, 2048)
        assert dsa.indexer_flops[i] == 2 * 64 * 128 * context
        assert dsa.attention_flops[i] == 2 * 128 * selected * (576 + 512)
        assert dsa.bytes[i] == context * (132 + 8) + 2048 * 8 + selected * 656
    prefill = cost.dense_token_cost(t, phase="prefill")
    assert prefill.flops[-1] == 2 * 128 * 131072 * (192 + 128)
    assert not prefill.bytes.any()


def _closed_form_crossover(dense_slope, dsa_slope, dsa_constant):
    # dense_slope * t > dsa_slope * t + dsa_constant  <=>  t > dsa_constant / (dense_slope - dsa_slope)
    return math.floor(dsa_constant / (dense_slope - dsa_slope)) + 1


def test_crossover_matches_the_algebra_for_v32():
    mla = 2 * 128 * (576 + 512)  # FLOPs per key of MQA-mode MLA
    index = 2 * 64 * 128  # FLOPs per key of the indexer
    assert cost.crossover(phase="decode", metric="flops") == _closed_form_crossover(mla, index, mla * 2048) == 2177
    mha = 2 * 128 * (192 + 128)
    assert cost.crossover(phase="prefill", metric="flops") == _closed_form_crossover(mha, index, mla * 2048) == 8705
    expected_bytes = _closed_form_crossover(656, 132 + 8, 656 * 2048 + 2048 * 8)
    assert cost.crossover(phase="decode", metric="bytes") == expected_bytes


@pytest.mark.parametrize("phase,metric", [("decode", "flops"), ("decode", "bytes"), ("decode", "seconds"),
                                          ("prefill", "flops"), ("prefill", "seconds")])
def test_crossover_is_where_dsa_starts_and_keeps_paying(phase, metric):
    point = cost.crossover(phase=phase, metric=metric)
    t = np.arange(1, 200_000)
    dense = cost.metric_of(cost.dense_token_cost(t, phase=phase), metric, cost.H100)
    dsa = cost.metric_of(cost.dsa_token_cost(t, phase=phase), metric, cost.H100)
    assert dsa[point - 2] >= dense[point - 2]  # at t* - 1 DSA does not pay yet
    assert np.all(dsa[point - 1:] < dense[point - 1:])  # from t* on it always does
    assert point > 2048  # never below k: under k, DSA does all of dense's work plus the indexer's


def test_crossover_without_one_returns_none():
    # An indexer as wide as the attention itself never pays.
    expensive = cost.V32.replace(index_heads=128, index_dim=1088)
    assert cost.crossover(expensive, max_context=50_000) is None


def test_fused_topk_moves_the_byte_crossover_earlier():
    fused = cost.V32.replace(score_bytes=0)
    assert cost.crossover(fused, metric="bytes") < cost.crossover(metric="bytes")


def test_roofline_takes_the_slower_of_compute_and_memory():
    hardware = cost.Hardware("toy", bf16_flops_per_s=1.0, fp8_flops_per_s=2.0, bytes_per_s=1.0)
    one = cost.TokenCost(np.array([1.0]), np.array([4.0]), np.array([4.0]), np.array([5.0]), indexer_fp8=True)
    assert cost.roofline_seconds(one, hardware)[0] == 6.0  # 4/1 + 4/2 compute > 5 bytes
    memory_bound = cost.TokenCost(np.array([1.0]), np.array([1.0]), np.array([0.0]), np.array([9.0]))
    assert cost.roofline_seconds(memory_bound, hardware)[0] == 9.0


def test_cost_table_rows():
    rows = cost.cost_table([4096, 131072])
    assert [row["context"] for row in rows] == [4096, 131072]
    assert rows[1]["dense_decode_gflop"] == pytest.approx(2 * 128 * 131072 * 1088 / 1e9)
    assert rows[1]["dsa_decode_us"] < rows[1]["dense_decode_us"]


@pytest.mark.parametrize("call,match", [
    (lambda: cost.dense_token_cost(np.array([0, 1])), "context must be integer key counts >= 1"),
    (lambda: cost.dsa_token_cost(np.array([1.5])), "context must be integer key counts >= 1"),
    (lambda: cost.dense_token_cost(4, phase="train"), "phase must be one of"),
    (lambda: cost.crossover(metric="joules"), "metric must be one of"),
    (lambda: cost.crossover(phase="prefill", metric="bytes"), "phase=.decode. only"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call,error,match", [
    (lambda: cost.cost_table("abc"), ValueError, "context must be integer key counts"),
    (lambda: cost.crossover(max_context=0), ValueError, "max_context must be >= 1"),
    (lambda: cost.crossover(max_context=2.5), TypeError, "max_context must be an int"),
    (lambda: cost.crossover(phase="train"), ValueError, "phase must be one of"),
    (lambda: cost.CostConfig(topk=-5), ValueError, "topk must be >= 1"),
    (lambda: cost.CostConfig(heads=0), ValueError, "heads must be >= 1"),
    (lambda: cost.CostConfig(d_qk=576.0), TypeError, "d_qk must be an int"),
    (lambda: cost.CostConfig(score_bytes=-8), ValueError, "score_bytes must be >= 0"),
    (lambda: cost.CostConfig(indexer_fp8=1), TypeError, "indexer_fp8 must be a bool"),
    (lambda: cost.V32.replace(topk=0), ValueError, "topk must be >= 1"),
    (lambda: cost.Hardware(bytes_per_s=0), ValueError, "bytes_per_s must be > 0"),
    (lambda: cost.Hardware(bf16_flops_per_s=float("nan")), ValueError, "bf16_flops_per_s must be finite"),
    (lambda: cost.attention_flops(10, -1, 576, 512), ValueError, "heads must be >= 1"),
    (lambda: cost.attention_flops([3, -1], 128, 576, 512), ValueError, "context must be key counts >= 0"),
    (lambda: cost.indexer_flops(np.array([1.5]), 64, 128), ValueError, "context must be integer key counts"),
    (lambda: cost.indexer_flops(10, 64, 0), ValueError, "index_dim must be >= 1"),
    (lambda: cost.context_parallel_bytes(0, 10), ValueError, "world_size must be >= 1"),
    (lambda: cost.context_parallel_bytes(2, -3), ValueError, "tokens_per_rank must be >= 0"),
])
def test_every_public_function_refuses_nonsense_sizes(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_zero_traffic_fields_and_empty_contexts_are_allowed():
    assert cost.CostConfig(score_bytes=0).score_bytes == 0  # a fused indexer + top-k stores no scores
    assert cost.attention_flops([], 128, 576, 512) == 0.0
    assert cost.context_parallel_bytes(1, 10)["total"] == 0
