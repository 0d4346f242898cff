"""Valid input problems for each op, built from a seed: shared by the hypothesis strategies, the
GPU tests at real shapes, the benchmarks and the demo.

Every builder takes a ``numpy.random.Generator`` and plain parameters, and returns a problem
whose ``inputs`` are NumPy arrays in the dtype under test, ready for the public ops. The
awkward cases the peers have tripped on are switches here: ragged and empty key ranges, rows with
fewer valid keys than ``topk``, exact-zero score plateaus, adversarial invalid indices,
duplicates, non-contiguous inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsa_ref import interop
from dsa_ref.reference import causal_key_ranges, pack_kv_cache_fp8, quantize_fp8

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
RANGE_KINDS = ("full", "causal", "ragged")
INDEX_DISTRIBUTIONS = ("uniform", "recent")
#: DeepSeek-V3.2's softmax scale: the MHA width (128 + 64) ** -0.5 times YaRN's mscale ** 2, with
#: mscale = 0.1 * 1.0 * ln(40) + 1 for its rope factor 40 (not the MQA width's 576 ** -0.5).
V32_SM_SCALE = 192**-0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2


@dataclass
class Problem:
    """Inputs of one op call, plus how to hand them to a backend.

    ``strided``: give the backend non-contiguous views (every other element of a larger array
    whose other half is poison: NaN, or INT32_MIN for integers), so a backend that ignores
    strides reads poison and fails.
    """

    op: str
    inputs: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    strided: bool = False

    def native_inputs(self, backend) -> dict[str, Any]:
        """The inputs as the backend's arrays (non-contiguous when ``strided``)."""
        return {name: _native(backend, value, self.strided) if isinstance(value, np.ndarray) else value
                for name, value in self.inputs.items()}

    def describe(self) -> str:
        """The op with every argument: arrays as shape:dtype, other values as they are."""
        arguments = []
        for name, value in self.inputs.items():
            if isinstance(value, np.ndarray):
                arguments.append(f"{name}={tuple(value.shape)}:{value.dtype}")
            else:
                arguments.append(f"{name}={value!r}")
        arguments += [f"{name}=None" for name in _DEFAULTED_ARGUMENTS.get(self.op, ()) if name not in self.inputs]
        features = "".join(f", {name}={value!r}" for name, value in self.params.items())
        return f"{self.op}({', '.join(arguments)}; dtype={self.dtype}{features}, strided={self.strided})"


#: Keyword arguments a builder leaves out of ``inputs`` when they take the op's default.
_DEFAULTED_ARGUMENTS = {"sparse_mla": ("sm_scale",), "dsa_attention": ("sm_scale",)}


def _sm_scale_argument(sm_scale: float | None) -> dict[str, float]:
    # Left out when None, so that callers may add their own sm_scale to ``**problem.inputs``.
    return {} if sm_scale is None else {"sm_scale": float(sm_scale)}


def _native(backend, x: np.ndarray, strided: bool):
    if not strided or x.ndim == 0 or x.shape[-1] == 0:
        return backend.to_native(x)
    padded = np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    if x.dtype == np.uint8:
        padded[..., 1::2] = 0x7F  # NaN in e4m3
    elif np.issubdtype(x.dtype, np.integer):
        padded[..., 1::2] = INT32_MIN
    else:
        padded[..., 1::2] = np.nan
    return backend.to_native(padded)[..., ::2]


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(np.float32).astype(interop.NUMPY_DTYPES[dtype])


def key_ranges(rng: np.random.Generator, s_q: int, s_kv: int, kind: str, empty_fraction: float = 0.0):
    """``(key_start, key_end)`` int32: every key (``full``), ``causal`` (queries are the last s_q
    positions; needs s_q <= s_kv, else falls back to ragged), or random ``ragged`` ranges; then
    ``empty_fraction`` of the rows get an empty range."""
    if kind == "causal" and s_q <= s_kv:
        start, end = causal_key_ranges(s_q, s_kv)
    elif kind == "full":
        start, end = np.zeros(s_q, np.int32), np.full(s_q, s_kv, np.int32)
    else:
        bounds = np.sort(rng.integers(0, s_kv + 1, size=(s_q, 2)), axis=1)  # [s_q, 2]
        start, end = bounds[:, 0].astype(np.int32), bounds[:, 1].astype(np.int32)
    empty = rng.random(s_q) < empty_fraction  # [s_q]
    end = np.where(empty, start, end).astype(np.int32)
    return start.astype(np.int32), end


