"""The ``triton`` backend on a GPU at DeepSeek-V3.2's real shapes.

h = 128 and 64, d_qk = 576, d_v = 512, topk = 2048, s_kv up to 64K, ragged batches, decode over
the FP8 paged cache. Every output is allocated poisoned with NaN, every case runs twice and the
two results must be bitwise equal (a moving result is a race). Skipped without a CUDA GPU.

When ``DSA_GPU_REPORT`` names a file, each case appends its worst error ratio there (JSON lines)
for the committed report.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_torch_outputs")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from dsa_ref import interop, reference  # noqa: E402
from dsa_ref.testing.assertions import assert_close, check_topk  # noqa: E402
from dsa_ref.testing.tolerances import tolerance_for  # noqa: E402
from dsa_ref_backends.torch_triton import dsa, indexer, sparse_mla, topk  # noqa: E402

CUDA = torch.device("cuda")


def _report(case: str, **values) -> None:
    path = os.environ.get("DSA_GPU_REPORT")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps(dict(case=case, **values)) + "\n")


def _np(x):
    return interop.to_numpy(x)


def _twice(fn):
    """Run twice; the results must be bitwise identical."""
    first = fn()
    second = fn()
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point else b), "repeated run differs"
    return first if len(first) > 1 else first[0]


def _causal_indices(generator, s_q, s_kv, topk_, distribution):
    t = torch.arange(s_kv - s_q, s_kv).float()[:, None] + 1
    u = torch.rand((s_q, topk_), generator=generator)
    index = torch.floor(u * t) if distribution == "uniform" else t - 1 - torch.floor(t * u**3)
    index = index.clamp(min=0).to(torch.int32)
    # adversarial invalid slots: INT_MIN, -1, s_kv, INT_MAX
    for n, bad in enumerate((-(2**31), -1, s_kv, 2**31 - 1)):
        index[:, n::97] = bad
    return index


@pytest.mark.parametrize("h", [128, 64])
@pytest.mark.parametrize("s_kv, distribution", [(8192, "uniform"), (65536, "recent"), (65536, "uniform")])
def test_sparse_mla_real_shapes(h, s_kv, distribution):
    generator = torch.Generator().manual_seed(h + s_kv)
    s_q, d_qk, d_v, topk_ = 24, 576, 512, 2048
    q = torch.randn(s_q, h, d_qk, generator=generator).to(torch.bfloat16)
    kv = torch.randn(s_kv, d_qk, generator=generator).to(torch.bfloat16)
    indices = _causal_indices(generator, s_q, s_kv, topk_, distribution)
    topk_length = torch.randint(0, topk_ + 1, (s_q,), generator=generator, dtype=torch.int32)
    topk_length[0] = topk_
    attn_sink = torch.randn(h, generator=generator)
    out, lse = _twice(lambda: sparse_mla.sparse_mla(q.cuda(), kv.cuda(), indices.cuda(), d_qk**-0.5, d_v,
                                                    topk_length.cuda(), attn_sink.cuda()))
    expected_out, expected_lse = reference.sparse_mla(_np(q), _np(kv), indices.numpy(), d_v=d_v,
                                                      topk_length=topk_length.numpy(), attn_sink=attn_sink.numpy())
    tolerance = tolerance_for("bfloat16")
    c_out = assert_close(_np(out), expected_out, tolerance, name="out")
    c_lse = assert_close(_np(lse), expected_lse, tolerance, name="lse", scale_by_max=False)
    _report(f"sparse_mla bf16 h={h} s_kv={s_kv} topk=2048 {distribution}", out=c_out.error_ratio,
            lse=c_lse.error_ratio, max_abs_out=c_out.max_abs_error)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("s_kv", [16384, 65536])
def test_indexer_real_shapes(dtype, s_kv):
    generator = torch.Generator().manual_seed(s_kv)
    s_q, h_i, d_i = 48, 64, 128
    q = torch.randn(s_q, h_i, d_i, generator=generator).to(getattr(torch, dtype))
    k = torch.randn(s_kv, d_i, generator=generator).to(getattr(torch, dtype))
    weights = torch.randn(s_q, h_i, generator=generator) * h_i**-0.5
    k_scale = torch.rand(s_kv, generator=generator) + 0.5 if dtype == "float8_e4m3fn" else None
    # ragged: three sequences packed on the key axis, queries from each, causal within each
    cu_k = np.array([0, s_kv // 4, s_kv // 4 + 1000, s_kv])
    cu_q = np.array([0, 16, 20, 48])
    key_start, key_end = reference.varlen_key_ranges(cu_q, cu_k)
    scores = _twice(lambda: indexer.lightning_indexer(q.cuda(), weights.cuda(), k.cuda(),
                                                      torch.from_numpy(key_start).cuda(),
                                                      torch.from_numpy(key_end).cuda(),
                                                      None if k_scale is None else k_scale.cuda()))
    expected = reference.lightning_indexer(_np(q), _np(weights), _np(k), key_start=key_start, key_end=key_end,
                                           k_scale=None if k_scale is None else k_scale.numpy())
    comparison = assert_close(_np(scores), expected, tolerance_for(dtype), name="scores")
    _report(f"indexer {dtype} H_I=64 d_I=128 s_kv={s_kv} ragged", scores=comparison.error_ratio)


@pytest.mark.parametrize("tied", [False, True])
def test_topk_real_shapes(tied):
    generator = torch.Generator().manual_seed(5)
    rows, s_kv, k = 96, 65536, 2048
    scores = torch.randn(rows, s_kv, generator=generator)
    if tied:
        scores = torch.relu(torch.round(scores * 4))  # ReLU plateaus: many exact zeros and repeats
    scores[3, 100:] = float("-inf")  # fewer than k selectable
    indices = _twice(lambda: topk.topk_indices(scores.cuda(), k))
    check_topk(_np(indices), scores.numpy(), k)
    expected = reference.topk_indices(scores.numpy(), k)
    same = all(set(a) == set(b) for a, b in zip(_np(indices).tolist(), expected.tolist()))
    assert same, "the selected set differs from the reference's (ties go to the lower index)"
    _report(f"topk rows={rows} s_kv={s_kv} k=2048 tied={tied}", sets_equal=same)


def test_fused_dsa_ragged_batch():
    generator = torch.Generator().manual_seed(9)
    lengths = [1500, 700, 3000]
    total = sum(lengths)
    h, d_qk, d_v, h_i, d_i, topk_ = 128, 576, 512, 64, 128, 2048
    cu = np.concatenate([[0], np.cumsum(lengths)])
    key_start, key_end = reference.varlen_key_ranges(cu, cu)
    q = torch.randn(total, h, d_qk, generator=generator).to(torch.bfloat16)
    kv = torch.randn(total, d_qk, generator=generator).to(torch.bfloat16)
    q_index = torch.randn(total, h_i, d_i, generator=generator).to(torch.float8_e4m3fn)
    k_index = torch.randn(total, d_i, generator=generator).to(torch.float8_e4m3fn)
    weights = torch.randn(total, h_i, generator=generator) * h_i**-0.5
    k_scale = torch.rand(total, generator=generator) + 0.5
    out, lse, indices = _twice(lambda: dsa.dsa_attention(
        q.cuda(), kv.cuda(), q_index.cuda(), weights.cuda(), k_index.cuda(), topk=topk_,
        key_start=torch.from_numpy(key_start).cuda(), key_end=torch.from_numpy(key_end).cuda(),
        k_scale=k_scale.cuda(), sm_scale=d_qk**-0.5, d_v=d_v, chunk_bytes=4 * total * 1000))
    scores = reference.lightning_indexer(_np(q_index), _np(weights), _np(k_index), key_start=key_start,
                                         key_end=key_end, k_scale=k_scale.numpy())
    tolerance = tolerance_for("float8_e4m3fn")
    finite = np.abs(scores[np.isfinite(scores)])
    check_topk(_np(indices), scores, topk_, score_tolerance=2 * tolerance.atol * float(finite.max()))
    # The attention over the backend's own selection, checked on a sample of rows (the float64
    # reference costs 3 TFLOP for all of them); the first and last query of each sequence included.
    rows = np.unique(np.concatenate([cu[:-1], cu[1:] - 1, np.random.default_rng(9).choice(total, 48, replace=False)]))
    expected_out, expected_lse = reference.sparse_mla(_np(q)[rows], _np(kv), _np(indices)[rows], d_v=d_v)
    c_out = assert_close(_np(out)[rows], expected_out, tolerance_for("bfloat16"), name="out")
    c_lse = assert_close(_np(lse)[rows], expected_lse, tolerance_for("bfloat16"), name="lse", scale_by_max=False)
    _report("dsa fused, ragged batch [1500, 700, 3000], fp8 indexer, h=128, topk=2048, chunks of 1000 queries",
            out=c_out.error_ratio, lse=c_lse.error_ratio)


@pytest.mark.parametrize("batch, next_n", [(16, 1), (8, 2)])
def test_decode_fp8_paged_cache(batch, next_n):
    rng = np.random.default_rng(batch)
    h, topk_, block_size, seq_len = 128, 2048, 64, 8192
    blocks_per_seq = seq_len // block_size
    latent = rng.standard_normal((batch * seq_len, 576)).astype(np.float32)
    cache = reference.pack_kv_cache_fp8(latent)
    block_table = rng.permutation(batch * blocks_per_seq).reshape(batch, blocks_per_seq).astype(np.int32)
    positions = seq_len - next_n + np.arange(next_n)  # MTP: each new query sees itself and the past
    tokens = np.stack([rng.integers(0, p + 1, (batch, topk_)) for p in positions], axis=1).astype(np.int32)
    tokens[:, :, ::50] = -1
    slots = reference.slot_indices(tokens, block_table, block_size).reshape(batch * next_n, topk_)
    generator = torch.Generator().manual_seed(batch)
    q = torch.randn(batch * next_n, h, 576, generator=generator).to(torch.bfloat16)
    out, lse = _twice(lambda: sparse_mla.sparse_mla(q.cuda(), torch.from_numpy(cache).cuda(),
                                                    torch.from_numpy(slots).cuda(), 576**-0.5, 512))
    expected_out, expected_lse = reference.sparse_mla(_np(q), cache, slots, d_v=512)
    c_out = assert_close(_np(out), expected_out, tolerance_for("bfloat16"), name="out")
    c_lse = assert_close(_np(lse), expected_lse, tolerance_for("bfloat16"), name="lse", scale_by_max=False)
    _report(f"decode FP8 paged cache b={batch} s_q={next_n} h=128 topk=2048", out=c_out.error_ratio,
            lse=c_lse.error_ratio)
