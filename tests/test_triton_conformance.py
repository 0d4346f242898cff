"""The ``triton`` backend through the conformance kit (``ci`` profile; CPU interpreter without a GPU).

With a GPU, ``pytest -m gpu --dsa-profile thorough tests/test_triton_conformance.py`` runs the
thorough profile on it.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Before triton is first imported: it decides at import whether kernels are interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("hypothesis")

from dsa_ref.backend import OPS  # noqa: E402
from dsa_ref.testing import check_backend  # noqa: E402


@pytest.mark.parametrize("op", OPS)
def test_triton_conforms(op, dsa_profile):
    report = check_backend("triton", profile=dsa_profile, ops_to_check=[op])
    print(report)
    assert report.ok, str(report)
