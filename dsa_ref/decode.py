"""One DSA decode step of a batch: paged indexer scores, top-k, sparse FP8 attention through the block table.

A serving engine's decode step (DeepSeek-V3.2's inference path, FlashMLA's and DeepGEMM's kernels):

1. the lightning indexer (eq. 1) scores each new query against its sequence's own past tokens, whose
   indexer keys sit in the paged fp8 cache (:func:`dsa_ref.lightning_indexer_paged`);
2. :func:`dsa_ref.topk_indices` keeps the ``topk`` best token positions of each query;
3. the positions become cache slots through the block table (:func:`dsa_ref.slot_indices`);
4. sparse MLA (eq. 2) attends over those slots of the packed 656-byte FP8 KV cache
   (:func:`dsa_ref.sparse_mla`).

The KV cache and the indexer cache are paged alike and share one block table: token ``t`` of
sequence ``b`` is slot ``block_table[b, t // block_size] * block_size + t % block_size`` of both.

On torch tensors the step runs on :mod:`dsa_ref.torch`'s ops and plain torch indexing, all on the
tensors' device, with no host synchronization: values are clamped, never read on the host, so the
whole step can be captured in a ``torch.cuda.CUDAGraph`` and replayed. The indexer runs once per
sequence there (each over its own gathered pages), ``b`` launches that a graph replays at no host
cost. On other arrays (NumPy: the reference path) it runs the public ops, which check values
(:func:`dsa_ref.use_data_checks`).
"""

from __future__ import annotations

from . import _checks, interop, modes, ops, registry
from .backend import Backend
from .reference.formats import KV_CACHE_FP8_BYTES, KV_LATENT_DIM, KV_ROPE_DIM
from .reference.paged import INDEXER_SCALE_BYTES
from .reference.ranges import slot_indices

#: Width of a query of the main attention: the 512 latent dims (W_UK absorbed) and the 64 RoPE dims.
D_QK = KV_LATENT_DIM + KV_ROPE_DIM

_ARRAY_ARGUMENTS = ("q", "kv_cache", "q_index", "weights", "index_cache", "block_table", "context_lens")


