"""The dsa-ref command."""

from __future__ import annotations

import re
import subprocess
import sys

from dsa_ref.cli import main


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"numpy\s+available", out)
    for name in ("triton", "cupy"):
        assert re.search(rf"{name}\s+(un)?available", out)
    assert "devices:" in out


def test_demo_narrates_a_dsa_step_and_the_sparse_output_matches_dense(capsys):
    assert main(["demo", "--tokens", "96", "--heads", "4", "--topk", "16"]) == 0
    out = capsys.readouterr().out
    for step in ("Step 1 - lightning indexer", "Step 2 - top-k", "Step 3 - sparse MLA", "Attention mass captured", "FLOPs"):
        assert step in out
    difference = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert difference < 1e-5
    captured = float(re.search(r"mean ([0-9.]+)%", out).group(1))
    chance = float(re.search(r"would capture ([0-9.]+)%", out).group(1))
    assert captured > chance


def test_check_runs_the_conformance_kit(capsys):
    assert main(["check", "--backend", "numpy", "--max-examples", "5", "--ops", "topk_indices,sparse_mla"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "sparse_mla" in out


def test_check_of_an_unknown_backend_fails_with_the_reason(capsys):
    assert main(["check", "--backend", "nope"]) == 2
    assert "'nope' is not a valid dsa_ref backend" in capsys.readouterr().err


def test_python_dash_m_and_demo_errors():
    result = subprocess.run([sys.executable, "-m", "dsa_ref", "demo", "--tokens", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "--tokens must be >= 2" in result.stderr