def indexer_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h_i: int, d_i: int,
                    dtype: str = "float32", ranges: str = "full", empty_fraction: float = 0.0,
                    plateau: bool = False, strided: bool = False) -> Problem:
    """Lightning-indexer inputs. ``dtype="float8_e4m3fn"`` quantizes q per (token, head) and k per
    token, folds q's scales into the weights and passes k's as ``k_scale`` (the official path).
    ``plateau``: keys non-negative and a third of the queries non-positive, so those rows score
    exactly 0 everywhere visible (ReLU plateaus: ties)."""
    q = rng.standard_normal((s_q, h_i, d_i))  # [s_q, h_i, d_i]
    # Keys of different norms, as real ones have: fp8 keys then get per-key scales far apart.
    k = rng.standard_normal((s_kv, d_i)) * rng.lognormal(0.0, 1.0, size=(s_kv, 1))  # [s_kv, d_i]
    weights = rng.standard_normal((s_q, h_i)) * (h_i * d_i) ** -0.5  # [s_q, h_i]
    if plateau:
        k = np.abs(k)
        flat_rows = rng.random(s_q) < 1 / 3  # [s_q]
        q[flat_rows] = -np.abs(q[flat_rows])
    key_start, key_end = key_ranges(rng, s_q, s_kv, ranges, empty_fraction)
    k_scale = None
    if dtype == "float8_e4m3fn":
        q, q_scale = quantize_fp8(q, block=d_i)  # [s_q, h_i, d_i], [s_q, h_i, 1]
        k, k_scale_blocks = quantize_fp8(k, block=d_i)  # [s_kv, d_i], [s_kv, 1]
        weights = weights * q_scale[..., 0]  # [s_q, h_i]
        k_scale = k_scale_blocks[:, 0].astype(np.float32)  # [s_kv]
    else:
        q, k = _cast(q, dtype), _cast(k, dtype)
    inputs = dict(q=q, weights=weights.astype(np.float32), k=k, key_start=key_start, key_end=key_end,
                  k_scale=k_scale)
    return Problem("lightning_indexer", inputs, dict(ranges=ranges, plateau=plateau), dtype, strided)


def topk_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, topk: int, masked_fraction: float = 0.2,
                 plateau: bool = False, near_ties: bool = False, nan_fraction: float = 0.0,
                 strided: bool = False) -> Problem:
    """Scores for top-k: ``masked_fraction`` of them ``-inf``; with ``plateau`` they take only a few
    distinct values (heavy ties, many exact zeros); with ``near_ties`` they cluster around a few
    values, apart by less than bfloat16 (or float16) resolves, so a select that compares rounded
    scores picks a worse key; ``nan_fraction`` of them NaN (never selected)."""
    scores = rng.standard_normal((s_q, s_kv)).astype(np.float32)  # [s_q, s_kv]
    if plateau:
        scores = np.maximum(np.round(scores * 2) / 2, 0).astype(np.float32)  # few values, many exact 0
    if near_ties:
        offsets = rng.uniform(-1e-3, 1e-3, size=(s_q, s_kv))  # [s_q, s_kv]   below bf16's 2^-8 relative step
        scores = ((np.round(scores * 2) / 2 + 1.0) * (1 + offsets)).astype(np.float32)
    scores[rng.random((s_q, s_kv)) < masked_fraction] = -np.inf
    scores[rng.random((s_q, s_kv)) < nan_fraction] = np.nan
    return Problem("topk_indices", dict(scores=scores, topk=topk), dict(plateau=plateau, near_ties=near_ties),
                   "float32", strided)


