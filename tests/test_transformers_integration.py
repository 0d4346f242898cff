"""dsa_ref.integrations.transformers: transformers' DeepSeek-V3.2 on dsa-ref's MQA-mode sparse path.

A tiny random DeepseekV32 model (two layers, V3.2's latent widths 512 + 64 and indexer width 128,
16 indexer heads so that the top-k has no exact ties) against transformers' own eager attention,
whose top-k becomes a dense mask: prefill and decode steps, padding, both mask kinds, the cache
layout, ``disable``, the official indexer against dsa-ref's own layer, and the refusals.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_v32 = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")

from dsa_ref.integrations import transformers as dsa_hf  # noqa: E402

VOCAB = 97
PROMPT = 24
DECODE_STEPS = 10
TOPK = 8  # well below the context: the sparse output differs from the dense one
LATENT_WIDTH = 512 + 64


def tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=512,
                  qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, index_n_heads=16, index_head_dim=128,
                  index_topk=TOPK, first_k_dense_replace=2, max_position_embeddings=128,
                  # large enough weights that attention, and so the choice of keys, moves the logits
                  initializer_range=0.2)
    values.update(overrides)
    return transformers.DeepseekV32Config(**values)


def tiny_model(attn_implementation="eager", dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM._from_config(tiny_config(**overrides),
                                                             attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, PROMPT), generator=generator)
    # sequence 0 is left-padded by 3 tokens: a mask with a hole at the start of every row
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def cache_of(output):
    # transformers 5.24 names it `cache`; earlier 5.x releases `past_key_values`
    return output.cache if hasattr(output, "cache") else output.past_key_values


def cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_tokens(batch, steps):
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(3))


def generate(model, ids, mask, steps=DECODE_STEPS, sparse=None):
    """Prefill then ``steps`` decode steps of fixed tokens (so that two paths always see the same
    input); returns the logits of every step (real tokens only for the prefill) and the cache.
    ``sparse`` (a dict of options) runs the whole loop under enable()."""
    next_tokens = decode_tokens(ids.shape[0], steps).to(ids.device)
    if sparse is not None:
        dsa_hf.enable(model, **sparse)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            logits = [out.logits[mask.bool()]]
            cache, step_mask = cache_of(out), mask
            for step in range(steps):
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
                out = model(next_tokens[:, step:step + 1], attention_mask=step_mask, use_cache=True,
                            **{cache_argument(model): cache})
                logits.append(out.logits[:, -1])
    finally:
        if sparse is not None:
            dsa_hf.disable(model)
    return logits, cache


def assert_steps_close(got, expected, atol, rtol=1e-4):
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol, msg=lambda m: f"step {step}: {m}")


# ---------------------------------------------------------------------------- against transformers' eager
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_prefill_and_decode_match_transformers_eager(prompt, attn_implementation):
    ids, mask = prompt
    reference = tiny_model("eager")
    expected, _ = generate(reference, ids, mask)
    # the same weights under the other mask kind (float additive for eager, bool for sdpa)
    model = tiny_model(attn_implementation)
    got, cache = generate(model, ids, mask, sparse=dict(backend="numpy"))
    assert len(got) == DECODE_STEPS + 1
    assert_steps_close(got, expected, atol=2e-5)


def test_sparse_output_is_not_the_dense_one(prompt):
    """enable() follows the top-k: with topk < context the dense (every causal key) output differs
    measurably, and the sparse path must give the sparse one."""
    ids, mask = prompt
    sparse, _ = generate(tiny_model(), ids, mask, steps=3, sparse=dict(backend="numpy"))
    dense, _ = generate(tiny_model(index_topk=4096), ids, mask, steps=3)
    eager_sparse, _ = generate(tiny_model(), ids, mask, steps=3)
    gap = max((s - d).abs().max().item() for s, d in zip(sparse, dense))
    assert gap > 1e-2, f"the sparse and dense outputs differ by only {gap}: the test cannot tell them apart"
    assert_steps_close(sparse, eager_sparse, atol=2e-5)


def test_float64_matches_eager(prompt):
    # no padding: transformers' own float64 eager path turns fully masked rows into NaN
    ids, mask = prompt[0], torch.ones_like(prompt[1])
    expected, _ = generate(tiny_model(dtype=torch.float64), ids, mask, steps=3)
    got, _ = generate(tiny_model(dtype=torch.float64), ids, mask, steps=3, sparse=dict(backend="numpy"))
    assert got[0].dtype == torch.float64
    # transformers' eager softmax runs in float32 whatever the dtype: that rounding bounds the match
    assert_steps_close(got, expected, atol=1e-5, rtol=1e-5)


def test_selection_equals_transformers_topk_as_sets(prompt, monkeypatch):
    """The 16-head indexer is tie-free here: the selected sets equal transformers' own top-k on every
    row (its extra slots on early rows point at masked keys; ours are -1)."""
    ids, mask = prompt
    model = tiny_model()
    attention = model.model.layers[1].self_attn
    captured = {}

    def keep_eager_topk(module, args, output):
        captured["topk"], captured["mask"] = output, args[3]

    handle = attention.indexer.register_forward_hook(keep_eager_topk)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    visible = captured["mask"] > torch.finfo(captured["mask"].dtype).min  # [B, S, T]

    select = dsa_hf._select

    def keep_sparse_selection(module, *args):
        indices = select(module, *args)
        if module is attention:
            captured["sparse"] = indices
        return indices

    monkeypatch.setattr(dsa_hf, "_select", keep_sparse_selection)
    generate(model, ids, mask, steps=0, sparse=dict(backend="numpy"))
    ours = captured["sparse"].reshape(2, PROMPT, -1)
    compared = 0
    for b in range(2):
        for s in range(PROMPT):
            if not visible[b, s].any():
                continue
            theirs = {t for t in captured["topk"][b, s].tolist() if visible[b, s, t]}
            mine = {t - b * PROMPT for t in ours[b, s].tolist() if t >= 0}
            assert mine == theirs, f"row {b}, {s}: {sorted(mine)} != {sorted(theirs)}"
            compared += 1
    assert compared == 2 * PROMPT - 3


# ---------------------------------------------------------------------------- cache, disable
def test_cache_holds_one_latent_row_per_token_per_layer(prompt):
    ids, mask = prompt
    _, cache = generate(tiny_model(), ids, mask, steps=DECODE_STEPS, sparse=dict(backend="numpy"))
    tokens = PROMPT + DECODE_STEPS
    assert len(cache.layers) == 2
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (2, 1, tokens, LATENT_WIDTH)
        assert tuple(layer.values.shape) == (2, 1, tokens, 0)
        assert tuple(layer.indexer_keys.shape) == (2, tokens, 128)
    assert cache.get_seq_length() == tokens


def test_disable_restores_bit_identical_eager(prompt):
    ids, mask = prompt
    model = tiny_model()
    before, _ = generate(model, ids, mask, steps=3)
    forward_before = [layer.self_attn.forward for layer in model.model.layers]
    dsa_hf.enable(model, backend="numpy")
    assert dsa_hf.is_enabled(model)
    dsa_hf.enable(model, backend="numpy", indexer="official")  # again: only the options change
    dsa_hf.disable(model)
    assert not dsa_hf.is_enabled(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert [layer.self_attn.forward for layer in model.model.layers] == forward_before
    after, _ = generate(model, ids, mask, steps=3)
    for b, a in zip(before, after):
        assert torch.equal(a, b)


def test_a_cache_of_the_other_layout_is_refused(prompt):
    ids, mask = prompt
    model = tiny_model()
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))  # transformers' 512 + 64 layout
    dsa_hf.enable(model, backend="numpy")
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with pytest.raises(ValueError, match="start a fresh cache"):
        with torch.no_grad():
            model(ids[:, :1], attention_mask=step_mask, use_cache=True, **{cache_argument(model): cache})


# ---------------------------------------------------------------------------- the official indexer
def test_indexers_equal_dsa_ref_layer():
    """On one transformers layer (a prefill), indexer="official" is dsa-ref's own DSAAttention (the
    official indexer: Hadamard rotation, fp8 e4m3 with ue8m0 scales) on the same weights, and
    indexer="transformers" is the same layer without fp8 (the rotation leaves exact scores as they are)."""
    from dsa_ref.layer import DSAConfig
    from dsa_ref.torch import DSAAttention

    model = tiny_model()
    attention = model.model.layers[0].self_attn
    names = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
             "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    state = attention.state_dict()
    weights = {name: state[name] for name in state if name.startswith("indexer.")}
    weights.update({f"{official}.weight": state[f"{hf}.weight"] for official, hf in names.items()})
    config = DSAConfig(dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
                       v_head_dim=32, index_n_heads=16, index_head_dim=128, index_topk=TOPK, max_seq_len=64,
                       original_seq_len=64, indexer_fp8=True, scale_fmt="ue8m0")
    layers = {"official": DSAAttention(config, weights=weights, backend="numpy"),
              "transformers": DSAAttention(config.replace(indexer_fp8=False), weights=weights, backend="numpy")}

    tokens = 48  # long enough that fp8 moves some rows' selection: the two references differ
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(2))
    selections = {name: layer.selection(x)[0] for name, layer in layers.items()}
    moved = sum(set(selections["official"][t].tolist()) != set(selections["transformers"][t].tolist())
                for t in range(tokens))
    assert moved > 0, "fp8 changes no selection here: the test could not tell the two indexers apart"

    position_ids = torch.arange(tokens)[None]
    position_embeddings = model.model.rotary_emb(x, position_ids)
    for indexer, layer in layers.items():
        dsa_hf.enable(model, backend="numpy", indexer=indexer)
        try:
            with torch.no_grad():
                got, attention_weights = attention(x, position_embeddings=position_embeddings, attention_mask=None,
                                                   position_ids=position_ids)
                expected = layer(x)
        finally:
            dsa_hf.disable(model)
        assert attention_weights is None
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"indexer={indexer}: {m}")


def test_official_indexer_decodes_with_its_own_cache(prompt):
    ids, mask = prompt
    model = tiny_model()
    prefill_only, _ = generate(model, ids, mask, steps=0, sparse=dict(backend="numpy", indexer="official"))
    stepped, cache = generate(model, ids, mask, steps=4, sparse=dict(backend="numpy", indexer="official"))
    torch.testing.assert_close(stepped[0], prefill_only[0], atol=0, rtol=0)
    assert tuple(cache.layers[0].keys.shape) == (2, 1, PROMPT + 4, LATENT_WIDTH)
    # each decode step equals a prefill of the whole sequence so far
    tokens = torch.cat([ids, decode_tokens(2, 4)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    again, _ = generate(model, tokens, full_mask, steps=0, sparse=dict(backend="numpy", indexer="official"))
    last = again[0].reshape(-1, VOCAB)
    rows = full_mask.bool().sum(1).cumsum(0) - 1  # each sequence's last real token
    torch.testing.assert_close(stepped[4], last[rows], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- refusals
def test_refuses_a_model_without_deepseek_v32_attention():
    with pytest.raises(ValueError, match="no DeepseekV32Attention"):
        dsa_hf.enable(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dsa_hf.enable("deepseek-ai/DeepSeek-V3.2")
    with pytest.raises(ValueError, match="no DeepseekV32Attention"):
        dsa_hf.disable(torch.nn.Linear(4, 4))


def test_refuses_unknown_options():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"indexer must be one of \('transformers', 'official'\), got 'fp8'"):
        dsa_hf.enable(model, indexer="fp8")
    with pytest.raises(ValueError, match="not-a-backend"):
        dsa_hf.enable(model, backend="not-a-backend")
    with pytest.raises(TypeError, match="backend must be a backend name"):
        dsa_hf.enable(model, backend=3)
    assert "forward" not in model.model.layers[0].self_attn.__dict__


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_triton_bf16_layers_at_8k_context():
    """A few random bf16 layers at 8K context on the Triton kernels against transformers' sdpa path
    (whose top-k is a dense mask): the same model, prefill and a few decode steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    context, steps = 8192, 4
    model = tiny_model("sdpa", dtype=torch.bfloat16, num_hidden_layers=3, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=16, q_lora_rank=384, qk_nope_head_dim=128, v_head_dim=128,
                       index_n_heads=64, index_topk=2048, max_position_embeddings=2 * context,
                       first_k_dense_replace=3, initializer_range=0.02).cuda()
    ids = torch.randint(0, VOCAB, (1, context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    expected, _ = generate(model, ids, mask, steps=steps)
    got, cache = generate(model, ids, mask, steps=steps, sparse=dict(backend="triton"))
    assert tuple(cache.layers[0].keys.shape) == (1, 1, context + steps, LATENT_WIDTH)
    # bf16 throughout: compare the logits' scale-relative error, tie flips at the top-k aside
    for step, (g, e) in enumerate(zip(got, expected)):
        error = (g.float() - e.float()).norm() / e.float().norm()
        assert error < 5e-2, f"step {step}: relative error {error:.3g}"
