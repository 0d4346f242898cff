"""Every op accepts NumPy arrays under any backend and returns results in the caller's array type."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import problems

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn", "int32", "uint8"])
def test_numpy_torch_round_trip_keeps_dtype_and_values(dtype):
    x = (np.arange(24).reshape(2, 3, 4) % 7).astype(interop.NUMPY_DTYPES[dtype])
    t = interop.convert(x, "torch")
    assert interop.dtype_name(t) == dtype and tuple(t.shape) == x.shape
    back = interop.to_numpy(t)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))


def test_non_contiguous_numpy_reaches_torch_with_its_values():
    x = np.arange(40, dtype=np.float32).reshape(4, 10)[:, ::3]
    np.testing.assert_array_equal(interop.convert(x, "torch").numpy(), x)
    reversed_rows = np.arange(12, dtype=np.float32).reshape(3, 4)[::-1]
    np.testing.assert_array_equal(interop.convert(reversed_rows, "torch").numpy(), reversed_rows)


def test_torch_inputs_on_the_numpy_backend_give_torch_outputs():
    p = problems.sparse_mla_problem(np.random.default_rng(0), s_q=3, s_kv=9, h=2, d_qk=16, d_v=8, topk=4,
                                    dtype="bfloat16").inputs
    q, kv, idx = (interop.convert(p[k], "torch") for k in ("q", "kv", "indices"))
    assert q.dtype == torch.bfloat16
    out, lse = dsa_ref.sparse_mla(q, kv, idx, d_v=8, backend="numpy")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and isinstance(lse, torch.Tensor)
    want_out, want_lse = reference.sparse_mla(p["q"], p["kv"], p["indices"], d_v=8)
    np.testing.assert_array_equal(out.numpy(), want_out)
    np.testing.assert_array_equal(lse.numpy(), want_lse)


def test_torch_errors_name_arguments_too():
    with pytest.raises(TypeError, match="q.dtype must be one of .* got int64"):
        dsa_ref.sparse_mla(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_end must be <= s_kv=5"):
        dsa_ref.lightning_indexer(torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(5, 4),
                                  key_end=torch.tensor([5, 6], dtype=torch.int32))


def test_bfloat16_numpy_is_ml_dtypes():
    assert interop.NUMPY_DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)


def test_cupy_carriers_are_read_as_the_dtypes_they_carry():
    class ndarray:  # stands in for cupy.ndarray: same module root and class name
        __module__ = "cupy._core.core"

        def __init__(self, dtype, shape):
            self.dtype, self.shape = np.dtype(dtype), shape

    assert interop.array_kind(ndarray("int16", (2,))) == "cupy"
    assert interop.logical_dtype_name(ndarray("int16", (2, 3))) == "bfloat16"
    assert interop.logical_dtype_name(ndarray("uint8", (2, 3))) == "float8_e4m3fn"
    assert interop.logical_dtype_name(ndarray("uint8", (2, 656)), packed_kv=True) == "uint8"
    assert interop.logical_dtype_name(ndarray("float32", (2, 3))) == "float32"
    assert interop.logical_dtype_name(np.zeros(3, np.int16)) == "int16"  # only cupy arrays carry


def test_a_torch_tensor_already_on_the_device_is_handed_back_as_it_is():
    torch = pytest.importorskip("torch")
    x = torch.zeros(3)
    assert interop.convert(x, "torch", "cpu") is x
    assert interop.convert(x, "torch", torch.device("cpu")) is x
    moved = interop.convert(x, "torch", "meta")
    assert moved is not x and moved.device.type == "meta"
