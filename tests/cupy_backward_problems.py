"""What the cupy backend's sparse-MLA backward tests share: the routing call, the wgmma kernels' bf16 V3.2
problem and cases, the gradient check against the float64 reference, and deterministic mode's chunk
checks (tests/test_cupy_backward_mma.py, test_cupy_backward_wgmma.py and its deterministic twin)."""

from __future__ import annotations

import re

import numpy as np
from cupy_hopper import hopper_backend

from dsa_ref import interop, reference
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.conformance import _sparse_mla_backward_term_scales
from dsa_ref.testing.tolerances import gradient_tolerance_for
from dsa_ref_backends.cupy_cuda import backend as cupy_backend

H200_SMEM = 232448  # MaxSharedMemoryPerBlockOptin of sm_90
A100_SMEM = 166912  # ... of sm_80: too little for the mma backward's 219 KB


# ----------------------------------------------------------------------------- CPU
def backward_path(changes: dict, **defaults) -> str:
    """``backward_kernel_path`` of the bf16 V3.2 backward (d_qk 576, d_v 512) on an H200, with a test
    file's ``defaults`` and then ``changes`` applied."""
    arguments = dict(q_dtype="bfloat16", kv_dtype="bfloat16", d_qk=576, kv_width=576, d_v=512, smem_limit=H200_SMEM,
                     **defaults)
    arguments.update(changes)
    return cupy_backend.backward_kernel_path(arguments.pop("q_dtype"), arguments.pop("kv_dtype"), **arguments)


def count_matches(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))


# ----------------------------------------------------------------------------- GPU
def wgmma_backward_backend():
    """The backend with the wgmma backward chosen and outputs poisoned (an element the kernel forgets to
    write is NaN and fails the comparison), or a skip off an sm_90 GPU with its shared memory."""
    backend = hopper_backend("the wgmma backward", cupy_backend.WGMMA_BACKWARD_SMEM)
    backend.poison_outputs = True
    backend.hopper_backward = True
    return backend


def wgmma_backward_problem(seed: int, *, s_q=6, s_kv, h, topk, sink=False, d_lse=False, with_topk_length=False,
                           d_out_dtype="float32", strided=False, **features):
    """A bf16 V3.2 backward problem whose index rows hold every kind of invalid slot, duplicates, a query
    without a valid slot (query 2) and, with ``with_topk_length``, lengths topk, 0 and 65 (a cut one slot
    into the second step); rows >= s_kv / 2 are read by nobody and are NaN."""
    if s_q < 3 or (with_topk_length and s_q < 4):
        raise ValueError(f"s_q={s_q}: the problem needs queries 0-2 (3 with with_topk_length) for its special rows")
    rng = np.random.default_rng(seed)
    forward = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=576, d_v=512, topk=topk,
                                          dtype="bfloat16", attn_sink=sink, **features)
    inputs = dict(forward.inputs)
    indices = rng.integers(0, s_kv // 2, size=(s_q, topk)).astype(np.int32)
    for n, bad in enumerate((problems.INT32_MIN, -1, s_kv, problems.INT32_MAX)):
        indices[:, n::13] = bad
    indices[1, : topk // 2] = max(int(indices[1, 0]), 0)  # duplicates: one row counted many times
    indices[2] = rng.choice(np.array([-1, s_kv, problems.INT32_MIN, problems.INT32_MAX], np.int32), size=topk)
    inputs["indices"] = indices
    if with_topk_length:
        lengths = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
        lengths[0], lengths[3], lengths[4 % s_q] = topk, 0, min(topk, 65)
        inputs["topk_length"] = lengths
    else:
        inputs["topk_length"] = None
    kv = inputs["kv"].copy()
    kv[problems.unread_rows(indices, s_kv, inputs["topk_length"])] = np.nan
    assert np.isnan(kv[s_kv // 2:]).all()
    inputs["kv"] = kv
    out, lse = reference.sparse_mla(**inputs)
    inputs["out"], inputs["lse"] = out, lse
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    inputs["d_out"] = d_out.astype(interop.NUMPY_DTYPES[d_out_dtype])
    inputs["d_lse"] = rng.standard_normal(lse.shape).astype(np.float32) if d_lse else None
    return problems.Problem("sparse_mla_backward", inputs, dict(forward.params), "bfloat16", strided)


#: wgmma_backward_problem arguments, each run by both modes' wgmma kernels.
WGMMA_BACKWARD_CASES = {
    "h64-topk64-plain": dict(s_kv=300, h=64, topk=64),
    "h64-topk100-everything": dict(s_kv=300, h=64, topk=100, sink=True, d_lse=True, with_topk_length=True),
    "h128-topk100-bf16-dout": dict(s_kv=1000, h=128, topk=100, sink=True, d_lse=True, with_topk_length=True,
                                   d_out_dtype="bfloat16"),
    "h64-topk577-bf16-dout": dict(s_kv=4096, h=64, topk=577, d_out_dtype="bfloat16", with_topk_length=True),
    "h128-topk320-v32-scale": dict(s_kv=2000, h=128, topk=320, sink=True, sm_scale=problems.V32_SM_SCALE,
                                   logit_scale=2.0),
    "h128-topk64-strided": dict(s_kv=500, h=128, topk=64, d_lse=True, strided=True),
    "h64-topk64-few-rows": dict(s_kv=40, h=64, topk=64, d_lse=True),  # each of 20 rows read by many slots
}


def assert_gradients_match(actual, expected, inputs, backend, *, unread_rows_exist=True):
    """dq, dkv and d_attn_sink against the float64 reference with the kit's bf16 gradient tolerance and
    term scales; rows no valid slot reads get exactly 0 (with ``unread_rows_exist``, there must be such
    rows), queries without a valid slot dq 0."""
    assert len(actual) == len(expected)
    tolerance = gradient_tolerance_for("bfloat16", backend)
    scales = _sparse_mla_backward_term_scales(inputs)
    for name, a, e in zip(("dq", "dkv", "d_attn_sink"), actual, expected):
        assert_close(interop.to_numpy(a), e, tolerance, name=name, scale_floor=scales[name])
    dq, dkv = interop.to_numpy(actual[0]), interop.to_numpy(actual[1])
    s_kv = inputs["kv"].shape[0]
    valid = reference.valid_slots(inputs["indices"], s_kv, inputs["topk_length"])  # [s_q, topk]
    unread = problems.unread_rows(inputs["indices"], s_kv, inputs["topk_length"])
    if unread_rows_exist:
        assert unread.any() and (dkv[unread] == 0).all(), "rows no valid slot reads must get exactly 0"
    else:
        assert (dkv[unread] == 0).all(), "rows no valid slot reads must get exactly 0"
    assert (dq[~valid.any(axis=1)] == 0).all(), "queries without a valid slot must get dq = 0"


def count_chunks(monkeypatch, topk: int) -> list[int]:
    """Records the queries of each chunk whose row sums the deterministic path launches."""
    chunks: list[int] = []
    original = cupy_backend._row_ranges

    def recording(sorted_keys, s_kv, first_pair, end_pair, *args, **kwargs):
        chunks.append((end_pair - first_pair) // topk)
        return original(sorted_keys, s_kv, first_pair, end_pair, *args, **kwargs)

    monkeypatch.setattr(cupy_backend, "_row_ranges", recording)
    return chunks


def assert_bitwise_equal(first, second):
    assert len(first) == len(second)
    for name, a, b in zip(("dq", "dkv", "d_attn_sink"), first, second):
        assert interop.to_numpy(a).tobytes() == interop.to_numpy(b).tobytes(), name
