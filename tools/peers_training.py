"""Sparse MLA backward side by side: TileLang's DeepSeek-V3.2 example kernel and dsa-ref's backends
on the same inputs, in one process on one GPU.

    TL_EXAMPLES=.peers/scripts/tilelang_examples python tools/peers_training.py --out OUT

TileLang and its example kernels are the user's installation (see ../shared/peers/README.md of the
development setup): they are imported from ``TL_EXAMPLES``, never shipped. Shapes: S 4096, SKV 8192,
topk 2048, d_qk 576, d_v 512, bf16, h 64 and 128; TileLang's index pattern (row t draws from its
first ``t + 1`` keys, padding with ``SKV``, which both sides treat as invalid).
FLOP = 2·S·h·topk·(3·d_qk + 2·d_v) (five products), the count TileLang reports. Each time is a
steady state: back-to-back calls between two CUDA events, after warm-up. The cross-check column is
‖ours − peer‖ / ‖peer‖ on dq and dkv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROWS: list[dict] = []


def report(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def steady_ms(torch, fn, warm: int = 3, repeats: int = 10) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def relative(torch, a, b) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a[finite] - b[finite]).norm() / (b[finite].norm() + 1e-30))


def tilelang_indices(torch, s: int, s_kv: int, topk: int):
    """Row t takes a random subset of its first min(t + 1, s_kv) keys, padded with s_kv (invalid)."""
    indices = torch.full((s, topk), s_kv, dtype=torch.int32, device="cuda")
    for t in range(s):
        chosen = torch.randperm(min(t + 1, s_kv), device="cuda")[:topk]
        indices[t, :chosen.numel()] = chosen
    return indices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--backends", default="triton,cupy")
    parser.add_argument("--heads", default="64,128")
    args = parser.parse_args()

    import torch

    import dsa_ref

    sys.path.insert(0, os.environ.get("TL_EXAMPLES", ".peers/scripts/tilelang_examples"))
    try:
        import sparse_mla_bwd as peer_bwd
        import sparse_mla_fwd as peer_fwd
    except ImportError as error:
        peer_bwd = peer_fwd = None
        report(name="tilelang", error=f"not importable: {error}")

    s, s_kv, topk, d_qk, d_v = 4096, 8192, 2048, 576, 512
    backends = [name for name in args.backends.split(",") if name]
    report(name="environment", device=torch.cuda.get_device_name(), torch=torch.__version__,
           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for h in (int(x) for x in args.heads.split(",")):
        torch.manual_seed(0)
        flop = 2 * s * h * topk * (3 * d_qk + 2 * d_v)
        q = torch.randn(s, h, d_qk, dtype=torch.bfloat16, device="cuda")
        kv = torch.randn(s_kv, d_qk, dtype=torch.bfloat16, device="cuda")
        d_out = torch.randn(s, h, d_v, dtype=torch.bfloat16, device="cuda")
        indices = tilelang_indices(torch, s, s_kv, topk)
        shape = f"S={s} SKV={s_kv} h={h} topk={topk}"
        peer = None
        if peer_bwd is not None:
            try:
                q4, kv4 = q[None].contiguous(), kv[None, :, None].contiguous()
                do4, idx4 = d_out[None].contiguous(), indices[None, :, None].contiguous()
                out_p, lse_p = peer_fwd.sparse_mla_fwd_interface(q4, kv4, idx4)
                dq_p, dkv_p = peer_bwd.sparse_mla_bwd(q4, kv4, out_p, do4, idx4, lse_p)
                ms = steady_ms(torch, lambda: peer_bwd.sparse_mla_bwd(q4, kv4, out_p, do4, idx4, lse_p))
                peer = (dq_p[0].float(), dkv_p[0, :, 0].float())
                report(name="tilelang sparse_mla_bwd", shape=shape, ms=round(ms, 3), tflops=round(flop / ms / 1e9, 1))
            except Exception as error:  # noqa: BLE001 - one failing side must not lose the other
                report(name="tilelang sparse_mla_bwd", shape=shape, error=f"{type(error).__name__}: {error}"[:300])
        for backend in backends:
            try:
                out, lse = dsa_ref.sparse_mla(q, kv, indices, backend=backend)
                for deterministic in (False, True):
                    with dsa_ref.use_deterministic(deterministic):
                        def call():
                            return dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out, backend=backend)

                        dq, dkv = call()
                        repeats = 10 if backend == "triton" else 2
                        ms = steady_ms(torch, call, warm=1, repeats=repeats)
                    cross = {} if peer is None else dict(dq_vs_peer=relative(torch, dq, peer[0]),
                                                        dkv_vs_peer=relative(torch, dkv, peer[1]))
                    report(name=f"dsa-ref {backend} sparse_mla_backward", shape=shape,
                           mode="deterministic" if deterministic else "default", ms=round(ms, 3),
                           tflops=round(flop / ms / 1e9, 1), **cross)
            except Exception as error:  # noqa: BLE001
                report(name=f"dsa-ref {backend} sparse_mla_backward", shape=shape,
                       error=f"{type(error).__name__}: {error}"[:300])
        del q, kv, d_out
        torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers_training.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
