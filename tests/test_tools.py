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
