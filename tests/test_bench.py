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


def test_the_decode_step_target_is_the_graph_replay_time_at_most():
    rows = [dict(group="decode_step", case="step", impl="triton dsa_ref.torch eager", ms=1.6),
            dict(group="decode_step", case="step", impl="triton CUDA graph replay", ms=0.9, target="decode_step"),
            dict(group="decode_step", case="step", impl="cupy CUDA graph replay", ms=0.8, target="decode_step"),
            dict(group="decode_step", case="step", impl="FlashMLA sparse FP8 decode kernel alone", ms=None,
                 skipped="flash_mla not importable", error="skipped: flash_mla not importable")]
    targets = {(t["backend"], t["target"]): t for t in bench.evaluate_targets(rows, {}, ["triton", "cupy"])}
    assert targets[("triton", "decode_step")]["value"] == pytest.approx(0.9)
    assert targets[("triton", "decode_step")]["met"], "0.9 ms is under triton's 1.0 ms goal"
    assert targets[("cupy", "decode_step")]["value"] == pytest.approx(0.8)
    assert not targets[("cupy", "decode_step")]["met"], "0.8 ms is over cupy's 0.7 ms goal: at most"
    assert "decode_step" in bench.GROUPS


def test_the_decode_step_inputs_are_valid_paged_caches():
    block_size, d_i = 4, 16
    inputs = bench.decode_step_inputs(torch, 3, 10, next_n=2, h=2, h_i=4, d_i=d_i, block_size=block_size,
                                      device="cpu", generator=torch.Generator().manual_seed(0))
    num_blocks = 3 * 3
    assert tuple(inputs["index_cache"].shape) == (num_blocks, block_size * (d_i + 4))
    assert tuple(inputs["kv_cache"].shape) == (num_blocks * block_size, 656)
    assert sorted(inputs["block_table"].flatten().tolist()) == list(range(num_blocks))
    keys, key_scales = dsa_ref.reference.unpack_indexer_cache_fp8(inputs["index_cache"].numpy(), d_i)
    assert np.isfinite(keys.astype(np.float32)).all() and np.abs(keys.astype(np.float32)).max() > 0
    assert ((key_scales >= 0.5) & (key_scales < 1.5)).all()


def test_the_naive_decode_step_is_the_reference_step_when_every_token_is_kept():
    # topk above every context: both keep all visible tokens, so the outputs compare without a tie to break.
    inputs = bench.decode_step_inputs(torch, 3, 10, next_n=2, h=2, h_i=4, d_i=16, block_size=4, device="cpu",
                                      generator=torch.Generator().manual_seed(1))
    inputs["context_lens"] = torch.tensor([10, 3, 7], dtype=torch.int32)
    inputs["block_table"][1, 1:] = -1  # the padding past the 3-token context
    naive = bench._naive_decode_step(torch, **inputs, topk=16, next_n=2, sm_scale=0.05, chunk=2)
    out, _, slots = dsa_ref.sparse_decode_step(**inputs, topk=16, next_n=2, sm_scale=0.05, backend="numpy")
    torch.testing.assert_close(naive, out, rtol=3e-2, atol=3e-2)
    assert (slots[2:4] >= 0).sum(dim=1).tolist() == [2, 3]  # the short context's queries see 2 and 3 tokens


def test_flash_mla_decode_from_sglang_kernels_library_folder(tmp_path, monkeypatch):
    """--sgl-kernel-libs loads flashmla_ops.abi3.so from the folder and takes its sparse_decode_fwd op; a
    folder without it gives the reason instead of an error."""
    make, reason = bench.flash_mla_sparse_decode(torch, str(tmp_path))
    if make is None:
        assert "sgl_kernel" in reason and "flashmla_ops.abi3.so" in reason
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    calls = []

    def sparse_decode_fwd(q4, cache4, indices, *rest):
        calls.append((tuple(q4.shape), tuple(cache4.shape), tuple(indices.shape), rest[-2], rest[-1]))
        return torch.zeros(1), torch.zeros(1), "meta", "splits"

    fake_ops = type("Ops", (), {"sparse_decode_fwd": type("Op", (), {"default": staticmethod(sparse_decode_fwd)})})
    monkeypatch.setattr(torch.ops, "sgl_kernel", fake_ops, raising=False)
    make, name = bench.flash_mla_sparse_decode(torch, str(tmp_path))
    if make is None:  # flash_mla itself is importable here: it comes first
        pytest.skip(name)
    assert loaded == [str(tmp_path / "flashmla_ops.abi3.so")] and str(tmp_path) in name
    q = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    call = make(q, torch.zeros(128, 656, dtype=torch.uint8), torch.zeros(4, 2048, dtype=torch.int32), None,
                torch.full((2,), 100, dtype=torch.int32), 2)
    call()
    call()
    assert calls[0] == ((2, 2, 64, 576), (2, 64, 1, 656), (2, 2, 2048), 512, 576**-0.5)


def test_flash_mla_is_skipped_with_a_reason_when_it_cannot_be_imported(tmp_path):
    make, reason = bench.flash_mla_sparse_decode(torch)
    if make is not None:
        pytest.skip("FlashMLA is importable here")
    assert "flash_mla" in reason and "sgl_kernel" in reason
    b = bench.Bench.__new__(bench.Bench)
    b.rows = []
    bench._skipped(b, "decode_step", "step", "FlashMLA sparse FP8 decode kernel alone", reason)
    assert b.rows[0]["ms"] is None and b.rows[0]["skipped"] == reason
    env = dict(device="cpu", date="2026-01-01", driver="-", cuda="-", torch="-", triton="-")
    bench.write_markdown(tmp_path / "bench.md", env, b.rows, [])
    assert "skipped: flash_mla not importable" in (tmp_path / "bench.md").read_text()


def test_host_times_take_the_synchronized_call_minus_back_to_back_in_each_round(monkeypatch):
    """A fake clock and GPU: a call costs the host ``h`` units and queues 4 units of GPU work, which runs while
    the host goes on; ``synchronize`` waits for the queue. One synchronized call takes h + 4, back to back the
    GPU sets the pace (h / repeats + 4 a call), so a round's difference is the host work, h (1 - 1 / repeats);
    the round where the host is slower (h 2 instead of 1) shows it, the median over the rounds does not move."""
    state = {"now": 0.0, "gpu_free": 0.0, "calls": 0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: state["now"])

    class FakeCuda:
        @staticmethod
        def synchronize():
            state["now"] = max(state["now"], state["gpu_free"])

    class FakeTorch:
        cuda = FakeCuda

    repeats = 20

    def fn():
        state["calls"] += 1
        slow = 1 + 2 * repeats * 3 < state["calls"] <= 1 + 2 * repeats * 4  # round 3's calls, after the warm-up
        state["now"] += 2.0 if slow else 1.0
        state["gpu_free"] = max(state["gpu_free"], state["now"]) + 4.0

    single, chained, host = bench._host_times(FakeTorch, fn, rounds=5, repeats=repeats)
    assert len(host) == 5
    assert single == pytest.approx(5e3) and chained == pytest.approx((1 / repeats + 4) * 1e3)  # ms of the units
    assert host[3] == pytest.approx(2 * (1 - 1 / repeats) * 1e3)
    assert [h for i, h in enumerate(host) if i != 3] == pytest.approx([(1 - 1 / repeats) * 1e3] * 4)
    fields = bench._host_fields(host)
    assert fields["host_ms"] == pytest.approx(950.0) and fields["host_ms_spread"] == [950.0, 1900.0]
