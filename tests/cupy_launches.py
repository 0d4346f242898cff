"""Which CuPy kernels an op asked for: tests that a routing choice really reached its kernel."""

from __future__ import annotations


def record_launches(monkeypatch) -> list[str]:
    """The name of every kernel the cupy backend fetches from here on (the list fills as it runs)."""
    from dsa_ref_backends.cupy_cuda import kernels

    names: list[str] = []
    original = kernels.kernel

    def recording(source, name, *args, **kwargs):
        names.append(name)
        return original(source, name, *args, **kwargs)

    monkeypatch.setattr(kernels, "kernel", recording)
    return names
