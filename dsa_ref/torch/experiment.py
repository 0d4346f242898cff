"""The indexer's two training stages of DeepSeek-V3.2 (paper eqs. 3-4) at real sizes, on the torch ops.

``dsa-ref train-indexer --backend triton`` runs this module; ``--backend numpy`` runs the same code on
torch CPU tensors through the float64 NumPy reference, at tiny sizes (``--quick``, the default on the
CPU). The layer is a :class:`dsa_ref.torch.DSAAttention` with random weights (or the attention layer of
a checkpoint, ``--checkpoint``), shaped like V3.2's in everything but its width: by default
dim 2048, 16 query heads, the 576-wide (512 + 64) latent, H_I 64 indexer heads of d_I 128,
top-k 2048 out of 4096 tokens of context.

1. **Dense warm-up** (eq. 3). The main attention is frozen. Its dense causal attention over every
   visible key, summed over heads and L1-normalized, is the target p: :func:`dsa_ref.torch.sparse_mla`
   and :func:`dsa_ref.torch.attention_target` over indices that list every visible key. Since the main
   attention and the training sequences are fixed, p is computed once per sequence. The indexer's
   parameters alone are trained with ``torch.optim.Adam`` on :func:`dsa_ref.torch.indexer_loss` with
   causal key ranges (the softmax of the index scores over every visible key).
2. **Sparse stage** (eq. 4). At every step the layer's own selection
   (:meth:`DSAAttention.selection`: fp8 index scores, top-k) picks ``topk`` keys per query; the target
   is the main attention restricted to that set (``attention_target`` over the selection, with the
   selection's own log-sum-exp from ``sparse_mla``); the KL runs over the selected keys. The
   indexer's input (h and c^Q) is detached, as in the paper. In the paper the main model also
   trains in this stage, on the language-modelling loss; there is no language model here, so the
   main weights stay frozen in both stages. Since the indexer's gradient comes from its own loss
   alone, that changes only the target it chases, not how it learns.

The loss is the mean KL per query. Every ``eval_every`` steps the *captured attention mass* is
measured on the training sequences and on held-out ones: the share of the dense target p that falls
on the keys the layer selects, averaged over the queries that see more than ``topk`` keys (the
others keep every key). References, from p itself: ``topk`` random keys, the ``topk`` most recent
keys (a sliding window) and the best possible ``topk`` keys (the oracle).

What it shows and what it does not. The tokens are Gaussian noise and the weights random (or a
real layer fed noise instead of the hidden states of the layers below it): there is no language
here, and nothing is claimed about a language model. The main attention of such a layer is a fixed
function of its inputs, made peaked by ``sharpness`` (which multiplies the softmax scale; 1 is the
layer's own), with no locality: the recent window captures no more than random keys. For the
default layer at 4096 tokens the best 2048 keys hold 0.78 of the head-summed attention at
sharpness 1 and 0.90 at the default 2, against 0.69 for 2048 random keys (queries past the first
2048): the room the indexer has to improve on random keys. What the
indexer can learn is that function, and the held-out curve tells how much of what it learned is
the function rather than the particular training sequences. The experiment exercises the paper's
training recipe end to end on the kernels at the sizes they are built for: the loss of each stage,
its gradients, the selection, and their cost per step.

Outputs (``--out``): ``train_indexer.json`` (the curves, the references, the settings and the time
per step of each stage) and ``train_indexer.png`` (captured mass over the steps of both stages with
the reference lines, and the loss). Progress goes to stderr: one updating line on a terminal, a
line every ``--progress-every`` steps otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import registry
from ..layer import DSAConfig
from ..layer.layer import init_parameters
from ..layer.loader import load_layer_state_dict
from ..layer.training import INDEXER_PARAMETERS
from . import ops
from .layer import DSAAttention, inverse_frequencies

#: Defaults at real sizes (a CUDA backend) and at tiny ones (``--quick``, and any run on the CPU).
REAL_DEFAULTS = dict(seq_len=4096, topk=2048, dense_steps=100, steps=200, train_sequences=4, eval_sequences=2,
                     lr=1e-3, eval_every=10, dim=2048, heads=16)
QUICK_DEFAULTS = dict(seq_len=32, topk=8, dense_steps=20, steps=20, train_sequences=2, eval_sequences=1,
                      lr=1e-2, eval_every=5, dim=64, heads=4)
ATTENTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
JSON_NAME, PLOT_NAME = "train_indexer.json", "train_indexer.png"
DEFAULT_OUT = "train-indexer-results"


def backend_device(backend: str) -> torch.device:
    """Where the torch tensors of ``backend`` live: the CPU for a NumPy backend, else its device."""
    instance = registry.get_backend(backend)
    if instance.array_kind == "numpy":
        return torch.device("cpu")
    if instance.array_kind == "torch":
        return torch.device(instance.device())
    return torch.device("cuda")  # cupy: torch tensors on the GPU, exchanged through DLPack


def layer_config(*, seq_len: int, topk: int, dim: int, heads: int, quick: bool) -> DSAConfig:
    """The layer of the experiment: V3.2's widths but ``dim`` and ``heads`` (or :meth:`DSAConfig.tiny`'s)."""
    if quick:
        return DSAConfig.tiny(dim=dim, n_heads=heads, max_seq_len=max(seq_len, 64), index_topk=topk)
    return DSAConfig(dim=dim, n_heads=heads, max_seq_len=seq_len, max_batch_size=1, index_topk=topk)


def build_layer(config: DSAConfig, *, seed: int, backend: str, device, checkpoint=None,
                layer_index: int = 0) -> DSAAttention:
    """A float32 DSAAttention with its main parameters frozen. From a checkpoint, the main weights are
    the checkpoint's and the indexer starts from random weights, as the warm-up of the paper does."""
    weights = None
    if checkpoint is not None:
        weights = load_layer_state_dict(checkpoint, layer_index, config)
        fresh = init_parameters(config, seed)
        weights.update({name: fresh[name] for name in INDEXER_PARAMETERS})
    layer = DSAAttention(config, seed=seed, weights=weights, mode="mqa", backend=backend, dtype=torch.float32,
                         device=device)
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(name in INDEXER_PARAMETERS)
    return layer