def sparse_decode_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, *, topk: int,
                       next_n: int = 1, sm_scale: float | None = None, backend=None):
    r"""One DSA decode step of a batch over paged FP8 caches: indexer scores, top-k, sparse MLA.

    Sequence ``b`` holds ``context_lens[b]`` tokens, this step's included; its ``next_n`` queries
    (``next_n > 1``: multi-token prediction) are its last positions, so query ``j`` sits at position
    ``p = context_lens[b] - next_n + j`` and sees only the tokens ``[0, p]`` (causal, also among the
    step's own queries). For the query in row ``i = b · next_n + j``:

    .. math::

        I_{i,t} = k\_scale_{\mathrm{slot}(b,t)} \sum_h w_{i,h}\,\mathrm{ReLU}(q^I_{i,h} \cdot k^I_{\mathrm{slot}(b,t)})
            \quad (t \le p, \text{ else } -\infty), \qquad
        S_i = \mathrm{top}_{\mathrm{topk}}(I_{i,:}), \qquad
        \mathrm{out}_i = \mathrm{sparse\_mla}(q_i,\ \mathrm{kv},\ \{\mathrm{slot}(b, t) : t \in S_i\})

    with :math:`\mathrm{slot}(b, t) = \mathrm{block\_table}[b, \lfloor t / B \rfloor] \cdot B + t \bmod B`
    (eq. 1, the selection, eq. 2). A token whose block is absent (a table entry ``< 0``, as the ``-1``
    padding past a context, or ``>= num_blocks``) scores ``-inf`` and is never selected or read.

    Args:
        q: ``[b · next_n, h, 576]`` float queries of the main attention (W_UK absorbed), sequence-major.
        kv_cache: uint8 ``[num_blocks · block_size, 656]``, the packed FP8 latent cache
            (:func:`dsa_ref.pack_kv_cache_fp8`) flattened over its blocks, slot order.
        q_index: ``[b · next_n, h_i, d_i]`` indexer queries, float8_e4m3fn or float.
        weights: ``[b · next_n, h_i]`` float per-head indexer weights.
        index_cache: uint8 ``[num_blocks, block_size · (d_i + 4)]``, the paged fp8 indexer-key cache
            (DeepGEMM's layout, :func:`dsa_ref.reference.pack_indexer_cache_fp8`); ``block_size``
            follows from its width and ``d_i``, and ``kv_cache`` must have ``num_blocks · block_size`` rows.
        block_table: int32/int64 ``[b, max_blocks]``, shared by both caches.
        context_lens: int32/int64 ``[b]``, each in ``[next_n, max_blocks · block_size]``. Checked on
            NumPy arrays (with :func:`dsa_ref.use_data_checks` on); on torch tensors clamped into that
            range on the device instead.
        topk: tokens each query keeps, ``>= 1`` (FlashMLA and V3.2: 2048). A query that sees fewer
            tokens keeps them all, and the rest of its row is ``-1``.
        next_n: queries per sequence in this step, ``>= 1``.
        sm_scale: softmax scale of the main attention, default ``576 ** -0.5``.
        backend: a backend name (or, outside torch, a backend object); default the active one. Every
            stage runs on it.

    Returns:
        ``(out, lse, indices)``:

        * ``out``: float32 ``[b · next_n, h, 512]``;
        * ``lse``: float32 ``[b · next_n, h]``, natural log, ``-inf`` for a query with no valid slot
          (``out = 0`` there), as :func:`dsa_ref.sparse_mla`;
        * ``indices``: int32 ``[b · next_n, topk]``, the selected **cache slots** (FlashMLA's decode
          convention: the block table already folded in, ready for ``flash_mla_with_kvcache`` or for
          :func:`dsa_ref.sparse_mla` on ``kv_cache``), ``-1`` where fewer than ``topk`` tokens were
          selectable. The reference orders each row by descending indexer score; another backend may
          return the same set in another order.

        In the array library of ``q``. An inference step: no gradient is recorded (the FP8 cache is
        an inference format; train on float rows with :mod:`dsa_ref.torch`'s ops).

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or dtype (each named, with what it
            got and what was expected); on NumPy arrays, ``context_lens`` out of range.
    """
    topk = _checks.positive_int("topk", topk)
    next_n = _checks.positive_int("next_n", next_n)
    sm_scale = D_QK**-0.5 if sm_scale is None else _checks.finite_float("sm_scale", sm_scale)
    arrays = dict(q=q, kv_cache=kv_cache, q_index=q_index, weights=weights, index_cache=index_cache,
                  block_table=block_table, context_lens=context_lens)
    on_torch = interop.array_kind(q) == "torch"
    if on_torch:
        for name in _ARRAY_ARGUMENTS:
            if interop.array_kind(arrays[name]) != "torch":
                raise TypeError(f"{name} must be a torch.Tensor like q (the torch path runs on dsa_ref.torch's ops), "
                                f"got {type(arrays[name]).__name__}")
    block_size = _check_inputs(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, next_n)
    if on_torch:
        return _torch_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, topk=topk,
                           next_n=next_n, sm_scale=sm_scale, block_size=block_size,
                           backend=backend.name if isinstance(backend, Backend) else backend)
    return _public_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, topk=topk,
                        next_n=next_n, sm_scale=sm_scale, block_size=block_size, backend=backend)


