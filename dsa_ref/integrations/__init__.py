"""Adapters that run other libraries' DeepSeek-V3.2 models on dsa-ref's ops.

* :mod:`dsa_ref.integrations.transformers` — Hugging Face transformers' ``DeepseekV32Attention``
  on :func:`dsa_ref.torch.sparse_mla` (MQA mode, the shared latent cached once per token).

Each submodule imports its library only when it is imported itself.
"""
