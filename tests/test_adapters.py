"""The peer adapters (dsa_ref.testing.adapters) against fake peers with the peers' exact conventions.

The peers are GPU kernels that are not installed here. Each fake below is a plain torch
implementation with the peer's signature, layouts and conventions (FlashMLA: base-2 prefill lse,
``+inf`` for an empty row, ``[s_q, 1, topk]`` indices, the paged 656-byte decode cache; TileLang:
causal masking by query position, the ``s_kv`` sentinel loaded before it is masked, base-2 lse;
DeepGEMM: fp8 inputs only, a fixed head width) and the peer's assertions. The adapter plus its fake
must pass the ``ci`` conformance run, and a fake with a convention bug must fail it.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("hypothesis")

from dsa_ref import reference  # noqa: E402
from dsa_ref.registry import UnsupportedInputError  # noqa: E402
from dsa_ref.testing import check_backend, check_problem, sparse_mla_problem  # noqa: E402
from dsa_ref.testing import adapters  # noqa: E402

LOG2_E = math.log2(math.e)


def _attend(q, rows, valid, sm_scale: float, d_v: int):
    """Sparse attention in float32: ``(out [n, h, d_v], natural lse [n, h])``, lse -inf and out 0 where
    a row has no valid slot. ``rows`` ``[n, topk, d]`` are the gathered keys."""
    logits = sm_scale * torch.einsum("nhd,ntd->nht", q.float(), rows.float())  # [n, h, topk]
    logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [n, h]
    weights = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # [n, h, topk]
    return torch.einsum("nht,ntd->nhd", weights, rows[..., :d_v].float()), lse


def fake_flash_mla(prefill_lse_base=2, empty_lse=math.inf):
    """FlashMLA's interface (flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata)."""

    def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
        assert q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16
        assert q.shape[1] % 64 == 0 and q.shape[2] == 576 and d_v == 512
        # As sglang-kernel 0.4.3's SM90 build asserts (found on the H200): the prefill's topk in
        # multiples of 2 * B_TOPK = 128, and a contiguous topk_length.
        assert kv.shape[1] == 1 and indices.shape[1] == 1 and indices.shape[2] % 128 == 0
        assert topk_length is None or topk_length.is_contiguous(), "topk_length must have contiguous last dimension"
        s_kv = kv.shape[0]
        selected = indices[:, 0].long()  # [s_q, topk]
        valid = (selected >= 0) & (selected < s_kv)
        if topk_length is not None:
            valid &= torch.arange(selected.shape[1])[None, :] < topk_length[:, None]
        rows = kv[:, 0][selected.clamp(0, max(s_kv - 1, 0))]  # [s_q, topk, 576]
        out, lse = _attend(q, rows, valid, sm_scale, d_v)
        if attn_sink is not None:
            out = out * torch.sigmoid(lse - attn_sink[None, :])[..., None].nan_to_num(0.0)
        max_logits = lse  # not read by the adapter
        lse = lse * (LOG2_E if prefill_lse_base == 2 else 1.0)
        return out.to(torch.bfloat16), max_logits, torch.where(torch.isneginf(lse), empty_lse, lse)

    def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                         is_fp8_kvcache=False, topk=None):
        assert num_heads_k == 1 and is_fp8_kvcache and topk % 64 == 0
        return "schedule", "splits"

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                               attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                               extra_topk_length=None):
        assert is_fp8_kvcache and not causal and indices is not None and tile_scheduler_metadata == "schedule"
        assert k_cache.dtype == torch.float8_e4m3fn and tuple(k_cache.shape[1:]) == (64, 1, 656)
        batch, s_q, h, d = q.shape
        assert d == 576 and head_dim_v == 512 and h % 64 == 0 and indices.shape[2] % 64 == 0
        slots = k_cache.view(torch.uint8).reshape(-1, 656)
        kv = torch.from_numpy(reference.unpack_kv_cache_fp8(slots.numpy()).astype(np.float32))  # [n, 576]
        selected = indices.reshape(batch * s_q, -1).long()
        valid = (selected >= 0) & (selected < kv.shape[0])
        out, lse = _attend(q.reshape(batch * s_q, h, d), kv[selected.clamp(0, kv.shape[0] - 1)], valid,
                           softmax_scale, head_dim_v)
        lse = torch.where(torch.isneginf(lse), empty_lse, lse)  # natural log, as FlashMLA's decode
        return out.reshape(batch, s_q, h, 512).to(torch.bfloat16), lse.reshape(batch, s_q, h).transpose(1, 2)

    return types.SimpleNamespace(flash_mla_sparse_fwd=flash_mla_sparse_fwd, get_mla_metadata=get_mla_metadata,
                                 flash_mla_with_kvcache=flash_mla_with_kvcache, __name__="fake_flash_mla")


