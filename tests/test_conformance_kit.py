"""The conformance kit itself: it must pass the reference and catch each kind of broken backend."""

from __future__ import annotations

import numpy as np
import pytest

from dsa_ref import Tolerance
from dsa_ref.testing import assert_close, check_backend, check_topk

TIGHT = Tolerance(rtol=1e-3, atol=1e-3)


def test_assert_close_reports_the_worst_element():
    expected = np.array([[1.0, 2.0], [3.0, 4.0]])
    actual = expected.copy()
    actual[1, 0] += 0.5
    with pytest.raises(AssertionError, match=r"worst element \(1, 0\): actual=3.5, expected=3.0"):
        assert_close(actual, expected, TIGHT, name="out")
    comparison = assert_close(expected + 1e-4, expected, TIGHT)
    assert 0 < comparison.error_ratio <= 1


@pytest.mark.parametrize("bad,label", [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")])
def test_assert_close_checks_special_values_first(bad, label):
    expected = np.array([1.0, -np.inf, 3.0])
    actual = expected.copy()
    actual[0] = bad
    with pytest.raises(AssertionError, match=f"scores: {label} positions differ"):
        assert_close(actual, expected, TIGHT, name="scores")


def test_assert_close_atol_is_relative_to_the_output_magnitude():
    expected = np.array([1000.0, 0.0])
    assert_close(np.array([1000.0, 0.5]), expected, TIGHT)  # 0.5 <= 1e-3 * 1000
    with pytest.raises(AssertionError):
        assert_close(np.array([1000.0, 0.5]), expected, TIGHT, scale_by_max=False)


def test_check_topk_accepts_any_order_and_any_tie_choice():
    scores = np.array([[3.0, 1.0, 1.0, 1.0, -np.inf]])
    check_topk(np.array([[2, 0]]), scores, 2)  # tie at 1.0: key 2 is as good as key 1
    check_topk(np.array([[3, 1, 0, 2, -1]]), scores, 5)
    with pytest.raises(AssertionError, match="a masked"):
        check_topk(np.array([[0, 4]]), scores, 2)
    with pytest.raises(AssertionError, match="selected twice"):
        check_topk(np.array([[0, 1, 1, 2, -1]]), scores, 5)
    with pytest.raises(AssertionError, match="2 keys selected, expected 4"):
        check_topk(np.array([[0, 1, -1, -1, -1]]), scores, 5)
    with pytest.raises(AssertionError, match="above the k-th best score"):
        check_topk(np.array([[1, 2]]), scores, 2)
    with pytest.raises(AssertionError, match=r"outside \[-1, 5\)"):
        check_topk(np.array([[0, 7]]), scores, 2)


def test_check_topk_tolerance_allows_near_ties_only():
    scores = np.array([[1.0, 0.9995, 0.5]])
    check_topk(np.array([[1]]), scores, 1, score_tolerance=1e-3)
    with pytest.raises(AssertionError):
        check_topk(np.array([[1]]), scores, 1)
    with pytest.raises(AssertionError):
        check_topk(np.array([[2]]), scores, 1, score_tolerance=1e-3)


def test_every_op_of_the_backend_interface_is_checked_by_the_kit():
    from dsa_ref.backend import OPS
    from dsa_ref.testing.conformance import CHECKED_OPS
    from dsa_ref.testing.strategies import STRATEGIES

    assert set(CHECKED_OPS) == set(STRATEGIES)
    assert set(OPS) <= set(CHECKED_OPS), f"ops without a conformance check: {sorted(set(OPS) - set(CHECKED_OPS))}"


def test_the_reference_passes_its_own_kit():
    report = check_backend("numpy", "ci", max_examples=15)
    assert report.ok, str(report)
    assert all(op.ran == 15 or op.ran > 0 for op in report.ops)


def _broken_cases():
    from broken_backends import BROKEN_BACKENDS

    return [pytest.param(cls, op, id=f"{cls.__name__}-{op}") for cls, ops in BROKEN_BACKENDS for op in ops]


@pytest.mark.parametrize("broken,op", _broken_cases())
def test_the_ci_profile_rejects_every_broken_backend(broken, op):
    report = check_backend(broken(), "ci", ops_to_check=[op])
    assert not report.ok, f"{broken.__name__} passes the {op} check: the kit has a blind spot\n{report}"


@pytest.mark.parametrize("broken,op,symptom", [
    ("IgnoresKeyRanges", "lightning_indexer", "-inf positions differ"),
    ("AssumesContiguous", "lightning_indexer", "NaN positions differ"),
    ("SelectsMaskedKeys", "topk_indices", "top-k row"),
    ("ClampsInvalidIndices", "sparse_mla", "worst element"),
    ("Base2Lse", "sparse_mla", "lse"),
    ("RefusesEverything", "sparse_mla", "every example was refused"),
])
def test_a_broken_backend_fails_with_its_symptom(broken, op, symptom):
    report = check_backend(f"module://fake_backends:{broken}", "ci", ops_to_check=[op])
    assert not report.ok
    assert symptom in report.ops[0].failure, report.ops[0].failure


def test_a_seed_fixes_the_examples_and_different_seeds_draw_different_ones():
    from fake_backends import GoodBackend

    class RecordsShapes(GoodBackend):
        name = "records-shapes"

        def __init__(self):
            self.seen = []

        def topk_indices(self, scores, topk):
            self.seen.append((scores.shape, topk))
            return super().topk_indices(scores, topk)

    def drawn(seed):
        backend = RecordsShapes()
        assert check_backend(backend, "thorough", ops_to_check=["topk_indices"], max_examples=8, seed=seed).ok
        return backend.seen

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)


def test_a_failing_op_reports_its_worst_ratio_and_the_input_that_produced_it():
    from broken_backends import IgnoresSmScale

    report = check_backend(IgnoresSmScale(), "ci", ops_to_check=["sparse_mla"])
    op = report.ops[0]
    assert not report.ok
    assert op.worst_error_ratio > 1
    [failure] = op.failures
    assert failure.error_ratio > 1
    text = str(report)
    assert f"worst error ratio={op.worst_error_ratio:.3g}" in text
    for argument in ("q=(", "kv=(", "indices=(", "sm_scale=", "d_v=", "topk_length=", "attn_sink=", "strided="):
        assert argument in failure.problem, failure.problem
        assert argument in text
    # The shrunk example needs a non-default scale: the backend is right with the default one.
    assert "sm_scale=None" not in failure.problem


def test_several_distinct_failures_are_each_reported():
    from fake_backends import GoodBackend

    class CrashesWithASinkAndMisscalesLse(GoodBackend):
        name = "two-bugs"

        def sparse_mla(self, q, kv, indices, *, sm_scale, d_v, topk_length, attn_sink):
            if attn_sink is not None:
                raise RuntimeError("attention-sink kernel not built")
            out, lse = super().sparse_mla(q, kv, indices, sm_scale=sm_scale, d_v=d_v, topk_length=None,
                                          attn_sink=None)
            return out, (lse * 2).astype(np.float32)

    report = check_backend(CrashesWithASinkAndMisscalesLse(), "ci", ops_to_check=["sparse_mla"])
    op = report.ops[0]
    assert len(op.failures) == 2, str(report)
    messages = sorted(failure.message for failure in op.failures)
    assert messages[0].startswith("ComparisonError: lse") and messages[1].startswith("RuntimeError: attention-sink")
    text = str(report)
    assert "ExceptionGroup" not in text and "distinct failures" not in text
    assert "failure 1 of 2" in text and "failure 2 of 2" in text
    assert all(failure.problem.startswith("sparse_mla(") for failure in op.failures)


def test_check_backend_reports_progress_per_example():
    updates = []
    report = check_backend("numpy", "ci", ops_to_check=["topk_indices", "sparse_mla"], max_examples=4,
                           progress=updates.append)
    assert report.ok
    for op in ("topk_indices", "sparse_mla"):
        mine = [update for update in updates if update.op == op]
        assert [update.done for update in mine if not update.finished] == [1, 2, 3, 4]
        assert all(update.total == 4 for update in mine)
        assert mine[-1].finished and not any(update.finished for update in mine[:-1])
        assert all(later.elapsed >= earlier.elapsed for earlier, later in zip(mine, mine[1:]))
    assert [update.op for update in updates if update.finished] == ["topk_indices", "sparse_mla"]


@pytest.mark.parametrize("arguments,message", [
    (dict(ops_to_check=["foo"]), r"ops_to_check.*'foo'.*lightning_indexer.*topk_indices"),
    (dict(max_examples=0), "max_examples must be >= 1, got 0"),
    (dict(max_examples=-5), "max_examples must be >= 1, got -5"),
])
def test_check_backend_refuses_bad_arguments_before_running(arguments, message):
    with pytest.raises(ValueError, match=message):
        check_backend("numpy", "ci", **arguments)


@pytest.mark.parametrize("op", ["sparse_mla", "dsa_attention"])
def test_a_non_default_sm_scale_reaches_the_backend_and_the_reference(op):
    from broken_backends import DsaIgnoresSmScale, IgnoresSmScale
    from dsa_ref.testing import check_problem, dsa_problem, sparse_mla_problem
    from dsa_ref.testing.problems import V32_SM_SCALE

    rng = np.random.default_rng(3)
    shape = dict(s_q=6, s_kv=20, h=2, d_qk=16, d_v=8, topk=5, dtype="float32")
    if op == "sparse_mla":
        problem, ignores_it = sparse_mla_problem(rng, **shape, sm_scale=V32_SM_SCALE), IgnoresSmScale()
    else:
        problem, ignores_it = dsa_problem(rng, **shape, h_i=2, d_i=8, sm_scale=V32_SM_SCALE), DsaIgnoresSmScale()
    assert problem.inputs["sm_scale"] == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)
    check_problem("numpy", problem)  # the reference gets the same scale as the backend
    with pytest.raises(AssertionError, match="worst element"):
        check_problem(ignores_it, problem)


