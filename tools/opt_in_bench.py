"""The alternative kernels of each backend, timed beside each other on the same inputs.

Each pair runs on the same inputs, in the same process (S 4096, SKV 8192, topk 2048, bf16, d_qk 576,
d_v 512, h 64 and 128, random causal indices): the time, the TFLOP/s and the relative difference of the
candidate's outputs from the default's. The pairs:

* triton sparse MLA forward: the ``tl.dot`` kernel against the Gluon kernel (``kernel="gluon"``, the
  default on Hopper);
* triton sparse MLA forward on Hopper: the Gluon kernel against its warp-specialized ping-pong variant
  (``kernel="gluon_pingpong"``, ``TritonBackend.hopper_forward_pingpong``);
* triton sparse MLA backward: the split kernels against the fused one (``kernel="fused"``), both modes;
* cupy sparse MLA backward: the default (atomic) tensor-core kernel against the wgmma one
  (``CupyBackend.hopper_backward``, with float32 and bf16 d_out), deterministic mode's tensor-core
  kernels (the default there) and its float32 path (``CupyBackend.deterministic_tensor_cores=False``);
* cupy sparse MLA forward: the mma.sync kernel against the wgmma one (``CupyBackend.hopper_forward``);
* cupy FP8 decode: the sparse MLA forward over the packed 656-byte cache at the decode step's shapes
  (b 64, h 128, topk 2048; s_q 2 at T 32K and s_q 1 at T 128K, pages of 64 shuffled as
  ``dsa_ref_backends.bench`` builds its FP8 decode case), ``sparse_mla_fwd_mma<true>`` against
  ``sparse_mla_fwd_wgmma_fp8`` (``CupyBackend.hopper_fp8_decode``);
* triton FP8 decode at the same shapes: the ``tl.dot`` kernel (the default) against the Gluon ping-pong
  kernel with a dequantizing producer (``kernel="gluon_fp8"``, ``TritonBackend.hopper_fp8_decode``) at its
  own split plan and at 2 and 4 splits, through the public API with the switch as well;
* triton top-k at the decode step's shape (64 rows of 128K, the paged indexer's scores and normal
  ones): one pass against two (``TritonBackend.chunked_topk``) at three chunk lengths, the first
  pass and its sort alone; the sets compared;
* triton dense indexer (4096 x 32K causal-end, fp8 and bf16): heads on the product's rows against keys
  on them (``indexer.KEYS_ON_ROWS``);
* cupy indexers: the paged one at the decode step's shape (b 64, T 128K, next_n 1 and 2) and the
  dense fp8 one at 4096 x 32K causal-end, mma.sync against wgmma (``CupyBackend.paged_indexer_wgmma``,
  ``CupyBackend.indexer_wgmma``).

FLOP: forward 2·S·h·topk·(d_qk + d_v) (the decode: 2·rows·h·topk·(576 + 512)), backward
2·S·h·topk·(3·d_qk + 2·d_v). A candidate that fails is recorded with its error; it never stops the
others. On a GPU machine, from a checkout::

    python tools/opt_in_bench.py --out opt_in_bench.json [--groups cupy-forward,...] [--heads 64,128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peers_training import relative, steady_ms  # the same steady-state timing and cross-check

ROWS: list[dict] = []
GROUPS = ("triton-forward", "cupy-forward", "cupy-decode", "triton-backward", "cupy-backward", "triton-topk",
          "triton-indexer", "cupy-indexer", "triton-forward-pingpong", "triton-decode")


def report(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def timed(torch, name: str, shape: str, flop: float, fn, reference=None, repeats: int = 10):
    """Run ``fn`` (returns a tuple of tensors), time it, report it against ``reference``'s outputs."""
    try:
        outputs = fn()
        ms = steady_ms(torch, fn, warm=2, repeats=repeats)
        row = dict(name=name, shape=shape, ms=round(ms, 3))
        if flop:
            row["tflops"] = round(flop / ms / 1e9, 1)
        if reference is not None:
            row["relative_difference"] = [relative(torch, a, b) for a, b in zip(outputs, reference)]
        report(**row)
        return outputs
    except Exception as error:  # noqa: BLE001 - one failing candidate must not lose the others
        report(name=name, shape=shape, error=f"{type(error).__name__}: {error}"[:400])
        return None


