"""Pieces of the benchmark that need no GPU."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref

torch = pytest.importorskip("torch")
bench = pytest.importorskip("dsa_ref_backends.bench")


def test_random_fp8_cache_is_a_valid_packed_cache_when_filled_in_chunks():
    cache = bench.random_fp8_cache(torch, 37, "cpu", chunk_rows=8)
    assert cache.dtype == torch.uint8 and tuple(cache.shape) == (37, 656)
    rows = dsa_ref.unpack_kv_cache_fp8(cache.numpy())
    assert np.isfinite(rows).all()
    np.testing.assert_array_equal(cache[:, 512:528].numpy().copy().view("<f4"), np.ones((37, 4), np.float32))
    assert np.abs(rows[-5:, :512]).max() > 0  # the last, partial chunk is written too


def test_targets_are_judged_per_backend():
    rows = [dict(group="topk", case="c", impl="torch.topk (sorted)", ms=2.0),
            dict(group="topk", case="c", impl="triton", ms=1.0, target="topk"),
            dict(group="topk", case="c", impl="cupy", ms=0.25, target="topk")]
    targets = {(t["backend"], t["target"]): t for t in bench.evaluate_targets(rows, {}, ["triton", "cupy"])}
    assert targets[("triton", "topk")]["value"] == 2.0 and not targets[("triton", "topk")]["met"]
    assert targets[("cupy", "topk")]["value"] == 8.0 and targets[("cupy", "topk")]["met"]
    assert targets[("triton", "topk")]["goal"] == 3.0 and targets[("cupy", "topk")]["goal"] == 5.0


def test_training_and_host_targets_are_judged_in_the_right_direction():
    rows = [dict(group="training", case="bwd h 128", impl="triton (default)", ms=10.0, tflops=300.0,
                 target="sparse_mla_bwd_h128"),
            dict(group="training", case="bwd h 128", impl="triton (deterministic)", ms=14.0, tflops=214.0),
            dict(group="training", case="loss", impl="triton", ms=1.0, target="indexer_loss_share"),
            dict(group="host", case="host", impl="triton dsa_ref.torch (back to back)", ms=0.4, host_ms=0.08,
                 target="host_cost")]
    targets = {t["target"]: t for t in bench.evaluate_targets(rows, {}, ["triton"])}
    assert targets["sparse_mla_bwd_h128"]["met"] and targets["sparse_mla_bwd_h128"]["value"] == 300.0
    assert targets["deterministic_overhead"]["value"] == pytest.approx(1.4)
    assert not targets["deterministic_overhead"]["met"], "1.4x is over the 1.3x goal: at most, not at least"
    assert targets["indexer_loss_share"]["value"] == pytest.approx(0.1) and targets["indexer_loss_share"]["met"]
    assert targets["host_cost"]["value"] == pytest.approx(0.08) and not targets["host_cost"]["met"]
    assert targets["sparse_mla_bwd_h64"]["value"] is None and targets["sparse_mla_bwd_h64"]["met"] is None
