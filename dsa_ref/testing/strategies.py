"""Hypothesis strategies that generate valid problems for each op.

Each strategy draws the *shape* of a problem and its awkward features (odd sizes, s_q != s_kv,
ragged and empty key ranges, rows with fewer valid keys than topk, topk >= s_kv, exact-zero
plateaus, adversarial invalid indices, duplicates, non-contiguous inputs), then a seed from
which :mod:`dsa_ref.testing.problems` builds the arrays with NumPy: hypothesis shrinks the
shape and features, and arrays stay cheap to make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from . import problems


@dataclass(frozen=True)
class Profile:
    """How many examples per op and how large they get."""

    name: str
    max_examples: int
    max_tokens: int
    max_heads: int
    dims: tuple[int, ...]
    derandomize: bool


PROFILES = {
    # Fast enough for every push, on 2 CPU cores, interpreters included; fixed seed: CI is repeatable.
    "ci": Profile("ci", max_examples=30, max_tokens=40, max_heads=4, dims=(1, 3, 8, 16, 19, 32, 40),
                  derandomize=True),
    # Before a release or after touching a kernel: >= 1000 examples per op, up to real head widths.
    "thorough": Profile("thorough", max_examples=1000, max_tokens=160, max_heads=16,
                        dims=(1, 3, 8, 16, 19, 32, 40, 64, 128, 576), derandomize=False),
}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]


def _rng(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def indexer_problems(draw, profile: str | Profile = "ci",
                     dtypes=("float32", "bfloat16", "float16", "float8_e4m3fn")) -> problems.Problem:
    p = get_profile(profile)
    return problems.indexer_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=draw(st.integers(1, p.max_tokens)),
        h_i=draw(st.integers(1, p.max_heads)),
        d_i=draw(st.sampled_from([d for d in p.dims if d <= 128])),
        dtype=draw(st.sampled_from(dtypes)),
        ranges=draw(st.sampled_from(problems.RANGE_KINDS)),
        empty_fraction=draw(st.sampled_from([0.0, 0.0, 0.3])),
        plateau=draw(st.booleans()),
        strided=draw(st.booleans()),
    )


@st.composite
def topk_problems(draw, profile: str | Profile = "ci") -> problems.Problem:
    p = get_profile(profile)
    s_kv = draw(st.integers(1, 4 * p.max_tokens))
    return problems.topk_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        topk=draw(st.one_of(st.integers(1, s_kv), st.integers(s_kv, s_kv + 8))),  # topk >= s_kv too
        masked_fraction=draw(st.sampled_from([0.0, 0.2, 0.9, 1.0])),
        plateau=draw(st.booleans()),
        nan_fraction=draw(st.sampled_from([0.0, 0.0, 0.05])),
        strided=draw(st.booleans()),
    )


@st.composite
def sparse_mla_problems(draw, profile: str | Profile = "ci",
                        dtypes=("bfloat16", "float16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    packed_fp8 = draw(st.booleans()) and draw(st.booleans())  # a quarter of the cases
    d_qk = 576 if packed_fp8 else draw(st.sampled_from(p.dims))
    s_kv = draw(st.integers(1, p.max_tokens))
    return problems.sparse_mla_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        h=draw(st.integers(1, p.max_heads)),
        d_qk=d_qk,
        d_v=512 if d_qk == 576 else draw(st.integers(1, d_qk)),
        topk=draw(st.integers(1, s_kv + 8)),
        dtype=draw(st.sampled_from(dtypes)),
        distribution=draw(st.sampled_from(problems.INDEX_DISTRIBUTIONS)),
        causal=draw(st.booleans()),
        invalid_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        duplicate_fraction=draw(st.sampled_from([0.0, 0.0, 0.2])),
        topk_length=draw(st.booleans()),
        attn_sink=draw(st.booleans()),
        packed_fp8=packed_fp8,
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        strided=draw(st.booleans()),
    )


@st.composite
def dsa_problems(draw, profile: str | Profile = "ci", dtypes=("bfloat16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    s_kv = draw(st.integers(1, p.max_tokens))
    d_qk = draw(st.sampled_from(p.dims))
    return problems.dsa_problem(
        _rng(draw),
        s_q=draw(st.integers(1, s_kv)),
        s_kv=s_kv,
        h=draw(st.integers(1, p.max_heads)),
        d_qk=d_qk,
        d_v=draw(st.integers(1, d_qk)),
        h_i=draw(st.integers(1, p.max_heads)),
        d_i=draw(st.sampled_from([d for d in p.dims if d <= 128])),
        topk=draw(st.integers(1, s_kv + 4)),
        dtype=draw(st.sampled_from(dtypes)),
        ranges=draw(st.sampled_from(problems.RANGE_KINDS)),
        strided=draw(st.booleans()),
    )


STRATEGIES = {
    "lightning_indexer": indexer_problems,
    "topk_indices": topk_problems,
    "sparse_mla": sparse_mla_problems,
    "dsa_attention": dsa_problems,
}
