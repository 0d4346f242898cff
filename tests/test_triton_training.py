"""The Triton training kernels (sparse MLA backward, attention target, indexer loss and its backward)
against the float64 reference.

Without a GPU these run on Triton's CPU interpreter (tiny shapes); :class:`TestOnGpu` runs the real
shapes on a CUDA device. Outputs the kernels allocate start as NaN (``poisoned_torch_outputs``), so an
element no kernel writes fails the comparison.

Tolerances. dq, dkv and dk sum many products (over slots, and for dkv over every query that read a
row), each with its operands rounded to the input dtype before the tensor-core product (P and dS to
bf16/fp16, as FlashAttention does); the error of a sum of n rounded terms grows like sqrt(n) u of
its largest terms, not of the sum, so it is judged against the largest |expected| of the whole
output (``assert_close`` scales ``atol`` by it): the policy's per-dtype ``atol`` is a few u of that
scale at these sizes (bf16: 1.6e-2 = 4 u).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Before triton is first imported: it decides at import whether kernels are interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import dsa_ref  # noqa: E402
from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close  # noqa: E402
from dsa_ref.testing.problems import sparse_mla_problem  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import TritonBackend  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("poisoned_torch_outputs")
BACKEND = TritonBackend()
DTYPES = ["float32", "float16", "bfloat16"]


def _strided(x: np.ndarray) -> np.ndarray:
    """The same values as a non-contiguous view (every other row of a twice-as-tall array)."""
    padded = np.zeros((2 * x.shape[0],) + x.shape[1:], x.dtype)
    padded[::2] = x
    return padded[::2]


def _mla_case(dtype, *, s_q=6, h=3, d_qk=40, d_v=32, s_kv=24, topk=20, seed=0, sink=True):
    """Awkward sparse-MLA inputs with the forward's results and upstream gradients."""
    rng = np.random.default_rng(seed)
    problem = sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=d_qk, d_v=d_v, topk=topk, dtype=dtype,
                                 invalid_fraction=0.25, duplicate_fraction=0.3, topk_length=True, attn_sink=sink,
                                 causal=False)
    inputs = dict(problem.inputs)
    inputs["topk_length"][0] = topk  # one row with every slot counted
    inputs["indices"][-1] = -1  # a query with no valid slot
    inputs.setdefault("sm_scale", None)
    out, lse = reference.sparse_mla(inputs["q"], inputs["kv"], inputs["indices"], sm_scale=inputs["sm_scale"],
                                    d_v=d_v, topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"])
    inputs.update(out=out, lse=lse, d_out=rng.standard_normal((s_q, h, d_v)).astype(np.float32),
                  d_lse=rng.standard_normal((s_q, h)).astype(np.float32))
    return inputs


def _mla_backward(inputs, backend, *, strided=False):
    arrays = {name: _strided(inputs[name]) if strided else inputs[name] for name in ("q", "kv", "indices", "d_out")}
    return dsa_ref.sparse_mla_backward(arrays["q"], arrays["kv"], arrays["indices"], inputs["out"], inputs["lse"],
                                       arrays["d_out"], sm_scale=inputs["sm_scale"], d_v=inputs["d_v"],
                                       topk_length=inputs["topk_length"], attn_sink=inputs["attn_sink"],
                                       d_lse=inputs["d_lse"], backend=backend)


# --------------------------------------------------------------------------- sparse MLA backward
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mla_backward_matches_reference(dtype, deterministic):
    inputs = _mla_case(dtype)
    expected = _mla_backward(inputs, "numpy")
    with dsa_ref.use_deterministic(deterministic):
        actual = _mla_backward(inputs, BACKEND, strided=dtype == "bfloat16")
    for got, want, name in zip(actual, expected, ("dq", "dkv", "d_attn_sink")):
        assert_close(got, want, tolerance_for(dtype), name=f"{name} {dtype}")
    dq, dkv, _ = actual
    valid = reference.valid_slots(inputs["indices"], inputs["kv"].shape[0], inputs["topk_length"])
    unread = np.setdiff1d(np.arange(inputs["kv"].shape[0]), inputs["indices"][valid])
    assert unread.size > 0 and np.all(dkv[unread] == 0.0), "rows no valid slot reads get exactly 0"
    assert np.all(dq[-1] == 0.0), "a query with no valid slot gets dq = 0"


def test_sparse_mla_backward_without_sink_or_d_lse_and_wider_heads():
    """No sink (two results), no d_lse, more heads than one head block, slots over several blocks."""
    inputs = _mla_case("bfloat16", h=37, topk=70, s_kv=50, seed=4, sink=False)
    inputs["d_lse"] = None
    expected = _mla_backward(inputs, "numpy")
    actual = _mla_backward(inputs, BACKEND)
    assert len(actual) == 2
    for got, want, name in zip(actual, expected, ("dq", "dkv")):
        assert_close(got, want, tolerance_for("bfloat16"), name=name)


def test_sparse_mla_backward_deterministic_is_bitwise_repeatable():
    inputs = _mla_case("bfloat16", seed=2)
    with dsa_ref.use_deterministic(True):
        first = _mla_backward(inputs, BACKEND)
        second = _mla_backward(inputs, BACKEND)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def test_sparse_mla_backward_deterministic_sums_over_query_chunks(monkeypatch):
    """A contribution buffer smaller than all queries: chunks are summed in order, still correct."""
    from dsa_ref_backends.torch_triton import sparse_mla_backward as kernels

    inputs = _mla_case("float32", seed=3)
    monkeypatch.setattr(kernels, "CONTRIBUTION_BUFFER_BYTES", 4 * 20 * 40 * 2)  # two queries a chunk
    with dsa_ref.use_deterministic(True):
        actual = _mla_backward(inputs, BACKEND)
    for got, want in zip(actual, _mla_backward(inputs, "numpy")):
        assert_close(got, want, tolerance_for("float32"))


def test_sparse_mla_backward_empty_shapes():
    for s_q, topk in ((0, 8), (3, 0)):
        q = np.ones((s_q, 2, 24), np.float32)
        kv = np.ones((10, 24), np.float32)
        indices = np.zeros((s_q, topk), np.int32)
        out, lse = reference.sparse_mla(q, kv, indices, d_v=16)
        dq, dkv = dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, np.ones_like(out), d_v=16, backend=BACKEND)
        assert dq.shape == (s_q, 2, 24) and np.all(dq == 0) and np.all(dkv == 0)


