"""One GPU session for the ``triton`` backend: GPU tests, memcheck, benchmark, tuning sweep.

    python tools/triton_gpu_run.py --out DIR [--stages tests,bench,...] [--deadline S]

Every stage runs in its own process with a time limit taken from what is left of ``--deadline``,
and its output goes to ``DIR/run.log``; a stage that fails or runs out of time does not stop the
others. Results: ``env.json`` (device, driver, versions, date), ``gpu_cases.jsonl`` (worst error
of each GPU test case), ``bench.{json,md,png}``, ``tuning.json``, ``sanitizer.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("env", "tests", "bench", "tune", "sanitizer", "thorough")


def _run(cmd: list[str], log, timeout: float, env: dict | None = None) -> int:
    log.write(f"\n$ {' '.join(cmd)}  (limit {timeout:.0f} s)\n")
    log.flush()
    started = time.time()
    try:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=max(1, timeout),
                                env={**os.environ, **(env or {})})
        code = result.returncode
    except subprocess.TimeoutExpired:
        code = 124
    log.write(f"-> exit {code} after {time.time() - started:.0f} s\n")
    log.flush()
    print(f"{' '.join(cmd[:6])}... exit {code} in {time.time() - started:.0f} s", flush=True)
    return code


def environment() -> dict:
    import torch
    import triton

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                nvidia_smi=smi, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])


def tune(out: Path) -> None:
    """A small sweep of launch configurations at the benchmark shapes (prints and writes tuning.json)."""
    import torch
    from triton.testing import do_bench

    from dsa_ref_backends.torch_triton import indexer, sparse_mla, topk

    results = []

    def measure(name, config, fn, flop=None, nbytes=None):
        try:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rate = f"{flop / ms / 1e9:.1f} TFLOP/s" if flop else f"{nbytes / ms / 1e6:.0f} GB/s"
            results.append(dict(kernel=name, config=config, ms=ms, rate=rate))
        except Exception as error:  # noqa: BLE001 - a config that does not compile is a result too
            results.append(dict(kernel=name, config=config, error=f"{type(error).__name__}: {error}"[:300]))
        print(results[-1], flush=True)
        torch.cuda.empty_cache()

    # FP8 decode: how many slot splits fill the GPU (b 64, s_q 1, h 128: 128 programs unsplit).
    batch, h, topk_, s_kv = 64, 128, 2048, 32768
    cache = torch.randint(0, 256, (batch * s_kv, 656), dtype=torch.uint8, device="cuda")
    cache[:, 512:528] = torch.ones(batch * s_kv, 4, device="cuda").view(torch.uint8).view(-1, 16)
    cache[:, 528:656] = torch.randn(batch * s_kv, 64, device="cuda").to(torch.bfloat16).view(torch.uint8)
    cache[:, :512] = torch.randn(batch * s_kv, 512, device="cuda").to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.randn(batch, h, 576, device="cuda", dtype=torch.bfloat16)
    slots = torch.randint(0, batch * s_kv, (batch, topk_), device="cuda", dtype=torch.int32)
    flop = 2 * batch * h * topk_ * 1088
    for splits in (1, 2, 4, 8):
        measure("decode fp8 b64", dict(num_splits=splits),
                lambda: sparse_mla.sparse_mla(q, cache, slots, 576**-0.5, 512, num_splits=splits), flop=flop)
    del cache, q, slots
    scores = torch.randn(4096, 32768, device="cuda")
    for config in (dict(BLOCK=4096, num_warps=8), dict(BLOCK=8192, num_warps=16), dict(BLOCK=2048, num_warps=4),
                   dict(BLOCK=4096, num_warps=16), dict(BLOCK=1024, num_warps=4)):
        measure("topk", config, lambda: topk.topk_indices(scores, 2048, config=config), nbytes=scores.numel() * 4)
    (out / "tuning.json").write_text(json.dumps(results, indent=1) + "\n")


def write_report(results: Path, reports: Path) -> None:
    """Compose ``triton_gpu.{md,json}`` from a session's results (run where the files came back)."""
    import re

    env = json.loads((results / "env.json").read_text())
    log = (results / "run.log").read_text()
    cases = [json.loads(line) for line in (results / "gpu_cases.jsonl").read_text().splitlines() if line.strip()]
    sanitizer = (results / "sanitizer.log").read_text() if (results / "sanitizer.log").exists() else ""
    summaries = re.findall(r"^(?:=+ )?(\d+ (?:passed|failed)[^=\n]*?)(?: =+)?$", log, flags=re.M)
    outcomes = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", log, flags=re.M)
    sanitizer_summary = re.findall(r"ERROR SUMMARY: .*", sanitizer)
    conformance = re.findall(r"conformance of backend .*$(?:\n^  .*$)*", log, flags=re.M)
    report = dict(environment=env, pytest_summaries=summaries, outcomes=outcomes, worst_errors=cases,
                  sanitizer=sanitizer_summary, conformance=conformance)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "triton_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# `triton` backend on {env['device']}", "",
             f"{env['date']}; {env['nvidia_smi']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"Python {env['python']}.", "",
             "Run with `sh tools/triton_gpu_session.sh OUT` (see `tools/triton_gpu_run.py`). Outputs are poisoned with "
             "NaN before each run; every GPU case runs twice and must match bitwise.", "",
             "## pytest", ""] + [f"- {s}" for s in summaries] + ["", "| outcome | test |", "|---|---|"]
    lines += [f"| {o} | `{t}` |" for o, t in outcomes]
    lines += ["", "## Worst errors at real shapes (error ratio <= 1 passes the tolerance policy)", "",
              "| case | worst error ratios |", "|---|---|"]
    for case in cases:
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in case.items()
                           if k != "case")
        lines.append(f"| {case['case']} | {values} |")
    lines += ["", "## compute-sanitizer memcheck (tests/test_triton_kernels.py on the GPU)", ""]
    lines += [f"- {s}" for s in sanitizer_summary] or ["- not run"]
    if conformance:
        lines += ["", "## Conformance kit on the GPU", "",
                  "Examples per op = ran + refused (the session caps the thorough profile with "
                  "`--thorough-examples`; the profile's own default is 1000).", "", "```"] + conformance + ["```"]
    (reports / "triton_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds for everything")
    parser.add_argument("--thorough-examples", type=int, default=1000)
    parser.add_argument("--bench-args", default="")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    python = sys.executable
    with open(out / "run.log", "a") as log:
        def left() -> float:
            return args.deadline - (time.time() - started)

        for stage in stages:
            if left() < 20:
                log.write(f"\n== {stage}: skipped, deadline reached\n")
                continue
            log.write(f"\n== {stage} ({left():.0f} s left)\n")
            log.flush()
            if stage == "env":
                (out / "env.json").write_text(json.dumps(environment(), indent=1) + "\n")
            elif stage == "tests":
                _run([python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_triton_kernels.py",
                      "tests/test_triton_gpu.py"], log, min(left(), 200),
                     env=dict(DSA_GPU_REPORT=str(out / "gpu_cases.jsonl")))
            elif stage == "bench":
                _run([python, "-m", "dsa_ref_backends.bench", "--out", str(out), *args.bench_args.split()], log,
                     min(left(), 300))
            elif stage == "tune":
                _run([python, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                    f"from triton_gpu_run import tune; "
                                    f"from pathlib import Path; tune(Path({str(out)!r}))"], log, min(left(), 150))
            elif stage == "sanitizer":
                with open(out / "sanitizer.log", "w") as sanitizer_log:
                    _run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "7", python, "-m", "pytest",
                          "-q", "-p", "no:cacheprovider", "-k", "not dot_matches", "tests/test_triton_kernels.py"],
                         sanitizer_log, min(left(), 200))
            elif stage == "thorough":
                _run([python, "-m", "pytest", "-q", "-rA", "-s", "-p", "no:cacheprovider",
                      "tests/test_triton_conformance.py", "--dsa-profile", "thorough"], log, min(left(), 300),
                     env=dict(DSA_CONFORMANCE_MAX_EXAMPLES=str(args.thorough_examples)))
            else:
                log.write(f"unknown stage {stage!r} (known: {', '.join(STAGES)})\n")
    print(f"gpu_run done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
