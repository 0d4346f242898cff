"""The CuPy backend's indexers on Hopper's fp8 wgmma (backends/cupy_cuda/csrc/indexer_wgmma.cu): the
paged one (``indexer_paged_wgmma``, ``CupyBackend.paged_indexer_wgmma``) and the dense one
(``indexer_dense_wgmma``, ``CupyBackend.indexer_wgmma``).

On the CPU: which inputs take them (``paged_indexer_path``, ``dense_indexer_path``), that their instances
are compiled in CI (the SASS check of ``compile_check.REQUIRED_SASS`` asks for their QGMMA shapes), and
that the host's shared memory sizes follow the kernels' layout constants. On a GPU
(``@pytest.mark.gpu``, sm_90 only): against the float64 reference: for the paged kernel on ragged
batches with holes, one and two stacked queries, more queries than a block stacks, few heads, a result
wider than the table, NaN keys, strided inputs; for the dense kernel on causal, disjoint, empty and
partial ranges, with and without scales, an odd number of queries, NaN keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from cupy_hopper import hopper_backend
from cupy_launches import record_launches
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_indexer_problems")  # its asserts report as this file's do
from cupy_indexer_problems import PAGED_WGMMA_CASES, check_paged_scores, nan_key_problem, paged_problem  # noqa: E402

torch = pytest.importorskip("torch")

SOURCE = Path(cupy_backend.__file__).resolve().parent / "csrc" / "indexer_wgmma.cu"


@pytest.mark.parametrize(("h_i", "d_i", "block_size", "capability", "chosen", "expected"), [
    (64, 128, 64, 90, True, "wgmma"),
    (4, 128, 128, 90, True, "wgmma"),
    (64, 128, 64, 90, False, "mma"),     # not chosen
    (64, 128, 64, 89, True, "mma"),      # wgmma exists on sm_90 only
    (64, 128, 64, 100, True, "mma"),
    (64, 64, 64, 90, True, "mma"),       # a key is one 128-byte row
    (65, 128, 64, 90, True, "mma"),      # one query's heads fill at most 64 columns
    (64, 128, 32, 90, True, "mma"),      # a step's 64 positions must lie in one page
])
def test_which_inputs_take_the_wgmma_kernel(h_i, d_i, block_size, capability, chosen, expected):
    assert cupy_backend.paged_indexer_path(h_i, d_i, block_size, capability, chosen) == expected


@pytest.mark.parametrize(("q_dtype", "k_dtype", "h_i", "d_i", "capability", "chosen", "expected"), [
    ("float8_e4m3fn", "float8_e4m3fn", 64, 128, 90, True, "wgmma"),
    ("float8_e4m3fn", "float8_e4m3fn", 1, 128, 90, True, "wgmma"),
    ("float8_e4m3fn", "float8_e4m3fn", 64, 128, 90, False, "other"),
    ("float8_e4m3fn", "float8_e4m3fn", 64, 128, 89, True, "other"),
    ("bfloat16", "bfloat16", 64, 128, 90, True, "other"),       # e4m3 products only
    ("float8_e4m3fn", "bfloat16", 64, 128, 90, True, "other"),
    ("float8_e4m3fn", "float8_e4m3fn", 64, 64, 90, True, "other"),
    ("float8_e4m3fn", "float8_e4m3fn", 65, 128, 90, True, "other"),
])
def test_which_inputs_take_the_dense_wgmma_kernel(q_dtype, k_dtype, h_i, d_i, capability, chosen, expected):
    assert cupy_backend.dense_indexer_path(q_dtype, k_dtype, h_i, d_i, capability, chosen) == expected


def test_the_wgmma_kernels_are_the_defaults(monkeypatch):
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER_WGMMA", raising=False)
    monkeypatch.delenv("DSA_REF_CUPY_INDEXER_WGMMA", raising=False)
    backend = cupy_backend.CupyBackend()
    assert backend.paged_indexer_wgmma is True and backend.indexer_wgmma is True


def test_its_instances_are_compiled_for_sm90a_with_their_qgmma_shapes():
    assert set(kernels.KERNELS["indexer_wgmma.cu"]) == {"indexer_paged_wgmma_q1", "indexer_paged_wgmma_q2",
                                                        "indexer_dense_wgmma_q2"}
    assert kernels.SOURCE_ARCHITECTURES["indexer_wgmma.cu"] == "sm_90a"
    shapes = compile_check.REQUIRED_SASS[("indexer_wgmma.cu", "sm_90a")]
    assert any("QGMMA.64x64x32" in s for s in shapes) and any("QGMMA.64x128x32" in s for s in shapes)


def test_the_host_asks_for_the_shared_memory_the_kernel_lays_out():
    text = SOURCE.read_text()
    constant = {name: int(value) for name, value in re.findall(r"constexpr int (\w+) = (\d+);", text)}
    keys, row, stages = constant["KEYS"], constant["ROW"], constant["STAGES"]
    for queries in (1, 2):
        expected = 64 * queries * row + stages * (keys * row + keys * 4) + 1024
        assert cupy_backend.INDEXER_WGMMA_SMEM[queries] == expected
    assert cupy_backend.INDEXER_WGMMA_POSITIONS == constant["STEPS"] * keys


# ----------------------------------------------------------------------------- GPU
def _hopper_backend(monkeypatch):
    backend = hopper_backend("indexer_paged_wgmma")
    backend.paged_indexer_wgmma = True
    backend.paged_indexer_wgmma_v2 = False  # the first wgmma kernel; test_cupy_paged_indexer_v2.py has the default
    backend.indexer_wgmma = True
    backend.poison_outputs = True
    return backend, record_launches(monkeypatch)


def _check(problem, backend, launched, queries):
    check_paged_scores(problem, backend, launched, f"indexer_paged_wgmma_q{queries}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAGED_WGMMA_CASES))
@pytest.mark.parametrize("strided", [False, True])
def test_wgmma_kernel_matches_the_reference(name, strided, monkeypatch):
    backend, launched = _hopper_backend(monkeypatch)
    problem, queries = paged_problem(PAGED_WGMMA_CASES[name], len(name), strided=strided)
    _check(problem, backend, launched, queries)


@pytest.mark.gpu
def test_a_nan_key_poisons_its_own_scores_and_no_other(monkeypatch):
    """A NaN byte in one key gives NaN at that key's position for every query that sees it, also with
    4 of the 64 head columns in use (the absent ones must not turn 0 x NaN into the sum)."""
    backend, launched = _hopper_backend(monkeypatch)
    _check(nan_key_problem(1), backend, launched, 1)


DENSE_RANGES = ["causal", "disjoint", "empty-and-partial"]


def _dense_problem(rng, s_q: int, s_kv: int, h_i: int, ranges: str):
    from dsa_ref import reference

    q, q_scale = reference.quantize_fp8(rng.standard_normal((s_q, h_i, 128)), block=128)  # [s_q, h_i, 128]
    k, k_scale = reference.quantize_fp8(rng.standard_normal((s_kv, 128)), block=128)  # [s_kv, 128]
    weights = (rng.standard_normal((s_q, h_i)) * q_scale[..., 0]).astype(np.float32)  # [s_q, h_i]
    if ranges == "causal":  # query t at key position s_kv - s_q + t
        key_start = np.zeros(s_q, np.int32)
        key_end = (np.arange(s_q) + s_kv - s_q + 1).astype(np.int32)
    elif ranges == "disjoint":  # neighbouring queries of a block far apart
        key_start = np.where(np.arange(s_q) % 2 == 0, 0, s_kv - 70).astype(np.int32)
        key_end = np.where(np.arange(s_q) % 2 == 0, 90, s_kv).astype(np.int32)
    else:  # empty ranges, ranges inside one step, a range ending at s_kv
        key_start = rng.integers(0, s_kv, s_q).astype(np.int32)
        key_end = np.minimum(key_start + rng.integers(0, 40, s_q), s_kv).astype(np.int32)
        key_end[::3] = key_start[::3]
    return dict(q=q, weights=weights, k=k, key_start=key_start, key_end=key_end,
                k_scale=k_scale[:, 0].astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("ranges", DENSE_RANGES)
@pytest.mark.parametrize("with_scale", [True, False])
def test_dense_wgmma_kernel_matches_the_reference(ranges, with_scale, monkeypatch):
    import dsa_ref
    from dsa_ref import interop, reference
    from dsa_ref.testing.assertions import assert_close
    from dsa_ref.testing.tolerances import tolerance_for

    backend, launched = _hopper_backend(monkeypatch)
    inputs = _dense_problem(np.random.default_rng(len(ranges)), 37, 2500, 64, ranges)  # an odd s_q, a partial run
    if not with_scale:
        inputs["k_scale"] = None
    native = {name: None if value is None else backend.to_native(value) for name, value in inputs.items()}
    got = interop.to_numpy(dsa_ref.lightning_indexer(**native, backend=backend))
    expected = reference.lightning_indexer(**inputs)
    assert [n for n in launched if "indexer" in n] == ["indexer_dense_wgmma_q2"], launched
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), "the -inf pattern differs"
    assert_close(got, expected, tolerance_for("float8_e4m3fn", backend), name="scores")


@pytest.mark.gpu
def test_dense_wgmma_kernel_with_few_heads_and_a_nan_key(monkeypatch):
    import dsa_ref
    from dsa_ref import interop, reference

    backend, launched = _hopper_backend(monkeypatch)
    inputs = _dense_problem(np.random.default_rng(11), 8, 300, 3, "causal")
    k = inputs["k"].view(np.uint8).copy()
    k[17, 40] = 0x7F  # e4m3 NaN in key 17
    inputs["k"] = k.view(inputs["q"].dtype)
    native = {name: backend.to_native(value) for name, value in inputs.items()}
    got = interop.to_numpy(dsa_ref.lightning_indexer(**native, backend=backend))
    expected = reference.lightning_indexer(**inputs)
    assert [n for n in launched if "indexer" in n] == ["indexer_dense_wgmma_q2"], launched
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got[:, 17]).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=2e-2, atol=2e-2 * np.abs(expected[finite]).max())
