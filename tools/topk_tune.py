"""Top-k on a GPU: a launch-configuration sweep of both backends, and a small case for the sanitizers.

    python tools/topk_tune.py --out FILE.json      # sweep, at the benchmark's shape
    python tools/topk_tune.py --out FILE.json --only triton-radix   # one kernel's sweep
    python tools/topk_tune.py --small               # one small call of every path (sanitizers)

The sweep times 4096 rows x 32768 scores, k 2048, with two score distributions: ``randn`` (the
benchmark's) and ``causal`` (the last 4096 rows of a causal 32768-token prefill: each row's keys
past its position are -inf, the rest normal), against torch.topk in the same run.
"""

from __future__ import annotations

import argparse
import json


def _scores(torch, distribution: str, rows: int, s_kv: int):
    scores = torch.randn(rows, s_kv, device="cuda")
    if distribution == "causal":
        positions = torch.arange(s_kv - rows, s_kv, device="cuda")[:, None]  # [rows, 1]
        scores.masked_fill_(torch.arange(s_kv, device="cuda")[None, :] > positions, float("-inf"))
    return scores


IMPLS = ("torch", "triton", "triton-radix", "cupy")


def sweep(out: str | None, only: tuple[str, ...] = IMPLS) -> list[dict]:
    import cupy
    import torch
    from triton.testing import do_bench

    from dsa_ref_backends.cupy_cuda.backend import CupyBackend
    from dsa_ref_backends.torch_triton import topk, topk_radix

    rows, s_kv, k = 4096, 32768, 2048
    results = []

    def measure(impl: str, distribution: str, config: dict, fn) -> None:
        if impl not in only:
            return
        try:
            ms = do_bench(fn, warmup=25, rep=100)
        except Exception as error:  # noqa: BLE001 - a configuration that fails to launch is a result too
            results.append(dict(impl=impl, distribution=distribution, config=config, error=str(error)[:300]))
            print(f"{impl:8s} {distribution:7s} {config}: {error!s:.120}", flush=True)
            return
        results.append(dict(impl=impl, distribution=distribution, config=config, ms=ms,
                            gb_per_s=rows * s_kv * 4 / ms / 1e6))
        print(f"{impl:8s} {distribution:7s} {json.dumps(config):70s} {ms:7.3f} ms", flush=True)

    for distribution in ("randn", "causal"):
        scores = _scores(torch, distribution, rows, s_kv)
        measure("torch", distribution, dict(sorted=True), lambda: torch.topk(scores, k, dim=-1))
        measure("torch", distribution, dict(sorted=False), lambda: torch.topk(scores, k, dim=-1, sorted=False))
        for block, warps in ((1024, 4), (2048, 4), (4096, 8), (512, 4)):
            for candidates in (2048, 1024, 64):  # 64: the threshold bin never fits, rows are re-read
                config = dict(BLOCK=block, num_warps=warps, CANDIDATES=candidates)
                measure("triton", distribution, config, lambda: topk.topk_indices(scores, k, config=config))
        # The sampled-cut kernel (the Triton backend's default): block, warps and sample size; its set is
        # compared with torch.topk's by the tests, here only timed.
        for block, warps in ((1024, 8), (1024, 4), (2048, 8), (2048, 16), (512, 4)):
            for sample in (2048, 1024, 4096):
                config = dict(BLOCK=block, num_warps=warps, SAMPLE=sample)
                measure("triton-radix", distribution, config,
                        lambda: topk_radix.topk_indices(scores, k, config=config))
        backend = CupyBackend()
        native = cupy.from_dlpack(scores)
        for capacity in (8192, 6144, 1500, 0):  # 1500 and 0: the fallback, bin in shared memory / row re-read
            backend.topk_candidate_capacity = capacity
            measure("cupy", distribution, dict(capacity=capacity), lambda: backend.topk_indices(native, k))
        del scores, native
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def small() -> None:
    """Every path of both kernels once, small: candidates copied, rows re-read, take-all rows, ranges."""
    import cupy
    import torch

    from dsa_ref_backends.cupy_cuda.backend import CupyBackend
    from dsa_ref_backends.torch_triton import topk

    scores = _scores(torch, "causal", 64, 6000)
    scores[:8] = torch.randint(0, 3, (8, 6000), device="cuda").float()  # plateaus: heavy ties
    backend = CupyBackend()
    for capacity in (8192, 600, 16):
        backend.topk_candidate_capacity = capacity
        backend.topk_indices(cupy.from_dlpack(scores), 512)
    for candidates in (2048, 16):
        topk.topk_indices(scores, 512, config=dict(CANDIDATES=candidates))
    ends = torch.arange(64, dtype=torch.int32, device="cuda") * 90
    topk.topk_indices(scores, 512, torch.zeros_like(ends), ends)
    torch.cuda.synchronize()
    print("small top-k calls done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the sweep's results here (JSON)")
    parser.add_argument("--small", action="store_true", help="one small call of every path, for the sanitizers")
    parser.add_argument("--only", default=",".join(IMPLS), help=f"comma-separated subset of {', '.join(IMPLS)}")
    args = parser.parse_args()
    only = tuple(name for name in args.only.split(",") if name)
    if set(only) - set(IMPLS):
        parser.error(f"--only: unknown {sorted(set(only) - set(IMPLS))}; known: {', '.join(IMPLS)}")
    if args.small:
        small()
    else:
        sweep(args.out, only)


if __name__ == "__main__":
    main()
