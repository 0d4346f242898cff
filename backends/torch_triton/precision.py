"""How the tensor cores multiply each operand dtype."""

from __future__ import annotations

import torch


def dot_precision(dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    float32 operands multiply as 3xTF32, which is float32-accurate: plain TF32 rounds them to a
    10-bit mantissa, and a score or logit that cancels (small against its terms) then loses its
    leading digits (measured on an H100: twice the float32 tolerance on a one-key indexer score).
    16- and 8-bit operands are exact in TF32, so their products are exact either way.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"
