"""Benchmark of context-parallel DSA prefill: time and memory per rank, scaling, communication share.

Run under torchrun, one process per GPU (NCCL):

    torchrun --nproc-per-node 8 tools/cp_bench.py --seq 131072 524288 1048576 --out cp_bench.json

Every rank holds ``S / N`` tokens of one causal sequence (h = 128 query heads, d_qk = 576, d_v = 512,
H_I = 64, d_I = 128, top-k 2048, bfloat16) and runs
:func:`dsa_ref.distributed.context_parallel_dsa_attention` forward. Per sequence length and method
the JSON holds: the slowest rank's median seconds, each rank's peak memory, the bytes each rank sent
(counted, and the formula of :func:`dsa_ref.cost.context_parallel_bytes`), and for the ring the
time with its overlap and without it (``ring_overlap=False`` waits for each transfer before
scoring): their difference is the communication the overlap hides. With ``--baseline`` (the JSON
of a run on 1 GPU) it adds the scaling efficiency ``t_1 / (N · t_N)``.

One process per GPU: N = 2 processes sharing one GPU measure contention, not scaling, and are not
meaningful. ``--quick`` runs tiny shapes on the CPU over gloo with the NumPy backend (a smoke test:
``torchrun --nproc-per-node 2 tools/cp_bench.py --quick``). Without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

# NVLink SHARP / multicast stay off: the machines this runs on share NVSwitch partitions where
# multicast objects cannot be created, and NCCL would fail at its first collective.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dsa_ref import cost  # noqa: E402
from dsa_ref import distributed as cp  # noqa: E402

FULL = dict(heads=128, d_qk=576, d_v=512, index_heads=64, index_dim=128, topk=2048, dtype="bfloat16")
QUICK = dict(heads=2, d_qk=16, d_v=8, index_heads=2, index_dim=8, topk=4, dtype="float32")


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[131072],
                        help="total sequence lengths S (each a multiple of 2N); default 131072")
    parser.add_argument("--methods", nargs="+", choices=cp.METHODS, default=list(cp.METHODS))
    parser.add_argument("--layout", choices=cp.LAYOUTS, default="zigzag")
    parser.add_argument("--key-block", type=int, default=16384, help="the ring's keys per indexer call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    parser.add_argument("--backend", default=None, help="dsa-ref backend (default: triton on GPUs, numpy on CPU)")
    parser.add_argument("--baseline", default=None, help="JSON of a 1-GPU run, for the scaling efficiency")
    parser.add_argument("--memory-fraction", type=float, default=0.8,
                        help="skip a case whose estimated memory exceeds this share of the GPU's")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU over gloo")
    parser.add_argument("--out", default="cp_bench.json")
    return parser.parse_args(argv)


def _init(quick: bool):
    use_cuda = torch.cuda.is_available() and not quick
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=10)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timeout)
    return torch.device("cuda") if use_cuda else torch.device("cpu"), backend


def _inputs(n: int, shapes: dict, device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shapes["dtype"])

    def draw(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    return (draw(n, shapes["heads"], shapes["d_qk"]), draw(n, shapes["d_qk"]),
            draw(n, shapes["index_heads"], shapes["index_dim"]), draw(n, shapes["index_heads"]).abs(),
            draw(n, shapes["index_dim"]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _estimated_bytes(world_size, rank, n, shapes, method, key_block, element_bytes) -> int:
    """Inputs, outputs (float32) and the buffers of :func:`dsa_ref.distributed.held_bytes`."""
    h, d_qk, d_v = shapes["heads"], shapes["d_qk"], shapes["d_v"]
    io = n * h * d_qk * element_bytes + n * h * (d_v + 1) * 4
    held = cp.held_bytes(world_size, rank, n, method=method, d_qk=d_qk, index_dim=shapes["index_dim"],
                         kv_element_bytes=element_bytes, index_element_bytes=element_bytes, key_block=key_block)
    merge = 3 * n * 2 * shapes["topk"] * 12 if method == "ring" else n * shapes["topk"] * 8
    return io + sum(held.values()) + merge


def _time_case(inputs, shapes, args, method, device, overlap: bool, backend):
    def call():
        return cp.context_parallel_dsa_attention(*inputs, topk=shapes["topk"], layout=args.layout, method=method,
                                                 d_v=shapes["d_v"], key_block=args.key_block,
                                                 ring_overlap=overlap, backend=backend)

    with cp.count_traffic() as traffic:
        call()  # warm-up: compiles the kernels
    _sync(device)
    seconds = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        result = call()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        del result
    return statistics.median(seconds), traffic


def main(argv=None) -> int:
    args = _parse(argv)
    device, comm_backend = _init(args.quick)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    shapes = QUICK if args.quick else FULL
    backend = args.backend or ("triton" if device.type == "cuda" else "numpy")
    seqs = [16 * world_size, 32 * world_size] if args.quick else args.seq
    key_block = 5 if args.quick else args.key_block
    args.key_block = key_block
    element_bytes = torch.tensor([], dtype=getattr(torch, shapes["dtype"])).element_size()
    baseline = {}
    if args.baseline:
        with open(args.baseline) as f:
            baseline = {(run["seq"], run["method"]): run["seconds"] for run in json.load(f)["runs"]}

    runs = []
    for seq in seqs:
        if seq % (2 * world_size):
            raise SystemExit(f"--seq {seq} must be a multiple of 2 x {world_size} ranks (zigzag half-chunks)")
        n = seq // world_size
        for method in args.methods:
            estimate = _estimated_bytes(world_size, rank, n, shapes, method, key_block, element_bytes)
            if device.type == "cuda" and estimate > args.memory_fraction * torch.cuda.get_device_properties(device).total_memory:
                if rank == 0:
                    print(f"S={seq} {method}: skipped, needs about {estimate / 2**30:.0f} GiB per rank", flush=True)
                runs.append(dict(seq=seq, method=method, skipped=f"needs about {estimate / 2**30:.1f} GiB per rank"))
                continue
            inputs = _inputs(n, shapes, device, seed=rank)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, traffic = _time_case(inputs, shapes, args, method, device, True, backend)
            run = dict(seq=seq, method=method, tokens_per_rank=n)
            slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            run["seconds"] = float(slowest)
            if method == "ring":
                serial, _ = _time_case(inputs, shapes, args, method, device, False, backend)
                slowest = torch.tensor([serial], dtype=torch.float64, device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                run["seconds_without_overlap"] = float(slowest)
                run["hidden_communication_share"] = 1.0 - run["seconds"] / run["seconds_without_overlap"]
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
            peaks = [None] * world_size
            dist.all_gather_object(peaks, peak)
            run["peak_memory_bytes_per_rank"] = peaks
            sent = {k: v for k, v in traffic.sent.items() if k != "metadata"}
            sent["total"] = sum(sent.values())
            formula = cost.context_parallel_bytes(world_size, n, d_qk=shapes["d_qk"], index_dim=shapes["index_dim"],
                                                  kv_element_bytes=element_bytes, index_element_bytes=element_bytes,
                                                  index_scale_bytes=0)
            formula.pop("latent_grads")
            sent.setdefault("latent_rows", 0)
            run["bytes_sent"] = {k: sent.get(k, 0) for k in formula}
            run["bytes_formula"] = formula
            if (seq, method) in baseline:
                run["scaling_efficiency"] = baseline[(seq, method)] / (world_size * run["seconds"])
            elif world_size == 1:
                run["scaling_efficiency"] = 1.0
            runs.append(run)
            if rank == 0:
                print(json.dumps(run), flush=True)
            del inputs

    if rank == 0:
        report = dict(world_size=world_size, backend=comm_backend, dsa_backend=backend, layout=args.layout,
                      shapes=shapes, key_block=key_block, device=torch.cuda.get_device_name() if device.type == "cuda"
                      else "cpu", torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                      environment={k: os.environ.get(k) for k in MULTICAST_OFF}, runs=runs)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
