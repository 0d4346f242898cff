"""Host time per call of the Triton backend's FP8 sparse decode, measured on a machine without a GPU.

Why. The GPU benchmark (``python -m dsa_ref bench --backend triton --cases host``) needs an H200;
this runs every line of Python between ``dsa_ref.torch.sparse_mla`` and the kernel launcher on a
CPU, so that a change to that path can be timed where it is written.

How. Triton is imported without ``TRITON_INTERPRET``, so the kernels are real ``JITFunction``\\ s and
the cached launcher (``backends/torch_triton/launch.py``) takes its fast path; then, as in
``tests/test_triton_launch.py``, each kernel's ``run`` (compile and launch) returns a stand-in
compiled kernel whose launcher does nothing, and Triton's driver is a stand-in that names device 0
and stream 0. ``TRITON_INTERPRET=1`` is set after that import, which makes the backend available
without CUDA and puts its tensors on the CPU. The SM count is the H200's (132), so the launch plan
(splits, kernels launched) is the GPU's.

What the numbers do not carry over to the GPU: ``torch.empty`` here is the CPU allocator, not
CUDA's caching allocator (several microseconds a call on the H200 under cProfile); ``.device`` and
the device checks see CPU tensors; the launcher is a no-op (the real one, ``__triton_launcher.launch``,
was ~10 us under cProfile); the driver's device and stream are plain Python calls (torch's
``current_device`` and raw stream on the GPU). What carries over: the Python work, call for call.

Run from a checkout (the repository's virtual environment)::

    python tools/host_cost_cpu.py [--calls 500] [--repeats 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

# Real JITFunctions, not the interpreter's: read by triton at its import.
os.environ.pop("TRITON_INTERPRET", None)
# CUDA's caching allocator hands a freed block back to the next torch.empty; glibc's default maps and
# unmaps every block over 32 MiB (the b 64 output is 32 MiB), which would be most of the time measured.
# glibc reads these when the process starts, hence the re-exec.
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in _MALLOC.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC})

import torch  # noqa: E402
import triton  # noqa: E402,F401

# The problems: the GPU benchmark's host case (one launch) and tools/host_profile.py's (split + combine).
PROBLEMS = {"bench host (b 64, s_q 2, T 32K)": dict(rows=128, s_kv=64 * 32768),
            "host_profile (b 1, s_q 2, T 4K)": dict(rows=2, s_kv=4096)}
H, TOPK, D_QK, D_V = 128, 2048, 576, 512


class _Driver:
    """Triton's active driver, as far as a launch reads it."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def _no_launch(*args):
    return None


#: Calls of each stand-in compile-and-launch (``JITFunction.run``): after a signature's first call
#: the cached launcher must not reach it, or the numbers are the plain launch's.
PLAIN_LAUNCHES: dict[str, int] = {}


def _stub_kernels(sparse_mla, launch):
    """Each kernel's compile-and-launch returns a compiled kernel that launches nothing; the module's
    launchers are made again over the stand-ins (a launcher takes the plain path for a ``run`` patched
    after it was made, as it must for a profiler)."""
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver

    driver.set_active(_Driver())
    for fn in (sparse_mla._sparse_mla_kernel, sparse_mla._combine_kernel):
        compiled = object.__new__(CompiledKernel)
        compiled.module, compiled.function, compiled.packed_metadata = object(), 1, (8, 1, 0)
        compiled._run = _no_launch
        name = fn.fn.__name__
        PLAIN_LAUNCHES[name] = 0

        def run(*args, grid, warmup, _compiled=compiled, _name=name, **kwargs):
            PLAIN_LAUNCHES[_name] += 1
            return _compiled

        fn.run = run
    sparse_mla._sparse_mla_launch = launch.CachedLauncher(sparse_mla._sparse_mla_kernel)
    sparse_mla._combine_launch = launch.CachedLauncher(sparse_mla._combine_kernel)
    sparse_mla._multiprocessors = lambda device: 132  # the H200's launch plan
    sparse_mla._sparse_mla_config.cache_clear()
    sparse_mla._launch_plan.cache_clear()
    sparse_mla._REPEATED.clear()  # launches kept with another SM count's plan


class _Recorder:
    """Stands for a module's launcher: records each call made on it (method, arguments) and passes it on."""

    def __init__(self, target):
        self._target = target
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(("__call__", args, kwargs))
        return self._target(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return method


def _per_call_us(pieces: dict, calls: int, repeats: int) -> dict:
    """Microseconds per call of each piece: the best of ``repeats`` means over ``calls`` back-to-back
    calls. The pieces take turns, run by run, so that a burst of a neighbour's work on a shared or
    virtual machine slows one run of each rather than every run of one."""
    for fn in pieces.values():
        for _ in range(min(calls, 200)):
            fn()
    best = dict.fromkeys(pieces, float("inf"))
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in pieces.items():
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - started) / calls)
    finally:
        gc.enable()
    return {name: seconds * 1e6 for name, seconds in best.items()}


def _recorded(sparse_mla, q, cache, slots, scale):
    """The launches (launcher, method, arguments) and the ``torch.empty`` calls of one forward call."""
    launches, allocations = [], []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        allocations.append((args, kwargs))
        return empty(*args, **kwargs)

    names = ("_sparse_mla_launch", "_combine_launch")
    reals = [getattr(sparse_mla, name) for name in names]
    recorders = [_Recorder(real) for real in reals]
    torch.empty = recording_empty
    for name, recorder in zip(names, recorders):
        setattr(sparse_mla, name, recorder)
    try:
        outputs = sparse_mla.sparse_mla(q, cache, slots, scale, D_V)
    finally:
        torch.empty = empty
        for name, real in zip(names, reals):
            setattr(sparse_mla, name, real)
    for name, real, recorder in zip(names, reals, recorders):
        launches += [(name, real, *call) for call in recorder.calls]
    return outputs, launches, allocations


