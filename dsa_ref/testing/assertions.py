"""Comparisons that explain themselves: special values first, then the worst element."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsa_ref import interop
from dsa_ref.backend import Tolerance


@dataclass
class Comparison:
    """The outcome of :func:`assert_close`: the worst element and its error ratio (<= 1 passes)."""

    name: str
    error_ratio: float
    worst_index: tuple[int, ...] | None
    actual: float
    expected: float
    max_abs_error: float

    def __str__(self) -> str:
        if self.worst_index is None:
            return f"{self.name}: no finite elements to compare"
        return (f"{self.name}: worst element {self.worst_index}: actual={self.actual!r}, "
                f"expected={self.expected!r}, max |error|={self.max_abs_error:.3g}, "
                f"error ratio={self.error_ratio:.3g} (<= 1 passes)")


class ComparisonError(AssertionError):
    """An ``AssertionError`` from :func:`assert_close` that carries the failing comparison's error
    ratio (``inf`` when shapes or special values differ: no ratio can say how far off it is)."""

    def __init__(self, message: str, error_ratio: float = float("inf")):
        super().__init__(message)
        self.error_ratio = error_ratio


def _special_value_mismatch(actual: np.ndarray, expected: np.ndarray, name: str) -> str | None:
    for label, where in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = where(actual) != where(expected)
        if differ.any():
            first = tuple(int(i) for i in np.argwhere(differ)[0])
            return (f"{name}: {label} positions differ at {int(differ.sum())} element(s); first at {first}: "
                    f"actual={actual[first]!r}, expected={expected[first]!r}")
    return None


def assert_close(actual, expected, tolerance: Tolerance, *, name: str = "output",
                 scale_by_max: bool = True, scale_floor: float | None = None) -> Comparison:
    """Check ``actual`` against the reference ``expected``; raise ``AssertionError`` if it fails.

    1. shapes must match;
    2. NaN, +inf and -inf must sit in the same places (a masked score must be -inf, a
       never-written output shows up as NaN);
    3. every finite element must satisfy ``|a - e| <= atol * scale + rtol * |e|`` with
       ``scale`` the largest finite ``|e|`` (``scale_by_max``) or 1, and at least ``scale_floor``
       when given (the size of the terms a result is summed from, where they cancel: see
       :mod:`dsa_ref.testing.tolerances`).

    Returns the :class:`Comparison` (worst element and error ratio) when it passes; raises
    :class:`ComparisonError` (an ``AssertionError`` with the ``error_ratio``) when it does not.
    """
    actual = np.asarray(interop.to_numpy(actual), dtype=np.float64)
    expected = np.asarray(interop.to_numpy(expected), dtype=np.float64)
    if actual.shape != expected.shape:
        raise ComparisonError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    mismatch = _special_value_mismatch(actual, expected, name)
    if mismatch:
        raise ComparisonError(mismatch)
    finite = np.isfinite(expected)
    if not finite.any():
        return Comparison(name, 0.0, None, float("nan"), float("nan"), 0.0)
    scale = float(np.abs(expected[finite]).max()) if scale_by_max else 1.0
    if scale_floor is not None and np.isfinite(scale_floor):
        scale = max(scale, float(scale_floor))
    scale = scale if scale > 0 else 1.0
    with np.errstate(invalid="ignore"):  # inf - inf at the (matching) special values
        error = np.where(finite, np.abs(actual - expected), 0.0)
    allowed = tolerance.atol * scale + tolerance.rtol * np.abs(np.where(finite, expected, 0.0))
    ratio = error / allowed
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    result = Comparison(name, float(ratio[worst]), tuple(int(i) for i in worst), float(actual[worst]),
                        float(expected[worst]), float(error.max()))
    if result.error_ratio > 1.0:
        raise ComparisonError(f"{result} with rtol={tolerance.rtol}, atol={tolerance.atol} x scale {scale:.3g}",
                              result.error_ratio)
    return result


def check_topk(indices, scores, topk: int, *, score_tolerance: float = 0.0) -> None:
    """Tie-aware check of a top-k result against the scores it was chosen from.

    A row conforms when, with ``n = min(topk, number of selectable keys)`` (selectable: score
    not ``-inf`` and not NaN) and ``kth`` the n-th largest selectable score:

    * it has exactly ``n`` entries in ``[0, s_kv)`` and ``topk - n`` entries equal to ``-1``;
    * no key appears twice;
    * no selected key is masked (``-inf``) or NaN;
    * no selected key scores below ``kth - score_tolerance``;
    * no key scoring above ``kth + score_tolerance`` is missing.

    Order within the row is free. Raises ``AssertionError`` naming the first failing row.
    """
    indices = np.asarray(interop.to_numpy(indices)).astype(np.int64)  # [s_q, topk]
    scores = np.asarray(interop.to_numpy(scores)).astype(np.float64)  # [s_q, s_kv]
    s_q, s_kv = scores.shape
    if indices.shape != (s_q, topk):
        raise AssertionError(f"indices: shape {indices.shape} != expected {(s_q, topk)}")
    if s_q == 0:
        return

    def fail(message: str, rows: np.ndarray) -> None:
        row = int(np.flatnonzero(rows)[0])
        raise AssertionError(f"top-k row {row}: {message} ({int(rows.sum())} row(s) fail); "
                             f"indices={indices[row].tolist()[:16]}{'...' if topk > 16 else ''}")

    out_of_range = ((indices < -1) | (indices >= s_kv)).any(axis=1)  # [s_q]
    if out_of_range.any():
        fail(f"an index outside [-1, {s_kv})", out_of_range)
    selectable = scores > -np.inf  # [s_q, s_kv]   False for -inf and NaN
    expected_count = np.minimum(topk, selectable.sum(axis=1))  # [s_q]
    chosen = indices >= 0  # [s_q, topk]
    wrong_count = chosen.sum(axis=1) != expected_count  # [s_q]
    if wrong_count.any():
        row = int(np.flatnonzero(wrong_count)[0])
        fail(f"{int(chosen[row].sum())} keys selected, expected {int(expected_count[row])}", wrong_count)
    ordered = np.sort(np.where(chosen, indices, -1), axis=1)  # [s_q, topk]
    duplicate = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)  # [s_q]
    if duplicate.any():
        fail("a key selected twice", duplicate)
    rows = np.arange(s_q)[:, None]  # [s_q, 1]
    chosen_scores = np.where(chosen, scores[rows, np.where(chosen, indices, 0)], np.inf)  # [s_q, topk]
    masked = (chosen & ~(chosen_scores > -np.inf)).any(axis=1)  # [s_q]
    if masked.any():
        fail("a masked (-inf) or NaN key selected", masked)
    descending = -np.sort(-np.where(selectable, scores, -np.inf), axis=1)  # [s_q, s_kv]
    has_any = expected_count > 0  # [s_q]
    kth = np.where(has_any, descending[np.arange(s_q), np.maximum(expected_count - 1, 0)], np.inf)  # [s_q]
    too_low = (chosen & (chosen_scores < (kth - score_tolerance)[:, None])).any(axis=1)  # [s_q]
    if too_low.any():
        fail(f"a selected key scores below the k-th best score - {score_tolerance}", too_low)
    selected_mask = np.zeros((s_q, s_kv + 1), bool)  # [s_q, s_kv + 1]   last column absorbs -1
    selected_mask[rows, np.where(chosen, indices, s_kv)] = True
    missing = (selectable & ~selected_mask[:, :s_kv] & (scores > (kth + score_tolerance)[:, None])).any(axis=1)
    if missing.any():
        fail(f"a key scoring above the k-th best score + {score_tolerance} is missing", missing)
