"""GPU-run tooling lives in tools/, outside the installed packages; backends/ holds backends."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL_NAMES = ("gpu_run", "gpu_session", "device_check", "topk_tune")


def test_backends_hold_no_gpu_run_tooling():
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*")
             if p.is_file() and any(name in p.name for name in TOOL_NAMES)]
    assert not stray, f"tooling belongs in tools/, not in the installed backends: {stray}"


def test_every_tool_is_listed_in_the_tools_readme():
    readme = (ROOT / "tools" / "README.md").read_text()
    for script in (ROOT / "tools").iterdir():
        if script.suffix in (".py", ".sh"):
            assert script.name in readme, f"tools/{script.name} is not described in tools/README.md"


def test_the_kernel_switches_the_gpu_tools_set_exist_on_the_backends():
    """A switch set on a backend instance under a wrong name creates a new attribute and changes nothing:
    the probe or benchmark would time the default kernel under the candidate's name."""
    import re

    from dsa_ref_backends.cupy_cuda.backend import CupyBackend
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    switches = {name for cls in (CupyBackend, TritonBackend) for name in dir(cls) if not name.startswith("_")}
    for tool in ("opt_in_probe.py", "opt_in_bench.py"):
        source = (ROOT / "tools" / tool).read_text()
        set_names = {attribute for _, attribute in re.findall(r"(\w+)\.(\w+)\s*=(?!=)", source)}
        assert set_names, f"tools/{tool} sets no backend switch: the pattern no longer matches it"
        unknown = sorted(set_names - switches)
        assert not unknown, f"tools/{tool} sets switches no backend has: {unknown}"
