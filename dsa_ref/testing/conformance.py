"""Checking a backend against the reference: one problem at a time, or property-based.

:func:`check_problem` runs one op on one problem through the public dispatch (so argument
checks, array conversion and the backend's own refusals are exercised too) and compares the
result with the float64 reference on the same inputs. :func:`check_backend` drives it with the
hypothesis strategies of a profile and returns a :class:`ConformanceReport`; ``progress=``
follows a long run (:class:`ProgressPrinter` prints it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, TextIO

import numpy as np

from dsa_ref import interop, modes, ops, reference
from dsa_ref.backend import Backend
from dsa_ref.registry import UnsupportedInputError, get_backend

from .assertions import Comparison, assert_close, check_topk
from . import problems as problems_module
from .problems import Problem
from .profiles import get_profile
from .tolerances import gradient_tolerance_for, tolerance_for

#: The ops :func:`check_problem` knows how to check (each has a strategy of the same name).
CHECKED_OPS = ("lightning_indexer", "topk_indices", "sparse_mla", "dsa_attention", "sparse_mla_backward",
               "attention_target", "indexer_loss", "indexer_loss_backward", "lightning_indexer_paged")

#: Width of the op column in reports: the longest op name.
_OP_WIDTH = max(map(len, CHECKED_OPS))

#: How the inputs of a ``dsa_attention`` problem reach the reference: the indexer's under their
#: names in :func:`~dsa_ref.reference.lightning_indexer`, the attention's to
#: :func:`~dsa_ref.reference.sparse_mla`. An input in neither would reach the backend only.
_DSA_INDEXER_ARGUMENTS = {"q_index": "q", "weights": "weights", "k_index": "k", "key_start": "key_start",
                          "key_end": "key_end", "k_scale": "k_scale"}
_DSA_ATTENTION_ARGUMENTS = ("q", "kv", "sm_scale", "d_v")
_DSA_TOPK_ARGUMENT = "topk"


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
        unchecked = set(inputs) - set(_DSA_INDEXER_ARGUMENTS) - set(_DSA_ATTENTION_ARGUMENTS) - {_DSA_TOPK_ARGUMENT}
        if unchecked:
            raise ValueError(f"dsa_attention problem has inputs {sorted(unchecked)} that the check would not "
                             f"give the reference")
        out, lse, indices = ops.dsa_attention(**native, backend=backend)
        indexer_inputs = {name: inputs[given] for given, name in _DSA_INDEXER_ARGUMENTS.items() if given in inputs}
        index_dtype = interop.dtype_name(inputs["q_index"])
        scores = reference.lightning_indexer(**indexer_inputs)
        check_topk(indices, scores, inputs[_DSA_TOPK_ARGUMENT],
                   score_tolerance=_scores_tolerance(scores, index_dtype, backend))
        # Near-ties may be broken differently: judge the attention on the backend's own selection.
        attention_inputs = {name: inputs[name] for name in _DSA_ATTENTION_ARGUMENTS if name in inputs}
        expected_out, expected_lse = reference.sparse_mla(indices=interop.to_numpy(indices), **attention_inputs)
        return [assert_close(out, expected_out, tolerance, name="out"),
                assert_close(lse, expected_lse, tolerance, name="lse", scale_by_max=False)]
    if problem.op == "lightning_indexer_paged":
        expected = reference.lightning_indexer_paged(**inputs)
        actual = ops.lightning_indexer_paged(**native, backend=backend)
        return [assert_close(actual, expected, tolerance, name="scores")]
    if problem.op in _TRAINING_CHECKS:
        return _TRAINING_CHECKS[problem.op](backend, problem, native)
    raise ValueError(f"problem.op must be one of {', '.join(CHECKED_OPS)}, got {problem.op!r}")


# ---------------------------------------------------------------------------- training ops
def _exactly_zero(actual, rows: np.ndarray, name: str) -> None:
    """Rows nothing reads get no gradient at all: exactly 0, not a rounding residue, not NaN."""
    actual = np.asarray(interop.to_numpy(actual), np.float64)
    if rows.any() and not np.all(actual[rows] == 0.0):
        row = int(np.flatnonzero(rows & ~np.all(actual == 0.0, axis=1))[0])
        raise AssertionError(f"{name}: row {row} is read by no valid slot, so its gradient must be exactly 0; "
                             f"got {actual[row][:8].tolist()}")


def _run_deterministic_twice(run, problem: Problem):
    """In deterministic mode (when the problem asks for it) the op must give bitwise-equal results twice."""
    if not problem.params.get("deterministic"):
        return run()
    with modes.use_deterministic(True):
        first, second = run(), run()
    for index, (a, b) in enumerate(zip(first, second)):
        a, b = interop.to_numpy(a), interop.to_numpy(b)
        if not np.array_equal(a, b, equal_nan=True):
            differ = int((~((a == b) | (np.isnan(a) & np.isnan(b)))).sum())
            raise AssertionError(f"result {index}: two runs in deterministic mode differ in {differ} element(s)")
    return first


def _rss_max(terms_squared_sum: np.ndarray) -> float:
    """The largest root-sum-square over the finite elements (0 when there are none)."""
    finite = terms_squared_sum[np.isfinite(terms_squared_sum)]
    return float(np.sqrt(finite.max())) if finite.size else 0.0


def _sparse_mla_backward_term_scales(inputs: dict) -> dict[str, float]:
    """The term scale of dq, dkv and d_attn_sink (see :mod:`.tolerances`): root-sum-squares of the
    magnitudes of the terms each element is summed from, in float64."""
    q = np.asarray(inputs["q"], np.float64)  # [s_q, h, d_qk]
    kv = np.asarray(inputs["kv"], np.float64)  # [s_kv, d_qk]
    indices, d_v = np.asarray(inputs["indices"]), inputs["d_v"]
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    sm_scale = inputs.get("sm_scale") or d_qk**-0.5
    lse = np.asarray(inputs["lse"], np.float64)  # [s_q, h]
    out, d_out = np.asarray(inputs["out"], np.float64), np.asarray(inputs["d_out"], np.float64)
    d_lse = np.zeros((s_q, h)) if inputs.get("d_lse") is None else np.asarray(inputs["d_lse"], np.float64)
    valid = reference.valid_slots(indices, s_kv, inputs.get("topk_length"))  # [s_q, topk]
    rows = np.where(valid, indices, 0)  # [s_q, topk]
    keys = np.where(valid[..., None], np.nan_to_num(kv)[rows], 0.0)  # [s_q, topk, d_qk]
    with np.errstate(over="ignore", invalid="ignore"):
        probs = np.where(valid[:, None, :], np.exp(sm_scale * np.einsum("ihd,itd->iht", np.nan_to_num(q), keys)
                                                   - lse[..., None]), 0.0)  # [s_q, h, topk]
    probs = np.nan_to_num(probs)
    share = np.ones((s_q, h)) if inputs.get("attn_sink") is None else 1.0 / (
        1.0 + np.exp(np.asarray(inputs["attn_sink"], np.float64)[None, :] - lse))  # [s_q, h]
    share = np.nan_to_num(share)
    d_probs = np.abs(np.einsum("ihd,itd->iht", np.nan_to_num(d_out), keys[..., :d_v]))  # [s_q, h, topk]
    delta = np.abs(np.nan_to_num(np.einsum("ihd,ihd->ih", d_out, out)))  # [s_q, h]
    term = probs * (share[..., None] * (d_probs + delta[..., None]) + np.abs(d_lse)[..., None])  # [s_q, h, topk]
    dq_squares = sm_scale**2 * np.einsum("iht,itd->ihd", term**2, keys**2)  # [s_q, h, d_qk]
    row_squares = sm_scale**2 * np.einsum("iht,ihd->itd", term**2, np.nan_to_num(q) ** 2)  # [s_q, topk, d_qk]
    row_squares[..., :d_v] += np.einsum("iht,ihd->itd", (share[..., None] * probs) ** 2, np.nan_to_num(d_out) ** 2)
    dkv_squares = np.zeros((s_kv + 1, d_qk))
    np.add.at(dkv_squares, np.where(valid, indices, s_kv).reshape(-1), row_squares.reshape(-1, d_qk))
    sink_squares = np.sum(np.where(np.isneginf(lse), 0.0, delta) ** 2, axis=0)  # [h]
    return {"dq": _rss_max(dq_squares), "dkv": _rss_max(dkv_squares[:s_kv]), "d_attn_sink": _rss_max(sink_squares)}


def _check_sparse_mla_backward(backend: Backend, problem: Problem, native: dict) -> list[Comparison]:
    inputs = problem.inputs
    expected = reference.sparse_mla_backward(**inputs)
    actual = _run_deterministic_twice(lambda: ops.sparse_mla_backward(**native, backend=backend), problem)
    if len(actual) != len(expected):
        raise AssertionError(f"sparse_mla_backward returned {len(actual)} results, expected {len(expected)} "
                             f"({'with' if inputs['attn_sink'] is not None else 'without'} attn_sink)")
    tolerance = gradient_tolerance_for(problem.dtype, backend)
    unread = problems_module.unread_rows(inputs["indices"], inputs["kv"].shape[0], inputs["topk_length"])
    _exactly_zero(actual[1], unread, "dkv")
    scales = _sparse_mla_backward_term_scales(inputs)
    names = ("dq", "dkv", "d_attn_sink")
    return [assert_close(a, e, tolerance, name=name, scale_floor=scales[name])
            for a, e, name in zip(actual, expected, names)]


def _check_attention_target(backend: Backend, problem: Problem, native: dict) -> list[Comparison]:
    expected = reference.attention_target(**problem.inputs)
    actual = ops.attention_target(**native, backend=backend)
    return [assert_close(actual, expected, tolerance_for(problem.dtype, backend), name="target")]


def _check_indexer_loss(backend: Backend, problem: Problem, native: dict) -> list[Comparison]:
    expected = reference.indexer_loss(**problem.inputs)
    actual = ops.indexer_loss(**native, backend=backend)
    return [assert_close(actual, expected, tolerance_for(problem.dtype, backend), name="loss")]


def _indexer_loss_backward_term_scales(inputs: dict) -> dict[str, float]:
    """The term scale of dq_index, dweights and dk_index (see :mod:`.tolerances`), in float64:
    ``dI = d_loss (softmax - p)`` taken as ``|d_loss| (softmax + p)``, and each product's magnitude."""
    q = np.nan_to_num(np.asarray(inputs["q_index"], np.float64))  # [s_q, h_i, d_i]
    weights = np.nan_to_num(np.asarray(inputs["weights"], np.float64))  # [s_q, h_i]
    k = np.nan_to_num(np.asarray(inputs["k_index"], np.float64))  # [s_kv, d_i]
    s_q, s_kv = q.shape[0], k.shape[0]
    if inputs.get("indices") is not None:
        indices = np.asarray(inputs["indices"]).astype(np.int64)
        allowed = (indices >= 0) & (indices < s_kv)  # [s_q, n]
        keys = np.where(allowed, indices, 0)
    else:
        position = np.arange(s_kv)[None, :]
        allowed = (position >= inputs["key_start"][:, None]) & (position < inputs["key_end"][:, None])
        keys = np.broadcast_to(position, allowed.shape)
    key_scale = np.ones(allowed.shape) if inputs.get("k_scale") is None else np.asarray(inputs["k_scale"],
                                                                                       np.float64)[keys]
    gate = np.einsum("ijd,ind->ijn", q, k[keys])  # [s_q, h_i, n]
    scores = np.where(allowed, key_scale * np.einsum("ij,ijn->in", weights, np.maximum(gate, 0.0)), -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        softmax = np.exp(scores - scores.max(axis=1, keepdims=True, initial=-np.inf))
        softmax = np.nan_to_num(softmax / softmax.sum(axis=1, keepdims=True))  # [s_q, n]
    target = np.where(allowed, np.nan_to_num(np.asarray(inputs["target"], np.float64)), 0.0)
    mass = target.sum(axis=1, keepdims=True)
    target = np.divide(target, mass, out=np.zeros_like(target), where=mass > 0)
    d_scores = np.where(allowed, np.abs(np.asarray(inputs["d_loss"], np.float64))[:, None] * (softmax + target),
                        0.0) * key_scale  # [s_q, n]
    d_gate = d_scores[:, None, :] * np.abs(weights)[:, :, None] * (gate > 0)  # [s_q, h_i, n]
    dq_squares = np.einsum("ijn,ind->ijd", d_gate**2, k[keys] ** 2)  # [s_q, h_i, d_i]
    dw_squares = np.einsum("in,ijn->ij", d_scores**2, np.maximum(gate, 0.0) ** 2)  # [s_q, h_i]
    dk_squares = np.zeros((s_kv + 1, k.shape[1]))
    contributions = np.einsum("ijn,ijd->ind", d_gate**2, q**2)  # [s_q, n, d_i]
    np.add.at(dk_squares, np.where(allowed, keys, s_kv).reshape(-1), contributions.reshape(-1, k.shape[1]))
    return {"dq_index": _rss_max(dq_squares), "dweights": _rss_max(dw_squares), "dk_index": _rss_max(dk_squares[:s_kv])}


def _check_indexer_loss_backward(backend: Backend, problem: Problem, native: dict) -> list[Comparison]:
    inputs = problem.inputs
    expected = reference.indexer_loss_backward(**inputs)
    actual = _run_deterministic_twice(lambda: ops.indexer_loss_backward(**native, backend=backend), problem)
    s_kv = inputs["k_index"].shape[0]
    if inputs.get("indices") is not None:
        unscored = problems_module.unread_rows(inputs["indices"], s_kv)
    else:
        key = np.arange(s_kv)
        unscored = ~((key[None, :] >= inputs["key_start"][:, None]) & (key[None, :] < inputs["key_end"][:, None])).any(0)
    _exactly_zero(actual[2], unscored, "dk_index")
    tolerance = gradient_tolerance_for(problem.dtype, backend)
    scales = _indexer_loss_backward_term_scales(inputs)
    names = ("dq_index", "dweights", "dk_index")
    return [assert_close(a, e, tolerance, name=name, scale_floor=scales[name])
            for a, e, name in zip(actual, expected, names)]


_TRAINING_CHECKS = {
    "sparse_mla_backward": _check_sparse_mla_backward,
    "attention_target": _check_attention_target,
    "indexer_loss": _check_indexer_loss,
    "indexer_loss_backward": _check_indexer_loss_backward,
}


@dataclass
class ExampleFailure:
    """One distinct way an op failed: the error, the (shrunk) input that raised it, and its error
    ratio where the failure was a comparison of values (``inf`` when special values or shapes
    differ, None for top-k sets and errors raised by the backend)."""

    message: str
    problem: str | None = None
    error_ratio: float | None = None

    def __str__(self) -> str:
        lines = self.message.splitlines() or [""]
        if self.error_ratio is not None and "error ratio" not in lines[0]:
            lines[0] += f" (error ratio {self.error_ratio:.3g})"
        if self.problem:
            lines.append(f"input: {self.problem}")
        return "\n".join(lines)


@dataclass
class OpReport:
    """One op's outcome. ``ran`` counts the examples that passed, ``examples`` every one tried
    (refused and failing ones, and those hypothesis ran to shrink a failure, included).
    ``worst_error_ratio`` covers every example compared, failing ones included; ``failures``
    holds each distinct failure, ``failure`` all of them as text (None when the op passed)."""

    op: str
    ran: int = 0
    refused: int = 0
    refusal_reasons: dict[str, int] = field(default_factory=dict)
    worst_error_ratio: float = 0.0
    failure: str | None = None
    seconds: float = 0.0
    failures: list[ExampleFailure] = field(default_factory=list)
    examples: int = 0

    def _fail(self, failures: list[ExampleFailure]) -> None:
        self.failures = failures
        self.failure = "\n".join(str(failure) for failure in failures)


class ProgressUpdate(NamedTuple):
    """What ``check_backend(progress=...)`` receives after each example of an op, and once more
    with ``finished`` when the op is done. ``done`` counts the examples tried, the ones hypothesis
    runs to shrink a failure included (so it may pass ``total``); ``failing`` is set once one failed."""

    op: str
    done: int
    total: int
    elapsed: float
    finished: bool = False
    failing: bool = False


class ProgressPrinter:
    """A ``progress`` callback for :func:`check_backend` that prints to ``stream`` (default:
    ``sys.stdout`` at the time of each call): on a terminal one line, rewritten in place, per op;
    elsewhere (logs, CI) one line per op when it is done."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._width = 0

    def __call__(self, update: ProgressUpdate) -> None:
        stream = self._stream or sys.stdout
        line = f"  {update.op:{_OP_WIDTH}s} {update.done}/{update.total} examples, {update.elapsed:.1f}s"
        if update.finished:
            line += " FAIL" if update.failing else " ok"
        elif update.failing:
            line += ", shrinking a failure"
        if stream.isatty():
            stream.write("\r" + line.ljust(self._width))
            self._width = 0 if update.finished else max(self._width, len(line))
            if update.finished:
                stream.write("\n")
        elif update.finished:
            stream.write(line + "\n")
        stream.flush()


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
            lines.append(f"  {op.op:{_OP_WIDTH}s} {status:4s} ran={op.ran:5d} refused={op.refused:5d} "
                         f"worst error ratio={op.worst_error_ratio:.3g} ({op.seconds:.1f}s)")
            for reason, count in sorted(op.refusal_reasons.items(), key=lambda item: -item[1])[:3]:
                lines.append(f"      refused x{count}: {reason}")
            for number, failure in enumerate(op.failures, 1):
                label = "failure" if len(op.failures) == 1 else f"failure {number} of {len(op.failures)}"
                first, *rest = str(failure).splitlines()
                lines.append(f"      {label}: {first}")
                lines.extend("        " + line for line in rest)
        return "\n".join(lines)


def _distinct_failures(error: BaseException, context: str = "") -> list[ExampleFailure]:
    """Each failure inside ``error``: hypothesis raises an exception group when it finds several
    distinct ones (its own subclasses, such as a flaky failure, keep their message as context)."""
    if isinstance(error, BaseExceptionGroup):
        if type(error) not in (ExceptionGroup, BaseExceptionGroup):
            context = f"{context}{type(error).__name__}: {error.message}\n"
        return [failure for inner in error.exceptions for failure in _distinct_failures(inner, context)]
    message = f"{context}{type(error).__name__}: {error}"
    return [ExampleFailure(message, getattr(error, "dsa_problem", None), getattr(error, "error_ratio", None))]


def _examples_per_op(max_examples, default: int) -> int:
    if max_examples is None:
        return default
    if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples!r}")
    return int(max_examples)


def check_backend(name: str | Backend, profile: str = "ci", ops_to_check=None,
                  max_examples: int | None = None, seed: int | None = None,
                  progress: Callable[[ProgressUpdate], None] | None = None) -> ConformanceReport:
    """Property-test every op of a backend against the reference with a profile's strategies.

    Inputs the backend refuses (``not_supported_reasons``) are counted, not failed, but an op for
    which every example was refused fails: a backend may not pass by refusing everything.

    ``seed`` fixes hypothesis's random source: runs with different seeds draw different examples,
    so a long run can be split into shards that run in parallel (the profile's own choice,
    derandomized or not, applies when it is None).

    ``progress``, if given, is called with a :class:`ProgressUpdate` after every example and when
    each op is done (:class:`ProgressPrinter` prints them).

    Raises ``ValueError`` for an unknown op or ``max_examples < 1``, before anything runs.
    """
    from .strategies import STRATEGIES  # needs hypothesis

    chosen = get_profile(profile)
    examples = _examples_per_op(max_examples, chosen.max_examples)
    if isinstance(ops_to_check, str):
        ops_to_check = [ops_to_check]
    ops_to_check = list(ops_to_check) if ops_to_check else list(STRATEGIES)
    unknown = [op for op in ops_to_check if op not in STRATEGIES]
    if unknown:
        raise ValueError(f"ops_to_check: {', '.join(map(repr, unknown))} is not an op the conformance kit "
                         f"checks (valid: {', '.join(STRATEGIES)})")
    backend = get_backend(name)
    reports = [_check_op(backend, op, STRATEGIES[op](chosen), chosen.derandomize, examples, seed, progress)
               for op in ops_to_check]
    return ConformanceReport(backend.name, chosen.name, reports)


def _check_op(backend: Backend, op: str, problems, derandomize: bool, examples: int, seed: int | None,
              progress: Callable[[ProgressUpdate], None] | None) -> OpReport:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fix_seed

    report = OpReport(op)
    started = time.perf_counter()
    failing = False

    def notify(finished: bool = False) -> None:
        if progress is not None:
            progress(ProgressUpdate(op, report.examples, examples, time.perf_counter() - started, finished,
                                    failing or report.failure is not None))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(problems)
    def run_one(problem: Problem) -> None:
        nonlocal failing
        report.examples += 1
        try:
            comparisons = check_problem(backend, problem)
        except UnsupportedInputError as refusal:
            report.refused += 1
            reason = str(refusal).split(": ", 1)[-1]
            report.refusal_reasons[reason] = report.refusal_reasons.get(reason, 0) + 1
            return
        except Exception as failure:  # noqa: BLE001 - any error fails the example; keep its input
            failure.dsa_problem = problem.describe()
            ratio = getattr(failure, "error_ratio", None)
            if ratio is not None:
                report.worst_error_ratio = max(report.worst_error_ratio, ratio)
            failing = True
            raise
        finally:
            notify()
        report.ran += 1
        for comparison in comparisons:
            report.worst_error_ratio = max(report.worst_error_ratio, comparison.error_ratio)

    if seed is not None:
        run_one = fix_seed(seed)(run_one)
    try:
        run_one()
        if report.ran == 0:
            report._fail([ExampleFailure("every example was refused by the backend")])
    except Exception as failure:  # noqa: BLE001 - the report carries any failure, typed or not
        report._fail(_distinct_failures(failure))
    report.seconds = time.perf_counter() - started
    notify(finished=True)
    return report
