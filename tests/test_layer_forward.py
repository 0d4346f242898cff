"""The whole layer: MHA mode ≡ MQA mode, DSA ≡ dense attention when nothing is dropped,
decode ≡ prefill, paged ≡ contiguous caches, varlen batches ≡ sequences run alone."""

import numpy as np
import pytest

from dsa_ref.layer import DSAConfig, DSALayer, PARAMETER_NAMES
from dsa_ref.layer.mla import mha_attention, mqa_attention, split_wkv_b

CONFIG = DSAConfig.tiny()


def relative_error(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).standard_normal((2, 20, CONFIG.dim))


@pytest.fixture(scope="module")
def prefill(inputs):
    layer = DSALayer(CONFIG, seed=1)
    return layer.forward(inputs), layer.last_topk


def test_mha_and_mqa_are_the_same_function_in_float64():
    rng = np.random.default_rng(2)
    config = DSAConfig.tiny(n_heads=3, qk_nope_head_dim=8, v_head_dim=5, kv_lora_rank=24, qk_rope_head_dim=6)
    n, s_kv = 7, 11
    q_nope, q_pe = rng.standard_normal((n, 3, 8)), rng.standard_normal((n, 3, 6))
    latent, k_pe = rng.standard_normal((s_kv, 24)), rng.standard_normal((s_kv, 6))
    w_uk, w_uv = split_wkv_b(rng.standard_normal((3 * 13, 24)), config)
    visible = rng.random((n, s_kv)) < 0.5
    visible[0] = False  # a query with no key: both give 0
    mha = mha_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, visible, 0.3)
    mqa = mqa_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, visible, 0.3)
    np.testing.assert_allclose(mqa, mha, rtol=1e-12, atol=1e-13)
    assert np.all(mha[0] == 0)
    # The comparison can fail: dropping the decoupled RoPE part of the logits changes the result.
    without_rope = mqa_attention(q_nope, 0 * q_pe, latent, k_pe, w_uk, w_uv, visible, 0.3)
    assert relative_error(without_rope, mha) > 1e-2


def test_layer_mqa_through_sparse_mla_equals_mha_mode(inputs, prefill):
    """MQA mode runs the core ops in float32; MHA mode is float64 math over the same selection."""
    out_mqa, topk_mqa = prefill
    layer = DSALayer(CONFIG, seed=1, mode="mha")
    out_mha = layer.forward(inputs)
    np.testing.assert_array_equal(layer.last_topk, topk_mqa)
    assert relative_error(out_mqa, out_mha) < 1e-5


def test_dsa_equals_dense_attention_when_topk_covers_the_sequence(inputs, prefill):
    dense = DSALayer(CONFIG, seed=1, mode="dense").forward(inputs)
    wide = DSALayer(CONFIG.replace(index_topk=20), seed=1).forward(inputs)
    assert relative_error(wide, dense) < 1e-5
    # With index_topk = 8 < 20 tokens, the later queries drop keys and the output changes;
    # the first 8 queries see at most 8 keys and still match the dense result.
    sparse, _ = prefill
    assert relative_error(sparse, dense) > 1e-2
    assert relative_error(sparse[:, :8], dense[:, :8]) < 1e-5


def test_topk_selection_is_causal_and_full_for_early_tokens(prefill):
    _, topk = prefill
    position = np.arange(20)[None, :, None]
    assert np.all(topk < position + 1)
    for t in range(8):
        assert sorted(topk[0, t][topk[0, t] >= 0].tolist()) == list(range(t + 1))
    assert np.all(topk[:, 8:] >= 0)


@pytest.mark.parametrize("cache", [
    dict(),
    dict(block_size=4),
    dict(kv_cache_dtype="fp8"),
    dict(kv_cache_dtype="fp8", block_size=8),
    dict(kv_cache_dtype="bfloat16"),
])
def test_decode_equals_prefill(inputs, cache):
    full = DSALayer(CONFIG, seed=1, **cache).forward(inputs)
    layer = DSALayer(CONFIG, seed=1, **cache)
    pieces = [layer.forward(inputs[:, :9])]
    for t in range(9, 14):  # one token per step
        pieces.append(layer.forward(inputs[:, t:t + 1], start_pos=t))
    pieces.append(layer.forward(inputs[:, 14:17], start_pos=14))  # several tokens per step (MTP / chunk)
    pieces.append(layer.forward(inputs[:, 17:], start_pos=17))
    assert relative_error(np.concatenate(pieces, axis=1), full) < 1e-6


