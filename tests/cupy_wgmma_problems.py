"""The V3.2 forward problems, cases and checks that the tests of the cupy backend's wgmma sparse-MLA forwards
run on a Hopper GPU (tests/test_cupy_wgmma.py, test_cupy_wgmma_v2.py, and over the packed FP8 cache
test_cupy_wgmma_fp8.py)."""

from __future__ import annotations

import numpy as np
from cupy_launches import record_launches

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.tolerances import tolerance_for


def forward_problem(seed: int, *, s_q, s_kv, h, topk, empty_query=None, topk_lengths=None, **features):
    """A bf16-query V3.2 forward problem (``packed_fp8=True`` in ``features``: over the packed FP8 cache);
    ``empty_query`` gets no valid slot at all; ``topk_lengths`` replaces the random lengths (0, cuts inside
    a tile, ...); rows nobody reads are poisoned (:func:`poison_unread_rows`)."""
    rng = np.random.default_rng(seed)
    problem = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=576, d_v=512, topk=topk,
                                          dtype="bfloat16", **features)
    inputs = dict(problem.inputs)
    if empty_query is not None:
        indices = inputs["indices"].copy()
        indices[empty_query] = rng.choice(np.array([-1, s_kv, problems.INT32_MIN, problems.INT32_MAX], np.int32),
                                          size=topk)
        inputs["indices"] = indices
    if topk_lengths is not None:
        inputs["topk_length"] = np.asarray(topk_lengths, np.int32)
    poison_unread_rows(inputs)
    return problems.Problem("sparse_mla", inputs, dict(problem.params), "bfloat16")


def poison_unread_rows(inputs):
    """Rows of ``inputs["kv"]`` that no valid slot reads become NaN: bf16 rows NaN, packed FP8 rows 0xFF
    bytes (NaN latents, scales and RoPE values), so that a kernel reading one fails."""
    kv = inputs["kv"].copy()
    kv[problems.unread_rows(inputs["indices"], kv.shape[0], inputs["topk_length"])] = \
        0xFF if kv.dtype == np.uint8 else np.nan
    inputs["kv"] = kv


#: forward_problem arguments both kernels run.
FORWARD_CASES = {
    f"h{h}-topk{topk}": dict(s_q=4, s_kv=600, h=h, topk=topk, invalid_fraction=0.2, duplicate_fraction=0.25,
                             attn_sink=True, empty_query=1, topk_lengths=[topk, 0, 37, topk - 64 + 5])
    for h in (64, 128) for topk in (64, 128, 320)
}
FORWARD_CASES["h64-topk100-plain"] = dict(s_q=3, s_kv=300, h=64, topk=100)  # a partial last tile, no options
FORWARD_CASES["h128-topk64-few-rows"] = dict(s_q=3, s_kv=40, h=128, topk=64, duplicate_fraction=0.5,
                                             logit_scale=3.0)  # few rows, each read many times
FORWARD_CASES["h64-topk2048"] = dict(s_q=2, s_kv=5000, h=64, topk=2048, invalid_fraction=0.05, topk_length=True,
                                     attn_sink=True)
FORWARD_CASES["h64-all-invalid"] = dict(s_q=3, s_kv=50, h=64, topk=64, invalid_fraction=1.0)


def run_forward(problem, backend):
    out, lse = dsa_ref.sparse_mla(**problem.native_inputs(backend), backend=backend)
    return interop.to_numpy(out), interop.to_numpy(lse)


def check_forward(problem, monkeypatch, backend, kernel: str):
    """``(out, lse)`` of ``problem`` on ``backend``, which must launch ``kernel`` alone, against the
    float64 reference with the kit's bf16 tolerance; queries without a valid slot give 0 and -inf."""
    launched = record_launches(monkeypatch)
    out, lse = run_forward(problem, backend)
    assert launched == [kernel], launched
    compare_forward(out, lse, problem.inputs, backend)
    return out, lse


def compare_forward(out, lse, inputs, backend):
    """``out`` and ``lse`` against the float64 reference on ``inputs`` (a packed cache unpacked exactly) with
    the kit's bf16 tolerance; queries without a valid slot give 0 and -inf."""
    expected_out, expected_lse = reference.sparse_mla(**inputs)
    tolerance = tolerance_for("bfloat16", backend)
    assert_close(out, expected_out, tolerance, name="out")
    assert_close(lse, expected_lse, tolerance, name="lse")
    empty = ~reference.valid_slots(inputs["indices"], inputs["kv"].shape[0], inputs["topk_length"]).any(axis=1)
    assert (out[empty] == 0).all() and np.isneginf(lse[empty]).all()
