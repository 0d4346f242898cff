"""Where the host time of one call goes: the FP8 decode call through the public API and through
``dsa_ref.torch``, per backend.

Two measurements per path: the host time per call on a problem so small that the GPU never is the
bottleneck (calls back to back without synchronizing, so the loop runs at the host's speed), and a
``cProfile`` of the same calls, its top functions by own time. On a GPU machine, from a checkout::

    python tools/host_profile.py --out host_profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path


def _host_us_per_call(torch, fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _profile(fn, calls: int, top: int) -> list[dict]:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}:{name}", "calls_per_call": ncalls / calls,
                     "own_us": tottime / calls * 1e6, "cumulative_us": cumtime / calls * 1e6})
    rows.sort(key=lambda row: -row["own_us"])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("host_profile.json"))
    parser.add_argument("--backends", default="triton,cupy")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    import torch

    import dsa_ref
    import dsa_ref.torch as dsa_torch
    from dsa_ref_backends.bench import make_indices, random_fp8_cache

    batch, next_n, s_kv, h, topk = 1, 2, 4096, 128, 2048  # tiny: the GPU waits for the host
    cache = random_fp8_cache(torch, batch * s_kv, "cuda")
    q = torch.randn(batch * next_n, h, 576, device="cuda", dtype=torch.bfloat16)
    slots = make_indices(torch, batch * next_n, batch * s_kv, topk, "uniform", "cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "problem":
               dict(batch=batch, s_q=next_n, s_kv=s_kv, h=h, topk=topk), "paths": []}
    for name in args.backends.split(","):
        paths = {"public API": lambda: dsa_ref.sparse_mla(q, cache, slots, backend=name),
                 "public API, data checks off": lambda: _unchecked(dsa_ref, q, cache, slots, name),
                 "dsa_ref.torch": lambda: dsa_torch.sparse_mla(q, cache, slots, backend=name)}
        for path, fn in paths.items():
            try:
                with torch.no_grad():
                    entry = {"backend": name, "path": path, "host_us_per_call": _host_us_per_call(torch, fn, args.calls),
                             "top_own_time": _profile(fn, args.calls, args.top)}
            except Exception as error:  # noqa: BLE001 - a failing path is a result
                entry = {"backend": name, "path": path, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps({k: v for k, v in entry.items() if k != "top_own_time"}), flush=True)
            results["paths"].append(entry)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _unchecked(dsa_ref, q, cache, slots, name):
    with dsa_ref.use_data_checks(False):
        return dsa_ref.sparse_mla(q, cache, slots, backend=name)


if __name__ == "__main__":
    sys.exit(main())
