"""The cupy backend's training ops: sparse MLA backward, attention target, indexer loss and its backward.

CPU part: the host-side planning (refusals with values, query chunks). GPU part (``@pytest.mark.gpu``):
every op through the public dispatch against the float64 reference on adversarial inputs (invalid
indices of every kind, duplicates, topk_length, attention sink, d_lse, non-contiguous views, empty
rows, s_q = 0), outputs poisoned with NaN, every dtype, the real shapes, and deterministic mode
bitwise repeatable. ``test_small_case_for_sanitizer`` is sized for compute-sanitizer.
"""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import assert_close, problems
from dsa_ref.testing.tolerances import tolerance_for
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import kernels


# ----------------------------------------------------------------------------- CPU
def test_training_kernels_are_listed_for_the_compile_check():
    assert "sparse_mla_backward.cu" in kernels.KERNELS and "indexer_loss.cu" in kernels.KERNELS
    for source in ("sparse_mla_backward.cu", "indexer_loss.cu"):
        text = kernels.source_text(source)
        for name in kernels.KERNELS[source]:
            assert f"{name}(" in text, (source, name)


def test_backward_refusals_carry_the_offending_value():
    q = np.zeros((2, 129, 576), np.float32)
    reasons = cupy_backend._training_attention_reasons("sparse_mla_backward", {"q": q, "d_v": 512}, 232448)
    assert any("h = 129" in r for r in reasons), reasons
    q = np.zeros((2, 8, 40000), np.float32)
    reasons = cupy_backend._training_attention_reasons("sparse_mla_backward", {"q": q, "d_v": 512}, 232448)
    assert any("2 * d_qk + d_v = 80512" in r for r in reasons), reasons
    assert cupy_backend._training_attention_reasons("attention_target", {"q": np.zeros((2, 128, 576))}, 232448) == []


def test_query_chunks_cover_every_query_once_and_respect_the_budget():
    chunks = list(cupy_backend._query_chunks(1000, bytes_per_query=cupy_backend.CHUNK_BYTES // 64))
    assert [c.start for c in chunks] == list(range(0, 1000, 64)) and chunks[-1].stop == 1000
    assert list(cupy_backend._query_chunks(0, 10)) == []
    assert list(cupy_backend._query_chunks(3, 10 * cupy_backend.CHUNK_BYTES)) == [slice(0, 1), slice(1, 2), slice(2, 3)]


# ----------------------------------------------------------------------------- GPU helpers
class _TorchCuda:
    """Hands arrays to the public ops as torch CUDA tensors (real bf16 / fp8 dtypes)."""

    @staticmethod
    def to_native(x):
        return interop.convert(x, "torch", "cuda")


def _backend():
    pytest.importorskip("cupy")
    pytest.importorskip("torch")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    backend.poison_outputs = True  # an element a kernel forgets to write is NaN and fails the comparison
    return backend


def _on_gpu(inputs: dict, strided: bool = False) -> dict:
    return {name: problems._native(_TorchCuda(), value, strided) if isinstance(value, np.ndarray) else value
            for name, value in inputs.items()}


def _check(actual, expected, dtype: str, name: str) -> None:
    assert_close(interop.to_numpy(actual), expected, tolerance_for(dtype), name=name)


def _mla_case(seed: int, *, s_q, s_kv, h, d_qk, d_v, topk, dtype, with_d_lse=False, **features):
    """Backward inputs: a sparse-MLA problem, the reference forward on it, random output gradients."""
    rng = np.random.default_rng(seed)
    problem = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                          **features)
    inputs = dict(problem.inputs)
    sm_scale = inputs.pop("sm_scale", None)
    out, lse = reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], sm_scale=sm_scale, d_v=d_v,
                                    topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"])
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    d_lse = rng.standard_normal(lse.shape).astype(np.float32) if with_d_lse else None
    return dict(inputs, out=out, lse=lse, d_out=d_out, d_lse=d_lse, sm_scale=sm_scale)