def fake_tilelang_sparse_mla(lse_base=2):
    """TileLang's example sparse_mla_fwd_interface: causal by query position, unmasked sentinel load."""

    def sparse_mla_fwd_interface(q, kv, indices, sm_scale=None, return_p_sum=False, d_v=512, block_I=64):
        assert q.is_contiguous() and kv.is_contiguous() and indices.is_contiguous()
        assert q.dtype == torch.bfloat16 and q.shape[-1] == 576 and indices.shape[-1] % block_I == 0
        batch, seq_len, heads, _ = q.shape
        selected = indices[:, :, 0].long()  # [b, s, topk]
        rows = kv[:, :, 0][torch.arange(batch)[:, None, None], selected]  # loaded before masking: may raise
        valid = selected <= torch.arange(seq_len)[None, :, None]
        out, lse = _attend(q.reshape(batch * seq_len, heads, 576), rows.reshape(batch * seq_len, -1, 576),
                           valid.reshape(batch * seq_len, -1), sm_scale, d_v)
        lse = lse * (LOG2_E if lse_base == 2 else 1.0)
        return out.reshape(batch, seq_len, heads, d_v).to(torch.bfloat16), lse.reshape(batch, seq_len, heads)

    return types.SimpleNamespace(sparse_mla_fwd_interface=sparse_mla_fwd_interface, __name__="fake_sparse_mla_fwd")


def _fp8_logits(q, keys, key_scales, weights, starts, ends, head_multiple=32):
    assert q.dtype == torch.float8_e4m3fn and keys.dtype == torch.float8_e4m3fn
    assert q.shape[2] == 128 and q.shape[1] % head_multiple == 0
    scores = torch.einsum("mhd,nd->mhn", q.float(), keys.float()).relu()
    logits = torch.einsum("mh,mhn->mn", weights, scores) * key_scales[None, :]
    position = torch.arange(keys.shape[0])[None, :]
    inside = (position >= starts[:, None].long()) & (position < ends[:, None].long())
    return logits.masked_fill(~inside, -math.inf)


def fake_deep_gemm():
    def fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=False):
        assert clean_logits, "outside each range the logits would be left unwritten"
        return _fp8_logits(q, kv[0], kv[1], weights, cu_seqlen_ks, cu_seqlen_ke)

    return types.SimpleNamespace(fp8_mqa_logits=fp8_mqa_logits, __name__="fake_deep_gemm")


def fake_topk(kind: str, sorts_nan_first=False):
    """A radix-style selector returning an unordered set (TileLang's tl_topk, sglang's fast_topk)."""

    def select(scores, k):
        chosen = torch.topk(scores.nan_to_num(nan=math.inf) if sorts_nan_first else scores, k, dim=1).indices
        return chosen.flip(1).to(torch.int32)  # any order within the row

    if kind == "tilelang":
        return types.SimpleNamespace(tl_topk=lambda scores, starts, ends, k: select(scores, k), __name__="fake_tl")

    def fast_topk(scores, out, lengths, row_starts):
        assert out.shape[1] == 2048 and bool((lengths == scores.shape[1]).all())
        out.copy_(select(scores, 2048))

    return types.SimpleNamespace(fast_topk=fast_topk, __name__="fake_sgl_kernel")


