"""The Triton backend's sampled-cut top-k (``topk_radix``), opt-in until the conformance kit passes it on the GPU.

On the CPU interpreter (or a GPU): the reference's exact set, ties by the lower index included
(the spec's rule, which the two-pass path relies on), on normal rows, heavy ties, plateaus at the
cut, masked and NaN keys, rows with fewer selectable keys than topk, topk >= s_kv, topk 1, odd
lengths and strided input; that each of the kernel's three steps (2a: the threshold above the cut,
2b: the threshold at the cut, 2c: the radix select over the row when the sample misjudges it) is
taken where it should be. Its sm_90 compile (no spills, in a child process without the
interpreter), the backend's switch, and on a GPU the issue's two shapes against the one-pass kernel.
Shapes are kept small: the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from triton_ptxas import ptxas_usage, run_compiled_report

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from dsa_ref import reference  # noqa: E402
from dsa_ref.testing.assertions import check_topk  # noqa: E402
from dsa_ref_backends.torch_triton import topk as topk_onepass  # noqa: E402
from dsa_ref_backends.torch_triton import topk_radix  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402

#: The Triton release of the GPU machine (the Makefile's TRITON_PIN), whose compile the kernel is tuned on.
GPU_TRITON_RELEASE = "3.6"

# A sample of 256 keys in 8 runs and blocks of 256: rows of a few thousand keys take the sampled cut
# and several blocks, as 32768-key rows do with the defaults.
SMALL = dict(SAMPLE=256, BLOCK=256, BLOCK_K=64)
STEP_2A, STEP_2B, STEP_2C = 0, 1, 2


def _device():
    if torch.cuda.is_available():
        return "cuda"
    if not interpreter_enabled():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a CUDA GPU")
    return "cpu"


def _select(scores: np.ndarray, topk: int, config=None):
    """(indices, step of each row) of the kernel on ``scores``, checked against the reference's exact set."""
    device = _device()
    tensor = torch.from_numpy(np.ascontiguousarray(scores)).to(device)
    steps = torch.full((scores.shape[0],), -1, dtype=torch.int32, device=device)
    got = topk_radix.topk_indices(tensor, topk, config=config, paths=steps).cpu().numpy()
    _assert_reference_set(got, scores, topk)
    return got, steps.cpu().numpy()


def _assert_reference_set(got: np.ndarray, scores: np.ndarray, topk: int) -> None:
    check_topk(got, scores, topk)
    expected = reference.topk_indices(scores, topk)
    for row, (got_row, expected_row) in enumerate(zip(got, expected)):
        assert sorted(got_row.tolist()) == sorted(expected_row.tolist()), f"row {row}: ties keep the lower index"


def _rows(kind: str, rows: int, s_kv: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, s_kv)).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores * 4) / 4  # ~30 distinct values: a tie at every threshold
    elif kind == "masked":
        scores[rng.random(scores.shape) < 0.4] = -np.inf
        scores[0, 7:] = -np.inf  # 7 selectable keys, fewer than topk
        scores[1, ::5] = np.nan
        scores[1, 3] = np.inf  # selectable, first
        scores[2, :] = -np.inf
        scores[2, 1::97] = -0.0  # ties with +0.0: equal keys
        scores[2, 2::97] = 0.0
        scores[3:, :] = -np.inf  # nothing selectable: all -1
    elif kind == "plateau":
        scores = np.maximum(scores, 0.0)  # ReLU: about half the row ties at 0, around the cut
        scores[0] = 1.5  # one value everywhere
    return scores


@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "plateau"])
@pytest.mark.parametrize(("s_kv", "topk"), [(3000, 40), (2049, 200), (1537, 1)])  # odd lengths, topk 1
def test_sampled_cut_gives_the_references_set(kind, s_kv, topk):
    _select(_rows(kind, 4, s_kv, seed=s_kv + topk + len(kind)), topk, SMALL)


@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "plateau"])
def test_a_row_shorter_than_the_sample_is_its_own_sample(kind):
    """The default sample (2048) covers the row: the cut is the threshold itself (step 2b), or the
    lowest key when the row has fewer selectable keys than topk."""
    scores = _rows(kind, 3, 700, seed=len(kind))
    _, steps = _select(scores, 50)
    assert (steps == STEP_2B).all(), steps