def _check_mla_backward(case: dict, dtype: str, *, strided=False, deterministic=False):
    backend = _backend()
    expected = reference.sparse_mla_backward(**case)
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.sparse_mla_backward(**_on_gpu(case, strided), backend=backend)
    assert len(actual) == len(expected)
    for name, a, e in zip(("dq", "dkv", "d_attn_sink"), actual, expected):
        _check(a, e, dtype, name)
    dq, dkv = interop.to_numpy(actual[0]), interop.to_numpy(actual[1])
    valid = reference.valid_slots(case["indices"], case["kv"].shape[0], case["topk_length"])  # [s_q, topk]
    read = np.zeros(case["kv"].shape[0], bool)
    read[case["indices"][valid]] = True
    assert (dkv[~read] == 0).all(), "rows no valid slot reads must get exactly 0"
    assert (dq[~valid.any(axis=1)] == 0).all(), "queries without a valid slot must get dq = 0"
    return actual


MLA_CASES = {
    "bf16-h128-everything": dict(s_q=9, s_kv=700, h=128, d_qk=576, d_v=512, topk=256, dtype="bfloat16",
                                 invalid_fraction=0.1, duplicate_fraction=0.2, topk_length=True, attn_sink=True,
                                 with_d_lse=True),
    "bf16-h20-few-rows": dict(s_q=6, s_kv=40, h=20, d_qk=576, d_v=512, topk=100, dtype="bfloat16",
                              invalid_fraction=0.3, duplicate_fraction=0.5),
    "f16-h64-sink": dict(s_q=7, s_kv=300, h=64, d_qk=576, d_v=512, topk=130, dtype="float16", attn_sink=True,
                         invalid_fraction=0.2, logit_scale=3.0),
    "f32-odd-dims": dict(s_q=5, s_kv=50, h=3, d_qk=40, d_v=19, topk=33, dtype="float32", invalid_fraction=0.3,
                         topk_length=True, with_d_lse=True),
    "f32-all-invalid": dict(s_q=4, s_kv=50, h=3, d_qk=40, d_v=40, topk=33, dtype="float32", invalid_fraction=1.0,
                            attn_sink=True),
    "f16-h1-sm-scale": dict(s_q=3, s_kv=20, h=1, d_qk=64, d_v=32, topk=300, dtype="float16", sm_scale=0.3,
                            duplicate_fraction=0.3),
    "bf16-no-queries": dict(s_q=0, s_kv=30, h=4, d_qk=576, d_v=512, topk=16, dtype="bfloat16", attn_sink=True),
}


# ----------------------------------------------------------------------------- GPU: sparse MLA backward
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MLA_CASES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_sparse_mla_backward_matches_reference(name, deterministic):
    features = dict(MLA_CASES[name])
    dtype = features["dtype"]
    _check_mla_backward(_mla_case(len(name), **features), dtype, deterministic=deterministic)


@pytest.mark.gpu
def test_sparse_mla_backward_takes_non_contiguous_inputs():
    case = _mla_case(1, s_q=5, s_kv=90, h=16, d_qk=576, d_v=512, topk=64, dtype="bfloat16", invalid_fraction=0.2,
                     duplicate_fraction=0.2, topk_length=True, attn_sink=True, with_d_lse=True)
    _check_mla_backward(case, "bfloat16", strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [64, 128])
def test_sparse_mla_backward_at_real_shapes(h):
    case = _mla_case(h, s_q=192, s_kv=8192, h=h, d_qk=576, d_v=512, topk=2048, dtype="bfloat16",
                     invalid_fraction=0.05, duplicate_fraction=0.05, attn_sink=True, distribution="recent")
    _check_mla_backward(case, "bfloat16", deterministic=h == 128)


@pytest.mark.gpu
def test_deterministic_backward_is_bitwise_repeatable():
    backend = _backend()
    case = _on_gpu(_mla_case(7, s_q=33, s_kv=200, h=128, d_qk=576, d_v=512, topk=512, dtype="bfloat16",
                             duplicate_fraction=0.3, invalid_fraction=0.1, attn_sink=True))
    index_case = _on_gpu(_indexer_case(8, s_q=40, s_kv=64, h_i=64, d_i=128, dtype="bfloat16", topk=128))
    with dsa_ref.use_deterministic():
        runs = [dsa_ref.sparse_mla_backward(**case, backend=backend) for _ in range(2)]
        index_runs = [dsa_ref.indexer_loss_backward(**index_case, backend=backend) for _ in range(2)]
    for first, second in (runs, index_runs):
        for a, b in zip(first, second):
            assert interop.to_numpy(a).tobytes() == interop.to_numpy(b).tobytes()