def _passes(backend, op: str):
    report = check_backend(backend, "ci", ops_to_check=[op])
    assert report.ok, str(report)
    assert report.ops[0].ran > 0
    return report


# ---------------------------------------------------------------------------- FlashMLA
def test_flashmla_adapter_with_a_faithful_peer_passes_the_ci_run():
    report = _passes(adapters.FlashMLA(fake_flash_mla(), device="cpu"), "sparse_mla")
    assert not any("FlashMLA" in reason and "h=" in reason for reason in report.ops[0].refusal_reasons)


def test_flashmla_adapter_reads_the_decode_cache_through_flash_mla_with_kvcache():
    problem = sparse_mla_problem(np.random.default_rng(3), s_q=5, s_kv=70, h=2, d_qk=576, d_v=512, topk=9,
                                 packed_fp8=True, invalid_fraction=0.3, dtype="bfloat16")
    check_problem(adapters.FlashMLA(fake_flash_mla(), device="cpu"), problem)
    wrong_base = adapters.FlashMLA(fake_flash_mla(), decode_lse_base=2, device="cpu")
    with pytest.raises(AssertionError, match="lse"):
        check_problem(wrong_base, problem)


def test_flashmla_adapter_fails_a_peer_whose_prefill_lse_is_natural_where_base_2_is_declared():
    report = check_backend(adapters.FlashMLA(fake_flash_mla(prefill_lse_base="e"), device="cpu"), "ci",
                           ops_to_check=["sparse_mla"])
    assert not report.ok
    assert "lse" in report.ops[0].failure and "input:" in report.ops[0].failure


def test_flashmla_adapter_fails_a_peer_that_gives_empty_rows_minus_inf_where_plus_inf_is_declared():
    report = check_backend(adapters.FlashMLA(fake_flash_mla(empty_lse=-math.inf), empty_lse=math.inf, device="cpu"),
                           "ci", ops_to_check=["sparse_mla"])
    assert report.ok  # -inf is already dsa-ref's convention: nothing to convert, nothing wrong
    report = check_backend(adapters.FlashMLA(fake_flash_mla(empty_lse=math.nan), device="cpu"), "ci",
                           ops_to_check=["sparse_mla"])
    assert not report.ok


def test_flashmla_adapter_refuses_what_the_kernel_cannot_take_with_the_values():
    backend = adapters.FlashMLA(fake_flash_mla(), device="cpu", pad_to_kernel_shapes=False)
    problem = sparse_mla_problem(np.random.default_rng(0), s_q=3, s_kv=8, h=4, d_qk=16, d_v=8, topk=5,
                                 dtype="float32")
    with pytest.raises(UnsupportedInputError) as refusal:
        check_problem(backend, problem)
    message = str(refusal.value)
    assert "q.dtype=float32 (supported: bfloat16)" in message
    assert "d_qk=16, d_v=8" in message and "h=4" in message and "topk=5" in message


def test_flashmla_adapter_rejects_an_unknown_lse_base():
    with pytest.raises(ValueError, match="prefill_lse_base"):
        adapters.FlashMLA(prefill_lse_base=10)


def test_adapters_without_their_peer_say_which_module_paths_were_tried():
    reasons = adapters.FlashMLA(device="cpu").unavailable_reasons()
    assert len(reasons) == 1 and "flash_mla:" in reasons[0] and "sgl_kernel.flash_mla:" in reasons[0]
    missing = adapters.DeepGEMM("no_such_peer_module", device="cpu").unavailable_reasons()
    assert "no_such_peer_module: ModuleNotFoundError" in missing[0]
    incomplete = adapters.FlashMLA(types.SimpleNamespace(__name__="half"), device="cpu").unavailable_reasons()
    assert "has no flash_mla_sparse_fwd" in incomplete[0]


def test_the_cli_loads_an_adapter_by_module_path():
    from dsa_ref.registry import BackendUnavailableError, get_backend

    with pytest.raises(BackendUnavailableError, match="tried flash_mla"):
        get_backend("module://dsa_ref.testing.adapters:FlashMLA")


