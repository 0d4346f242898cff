"""dsa_ref.compat: FlashMLA- and DeepGEMM-shaped calls equal dsa-ref's own ops on the translated inputs,
each convention argument does what it says, and wrong layouts are refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dsa_ref
from dsa_ref import compat, reference

LOG2_E = math.log2(math.e)


def _backend_or_skip(name):
    if name == "numpy":
        return name
    backend = dsa_ref.get_backend(name) if name in [b.name for b in dsa_ref.list_backends()] else None
    if backend is None or backend.unavailable_reasons():
        pytest.skip(f"the {name} backend cannot run here")
    return backend


BACKENDS = ["numpy", "triton"]


def _close(got, expected, rtol=1e-3):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.array_equal(np.isposinf(got), np.isposinf(expected))
    assert np.array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    scale = np.abs(expected[finite]).max() if finite.any() else 1.0
    np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------- flash_mla_sparse_fwd
def prefill_inputs(seed=0, s_q=5, h=2, d_qk=64, s_kv=11, topk=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((s_q, h, d_qk)).astype(np.float32)
    kv = rng.standard_normal((s_kv, 1, d_qk)).astype(np.float32)
    indices = rng.integers(0, s_kv, (s_q, 1, topk)).astype(np.int32)
    indices[0, 0, :3] = [-1, s_kv, np.iinfo(np.int32).min]  # invalid: ignored
    indices[2] = -1  # a row with no valid index
    return q, kv, indices


def naive_max_logits(q, kv, indices, sm_scale):
    logits = sm_scale * np.einsum("ihd,itd->iht", q.astype(np.float64), kv[np.clip(indices, 0, len(kv) - 1)])
    valid = (indices >= 0) & (indices < len(kv))
    return np.where(valid[:, None, :], logits, -np.inf).max(axis=-1)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sparse_fwd_equals_sparse_mla(backend_name):
    backend = _backend_or_skip(backend_name)
    q, kv, indices = prefill_inputs()
    sink = np.array([0.5, -1.0], np.float32)
    out, max_logits, lse = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32, attn_sink=sink, backend=backend)
    ref_out, ref_lse = dsa_ref.sparse_mla(q, kv[:, 0], indices[:, 0], sm_scale=0.1, d_v=32, attn_sink=sink)
    _close(out, ref_out)
    _close(lse, np.where(np.isneginf(ref_lse), np.inf, ref_lse))
    _close(max_logits, naive_max_logits(q, kv[:, 0].astype(np.float64), indices[:, 0], 0.1), rtol=1e-5)
    assert out.shape == (5, 2, 32) and max_logits.shape == lse.shape == (5, 2)


def test_sparse_fwd_lse_base_two_scales_lse_and_max_logits():
    q, kv, indices = prefill_inputs(seed=1)
    _, max_e, lse_e = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32)
    _, max_2, lse_2 = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32, lse_base=2)
    finite = np.isfinite(lse_e)
    np.testing.assert_allclose(lse_2[finite], lse_e[finite] * LOG2_E, rtol=1e-6)
    np.testing.assert_allclose(max_2[finite], max_e[finite] * LOG2_E, rtol=1e-6)
    assert not np.allclose(lse_2[finite], lse_e[finite])
    # base 2: lse = log2 Σ 2^(log2(e) P), the FlashMLA 2025 reference's definition
    logits = 0.1 * np.einsum("hd,td->ht", q[1].astype(np.float64), kv[indices[1, 0], 0]) * LOG2_E
    np.testing.assert_allclose(lse_2[1], np.log2(np.exp2(logits).sum(-1)), rtol=1e-6)


def test_sparse_fwd_empty_rows_follow_empty_lse():
    q, kv, indices = prefill_inputs(seed=2)
    out, max_logits, lse_flash = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32)
    _, _, lse_spec = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32, empty_lse=-math.inf)
    assert np.isposinf(lse_flash[2]).all() and np.isneginf(lse_spec[2]).all()
    assert np.isneginf(max_logits[2]).all() and (out[2] == 0).all()
    np.testing.assert_array_equal(np.delete(lse_flash, 2, 0), np.delete(lse_spec, 2, 0))


def test_sparse_fwd_topk_length_counts_only_the_first_slots():
    q, kv, indices = prefill_inputs(seed=3)
    lengths = np.array([8, 3, 0, 1, 5], np.int32)
    out, max_logits, lse = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32, topk_length=lengths)
    cut = indices.copy()
    cut[np.arange(8)[None, None, :] >= lengths[:, None, None]] = -1
    ref_out, ref_max, ref_lse = compat.flash_mla_sparse_fwd(q, kv, cut, 0.1, d_v=32)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    np.testing.assert_array_equal(max_logits, ref_max)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


def test_sparse_fwd_torch_inputs_give_torch_results():
    torch = pytest.importorskip("torch")
    q, kv, indices = prefill_inputs(seed=4)
    expected = compat.flash_mla_sparse_fwd(q, kv, indices, 0.1, d_v=32)
    got = compat.flash_mla_sparse_fwd(torch.from_numpy(q).bfloat16().float(), torch.from_numpy(kv),
                                      torch.from_numpy(indices), 0.1, d_v=32)
    q_rounded = torch.from_numpy(q).bfloat16().float().numpy()
    expected = compat.flash_mla_sparse_fwd(q_rounded, kv, indices, 0.1, d_v=32)
    for part, ref in zip(got, expected):
        assert isinstance(part, torch.Tensor)
        _close(part.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("change, error, message", [
    (dict(kv=np.zeros((11, 2, 64), np.float32)), ValueError, "h_kv=1"),
    (dict(kv=np.zeros((11, 64), np.float32)), ValueError, r"kv must have shape \[s_kv, h_kv, d_qk\]"),
    (dict(kv=np.zeros((11, 1, 656), np.uint8)), TypeError, "flash_mla_with_kvcache"),
    (dict(indices=np.zeros((5, 8), np.int32)), ValueError, r"indices must have shape \[s_q, h_kv, topk\]"),
    (dict(indices=np.zeros((5, 2, 8), np.int32)), ValueError, "h_kv=1"),
    (dict(lse_base=10), ValueError, "lse_base must be"),
    (dict(lse_base="2"), ValueError, "lse_base must be"),
    (dict(empty_lse=0.0), ValueError, "empty_lse must be"),
    (dict(sm_scale=None), TypeError, "sm_scale must be a real number"),
])
def test_sparse_fwd_wrong_layouts_refused(change, error, message):
    q, kv, indices = prefill_inputs()
    arguments = dict(q=q, kv=kv, indices=indices, sm_scale=0.1, d_v=32)
    arguments.update(change)
    with pytest.raises(error, match=message):
        compat.flash_mla_sparse_fwd(**arguments)


# ---------------------------------------------------------------------------- flash_mla_with_kvcache
def decode_inputs(seed=0, b=2, s_q=2, h=2, topk=6, num_blocks=3):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((num_blocks * 64, 576))
    cache = reference.pack_kv_cache_fp8(rows).reshape(num_blocks, 64, 1, 656)
    q = rng.standard_normal((b, s_q, h, 576)).astype(np.float32)
    tokens = rng.integers(0, 100, (b, s_q, topk))
    tokens[0, 1, :2] = -1
    tokens[1, 0] = -1  # a query with no valid slot
    table = np.array([[2, 0], [1, -1]], np.int32)
    indices = reference.slot_indices(tokens, table, 64)  # [b, s_q, topk], cache-slot coordinates
    return q, cache, table, indices


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_with_kvcache_equals_sparse_mla_on_the_flat_cache(backend_name):
    backend = _backend_or_skip(backend_name)
    q, cache, table, indices = decode_inputs(h=2 if backend_name == "numpy" else 1)
    b, s_q, h, _ = q.shape
    sink = np.linspace(-1, 1, h).astype(np.float32)
    out, lse = compat.flash_mla_with_kvcache(q, cache, table, np.array([100, 50], np.int32), 512,
                                             indices=indices, attn_sink=sink, backend=backend)
    ref_out, ref_lse = dsa_ref.sparse_mla(q.reshape(b * s_q, h, 576), cache.reshape(-1, 656),
                                          indices.reshape(b * s_q, -1), attn_sink=sink)
    assert out.shape == (b, s_q, h, 512) and lse.shape == (b, h, s_q)
    _close(out, ref_out.reshape(b, s_q, h, 512))
    _close(lse, np.where(np.isneginf(ref_lse), np.inf, ref_lse).reshape(b, s_q, h).transpose(0, 2, 1))
    assert np.isposinf(lse[1, :, 0]).all() and (out[1, 0] == 0).all()


def test_with_kvcache_empty_lse_and_fp8_view():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, cache, table, indices = decode_inputs(seed=1)
    _, lse_flash = compat.flash_mla_with_kvcache(q, cache, table, None, 512, indices=indices)
    out_view, lse_spec = compat.flash_mla_with_kvcache(q, cache.view(ml_dtypes.float8_e4m3fn), table, None, 512,
                                                       indices=indices, empty_lse=-math.inf)
    assert np.isposinf(lse_flash[1, :, 0]).all() and np.isneginf(lse_spec[1, :, 0]).all()
    finite = np.isfinite(lse_flash)
    np.testing.assert_array_equal(lse_flash[finite], lse_spec[finite])
    out_bytes, _ = compat.flash_mla_with_kvcache(q, cache, table, None, 512, indices=indices)
    np.testing.assert_array_equal(out_view, out_bytes)


def test_with_kvcache_topk_length_is_per_batch_entry():
    q, cache, table, indices = decode_inputs(seed=2)
    lengths = np.array([4, 2], np.int32)
    out, lse = compat.flash_mla_with_kvcache(q, cache, table, None, 512, indices=indices, topk_length=lengths)
    cut = indices.copy()
    cut[np.broadcast_to(np.arange(indices.shape[2])[None, None, :] >= lengths[:, None, None], cut.shape)] = -1
    ref_out, ref_lse = compat.flash_mla_with_kvcache(q, cache, table, None, 512, indices=cut)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


@pytest.mark.parametrize("change, error, message", [
    (dict(indices=None), ValueError, r"dense decode \(indices=None\) is not supported"),
    (dict(is_fp8_kvcache=False), ValueError, "is_fp8_kvcache must be True"),
    (dict(causal=True), ValueError, "causal must be False"),
    (dict(k_cache=np.zeros((3, 64, 2, 656), np.uint8)), ValueError, "h_k=1"),
    (dict(k_cache=np.zeros((3, 64, 1, 576), np.uint8)), ValueError, "656 bytes per token"),
    (dict(k_cache=np.zeros((192, 656), np.uint8)), ValueError, r"\(4 axes\)"),
    (dict(k_cache=np.zeros((3, 64, 1, 656), np.float32)), TypeError, "k_cache.dtype must be uint8 or float8"),
    (dict(head_dim_v=576), ValueError, "head_dim_v must be 512"),
    (dict(q=np.zeros((2, 2, 2, 512), np.float32)), ValueError, r"q must have shape \[b, s_q, h_q, 576\]"),
    (dict(indices=np.zeros((2, 3, 6), np.int32)), ValueError, "q's s_q"),
    (dict(block_table=np.zeros((3, 2), np.int32)), ValueError, "block_table must have shape"),
    (dict(topk_length=np.zeros(3, np.int32)), ValueError, "topk_length must have shape"),
    (dict(extra_k_cache=np.zeros((3, 64, 1, 656), np.uint8)), ValueError, "extra_k_cache must be None"),
    (dict(empty_lse=1.0), ValueError, "empty_lse must be"),
])
def test_with_kvcache_wrong_layouts_refused(change, error, message):
    q, cache, table, indices = decode_inputs()
    arguments = dict(q=q, k_cache=cache, block_table=table, cache_seqlens=None, head_dim_v=512, indices=indices)
    arguments.update(change)
    with pytest.raises(error, match=message):
        compat.flash_mla_with_kvcache(**arguments)


# ---------------------------------------------------------------------------- fp8_mqa_logits
def mqa_inputs(seed=0, m=6, heads=4, d=32, n=10):
    rng = np.random.default_rng(seed)
    q, _ = reference.quantize_fp8(rng.standard_normal((m, heads, d)), block=d)
    keys, scales = reference.quantize_fp8(rng.standard_normal((n, d)), block=d)
    weights = rng.standard_normal((m, heads)).astype(np.float32)
    ks = np.array([0, 0, 2, 5, 3, 10], np.int32)[:m]
    ke = np.array([1, 10, 6, 5, 9, 10], np.int32)[:m]
    return q, (keys, scales[:, 0]), weights, ks, ke


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mqa_logits_equal_lightning_indexer(backend_name):
    backend = _backend_or_skip(backend_name)
    q, kv, weights, ks, ke = mqa_inputs()
    got = compat.fp8_mqa_logits(q, kv, weights, ks, ke, backend=backend)
    expected = dsa_ref.lightning_indexer(q, weights, kv[0], key_start=ks, key_end=ke, k_scale=kv[1])
    assert got.shape == (6, 10) and got.dtype == np.float32
    _close(got, expected)


def test_mqa_logits_unclean_marks_outside_the_range_nan():
    q, kv, weights, ks, ke = mqa_inputs(seed=1)
    clean = compat.fp8_mqa_logits(q, kv, weights, ks, ke)
    unclean = compat.fp8_mqa_logits(q, kv, weights, ks, ke, clean_logits=False)
    column = np.arange(10)[None, :]
    inside = (column >= ks[:, None]) & (column < ke[:, None])
    assert np.isneginf(clean[~inside]).all() and np.isnan(unclean[~inside]).all()
    np.testing.assert_array_equal(unclean[inside], clean[inside])


@pytest.mark.parametrize("change, error, message", [
    (dict(kv=np.zeros((10, 32), np.float32)), TypeError, r"kv must be the tuple \(kv_fp8 \[N, D\], kv_scales \[N\]\)"),
    (dict(kv=(np.zeros((10, 32), np.float32),)), TypeError, "of length 1"),
    (dict(kv=(np.zeros((10, 32), np.float32), np.zeros(9, np.float32))), ValueError, r"kv\[1\] \(kv_scales\)"),
    (dict(kv=(np.zeros((10, 32), np.float32), np.zeros((10, 1), np.float32))), ValueError, r"kv\[1\]"),
    (dict(clean_logits=1), TypeError, "clean_logits must be a bool"),
])
def test_mqa_logits_wrong_arguments_refused(change, error, message):
    q, kv, weights, ks, ke = mqa_inputs()
    arguments = dict(q=q, kv=kv, weights=weights, cu_seqlen_ks=ks, cu_seqlen_ke=ke)
    arguments.update(change)
    with pytest.raises(error, match=message):
        compat.fp8_mqa_logits(**arguments)


# ---------------------------------------------------------------------------- fp8_paged_mqa_logits
def paged_inputs(seed=0, next_n=2, heads=4, d=32, block_size=4):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((6 * block_size, d))
    cache = compat.pack_indexer_cache_fp8(keys, block_size)  # [6, block_size, 1, d + 4]
    q, _ = reference.quantize_fp8(rng.standard_normal((2, next_n, heads, d)), block=d)
    weights = rng.standard_normal((2 * next_n, heads)).astype(np.float32)
    context_lens = np.array([7, 3], np.int32)
    table = np.array([[4, 1, -1], [0, -1, -1]], np.int32)
    return q, cache, weights, context_lens, table, keys


def deepgemm_style_reference(q, keys, weights, context_lens, table, block_size, max_len):
    """DeepGEMM's test reference in spirit: per sequence and block, keys dequantized, causal mask."""
    b, next_n, _, d = q.shape
    values, scales = reference.quantize_fp8(keys, block=d, scale_format="ue8m0")
    dequantized = values.astype(np.float64) * scales
    logits = np.full((b * next_n, max_len), -np.inf)
    for i in range(b):
        position = np.arange(context_lens[i] - next_n, context_lens[i])  # [next_n]
        for logical in range(-(-int(context_lens[i]) // block_size)):
            block = table[i, logical]
            k = dequantized[block * block_size:(block + 1) * block_size]  # [bs, d]
            key_position = logical * block_size + np.arange(block_size)
            scores = np.einsum("jhd,td->jht", q[i].astype(np.float64), k)
            scores = (np.maximum(scores, 0) * weights[i * next_n:(i + 1) * next_n, :, None]).sum(1)
            visible = key_position[None, :] <= position[:, None]
            logits[i * next_n:(i + 1) * next_n, key_position] = np.where(visible, scores, -np.inf)
    return logits


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_paged_mqa_logits_equal_deepgemm_reference(backend_name):
    backend = _backend_or_skip(backend_name)
    q, cache, weights, context_lens, table, keys = paged_inputs()
    got = compat.fp8_paged_mqa_logits(q, cache, weights, context_lens, table, None, 16, backend=backend)
    assert got.shape == (4, 16)
    _close(got, deepgemm_style_reference(q, keys, weights, context_lens, table, 4, 16), rtol=1e-4)
    spec = dsa_ref.lightning_indexer_paged(q.reshape(4, 4, 32), weights, cache.reshape(6, -1), table, context_lens,
                                           next_n=2, max_context_len=16)
    _close(got, spec)


def test_paged_mqa_logits_unclean_marks_past_the_bound_nan():
    q, cache, weights, context_lens, table, _ = paged_inputs(seed=1)
    clean = compat.fp8_paged_mqa_logits(q, cache, weights, context_lens, table, max_context_len=12)
    unclean = compat.fp8_paged_mqa_logits(q, cache, weights, context_lens, table, max_context_len=12,
                                          clean_logits=False)
    bound = (context_lens[:, None] - 2 + np.arange(2)[None, :]).reshape(4, 1)  # last visible key of each query
    past = np.arange(12)[None, :] > bound
    assert np.isneginf(clean[past]).all() and np.isnan(unclean[past]).all()
    np.testing.assert_array_equal(unclean[~past], clean[~past])
    assert np.isfinite(clean[~past]).all()


def test_pack_indexer_cache_is_deepgemms_byte_layout():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2 * 64, 128))
    cache = compat.pack_indexer_cache_fp8(keys, 64, scale_format="fp32")
    assert cache.shape == (2, 64, 1, 132) and cache.dtype == np.uint8
    flat = cache.reshape(2, 64 * 132)  # 8448 bytes a block
    values, scales = reference.quantize_fp8(keys, block=128, scale_format="fp32")
    np.testing.assert_array_equal(flat[1, 5 * 128:6 * 128], values[64 + 5].view(np.uint8))  # key 5 of block 1
    assert flat[1, 64 * 128 + 4 * 5:64 * 128 + 4 * 6].view("<f4")[0] == scales[64 + 5, 0]


