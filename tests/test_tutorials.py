"""Every tutorial runs as a plain script, and has the shape of a tutorial.

Each tutorial (``tutorials/NN_*.py``, jupytext percent format) is executed in a fresh Python
process on the ``numpy`` backend, with matplotlib's non-interactive backend; tutorial 8 runs the
Triton kernel on Triton's CPU interpreter when there is no GPU. The site build
(``tests/test_docs.py``) executes them again as notebooks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
NEEDS_TRITON = {"08_triton_sparse_mla.py"}
#: Seconds a tutorial may take on CI's 2 cores (they take a few seconds here).
TIME_LIMIT = 120


def test_all_nine_tutorials_exist():
    assert [int(path.name[:2]) for path in TUTORIALS] == list(range(1, 10)), [p.name for p in TUTORIALS]


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_has_the_shape_of_a_tutorial(tutorial):
    text = tutorial.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:") and "format_name: percent" in text, "jupytext percent header"
    number = int(tutorial.name[:2])
    assert re.search(rf"^# # Tutorial {number}: ", text, flags=re.MULTILINE), "a '# Tutorial N: ...' title"
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert len(re.findall(r"^# %%", text, flags=re.MULTILINE)) >= 6, "built in steps"
    assert "import dsa_ref" in code or "from dsa_ref" in code, "checked against the library"
    assert code.count("assert") >= 3, "asserts at each step"
    assert "plt.show()" in code, "at least one plot"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs(tutorial):
    if tutorial.name in NEEDS_TRITON:
        for module in ("torch", "triton"):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{tutorial.name} needs {module}")
    env = {key: value for key, value in os.environ.items() if key != "DSA_BACKEND"}
    env["MPLBACKEND"] = "Agg"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-W", "ignore:FigureCanvasAgg is non-interactive", str(tutorial)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, f"{tutorial.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "Warning" not in done.stderr, f"{tutorial.name} warns:\n{done.stderr[-3000:]}"
    assert seconds < TIME_LIMIT, f"{tutorial.name} took {seconds:.0f} s (limit {TIME_LIMIT} s)"
