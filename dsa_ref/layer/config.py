"""The hyper-parameters of one DeepSeek-V3.2 attention layer (the official ``ModelArgs`` names)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class DSAConfig:
    """Shapes and constants of a DSA layer; the field names are those of the official ``ModelArgs``.

    The defaults are DeepSeek-V3.2's (``config_671B_v3.2.json``; ``max_seq_len`` and
    ``max_batch_size`` are ``ModelArgs``' defaults and only size the caches).
    :meth:`tiny` gives a layer small enough for tests and tutorials that still has the widths the
    kernels are built for (a 512 + 64 = 576-wide latent, 128-wide indexer heads).

    Fields:
        dim: hidden size (7168).
        n_heads: MLA query heads (128).
        q_lora_rank: width of the query latent c^Q (1536).
        kv_lora_rank: width of the KV latent c^KV, shared by all heads (512).
        qk_nope_head_dim: per-head q/k dims without RoPE, MHA mode (128).
        qk_rope_head_dim: decoupled RoPE dims; one shared k_pe per token (64).
        v_head_dim: per-head value dims, MHA mode (128).
        index_n_heads: indexer heads H_I (64).
        index_head_dim: indexer q/k width d_I (128); a power of two, for the Hadamard rotation.
        index_topk: keys each query keeps (2048).
        max_seq_len: cache length per sequence; YaRN is on when it exceeds ``original_seq_len``.
        max_batch_size: sequences the caches hold.
        original_seq_len: the pre-training context YaRN extends (4096).
        rope_theta: RoPE base (10000).
        rope_factor: YaRN scale factor (40).
        beta_fast, beta_slow: YaRN's correction range, in rotations (32, 1).
        mscale: YaRN attention-temperature coefficient (1.0).
        scale_fmt: fp8 scale format, ``None`` (float32 scales) or ``"ue8m0"`` (powers of two).
        indexer_fp8: quantize the indexer's q and k to fp8 e4m3, as the official code always does.
    """

    dim: int = 7168
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    max_seq_len: int = 4096 * 4
    max_batch_size: int = 8
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    scale_fmt: str | None = "ue8m0"
    indexer_fp8: bool = True

    def __post_init__(self):
        for name in ("dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "max_seq_len",
                     "max_batch_size", "original_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"DSAConfig.{name} must be a positive int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"DSAConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"DSAConfig.{name} must be a real number, got {type(value).__name__} {value!r}")
            # mscale may be 0 (no YaRN temperature); the others divide or take logs.
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "mscale"):
                raise ValueError(f"DSAConfig.{name} must be finite and {'>= 0' if name == 'mscale' else '> 0'}, "
                                 f"got {value!r}")
        if not isinstance(self.indexer_fp8, bool):
            raise TypeError(f"DSAConfig.indexer_fp8 must be a bool, got {type(self.indexer_fp8).__name__} "
                            f"{self.indexer_fp8!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"DSAConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        d_i = self.index_head_dim
        if d_i & (d_i - 1):
            raise ValueError(f"DSAConfig.index_head_dim must be a power of two (Hadamard rotation), got {d_i}")
        if d_i < self.qk_rope_head_dim:
            raise ValueError(f"DSAConfig.index_head_dim={d_i} must be >= qk_rope_head_dim={self.qk_rope_head_dim} "
                             "(the indexer applies RoPE to its first qk_rope_head_dim dims)")
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"DSAConfig.scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def v32(cls, **overrides) -> "DSAConfig":
        """DeepSeek-V3.2's values (the defaults), with ``overrides`` applied."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DSAConfig":
        """A layer for tests and tutorials: few heads and a small hidden size, but the latent
        (512 + 64), indexer head (128) and fp8 layouts of V3.2, so every backend and cache format
        applies. YaRN is on (max_seq_len 64 > original_seq_len 16)."""
        values = dict(dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=16,
                      qk_rope_head_dim=64, v_head_dim=16, index_n_heads=4, index_head_dim=128, index_topk=8,
                      max_seq_len=64, max_batch_size=4, original_seq_len=16, rope_factor=4.0)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "DSAConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def qk_head_dim(self) -> int:
        """Per-head q/k width in MHA mode, nope + rope (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one latent KV row and of an absorbed query in MQA mode, c^KV + k_pe (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn_enabled(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        r"""Main attention's logit scale: :math:`d_{qk}^{-1/2}`, times :math:`m^2` with YaRN,
        :math:`m = 0.1\,\mathrm{mscale}\,\ln(\mathrm{rope\_factor}) + 1`.

        The head width is the MHA one (nope + rope = 192) in both modes: absorbing W_UK into q
        changes how the logit is computed, not its value.
        """
        scale = self.qk_head_dim ** -0.5
        if self.yarn_enabled:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @property
    def fp8_scale_format(self) -> str:
        """``scale_fmt`` in the names of :func:`dsa_ref.quantize_fp8` (``"fp32"`` or ``"ue8m0"``)."""
        return "ue8m0" if self.scale_fmt == "ue8m0" else "fp32"
