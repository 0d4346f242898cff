"""Conformance profiles: how many examples per op and how large they get.

Kept apart from the strategies so that ``dsa-ref check --help`` can describe them without
hypothesis installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """How many examples per op and how large they get."""

    name: str
    max_examples: int
    max_tokens: int
    max_heads: int
    dims: tuple[int, ...]
    derandomize: bool
    #: Head counts of the model's own shapes. Where given, a quarter of the examples of each op take
    #: DeepSeek-V3.2's shapes instead of small random ones: attention with one of these head counts at
    #: d_qk 576 / d_v 512 in bf16 (or the packed FP8 cache), the indexer with 64 heads of 128 in fp8.
    #: Those are the shapes the Hopper kernels run (h a multiple of 64, d_i 128), which up to
    #: ``max_heads`` random heads never reach.
    model_heads: tuple[int, ...] = ()

    def describe(self) -> str:
        model = (f", a quarter at the model's shapes (h {' or '.join(map(str, self.model_heads))}, d_qk 576)"
                 if self.model_heads else "")
        return (f"{self.max_examples} examples per op, up to {self.max_tokens} tokens and {self.max_heads} heads, "
                f"head dims {', '.join(map(str, self.dims))}{model}, "
                f"{'fixed seed' if self.derandomize else 'new examples every run'}")


PROFILES = {
    # Fast enough for every push, on 2 CPU cores, interpreters included; fixed seed: CI is repeatable.
    "ci": Profile("ci", max_examples=30, max_tokens=40, max_heads=4, dims=(1, 3, 8, 16, 19, 32, 40),
                  derandomize=True),
    # Before a release or after touching a kernel: >= 1000 examples per op, up to real head widths.
    "thorough": Profile("thorough", max_examples=1000, max_tokens=160, max_heads=16,
                        dims=(1, 3, 8, 16, 19, 32, 40, 64, 128, 576), derandomize=False, model_heads=(64, 128)),
}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]
