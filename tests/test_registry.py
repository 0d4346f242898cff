"""Backend discovery, selection and availability."""

from __future__ import annotations

import subprocess
import sys
import threading
from importlib import metadata

import numpy as np
import pytest

import dsa_ref
from dsa_ref import registry

GOOD = "module://fake_backends:GoodBackend"


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("DSA_BACKEND", raising=False)
    assert dsa_ref.active_backend_name() == "numpy"
    assert dsa_ref.get_backend().name == "numpy"


def test_environment_variable_is_read_at_first_use(monkeypatch):
    monkeypatch.setenv("DSA_BACKEND", GOOD)
    assert dsa_ref.active_backend_name() == GOOD
    monkeypatch.setenv("DSA_BACKEND", "numpy")  # later changes are not seen: read once
    assert dsa_ref.active_backend_name() == GOOD


def test_priority_argument_then_context_then_environment(monkeypatch):
    monkeypatch.setenv("DSA_BACKEND", "numpy")
    with dsa_ref.use_backend(GOOD):
        assert dsa_ref.active_backend_name() == GOOD
        with dsa_ref.use_backend("numpy"):
            assert dsa_ref.active_backend_name() == "numpy"
        assert dsa_ref.active_backend_name() == GOOD
    assert dsa_ref.active_backend_name() == "numpy"


def test_backend_argument_wins_over_the_context():
    calls = []

    class Spy(dsa_ref.Backend):
        name = "spy"

        def topk_indices(self, scores, topk):
            calls.append(topk)
            return np.zeros((scores.shape[0], topk), np.int32)

    with dsa_ref.use_backend("numpy"):
        dsa_ref.topk_indices(np.zeros((1, 3), np.float32), 2, backend=Spy())
    assert calls == [2]


def test_use_backend_is_per_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with dsa_ref.use_backend(GOOD):
            inside.set()
            release.wait(5)
            seen["worker"] = dsa_ref.active_backend_name()

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = dsa_ref.active_backend_name()
    release.set()
    thread.join()
    assert seen == {"worker": GOOD, "main": "numpy"}


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'nope' is not a valid dsa_ref backend; available: \[.*'numpy'.*\]"):
        dsa_ref.get_backend("nope")
    with pytest.raises(ValueError, match="'nope' is not a valid"):
        with dsa_ref.use_backend("nope"):
            pass


def test_unavailable_backend_says_why_and_never_falls_back():
    with pytest.raises(dsa_ref.BackendUnavailableError, match="'nogpu' cannot run here: no CUDA device"):
        dsa_ref.topk_indices(np.zeros((1, 3), np.float32), 2, backend="module://fake_backends:NoGpuBackend")


def test_module_path_errors_are_clear():
    with pytest.raises(dsa_ref.BackendUnavailableError, match="cannot be imported"):
        dsa_ref.get_backend("module://no_such_module_here:Backend")
    with pytest.raises(dsa_ref.BackendUnavailableError, match="has no attribute 'Missing'"):
        dsa_ref.get_backend("module://fake_backends:Missing")
    with pytest.raises(TypeError, match="is not a subclass of dsa_ref.backend.Backend"):
        dsa_ref.get_backend("module://fake_backends:np")


class _EntryPoint:
    def __init__(self, name, value):
        self.name, self.value = name, value


def test_entry_points_are_discovered_and_duplicates_rejected(monkeypatch):
    entries = [_EntryPoint("numpy", "dsa_ref_backends.numpy_reference:NumpyBackend"),
               _EntryPoint("good", "fake_backends:GoodBackend")]
    monkeypatch.setattr(metadata, "entry_points", lambda group: entries if group == registry.ENTRY_POINT_GROUP else [])
    registry._reset_for_tests()
    try:
        assert registry.backend_names() == ["good", "numpy"]
        assert dsa_ref.get_backend("good").name == "good"
        entries.append(_EntryPoint("good", "other_package:Other"))
        with pytest.raises(ValueError, match="two installed packages register a dsa_ref backend named 'good'"):
            registry.backend_names()
    finally:
        registry._reset_for_tests()


def test_registered_name_must_match_the_class_name(monkeypatch):
    entries = [_EntryPoint("alias", "fake_backends:GoodBackend")]
    monkeypatch.setattr(metadata, "entry_points", lambda group: entries)
    registry._reset_for_tests()
    try:
        with pytest.raises(ValueError, match="registered as 'alias' calls itself 'good'"):
            dsa_ref.get_backend("alias")
    finally:
        registry._reset_for_tests()


def test_our_backends_are_registered_through_entry_points():
    names = registry.backend_names()
    assert {"numpy", "triton", "cupy"} <= set(names)
    info = {i.name: i for i in dsa_ref.list_backends()}
    assert info["numpy"].available and info["numpy"].origin.startswith("dsa_ref_backends.")
    for unavailable in (i for i in info.values() if not i.available):
        assert unavailable.reasons, f"{unavailable.name} unavailable without a reason"


def test_importing_dsa_ref_imports_neither_torch_nor_cupy():
    code = ("import sys, numpy as np, dsa_ref, dsa_ref.testing; "
            "dsa_ref.topk_indices(np.zeros((1, 4), np.float32), 2); "
            "print(sorted(m for m in ('torch', 'cupy', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
