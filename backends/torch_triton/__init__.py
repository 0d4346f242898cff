"""The ``triton`` backend of dsa-ref: Triton kernels on torch tensors.

Kernels, one file each, every one readable on its own:

* :mod:`.indexer` - lightning indexer, tensor-core scores with ReLU, head sum and key-range mask fused;
* :mod:`.topk` - radix select over order-preserving integer keys;
* :mod:`.sparse_mla` - sparse MLA forward over bf16/fp16/fp32 rows or the packed FP8 cache;
* :mod:`.dsa` - DSA attention with the indexer -> top-k step fused by chunks.

Importing this package imports torch and triton; ``import dsa_ref`` never does.
"""

from . import _interpreter
from .backend import TritonBackend

# Under TRITON_INTERPRET=1 the kernels run on Triton's CPU interpreter; make it compute what the GPU does.
_interpreter.install()

__all__ = ["TritonBackend"]
