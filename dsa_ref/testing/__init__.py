"""The conformance kit: check any DSA backend — ours or yours — against the reference.

* :mod:`~dsa_ref.testing.tolerances` — the written tolerance policy per input dtype;
* :func:`assert_close` — special values in the same places, then the worst element;
* :func:`check_topk` — tie-aware comparison of top-k sets;
* :mod:`~dsa_ref.testing.problems` and :mod:`~dsa_ref.testing.strategies` — valid problems,
  awkward cases included, as builders and as hypothesis strategies (profiles ``ci``, ``thorough``);
* :func:`check_problem`, :func:`check_backend` — run a backend against the reference (a failing
  op reports each distinct failure with its input; ``progress=`` follows a long run);
  ``dsa-ref check --backend NAME`` does the same from the shell;
* a pytest plugin (auto-loaded) whose ``dsa_backend`` fixture runs a test once per available backend;
* :mod:`~dsa_ref.testing.adapters` — peers' kernels (FlashMLA, DeepGEMM, TileLang, sglang) from your
  installation as backends, so the same checks run on them (``module://dsa_ref.testing.adapters:FlashMLA``).

Importing this module does not need hypothesis; :func:`check_backend` and the strategies do.
"""

from .assertions import Comparison, ComparisonError, assert_close, check_topk
from .conformance import (
    ConformanceReport,
    ExampleFailure,
    OpReport,
    ProgressPrinter,
    ProgressUpdate,
    check_backend,
    check_problem,
)
from .problems import Problem, dsa_problem, indexer_problem, selected_indices, sparse_mla_problem, topk_problem
from .tolerances import DEFAULT_TOLERANCES, tolerance_for

__all__ = [
    "Comparison",
    "ComparisonError",
    "ConformanceReport",
    "DEFAULT_TOLERANCES",
    "ExampleFailure",
    "OpReport",
    "Problem",
    "ProgressPrinter",
    "ProgressUpdate",
    "assert_close",
    "check_backend",
    "check_problem",
    "check_topk",
    "dsa_problem",
    "indexer_problem",
    "selected_indices",
    "sparse_mla_problem",
    "tolerance_for",
    "topk_problem",
]