# ----------------------------------------------------------------------------- GPU: attention target
@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "features"), [
    ("bfloat16", dict(s_q=9, s_kv=700, h=128, d_qk=576, d_v=512, topk=256, invalid_fraction=0.2,
                      duplicate_fraction=0.2, topk_length=True)),
    ("bfloat16", dict(s_q=5, s_kv=300, h=20, d_qk=576, d_v=512, topk=100, packed_fp8=True, invalid_fraction=0.5)),
    ("float16", dict(s_q=6, s_kv=60, h=7, d_qk=64, d_v=64, topk=50, logit_scale=4.0)),
    ("float32", dict(s_q=4, s_kv=50, h=3, d_qk=40, d_v=19, topk=33, invalid_fraction=1.0)),
    ("bfloat16", dict(s_q=64, s_kv=8192, h=128, d_qk=576, d_v=512, topk=2048, invalid_fraction=0.05)),
])
def test_attention_target_matches_reference(dtype, features):
    backend = _backend()
    rng = np.random.default_rng(features["topk"])
    problem = problems.sparse_mla_problem(rng, dtype=dtype, **features)
    inputs = problem.inputs
    _, lse = reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], d_v=features["d_v"],
                                  topk_length=inputs["topk_length"])
    call = dict(q=inputs["q"], kv=inputs["kv"], indices=inputs["indices"], lse=lse, topk_length=inputs["topk_length"])
    expected = reference.attention_target(**call)
    actual = dsa_ref.attention_target(**_on_gpu(call, strided=features["s_q"] < 10), backend=backend)
    _check(actual, expected, dtype, "target")


# ----------------------------------------------------------------------------- GPU: indexer loss
def _indexer_case(seed: int, *, s_q, s_kv, h_i, d_i, dtype, topk=None, ranges="causal", empty_fraction=0.2,
                  invalid_fraction=0.2):
    """Indexer-loss inputs: sparse with ``topk`` (adversarial indices, duplicates), else dense over key
    ranges; the target non-negative with zeros, one row without mass, and fp8 inputs with k_scale."""
    rng = np.random.default_rng(seed)
    base = problems.indexer_problem(rng, s_q=s_q, s_kv=s_kv, h_i=h_i, d_i=d_i, dtype=dtype, ranges=ranges,
                                    empty_fraction=empty_fraction).inputs
    inputs = dict(q_index=base["q"], weights=base["weights"], k_index=base["k"], k_scale=base["k_scale"])
    if topk is not None:
        indices = problems.selected_indices(rng, s_q=s_q, s_kv=s_kv, topk=topk)
        duplicate = rng.random(indices.shape) < 0.2
        indices = np.where(duplicate, np.roll(indices, 1, axis=1), indices)
        invalid = rng.random(indices.shape) < invalid_fraction
        adversarial = rng.choice(np.array([problems.INT32_MIN, -1, s_kv, problems.INT32_MAX], np.int64),
                                 size=indices.shape)
        inputs["indices"] = np.where(invalid, adversarial, indices).astype(np.int32)
        n = topk
    else:
        inputs["key_start"], inputs["key_end"] = base["key_start"], base["key_end"]
        n = s_kv
    target = rng.random((s_q, n)) * (rng.random((s_q, n)) < 0.7)
    if s_q > 1:
        target[1] = 0.0  # a query without target mass: loss 0, no gradient
    inputs["target"] = target.astype(np.float32)
    inputs["d_loss"] = rng.standard_normal(s_q).astype(np.float32)
    return inputs


INDEXER_CASES = {
    "bf16-sparse": dict(s_q=37, s_kv=300, h_i=64, d_i=128, dtype="bfloat16", topk=200),
    "f32-sparse-odd": dict(s_q=9, s_kv=70, h_i=3, d_i=19, dtype="float32", topk=50, invalid_fraction=0.5),
    "f16-dense-ragged": dict(s_q=19, s_kv=333, h_i=5, d_i=32, dtype="float16", ranges="ragged"),
    "bf16-dense-causal": dict(s_q=40, s_kv=600, h_i=64, d_i=128, dtype="bfloat16", ranges="causal"),
    "f32-dense-full": dict(s_q=8, s_kv=130, h_i=33, d_i=100, dtype="float32", ranges="full", empty_fraction=0.0),
    "bf16-sparse-real": dict(s_q=128, s_kv=8192, h_i=64, d_i=128, dtype="bfloat16", topk=2048,
                             invalid_fraction=0.05),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(INDEXER_CASES) + ["fp8-sparse", "fp8-dense"])
