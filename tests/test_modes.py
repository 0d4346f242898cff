"""The run-mode switches: deterministic accumulation, and the checks that read array values."""

from __future__ import annotations

import numpy as np
import pytest

import dsa_ref


def test_use_deterministic_as_a_call_and_as_a_context_manager():
    assert not dsa_ref.deterministic_enabled()
    with dsa_ref.use_deterministic():
        assert dsa_ref.deterministic_enabled()
        with dsa_ref.use_deterministic(False):
            assert not dsa_ref.deterministic_enabled()
        assert dsa_ref.deterministic_enabled()
    assert not dsa_ref.deterministic_enabled()
    restore = dsa_ref.use_deterministic(True)
    try:
        assert dsa_ref.deterministic_enabled()
    finally:
        restore.__exit__(None, None, None)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        dsa_ref.use_deterministic("yes")


def test_deterministic_mode_follows_torch_unless_set_explicitly():
    torch = pytest.importorskip("torch")
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert dsa_ref.deterministic_enabled()
        with dsa_ref.use_deterministic(False):
            assert not dsa_ref.deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not dsa_ref.deterministic_enabled()


def test_the_backward_ops_pass_the_mode_to_the_backend():
    from dsa_ref_backends.numpy_reference import NumpyBackend

    seen = []

    class Recording(NumpyBackend):
        name = "recording"

        def sparse_mla_backward(self, *args, deterministic, **kwargs):
            seen.append(deterministic)
            return super().sparse_mla_backward(*args, deterministic=deterministic, **kwargs)

    rng = np.random.default_rng(0)
    q, kv = rng.standard_normal((2, 1, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    indices = np.array([[0, 1], [2, -1]], np.int32)
    out, lse = dsa_ref.sparse_mla(q, kv, indices, d_v=4)
    dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, out, d_v=4, backend=Recording())
    with dsa_ref.use_deterministic():
        dsa_ref.sparse_mla_backward(q, kv, indices, out, lse, out, d_v=4, backend=Recording())
    assert seen == [False, True]


def _indexer_inputs():
    rng = np.random.default_rng(1)
    return (rng.standard_normal((4, 2, 8)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32),
            rng.standard_normal((6, 8)).astype(np.float32))


def test_without_data_checks_key_ranges_are_clamped_not_refused():
    q, w, k = _indexer_inputs()
    start, end = np.array([-3, 0, 2, 5]), np.array([2, 9, 1, 6])
    with pytest.raises(ValueError, match="key_start must be >= 0"):
        dsa_ref.lightning_indexer(q, w, k, key_start=start, key_end=end)
    with dsa_ref.use_data_checks(False):
        assert not dsa_ref.data_checks_enabled()
        scores = dsa_ref.lightning_indexer(q, w, k, key_start=start, key_end=end)
    assert dsa_ref.data_checks_enabled()
    clamped = dsa_ref.lightning_indexer(q, w, k, key_start=np.array([0, 0, 2, 5]), key_end=np.array([2, 6, 2, 6]))
    np.testing.assert_array_equal(scores, clamped)


def test_without_data_checks_topk_length_is_clamped():
    rng = np.random.default_rng(2)
    q, kv = rng.standard_normal((2, 2, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    indices = np.array([[0, 1, 2], [3, 4, 0]], np.int32)
    with pytest.raises(ValueError, match="topk_length values must lie in"):
        dsa_ref.sparse_mla(q, kv, indices, d_v=8, topk_length=np.array([-1, 7], np.int32))
    with dsa_ref.use_data_checks(False):
        got = dsa_ref.sparse_mla(q, kv, indices, d_v=8, topk_length=np.array([-1, 7], np.int32))
    expected = dsa_ref.sparse_mla(q, kv, indices, d_v=8, topk_length=np.array([0, 3], np.int32))
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_without_data_checks_no_value_of_a_torch_index_array_is_read(monkeypatch):
    torch = pytest.importorskip("torch")
    q, w, k = (torch.tensor(x) for x in _indexer_inputs())
    start, end = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 6, 3, 6])

    def no_reads(*args, **kwargs):
        raise AssertionError("a data check read a value")

    monkeypatch.setattr(dsa_ref._checks, "_min_max", no_reads)
    with dsa_ref.use_data_checks(False):
        dsa_ref.lightning_indexer(q, w, k, key_start=start, key_end=end)
    with pytest.raises(AssertionError, match="read a value"):
        dsa_ref.lightning_indexer(q, w, k, key_start=start, key_end=end)
