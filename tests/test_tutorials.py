"""Every tutorial runs as a plain script, and has the shape of a tutorial.

Each tutorial (``tutorials/NN_*.py``, jupytext percent format) is executed in a fresh Python
process on the ``numpy`` backend, with matplotlib's non-interactive backend; tutorial 8 runs the
Triton kernel on Triton's CPU interpreter when there is no GPU. The site build
(``tests/test_docs.py``) executes them again as notebooks.

The tutorials plot, so they need the ``plot`` extra (matplotlib), and tutorial 8 the ``triton``
extra (tutorial 10 needs torch, which that extra brings): without them the run tests skip, saying what is missing, and a tutorial started by hand
says in one line what to install instead of ending in a traceback.
"""

from __future__ import annotations

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
#: Tutorials that run torch autograd (on the CPU; torch comes with the ``triton`` extra).
NEEDS_TORCH = {"10_training_dsa.py", "11_checking_a_kernel.py"}
#: Run ``sys.argv[2:]`` (a script and its arguments, or ``-m module ...``) in this process as if
#: the module ``sys.argv[1]`` (and its submodules) were not installed.
WITHOUT_MODULE = """
import runpy, sys

hidden = sys.argv[1]


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == hidden or name.startswith(hidden + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
if sys.argv[2] == "-m":
    sys.argv = sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
#: Seconds a tutorial may take on CI's 2 cores (they take a few seconds here).
TIME_LIMIT = 120


def test_all_eleven_tutorials_exist():
    assert [int(path.name[:2]) for path in TUTORIALS] == list(range(1, 12)), [p.name for p in TUTORIALS]


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
    pytest.importorskip("matplotlib", reason="the tutorials plot: pip install 'dsa-ref[plot]'")
    if tutorial.name in NEEDS_TRITON:
        for module in ("torch", "triton"):
            pytest.importorskip(module, reason=f"{tutorial.name} runs the Triton kernel: pip install 'dsa-ref[triton]'")
    if tutorial.name in NEEDS_TORCH:
        pytest.importorskip("torch", reason=f"{tutorial.name} runs torch autograd: pip install 'dsa-ref[triton]'")
    env = {key: value for key, value in os.environ.items() if key != "DSA_BACKEND"}
    env["MPLBACKEND"] = "Agg"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-W", "ignore:FigureCanvasAgg is non-interactive", str(tutorial)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, f"{tutorial.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "Warning" not in done.stderr, f"{tutorial.name} warns:\n{done.stderr[-3000:]}"
    assert seconds < TIME_LIMIT, f"{tutorial.name} took {seconds:.0f} s (limit {TIME_LIMIT} s)"


def _run_without(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DSA_BACKEND"}
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-c", WITHOUT_MODULE, module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


MISSING_EXTRAS = [(tutorial, "matplotlib", "plot") for tutorial in TUTORIALS] + [
    (tutorial, module, "triton") for tutorial in TUTORIALS if tutorial.name in NEEDS_TRITON
    for module in ("torch", "triton")] + [(tutorial, "torch", "triton") for tutorial in TUTORIALS
                                           if tutorial.name in NEEDS_TORCH]


@pytest.mark.parametrize(("tutorial", "module", "extra"), MISSING_EXTRAS,
                         ids=[f"{tutorial.stem}-without-{module}" for tutorial, module, _ in MISSING_EXTRAS])
def test_a_tutorial_without_its_extra_says_what_to_install(tutorial, module, extra):
    done = _run_without(module, str(tutorial))
    said = done.stdout + done.stderr
    assert done.returncode == 1, f"{tutorial.name} without {module} exited {done.returncode}:\n{said[-3000:]}"
    assert "Traceback" not in said, f"{tutorial.name} without {module} ends in a traceback:\n{said[-3000:]}"
    message = said.strip().splitlines()
    assert len(message) == 1 and module in message[0], said
    install = re.search(r"pip install 'dsa-ref\[([\w,]+)\]'", message[0])
    assert install and extra in install.group(1).split(","), f"no `pip install 'dsa-ref[{extra}]'` in: {said}"


def test_without_matplotlib_the_tutorial_runs_skip_and_say_why():
    done = _run_without("matplotlib", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "test_tutorial_runs",
                        str(Path(__file__)))
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert re.search(rf"\b{len(TUTORIALS)} skipped\b", said) and " failed" not in said, said[-3000:]
    assert "pip install 'dsa-ref[plot]'" in said, said[-3000:]
