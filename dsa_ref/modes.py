"""Switches that change how the ops run, not what they compute: deterministic accumulation.

``dkv`` of sparse MLA's backward (and ``dk_index`` of the indexer loss's) sums contributions from
every query that selected a row. A GPU backend may add them with float atomics, whose order (and
so whose last bits) changes from run to run; in deterministic mode it must sum them in a fixed
order, so that two runs give bitwise-equal gradients, at some cost in speed. Each backend's docs
say which it does by default.

Deterministic mode is on when :func:`use_deterministic` says so, or when PyTorch's
``torch.use_deterministic_algorithms(True)`` is in force (so one switch serves a torch training
script), whichever is set.
"""

from __future__ import annotations

import contextvars
import sys

_deterministic: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsa_ref_deterministic", default=None)


class _Restore:
    """What :func:`use_deterministic` returns: the switch is already set; as a context manager,
    leaving the block restores the previous setting."""

    def __init__(self, token: contextvars.Token):
        self._token = token

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc) -> None:
        _deterministic.reset(self._token)


def use_deterministic(enabled: bool = True) -> _Restore:
    """Make the backward ops sum their gradients in a fixed order (bitwise-repeatable runs).

    Call it plainly (``dsa_ref.use_deterministic(True)``) to set it for the current thread or task
    from then on, or as a context manager (``with dsa_ref.use_deterministic():``) to set it for a block.
    ``use_deterministic(False)`` turns it off, also when PyTorch's deterministic mode is on.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    return _Restore(_deterministic.set(enabled))


def deterministic_enabled() -> bool:
    """Whether the backward ops must be bitwise repeatable right now (see :func:`use_deterministic`)."""
    chosen = _deterministic.get()
    if chosen is not None:
        return chosen
    torch = sys.modules.get("torch")  # never import torch here: only follow it when it is in use
    return bool(torch is not None and torch.are_deterministic_algorithms_enabled())
