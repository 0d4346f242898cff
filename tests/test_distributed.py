"""Context-parallel DSA over gloo: every rank's rows equal the single-process op, forward (bitwise on the
NumPy backend) and backward; wrong inputs on one rank fail on every rank; the bytes match the formulas.

Each world size is one spawn of processes that runs every case and saves its results; the tests
compare them with the single-process reference computed here.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import dsa_ref  # noqa: E402
import dsa_ref.torch as dsa_torch  # noqa: E402
from dsa_ref import cost  # noqa: E402
from dsa_ref import distributed as cp  # noqa: E402

N, H, D_QK, D_V, H_I, D_I, TOPK = 8, 2, 16, 8, 2, 8, 4
KEY_BLOCK = 3  # does not divide N: the ring's last key slice is short
CASES = [(layout, method) for layout in cp.LAYOUTS for method in cp.METHODS]
BAD_INPUTS = {
    "different n": "q.shape differs",
    "different topk": "topk differs",
    "different dtype": "q_index.dtype differs",
    "one rank's own mistake": "must have shape [n, h, d_qk]",
    "odd n for zigzag": "needs an even n",
}
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sequence(world_size: int, dtype, n: int = N, seed: int = 0):
    """One causal sequence: (q, kv, q_index, weights, k_index), with tied index keys across ranks."""
    rng = np.random.default_rng(seed)
    s = world_size * n

    def draw(*shape):
        return torch.tensor(rng.standard_normal(shape), dtype=dtype)

    q, kv, q_index, weights, k_index = draw(s, H, D_QK), draw(s, D_QK), draw(s, H_I, D_I), draw(s, H_I), draw(s, D_I)
    # Equal keys give equal scores: top-k must prefer the lower position, across ranks' blocks.
    k_index[s - 2] = k_index[1]
    k_index[s // 2 + 1] = k_index[n // 2]
    return q, kv, q_index, weights, k_index


def _upstream(world_size: int, seed: int = 1):
    """Fixed gradients of out and lse for the whole sequence, float64."""
    rng = np.random.default_rng(seed)
    s = world_size * N
    return (torch.tensor(rng.standard_normal((s, H, D_V))), torch.tensor(rng.standard_normal((s, H))))


def _bad_call(case: str, rank: int, world_size: int, parts: list, layout: str) -> tuple[list, dict]:
    """The inputs of one rank for a wrong call (most ranks right, one wrong)."""
    parts, kwargs = list(parts), dict(topk=TOPK, layout=layout)
    last = rank == world_size - 1
    if case == "different n" and last:
        parts = [torch.cat([x, x[:2]]) for x in parts]
    elif case == "different topk" and rank == 0:
        kwargs["topk"] = TOPK + 1
    elif case == "different dtype" and rank == 1:
        parts[2] = parts[2].double()
    elif case == "one rank's own mistake" and last:
        parts[0] = parts[0][:, 0]
    elif case == "odd n for zigzag":
        parts = [x[:-1] for x in parts]
        kwargs["layout"] = "zigzag"
    return parts, kwargs


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    results = {"forward": {}, "backward": {}, "traffic": {}, "errors": {}}
    common = dict(d_v=D_V, backend="numpy", key_block=KEY_BLOCK)
    forward_inputs = _sequence(world_size, torch.float32)
    backward_inputs = _sequence(world_size, torch.float64)
    d_out, d_lse = _upstream(world_size)
    for layout, method in CASES:
        name = f"{layout}-{method}"
        parts = [cp.shard(x, world_size, rank, layout) for x in forward_inputs]
        results["forward"][name] = cp.context_parallel_dsa_attention(*parts, topk=TOPK, layout=layout, method=method,
                                                                     **common)

        parts = [cp.shard(x, world_size, rank, layout) for x in backward_inputs]
        q, kv = parts[0].requires_grad_(), parts[1].requires_grad_()
        with cp.count_traffic() as traffic:
            out, lse, _ = cp.context_parallel_dsa_attention(q, kv, *parts[2:], topk=TOPK, layout=layout,
                                                            method=method, **common)
            loss = ((out * cp.shard(d_out, world_size, rank, layout)).sum()
                    + (lse * cp.shard(d_lse, world_size, rank, layout)).sum())
            loss.backward()
        results["backward"][name] = (q.grad, kv.grad)
        results["traffic"][name] = (traffic.sent, traffic.received, traffic.held)

    parts = [cp.shard(x, world_size, rank, "contiguous") for x in forward_inputs]
    for case in BAD_INPUTS:
        args, kwargs = _bad_call(case, rank, world_size, parts, "contiguous")
        try:
            cp.context_parallel_dsa_attention(*args, **kwargs, d_v=D_V, backend="numpy")
            results["errors"][case] = ("no error", "")
        except (ValueError, TypeError) as error:
            results["errors"][case] = (type(error).__name__, str(error))

    if world_size == 2:
        q, kv, q_index, weights, k_index = (x.clone() for x in backward_inputs)
        q = q[:, rank:rank + 1].clone().requires_grad_()
        kv.requires_grad_()
        out, lse, indices = cp.head_parallel_dsa_attention(q, kv, q_index, weights, k_index, topk=TOPK, d_v=D_V,
                                                           backend="numpy")
        ((out * d_out[:, rank:rank + 1]).sum() + (lse * d_lse[:, rank:rank + 1]).sum()).backward()
        results["head_parallel"] = (out.detach(), lse.detach(), indices, q.grad, kv.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_RUNS: dict[int, list] = {}


def _run(world_size: int, tmp_path_factory) -> list[dict]:
    """Every rank's results for ``world_size`` processes (spawned once per world size)."""
    if world_size not in _RUNS:
        out_dir = tmp_path_factory.mktemp(f"world{world_size}")
        mp.spawn(_worker, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size, join=True)
        _RUNS[world_size] = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return _RUNS[world_size]


