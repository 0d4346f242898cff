"""Peers' kernels as dsa-ref backends, so that the conformance kit checks them like ours.

Each adapter is a small :class:`~dsa_ref.Backend` that imports a peer's function from *your*
installation (nothing of the peers is shipped or copied here), translates dsa-ref's token-packed
arguments to the peer's layout and conventions, calls it, and translates the result back. Every
translation is explicit and named; what the peer cannot take is refused with a reason that carries
the value (``not_supported_reasons``), and a peer that does not import says which module paths were
tried (``unavailable_reasons``).

| adapter | peer function | dsa-ref op |
|---|---|---|
| :class:`FlashMLA` | ``flash_mla_sparse_fwd`` (bf16 prefill), ``flash_mla_with_kvcache`` (FP8 decode) | ``sparse_mla`` |
| :class:`DeepGEMM` | ``fp8_mqa_logits`` | ``lightning_indexer`` (and the composed paged op) |
| :class:`TileLangSparseMLA` | TileLang's example ``sparse_mla_fwd_interface`` | ``sparse_mla`` |
| :class:`TileLangIndexer` | TileLang's example ``mqa_attn_return_logits_interface`` | ``lightning_indexer`` |
| :class:`TileLangTopK` | TileLang's example ``tl_topk`` | ``topk_indices`` |
| :class:`SglangTopK` | ``sgl_kernel.fast_topk`` | ``topk_indices`` |

They are not registered (``dsa-ref info`` lists dsa-ref's backends only); name them by path::

    dsa-ref check --backend module://dsa_ref.testing.adapters:FlashMLA --ops sparse_mla

(``--ops`` with the adapter's :attr:`PeerBackend.checked_ops`: an op the peer does not implement is
refused on every input, which the kit counts as a failure.) On a GPU, ``tools/peers_check.py`` runs
every adapter whose peer imports and writes the results page's JSON.

The conformance kit draws small shapes (a few heads, head dims up to 40). Where the peer accepts
only its model's shapes, ``pad_to_kernel_shapes=True`` (the default) pads with zeros that leave the
math unchanged: extra query heads (sliced off), extra head-dim columns (a zero column adds nothing
to a dot product; V's columns go first, the rest of K into the RoPE columns), extra index slots
marked invalid. With ``False`` those inputs are refused instead, so that only native shapes run.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from dsa_ref import interop
from dsa_ref.backend import Backend
from dsa_ref.reference.formats import KV_CACHE_FP8_BYTES as PACKED_ROW_BYTES
from dsa_ref.reference.formats import KV_LATENT_DIM as LATENT_DIM
from dsa_ref.reference.formats import KV_ROPE_DIM as ROPE_DIM

#: ``log2(e)``: a natural-log lse times this is the base-2 lse.
LOG2_E = math.log2(math.e)
#: MLA's MQA row (DeepSeek-V3.2): 512 latent dims (V) and 64 RoPE dims, one definition with the FP8 cache's.
MLA_DIM = LATENT_DIM + ROPE_DIM


class PeerBackend(Backend):
    """What every adapter shares: finding the peer, the device, padding helpers.

    Args:
        module: where the peer's functions live: a module object, or a dotted module path; None
            tries :attr:`module_paths` in order. A module path is imported with ``sys.path`` as it
            is, after ``search_path`` (e.g. TileLang's example folder) when one is given.
        device: the torch device the adapter's arrays go to (default ``"cuda"``).
        search_path: a folder put first on ``sys.path`` before importing (TileLang's examples).
    """

    array_kind = "torch"
    devices = ("cuda",)
    #: Module paths tried, in order, when no ``module`` is given.
    module_paths: ClassVar[tuple[str, ...]] = ()
    #: The function names the peer module must have.
    required_functions: ClassVar[tuple[str, ...]] = ()
    #: The ops this adapter implements: what ``check_backend(..., ops_to_check=)`` should ask for.
    checked_ops: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: Any = None, *, device: str = "cuda", search_path: str | None = None,
                 pad_to_kernel_shapes: bool = True):
        self._module_choice = module
        self._device_name = device
        self._search_path = search_path
        self.pad_to_kernel_shapes = pad_to_kernel_shapes
        self._peer: Any = None
        self._import_failures: list[str] | None = None
        self.devices = (str(device).split(":")[0],)

    # ------------------------------------------------------------------ the peer
    def peer(self) -> Any:
        """The peer's module (imported on first use); None if none imports."""
        if self._import_failures is None:
            self._import_failures = []
            candidates = [self._module_choice] if self._module_choice is not None else list(self.module_paths)
            if self._search_path and self._search_path not in sys.path:
                sys.path.insert(0, self._search_path)
            for candidate in candidates:
                try:
                    module = importlib.import_module(candidate) if isinstance(candidate, str) else candidate
                except Exception as failure:  # noqa: BLE001 - any import failure is a reason, never a crash
                    self._import_failures.append(f"{candidate}: {type(failure).__name__}: {failure}")
                    continue
                missing = [name for name in self.required_functions if not callable(getattr(module, name, None))]
                if missing:
                    label = candidate if isinstance(candidate, str) else getattr(candidate, "__name__", candidate)
                    self._import_failures.append(f"{label}: has no {', '.join(missing)}")
                    continue
                self._peer = module
                break
        return self._peer

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        try:
            import torch
        except ModuleNotFoundError:
            return ["torch is not installed (pip install torch)"]
        if self.peer() is None:
            tried = "; ".join(self._import_failures or ["no module path to try"])
            reasons.append(f"{type(self).__name__}'s peer does not import here (tried {tried})")
        if self.devices[0] == "cuda" and not torch.cuda.is_available():
            reasons.append("device=cuda but torch sees no CUDA device")
        return reasons

    def device(self):
        import torch

        return torch.device(self._device_name)

    def _function(self, name: str) -> Callable:
        return getattr(self.peer(), name)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _valid_slots(indices, s_kv: int, topk_length):
    """bool ``[s_q, topk]``: the slots dsa-ref's spec reads (in range, within ``topk_length``)."""
    import torch

    valid = (indices >= 0) & (indices < s_kv)  # [s_q, topk]
    if topk_length is not None:
        slot = torch.arange(indices.shape[1], device=indices.device)[None, :]  # [1, topk]
        valid &= slot < topk_length.to(indices.device).reshape(-1, 1)
    return valid


def _mla_layout(q, kv, d_v: int, heads: int):
    """q ``[s_q, heads, 576]`` and kv ``[s_kv, 576]`` whose dot products and first ``d_v`` V columns
    equal those of ``q`` ``[s_q, h, d_qk]`` and ``kv`` ``[s_kv, d_qk]``: V's columns at ``[0, d_v)``,
    the rest of K at ``[512, 512 + d_qk - d_v)``, zeros elsewhere and in the extra heads."""
    import torch

    s_q, h, d_qk = q.shape
    rest = d_qk - d_v
    q_wide = torch.zeros((s_q, heads, MLA_DIM), dtype=q.dtype, device=q.device)  # [s_q, heads, 576]
    kv_wide = torch.zeros((kv.shape[0], MLA_DIM), dtype=kv.dtype, device=kv.device)  # [s_kv, 576]
    q_wide[:, :h, :d_v], q_wide[:, :h, LATENT_DIM:LATENT_DIM + rest] = q[..., :d_v], q[..., d_v:]
    kv_wide[:, :d_v], kv_wide[:, LATENT_DIM:LATENT_DIM + rest] = kv[:, :d_v], kv[:, d_v:]
    return q_wide, kv_wide


def _mla_shape_reasons(q, kv, d_v: int, head_multiple: int, pad: bool, peer: str) -> list[str]:
    """Why ``q``/``kv``/``d_v`` cannot reach a kernel of 576-wide rows, 512-wide V, heads in multiples."""
    h, d_qk = q.shape[1], q.shape[2]
    packed = interop.dtype_name(kv) == "uint8"
    reasons = []
    if (not pad or packed) and (d_qk != MLA_DIM or d_v != LATENT_DIM):
        reasons.append(f"d_qk={d_qk}, d_v={d_v} ({peer} takes d_qk={MLA_DIM}, d_v={LATENT_DIM} only)")
    if not pad and h % head_multiple:
        reasons.append(f"h={h} ({peer} takes heads in multiples of {head_multiple})")
    if pad and not packed and (d_v > LATENT_DIM or d_qk - d_v > ROPE_DIM):
        reasons.append(f"d_qk={d_qk}, d_v={d_v} (padding to {peer}'s rows needs d_v <= {LATENT_DIM} and "
                       f"d_qk - d_v <= {ROPE_DIM})")
    return reasons


# ---------------------------------------------------------------------------- FlashMLA
class FlashMLA(PeerBackend):
    """FlashMLA's sparse kernels as ``sparse_mla``: bf16 ``kv`` goes to the sparse prefill
    (``flash_mla_sparse_fwd``), the packed 656-byte FP8 cache to the sparse decode
    (``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``).

    Translations, each explicit:

    * layout: ``kv [s_kv, 1, 576]`` and ``indices [s_q, 1, topk]`` for the prefill; for the decode
      the cache ``[blocks, 64, 1, 656]`` (the token rows padded with zero rows to whole pages; the
      kit's row indices are then the cache slots ``block * 64 + offset``), one query per batch entry
      ``q [s_q, 1, h, 576]``, ``indices [s_q, 1, topk]``, and ``lse [b, h, s_q]`` transposed back;
    * ``lse``: the peer's base (``prefill_lse_base``, ``decode_lse_base``) is converted to natural
      log, and the peer's ``empty_lse`` (``+inf``) for a row with no valid slot becomes dsa-ref's
      ``-inf``. The defaults are what sglang-kernel 0.4.3's SM90 build returned on the H200
      (prefill base 2, decode natural log); FlashMLA's own README of 2026-09 says natural log for both;
    * ``topk`` is padded with ``-1`` slots to a multiple of :attr:`topk_block` (decode) or
      :attr:`prefill_topk_block` (prefill); invalid indices of
      any value are passed as ``-1``; ``topk_length`` is passed to the prefill and applied to the
      decode as ``-1`` slots;
    * shapes: see the module's ``pad_to_kernel_shapes``.

    Refused: dtypes other than bfloat16, ``attn_sink`` with the decode cache (kept apart so that a
    sink bug is not hidden behind the cache's), shapes that cannot be padded to 576 / 512.

    Module paths tried: ``flash_mla`` (FlashMLA's package), ``sgl_kernel.flash_mla`` (sglang-kernel's
    build). Both export FlashMLA's interface: ``flash_mla_sparse_fwd``, ``flash_mla_with_kvcache``,
    ``get_mla_metadata``.
    """

    name = "flashmla"
    description = "FlashMLA's sparse prefill and FP8 decode (the user's installation), through dsa-ref's adapter"
    module_paths = ("flash_mla", "sgl_kernel.flash_mla")
    required_functions = ("flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata")
    checked_ops = ("sparse_mla",)
    supported_dtypes = {"sparse_mla": frozenset({"bfloat16"})}
    #: Heads per kernel tile (FlashMLA's sparse kernels take h_q 64 or 128).
    head_multiple: ClassVar[int] = 64
    #: Index slots per block the kernels read (FlashMLA's ``B_TOPK``).
    topk_block: ClassVar[int] = 64
    #: The prefill kernel's topk multiple: its first phase takes two blocks at a time (sglang-kernel
    #: 0.4.3 asserts ``params.topk % (2*B_TOPK) == 0``; measured on the H200, 2026-12-02).
    prefill_topk_block: ClassVar[int] = 128
    #: Tokens per page of FlashMLA's decode cache.
    page_size: ClassVar[int] = 64

    def __init__(self, module: Any = None, *, prefill_lse_base: str | int = 2, decode_lse_base: str | int = "e",
                 empty_lse: float = math.inf, device: str = "cuda", pad_to_kernel_shapes: bool = True):
        super().__init__(module, device=device, pad_to_kernel_shapes=pad_to_kernel_shapes)
        for label, base in (("prefill_lse_base", prefill_lse_base), ("decode_lse_base", decode_lse_base)):
            if isinstance(base, bool) or base not in ("e", 2):
                raise ValueError(f'{label} must be "e" (natural log) or 2, got {base!r}')
        if isinstance(empty_lse, bool) or empty_lse not in (math.inf, -math.inf):
            raise ValueError(f"empty_lse must be math.inf or -math.inf (the peer's lse of a row with no valid "
                             f"slot), got {empty_lse!r}")
        self.prefill_lse_base, self.decode_lse_base, self.empty_lse = prefill_lse_base, decode_lse_base, empty_lse

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)
        q, kv = inputs.get("q"), inputs.get("kv")
        if op != "sparse_mla" or q is None or kv is None:
            return reasons
        reasons += _mla_shape_reasons(q, kv, inputs.get("d_v") or q.shape[-1], self.head_multiple,
                                      self.pad_to_kernel_shapes, "FlashMLA")
        indices = inputs.get("indices")
        if not self.pad_to_kernel_shapes and indices is not None:
            block = self.topk_block if interop.dtype_name(kv) == "uint8" else self.prefill_topk_block
            if indices.shape[1] % block:
                reasons.append(f"topk={indices.shape[1]} (FlashMLA's {'decode' if block == self.topk_block else 'prefill'}"
                               f" reads indices in multiples of {block})")
        if interop.dtype_name(kv) == "uint8" and inputs.get("attn_sink") is not None:
            reasons.append("attn_sink with the FP8 decode cache (checked through the prefill only)")
        return reasons

    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        import torch

        s_q, h, _ = q.shape
        s_kv = kv.shape[0]
        heads = _round_up(h, self.head_multiple)
        decode = interop.dtype_name(kv) == "uint8"
        valid = _valid_slots(indices, s_kv, None)  # [s_q, topk]
        topk = _round_up(max(indices.shape[1], 1), self.topk_block if decode else self.prefill_topk_block)
        slots = torch.full((s_q, topk), -1, dtype=torch.int32, device=q.device)  # [s_q, topk]   -1: invalid
        slots[:, :indices.shape[1]] = torch.where(valid, indices, -1).to(torch.int32)
        if decode:
            out, lse = self._decode(q, kv, slots, topk_length, sm_scale, heads)
            base = self.decode_lse_base
        else:
            q_wide, kv_wide = _mla_layout(q, kv, d_v, heads)
            sink = None
            if attn_sink is not None:
                sink = torch.zeros(heads, dtype=torch.float32, device=q.device)
                sink[:h] = attn_sink.float()
            length = None if topk_length is None else topk_length.to(torch.int32).contiguous()  # the peer asserts it
            out, _max_logits, lse = self._function("flash_mla_sparse_fwd")(
                q_wide, kv_wide[:, None, :], slots[:, None, :], sm_scale, LATENT_DIM, sink, length)
            base = self.prefill_lse_base
        out, lse = out[:, :h, :d_v].float(), lse[:, :h].float()  # [s_q, h, d_v], [s_q, h]
        lse = torch.where(lse == self.empty_lse, torch.full_like(lse, -math.inf), lse)
        if base == 2:
            lse = lse / LOG2_E
        return out.contiguous(), lse.contiguous()

    def _decode(self, q, kv, slots, topk_length, sm_scale: float, heads: int):
        import torch

        s_q, h, d_qk = q.shape
        if topk_length is not None:
            slot = torch.arange(slots.shape[1], device=slots.device)[None, :]
            slots = torch.where(slot < topk_length.to(slots.device).reshape(-1, 1), slots, -1)
        pages = _round_up(max(kv.shape[0], 1), self.page_size)
        cache = torch.zeros((pages, PACKED_ROW_BYTES), dtype=torch.uint8, device=kv.device)  # rows past s_kv: unread
        cache[:kv.shape[0]] = kv
        cache = cache.view(torch.float8_e4m3fn).view(pages // self.page_size, self.page_size, 1, PACKED_ROW_BYTES)
        q_wide = torch.zeros((s_q, 1, heads, d_qk), dtype=q.dtype, device=q.device)  # one query per batch entry
        q_wide[:, 0, :h] = q
        cache_seqlens = torch.full((s_q,), kv.shape[0], dtype=torch.int32, device=q.device)
        metadata, num_splits = self._function("get_mla_metadata")(cache_seqlens, heads, 1, heads, True, slots.shape[1])
        out, lse = self._function("flash_mla_with_kvcache")(
            q_wide, cache, None, cache_seqlens, LATENT_DIM, metadata, num_splits, softmax_scale=sm_scale,
            causal=False, is_fp8_kvcache=True, indices=slots[:, None, :])  # [s_q, 1, heads, 512], [s_q, heads, 1]
        return out[:, 0], lse[:, :, 0]


# ---------------------------------------------------------------------------- the fp8 indexers
class DeepGEMM(PeerBackend):
    """DeepGEMM's ``fp8_mqa_logits`` as ``lightning_indexer`` (the paged op is dsa-ref's composition
    of it: the pages are gathered, then scored by this adapter).

    Translations: ``kv`` is the tuple ``(k fp8 [N, D], k_scale float32 [N])`` (a scale of 1 when the
    problem has none); ``key_start`` / ``key_end`` are ``cu_seqlen_ks`` / ``cu_seqlen_ke`` (int32);
    ``clean_logits=True`` makes the peer write ``-inf`` outside each range, dsa-ref's convention; the
    peer's strided logits are made contiguous. Shapes: heads padded with zero-weight heads to
    :attr:`head_multiple`, ``D`` with zero columns to :attr:`head_dim` (exact: a zero weight or
    column adds nothing). Refused: q or k not float8_e4m3fn (the peer has no other path).
    """

    name = "deepgemm"
    description = "DeepGEMM's fp8_mqa_logits (the user's installation), through dsa-ref's adapter"
    module_paths = ("deep_gemm",)
    required_functions = ("fp8_mqa_logits",)
    checked_ops = ("lightning_indexer",)
    function_name: ClassVar[str] = "fp8_mqa_logits"
    supported_dtypes = {"lightning_indexer": frozenset({"float8_e4m3fn"})}
    #: Indexer head counts come in multiples of this (DeepSeek-V3.2: 64 heads).
    head_multiple: ClassVar[int] = 32
    #: The kernels' head width (DeepSeek-V3.2's d_I).
    head_dim: ClassVar[int] = 128

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)
        q, k = inputs.get("q"), inputs.get("k")
        if op != "lightning_indexer" or q is None or k is None:
            return reasons
        if interop.logical_dtype_name(k) != "float8_e4m3fn":
            reasons.append(f"k.dtype={interop.logical_dtype_name(k)} (the peer takes float8_e4m3fn keys)")
        h_i, d_i = q.shape[1], q.shape[2]
        if d_i > self.head_dim or (not self.pad_to_kernel_shapes and d_i != self.head_dim):
            reasons.append(f"d_i={d_i} (the peer's head width is {self.head_dim})")
        if not self.pad_to_kernel_shapes and h_i % self.head_multiple:
            reasons.append(f"h_i={h_i} (the peer takes heads in multiples of {self.head_multiple})")
        return reasons

    def _call(self, q, k, key_scale, weights, key_start, key_end):
        logits = self._function(self.function_name)(q, (k, key_scale), weights, key_start, key_end, True)
        return logits

    def lightning_indexer(self, q, weights, k, *, key_start, key_end, k_scale):
        import torch

        s_q, h_i, d_i = q.shape
        heads = _round_up(h_i, self.head_multiple)
        q_wide = torch.zeros((s_q, heads, self.head_dim), dtype=torch.float32, device=q.device)
        q_wide[:, :h_i, :d_i] = q.float()
        k_wide = torch.zeros((k.shape[0], self.head_dim), dtype=torch.float32, device=k.device)
        k_wide[:, :d_i] = k.float()
        weights_wide = torch.zeros((s_q, heads), dtype=torch.float32, device=q.device)  # extra heads weigh 0
        weights_wide[:, :h_i] = weights.float()
        key_scale = (torch.ones(k.shape[0], dtype=torch.float32, device=k.device) if k_scale is None
                     else k_scale.float().reshape(-1))
        fp8 = torch.float8_e4m3fn  # widening then narrowing an fp8 value, or a zero, is exact
        logits = self._call(q_wide.to(fp8).contiguous(), k_wide.to(fp8).contiguous(), key_scale.contiguous(),
                            weights_wide, key_start.to(torch.int32), key_end.to(torch.int32))
        return logits.float().contiguous()


class TileLangIndexer(DeepGEMM):
    """TileLang's example fp8 indexer, ``mqa_attn_return_logits_interface(q, kv, kv_scales, weights,
    cu_seqlen_ks, cu_seqlen_ke, clean_logits)`` from ``fp8_lighting_indexer.py``, as
    ``lightning_indexer``; translations and refusals as :class:`DeepGEMM`'s (the same interface with
    the keys and scales as two arguments). ``search_path``: the examples' folder (default
    ``$TL_EXAMPLES``)."""

    name = "tilelang-indexer"
    description = "TileLang's example fp8 indexer (the user's TL_EXAMPLES), through dsa-ref's adapter"
    module_paths = ("fp8_lighting_indexer",)
    required_functions = ("mqa_attn_return_logits_interface",)
    function_name = "mqa_attn_return_logits_interface"
    head_multiple = 1

    def __init__(self, module: Any = None, *, device: str = "cuda", search_path: str | None = None,
                 pad_to_kernel_shapes: bool = True):
        super().__init__(module, device=device, search_path=search_path or os.environ.get("TL_EXAMPLES"),
                         pad_to_kernel_shapes=pad_to_kernel_shapes)

    def _call(self, q, k, key_scale, weights, key_start, key_end):
        return self._function(self.function_name)(q, k, key_scale, weights, key_start, key_end, True)


# ---------------------------------------------------------------------------- TileLang sparse MLA
class TileLangSparseMLA(PeerBackend):
    """TileLang's example ``sparse_mla_fwd_interface(q, kv, indices, sm_scale)`` (``sparse_mla_fwd.py``)
    as ``sparse_mla``.

    The kernel is causal by construction: query ``s`` of a sequence reads only keys ``<= s`` (a slot
    above is masked), and marks an unused slot with the sentinel ``s_kv``, which it loads before
    masking. The adapter therefore:

    * places the kit's queries at the *last* ``s_q`` positions of the keys (DSA's prefill: query
      ``i`` at key position ``s_kv - s_q + i``), prepending zero query rows that it discards;
    * refuses an index set the kernel cannot express instead of passing it: a valid index above its
      query's position (the value is in the reason), ``s_q > s_kv``, ``topk_length`` is applied as
      sentinel slots;
    * writes the sentinel ``s_kv`` in every invalid slot and appends one zero key row at ``s_kv``, so
      that the kernel's unmasked load stays in bounds;
    * pads ``topk`` with sentinels to a multiple of :attr:`topk_block`, and d_qk / d_v as the module
      describes; the kernel's base-2 ``lse`` becomes natural log; an empty row's ``out`` (0/0) is
      refused rather than guessed: rows with no valid slot are refused.

    Refused too: ``attn_sink`` (the example has none), the packed FP8 cache, dtypes other than bf16.
    ``search_path``: the examples' folder (default ``$TL_EXAMPLES``).
    """

    name = "tilelang-sparse-mla"
    description = "TileLang's example sparse_mla_fwd (the user's TL_EXAMPLES), through dsa-ref's adapter"
    module_paths = ("sparse_mla_fwd",)
    required_functions = ("sparse_mla_fwd_interface",)
    checked_ops = ("sparse_mla",)
    supported_dtypes = {"sparse_mla": frozenset({"bfloat16"})}
    #: Index slots per block of the kernel (its ``block_I``; it asserts ``topk % block_I == 0``).
    topk_block: ClassVar[int] = 64
    #: Heads per block when there are more than 64 (smaller counts are padded by the kernel itself).
    head_multiple: ClassVar[int] = 64
    lse_base: ClassVar[int] = 2

    def __init__(self, module: Any = None, *, device: str = "cuda", search_path: str | None = None,
                 pad_to_kernel_shapes: bool = True):
        super().__init__(module, device=device, search_path=search_path or os.environ.get("TL_EXAMPLES"),
                         pad_to_kernel_shapes=pad_to_kernel_shapes)

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)
        q, kv, indices = inputs.get("q"), inputs.get("kv"), inputs.get("indices")
        if op != "sparse_mla" or q is None or kv is None or indices is None:
            return reasons
        if interop.dtype_name(kv) == "uint8":
            return reasons + ["kv is the packed FP8 cache (TileLang's sparse_mla_fwd reads bf16 rows)"]
        if inputs.get("attn_sink") is not None:
            reasons.append("attn_sink given (TileLang's sparse_mla_fwd has none)")
        h = q.shape[1]
        reasons += _mla_shape_reasons(q, kv, inputs.get("d_v") or q.shape[-1], 1, self.pad_to_kernel_shapes,
                                      "TileLang's sparse_mla_fwd")
        if h > self.head_multiple and h % self.head_multiple and not self.pad_to_kernel_shapes:
            reasons.append(f"h={h} (above {self.head_multiple} heads the kernel takes multiples of "
                           f"{self.head_multiple})")
        s_q, s_kv = q.shape[0], kv.shape[0]
        if s_q > s_kv:
            return reasons + [f"s_q={s_q} > s_kv={s_kv} (the kernel's queries sit at key positions)"]
        host = interop.to_numpy(indices).astype(np.int64)  # [s_q, topk]
        length = inputs.get("topk_length")
        length = None if length is None else interop.to_numpy(length).astype(np.int64)
        valid = (host >= 0) & (host < s_kv)
        if length is not None:
            valid &= np.arange(host.shape[1])[None, :] < length[:, None]
        position = np.arange(s_kv - s_q, s_kv)[:, None]  # [s_q, 1]   query i at key position s_kv - s_q + i
        above = valid & (host > position)
        if above.any():
            row, slot = (int(v) for v in np.argwhere(above)[0])
            reasons.append(f"indices[{row}, {slot}]={host[row, slot]} above query {row}'s causal position "
                           f"{s_kv - s_q + row} (the kernel masks keys above its query)")
        empty = ~valid.any(axis=1)
        if empty.any():
            reasons.append(f"row {int(np.flatnonzero(empty)[0])} has no valid slot (the kernel's out is 0/0 there)")
        return reasons

    def sparse_mla(self, q, kv, indices, *, sm_scale: float, d_v: int, topk_length, attn_sink):
        import torch

        s_q, h, _ = q.shape
        s_kv = kv.shape[0]
        heads = h if h <= self.head_multiple else _round_up(h, self.head_multiple)
        q_wide, kv_wide = _mla_layout(q, kv, d_v, heads)  # [s_q, heads, 576], [s_kv, 576]
        queries = torch.zeros((1, s_kv, heads, MLA_DIM), dtype=q.dtype, device=q.device)  # all key positions
        queries[0, s_kv - s_q:] = q_wide
        keys = torch.zeros((1, s_kv + 1, 1, MLA_DIM), dtype=kv.dtype, device=kv.device)  # row s_kv: the sentinel's
        keys[0, :s_kv, 0] = kv_wide
        valid = _valid_slots(indices, s_kv, topk_length)
        topk = _round_up(indices.shape[1], self.topk_block)
        slots = torch.full((1, s_kv, 1, topk), s_kv, dtype=torch.int32, device=q.device)
        slots[0, s_kv - s_q:, 0, :indices.shape[1]] = torch.where(valid, indices, s_kv).to(torch.int32)
        out, lse = self._function("sparse_mla_fwd_interface")(queries.contiguous(), keys, slots, sm_scale)
        out = out[0, s_kv - s_q:, :h, :d_v].float()  # [s_q, h, d_v]
        lse = lse[0, s_kv - s_q:, :h].float() / LOG2_E  # [s_q, h]   base 2 -> natural log
        return out.contiguous(), lse.contiguous()


