"""The DeepSeek-V3.2 attention layer as a ``torch.nn.Module``: prefill and training on the custom ops.

:class:`DSAAttention` computes, in torch, what :class:`dsa_ref.layer.DSALayer` computes in MQA mode
for a prefill (no cache), and gives the indexer its training loss:

1. query path ``c^Q = RMSNorm(W_DQ h)``, ``[q_nope ; q_pe] = W_UQ c^Q``, interleaved RoPE on q_pe;
   KV path ``[c^KV ; k_pe] = W_DKV h``, RMSNorm on c^KV, interleaved RoPE on k_pe;
2. MQA mode: W_UK absorbed into the query, ``q' = [W_UK^T q_nope ; q_pe]`` (576 wide in V3.2);
3. the lightning indexer on the *detached* h and c^Q (paper section 2.1): LayerNorm'd key,
   half-split RoPE on the first ``qk_rope_head_dim`` dims, orthonormal Hadamard rotation,
   ``w = weights_proj(h) H_I^-1/2 d_I^-1/2``; fp8 e4m3 q and k for the selection when
   ``config.indexer_fp8`` (one scale per 128-wide vector, as the official code);
4. scores (eq. 1) and top-k (eq. 2) by :func:`dsa_ref.torch.lightning_indexer` and
   :func:`dsa_ref.torch.topk_indices`, sparse MLA over the selection by
   :func:`dsa_ref.torch.sparse_mla` (differentiable with respect to q' and the latent rows);
5. W_UV on the attended latent, then ``wo``.

Training: ``out, indexer_loss = attn(x, return_indexer_loss=True)``. The loss is eq. 4 (sparse
stage: the main attention over the selected keys is the target, :func:`dsa_ref.torch.attention_target`,
and :func:`dsa_ref.torch.indexer_loss` compares the indexer's unquantized scores with it) or, with
``mode="dense"``, eq. 3 (dense warm-up: dense causal main attention, target over every visible key).
Its gradient reaches only the indexer's parameters; the main model's parameters learn from the
gradient of ``out`` alone, as in the paper. A training step::

    out, indexer_loss = attn(x, return_indexer_loss=True)
    (lm_loss(out) + indexer_loss).backward()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import interop, modes
from ..layer import DSAConfig, DSALayer
from ..layer.layer import check_parameter_names, init_parameters
from ..layer.loader import load_layer_state_dict
from ..layer.norms import NORM_EPS, hadamard_matrix
from ..layer.rope import _correction_dim
from . import ops

MODES = ("mqa", "dense")


# ---------------------------------------------------------------------------- building blocks
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, RoPE and fp8 scales run in float32 at least (as in the official code), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    r""":math:`x / \sqrt{\overline{x^2} + \epsilon} \odot g` over the last axis (MLA's c^Q and c^KV)."""

    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(_compute_dtype(x.dtype))  # [..., n]
        inverse_rms = 1.0 / torch.sqrt(torch.mean(y * y, dim=-1, keepdim=True) + NORM_EPS)  # [..., 1]
        return (y * inverse_rms * self.weight.to(y.dtype)).to(x.dtype)  # [..., n]


class LayerNorm(nn.Module):
    r""":math:`(x - \bar x) / \sqrt{\mathrm{Var}\,x + \epsilon} \odot g + b` over the last axis (the indexer key)."""

    def __init__(self, dim: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(_compute_dtype(x.dtype))  # [..., n]
        centered = y - y.mean(dim=-1, keepdim=True)  # [..., n]
        inverse_std = 1.0 / torch.sqrt(torch.mean(centered * centered, dim=-1, keepdim=True) + NORM_EPS)  # [..., 1]
        return (centered * inverse_std * self.weight.to(y.dtype) + self.bias.to(y.dtype)).to(x.dtype)  # [..., n]


def _linear(in_features: int, out_features: int, dtype, device) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)


def inverse_frequencies(config: DSAConfig, device=None) -> Tensor:
    """:func:`dsa_ref.layer.rope.inverse_frequencies` in torch, float64 ``[qk_rope_head_dim / 2]``.

    Built from Python constants at every call rather than kept in a buffer, so that casting the
    module to bfloat16 cannot round the frequencies.
    """
    r = config.qk_rope_head_dim
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64, device=device) / r)  # [r/2]
    if not config.yarn_enabled:
        return freqs
    low = max(math.floor(_correction_dim(config.beta_fast, r, config.rope_theta, config.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(config.beta_slow, r, config.rope_theta, config.original_seq_len)), r - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(r // 2, dtype=torch.float64, device=device) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # [r/2]   1: keep the frequency, 0: interpolate it by rope_factor
    return freqs / config.rope_factor * (1.0 - keep) + freqs * keep  # [r/2]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    r"""Rotate pairs of ``x [n, ..., r]`` by the angles whose ``cos``, ``sin`` are ``[n, r/2]``:
    :math:`(a, b) \mapsto (a\cos\phi - b\sin\phi,\ a\sin\phi + b\cos\phi)`, pairs ``(x[2i], x[2i+1])``
    (MLA) or ``(x[i], x[i + r/2])`` (the indexer). Computed in float32 at least."""
    y = x.to(_compute_dtype(x.dtype))  # [n, ..., r]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.to(y.dtype).reshape(shape), sin.to(y.dtype).reshape(shape)  # [n, 1.., r/2]
    half = x.shape[-1] // 2
    a, b = (y[..., 0::2], y[..., 1::2]) if interleaved else (y[..., :half], y[..., half:])  # [n, ..., r/2] each
    rotated_a = a * cos - b * sin  # [n, ..., r/2]
    rotated_b = a * sin + b * cos  # [n, ..., r/2]
    if interleaved:
        return torch.stack([rotated_a, rotated_b], dim=-1).reshape(x.shape).to(x.dtype)  # [n, ..., r]
    return torch.cat([rotated_a, rotated_b], dim=-1).to(x.dtype)  # [n, ..., r]


def quantize_fp8_vectors(x: Tensor, scale_format: str) -> tuple[Tensor, Tensor]:
    r"""fp8 e4m3 ``x [..., d]`` with one scale per vector of the last axis (:func:`dsa_ref.quantize_fp8`
    with ``block = d``): :math:`s = \max(\mathrm{amax}, 10^{-4}) / 448`, rounded up to a power of two
    for ``"ue8m0"``. Returns ``(x_fp8 [..., d], scale float32 [...])``."""
    y = x.detach().to(_compute_dtype(x.dtype))  # [..., d]
    scale = torch.clamp(y.abs().amax(dim=-1), min=1e-4) / 448.0  # [...]
    if scale_format == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))  # [...]
    scale = scale.to(torch.float32)  # [...]
    x_fp8 = (y / scale.to(y.dtype)[..., None]).to(torch.float32).to(torch.float8_e4m3fn)  # [..., d]
    return x_fp8, scale


class Indexer(nn.Module):
    """The lightning indexer's parameters and projections (official names ``indexer.*``)."""

    def __init__(self, config: DSAConfig, *, dtype=None, device=None):
        super().__init__()
        c = config
        self.config = c
        self.wq_b = _linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, dtype, device)
        self.wk = _linear(c.dim, c.index_head_dim, dtype, device)
        self.k_norm = LayerNorm(c.index_head_dim, dtype=dtype, device=device)
        self.weights_proj = _linear(c.dim, c.index_n_heads, dtype, device)
        # ±1 entries survive any cast of the module; not persistent: no official checkpoint has it.
        self.register_buffer("hadamard", torch.from_numpy(hadamard_matrix(c.index_head_dim)).to(dtype=dtype,
                             device=device), persistent=False)

    def _rope_and_rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.config.qk_rope_head_dim
        x = torch.cat([apply_rope(x[..., :r], cos, sin, interleaved=False), x[..., r:]], dim=-1)  # [n, ..., d_I]
        return (x @ self.hadamard.to(x.dtype)) * x.shape[-1] ** -0.5  # [n, ..., d_I]   orthonormal rotation

    def forward(self, h: Tensor, qr: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unquantized ``(q_I [n, H_I, d_I], w [n, H_I], k_I [n, d_I])`` of hidden states ``h [n, dim]``
        and the query latent ``qr [n, q_lora_rank]``; ``w`` carries ``H_I^-1/2 d_I^-1/2``."""
        c = self.config
        q = self.wq_b(qr).reshape(qr.shape[0], c.index_n_heads, c.index_head_dim)  # [n, H_I, d_I]
        k = self.k_norm(self.wk(h))  # [n, d_I]
        weights = self.weights_proj(h) * (c.index_n_heads ** -0.5 * c.index_head_dim ** -0.5)  # [n, H_I]
        return self._rope_and_rotate(q, cos, sin), weights, self._rope_and_rotate(k, cos, sin)


@dataclass
class _TokenLayout:
    """Where the packed tokens sit: positions ``[N]``, key ranges ``[N]`` (int32, packed-key
    coordinates), ``valid [N]`` (None: every token is real) and the longest key range (static)."""

    positions: Tensor
    key_start: Tensor
    key_end: Tensor
    valid: Tensor | None
    max_keys: int


# ---------------------------------------------------------------------------- the layer
class DSAAttention(nn.Module):
    """The attention layer of DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention) for prefill and training.

    The parameters carry the official per-layer names (:data:`dsa_ref.layer.PARAMETER_NAMES`):
    ``state_dict()`` has exactly those keys, and :class:`dsa_ref.layer.DSALayer`'s state dict loads
    into it. There is no cache: decoding belongs to :class:`~dsa_ref.layer.DSALayer` and the serving
    engines.

    Args:
        config: shapes and constants (:class:`dsa_ref.layer.DSAConfig`).
        seed: seed of the deterministic initialisation, the same parameters as
            ``DSALayer(config, seed)`` (:func:`dsa_ref.layer.layer.init_parameters`).
        weights: parameters by their official names (arrays or tensors, any float dtype) instead
            of the random ones.
        mode: ``"mqa"`` (DSA: the indexer selects ``index_topk`` keys, sparse MLA attends to them)
            or ``"dense"`` (every causal key; the baseline, and the main attention of the indexer's
            dense warm-up).
        backend: backend of the core ops (``None``: the active one, see :func:`dsa_ref.use_backend`).
        dtype: parameter and activation dtype (float64 runs the NumPy reference in float64).
        device: device of the parameters.
    """

    def __init__(self, config: DSAConfig, *, seed: int = 0, weights=None, mode: str = "mqa", backend: str | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not isinstance(config, DSAConfig):
            raise TypeError(f"config must be a DSAConfig, got {type(config).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name (str) or None, got {type(backend).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            raise TypeError(f"dtype must be a torch float dtype (float64, float32, float16, bfloat16), got {dtype!r}")
        c = self.config = config
        self.mode = mode
        self.backend = backend
        self.wq_a = _linear(c.dim, c.q_lora_rank, dtype, device)
        self.q_norm = RMSNorm(c.q_lora_rank, dtype=dtype, device=device)
        self.wq_b = _linear(c.q_lora_rank, c.n_heads * c.qk_head_dim, dtype, device)
        self.wkv_a = _linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim, dtype, device)
        self.kv_norm = RMSNorm(c.kv_lora_rank, dtype=dtype, device=device)
        self.wkv_b = _linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), dtype, device)
        self.wo = _linear(c.n_heads * c.v_head_dim, c.dim, dtype, device)
        self.indexer = Indexer(c, dtype=dtype, device=device)
        self.load_state_dict(_checked_state_dict(init_parameters(c, seed) if weights is None else weights, c))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(cls, state_dict, config: DSAConfig, **kwargs) -> "DSAAttention":
        """A module with the given parameters (official names, NumPy arrays or tensors, any float dtype)."""
        return cls(config, weights=state_dict, **kwargs)

    @classmethod
    def from_layer(cls, layer: DSALayer, **kwargs) -> "DSAAttention":
        """The same function as the NumPy ``layer`` (its config and parameters). ``mode`` defaults to
        ``"dense"`` for a dense layer and ``"mqa"`` otherwise (MHA mode is the same function as MQA)."""
        if not isinstance(layer, DSALayer):
            raise TypeError(f"layer must be a dsa_ref.layer.DSALayer, got {type(layer).__name__}")
        kwargs.setdefault("mode", "dense" if layer.mode == "dense" else "mqa")
        kwargs.setdefault("backend", layer.backend)
        return cls(layer.config, weights=layer.weights, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, layer_index: int, config: DSAConfig | None = None,
                        **kwargs) -> "DSAAttention":
        """Attention layer ``layer_index`` of a safetensors checkpoint, as :func:`dsa_ref.layer.load_layer`
        reads it (Hugging Face or official names, fp8 weights dequantized). ``config`` defaults to V3.2's."""
        config = DSAConfig() if config is None else config
        return cls(config, weights=load_layer_state_dict(path, layer_index, config), **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
                return_indexer_loss: bool = False):
        """Causal self-attention of a prefill: each token attends to its own sequence up to itself.

        Args:
            x: ``[batch, seq, dim]`` (as :meth:`DSALayer.forward` with ``start_pos=0``), or a packed
                batch ``[n, dim]``: one sequence, or the sequences ``cu_seqlens`` delimits.
            lengths: int ``[batch]``, with a ``[batch, seq, dim]`` input: sequence ``i`` has only
                ``lengths[i]`` tokens, the rest of its row is padding (output 0, no loss).
            cu_seqlens: int ``[num_seqs + 1]``, with a packed ``[n, dim]`` input: sequence ``i`` is
                tokens ``[cu_seqlens[i], cu_seqlens[i + 1])``, its positions start at 0
                (FlashAttention's varlen convention); ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = n``.
            return_indexer_loss: also return the indexer's loss.

        Returns:
            ``out``, the shape of ``x`` in the module's dtype; with ``return_indexer_loss``,
            ``(out, indexer_loss)``: ``indexer_loss`` is a scalar, the sum over the real tokens of
            ``KL(p_t || Softmax(I_t))`` (eq. 4 in ``"mqa"`` mode, over each token's selected keys;
            eq. 3 in ``"dense"`` mode, over all its visible keys), with the unquantized float
            scores even when ``config.indexer_fp8`` quantizes the selection. Divide it by the token
            count for a mean. Its gradient reaches only the indexer's parameters.
        """
        tokens, layout = self._layout(x, lengths, cu_seqlens)
        out, loss = self._attend(tokens, layout, return_indexer_loss)
        if layout.valid is not None:
            out = torch.where(layout.valid[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        out = out.reshape(x.shape)
        return (out, loss) if return_indexer_loss else out

    def indexer_loss(self, x: Tensor, *, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """The indexer's loss alone (see :meth:`forward`), e.g. for the dense warm-up, where only the
        indexer trains: ``attn.indexer_loss(x).backward()`` leaves the main parameters without gradient."""
        return self.forward(x, lengths=lengths, cu_seqlens=cu_seqlens, return_indexer_loss=True)[1]

    @torch.no_grad()
    def selection(self, x: Tensor, *, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """The key positions (within its sequence) each token selects, int32 ``[batch, seq, index_topk]``
        or ``[n, index_topk]``, ``-1`` padded: :attr:`DSALayer.last_topk` after a prefill. In
        ``"dense"`` mode, every visible key (``[..., longest sequence]``)."""
        tokens, layout = self._layout(x, lengths, cu_seqlens)
        projected = self._project(tokens, layout)
        indices = self._indices(projected, layout)  # [N, k] packed-key coordinates
        positions = torch.where(indices >= 0, indices - layout.key_start[:, None], -1).to(torch.int32)
        if layout.valid is not None:
            positions = torch.where(layout.valid[:, None], positions, -1)
        return positions.reshape(*x.shape[:-1], indices.shape[-1])

    # ------------------------------------------------------------------ steps of forward
    def _layout(self, x, lengths, cu_seqlens) -> tuple[Tensor, _TokenLayout]:
        c = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x.dtype must be a float dtype, got {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != c.dim:
            raise ValueError(f"x must have shape [batch, seq, dim={c.dim}] or [n, dim={c.dim}], got {tuple(x.shape)}")
        checking = not torch.compiler.is_compiling() and modes.data_checks_enabled()
        device = x.device
        if x.dim() == 3:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens describes a packed [n, dim] input; with x [batch, seq, dim] pass lengths")
            batch, seq = x.shape[:2]
            if seq > c.max_seq_len:
                raise ValueError(f"x has seq {seq} > max_seq_len={c.max_seq_len}")
            token = torch.arange(batch * seq, device=device)  # [N]
            step = token % seq  # [N]
            key_start = token - step  # [N]   the row's first token
            key_end = token + 1  # [N]   causal
            valid = None
            if lengths is not None:
                lengths = _int_tensor("lengths", lengths, (batch,), "[batch]", device)
                if checking and bool(((lengths < 0) | (lengths > seq)).any()):
                    raise ValueError(f"lengths must lie in [0, seq={seq}], got {lengths.tolist()}")
                valid = step < lengths.repeat_interleave(seq)  # [N]
                key_end = torch.where(valid, key_end, key_start)  # padding sees no key: output 0, loss 0
            tokens, positions, max_keys = x.reshape(batch * seq, c.dim), step, seq
        else:
            if lengths is not None:
                raise ValueError("lengths describes a [batch, seq, dim] input; with packed x [n, dim] pass cu_seqlens")
            n = x.shape[0]
            token = torch.arange(n, device=device)  # [N]
            if cu_seqlens is None:
                if n > c.max_seq_len:
                    raise ValueError(f"x has {n} tokens (one sequence) > max_seq_len={c.max_seq_len}")
                key_start = torch.zeros_like(token)  # [N]
            else:
                cu_seqlens = _int_tensor("cu_seqlens", cu_seqlens, None, "[num_seqs + 1]", device)
                if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
                    raise ValueError(f"cu_seqlens must have shape [num_seqs + 1], got {tuple(cu_seqlens.shape)}")
                if checking:
                    _check_cu_seqlens(cu_seqlens, n, c.max_seq_len)
                sequence_of = torch.searchsorted(cu_seqlens.to(torch.int64), token, right=True) - 1  # [N]
                key_start = cu_seqlens.to(torch.int64)[sequence_of.clamp(0, cu_seqlens.shape[0] - 1)]  # [N]
            key_end = token + 1  # [N]
            tokens, positions, valid, max_keys = x, token - key_start, None, n
        layout = _TokenLayout(positions, key_start.to(torch.int32), key_end.to(torch.int32), valid, max_keys)
        return tokens, layout

    def _project(self, tokens: Tensor, layout: _TokenLayout) -> dict[str, Tensor]:
        """The pre-attention tensors of ``tokens [N, dim]`` (:meth:`DSALayer.projections` in MQA form)."""
        c = self.config
        h = tokens.to(self.wq_a.weight.dtype)  # [N, dim]
        n = h.shape[0]
        angles = layout.positions.to(torch.float64)[:, None] * inverse_frequencies(c, h.device)[None, :]  # [N, r/2]
        cos, sin = torch.cos(angles), torch.sin(angles)  # [N, r/2] each
        qr = self.q_norm(self.wq_a(h))  # [N, q_lora]   c^Q
        q = self.wq_b(qr).reshape(n, c.n_heads, c.qk_head_dim)  # [N, h, nope + rope]
        q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]  # [N, h, nope], [N, h, rope]
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)  # [N, h, rope]
        kv = self.wkv_a(h)  # [N, c + rope]
        latent = self.kv_norm(kv[:, :c.kv_lora_rank])  # [N, c]   c^KV
        k_pe = apply_rope(kv[:, c.kv_lora_rank:], cos, sin, interleaved=True)  # [N, rope]
        per_head = self.wkv_b.weight.reshape(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = per_head[:, :c.qk_nope_head_dim], per_head[:, c.qk_nope_head_dim:]  # [h, nope, c], [h, v, c]
        q_absorbed = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope, w_uk), q_pe], dim=-1)  # [N, h, c + rope]
        kv_rows = torch.cat([latent, k_pe], dim=-1)  # [N, c + rope]   one row per token, all heads
        # The indexer learns from its own loss only: its input is cut from the main model's graph.
        index_q, index_weights, index_k = self.indexer(h.detach(), qr.detach(), cos, sin)
        return dict(q=q_absorbed, kv=kv_rows, w_uv=w_uv, index_q=index_q, index_weights=index_weights,
                    index_k=index_k)

    def _indices(self, projected: dict[str, Tensor], layout: _TokenLayout) -> Tensor:
        """int32 ``[N, topk]`` packed-key indices: the indexer's top-k, or every visible key in dense mode."""
        c = self.config
        if self.mode == "dense":
            keys = layout.key_start[:, None] + torch.arange(layout.max_keys, dtype=torch.int32,
                                                            device=layout.key_start.device)[None, :]  # [N, max_keys]
            return torch.where(keys < layout.key_end[:, None], keys, -1)  # [N, max_keys]
        index_q, index_k = projected["index_q"], projected["index_k"]
        weight_dtype = torch.float64 if index_q.dtype == torch.float64 else torch.float32
        index_weights, k_scale = projected["index_weights"].to(weight_dtype), None  # [N, H_I]
        if c.indexer_fp8:
            index_q, q_scale = quantize_fp8_vectors(index_q, c.fp8_scale_format)  # [N, H_I, d_I], [N, H_I]
            index_k, k_scale = quantize_fp8_vectors(index_k, c.fp8_scale_format)  # [N, d_I], [N]
            # ReLU is positively homogeneous: each head's q scale moves into its weight.
            index_weights = (index_weights * q_scale.to(weight_dtype)).to(torch.float32)  # [N, H_I]
        scores = ops.lightning_indexer(index_q, index_weights, index_k, key_start=layout.key_start,
                                       key_end=layout.key_end, k_scale=k_scale, backend=self.backend)  # [N, N]
        return ops.topk_indices(scores, c.index_topk, backend=self.backend)  # [N, topk]

    def _attend(self, tokens: Tensor, layout: _TokenLayout, with_loss: bool):
        c = self.config
        projected = self._project(tokens, layout)
        q, kv = projected["q"], projected["kv"]
        indices = self._indices(projected, layout)  # [N, k]
        out_latent, lse = ops.sparse_mla(q, kv, indices, sm_scale=c.softmax_scale, d_v=c.kv_lora_rank,
                                         backend=self.backend)  # [N, h, c], [N, h]
        heads = torch.einsum("nhc,hvc->nhv", out_latent.to(q.dtype), projected["w_uv"])  # [N, h, v]
        out = self.wo(heads.reshape(heads.shape[0], c.n_heads * c.v_head_dim))  # [N, dim]
        if not with_loss:
            return out, None
        # p_t: the main attention over the same keys, summed over heads, L1-normalized (a constant).
        target = ops.attention_target(q, kv, indices, lse, sm_scale=c.softmax_scale, backend=self.backend)  # [N, k]
        per_token = ops.indexer_loss(projected["index_q"], projected["index_weights"], projected["index_k"], target,
                                     indices=indices, backend=self.backend)  # [N]
        return out, per_token.sum()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, backend={self.backend!r}, index_topk={self.config.index_topk}"


# ---------------------------------------------------------------------------- checks
def _int_tensor(name: str, value, shape, layout: str, device) -> Tensor:
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor {layout}, got dtype {value.dtype}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {list(shape)}, got {tuple(value.shape)}")
    return value.to(device)


def _check_cu_seqlens(cu_seqlens: Tensor, n: int, max_seq_len: int) -> None:
    values = cu_seqlens.tolist()
    sizes = np.diff(values)
    if values[0] != 0 or values[-1] != n or np.any(sizes < 0):
        raise ValueError(f"cu_seqlens must rise from 0 to n={n} (x's token count), got {values}")
    if np.any(sizes > max_seq_len):
        raise ValueError(f"cu_seqlens has a sequence of {int(sizes.max())} tokens > max_seq_len={max_seq_len}")


def _checked_state_dict(state_dict, config: DSAConfig) -> dict[str, Tensor]:
    """The parameters as tensors by their official names, each of its config's shape (float64 for arrays)."""
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict must map the official names to arrays, got {type(state_dict).__name__}")
    shapes = check_parameter_names(state_dict, config)
    tensors = {}
    for name, shape in shapes.items():
        value = state_dict[name]
        if not isinstance(value, Tensor):
            value = torch.from_numpy(np.asarray(interop.to_numpy(value) if interop.is_array(value) else value)
                                     .astype(np.float64))
        if tuple(value.shape) != shape:
            raise ValueError(f"state_dict[{name!r}] must have shape {shape} for this config, got {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"state_dict[{name!r}] must be a float tensor, got dtype {value.dtype}")
        tensors[name] = value
    return tensors
