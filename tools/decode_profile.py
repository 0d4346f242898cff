"""Where the time of a DSA decode step goes: each stage of :func:`dsa_ref.sparse_decode_step`'s torch
path timed alone, per backend, on the benchmark's inputs (``dsa_ref_backends.bench.decode_step_inputs``:
b sequences of T tokens, both caches paged in shuffled blocks of 64, FP8 cache, H_I 64, d_I 128, h 128).

Stages: the indexer scores over the paged cache (one launch where the backend reads the pages in
place, else the per-sequence gather), the top-k of the ``[b · next_n, T]`` scores, the sparse FP8
decode on the selected slots, and the whole step; each a steady state of back-to-back calls between
two CUDA events. On a GPU machine, from a checkout::

    python tools/decode_profile.py --backends triton,cupy --batch 64 --context 131072 --out decode_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peers_training import steady_ms


def profile(torch, backend: str, batch: int, context: int, next_n: int, topk: int) -> list[dict]:
    import dsa_ref
    import dsa_ref.torch as dsa_torch
    from dsa_ref import registry
    from dsa_ref.decode import _gathered_scores
    from dsa_ref_backends.bench import decode_step_inputs

    inputs = decode_step_inputs(torch, batch, context, next_n=next_n)
    block_size = 64
    paged = registry.get_backend(backend).reads_pages_in_place(inputs["q_index"], inputs["index_cache"])

    def scores():
        if paged:
            return dsa_torch.lightning_indexer_paged(inputs["q_index"], inputs["weights"], inputs["index_cache"],
                                                     inputs["block_table"], inputs["context_lens"], next_n=next_n,
                                                     backend=backend)
        return _gathered_scores(torch, dsa_torch, inputs["q_index"], inputs["weights"], inputs["index_cache"],
                                inputs["block_table"].long(), inputs["context_lens"], next_n=next_n,
                                block_size=block_size, backend=backend)

    with torch.no_grad():
        _, _, slots = dsa_ref.sparse_decode_step(**inputs, topk=topk, next_n=next_n, backend=backend)
        computed = scores()
        stages = {
            "indexer scores" + (" (paged kernel)" if paged else " (gathered per sequence)"): scores,
            "top-k": lambda: dsa_torch.topk_indices(computed, topk, backend=backend),
            "sparse FP8 decode": lambda: dsa_torch.sparse_mla(inputs["q"], inputs["kv_cache"], slots,
                                                              sm_scale=576**-0.5, d_v=512, backend=backend),
            "whole step": lambda: dsa_ref.sparse_decode_step(**inputs, topk=topk, next_n=next_n, backend=backend),
        }
        rows = []
        for stage, fn in stages.items():
            rows.append(dict(backend=backend, stage=stage, ms=round(steady_ms(torch, fn, warm=2, repeats=10), 4),
                             shape=f"b={batch} next_n={next_n} T={context} topk={topk}"))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="triton,cupy")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--next-n", type=int, default=1)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("decode_profile.json"))
    args = parser.parse_args(argv)
    import torch

    rows = [dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                 date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))]
    for backend in args.backends.split(","):
        try:
            rows += profile(torch, backend, args.batch, args.context, args.next_n, args.topk)
        except Exception as error:  # noqa: BLE001 - one backend failing must not lose the other's rows
            rows.append(dict(backend=backend, error=f"{type(error).__name__}: {error}"[:400]))
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