def causal_indices(n: int, device) -> Tensor:
    """int32 ``[n, n]``: query t lists keys 0..t, then -1 (every visible key, for the dense target)."""
    keys = torch.arange(n, dtype=torch.int32, device=device)
    return torch.where(keys[None, :] <= keys[:, None], keys[None, :], -1)


@dataclass
class Sequence:
    """One fixed sequence: its tokens ``[n, dim]``, what the frozen main attention makes of them, and
    the indexer's (detached) inputs. ``dense_target [n, n]`` is p of eq. 3 over every visible key."""

    tokens: Tensor
    q: Tensor  # [n, h, 576]   W_UK-absorbed queries
    kv: Tensor  # [n, 576]     latent rows
    query_latent: Tensor  # [n, q_lora]   c^Q
    cos: Tensor  # [n, rope/2]
    sin: Tensor
    dense_target: Tensor  # [n, n]
    key_start: Tensor  # [n]   0
    key_end: Tensor  # [n]   t + 1: causal


@torch.no_grad()
def prepare_sequence(layer: DSAAttention, tokens: Tensor, *, sm_scale: float, attention_dtype) -> Sequence:
    c = layer.config
    n = tokens.shape[0]
    tokens_, layout = layer._layout(tokens, None, None)
    projected = layer._project(tokens_, layout)
    q, kv = projected["q"].to(attention_dtype), projected["kv"].to(attention_dtype)
    dense = causal_indices(n, tokens.device)  # [n, n]
    _, lse = ops.sparse_mla(q, kv, dense, sm_scale=sm_scale, d_v=c.kv_lora_rank, backend=layer.backend)  # [n, h]
    dense_target = ops.attention_target(q, kv, dense, lse, sm_scale=sm_scale, backend=layer.backend)  # [n, n]
    angles = layout.positions.to(torch.float64)[:, None] * inverse_frequencies(c, tokens.device)[None, :]
    return Sequence(tokens=tokens, q=q, kv=kv, query_latent=layer.q_norm(layer.wq_a(tokens)),
                    cos=torch.cos(angles), sin=torch.sin(angles), dense_target=dense_target.float(),
                    key_start=layout.key_start, key_end=layout.key_end)


def indexer_outputs(layer: DSAAttention, sequence: Sequence):
    """The indexer's unquantized ``(q_I [n, H_I, d_I], w [n, H_I], k_I [n, d_I])``, with gradient."""
    return layer.indexer(sequence.tokens, sequence.query_latent, sequence.cos, sequence.sin)


