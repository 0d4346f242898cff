"""The backend interface: what every implementation of the DSA ops declares and provides.

A backend is a class that computes the three core ops of DeepSeek Sparse Attention
(``lightning_indexer``, ``topk_indices``, ``sparse_mla``) on its own array type, and says,
before it is asked to run, what it can and cannot take (the idea follows xformers' operator
classes). The public functions in :mod:`dsa_ref` validate arguments once for every backend,
fill in defaults, convert arrays to the backend's array type, ask the backend whether it
supports the inputs, call it, and convert the results back to the caller's array type.

A backend therefore receives *validated, normalized* arguments:

* ``key_start`` / ``key_end`` are always integer arrays of shape ``[s_q]``
  with ``0 <= key_start <= key_end <= s_kv``;
* ``sm_scale`` is always a Python float;
* ``topk_length``, ``attn_sink`` and ``k_scale`` are either ``None`` or arrays;
* arrays may be non-contiguous: a backend that needs contiguous memory makes it so.

It must return float32 scores / ``out`` / ``lse`` and int32 indices, as the reference does.

Third-party backends subclass :class:`Backend` and register it in the entry-point group
``dsa_ref.backends`` (see :mod:`dsa_ref.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from . import interop

#: The forward ops every backend implements; ``dsa_attention`` and ``lightning_indexer_paged`` are
#: composed from them unless a backend overrides them with a fused path.
FORWARD_OPS = ("lightning_indexer", "topk_indices", "sparse_mla", "dsa_attention", "lightning_indexer_paged")
#: Ops the base class composes from a backend's other ops, so that every backend has them.
COMPOSED_OPS = ("dsa_attention", "lightning_indexer_paged")
#: The ops that train DSA: sparse MLA's backward, the indexer's target and loss, and its backward.
#: A backend that does not implement one refuses it (:meth:`Backend.not_supported_reasons`).
TRAINING_OPS = ("sparse_mla_backward", "attention_target", "indexer_loss", "indexer_loss_backward")
OPS = FORWARD_OPS + TRAINING_OPS


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's output may be from the float64 reference on the same inputs.

    An element passes when ``|actual - expected| <= atol * scale + rtol * |expected|``,
    where ``scale`` is the largest finite ``|expected|`` of the whole output (so ``atol`` is a
    fraction of the output's magnitude, not an absolute number). See
    :mod:`dsa_ref.testing.tolerances` for the policy and why each number is what it is.
    """

    rtol: float
    atol: float


