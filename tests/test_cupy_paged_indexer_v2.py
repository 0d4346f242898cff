"""The CuPy backend's second paged fp8 indexer on Hopper's wgmma (``indexer_paged_wgmma_v2_q1/_q2`` in
backends/cupy_cuda/csrc/indexer_wgmma_v2.cu, ``CupyBackend.paged_indexer_wgmma_v2``, off by default).

On the CPU: the switch (off by default, the attribute and DSA_REF_CUPY_PAGED_INDEXER_V2), the kernels listed
for the compile, the sm_90a compile itself (no spills, no serialized wgmma, registers and shared memory that
give the blocks an SM the design counts on), what the design claims of the SASS (every step's product
issued from a loop unrolled whole, one product left in flight under the epilogue, the ReLU as max.NaN, no
compare-and-select ReLU and no division in the loop), and the host's shared-memory sizes against the
kernel's constants. On a GPU (``@pytest.mark.gpu``, sm_90 only): against the float64 reference on ragged
batches with holes, next_n 1-3, few heads, blocks of 128, a result wider than the table, strided inputs, a
NaN key with 4 heads; against ``indexer_paged_wgmma`` at the decode step's size (b 64, T 128K); and that the
launches are the ones the switch names.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cupy_hopper import hopper_backend
from cupy_launches import record_launches
from dsa_ref_backends import kernel_switch
from dsa_ref_backends.cupy_cuda import backend as cupy_backend
from dsa_ref_backends.cupy_cuda import compile_check, kernels

pytest.register_assert_rewrite("cupy_indexer_problems")  # its asserts report as this file's do
from cupy_indexer_problems import PAGED_WGMMA_CASES, check_paged_scores, nan_key_problem, paged_problem  # noqa: E402

SOURCE_NAME = "indexer_wgmma_v2.cu"
SOURCE = Path(cupy_backend.__file__).resolve().parent / "csrc" / SOURCE_NAME
KERNELS = ("indexer_paged_wgmma_v2_q1", "indexer_paged_wgmma_v2_q2")
#: Blocks an SM each instance is written for (its __launch_bounds__), and its product's shape.
BLOCKS_PER_SM = {"indexer_paged_wgmma_v2_q1": 4, "indexer_paged_wgmma_v2_q2": 2}
SHAPE = {"indexer_paged_wgmma_v2_q1": "QGMMA.64x64x32.F32.E4M3.E4M3",
         "indexer_paged_wgmma_v2_q2": "QGMMA.64x128x32.F32.E4M3.E4M3"}
H100_SMEM_PER_SM = 228 * 1024  # bytes an SM has; each block also reserves 1 KB
REGISTERS_PER_SM = 65536


def _constants() -> dict[str, int]:
    return {name: int(value) for name, value in re.findall(r"constexpr int (\w+) = (\d+);", SOURCE.read_text())}


# ----------------------------------------------------------------------------- switch and listing
def test_the_switch_is_on_by_default_and_the_variable_turns_it_off_and_on(monkeypatch):
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER_V2", raising=False)
    backend = cupy_backend.CupyBackend()
    assert backend.paged_indexer_wgmma_v2 is True
    assert kernel_switch(backend.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2")
    backend.paged_indexer_wgmma_v2 = False
    assert not kernel_switch(backend.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2")
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "1")
    assert kernel_switch(backend.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2")
    backend.paged_indexer_wgmma_v2 = True
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "0")
    assert not kernel_switch(backend.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2")


def test_the_wrapper_reads_the_switch_where_it_launches_the_wgmma_kernel():
    import inspect

    text = inspect.getsource(cupy_backend.CupyBackend.lightning_indexer_paged)
    assert 'kernel_switch(self.paged_indexer_wgmma_v2, "DSA_REF_CUPY_PAGED_INDEXER_V2")' in text
    assert '"indexer_wgmma_v2.cu", f"indexer_paged_wgmma_v2_q{queries}"' in text


def test_its_kernels_are_listed_for_sm90a_with_their_sass_checks():
    assert kernels.KERNELS[SOURCE_NAME] == KERNELS
    assert kernels.SOURCE_ARCHITECTURES[SOURCE_NAME] == "sm_90a"
    assert set(SHAPE.values()) | {"FMNMX.NAN"} <= set(compile_check.REQUIRED_SASS[(SOURCE_NAME, "sm_90a")])
    per_kernel = compile_check.REQUIRED_KERNEL_SASS[(SOURCE_NAME, "sm_90a")]
    for name in KERNELS:
        assert SHAPE[name] in per_kernel[name] and "FMNMX.NAN" in per_kernel[name]


def test_the_host_asks_for_the_shared_memory_the_kernel_lays_out():
    constant = _constants()
    keys, row = constant["KEYS"], constant["ROW"]
    for queries, stages in ((1, constant["STAGES_Q1"]), (2, constant["STAGES_Q2"])):
        expected = 64 * queries * row + stages * (keys * row + keys * 4) + 1024
        assert cupy_backend.INDEXER_WGMMA_V2_SMEM[queries] == expected
    assert cupy_backend.INDEXER_WGMMA_V2_POSITIONS == constant["STEPS"] * keys
    for name, queries in zip(KERNELS, (1, 2)):  # the blocks an SM the launch bounds name fit its shared memory
        assert BLOCKS_PER_SM[name] * (cupy_backend.INDEXER_WGMMA_V2_SMEM[queries] + 1024) <= H100_SMEM_PER_SM
    text = SOURCE.read_text()
    assert "__launch_bounds__(indexer_wgmma_v2::THREADS, 4)\nindexer_paged_wgmma_v2_q1" in text
    assert "__launch_bounds__(indexer_wgmma_v2::THREADS, 2)\nindexer_paged_wgmma_v2_q2" in text


# ----------------------------------------------------------------------------- compile and SASS
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc = compile_check.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (tests/test_cuda_compile.py fails on that)")
    result = compile_check.compile_source(nvcc, SOURCE_NAME, "sm_90a", tmp_path_factory.mktemp("indexer_v2"))
    assert result.returncode == 0, result.log
    if result.sass is None:
        pytest.skip("cuobjdump not found (tests/test_cuda_compile.py fails on that)")
    return result


def _function_sass(compiled, name) -> list[str]:
    body = compile_check.kernel_sass(compiled.sass, name)
    assert body is not None, f"no {name} in the SASS"
    return [line for line in body.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]


def test_compiles_without_spills_or_serialized_wgmma(compiled):
    usage = {u.name: u for u in compiled.usages}
    assert set(usage) == set(KERNELS), compiled.log
    for name in KERNELS:
        assert not usage[name].spills, compiled.report()
        # The registers that give the blocks an SM the launch bounds ask for (allocated by 8 a thread).
        assert BLOCKS_PER_SM[name] * 128 * (-(-usage[name].registers // 8) * 8) <= REGISTERS_PER_SM
    assert "C7514" not in compiled.log and "C7515" not in compiled.log and "serialized" not in compiled.log, \
        compiled.log


def test_the_committed_resource_report_matches_the_compile(compiled):
    report = compile_check.report_path(SOURCE_NAME, "sm_90a").read_text()
    for usage in compiled.usages:
        line = next(line for line in report.splitlines() if line.startswith(usage.name + " "))
        assert int(line.split()[1]) == usage.registers, f"refresh {compile_check.report_path(SOURCE_NAME, 'sm_90a')}"


@pytest.mark.parametrize("name", KERNELS)
def test_sass_shows_the_design(compiled, name):
    lines = _function_sass(compiled, name)
    text = "\n".join(lines)
    steps = _constants()["STEPS"]
    # Every step's four k32 products, from a loop unrolled whole (a rolled loop would show 4 or 8).
    assert text.count(SHAPE[name]) == 4 * steps
    # The ping-pong: waits that leave the next step's product in flight under the epilogue.
    assert text.count("WARPGROUP.DEPBAR.LE gsb0, 0x1") >= steps - 1
    # The epilogue's ReLU is one max.NaN an accumulator element (32 or 64 a step), and no compare-and-select.
    elements = 32 if name.endswith("q1") else 64
    assert text.count("FMNMX.NAN") == elements * steps
    assert "FSETP.GEU" not in text
    # The pages come from one division at the start (I2F.RP + MUFU.RCP is nvcc's integer division).
    assert text.count("I2F.RP") <= 1 and text.count("MUFU.RCP") <= 1
    # Four key copies a thread a step, plus the queries' and the scales' (five of 16 threads).
    assert text.count("LDGSTS") >= 4 * steps
    # A step (from one barrier to the next) is under a third of indexer_paged_wgmma's 586 / 749 instructions.
    barriers = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16) for line in lines if "BAR.SYNC" in line]
    assert len(barriers) == steps
    step_lengths = [(b - a) // 16 for a, b in zip(barriers[1:], barriers[2:])]
    assert max(step_lengths) <= (200 if name.endswith("q1") else 290), step_lengths


# ----------------------------------------------------------------------------- GPU
#: The first kernel's cases under names of their own (a name's length seeds the problem), and more.
CASES = {
    "one-query": PAGED_WGMMA_CASES["v32-one-query"],
    "one-query-ragged-holes": dict(batch=5, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=37,
                                   unallocated_fraction=0.1, spare_blocks=2),
    "two-queries-holes": PAGED_WGMMA_CASES["v32-two-queries-holes"],
    "three-queries-two-groups": PAGED_WGMMA_CASES["three-queries-two-groups"],
    "few-heads-blocks-of-128": PAGED_WGMMA_CASES["few-heads-blocks-of-128"],
    "odd-heads-two-queries": dict(batch=3, next_n=2, h_i=33, d_i=128, block_size=64, max_blocks=7),
    "wide-result": PAGED_WGMMA_CASES["wide-result"],
    "many-runs": PAGED_WGMMA_CASES["many-chunks"],
    "one-head": dict(batch=2, next_n=1, h_i=1, d_i=128, block_size=64, max_blocks=17),
}


def _v2_backend(monkeypatch):
    backend = hopper_backend("indexer_paged_wgmma_v2")
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER_V2", raising=False)
    monkeypatch.delenv("DSA_REF_CUPY_PAGED_INDEXER_WGMMA", raising=False)
    backend.paged_indexer_wgmma = True
    backend.paged_indexer_wgmma_v2 = True
    backend.poison_outputs = True  # an element the kernel forgets stays NaN
    return backend, record_launches(monkeypatch)


def _check(problem, backend, launched, queries):
    check_paged_scores(problem, backend, launched, f"indexer_paged_wgmma_v2_q{queries}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("strided", [False, True])
def test_v2_matches_the_reference(name, strided, monkeypatch):
    backend, launched = _v2_backend(monkeypatch)
    problem, queries = paged_problem(CASES[name], 100 + len(name), strided=strided)
    _check(problem, backend, launched, queries)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2])
def test_a_nan_key_poisons_its_own_scores_and_no_other(next_n, monkeypatch):
    """A NaN byte in one key gives NaN at that key's position for every query that sees it, with 4 of the
    64 head columns in use: the absent heads' 0 x NaN is no select away, and must change nothing."""
    backend, launched = _v2_backend(monkeypatch)
    _check(nan_key_problem(next_n), backend, launched, next_n)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2])