@pytest.mark.parametrize("op", ["sparse_mla_backward", "indexer_loss_backward"])
def test_a_correct_low_precision_training_backend_passes(op):
    """The other side of the broken backends: float32 arithmetic with bf16-rounded P and dS is a
    correct GPU implementation, and the kit must not reject it, also where a gradient cancels."""
    import dataclasses

    from fake_backends import LowPrecisionTraining

    from dsa_ref.testing.profiles import PROFILES

    # The thorough profile's sizes and dims; its model-shaped examples (h 128 x 576, float64 reference)
    # would take a minute on the CPU and test nothing about cancellation.
    small_thorough = dataclasses.replace(PROFILES["thorough"], model_heads=())
    for profile, examples in (("ci", None), (small_thorough, 150)):
        report = check_backend(LowPrecisionTraining(), profile, ops_to_check=[op], max_examples=examples, seed=3)
        assert report.ok, str(report)


def test_a_gradient_that_cancels_is_judged_by_its_terms_not_its_rounding_residue():
    """Seen on an H200: every slot of a query scores the one key, so dI = softmax - p cancels to a
    float64 residue of ~6e-17 in dq_index, which float32 kernels return as ~3e-8 or 0. The kit must
    accept both, and still reject an error the size of a term."""
    from fake_backends import GoodBackend
    from dsa_ref.testing.conformance import check_problem
    from dsa_ref.testing.problems import Problem

    rng = np.random.default_rng(0)
    inputs = dict(q_index=rng.standard_normal((5, 1, 1)).astype(np.float32),
                  weights=rng.standard_normal((5, 1)).astype(np.float32),
                  k_index=rng.standard_normal((1, 1)).astype(np.float32), k_scale=None,
                  indices=np.zeros((5, 2), np.int32), target=rng.random((5, 2)).astype(np.float32),
                  d_loss=rng.standard_normal(5).astype(np.float32))
    problem = Problem("indexer_loss_backward", inputs, {}, "float32")

    def backend_adding(offset):
        class Offset(GoodBackend):
            name = "offset"

            def indexer_loss_backward(self, *args, **kwargs):
                dq, dw, dk = super().indexer_loss_backward(*args, **kwargs)
                return (dq + np.float32(offset)).astype(np.float32), dw, dk
        return Offset()

    check_problem(backend_adding(3e-8), problem)  # a float32 rounding residue
    with pytest.raises(AssertionError, match="dq_index"):
        check_problem(backend_adding(0.5), problem)  # a term's worth of error


