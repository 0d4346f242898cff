r"""DSA over several processes with ``torch.distributed``: one causal sequence split across ranks.

**Context parallelism** (:func:`context_parallel_dsa_attention`): a causal sequence of
``S = R · n`` tokens is split over the ``R`` ranks of a process group, ``n`` tokens each. Every
rank passes its own queries and the keys of the same positions; the ranks exchange the indexer
keys (``d_I`` wide, cheap) and the latent rows (576 wide) with collectives, every rank scores
its queries against the earlier positions, keeps the top-k over the *global* positions and runs
sparse MLA over the rows it gathered. The result on every rank equals the rows of the
single-process :func:`dsa_ref.dsa_attention` with causal key ranges over the whole sequence
(bitwise on the NumPy backend). Gradients reach ``q`` and ``kv`` through
:func:`dsa_ref.torch.sparse_mla`; the latent rows' gradients are reduce-scattered back to the
ranks that own them.

Who holds which tokens (:func:`shard_positions`), with the sequence cut into ``R`` chunks of
``n`` (contiguous) or ``2R`` half-chunks of ``n / 2`` (zigzag)::

    contiguous  rank r: [r·n, (r+1)·n)
    zigzag      rank r: half-chunks r and 2R-1-r, i.e. [r·n/2, (r+1)·n/2) ∪ [(2R-1-r)·n/2, (2R-r)·n/2)

Under causal attention the last rank of the contiguous layout does ``R`` times the indexer work
of the first; zigzag pairs an early half-chunk with a late one, so every rank does the same work.

**Head parallelism** (:func:`head_parallel_dsa_attention`): every rank holds the whole sequence
but a slice of the query heads; the indexer is replicated (each rank computes the same indices)
and the only communication is the all-reduce of the replicated latent rows' gradient.

**Bad input never hangs.** Before any other collective, the ranks all-gather a small metadata
tensor (shapes, dtype codes, ``topk``, ``sm_scale``, layout, method, and any local argument error)
and compare it: a rank whose inputs differ from the others' (a different ``n``, ``topk`` or dtype)
or are wrong on their own makes *every* rank raise the same error. A rank that never reaches the
call cannot be detected that way: collectives then wait for the process group's ``timeout``
(``torch.distributed.init_process_group(..., timeout=datetime.timedelta(seconds=...))``; gloo
raises after it, NCCL aborts with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, the default).

**Ragged sequences are refused**: every rank must hold the same ``n`` (even for zigzag); pad the
sequence to a multiple of ``R`` (``2R`` for zigzag) and drop the padded rows' outputs. Padding at
the end is safe under causal attention: no real token sees a later one.

Importing this module imports torch.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import torch as dsa_torch

LAYOUTS = ("contiguous", "zigzag")
METHODS = ("all_gather", "ring")

_OP = "context_parallel_dsa_attention"


# ---------------------------------------------------------------------------- layouts
def shard_positions(world_size: int, rank: int, n: int, layout: str = "contiguous") -> np.ndarray:
    """Global positions of the ``n`` tokens that ``rank`` holds, ascending, int64 ``[n]``.

    ``contiguous``: ``[rank·n, (rank+1)·n)``. ``zigzag`` (``n`` even): the half-chunks ``rank`` and
    ``2·world_size - 1 - rank`` of ``n / 2`` tokens each, in that order.
    """
    world_size, rank, n = int(world_size), int(rank), int(n)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    if n < 1:
        raise ValueError(f"n (tokens per rank) must be >= 1, got {n}")
    if layout == "contiguous":
        return np.arange(rank * n, (rank + 1) * n, dtype=np.int64)
    if layout == "zigzag":
        if n % 2:
            raise ValueError(f"layout='zigzag' needs an even n (two half-chunks per rank), got n={n}")
        half = n // 2
        late = 2 * world_size - 1 - rank
        return np.concatenate([np.arange(rank * half, (rank + 1) * half),
                               np.arange(late * half, (late + 1) * half)]).astype(np.int64)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _rank_major_positions(world_size: int, n: int, layout: str) -> np.ndarray:
    """``[R·n]``: the global position of each row of an all-gather (rank 0's rows, then rank 1's...)."""
    return np.concatenate([shard_positions(world_size, r, n, layout) for r in range(world_size)])


def shard(x, world_size: int, rank: int, layout: str = "contiguous"):
    """The rows of ``x`` (``[S, ...]``, ``S = world_size · n``, numpy or torch) that ``rank`` holds."""
    s = x.shape[0]
    if s % world_size:
        raise ValueError(f"x must have shape [S, ...] with S a multiple of world_size={world_size}, "
                         f"got shape {tuple(x.shape)}")
    positions = shard_positions(world_size, rank, s // world_size, layout)
    if isinstance(x, Tensor):
        return x.index_select(0, torch.from_numpy(positions).to(x.device))
    return np.asarray(x)[positions]


def unshard(parts, layout: str = "contiguous"):
    """The whole sequence ``[S, ...]`` back from every rank's part (a list in rank order, numpy or torch)."""
    world_size = len(parts)
    n = parts[0].shape[0]
    order = np.argsort(_rank_major_positions(world_size, n, layout), kind="stable")
    if isinstance(parts[0], Tensor):
        return torch.cat(list(parts)).index_select(0, torch.from_numpy(order).to(parts[0].device))
    return np.concatenate(parts)[order]


