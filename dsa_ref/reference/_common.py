"""Small pieces shared by the reference functions: float64 upcasts, default key ranges,
and the query chunking that keeps the reference's memory bounded."""

from __future__ import annotations

import numpy as np

#: Largest intermediate (in bytes) one chunk of queries may create. The reference processes
#: queries in chunks so that s_q = s_kv = 4096 fits well under 2 GB (and chunks stay cache- and
#: allocator-friendly); the chunking changes nothing in the result: every query is independent.
CHUNK_BYTES = 16 * 2**20


def as_float64(x) -> np.ndarray:
    """Upcast to float64; works for ml_dtypes' bfloat16 and float8 (their values are exact in float64)."""
    return np.asarray(x).astype(np.float64, copy=False)


def result_dtype(x) -> np.dtype:
    """The dtype of a reference op's float results: float32, or float64 when the op's main input is
    float64 (so that float64 callers, finite differences and ``torch.autograd.gradcheck`` see the
    reference's full precision)."""
    return np.dtype(np.float64 if np.asarray(x).dtype == np.float64 else np.float32)


def query_chunks(s_q: int, bytes_per_query: int):
    """Slices over the query axis, each creating at most ~CHUNK_BYTES of intermediates."""
    step = max(1, CHUNK_BYTES // max(1, bytes_per_query))
    for begin in range(0, s_q, step):
        yield slice(begin, min(s_q, begin + step))


def full_key_ranges(s_q: int, s_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """Every key visible to every query: key_start = 0, key_end = s_kv."""
    return np.zeros(s_q, np.int64), np.full(s_q, s_kv, np.int64)


def visible_keys(key_start: np.ndarray, key_end: np.ndarray, s_kv: int) -> np.ndarray:
    """Boolean ``[s_q, s_kv]``: key j is visible to query i when key_start[i] <= j < key_end[i]."""
    key = np.arange(s_kv)[None, :]  # [1, s_kv]
    return (np.asarray(key_start)[:, None] <= key) & (key < np.asarray(key_end)[:, None])  # [s_q, s_kv]
