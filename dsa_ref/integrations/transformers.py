"""Hugging Face transformers' DeepSeek-V3.2 on dsa-ref's sparse MLA: :func:`enable` and :func:`disable`.

transformers (5.24) runs ``DeepseekV32Attention`` in MHA mode: it re-expands the cached latent into
per-head keys and values, and its eager/sdpa path turns the indexer's top-k into a dense
``[B, 1, S, T]`` mask over full attention (O(L²) time and memory). An attention function registered
through ``AttentionInterface`` only ever sees the expanded K/V, so it cannot reach a shared-latent
kernel. :func:`enable` therefore replaces the ``forward`` of each attention module (per instance,
restorable with :func:`disable`) by DeepSeek's MQA mode:

1. the same projections, norms and interleaved RoPE as transformers (its own modules and functions;
   its RoPE writes q_pe and k_pe in ``[even | odd]`` order, which leaves every dot product as it is);
2. one latent row per token, ``[c^KV ; k_pe]`` (512 + 64 = 576 wide in V3.2), stored in
   transformers' cache as the layer's *key* states ``[B, 1, T, 576]``, with zero-width *value*
   states ``[B, 1, T, 0]`` (the cache API grows keys and values together; an empty value tensor
   keeps its bookkeeping — sequence length, cropping, beam reordering — intact at no cost);
3. W_UK absorbed into the queries, ``q' = [W_UK^T q_nope ; q_pe]`` ``[B·S, h, 576]``;
4. the indexer's top-k (see ``indexer`` below) with ``-1`` for slots without a visible key, never
   a masked position;
5. :func:`dsa_ref.torch.sparse_mla` over the selection (batches flattened into the token axis),
   W_UV on the attended latent, then transformers' ``o_proj``.

The indexer keys stay in the cache's own indexer slot (``cache.update_indexer``).

A cache belongs to the path that filled it: transformers' own attention stores the latent split
into 512-wide keys and 64-wide values, this path stores 576-wide keys, and the ``"official"``
indexer stores Hadamard-rotated indexer keys. Start a fresh cache after :func:`enable` or
:func:`disable` (a cache of the other layout is refused with a ``ValueError``).

Importing this module imports torch and transformers.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import registry
from ..layer.norms import hadamard_matrix
from ..torch import ops
from ..torch.layer import quantize_fp8_vectors

try:
    import transformers
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as _hf
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("dsa_ref.integrations.transformers needs transformers>=5.24 with its DeepSeek-V3.2 model "
                      "(pip install 'dsa-ref[transformers]')") from exc

INDEXERS = ("transformers", "official")

#: fp8 scale format of the official indexer (DeepSeek-V3.2's ``scale_fmt``): powers of two.
OFFICIAL_SCALE_FORMAT = "ue8m0"

_STATE = "_dsa_ref_sparse_attention"
_MISSING = object()


@dataclass
class _SparseState:
    """What :func:`enable` changed on one attention module, and the options its forward reads."""

    backend: str | None
    indexer: str
    patched_attribute: str
    previous: object
    hadamard: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- public API
def enable(model: nn.Module, *, backend: str | None = None, indexer: str = "transformers") -> nn.Module:
    """Run every ``DeepseekV32Attention`` of ``model`` on dsa-ref's MQA-mode sparse path.

    Args:
        model: a transformers model holding ``DeepseekV32Attention`` modules (``DeepseekV32ForCausalLM``,
            ``DeepseekV32Model``, or any module around them).
        backend: backend of the dsa-ref ops (``"numpy"`` for CPU tensors, ``"triton"`` or ``"cupy"`` for
            CUDA tensors); ``None``: the active one when the model runs (:func:`dsa_ref.use_backend`,
            ``DSA_BACKEND``). A named backend is checked now and never silently replaced.
        indexer: ``"transformers"`` computes the selection as transformers does (bf16/fp32 scores, no
            Hadamard rotation, no fp8); ``"official"`` as DeepSeek's inference code does (orthonormal
            Hadamard rotation of q_I and k_I, fp8 e4m3 with one power-of-two scale per 128-wide
            vector, the q scale folded into the head weights, the k scale applied per key).

    Returns:
        ``model`` itself, changed in place. Calling :func:`enable` again changes the options.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``backend`` is not a name.
        ValueError: ``model`` has no ``DeepseekV32Attention``, or ``indexer`` / ``backend`` is unknown.
    """
    if indexer not in INDEXERS:
        raise ValueError(f"indexer must be one of {INDEXERS}, got {indexer!r}")
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name (str) or None, got {type(backend).__name__}")
        registry.get_backend(backend)  # a misspelt or unavailable backend fails here, not mid-generation
    for module in _attention_modules(model):
        state = module.__dict__.get(_STATE)
        if state is not None:
            state.backend, state.indexer = backend, indexer
            continue
        # accelerate's hooks (device_map=...) keep the real forward in `_old_forward` and wrap it in
        # `forward`; replacing the inner one keeps their device placement around our forward.
        attribute = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
        previous = module.__dict__.get(attribute, _MISSING)
        module.__dict__[_STATE] = _SparseState(backend, indexer, attribute, previous)
        setattr(module, attribute, types.MethodType(_sparse_forward, module))
    return model


def disable(model: nn.Module) -> nn.Module:
    """Give every attention module of ``model`` back the forward it had before :func:`enable`.

    Modules that were never enabled are left as they are. Returns ``model``.
    """
    for module in _attention_modules(model):
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.previous is _MISSING:
            del module.__dict__[state.patched_attribute]
        else:
            module.__dict__[state.patched_attribute] = state.previous
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` is in force on every ``DeepseekV32Attention`` of ``model``."""
    return all(_STATE in module.__dict__ for module in _attention_modules(model))


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers DeepSeek-V3.2 model), "
                        f"got {type(model).__name__}")
    found = [module for module in model.modules() if isinstance(module, _hf.DeepseekV32Attention)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no DeepseekV32Attention module: "
                         f"dsa_ref.integrations.transformers runs transformers' DeepSeek-V3.2 "
                         f"(transformers {transformers.__version__}, model_type 'deepseek_v32')")
    return found