def selected_indices(rng: np.random.Generator, *, s_q: int, s_kv: int, topk: int, distribution: str = "uniform",
                     causal: bool = True) -> np.ndarray:
    """int32 ``[s_q, topk]`` distinct key indices per query, ``-1`` where fewer keys are visible.

    ``uniform``: uniform without replacement over the visible keys ``[0, t]`` (query i at position
    t = s_kv - s_q + i when ``causal``, else all keys). ``recent``: half the slots go to the most
    recent visible keys, the rest uniformly to the older ones (the locality real indexers show).
    """
    visible = np.arange(s_kv - s_q + 1, s_kv + 1) if causal and s_q <= s_kv else np.full(s_q, s_kv)  # [s_q]
    indices = np.full((s_q, topk), -1, np.int32)  # [s_q, topk]
    step = max(1, 2**24 // max(1, s_kv))
    for begin in range(0, s_q, step):
        rows = slice(begin, min(s_q, begin + step))
        keys = rng.random((rows.stop - begin, s_kv))  # [c, s_kv]   random priority of each key
        position = np.arange(s_kv)[None, :]  # [1, s_kv]
        if distribution == "recent":
            recent = position >= (visible[rows, None] - topk // 2)  # [c, s_kv]
            keys = np.where(recent, keys - 1.0, keys)  # recent keys win first
        keys = np.where(position < visible[rows, None], keys, np.inf)  # [c, s_kv]
        kept = min(topk, s_kv)
        chosen = np.argsort(keys, axis=1)[:, :kept] if kept == s_kv else np.argpartition(keys, kept - 1, axis=1)[:, :kept]
        chosen_keys = np.take_along_axis(keys, chosen, axis=1)  # [c, kept]
        indices[rows, :kept] = np.where(np.isfinite(chosen_keys), chosen, -1)
    return indices


def sparse_mla_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h: int, d_qk: int, d_v: int, topk: int,
                       dtype: str = "bfloat16", distribution: str = "uniform", causal: bool = True,
                       invalid_fraction: float = 0.0, duplicate_fraction: float = 0.0,
                       topk_length: bool = False, attn_sink: bool = False, packed_fp8: bool = False,
                       logit_scale: float = 1.0, sm_scale: float | None = None, strided: bool = False) -> Problem:
    """Sparse-MLA inputs. ``invalid_fraction`` of the slots get adversarial invalid indices from
    {INT32_MIN, -1, s_kv, INT32_MAX}; ``duplicate_fraction`` repeat another slot's valid index;
    ``packed_fp8`` hands kv over as the 656-byte FP8 cache (forces d_qk = 576); ``sm_scale`` is
    passed on as given (None: the op's default, d_qk ** -0.5)."""
    if packed_fp8:
        d_qk = 576
    q = rng.standard_normal((s_q, h, d_qk)) * logit_scale  # [s_q, h, d_qk]
    kv = rng.standard_normal((s_kv, d_qk))  # [s_kv, d_qk]
    indices = selected_indices(rng, s_q=s_q, s_kv=s_kv, topk=topk, distribution=distribution, causal=causal)
    if duplicate_fraction > 0 and topk > 1:
        copy = rng.random((s_q, topk)) < duplicate_fraction  # [s_q, topk]
        source = rng.integers(0, topk, size=(s_q, topk))  # [s_q, topk]
        indices = np.where(copy, np.take_along_axis(indices, source, axis=1), indices).astype(np.int32)
    if invalid_fraction > 0:
        invalid = rng.random((s_q, topk)) < invalid_fraction  # [s_q, topk]
        adversarial = rng.choice(np.array([INT32_MIN, -1, s_kv, INT32_MAX], np.int64), size=(s_q, topk))
        indices = np.where(invalid, adversarial, indices).astype(np.int32)
    inputs: dict[str, Any] = dict(q=_cast(q, dtype), indices=indices, d_v=d_v, **_sm_scale_argument(sm_scale))
    inputs["kv"] = pack_kv_cache_fp8(kv) if packed_fp8 else _cast(kv, dtype)
    inputs["topk_length"] = rng.integers(0, topk + 1, size=s_q).astype(np.int32) if topk_length else None
    inputs["attn_sink"] = rng.standard_normal(h).astype(np.float32) if attn_sink else None
    params = dict(distribution=distribution, invalid_fraction=invalid_fraction, packed_fp8=packed_fp8,
                  duplicate_fraction=duplicate_fraction, logit_scale=logit_scale)
    return Problem("sparse_mla", inputs, params, dtype, strided)


def dsa_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h: int, d_qk: int, d_v: int, h_i: int, d_i: int,
                topk: int, dtype: str = "bfloat16", index_dtype: str | None = None, ranges: str = "causal",
                sm_scale: float | None = None, strided: bool = False) -> Problem:
    """Inputs of a whole DSA step: indexer inputs (in ``index_dtype``, default ``dtype``; fp8 ones
    carry ``k_scale``) plus main-attention q and kv; ``sm_scale`` as in :func:`sparse_mla_problem`."""
    indexer = indexer_problem(rng, s_q=s_q, s_kv=s_kv, h_i=h_i, d_i=d_i, dtype=index_dtype or dtype, ranges=ranges)
    q = _cast(rng.standard_normal((s_q, h, d_qk)), dtype)  # [s_q, h, d_qk]
    kv = _cast(rng.standard_normal((s_kv, d_qk)), dtype)  # [s_kv, d_qk]
    ix = indexer.inputs
    inputs = dict(q=q, kv=kv, q_index=ix["q"], weights=ix["weights"], k_index=ix["k"], topk=topk,
                  key_start=ix["key_start"], key_end=ix["key_end"], k_scale=ix["k_scale"], d_v=d_v,
                  **_sm_scale_argument(sm_scale))
    return Problem("dsa_attention", inputs, dict(ranges=ranges, index_dtype=index_dtype or dtype), dtype, strided)