def causal_end_indexer_inputs(torch, dtype, s_q: int = 4096, s_kv: int = 32768, h_i: int = 64, d_i: int = 128):
    """The indexer speed issues' case: ``s_q`` queries at the end of an ``s_kv`` causal context (query t
    sees keys [0, s_kv - s_q + t]); ``lightning_indexer``'s arguments (scales for fp8 keys) and the FLOP."""
    key_end = torch.arange(s_kv - s_q + 1, s_kv + 1, dtype=torch.int32, device="cuda")
    inputs = dict(q=torch.randn(s_q, h_i, d_i, device="cuda").to(dtype),
                  weights=torch.randn(s_q, h_i, device="cuda") * h_i**-0.5,
                  k=torch.randn(s_kv, d_i, device="cuda").to(dtype),
                  key_start=torch.zeros(s_q, dtype=torch.int32, device="cuda"), key_end=key_end,
                  k_scale=torch.rand(s_kv, device="cuda") + 0.5 if dtype == torch.float8_e4m3fn else None)
    shape = f"{str(dtype).split('.')[-1]} s_q={s_q} s_kv={s_kv} causal-end H_I={h_i} d_I={d_i}"
    return inputs, shape, 2.0 * int(key_end.sum()) * h_i * d_i


def causal_indices(torch, s: int, s_kv: int, topk: int):
    """Query t (at key position s_kv - s + t) takes topk random keys at or before it."""
    position = torch.arange(s, device="cuda")[:, None] + (s_kv - s)
    random = torch.rand(s, topk, device="cuda")
    return (random * (position + 1)).long().clamp(max=s_kv - 1).to(torch.int32)


