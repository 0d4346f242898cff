"""The inputs and checks that the tests of the ``triton`` backend's two Gluon (Hopper) sparse MLA forwards
share (tests/test_triton_gluon.py, test_triton_gluon_pingpong.py). Import it after their
``pytest.importorskip("torch")`` and ``("triton")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsa_ref import interop, reference
from dsa_ref.testing.assertions import assert_close
from dsa_ref.testing.tolerances import tolerance_for
from dsa_ref_backends.torch_triton import sparse_mla

H100_SHARED_MEMORY_PER_BLOCK = 232448  # 227 KiB, the opt-in maximum of sm_90


def zero_inputs(*, s_q=2, h=64, s_kv=16, topk=8, dtype=torch.bfloat16, device="cpu"):
    """``(q, kv, indices)`` of zeros with V3.2's rows of 576."""
    q = torch.zeros(s_q, h, 576, dtype=dtype, device=device)
    kv = torch.zeros(s_kv, 576, dtype=dtype, device=device)
    indices = torch.zeros(s_q, topk, dtype=torch.int32, device=device)
    return q, kv, indices


def require_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper (sm_90) GPU")


def awkward_case(h, s_kv, topk, *, seed, sink, with_topk_length, index_dtype, s_q, lengths):
    """``(q, kv, indices, topk_length, attn_sink)``, bf16 on the CPU: index rows that hold every kind of
    invalid slot, duplicates (row 1) and no valid slot at all (row 2); with ``with_topk_length``, random
    lengths except ``lengths`` (row: length, at most topk)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(s_q, h, 576, generator=generator).to(torch.bfloat16)
    kv = torch.randn(s_kv, 576, generator=generator).to(torch.bfloat16)
    indices = torch.randint(0, s_kv, (s_q, topk), generator=generator).to(index_dtype)
    for n, bad in enumerate((-(2**31), -1, s_kv, 2**31 - 1)):
        indices[:, n::13] = bad
    if index_dtype == torch.int64:
        indices[:, 5::17] = 2**32 + 3  # wraps to row 3 if narrowed without a check
    indices[1, : topk // 2] = indices[1, 0].clamp(min=0)  # duplicates: one row counted many times
    indices[2] = -1  # no valid slot: out 0, lse -inf
    topk_length = None
    if with_topk_length:
        topk_length = torch.randint(0, topk + 1, (s_q,), generator=generator, dtype=torch.int32)
        for row, length in lengths.items():
            topk_length[row] = min(topk, length)
    attn_sink = torch.randn(h, generator=generator) if sink else None
    return q, kv, indices, topk_length, attn_sink


def to_numpy(x):
    return None if x is None else interop.to_numpy(x)


def assert_matches_reference(out, lse, q, kv, indices, topk_length, attn_sink, **params):
    """out and lse against the float64 reference (d_v 512, ``params`` added) with the kit's bf16 tolerance."""
    expected_out, expected_lse = reference.sparse_mla(to_numpy(q), to_numpy(kv), indices.numpy(), d_v=512,
                                                      topk_length=to_numpy(topk_length),
                                                      attn_sink=to_numpy(attn_sink), **params)
    tolerance = tolerance_for("bfloat16")
    assert_close(to_numpy(out), expected_out, tolerance, name="out")
    assert_close(to_numpy(lse), expected_lse, tolerance, name="lse", scale_by_max=False)


def check_awkward_case(case, kernel: str):
    """Runs ``sparse_mla.sparse_mla(kernel=kernel)`` twice on ``case`` moved to the GPU: bitwise-equal
    reruns, the reference's results, out 0 and lse -inf on row 2. Returns the GPU inputs, out and lse."""
    cuda = [None if x is None else x.cuda() for x in case]
    out, lse = sparse_mla.sparse_mla(cuda[0], cuda[1], cuda[2], 576**-0.5, 512, cuda[3], cuda[4], kernel=kernel)
    again_out, again_lse = sparse_mla.sparse_mla(cuda[0], cuda[1], cuda[2], 576**-0.5, 512, cuda[3], cuda[4],
                                                 kernel=kernel)
    assert torch.equal(out.view(torch.int32), again_out.view(torch.int32)), "repeated run differs"
    assert torch.equal(lse.view(torch.int32), again_lse.view(torch.int32)), "repeated run differs"
    assert_matches_reference(out, lse, *case)
    assert np.all(to_numpy(out)[2] == 0.0) and np.all(np.isneginf(to_numpy(lse)[2])), "a row with no valid slot"
    return cuda, out, lse


def check_int64_indices_and_views(launch, case):
    """``launch`` (a Gluon kernel's launcher) on a non-contiguous q, kv from row 1 and int64 ``indices - 1``
    (those past int32 invalid) against the reference."""
    q, kv, indices, topk_length, attn_sink = case
    wide_q = torch.cat([q, q], dim=-1).cuda()[..., 576:]  # not contiguous: the launcher copies it
    out, lse = launch(wide_q, kv.cuda()[1:], (indices - 1).cuda(), 0.05, topk_length.cuda(), attn_sink.cuda())
    assert_matches_reference(out, lse, q, kv[1:], indices - 1, topk_length, attn_sink, sm_scale=0.05)
