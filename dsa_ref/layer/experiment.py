"""Warm up a randomly initialised indexer against a fixed attention pattern (paper eq. 3).

A tiny DSA layer with random weights provides the "main attention": on a few fixed random
sequences, its dense causal attention (made sharper by ``sharpness``) is summed over heads and
L1-normalized into the target p. The layer's own, randomly initialised indexer is then trained
alone, with Adam on the KL loss and the hand-written gradients of :mod:`.training`, while the
main attention stays frozen, as in the paper's dense warm-up stage.

What it reports: the *captured attention mass*, the share of p that falls on the top-k keys the
indexer selects, averaged over the queries that see more than k keys (the others keep every key),
on the training sequences and on held-out ones, against three references: the expected mass of
k random keys, of the k most recent keys (a sliding window) and of the best possible k keys
(the top-k of p itself).

What to expect: on the training sequences the captured mass climbs from the random level to near
the oracle within a few hundred steps; on held-out sequences it stays at the random level. The
pattern of a randomly initialised model on random inputs has no rule to learn that transfers,
so the indexer fits the fixed pattern it is shown; the point here is the loss and its gradients.

Run it as ``dsa-ref train-indexer`` or ``python -m dsa_ref.layer.experiment``. With ``--backend``
(``triton``, ``cupy``; ``numpy`` on torch CPU tensors), ``dsa-ref train-indexer`` runs
:mod:`dsa_ref.torch.experiment` instead: both of the paper's stages (the dense warm-up, then the
sparse stage of eq. 4 with top-k selection) at real sizes, on the torch ops and ``DSAAttention``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .config import DSAConfig
from .layer import DSALayer
from .mla import mha_probabilities, split_wkv_b
from .training import (
    INDEXER_PARAMETERS,
    attention_target,
    captured_attention_mass,
    causal_mask,
    indexer_loss_and_gradients,
    indexer_scores,
)


def _attention_targets(layer: DSALayer, sequences, sharpness: float):
    """The frozen main attention's target p ``[n, n]`` for each sequence, plus its c^Q (the indexer's input)."""
    config = layer.config
    w_uk, _ = split_wkv_b(layer.weights["wkv_b.weight"], config)
    positions = np.arange(sequences.shape[1])
    targets, query_latents = [], []
    for tokens in sequences:
        proj = layer.projections(tokens, positions)
        probs = mha_probabilities(proj.q_nope, proj.q_pe, proj.latent, proj.k_pe, w_uk,
                                  causal_mask(len(positions)), config.softmax_scale * sharpness)  # [n, h, n]
        targets.append(attention_target(probs))  # [n, n]
        query_latents.append(proj.qr)  # [n, q_lora]
    return targets, query_latents


def _reference_masses(target, topk: int, rows) -> dict[str, float]:
    n = target.shape[0]
    visible = np.arange(1, n + 1)  # keys each query sees
    recent = np.array([target[t, max(0, t - topk + 1):t + 1].sum() for t in range(n)])  # sliding window
    best = -np.sort(-target, axis=1)[:, :topk].sum(axis=1)  # oracle: top-k of p itself
    return {"random": float(np.mean(np.minimum(topk, visible)[rows] / visible[rows])),
            "recent_window": float(recent[rows].mean()), "oracle": float(best[rows].mean())}


def indexer_warmup_experiment(*, steps: int = 200, seq_len: int = 64, topk: int = 8, train_sequences: int = 4,
                              eval_sequences: int = 2, learning_rate: float = 3e-3, sharpness: float = 2.0,
                              seed: int = 0, eval_every: int = 10, config: DSAConfig | None = None) -> dict:
    """Train the indexer of a random tiny layer against its frozen main attention; report the captured mass.

    Returns a dict with ``steps`` (evaluated steps), ``train_mass`` / ``eval_mass`` (mean captured mass
    at those steps), ``loss`` (mean KL per query), ``references`` (random / recent_window / oracle on
    both splits) and the settings.
    """
    config = config or DSAConfig.tiny(max_seq_len=max(64, seq_len), index_topk=topk, indexer_fp8=False)
    layer = DSALayer(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    train_x = rng.standard_normal((train_sequences, seq_len, config.dim))
    eval_x = rng.standard_normal((eval_sequences, seq_len, config.dim))
    train_targets, train_qr = _attention_targets(layer, train_x, sharpness)
    eval_targets, eval_qr = _attention_targets(layer, eval_x, sharpness)
    positions = np.arange(seq_len)
    rows = np.arange(seq_len) >= topk  # queries with more than k keys to choose from
    visible = causal_mask(seq_len)

    params = {name: layer.weights[name].copy() for name in INDEXER_PARAMETERS}
    first_moment = {name: np.zeros_like(value) for name, value in params.items()}
    second_moment = {name: np.zeros_like(value) for name, value in params.items()}
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8

    def mean_mass(xs, qrs, targets):
        masses = [captured_attention_mass(indexer_scores(params, x, qr, positions, config, visible), p, topk)[rows]
                  for x, qr, p in zip(xs, qrs, targets)]
        return float(np.mean(masses))

    history = {"steps": [], "train_mass": [], "eval_mass": [], "loss": []}
    for step in range(steps + 1):
        loss_sum, grads = 0.0, {name: np.zeros_like(value) for name, value in params.items()}
        for x, qr, target in zip(train_x, train_qr, train_targets):
            loss, sequence_grads, _ = indexer_loss_and_gradients(params, x, qr, positions, target, config,
                                                                 visible=visible)
            loss_sum += loss
            for name in grads:
                grads[name] += sequence_grads[name]
        tokens = train_sequences * seq_len
        if step % eval_every == 0 or step == steps:
            history["steps"].append(step)
            history["loss"].append(loss_sum / tokens)
            history["train_mass"].append(mean_mass(train_x, train_qr, train_targets))
            history["eval_mass"].append(mean_mass(eval_x, eval_qr, eval_targets))
        if step == steps:
            break
        for name in params:  # Adam on the mean loss per query
            grad = grads[name] / tokens
            first_moment[name] = beta1 * first_moment[name] + (1 - beta1) * grad
            second_moment[name] = beta2 * second_moment[name] + (1 - beta2) * grad * grad
            corrected_first = first_moment[name] / (1 - beta1 ** (step + 1))
            corrected_second = second_moment[name] / (1 - beta2 ** (step + 1))
            params[name] -= learning_rate * corrected_first / (np.sqrt(corrected_second) + epsilon)

    references = {
        "train": {key: float(np.mean([_reference_masses(p, topk, rows)[key] for p in train_targets]))
                  for key in ("random", "recent_window", "oracle")},
        "eval": {key: float(np.mean([_reference_masses(p, topk, rows)[key] for p in eval_targets]))
                 for key in ("random", "recent_window", "oracle")},
    }
    settings = dict(steps=steps, seq_len=seq_len, topk=topk, train_sequences=train_sequences,
                    eval_sequences=eval_sequences, learning_rate=learning_rate, sharpness=sharpness, seed=seed)
    return {**history, "references": references, "settings": settings}


def plot_history(result: dict, path: str) -> None:
    """Captured attention mass against training steps, with the reference lines; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot(result["steps"], result["train_mass"], label="indexer top-k, training sequences")
    axis.plot(result["steps"], result["eval_mass"], label="indexer top-k, held-out sequences")
    styles = {"oracle": ":", "recent_window": "--", "random": "-."}
    for key, style in styles.items():
        axis.axhline(result["references"]["eval"][key], color="gray", linestyle=style,
                     label=f"{key.replace('_', ' ')} (held-out)")
    settings = result["settings"]
    axis.set_xlabel("training step (Adam, KL loss of eq. 3)")
    axis.set_ylabel(f"attention mass captured by top-{settings['topk']}")
    axis.set_title(f"Indexer warm-up, {settings['seq_len']} tokens, k = {settings['topk']}")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dsa-ref train-indexer``: the NumPy warm-up by default, both training stages on the
    torch ops with ``--backend`` (:mod:`dsa_ref.torch.experiment`). Defaults: NumPy / ``--backend`` on a
    GPU (``--quick``, or any run on the CPU, takes the tiny sizes of the torch experiment)."""
    parser.add_argument("--backend", help="run both stages on the torch ops with this backend (triton, cupy; numpy "
                        "on CPU tensors). Default: the NumPy warm-up of eq. 3 alone")
    parser.add_argument("--steps", type=int, default=None,
                        help="Adam steps: of the warm-up (NumPy, default 200); of the sparse stage, after "
                             "--dense-steps (--backend, default 200)")
    parser.add_argument("--dense-steps", type=int, default=None,
                        help="warm-up steps on eq. 3 before the sparse stage (--backend only, default 100)")
    parser.add_argument("--seq-len", "--tokens", dest="seq_len", type=int, default=None,
                        help="tokens per sequence (default 64 / 4096)")
    parser.add_argument("--topk", type=int, default=None, help="keys the indexer selects per query (default 8 / 2048)")
    parser.add_argument("--train-sequences", type=int, default=None, help="fixed training sequences (default 4)")
    parser.add_argument("--eval-sequences", type=int, default=None, help="held-out sequences (default 2)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-3 / 1e-3)")
    parser.add_argument("--sharpness", type=float, default=2.0,
                        help="multiplies the main attention's softmax scale, to make its pattern peaked (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 10)")
    parser.add_argument("--plot", metavar="PNG", help="write the curve of captured mass to this image")
    parser.add_argument("--json", metavar="PATH", help="write the full history as JSON")
    parser.add_argument("--out", metavar="DIR", help="folder for train_indexer.json and train_indexer.png "
                        "(default: none; with --backend, train-indexer-results)")
    torch_only = parser.add_argument_group("with --backend (the torch experiment)")
    torch_only.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (the CPU default)")
    torch_only.add_argument("--dim", type=int, default=None, help="hidden size (default 2048; quick 64)")
    torch_only.add_argument("--heads", type=int, default=None, help="main attention heads (default 16; quick 4)")
    torch_only.add_argument("--attention-dtype", default="float32", choices=("float32", "bfloat16"),
                            help="dtype of the frozen main attention's rows in the target (default float32)")
    torch_only.add_argument("--checkpoint", metavar="PATH",
                            help="take the main weights from this safetensors checkpoint (V3.2's shapes; the "
                                 "indexer starts from random weights)")
    torch_only.add_argument("--layer-index", type=int, default=0, help="layer of --checkpoint (default 0)")
    torch_only.add_argument("--progress-every", type=int, default=10,
                            help="steps between progress lines when stderr is not a terminal (default 10)")


#: The NumPy warm-up's defaults, for the options whose default depends on the experiment.
NUMPY_DEFAULTS = dict(steps=200, seq_len=64, topk=8, train_sequences=4, eval_sequences=2, lr=3e-3, eval_every=10)
#: Options only the torch experiment reads, with their defaults.
TORCH_ONLY_DEFAULTS = dict(dense_steps=None, quick=False, dim=None, heads=None, attention_dtype="float32",
                           checkpoint=None, layer_index=0, progress_every=10)


def run(args: argparse.Namespace) -> int:
    """Run the experiment with parsed ``args``; print the curve; return the exit code."""
    if getattr(args, "backend", None) is not None:
        from ..torch import experiment as torch_experiment  # imports torch: only when asked for

        return torch_experiment.run(args)
    given = [name for name, default in TORCH_ONLY_DEFAULTS.items() if getattr(args, name, default) != default]
    if given:
        print(f"error: {', '.join('--' + name.replace('_', '-') for name in given)} need --backend "
              "(the torch experiment); the NumPy warm-up has no sparse stage", file=sys.stderr)
        return 2
    for name, default in NUMPY_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    for name in ("steps", "seq_len", "topk", "train_sequences", "eval_sequences", "eval_every"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.topk >= args.seq_len:
        print(f"error: --topk={args.topk} must be < --seq-len={args.seq_len} (else every key is kept)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    result = indexer_warmup_experiment(steps=args.steps, seq_len=args.seq_len, topk=args.topk,
                                       train_sequences=args.train_sequences, eval_sequences=args.eval_sequences,
                                       learning_rate=args.lr, sharpness=args.sharpness, seed=args.seed,
                                       eval_every=args.eval_every)
    result["seconds"] = time.perf_counter() - began
    print(f"indexer warm-up: {args.seq_len} tokens, top-{args.topk}, {args.train_sequences} training and "
          f"{args.eval_sequences} held-out sequences, {args.steps} Adam steps ({result['seconds']:.1f} s)")
    print(f"{'step':>6} {'KL/query':>10} {'mass (train)':>13} {'mass (held-out)':>16}")
    for step, loss, train, held_out in zip(result["steps"], result["loss"], result["train_mass"], result["eval_mass"]):
        print(f"{step:>6} {loss:>10.4f} {train:>13.3f} {held_out:>16.3f}")
    for split in ("train", "eval"):
        refs = result["references"][split]
        print(f"references ({'held-out' if split == 'eval' else 'train'}): random {refs['random']:.3f}, "
              f"recent window {refs['recent_window']:.3f}, oracle {refs['oracle']:.3f}")
    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)
        args.json = args.json or os.path.join(args.out, "train_indexer.json")
        args.plot = args.plot or os.path.join(args.out, "train_indexer.png")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
        print(f"history written to {args.json}")
    if args.plot:
        plot_history(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsa-ref train-indexer", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
