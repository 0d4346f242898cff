"""Registers and spill bytes of a Triton kernel's PTX for sm_90a, from the assembler Triton itself
runs for that target (``CompiledKernel.n_regs`` and ``n_spills`` are only filled in when a GPU
loads the kernel, so compile-only tests ask ptxas)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def ptxas_report(ptx: str) -> str:
    """ptxas's ``-v`` report of ``ptx`` assembled for sm_90a (registers, spills, its notes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        return subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", "-O3", str(source), "-o",
                               f"{source}.cubin"], capture_output=True, text=True, check=True).stderr


def ptxas_usage(ptx: str) -> dict[str, int]:
    """``registers``, ``spill_bytes`` (stores + loads) and ``spill_lines`` (how many spill counts
    ptxas printed: a report without them would read as zero spills)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the release's own choice: its PTX version matches this assembler
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", "-O3", str(source), "-o", f"{source}.cubin"],
                                capture_output=True, text=True, check=True).stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)), spill_bytes=sum(spills),
                spill_lines=len(spills))


def compile_gluon_for_sm90(kernel, constants: dict, pointers: dict, num_warps: int):
    """``(ptx, shared bytes)`` of a Gluon kernel compiled for sm_90 without a GPU.

    ``constants``: its constexpr arguments; ``pointers``: the element type of the pointer arguments
    that are not float32 (``p_q="*bf16"``). Every other argument named ``*scale*`` is fp32, the
    rest i32. The launchers pass contiguous, 16-byte aligned tensors whose strides are multiples of
    16 elements; the JIT specializes such arguments as divisible by 16, as here.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    signature = {arg: "constexpr" if arg in constants else ("fp32" if "scale" in arg else "i32") for arg in names}
    signature.update({arg: "*fp32" for arg in names if arg.startswith("p_")})
    signature.update(pointers)
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(names) if arg.startswith(("p_", "stride_"))}
    source = GluonASTSource(fn=kernel, signature=signature, attrs=aligned,
                            constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    return compiled.asm["ptx"], compiled.metadata.shared


def run_compiled_report(test_file: str) -> dict:
    """The JSON a test module prints when run as a script (its sm_90 compile report), computed in a
    child process without ``TRITON_INTERPRET``: Triton decides at import whether kernels are interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.abspath(test_file)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

