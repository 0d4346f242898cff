"""Validate and time the cupy backend on a GPU in one run; results go to ``--out``.

    python tools/cupy_gpu_run.py --out OUT [--sections env,pytest,real,repeat,sanitize,bench,thorough]

Sections (each one's result is written to OUT/cupy_gpu_run.json as soon as it finishes):

* env       device, driver, versions, date;
* pytest    tests/test_cupy_backend.py and test_cuda_compile.py (kernels vs reference, ci profile);
* real      the kernels at real shapes (h 128 / 64, d_qk 576, d_v 512, topk 2048, s_kv up to 64K,
            ragged ranges, FP8 paged decode) against the float64 reference, outputs NaN-poisoned;
* repeat    the same calls twice, compared bitwise;
* sanitize  compute-sanitizer memcheck and racecheck over one small call of every kernel path;
* bench     the issue's target shapes, timed with CUDA events (median), beside torch baselines;
* thorough  the conformance kit with the ``thorough`` profile.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # tools/ sits at the top of the repository
RESULTS: dict = {}


def _ensure_importable() -> None:
    """Without an (editable) install, import dsa_ref from the checkout and backends/ as dsa_ref_backends."""
    try:
        import dsa_ref_backends  # noqa: F401
    except ImportError:
        import importlib.util

        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location("dsa_ref_backends", ROOT / "backends" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "backends")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["dsa_ref_backends"] = module
        spec.loader.exec_module(module)


_ensure_importable()


def log(message: str) -> None:
    print(message, flush=True)


def save(out: Path) -> None:
    (out / "cupy_gpu_run.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class TorchCuda:
    """Problems reach the public ops as torch CUDA tensors (real bf16 / fp8 dtypes), which the
    backend takes through DLPack; see the report on CuPy carrier dtypes in the public checks."""

    @staticmethod
    def to_native(x):
        from dsa_ref import interop

        return interop.convert(x, "torch", "cuda")


def _torch_inputs() -> None:
    from dsa_ref.testing import Problem

    if getattr(Problem, "_cupy_run_patched", False):
        return
    original = Problem.native_inputs
    Problem.native_inputs = lambda self, backend: original(self, TorchCuda())
    Problem._cupy_run_patched = True


def backend():
    from dsa_ref_backends.cupy_cuda import CupyBackend

    _torch_inputs()
    chosen = CupyBackend()
    chosen.poison_outputs = True
    return chosen


# ----------------------------------------------------------------------------- sections
def section_env(out: Path) -> dict:
    import cupy

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), nvidia_smi=smi,
                cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                nvcc=nvcc[-1] if nvcc else None, python=sys.version.split()[0])
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def section_pytest(out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           "tests/test_cupy_backend.py", "tests/test_cuda_compile.py"],
                          capture_output=True, text=True, cwd=ROOT)
    (out / "cupy_pytest.log").write_text(done.stdout + done.stderr)
    return dict(returncode=done.returncode, tail=(done.stdout + done.stderr)[-3000:])


@functools.lru_cache(maxsize=None)
def real_problems():
    from dsa_ref.reference import slot_indices
    from dsa_ref.testing import Problem, problems

    rng = np.random.default_rng(2024)
    cases = {
        "indexer bf16 h64 d128 128x8192 causal": problems.indexer_problem(
            rng, s_q=128, s_kv=8192, h_i=64, d_i=128, dtype="bfloat16", ranges="causal"),
        "indexer fp8 h64 d128 128x8192 ragged": problems.indexer_problem(
            rng, s_q=128, s_kv=8192, h_i=64, d_i=128, dtype="float8_e4m3fn", ranges="ragged", empty_fraction=0.1),
        "indexer fp8 h64 d128 96x4096 plateau strided": problems.indexer_problem(
            rng, s_q=96, s_kv=4096, h_i=64, d_i=128, dtype="float8_e4m3fn", ranges="causal", plateau=True,
            strided=True),
        "indexer f32 h64 d128 64x4096": problems.indexer_problem(
            rng, s_q=64, s_kv=4096, h_i=64, d_i=128, dtype="float32", ranges="causal"),
        "topk 64x32768 k2048": problems.topk_problem(rng, s_q=64, s_kv=32768, topk=2048),
        "topk 64x32768 k2048 plateau nan": problems.topk_problem(rng, s_q=64, s_kv=32768, topk=2048, plateau=True,
                                                                 nan_fraction=0.05),
        "topk 16x65536 k2048 (global-memory path)": problems.topk_problem(rng, s_q=16, s_kv=65536, topk=2048),
        "sparse_mla bf16 h128 s_kv 65536 topk 2048 invalid dup topk_length sink": problems.sparse_mla_problem(
            rng, s_q=24, s_kv=65536, h=128, d_qk=576, d_v=512, topk=2048, dtype="bfloat16", causal=False,
            invalid_fraction=0.1, duplicate_fraction=0.2, topk_length=True, attn_sink=True),
        "sparse_mla bf16 h64 s_kv 32768 topk 2048 recent": problems.sparse_mla_problem(
            rng, s_q=32, s_kv=32768, h=64, d_qk=576, d_v=512, topk=2048, dtype="bfloat16", distribution="recent"),
        "sparse_mla bf16 h128 strided logit x4": problems.sparse_mla_problem(
            rng, s_q=16, s_kv=4096, h=128, d_qk=576, d_v=512, topk=2048, dtype="bfloat16", logit_scale=4.0,
            strided=True),
        "sparse_mla f32 h128 topk 2048 (general kernel)": problems.sparse_mla_problem(
            rng, s_q=8, s_kv=8192, h=128, d_qk=576, d_v=512, topk=2048, dtype="float32", invalid_fraction=0.1),
        "dsa_attention bf16 h128 fp8 indexer s 2048 topk 512": problems.dsa_problem(
            rng, s_q=256, s_kv=2048, h=128, d_qk=576, d_v=512, h_i=64, d_i=128, topk=512, dtype="bfloat16",
            index_dtype="float8_e4m3fn", ranges="causal"),
    }
    # FP8 paged decode: 64 sequences, one query each, 128 heads, a block table of 64-token pages.
    b, block_size, context = 64, 64, 4096
    base = problems.sparse_mla_problem(rng, s_q=b, s_kv=b * context, h=128, d_qk=576, d_v=512, topk=8,
                                       dtype="bfloat16", packed_fp8=True)
    blocks_per_seq = context // block_size
    table = rng.permutation(b * blocks_per_seq).reshape(b, blocks_per_seq).astype(np.int32)  # [b, max_blocks]
    tokens = np.stack([rng.choice(context, size=2048, replace=False) for _ in range(b)]).astype(np.int32)
    tokens[:, -100:] = -1  # empty slots
    slots = slot_indices(tokens, table, block_size)  # [b, 2048]
    inputs = dict(base.inputs, indices=slots, topk_length=None, attn_sink=None)
    cases["decode fp8 paged b64 h128 topk 2048"] = Problem("sparse_mla", inputs, dict(paged=True), "bfloat16")
    return cases


def section_real(out: Path) -> dict:
    from dsa_ref.testing import check_problem

    chosen, results = backend(), {}
    for name, problem in real_problems().items():
        started = time.perf_counter()
        try:
            comparisons = check_problem(chosen, problem)
            ratio = max((c.error_ratio for c in comparisons), default=0.0)
            results[name] = dict(ok=True, worst_error_ratio=ratio, seconds=time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            results[name] = dict(ok=False, error=f"{type(error).__name__}: {error}"[:2000],
                                 trace=traceback.format_exc()[-2000:])
        log(f"  {name}: {results[name].get('ok')} {results[name].get('worst_error_ratio', results[name].get('error', ''))}")
    return results


def section_repeat(out: Path) -> dict:
    from dsa_ref import interop, ops

    chosen, results = backend(), {}
    for name, problem in real_problems().items():
        native = problem.native_inputs(chosen)
        op = getattr(ops, problem.op)
        runs = [op(**native, backend=chosen) for _ in range(3)]
        as_bytes = [b"".join(interop.to_numpy(a).tobytes() for a in (r if isinstance(r, tuple) else (r,)))
                    for r in runs]
        results[name] = all(x == as_bytes[0] for x in as_bytes)
        log(f"  {name}: bitwise identical over 3 runs: {results[name]}")
    return results


def sanitize_subset() -> None:
    """One small call of every kernel path (run under compute-sanitizer)."""
    from dsa_ref import ops
    from dsa_ref.testing import problems

    chosen = backend()
    rng = np.random.default_rng(7)
    subset = [
        problems.indexer_problem(rng, s_q=5, s_kv=300, h_i=64, d_i=128, dtype="bfloat16", ranges="ragged"),
        problems.indexer_problem(rng, s_q=5, s_kv=300, h_i=20, d_i=64, dtype="float8_e4m3fn", ranges="causal"),
        problems.indexer_problem(rng, s_q=5, s_kv=100, h_i=3, d_i=19, dtype="float32"),
        problems.topk_problem(rng, s_q=3, s_kv=5000, topk=300, plateau=True, nan_fraction=0.05),
        problems.topk_problem(rng, s_q=2, s_kv=60001, topk=100),
        problems.sparse_mla_problem(rng, s_q=2, s_kv=500, h=70, d_qk=576, d_v=512, topk=130, dtype="bfloat16",
                                    invalid_fraction=0.3, topk_length=True, attn_sink=True),
        problems.sparse_mla_problem(rng, s_q=2, s_kv=500, h=16, d_qk=576, d_v=512, topk=130, dtype="bfloat16",
                                    packed_fp8=True, invalid_fraction=0.3),
        problems.sparse_mla_problem(rng, s_q=2, s_kv=50, h=3, d_qk=40, d_v=19, topk=33, dtype="float32",
                                    invalid_fraction=0.3),
    ]
    _torch_inputs()
    for problem in subset:
        getattr(ops, problem.op)(**problem.native_inputs(chosen), backend=chosen)
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    print("sanitize subset done")


def section_sanitize(out: Path) -> dict:
    results = {}
    for tool in ("memcheck", "racecheck"):
        started = time.perf_counter()
        done = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", sys.executable,
                               str(Path(__file__)), "--sanitize-subset"], capture_output=True, text=True, cwd=ROOT,
                              timeout=150)
        text = done.stdout + done.stderr
        (out / f"cupy_sanitizer_{tool}.log").write_text(text)
        summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        results[tool] = dict(returncode=done.returncode, summary=summary, seconds=time.perf_counter() - started,
                             tail=text[-1500:])
        log(f"  {tool}: rc={done.returncode} {summary}")
    return results


def _time_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    import cupy

    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def _random_fp8_cache(cupy, rows: int):
    """uint8 [rows, 656]: finite e4m3 latent bytes, power-of-two scales, bf16 RoPE."""
    cache = cupy.empty((rows, 656), cupy.uint8)
    latent = cupy.random.randint(0, 0x7E, size=(rows, 512), dtype=cupy.int32).astype(cupy.uint8)
    sign = (cupy.random.randint(0, 2, size=(rows, 512), dtype=cupy.int32) << 7).astype(cupy.uint8)
    cache[:, :512] = latent | sign
    cache[:, 512:528] = cupy.full((rows, 4), 2.0**-6, cupy.float32).view(cupy.uint8)
    rope = cupy.random.standard_normal((rows, 64), dtype=cupy.float32)
    cache[:, 528:] = (rope.view(cupy.uint32) >> 16).astype(cupy.uint16).view(cupy.uint8).reshape(rows, 128)
    return cache


def _bf16(cupy, shape):
    x = cupy.random.standard_normal(shape, dtype=cupy.float32)
    return (x.view(cupy.uint32) >> 16).astype(cupy.uint16).view(cupy.int16)


def _fp8(cupy, shape):
    magnitude = cupy.random.randint(0x20, 0x50, size=shape, dtype=cupy.int32)  # moderate values, no NaN
    sign = cupy.random.randint(0, 2, size=shape, dtype=cupy.int32) << 7
    return (magnitude | sign).astype(cupy.uint8)


def _uniform_indices(cupy, s_q: int, s_kv: int, topk: int):
    """Each slot uniform over the keys query i may see (its causal prefix), int32 [s_q, topk]."""
    visible = cupy.arange(s_kv - s_q + 1, s_kv + 1, dtype=cupy.float32)[:, None]  # [s_q, 1]
    return (cupy.random.random((s_q, topk), dtype=cupy.float32) * visible).astype(cupy.int32)


def section_bench(out: Path) -> dict:
    import cupy

    chosen, results = backend(), {}
    chosen.poison_outputs = False

    def record(name, ms, **extra):
        results[name] = dict(ms=ms, **extra)
        log(f"  {name:58s} {ms:9.3f} ms  " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in extra.items()))

    # sparse MLA prefill
    s_q, s_kv, h, topk = 4096, 32768, 128, 2048
    q, kv = _bf16(cupy, (s_q, h, 576)), _bf16(cupy, (s_kv, 576))
    indices = _uniform_indices(cupy, s_q, s_kv, topk)
    ms = _time_ms(lambda: chosen.sparse_mla(q, kv, indices, sm_scale=576**-0.5, d_v=512, topk_length=None,
                                            attn_sink=None), repeats=10)
    record("sparse_mla fwd bf16 s_q 4096 s_kv 32768 h 128 topk 2048 (uniform)", ms,
           tflops=2 * s_q * h * topk * (576 + 512) / ms / 1e9)
    del q, kv, indices

    # indexer, causal: the 4096 queries are the last positions of 32768 keys
    s_q, s_kv, h_i, d_i = 4096, 32768, 64, 128
    key_end = cupy.arange(s_kv - s_q + 1, s_kv + 1, dtype=cupy.int32)
    key_start = cupy.zeros(s_q, cupy.int32)
    pairs = float(key_end.sum().get())
    weights = cupy.random.standard_normal((s_q, h_i), dtype=cupy.float32)
    k_scale = cupy.random.random(s_kv, dtype=cupy.float32)
    for label, make in (("fp8", _fp8), ("bf16", _bf16)):
        q_i, k_i = make(cupy, (s_q, h_i, d_i)), make(cupy, (s_kv, d_i))
        ms = _time_ms(lambda: chosen.lightning_indexer(q_i, weights, k_i, key_start=key_start, key_end=key_end,
                                                       k_scale=k_scale))
        record(f"indexer {label} H_I 64 d_I 128, 4096 q x 32768 keys causal", ms,
               tflops=2 * pairs * h_i * d_i / ms / 1e9)
    del q_i, k_i

    # top-k
    scores = cupy.random.standard_normal((4096, 32768), dtype=cupy.float32)
    ms = _time_ms(lambda: chosen.topk_indices(scores, 2048))
    read_ms = _time_ms(lambda: scores.sum())  # one read of the scores (a reduction), for the <= 2x target
    extra = dict(gbps=scores.nbytes / ms / 1e6, read_once_ms=read_ms)
    try:
        import torch

        scores_t = torch.from_dlpack(scores)
        torch_ms = _time_ms(lambda: torch.topk(scores_t, 2048, dim=-1))
        extra.update(torch_topk_ms=torch_ms, speedup_vs_torch=torch_ms / ms)
    except Exception as error:  # noqa: BLE001
        extra.update(torch_error=str(error)[:200])
    record("topk 4096 x 32768 k 2048", ms, **extra)
    del scores

    # FP8 decode: b sequences x s_q queries, 128 heads, topk 2048 over a 32K-token cache each
    for b, s_q_step in ((64, 1), (128, 1), (64, 2), (128, 2)):
        context = 32768
        cache = _random_fp8_cache(cupy, b * context // 4)  # pages shared: 8K distinct rows per seq is enough to miss L2
        n_q = b * s_q_step
        q = _bf16(cupy, (n_q, 128, 576))
        slots = cupy.random.randint(0, cache.shape[0], size=(n_q, 2048), dtype=cupy.int32)
        ms = _time_ms(lambda: chosen.sparse_mla(q, cache, slots, sm_scale=576**-0.5, d_v=512, topk_length=None,
                                                attn_sink=None))
        record(f"decode fp8 b {b} s_q {s_q_step} h 128 topk 2048", ms,
               tflops=2 * n_q * 128 * 2048 * (576 + 512) / ms / 1e9)
        del cache, q, slots

    # full DSA prefill S = T = 65536 vs dense causal SDPA (flash), h 128, d 192/128
    try:
        import torch
        import torch.nn.functional as F

        S = 65536
        q_i, k_i = _fp8(cupy, (S, 64, 128)), _fp8(cupy, (S, 128))
        weights = cupy.random.standard_normal((S, 64), dtype=cupy.float32) * 0.01
        k_scale = cupy.ones(S, cupy.float32)
        key_start, key_end = cupy.zeros(S, cupy.int32), cupy.arange(1, S + 1, dtype=cupy.int32)
        q, kv = _bf16(cupy, (S, 128, 576)), _bf16(cupy, (S, 576))

        def prefill():
            return chosen.dsa_attention(q, kv, q_i, weights, k_i, topk=2048, key_start=key_start, key_end=key_end,
                                        k_scale=k_scale, sm_scale=576**-0.5, d_v=512)

        stage_ms = {}
        scores = chosen.lightning_indexer(q_i, weights, k_i, key_start=key_start, key_end=key_end, k_scale=k_scale)
        stage_ms["indexer"] = _time_ms(lambda: chosen.lightning_indexer(q_i, weights, k_i, key_start=key_start,
                                                                        key_end=key_end, k_scale=k_scale), 2, 1)
        stage_ms["topk"] = _time_ms(lambda: chosen.topk_indices(scores, 2048), 2, 1)
        indices = chosen.topk_indices(scores, 2048)
        del scores
        stage_ms["sparse_mla"] = _time_ms(lambda: chosen.sparse_mla(q, kv, indices, sm_scale=576**-0.5, d_v=512,
                                                                    topk_length=None, attn_sink=None), 2, 1)
        del indices
        cupy.get_default_memory_pool().free_all_blocks()
        ms = _time_ms(prefill, 2, 1)
        del q, kv, q_i, k_i
        cupy.get_default_memory_pool().free_all_blocks()
        qt = torch.randn(1, 128, S, 192, device="cuda", dtype=torch.bfloat16)
        kt = torch.randn(1, 128, S, 192, device="cuda", dtype=torch.bfloat16)
        vt = torch.randn(1, 128, S, 128, device="cuda", dtype=torch.bfloat16)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dense_ms, dense_backend = None, None
        for sdpa in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([sdpa]):
                    dense_ms = _time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), 2, 1)
                dense_backend = sdpa.name
                break
            except RuntimeError:
                continue
        del qt, kt, vt
        torch.cuda.empty_cache()
        record("DSA prefill S=T=65536 h 128 (fp8 indexer, topk 2048)", ms, dense_sdpa_ms=dense_ms,
               dense_sdpa_backend=dense_backend, speedup_vs_dense=(dense_ms or float("nan")) / ms, **{f"{k}_ms": v for k, v in stage_ms.items()})
    except Exception as error:  # noqa: BLE001
        results["DSA prefill"] = dict(error=f"{type(error).__name__}: {error}"[:500])
        log(f"  DSA prefill failed: {error}")
    return results


def section_thorough(out: Path) -> dict:
    from dsa_ref.testing import check_backend

    chosen_ops = os.environ.get("DSA_THOROUGH_OPS")  # comma-separated subset, e.g. one op per process
    report = check_backend(backend(), "thorough", ops_to_check=chosen_ops.split(",") if chosen_ops else None)
    text = str(report)
    log(text)
    return dict(ok=report.ok, report=text)


SECTIONS = dict(env=section_env, pytest=section_pytest, real=section_real, repeat=section_repeat,
                sanitize=section_sanitize, bench=section_bench, thorough=section_thorough)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default="env,pytest,real,repeat,bench,sanitize")
    parser.add_argument("--sanitize-subset", action="store_true")
    args = parser.parse_args()
    if args.sanitize_subset:
        sanitize_subset()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        log(f"== {name}")
        started = time.perf_counter()
        try:
            RESULTS[name] = SECTIONS[name](out)
        except Exception as error:  # noqa: BLE001 - the other sections still run
            RESULTS[name] = dict(error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-3000:])
            log(RESULTS[name]["trace"])
        RESULTS.setdefault("seconds", {})[name] = time.perf_counter() - started
        save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