# ---------------------------------------------------------------------------- training ops
def _adversarial_slots(rng: np.random.Generator, indices: np.ndarray, s_kv: int, invalid_fraction: float,
                       duplicate_fraction: float) -> np.ndarray:
    """Duplicates of other slots' indices, then invalid indices from {INT32_MIN, -1, s_kv, INT32_MAX}."""
    s_q, topk = indices.shape
    if duplicate_fraction > 0 and topk > 1:
        copy = rng.random((s_q, topk)) < duplicate_fraction  # [s_q, topk]
        source = rng.integers(0, topk, size=(s_q, topk))  # [s_q, topk]
        indices = np.where(copy, np.take_along_axis(indices, source, axis=1), indices)
    if invalid_fraction > 0:
        invalid = rng.random((s_q, topk)) < invalid_fraction  # [s_q, topk]
        adversarial = rng.choice(np.array([INT32_MIN, -1, s_kv, INT32_MAX], np.int64), size=(s_q, topk))
        indices = np.where(invalid, adversarial, indices)
    return indices.astype(np.int32)


def unread_rows(indices: np.ndarray, s_kv: int, topk_length=None) -> np.ndarray:
    """bool ``[s_kv]``: rows that no valid slot reads (their gradient must be exactly 0)."""
    from dsa_ref.reference import valid_slots

    valid = valid_slots(indices, s_kv, topk_length)  # [s_q, topk]
    read = np.zeros(s_kv + 1, bool)  # [s_kv + 1]   the last entry absorbs the invalid slots
    read[np.where(valid, indices, s_kv).reshape(-1)] = True
    return ~read[:s_kv]


def sparse_mla_backward_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h: int, d_qk: int, d_v: int,
                                topk: int, dtype: str = "bfloat16", distribution: str = "uniform", causal: bool = True,
                                invalid_fraction: float = 0.0, duplicate_fraction: float = 0.0,
                                topk_length: bool = False, attn_sink: bool = False, d_lse: bool = False,
                                logit_scale: float = 1.0, sm_scale: float | None = None, unread_nan: bool = False,
                                deterministic: bool = False, strided: bool = False) -> Problem:
    """Inputs of sparse MLA's backward: a :func:`sparse_mla_problem` (never the packed cache, which has
    no gradient), its reference ``out`` and ``lse``, a random ``d_out`` and optionally ``d_lse``.
    ``unread_nan`` fills the rows of kv that no valid slot reads with NaN: a backend that reads them
    (or writes into them) shows it. ``deterministic``: the check runs the op in deterministic mode
    and requires two runs to be bitwise equal."""
    from dsa_ref import reference

    forward = sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                 distribution=distribution, causal=causal, invalid_fraction=invalid_fraction,
                                 duplicate_fraction=duplicate_fraction, topk_length=topk_length, attn_sink=attn_sink,
                                 logit_scale=logit_scale, sm_scale=sm_scale)
    inputs = dict(forward.inputs)
    if unread_nan:
        kv = inputs["kv"].copy()
        kv[unread_rows(inputs["indices"], s_kv, inputs["topk_length"])] = np.nan
        inputs["kv"] = kv
    out, lse = reference.sparse_mla(**inputs)  # [s_q, h, d_v], [s_q, h]
    inputs["out"], inputs["lse"] = out, lse
    inputs["d_out"] = rng.standard_normal(out.shape).astype(np.float32)  # [s_q, h, d_v]
    inputs["d_lse"] = rng.standard_normal(lse.shape).astype(np.float32) if d_lse else None  # [s_q, h]
    params = dict(forward.params, unread_nan=unread_nan, d_lse=d_lse, deterministic=deterministic)
    return Problem("sparse_mla_backward", inputs, params, dtype, strided)