# ---------------------------------------------------------------------------- TileLang sparse MLA
def test_tilelang_sparse_mla_adapter_with_a_faithful_peer_passes_the_ci_run():
    _passes(adapters.TileLangSparseMLA(fake_tilelang_sparse_mla(), device="cpu"), "sparse_mla")


def test_tilelang_sparse_mla_adapter_fails_a_peer_with_natural_log_lse():
    report = check_backend(adapters.TileLangSparseMLA(fake_tilelang_sparse_mla(lse_base="e"), device="cpu"), "ci",
                           ops_to_check=["sparse_mla"])
    assert not report.ok and "lse" in report.ops[0].failure


def test_tilelang_sparse_mla_adapter_refuses_an_index_above_the_query_position():
    backend = adapters.TileLangSparseMLA(fake_tilelang_sparse_mla(), device="cpu")
    problem = sparse_mla_problem(np.random.default_rng(1), s_q=4, s_kv=6, h=2, d_qk=16, d_v=8, topk=3,
                                 causal=False)
    problem.inputs["indices"][0, 0] = 5  # query 0 sits at key position 6 - 4 + 0 = 2
    with pytest.raises(UnsupportedInputError, match=r"indices\[0, 0\]=5 above query 0's causal position 2"):
        check_problem(backend, problem)


# ---------------------------------------------------------------------------- indexers and top-k
def test_deepgemm_adapter_with_a_faithful_peer_passes_the_ci_run():
    _passes(adapters.DeepGEMM(fake_deep_gemm(), device="cpu"), "lightning_indexer")


def test_deepgemm_adapter_refuses_keys_that_are_not_fp8():
    backend = adapters.DeepGEMM(fake_deep_gemm(), device="cpu")
    reasons = backend.not_supported_reasons("lightning_indexer", q=np.zeros((2, 3, 8), np.float32),
                                            weights=np.zeros((2, 3), np.float32), k=np.zeros((4, 8), np.float32))
    assert "q.dtype=float32 (supported: float8_e4m3fn)" in reasons and "k.dtype=float32" in reasons[1]


def test_tilelang_indexer_adapter_passes_the_ci_run():
    peer = types.SimpleNamespace(mqa_attn_return_logits_interface=lambda q, kv, kv_scales, weights, ks, ke,
                                 clean_logits: _fp8_logits(q, kv, kv_scales, weights, ks, ke, 1))
    _passes(adapters.TileLangIndexer(peer, device="cpu"), "lightning_indexer")


@pytest.mark.parametrize("kind", ["tilelang", "sglang"])
def test_topk_adapters_with_a_faithful_peer_pass_the_ci_run(kind):
    adapter = adapters.TileLangTopK if kind == "tilelang" else adapters.SglangTopK
    _passes(adapter(fake_topk(kind), device="cpu"), "topk_indices")


def test_tilelang_topk_is_asked_for_powers_of_two_and_keeps_the_best():
    asked = []

    def tl_topk(scores, starts, ends, k):
        asked.append(k)
        return torch.topk(scores, k, dim=1).indices.flip(1).to(torch.int32)

    adapter = adapters.TileLangTopK(types.SimpleNamespace(tl_topk=tl_topk, __name__="fake_tl"), device="cpu")
    scores = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.0, 7.0, float("-inf"), 1.0]])
    got = adapter.topk_indices(scores, 3)
    assert asked == [16] and sorted(got[0].tolist()) == [1, 3, 5]  # 2.0 twice: the lower index, 3
    assert adapter._kernel_k(17) == 32 and adapter._kernel_k(2048) == 2048 and adapter._kernel_k(1) == 16


def test_topk_adapter_fails_a_peer_that_selects_masked_keys():
    def selects_anything(scores, starts, ends, k):  # ranks every key, -inf included, and keeps out-of-row ones
        return torch.arange(k, dtype=torch.int32).repeat(scores.shape[0], 1)

    report = check_backend(adapters.TileLangTopK(types.SimpleNamespace(tl_topk=selects_anything), device="cpu"),
                           "ci", ops_to_check=["topk_indices"])
    assert not report.ok
