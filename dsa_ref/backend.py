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

from . import interop

#: The forward ops every backend implements; ``dsa_attention`` is composed from them unless a
#: backend overrides it with a fused path.
FORWARD_OPS = ("lightning_indexer", "topk_indices", "sparse_mla", "dsa_attention")
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
        Examples per op in the test suite's ``ci`` conformance run (None: the profile's).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    array_kind: ClassVar[str] = "numpy"
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    supported_dtypes: ClassVar[Mapping[str, frozenset[str]]] = {}
    tolerances: ClassVar[Mapping[str, Tolerance]] = {}
    #: Examples per op of the ``ci`` conformance profile when run by the test suite; a backend
    #: running on a slow simulator (Triton's CPU interpreter) may ask for fewer. None: the profile's.
    ci_max_examples: ClassVar[int | None] = None

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
        if getattr(type(self), op) is getattr(Backend, op) and op != "dsa_attention":
            return reasons + [f"op={op} is not implemented by this backend"]
        main = _MAIN_INPUT[op]
        supported = self.supported_dtypes.get(op if op != "dsa_attention" else "sparse_mla")
        if supported is not None and main in inputs and inputs[main] is not None:
            got = interop.logical_dtype_name(inputs[main])
            if got not in supported:
                reasons.append(f"{main}.dtype={got} (supported: {', '.join(sorted(supported))})")
        return reasons

    # ------------------------------------------------------------------ arrays
    def device(self) -> Any:
        """Where ``to_native`` puts arrays (a torch device, a cupy device id, or ``None``)."""
        return None

    def to_native(self, x: Any) -> Any:
        """Convert an array of any supported kind to this backend's array type (no copy
        when it already is one, DLPack where a copy can be avoided)."""
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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.array_kind} on {', '.join(self.devices)})>"


#: The argument whose dtype decides whether an op is supported.
_MAIN_INPUT = {
    "lightning_indexer": "q",
    "topk_indices": "scores",
    "sparse_mla": "q",
    "dsa_attention": "q",
    "sparse_mla_backward": "q",
    "attention_target": "q",
    "indexer_loss": "q_index",
    "indexer_loss_backward": "q_index",
}