def attention_target_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h: int, d_qk: int, topk: int,
                             dtype: str = "bfloat16", distribution: str = "uniform", causal: bool = True,
                             invalid_fraction: float = 0.0, duplicate_fraction: float = 0.0,
                             topk_length: bool = False, packed_fp8: bool = False, logit_scale: float = 1.0,
                             sm_scale: float | None = None, strided: bool = False) -> Problem:
    """Inputs of the indexer's target: a :func:`sparse_mla_problem` (the packed cache included) and its
    reference ``lse``."""
    from dsa_ref import reference

    d_v = 512 if packed_fp8 else d_qk
    forward = sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                 distribution=distribution, causal=causal, invalid_fraction=invalid_fraction,
                                 duplicate_fraction=duplicate_fraction, topk_length=topk_length,
                                 packed_fp8=packed_fp8, logit_scale=logit_scale, sm_scale=sm_scale)
    inputs = {name: value for name, value in forward.inputs.items() if name not in ("d_v", "attn_sink")}
    _, inputs["lse"] = reference.sparse_mla(**forward.inputs)
    return Problem("attention_target", inputs, forward.params, dtype, strided)


def indexer_loss_problem(rng: np.random.Generator, *, s_q: int, s_kv: int, h_i: int, d_i: int, topk: int,
                         dtype: str = "float32", sparse: bool = True, ranges: str = "causal",
                         invalid_fraction: float = 0.0, duplicate_fraction: float = 0.0,
                         empty_target_fraction: float = 0.0, key_scale: bool = False, unread_nan: bool = False,
                         backward: bool = False, deterministic: bool = False, strided: bool = False) -> Problem:
    """Inputs of the indexer loss (``backward``: of its backward, with a random ``d_loss``).

    ``sparse``: the sparse stage (eq. 4) over ``indices`` (adversarial ones included); else the dense
    warm-up (eq. 3) over the ``ranges`` kind's key ranges. The target is non-negative with exact zeros,
    puts mass on invalid slots and outside the ranges too (which the loss must drop), and
    ``empty_target_fraction`` of its rows are all zero (those queries contribute nothing).
    ``key_scale`` gives float keys a per-key ``k_scale`` too (fp8 keys always carry theirs).
    ``unread_nan`` fills the keys no entry may score with NaN."""
    base = indexer_problem(rng, s_q=s_q, s_kv=s_kv, h_i=h_i, d_i=d_i, dtype=dtype, ranges=ranges)
    inputs = {"q_index": base.inputs["q"], "weights": base.inputs["weights"], "k_index": base.inputs["k"],
              "k_scale": base.inputs["k_scale"]}
    if key_scale and inputs["k_scale"] is None:
        inputs["k_scale"] = rng.uniform(0.25, 4.0, s_kv).astype(np.float32)  # [s_kv]
    if sparse:
        indices = selected_indices(rng, s_q=s_q, s_kv=s_kv, topk=topk, causal=ranges == "causal")
        inputs["indices"] = _adversarial_slots(rng, indices, s_kv, invalid_fraction, duplicate_fraction)
        entries = topk
        allowed = (inputs["indices"] >= 0) & (inputs["indices"] < s_kv)  # [s_q, topk]
        scored = np.zeros(s_kv + 1, bool)
        scored[np.where(allowed, inputs["indices"], s_kv).reshape(-1)] = True
        scored = scored[:s_kv]
    else:
        inputs["key_start"], inputs["key_end"] = base.inputs["key_start"], base.inputs["key_end"]
        entries = s_kv
        key = np.arange(s_kv)
        scored = ((key[None, :] >= inputs["key_start"][:, None]) & (key[None, :] < inputs["key_end"][:, None])).any(0)
    target = rng.random((s_q, entries)) * (rng.random((s_q, entries)) < 0.7)  # [s_q, entries]
    target[rng.random(s_q) < empty_target_fraction] = 0.0
    inputs["target"] = target.astype(np.float32)
    if unread_nan and not scored.all():
        k = inputs["k_index"].copy()
        k[~scored] = np.nan
        inputs["k_index"] = k
    op = "indexer_loss"
    if backward:
        inputs["d_loss"] = rng.standard_normal(s_q).astype(np.float32)
        op = "indexer_loss_backward"
    params = dict(sparse=sparse, ranges=ranges, invalid_fraction=invalid_fraction, key_scale=key_scale,
                  duplicate_fraction=duplicate_fraction, unread_nan=unread_nan, deterministic=deterministic)
    return Problem(op, inputs, params, dtype, strided)


