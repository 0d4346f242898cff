"""Every backend available here against the reference (the dsa_backend fixture of the plugin)."""

from __future__ import annotations

from dsa_ref import get_backend
from dsa_ref.testing import check_backend


def test_backend_conforms(dsa_backend, dsa_profile):
    backend = get_backend(dsa_backend)
    examples = None if dsa_profile == "thorough" else backend.ci_max_examples
    report = check_backend(backend, dsa_profile, max_examples=examples)
    print(report)
    assert report.ok, str(report)