def test_a_backend_may_ask_for_fewer_ci_examples_per_op():
    from fake_backends import GoodBackend

    class Everywhere(GoodBackend):
        ci_max_examples = 7

    class PerOp(GoodBackend):
        ci_max_examples = {"sparse_mla_backward": 3}

    assert Everywhere().ci_examples("sparse_mla") == 7
    assert PerOp().ci_examples("sparse_mla_backward") == 3
    assert PerOp().ci_examples("sparse_mla") is None  # the profile's own count


#: The problem builder each strategy calls, and how an example at the model's shapes looks in its arguments.
_MODEL_SHAPED = {
    "lightning_indexer": ("indexer_problem", lambda a: (a["h_i"], a["d_i"]) == (64, 128)),
    "lightning_indexer_paged": ("paged_indexer_problem",
                                lambda a: (a["h_i"], a["d_i"], a["block_size"]) == (64, 128, 64)),
    "indexer_loss": ("indexer_loss_problem", lambda a: (a["h_i"], a["d_i"]) == (64, 128)),
    "indexer_loss_backward": ("indexer_loss_problem", lambda a: (a["h_i"], a["d_i"]) == (64, 128)),
    "sparse_mla": ("sparse_mla_problem",
                   lambda a: a["h"] in (64, 128) and (a["d_qk"], a["d_v"], a["dtype"]) == (576, 512, "bfloat16")),
    "sparse_mla_backward": ("sparse_mla_backward_problem",
                            lambda a: a["h"] in (64, 128) and (a["d_qk"], a["d_v"], a["dtype"]) == (576, 512, "bfloat16")),
    "attention_target": ("attention_target_problem",
                         lambda a: a["h"] in (64, 128) and (a["d_qk"], a["dtype"]) == (576, "bfloat16")),
    "dsa_attention": ("dsa_problem", lambda a: a["h"] in (64, 128) and (a["d_qk"], a["d_v"], a["h_i"], a["d_i"])
                      == (576, 512, 64, 128)),
}


