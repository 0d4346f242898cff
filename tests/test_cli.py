"""The dsa-ref command."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from dsa_ref.cli import main


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"numpy\s+available", out)
    for name in ("triton", "cupy"):
        assert re.search(rf"{name}\s+(un)?available", out)
    assert "devices:" in out


def _active_backend_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("active backend:"))


def test_info_of_a_chosen_backend_that_can_run_says_where_the_choice_came_from(monkeypatch, capsys):
    monkeypatch.setenv("DSA_BACKEND", "numpy")
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    assert _active_backend_line(captured.out) == "active backend: numpy (set by DSA_BACKEND)"
    assert captured.err == ""


def test_info_of_an_invalid_backend_name_says_so_with_the_valid_names_and_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("DSA_BACKEND", "nonsense")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    line = _active_backend_line(captured.out)
    assert line.startswith("active backend: nonsense (set by DSA_BACKEND) is INVALID: ")
    assert "valid names: cupy, numpy, triton" in line
    assert re.search(r"numpy\s+available", captured.out)  # the rest of the report still comes
    assert "'nonsense' is not a valid backend name" in captured.err


def test_info_of_a_backend_that_cannot_run_here_gives_its_reasons_and_exits_1(monkeypatch, capsys):
    from dsa_ref import registry

    cupy_backend = registry._load("cupy")
    monkeypatch.setattr(cupy_backend, "unavailable_reasons", lambda: ["no CUDA device"])
    monkeypatch.setenv("DSA_BACKEND", "cupy")
    assert main(["info"]) == 1
    captured = capsys.readouterr()
    assert _active_backend_line(captured.out) == "active backend: cupy (set by DSA_BACKEND) CANNOT RUN HERE: no CUDA device"
    assert re.search(r"cupy\s+unavailable", captured.out)
    assert "active backend 'cupy' cannot run here: no CUDA device" in captured.err


def test_info_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 when it cannot run here" in out and "2 when its name (DSA_BACKEND) is not a valid backend" in out


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


@pytest.mark.parametrize("command", [["demo", "--tokens", "32", "--heads", "2", "--topk", "8"], ["info"]])
def test_a_reader_that_closed_the_pipe_ends_the_command_quietly(command):
    # `dsa-ref demo | head -1`, made deterministic: the reader is gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "dsa_ref", *command], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as for any tool the signal ends


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_check_shows_one_updating_progress_line_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["check", "--backend", "numpy", "--max-examples", "3", "--ops", "topk_indices,sparse_mla"]) == 0
    out = terminal.getvalue()
    progress = out[out.index("\r"):out.index("conformance of backend")]
    assert progress.count("\n") == 2  # one finished line per op
    for done in (1, 2, 3):
        assert re.search(rf"\r  topk_indices\s+{done}/3 examples, [0-9.]+s", progress)
    assert re.search(r"\r  sparse_mla\s+3/3 examples, [0-9.]+s ok\s*\n", progress)


def test_check_prints_a_line_per_op_when_not_on_a_terminal(capsys):
    assert main(["check", "--backend", "numpy", "--max-examples", "3", "--ops", "topk_indices,sparse_mla"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    assert re.search(r"^  topk_indices\s+3/3 examples, [0-9.]+s ok$", out, re.M)
    assert re.search(r"^  sparse_mla\s+3/3 examples, [0-9.]+s ok$", out, re.M)


def test_check_without_hypothesis_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    assert main(["check", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "pip install hypothesis" in err and "pip install 'dsa-ref[test]'" in err
    assert len(err.strip().splitlines()) == 1


def test_check_of_an_unknown_op_lists_the_valid_ones(capsys):
    assert main(["check", "--backend", "numpy", "--ops", "foo"]) == 2
    err = capsys.readouterr().err
    assert "'foo'" in err
    for op in ("lightning_indexer", "topk_indices", "sparse_mla", "dsa_attention"):
        assert op in err


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_check_refuses_a_max_examples_below_one(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--backend", "numpy", "--max-examples", value])
    assert exit_info.value.code == 2
    assert f"--max-examples must be an integer >= 1, got {value!r}" in capsys.readouterr().err


def test_check_help_describes_the_profiles_and_lists_the_ops(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "ci: 30 examples per op" in out and "thorough: 1000 examples per op" in out
    assert "up to 40 tokens" in out and "up to 160 tokens" in out
    for op in ("lightning_indexer", "topk_indices", "sparse_mla", "dsa_attention"):
        assert op in out
