"""dsa_ref.decode.sparse_decode_step: the decode step of a batch against the reference ops composed by
hand (keys gathered out of the pages, scored, top-k, mapped to slots, sparse MLA on the dequantized
cache), on NumPy arrays and on torch tensors, its errors, and (on a GPU) its CUDA-graph replay."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref
from dsa_ref import reference
from dsa_ref.decode import sparse_decode_step
from dsa_ref.testing.problems import shuffled_block_table

D_I, H_I, HEADS, BLOCK = 16, 4, 3, 4
SM_SCALE = 0.07


def make_decode_step(context_lens, next_n, *, num_blocks=14, max_blocks=None, seed=0, d_i=D_I):
    """A decode step over both paged caches: blocks handed out in shuffled order, -1 table entries past
    each context, float keys and latent rows in slot order, packed to their fp8 layouts."""
    rng = np.random.default_rng(seed)
    context_lens = np.asarray(context_lens, np.int32)
    table = shuffled_block_table(rng, context_lens, BLOCK, num_blocks, max_blocks)
    rows = len(context_lens) * next_n
    latent = rng.standard_normal((num_blocks * BLOCK, 576))  # [slots, 576]
    q_index, _ = reference.quantize_fp8(rng.standard_normal((rows, H_I, d_i)), block=d_i)
    return dict(q=rng.standard_normal((rows, HEADS, 576)).astype(np.float32),
                kv_cache=reference.pack_kv_cache_fp8(latent),
                q_index=q_index,
                weights=rng.standard_normal((rows, H_I)).astype(np.float32),
                index_cache=reference.pack_indexer_cache_fp8(rng.standard_normal((num_blocks * BLOCK, d_i)), BLOCK),
                block_table=table, context_lens=context_lens)


def composed_by_hand(step, topk, next_n):
    """The step from the reference ops: each sequence's indexer keys gathered out of its pages in token
    order, scored under the causal ranges, top-k token positions, mapped to slots, sparse MLA on the
    dequantized cache."""
    keys, key_scales = reference.unpack_indexer_cache_fp8(step["index_cache"], D_I)  # [slots, d_i], [slots]
    table, lens = step["block_table"], step["context_lens"]
    width = table.shape[1] * BLOCK
    tokens = np.full((len(lens) * next_n, topk), -1, np.int64)  # [b · next_n, topk]
    for sequence, length in enumerate(lens.tolist()):
        rows = slice(sequence * next_n, (sequence + 1) * next_n)
        positions = np.arange(length)
        slots = table[sequence, positions // BLOCK] * BLOCK + positions % BLOCK  # [len], every block present
        key_start, key_end = reference.causal_key_ranges(next_n, length)
        scores = np.full((next_n, width), -np.inf, np.float32)  # [next_n, L]
        scores[:, :length] = reference.lightning_indexer(step["q_index"][rows], step["weights"][rows], keys[slots],
                                                         key_start=key_start, key_end=key_end,
                                                         k_scale=key_scales[slots])
        tokens[rows] = reference.topk_indices(scores, topk)
    slots = reference.slot_indices(tokens.reshape(len(lens), next_n, topk), table, BLOCK).reshape(tokens.shape)
    out, lse = reference.sparse_mla(step["q"], reference.unpack_kv_cache_fp8(step["kv_cache"]), slots,
                                    sm_scale=SM_SCALE, d_v=512)
    return out, lse, slots


# Ragged contexts shorter and longer than topk = 6; the -1 entries past the shorter ones.
CASES = [([9, 3, 14], 1), ([9, 3, 14], 2), ([2, 16, 7], 2)]


@pytest.mark.parametrize("context_lens,next_n", CASES)
def test_the_step_is_the_reference_ops_composed_by_hand(context_lens, next_n):
    step = make_decode_step(context_lens, next_n)
    assert (step["block_table"] == -1).any()
    out, lse, slots = sparse_decode_step(**step, topk=6, next_n=next_n, sm_scale=SM_SCALE)
    expected_out, expected_lse, expected_slots = composed_by_hand(step, 6, next_n)
    assert slots.dtype == np.int32 and slots.shape == (len(context_lens) * next_n, 6)
    np.testing.assert_array_equal(slots, expected_slots)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=1e-6)
    short = [i for i, n in enumerate(np.repeat(context_lens, next_n)) if n < 6]
    assert short and all((slots[i] == -1).any() for i in short), "a context shorter than topk pads with -1"


def test_the_indices_are_cache_slots_each_query_sees_only_its_past():
    next_n = 2
    step = make_decode_step([9, 3, 14], next_n)
    _, _, slots = sparse_decode_step(**step, topk=20, next_n=next_n, sm_scale=SM_SCALE)
    table = step["block_table"]
    for row, selected in enumerate(slots):
        sequence, j = divmod(row, next_n)
        position = step["context_lens"][sequence] - next_n + j
        visible = [int(table[sequence, t // BLOCK]) * BLOCK + t % BLOCK for t in range(position + 1)]
        assert sorted(selected[selected >= 0].tolist()) == sorted(visible)  # topk > context: all of them


def test_a_sequence_whose_blocks_are_absent_attends_to_nothing():
    step = make_decode_step([9, 5], 1)
    step["block_table"][1] = -1
    out, lse, slots = sparse_decode_step(**step, topk=4, sm_scale=SM_SCALE)
    assert (slots[1] == -1).all() and np.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert (slots[0] >= 0).all()


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("context_lens,next_n", CASES)
def test_torch_cpu_tensors_through_the_numpy_backend_give_the_same_step(context_lens, next_n):
    step = make_decode_step(context_lens, next_n, seed=3)
    expected = sparse_decode_step(**step, topk=6, next_n=next_n, sm_scale=SM_SCALE, backend="numpy")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value.view(np.uint8))).view(torch.float8_e4m3fn)
               if value.dtype.itemsize == 1 and value.dtype != np.uint8 else torch.from_numpy(value)
               for name, value in step.items()}
    got = sparse_decode_step(**tensors, topk=6, next_n=next_n, sm_scale=SM_SCALE, backend="numpy")
    assert all(isinstance(part, torch.Tensor) for part in got)
    assert got[2].dtype == torch.int32
    np.testing.assert_array_equal(got[2].numpy(), expected[2])
    np.testing.assert_array_equal(got[0].numpy(), expected[0])
    np.testing.assert_array_equal(got[1].numpy(), expected[1])


def test_holes_in_the_table_inside_a_context_are_never_selected_on_either_path():
    step = make_decode_step([9, 13, 14], 2, seed=6)
    step["block_table"][1, 1] = -1  # an unallocated block inside the context
    step["block_table"][2, 0] = 10**6  # an entry past the cache
    expected = sparse_decode_step(**step, topk=20, next_n=2, sm_scale=SM_SCALE)
    # Sequence 1 (13 tokens) loses tokens 4-7, sequence 2 (14 tokens) tokens 0-3; queries see 12 or 13, 13 or 14.
    assert (expected[2][2:6] >= 0).sum(axis=1).tolist() == [12 - BLOCK, 13 - BLOCK, 13 - BLOCK, 14 - BLOCK]
    tensors = {name: torch.from_numpy(value) for name, value in step.items() if name != "q_index"}
    tensors["q_index"] = torch.from_numpy(step["q_index"].astype(np.float32))
    got = sparse_decode_step(**tensors, topk=20, next_n=2, sm_scale=SM_SCALE, backend="numpy")
    expected = sparse_decode_step(**{**step, "q_index": step["q_index"].astype(np.float32)}, topk=20, next_n=2,
                                  sm_scale=SM_SCALE)
    for part, reference_part in zip(got, expected):
        np.testing.assert_array_equal(part.numpy(), reference_part)


def test_the_torch_path_clamps_context_lens_instead_of_reading_them():
    step = make_decode_step([9, 3, 14], 1, seed=4)
    tensors = {name: torch.from_numpy(value) for name, value in step.items() if name != "q_index"}
    tensors["q_index"] = torch.from_numpy(step["q_index"].astype(np.float32))
    capacity = step["block_table"].shape[1] * BLOCK
    reached = sparse_decode_step(**{**tensors, "context_lens": torch.tensor([9, 3, capacity], dtype=torch.int32)},
                                 topk=6, sm_scale=SM_SCALE, backend="numpy")
    clamped = sparse_decode_step(**{**tensors, "context_lens": torch.tensor([9, 3, 10**6], dtype=torch.int32)},
                                 topk=6, sm_scale=SM_SCALE, backend="numpy")
    for a, b in zip(reached, clamped):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="context_lens must be <= max_blocks"):
        sparse_decode_step(**{**step, "context_lens": np.array([9, 3, 10**6], np.int32)}, topk=6)


def test_the_torch_path_records_no_gradient():
    step = make_decode_step([9, 3], 1, seed=5)
    tensors = {name: torch.from_numpy(value) for name, value in step.items() if name not in ("q_index", "q")}
    tensors["q_index"] = torch.from_numpy(step["q_index"].astype(np.float32))
    q = torch.from_numpy(step["q"]).requires_grad_(True)
    out, lse, _ = sparse_decode_step(q, **tensors, topk=6, sm_scale=SM_SCALE, backend="numpy")
    assert not out.requires_grad and not lse.requires_grad


def _bad(name, value):
    step = make_decode_step([9, 3, 14], 1)
    step[name] = value(step) if callable(value) else value
    return step


ERRORS = [
    (lambda: _bad("q", lambda s: s["q"][:, :, :512]), {}, ValueError, r"q must have shape \[b \* next_n, h, 576\]"),
    (lambda: _bad("q", lambda s: s["q"][:2]), {}, ValueError, "q_index's b"),
    (lambda: _bad("kv_cache", lambda s: s["kv_cache"][:-1]), {}, ValueError, "share the block table"),
    (lambda: _bad("kv_cache", lambda s: s["kv_cache"].astype(np.int8)), {}, TypeError, "kv_cache.dtype must be uint8"),
    (lambda: _bad("kv_cache", [[0] * 656]), {}, TypeError, "kv_cache must be an array"),
    (lambda: _bad("index_cache", lambda s: s["index_cache"][:, :-1]), {}, ValueError, "k_cache must have shape"),
    (lambda: _bad("block_table", lambda s: s["block_table"][:2]), {}, ValueError, "block_table must have shape"),
    (lambda: _bad("block_table", lambda s: s["block_table"][:, :0]), {}, ValueError, "max_blocks >= 1"),
    (lambda: _bad("context_lens", lambda s: s["context_lens"].astype(np.float32)), {}, TypeError,
     "context_lens.dtype"),
    (lambda: _bad("weights", lambda s: s["weights"][:, :2]), {}, ValueError, "weights must have shape"),
    (lambda: make_decode_step([9, 3, 14], 1), dict(topk=0), ValueError, "topk must be >= 1"),
    (lambda: make_decode_step([9, 3, 14], 1), dict(topk=2.0), TypeError, "topk must be an int"),
    (lambda: make_decode_step([9, 3, 14], 1), dict(next_n=2), ValueError, r"b \* next_n"),
    (lambda: make_decode_step([9, 3, 14], 1), dict(sm_scale=float("nan")), ValueError, "sm_scale must be finite"),
    (lambda: _bad("context_lens", np.array([9, 0, 14], np.int32)), {}, ValueError, "context_lens must be >= next_n"),
]


@pytest.mark.parametrize("make,options,error,message", ERRORS)
def test_bad_arguments_get_named_errors(make, options, error, message):
    arguments = {"topk": 4, **options}
    with pytest.raises(error, match=message):
        sparse_decode_step(**make(), **arguments)


def test_a_numpy_argument_on_the_torch_path_is_named():
    step = make_decode_step([9, 3], 1)
    tensors = {name: torch.from_numpy(value) for name, value in step.items() if name != "q_index"}
    with pytest.raises(TypeError, match="q_index must be a torch.Tensor like q"):
        sparse_decode_step(**tensors, q_index=step["q_index"], topk=4)


def test_the_function_is_exported():
    assert dsa_ref.sparse_decode_step is sparse_decode_step


@pytest.mark.gpu
def test_the_step_replays_in_a_cuda_graph_bitwise_equal_to_eager():
    if dsa_ref.get_backend("triton").unavailable_reasons():
        pytest.skip("the triton backend cannot run here")
    from dsa_ref_backends.bench import random_fp8_cache

    torch.manual_seed(2)
    batch, next_n, h, topk, h_i, d_i, block_size, max_blocks = 8, 2, 128, 2048, 64, 128, 64, 64
    num_blocks = batch * max_blocks
    kv_cache = random_fp8_cache(torch, num_blocks * block_size, "cuda")
    keys = torch.randn(num_blocks * block_size, d_i, device="cuda")
    index_cache = torch.from_numpy(reference.pack_indexer_cache_fp8(keys.cpu().numpy(), block_size)).cuda()
    block_table = torch.randperm(num_blocks, device="cuda").view(batch, max_blocks).int()
    context_lens = torch.randint(next_n, max_blocks * block_size + 1, (batch,), device="cuda", dtype=torch.int32)
    context_lens[0] = 100  # a context shorter than topk
    block_table[0, 2:] = -1  # the padding past it
    q = torch.randn(batch * next_n, h, 576, device="cuda", dtype=torch.bfloat16)
    q_index = torch.randn(batch * next_n, h_i, d_i, device="cuda").to(torch.float8_e4m3fn)
    weights = torch.randn(batch * next_n, h_i, device="cuda") * h_i**-0.5

    def step():
        return sparse_decode_step(q, kv_cache, q_index, weights, index_cache, block_table, context_lens, topk=topk,
                                  next_n=next_n, backend="triton")

    from dsa_ref_backends.bench import capture_cuda_graph

    graph, captured = capture_cuda_graph(torch, step)
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, eager):
        assert torch.equal(got, expected), "the replayed graph differs from the eager step"
    assert (captured[2][:next_n] >= 0).sum(dim=1).le(100).all()  # the short context selects <= its 100 tokens