def test_indexer_loss_matches_reference(name):
    backend = _backend()
    if name.startswith("fp8"):
        features = dict(s_q=21, s_kv=257, h_i=64, d_i=128, dtype="float8_e4m3fn",
                        topk=128 if name == "fp8-sparse" else None)
    else:
        features = INDEXER_CASES[name]
    case = _indexer_case(len(name), **features)
    case.pop("d_loss")
    expected = reference.indexer_loss(**case)
    actual = dsa_ref.indexer_loss(**_on_gpu(case, strided=features["s_q"] < 20), backend=backend)
    _check(actual, expected, features["dtype"], "loss")
    assert interop.to_numpy(actual)[1] == 0, "a query without target mass has loss 0"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(INDEXER_CASES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_indexer_loss_backward_matches_reference(name, deterministic):
    backend = _backend()
    features = INDEXER_CASES[name]
    case = _indexer_case(len(name), **features)
    expected = reference.indexer_loss_backward(**case)
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.indexer_loss_backward(**_on_gpu(case, strided=features["s_q"] < 20), backend=backend)
    for label, a, e in zip(("dq_index", "dweights", "dk_index"), actual, expected):
        _check(a, e, features["dtype"], label)
    dq, dk = interop.to_numpy(actual[0]), interop.to_numpy(actual[2])
    assert (dq[1] == 0).all(), "a query without target mass passes no gradient"
    scored = np.zeros(case["k_index"].shape[0], bool)
    if "indices" in case:
        idx = case["indices"]
        scored[idx[(idx >= 0) & (idx < scored.size)]] = True
    else:
        for start, end in zip(case["key_start"], case["key_end"]):
            scored[start:end] = True
    assert (dk[~scored] == 0).all(), "keys nobody scored must get exactly 0"


# ----------------------------------------------------------------------------- GPU: sanitizer-sized
@pytest.mark.gpu
def test_small_case_for_sanitizer():
    """Every kernel path once, small enough for compute-sanitizer memcheck / racecheck."""
    backend = _backend()
    case = _mla_case(3, s_q=3, s_kv=20, h=5, d_qk=576, d_v=512, topk=40, dtype="bfloat16", invalid_fraction=0.3,
                     duplicate_fraction=0.3, topk_length=True, attn_sink=True, with_d_lse=True)
    index_case = _indexer_case(4, s_q=5, s_kv=40, h_i=8, d_i=64, dtype="bfloat16", topk=16)
    dense_case = _indexer_case(5, s_q=5, s_kv=40, h_i=8, d_i=64, dtype="float32")
    for deterministic in (False, True):
        with dsa_ref.use_deterministic(deterministic):
            for name, a, e in zip(("dq", "dkv", "d_sink"), dsa_ref.sparse_mla_backward(**_on_gpu(case), backend=backend),
                                  reference.sparse_mla_backward(**case)):
                _check(a, e, "bfloat16", name)
            for inputs, dtype in ((index_case, "bfloat16"), (dense_case, "float32")):
                for name, a, e in zip(("dq", "dw", "dk"),
                                      dsa_ref.indexer_loss_backward(**_on_gpu(inputs), backend=backend),
                                      reference.indexer_loss_backward(**inputs)):
                    _check(a, e, dtype, name)
    target_inputs = dict(q=case["q"], kv=case["kv"], indices=case["indices"], lse=case["lse"],
                         topk_length=case["topk_length"])
    _check(dsa_ref.attention_target(**_on_gpu(target_inputs), backend=backend),
           reference.attention_target(**target_inputs), "bfloat16", "target")
    loss_inputs = {k: v for k, v in index_case.items() if k != "d_loss"}
    _check(dsa_ref.indexer_loss(**_on_gpu(loss_inputs), backend=backend), reference.indexer_loss(**loss_inputs),
           "bfloat16", "loss")
