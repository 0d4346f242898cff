"""lightning_indexer_paged: the decode indexer over a paged fp8 key cache, against a hand-gathered
lightning_indexer call, on the reference, the Backend base class's composed default, and Triton."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref
from dsa_ref import reference
from dsa_ref.backend import Backend
from dsa_ref.testing.problems import shuffled_block_table
from dsa_ref_backends.numpy_reference import NumpyBackend

D_I, HEADS, BLOCK = 16, 4, 4


class ComposedNumpy(NumpyBackend):
    """The numpy backend without its own paged op: the base class's composed default runs."""

    name = "composed-numpy"
    lightning_indexer_paged = Backend.lightning_indexer_paged


def _triton_or_skip():
    backend = dsa_ref.get_backend("triton") if "triton" in [b.name for b in dsa_ref.list_backends()] else None
    if backend is None or backend.unavailable_reasons():
        pytest.skip("the triton backend cannot run here")
    return backend


def make_step(context_lens, next_n, *, num_blocks=12, seed=0, max_blocks=None):
    """A decode step: per-sequence float keys in token order, their pages scattered over the cache by a
    random block table (-1 past each context), fp8 queries and weights."""
    rng = np.random.default_rng(seed)
    context_lens = np.asarray(context_lens, np.int32)
    table = shuffled_block_table(rng, context_lens, BLOCK, num_blocks, max_blocks)
    keys = rng.standard_normal((num_blocks * BLOCK, D_I))  # [slots, d_i], slot order
    cache = reference.pack_indexer_cache_fp8(keys, BLOCK)
    q, _ = reference.quantize_fp8(rng.standard_normal((len(context_lens) * next_n, HEADS, D_I)), block=D_I)
    weights = rng.standard_normal((len(context_lens) * next_n, HEADS)).astype(np.float32)
    return dict(q=q, weights=weights, k_cache=cache, block_table=table, context_lens=context_lens), keys


