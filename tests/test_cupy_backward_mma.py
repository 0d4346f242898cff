"""The cupy backend's tensor-core sparse-MLA backward (csrc/sparse_mla_backward_mma.cu).

CPU part: which inputs the wrapper routes to the mma.sync kernels (default and deterministic) and
which keep the float32 kernels, that the host's shared-memory size is the kernel's, the query chunks
of deterministic mode, and the order of its per-row sums. GPU part (``@pytest.mark.gpu``): the V3.2
shape (bf16, d_qk 576, d_v 512) against the float64 reference with the kit's bf16 gradient
tolerance and term scales, on duplicates, invalid indices of every kind, topk_length, attn_sink,
d_lse, a query without a valid slot, unread rows filled with NaN (their gradient must stay exactly
0), heads that do not fill a block of 64, and one larger case, in both modes; deterministic mode
bitwise repeatable, also over several query chunks; each test checks which kernels ran.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cupy_launches import record_launches

import dsa_ref
from dsa_ref import interop, reference
from dsa_ref.testing import problems
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import kernels

pytest.register_assert_rewrite("cupy_backward_problems")  # its asserts report as this file's do
from cupy_backward_problems import (  # noqa: E402
    A100_SMEM,
    H200_SMEM,
    assert_bitwise_equal,
    assert_gradients_match,
    backward_path,
    count_chunks,
)


# ----------------------------------------------------------------------------- CPU
def _path(**changes):
    return backward_path(changes, deterministic=False)


def test_v32_bf16_backward_routes_to_the_mma_kernel():
    assert _path() == "mma"


def test_deterministic_v32_bf16_backward_routes_to_the_deterministic_mma_kernels_when_chosen():
    # Opt-in until the deterministic tensor-core path has passed the kit on a GPU (NOTES.md).
    assert _path(deterministic=True) == "simt"
    assert _path(deterministic=True, deterministic_tensor_cores=True) == "mma_deterministic"
    assert _path(deterministic=False, deterministic_tensor_cores=True) == "mma"


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("changes", [
    dict(q_dtype="float16"), dict(q_dtype="float32"), dict(kv_dtype="float32"), dict(kv_dtype="float16"),
    dict(q_dtype="float16", kv_dtype="float16"), dict(d_qk=64, kv_width=64), dict(kv_width=512),
    dict(d_v=256), dict(d_v=576), dict(smem_limit=A100_SMEM),
])
def test_other_backward_inputs_keep_the_float32_kernels(changes, deterministic):
    assert _path(**changes, deterministic=deterministic) == "simt"


def test_mma_backward_kernels_are_listed_and_their_shared_memory_agrees_with_the_source():
    assert kernels.KERNELS["sparse_mla_backward_mma.cu"] == (
        "sparse_mla_bwd_mma", "sparse_mla_bwd_mma_deterministic", "sparse_mla_bwd_mma_row_sum")
    text = kernels.source_text("sparse_mla_backward_mma.cu")
    for name in kernels.KERNELS["sparse_mla_backward_mma.cu"]:
        assert f"{name}(" in text, name
    row_sum_threads = re.search(r"ROW_SUM_THREADS = D_QK / (\d+);", text)
    assert row_sum_threads is not None and 576 // int(row_sum_threads.group(1)) == \
        cupy_backend.DETERMINISTIC_ROW_SUM_THREADS
    total = re.search(r"TOTAL = .*// (\d+)", text)
    assert total is not None and int(total.group(1)) == cupy_backend.BACKWARD_MMA_SMEM
    assert cupy_backend.BACKWARD_MMA_SMEM <= H200_SMEM


ENTRY_BYTES = 576 * 4  # one (query, head block, slot) of the contribution buffer


@pytest.mark.parametrize(("h", "head_blocks"), [(16, 1), (64, 1), (100, 2), (128, 2)])
def test_deterministic_chunks_keep_the_contribution_buffer_within_its_budget(monkeypatch, h, head_blocks):
    budget = 1000 * ENTRY_BYTES
    monkeypatch.setattr(cupy_backend, "DETERMINISTIC_MMA_BUFFER_BYTES", budget)
    chunk = cupy_backend.deterministic_mma_chunk_queries(500, h, topk=64)
    assert chunk == 1000 // (64 * head_blocks)
    assert chunk * head_blocks * 64 * ENTRY_BYTES <= budget < (chunk + 1) * head_blocks * 64 * ENTRY_BYTES
    assert cupy_backend.deterministic_mma_chunk_queries(3, h, topk=64) == 3  # never more queries than there are
    assert cupy_backend.deterministic_mma_chunk_queries(500, h, topk=2000) == 1  # one query even over the budget
    assert cupy_backend.deterministic_mma_chunk_queries(500, h, topk=0) == 500


def test_default_deterministic_chunk_at_the_v32_training_shape():
    # 1 GiB / (2048 slots x 2304 bytes): 227 queries at h 64, 113 at h 128 (two head blocks).
    assert cupy_backend.deterministic_mma_chunk_queries(4096, 64, topk=2048) == 227
    assert cupy_backend.deterministic_mma_chunk_queries(4096, 128, topk=2048) == 113


def _read_rows_numpy(indices, topk_length, s_kv):
    return np.where(reference.valid_slots(indices, s_kv, topk_length), indices, -1).astype(np.int32)


def test_deterministic_plans_hold_whole_chunks_within_the_scratch_budget(monkeypatch):
    monkeypatch.setattr(cupy_backend, "CHUNK_BYTES", 10 * 7 * 64 * cupy_backend._PLAN_BYTES_PER_PAIR + 5)
    assert cupy_backend.deterministic_mma_plan_queries(7, topk=64) == 70
    assert cupy_backend.deterministic_mma_plan_queries(100, topk=64) == 100  # one chunk even over the budget
    monkeypatch.undo()
    # The V3.2 training shape sorts 14 chunks of 227 queries at once (28 of 113 at h 128).
    assert cupy_backend.deterministic_mma_plan_queries(227, topk=2048) == 14 * 227
    assert cupy_backend.deterministic_mma_plan_queries(113, topk=2048) == 28 * 113


def test_sorted_row_keys_list_each_rows_readers_once_in_pair_order():
    rng = np.random.default_rng(0)
    s_q, s_kv, topk = 7, 23, 16
    problem = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=1, d_qk=8, d_v=8, topk=topk, dtype="float32",
                                          invalid_fraction=0.3, duplicate_fraction=0.3, topk_length=True)
    rows = _read_rows_numpy(problem.inputs["indices"], problem.inputs["topk_length"], s_kv)
    keys = cupy_backend._sorted_row_keys(rows, s_kv, xp=np)
    pairs = s_q * topk
    assert keys.dtype == np.int64 and keys.shape == (pairs,) and (np.diff(keys) > 0).all()
    flat = rows.reshape(-1)
    assert sorted((keys % pairs).tolist()) == list(range(pairs))
    begin, end = cupy_backend._row_ranges(keys, s_kv, 0, pairs, xp=np)
    assert begin.shape == end.shape == (s_kv,) and (begin <= end).all()
    for row in range(s_kv):
        assert (keys[begin[row]:end[row]] % pairs).tolist() == np.flatnonzero(flat == row).tolist(), row
    assert end[-1] == (flat >= 0).sum()  # unread pairs sort after every row's


def test_row_ranges_of_a_chunk_keep_only_its_pairs():
    rows = np.array([[2, 0, 2], [2, -1, 1], [0, 2, 7]], np.int32)  # 7 = s_kv: never read
    keys = cupy_backend._sorted_row_keys(np.where(rows < 3, rows, -1), 3, xp=np)
    begin, end = cupy_backend._row_ranges(keys, 3, 3, 6, xp=np)  # the second query: pairs 3, 4, 5
    assert [(keys[b:e] % 9).tolist() for b, e in zip(begin, end)] == [[], [5], [3]]
    pairs_of_no_row = cupy_backend._sorted_row_keys(np.full((3, 4), -1, np.int32), 5, xp=np)
    begin, end = cupy_backend._row_ranges(pairs_of_no_row, 5, 0, 12, xp=np)
    assert (begin == end).all()


@pytest.mark.parametrize(("head_blocks", "chunk"), [(1, 5), (2, 5), (1, 2), (2, 3)])
def test_row_sums_of_the_chunks_add_up_the_contribution_buffer(head_blocks, chunk):
    """The buffer entries sparse_mla_bwd_mma_row_sum reads for each chunk of the plan,
    ((query of the chunk * head_blocks + head block) * topk + slot) in the order of the row ranges,
    add up to every valid slot's contribution scattered to its row."""
    rng = np.random.default_rng(head_blocks + 10 * chunk)
    s_q, s_kv, topk, width = 5, 11, 12, 3
    indices = rng.integers(-3, s_kv + 3, size=(s_q, topk)).astype(np.int32)
    topk_length = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
    rows = _read_rows_numpy(indices, topk_length, s_kv)
    contributions = rng.standard_normal((s_q, head_blocks, topk, width))
    contributions[np.broadcast_to((rows < 0)[:, None, :], contributions.shape[:3])] = np.nan  # never written
    keys = cupy_backend._sorted_row_keys(rows, s_kv, xp=np)
    summed = np.zeros((s_kv, width))
    for start in range(0, s_q, chunk):
        stop = min(s_q, start + chunk)
        entries = contributions[start:stop].reshape(-1, width)  # the buffer of this chunk
        begin, end = cupy_backend._row_ranges(keys, s_kv, start * topk, stop * topk, xp=np)
        for row in range(s_kv):
            for key in keys[begin[row]:end[row]]:
                query, slot = divmod(int(key - row * keys.size - start * topk), topk)
                assert 0 <= query < stop - start
                for head_block in range(head_blocks):
                    summed[row] += entries[(query * head_blocks + head_block) * topk + slot]
    expected = np.zeros((s_kv, width))
    valid_query, valid_slot = np.nonzero(rows >= 0)
    np.add.at(expected, rows[valid_query, valid_slot], contributions[valid_query, :, valid_slot].sum(axis=1))
    np.testing.assert_allclose(summed, expected, rtol=1e-12, atol=1e-12)
    assert np.isfinite(summed).all()


