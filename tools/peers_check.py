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
import time
from pathlib import Path


def sgl_kernel_modules(folder: Path) -> dict[str, object]:
    """FlashMLA's and sglang's Python interfaces over sglang-kernel's compiled ops alone (its
    ``flashmla_ops`` and ``common_ops`` libraries, loaded with ``torch.ops.load_library``), for a
    machine that has the libraries but not the ``sgl_kernel`` package: adapter name -> module."""
    import torch

    for library in ("flashmla_ops.abi3.so", "common_ops.abi3.so"):
        torch.ops.load_library(str(folder / library))
    return sgl_kernel_interfaces(torch.ops.sgl_kernel)


def sgl_kernel_interfaces(ops) -> dict[str, object]:
    """The modules of :func:`sgl_kernel_modules` over ``ops`` (``torch.ops.sgl_kernel``, or a stand-in
    with its operators' signatures)."""
    import types

    def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
        return ops.sparse_prefill_fwd.default(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)

    def get_mla_metadata(*args, **kwargs):
        return None, None  # the sparse decode op plans its own schedule when given none

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                               attn_sink=None, topk_length=None):
        if indices is None or not is_fp8_kvcache:
            raise NotImplementedError("only the sparse FP8 decode is wired to sglang-kernel's op here")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse, _metadata, _splits = ops.sparse_decode_fwd.default(
            q, k_cache, indices, topk_length, attn_sink, tile_scheduler_metadata, num_splits, None, None, None,
            head_dim_v, scale)
        return out, lse

    def fast_topk(scores, out, lengths, row_starts):
        return ops.fast_topk(scores, out, lengths, row_starts)

    flash_mla = types.SimpleNamespace(__name__="sgl_kernel ops (flashmla_ops)", flash_mla_sparse_fwd=flash_mla_sparse_fwd,
                                      get_mla_metadata=get_mla_metadata, flash_mla_with_kvcache=flash_mla_with_kvcache)
    sglang = types.SimpleNamespace(__name__="sgl_kernel ops (common_ops)", fast_topk=fast_topk)
    return {"FlashMLA": flash_mla, "SglangTopK": sglang}


def check_all(profile: str, max_examples: int | None, modules: dict[str, object] | None = None,
              only: set[str] | None = None) -> dict:
    from dsa_ref.testing import check_backend
    from dsa_ref.testing.adapters import ADAPTERS

    results = []
    for adapter_class in ADAPTERS:
        if only and adapter_class.__name__ not in only:
            continue
        module = (modules or {}).get(adapter_class.__name__)
        adapter = adapter_class(module) if module is not None else adapter_class()
        peer_modules = [module.__name__] if module is not None else list(adapter_class.module_paths)
        entry = {"adapter": adapter_class.__name__, "peer_modules": peer_modules,
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


def merged(previous: dict, results: dict) -> dict:
    """``results`` with the adapters of ``previous`` that it did not run; each kept entry keeps the date
    it ran (the previous file's date for an entry written before entries carried their own), so a page
    built from a file merged over several sessions says when each row ran."""
    ran = {entry["adapter"] for entry in results["adapters"]}
    kept = [{**entry, "date": entry.get("date", previous.get("date"))}
            for entry in previous.get("adapters", []) if entry["adapter"] not in ran]
    return {**results, "adapters": kept + results["adapters"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", help="conformance profile (ci, thorough)")
    parser.add_argument("--max-examples", type=int, default=None, help="examples per op (default: the profile's)")
    parser.add_argument("--out", type=Path, default=Path("peers.json"), help="where to write the JSON")
    parser.add_argument("--sgl-kernel-libs", type=Path, default=None,
                        help="a folder with sglang-kernel's flashmla_ops.abi3.so and common_ops.abi3.so: FlashMLA's "
                             "and sglang's adapters call those ops when the sgl_kernel package is not installed")
    parser.add_argument("--adapters", default="", help="comma-separated adapter names to run (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other adapters' entries of an existing --out file (runs in several sessions)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ModuleNotFoundError:
        print("peers_check needs torch and the peers (a GPU machine): pip install torch", file=sys.stderr)
        return 2
    modules = sgl_kernel_modules(args.sgl_kernel_libs) if args.sgl_kernel_libs else None
    only = {name for name in args.adapters.split(",") if name} or None
    results = check_all(args.profile, args.max_examples, modules, only)
    results["torch"] = torch.__version__
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    results["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    for entry in results["adapters"]:
        entry["date"] = results["date"]
    if args.merge and args.out.exists():
        results = merged(json.loads(args.out.read_text()), results)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
