"""Switches that change how the ops run, not what they compute: deterministic accumulation, and
checks that read array values.

``dkv`` of sparse MLA's backward (and ``dk_index`` of the indexer loss's) sums contributions from
every query that selected a row. A GPU backend may add them with float atomics, whose order (and
so whose last bits) changes from run to run; in deterministic mode it must sum them in a fixed
order, so that two runs give bitwise-equal gradients, at some cost in speed. Each backend's docs
say which it does by default.

*Data checks.* Besides shapes and dtypes, the public ops check the values of their small index
arrays: ``0 <= key_start <= key_end <= s_kv`` and ``0 <= topk_length <= topk``. On a GPU each such
check is a device-to-host copy, which synchronizes the stream and cannot run inside a CUDA graph
capture. :func:`use_data_checks` (``False``) turns them off: the ops then check shapes and dtypes
only, and instead of refusing out-of-range values they clamp them on the device, with no
synchronization (``key_start`` into ``[0, s_kv]``, ``key_end`` into ``[key_start, s_kv]``,
``topk_length`` into ``[0, topk]``), as cuDNN's DSA adapter normalizes its metadata. The
differentiable ops of :mod:`dsa_ref.torch` always run this way. Index values themselves are never
checked: an invalid index (``< 0`` or ``>= s_kv``) is defined to be ignored.

Deterministic mode is on when :func:`use_deterministic` says so, or when PyTorch's
``torch.use_deterministic_algorithms(True)`` is in force (so one switch serves a torch training
script), whichever is set.
"""

from __future__ import annotations

import contextvars
import sys

_deterministic: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsa_ref_deterministic", default=None)
_data_checks: contextvars.ContextVar[bool] = contextvars.ContextVar("dsa_ref_data_checks", default=True)


class _Restore:
    """What the ``use_*`` switches return: the switch is already set; as a context manager,
    leaving the block restores the previous setting."""

    def __init__(self, variable: contextvars.ContextVar, token: contextvars.Token):
        self._variable, self._token = variable, token

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc) -> None:
        self._variable.reset(self._token)


def _flag(name: str, enabled) -> bool:
    if not isinstance(enabled, bool):
        raise TypeError(f"{name} must be a bool, got {type(enabled).__name__} {enabled!r}")
    return enabled


def use_deterministic(enabled: bool = True) -> _Restore:
    """Make the backward ops sum their gradients in a fixed order (bitwise-repeatable runs).

    Call it plainly (``dsa_ref.use_deterministic(True)``) to set it for the current thread or task
    from then on, or as a context manager (``with dsa_ref.use_deterministic():``) to set it for a block.
    ``use_deterministic(False)`` turns it off, also when PyTorch's deterministic mode is on.
    """
    return _Restore(_deterministic, _deterministic.set(_flag("enabled", enabled)))


def deterministic_enabled() -> bool:
    """Whether the backward ops must be bitwise repeatable right now (see :func:`use_deterministic`)."""
    chosen = _deterministic.get()
    if chosen is not None:
        return chosen
    torch = sys.modules.get("torch")  # never import torch here: only follow it when it is in use
    return bool(torch is not None and torch.are_deterministic_algorithms_enabled())


def use_data_checks(enabled: bool = True) -> _Restore:
    """Turn the checks that read array values on (the default) or off (shapes and dtypes only;
    out-of-range key ranges and ``topk_length`` are clamped on the device): see the module docs.

    Like :func:`use_deterministic`, a plain call or a context manager
    (``with dsa_ref.use_data_checks(False): ...`` around a CUDA graph capture).
    """
    return _Restore(_data_checks, _data_checks.set(_flag("enabled", enabled)))


def data_checks_enabled() -> bool:
    """Whether the public ops check the values of key ranges and ``topk_length`` (see :func:`use_data_checks`)."""
    return _data_checks.get()
