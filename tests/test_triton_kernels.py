"""The Triton kernels against the float64 reference, on small shapes.

Without a GPU these run on Triton's CPU interpreter: the module sets ``TRITON_INTERPRET=1``
before the kernels are imported (Triton reads it when a kernel is defined). With a GPU they run
on it. Every output is allocated poisoned (NaN, or a sentinel for integers), so an element a
kernel forgets to write fails the comparison.
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

from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close, check_topk  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import TritonBackend  # noqa: E402
from dsa_ref_backends.torch_triton import dsa, indexer, sparse_mla, topk  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture
def boolean_masks_only(monkeypatch):
    """Under the interpreter, a load or store with a mask that is not boolean fails the test.

    Triton >= 3.9's interpreter refuses such a mask (``ValueError: mask has unsupported dtype``);
    earlier ones take any integer as one, so without this check a kernel that builds one passes
    on those and fails on the newer. (The interpreter makes one when a comparison of scalars is
    combined with a block: the broadcast scalar is stored as the compared operands' type.)
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder

    def boolean_mask_required(original, mask_position):
        def call(self, *args):
            mask = args[mask_position]
            assert mask.data.dtype == np.bool_, (
                f"{original.__name__}: mask stored as {mask.data.dtype} (a Triton >= 3.9 interpreter refuses it): "
                "build the mask from comparisons of blocks, not from a scalar predicate broadcast to one")
            return original(self, *args)
        return call

    # Positional: (ptrs, mask, other, ...) and (ptrs, value, mask, ...) on every Triton from 3.6 to 3.9.
    monkeypatch.setattr(builder, "create_masked_load", boolean_mask_required(builder.create_masked_load, 1))
    monkeypatch.setattr(builder, "create_masked_store", boolean_mask_required(builder.create_masked_store, 2))
    yield


pytestmark = pytest.mark.usefixtures("poisoned_torch_outputs", "boolean_masks_only")
DEVICE = TritonBackend().device()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float8_e4m3fn": torch.float8_e4m3fn}


def _randn(generator, shape, dtype, scale=1.0):
    values = torch.randn(shape, generator=generator) * scale
    return values.to(DTYPES[dtype] if isinstance(dtype, str) else dtype).to(DEVICE)


def _np(x):
    return interop.to_numpy(x.cpu() if hasattr(x, "cpu") else x)


# --------------------------------------------------------------------------- interpreter fixes
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn"])
def test_dot_matches_float64_product(dtype):
    """tl.dot on 16- and 8-bit floats gives the exact products, summed in fp32 (interpreter fix).

    On a Hopper GPU the fp8 tensor cores accumulate with ~14 mantissa bits, so fp8 gets the
    tolerance policy's fp8 allowance there."""
    import triton
    import triton.language as tl

    @triton.jit
    def product(p_a, p_b, p_c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        b_a = tl.load(p_a + o_m[:, None] * K + o_k[None, :])
        b_b = tl.load(p_b + o_k[:, None] + o_n[None, :] * K)
        tl.store(p_c + o_m[:, None] * N + o_n[None, :], tl.dot(b_a, b_b))

    generator = torch.Generator().manual_seed(1)
    a = _randn(generator, (64, 32), dtype)
    b = _randn(generator, (32, 64), dtype).T.contiguous().T  # K-major, as fp8 tensor cores need
    c = torch.full((64, 64), float("nan"), device=DEVICE)
    product[(1,)](a, b, c, 64, 64, 32)
    expected = _np(a).astype(np.float64) @ _np(b).astype(np.float64)
    tight = dtype != "float8_e4m3fn" or os.environ.get("TRITON_INTERPRET") == "1"
    tolerance = 1e-5 if tight else tolerance_for(dtype).rtol
    np.testing.assert_allclose(_np(c), expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


# --------------------------------------------------------------------------- indexer
@pytest.mark.parametrize("keys_on_rows", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("h_i, d_i", [(4, 32), (3, 20)])
def test_indexer_matches_reference(dtype, h_i, d_i, keys_on_rows):
    generator = torch.Generator().manual_seed(h_i * 100 + d_i)
    s_q, s_kv = 19, 150
    q = _randn(generator, (s_q, h_i, d_i), dtype)
    k = _randn(generator, (s_kv, d_i), dtype)
    weights = _randn(generator, (s_q, h_i), torch.float32)
    key_start = torch.randint(0, 60, (s_q,), generator=generator, dtype=torch.int32)
    key_end = torch.minimum(key_start + torch.randint(0, 120, (s_q,), generator=generator, dtype=torch.int32),
                            torch.tensor(s_kv, dtype=torch.int32))
    k_scale = (torch.rand(s_kv, generator=generator) + 0.5).to(DEVICE) if dtype == "float8_e4m3fn" else None
    scores = indexer.lightning_indexer(q, weights, k, key_start.to(DEVICE), key_end.to(DEVICE), k_scale,
                                       config={"KEYS_ON_ROWS": keys_on_rows})
    expected = reference.lightning_indexer(_np(q), _np(weights), _np(k), key_start=key_start.numpy(),
                                           key_end=key_end.numpy(),
                                           k_scale=None if k_scale is None else _np(k_scale))
    assert_close(_np(scores), expected, tolerance_for(dtype), name=f"scores {dtype}")


@pytest.mark.parametrize("keys_on_rows", [False, True])
def test_indexer_leaves_the_row_outside_the_ranges_unwritten_on_the_fused_path(keys_on_rows):
    """fill_masked=False (the fused indexer -> top-k path) writes each block's ranges and nothing else."""
    generator = torch.Generator().manual_seed(5)
    q = _randn(generator, (6, 4, 32), "bfloat16")
    k = _randn(generator, (300, 32), "bfloat16")
    weights = _randn(generator, (6, 4), torch.float32)
    key_start = torch.tensor([140, 150, 160, 170, 180, 190], dtype=torch.int32)
    key_end = key_start + 20
    out = torch.full((6, 300), 7.0, device=DEVICE)
    indexer.lightning_indexer(q, weights, k, key_start.to(DEVICE), key_end.to(DEVICE), out=out, fill_masked=False,
                              config={"KEYS_ON_ROWS": keys_on_rows})
    expected = reference.lightning_indexer(_np(q), _np(weights), _np(k), key_start=key_start.numpy(),
                                           key_end=key_end.numpy())
    got = _np(out)
    inside = np.isfinite(expected)
    assert_close(np.where(inside, got, 0.0), np.where(inside, expected, 0.0), tolerance_for("bfloat16"), name="ranges")
    assert (got[:, :128] == 7.0).all() and (got[:, 256:] == 7.0).all(), "written outside every block's tiles"


@pytest.mark.parametrize("keys_on_rows", [False, True])
def test_indexer_propagates_nan_and_keeps_inf_positions(keys_on_rows):
    generator = torch.Generator().manual_seed(3)
    q = _randn(generator, (5, 2, 16), torch.float32)
    k = _randn(generator, (40, 16), torch.float32)
    q[1, 0, 3] = float("nan")
    k[7, 2] = float("nan")
    weights = torch.ones(5, 2, device=DEVICE)
    key_start = torch.tensor([0, 0, 3, 39, 20], dtype=torch.int32)
    key_end = torch.tensor([40, 10, 3, 40, 25], dtype=torch.int32)
    scores = indexer.lightning_indexer(q, weights, k, key_start.to(DEVICE), key_end.to(DEVICE),
                                       config={"KEYS_ON_ROWS": keys_on_rows})
    expected = reference.lightning_indexer(_np(q), _np(weights), _np(k), key_start=key_start.numpy(),
                                           key_end=key_end.numpy())
    assert_close(_np(scores), expected, tolerance_for("float32"), name="scores with NaN")


# --------------------------------------------------------------------------- top-k
def _tied_scores(generator, s_q, s_kv):
    """Scores with plateaus (ReLU-sum style exact zeros and repeated values), -0.0, ±inf and NaN."""
    scores = torch.randint(-3, 6, (s_q, s_kv), generator=generator).float()
    scores = torch.where(scores < 0, torch.zeros_like(scores), scores)  # a plateau of exact zeros
    scores[0, ::3] = -0.0
    scores[1] = float("-inf")  # nothing selectable
    scores[2, 5:] = float("-inf")  # fewer than k selectable
    scores[3, 7] = float("nan")
    scores[3, 9] = float("inf")
    scores[4] = torch.randn(s_kv, generator=generator)  # distinct values
    scores[5] = -torch.rand(s_kv, generator=generator) * 1e30  # all negative, some huge
    return scores


# Scratch rows of 64 and 4 slots: the threshold bin fits only in some rows (64) or almost none (4);
# the others refine over the row itself, so both refinement paths run.
@pytest.mark.parametrize("candidates", [None, 64, 4])
@pytest.mark.parametrize("s_kv, k", [(300, 16), (70, 70), (40, 64), (5000, 37)])
def test_topk_selects_reference_set(s_kv, k, candidates):
    generator = torch.Generator().manual_seed(s_kv + k)
    scores = _tied_scores(generator, 8, s_kv).to(DEVICE)
    indices = topk.topk_indices(scores, k, config=candidates and dict(CANDIDATES=candidates))
    assert indices.dtype == torch.int32
    check_topk(_np(indices), _np(scores), k)
    # Stronger than the spec asks: ties go to the lower index, so the set equals the reference's.
    expected = reference.topk_indices(_np(scores), k)
    assert [sorted(row) for row in _np(indices).tolist()] == [sorted(row) for row in expected.tolist()]


@pytest.mark.parametrize("candidates", [None, 4])
def test_topk_reads_only_key_ranges(candidates):
    generator = torch.Generator().manual_seed(5)
    s_q, s_kv, k = 6, 200, 20
    scores = torch.randn(s_q, s_kv, generator=generator)
    key_start = torch.tensor([0, 10, 50, 199, 0, 30], dtype=torch.int32)
    key_end = torch.tensor([200, 25, 51, 200, 0, 180], dtype=torch.int32)
    poisoned = scores.clone()
    for row in range(s_q):  # outside each range: values that must never be read
        poisoned[row, : key_start[row]] = float("inf")
        poisoned[row, key_end[row]:] = float("inf")
    indices = topk.topk_indices(poisoned.to(DEVICE), k, key_start.to(DEVICE), key_end.to(DEVICE),
                                config=candidates and dict(CANDIDATES=candidates))
    masked = scores.clone()
    for row in range(s_q):
        masked[row, : key_start[row]] = float("-inf")
        masked[row, key_end[row]:] = float("-inf")
    check_topk(_np(indices), masked.numpy(), k)


# --------------------------------------------------------------------------- sparse MLA
ADVERSARIAL = (-(2**31), -1, 2**31 - 1)  # and s_kv, added per case


def _indices(generator, s_q, topk_, s_kv, dtype=torch.int32):
    indices = torch.randint(0, s_kv, (s_q, topk_), generator=generator).to(dtype)
    for row in range(s_q):
        slots = torch.randperm(topk_, generator=generator)[: topk_ // 4]
        for n, slot in enumerate(slots.tolist()):
            indices[row, slot] = (ADVERSARIAL + (s_kv,))[n % 4]
    indices[0] = -1  # a query with no valid slot
    return indices.to(DEVICE)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_sparse_mla_matches_reference(dtype, splits):
    generator = torch.Generator().manual_seed(7 + splits)
    s_q, h, d_qk, d_v, s_kv, topk_ = 6, 5, 48, 32, 90, 70
    q = _randn(generator, (s_q, h, d_qk), dtype)
    kv = _randn(generator, (s_kv, d_qk), dtype)
    indices = _indices(generator, s_q, topk_, s_kv)
    topk_length = torch.tensor([70, 0, 33, 70, 1, 64], dtype=torch.int32).to(DEVICE)
    attn_sink = _randn(generator, (h,), torch.float32)
    out, lse = sparse_mla.sparse_mla(q, kv, indices, 0.2, d_v, topk_length, attn_sink, num_splits=splits)
    expected_out, expected_lse = reference.sparse_mla(_np(q), _np(kv), _np(indices), sm_scale=0.2, d_v=d_v,
                                                      topk_length=_np(topk_length), attn_sink=_np(attn_sink))
    tolerance = tolerance_for(dtype)
    assert_close(_np(out), expected_out, tolerance, name=f"out {dtype}")
    assert_close(_np(lse), expected_lse, tolerance, name=f"lse {dtype}", scale_by_max=False)


def test_sparse_mla_noncontiguous_int64_and_nan_rows_unread():
    """Strided q, int64 indices; a NaN row in kv that no valid index selects must not leak in."""
    generator = torch.Generator().manual_seed(11)
    s_q, h, d_qk, d_v, s_kv, topk_ = 4, 4, 40, 24, 30, 20
    q = _randn(generator, (h, s_q, d_qk), "bfloat16").transpose(0, 1)  # non-contiguous
    kv = _randn(generator, (s_kv, d_qk), "bfloat16")
    kv[0] = float("nan")  # invalid slots are redirected to row 0 internally; it must stay masked
    indices = torch.randint(1, s_kv, (s_q, topk_), generator=generator, dtype=torch.int64)
    indices[:, ::4] = -1
    indices = indices.to(DEVICE)
    out, lse = sparse_mla.sparse_mla(q, kv, indices, d_qk**-0.5, d_v)
    expected_out, expected_lse = reference.sparse_mla(_np(q), _np(kv), _np(indices), d_v=d_v)
    assert_close(_np(out), expected_out, tolerance_for("bfloat16"), name="out")
    assert_close(_np(lse), expected_lse, tolerance_for("bfloat16"), name="lse", scale_by_max=False)


@pytest.mark.parametrize("q_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("splits", [1, 2])
def test_sparse_mla_fp8_paged_cache(q_dtype, splits):
    """Decode over the packed FP8 cache with paged slot indices (s_q = 2 per sequence, MTP)."""
    rng = np.random.default_rng(13)
    batch, next_n, h, topk_, block_size, blocks = 2, 2, 4, 48, 16, 12
    latent = rng.standard_normal((blocks * block_size, 576)).astype(np.float32)
    latent[:, :128] *= 1e-3  # a tile whose scale is tiny
    cache = reference.pack_kv_cache_fp8(latent)  # uint8 [slots, 656]
    block_table = rng.permutation(blocks).reshape(batch, blocks // batch).astype(np.int32)
    block_table[1, -1] = -1  # an unallocated block
    seq_len = block_table.shape[1] * block_size
    tokens = rng.integers(-1, seq_len, (batch, next_n, topk_)).astype(np.int32)
    slots = reference.slot_indices(tokens, block_table, block_size).reshape(batch * next_n, topk_)
    generator = torch.Generator().manual_seed(13)
    q = _randn(generator, (batch * next_n, h, 576), q_dtype)
    out, lse = sparse_mla.sparse_mla(q, torch.from_numpy(cache).to(DEVICE), torch.from_numpy(slots).to(DEVICE),
                                     576**-0.5, 512, num_splits=splits)
    expected_out, expected_lse = reference.sparse_mla(_np(q), cache, slots, d_v=512)
    assert_close(_np(out), expected_out, tolerance_for(q_dtype), name="out fp8 cache")
    assert_close(_np(lse), expected_lse, tolerance_for(q_dtype), name="lse fp8 cache", scale_by_max=False)


# --------------------------------------------------------------------------- fused DSA
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 4 * 64 * 5])  # one chunk; chunks of 5 queries
def test_dsa_fused_path_matches_composition(chunk_bytes):
    generator = torch.Generator().manual_seed(17)
    s, h, d_qk, d_v, h_i, d_i, topk_ = 23, 4, 40, 32, 4, 32, 8
    q = _randn(generator, (s, h, d_qk), "bfloat16")
    kv = _randn(generator, (s, d_qk), "bfloat16")
    q_index = _randn(generator, (s, h_i, d_i), "bfloat16")
    k_index = _randn(generator, (s, d_i), "bfloat16")
    weights = _randn(generator, (s, h_i), torch.float32)
    key_start, key_end = (torch.from_numpy(r).to(DEVICE) for r in reference.causal_key_ranges(s, s))
    out, lse, indices = dsa.dsa_attention(q, kv, q_index, weights, k_index, topk=topk_, key_start=key_start,
                                          key_end=key_end, k_scale=None, sm_scale=d_qk**-0.5, d_v=d_v,
                                          chunk_bytes=chunk_bytes)
    scores = reference.lightning_indexer(_np(q_index), _np(weights), _np(k_index),
                                         key_start=_np(key_start), key_end=_np(key_end))
    check_topk(_np(indices), scores, topk_, score_tolerance=2e-2 * np.abs(scores[np.isfinite(scores)]).max())
    # The attention must be over the indices the backend chose.
    expected_out, expected_lse = reference.sparse_mla(_np(q), _np(kv), _np(indices), d_v=d_v)
    assert_close(_np(out), expected_out, tolerance_for("bfloat16"), name="dsa out")
    assert_close(_np(lse), expected_lse, tolerance_for("bfloat16"), name="dsa lse", scale_by_max=False)


# --------------------------------------------------------------------------- refusals
def test_backend_refuses_with_reasons():
    backend = TritonBackend()
    q64 = np.zeros((2, 3, 16))
    reasons = backend.not_supported_reasons("lightning_indexer", q=q64, weights=np.zeros((2, 3)),
                                            k=np.zeros((4, 16)))
    assert any("q.dtype=float64" in r for r in reasons) and any("k.dtype=float64" in r for r in reasons)
    q = np.zeros((2, 3, 1200), np.float32)
    reasons = backend.not_supported_reasons("sparse_mla", q=q, kv=np.zeros((4, 1200), np.float32),
                                            indices=np.zeros((2, 4), np.int32), d_v=600)
    assert any("d_v=600" in r for r in reasons) and any("d_qk - d_v=600" in r for r in reasons)
    reasons = backend.not_supported_reasons("sparse_mla", q=np.zeros((2, 3, 576), np.float32),
                                            kv=np.zeros((4, 656), np.uint8), indices=np.zeros((2, 4), np.int32),
                                            d_v=256)
    assert reasons == ["d_v=256 with the packed FP8 cache (supported: 512)"]
    assert backend.not_supported_reasons("topk_indices", scores=np.zeros((2, 4)), topk=2) == [
        "scores.dtype=float64 (supported: bfloat16, float16, float32)"]
