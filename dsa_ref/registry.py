"""Finding, choosing and loading backends.

Backends are found through the entry-point group ``dsa_ref.backends`` — dsa-ref's own
(``numpy``, ``triton``, ``cupy``) are registered exactly as a third party's would be::

    [project.entry-points."dsa_ref.backends"]
    mykernels = "my_package.dsa:MyBackend"

Work in progress that is not installed can be named directly as
``module://my_package.dsa:MyBackend`` wherever a backend name is accepted.

Which backend runs an op, highest priority first:

1. the ``backend=`` argument of the op;
2. the innermost ``with dsa_ref.use_backend(name):`` block (a context variable: thread-safe,
   async-safe, nestable);
3. the environment variable ``DSA_BACKEND``, read once, at the first op that needs it;
4. ``numpy``, the reference.

An explicit choice is never replaced by another backend: an unknown name is a ``ValueError``
listing the available ones, and a backend that cannot run here raises
:class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator

from .backend import Backend

ENTRY_POINT_GROUP = "dsa_ref.backends"
DEFAULT_BACKEND = "numpy"
ENV_VAR = "DSA_BACKEND"
MODULE_PREFIX = "module://"


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run here (package missing, no GPU, ...)."""


class UnsupportedInputError(ValueError):
    """The chosen backend does not support these inputs; the message lists its reasons."""


@dataclass
class BackendInfo:
    """What ``list_backends`` reports for one backend."""

    name: str
    origin: str
    available: bool
    reasons: list[str] = field(default_factory=list)
    description: str = ""
    array_kind: str = ""
    devices: tuple[str, ...] = ()


_context_choice: contextvars.ContextVar[str | Backend | None] = contextvars.ContextVar(
    "dsa_ref_backend", default=None)
_env_choice: list[str | None] = []  # filled once, at first use
_loaded: dict[str, Backend] = {}


# ---------------------------------------------------------------------------- discovery
def _entry_points() -> dict[str, str]:
    """Backend name -> ``module:attr`` of every installed entry point; duplicates are an error."""
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            raise ValueError(
                f"two installed packages register a dsa_ref backend named {ep.name!r}: "
                f"{found[ep.name]!r} and {ep.value!r}; uninstall one of them")
        found[ep.name] = ep.value
    return found


def backend_names() -> list[str]:
    """Names of every registered backend, available here or not."""
    return sorted(_entry_points())


def _import_class(target: str, label: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"backend {label!r} must point at 'package.module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {label!r} cannot be imported ({module_name}: {exc}); "
            f"is its package installed?") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise BackendUnavailableError(f"backend {label!r}: module {module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"backend {label!r}: {target!r} is not a subclass of dsa_ref.backend.Backend")
    return cls


def _load(name: str) -> Backend:
    """The backend object for a registered name or a ``module://`` path (cached)."""
    if name in _loaded:
        return _loaded[name]
    if name.startswith(MODULE_PREFIX):
        cls = _import_class(name[len(MODULE_PREFIX):], name)
    else:
        registered = _entry_points()
        if name not in registered:
            raise ValueError(
                f"{name!r} is not a valid dsa_ref backend; available: {sorted(registered)} "
                f"(or 'module://package.module:Class' for an unregistered one)")
        cls = _import_class(registered[name], name)
        if cls.name != name:
            raise ValueError(f"backend registered as {name!r} calls itself {cls.name!r}; the names must match")
    backend = cls()
    _loaded[name] = backend
    return backend


# ---------------------------------------------------------------------------- choice
def _env_backend() -> str | None:
    if not _env_choice:
        _env_choice.append(os.environ.get(ENV_VAR) or None)
    return _env_choice[0]


def active_backend_name() -> str:
    """The name an op without ``backend=`` would use right now."""
    chosen = _context_choice.get()
    if isinstance(chosen, Backend):
        return chosen.name
    return chosen or _env_backend() or DEFAULT_BACKEND


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend ``name`` (default: the active one), ready to run.

    Raises:
        ValueError: no backend of that name is registered.
        BackendUnavailableError: it is registered but cannot run here; the message says why.
    """
    if isinstance(name, Backend):
        backend = name
    else:
        if name is None:
            chosen = _context_choice.get()
            if isinstance(chosen, Backend):
                return _require_available(chosen)
            name = active_backend_name()
        if not isinstance(name, str):
            raise TypeError(f"backend must be a name (str) or a Backend, got {type(name).__name__}")
        backend = _load(name)
    return _require_available(backend)


def _require_available(backend: Backend) -> Backend:
    reasons = backend.unavailable_reasons()
    if reasons:
        raise BackendUnavailableError(f"backend {backend.name!r} cannot run here: " + "; ".join(reasons))
    return backend


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Run the ops inside the block on backend ``name`` (unless an op names its own).

    The choice is checked on entry, so a misspelt or unavailable backend fails at the ``with``.
    Nested blocks restore the outer choice on exit; threads and asyncio tasks each see their own.
    """
    backend = get_backend(name)
    token = _context_choice.set(name if isinstance(name, Backend) else name)
    try:
        yield backend
    finally:
        _context_choice.reset(token)


def list_backends() -> list[BackendInfo]:
    """Every registered backend, whether it can run here, and if not, why."""
    infos = []
    for name, target in sorted(_entry_points().items()):
        try:
            backend = _load(name)
        except Exception as exc:  # report, don't fail: this feeds `dsa-ref info`
            infos.append(BackendInfo(name, target, False, [f"{type(exc).__name__}: {exc}"]))
            continue
        reasons = backend.unavailable_reasons()
        infos.append(BackendInfo(name, target, not reasons, reasons, backend.description,
                                 backend.array_kind, tuple(backend.devices)))
    return infos


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [info.name for info in list_backends() if info.available]


def _reset_for_tests() -> None:
    """Forget cached backends and the cached ``DSA_BACKEND`` (tests change the environment)."""
    _loaded.clear()
    _env_choice.clear()