def shuffled_block_table(rng: np.random.Generator, context_lens, block_size: int, num_blocks: int,
                         max_blocks: int | None = None) -> np.ndarray:
    """int32 ``[b, max_blocks]``: each sequence's blocks drawn without replacement, in shuffled order,
    from ``range(num_blocks)`` (as a paged cache hands them out), ``-1`` past its context."""
    needed = [-(-int(n) // block_size) for n in np.asarray(context_lens).tolist()]  # blocks each sequence uses
    if sum(needed) > num_blocks:
        raise ValueError(f"num_blocks={num_blocks} cannot hold contexts needing {sum(needed)} blocks")
    max_blocks = max(needed, default=0) if max_blocks is None else max_blocks
    free = rng.permutation(num_blocks)
    table = np.full((len(needed), max_blocks), -1, np.int64)  # [b, max_blocks]
    start = 0
    for sequence, count in enumerate(needed):
        table[sequence, :count] = free[start:start + count]
        start += count
    return table.astype(np.int32)


def paged_indexer_problem(rng: np.random.Generator, *, batch: int, next_n: int, h_i: int, d_i: int,
                          block_size: int, max_blocks: int, dtype: str = "float8_e4m3fn", spare_blocks: int = 0,
                          unallocated_fraction: float = 0.0, max_context_len: bool = False,
                          strided: bool = False) -> Problem:
    """A decode step's indexer over a paged fp8 key cache (DeepGEMM's layout): ``batch`` sequences of
    ragged lengths in ``[next_n, max_blocks * block_size]``, their blocks scattered over a shuffled cache
    with ``spare_blocks`` nobody owns, ``-1`` past each context, and ``unallocated_fraction`` of the
    table's other entries pointing outside the cache (holes: their keys score -inf)."""
    from dsa_ref.reference import pack_indexer_cache_fp8

    max_blocks = max(max_blocks, -(-next_n // block_size))  # room for the step's own queries
    lengths = rng.integers(next_n, max_blocks * block_size + 1, size=batch)  # [b]
    num_blocks = int((-(-lengths // block_size)).sum()) + spare_blocks
    table = shuffled_block_table(rng, lengths, block_size, num_blocks, max_blocks).astype(np.int64)
    holes = (rng.random(table.shape) < unallocated_fraction) & (table >= 0)
    table = np.where(holes, rng.choice(np.array([-1, num_blocks, INT32_MAX]), size=table.shape), table)
    keys = rng.standard_normal((num_blocks * block_size, d_i)) * rng.uniform(0.1, 4.0, (num_blocks * block_size, 1))
    q = rng.standard_normal((batch * next_n, h_i, d_i))  # [b next_n, h_i, d_i]
    weights = rng.standard_normal((batch * next_n, h_i)) * (h_i * d_i) ** -0.5  # [b next_n, h_i]
    if dtype == "float8_e4m3fn":
        q, q_scale = quantize_fp8(q, block=d_i)  # [b next_n, h_i, d_i], [b next_n, h_i, 1]
        weights = weights * q_scale[..., 0]
    else:
        q = _cast(q, dtype)
    inputs = dict(q=q, weights=weights.astype(np.float32), k_cache=pack_indexer_cache_fp8(keys, block_size),
                  block_table=table.astype(np.int32), context_lens=lengths.astype(np.int32), next_n=next_n)
    if max_context_len:
        inputs["max_context_len"] = int(max_blocks * block_size + rng.integers(0, 5))
    params = dict(block_size=block_size, spare_blocks=spare_blocks, unallocated_fraction=unallocated_fraction)
    return Problem("lightning_indexer_paged", inputs, params, dtype, strided)
