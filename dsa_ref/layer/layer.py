"""One DeepSeek-V3.2 attention layer: MLA with DeepSeek Sparse Attention, prefill and decode.

The projections are computed in float64 NumPy; the three core ops (indexer scores, top-k, sparse
MLA) run through the public dispatched API (:func:`dsa_ref.lightning_indexer`,
:func:`dsa_ref.topk_indices`, :func:`dsa_ref.sparse_mla`), so any backend can serve a real layer.

A forward call, for every new token ``t`` of every sequence:

1. query path ``q_nope, q_pe, c^Q`` and KV path ``c^KV, k_pe`` (:mod:`.mla`);
2. the indexer's ``q_I, w, k_I`` (:mod:`.indexer`), fp8 when ``config.indexer_fp8``;
3. the new ``[c^KV ; k_pe]`` row and indexer key are written to the caches (:mod:`.cache`);
4. indexer scores of t against its sequence's cached keys ``[0, t]`` (eq. 1) and top-k (eq. 2);
5. MQA mode: sparse MLA of the absorbed queries over the selected latent rows, read straight from
   the cache through slot indices (FlashMLA's decode convention), then W_UV; or MHA mode: per-head
   dense attention restricted to the same selected keys;
6. the output projection ``wo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsa_ref import _checks, interop, reference

from .cache import DSACache
from .config import DSAConfig
from .indexer import (
    indexer_head_weights,
    indexer_keys,
    indexer_queries,
    quantize_indexer_keys,
    quantize_indexer_queries,
)
from .mla import absorb_queries, mha_attention, mla_latent_kv, mla_queries, project_values, split_wkv_b
from .rope import rope_angles

MODES = ("mqa", "mha", "dense")

#: Per-layer parameter names of the official inference code (``layers.{i}.attn.<name>``).
PARAMETER_NAMES = (
    "wq_a.weight", "q_norm.weight", "wq_b.weight",
    "wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight",
    "indexer.wq_b.weight", "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias",
    "indexer.weights_proj.weight",
)


def parameter_shapes(config: DSAConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter; linear weights are ``[out_features, in_features]`` (``y = x W^T``)."""
    c = config
    return {
        "wq_a.weight": (c.q_lora_rank, c.dim),
        "q_norm.weight": (c.q_lora_rank,),
        "wq_b.weight": (c.n_heads * c.qk_head_dim, c.q_lora_rank),
        "wkv_a.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.dim),
        "kv_norm.weight": (c.kv_lora_rank,),
        "wkv_b.weight": (c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "wo.weight": (c.dim, c.n_heads * c.v_head_dim),
        "indexer.wq_b.weight": (c.index_n_heads * c.index_head_dim, c.q_lora_rank),
        "indexer.wk.weight": (c.index_head_dim, c.dim),
        "indexer.k_norm.weight": (c.index_head_dim,),
        "indexer.k_norm.bias": (c.index_head_dim,),
        "indexer.weights_proj.weight": (c.index_n_heads, c.dim),
    }


def init_parameters(config: DSAConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random parameters, float64: linear weights ~ N(0, 1/in_features); norm
    weights 1 + N(0, 0.1²) and the LayerNorm bias N(0, 0.1²), so that a norm parameter that is
    ignored changes the output."""
    rng = np.random.default_rng(_checks.int_at_least("seed", seed, 0))
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith(".bias"):
            params[name] = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            params[name] = rng.standard_normal(shape) * shape[1] ** -0.5
    return params


def core_op(name: str, backend: str | None):
    """The public, validated, dispatched core op ``dsa_ref.<name>`` bound to ``backend``."""
    import dsa_ref

    op = getattr(dsa_ref, name)
    return lambda *args, **kwargs: op(*args, backend=backend, **kwargs)


@dataclass
class LayerProjections:
    """Everything a layer computes from its input tokens before attention (float64, unquantized).

    Shapes for ``n`` tokens: q_nope ``[n, h, nope]``, q_pe ``[n, h, rope]`` (RoPE'd), qr ``[n, q_lora]``
    (c^Q), latent ``[n, c]`` (c^KV), k_pe ``[n, rope]``, index_q ``[n, H_I, d_I]``, index_weights
    ``[n, H_I]`` (with ``H_I^-0.5 d_I^-0.5``, without q scales), index_k ``[n, d_I]``.
    """

    q_nope: np.ndarray
    q_pe: np.ndarray
    qr: np.ndarray
    latent: np.ndarray
    k_pe: np.ndarray
    index_q: np.ndarray
    index_weights: np.ndarray
    index_k: np.ndarray


class DSALayer:
    """The attention layer of DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention) with its caches.

    Args:
        config: shapes and constants; default :meth:`DSAConfig.tiny`.
        seed: seed of the deterministic random initialisation (:func:`init_parameters`).
        kv_cache_dtype: ``"float32"``, ``"bfloat16"`` or ``"fp8"`` (the V3.2 656-byte row).
        block_size: ``None`` for contiguous caches, else the page size of paged caches.
        mode: ``"mqa"`` (sparse MLA over the latent, what DSA runs), ``"mha"`` (per-head keys and
            values, dense math restricted to the selected keys) or ``"dense"`` (no indexer: causal
            dense attention, the baseline DSA approximates).
        backend: backend of the core ops (``None``: the active one, see :func:`dsa_ref.use_backend`).

    Attributes:
        weights: the parameters by their official per-layer names (:data:`PARAMETER_NAMES`), float64.
        cache: the :class:`~dsa_ref.layer.cache.DSACache`.
        last_topk: int32 ``[b, s, index_topk]`` the key positions each token of the last forward
            selected (``-1`` padded; ``None`` after a dense forward).
    """

    def __init__(self, config: DSAConfig | None = None, seed: int = 0, *, kv_cache_dtype: str = "float32",
                 block_size: int | None = None, mode: str = "mqa", backend: str | None = None,
                 weights: dict | None = None):
        self.config = DSAConfig.tiny() if config is None else config
        if not isinstance(self.config, DSAConfig):
            raise TypeError(f"config must be a DSAConfig, got {type(self.config).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        seed = _checks.int_at_least("seed", seed, 0)
        self.mode = mode
        self.backend = backend
        self.weights = init_parameters(self.config, seed) if weights is None else _checked_weights(weights, self.config)
        self.cache = DSACache(self.config, kv_cache_dtype=kv_cache_dtype, block_size=block_size, seed=seed)
        self.last_topk = None

    @classmethod
    def from_state_dict(cls, state_dict, config: DSAConfig, **kwargs) -> "DSALayer":
        """A layer with the given parameters (names of :data:`PARAMETER_NAMES`, any float dtype)."""
        return cls(config, weights=state_dict, **kwargs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters by their official names."""
        return {name: value.copy() for name, value in self.weights.items()}

    def reset_cache(self) -> None:
        """Forget every cached sequence."""
        self.cache.reset()
        self.last_topk = None

    # ------------------------------------------------------------------ projections
    def projections(self, tokens, positions) -> LayerProjections:
        """The pre-attention tensors of ``tokens [n, dim]`` at ``positions [n]`` (nothing is cached)."""
        c, w = self.config, self.weights
        angles = rope_angles(c, positions)  # [n, rope/2]
        q_nope, q_pe, qr = mla_queries(tokens, w["wq_a.weight"], w["q_norm.weight"], w["wq_b.weight"], angles, c)
        latent, k_pe = mla_latent_kv(tokens, w["wkv_a.weight"], w["kv_norm.weight"], angles, c)
        index_q = indexer_queries(qr, w["indexer.wq_b.weight"], angles, n_heads=c.index_n_heads,
                                  head_dim=c.index_head_dim, rope_dim=c.qk_rope_head_dim)
        index_weights = indexer_head_weights(tokens, w["indexer.weights_proj.weight"], n_heads=c.index_n_heads,
                                             head_dim=c.index_head_dim)
        index_k = indexer_keys(tokens, w["indexer.wk.weight"], w["indexer.k_norm.weight"],
                               w["indexer.k_norm.bias"], angles, rope_dim=c.qk_rope_head_dim)
        return LayerProjections(q_nope, q_pe, qr, latent, k_pe, index_q, index_weights, index_k)

    # ------------------------------------------------------------------ forward
    def forward(self, x, start_pos=0, *, lengths=None, mode: str | None = None) -> np.ndarray:
        """Attend ``x`` to itself and to the cached past, and cache it.

        Args:
            x: float ``[b, s, dim]``, ``b <= max_batch_size``. Sequence ``i`` of the batch is cache
                slot ``i``, as in the official layer.
            start_pos: position of ``x[:, 0]``: an int for all sequences, or int ``[b]``. ``0`` is a
                prefill; later positions decode (``s = 1``) or extend (``s > 1``: chunked prefill,
                several tokens per step) against the caches. Positions ``[0, start_pos)`` must have
                been written by earlier calls.
            lengths: int ``[b]``, optional: sequence ``i`` has only ``lengths[i]`` new tokens, the rest
                of its row in ``x`` is padding (output 0). Default: all ``s``.
            mode: override the layer's ``mode`` for this call.

        Returns:
            float64 ``[b, s, dim]``.
        """
        c = self.config
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        x = interop.to_numpy(x) if interop.is_array(x) else np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != c.dim:
            raise ValueError(f"x must have shape [batch, seq, dim={c.dim}], got {x.shape}")
        if x.dtype.kind not in "fiu" and x.dtype.name not in ("bfloat16", "float8_e4m3fn"):
            raise TypeError(f"x.dtype must be a real float (or int) type, got {x.dtype}")
        x = x.astype(np.float64)
        batch, seq = x.shape[:2]
        if batch > c.max_batch_size:
            raise ValueError(f"x has batch {batch} > max_batch_size={c.max_batch_size}")
        starts, lengths = self._positions(start_pos, lengths, batch, seq)
        ends = starts + lengths  # [b]
        if not lengths.any():  # no token to attend (batch 0, seq 0, or all padding): nothing changes
            self.last_topk = None
            return np.zeros((batch, seq, c.dim), np.float64)

        token_valid = np.arange(seq)[None, :] < lengths[:, None]  # [b, s]
        sequence_of, step = np.nonzero(token_valid)  # [n] each, packed sequence by sequence
        positions = starts[sequence_of] + step  # [n]
        proj = self.projections(x[sequence_of, step], positions)
        self._write_cache(proj, sequence_of, positions, ends)

        # The sequences' contexts, packed one after another: queries of sequence i see keys
        # [cu_k[i], cu_k[i] + their position] (the varlen convention of the core ops).
        cu_q = np.concatenate([[0], np.cumsum(lengths)])  # [b + 1]
        cu_k = np.concatenate([[0], np.cumsum(ends)])  # [b + 1]
        key_start, key_end = reference.varlen_key_ranges(cu_q, cu_k, causal=True)  # [n] each

        out = np.zeros((batch, seq, c.dim), np.float64)  # [b, s, dim]
        self.last_topk = None
        w_uk, w_uv = split_wkv_b(self.weights["wkv_b.weight"], c)  # [h, nope, c], [h, v, c]
        if mode == "dense":
            context = self._packed_kv(ends)  # [total_k, c + rope]
            key = np.arange(len(context))[None, :]  # [1, total_k]
            visible = (key_start[:, None] <= key) & (key < key_end[:, None])  # [n, total_k]   causal, per sequence
            heads = mha_attention(proj.q_nope, proj.q_pe, context[:, :c.kv_lora_rank], context[:, c.kv_lora_rank:],
                                  w_uk, w_uv, visible, c.softmax_scale)  # [n, h, v]
        else:
            packed_topk = self._select(proj, ends, key_start, key_end)  # [n, topk] packed-key coordinates
            context_start = cu_k[sequence_of][:, None]  # [n, 1]
            token_topk = np.where(packed_topk >= 0, packed_topk - context_start, -1)  # [n, topk] positions
            self.last_topk = np.full((batch, seq, c.index_topk), -1, np.int32)
            self.last_topk[sequence_of, step] = token_topk
            if mode == "mqa":
                heads = self._sparse_mqa(proj, w_uk, w_uv, sequence_of, token_topk)  # [n, h, v]
            else:
                context = self._packed_kv(ends)  # [total_k, c + rope]
                visible = np.zeros((len(positions), len(context)), bool)  # [n, total_k]
                rows, slots = np.nonzero(packed_topk >= 0)
                visible[rows, packed_topk[rows, slots]] = True
                heads = mha_attention(proj.q_nope, proj.q_pe, context[:, :c.kv_lora_rank],
                                      context[:, c.kv_lora_rank:], w_uk, w_uv, visible, c.softmax_scale)
        out[sequence_of, step] = heads.reshape(len(positions), -1) @ self.weights["wo.weight"].T  # [n, dim]
        return out

    __call__ = forward

    # ------------------------------------------------------------------ steps of forward
    def _positions(self, start_pos, lengths, batch: int, seq: int):
        c = self.config
        starts = np.asarray(start_pos)
        if not np.issubdtype(starts.dtype, np.integer) or starts.ndim > 1 or (starts.ndim == 1 and starts.shape != (batch,)):
            raise ValueError(f"start_pos must be an int or an int array [batch={batch}], got {start_pos!r}")
        starts = np.broadcast_to(starts.astype(np.int64), (batch,)).copy()
        if lengths is None:
            lengths = np.full(batch, seq, np.int64)
        else:
            lengths = np.asarray(lengths)
            if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(f"lengths must be an int array [batch={batch}], got {lengths!r}")
            if np.any(lengths < 0) or np.any(lengths > seq):
                raise ValueError(f"lengths must lie in [0, seq={seq}], got {lengths.tolist()}")
            lengths = lengths.astype(np.int64)
        if np.any(starts < 0):
            raise ValueError(f"start_pos must be >= 0, got {starts.tolist()}")
        if np.any(starts + lengths > c.max_seq_len):
            raise ValueError(f"start_pos + lengths = {(starts + lengths).tolist()} exceeds max_seq_len={c.max_seq_len}")
        cached = self.cache.lengths[:batch]
        if np.any(starts > cached):
            bad = int(np.argmax(starts > cached))
            raise ValueError(f"start_pos={int(starts[bad])} for sequence {bad}, but only {int(cached[bad])} of its "
                             "positions are cached (positions must be filled in order)")
        return starts, lengths

    def _write_cache(self, proj: LayerProjections, sequence_of, positions, ends) -> None:
        c = self.config
        if c.indexer_fp8:
            index_k, index_k_scale = quantize_indexer_keys(proj.index_k, c.fp8_scale_format)  # [n, d_I], [n]
        else:
            index_k, index_k_scale = proj.index_k.astype(np.float32), None
        for sequence, end in enumerate(ends):
            self.cache.reserve(sequence, int(end))
        self.cache.write(sequence_of, positions, proj.latent, proj.k_pe, index_k, index_k_scale)
        # Writing at start_pos truncates whatever a sequence held beyond it (a new prefill restarts it).
        self.cache.lengths[:len(ends)] = ends

    def _packed_kv(self, ends) -> np.ndarray:
        """Every sequence's cached latent rows ``[0, end)``, concatenated: float64 ``[Σ end, c + rope]``."""
        return np.concatenate([self.cache.read_kv(i, int(end)) for i, end in enumerate(ends)])

    def _select(self, proj: LayerProjections, ends, key_start, key_end) -> np.ndarray:
        """Indexer scores over the packed contexts (eq. 1) and their top-k (eq. 2), packed-key indices."""
        c = self.config
        if c.indexer_fp8:
            index_q, index_weights = quantize_indexer_queries(proj.index_q, proj.index_weights, c.fp8_scale_format)
        else:
            index_q, index_weights = proj.index_q.astype(np.float32), proj.index_weights
        stored = [self.cache.read_index_keys(i, int(end)) for i, end in enumerate(ends)]
        keys = np.concatenate([k for k, _ in stored])  # [total_k, d_I]
        key_scales = np.concatenate([s for _, s in stored]) if c.indexer_fp8 else None  # [total_k]
        scores = core_op("lightning_indexer", self.backend)(
            index_q, index_weights.astype(np.float32), keys,
            key_start=key_start, key_end=key_end, k_scale=key_scales)  # [n, total_k]
        return np.asarray(core_op("topk_indices", self.backend)(scores, c.index_topk)).astype(np.int64)

    def _sparse_mqa(self, proj: LayerProjections, w_uk, w_uv, sequence_of, token_topk) -> np.ndarray:
        """Sparse MLA over the selected rows, read from the cache by slot, then W_UV: ``[n, h, v]``."""
        c = self.config
        q = absorb_queries(proj.q_nope, proj.q_pe, w_uk)  # [n, h, c + rope]
        slots = self.cache.slots(sequence_of, token_topk)  # [n, topk]
        q_dtype = self.cache.kv.dtype if self.cache.kv_cache_dtype == "bfloat16" else np.float32
        out_latent, _ = core_op("sparse_mla", self.backend)(
            q.astype(q_dtype), self.cache.kv, slots, sm_scale=c.softmax_scale, d_v=c.kv_lora_rank)  # [n, h, c]
        return project_values(np.asarray(out_latent), w_uv)  # [n, h, v]


def check_parameter_names(weights, config: DSAConfig) -> dict[str, tuple[int, ...]]:
    """``weights`` holds exactly the official names (:data:`PARAMETER_NAMES`); returns their shapes."""
    shapes = parameter_shapes(config)
    missing = [name for name in shapes if name not in weights]
    unknown = [name for name in weights if name not in shapes]
    if missing or unknown:
        raise ValueError(f"state_dict: missing {missing}, unexpected {unknown} (expected the names {list(shapes)})")
    return shapes


def _checked_weights(weights, config: DSAConfig) -> dict[str, np.ndarray]:
    shapes = check_parameter_names(weights, config)
    checked = {}
    for name, shape in shapes.items():
        value = np.asarray(weights[name]).astype(np.float64)
        if value.shape != shape:
            raise ValueError(f"state_dict[{name!r}] must have shape {shape} for this config, got {value.shape}")
        checked[name] = value
    return checked
