"""A cost model of attention per token: dense MLA against DSA, FLOPs and bytes against position.

The question it answers is the one of the paper's Figure 3: a token at position ``t`` of a long
context, how much does its attention cost with dense MLA, and how much with DSA (the lightning
indexer over all ``t`` keys plus sparse MLA over ``min(t, k)`` of them)? Dense cost grows
linearly with ``t`` at a steep slope; DSA's grows at the indexer's shallow slope once ``t > k``.
The two lines cross a little above ``k``: below the crossover, DSA costs *more* than dense.

Conventions (those of the benchmarks, ``backends/bench.py``):

* FLOPs are 2 x multiply-adds of the attention products only: ``2 h t (d_qk + d_v)`` for MLA
  over ``t`` keys, ``2 t H_I d_I`` for the indexer. Projections (W_DQ, W_UQ, W_DKV, W_O, the
  indexer's own) cost the same per token at every position, dense or sparse, and are left out.
* Bytes are what one decode step reads per token and layer from the caches: the latent rows
  (656 bytes each in V3.2's FP8 cache), the indexer keys (128 fp8 bytes + a float32 scale), the
  float32 scores written and read again by top-k, and the int32 indices. Queries, outputs and
  weights are per-token constants and are left out.
* Decode uses MLA's MQA mode (576-wide absorbed queries, one shared latent row per key). Dense
  prefill uses the MHA mode (192-wide keys, 128-wide values per head), the cheaper one for many
  queries; DSA uses MQA mode in both phases, as the paper does.

Every function takes the context length ``t`` (the keys a token attends to, itself included) as
an int or an integer array and is vectorized over it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from . import _checks

PHASES = ("decode", "prefill")
METRICS = ("flops", "bytes", "seconds")


# ---------------------------------------------------------------------------- FLOP formulas
def attention_flops(context, heads: int, d_qk: int, d_v: int) -> float:
    """FLOPs of attention for queries over ``context`` keys each: ``2 · heads · Σ context · (d_qk + d_v)``.

    ``QK^T`` costs ``d_qk`` multiply-adds per (head, key), ``PV`` costs ``d_v``. ``context`` is one
    count or an array of per-query counts (they are summed), e.g. ``np.arange(1, s + 1)`` for a
    causal prefill of ``s`` tokens.
    """
    for name, value in (("heads", heads), ("d_qk", d_qk), ("d_v", d_v)):
        _checks.positive_int(name, value)
    return float(2 * heads * np.sum(_counts(context)) * (d_qk + d_v))


def indexer_flops(context, index_heads: int, index_dim: int) -> float:
    """FLOPs of the lightning indexer (eq. 1) for queries over ``context`` keys each:
    ``2 · index_heads · index_dim · Σ context`` (the ``q · k`` products; ReLU and the weighted head
    sum add ``O(H_I)`` per key and are left out, as in DeepGEMM's count)."""
    for name, value in (("index_heads", index_heads), ("index_dim", index_dim)):
        _checks.positive_int(name, value)
    return float(2 * index_heads * index_dim * np.sum(_counts(context)))


def _counts(context) -> np.ndarray:
    """Per-query key counts as float64: integers >= 0 (a query may see no key)."""
    t = np.asarray(context)
    if t.size and not np.issubdtype(t.dtype, np.integer):  # an empty list has no dtype of its own
        raise ValueError(f"context must be integer key counts, got dtype {t.dtype}")
    if t.size and t.min() < 0:
        raise ValueError(f"context must be key counts >= 0, got min {t.min()}")
    return t.astype(np.float64)


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class CostConfig:
    """Shapes and storage formats that set the cost; the defaults are DeepSeek-V3.2's.

    Fields:
        heads: MLA query heads h (128).
        d_qk, d_v: MQA-mode widths: absorbed query / latent row (512 + 64 = 576) and value (512).
        mha_qk_dim, mha_v_dim: MHA-mode per-head widths (128 + 64 = 192 and 128), for dense prefill.
        index_heads, index_dim: indexer heads H_I (64) and width d_I (128).
        topk: keys kept per query, k (2048).
        kv_row_bytes: bytes of one cached latent row (656: the FP8 row; 1152 for bfloat16).
        index_key_bytes: bytes of one cached indexer key (128 fp8 values + a float32 scale = 132).
        score_bytes: bytes per key of the scores between indexer and top-k (4 written + 4 read;
            0 for a fused indexer + top-k that never stores them).
        index_bytes: bytes per selected slot of the top-k indices (4 written + 4 read).
        indexer_fp8: the indexer runs in fp8 (counts at the fp8 rate in :func:`roofline_seconds`).
    """

    heads: int = 128
    d_qk: int = 576
    d_v: int = 512
    mha_qk_dim: int = 192
    mha_v_dim: int = 128
    index_heads: int = 64
    index_dim: int = 128
    topk: int = 2048
    kv_row_bytes: int = 656
    index_key_bytes: int = 132
    score_bytes: int = 8
    index_bytes: int = 8
    indexer_fp8: bool = True

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "indexer_fp8":
                if not isinstance(value, bool):
                    raise TypeError(f"indexer_fp8 must be a bool, got {type(value).__name__} {value!r}")
            else:  # widths, counts and row sizes are >= 1; per-key byte counts may be 0 (not stored)
                _checks.int_at_least(field.name, value, 0 if field.name in _MAY_BE_ZERO else 1)

    def replace(self, **changes) -> "CostConfig":
        return replace(self, **changes)


#: CostConfig fields that may be 0: traffic a fused or cache-free variant does not have.
_MAY_BE_ZERO = ("index_key_bytes", "score_bytes", "index_bytes")


#: DeepSeek-V3.2's attention, FP8 latent cache and fp8 indexer.
V32 = CostConfig()


@dataclass(frozen=True)
class Hardware:
    """Peak rates for a roofline estimate. The default is an H100/H800 SXM's data-sheet peak
    (dense tensor-core rates, HBM3 bandwidth); measured rates are lower (the benchmarks say how much)."""

    name: str = "H100 SXM (data-sheet peaks)"
    bf16_flops_per_s: float = 989e12
    fp8_flops_per_s: float = 1979e12
    bytes_per_s: float = 3.35e12

    def __post_init__(self):
        for name in ("bf16_flops_per_s", "fp8_flops_per_s", "bytes_per_s"):
            if _checks.finite_float(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


H100 = Hardware()


@dataclass(frozen=True)
class TokenCost:
    """Cost of one token's attention in one layer, as arrays over the context lengths asked for.

    ``attention_flops`` run at the bf16 rate, ``indexer_flops`` at the indexer's rate
    (fp8 in V3.2); ``bytes`` are cache reads and writes of a decode step (0 for prefill, where
    keys are reused across queries and the cost is compute).
    """

    context: np.ndarray
    attention_flops: np.ndarray
    indexer_flops: np.ndarray
    bytes: np.ndarray
    indexer_fp8: bool = False

    @property
    def flops(self) -> np.ndarray:
        return self.attention_flops + self.indexer_flops


def _context(context) -> np.ndarray:
    t = np.asarray(context)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"context must be integer key counts >= 1, got dtype {t.dtype}")
    if t.size and t.min() < 1:
        raise ValueError(f"context must be integer key counts >= 1 (the token itself is a key), got min {t.min()}")
    return t.astype(np.float64)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def dense_token_cost(context, config: CostConfig = V32, phase: str = "decode") -> TokenCost:
    """Dense MLA: every token attends to all ``t`` keys.

    Decode: MQA mode, ``2 h t (d_qk + d_v)`` FLOPs and ``t`` latent rows read.
    Prefill: MHA mode, ``2 h t (mha_qk_dim + mha_v_dim)`` FLOPs.
    """
    _check_phase(phase)
    t = _context(context)  # [n]
    widths = config.d_qk + config.d_v if phase == "decode" else config.mha_qk_dim + config.mha_v_dim
    flops = 2.0 * config.heads * t * widths  # [n]
    cache_bytes = t * config.kv_row_bytes if phase == "decode" else np.zeros_like(t)  # [n]
    return TokenCost(t, flops, np.zeros_like(t), cache_bytes, config.indexer_fp8)


def dsa_token_cost(context, config: CostConfig = V32, phase: str = "decode") -> TokenCost:
    """DSA: the indexer scores all ``t`` keys, sparse MLA (MQA mode) attends to ``min(t, k)``.

    FLOPs: ``2 t H_I d_I + 2 h min(t, k) (d_qk + d_v)``. Decode bytes: ``t`` indexer keys and
    scores, ``k`` indices, ``min(t, k)`` latent rows.
    """
    _check_phase(phase)
    t = _context(context)  # [n]
    selected = np.minimum(t, config.topk)  # [n]
    index = 2.0 * config.index_heads * config.index_dim * t  # [n]
    attention = 2.0 * config.heads * selected * (config.d_qk + config.d_v)  # [n]
    if phase == "decode":
        cache_bytes = (t * (config.index_key_bytes + config.score_bytes)
                       + config.topk * config.index_bytes + selected * config.kv_row_bytes)  # [n]
    else:
        cache_bytes = np.zeros_like(t)
    return TokenCost(t, attention, index, cache_bytes, config.indexer_fp8)


def roofline_seconds(cost: TokenCost, hardware: Hardware = H100) -> np.ndarray:
    """A lower bound on time per token: the larger of compute time and memory time at peak rates."""
    index_rate = hardware.fp8_flops_per_s if cost.indexer_fp8 else hardware.bf16_flops_per_s
    compute = cost.attention_flops / hardware.bf16_flops_per_s + cost.indexer_flops / index_rate
    return np.maximum(compute, cost.bytes / hardware.bytes_per_s)


def metric_of(cost: TokenCost, metric: str, hardware: Hardware = H100) -> np.ndarray:
    """One of :data:`METRICS` of a token cost: its FLOPs, its bytes, or its roofline seconds."""
    if metric == "flops":
        return cost.flops
    if metric == "bytes":
        return cost.bytes
    return roofline_seconds(cost, hardware)


def crossover(config: CostConfig = V32, phase: str = "decode", metric: str = "flops", *,
              hardware: Hardware = H100, max_context: int = 1 << 20) -> int | None:
    """The smallest context length from which DSA is cheaper than dense MLA at every longer one.

    Args:
        config: shapes and formats (default V3.2).
        phase: ``"decode"`` or ``"prefill"``.
        metric: ``"flops"``, ``"bytes"`` (decode only) or ``"seconds"`` (roofline at ``hardware``).
        max_context: the longest context searched.

    Returns:
        The context length ``t*`` (keys, the token itself included), or ``None`` if DSA is not
        cheaper at ``max_context``. For V3.2: 2177 keys for decode FLOPs (just above k = 2048:
        the indexer's slope is 1/17 of dense MLA's), 8705 for prefill FLOPs against the cheaper
        MHA-mode dense prefill.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "bytes" and phase != "decode":
        raise ValueError("metric='bytes' is modelled for phase='decode' only (prefill is compute-bound)")
    _check_phase(phase)
    t = np.arange(1, _checks.positive_int("max_context", max_context) + 1)
    dense = metric_of(dense_token_cost(t, config, phase), metric, hardware)  # [n]
    dsa = metric_of(dsa_token_cost(t, config, phase), metric, hardware)  # [n]
    not_cheaper = np.flatnonzero(dsa >= dense)  # positions where DSA does not pay
    if not_cheaper.size == 0:
        return 1
    last = int(not_cheaper[-1])
    return None if last == t.size - 1 else int(t[last + 1])


def cost_table(contexts, config: CostConfig = V32, hardware: Hardware = H100) -> list[dict]:
    """One row per context length: FLOPs, bytes and roofline microseconds, dense vs DSA, both phases."""
    t = np.asarray(contexts)
    rows = []
    dense_d, dsa_d = dense_token_cost(t, config, "decode"), dsa_token_cost(t, config, "decode")
    dense_p, dsa_p = dense_token_cost(t, config, "prefill"), dsa_token_cost(t, config, "prefill")
    us = {name: 1e6 * roofline_seconds(cost, hardware) for name, cost in
          (("dense_decode", dense_d), ("dsa_decode", dsa_d), ("dense_prefill", dense_p), ("dsa_prefill", dsa_p))}
    for i, context in enumerate(t.tolist()):
        rows.append(dict(
            context=int(context),
            dense_decode_gflop=float(dense_d.flops[i] / 1e9), dsa_decode_gflop=float(dsa_d.flops[i] / 1e9),
            dense_decode_mb=float(dense_d.bytes[i] / 1e6), dsa_decode_mb=float(dsa_d.bytes[i] / 1e6),
            dense_prefill_gflop=float(dense_p.flops[i] / 1e9), dsa_prefill_gflop=float(dsa_p.flops[i] / 1e9),
            **{f"{name}_us": float(value[i]) for name, value in us.items()},
        ))
    return rows


# ---------------------------------------------------------------------------- context parallelism
def context_parallel_bytes(world_size: int, tokens_per_rank: int, *, d_qk: int = 576, index_dim: int = 128,
                           kv_element_bytes: int = 2, index_element_bytes: int = 1, index_scale_bytes: int = 4,
                           backward: bool = False) -> dict[str, int]:
    r"""Bytes one rank sends (and receives) in one layer of :func:`dsa_ref.distributed.context_parallel_dsa_attention`.

    Every rank needs the indexer keys and latent rows of the other ``R - 1`` ranks' ``n`` tokens,
    whichever method moves them (a ring all-gather or the explicit ring), and the backward sends
    the rows' gradients back to their owners (a reduce-scatter of ``R · n`` rows):

    .. math::

        B_{\text{index}} = (R-1)\,n\,(d_I\,b_I + b_s), \qquad
        B_{\text{rows}} = (R-1)\,n\,d_{qk}\,b_{kv}, \qquad
        B_{\text{grads}} = (R-1)\,n\,d_{qk}\,b_{kv}

    Divided by the link bandwidth this is the communication term of a layer; the ring hides it
    behind the indexer when a block's transfer takes less time than scoring the block.

    Args:
        world_size: ranks ``R``.
        tokens_per_rank: ``n``.
        d_qk, index_dim: latent row width (576) and indexer key width ``d_I`` (128).
        kv_element_bytes: bytes of a latent element ``b_kv`` (2 for bfloat16; the gradient has the same dtype).
        index_element_bytes, index_scale_bytes: ``b_I`` (1 for fp8 keys) and ``b_s`` (4, a float32
            scale per key; 0 without scales).
        backward: count the gradients' return too.

    Returns:
        ``{"index_keys", "latent_rows", "latent_grads", "total"}`` in bytes (``latent_grads`` is 0
        without ``backward``).
    """
    steps = _checks.positive_int("world_size", world_size) - 1
    n = _checks.int_at_least("tokens_per_rank", tokens_per_rank, 0)
    index = steps * n * (index_dim * index_element_bytes + index_scale_bytes)
    rows = steps * n * d_qk * kv_element_bytes
    grads = rows if backward else 0
    return dict(index_keys=index, latent_rows=rows, latent_grads=grads, total=index + rows + grads)
