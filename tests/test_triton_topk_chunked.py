"""The Triton backend's two-pass top-k for few long rows (``topk.topk_indices_in_chunks``), opt-in
until it is measured on a GPU.

On the CPU interpreter (or a GPU): the exact set of the reference, ties by the lower index included,
on rows with masked keys, NaN, heavy ties, rows with fewer selectable keys than topk, a length that is
not a multiple of the chunk, a strided score buffer; when the plan takes the two passes; that the
backend runs them only when chosen. Kept small: the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dsa_ref import reference  # noqa: E402
from dsa_ref.testing.assertions import check_topk  # noqa: E402
from dsa_ref_backends.torch_triton import topk as topk_kernel  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402


def _runs_here():
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _scores(kind: str, rows: int, s_kv: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, s_kv)).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores * 2) / 2  # a handful of distinct values: ties at every threshold
    elif kind == "masked":
        scores[rng.random(scores.shape) < 0.5] = -np.inf
        scores[0, 5:] = -np.inf  # a row with 5 selectable keys, fewer than topk
        scores[1, ::7] = np.nan
        scores[1, 3] = np.inf
    return scores


@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
@pytest.mark.parametrize(("s_kv", "chunk"), [(256, 64), (300, 64)])  # 300: the last chunk is padded
def test_two_passes_give_the_references_set(kind, s_kv, chunk):
    device = _runs_here()
    scores = _scores(kind, 3, s_kv, seed=s_kv + len(kind))
    topk = 16
    got = topk_kernel.topk_indices_in_chunks(torch.from_numpy(scores).to(device), topk, chunk).cpu().numpy()
    check_topk(got, scores, topk)
    expected = reference.topk_indices(scores, topk)
    for row, (got_row, expected_row) in enumerate(zip(got, expected)):
        assert sorted(got_row.tolist()) == sorted(expected_row.tolist()), f"row {row}: ties must keep the lower index"


def test_ties_keep_the_lower_index_when_the_first_pass_refines_over_its_rows(monkeypatch):
    """With a scratch row of 16 candidates, each chunk's threshold bin overflows it and the first pass
    takes its row-refining path: its keys of one score must come out in index order there too."""
    device = _runs_here()
    monkeypatch.setattr(topk_kernel, "CANDIDATES", 16)
    scores = _scores("ties", 2, 256, seed=9)
    got = topk_kernel.topk_indices_in_chunks(torch.from_numpy(scores).to(device), 24, 64).cpu().numpy()
    expected = reference.topk_indices(scores, 24)
    for row, (got_row, expected_row) in enumerate(zip(got, expected)):
        assert sorted(got_row.tolist()) == sorted(expected_row.tolist()), f"row {row}"


def test_a_strided_score_buffer_is_read_as_its_rows():
    device = _runs_here()
    wide = torch.from_numpy(_scores("ties", 2, 512, seed=3)).to(device)
    scores = wide[:, :256]  # row stride 512
    got = topk_kernel.topk_indices_in_chunks(scores, 8, 64).cpu().numpy()
    expected = reference.topk_indices(scores.cpu().numpy(), 8)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in expected.tolist()]


@pytest.mark.parametrize(("rows", "s_kv", "topk", "expected"), [
    (64, 131072, 2048, 16384),  # the decode step: 8 chunks of 8 * topk
    (64, 131072, 4096, 32768),
    (4096, 32768, 2048, None),  # rows fill the GPU: one pass
    (64, 32768, 2048, 16384),   # two chunks
    (64, 30000, 2048, None),    # too short for two chunks
    (1, 40000, 16, 8192),
])
def test_the_plan(rows, s_kv, topk, expected):
    assert topk_kernel.chunked_topk_plan(rows, s_kv, topk, programs=132) == expected


def test_the_backend_takes_two_passes_by_default_for_few_long_rows(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    taken = []
    monkeypatch.setattr(topk_kernel, "topk_indices_in_chunks", lambda scores, topk, chunk: taken.append(chunk))
    monkeypatch.setattr(topk_kernel, "topk_indices", lambda scores, topk: "one pass")
    monkeypatch.delenv("DSA_REF_TRITON_CHUNKED_TOPK", raising=False)
    backend = triton_backend.TritonBackend()
    backend.radix_topk = False  # the histogram kernels' routing; test_triton_topk_radix.py has the radix kernel's
    scores = torch.zeros((2, 40000))
    backend.chunked_topk = False
    assert backend.topk_indices(scores, 16) == "one pass" and taken == []
    backend.chunked_topk = True
    monkeypatch.setenv("DSA_REF_TRITON_CHUNKED_TOPK", "0")
    assert backend.topk_indices(scores, 16) == "one pass" and taken == []
    monkeypatch.delenv("DSA_REF_TRITON_CHUNKED_TOPK")
    backend.topk_indices(scores, 16)
    assert taken == [8192]  # 40000 keys: chunks of the 8192 floor
    assert backend.topk_indices(torch.zeros((2, 1000)), 16) == "one pass"  # too short: one pass
