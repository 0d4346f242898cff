"""Checking a backend against the reference: one problem at a time, or property-based.

:func:`check_problem` runs one op on one problem through the public dispatch (so argument
checks, array conversion and the backend's own refusals are exercised too) and compares the
result with the float64 reference on the same inputs. :func:`check_backend` drives it with the
hypothesis strategies of a profile and returns a :class:`ConformanceReport`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dsa_ref import interop, ops, reference
from dsa_ref.backend import Backend
from dsa_ref.registry import UnsupportedInputError, get_backend

from .assertions import Comparison, assert_close, check_topk
from .problems import Problem
from .strategies import STRATEGIES, get_profile
from .tolerances import tolerance_for


def _scores_tolerance(scores: np.ndarray, dtype: str, backend: Backend) -> float:
    """Absolute slack for top-k after a backend's own indexer: its score tolerance at the k-th score."""
    tol = tolerance_for(dtype, backend)
    finite = scores[np.isfinite(scores)]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    return tol.atol * scale + tol.rtol * scale


def check_problem(backend: str | Backend, problem: Problem) -> list[Comparison]:
    """Run ``problem`` on ``backend`` and compare with the reference; raise ``AssertionError`` if it
    does not conform, :class:`~dsa_ref.UnsupportedInputError` if the backend refuses it."""
    backend = get_backend(backend)
    inputs = problem.inputs
    native = problem.native_inputs(backend)
    tolerance = tolerance_for(problem.dtype, backend)
    if problem.op == "lightning_indexer":
        expected = reference.lightning_indexer(**inputs)
        actual = ops.lightning_indexer(**native, backend=backend)
        return [assert_close(actual, expected, tolerance, name="scores")]
    if problem.op == "topk_indices":
        actual = ops.topk_indices(native["scores"], inputs["topk"], backend=backend)
        check_topk(actual, inputs["scores"], inputs["topk"], score_tolerance=0.0)
        return []
    if problem.op == "sparse_mla":
        expected_out, expected_lse = reference.sparse_mla(**inputs)
        out, lse = ops.sparse_mla(**native, backend=backend)
        return [assert_close(out, expected_out, tolerance, name="out"),
                assert_close(lse, expected_lse, tolerance, name="lse", scale_by_max=False)]
    if problem.op == "dsa_attention":
        out, lse, indices = ops.dsa_attention(**native, backend=backend)
        indexer_inputs = dict(q=inputs["q_index"], weights=inputs["weights"], k=inputs["k_index"],
                              key_start=inputs["key_start"], key_end=inputs["key_end"], k_scale=inputs["k_scale"])
        index_dtype = interop.dtype_name(inputs["q_index"])
        scores = reference.lightning_indexer(**indexer_inputs)
        check_topk(indices, scores, inputs["topk"],
                   score_tolerance=_scores_tolerance(scores, index_dtype, backend))
        # Near-ties may be broken differently: judge the attention on the backend's own selection.
        expected_out, expected_lse = reference.sparse_mla(inputs["q"], inputs["kv"], interop.to_numpy(indices),
                                                          d_v=inputs["d_v"])
        return [assert_close(out, expected_out, tolerance, name="out"),
                assert_close(lse, expected_lse, tolerance, name="lse", scale_by_max=False)]
    raise ValueError(f"problem.op must be one of {sorted(STRATEGIES)}, got {problem.op!r}")


@dataclass
class OpReport:
    op: str
    ran: int = 0
    refused: int = 0
    refusal_reasons: dict[str, int] = field(default_factory=dict)
    worst_error_ratio: float = 0.0
    failure: str | None = None
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    backend: str
    profile: str
    ops: list[OpReport]

    @property
    def ok(self) -> bool:
        return all(op.failure is None for op in self.ops)

    def __str__(self) -> str:
        lines = [f"conformance of backend {self.backend!r} (profile {self.profile}): "
                 f"{'PASS' if self.ok else 'FAIL'}"]
        for op in self.ops:
            status = "ok" if op.failure is None else "FAIL"
            lines.append(f"  {op.op:18s} {status:4s} ran={op.ran:5d} refused={op.refused:5d} "
                         f"worst error ratio={op.worst_error_ratio:.3g} ({op.seconds:.1f}s)")
            for reason, count in sorted(op.refusal_reasons.items(), key=lambda item: -item[1])[:3]:
                lines.append(f"      refused x{count}: {reason}")
            if op.failure:
                lines.extend("      " + line for line in op.failure.splitlines())
        return "\n".join(lines)


def check_backend(name: str | Backend, profile: str = "ci", ops_to_check=None,
                  max_examples: int | None = None, seed: int | None = None) -> ConformanceReport:
    """Property-test every op of a backend against the reference with a profile's strategies.

    Inputs the backend refuses (``not_supported_reasons``) are counted, not failed, but an op for
    which every example was refused fails: a backend may not pass by refusing everything.

    ``seed`` fixes hypothesis's random source: runs with different seeds draw different examples,
    so a long run can be split into shards that run in parallel (the profile's own choice,
    derandomized or not, applies when it is None).
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fix_seed

    backend = get_backend(name)
    chosen = get_profile(profile)
    reports = []
    for op in ops_to_check or list(STRATEGIES):
        report = OpReport(op)
        started = time.perf_counter()

        @settings(max_examples=max_examples or chosen.max_examples, deadline=None, database=None,
                  derandomize=chosen.derandomize, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(STRATEGIES[op](chosen))
        def run_one(problem: Problem) -> None:
            try:
                comparisons = check_problem(backend, problem)
            except UnsupportedInputError as refusal:
                report.refused += 1
                reason = str(refusal).split(": ", 1)[-1]
                report.refusal_reasons[reason] = report.refusal_reasons.get(reason, 0) + 1
                return
            except AssertionError as failure:
                raise AssertionError(f"{failure}\n  problem: {problem.describe()}") from None
            report.ran += 1
            for comparison in comparisons:
                report.worst_error_ratio = max(report.worst_error_ratio, comparison.error_ratio)

        if seed is not None:
            run_one = fix_seed(seed)(run_one)
        try:
            run_one()
            if report.ran == 0:
                report.failure = "every example was refused by the backend"
        except Exception as failure:  # noqa: BLE001 - the report carries any failure, typed or not
            report.failure = f"{type(failure).__name__}: {failure}"
        report.seconds = time.perf_counter() - started
        reports.append(report)
    return ConformanceReport(backend.name, chosen.name, reports)
