"""Argument checks shared by every public op, for every array library.

Each check names the argument, what it got, and what was expected, so that a wrong call fails
at the boundary with a readable ``TypeError`` / ``ValueError`` instead of an IndexError or a
silently wrong answer deep inside a kernel.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import interop, modes

FLOATS = ("float64", "float32", "float16", "bfloat16")
FLOATS_AND_FP8 = FLOATS + ("float8_e4m3fn",)
INDEX_INTS = ("int32", "int64")


def array(name: str, x: Any, layout: str, dtypes: tuple[str, ...]) -> None:
    """``x`` is an array with ``len(layout)`` axes and one of ``dtypes``.

    ``layout`` is written like ``"[s_q, h, d_qk]"`` and quoted in the message.
    """
    if not interop.is_array(x):
        raise TypeError(f"{name} must be an array (numpy.ndarray, torch.Tensor or cupy.ndarray) "
                        f"of shape {layout}, got {type(x).__name__}")
    ndim = layout.count(",") + 1
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} axes), got shape {tuple(x.shape)}")
    got = interop.logical_dtype_name(x, packed_kv=name == "kv")
    if got not in dtypes:
        raise TypeError(f"{name}.dtype must be one of {', '.join(dtypes)}, got {got}")


def optional_array(name: str, x: Any, layout: str, dtypes: tuple[str, ...]) -> None:
    if x is not None:
        array(name, x, layout, dtypes)


def axis(name: str, x: Any, index: int, expected: int, layout: str, because: str) -> None:
    """Axis ``index`` of ``x`` has length ``expected`` (``because`` says which other argument sets it)."""
    if x is not None and x.shape[index] != expected:
        raise ValueError(f"{name} must have shape {layout} with {layout.strip('[]').split(', ')[index]}="
                         f"{expected} ({because}), got shape {tuple(x.shape)}")


def int_at_least(name: str, value: Any, low: int) -> int:
    """``value`` is an int (a Python or NumPy integer, not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    return int_at_least(name, value, 1)


def host_array(name: str, x: Any, layout: str) -> np.ndarray:
    """``x`` as a NumPy array: arrays of any library (copied off a GPU), or a list / tuple.

    For the reference's helpers, whose results are NumPy arrays; anything else (a string, a
    scalar, ``None``) is a ``TypeError`` that quotes ``layout``.
    """
    if interop.is_array(x):
        return interop.to_numpy(x)
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name} must be an array or a list of shape {layout}, got {type(x).__name__}")


def integer_array(name: str, x: np.ndarray, layout: str) -> None:
    """A NumPy array of integers (of any width; not bool, not float: a float would be truncated)."""
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (an int array or a list of ints) of shape {layout}, "
                        f"got dtype {x.dtype}")


def finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _min_max(x: Any) -> tuple[int, int]:
    # A tiny reduction; on a GPU array it is one small device->host copy.
    return int(x.min()), int(x.max())


def key_ranges(key_start: Any, key_end: Any, s_q: int, s_kv: int) -> tuple[Any, Any]:
    """``0 <= key_start[i] <= key_end[i] <= s_kv`` for every query ``i``; returns the ranges.

    With data checks off (:func:`dsa_ref.use_data_checks`), the values are not read: they are
    clamped into that form instead, on the arrays' own device, with no synchronization.
    """
    for name, ranges in (("key_start", key_start), ("key_end", key_end)):
        array(name, ranges, "[s_q]", INDEX_INTS)
        axis(name, ranges, 0, s_q, "[s_q]", "the queries' s_q")
    if s_q == 0:
        return key_start, key_end
    if not modes.data_checks_enabled():
        return clamp_key_ranges(key_start, key_end, s_kv)
    low, _ = _min_max(key_start)
    _, high = _min_max(key_end)
    if low < 0:
        raise ValueError(f"key_start must be >= 0, got min(key_start)={low}")
    if high > s_kv:
        raise ValueError(f"key_end must be <= s_kv={s_kv}, got max(key_end)={high}")
    shortest, _ = _min_max(key_end - key_start)
    if shortest < 0:
        raise ValueError(f"key_start must be <= key_end for every query (an empty range is key_start == key_end), "
                         f"got a query with key_end - key_start = {shortest}")
    return key_start, key_end


def clamp_key_ranges(key_start: Any, key_end: Any, s_kv: int) -> tuple[Any, Any]:
    """The ranges clamped into ``0 <= key_start <= key_end <= s_kv`` on their own device, unread."""
    if key_start.shape[0] == 0:
        return key_start, key_end
    start = key_start.clip(0, s_kv)
    return start, start + (key_end.clip(0, s_kv) - start).clip(0, s_kv)


def int_range(name: str, x: Any, low: int, high: int) -> Any:
    """Every value of ``x`` (None passes) lies in ``[low, high]``; returns ``x`` (clamped there, without
    reading it, when data checks are off)."""
    if x is not None and x.shape[0] > 0:
        if not modes.data_checks_enabled():
            return x.clip(low, high)
        lo, hi = _min_max(x)
        if lo < low or hi > high:
            raise ValueError(f"{name} values must lie in [{low}, {high}], got min={lo}, max={hi}")
    return x
