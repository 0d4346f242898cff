"""Run the conformance kit on every peer adapter whose peer imports here, and write the results.

On a GPU machine with the peers installed (FlashMLA or sglang-kernel, DeepGEMM, TileLang's examples
in ``$TL_EXAMPLES``), from the project root::

    python tools/peers_check.py --profile ci --out docs/pages/results/peers.json

For each adapter of :mod:`dsa_ref.testing.adapters` it records whether the peer imports (and why
not), and for each op the adapter checks: examples run and refused, the main refusal reasons, the
worst error ratio and each distinct failure with the input it failed on. ``docs/pages/results/peers.md``
renders that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def check_all(profile: str, max_examples: int | None) -> dict:
    from dsa_ref.testing import check_backend
    from dsa_ref.testing.adapters import ADAPTERS

    results = []
    for adapter_class in ADAPTERS:
        adapter = adapter_class()
        entry = {"adapter": adapter_class.__name__, "peer_modules": list(adapter_class.module_paths),
                 "unavailable": adapter.unavailable_reasons(), "ops": []}
        if not entry["unavailable"]:
            report = check_backend(adapter, profile, ops_to_check=list(adapter_class.checked_ops),
                                   max_examples=max_examples)
            print(report, flush=True)
            for op in report.ops:
                entry["ops"].append({
                    "op": op.op, "ok": op.failure is None, "ran": op.ran, "refused": op.refused,
                    "refusal_reasons": dict(sorted(op.refusal_reasons.items(), key=lambda item: -item[1])[:5]),
                    "worst_error_ratio": op.worst_error_ratio,
                    "failures": [{"message": failure.message, "input": failure.problem} for failure in op.failures],
                })
        else:
            print(f"{adapter_class.__name__}: not run ({'; '.join(entry['unavailable'])})", flush=True)
        results.append(entry)
    return {"profile": profile, "python": platform.python_version(), "adapters": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", help="conformance profile (ci, thorough)")
    parser.add_argument("--max-examples", type=int, default=None, help="examples per op (default: the profile's)")
    parser.add_argument("--out", type=Path, default=Path("peers.json"), help="where to write the JSON")
    args = parser.parse_args(argv)
    try:
        import torch
    except ModuleNotFoundError:
        print("peers_check needs torch and the peers (a GPU machine): pip install torch", file=sys.stderr)
        return 2
    results = check_all(args.profile, args.max_examples)
    results["torch"] = torch.__version__
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