def test_cache_formats_agree_within_their_precision(inputs, prefill):
    reference, _ = prefill
    assert relative_error(DSALayer(CONFIG, seed=1, block_size=4).forward(inputs), reference) < 1e-6
    assert relative_error(DSALayer(CONFIG, seed=1, kv_cache_dtype="bfloat16").forward(inputs), reference) < 2e-2
    assert relative_error(DSALayer(CONFIG, seed=1, kv_cache_dtype="fp8").forward(inputs), reference) < 1e-1


def test_paged_cache_scatters_blocks():
    layer = DSALayer(CONFIG, seed=1, block_size=4)
    layer.forward(np.random.default_rng(3).standard_normal((2, 10, CONFIG.dim)))
    table = layer.cache.block_table
    used = table[:2, :3]
    assert np.all(used >= 0) and np.all(table[:2, 3:] == -1)
    assert len(set(used.ravel().tolist())) == 6
    assert not np.array_equal(used.ravel(), np.arange(6))  # physical order differs from logical


def test_varlen_batch_equals_sequences_alone(inputs):
    layer = DSALayer(CONFIG, seed=1)
    batched = layer.forward(inputs, lengths=np.array([20, 7]))
    alone = [DSALayer(CONFIG, seed=1).forward(inputs[i:i + 1, :n])[0] for i, n in ((0, 20), (1, 7))]
    assert relative_error(batched[0], alone[0]) < 1e-6
    assert relative_error(batched[1, :7], alone[1]) < 1e-6
    assert np.all(batched[1, 7:] == 0)
    # Decode with different positions per sequence.
    step = np.random.default_rng(4).standard_normal((2, 1, CONFIG.dim))
    out = layer.forward(step, start_pos=np.array([20, 7]))
    single = DSALayer(CONFIG, seed=1)
    single.forward(inputs[1:2, :7])
    assert relative_error(out[1], single.forward(step[1:2], start_pos=7)[0]) < 1e-6


def test_unquantized_indexer_and_backend_argument(inputs):
    config = CONFIG.replace(indexer_fp8=False)
    a = DSALayer(config, seed=1).forward(inputs)
    b = DSALayer(config, seed=1, backend="numpy").forward(inputs)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_state_dict_round_trip_and_names(inputs, prefill):
    layer = DSALayer(CONFIG, seed=1)
    state = layer.state_dict()
    assert tuple(state) == PARAMETER_NAMES
    again = DSALayer.from_state_dict({k: v.astype(np.float32) for k, v in state.items()}, CONFIG)
    assert relative_error(again.forward(inputs), prefill[0]) < 1e-5
    other = DSALayer(CONFIG, seed=2).forward(inputs)
    assert relative_error(other, prefill[0]) > 0.1


def test_bad_input_is_refused():
    layer = DSALayer(CONFIG, seed=0)
    x = np.zeros((1, 4, CONFIG.dim))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, dim=64\]"):
        layer.forward(np.zeros((1, 4, 32)))
    with pytest.raises(ValueError, match="only 0 of its positions are cached"):
        layer.forward(x, start_pos=3)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        layer.forward(np.zeros((1, 65, CONFIG.dim)))
    with pytest.raises(ValueError, match="max_batch_size=4"):
        layer.forward(np.zeros((5, 1, CONFIG.dim)))
    with pytest.raises(ValueError, match="mode must be one of"):
        layer.forward(x, mode="flash")
    with pytest.raises(ValueError, match="kv_lora_rank=512"):
        DSALayer(CONFIG.replace(kv_lora_rank=256), kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"state_dict\['wo.weight'\] must have shape"):
        state = layer.state_dict()
        state["wo.weight"] = state["wo.weight"][:, :8]
        DSALayer.from_state_dict(state, CONFIG)
    with pytest.raises(ValueError, match="missing"):
        DSALayer.from_state_dict({}, CONFIG)