def measure(calls: int, repeats: int) -> dict:
    import dsa_ref.torch as dsa_torch
    from dsa_ref import registry
    from dsa_ref.torch import ops
    from dsa_ref_backends.torch_triton import launch, sparse_mla

    _stub_kernels(sparse_mla, launch)
    os.environ["TRITON_INTERPRET"] = "1"  # the backend: available without CUDA, tensors on the CPU
    backend = registry.get_backend("triton")
    assert sparse_mla._sparse_mla_launch.plain_only is None, "the fast path is off"
    results = {}
    torch.manual_seed(0)
    for problem, size in PROBLEMS.items():
        rows = size["rows"]
        q = torch.randn(rows, H, D_QK).to(torch.bfloat16)
        cache = torch.empty((size["s_kv"], 656), dtype=torch.uint8)  # never read on the host
        slots = torch.randint(0, size["s_kv"], (rows, TOPK), dtype=torch.int32)
        scale = D_QK**-0.5
        with torch.no_grad():
            (out, lse), launches, allocations = _recorded(sparse_mla, q, cache, slots, scale)
            pieces = {
                "dsa_ref.torch.sparse_mla": lambda: dsa_torch.sparse_mla(q, cache, slots, backend="triton"),
                "TritonBackend.sparse_mla": lambda: backend.sparse_mla(q, cache, slots, sm_scale=scale, d_v=D_V,
                                                                       topk_length=None, attn_sink=None),
                "torch_triton.sparse_mla.sparse_mla": lambda: sparse_mla.sparse_mla(q, cache, slots, scale, D_V),
            }
            for name, real, method, args, kwargs in launches:
                bound = getattr(real, method)
                pieces[f"launch {name} ({method})"] = lambda bound=bound, args=args, kwargs=kwargs: bound(*args,
                                                                                                            **kwargs)
                first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
                runtime = args[first:]
                pieces[f"argument_key {name} ({len(runtime)} args)"] = lambda runtime=runtime: launch.argument_key(
                    runtime)
            empty = torch.empty
            pieces[f"torch.empty x{len(allocations)}, as the call makes them (CPU allocator)"] = (
                lambda: [empty(*a, **k) for a, k in allocations])
            pieces["TritonBackend.device()"] = backend.device
            pieces["ops._fresh_pair(out, lse, q, kv)"] = lambda: ops._fresh_pair(out, lse, q, cache)
            plain = dict(PLAIN_LAUNCHES)
            times = _per_call_us(pieces, calls, repeats)
            assert PLAIN_LAUNCHES == plain, f"plain launches while timing ({plain} -> {PLAIN_LAUNCHES})"
        splits = sparse_mla._launch_plan(rows, H, TOPK, D_V, D_QK, True, torch.bfloat16, q.device, False, False)[0]
        times["(derived) dsa_ref.torch above the backend"] = (times["dsa_ref.torch.sparse_mla"]
                                                              - times["TritonBackend.sparse_mla"])
        times["(derived) backend method above the kernel module"] = (times["TritonBackend.sparse_mla"]
                                                                     - times["torch_triton.sparse_mla.sparse_mla"])
        results[problem] = {"splits": splits, "us_per_call": {k: round(v, 3) for k, v in times.items()}}
    results["interop: dtype names of CuPy's arrays (NumPy dtypes)"] = {
        "splits": None, "us_per_call": {k: round(v, 3) for k, v in _interop_pieces(calls, repeats).items()}}
    return results


class _CupyLookalike:
    """What the dtype names read of a CuPy array: its class's module and name, its dtype and shape."""

    __module__ = "cupy._core.core"

    def __init__(self, dtype, shape):
        import numpy as np

        self.dtype, self.shape = np.dtype(dtype), shape


_CupyLookalike.__name__ = "ndarray"


def _interop_pieces(calls: int, repeats: int) -> dict:
    """The dtype names a CuPy backend's FP8 decode call reads (its inputs', its results'), without CuPy:
    they are NumPy dtypes, whose ``str()`` is Python code in NumPy."""
    from dsa_ref import interop

    q, cache = _CupyLookalike("int16", (128, 128, 576)), _CupyLookalike("uint8", (4096, 656))
    out = _CupyLookalike("float32", (128, 128, 512))
    return _per_call_us({
        "interop.dtype_name(float32 result)": lambda: interop.dtype_name(out),
        "interop.logical_dtype_name(q, a bf16 carrier)": lambda: interop.logical_dtype_name(q),
        "interop.logical_dtype_name(kv, the packed cache)": lambda: interop.logical_dtype_name(cache, packed_kv=True),
        "str(numpy dtype), what a name cost before its table": lambda: str(out.dtype),
    }, calls, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per piece (the best is kept)")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    results = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
               "problems": measure(args.calls, args.repeats)}
    for problem, entry in results["problems"].items():
        print(f"{problem}: {entry['splits']} split(s)" if entry["splits"] is not None else f"{problem}:")
        for piece, us in entry["us_per_call"].items():
            print(f"  {us:9.2f} us  {piece}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
