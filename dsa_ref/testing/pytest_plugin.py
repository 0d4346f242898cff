"""pytest plugin of dsa-ref (loaded automatically through the ``pytest11`` entry point).

* ``dsa_backend`` fixture: a test that takes it runs once per backend available here, or once per
  name given with ``--dsa-backend a,b``;
* ``--dsa-profile ci|thorough`` picks the conformance profile (fixture ``dsa_profile``).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("dsa-ref")
    group.addoption("--dsa-backend", default=None,
                    help="comma-separated backends for the dsa_backend fixture (default: every available one)")
    group.addoption("--dsa-profile", default="ci", choices=("ci", "thorough"),
                    help="conformance profile (default: ci)")


def pytest_generate_tests(metafunc):
    if "dsa_backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--dsa-backend")
        if chosen:
            names = [name.strip() for name in chosen.split(",") if name.strip()]
        else:
            from dsa_ref.registry import available_backends

            names = available_backends()
        metafunc.parametrize("dsa_backend", names)


@pytest.fixture
def dsa_profile(request) -> str:
    return request.config.getoption("--dsa-profile")