class Backend:
    """Base class of every DSA backend.

    Class attributes a backend declares:

    name
        Short name users select it by (``DSA_BACKEND=name``).
    description
        One line for ``dsa-ref info``.
    array_kind
        The array library it consumes and returns: ``"numpy"``, ``"torch"`` or ``"cupy"``.
    devices
        Devices it runs on, e.g. ``("cpu",)`` or ``("cuda",)``.
    supported_dtypes
        For each op, the input dtypes (by name: ``"float32"``, ``"bfloat16"``,
        ``"float8_e4m3fn"``, ``"uint8"`` for the packed FP8 KV cache ...) of its main tensor
        (``q`` for the indexer and sparse MLA, ``scores`` for top-k).
    tolerances
        Per input dtype, the :class:`Tolerance` its outputs meet against the reference.
        Missing entries fall back to :data:`dsa_ref.testing.tolerances.DEFAULT_TOLERANCES`.
    ci_max_examples
        Examples per op in the test suite's ``ci`` conformance run (None: the profile's); a
        mapping gives some ops their own count.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    array_kind: ClassVar[str] = "numpy"
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    supported_dtypes: ClassVar[Mapping[str, frozenset[str]]] = {}
    tolerances: ClassVar[Mapping[str, Tolerance]] = {}
    #: Examples per op of the ``ci`` conformance profile when run by the test suite; a backend
    #: running on a slow simulator (Triton's CPU interpreter) may ask for fewer. None: the profile's;
    #: a mapping ``{op: count}``: per op (ops it does not name keep the profile's).
    ci_max_examples: ClassVar[int | Mapping[str, int] | None] = None

    def ci_examples(self, op: str) -> int | None:
        """What :attr:`ci_max_examples` asks for ``op`` (None: the profile's count)."""
        if isinstance(self.ci_max_examples, Mapping):
            return self.ci_max_examples.get(op)
        return self.ci_max_examples

    # ------------------------------------------------------------------ availability
    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all here (missing package, no GPU); ``[]`` if it can.

        Must not raise, and must be cheap enough for ``dsa-ref info``.
        """
        return []

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        """Short reasons, each carrying the offending value, why ``op`` cannot run on ``inputs``.

        The base implementation checks availability and the main tensor's dtype against
        :attr:`supported_dtypes`; backends extend it (``reasons = super()...``) with their
        own limits (head dimension, ``topk`` multiple of a block size, device ...).
        ``inputs`` are the op's arguments by name, as arrays of any supported kind.
        """
        reasons = list(self.unavailable_reasons())
        if op not in OPS:
            return reasons + [f"op={op!r} (known ops: {', '.join(OPS)})"]
        if getattr(type(self), op) is getattr(Backend, op) and op not in COMPOSED_OPS:
            return reasons + [f"op={op} is not implemented by this backend"]
        if op == "lightning_indexer_paged" and getattr(type(self), op) is getattr(Backend, op):
            # The composed op runs this backend's indexer on the gathered fp8 keys: its limits apply.
            return reasons + [reason for reason in self._gathered_indexer_reasons(inputs) if reason not in reasons]
        main = _MAIN_INPUT[op]
        supported = self.supported_dtypes.get(op if op != "dsa_attention" else "sparse_mla")
        if supported is not None and main in inputs and inputs[main] is not None:
            got = interop.logical_dtype_name(inputs[main])
            if got not in supported:
                reasons.append(f"{main}.dtype={got} (supported: {', '.join(sorted(supported))})")
        return reasons

    #: Optional: a method ``(q, kv, indices, topk_length, attn_sink, sm_scale, d_v) -> (out, lse) | None``
    #: that :func:`dsa_ref.torch.sparse_mla` calls first, with torch tensors whose shapes and dtypes it
    #: has checked (``topk_length`` clamped), and that returns torch tensors, or None where it would need
    #: :meth:`to_native`'s conversions (then :meth:`sparse_mla` runs). A backend whose arrays are not
    #: torch's sets it to skip those conversions on the decode path (CupyBackend.sparse_mla_torch).
    sparse_mla_torch = None

    # ------------------------------------------------------------------ arrays
    def device(self) -> Any:
        """Where ``to_native`` puts arrays (a torch device, a cupy device id, or ``None``)."""
        return None

    def to_native(self, x: Any) -> Any:
        """Convert an array of any supported kind to this backend's array type (no copy when it
        already is one, nor between GPU libraries: :func:`dsa_ref.interop.convert`)."""
        return interop.convert(x, self.array_kind, self.device())

    # ------------------------------------------------------------------ the ops
    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        """Indexer scores, float32 ``[s_q, s_kv]``; see :func:`dsa_ref.lightning_indexer`."""
        raise NotImplementedError

    def topk_indices(self, scores, topk: int):
        """int32 ``[s_q, topk]`` indices; see :func:`dsa_ref.topk_indices`.

        May return the selected set in any order within a row; ``-1`` slots may sit anywhere.
        """
        raise NotImplementedError

    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        """``(out float32 [s_q, h, d_v], lse float32 [s_q, h])``; see :func:`dsa_ref.sparse_mla`."""
        raise NotImplementedError

    def sparse_mla_backward(self, q, kv, indices, out, lse, d_out, *, sm_scale: float, d_v: int, topk_length,
                            attn_sink, d_lse, deterministic: bool):
        """``(dq float32 [s_q, h, d_qk], dkv float32 [s_kv, d_qk])``, plus ``d_attn_sink float32 [h]``
        when ``attn_sink`` is given; see :func:`dsa_ref.sparse_mla_backward`. ``kv`` is never the
        packed FP8 cache; ``d_lse`` is None or ``[s_q, h]``. With ``deterministic``, two runs on the
        same inputs must give bitwise-equal results."""
        raise NotImplementedError

    def attention_target(self, q, kv, indices, lse, *, sm_scale: float, topk_length):
        """float32 ``[s_q, topk]``; see :func:`dsa_ref.attention_target`."""
        raise NotImplementedError

    def indexer_loss(self, q_index, weights, k_index, target, *, indices, key_start, key_end, k_scale):
        """float32 ``[s_q]``; see :func:`dsa_ref.indexer_loss`. Either ``indices`` (sparse stage) is an
        array and the key ranges are None, or ``indices`` is None and the key ranges are arrays."""
        raise NotImplementedError

    def indexer_loss_backward(self, q_index, weights, k_index, target, d_loss, *, indices, key_start, key_end,
                              k_scale, deterministic: bool):
        """``(dq_index, dweights, dk_index)`` float32; see :func:`dsa_ref.indexer_loss_backward`."""
        raise NotImplementedError

    def dsa_attention(self, q, kv, q_index, weights, k_index, *, topk: int, key_start, key_end,
                      k_scale, sm_scale: float, d_v: int):
        """Indexer, then top-k, then sparse MLA. Override for a fused path."""
        scores = self.lightning_indexer(q_index, weights, k_index, key_start=key_start,
                                        key_end=key_end, k_scale=k_scale)
        indices = self.topk_indices(scores, topk)
        out, lse = self.sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v,
                                   topk_length=None, attn_sink=None)
        return out, lse, indices

    def reads_pages_in_place(self, q, k_cache) -> bool:
        """Whether :meth:`lightning_indexer_paged` runs a kernel of this backend that reads the pages
        in place for these inputs (one launch for the batch), rather than the composed op below. A
        decode step (:func:`dsa_ref.sparse_decode_step`) takes the paged op then; else it gathers the
        pages itself with device indexing."""
        return False

    def lightning_indexer_paged(self, q, weights, k_cache, block_table, context_lens, *, next_n: int,
                                max_context_len: int):
        """float32 ``[b · next_n, max_context_len]``; see :func:`dsa_ref.lightning_indexer_paged`.

        Composed: for each sequence, gather its fp8 keys and scales out of the paged cache on this
        backend's device (indexing only: no copy of the whole cache, no host synchronization), then
        score them with this backend's :meth:`lightning_indexer` under the step's causal ranges.
        Override for a kernel that reads the pages in place.
        """
        batch, d_i = context_lens.shape[0], q.shape[-1]
        block_size = k_cache.shape[1] // (d_i + 4)
        if batch == 0:
            return self.to_native(np.zeros((0, max_context_len), np.float32))
        pages = _PageGather.build(self.to_native, block_table.shape[1], block_size, d_i, max_context_len)
        first_bound = self.to_native(np.arange(1 - next_n, 1, dtype=np.int64))  # [next_n]   j + 1 - next_n
        key_start = self.to_native(np.zeros(next_n, np.int64))  # [next_n]
        parts = []
        for sequence in range(batch):
            keys, key_scales, present = pages.gather(k_cache, block_table[sequence])  # [L, d_i], [L], [L]
            rows = slice(sequence * next_n, (sequence + 1) * next_n)
            key_end = context_lens[sequence:sequence + 1] + first_bound  # [next_n]   len - next_n + j + 1
            scores = self.lightning_indexer(q[rows], weights[rows], keys, key_start=key_start, key_end=key_end,
                                            k_scale=key_scales)  # [next_n, L]
            scores[:, ~present] = float("-inf")
            parts.append(scores)
        return _concatenate_rows(parts)

    def _gathered_indexer_reasons(self, inputs: Mapping[str, Any]) -> list[str]:
        """This backend's reasons to refuse the indexer on what the composed paged op gives it."""
        q = inputs.get("q")
        if q is None or not interop.is_array(q):
            return []
        d_i = q.shape[-1]
        keys = np.zeros((0, d_i), interop.NUMPY_DTYPES["float8_e4m3fn"])  # the gathered keys' dtype and width
        return self.not_supported_reasons("lightning_indexer", q=q, weights=inputs.get("weights"), k=keys,
                                          k_scale=np.zeros(0, np.float32))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.array_kind} on {', '.join(self.devices)})>"