def test_v2_agrees_with_the_current_kernel_at_the_decode_size(next_n, monkeypatch):
    """b 64, T 128K, h_i 64 (the decode step's indexer, bench.decode_step_inputs): against
    indexer_paged_wgmma, which is verified against the reference; the same -inf pattern, sums that differ
    only by float32 order."""
    torch = pytest.importorskip("torch")
    import dsa_ref.torch as dsa_torch
    from dsa_ref_backends.bench import decode_step_inputs

    _, launched = _v2_backend(monkeypatch)  # the op looks the backend up by name: the variable routes it
    inputs = decode_step_inputs(torch, 64, 131072, next_n=next_n, generator=torch.Generator("cuda").manual_seed(5))
    args = (inputs["q_index"], inputs["weights"], inputs["index_cache"], inputs["block_table"], inputs["context_lens"])
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "0")
    current = dsa_torch.lightning_indexer_paged(*args, next_n=next_n, backend="cupy")
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "1")
    got = dsa_torch.lightning_indexer_paged(*args, next_n=next_n, backend="cupy")
    queries = 1 if next_n == 1 else 2
    assert [n for n in launched if "indexer" in n] == [f"indexer_paged_wgmma_q{queries}",
                                                       f"indexer_paged_wgmma_v2_q{queries}"], launched
    assert torch.equal(torch.isneginf(got), torch.isneginf(current))
    assert not torch.isnan(got).any()
    finite = torch.isfinite(current)
    scale = current[finite].abs().max()
    assert ((got[finite] - current[finite]).abs().max() / scale).item() < 1e-5


@pytest.mark.gpu
def test_the_environment_variable_routes_a_default_backend(monkeypatch):
    from dsa_ref.testing import problems

    backend, launched = _v2_backend(monkeypatch)
    backend.paged_indexer_wgmma_v2 = False
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "1")
    problem = problems.paged_indexer_problem(np.random.default_rng(9), batch=2, next_n=1, h_i=64, d_i=128,
                                             block_size=64, max_blocks=3)
    _check(problem, backend, launched, 1)
    launched.clear()
    monkeypatch.setenv("DSA_REF_CUPY_PAGED_INDEXER_V2", "0")
    import dsa_ref

    dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend)
    assert [n for n in launched if "indexer" in n] == ["indexer_paged_wgmma_q1"], launched