# ---------------------------------------------------------------------------- top-k
class _TopKAdapter(PeerBackend):
    """Shared translation of the top-k selectors: NaN (unselectable in dsa-ref's spec, ordered by its
    bits in a radix select) becomes ``-inf``; the row is padded with ``-inf`` columns to at least the
    kernel's ``k``; a returned slot whose score is ``-inf``, or whose index is out of range, becomes
    ``-1``."""

    checked_ops = ("topk_indices",)
    supported_dtypes = {"topk_indices": frozenset({"float32"})}
    #: The ``k`` the kernel selects (None: the requested one).
    kernel_topk: ClassVar[int | None] = None

    def _select(self, scores, topk: int):
        raise NotImplementedError

    def _kernel_k(self, topk: int) -> int:
        """The ``k`` the peer is asked for, at least ``topk``; its best ``topk`` are kept."""
        return self.kernel_topk or topk

    def topk_indices(self, scores, topk: int):
        import torch

        s_q, s_kv = scores.shape
        k = self._kernel_k(topk)
        width = max(s_kv, k)
        padded = torch.full((s_q, width), -math.inf, dtype=torch.float32, device=scores.device)
        padded[:, :s_kv] = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        selected = self._select(padded.contiguous(), k).long()  # [s_q, k]
        in_range = (selected >= 0) & (selected < s_kv)
        picked = torch.where(in_range, padded.gather(1, selected.clamp(0, width - 1)),
                             torch.full_like(selected, -math.inf, dtype=torch.float32))  # [s_q, k]
        selected = torch.where(in_range & (picked > -math.inf), selected, -1)
        if k != topk:
            # The kernel's k is fixed: its set holds the best ``topk``; keep those (by score, then index).
            keys = torch.where(selected >= 0, selected, width)
            selected = selected.gather(1, sorted_by_score_then_index(picked, keys)[:, :topk])
        result = torch.full((s_q, topk), -1, dtype=torch.int32, device=scores.device)
        result[:, :min(topk, selected.shape[1])] = selected[:, :topk].to(torch.int32)
        return result


