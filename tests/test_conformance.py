"""Every backend available here against the reference (the dsa_backend fixture of the plugin).

Without a GPU the Triton backend runs on its CPU interpreter (see conftest.py). With one,
``pytest tests/test_conformance.py --dsa-profile thorough`` runs the thorough profile on it;
``DSA_CONFORMANCE_MAX_EXAMPLES`` caps the examples per op (to fit a session's time), and
``DSA_CONFORMANCE_SHARDS=N`` splits each op's examples over N tests with different seeds, which
``pytest -n`` runs in parallel (the Triton kernels' compile time dominates a thorough run).
"""

from __future__ import annotations

import math
import os

import pytest

from dsa_ref import get_backend
from dsa_ref.testing import check_backend
from dsa_ref.testing.conformance import CHECKED_OPS
from dsa_ref.testing.strategies import get_profile


SHARDS = int(os.environ.get("DSA_CONFORMANCE_SHARDS", "1"))
if SHARDS < 1:
    raise ValueError(f"DSA_CONFORMANCE_SHARDS must be a positive number of shards, got {SHARDS}")


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("op", CHECKED_OPS)
def test_backend_conforms(dsa_backend, op, shard, dsa_profile):
    backend = get_backend(dsa_backend)
    cap = os.environ.get("DSA_CONFORMANCE_MAX_EXAMPLES")
    own_ci_cap = backend.ci_examples(op) if dsa_profile == "ci" else None
    examples = int(cap) if cap else (own_ci_cap or get_profile(dsa_profile).max_examples)
    report = check_backend(backend, dsa_profile, ops_to_check=[op], max_examples=math.ceil(examples / SHARDS),
                           seed=shard if SHARDS > 1 else None)
    print(report)
    assert report.ok, str(report)
