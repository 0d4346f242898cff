"""Where a kernel's warps wait, per SASS instruction: a summary of Nsight Compute's source page.

ncu samples each warp's program counter and the reason it could not issue; ``--page source --csv
--print-source sass`` of a report taken with the WarpStateStats and SourceCounters sections lists every
instruction with its samples, in total and per reason. This prints the reasons' shares of all samples,
then the instructions with the most samples (share, the instruction, its two largest reasons), and can
write the same as JSON. ``tools/ncu_kernels.sh`` writes the CSV for the FP8 decode kernels::

    python tools/ncu_stalls.py OUT/ncu_fp8_v2_source.csv [--top 25] [--out stalls.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(path: Path) -> tuple[str, list[dict]]:
    """``(kernel name, rows)`` of one kernel's source page: each row the CSV's columns by name. The page
    starts with a ``"Kernel Name","<name>"`` line, then the header."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if not lines or lines[0][:1] != ["Kernel Name"] or len(lines) < 2:
        raise ValueError(f"{path}: not an ncu source page (expected a 'Kernel Name' line, then a header)")
    kernel, header = lines[0][1], lines[1]
    if SAMPLES not in header or "Source" not in header:
        raise ValueError(f"{path}: the source page has no {SAMPLES!r} column: take the report with "
                         "--section WarpStateStats --section SourceCounters")
    return kernel, [dict(zip(header, line)) for line in lines[2:] if len(line) == len(header)]


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else 0.0


def summarize(rows: list[dict], top: int = 25) -> dict:
    """The reasons' shares of all samples and the ``top`` instructions by samples."""
    reasons = [name for name in rows[0] if name.startswith("stall_") and "Not Issued" not in name] if rows else []
    total = sum(_number(row[SAMPLES]) for row in rows)
    by_reason = {name: sum(_number(row[name]) for row in rows) for name in reasons}
    ranked = sorted(rows, key=lambda row: -_number(row[SAMPLES]))[:top]
    instructions = []
    for row in ranked:
        largest = sorted(((_number(row[name]), name) for name in reasons), reverse=True)[:2]
        instructions.append(dict(address=row.get("Address", ""), source=re.sub(r"\s+", " ", row["Source"]).strip(),
                                 share=_number(row[SAMPLES]) / total if total else 0.0,
                                 reasons={name: value for value, name in largest if value}))
    return dict(samples=total,
                reasons={name: value / total for name, value in sorted(by_reason.items(), key=lambda item: -item[1])
                         if value} if total else {},
                instructions=instructions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, nargs="+", help="source pages (ncu --page source --csv --print-source sass)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="also write the summaries as JSON")
    args = parser.parse_args(argv)
    results = {}
    for path in args.csv:
        kernel, rows = read_source_page(path)
        summary = results[kernel] = summarize(rows, args.top)
        print(f"== {kernel}: {summary['samples']:.0f} samples")
        for name, share in list(summary["reasons"].items())[:10]:
            print(f"   {name:24s} {share * 100:5.1f}%")
        for entry in summary["instructions"]:
            reasons = " ".join(f"{name}:{value:.0f}" for name, value in entry["reasons"].items())
            print(f"   {entry['share'] * 100:5.1f}%  {entry['source'][:64]:64s} {reasons}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