# ---------------------------------------------------------------------------- the forward
def _sparse_forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                    attention_mask: Tensor | None, cache=None, position_ids: Tensor | None = None,
                    past_key_values=None, **kwargs) -> tuple[Tensor, None]:
    """``DeepseekV32Attention.forward`` in MQA mode (same arguments, same output; no attention weights)."""
    state: _SparseState = self.__dict__[_STATE]
    if cache is None:
        cache = past_key_values  # the name transformers still accepts, deprecated
    batch, seq = hidden_states.shape[:-1]
    heads, nope, rope, rank = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

    q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))  # [B, S, q_lora]   c^Q
    q_states = self.q_b_proj(q_resid).view(batch, seq, heads, nope + rope).transpose(1, 2)  # [B, h, S, nope + rope]
    q_nope, q_pe = torch.split(q_states, [nope, rope], dim=-1)  # [B, h, S, nope], [B, h, S, rope]
    compressed = self.kv_a_proj_with_mqa(hidden_states)  # [B, S, c + rope]
    kv_latent, k_pe = torch.split(compressed, [rank, rope], dim=-1)  # [B, S, c], [B, S, rope]
    kv_latent = self.kv_a_layernorm(kv_latent).view(batch, 1, seq, rank)  # [B, 1, S, c]   c^KV
    cos, sin = position_embeddings
    q_pe, k_pe = _hf.apply_rotary_pos_emb_interleave(q_pe, k_pe.view(batch, 1, seq, rope), cos, sin)

    rows = torch.cat([kv_latent, k_pe], dim=-1)  # [B, 1, S, c + rope]   one row per token, all heads
    if cache is not None:
        _check_cache_layout(cache, self.layer_idx, rank + rope)
        rows, _ = cache.update(rows, rows.new_empty(batch, 1, seq, 0), self.layer_idx, kwargs=kwargs)
    keys = rows.shape[-2]  # T: cached + new tokens (a static cache's whole buffer)

    per_head = self.kv_b_proj.weight.view(heads, nope + self.v_head_dim, rank)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]  # [h, nope, c], [h, v, c]
    q_absorbed = torch.einsum("bhsd,hdc->bshc", q_nope, w_uk)  # [B, S, h, c]   W_UK^T q_nope
    q = torch.cat([q_absorbed, q_pe.transpose(1, 2)], dim=-1).reshape(batch * seq, heads, rank + rope)

    allowed = _allowed_keys(attention_mask, batch, seq, keys, hidden_states.device)  # [B, S, T] bool
    indices = _select(self, state, hidden_states, q_resid, position_embeddings, allowed, cache)  # [B·S, k]
    out_latent, _ = ops.sparse_mla(q, rows.reshape(batch * keys, rank + rope), indices, sm_scale=self.scaling,
                                   d_v=rank, backend=state.backend)  # [B·S, h, c]
    attended = torch.einsum("nhc,hvc->nhv", out_latent.to(q.dtype), w_uv)  # [B·S, h, v]
    return self.o_proj(attended.reshape(batch, seq, heads * self.v_head_dim)), None


def _check_cache_layout(cache, layer_idx: int, width: int) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    stored = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
    if isinstance(stored, Tensor) and stored.dim() == 4 and stored.shape[-1] != width:
        raise ValueError(f"cache layer {layer_idx} holds keys of width {stored.shape[-1]} (transformers' own "
                         f"attention layout); dsa-ref's sparse path stores {width}-wide latent rows: start a fresh "
                         f"cache after dsa_ref.integrations.transformers.enable()")