def fp8_decode_inputs(torch, batch: int, next_n: int, context: int, h: int = 128, topk: int = 2048,
                      block_size: int = 64):
    """The FP8 decode case of ``dsa_ref_backends.bench.bench_decode``: ``batch`` sequences of ``context``
    tokens in one packed cache, their pages of ``block_size`` shuffled, ``next_n`` queries a sequence
    taking ``topk`` uniform causal tokens each; ``(q, cache, slots)`` for ``sparse_mla``."""
    from dsa_ref_backends.bench import make_indices, random_fp8_cache

    blocks = context // block_size
    cache = random_fp8_cache(torch, batch * context, "cuda")
    block_table = torch.randperm(batch * blocks, device="cuda").view(batch, blocks)
    q = torch.randn(batch * next_n, h, 576, device="cuda", dtype=torch.bfloat16)
    tokens = make_indices(torch, next_n, context, topk * batch, "uniform", "cuda")  # [next_n, b * topk]
    tokens = tokens.view(next_n, batch, topk).transpose(0, 1).long()  # [b, next_n, topk]
    block = block_table.gather(1, (tokens // block_size).flatten(1)).view_as(tokens)
    slots = (block * block_size + tokens % block_size).to(torch.int32).view(batch * next_n, topk)
    return q, cache, slots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("opt_in_bench.json"))
    parser.add_argument("--heads", default="64,128")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma-separated subset of {', '.join(GROUPS)}")
    args = parser.parse_args(argv)
    groups = set(args.groups.split(","))
    if groups - set(GROUPS):
        parser.error(f"--groups: unknown {sorted(groups - set(GROUPS))}; known: {', '.join(GROUPS)}")
    import torch

    import dsa_ref
    from dsa_ref_backends.cupy_cuda.backend import CupyBackend
    from dsa_ref_backends.torch_triton import sparse_mla as triton_forward
    from dsa_ref_backends.torch_triton import sparse_mla_backward as triton_backward

    s, s_kv, topk, d_qk, d_v = 4096, 8192, 2048, 576, 512
    report(name="environment", device=torch.cuda.get_device_name(), torch=torch.__version__,
           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for h in (int(x) for x in args.heads.split(",")):
        torch.manual_seed(0)
        q = torch.randn(s, h, d_qk, dtype=torch.bfloat16, device="cuda") / 10
        kv = torch.randn(s_kv, d_qk, dtype=torch.bfloat16, device="cuda") / 10
        indices = causal_indices(torch, s, s_kv, topk)
        shape = f"S={s} SKV={s_kv} h={h} topk={topk}"
        forward_flop = 2 * s * h * topk * (d_qk + d_v)
        backward_flop = 2 * s * h * topk * (3 * d_qk + 2 * d_v)
        scale = d_qk**-0.5

        if "triton-forward" in groups:
            tl_dot = timed(torch, "triton forward, tl.dot", shape, forward_flop,
                           lambda: triton_forward.sparse_mla(q, kv, indices, scale, d_v, kernel="tl"))
            timed(torch, "triton forward, gluon (default on Hopper)", shape, forward_flop,
                  lambda: triton_forward.sparse_mla(q, kv, indices, scale, d_v, kernel="gluon"), tl_dot)

        if "triton-forward-pingpong" in groups:
            # The Gluon forward (the default on Hopper) against its ping-pong variant (opt-in), same inputs.
            gluon = timed(torch, "triton forward, gluon (default on Hopper)", shape, forward_flop,
                          lambda: triton_forward.sparse_mla(q, kv, indices, scale, d_v, kernel="gluon"))
            timed(torch, "triton forward, gluon ping-pong (TritonBackend.hopper_forward_pingpong)", shape,
                  forward_flop, lambda: triton_forward.sparse_mla(q, kv, indices, scale, d_v, kernel="gluon_pingpong"),
                  gluon)

        cupy_default, cupy_hopper, cupy_float32 = CupyBackend(), CupyBackend(), CupyBackend()
        cupy_hopper.hopper_forward = True
        cupy_float32.deterministic_tensor_cores = False

        def cupy_forward_backend(wgmma: bool, v2: bool, split_v: bool):
            backend = CupyBackend()
            backend.hopper_forward, backend.hopper_forward_v2, backend.hopper_split_v = wgmma, v2, split_v
            return backend

        if "cupy-forward" in groups:
            # sparse_mla_fwd_mma<false>, then the three wgmma kernels (CupyBackend.hopper_forward,
            # hopper_forward_v2, hopper_split_v), each against the one before it: v2 repeats the first's
            # arithmetic (relative difference 0), v3 v2's to rounding.
            previous = None
            for label, switches in (("mma.sync", (False, False, False)),
                                    ("wgmma (hopper_forward)", (True, False, False)),
                                    ("wgmma v2 (hopper_forward_v2)", (True, True, False)),
                                    ("wgmma v3 split-V consumers (hopper_split_v, default)", (True, True, True))):
                backend = cupy_forward_backend(*switches)
                previous = timed(torch, f"cupy forward, {label}", shape, forward_flop,
                                 lambda: dsa_ref.sparse_mla(q, kv, indices, backend=backend),
                                 previous if switches[0] else None)

        if not groups & {"triton-backward", "cupy-backward"}:
            continue
        out, lse = triton_forward.sparse_mla(q, kv, indices, scale, d_v, kernel="tl")
        d_out = torch.randn(s, h, d_v, dtype=torch.float32, device="cuda")
        for deterministic in ((False, True) if "triton-backward" in groups else ()):
            mode = "deterministic" if deterministic else "default mode"
            split = timed(torch, f"triton backward, split (default), {mode}", shape, backward_flop,
                          lambda: triton_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, scale, d_v,
                                                                      deterministic=deterministic, kernel="split"))
            timed(torch, f"triton backward, fused, {mode}", shape, backward_flop,
                  lambda: triton_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, scale, d_v,
                                                              deterministic=deterministic, kernel="fused"), split)
            if not deterministic:
                gluon_atomic = timed(torch, "triton backward, gluon (TritonBackend.hopper_backward)", shape,
                                     backward_flop,
                                     lambda: triton_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, scale,
                                                                                 d_v, kernel="gluon"), split)
            else:
                # The Gluon kernel storing its row gradients, then ordered row sums (opt-in until measured);
                # against the atomic Gluon kernel: dq equal, dkv apart by the order of the float32 sums.
                timed(torch, "triton backward, gluon deterministic (TritonBackend.hopper_deterministic_backward)",
                      shape, backward_flop,
                      lambda: triton_backward.sparse_mla_backward(q, kv, indices, out, lse, d_out, scale, d_v,
                                                                  deterministic=True, kernel="gluon_deterministic"),
                      gluon_atomic)
        if "cupy-backward" not in groups:
            continue
        cupy_wgmma_backward = CupyBackend()
        cupy_wgmma_backward.hopper_backward = True
        with dsa_ref.use_deterministic(False):
            atomic = timed(torch, "cupy backward, mma.sync (default mode)", shape, backward_flop,
                           lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out, backend=cupy_default))
            timed(torch, "cupy backward, wgmma (default mode, CupyBackend.hopper_backward)", shape, backward_flop,
                  lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out, backend=cupy_wgmma_backward),
                  atomic)
            d_out_bf16 = d_out.to(torch.bfloat16)
            timed(torch, "cupy backward, wgmma, bf16 d_out (CupyBackend.hopper_backward)", shape, backward_flop,
                  lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out_bf16,
                                                      backend=cupy_wgmma_backward), atomic)
            del d_out_bf16
        with dsa_ref.use_deterministic(True):
            timed(torch, "cupy backward, tensor cores (deterministic default)", shape, backward_flop,
                  lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out, backend=cupy_default), atomic)
            # The wgmma kernel storing its row gradients, then the same row sums (opt-in until measured).
            cupy_wgmma_deterministic = CupyBackend()
            cupy_wgmma_deterministic.hopper_backward = cupy_wgmma_deterministic.hopper_deterministic_backward = True
            timed(torch, "cupy backward, wgmma deterministic (CupyBackend.hopper_deterministic_backward)", shape,
                  backward_flop,
                  lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out,
                                                      backend=cupy_wgmma_deterministic), atomic)
            timed(torch, "cupy backward, float32 (deterministic, deterministic_tensor_cores=False)", shape,
                  backward_flop,
                  lambda: dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, d_out, backend=cupy_float32), atomic,
                  repeats=2)
        del q, kv, indices, out, lse, d_out
        torch.cuda.empty_cache()
    if "cupy-decode" in groups:
        # The decode step's sparse attention over the packed FP8 cache: sparse_mla_fwd_mma<true>,
        # sparse_mla_fwd_wgmma_fp8 (CupyBackend.hopper_fp8_decode), sparse_mla_fwd_wgmma_fp8_v2
        # (hopper_fp8_decode_v2), sparse_mla_fwd_wgmma_fp8_pair (hopper_fp8_decode_pair) and their split-V
        # twins (hopper_split_v; the default is sparse_mla_fwd_wgmma_fp8_pair_v3), same inputs, each compared with
        # the mma.sync kernel's outputs.
        for batch, next_n, context in ((64, 2, 32768), (128, 2, 32768), (64, 1, 131072)):
            q, cache, slots = fp8_decode_inputs(torch, batch, next_n, context)
            shape = f"FP8 cache b={batch} s_q={next_n} T={context} h=128 topk=2048"
            flop = 2 * batch * next_n * 128 * 2048 * (576 + 512)
            outputs = {}
            for kernel, wgmma, v2, pair, split_v in (
                    ("mma.sync", False, False, False, False),
                    ("wgmma (hopper_fp8_decode)", True, False, False, False),
                    ("wgmma v2 (hopper_fp8_decode_v2)", True, True, False, False),
                    ("wgmma pair (hopper_fp8_decode_pair)", True, True, True, False),
                    ("wgmma v3 split-V consumers (hopper_split_v)", True, True, False, True),
                    ("wgmma pair v3 (hopper_fp8_decode_pair, hopper_split_v, default)", True, True, True, True)):
                backend = CupyBackend()
                backend.hopper_fp8_decode, backend.hopper_fp8_decode_v2, backend.hopper_fp8_decode_pair = wgmma, v2, pair
                backend.hopper_split_v = split_v
                outputs[kernel] = timed(torch, f"cupy FP8 decode, {kernel}", shape, flop,
                                        lambda: dsa_ref.sparse_mla(q, cache, slots, backend=backend),
                                        reference=outputs.get("mma.sync"))
            del q, cache, slots, outputs
            torch.cuda.empty_cache()
    if "triton-decode" in groups:
        # The decode step's sparse attention over the packed FP8 cache on the triton backend: the tl.dot
        # kernel, then the Gluon FP8 kernel (its own split plan, then 2 and 4 splits) and the public API
        # with TritonBackend.hopper_fp8_decode, each compared with the tl.dot kernel's outputs.
        from dsa_ref_backends.torch_triton.backend import TritonBackend

        for batch, next_n, context in ((64, 2, 32768), (128, 2, 32768), (64, 1, 131072)):
            q, cache, slots = fp8_decode_inputs(torch, batch, next_n, context)
            shape = f"FP8 cache b={batch} s_q={next_n} T={context} h=128 topk=2048"
            flop = 2 * batch * next_n * 128 * 2048 * (576 + 512)
            scale = 576**-0.5
            tl_outputs = timed(torch, "triton FP8 decode, tl.dot (default)", shape, flop,
                               lambda: triton_forward.sparse_mla(q, cache, slots, scale, 512))
            for splits in (None, 2, 4):
                timed(torch, f"triton FP8 decode, gluon_fp8 (splits {splits or 'planned'})", shape, flop,
                      lambda: triton_forward.sparse_mla(q, cache, slots, scale, 512, kernel="gluon_fp8",
                                                           num_splits=splits), reference=tl_outputs)
            gluon_backend = TritonBackend()
            gluon_backend.hopper_fp8_decode = True
            timed(torch, "triton FP8 decode, public API with hopper_fp8_decode", shape, flop,
                  lambda: dsa_ref.sparse_mla(q, cache, slots, backend=gluon_backend), reference=tl_outputs)
            del q, cache, slots, tl_outputs
            torch.cuda.empty_cache()
    if "triton-topk" in groups:
        import dsa_ref.torch as dsa_torch
        from dsa_ref_backends.bench import decode_step_inputs
        from dsa_ref_backends.torch_triton import topk as triton_topk

        # The decode step's top-k: 64 rows of 128K scores (the paged indexer's output shape), k 2048,
        # on the indexer's own scores (weighted ReLU sums: their distribution decides how many keys
        # share the threshold's bin) and on normal ones with a shorter context.
        step = decode_step_inputs(torch, 64, 131072)
        indexer_scores = dsa_torch.lightning_indexer_paged(step["q_index"], step["weights"], step["index_cache"],
                                                           step["block_table"], step["context_lens"],
                                                           backend="triton")
        del step
        normal_scores = torch.randn(64, 131072, device="cuda")
        normal_scores[:, 100000:] = float("-inf")  # a shorter context in a longer table
        programs = torch.cuda.get_device_properties(0).multi_processor_count
        for label, scores in (("indexer scores", indexer_scores), ("normal scores", normal_scores)):
            shape = f"rows=64 len=131072 k=2048, {label}"
            one_pass = timed(torch, "triton top-k, one pass", shape, 0.0,
                             lambda: (triton_topk.topk_indices(scores, 2048),))
            planned = triton_topk.chunked_topk_plan(64, 131072, 2048, programs)
            for chunk in (8192, 16384, 32768):
                name = f"triton top-k, two passes (chunks of {chunk}{', the plan' if chunk == planned else ''})"
                two_passes = timed(torch, name, shape, 0.0,
                                   lambda: (triton_topk.topk_indices_in_chunks(scores, 2048, chunk),))
                if one_pass is not None and two_passes is not None:
                    report(name=f"{name}: its set equals one pass's",
                           equal=bool(torch.equal(torch.sort(one_pass[0], dim=1).values,
                                                  torch.sort(two_passes[0], dim=1).values)))
            first = timed(torch, "triton top-k, first pass alone (chunks of 8192)", shape, 0.0,
                          lambda: (triton_topk.topk_indices(scores.view(64 * 16, 8192), 2048),))
            if first is not None:
                timed(torch, "the first pass's torch.sort of the chunks' candidates", shape, 0.0,
                      lambda: (torch.sort(first[0], dim=1).values,))
        # The sampled-cut top-k (TritonBackend.radix_topk, NOTES.md version 13) beside the current kernel
        # at the two shapes, k 2048: the decode step's 64 rows of 128K (the backend's two passes
        # with each kernel, and one pass of each) and 4096 rows of 32K normal scores; the sets compared,
        # and how many rows took each of the kernel's steps (2a / 2b / 2c: the sample misjudged the row).
        from dsa_ref_backends.torch_triton import topk_radix

        def same_set(name, a, b):
            if a is not None and b is not None:
                report(name=f"{name}: its set equals the current kernel's",
                       equal=bool(torch.equal(torch.sort(a[0], dim=1).values, torch.sort(b[0], dim=1).values)))

        def steps_taken(name, scores):
            steps = torch.full((scores.shape[0],), -1, dtype=torch.int32, device="cuda")
            topk_radix.topk_indices(scores, 2048, paths=steps)
            report(name=f"{name}: rows taking steps 2a / 2b / 2c",
                   steps=torch.bincount(steps.long(), minlength=3).tolist())

        for label, scores in (("indexer scores", indexer_scores), ("normal scores", normal_scores)):
            shape = f"rows=64 len=131072 k=2048, {label}"
            current = timed(torch, f"triton top-k, two passes (chunks of {planned}), current kernel", shape, 0.0,
                            lambda: (triton_topk.topk_indices_in_chunks(scores, 2048, planned),))
            name = f"triton top-k, two passes (chunks of {planned}), sampled cut (radix_topk)"
            same_set(name, timed(torch, name, shape, 0.0,
                                 lambda: (topk_radix.topk_indices_in_chunks(scores, 2048, planned),)), current)
            name = "triton top-k, one pass, sampled cut (radix_topk)"
            same_set(name, timed(torch, name, shape, 0.0, lambda: (topk_radix.topk_indices(scores, 2048),)), current)
            steps_taken(f"{label}, one pass", scores)
        del indexer_scores, normal_scores
        scores = torch.randn(4096, 32768, device="cuda")
        shape = "rows=4096 len=32768 k=2048, normal scores"
        current = timed(torch, "triton top-k, one pass, current kernel", shape, 0.0,
                        lambda: (triton_topk.topk_indices(scores, 2048),))
        name = "triton top-k, one pass, sampled cut (radix_topk)"
        same_set(name, timed(torch, name, shape, 0.0, lambda: (topk_radix.topk_indices(scores, 2048),)), current)
        steps_taken("4096 x 32768 normal scores", scores)
        del scores, current
        torch.cuda.empty_cache()
    if "triton-indexer" in groups:
        from dsa_ref_backends.torch_triton import indexer as triton_indexer

        # The dense indexer at the speed issue's case, heads on the product's rows against keys on
        # them (indexer.KEYS_ON_ROWS).
        for dtype in (torch.float8_e4m3fn, torch.bfloat16):
            inputs, shape, flop = causal_end_indexer_inputs(torch, dtype)
            rows = {}
            for keys_on_rows in (False, True):
                rows[keys_on_rows] = timed(
                    torch, f"triton indexer, {'keys' if keys_on_rows else 'heads'} on the product's rows", shape, flop,
                    lambda: (triton_indexer.lightning_indexer(*inputs.values(), config={"KEYS_ON_ROWS": keys_on_rows}),),
                    reference=None if not keys_on_rows else rows.get(False))
            del inputs
    if "cupy-indexer" in groups:
        import dsa_ref
        from dsa_ref_backends.bench import decode_step_inputs
        from dsa_ref_backends.cupy_cuda.backend import CupyBackend

        # The decode step's indexer: b 64, T 128K, H_I 64, d_I 128, pages of 64 (next_n 1 and 2):
        # indexer_paged_mma (mma.sync) against indexer_paged_wgmma (CupyBackend.paged_indexer_wgmma).
        for next_n in (1, 2):
            step = decode_step_inputs(torch, 64, 131072, next_n=next_n)
            arguments = (step["q_index"], step["weights"], step["index_cache"], step["block_table"],
                         step["context_lens"])
            flop = 2.0 * 64 * next_n * 131072 * 64 * 128
            shape = f"b=64 next_n={next_n} T=131072 H_I=64 d_I=128 block=64"
            outputs = {}
            for wgmma in (False, True):
                backend = CupyBackend()
                backend.paged_indexer_wgmma = wgmma
                outputs[wgmma] = timed(
                    torch, f"cupy paged indexer, {'wgmma' if wgmma else 'mma.sync'}", shape, flop,
                    lambda: (dsa_ref.lightning_indexer_paged(*arguments, next_n=next_n, backend=backend),),
                    reference=None if not wgmma else outputs.get(False))
            # The second wgmma kernel (CupyBackend.paged_indexer_wgmma_v2, off until verified) beside them.
            backend = CupyBackend()
            backend.paged_indexer_wgmma_v2 = True
            timed(torch, "cupy paged indexer, wgmma v2 (indexer_paged_wgmma_v2)", shape, flop,
                  lambda: (dsa_ref.lightning_indexer_paged(*arguments, next_n=next_n, backend=backend),),
                  reference=outputs.get(True))
            del step, arguments
        # The dense fp8 indexer at the speed issue's case: indexer_mma against indexer_dense_wgmma
        # (CupyBackend.indexer_wgmma).
        inputs, shape, flop = causal_end_indexer_inputs(torch, torch.float8_e4m3fn)
        outputs = {}
        for wgmma in (False, True):
            backend = CupyBackend()
            backend.indexer_wgmma = wgmma
            outputs[wgmma] = timed(
                torch, f"cupy dense fp8 indexer, {'wgmma' if wgmma else 'mma.sync'}", shape, flop,
                lambda: (dsa_ref.lightning_indexer(**inputs, backend=backend),),
                reference=None if not wgmma else outputs.get(False))
        del inputs
    args.out.write_text(json.dumps(ROWS, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
