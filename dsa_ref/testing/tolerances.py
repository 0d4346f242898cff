"""The tolerance policy: how close a backend must come to the float64 reference.

Every comparison is against the reference computed in float64 **on the same inputs** (a bf16
input is compared with the reference of those exact bf16 values), so the tolerance only has to
cover the backend's own arithmetic, not the rounding of its inputs.

An element passes when ``|actual - expected| <= atol * scale + rtol * |expected|``. For scores
and attention outputs ``scale`` is the largest finite ``|expected|`` of the whole output, so
``atol`` is a fraction of the output's magnitude and tiny elements (near-cancelling sums) are
judged against the size of the whole, as their error is. For ``lse`` (a log, whose error is
absolute) ``scale`` is 1.

Why these numbers (u = unit roundoff of the type: fp32 2^-24, tf32 2^-11, fp16 2^-11, bf16 2^-8):

| input dtype | rtol | atol | what dominates the error |
| --- | --- | --- | --- |
| float64 | 1e-6 | 1e-6 | only the final rounding of the reference's float64 to float32 |
| float32 | 2e-3 | 2e-3 | float32 operands must be multiplied float32-accurately (IEEE FMA, or 3xTF32 on tensor cores); the allowance covers fp32 accumulation order and fast exp/log. Plain TF32 (10-bit mantissa) does not conform: a score or logit that cancels loses its leading digits (seen on an H100: error ratio 2 on a one-key indexer score) |
| float16 | 4e-3 | 4e-3 | attention probabilities are rounded to fp16 before the P·V product (u = 4.9e-4 each); products and sums stay in fp32 |
| bfloat16 | 2e-2 | 1.6e-2 | probabilities rounded to bf16 before P·V (u = 3.9e-3); an output is a convex mix, so its error stays a few u of max abs(V) |
| float8_e4m3fn | 2e-3 | 2e-3 | fp8 products are exact in fp32, but Hopper's fp8 tensor-core accumulator keeps ~14 mantissa bits: ~1e-4 per partial sum |

The packed FP8 KV cache (``uint8``) is compared after exact dequantization, with the tolerance
of the queries' dtype. Top-k on given scores involves no arithmetic: its sets are checked with
a score tolerance of 0 (ties included). Top-k after a backend's own indexer uses the indexer's
tolerance, since near-equal scores may legitimately swap places.

**Gradients** (``sparse_mla_backward``, ``indexer_loss_backward``) are compared the same way, each
against the largest ``|expected|`` of its own array, with :data:`GRADIENT_TOLERANCES` (twice the
forward's allowance for 16-bit inputs):

| input dtype | rtol | atol | why |
| --- | --- | --- | --- |
| float64 | 1e-6 | 1e-6 | the final rounding only |
| float32 | 2e-3 | 2e-3 | as the forward: products float32-accurate; only the summation order differs |
| float16 | 8e-3 | 8e-3 | a backward rounds twice where the forward rounds once: P *and* dS (u = 4.9e-4 each) go to fp16 before the dq / dkv products |
| bfloat16 | 4e-2 | 3.2e-2 | the same two roundings at u = 3.9e-3 |

Why the *accumulated* gradients need no looser bound. ``dkv[r]`` (and ``dk_index[r]``) sums the
contributions of every slot that read row r, over queries and heads: n terms, each with a
relative rounding error of a few u. With errors of random sign the sum's error grows like
``sqrt(n)·u·|term|``, while the scale it is judged against (the largest ``|dkv|``) grows like
``sqrt(n)·|term|`` for uncorrelated terms and like ``n·|term|`` for aligned ones: the ratio stays a
few u either way. A systematic error (a term dropped, a duplicate counted once, a sign) is a whole
``|term|``: over the bound as soon as any row has few contributions, which the strategies make
sure of (small problems, duplicates, empty rows). ``d_attn_sink`` sums over queries the same way.

**Cancellation.** A gradient can be a small difference of large terms: ``dℓ_t = P_t (dP_t − D)`` is
tiny for a row whose softmax sits on one slot, ``softmax − p`` vanishes where the indexer already
matches its target, and ``1 − f`` vanishes when the sink's logit is far below lse. An implementation
in float32 or bf16 computes such a result with an error the size of its *terms* times u, which can
be many times the result itself (seen on an H200: a bf16 dq of -1.3e-5 computed as 3.7e-4 from
terms of size ~1, and a float32 dq_index of 6e-17, a float64 rounding residue of an exact
cancellation, computed as 2.6e-8). So each gradient is judged against at least its *term scale*:
the largest root-sum-square of the terms an element is summed from (their signs and the
cancellation removed; root-sum-square, not the sum of magnitudes, because rounding errors of random
sign add up that way). Where nothing cancels the term scale is about the result's own size and
changes nothing; a systematic bug (a dropped term, a wrong scale, a missing gradient) is still a
whole term's worth of error.

Exact checks come first and need no tolerance: a row of ``kv`` that no valid slot reads (a key no
entry scores) must get exactly 0, and in deterministic mode two runs must be bitwise equal.
"""

from __future__ import annotations

from dsa_ref.backend import Backend, Tolerance

DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-6, atol=1e-6),
    "float32": Tolerance(rtol=2e-3, atol=2e-3),
    "float16": Tolerance(rtol=4e-3, atol=4e-3),
    "bfloat16": Tolerance(rtol=2e-2, atol=1.6e-2),
    "float8_e4m3fn": Tolerance(rtol=2e-3, atol=2e-3),
}


GRADIENT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-6, atol=1e-6),
    "float32": Tolerance(rtol=2e-3, atol=2e-3),
    "float16": Tolerance(rtol=8e-3, atol=8e-3),
    "bfloat16": Tolerance(rtol=4e-2, atol=3.2e-2),
}


def gradient_tolerance_for(dtype: str, backend: Backend | None = None) -> Tolerance:
    """The tolerance of a backend's gradients for inputs of ``dtype``: its own
    ``gradient_tolerances`` declaration if it has one, else :data:`GRADIENT_TOLERANCES`."""
    declared = getattr(backend, "gradient_tolerances", {}) if backend is not None else {}
    if dtype in declared:
        return declared[dtype]
    if dtype not in GRADIENT_TOLERANCES:
        raise ValueError(f"dtype={dtype!r} has no gradient tolerance (known: {', '.join(GRADIENT_TOLERANCES)})")
    return GRADIENT_TOLERANCES[dtype]


def tolerance_for(dtype: str, backend: Backend | None = None) -> Tolerance:
    """The tolerance a backend's outputs meet for inputs of ``dtype``: the backend's own
    declaration if it has one (it may only be stricter in spirit; the kit does not check), else
    the default policy above."""
    if backend is not None and dtype in backend.tolerances:
        return backend.tolerances[dtype]
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"dtype={dtype!r} has no tolerance (known: {', '.join(DEFAULT_TOLERANCES)})")
    return DEFAULT_TOLERANCES[dtype]