def _allowed_keys(attention_mask: Tensor | None, batch: int, seq: int, keys: int, device) -> Tensor:
    """Which keys each query may see, bool ``[B, S, T]``, from transformers' 4D mask (bool: True = visible;
    float: 0 = visible, the dtype's minimum = masked). No mask: causal over ``T`` keys."""
    if attention_mask is None:
        query_position = torch.arange(seq, device=device) + (keys - seq)  # [S]
        causal = torch.arange(keys, device=device)[None, :] <= query_position[:, None]  # [S, T]
        return causal.expand(batch, seq, keys)
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (seq, keys):
        raise ValueError(f"attention_mask must be transformers' 4D mask [batch, 1, {seq}, {keys}], "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask[:, 0]  # [B or 1, S, T]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min
    return mask.expand(batch, seq, keys)


def _key_ranges(allowed: Tensor) -> tuple[Tensor, Tensor]:
    """``[first, last + 1)`` of each row's visible keys, int32 ``[S]`` each (``0, 0`` for a row with none).
    Only bounds the indexer's work: the mask itself still decides (a mask with holes stays exact)."""
    visible = allowed.to(torch.uint8)  # [S, T]
    keys = allowed.shape[-1]
    any_visible = allowed.any(dim=-1)  # [S]
    first = visible.argmax(dim=-1)  # [S]   the first maximum: the first visible key
    end = keys - visible.flip(-1).argmax(dim=-1)  # [S]
    zero = torch.zeros_like(first)
    return (torch.where(any_visible, first, zero).to(torch.int32),
            torch.where(any_visible, end, zero).to(torch.int32))


# ---------------------------------------------------------------------------- the indexer
@torch.no_grad()
def _select(self, state: _SparseState, hidden_states: Tensor, q_resid: Tensor,
            position_embeddings: tuple[Tensor, Tensor], allowed: Tensor, cache) -> Tensor:
    """The indexer's top-k in flattened key coordinates ``b·T + t``, int32 ``[B·S, min(index_topk, T)]``,
    ``-1`` where a row has fewer visible keys than slots."""
    indexer = self.indexer
    batch, seq, _ = hidden_states.shape
    n_heads, head_dim, rope = indexer.n_heads, indexer.head_dim, indexer.qk_rope_head_dim
    cos, sin = position_embeddings
    q = indexer.wq_b(q_resid).view(batch, seq, n_heads, head_dim)  # [B, S, H_I, d_I]
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)  # [B, S, 1, d_I]
    q_rot, q_pass = torch.split(q, [rope, head_dim - rope], dim=-1)
    k_rot, k_pass = torch.split(k, [rope, head_dim - rope], dim=-1)
    # Half-split (non-interleaved) RoPE, transformers' own function: unlike MLA's, as in DeepSeek's code.
    q_rot, k_rot = _hf.apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)  # [B, S, H_I, d_I]
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)  # [B, S, d_I]
    if state.indexer == "official":
        rotation = _hadamard(state, head_dim, q.dtype, q.device)  # [d_I, d_I], orthonormal
        q, k = q @ rotation, k @ rotation
    if cache is not None:
        k = cache.update_indexer(k, self.layer_idx)  # [B, T, d_I]
    keys = k.shape[1]
    if keys != allowed.shape[-1]:
        raise ValueError(f"layer {self.layer_idx}: the indexer cache holds {keys} keys but the latent cache and the "
                         f"mask hold {allowed.shape[-1]}; the cache was not filled by this path alone")

    score_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) d_I^-1/2 H_I^-1/2: both positive factors move into w.
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).to(score_dtype)
    weights = weights * (n_heads ** -0.5 * indexer.softmax_scale)  # [B, S, H_I]
    k_scale = None
    if state.indexer == "official":
        q, q_scale = quantize_fp8_vectors(q, OFFICIAL_SCALE_FORMAT)  # [B, S, H_I, d_I] fp8, [B, S, H_I]
        k, k_scale = quantize_fp8_vectors(k, OFFICIAL_SCALE_FORMAT)  # [B, T, d_I] fp8, [B, T]
        weights = (weights * q_scale.to(score_dtype)).to(torch.float32)  # ReLU is positively homogeneous
    elif q.dtype not in (torch.float32, torch.float64):
        # transformers scores in float32 whatever the model's dtype
        q, k = q.float(), k.float()

    topk = min(indexer.index_topk, keys)
    selections = []
    for b in range(batch):  # one [S, T] score matrix per sequence rather than a [B·S, B·T] one
        key_start, key_end = _key_ranges(allowed[b])  # [S] each
        scores = ops.lightning_indexer(q[b], weights[b], k[b], key_start=key_start, key_end=key_end,
                                       k_scale=None if k_scale is None else k_scale[b],
                                       backend=state.backend)  # [S, T]
        scores = scores.masked_fill(~allowed[b], float("-inf"))  # a mask with holes (padding inside the range)
        selected = ops.topk_indices(scores, topk, backend=state.backend)  # [S, k], -1 where nothing is left
        selections.append(torch.where(selected >= 0, selected + b * keys, selected))
    return torch.cat(selections, dim=0)  # [B·S, k]


def _hadamard(state: _SparseState, n: int, dtype: torch.dtype, device) -> Tensor:
    """``H_n / sqrt(n)`` (the official ``rotate_activation``), built once per dtype and device."""
    key = (n, dtype, str(device))
    if key not in state.hadamard:
        matrix = torch.from_numpy(hadamard_matrix(n)) * n ** -0.5  # float64, exact up to the 1/sqrt(n)
        state.hadamard[key] = matrix.to(dtype=dtype, device=device)
    return state.hadamard[key]
