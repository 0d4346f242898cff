"""Sort compute-sanitizer racecheck hazards into ours and Triton's warp-specialization dispatch.

A Gluon kernel with ``gl.warp_specialize`` starts its worker warps in a loop that Triton generates:
the default warps write one byte a worker warp (which partition to run, later "exit") to shared
memory, a CTA-wide ``barrier.sync 1`` follows, and each worker warp's first lane reads its byte.
racecheck (CUDA 13.0) reports every such read as a RAW hazard against the default warps' write;
its report places both accesses on the kernel's ``def`` line or on its ``gl.warp_specialize(`` call,
since no line of ours issues them. Every other hazard is the kernel's own, and fails.

    compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 0 python3 ... > log
    python3 tools/racecheck_report.py log [--source-root backends]

Prints one JSON object (hazards by class and by access site) and exits 1 if any hazard is the
kernel's own, 0 otherwise (no hazards at all included).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections import Counter
from pathlib import Path

HAZARD = re.compile(r"Potential (\w+) hazard detected at __shared__ (0x[0-9a-f]+)")
ACCESS = re.compile(r"(Read|Write) Thread \((\d+),\d+,\d+\) at (\S+) in (\S+?):(\d+)")


@functools.lru_cache(maxsize=None)
def source_lines(source_root: Path, file_name: str) -> tuple[str, ...]:
    """The lines of the first file named ``file_name`` under ``source_root`` (none if there is none):
    found and read once however many hazards name it."""
    match = next(source_root.rglob(file_name), None)
    return tuple(match.read_text().splitlines()) if match is not None else ()


def dispatch_line(source_root: Path, file_name: str, line: int) -> bool:
    """Whether ``file_name:line`` is a kernel's ``def`` or its ``gl.warp_specialize(`` call."""
    lines = source_lines(source_root, file_name)
    if not 0 < line <= len(lines):
        return False
    text = lines[line - 1].strip()
    return text.startswith("def ") or "warp_specialize(" in text


def classify(log: str, source_root: Path) -> dict:
    hazards = []
    current = None
    for row in log.splitlines():
        found = HAZARD.search(row)
        if found:
            current = dict(kind=found.group(1), address=found.group(2), accesses=[])
            hazards.append(current)
            continue
        access = ACCESS.search(row)
        if access and current is not None and len(current["accesses"]) < 2:
            current["accesses"].append(dict(op=access.group(1), thread=int(access.group(2)),
                                            site=f"{access.group(4)}:{access.group(5)}"))
    ours, dispatch = [], []
    for hazard in hazards:
        sites = [a["site"].rsplit(":", 1) for a in hazard["accesses"]]
        is_dispatch = len(sites) == 2 and all(dispatch_line(source_root, f, int(n)) for f, n in sites)
        (dispatch if is_dispatch else ours).append(hazard)
    summary = re.findall(r"RACECHECK SUMMARY: (\d+) hazards displayed \((\d+) errors, (\d+) warnings\)", log)
    return dict(
        hazards=len(hazards), warp_specialize_dispatch=len(dispatch), kernels_own=len(ours),
        summaries=[dict(displayed=int(a), errors=int(b), warnings=int(c)) for a, b, c in summary],
        sites=Counter(" / ".join(a["site"] for a in h["accesses"]) for h in hazards).most_common(12),
        dispatch_addresses=sorted({h["address"] for h in dispatch}), first_own=ours[:4])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--source-root", type=Path, default=Path("backends"))
    args = parser.parse_args(argv)
    report = classify(args.log.read_text(errors="replace"), args.source_root)
    # A summary with more errors than hazards listed means the print limit cut the list: not judged.
    listed = sum(s["displayed"] for s in report["summaries"])
    report["complete"] = listed == report["hazards"] and all(s["displayed"] == s["errors"] + s["warnings"]
                                                             for s in report["summaries"])
    print(json.dumps(report, indent=1))
    return 0 if report["kernels_own"] == 0 and report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