# ---------------------------------------------------------------------------- traffic accounting
@dataclass
class Traffic:
    """What this rank handed to the collectives inside :func:`count_traffic`.

    ``sent`` / ``received``: bytes per purpose (``"metadata"``, ``"index_keys"``, ``"latent_rows"``,
    ``"latent_grads"``), counted as a ring algorithm moves them: an all-gather of ``m`` bytes per
    rank sends and receives ``(R - 1) · m``; a reduce-scatter of ``m`` bytes in all sends
    ``(R - 1) · m / R``; a point-to-point send or receive its tensor's bytes.
    ``held``: bytes of the largest buffers the op allocated, by name.
    """

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)

    def _add(self, book: dict, purpose: str, nbytes: int) -> None:
        book[purpose] = book.get(purpose, 0) + int(nbytes)


_COUNTERS: list[Traffic] = []


@contextlib.contextmanager
def count_traffic():
    """Count the bytes this rank hands to collectives (and the buffers it holds) in the block."""
    traffic = Traffic()
    _COUNTERS.append(traffic)
    try:
        yield traffic
    finally:
        _COUNTERS.remove(traffic)


def _count(purpose: str, sent: int, received: int) -> None:
    for traffic in _COUNTERS:
        traffic._add(traffic.sent, purpose, sent)
        traffic._add(traffic.received, purpose, received)


def _hold(name: str, tensor: Tensor) -> None:
    for traffic in _COUNTERS:
        traffic.held[name] = max(traffic.held.get(name, 0), tensor.numel() * tensor.element_size())