@pytest.mark.parametrize(("s_kv", "topk"), [(50, 64), (64, 64), (300, 1000), (1000, 1000)])
def test_topk_at_least_the_row_takes_every_selectable_key(s_kv, topk):
    scores = _rows("masked", 3, s_kv, seed=s_kv)
    got, _ = _select(scores, topk, SMALL)
    assert ((got >= 0).sum(axis=1) == np.isfinite(scores).sum(axis=1) + np.isposinf(scores).sum(axis=1)).all()


def test_each_step_is_taken_where_it_should_be():
    """Normal rows longer than the sample: the threshold above the cut (2a). A row whose sampled
    runs hold its largest keys puts the cut too high, one whose runs hold its smallest too low: the
    radix select over the row (2c), still exact."""
    s_kv, topk, sample = 4096, 64, SMALL["SAMPLE"]
    scores = _rows("normal", 3, s_kv, seed=5)
    runs = sample // 32
    sampled = (np.arange(runs)[:, None] * s_kv // runs // 32 * 32 + np.arange(32)[None, :]).ravel()
    scores[1, sampled] = 10.0 + np.abs(scores[1, sampled])  # the sample's top is the row's top: cut too high
    scores[2, sampled] = -10.0 - np.abs(scores[2, sampled])  # every other key above the cut: more than CAP
    _, steps = _select(scores, topk, SMALL)
    assert steps.tolist() == [STEP_2A, STEP_2C, STEP_2C]


def test_a_plateau_at_the_cut_takes_its_first_keys():
    """A row of mostly one value: the cut lands on it, the keys above it are fewer than topk, and the
    first keys of the plateau in index order fill the rest (2b), from a second read of the row."""
    s_kv, topk = 4000, 100
    rng = np.random.default_rng(2)
    scores = np.full((2, s_kv), 0.25, np.float32)
    scores[:, rng.choice(s_kv, 60, replace=False)] = 1.0 + rng.random(60, dtype=np.float32)  # 60 above
    scores[1, ::3] = -1.0
    _, steps = _select(scores, topk, SMALL)
    assert (steps == STEP_2B).all(), steps


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tight_scratch_row_keeps_its_a_keys(seed):
    """CAP 64 for topk 40 on tied scores: little room above the cut, ties at T in step 2a and at the
    cut in step 2b, and rows past CAP in step 2c."""
    scores = np.round(_rows("normal", 6, 3000, seed=seed) * 3) / 3
    _, steps = _select(scores, 40, dict(SMALL, CAP=64))
    assert (steps == STEP_2A).any(), steps


def test_ties_among_the_candidates_keep_the_lower_index():
    """Step 2a with the threshold on a value shared by many A keys, spread over several blocks."""
    s_kv, topk = 4096, 300
    scores = np.round(_rows("normal", 2, s_kv, seed=11) * 8) / 8
    _, steps = _select(scores, topk, SMALL)
    assert (steps == STEP_2A).all(), steps


def test_strided_and_non_contiguous_input():
    device = _device()
    wide = torch.from_numpy(_rows("ties", 3, 6000, seed=3)).to(device)
    rows_strided = wide[:, 1000:4001]  # row stride 6000, 3001 keys
    got = topk_radix.topk_indices(rows_strided, 77, config=SMALL).cpu().numpy()
    _assert_reference_set(got, rows_strided.cpu().numpy(), 77)
    columns = wide.t()[::2].t()[:, :1500]  # column stride 2: copied to unit stride
    got = topk_radix.topk_indices(columns, 33, config=SMALL).cpu().numpy()
    _assert_reference_set(got, columns.cpu().numpy(), 33)
    half = wide[:2, :2500].to(torch.bfloat16)  # widened to float32 exactly
    got = topk_radix.topk_indices(half, 20, config=SMALL).cpu().numpy()
    _assert_reference_set(got, half.float().cpu().numpy(), 20)


def test_out_view_and_empty_shapes():
    device = _device()
    scores = torch.from_numpy(_rows("normal", 2, 500, seed=1)).to(device)
    out = torch.full((2, 40), 7, dtype=torch.int32, device=device)
    topk_radix.topk_indices(scores, 16, out=out[:, 8:24])
    _assert_reference_set(out[:, 8:24].cpu().numpy(), scores.cpu().numpy(), 16)
    assert (out[:, :8] == 7).all() and (out[:, 24:] == 7).all()
    assert topk_radix.topk_indices(scores[:0], 16).shape == (0, 16)


def test_two_passes_with_this_kernel_give_the_references_set():
    """topk.topk_indices_in_chunks with this kernel for both passes: exact, ties included (each pass
    writes a chunk's keys of one score in index order)."""
    device = _device()
    for kind in ("ties", "masked"):
        scores = _rows(kind, 4, 2200, seed=len(kind))
        got = topk_radix.topk_indices_in_chunks(torch.from_numpy(scores).to(device), 24, 512).cpu().numpy()
        _assert_reference_set(got, scores, 24)


def test_large_topk_goes_to_the_one_pass_kernel(monkeypatch):
    taken = []
    monkeypatch.setattr(topk_onepass, "topk_indices", lambda scores, topk, out=None: taken.append(topk))
    topk_radix.topk_indices(torch.zeros((1, 100)), topk_radix.MAX_CAP // 2 + 1)
    assert taken == [topk_radix.MAX_CAP // 2 + 1]
    assert topk_radix.applies(topk_radix.MAX_CAP // 2) and topk_radix.scratch_slots(2048) == 4096


# --------------------------------------------------------------------------- the backend's switch


def test_the_backend_runs_it_by_default_and_its_switch_turns_it_off(monkeypatch):
    from dsa_ref_backends.torch_triton import backend as triton_backend

    calls = []
    monkeypatch.setattr(topk_radix, "topk_indices", lambda scores, topk: calls.append("radix") or "radix")
    monkeypatch.setattr(topk_radix, "topk_indices_in_chunks", lambda scores, topk, chunk: "radix, two passes")
    monkeypatch.setattr(topk_onepass, "topk_indices", lambda scores, topk: "one pass")
    monkeypatch.delenv("DSA_REF_TRITON_RADIX_TOPK", raising=False)
    monkeypatch.delenv("DSA_REF_TRITON_CHUNKED_TOPK", raising=False)
    assert triton_backend.TritonBackend.radix_topk is True  # the default since the kit passed it on the GPU
    backend = triton_backend.TritonBackend()
    scores = torch.zeros((2, 1000))
    assert backend.topk_indices(scores, 16) == "radix" and calls == ["radix"]
    assert backend.topk_indices(torch.zeros((2, 40000)), 16) == "radix, two passes"  # few long rows
    monkeypatch.setenv("DSA_REF_TRITON_RADIX_TOPK", "0")
    assert backend.topk_indices(scores, 16) == "one pass"
    monkeypatch.setenv("DSA_REF_TRITON_RADIX_TOPK", "1")
    backend.radix_topk = False
    assert backend.topk_indices(scores, 16) == "radix"
    monkeypatch.delenv("DSA_REF_TRITON_RADIX_TOPK")
    assert backend.topk_indices(scores, 16) == "one pass"


# --------------------------------------------------------------------------- sm_90 compile

COMPILE_CASES = [(32768, 2048), (131072, 2048), (16384, 2048), (32768, 1)]  # (s_kv, topk)


def _compile_radix() -> dict[str, dict[str, int]]:
    """Registers, spills and shared memory of each case's kernel, compiled for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = topk_radix._radix_topk_kernel
    used = {}
    for s_kv, topk in COMPILE_CASES:
        config = topk_radix.radix_topk_config(s_kv, topk)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        constants = dict(RECORD_PATH=False, **config)
        signature = {name: "constexpr" if name in constants else
                     "*fp32" if name == "p_scores" else "*i64" if name == "p_cand" else
                     "*i32" if name.startswith("p_") else "i32" for name in kernel.arg_names}
        # As launched: torch's allocations are 16-byte aligned and these lengths and strides multiples of 16.
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                   if name.startswith(("p_", "stride_")) or name == "s_kv"}
        source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        ptx = compiled.asm["ptx"]
        used[f"{s_kv}-{topk}"] = dict(shared=compiled.metadata.shared, warps=warps, **ptxas_usage(ptx),
                                      vector_loads=ptx.count("ld.global.v4"))
    return used


@pytest.fixture(scope="module")
def compiled_radix() -> dict[str, dict[str, int]]:
    return run_compiled_report(__file__)


@pytest.mark.parametrize("case", [f"{s_kv}-{topk}" for s_kv, topk in COMPILE_CASES])
def test_sm90_compile_has_no_spills(compiled_radix, case):
    usage = compiled_radix[case]
    assert usage["spill_lines"] > 0, usage
    # No spills with the GPU machine's Triton; newer releases' code generation differs (Triton 3.9 puts 8
    # bytes on the stack at topk 1), and the kernel is tuned for the one that runs it.
    if triton.__version__.startswith(GPU_TRITON_RELEASE + "."):
        assert usage["spill_bytes"] == 0, usage
    # At least four programs an SM by registers (the register file's 64K), for the latency of the one read
    assert usage["registers"] * 32 * usage["warps"] * 4 <= 65536, usage
    assert usage["shared"] <= 16384, usage
    assert usage["vector_loads"] >= 2, usage  # the row is read 16 bytes a load (and the next block too)


# --------------------------------------------------------------------------- GPU


def _gpu_case(rows: int, s_kv: int, topk: int, masked_tail: int = 0):
    torch.manual_seed(0)
    scores = torch.randn(rows, s_kv, device="cuda")
    if masked_tail:
        scores[:, s_kv - masked_tail:] = float("-inf")
    got = topk_radix.topk_indices(scores, topk)
    expected = topk_onepass.topk_indices(scores, topk)
    torch.cuda.synchronize()
    assert torch.equal(torch.sort(got, dim=1).values, torch.sort(expected, dim=1).values)
    check_topk(got[:64].cpu().numpy(), scores[:64].cpu().numpy(), topk)
    return scores


@pytest.mark.gpu
def test_gpu_4096_rows_of_32768():
    scores = _gpu_case(4096, 32768, 2048)
    steps = torch.full((4096,), -1, dtype=torch.int32, device="cuda")
    topk_radix.topk_indices(scores, 2048, paths=steps)
    assert (steps == STEP_2A).float().mean().item() > 0.99  # the sampled cut holds on normal rows


@pytest.mark.gpu
def test_gpu_64_rows_of_131072_in_one_pass_and_in_two():
    scores = _gpu_case(64, 131072, 2048, masked_tail=31072)
    chunk = topk_onepass.chunked_topk_plan(64, 131072, 2048, torch.cuda.get_device_properties(0).multi_processor_count)
    two = topk_radix.topk_indices_in_chunks(scores, 2048, chunk)
    one = topk_onepass.topk_indices(scores, 2048)
    assert torch.equal(torch.sort(two, dim=1).values, torch.sort(one, dim=1).values)


@pytest.mark.gpu
def test_gpu_causal_rows_and_ties():
    torch.manual_seed(1)
    s_kv = 8192
    scores = torch.round(torch.randn(512, s_kv, device="cuda") * 16) / 16
    scores = scores.masked_fill(torch.ones(512, s_kv, device="cuda", dtype=torch.bool).triu(1 + s_kv - 512),
                                float("-inf"))
    got = topk_radix.topk_indices(scores, 2048)
    check_topk(got.cpu().numpy(), scores.cpu().numpy(), 2048)
    _assert_reference_set(got[:8].cpu().numpy(), scores[:8].cpu().numpy(), 2048)


if __name__ == "__main__":
    print(json.dumps(_compile_radix()))


def test_the_kernel_never_takes_topk_as_a_constant():
    """Triton passes an int argument equal to 1 as a constant unless told not to; the kernel's
    ``topk.to(tl.int64)`` does not compile on a constant (the conformance kit's topk=1 found it on
    the H200). The interpreter passes no constants (and its kernels have no parameter list), so this
    is checked on the decorator the source gives the kernel."""
    import inspect

    source = inspect.getsource(topk_radix)
    assert '@triton.jit(do_not_specialize=["topk"])\ndef _radix_topk_kernel(' in source
