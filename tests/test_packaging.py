"""The built wheel installs dsa_ref and dsa_ref_backends, never a bare top-level 'backends'."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("dsa_ref-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert "backends" not in top_level
    assert {"dsa_ref", "dsa_ref_backends"} <= top_level
    for module in ("dsa_ref/__init__.py", "dsa_ref/reference/sparse_mla.py", "dsa_ref/testing/strategies.py",
                   "dsa_ref_backends/numpy_reference.py", "dsa_ref_backends/torch_triton/__init__.py",
                   "dsa_ref_backends/cupy_cuda/__init__.py", "dsa_ref/layer/__init__.py"):
        assert module in names, module
    source_files = {p.relative_to(ROOT / "backends").as_posix() for p in (ROOT / "backends").rglob("*")
                    if p.suffix in (".py", ".cu", ".cuh") and "__pycache__" not in p.parts}
    shipped = {name[len("dsa_ref_backends/"):] for name in names if name.startswith("dsa_ref_backends/")}
    assert source_files <= shipped, f"not in the wheel: {sorted(source_files - shipped)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[dsa_ref.backends]" in text and "numpy = dsa_ref_backends.numpy_reference:NumpyBackend" in text