#: The argument whose dtype decides whether an op is supported.
_MAIN_INPUT = {
    "lightning_indexer": "q",
    "topk_indices": "scores",
    "sparse_mla": "q",
    "dsa_attention": "q",
    "lightning_indexer_paged": "q",
    "sparse_mla_backward": "q",
    "attention_target": "q",
    "indexer_loss": "q_index",
    "indexer_loss_backward": "q_index",
}


class _PageGather:
    """Reads one sequence's keys out of the paged indexer cache (layout: :mod:`dsa_ref.reference.paged`)
    with indexing only, so that it runs on any array library. The byte offsets, which depend on the
    shapes alone, are built once on the host and moved to the backend's device."""

    def __init__(self, logical_block, in_table, value_columns, scale_columns, block_size, d_i):
        self.logical_block, self.in_table = logical_block, in_table  # [L], [L]
        self.value_columns, self.scale_columns = value_columns, scale_columns  # [L, d_i], [L, 4]
        self.block_size, self.d_i = block_size, d_i

    @classmethod
    def build(cls, to_native, max_blocks: int, block_size: int, d_i: int, length: int) -> _PageGather:
        position = np.arange(length)  # [L]
        logical_block = position // block_size  # [L]
        in_table = logical_block < max_blocks  # [L]   positions past the table hold no key
        offset = (position % block_size)[:, None]  # [L, 1]
        value_columns = offset * d_i + np.arange(d_i)  # [L, d_i]   bytes of key t's values in its block
        scale_columns = block_size * d_i + offset * 4 + np.arange(4)  # [L, 4]   bytes of its float32 scale
        return cls(to_native(np.minimum(logical_block, max(max_blocks - 1, 0))), to_native(in_table),
                   to_native(value_columns), to_native(scale_columns), block_size, d_i)

    def gather(self, k_cache, table_row):
        """``(keys fp8 [L, d_i], key_scales float32 [L], present bool [L])`` of one sequence; a position
        whose block is absent (not in ``[0, num_blocks)``) reads block 0 instead and is not present."""
        block = table_row[self.logical_block]  # [L]
        present = self.in_table & (block >= 0) & (block < k_cache.shape[0])  # [L]
        block = (block * present)[:, None]  # [L, 1]   absent positions read block 0, never out of bounds
        keys = _view_bytes_as(k_cache[block, self.value_columns], "float8_e4m3fn")  # [L, d_i]
        key_scales = _view_bytes_as(k_cache[block, self.scale_columns], "float32").reshape(-1)  # [L]
        return keys, key_scales, present


def _view_bytes_as(x, dtype: str):
    """A contiguous uint8 array ``[..., n]`` read as ``dtype`` (fp8 stays a uint8 carrier in cupy)."""
    kind = interop.array_kind(x)
    if kind == "torch":
        import torch

        return x.contiguous().view(getattr(torch, dtype))
    if kind == "cupy":
        import cupy

        return x if dtype == "float8_e4m3fn" else cupy.ascontiguousarray(x).view(cupy.dtype(dtype))
    return np.ascontiguousarray(x).view(interop.NUMPY_DTYPES[dtype])


def _concatenate_rows(parts):
    """Stack arrays of one library along their first axis."""
    if interop.array_kind(parts[0]) == "torch":
        import torch

        return torch.cat(parts)
    if interop.array_kind(parts[0]) == "cupy":
        import cupy

        return cupy.concatenate(parts)
    return np.concatenate(parts)