def _check_inputs(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, next_n: int) -> int:
    """Shapes and dtypes of the step (never values); returns the caches' ``block_size``."""
    with modes.use_data_checks(False):  # values are checked by the public ops, or clamped on the device
        ops._check_paged_indexer_inputs(q_index, weights, index_cache, block_table, context_lens, next_n, None)
    rows, d_i = q_index.shape[0], q_index.shape[2]
    num_blocks, block_bytes = index_cache.shape
    block_size = block_bytes // (d_i + INDEXER_SCALE_BYTES)
    if num_blocks == 0:
        raise ValueError(f"index_cache must hold at least one block, got shape {tuple(index_cache.shape)}")
    if block_table.shape[1] == 0:
        raise ValueError(f"block_table must have shape [b, max_blocks] with max_blocks >= 1 (the contexts hold "
                         f">= next_n={next_n} tokens), got shape {tuple(block_table.shape)}")
    _checks.array("q", q, f"[b * next_n, h, {D_QK}]", _checks.FLOATS)
    _checks.axis("q", q, 0, rows, f"[b * next_n, h, {D_QK}]", "q_index's b * next_n")
    _checks.axis("q", q, 2, D_QK, f"[b * next_n, h, {D_QK}]", "512 latent + 64 RoPE dims, to read the FP8 cache")
    if not interop.is_array(kv_cache):
        raise TypeError(f"kv_cache must be an array (numpy.ndarray, torch.Tensor or cupy.ndarray) of shape "
                        f"[num_blocks * block_size, {KV_CACHE_FP8_BYTES}], got {type(kv_cache).__name__}")
    if interop.dtype_name(kv_cache) != "uint8":
        raise TypeError(f"kv_cache.dtype must be uint8 (the packed FP8 cache's bytes), got "
                        f"{interop.dtype_name(kv_cache)}")
    expected = (num_blocks * block_size, KV_CACHE_FP8_BYTES)
    if tuple(kv_cache.shape) != expected:
        raise ValueError(f"kv_cache must have shape [num_blocks * block_size, {KV_CACHE_FP8_BYTES}] = {list(expected)} "
                         f"(num_blocks={num_blocks} and block_size={block_size} from index_cache: both caches share "
                         f"the block table), got shape {tuple(kv_cache.shape)}")
    return block_size


def _public_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, *, topk: int, next_n: int,
                 sm_scale: float, block_size: int, backend):
    """The step on the public ops (any array library; NumPy is the reference path)."""
    batch = context_lens.shape[0]
    scores = ops.lightning_indexer_paged(q_index, weights, index_cache, block_table, context_lens, next_n=next_n,
                                         backend=backend)  # [b · next_n, max_blocks · block_size]
    tokens = interop.to_numpy(ops.topk_indices(scores, topk, backend=backend))  # [b · next_n, topk]
    slots = slot_indices(tokens.reshape(batch, next_n, topk), block_table, block_size)  # [b, next_n, topk]
    slots = slots.reshape(batch * next_n, topk)  # [b · next_n, topk]
    out, lse = ops.sparse_mla(q, kv_cache, slots, sm_scale=sm_scale, d_v=KV_LATENT_DIM, backend=backend)
    return out, lse, interop.from_numpy_like(slots, q)


def _torch_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, *, topk: int, next_n: int,
                sm_scale: float, block_size: int, backend):
    """The step on dsa_ref.torch's ops and torch indexing: device work only, nothing read on the host."""
    import torch

    from . import torch as dsa_torch

    with torch.no_grad():
        return _torch_step_without_grad(torch, dsa_torch, q, kv_cache, q_index, weights, index_cache, block_table,
                                    context_lens, topk=topk, next_n=next_n, sm_scale=sm_scale,
                                    block_size=block_size, backend=backend)