# ----------------------------------------------------------------------------- GPU
def _backend():
    pytest.importorskip("cupy")
    backend = cupy_backend.CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    if cupy_backend._smem_optin() < cupy_backend.BACKWARD_MMA_SMEM:
        pytest.skip("the mma backward needs sm_90's shared memory per block")
    backend.poison_outputs = True  # an element the kernel forgets to write is NaN and fails the comparison
    backend.deterministic_tensor_cores = True  # the default; set so the tests hold whatever the environment says
    backend.hopper_backward = False  # this file tests the mma.sync kernels (Hopper's default mode runs wgmma)
    return backend


def _problem(seed: int, *, s_q, s_kv, h, topk, empty_query=None, **features):
    """A bf16 V3.2 backward problem; ``empty_query`` gets no valid slot at all."""
    rng = np.random.default_rng(seed)
    forward = problems.sparse_mla_problem(rng, s_q=s_q, s_kv=s_kv, h=h, d_qk=576, d_v=512, topk=topk,
                                          dtype="bfloat16", **{k: v for k, v in features.items() if k != "d_lse"})
    inputs = dict(forward.inputs)
    if empty_query is not None:
        indices = inputs["indices"].copy()
        indices[empty_query] = rng.choice(np.array([-1, s_kv, np.iinfo(np.int32).min], np.int32), size=topk)
        inputs["indices"] = indices
    kv = inputs["kv"].copy()  # rows nobody reads are NaN: reading or writing one shows
    kv[problems.unread_rows(inputs["indices"], s_kv, inputs["topk_length"])] = np.nan
    inputs["kv"] = kv
    out, lse = reference.sparse_mla(**inputs)
    inputs["out"], inputs["lse"] = out, lse
    inputs["d_out"] = rng.standard_normal(out.shape).astype(np.float32)
    inputs["d_lse"] = rng.standard_normal(lse.shape).astype(np.float32) if features.get("d_lse") else None
    return problems.Problem("sparse_mla_backward", inputs, dict(forward.params), "bfloat16")



