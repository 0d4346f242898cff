"""Hypothesis strategies that generate valid problems for each op.

Each strategy draws the *shape* of a problem and its awkward features (odd sizes, s_q != s_kv,
ragged and empty key ranges, rows with fewer valid keys than topk, topk >= s_kv, exact-zero
plateaus and near-ties, adversarial invalid indices, duplicates, non-default softmax scales,
fp8 indexer inputs, non-contiguous inputs), then a seed from
which :mod:`dsa_ref.testing.problems` builds the arrays with NumPy: hypothesis shrinks the
shape and features, and arrays stay cheap to make.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from . import problems
from .profiles import PROFILES, Profile, get_profile

__all__ = ["PROFILES", "Profile", "STRATEGIES", "attention_target_problems", "dsa_problems", "get_profile",
           "indexer_loss_backward_problems", "indexer_loss_problems", "indexer_problems",
           "sparse_mla_backward_problems", "sparse_mla_problems", "topk_problems"]

#: Softmax scales drawn for the attention ops: the default (None: d_qk ** -0.5), DeepSeek-V3.2's
#: own (a backend that hard-codes d_qk ** -0.5 is wrong there), and other non-default values.
SM_SCALES = (None, problems.V32_SM_SCALE, 0.3, 1.0, 0.05)


def _rng(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _model_heads(draw, p: Profile) -> int | None:
    """For a quarter of the examples of a profile with ``model_heads``, one of them: the example takes the
    model's shapes (see :attr:`Profile.model_heads`). None otherwise, and always for a profile without."""
    if not p.model_heads or not draw(st.sampled_from([True, False, False, False])):
        return None
    return draw(st.sampled_from(p.model_heads))


#: The indexer's shape in DeepSeek-V3.2: 64 heads of 128.
MODEL_INDEX_HEADS, MODEL_INDEX_DIM = 64, 128


def _topk(draw, s_kv: int, extra: int) -> int:
    # topk >= s_kv too, but mostly below it: only there does the choice of keys matter.
    if draw(st.sampled_from([False, False, False, True])):
        return draw(st.integers(s_kv, s_kv + extra))
    return draw(st.integers(1, s_kv))


@st.composite
def indexer_problems(draw, profile: str | Profile = "ci",
                     dtypes=("float32", "bfloat16", "float16", "float8_e4m3fn")) -> problems.Problem:
    p = get_profile(profile)
    model = _model_heads(draw, p) is not None
    return problems.indexer_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=draw(st.integers(1, p.max_tokens)),
        h_i=MODEL_INDEX_HEADS if model else draw(st.integers(1, p.max_heads)),
        d_i=MODEL_INDEX_DIM if model else draw(st.sampled_from([d for d in p.dims if d <= 128])),
        dtype=draw(st.sampled_from([d for d in ("float8_e4m3fn", "bfloat16") if d in dtypes] or dtypes)
                   if model else st.sampled_from(dtypes)),
        ranges=draw(st.sampled_from(problems.RANGE_KINDS)),
        empty_fraction=draw(st.sampled_from([0.0, 0.0, 0.3])),
        plateau=draw(st.booleans()),
        strided=draw(st.booleans()),
    )


@st.composite
def topk_problems(draw, profile: str | Profile = "ci") -> problems.Problem:
    p = get_profile(profile)
    s_kv = draw(st.integers(1, 4 * p.max_tokens))
    topk = _topk(draw, s_kv, extra=8)
    ties = draw(st.sampled_from(["distinct", "plateau", "near"]))
    return problems.topk_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        topk=topk,
        masked_fraction=draw(st.sampled_from([0.0, 0.2, 0.9, 1.0])),
        plateau=ties == "plateau",
        near_ties=ties == "near",
        nan_fraction=draw(st.sampled_from([0.0, 0.0, 0.05])),
        strided=draw(st.booleans()),
    )


def _model_dtype(draw, dtypes) -> str:
    """The model's attention dtype, bf16, where the op is asked to take it, else one of ``dtypes``."""
    return "bfloat16" if "bfloat16" in dtypes else draw(st.sampled_from(dtypes))