def test_segment_sum_adds_in_order_and_skips_invalid_rows():
    from dsa_ref_backends.torch_triton.sparse_mla_backward import segment_sum

    device = BACKEND.device()
    contributions = torch.arange(12, dtype=torch.float32, device=device).reshape(6, 2)
    rows = torch.tensor([2, -1, 2, 0, 5, 2], device=device)
    out = torch.ones((4, 2), device=device)
    segment_sum(out, contributions, rows)
    expected = np.ones((4, 2), np.float32)
    np.add.at(expected, [2, 2, 0, 2], contributions.cpu().numpy()[[0, 2, 3, 5]])
    assert np.array_equal(out.cpu().numpy(), expected)


def test_sparse_mla_backward_refusals_carry_values():
    q = torch.zeros((2, 1, 1100))
    kv = torch.zeros((4, 1100))
    reasons = BACKEND.not_supported_reasons("sparse_mla_backward", q=q, kv=kv, d_v=600)
    assert any("d_v=600" in r for r in reasons) and any("d_qk - d_v=500" in r for r in reasons)
    assert any("float64" in r for r in BACKEND.not_supported_reasons("sparse_mla_backward", q=q.double(), kv=kv))


# --------------------------------------------------------------------------- attention target
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_target_matches_reference(dtype):
    inputs = _mla_case(dtype, h=5, seed=5)
    args = (inputs["q"], inputs["kv"], inputs["indices"], inputs["lse"])
    kwargs = dict(sm_scale=inputs["sm_scale"], topk_length=inputs["topk_length"])
    actual = dsa_ref.attention_target(*args, **kwargs, backend=BACKEND)
    assert_close(actual, reference.attention_target(*args, **kwargs), tolerance_for(dtype), name="target")
    assert np.all(actual[-1] == 0.0)


