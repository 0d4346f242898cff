"""The built wheel installs dsa_ref and dsa_ref_backends, never a bare top-level 'backends'; it builds
without a setuptools warning; and every install hint names an extra that pyproject.toml defines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# `pip install 'dsa-ref[cupy]'`, `dsa-ref[test,docs]`: the extras a hint asks for.
INSTALL_HINT = re.compile(r"dsa-ref\[([A-Za-z0-9_,\s-]+)\]")
# setuptools' warning classes (SetuptoolsDeprecationWarning, ...), as pip relays them
# (BuildBackendWarning); pip's own "WARNING:" lines about this machine's index setup are not the project's.
BUILD_WARNING = re.compile(r"\b[A-Z][A-Za-z]*Warning\b")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel pip builds from a copy of the checkout, and everything pip printed while building it.

    A copy, so that an old ``build/`` directory cannot leak stale files into the wheel and the build
    writes nothing into the checkout."""
    source = tmp_path_factory.mktemp("source") / "dsa-ref"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "site", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    wheel_dir = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "-w", str(wheel_dir), str(source)],
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return next(wheel_dir.glob("dsa_ref-*.whl")), output


def test_wheel_file_list(built_wheel):
    wheel, _ = built_wheel
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


def test_wheel_ships_the_cuda_sources_and_their_resource_reports(built_wheel):
    wheel, _ = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    cupy_dir = ROOT / "backends" / "cupy_cuda"
    cuda_sources = sorted(cupy_dir.glob("csrc/*.cu*"))
    reports = sorted(cupy_dir.glob("resource_usage/*.txt"))
    assert {p.suffix for p in cuda_sources} == {".cu", ".cuh"} and reports
    for path in cuda_sources + reports:
        assert f"dsa_ref_backends/{path.relative_to(ROOT / 'backends').as_posix()}" in names, path.name


def test_wheel_builds_without_a_setuptools_warning(built_wheel):
    _, output = built_wheel
    warnings = [line for line in output.splitlines() if BUILD_WARNING.search(line)]
    assert not warnings, "\n".join(warnings) + "\n\nfull build output:\n" + output


def test_wheel_metadata_names_the_license_and_the_dependencies_of_dsa_ref_check(built_wheel):
    wheel, _ = built_wheel
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    # `dsa-ref check` runs the hypothesis-based conformance kit: it must work after a plain install.
    core_requirements = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                         if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(re.match(r"hypothesis\b", requirement) for requirement in core_requirements), core_requirements


# ---------------------------------------------------------------------------- install hints
def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _hints_in(paths) -> dict[str, set[str]]:
    """extra -> the files whose install hints ask for it."""
    asked: dict[str, set[str]] = {}
    for path in paths:
        for match in INSTALL_HINT.finditer(path.read_text(encoding="utf-8")):
            for extra in match.group(1).split(","):
                asked.setdefault(extra.strip(), set()).add(path.relative_to(ROOT).as_posix())
    return asked


def test_the_cupy_extras_match_the_cuda_major_version():
    extras = _extras()
    assert [req.split(";")[0].strip() for req in extras["cupy"]] == ["cupy-cuda13x"]
    assert [req.split(";")[0].strip() for req in extras["cupy12"]] == ["cupy-cuda12x"]


def test_install_hints_in_the_code_name_extras_that_exist():
    asked = _hints_in(sorted((ROOT / "dsa_ref").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py")))
    assert {"cupy", "cupy12", "triton"} <= set(asked), asked  # the hints this test exists for are found
    unknown = {extra: files for extra, files in asked.items() if extra not in _extras()}
    assert not unknown, f"install hints ask for extras that pyproject.toml does not define: {unknown}"


def test_install_hints_in_the_docs_name_extras_that_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "tutorials").glob("*.py"))]
    unknown = {extra: files for extra, files in _hints_in(docs).items() if extra not in _extras()}
    assert not unknown, f"install hints ask for extras that pyproject.toml does not define: {unknown}"


def test_the_cupy_backend_without_cupy_says_which_extra_to_install(monkeypatch):
    from dsa_ref_backends.cupy_cuda import backend

    monkeypatch.setitem(sys.modules, "cupy", None)  # importing cupy now raises ImportError
    (reason,) = backend._probe_device()
    assert "cupy is not importable" in reason
    assert "pip install 'dsa-ref[cupy]'" in reason and "CUDA 13" in reason
    assert "'dsa-ref[cupy12]' for CUDA 12" in reason