def _check(problem, monkeypatch, *, deterministic=False):
    backend = _backend()
    launched = record_launches(monkeypatch)
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    with dsa_ref.use_deterministic(deterministic):
        actual = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert set(launched) == set(DETERMINISTIC_KERNELS if deterministic else DEFAULT_KERNELS), launched
    assert_gradients_match(actual, expected, inputs, backend, unread_rows_exist=False)
    return actual


DEFAULT_KERNELS = ("sparse_mla_bwd_mma",)
DETERMINISTIC_KERNELS = ("sparse_mla_bwd_mma_deterministic", "sparse_mla_bwd_mma_row_sum")


SMALL_CASES = {
    f"h{h}-topk{topk}": dict(s_q=3, s_kv=300, h=h, topk=topk, invalid_fraction=0.2, duplicate_fraction=0.25,
                             topk_length=True, attn_sink=True, d_lse=True, empty_query=1)
    for h in (64, 128, 16) for topk in (64, 128)
}
SMALL_CASES["h16-topk100-plain"] = dict(s_q=3, s_kv=300, h=16, topk=100)  # a partial last tile, no options
SMALL_CASES["h100-topk64-duplicates"] = dict(s_q=3, s_kv=40, h=100, topk=64, duplicate_fraction=0.5,
                                             logit_scale=3.0)  # few rows, each read many times


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_mma_backward_matches_reference(name, monkeypatch):
    _check(_problem(len(name), **SMALL_CASES[name]), monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_deterministic_mma_backward_matches_reference(name, monkeypatch):
    _check(_problem(len(name), **SMALL_CASES[name]), monkeypatch, deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_mma_backward_without_queries(deterministic):
    backend = _backend()
    problem = _problem(3, s_q=0, s_kv=30, h=64, topk=16, attn_sink=True)
    with dsa_ref.use_deterministic(deterministic):
        dq, dkv, d_sink = dsa_ref.sparse_mla_backward(**problem.native_inputs(backend), backend=backend)
    assert interop.to_numpy(dq).shape == (0, 64, 576)
    assert (interop.to_numpy(dkv) == 0).all() and (interop.to_numpy(d_sink) == 0).all()


def _larger_problem():
    return _problem(11, s_q=24, s_kv=4096, h=128, topk=2048, invalid_fraction=0.05, duplicate_fraction=0.05,
                    attn_sink=True, d_lse=True, distribution="recent")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_mma_backward_at_a_larger_shape(monkeypatch, deterministic):
    _check(_larger_problem(), monkeypatch, deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("several_plans", [False, True])
@pytest.mark.parametrize("h", [64, 100])
def test_deterministic_mma_backward_is_bitwise_repeatable_over_several_chunks(monkeypatch, h, several_plans):
    # Few rows, each read by many (query, head block, slot) pairs: the sums an atomic order would change.
    problem = _problem(5, s_q=10, s_kv=40, h=h, topk=128, invalid_fraction=0.2, duplicate_fraction=0.5,
                       topk_length=True, attn_sink=True, d_lse=True, empty_query=4)
    head_blocks = (h + 63) // 64
    monkeypatch.setattr(cupy_backend, "DETERMINISTIC_MMA_BUFFER_BYTES", 3 * head_blocks * 128 * 576 * 4)
    if several_plans:  # two chunks a sort: queries 0-5 and 6-9
        monkeypatch.setattr(cupy_backend, "CHUNK_BYTES", 2 * 3 * 128 * cupy_backend._PLAN_BYTES_PER_PAIR)
        assert cupy_backend.deterministic_mma_plan_queries(3, 128) == 6
    chunks = count_chunks(monkeypatch, topk=128)
    first = _check(problem, monkeypatch, deterministic=True)
    assert chunks == [3, 3, 3, 1]
    second = _check(problem, monkeypatch, deterministic=True)
    assert chunks == [3, 3, 3, 1] * 2
    assert_bitwise_equal(first, second)


@pytest.mark.gpu
def test_deterministic_mma_backward_is_bitwise_repeatable_at_a_larger_shape(monkeypatch):
    problem = _larger_problem()
    monkeypatch.setattr(cupy_backend, "DETERMINISTIC_MMA_BUFFER_BYTES", 5 * 2 * 2048 * 576 * 4)  # 5 queries a chunk
    chunks = count_chunks(monkeypatch, topk=2048)
    first = _check(problem, monkeypatch, deterministic=True)
    second = _check(problem, monkeypatch, deterministic=True)
    assert chunks == [5, 5, 5, 5, 4] * 2
    assert_bitwise_equal(first, second)