def hand_gathered(step, keys, next_n, max_context_len):
    """The expected logits: each sequence's keys gathered by hand in token order, quantized per key as the
    cache stores them, scored by lightning_indexer under the step's causal ranges."""
    key_fp8, key_scale = reference.quantize_fp8(keys, block=D_I, scale_format="ue8m0")  # [slots, d_i], [slots, 1]
    rows = []
    for b, length in enumerate(step["context_lens"].tolist()):
        tokens = np.arange(length)
        slots = step["block_table"][b, tokens // BLOCK] * BLOCK + tokens % BLOCK  # [len]
        start = np.zeros(next_n, np.int32)
        end = length - next_n + np.arange(next_n) + 1  # query j sees [0, len - next_n + j]
        scores = dsa_ref.lightning_indexer(step["q"][b * next_n:(b + 1) * next_n], step["weights"][b * next_n:(b + 1) * next_n],
                                           key_fp8[slots], key_start=start, key_end=end.astype(np.int32),
                                           k_scale=key_scale[slots, 0])  # [next_n, len]
        padded = np.full((next_n, max_context_len), -np.inf, np.float32)
        padded[:, :length] = scores
        rows.append(padded)
    return np.concatenate(rows)


@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("backend", ["numpy", ComposedNumpy()], ids=["reference", "composed"])
def test_equals_hand_gathered_indexer(backend, next_n):
    context_lens = [7, 2, 13, 4]  # ragged; 2 with next_n = 2: the first query sees one key
    step, keys = make_step(context_lens, next_n)
    expected = hand_gathered(step, keys, next_n, step["block_table"].shape[1] * BLOCK)
    got = dsa_ref.lightning_indexer_paged(**step, next_n=next_n, backend=backend)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("next_n", [1, 2])
def test_causal_bound_of_every_query(next_n):
    step, _ = make_step([5, 9], next_n, seed=1)
    got = dsa_ref.lightning_indexer_paged(**step, next_n=next_n)
    for b, length in enumerate([5, 9]):
        for j in range(next_n):
            finite = np.flatnonzero(np.isfinite(got[b * next_n + j]))
            np.testing.assert_array_equal(finite, np.arange(length - next_n + j + 1))


def test_triton_matches_reference_on_tiny_shapes():
    backend = _triton_or_skip()
    step, _ = make_step([6, 3], 2, seed=2)
    expected = dsa_ref.lightning_indexer_paged(**step, next_n=2)
    got = dsa_ref.lightning_indexer_paged(**step, next_n=2, backend=backend)
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    scale = np.abs(expected[np.isfinite(expected)]).max()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", ["numpy", ComposedNumpy()], ids=["reference", "composed"])
def test_blocks_outside_the_cache_are_never_read(backend):
    step, keys = make_step([6, 3], 1, num_blocks=8, seed=3, max_blocks=4)
    table = step["block_table"]
    table[0, 2:] = [np.iinfo(np.int32).min, 8]  # past the context of 6: garbage entries
    table[1, 1:] = [-1, 100, np.iinfo(np.int32).max]
    used = set(table[table >= 0].tolist()) & set(range(8))
    cache = step["k_cache"].copy()
    scales = cache[:, BLOCK * D_I:].view(np.float32)
    for block in set(range(8)) - used - {0}:  # block 0 may stand in for absent positions, then be masked
        scales[block] = np.nan
    step["k_cache"] = cache
    got = dsa_ref.lightning_indexer_paged(**step, backend=backend)
    assert not np.isnan(got).any()
    expected = hand_gathered(step, keys, 1, 16)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", ["numpy", ComposedNumpy()], ids=["reference", "composed"])
def test_absent_block_inside_a_context_scores_minus_inf(backend):
    step, _ = make_step([10], 1, seed=4)
    full = dsa_ref.lightning_indexer_paged(**step, backend=backend)
    step["block_table"][0, 1] = -1  # positions 4..7 have no page
    holed = dsa_ref.lightning_indexer_paged(**step, backend=backend)
    assert np.isneginf(holed[0, 4:8]).all()
    np.testing.assert_array_equal(np.delete(holed, np.s_[4:8], axis=1), np.delete(full, np.s_[4:8], axis=1))


def test_max_context_len_sets_the_width():
    step, _ = make_step([5, 3], 1, seed=5)
    narrow = dsa_ref.lightning_indexer_paged(**step, max_context_len=5)
    wide = dsa_ref.lightning_indexer_paged(**step, max_context_len=20)
    assert narrow.shape == (2, 5) and wide.shape == (2, 20)
    np.testing.assert_array_equal(wide[:, :5], narrow)
    assert np.isneginf(wide[:, 5:]).all()


def test_empty_batch():
    step, _ = make_step([3], 1)
    got = dsa_ref.lightning_indexer_paged(step["q"][:0], step["weights"][:0], step["k_cache"],
                                          step["block_table"][:0], step["context_lens"][:0], max_context_len=7)
    assert got.shape == (0, 7)
    composed = dsa_ref.lightning_indexer_paged(step["q"][:0], step["weights"][:0], step["k_cache"],
                                               step["block_table"][:0], step["context_lens"][:0], max_context_len=7,
                                               backend=ComposedNumpy())
    assert composed.shape == (0, 7)


def test_pack_writes_values_then_scales_per_block():
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((2 * BLOCK, D_I))
    cache = reference.pack_indexer_cache_fp8(keys, BLOCK, scale_format="fp32")
    values, scales = reference.quantize_fp8(keys, block=D_I, scale_format="fp32")
    assert cache.shape == (2, BLOCK * (D_I + 4)) and cache.dtype == np.uint8
    for slot in range(2 * BLOCK):
        block, t = divmod(slot, BLOCK)
        np.testing.assert_array_equal(cache[block, t * D_I:(t + 1) * D_I], values[slot].view(np.uint8))
        scale_at = BLOCK * D_I + 4 * t
        assert cache[block, scale_at:scale_at + 4].view("<f4")[0] == scales[slot, 0]
    unpacked_keys, unpacked_scales = reference.unpack_indexer_cache_fp8(cache, D_I)
    np.testing.assert_array_equal(unpacked_keys.view(np.uint8), values.view(np.uint8))
    np.testing.assert_array_equal(unpacked_scales, scales[:, 0])


def _step():
    step, _ = make_step([5, 3], 2, seed=7)
    return step


@pytest.mark.parametrize("change, error, message", [
    (dict(next_n=0), ValueError, "next_n must be >= 1"),
    (dict(q=np.zeros((3, HEADS, D_I), np.float32)), ValueError, r"b \* next_n = 2 \* 2 = 4"),
    (dict(q=np.zeros((4, HEADS), np.float32)), ValueError, r"q must have shape \[b \* next_n, h_i, d_i\]"),
    (dict(weights=np.zeros((4, HEADS + 1), np.float32)), ValueError, "weights must have shape"),
    (dict(weights=np.zeros((4, HEADS), np.int32)), TypeError, "weights.dtype"),
    (dict(k_cache=np.zeros((12, BLOCK * (D_I + 4)), np.float32)), TypeError, "k_cache.dtype must be uint8"),
    (dict(k_cache=np.zeros((12, BLOCK * (D_I + 4) + 1), np.uint8)), ValueError, r"block_size \* 20"),
    (dict(k_cache=np.zeros((12, BLOCK, D_I + 4), np.uint8)), ValueError, "k_cache must have shape"),
    (dict(k_cache=[[0]]), TypeError, "k_cache must be an array"),
    (dict(block_table=np.zeros((3, 2), np.int32)), ValueError, "block_table must have shape"),
    (dict(block_table=np.zeros((2, 2), np.float32)), TypeError, "block_table.dtype"),
    (dict(context_lens=np.array([5, 1], np.int32)), ValueError, r"context_lens must be >= next_n=2"),
    (dict(context_lens=np.array([5, 99], np.int32)), ValueError, r"max_blocks \* block_size"),
    (dict(context_lens=np.array([5.0, 3.0])), TypeError, "context_lens.dtype"),
    (dict(max_context_len=4), ValueError, r"max_context_len must be >= max\(context_lens\)=5"),
    (dict(max_context_len=-1), ValueError, "max_context_len must be >= 0"),
    (dict(max_context_len=4.0), TypeError, "max_context_len must be an int"),
])
def test_wrong_arguments_are_refused(change, error, message):
    arguments = dict(_step(), next_n=2)
    arguments.update(change)
    with pytest.raises(error, match=message):
        dsa_ref.lightning_indexer_paged(**arguments)


def test_context_lens_clamped_without_data_checks():
    step = _step()
    expected = dsa_ref.lightning_indexer_paged(**step, next_n=2)
    step["context_lens"] = np.array([5, 1], np.int32)  # 1 < next_n: clamped up to 2
    with dsa_ref.use_data_checks(False):
        clamped = dsa_ref.lightning_indexer_paged(**step, next_n=2)
    step["context_lens"] = np.array([5, 2], np.int32)
    np.testing.assert_array_equal(clamped, dsa_ref.lightning_indexer_paged(**step, next_n=2))
    assert expected.shape == clamped.shape
