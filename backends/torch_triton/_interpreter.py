"""Three fixes to Triton's CPU interpreter (``TRITON_INTERPRET=1``), so that the kernels compute
on the CPU what they compute on the GPU. Applied by :func:`install` when the backend loads,
and only under the interpreter; the kernels themselves carry no interpreter special cases.

1. ``tl.dot`` on bfloat16 operands. The interpreter stores bfloat16 as ``uint16`` and hands the
   raw integers to ``np.matmul``, so the product is garbage (Triton 3.6, 3.8, 3.9). The fix
   widens bfloat16 operands to float32 before the product: a bfloat16 value is the top half of
   a float32, and a product of two bfloat16 values is exact in float32, so the result matches
   the GPU's tensor cores (bf16 x bf16 -> fp32 accumulate) up to summation order.
2. float32 -> bfloat16 casts. The interpreter truncates (and its round-to-nearest path is not
   round-half-to-even; Triton 3.6, 3.8, 3.9); the GPU's ``fptrunc`` rounds to nearest even. The fix
   rounds with :mod:`ml_dtypes`, which rounds to nearest even.
3. Scalars as loop bounds. The interpreter keeps a scalar as a one-element array and converts it
   with ``int(array)``, which NumPy >= 2.4 refuses for arrays of one dimension; so
   ``range(lo, hi)`` over a reduced value (``lo = tl.min(...)``) fails (Triton 3.6; 3.8 and 3.9
   squeeze the array first, and there the fix changes nothing). The fix converts with
   ``.item()``.

Each fix wraps the interpreter's own method and hands every other case to it, so it applies to
any Triton that has the method, whichever version it is.

float16 and float8 (e4m3) dots need no fix: the interpreter widens float8 to float16 and
multiplies float16 with a float32 accumulator (checked by ``tests/test_triton_kernels.py``).

Not patched, but kept by the kernels: a load or store mask must be stored as booleans. Triton
>= 3.9's interpreter refuses any other mask ("mask has unsupported dtype"), and its comparisons
keep their operands' type, so a scalar predicate broadcast against a block (``flag & m_block``)
becomes an int32 mask. The kernels combine no scalar predicate with a block mask, and
``tests/test_triton_kernels.py`` fails on any Triton version when a mask is not boolean.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

_INSTALLED = False


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on its CPU interpreter (read from the environment, as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 with the same value (exact: bf16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def install() -> None:
    """Patch the interpreter once; a no-op when kernels run on the GPU."""
    global _INSTALLED
    if _INSTALLED or not interpreter_enabled():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot
    original_trunc = builder_cls.create_fp_trunc

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _bf16_bits_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_bits_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            product = np.matmul(a_data, b_data, dtype=np.float32)
            return interpreter.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = src.data.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_trunc(self, src, dst_type)

    original_patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    builder_cls.create_dot = create_dot
    builder_cls.create_fp_trunc = create_fp_trunc
    _INSTALLED = True