def sorted_by_score_then_index(scores, keys):
    """Column order of each row: descending score, lower key first on ties (torch, any device)."""
    import torch

    by_key = torch.argsort(keys, dim=1, stable=True)
    by_score = torch.argsort(-scores.gather(1, by_key), dim=1, stable=True)
    return by_key.gather(1, by_score)


class TileLangTopK(_TopKAdapter):
    """TileLang's example radix selector, ``tl_topk(input, starts, ends, topk)`` from
    ``topk_selector.py``, as ``topk_indices`` (each row's range is the whole padded row).
    ``search_path``: the examples' folder (default ``$TL_EXAMPLES``)."""

    name = "tilelang-topk"
    description = "TileLang's example radix top-k (the user's TL_EXAMPLES), through dsa-ref's adapter"
    module_paths = ("topk_selector",)
    required_functions = ("tl_topk",)

    def __init__(self, module: Any = None, *, device: str = "cuda", search_path: str | None = None):
        super().__init__(module, device=device, search_path=search_path or os.environ.get("TL_EXAMPLES"))

    def _kernel_k(self, topk: int) -> int:
        # The example compiles one kernel per k (``T.const("topk")``; the rows are dynamic): asking for
        # the next power of two, at least 16, and keeping the best ``topk`` bounds the compiles a
        # conformance run waits for (a run of 30 examples per op did not finish in 100 s on the H200).
        return 1 << max(4, (max(topk, 1) - 1).bit_length())

    def _select(self, scores, topk: int):
        import torch

        starts = torch.zeros(scores.shape[0], dtype=torch.int32, device=scores.device)
        ends = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int32, device=scores.device)
        return self._function("tl_topk")(scores, starts, ends, topk)


