"""transformers' DeepSeek-V3.2 on its sdpa path against dsa_ref.integrations.transformers: tokens/s and
peak memory of a prefill and of decode steps, at 8K-32K of context, on random layers of V3.2's widths.

    python tools/transformers_bench.py --contexts 8192,16384,32768 --layers 4 --out bench.json

Both paths run the same model (same weights, bf16, sdpa masks): ``sdpa`` is transformers' own
attention (its top-k turned into a dense mask over full attention, and its indexer scoring
``[B, S, H_I, T]`` in float32), ``dsa`` the same model after ``enable(model, backend=...)``.
A path that runs out of memory is recorded as such. Prefill tokens/s = batch·context / time;
decode tokens/s = batch·steps / time; peak memory from ``torch.cuda.max_memory_allocated``
(weights included: the weights alone are reported too). Each timed run follows an untimed one at the
same context (two decode steps), so kernel compilation is not timed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch


def build_model(layers: int, index_topk: int, max_context: int, heads: int):
    import transformers

    config = transformers.DeepseekV32Config(
        vocab_size=1024, num_hidden_layers=layers, first_k_dense_replace=layers,  # dense MLPs: attention is the subject
        num_attention_heads=heads, num_key_value_heads=heads, index_topk=index_topk,
        max_position_embeddings=max_context + 1024, initializer_range=0.02)
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.cuda().eval()


def cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


@torch.no_grad()
def run_path(model, batch: int, context: int, steps: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    step_ids = torch.randint(0, model.config.vocab_size, (batch, steps), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # logits_to_keep=1: the benchmark is about attention, not a [B, S, vocab] head
    out = model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    prefill_peak = torch.cuda.max_memory_allocated()
    cache = cache_of(out)
    del out
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(steps):
        model(step_ids[:, step:step + 1], use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": batch * context / prefill_s,
            "prefill_peak_gib": prefill_peak / 2**30, "decode_s": decode_s,
            "decode_tokens_per_s": batch * steps / decode_s,
            "decode_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def measured(model, batch, context, steps) -> dict:
    try:
        return run_path(model, batch, context, steps)
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="8192,16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=128, help="MLA query heads (V3.2: 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--index-topk", type=int, default=2048)
    parser.add_argument("--backend", default="triton", help="dsa-ref backend of the sparse path")
    parser.add_argument("--indexer", default="transformers", choices=("transformers", "official"))
    parser.add_argument("--paths", default="sdpa,dsa", help="which of sdpa, dsa to run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("transformers_bench needs a CUDA GPU", file=sys.stderr)
        return 2

    import transformers

    from dsa_ref.integrations import transformers as dsa_hf

    contexts = [int(c) for c in args.contexts.split(",")]
    paths = args.paths.split(",")
    model = build_model(args.layers, args.index_topk, max(contexts), args.heads)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    results = {"transformers": transformers.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(), "args": vars(args), "weights_gib": weights_gib, "runs": []}
    for path in paths:
        if path == "dsa":
            dsa_hf.enable(model, backend=args.backend, indexer=args.indexer)
        for context in contexts:
            # Warm-up at the timed shape: kernels specialize on sizes (a decode step past a power of two
            # of the context compiles anew), and that compilation must not be timed.
            warm = measured(model, args.batch, context, 2)
            if "error" in warm:
                run = {"path": path, "context": context, **warm}
            else:
                run = {"path": path, "context": context, **measured(model, args.batch, context, args.decode_steps)}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
        if path == "dsa":
            dsa_hf.disable(model)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
