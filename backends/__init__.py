"""Backends of dsa-ref, installed as the package dsa_ref_backends."""

import os


def kernel_switch(chosen: bool, variable: str) -> bool:
    """Whether a backend runs one of its alternative kernels: the backend's attribute ``chosen``,
    unless the environment variable ``variable`` is set to ``"0"`` (off) or ``"1"`` (on) for the
    whole process (benchmarks and conformance runs compare kernels that way without code)."""
    setting = os.environ.get(variable, "")
    if setting in ("0", "1"):
        return setting == "1"
    return chosen