def test_attention_target_packed_fp8_cache_and_nan():
    rng = np.random.default_rng(6)
    problem = sparse_mla_problem(rng, s_q=3, s_kv=20, h=2, d_qk=576, d_v=512, topk=16, packed_fp8=True,
                                 invalid_fraction=0.2, causal=False)
    q, kv, indices = problem.inputs["q"], problem.inputs["kv"], problem.inputs["indices"]
    _, lse = reference.sparse_mla(q, kv, indices)
    actual = dsa_ref.attention_target(q, kv, indices, lse, backend=BACKEND)
    assert_close(actual, reference.attention_target(q, kv, indices, lse), tolerance_for("bfloat16"), name="fp8")
    q = q.astype(np.float32)
    q[1, 0, 3] = np.nan
    kv_plain = reference.unpack_kv_cache_fp8(kv)
    actual = dsa_ref.attention_target(q, kv_plain, indices, lse, backend=BACKEND)
    assert np.all(np.isnan(actual[1])) and not np.isnan(actual[[0, 2]]).any(), "NaN in, NaN out (that row only)"


# --------------------------------------------------------------------------- indexer loss
def _indexer_case(dtype, *, sparse, seed=0, s_q=7, h_i=3, d_i=20, s_kv=40, topk=24, k_scale=True):
    rng = np.random.default_rng(seed)
    cast = interop.NUMPY_DTYPES[dtype]
    case = dict(q_index=rng.standard_normal((s_q, h_i, d_i)).astype(np.float32).astype(cast),
                weights=rng.standard_normal((s_q, h_i)).astype(np.float32),
                k_index=rng.standard_normal((s_kv, d_i)).astype(np.float32).astype(cast),
                k_scale=(rng.random(s_kv) + 0.5).astype(np.float32) if k_scale else None)
    if sparse:
        indices = rng.integers(0, s_kv, (s_q, topk)).astype(np.int32)
        indices[rng.random((s_q, topk)) < 0.2] = -1
        indices[1, :6] = 5  # duplicates
        indices[2, 3] = s_kv
        indices[3] = -1  # no slot at all
        target = rng.random((s_q, topk)).astype(np.float32)
        target[4] = 0.0  # no target mass: contributes nothing
        case.update(indices=indices, target=target)
    else:
        key_start = rng.integers(0, s_kv // 2, s_q).astype(np.int32)
        key_end = np.minimum(key_start + rng.integers(0, s_kv, s_q), s_kv).astype(np.int32)
        key_end[3] = key_start[3]  # an empty range
        case.update(key_start=key_start, key_end=key_end, target=rng.random((s_q, s_kv)).astype(np.float32))
    return case, rng.standard_normal(s_q).astype(np.float32)


def _loss_arguments(case):
    arrays = (case["q_index"], case["weights"], case["k_index"], case["target"])
    keywords = {name: case.get(name) for name in ("indices", "key_start", "key_end", "k_scale")}
    return arrays, keywords


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_loss_and_backward_match_reference(dtype, sparse, deterministic):
    case, d_loss = _indexer_case(dtype, sparse=sparse, seed=7, k_scale=dtype != "float16")
    arrays, keywords = _loss_arguments(case)
    tolerance = tolerance_for(dtype)
    if not deterministic:  # the forward has no accumulation mode: check it once per case
        assert_close(dsa_ref.indexer_loss(*arrays, **keywords, backend=BACKEND),
                     reference.indexer_loss(*arrays, **keywords), tolerance, name="loss")
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
    expected = reference.indexer_loss_backward(*arrays, d_loss, **keywords)
    for got, want, name in zip(actual, expected, ("dq_index", "dweights", "dk_index")):
        assert_close(got, want, tolerance, name=f"{name} {dtype}")
    scored = np.unique(case["indices"][case["indices"] >= 0]) if sparse else np.arange(min(case["key_start"]),
                                                                                          max(case["key_end"]))
    unscored = np.setdiff1d(np.arange(case["k_index"].shape[0]), scored)
    assert np.all(actual[2][unscored] == 0.0), "keys scored by nobody get exactly 0"


def test_indexer_loss_backward_strided_and_bitwise_repeatable():
    case, d_loss = _indexer_case("bfloat16", sparse=True, seed=8)
    case = {name: _strided(x) if isinstance(x, np.ndarray) and name != "k_scale" else x for name, x in case.items()}
    arrays, keywords = _loss_arguments(case)
    with dsa_ref.use_deterministic(True):
        first = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
        second = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
    for a, b, want in zip(first, second, reference.indexer_loss_backward(*arrays, d_loss, **keywords)):
        assert np.array_equal(a, b)
        assert_close(a, want, tolerance_for("bfloat16"))


def test_indexer_loss_dense_over_query_chunks(monkeypatch):
    from dsa_ref_backends.torch_triton import indexer_loss as kernels

    monkeypatch.setattr(kernels, "ROW_BUFFER_BYTES", 4 * 40 * 3)  # three queries a chunk
    case, d_loss = _indexer_case("float32", sparse=False, seed=9)
    arrays, keywords = _loss_arguments(case)
    assert_close(dsa_ref.indexer_loss(*arrays, **keywords, backend=BACKEND),
                 reference.indexer_loss(*arrays, **keywords), tolerance_for("float32"))
    actual = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
    for got, want in zip(actual, reference.indexer_loss_backward(*arrays, d_loss, **keywords)):
        assert_close(got, want, tolerance_for("float32"))


def test_indexer_loss_refusals_carry_values():
    q_index = torch.zeros((2, 65, 129))
    reasons = BACKEND.not_supported_reasons("indexer_loss", q_index=q_index, k_index=torch.zeros((4, 129)))
    assert any("h_i=65" in r for r in reasons) and any("d_i=129" in r for r in reasons)


# --------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
class TestOnGpu:
    """DeepSeek-V3.2's shapes on the device: h 128/64, d_qk 576, d_v 512, topk 2048, s_kv 8192."""

    @pytest.mark.parametrize("h", [128, 64])
    def test_sparse_mla_backward_real_shapes(self, h):
        inputs = _mla_case("bfloat16", s_q=64, h=h, d_qk=576, d_v=512, s_kv=8192, topk=2048, seed=h)
        expected = _mla_backward(inputs, "numpy")
        with dsa_ref.use_deterministic(False):
            fast = _mla_backward(inputs, BACKEND)
        with dsa_ref.use_deterministic(True):
            first = _mla_backward(inputs, BACKEND)
            second = _mla_backward(inputs, BACKEND)
        for got, repeat, quick, want in zip(first, second, fast, expected):
            assert np.array_equal(got, repeat)
            assert_close(got, want, tolerance_for("bfloat16"))
            assert_close(quick, want, tolerance_for("bfloat16"))

    def test_attention_target_real_shapes(self):
        inputs = _mla_case("bfloat16", s_q=64, h=128, d_qk=576, d_v=512, s_kv=8192, topk=2048, seed=1)
        args = (inputs["q"], inputs["kv"], inputs["indices"], inputs["lse"])
        kwargs = dict(topk_length=inputs["topk_length"])
        assert_close(dsa_ref.attention_target(*args, **kwargs, backend=BACKEND),
                     reference.attention_target(*args, **kwargs), tolerance_for("bfloat16"))

    @pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
    def test_indexer_loss_real_shapes(self, sparse):
        case, d_loss = _indexer_case("bfloat16", sparse=sparse, s_q=64, h_i=64, d_i=128, s_kv=8192, topk=2048)
        arrays, keywords = _loss_arguments(case)
        assert_close(dsa_ref.indexer_loss(*arrays, **keywords, backend=BACKEND),
                     reference.indexer_loss(*arrays, **keywords), tolerance_for("bfloat16"))
        expected = reference.indexer_loss_backward(*arrays, d_loss, **keywords)
        with dsa_ref.use_deterministic(True):
            first = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
            second = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
        fast = dsa_ref.indexer_loss_backward(*arrays, d_loss, **keywords, backend=BACKEND)
        for got, repeat, quick, want in zip(first, second, fast, expected):
            assert np.array_equal(got, repeat)
            assert_close(got, want, tolerance_for("bfloat16"))
            assert_close(quick, want, tolerance_for("bfloat16"))