def _torch_step_without_grad(torch, dsa_torch, q, kv_cache, q_index, weights, index_cache, block_table, context_lens, *,
                         topk: int, next_n: int, sm_scale: float, block_size: int, backend):
    batch, max_blocks = block_table.shape
    table = block_table.long()  # [b, max_blocks]
    # Score columns: every position the table can address, L = max_blocks · block_size.
    if registry.get_backend(backend).reads_pages_in_place(q_index, index_cache):
        scores = dsa_torch.lightning_indexer_paged(q_index, weights, index_cache, block_table, context_lens,
                                                   next_n=next_n, backend=backend)  # [b · next_n, L]
    else:
        scores = _gathered_scores(torch, dsa_torch, q_index, weights, index_cache, table, context_lens,
                                  next_n=next_n, block_size=block_size, backend=backend)  # [b · next_n, L]
    tokens = dsa_torch.topk_indices(scores, topk, backend=backend).long()  # [b · next_n, topk]   -1 padding

    # Token positions to cache slots (dsa_ref.slot_indices' rule, on the device).
    row_table = table[:, None, :].expand(batch, next_n, max_blocks).reshape(batch * next_n, max_blocks)
    logical_block = tokens.div(block_size, rounding_mode="floor")  # [b · next_n, topk]
    in_table = (tokens >= 0) & (logical_block < max_blocks)  # [b · next_n, topk]
    physical = row_table.gather(1, torch.where(in_table, logical_block, 0))  # [b · next_n, topk]
    valid = in_table & (physical >= 0)  # [b · next_n, topk]
    slots = torch.where(valid, physical * block_size + tokens % block_size, -1).to(torch.int32)  # [b · next_n, topk]

    out, lse = dsa_torch.sparse_mla(q, kv_cache, slots, sm_scale=sm_scale, d_v=KV_LATENT_DIM, backend=backend)
    return out, lse, slots


def _gathered_scores(torch, dsa_torch, q_index, weights, index_cache, table, context_lens, *, next_n: int,
                     block_size: int, backend):
    """The step's indexer scores ``[b · next_n, L]`` for a backend whose paged op is composed: the keys
    gathered out of the pages with torch indexing, one dense indexer call per sequence (device work
    only: nothing is read on the host, so a CUDA graph can capture it)."""
    batch, max_blocks = table.shape
    num_blocks, d_i = index_cache.shape[0], q_index.shape[2]
    length = max_blocks * block_size
    device = q_index.device
    context_lens = context_lens.long().clamp(next_n, max(next_n, length))  # [b]   clamped, not checked
    # Slot (block, offset) of a block's values is bytes [offset · d_i, (offset + 1) · d_i), of its
    # float32 scale block_size · d_i + 4 · offset.
    position = torch.arange(length, device=device)  # [L]
    offset = position % block_size  # [L]
    block = table[:, position // block_size]  # [b, L]
    present = (block >= 0) & (block < num_blocks)  # [b, L]   a block of the cache
    block = torch.where(present, block, 0)  # [b, L]   absent tokens read block 0, then score -inf
    values = index_cache[:, :block_size * d_i].reshape(num_blocks, block_size, d_i)  # a view, no copy
    scale_bytes = index_cache[:, block_size * d_i:].reshape(num_blocks, block_size, INDEXER_SCALE_BYTES)
    keys = values[block, offset].view(torch.float8_e4m3fn)  # [b, L, d_i]
    key_scales = scale_bytes[block, offset].view(torch.float32)[..., 0]  # [b, L]

    # Query j of sequence b sees positions [0, context_lens[b] - next_n + j].
    key_start = torch.zeros(next_n, dtype=torch.int32, device=device)  # [next_n]
    key_end = (context_lens[:, None] + torch.arange(1 - next_n, 1, device=device)).to(torch.int32)  # [b, next_n]
    scores = torch.cat([
        dsa_torch.lightning_indexer(q_index[sequence * next_n:(sequence + 1) * next_n],
                                    weights[sequence * next_n:(sequence + 1) * next_n], keys[sequence],
                                    key_start=key_start, key_end=key_end[sequence], k_scale=key_scales[sequence],
                                    backend=backend)  # [next_n, L]
        for sequence in range(batch)])  # [b · next_n, L]
    row_present = present[:, None, :].expand(batch, next_n, length).reshape(batch * next_n, length)  # [b · next_n, L]
    return scores.masked_fill(~row_present, float("-inf"))


__all__ = ["sparse_decode_step"]
