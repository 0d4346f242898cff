"""DSA as differentiable PyTorch ops: autograd, ``torch.compile`` and CUDA graphs see one op each.

* :func:`sparse_mla` — eq. (2), differentiable with respect to ``q``, ``kv`` and ``attn_sink``;
* :func:`dsa_attention` — indexer, top-k and sparse MLA in one step; gradients reach ``q`` and ``kv``
  (the selection is integer-valued, and the indexer learns only from its own loss, as in the paper);
* :func:`indexer_loss` — eqs. (3)-(4), differentiable with respect to the indexer's ``q_index``,
  ``weights`` and ``k_index``; the target is a constant;
* :func:`attention_target` — the paper's target ``p`` (no gradient: it is a constant of the loss);
* :func:`lightning_indexer`, :func:`topk_indices` — the selection itself (no gradient);
  :func:`lightning_indexer_paged` — the decode step's scores over a paged fp8 key cache.
* :class:`DSAAttention` — the whole DeepSeek-V3.2 attention layer as an ``nn.Module`` on these ops
  (prefill and training: the indexer's loss beside the output).

Each is a ``torch.library.custom_op`` in the namespace ``dsa_ref`` with a fake (shape) function and,
where there is a gradient, a registered backward that calls the backend's backward op. They run on
the active backend (``backend=``, :func:`dsa_ref.use_backend`, ``DSA_BACKEND``): the Triton kernels
on CUDA tensors, the CuPy kernels through DLPack, or the float64 NumPy reference on CPU tensors
(which keeps float64 inputs in float64, so ``torch.autograd.gradcheck`` applies).

The hot path makes no host synchronization: arguments are checked by shape and dtype only, and key
ranges and ``topk_length`` are clamped on the device instead of being read (see
:func:`dsa_ref.use_data_checks`); so a step can be captured in a CUDA graph. Importing this module
imports torch.
"""

from .layer import DSAAttention
from .ops import (attention_target, dsa_attention, indexer_loss, lightning_indexer, lightning_indexer_paged, sparse_mla,
                  topk_indices)

__all__ = ["DSAAttention", "attention_target", "dsa_attention", "indexer_loss", "lightning_indexer",
           "lightning_indexer_paged", "sparse_mla", "topk_indices"]
