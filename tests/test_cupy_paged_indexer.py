"""The cupy backend's paged indexer kernel (``indexer_paged_mma`` in csrc/indexer.cu), opt-in until
it has run on a GPU.

CPU part: which inputs the backend says it reads in place (only when chosen, only e4m3 queries with
the tensor-core kernel's head counts and widths), that the kernel is listed for the CI compile, and
that the dense kernel's launch plan is the one the paged kernel shares. GPU part
(``@pytest.mark.gpu``): against the float64 reference on the problems of paged_indexer_cases.py and
strided inputs, outputs poisoned with NaN, and the decode step through it.
"""

from __future__ import annotations

import numpy as np
import pytest

from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from cupy_launches import record_launches
from dsa_ref_backends.cupy_cuda import kernels
from paged_indexer_cases import PAGED_INDEXER_CASES

torch = pytest.importorskip("torch")


def _chosen_backend():
    backend = cupy_backend.CupyBackend()
    backend.paged_indexer_kernel = True
    return backend


def test_the_paged_kernel_is_the_default_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER", raising=False)
    q = torch.zeros((2, 64, 128), dtype=torch.float8_e4m3fn)
    cache = torch.zeros((4, 64 * 132), dtype=torch.uint8)
    assert cupy_backend.CupyBackend().reads_pages_in_place(q, cache) is True
    off = cupy_backend.CupyBackend()
    off.paged_indexer_kernel = False
    assert off.reads_pages_in_place(q, cache) is False
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER", "0")
    assert cupy_backend.CupyBackend().reads_pages_in_place(q, cache) is False


@pytest.mark.parametrize(("shape", "dtype", "expected"), [
    ((2, 64, 128), torch.float8_e4m3fn, True),
    ((2, 16, 32), torch.float8_e4m3fn, True),
    ((2, 64, 128), torch.bfloat16, False),   # the kernel multiplies e4m3 queries only
    ((2, 65, 128), torch.float8_e4m3fn, False),  # more heads than 4 m16 tiles
    ((2, 64, 48), torch.float8_e4m3fn, False),  # d_i not a multiple of 32
    ((2, 64, 288), torch.float8_e4m3fn, False),  # wider than 256
])
def test_inputs_the_paged_kernel_takes(shape, dtype, expected):
    q = torch.zeros(shape, dtype=dtype)
    cache = torch.zeros((4, 64 * (shape[2] + 4)), dtype=torch.uint8)
    assert _chosen_backend().reads_pages_in_place(q, cache) is expected


@pytest.mark.parametrize(("block_size", "expected"), [(64, True), (4, True), (1, False), (2, False), (6, False)])
def test_blocks_must_keep_key_rows_on_16_bytes(block_size, expected):
    q = torch.zeros((2, 64, 32), dtype=torch.float8_e4m3fn)
    cache = torch.zeros((4, block_size * 36), dtype=torch.uint8)
    assert _chosen_backend().reads_pages_in_place(q, cache) is expected


def test_the_paged_kernel_instances_are_listed_for_the_compile():
    assert {f"indexer_paged_mma<{m}>" for m in (1, 2, 3, 4)} <= set(kernels.KERNELS["indexer.cu"])


def test_the_launch_plan_keeps_about_eight_blocks_per_sm(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_multiprocessors", lambda: 132)
    smem, grid, tiles = cupy_backend._indexer_mma_plan(4, 128, 1, 131072, 64)
    assert smem == 2 * 64 * (256 + 16) + 2 * 128 * (128 + 16) + 2 * 64 * 4
    assert tiles == 16 and grid == (64, 1024 // 16)  # 1024 tiles of 128 positions, 16 a block
    smem, grid, tiles = cupy_backend._indexer_mma_plan(1, 32, 2, 300, 2)
    assert tiles == 1 and grid == (2, 3)


# ----------------------------------------------------------------------------- GPU
def _gpu_backend(monkeypatch):
    pytest.importorskip("cupy")
    backend = _chosen_backend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    backend.poison_outputs = True
    # This file checks the mma.sync kernel; on Hopper the fp8 wgmma one is the default
    # (tests/test_cupy_indexer_wgmma.py checks it). The decode step looks its backend up by name.
    backend.paged_indexer_wgmma = False
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_WGMMA", "0")
    return backend, record_launches(monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAGED_INDEXER_CASES))
@pytest.mark.parametrize("strided", [False, True])
def test_paged_kernel_matches_the_reference(name, strided, monkeypatch):
    import dsa_ref
    from dsa_ref import interop, reference
    from dsa_ref.testing import problems
    from dsa_ref.testing.assertions import assert_close
    from dsa_ref.testing.tolerances import tolerance_for

    backend, launched = _gpu_backend(monkeypatch)
    case = PAGED_INDEXER_CASES[name]
    problem = problems.paged_indexer_problem(np.random.default_rng(len(name)), strided=strided, **case)
    got = interop.to_numpy(dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend))
    expected = reference.lightning_indexer_paged(**problem.inputs)
    assert [n for n in launched if "indexer" in n] == [f"indexer_paged_mma<{(case['h_i'] + 15) // 16}>"]
    assert np.array_equal(np.isneginf(got), np.isneginf(expected)), "the -inf pattern differs"
    assert_close(got, expected, tolerance_for(problem.dtype, backend), name="scores")


@pytest.mark.gpu
def test_the_decode_step_scores_through_the_paged_kernel(monkeypatch):
    from test_decode_step import SM_SCALE, make_decode_step

    from dsa_ref import interop
    from dsa_ref.decode import sparse_decode_step

    backend, launched = _gpu_backend(monkeypatch)
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER", "1")  # the step looks the backend up by name
    # d_I 32: the kernel's smallest width (the decode tests' 16 takes the per-sequence path).
    step = make_decode_step([70, 130, 5], 2, num_blocks=60, seed=4, d_i=32)
    expected = sparse_decode_step(**step, topk=16, next_n=2, sm_scale=SM_SCALE, backend="numpy")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value.view(np.uint8))).view(torch.float8_e4m3fn).cuda()
               if value.dtype.itemsize == 1 and value.dtype != np.uint8 else torch.from_numpy(value).cuda()
               for name, value in step.items()}
    got = sparse_decode_step(**tensors, topk=16, next_n=2, sm_scale=SM_SCALE, backend="cupy")
    assert any(name.startswith("indexer_paged_mma") for name in launched), launched
    for row, (got_row, expected_row) in enumerate(zip(interop.to_numpy(got[2]), expected[2])):
        assert sorted(got_row.tolist()) == sorted(expected_row.tolist()), f"row {row}"