def dense_loss(layer: DSAAttention, sequence: Sequence) -> Tensor:
    """Eq. 3: mean over queries of KL(p_t || softmax(I_t)) over every visible key."""
    index_q, index_weights, index_k = indexer_outputs(layer, sequence)
    per_query = ops.indexer_loss(index_q, index_weights, index_k, sequence.dense_target,
                                 key_start=sequence.key_start, key_end=sequence.key_end,
                                 backend=layer.backend)  # [n]
    return per_query.mean()


def sparse_loss(layer: DSAAttention, sequence: Sequence, *, sm_scale: float) -> Tensor:
    """Eq. 4: the layer's top-k selection S_t; mean over queries of KL(p_{t,S_t} || softmax(I_{t,S_t}))."""
    c = layer.config
    indices = layer.selection(sequence.tokens)  # [n, topk]   one sequence: positions are packed indices
    with torch.no_grad():
        _, lse = ops.sparse_mla(sequence.q, sequence.kv, indices, sm_scale=sm_scale, d_v=c.kv_lora_rank,
                                backend=layer.backend)  # [n, h]
        target = ops.attention_target(sequence.q, sequence.kv, indices, lse, sm_scale=sm_scale,
                                      backend=layer.backend)  # [n, topk]
    index_q, index_weights, index_k = indexer_outputs(layer, sequence)
    per_query = ops.indexer_loss(index_q, index_weights, index_k, target.float(), indices=indices,
                                 backend=layer.backend)  # [n]
    return per_query.mean()


def captured_mass(target: Tensor, indices: Tensor) -> Tensor:
    """Per query, the share of ``target [n, n]`` on the keys ``indices [n, k]`` (-1: no key)."""
    picked = target.gather(1, indices.clamp(min=0).long())  # [n, k]
    return torch.where(indices >= 0, picked, 0.0).sum(dim=1)  # [n]


def reference_masses(target: Tensor, topk: int, rows: Tensor) -> dict[str, float]:
    """Captured mass of k random keys, the k most recent ones and the best k, over ``rows``."""
    n = target.shape[0]
    visible = torch.arange(1, n + 1, device=target.device, dtype=torch.float64)  # [n]
    running = torch.cumsum(target.double(), dim=1)  # [n, n]
    t = torch.arange(n, device=target.device)
    before_window = t - topk  # the last key outside the window of query t
    outside = torch.where(before_window >= 0, running[t, before_window.clamp(min=0)], 0.0)  # [n]
    recent = running[t, t] - outside  # [n]
    best = torch.topk(target.double(), topk, dim=1).values.sum(dim=1)  # [n]
    return {"random": float((topk / visible)[rows].clamp(max=1).mean()),
            "recent_window": float(recent[rows].mean()), "oracle": float(best[rows].mean())}