class SglangTopK(_TopKAdapter):
    """sglang-kernel's ``fast_topk(scores, out, lengths, row_starts)`` as ``topk_indices``.

    Its ``k`` is fixed at :attr:`kernel_topk` (2048, DeepSeek-V3.2's): a smaller ``topk`` keeps the
    best of the kernel's set by score, ties to the lower index, so a wrong set fails the check when it
    changes the best ``topk``. ``lengths`` is every row's full width.
    """

    name = "sglang-topk"
    description = "sglang-kernel's fast_topk (the user's installation), through dsa-ref's adapter"
    module_paths = ("sgl_kernel",)
    required_functions = ("fast_topk",)
    kernel_topk = 2048

    def supported_topk_reasons(self, topk: int) -> list[str]:
        return [] if topk <= self.kernel_topk else [f"topk={topk} (fast_topk selects {self.kernel_topk})"]

    def not_supported_reasons(self, op: str, **inputs: Any) -> list[str]:
        reasons = super().not_supported_reasons(op, **inputs)
        if op == "topk_indices" and isinstance(inputs.get("topk"), int):
            reasons += self.supported_topk_reasons(inputs["topk"])
        return reasons

    def _select(self, scores, topk: int):
        import torch

        out = torch.empty((scores.shape[0], topk), dtype=torch.int32, device=scores.device)
        lengths = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int32, device=scores.device)
        self._function("fast_topk")(scores, out, lengths, None)
        return out


#: Every adapter, for tools that run them all.
ADAPTERS: Sequence[type[PeerBackend]] = (FlashMLA, DeepGEMM, TileLangSparseMLA, TileLangIndexer, TileLangTopK,
                                         SglangTopK)
