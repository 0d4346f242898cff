"""Compile every CUDA source of the cupy backend with nvcc and read the compiler's resource report.

Used by tests/test_cuda_compile.py (CI, no GPU needed) and, to refresh the reports kept in
``resource_usage/``, from the shell::

    python -m dsa_ref_backends.cupy_cuda.compile_check --write

Each source is compiled to a cubin for each architecture in :data:`ARCHITECTURES`, with every
template instance the backend launches (:data:`kernels.KERNELS`) explicitly instantiated, all
warnings treated as errors (``-Werror all-warnings`` also turns ptxas' spill warnings into
errors), and ptxas' verbose report parsed into registers / stack / spills per kernel.
:func:`nvrtc_usages` reads the same report from NVRTC's build, the one the backend launches.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import kernels

#: Architectures every source must compile for: sm_90 (Hopper, the target) and sm_80 (Ampere;
#: the fp8 paths trap there and the host never launches them). A source of
#: kernels.SOURCE_ARCHITECTURES is compiled for its own architecture instead (see :func:`architectures`).
ARCHITECTURES = ("sm_90", "sm_80")
REPORT_DIR = Path(__file__).resolve().parent / "resource_usage"

#: Instructions the SASS of a (source, architecture) must contain: the proof that the Hopper kernel
#: really runs on wgmma (HGMMA), with both of its shapes, rather than on a fallback.
REQUIRED_SASS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sparse_mla_wgmma.cu", "sm_90a"): ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16"),
    ("indexer_wgmma.cu", "sm_90a"): ("QGMMA.64x64x32.F32.E4M3.E4M3", "QGMMA.64x128x32.F32.E4M3.E4M3"),
    # The backward's four shapes, its transposed A operands (the rows' contributions) and its 16-byte
    # float32 reductions.
    ("sparse_mla_backward_wgmma.cu", "sm_90a"): ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16",
                                                 "HGMMA.64x64x16.F32.BF16", ".tnspA.tnspB", "REDG.E.ADD.F32x4"),
    ("sparse_mla_wgmma_v2.cu", "sm_90a"): ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16", "LDGSTS"),
    # Both product shapes and the one-instruction ReLU that keeps NaN (max.NaN) of its epilogue.
    ("indexer_wgmma_v2.cu", "sm_90a"): ("QGMMA.64x64x32.F32.E4M3.E4M3", "QGMMA.64x128x32.F32.E4M3.E4M3",
                                        "FMNMX.NAN"),
}


#: Instructions the SASS of each named kernel must contain, in its own function: where a source has
#: several kernels on the tensor-core instructions, each of them must really run on them.
REQUIRED_KERNEL_SASS: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("sparse_mla_wgmma.cu", "sm_90a"): {
        name: ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16")
        for name in ("sparse_mla_fwd_wgmma", "sparse_mla_fwd_wgmma_fp8")
    },
    # The bf16 gather's cp.async; the FP8 rows' 16-byte loads, e4m3 unpacking and bf16 packing.
    ("sparse_mla_wgmma_v2.cu", "sm_90a"): {
        "sparse_mla_fwd_wgmma_v2": ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16", "LDGSTS"),
        "sparse_mla_fwd_wgmma_fp8_v2": ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16",
                                        "LDG.E.NA.128.CONSTANT", "F2FP.F16.E4M3.UNPACK_B", "F2FP.BF16.F32.PACK_AB"),
        # ... and the stores into the peer block's shared memory, counted on its barrier.
        "sparse_mla_fwd_wgmma_fp8_pair": ("HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16",
                                          "LDG.E.NA.128.CONSTANT", "F2FP.F16.E4M3.UNPACK_B", "F2FP.BF16.F32.PACK_AB",
                                          "STAS"),
        # The split-V consumers: S over 64 slots (N = 64) and P V with P from registers (RS form).
        **{name: ("HGMMA.64x64x16.F32.BF16", "HGMMA.64x256x16.F32.BF16") for name in
           ("sparse_mla_fwd_wgmma_v3", "sparse_mla_fwd_wgmma_fp8_v3", "sparse_mla_fwd_wgmma_fp8_pair_v3")},
    },
    ("indexer_wgmma_v2.cu", "sm_90a"): {
        "indexer_paged_wgmma_v2_q1": ("QGMMA.64x64x32.F32.E4M3.E4M3", "FMNMX.NAN"),
        "indexer_paged_wgmma_v2_q2": ("QGMMA.64x128x32.F32.E4M3.E4M3", "FMNMX.NAN"),
    },
}


def kernel_sass(sass: str, name: str) -> str | None:
    """The part of ``cuobjdump -sass`` output that is kernel ``name``'s function (a C name, as
    ``extern "C"`` kernels have), or None where the dump has no such function."""
    sections = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    # [text before the first function, name, body, name, body, ...]
    for function, body in zip(sections[1::2], sections[2::2]):
        if function == name:
            return body
    return None


def architectures(source: str) -> tuple[str, ...]:
    """The architectures ``source`` is compiled for in CI."""
    if source in kernels.SOURCE_ARCHITECTURES:
        return (kernels.SOURCE_ARCHITECTURES[source],)
    return ARCHITECTURES


@dataclass
class KernelUsage:
    name: str           # readable: indexer_mma<2, 4>
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    smem_bytes: int     # static shared memory (the big tiles are dynamic)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack_bytes > 0


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump from PATH, beside nvcc, in $CUDA_HOME/bin, or the copy Triton ships (which reads
    the cubins of CUDA 13's nvcc as well). Looked up without importing Triton."""
    candidates = [shutil.which("cuobjdump"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    if nvcc is not None:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    import importlib.util

    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for location in triton.submodule_search_locations:
            candidates.append(os.path.join(location, "backends", "nvidia", "bin", "cuobjdump"))
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def instantiation_source(source: str) -> str:
    """A translation unit that includes ``source`` and instantiates its launched templates."""
    templates = kernels.template_kernels(source)
    lines = [f'#include "{kernels.CSRC / source}"', ""]
    if templates:
        lines.append("// Taking each instance's address forces nvcc to compile it, as NVRTC's name expressions do.")
        lines.append("void* dsa_ref_instances(int which) {")
        lines.append("    void* instances[] = {" + ", ".join(f"(void*)&{name}" for name in templates) + "};")
        lines.append("    return instances[which];")
        lines.append("}")
    return "\n".join(lines) + "\n"


def nvcc_command(nvcc: str, unit: Path, arch: str, cubin: Path) -> list[str]:
    number = arch.split("_")[1]
    return [nvcc, *kernels.COMPILE_OPTIONS, f"-gencode=arch=compute_{number},code={arch}", "-cubin",
            "-Werror", "all-warnings", "-Xptxas", "-v,-warn-spills", f"-I{kernels.CSRC}",
            "-o", str(cubin), str(unit)]


_MANGLED = re.compile(r"_Z(\d+)(\w+)")


def readable_name(symbol: str) -> str:
    """``_Z11indexer_mmaILi2ELi4EEv...`` -> ``indexer_mma<2, 4>``; C names pass through."""
    match = _MANGLED.match(symbol)
    if not match:
        return symbol
    length = int(match.group(1))
    rest = match.group(2)
    name, tail = rest[:length], rest[length:]
    if not tail.startswith("I"):
        return name
    args = []
    for kind, value in re.findall(r"L([ib])(\d+)E", tail[: tail.index("EE") + 2] if "EE" in tail else tail):
        args.append(("true" if value == "1" else "false") if kind == "b" else value)
    return f"{name}<{', '.join(args)}>"


def parse_report(text: str) -> list[KernelUsage]:
    usages, current = [], None
    stack = stores = loads = 0
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = readable_name(m.group(1))
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, stores, loads = (int(g) for g in m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            usages.append(KernelUsage(current, int(m.group(1)), stack, stores, loads, int(smem.group(1)) if smem else 0))
            current = None
    return usages


@dataclass
class CompileResult:
    source: str
    arch: str
    returncode: int
    log: str
    usages: list[KernelUsage]
    sass: str | None = None  # cuobjdump -sass of the cubin, for the sources of REQUIRED_SASS / REQUIRED_KERNEL_SASS

    def report(self) -> str:
        lines = [f"# {self.source} for {self.arch}: nvcc -cubin -Xptxas -v (registers, stack, spills per kernel)",
                 f"# {'kernel':34s} {'regs':>5s} {'stack':>6s} {'spill_st':>8s} {'spill_ld':>8s} {'smem':>6s}"]
        for u in sorted(self.usages, key=lambda u: u.name):
            lines.append(f"{u.name:36s} {u.registers:5d} {u.stack_bytes:6d} {u.spill_stores:8d} {u.spill_loads:8d} "
                         f"{u.smem_bytes:6d}")
        return "\n".join(lines) + "\n"


def compile_source(nvcc: str, source: str, arch: str, workdir: Path) -> CompileResult:
    unit = workdir / f"{Path(source).stem}_{arch}.cu"
    unit.write_text(instantiation_source(source))
    cubin = workdir / f"{Path(source).stem}_{arch}.cubin"
    done = subprocess.run(nvcc_command(nvcc, unit, arch, cubin), capture_output=True, text=True)
    log = done.stdout + done.stderr
    sass = None
    cuobjdump = find_cuobjdump(nvcc)
    checked = (source, arch) in REQUIRED_SASS or (source, arch) in REQUIRED_KERNEL_SASS
    if done.returncode == 0 and checked and cuobjdump is not None:
        dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
        sass = dump.stdout if dump.returncode == 0 else None
        if dump.returncode != 0:
            log += f"\ncuobjdump -sass failed:\n{dump.stderr}"
    return CompileResult(source, arch, done.returncode, log, parse_report(log), sass)


def _nvrtc_library():
    """libnvrtc through ctypes, with its builtins loaded first (NVRTC opens them by name at its first
    compile): from the ``nvidia-cuda-nvrtc`` wheel if installed, else the system's. None when neither."""
    import ctypes
    import ctypes.util
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("cu*/lib/libnvrtc.so.*", "cuda_nvrtc/lib/libnvrtc.so.*"):  # the CUDA 13 and 12 wheels
            candidates += sorted(Path(location).glob(pattern))
    system = ctypes.util.find_library("nvrtc")
    for candidate in [*candidates, *([system] if system else [])]:
        try:
            folder = Path(candidate).parent
            for builtins in sorted(folder.glob("libnvrtc-builtins.so.*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(candidate))
        except OSError:
            continue
    return None


def nvrtc_usages(source: str) -> list[KernelUsage] | None:
    """Registers, stack and spills per kernel of ``source`` as the backend builds it at run time: NVRTC with
    :func:`kernels.nvrtc_options` (for a source of :data:`kernels.SOURCE_ARCHITECTURES`, whose architecture
    NVRTC compiles for without a GPU) and ptxas' verbose report. NVRTC's ptxas can allocate differently from
    nvcc's on the same source (the FP8 split-V kernels: NVRTC's build keeps bytes on the stack where nvcc's
    keeps none), so the reports of :func:`compile_source` do not stand for the kernels that run. None without
    libnvrtc (:func:`_nvrtc_library`)."""
    import ctypes

    library = _nvrtc_library()
    if library is None:
        return None
    program = ctypes.c_void_p()
    text = kernels.source_text(source).encode()
    if library.nvrtcCreateProgram(ctypes.byref(program), text, source.encode(), 0, None, None) != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed on {source}")
    try:
        options = [*kernels.nvrtc_options(source), "--ptxas-options=-v"]
        encoded = (ctypes.c_char_p * len(options))(*[option.encode() for option in options])
        status = library.nvrtcCompileProgram(program, len(options), encoded)
        size = ctypes.c_size_t()
        library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        library.nvrtcGetProgramLog(program, log)
        if status != 0:
            raise RuntimeError(f"NVRTC failed on {source} with {options}:\n{log.value.decode()}")
        return parse_report(log.value.decode())
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


def compile_jobs() -> list[tuple[str, str]]:
    """Every (source, architecture) CI compiles."""
    return [(source, arch) for source in kernels.KERNELS for arch in architectures(source)]


def compile_all(nvcc: str, workers: int = 2) -> list[CompileResult]:
    with tempfile.TemporaryDirectory() as tmp:
        jobs = compile_jobs()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda job: compile_source(nvcc, job[0], job[1], Path(tmp)), jobs))


def report_path(source: str, arch: str) -> Path:
    return REPORT_DIR / f"{Path(source).stem}.{arch}.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the reports in resource_usage/")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH or $CUDA_HOME/bin)", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    failed = False
    for result in compile_all(nvcc):
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"{result.source} {result.arch}: {status}")
        if result.returncode != 0:
            print(result.log)
            failed = True
        print(result.report())
        if args.write and result.returncode == 0:
            REPORT_DIR.mkdir(exist_ok=True)
            report_path(result.source, result.arch).write_text(f"# {version}\n" + result.report())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
