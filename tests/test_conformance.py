"""Every backend available here against the reference (the dsa_backend fixture of the plugin).

Without a GPU the Triton backend runs on its CPU interpreter (see conftest.py). With one,
``pytest tests/test_conformance.py --dsa-profile thorough`` runs the thorough profile on it;
``DSA_CONFORMANCE_MAX_EXAMPLES`` caps the examples per op (to fit a session's time).
"""

from __future__ import annotations

import os

import pytest

from dsa_ref import get_backend
from dsa_ref.backend import OPS
from dsa_ref.testing import check_backend


@pytest.mark.parametrize("op", OPS)
def test_backend_conforms(dsa_backend, op, dsa_profile):
    backend = get_backend(dsa_backend)
    cap = os.environ.get("DSA_CONFORMANCE_MAX_EXAMPLES")
    examples = int(cap) if cap else (None if dsa_profile == "thorough" else backend.ci_max_examples)
    report = check_backend(backend, dsa_profile, ops_to_check=[op], max_examples=examples)
    print(report)
    assert report.ok, str(report)