def _wire(t: Tensor) -> Tensor:
    """Gloo and NCCL do not carry float8: send its bytes."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _all_gather(t: Tensor, world_size: int, group, purpose: str) -> Tensor:
    """``[R · rows, ...]``: every rank's ``t`` in rank order."""
    t = t.contiguous()
    out = torch.empty((world_size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(_wire(out), _wire(t), group=group)
    nbytes = t.numel() * t.element_size() * (world_size - 1)
    _count(purpose, nbytes, nbytes)
    return out


def _reduce_scatter(t: Tensor, world_size: int, group, purpose: str) -> Tensor:
    """Sum ``t`` (``[R · rows, ...]``) over ranks; this rank keeps its ``rows`` (rank order)."""
    t = t.contiguous()
    out = torch.empty((t.shape[0] // world_size,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, t, group=group)
    nbytes = t.numel() * t.element_size() * (world_size - 1) // world_size
    _count(purpose, nbytes, nbytes)
    return out


def _all_reduce(t: Tensor, world_size: int, group, purpose: str) -> Tensor:
    t = t.contiguous().clone()
    dist.all_reduce(t, group=group)
    nbytes = 2 * t.numel() * t.element_size() * (world_size - 1) // world_size
    _count(purpose, nbytes, nbytes)
    return t


def held_bytes(world_size: int, rank: int, n: int, *, layout: str = "contiguous", method: str = "all_gather",
               d_qk: int = 576, index_dim: int = 128, kv_element_bytes: int = 2, index_element_bytes: int = 1,
               index_scale_bytes: int = 0, score_bytes: int = 4, key_block: int | None = None) -> dict[str, int]:
    """The largest buffers :func:`context_parallel_dsa_attention` allocates on ``rank``, in bytes, by the
    names :class:`Traffic` records them under (the formulas of its docstring).

    ``score_bytes`` is 4 (float32 scores), or 8 for float64 inputs (which the NumPy reference keeps).
    """
    s = world_size * n
    end = int(shard_positions(world_size, rank, n, layout)[-1]) + 1
    if method == "all_gather":
        return {"gathered index keys": s * index_dim * index_element_bytes,
                "gathered latent rows": s * d_qk * kv_element_bytes,
                "scores": n * end * score_bytes}
    held = {"visible latent rows": end * d_qk * kv_element_bytes,
            "scores": n * min(key_block or n, n) * score_bytes}
    if world_size > 1:
        held["ring blocks in flight"] = n * (index_dim * index_element_bytes + d_qk * kv_element_bytes
                                             + index_scale_bytes)
    return held


# ---------------------------------------------------------------------------- the metadata check
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.uint8,
           torch.int32, torch.int64)
_INPUTS = ("q", "kv", "q_index", "weights", "k_index", "k_scale")
_SCALARS = ("topk", "d_v", "sm_scale", "layout", "method", "key_block", "device type")
_MESSAGE_BYTES = 384
_NOT_GIVEN, _NOT_A_TENSOR = -1, -2


def _describe(x) -> list[int]:
    """``[dtype code, ndim, dim 0, dim 1, dim 2]`` of an input (codes for None and non-tensors)."""
    if x is None:
        return [_NOT_GIVEN, 0, 0, 0, 0]
    if not isinstance(x, Tensor):
        return [_NOT_A_TENSOR, 0, 0, 0, 0]
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    dims = list(x.shape[:3]) + [0] * (3 - min(x.ndim, 3))
    return [code, x.ndim] + dims


def _code_name(code: int) -> str:
    if code == _NOT_GIVEN:
        return "None"
    if code == _NOT_A_TENSOR:
        return "not a tensor"
    return str(_DTYPES[code]).replace("torch.", "") if code < len(_DTYPES) else "other dtype"


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _metadata_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(op: str, group, inputs: dict, scalars: list[int], local_error: Exception | None) -> None:
    """All-gather the inputs' description and any local error; raise the same error on every rank.

    Every rank reaches this collective, whatever its inputs, so a wrong rank cannot leave the
    others waiting in a later collective.
    """
    world_size = dist.get_world_size(group)
    row = []
    for name in _INPUTS:
        row += _describe(inputs.get(name))
    row += scalars
    message = b"" if local_error is None else str(local_error).encode()[:_MESSAGE_BYTES]
    kind = 0 if local_error is None else (2 if isinstance(local_error, TypeError) else 1)
    row += [kind, len(message)] + list(message) + [0] * (_MESSAGE_BYTES - len(message))
    mine = torch.tensor(row, dtype=torch.int64, device=_metadata_device(group))
    table = _all_gather(mine, world_size, group, "metadata").view(world_size, -1).cpu().numpy()

    error_at = 5 * len(_INPUTS) + len(scalars)
    for rank in range(world_size):
        if table[rank, error_at]:
            length = int(table[rank, error_at + 1])
            text = bytes(table[rank, error_at + 2:error_at + 2 + length].astype(np.uint8).tolist()).decode(
                errors="replace")
            error = TypeError if table[rank, error_at] == 2 else ValueError
            raise error(f"{op}: rank {rank}: {text}")

    differences = []
    for i, name in enumerate(_INPUTS):
        block = table[:, 5 * i:5 * i + 5]
        if np.any(block[:, 0] != block[0, 0]):
            got = ", ".join(f"rank {r}: {_code_name(int(block[r, 0]))}" for r in range(world_size))
            differences.append(f"{name}.dtype differs ({got})")
        elif np.any(block[:, 1:] != block[0, 1:]):
            got = ", ".join(f"rank {r}: {tuple(int(d) for d in block[r, 2:2 + min(int(block[r, 1]), 3)])}"
                            for r in range(world_size))
            differences.append(f"{name}.shape differs ({got})")
    for j, name in enumerate(_SCALARS[:len(scalars)]):
        column = table[:, 5 * len(_INPUTS) + j]
        if np.any(column != column[0]):
            shown = [struct.unpack("<d", struct.pack("<q", int(v)))[0] if name == "sm_scale" else int(v)
                     for v in column]
            got = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            differences.append(f"{name} differs ({got})")
    if differences:
        raise ValueError(f"{op}: every rank must pass inputs of the same shapes and dtypes and the same "
                         f"arguments (n tokens per rank each, a ragged last chunk is not supported: pad the "
                         f"sequence); " + "; ".join(differences))


def _check_context_parallel_inputs(q, kv, q_index, weights, k_index, k_scale, topk, layout, method, d_v,
                                   key_block) -> None:
    """Local checks, raised as the same error on every rank by :func:`_agree`."""
    layouts = {"q": "[n, h, d_qk]", "kv": "[n, d_qk]", "q_index": "[n, h_i, d_i]", "weights": "[n, h_i]",
               "k_index": "[n, d_i]", "k_scale": "[n]"}
    given = dict(q=q, kv=kv, q_index=q_index, weights=weights, k_index=k_index, k_scale=k_scale)
    for name, x in given.items():
        if x is None and name == "k_scale":
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layouts[name]}, got {type(x).__name__}")
        ndim = layouts[name].count(",") + 1
        if x.ndim != ndim:
            raise ValueError(f"{name} must have shape {layouts[name]} ({ndim} axes), got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"every input must be on one device: q is on {q.device}, {name} on {x.device}")
    n = q.shape[0]
    for name, x in given.items():
        if x is not None and x.shape[0] != n:
            raise ValueError(f"{name} must have shape {layouts[name]} with n={n} (q's tokens on this rank), "
                             f"got shape {tuple(x.shape)}")
    if n < 1:
        raise ValueError(f"q must hold at least one token per rank, got shape {tuple(q.shape)}")
    if kv.dtype == torch.uint8:
        raise TypeError("kv is uint8 (the packed FP8 cache): context parallelism exchanges and differentiates "
                        "the latent rows, pass them in a float dtype [n, d_qk]")
    if kv.shape[1] != q.shape[2]:
        raise ValueError(f"kv must have shape [n, d_qk] with d_qk={q.shape[2]} (q's d_qk), got shape {tuple(kv.shape)}")
    if weights.shape[1] != q_index.shape[1] or k_index.shape[1] != q_index.shape[2]:
        raise ValueError(f"weights [n, h_i] and k_index [n, d_i] must match q_index {tuple(q_index.shape)}, "
                         f"got {tuple(weights.shape)} and {tuple(k_index.shape)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 1 <= d_v <= q.shape[2]:
        raise ValueError(f"d_v must be an int in [1, d_qk={q.shape[2]}], got {d_v!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag' needs an even n (two half-chunks per rank), got q of shape {tuple(q.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if key_block is not None and (isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1):
        raise ValueError(f"key_block must be None or an int >= 1, got {key_block!r}")


# ---------------------------------------------------------------------------- the latent rows' exchange
class _VisibleRows(torch.autograd.Function):
    """``kv`` of the whole visible prefix ``[0, end)`` from every rank's ``kv``; backward: the
    prefix's gradient padded to ``S``, reordered by owner and reduce-scattered to the owners."""

    @staticmethod
    def forward(ctx, kv, exchange):
        ctx.exchange = exchange
        return exchange.visible_rows(kv.detach())

    @staticmethod
    def backward(ctx, d_visible):
        return ctx.exchange.owners_gradient(d_visible), None


class _Exchange:
    """The plan of one call: who holds what, and the collectives that move it."""

    def __init__(self, group, world_size: int, rank: int, n: int, layout: str):
        self.group, self.world_size, self.rank, self.n, self.layout = group, world_size, rank, n, layout
        self.positions = shard_positions(world_size, rank, n, layout)  # [n]
        self.end = int(self.positions[-1]) + 1  # keys [0, end) are visible to some query of this rank
        self.rank_major = _rank_major_positions(world_size, n, layout)  # [R·n]
        self.ring_rows = None  # the ring fills the visible rows while it scores

    def by_position(self, gathered: Tensor) -> Tensor:
        """Rows of an all-gather (rank order) put in position order, cut to the visible prefix."""
        order = np.argsort(self.rank_major, kind="stable")[:self.end]
        return gathered.index_select(0, torch.from_numpy(order).to(gathered.device))

    def visible_rows(self, kv: Tensor) -> Tensor:
        if self.ring_rows is not None:
            return self.ring_rows
        gathered = _all_gather(kv, self.world_size, self.group, "latent_rows")  # [R·n, d_qk]
        _hold("gathered latent rows", gathered)
        return self.by_position(gathered)  # [end, d_qk]

    def owners_gradient(self, d_visible: Tensor) -> Tensor:
        s = self.world_size * self.n
        d_all = d_visible.new_zeros((s,) + tuple(d_visible.shape[1:]))  # [S, d_qk]
        d_all[:self.end] = d_visible
        rank_order = torch.from_numpy(self.rank_major).to(d_visible.device)
        return _reduce_scatter(d_all.index_select(0, rank_order), self.world_size, self.group, "latent_grads")


# ---------------------------------------------------------------------------- the selection
def _merge_topk(best_scores: Tensor, best_positions: Tensor, scores: Tensor, positions: Tensor, topk: int):
    """The ``topk`` best of two candidate sets, ordered as :func:`dsa_ref.reference.topk_indices`:
    descending score, ties to the lower position, ``-1`` (score ``-inf``) past the selectable ones."""
    all_scores = torch.cat([best_scores, scores], dim=1)  # [n, m]
    all_positions = torch.cat([best_positions, positions], dim=1)  # [n, m]
    # Two stable sorts make the lexicographic order (-score, position); unselectable slots go last.
    by_position = torch.sort(all_positions, dim=1, stable=True).indices
    all_scores, all_positions = all_scores.gather(1, by_position), all_positions.gather(1, by_position)
    sort_key = torch.where(all_positions >= 0, -all_scores, torch.full_like(all_scores, float("inf")))
    by_score = torch.sort(sort_key, dim=1, stable=True).indices[:, :topk]
    return all_scores.gather(1, by_score), all_positions.gather(1, by_score)


def _block_candidates(q_index, weights, keys, key_scale, key_positions: np.ndarray, query_positions: np.ndarray,
                      topk: int, backend):
    """Scores of this rank's queries against one block of keys (ascending positions), its top-k as
    ``(scores, global positions)``, or None when no query sees any key of the block."""
    key_end = np.searchsorted(key_positions, query_positions, side="right")  # [n]   keys at positions <= the query's
    if key_end.max() == 0:
        return None
    device = q_index.device
    key_end = torch.from_numpy(key_end.astype(np.int32)).to(device)
    key_start = torch.zeros_like(key_end)
    scores = dsa_torch.lightning_indexer(q_index, weights, keys, key_start=key_start, key_end=key_end,
                                         k_scale=key_scale, backend=backend)  # [n, block]
    _hold("scores", scores)
    local = dsa_torch.topk_indices(scores, topk, backend=backend).long()  # [n, topk]   block rows, -1 padding
    valid = local >= 0
    safe = local.clamp(min=0)
    block_positions = torch.from_numpy(key_positions).to(device)
    candidate_scores = torch.where(valid, scores.gather(1, safe), scores.new_full(safe.shape, float("-inf")))
    candidate_positions = torch.where(valid, block_positions[safe], torch.full_like(safe, -1))
    return candidate_scores, candidate_positions


def _ring(exchange: _Exchange, q_index, weights, k_index, k_scale, kv, topk: int, key_block: int | None,
          overlap: bool, backend):
    """Pass every rank's (indexer keys, latent rows) block around the ring; score each block while the
    next one is in flight, merge the top-k, keep the visible latent rows. Returns the indices."""
    world_size, rank, group = exchange.world_size, exchange.rank, exchange.group
    n = exchange.n
    block = [t.contiguous() for t in (k_index, kv, k_scale) if t is not None]
    visible = kv.new_empty((exchange.end,) + tuple(kv.shape[1:]))  # [end, d_qk]
    _hold("visible latent rows", visible)
    best_scores = q_index.new_empty((n, 0), dtype=torch.float32)
    best_positions = torch.empty((n, 0), dtype=torch.int64, device=q_index.device)
    send_to, receive_from = (rank + 1) % world_size, (rank - 1) % world_size
    purposes = ("index_keys", "latent_rows", "index_keys")

    for step in range(world_size):
        source = (rank - step) % world_size
        key_positions = shard_positions(world_size, source, n, exchange.layout)  # [n]
        pending, incoming = [], None
        if step < world_size - 1:
            incoming = [torch.empty_like(t) for t in block]
            _hold("ring blocks in flight", torch.cat([t.reshape(-1).view(torch.uint8) for t in incoming]))
            ops = []
            # One tag per tensor of the block: gloo matches messages by (peer, tag), and a receive
            # must never take the other tensor's message.
            for tag, (outgoing, receiving, purpose) in enumerate(zip(block, incoming, purposes)):
                ops.append(dist.P2POp(dist.isend, _wire(outgoing), group=group, group_peer=send_to, tag=tag))
                ops.append(dist.P2POp(dist.irecv, _wire(receiving), group=group, group_peer=receive_from, tag=tag))
                nbytes = outgoing.numel() * outgoing.element_size()
                _count(purpose, nbytes, nbytes)
            pending = dist.batch_isend_irecv(ops)
            if not overlap:
                for work in pending:
                    work.wait()
                pending = []  # a gloo send or receive waited twice blocks forever

        keys, rows = block[0], block[1]
        key_scale = block[2] if k_scale is not None else None
        seen = key_positions < exchange.end
        if seen.any():
            visible[torch.from_numpy(key_positions[seen]).to(kv.device)] = rows[torch.from_numpy(seen).to(kv.device)]
        width = key_block or n
        for start in range(0, n, width):
            part = slice(start, min(start + width, n))
            candidates = _block_candidates(q_index, weights, keys[part], None if key_scale is None else key_scale[part],
                                           key_positions[part], exchange.positions, topk, backend)
            if candidates is not None:
                best_scores, best_positions = _merge_topk(best_scores, best_positions, *candidates, topk)

        for work in pending:
            work.wait()
        if incoming is not None:
            block = incoming

    exchange.ring_rows = visible
    # Every query sees its own block, so at least one merge ran and the result has topk columns.
    return best_positions.to(torch.int32)


# ---------------------------------------------------------------------------- the ops
def context_parallel_dsa_attention(q: Tensor, kv: Tensor, q_index: Tensor, weights: Tensor, k_index: Tensor, *,
                                   topk: int, group=None, layout: str = "contiguous", method: str = "all_gather",
                                   k_scale: Tensor | None = None, sm_scale: float | None = None, d_v: int = 512,
                                   key_block: int | None = None, ring_overlap: bool = True, backend=None):
    r"""Causal DSA attention of one sequence split over the ranks of ``group``: this rank's rows.

    Each of the ``R`` ranks passes its ``n`` tokens of one causal sequence of ``S = R · n`` tokens
    (which ones: :func:`shard_positions`): their queries and the keys of the same positions. The
    result equals the rows of these positions of
    ``dsa_ref.dsa_attention(..., key_start=0, key_end=position + 1)`` over the whole sequence
    (bitwise on the NumPy backend, within the kit's tolerance on GPU backends); ``indices`` are
    global positions. Every rank of ``group`` must call it with the same shapes, dtypes and
    arguments; otherwise every rank raises the same ``ValueError`` (see the module docstring).

    Methods (the same bytes move in both; they differ in memory and overlap):

    * ``"all_gather"``, the readable reference: all-gather the indexer keys and latent rows of the
      whole sequence, score this rank's queries against the visible prefix, top-k, sparse MLA.
    * ``"ring"``: pass each rank's block of keys and rows to the next rank ``R - 1`` times with
      ``batch_isend_irecv``; while the next block is in flight, score this block (in slices of
      ``key_block`` keys) and merge its top-k into the running one. The score matrix never exceeds
      ``[n, key_block]``.

    Bytes each rank sends (and receives) per call, with ``b_I``, ``b_s``, ``b_kv`` the bytes of an
    indexer-key element, a key scale (0 without ``k_scale``) and a latent element
    (:func:`dsa_ref.cost.context_parallel_bytes`):

    .. math::

        B_{\text{index}} = (R-1)\,n\,(d_I b_I + b_s), \qquad
        B_{\text{rows}} = (R-1)\,n\,d_{qk}\,b_{kv}, \qquad
        B_{\text{grads}} = (R-1)\,n\,d_{qk}\,b_{kv} \ \text{(backward)}

    plus ``(R-1) · 8 · 423`` bytes of metadata (:func:`count_traffic` counts them apart). Memory
    held per rank besides inputs and outputs (:func:`held_bytes`; ``end`` = the last visible
    position + 1: ``(r+1) n`` contiguous, ``(2R-r) n / 2`` zigzag):

    * all-gather: ``S (d_I b_I + b_s)`` keys, ``S d_qk b_kv`` rows, ``4 n · end`` float32 scores;
    * ring: ``end · d_qk b_kv`` visible rows, ``n (d_I b_I + d_qk b_kv + b_s)`` for the block in
      flight (two blocks with the current one), ``4 n · key_block`` scores, ``12 n · 2 topk`` for
      the merge.

    Args:
        q: ``[n, h, d_qk]`` this rank's queries (W_UK absorbed).
        kv: ``[n, d_qk]`` the latent rows of this rank's positions (float; not the packed FP8 cache).
        q_index, weights, k_index: the indexer's ``[n, h_i, d_i]``, ``[n, h_i]``, ``[n, d_i]``.
        topk: keys each query keeps, ``>= 1``.
        group: the process group (default: the world).
        layout: ``"contiguous"`` or ``"zigzag"`` (``n`` even): see :func:`shard_positions`.
        method: ``"all_gather"`` or ``"ring"``.
        k_scale: ``[n]`` per-key scale of fp8 indexer keys, optional.
        sm_scale, d_v: as for :func:`dsa_ref.sparse_mla` (default ``d_qk ** -0.5``, 512).
        key_block: the ring's key slice per indexer call (default ``n``).
        ring_overlap: ``False`` waits for each transfer before scoring (to measure the
            communication share; the result is the same).
        backend: a backend name; default the active one.

    Returns:
        ``(out [n, h, d_v], lse [n, h], indices [n, topk])``, float32 (float64 for float64
        inputs) and int32; ``out`` and ``lse`` are differentiable with respect to ``q`` and ``kv``.
        Every rank must run the backward (it reduce-scatters the rows' gradient).

    Raises:
        ValueError, TypeError: on every rank, when any rank's inputs are wrong or differ from the others'.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local_error = None
    try:
        _check_context_parallel_inputs(q, kv, q_index, weights, k_index, k_scale, topk, layout, method, d_v,
                                       key_block)
        if world_size * q.shape[0] > 2**31 - 1:
            raise ValueError(f"the sequence of {world_size} x {q.shape[0]} tokens exceeds int32 positions")
    except (TypeError, ValueError) as error:
        local_error = error
    d_qk = q.shape[-1] if isinstance(q, Tensor) and q.ndim == 3 else 0
    scale = (d_qk ** -0.5 if d_qk else 0.0) if sm_scale is None else float(sm_scale)
    scalars = [topk if isinstance(topk, int) else -1, d_v if isinstance(d_v, int) else -1, _float_bits(scale),
               LAYOUTS.index(layout) if layout in LAYOUTS else -1, METHODS.index(method) if method in METHODS else -1,
               key_block or 0, 1 if isinstance(q, Tensor) and q.is_cuda else 0]
    _agree(_OP, group, dict(q=q, kv=kv, q_index=q_index, weights=weights, k_index=k_index, k_scale=k_scale),
           scalars, local_error)

    n = q.shape[0]
    exchange = _Exchange(group, world_size, rank, n, layout)
    q_index, weights, k_index = q_index.detach(), weights.detach(), k_index.detach()
    k_scale = None if k_scale is None else k_scale.detach()
    if method == "all_gather":
        gathered_keys = _all_gather(k_index, world_size, group, "index_keys")  # [S, d_i]
        _hold("gathered index keys", gathered_keys)
        keys = exchange.by_position(gathered_keys)  # [end, d_i]
        scales = None
        if k_scale is not None:
            scales = exchange.by_position(_all_gather(k_scale, world_size, group, "index_keys"))  # [end]
        key_end = torch.from_numpy((exchange.positions + 1).astype(np.int32)).to(q.device)  # [n]   causal
        scores = dsa_torch.lightning_indexer(q_index, weights, keys, key_start=torch.zeros_like(key_end),
                                             key_end=key_end, k_scale=scales, backend=backend)  # [n, end]
        _hold("scores", scores)
        indices = dsa_torch.topk_indices(scores, topk, backend=backend)  # [n, topk]   global positions
        del scores
    else:
        indices = _ring(exchange, q_index, weights, k_index, k_scale, kv.detach(), topk, key_block, ring_overlap,
                        backend)
    visible = _VisibleRows.apply(kv, exchange)  # [end, d_qk]
    out, lse = dsa_torch.sparse_mla(q, visible, indices, sm_scale=scale, d_v=d_v, backend=backend)
    return out, lse, indices


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks (each rank's heads add theirs)."""

    @staticmethod
    def forward(ctx, x, group, world_size):
        ctx.group, ctx.world_size = group, world_size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.world_size, ctx.group, "latent_grads"), None, None


def head_parallel_dsa_attention(q: Tensor, kv: Tensor, q_index: Tensor, weights: Tensor, k_index: Tensor, *,
                                topk: int, group=None, k_scale: Tensor | None = None, sm_scale: float | None = None,
                                d_v: int = 512, backend=None):
    r"""Causal DSA attention with the query heads split over the ranks of ``group``.

    Every rank holds the whole causal sequence of ``S`` tokens: ``kv`` and the indexer's inputs
    are replicated (each rank computes the same top-k), ``q`` is this rank's ``h / R`` heads. The
    forward moves nothing but the metadata; the backward all-reduces the latent rows' gradient,
    ``2 (R-1)/R · S d_qk b_kv`` bytes per rank (each rank's heads contribute their share).

    Args:
        q: ``[S, h_local, d_qk]`` this rank's heads; the others as for
            :func:`context_parallel_dsa_attention`, over all ``S`` tokens.

    Returns:
        ``(out [S, h_local, d_v], lse [S, h_local], indices [S, topk])``, this rank's heads of the
        single-process causal :func:`dsa_ref.dsa_attention`.
    """
    world_size = dist.get_world_size(group)
    local_error = None
    try:
        _check_context_parallel_inputs(q, kv, q_index, weights, k_index, k_scale, topk, "contiguous", "all_gather",
                                       d_v, None)
    except (TypeError, ValueError) as error:
        local_error = error
    d_qk = q.shape[-1] if isinstance(q, Tensor) and q.ndim == 3 else 0
    scale = (d_qk ** -0.5 if d_qk else 0.0) if sm_scale is None else float(sm_scale)
    scalars = [topk if isinstance(topk, int) else -1, d_v if isinstance(d_v, int) else -1, _float_bits(scale)]
    _agree("head_parallel_dsa_attention", group,
           dict(q=q, kv=kv, q_index=q_index, weights=weights, k_index=k_index, k_scale=k_scale), scalars, local_error)
    s = q.shape[0]
    key_end = torch.arange(1, s + 1, dtype=torch.int32, device=q.device)  # [S]   causal
    shared = _ReplicatedInput.apply(kv, group, world_size) if kv.requires_grad else kv
    return dsa_torch.dsa_attention(q, shared, q_index, weights, k_index, topk=topk,
                                   key_start=torch.zeros_like(key_end), key_end=key_end, k_scale=k_scale,
                                   sm_scale=scale, d_v=d_v, backend=backend)
