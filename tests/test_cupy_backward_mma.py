"""The cupy backend's tensor-core sparse-MLA backward (csrc/sparse_mla_backward_mma.cu).

CPU part: which inputs the wrapper routes to the mma.sync kernel and which keep the float32 kernels,
and that the host's shared-memory size is the kernel's. GPU part (``@pytest.mark.gpu``): the V3.2
shape (bf16, d_qk 576, d_v 512) against the float64 reference with the kit's bf16 gradient
tolerance and term scales, on duplicates, invalid indices of every kind, topk_length, attn_sink,
d_lse, a query without a valid slot, unread rows filled with NaN (their gradient must stay exactly
0), heads that do not fill a block of 64, and one larger case; each test checks that the mma
kernel is the one that ran.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.conformance import _sparse_mla_backward_term_scales
from dsa_ref.testing.tolerances import gradient_tolerance_for
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import kernels

H200_SMEM = 232448  # MaxSharedMemoryPerBlockOptin of sm_90
A100_SMEM = 166912  # ... of sm_80: too little for the mma backward's 219 KB


# ----------------------------------------------------------------------------- CPU
def _path(**changes):
    arguments = dict(q_dtype="bfloat16", kv_dtype="bfloat16", d_qk=576, kv_width=576, d_v=512, deterministic=False,
                     smem_limit=H200_SMEM)
    arguments.update(changes)
    return cupy_backend.backward_kernel_path(arguments.pop("q_dtype"), arguments.pop("kv_dtype"), **arguments)


def test_v32_bf16_backward_routes_to_the_mma_kernel():
    assert _path() == "mma"


@pytest.mark.parametrize("changes", [
    dict(q_dtype="float16"), dict(q_dtype="float32"), dict(kv_dtype="float32"), dict(kv_dtype="float16"),
    dict(q_dtype="float16", kv_dtype="float16"), dict(d_qk=64, kv_width=64), dict(kv_width=512),
    dict(d_v=256), dict(d_v=576), dict(deterministic=True), dict(smem_limit=A100_SMEM),
])
def test_other_backward_inputs_keep_the_float32_kernels(changes):
    assert _path(**changes) == "simt"


def test_mma_backward_kernel_is_listed_and_its_shared_memory_agrees_with_the_source():
    assert kernels.KERNELS["sparse_mla_backward_mma.cu"] == ("sparse_mla_bwd_mma",)
    text = kernels.source_text("sparse_mla_backward_mma.cu")
    assert "sparse_mla_bwd_mma(" in text
    total = re.search(r"TOTAL = .*// (\d+)", text)
    assert total is not None and int(total.group(1)) == cupy_backend.BACKWARD_MMA_SMEM
    assert cupy_backend.BACKWARD_MMA_SMEM <= H200_SMEM


# ----------------------------------------------------------------------------- GPU
def _backend():
    pytest.importorskip("cupy")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    if cupy_backend._smem_optin() < cupy_backend.BACKWARD_MMA_SMEM:
        pytest.skip("the mma backward needs sm_90's shared memory per block")
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    return backend


def _problem(seed: int, *, s_q, s_kv, h, topk, empty_query=None, **features):
    """A bf16 V3.2 backward problem; ``empty_query`` gets no valid slot at all."""
    rng = np.random.default_rng(seed)
    forward = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=576, d_v=512, topk=topk,
                                          dtype="bfloat16", **{k: v for k, v in features.items() if k != "d_lse"})
    inputs = dict(forward.inputs)
    if empty_query is not None:
        indices = inputs["indices"].copy()
        indices[empty_query] = rng.choice(np.array([-1, s_kv, np.iinfo(np.int32).min], np.int32), size=topk)
        inputs["indices"] = indices
    kv = inputs["kv"].copy()  # rows nobody reads are NaN: reading or writing one shows
    kv[problems.unread_rows(inputs["indices"], s_kv, inputs["topk_length"])] = np.nan
    inputs["kv"] = kv
    out, lse = reference.sparse_mla(**inputs)
    inputs["out"], inputs["lse"] = out, lse
    inputs["d_out"] = rng.standard_normal(out.shape).astype(np.float32)
    inputs["d_lse"] = rng.standard_normal(lse.shape).astype(np.float32) if features.get("d_lse") else None
    return problems.Problem("sparse_mla_backward", inputs, dict(forward.params), "bfloat16")


def _launched(monkeypatch) -> list[str]:
    """Records the name of every kernel the backend asks for."""
    names: list[str] = []
    original = kernels.kernel

    def recording(source, name, *args, **kwargs):
        names.append(name)
        return original(source, name, *args, **kwargs)

    monkeypatch.setattr(kernels, "kernel", recording)
    return names


def _check(problem, monkeypatch, *, deterministic=False):
    backend = _backend()
    launched = _launched(monkeypatch)
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert ("sparse_mla_bwd_mma" in launched) != deterministic, launched
    assert len(actual) == len(expected)
    tolerance = gradient_tolerance_for("bfloat16", backend)
    scales = _sparse_mla_backward_term_scales(inputs)
    for name, a, e in zip(("dq", "dkv", "d_attn_sink"), actual, expected):
        assert_close(interop.to_numpy(a), e, tolerance, name=name, scale_floor=scales[name])
    dq, dkv = interop.to_numpy(actual[0]), interop.to_numpy(actual[1])
    s_kv = inputs["kv"].shape[0]
    valid = reference.valid_slots(inputs["indices"], s_kv, inputs["topk_length"])  # [s_q, topk]
    unread = problems.unread_rows(inputs["indices"], s_kv, inputs["topk_length"])
    assert (dkv[unread] == 0).all(), "rows no valid slot reads must get exactly 0"
    assert (dq[~valid.any(axis=1)] == 0).all(), "queries without a valid slot must get dq = 0"
    return actual


SMALL_CASES = {
    f"h{h}-topk{topk}": dict(s_q=3, s_kv=300, h=h, topk=topk, invalid_fraction=0.2, duplicate_fraction=0.25,
                             topk_length=True, attn_sink=True, d_lse=True, empty_query=1)
    for h in (64, 128, 16) for topk in (64, 128)
}
SMALL_CASES["h16-topk100-plain"] = dict(s_q=3, s_kv=300, h=16, topk=100)  # a partial last tile, no options
SMALL_CASES["h100-topk64-duplicates"] = dict(s_q=3, s_kv=40, h=100, topk=64, duplicate_fraction=0.5,
                                             logit_scale=3.0)  # few rows, each read many times


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_mma_backward_matches_reference(name, monkeypatch):
    _check(_problem(len(name), **SMALL_CASES[name]), monkeypatch)


@pytest.mark.gpu
def test_mma_backward_without_queries():
    backend = _backend()
    problem = _problem(3, s_q=0, s_kv=30, h=64, topk=16, attn_sink=True)
    dq, dkv, d_sink = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert interop.to_numpy(dq).shape == (0, 64, 576)
    assert (interop.to_numpy(dkv) == 0).all() and (interop.to_numpy(d_sink) == 0).all()


@pytest.mark.gpu
def test_mma_backward_at_a_larger_shape(monkeypatch):
    problem = _problem(11, s_q=24, s_kv=4096, h=128, topk=2048, invalid_fraction=0.05, duplicate_fraction=0.05,
                       attn_sink=True, d_lse=True, distribution="recent")
    _check(problem, monkeypatch)


@pytest.mark.gpu
def test_deterministic_v32_backward_keeps_the_repeatable_path(monkeypatch):
    problem = _problem(5, s_q=3, s_kv=300, h=64, topk=128, invalid_fraction=0.2, duplicate_fraction=0.25)
    first = _check(problem, monkeypatch, deterministic=True)
    second = _check(problem, monkeypatch, deterministic=True)
    for a, b in zip(first, second):
        assert interop.to_numpy(a).tobytes() == interop.to_numpy(b).tobytes()