@pytest.mark.parametrize("change, error, message", [
    (dict(kv_cache=np.zeros((6, 4, 1, 33), np.uint8)), ValueError, r"\[num_blocks, block_size, 1, 36\]"),
    (dict(kv_cache=np.zeros((6, 4, 2, 36), np.uint8)), ValueError, r"\[num_blocks, block_size, 1, 36\]"),
    (dict(kv_cache=np.zeros((6, 144), np.uint8)), ValueError, r"\[num_blocks, block_size, 1, 36\]"),
    (dict(kv_cache=np.zeros((6, 4, 1, 36), np.float32)), TypeError, "kv_cache.dtype must be uint8"),
    (dict(q=np.zeros((4, 4, 32), np.float32)), ValueError, r"q must have shape \[b, next_n, H, D\]"),
    (dict(weights=np.zeros((2, 4), np.float32)), ValueError, "weights must have shape"),
    (dict(context_lens=np.array([7, 1], np.int32)), ValueError, "context_lens must be >= next_n=2"),
    (dict(clean_logits="yes"), TypeError, "clean_logits must be a bool"),
])
def test_paged_mqa_logits_wrong_layouts_refused(change, error, message):
    q, cache, weights, context_lens, table, _ = paged_inputs()
    arguments = dict(q=q, kv_cache=cache, weights=weights, context_lens=context_lens, block_table=table)
    arguments.update(change)
    with pytest.raises(error, match=message):
        compat.fp8_paged_mqa_logits(**arguments)


@pytest.mark.parametrize("adapter,op", [("FlashMLA", "sparse_mla"), ("DeepGEMM", "lightning_indexer")])
def test_the_compat_calls_pass_the_kit_through_the_peer_adapters(adapter, op):
    """dsa_ref.compat in the peers' places: the adapters that check FlashMLA and DeepGEMM, pointed at
    dsa-ref's own FlashMLA- and DeepGEMM-shaped calls, must pass the conformance kit (and so check
    both the calls' conventions and the adapters' translations against each other)."""
    pytest.importorskip("torch")
    from dsa_ref.testing import adapters, check_backend

    options = dict(prefill_lse_base="e", decode_lse_base="e") if adapter == "FlashMLA" else {}
    backend = getattr(adapters, adapter)(module="dsa_ref.compat", device="cpu", **options)
    report = check_backend(backend, "ci", ops_to_check=[op], max_examples=60)
    assert report.ok, str(report)
    assert report.ops[0].ran >= 10, str(report)