@st.composite
def sparse_mla_problems(draw, profile: str | Profile = "ci",
                        dtypes=("bfloat16", "float16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    model_h = _model_heads(draw, p)
    # a quarter of the cases, half of the model's: the FP8 cache (the decode kernels' input)
    packed_fp8 = draw(st.booleans()) and (model_h is not None or draw(st.booleans()))
    d_qk = 576 if packed_fp8 or model_h else draw(st.sampled_from(p.dims))
    s_kv = draw(st.integers(1, p.max_tokens))
    return problems.sparse_mla_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        h=model_h or draw(st.integers(1, p.max_heads)),
        d_qk=d_qk,
        d_v=512 if d_qk == 576 else draw(st.integers(1, d_qk)),
        topk=draw(st.integers(1, s_kv + 8)),
        dtype=_model_dtype(draw, dtypes) if model_h else draw(st.sampled_from(dtypes)),
        distribution=draw(st.sampled_from(problems.INDEX_DISTRIBUTIONS)),
        causal=draw(st.booleans()),
        invalid_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        duplicate_fraction=draw(st.sampled_from([0.0, 0.0, 0.2])),
        topk_length=draw(st.booleans()),
        attn_sink=draw(st.booleans()),
        packed_fp8=packed_fp8,
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        sm_scale=draw(st.sampled_from(SM_SCALES)),
        strided=draw(st.booleans()),
    )


@st.composite
def dsa_problems(draw, profile: str | Profile = "ci", dtypes=("bfloat16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    model_h = _model_heads(draw, p)
    s_kv = draw(st.integers(1, p.max_tokens))
    d_qk = 576 if model_h else draw(st.sampled_from(p.dims))
    return problems.dsa_problem(
        _rng(draw),
        s_q=draw(st.integers(1, s_kv)),
        s_kv=s_kv,
        h=model_h or draw(st.integers(1, p.max_heads)),
        d_qk=d_qk,
        d_v=512 if model_h else draw(st.integers(1, d_qk)),
        h_i=MODEL_INDEX_HEADS if model_h else draw(st.integers(1, p.max_heads)),
        d_i=MODEL_INDEX_DIM if model_h else draw(st.sampled_from([d for d in p.dims if d <= 128])),
        topk=_topk(draw, s_kv, extra=4),
        dtype=_model_dtype(draw, dtypes) if model_h else draw(st.sampled_from(dtypes)),
        index_dtype=draw(st.sampled_from([None, "float8_e4m3fn"])),  # None: the attention's dtype
        ranges=draw(st.sampled_from(problems.RANGE_KINDS)),
        sm_scale=draw(st.sampled_from(SM_SCALES)),
        strided=draw(st.booleans()),
    )


@st.composite
def sparse_mla_backward_problems(draw, profile: str | Profile = "ci",
                                 dtypes=("bfloat16", "float16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    model_h = _model_heads(draw, p)
    d_qk = 576 if model_h else draw(st.sampled_from(p.dims))
    s_kv = draw(st.integers(1, p.max_tokens))
    return problems.sparse_mla_backward_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        h=model_h or draw(st.integers(1, p.max_heads)),
        d_qk=d_qk,
        d_v=512 if model_h else draw(st.integers(1, d_qk)),
        topk=draw(st.integers(1, s_kv + 8)),
        dtype=_model_dtype(draw, dtypes) if model_h else draw(st.sampled_from(dtypes)),
        distribution=draw(st.sampled_from(problems.INDEX_DISTRIBUTIONS)),
        causal=draw(st.booleans()),
        invalid_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        duplicate_fraction=draw(st.sampled_from([0.0, 0.2, 0.5])),  # rows read twice: contributions add up
        topk_length=draw(st.booleans()),
        attn_sink=draw(st.booleans()),
        d_lse=draw(st.booleans()),
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        sm_scale=draw(st.sampled_from(SM_SCALES)),
        unread_nan=draw(st.booleans()),
        deterministic=draw(st.booleans()),
        strided=draw(st.booleans()),
    )


@st.composite
def attention_target_problems(draw, profile: str | Profile = "ci",
                              dtypes=("bfloat16", "float16", "float32")) -> problems.Problem:
    p = get_profile(profile)
    model_h = _model_heads(draw, p)
    packed_fp8 = draw(st.booleans()) and (model_h is not None or draw(st.booleans()))
    s_kv = draw(st.integers(1, p.max_tokens))
    return problems.attention_target_problem(
        _rng(draw),
        s_q=draw(st.integers(1, p.max_tokens)),
        s_kv=s_kv,
        h=model_h or draw(st.integers(1, p.max_heads)),
        d_qk=576 if packed_fp8 or model_h else draw(st.sampled_from(p.dims)),
        topk=draw(st.integers(1, s_kv + 8)),
        dtype=_model_dtype(draw, dtypes) if model_h else draw(st.sampled_from(dtypes)),
        distribution=draw(st.sampled_from(problems.INDEX_DISTRIBUTIONS)),
        causal=draw(st.booleans()),
        invalid_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        duplicate_fraction=draw(st.sampled_from([0.0, 0.2])),
        topk_length=draw(st.booleans()),
        packed_fp8=packed_fp8,
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        sm_scale=draw(st.sampled_from(SM_SCALES)),
        strided=draw(st.booleans()),
    )


def _indexer_loss_problems(backward: bool, dtypes):
    @st.composite
    def build(draw, profile: str | Profile = "ci", dtypes=dtypes) -> problems.Problem:
        p = get_profile(profile)
        model = _model_heads(draw, p) is not None
        s_kv = draw(st.integers(1, p.max_tokens))
        return problems.indexer_loss_problem(
            _rng(draw),
            s_q=draw(st.integers(1, p.max_tokens)),
            s_kv=s_kv,
            h_i=MODEL_INDEX_HEADS if model else draw(st.integers(1, p.max_heads)),
            d_i=MODEL_INDEX_DIM if model else draw(st.sampled_from([d for d in p.dims if d <= 128])),
            topk=draw(st.integers(1, s_kv + 4)),
            dtype=draw(st.sampled_from(dtypes)),
            sparse=draw(st.booleans()),
            ranges=draw(st.sampled_from(problems.RANGE_KINDS)),
            invalid_fraction=draw(st.sampled_from([0.0, 0.2, 1.0])),
            duplicate_fraction=draw(st.sampled_from([0.0, 0.3])),
            empty_target_fraction=draw(st.sampled_from([0.0, 0.3])),
            key_scale=draw(st.booleans()),
            unread_nan=draw(st.booleans()),
            backward=backward,
            deterministic=backward and draw(st.booleans()),
            strided=draw(st.booleans()),
        )
    return build


#: The loss takes fp8 indexer inputs (an inference-format check of the target); its backward does not.
indexer_loss_problems = _indexer_loss_problems(False, ("float32", "bfloat16", "float16", "float8_e4m3fn"))
indexer_loss_backward_problems = _indexer_loss_problems(True, ("float32", "bfloat16", "float16"))


@st.composite
def paged_indexer_problems(draw, profile: str | Profile = "ci",
                           dtypes=("float8_e4m3fn", "float32", "bfloat16")) -> problems.Problem:
    p = get_profile(profile)
    model = _model_heads(draw, p) is not None  # DeepGEMM's paged fp8 cache: pages of 64
    block_size = 64 if model else draw(st.sampled_from([1, 2, 4, 16, 64]))
    return problems.paged_indexer_problem(
        _rng(draw),
        batch=draw(st.integers(1, 4)),
        next_n=draw(st.sampled_from([1, 1, 2, 3])),
        h_i=MODEL_INDEX_HEADS if model else draw(st.integers(1, p.max_heads)),
        d_i=MODEL_INDEX_DIM if model else draw(st.sampled_from([d for d in p.dims if d <= 128 and d % 4 == 0] or [8])),
        block_size=block_size,
        max_blocks=draw(st.integers(1, max(1, p.max_tokens // block_size))),
        dtype=("float8_e4m3fn" if "float8_e4m3fn" in dtypes else draw(st.sampled_from(dtypes))) if model
        else draw(st.sampled_from(dtypes)),
        spare_blocks=draw(st.sampled_from([0, 3])),
        unallocated_fraction=draw(st.sampled_from([0.0, 0.0, 0.3])),
        max_context_len=draw(st.booleans()),
        strided=draw(st.booleans()),
    )


STRATEGIES = {
    "lightning_indexer": indexer_problems,
    "topk_indices": topk_problems,
    "sparse_mla": sparse_mla_problems,
    "dsa_attention": dsa_problems,
    "sparse_mla_backward": sparse_mla_backward_problems,
    "attention_target": attention_target_problems,
    "indexer_loss": indexer_loss_problems,
    "indexer_loss_backward": indexer_loss_backward_problems,
    "lightning_indexer_paged": paged_indexer_problems,
}
