"""Edge inputs of the public functions: wrong calls fail at the boundary with the exception type and a
message that names the argument (PyTorch's OpInfo ``error_inputs``); empty problems simply work;
torch inputs that require grad are refused rather than losing their gradient silently."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref
from dsa_ref import cost, reference
from dsa_ref.reference import FP8_E4M3
from dsa_ref_backends.numpy_reference import NumpyBackend

rng = np.random.default_rng(0)
Q = rng.standard_normal((4, 2, 8)).astype(np.float32)  # indexer q [s_q, h_i, d_i]
W = rng.random((4, 2)).astype(np.float32)  # [s_q, h_i]
K = rng.standard_normal((6, 8)).astype(np.float32)  # [s_kv, d_i]
MQ = rng.standard_normal((4, 3, 16)).astype(np.float32)  # sparse MLA q [s_q, h, d_qk]
KV = rng.standard_normal((6, 16)).astype(np.float32)  # [s_kv, d_qk]
IDX = rng.integers(-1, 6, (4, 5)).astype(np.int32)  # [s_q, topk]
ROWS = rng.standard_normal((3, 576)).astype(np.float32)  # latent rows [n, 576]
X128 = rng.standard_normal((2, 128)).astype(np.float32)
X_FP8, X_SCALES = dsa_ref.quantize_fp8(X128)  # [2, 128] e4m3, [2, 1] float32
PACKED = dsa_ref.pack_kv_cache_fp8(ROWS)  # uint8 [3, 656]
TABLE = np.array([[0, 1]], np.int32)  # block table [b=1, max_blocks=2]
TOKENS = np.array([[0, 5, -1]], np.int32)  # [b=1, topk=3]


def mla(**changes):
    args = dict(q=MQ, kv=KV, indices=IDX, d_v=8)
    args.update(changes)
    return lambda: dsa_ref.sparse_mla(**args)


def layer_forward(*args, **kwargs):
    return lambda: dsa_ref.DSALayer().forward(*args, **kwargs)


ERROR_INPUTS = [
    # causal_key_ranges
    ("causal: s_q negative", lambda: dsa_ref.causal_key_ranges(-1, 5), ValueError, "s_q must be >= 0, got -1"),
    ("causal: s_kv negative", lambda: dsa_ref.causal_key_ranges(0, -2), ValueError, "s_kv must be >= 0, got -2"),
    ("causal: s_q float", lambda: dsa_ref.causal_key_ranges(2.0, 5), TypeError, "s_q must be an int, got float"),
    ("causal: s_kv str", lambda: dsa_ref.causal_key_ranges(2, "5"), TypeError, "s_kv must be an int, got str"),
    ("causal: s_q bool", lambda: dsa_ref.causal_key_ranges(True, 5), TypeError, "s_q must be an int, got bool"),
    ("causal: s_q > s_kv", lambda: dsa_ref.causal_key_ranges(3, 2), ValueError, "s_q must be <= s_kv"),
    ("causal: s_kv past int32", lambda: dsa_ref.causal_key_ranges(0, 2**31), ValueError, r"s_kv must be <= 2147483647"),
    # varlen_key_ranges
    ("varlen: decreasing q offsets", lambda: dsa_ref.varlen_key_ranges([0, 5, 3], [0, 5, 8]), ValueError,
     r"cu_seqlens_q must be non-decreasing .*cu_seqlens_q\[1\]=5 > cu_seqlens_q\[2\]=3"),
    ("varlen: decreasing k offsets", lambda: dsa_ref.varlen_key_ranges([0, 1, 2], [0, 4, 2]), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    ("varlen: lengths differ", lambda: dsa_ref.varlen_key_ranges([0, 2, 4], [0, 4]), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must have the same length b \+ 1 .*, got 3 and 2"),
    ("varlen: float offsets", lambda: dsa_ref.varlen_key_ranges([0, 2.5, 5], [0, 3, 6]), TypeError,
     "cu_seqlens_q must hold integers .* got dtype float64"),
    ("varlen: float array k", lambda: dsa_ref.varlen_key_ranges([0, 2], np.array([0.0, 3.0])), TypeError,
     "cu_seqlens_k must hold integers"),
    ("varlen: bool offsets", lambda: dsa_ref.varlen_key_ranges(np.array([False, True]), [0, 1]), TypeError,
     "cu_seqlens_q must hold integers .* got dtype bool"),
    ("varlen: no offset", lambda: dsa_ref.varlen_key_ranges([], []), ValueError,
     r"cu_seqlens_q must have shape \[b \+ 1\] \(one axis, at least one offset\), got shape \(0,\)"),
    ("varlen: two axes", lambda: dsa_ref.varlen_key_ranges([[0, 2]], [[0, 3]]), ValueError,
     r"cu_seqlens_q must have shape \[b \+ 1\] .* got shape \(1, 2\)"),
    ("varlen: negative start", lambda: dsa_ref.varlen_key_ranges([-1, 2], [0, 3]), ValueError,
     r"cu_seqlens_q must start at an offset >= 0, got cu_seqlens_q\[0\]=-1"),
    ("varlen: not an array", lambda: dsa_ref.varlen_key_ranges("0,2", [0, 2]), TypeError,
     "cu_seqlens_q must be an array or a list"),
    ("varlen: past int32", lambda: dsa_ref.varlen_key_ranges([0, 1], [0, 2**31]), ValueError,
     "cu_seqlens_k must end at an offset <= 2147483647"),
    # slot_indices
    ("slots: float block table", lambda: dsa_ref.slot_indices(TOKENS, TABLE.astype(np.float32), 4), TypeError,
     "block_table must hold integers"),
    ("slots: float tokens", lambda: dsa_ref.slot_indices(TOKENS.astype(np.float64), TABLE, 4), TypeError,
     "token_indices must hold integers"),
    ("slots: tokens one axis", lambda: dsa_ref.slot_indices(TOKENS[0], TABLE, 4), ValueError,
     r"token_indices must have shape \[b, ..., topk\] \(at least 2 axes\), got shape \(3,\)"),
    ("slots: table batch", lambda: dsa_ref.slot_indices(TOKENS, np.zeros((2, 2), np.int32), 4), ValueError,
     r"block_table must have shape \[b, max_blocks\] with b=1"),
    ("slots: block_size negative", lambda: dsa_ref.slot_indices(TOKENS, TABLE, -4), ValueError,
     "block_size must be >= 1, got -4"),
    ("slots: block_size float", lambda: dsa_ref.slot_indices(TOKENS, TABLE, 4.0), TypeError,
     "block_size must be an int, got float"),
    ("slots: table None", lambda: dsa_ref.slot_indices(TOKENS, None, 4), TypeError,
     "block_table must be an array or a list"),
    # quantize_fp8 / dequantize_fp8
    ("quantize: list", lambda: dsa_ref.quantize_fp8(X128.tolist()), TypeError, "x must be an array"),
    ("quantize: 0-d", lambda: dsa_ref.quantize_fp8(np.array(1.0, np.float32)), ValueError,
     r"x must have shape \[..., n\] \(at least one axis\), got a 0-d array"),
    ("quantize: int", lambda: dsa_ref.quantize_fp8(np.ones(128, np.int32)), TypeError,
     "x.dtype must be one of float64, float32, float16, bfloat16, got int32"),
    ("quantize: fp8 input", lambda: dsa_ref.quantize_fp8(X_FP8), TypeError, "x.dtype must be one of .* got float8_e4m3fn"),
    ("quantize: block float", lambda: dsa_ref.quantize_fp8(X128, block=64.0), TypeError, "block must be an int"),
    ("quantize: block negative", lambda: dsa_ref.quantize_fp8(X128, block=-128), ValueError, "block must be >= 1"),
    ("block scales: int", lambda: reference.fp8_block_scales(np.ones(128, np.int64)), TypeError, "x.dtype must be one of"),
    ("dequantize: float32 values", lambda: dsa_ref.dequantize_fp8(X128, X_SCALES), TypeError,
     "x_fp8.dtype must be one of float8_e4m3fn, got float32"),
    ("dequantize: int scales", lambda: dsa_ref.dequantize_fp8(X_FP8, X_SCALES.astype(np.int32)), TypeError,
     "scales.dtype must be one of float64, float32, float16, bfloat16, got int32"),
    ("dequantize: fp8 scales", lambda: dsa_ref.dequantize_fp8(X_FP8, X_SCALES.astype(FP8_E4M3)), TypeError,
     "scales.dtype must be one of"),
    ("dequantize: list scales", lambda: dsa_ref.dequantize_fp8(X_FP8, X_SCALES.tolist()), TypeError,
     "scales must be an array"),
    ("dequantize: scales shape", lambda: dsa_ref.dequantize_fp8(X_FP8, X_SCALES[:1]), ValueError,
     r"scales must have shape \(2, 1\) \(one per block of x_fp8\), got shape \(1, 1\)"),
    ("dequantize: 0-d", lambda: dsa_ref.dequantize_fp8(X_FP8[0, 0], X_SCALES), TypeError, "x_fp8 must be an array"),
    # pack_kv_cache_fp8 / unpack_kv_cache_fp8
    ("pack: list", lambda: dsa_ref.pack_kv_cache_fp8(ROWS.tolist()), TypeError, "kv must be an array"),
    ("pack: int rows", lambda: dsa_ref.pack_kv_cache_fp8(ROWS.astype(np.int32)), TypeError,
     "kv.dtype must be one of float64, float32, float16, bfloat16, got int32"),
    ("pack: 0-d", lambda: dsa_ref.pack_kv_cache_fp8(np.array(0.0)), ValueError, "kv must have shape .* 0-d"),
    ("pack: width", lambda: dsa_ref.pack_kv_cache_fp8(ROWS[:, :512]), ValueError, r"kv must have shape \[..., 576\]"),
    ("unpack: float", lambda: dsa_ref.unpack_kv_cache_fp8(PACKED.astype(np.float32)), TypeError,
     "packed.dtype must be one of uint8, got float32"),
    ("unpack: int8", lambda: dsa_ref.unpack_kv_cache_fp8(PACKED.view(np.int8)), TypeError, "packed.dtype .* got int8"),
    ("unpack: list", lambda: dsa_ref.unpack_kv_cache_fp8(PACKED.tolist()), TypeError, "packed must be an array"),
    ("unpack: width", lambda: dsa_ref.unpack_kv_cache_fp8(PACKED[:, :600]), ValueError, r"packed must be uint8 \[..., 656\]"),
    # the ops: zero-width slots are fine (tested below), their companions are still checked
    ("mla: topk 0 with topk_length 1", mla(indices=IDX[:, :0], topk_length=np.ones(4, np.int32)), ValueError,
     r"topk_length values must lie in \[0, 0\]"),
    ("mla: topk 0, indices float", mla(indices=np.zeros((4, 0))), TypeError, "indices.dtype must be one of"),
    ("mla: topk 0, indices s_q", mla(indices=IDX[:3, :0]), ValueError, r"indices must have shape \[s_q, topk\] with s_q=4"),
    ("topk: topk 0 stays refused", lambda: dsa_ref.topk_indices(np.zeros((2, 5), np.float32), 0), ValueError,
     "topk must be >= 1, got 0"),
    # DSAConfig / DSALayer
    ("config: float int field", lambda: dsa_ref.DSAConfig.tiny(n_heads=4.0), TypeError,
     "DSAConfig.n_heads must be a positive int, got float"),
    ("config: rope_theta str", lambda: dsa_ref.DSAConfig.tiny(rope_theta="1e4"), TypeError,
     "DSAConfig.rope_theta must be a real number, got str"),
    ("config: rope_factor negative", lambda: dsa_ref.DSAConfig.tiny(rope_factor=-1.0), ValueError,
     "DSAConfig.rope_factor must be finite and > 0"),
    ("config: beta_slow zero", lambda: dsa_ref.DSAConfig.tiny(beta_slow=0), ValueError, "DSAConfig.beta_slow must be finite"),
    ("config: mscale nan", lambda: dsa_ref.DSAConfig.tiny(mscale=float("nan")), ValueError,
     "DSAConfig.mscale must be finite and >= 0, got nan"),
    ("config: indexer_fp8 str", lambda: dsa_ref.DSAConfig.tiny(indexer_fp8="yes"), TypeError,
     "DSAConfig.indexer_fp8 must be a bool, got str"),
    ("layer: seed str", lambda: dsa_ref.DSALayer(seed="0"), TypeError, "seed must be an int, got str"),
    ("layer: seed negative", lambda: dsa_ref.DSALayer(seed=-1), ValueError, "seed must be >= 0, got -1"),
    ("layer: x complex", layer_forward(np.zeros((1, 2, 64), complex)), TypeError,
     "x.dtype must be a real float .* got complex128"),
    ("layer: x bool", layer_forward(np.zeros((1, 2, 64), bool)), TypeError, "x.dtype must be a real float .* got bool"),
    ("layer: x rank", layer_forward(np.zeros((2, 64))), ValueError, r"x must have shape \[batch, seq, dim=64\]"),
    ("layer: start_pos float", layer_forward(np.zeros((1, 2, 64)), 1.5), ValueError, "start_pos must be an int"),
    ("layer: lengths float", layer_forward(np.zeros((1, 2, 64)), lengths=[1.0]), ValueError, "lengths must be an int array"),
    # cost
    ("cost: context 0", lambda: cost.dense_token_cost(0), ValueError, "context must be integer key counts >= 1"),
    ("cost: context float", lambda: cost.dsa_token_cost(2.5), ValueError, "context must be integer key counts"),
    ("cost: phase", lambda: cost.dsa_token_cost(5, phase="train"), ValueError, "phase must be one of"),
    ("cost: metric", lambda: cost.crossover(metric="watts"), ValueError, "metric must be one of"),
]


@pytest.mark.parametrize("call,error,fragment", [case[1:] for case in ERROR_INPUTS],
                         ids=[case[0] for case in ERROR_INPUTS])
def test_error_inputs(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


# ---------------------------------------------------------------------------- zero slots: topk = 0
def assert_no_slot_result(out, lse, s_q, h, d_v):
    out, lse = np.asarray(out), np.asarray(lse)
    assert out.shape == (s_q, h, d_v) and out.dtype == np.float32
    assert lse.shape == (s_q, h) and lse.dtype == np.float32
    assert (out == 0).all() and np.isneginf(lse).all()


def test_reference_sparse_mla_with_zero_slots_is_the_empty_row_result():
    out, lse = reference.sparse_mla(MQ, KV, IDX[:, :0], d_v=8)
    assert_no_slot_result(out, lse, 4, 3, 8)
    # The same as a row whose every slot is invalid.
    invalid_out, invalid_lse = reference.sparse_mla(MQ, KV, np.full((4, 2), -1, np.int32), d_v=8)
    np.testing.assert_array_equal(out, invalid_out)
    np.testing.assert_array_equal(lse, invalid_lse)


def test_public_sparse_mla_with_zero_slots_and_a_sink():
    out, lse = dsa_ref.sparse_mla(MQ, KV, IDX[:, :0], d_v=8, topk_length=np.zeros(4, np.int32),
                                  attn_sink=np.ones(3, np.float32), backend="numpy")
    assert_no_slot_result(out, lse, 4, 3, 8)


class RefusesToLaunch(NumpyBackend):
    """A backend whose kernel cannot run with an empty slot axis, and that takes float32 only."""

    name = "refuses-to-launch"
    supported_dtypes = {"sparse_mla": frozenset({"float32"})}

    def sparse_mla(self, q, kv, indices, **kwargs):
        raise AssertionError("sparse_mla must not launch a backend for topk = 0")


def test_zero_slots_do_not_launch_the_backend_but_keep_its_dtype_refusals():
    out, lse = dsa_ref.sparse_mla(MQ, KV, IDX[:, :0], d_v=8, backend=RefusesToLaunch())
    assert_no_slot_result(out, lse, 4, 3, 8)
    with pytest.raises(dsa_ref.UnsupportedInputError, match=r"q.dtype=float64 \(supported: float32\)"):
        dsa_ref.sparse_mla(MQ.astype(np.float64), KV, IDX[:, :0], d_v=8, backend=RefusesToLaunch())


def test_zero_slots_come_back_as_torch_tensors_for_torch_inputs():
    torch = pytest.importorskip("torch")
    out, lse = dsa_ref.sparse_mla(torch.from_numpy(MQ), torch.from_numpy(KV), torch.zeros((4, 0), dtype=torch.int32),
                                  d_v=8, backend="numpy")
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert_no_slot_result(out.numpy(), lse.numpy(), 4, 3, 8)


# ---------------------------------------------------------------------------- empty problems that work
@pytest.mark.parametrize("s_q,s_kv", [(0, 6), (4, 0), (0, 0)])
def test_indexer_of_an_empty_problem_is_empty(s_q, s_kv):
    scores = dsa_ref.lightning_indexer(Q[:s_q], W[:s_q], K[:s_kv])
    assert scores.shape == (s_q, s_kv) and scores.dtype == np.float32


def test_topk_without_keys_is_all_empty_slots():
    indices = dsa_ref.topk_indices(np.zeros((3, 0), np.float32), 2)
    assert indices.shape == (3, 2) and (indices == -1).all()


def test_sparse_mla_without_keys_is_the_empty_row_result():
    out, lse = dsa_ref.sparse_mla(MQ, KV[:0], IDX, d_v=8)
    assert_no_slot_result(out, lse, 4, 3, 8)


def test_sparse_mla_and_dsa_attention_without_queries():
    out, lse = dsa_ref.sparse_mla(MQ[:0], KV, IDX[:0], d_v=8)
    assert out.shape == (0, 3, 8) and lse.shape == (0, 3)
    out, lse, indices = dsa_ref.dsa_attention(MQ[:0], KV, Q[:0], W[:0], K, topk=2, d_v=8)
    assert out.shape == (0, 3, 8) and indices.shape == (0, 2)


def test_empty_ranges_and_formats():
    start, end = dsa_ref.causal_key_ranges(0, 0)
    assert start.shape == end.shape == (0,)
    start, end = dsa_ref.varlen_key_ranges([3], [7])  # no sequence, offsets need not start at 0
    assert start.shape == end.shape == (0,)
    x_fp8, scales = dsa_ref.quantize_fp8(np.zeros((0, 128), np.float32))
    assert x_fp8.shape == (0, 128) and scales.shape == (0, 1)
    assert dsa_ref.dequantize_fp8(x_fp8, scales).shape == (0, 128)
    assert dsa_ref.unpack_kv_cache_fp8(dsa_ref.pack_kv_cache_fp8(np.zeros((0, 576)))).shape == (0, 576)


def test_varlen_offsets_may_start_anywhere_and_come_from_torch():
    start, end = dsa_ref.varlen_key_ranges([2, 4, 5], [10, 13, 15])
    np.testing.assert_array_equal(start, [10, 10, 13])
    np.testing.assert_array_equal(end, [12, 13, 15])
    # A sequence with a query but no key: an empty range without causality.
    start, end = dsa_ref.varlen_key_ranges([2, 4, 5], [10, 13, 13], causal=False)
    np.testing.assert_array_equal(start, [10, 10, 13])
    np.testing.assert_array_equal(end, [13, 13, 13])
    torch = pytest.importorskip("torch")
    got = dsa_ref.varlen_key_ranges(torch.tensor([0, 2, 3]), torch.tensor([0, 4, 5]))
    want = dsa_ref.varlen_key_ranges([0, 2, 3], [0, 4, 5])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch,seq,lengths", [(0, 3, None), (1, 0, None), (2, 3, [0, 0])])
def test_layer_forward_without_tokens_returns_zeros(batch, seq, lengths):
    layer = dsa_ref.DSALayer()
    out = layer.forward(np.ones((batch, seq, 64)), lengths=lengths)
    assert out.shape == (batch, seq, 64) and (out == 0).all()
    assert (layer.cache.lengths == 0).all()


# ---------------------------------------------------------------------------- gradients are refused, not dropped
GRADIENT_MESSAGE = (r"dsa_ref\.{op} does not record gradients, but {name} requires grad .*dsa_ref\.torch "
                    r"\(e\.g\. dsa_ref\.torch\.sparse_mla\).*{name}\.detach\(\)")


def torch_inputs(torch):
    return dict(q=torch.from_numpy(MQ), kv=torch.from_numpy(KV), indices=torch.from_numpy(IDX),
                q_index=torch.from_numpy(Q), weights=torch.from_numpy(W), k_index=torch.from_numpy(K))


def gradient_calls(t):
    return {
        "lightning_indexer": lambda: dsa_ref.lightning_indexer(t["q_index"], t["weights"], t["k_index"]),
        "sparse_mla": lambda: dsa_ref.sparse_mla(t["q"], t["kv"], t["indices"], d_v=8),
        "sparse_mla with topk 0": lambda: dsa_ref.sparse_mla(t["q"], t["kv"], t["indices"][:, :0], d_v=8),
        "dsa_attention": lambda: dsa_ref.dsa_attention(t["q"], t["kv"], t["q_index"], t["weights"], t["k_index"],
                                                       topk=3, d_v=8),
    }


@pytest.mark.parametrize("call,op,argument", [
    ("lightning_indexer", "lightning_indexer", "weights"),
    ("sparse_mla", "sparse_mla", "q"),
    ("sparse_mla", "sparse_mla", "kv"),
    ("sparse_mla with topk 0", "sparse_mla", "kv"),
    ("dsa_attention", "dsa_attention", "kv"),
    ("dsa_attention", "dsa_attention", "k_index"),
])
def test_inputs_that_require_grad_are_refused(call, op, argument):
    torch = pytest.importorskip("torch")
    inputs = torch_inputs(torch)
    inputs[argument] = inputs[argument].clone().requires_grad_(True)
    with pytest.raises(TypeError, match=GRADIENT_MESSAGE.format(op=op, name=argument)):
        gradient_calls(inputs)[call]()


def test_a_parameter_is_refused_too():
    torch = pytest.importorskip("torch")
    inputs = torch_inputs(torch)
    kv = torch.nn.Parameter(inputs["kv"].clone())
    with pytest.raises(TypeError, match=GRADIENT_MESSAGE.format(op="sparse_mla", name="kv")):
        dsa_ref.sparse_mla(inputs["q"], kv, inputs["indices"], d_v=8)


@pytest.mark.parametrize("call", ["lightning_indexer", "sparse_mla", "sparse_mla with topk 0", "dsa_attention"])
def test_inputs_that_require_grad_run_as_before_without_grad_mode(call):
    torch = pytest.importorskip("torch")
    plain = gradient_calls(torch_inputs(torch))[call]()
    inputs = {name: value.clone().requires_grad_(value.is_floating_point())
              for name, value in torch_inputs(torch).items()}
    with torch.no_grad():
        tracked = gradient_calls(inputs)[call]()
    for a, b in zip(plain if isinstance(plain, tuple) else (plain,), tracked if isinstance(tracked, tuple) else (tracked,)):
        assert torch.equal(a, b)


def test_topk_of_scores_that_require_grad_is_allowed():
    """Integer indices carry no gradient (as torch.topk's): nothing is lost, so nothing is refused."""
    torch = pytest.importorskip("torch")
    scores = torch.from_numpy(dsa_ref.lightning_indexer(Q, W, K)).requires_grad_(True)
    indices = dsa_ref.topk_indices(scores, 3)
    np.testing.assert_array_equal(indices.numpy(), dsa_ref.topk_indices(scores.detach().numpy(), 3))


def test_the_gradient_check_does_not_import_torch_for_numpy_inputs():
    import subprocess
    import sys

    code = ("import sys, numpy as np, dsa_ref; q = np.ones((2, 1, 4), np.float32); "
            "dsa_ref.sparse_mla(q, np.ones((3, 4), np.float32), np.zeros((2, 2), np.int32), d_v=4); "
            "dsa_ref.sparse_mla(q, np.ones((3, 4), np.float32), np.zeros((2, 0), np.int32), d_v=4); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={"DSA_BACKEND": "numpy"})


# ---------------------------------------------------------------------------- the default key ranges are said first
@pytest.mark.parametrize("op", [dsa_ref.lightning_indexer, dsa_ref.dsa_attention])
def test_docstrings_say_first_that_the_default_is_not_causal(op):
    opening = op.__doc__.split("Args:")[0]
    assert "Not causal by default" in opening
    assert "causal_key_ranges" in opening and "varlen_key_ranges" in opening