class Progress:
    """A progress bar without a dependency: one line rewritten in place on a terminal, else a line
    every ``every`` steps (and at the last)."""

    def __init__(self, total: int, *, stream=None, every: int = 10, width: int = 24):
        self.total, self.every, self.width = total, max(1, every), width
        self.stream = sys.stderr if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.began = time.perf_counter()
        self.last_length = 0

    def update(self, done: int, message: str) -> None:
        if not self.interactive and done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.began
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - done) / rate if rate > 0 else float("nan")
        filled = round(self.width * done / self.total) if self.total else self.width
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {message} "
                f"{rate:.2f} steps/s, {remaining:.0f} s left")
        if self.interactive:
            self.stream.write("\r" + line.ljust(self.last_length))
            self.last_length = len(line)
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _check_settings(*, seq_len, topk, dense_steps, steps, train_sequences, eval_sequences, learning_rate,
                    sharpness, eval_every, attention_dtype):
    for name, value, least in (("seq_len", seq_len, 2), ("topk", topk, 1), ("dense_steps", dense_steps, 0),
                               ("steps", steps, 0), ("train_sequences", train_sequences, 1),
                               ("eval_sequences", eval_sequences, 1), ("eval_every", eval_every, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if topk >= seq_len:
        raise ValueError(f"topk={topk} must be < seq_len={seq_len} (else every key is kept and there is "
                         "nothing to select)")
    if dense_steps + steps < 1:
        raise ValueError(f"dense_steps + steps must be >= 1, got {dense_steps} + {steps}")
    for name, value in (("learning_rate", learning_rate), ("sharpness", sharpness)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if attention_dtype not in ATTENTION_DTYPES.values():
        raise ValueError(f"attention_dtype must be one of {list(ATTENTION_DTYPES)}, got {attention_dtype!r}")


def indexer_training_experiment(*, backend: str, seq_len: int, topk: int, dense_steps: int, steps: int,
                                train_sequences: int, eval_sequences: int, learning_rate: float,
                                sharpness: float = 2.0, seed: int = 0, eval_every: int = 10,
                                config: DSAConfig | None = None, checkpoint=None, layer_index: int = 0,
                                attention_dtype=torch.float32, progress: Progress | None = None) -> dict:
    """Dense warm-up (``dense_steps``, eq. 3) then sparse training (``steps``, eq. 4) of the indexer of a
    frozen DSAAttention on ``backend``; the captured attention mass every ``eval_every`` steps.

    Args:
        config: the layer (default :func:`layer_config` at real sizes); its ``index_topk`` must be ``topk``.
        checkpoint, layer_index: take the main weights from this safetensors checkpoint's layer.
        attention_dtype: dtype of the frozen main attention's q and latent rows in ``sparse_mla`` and
            ``attention_target`` (float32, or bfloat16 as the kernels prefer); the indexer trains in float32.
        progress: where to report each step (default: none).

    Returns:
        a dict of lists over the evaluated steps: ``steps`` (global step: 0 .. dense_steps is the
        warm-up, then the sparse stage), ``stage``, ``loss`` (mean KL per query of the step's stage, on
        the training sequences), ``train_mass`` and ``eval_mass`` (mean captured mass); and
        ``references`` (random / recent_window / oracle on both splits), ``seconds_per_step`` per
        stage, ``settings``.
    """
    _check_settings(seq_len=seq_len, topk=topk, dense_steps=dense_steps, steps=steps,
                    train_sequences=train_sequences, eval_sequences=eval_sequences, learning_rate=learning_rate,
                    sharpness=sharpness, eval_every=eval_every, attention_dtype=attention_dtype)
    device = backend_device(backend)
    config = config or layer_config(seq_len=seq_len, topk=topk, dim=REAL_DEFAULTS["dim"],
                                    heads=REAL_DEFAULTS["heads"], quick=False)
    if config.index_topk != topk:
        raise ValueError(f"config.index_topk={config.index_topk} must equal topk={topk}")
    if config.max_seq_len < seq_len:
        raise ValueError(f"config.max_seq_len={config.max_seq_len} must be >= seq_len={seq_len}")
    layer = build_layer(config, seed=seed, backend=backend, device=device, checkpoint=checkpoint,
                        layer_index=layer_index)
    sm_scale = config.softmax_scale * sharpness
    generator = torch.Generator().manual_seed(seed + 1)
    # Drawn on the CPU, so a seed gives the same sequences on every device.
    data = torch.randn(train_sequences + eval_sequences, seq_len, config.dim, generator=generator).to(device)
    sequences = [prepare_sequence(layer, x, sm_scale=sm_scale, attention_dtype=attention_dtype) for x in data]
    train, held_out = sequences[:train_sequences], sequences[train_sequences:]
    rows = torch.arange(seq_len, device=device) >= topk  # queries with more than k keys to choose from

    def mean_mass(split) -> float:
        return float(torch.stack([captured_mass(s.dense_target, layer.selection(s.tokens))[rows].mean()
                                  for s in split]).mean())

    references = {name: {key: sum(reference_masses(s.dense_target, topk, rows)[key] for s in split) / len(split)
                         for key in ("random", "recent_window", "oracle")}
                  for name, split in (("train", train), ("eval", held_out))}
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=learning_rate)
    history = {"steps": [], "stage": [], "loss": [], "train_mass": [], "eval_mass": []}
    stage_seconds = {"dense": 0.0, "sparse": 0.0}
    total = dense_steps + steps
    last_mass = float("nan")
    for step in range(total + 1):
        stage = "dense" if step < dense_steps or steps == 0 else "sparse"
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for sequence in train:  # one backward per sequence: the activations of one at a time
            loss = dense_loss(layer, sequence) if stage == "dense" else sparse_loss(layer, sequence,
                                                                                   sm_scale=sm_scale)
            if step < total:
                (loss / len(train)).backward()
            loss_sum += float(loss.detach())
        if step < total:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step < total:
            stage_seconds[stage] += time.perf_counter() - began
        loss_value = loss_sum / len(train)
        # The loss is of the parameters before this step's update, the mass too: evaluate first.
        if step % eval_every == 0 or step == total or step == dense_steps:
            history["steps"].append(step)
            history["stage"].append(stage)
            history["loss"].append(loss_value)
            with torch.no_grad():
                history["train_mass"].append(mean_mass(train))
                history["eval_mass"].append(mean_mass(held_out))
            last_mass = history["train_mass"][-1]
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the {stage} loss is {loss_value} at step {step}: lower the learning rate "
                                     f"(now {learning_rate})")
        if progress is not None and step < total:
            progress.update(step + 1, f"{'warm-up' if stage == 'dense' else 'sparse'} KL {loss_value:.4f} "
                                      f"mass {last_mass:.3f}")
    settings = dict(backend=backend, device=str(device), seq_len=seq_len, topk=topk, dense_steps=dense_steps,
                    steps=steps, train_sequences=train_sequences, eval_sequences=eval_sequences,
                    learning_rate=learning_rate, sharpness=sharpness, seed=seed, eval_every=eval_every,
                    attention_dtype=str(attention_dtype).removeprefix("torch."),
                    checkpoint=None if checkpoint is None else os.fspath(checkpoint), layer_index=layer_index,
                    config={key: getattr(config, key) for key in ("dim", "n_heads", "q_lora_rank", "kv_lora_rank",
                                                                  "qk_rope_head_dim", "index_n_heads",
                                                                  "index_head_dim", "index_topk", "indexer_fp8")})
    seconds_per_step = {stage_name: (stage_seconds[stage_name] / count if count else None)
                        for stage_name, count in (("dense", dense_steps), ("sparse", steps))}
    return {**history, "references": references, "seconds_per_step": seconds_per_step, "settings": settings}


def plot_history(result: dict, path) -> None:
    """Captured attention mass over the steps of both stages with the reference lines, and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    figure, (mass_axis, loss_axis) = plt.subplots(2, 1, figsize=(7.0, 6.4), sharex=True,
                                                  gridspec_kw={"height_ratios": [2, 1]})
    mass_axis.plot(result["steps"], result["train_mass"], marker=".", label="indexer top-k, training sequences")
    mass_axis.plot(result["steps"], result["eval_mass"], marker=".", label="indexer top-k, held-out sequences")
    for key, style in {"oracle": ":", "recent_window": "--", "random": "-."}.items():
        mass_axis.axhline(result["references"]["eval"][key], color="gray", linestyle=style,
                          label=f"{key.replace('_', ' ')} (held-out)")
    for axis in (mass_axis, loss_axis):
        if 0 < settings["dense_steps"] and settings["steps"] > 0:
            axis.axvline(settings["dense_steps"], color="black", linewidth=0.8)
    mass_axis.set_ylabel(f"attention mass captured by top-{settings['topk']}")
    mass_axis.set_title(f"Indexer training, {settings['seq_len']} tokens, k = {settings['topk']}, "
                        f"{settings['config']['n_heads']} heads, H_I {settings['config']['index_n_heads']} "
                        f"({settings['backend']})", fontsize=9)
    low = min(min(result["train_mass"]), min(result["eval_mass"]), result["references"]["eval"]["random"])
    mass_axis.set_ylim(max(0.0, low - 0.05), 1.0)
    mass_axis.legend(fontsize=7, loc="lower right")
    for stage, label in (("dense", "warm-up KL, eq. 3 (all visible keys)"),
                         ("sparse", "sparse KL, eq. 4 (selected keys)")):
        points = [(s, loss) for s, st, loss in zip(result["steps"], result["stage"], result["loss"]) if st == stage]
        if points:
            loss_axis.plot(*zip(*points), marker=".", label=label)
    loss_axis.set_yscale("log")
    loss_axis.set_ylabel("mean KL per query")
    loss_axis.set_xlabel("training step (Adam on the indexer; the line marks the start of the sparse stage)")
    loss_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _resolved(args: argparse.Namespace) -> dict:
    """The run's sizes: what the command line gives, else the real or the quick defaults."""
    device = backend_device(args.backend)
    quick = bool(getattr(args, "quick", False)) or device.type == "cpu"
    defaults = QUICK_DEFAULTS if quick else REAL_DEFAULTS
    values = {key: getattr(args, key, None) for key in defaults}
    values = {key: defaults[key] if value is None else value for key, value in values.items()}
    return {**values, "quick": quick}


def run(args: argparse.Namespace) -> int:
    """Run the experiment with parsed ``args`` (see :func:`dsa_ref.layer.experiment.add_arguments`)."""
    try:
        sizes = _resolved(args)
        for name, value in (("dim", sizes["dim"]), ("heads", sizes["heads"]), ("progress-every", args.progress_every)):
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if args.checkpoint is not None and (args.dim is not None or args.heads is not None):
            raise ValueError("--dim and --heads come from the checkpoint's layer (V3.2's shapes) with --checkpoint")
        if getattr(args, "attention_dtype", "float32") not in ATTENTION_DTYPES:
            raise ValueError(f"--attention-dtype must be one of {list(ATTENTION_DTYPES)}, "
                             f"got {args.attention_dtype!r}")
        if args.checkpoint is not None:
            config = DSAConfig(max_seq_len=max(sizes["seq_len"], 4096), index_topk=sizes["topk"])
        else:
            config = layer_config(seq_len=sizes["seq_len"], topk=sizes["topk"], dim=sizes["dim"],
                                  heads=sizes["heads"], quick=sizes["quick"])
        progress = Progress(sizes["dense_steps"] + sizes["steps"], every=args.progress_every)
        began = time.perf_counter()
        result = indexer_training_experiment(
            backend=args.backend, seq_len=sizes["seq_len"], topk=sizes["topk"], dense_steps=sizes["dense_steps"],
            steps=sizes["steps"], train_sequences=sizes["train_sequences"], eval_sequences=sizes["eval_sequences"],
            learning_rate=sizes["lr"], sharpness=args.sharpness, seed=args.seed, eval_every=sizes["eval_every"],
            config=config, checkpoint=args.checkpoint, layer_index=args.layer_index,
            attention_dtype=ATTENTION_DTYPES[getattr(args, "attention_dtype", "float32")], progress=progress)
    except (ValueError, TypeError, FloatingPointError, registry.BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - began
    settings, config_used = result["settings"], result["settings"]["config"]
    print(f"indexer training on {settings['backend']} ({settings['device']}): {settings['seq_len']} tokens, "
          f"top-{settings['topk']}, dim {config_used['dim']}, {config_used['n_heads']} heads, "
          f"H_I {config_used['index_n_heads']} x d_I {config_used['index_head_dim']}; "
          f"{settings['dense_steps']} warm-up + {settings['steps']} sparse Adam steps ({result['seconds']:.1f} s)")
    print(f"{'step':>6} {'stage':>7} {'KL/query':>10} {'mass (train)':>13} {'mass (held-out)':>16}")
    for step, stage, loss, train, held_out in zip(result["steps"], result["stage"], result["loss"],
                                                  result["train_mass"], result["eval_mass"]):
        print(f"{step:>6} {stage:>7} {loss:>10.4f} {train:>13.3f} {held_out:>16.3f}")
    for split in ("train", "eval"):
        refs = result["references"][split]
        print(f"references ({'held-out' if split == 'eval' else 'train'}): random {refs['random']:.3f}, "
              f"recent window {refs['recent_window']:.3f}, oracle {refs['oracle']:.3f}")
    per_step = ", ".join(f"{stage} {seconds * 1e3:.1f} ms" for stage, seconds in result["seconds_per_step"].items()
                         if seconds is not None)
    print(f"time per step ({settings['train_sequences']} sequences): {per_step}")
    out = args.out or DEFAULT_OUT
    os.makedirs(out, exist_ok=True)
    json_path = args.json or os.path.join(out, JSON_NAME)
    plot_path = args.plot or os.path.join(out, PLOT_NAME)
    with open(json_path, "w") as file:
        json.dump(result, file, indent=1)
    plot_history(result, plot_path)
    print(f"history written to {json_path}, plot to {plot_path}")
    return 0


def main(argv=None) -> int:
    from ..layer import experiment

    parser = argparse.ArgumentParser(prog="python -m dsa_ref.torch.experiment", description=__doc__.splitlines()[0])
    experiment.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = "triton"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
