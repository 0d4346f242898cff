"""Registers and spill bytes of a Triton kernel's PTX for sm_90a, from the assembler Triton itself
runs for that target (``CompiledKernel.n_regs`` and ``n_spills`` are only filled in when a GPU
loads the kernel, so compile-only tests ask ptxas)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


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