def _causal_reference(world_size: int, dtype):
    inputs = _sequence(world_size, dtype)
    key_start, key_end = dsa_ref.causal_key_ranges(world_size * N, world_size * N)
    return inputs, key_start, key_end


WORLDS = [2, 3, 4]


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("layout,method", CASES)
def test_forward_equals_single_process_bitwise(world_size, layout, method, tmp_path_factory):
    ranks = _run(world_size, tmp_path_factory)
    inputs, key_start, key_end = _causal_reference(world_size, torch.float32)
    expected = dsa_ref.dsa_attention(*(x.numpy() for x in inputs), topk=TOPK, key_start=key_start,
                                     key_end=key_end, d_v=D_V, backend="numpy")
    for rank, result in enumerate(ranks):
        positions = cp.shard_positions(world_size, rank, N, layout)
        for name, got, want in zip(("out", "lse", "indices"), result["forward"][f"{layout}-{method}"], expected):
            np.testing.assert_array_equal(got.numpy(), want[positions], err_msg=f"rank {rank} {name}")


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("layout,method", CASES)
def test_backward_equals_single_process(world_size, layout, method, tmp_path_factory):
    ranks = _run(world_size, tmp_path_factory)
    (q, kv, q_index, weights, k_index), key_start, key_end = _causal_reference(world_size, torch.float64)
    q.requires_grad_()
    kv.requires_grad_()
    out, lse, _ = dsa_torch.dsa_attention(q, kv, q_index, weights, k_index, topk=TOPK,
                                          key_start=torch.from_numpy(key_start), key_end=torch.from_numpy(key_end),
                                          d_v=D_V, backend="numpy")
    d_out, d_lse = _upstream(world_size)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    dq = cp.unshard([r["backward"][f"{layout}-{method}"][0] for r in ranks], layout)
    dkv = cp.unshard([r["backward"][f"{layout}-{method}"][1] for r in ranks], layout)
    assert dkv.abs().max() > 0
    torch.testing.assert_close(dq, q.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dkv, kv.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("layout,method", CASES)
def test_bytes_and_buffers_match_the_formulas(world_size, layout, method, tmp_path_factory):
    ranks = _run(world_size, tmp_path_factory)
    expected = cost.context_parallel_bytes(world_size, N, d_qk=D_QK, index_dim=D_I, kv_element_bytes=8,
                                           index_element_bytes=8, index_scale_bytes=0, backward=True)
    for rank, result in enumerate(ranks):
        sent, received, held = result["traffic"][f"{layout}-{method}"]
        assert sent.pop("metadata") > 0
        assert received.pop("metadata") > 0
        assert sent == received == {k: v for k, v in expected.items() if k != "total"}
        assert held == cp.held_bytes(world_size, rank, N, layout=layout, method=method, d_qk=D_QK, index_dim=D_I,
                                     kv_element_bytes=8, index_element_bytes=8, score_bytes=8,
                                     key_block=KEY_BLOCK), f"rank {rank}"


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_on_one_rank_fails_on_every_rank(world_size, case, tmp_path_factory):
    errors = [r["errors"][case] for r in _run(world_size, tmp_path_factory)]
    kind, message = errors[0]
    assert kind == "ValueError", message
    assert BAD_INPUTS[case] in message
    assert all(e == errors[0] for e in errors), errors


def test_head_parallel_equals_single_process(tmp_path_factory):
    ranks = _run(2, tmp_path_factory)
    (q, kv, q_index, weights, k_index), key_start, key_end = _causal_reference(2, torch.float64)
    q.requires_grad_()
    kv.requires_grad_()
    out, lse, indices = dsa_torch.dsa_attention(q, kv, q_index, weights, k_index, topk=TOPK,
                                                key_start=torch.from_numpy(key_start),
                                                key_end=torch.from_numpy(key_end), d_v=D_V, backend="numpy")
    d_out, d_lse = _upstream(2)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    for rank, (got_out, got_lse, got_indices, got_dq, got_dkv) in enumerate(r["head_parallel"] for r in ranks):
        heads = slice(rank, rank + 1)
        torch.testing.assert_close(got_out, out.detach()[:, heads], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_lse, lse.detach()[:, heads], rtol=1e-12, atol=1e-12)
        assert torch.equal(got_indices, indices)
        torch.testing.assert_close(got_dq, q.grad[:, heads], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_dkv, kv.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- single-process checks
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_shards_cover_the_sequence_once_and_unshard_inverts_shard(world_size, layout):
    positions = np.concatenate([cp.shard_positions(world_size, r, N, layout) for r in range(world_size)])
    assert sorted(positions.tolist()) == list(range(world_size * N))
    x = torch.arange(world_size * N * 3).reshape(-1, 3)
    assert torch.equal(cp.unshard([cp.shard(x, world_size, r, layout) for r in range(world_size)], layout), x)


def test_zigzag_balances_the_causal_work():
    world_size, n = 4, 8
    work = {layout: [int((cp.shard_positions(world_size, r, n, layout) + 1).sum()) for r in range(world_size)]
            for layout in cp.LAYOUTS}
    assert len(set(work["zigzag"])) == 1
    assert work["contiguous"][-1] > 5 * work["contiguous"][0]


def test_shard_positions_refuse_bad_arguments():
    with pytest.raises(ValueError, match="even n"):
        cp.shard_positions(2, 0, 7, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.shard_positions(2, 0, 8, "striped")
    with pytest.raises(ValueError, match="rank must be in"):
        cp.shard_positions(2, 2, 8)


def test_benchmark_quick_mode_runs_on_gloo(tmp_path):
    out = tmp_path / "cp_bench.json"
    # The benchmark's multicast switches, also here: whatever a subprocess of the suite runs, NCCL
    # must not try NVLink SHARP on the shared machines.
    env = dict(os.environ, PYTHONPATH=str(REPO), NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(REPO / "tools" / "cp_bench.py"), "--quick", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["runs"], report
    for run in report["runs"]:
        assert run["seconds"] > 0 and run["bytes_sent"]["total"] > 0
        assert run["bytes_sent"] == run["bytes_formula"]