@pytest.mark.parametrize("op", sorted(_MODEL_SHAPED))
def test_the_thorough_profile_reaches_the_model_shapes_and_the_ci_profile_never_does(op, monkeypatch):
    """The Hopper kernels run only at DeepSeek-V3.2's shapes (h a multiple of 64, d_qk 576; the indexer's 64
    heads of 128): a thorough run that never drew them would pass while never calling those kernels."""
    from hypothesis import HealthCheck, given, settings

    from dsa_ref.testing import problems
    from dsa_ref.testing.strategies import STRATEGIES

    builder, model_shaped = _MODEL_SHAPED[op]
    drawn = []
    monkeypatch.setattr(problems, builder, lambda rng, **arguments: drawn.append(arguments))

    def fraction(profile):
        drawn.clear()

        @settings(max_examples=200, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(STRATEGIES[op](profile))
        def draw(_):
            pass

        draw()
        return sum(map(model_shaped, drawn)) / len(drawn), drawn[:]

    thorough, examples = fraction("thorough")
    assert 0.1 <= thorough <= 0.45, f"{op}: {thorough:.0%} of the thorough examples at the model's shapes"
    if op in ("sparse_mla", "attention_target"):  # half of those on the packed FP8 cache (the decode kernels)
        assert any(model_shaped(a) and a["packed_fp8"] for a in examples)
        assert any(model_shaped(a) and not a["packed_fp8"] for a in examples)
    ci, _ = fraction("ci")
    assert ci == 0, f"{op}: the ci profile drew the model's shapes ({ci:.0%}), too large for the interpreters"
