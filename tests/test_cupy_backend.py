"""The cupy backend: host-side logic on any machine, kernels against the reference on a GPU.

CPU part (< 1 s): dtype carriers, refusals with reasons, the fp8 fragment permutation and the
e4m3 tables. GPU part (``@pytest.mark.gpu``): every op and kernel path against the float64
reference with outputs poisoned by NaN, bitwise repeatability, and the conformance kit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from dsa_ref_backends.cupy_cuda import CupyBackend, kernels, logical_dtype


# ----------------------------------------------------------------------------- CPU
def test_logical_dtype_of_host_arrays():
    assert logical_dtype(np.zeros((2, 3), ml_dtypes.bfloat16)) == "bfloat16"
    assert logical_dtype(np.zeros((2, 3), ml_dtypes.float8_e4m3fn)) == "float8_e4m3fn"
    assert logical_dtype(np.zeros((4, 656), np.uint8), kv=True) == "uint8"
    assert logical_dtype(np.zeros((4, 576), np.float32), kv=True) == "float32"


def test_refusals_carry_the_offending_value():
    reasons = CupyBackend().not_supported_reasons("sparse_mla", q=np.zeros((2, 3, 8)), kv=np.zeros((5, 8), np.float32),
                                                  indices=np.zeros((2, 4), np.int32))
    assert any("q.dtype=float64" in r and "bfloat16" in r for r in reasons), reasons
    reasons = CupyBackend().not_supported_reasons("topk_indices", scores=np.zeros((2, 3)))
    assert any("scores.dtype=float64" in r for r in reasons), reasons
    assert any("op='nope'" in r for r in CupyBackend().not_supported_reasons("nope"))


def test_e4m3_tables_are_exact():
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = np.isfinite(values)
    assert np.array_equal(kernels.E4M3_TO_FLOAT32[finite].astype(np.float64), values[finite])
    assert np.isnan(kernels.E4M3_TO_FLOAT32[~finite]).all() and (~finite).sum() == 2
    as_f16 = kernels.E4M3_TO_FLOAT16_BITS.view(np.float16).astype(np.float64)
    assert np.array_equal(as_f16[finite], values[finite])


@pytest.mark.parametrize("d_i", [32, 64, 128, 256])
def test_query_permutation_matches_widened_fp8_fragments(d_i):
    """f16 k-slot s of a 16-dim half must hold the dim that the widened fp8 key fragment puts there:
    thread t's slots 2t, 2t+1, 2t+8, 2t+9 carry dims 4t, 4t+1, 4t+2, 4t+3 (indexer.cu)."""
    order = kernels.query_permutation(d_i)
    assert sorted(order.tolist()) == list(range(d_i))
    for base in range(0, d_i, 32):
        for half in range(2):
            for t in range(4):
                slots = base + 16 * half + np.array([2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9])
                assert order[slots].tolist() == [base + 16 * half + 4 * t + e for e in range(4)]


def test_kernel_list_matches_sources():
    for source, names in kernels.KERNELS.items():
        text = kernels.source_text(source)
        for name in names:
            assert name.split("<")[0] in text, (source, name)


# ----------------------------------------------------------------------------- GPU
def _backend():
    pytest.importorskip("cupy")
    pytest.importorskip("torch")
    backend = CupyBackend()
    if backend.unavailable_reasons():
        pytest.skip("; ".join(backend.unavailable_reasons()))
    backend.poison_outputs = True
    return backend


class _TorchCuda:
    """Hands problems to the public ops as torch CUDA tensors: torch has real bf16 / fp8 dtypes, so
    the ops' dtype checks see the logical dtype, and the backend takes them through DLPack."""

    @staticmethod
    def to_native(x):
        from dsa_ref import interop

        return interop.convert(x, "torch", "cuda")


def _on_gpu(problem):
    problem.native_inputs = lambda backend, problem=problem: type(problem).native_inputs(problem, _TorchCuda())
    return problem


def _problems():
    from dsa_ref.testing import problems

    rng = np.random.default_rng(0)
    out = [
        problems.indexer_problem(rng, s_q=37, s_kv=300, h_i=64, d_i=128, dtype="bfloat16", ranges="causal"),
        problems.indexer_problem(rng, s_q=19, s_kv=333, h_i=5, d_i=32, dtype="float16", ranges="ragged",
                                 empty_fraction=0.3, strided=True),
        problems.indexer_problem(rng, s_q=33, s_kv=517, h_i=64, d_i=128, dtype="float8_e4m3fn", ranges="causal"),
        problems.indexer_problem(rng, s_q=9, s_kv=70, h_i=3, d_i=19, dtype="float32", ranges="ragged", plateau=True),
        problems.indexer_problem(rng, s_q=9, s_kv=70, h_i=3, d_i=19, dtype="bfloat16", ranges="full"),
        problems.topk_problem(rng, s_q=16, s_kv=5000, topk=2048, plateau=True, nan_fraction=0.05),
        problems.topk_problem(rng, s_q=8, s_kv=70001, topk=2048, masked_fraction=0.5),
        problems.topk_problem(rng, s_q=8, s_kv=37, topk=64, masked_fraction=0.9, strided=True),
        problems.sparse_mla_problem(rng, s_q=9, s_kv=700, h=128, d_qk=576, d_v=512, topk=256, dtype="bfloat16",
                                    invalid_fraction=0.1, duplicate_fraction=0.2, topk_length=True, attn_sink=True),
        problems.sparse_mla_problem(rng, s_q=5, s_kv=300, h=20, d_qk=576, d_v=512, topk=100, dtype="bfloat16",
                                    packed_fp8=True, invalid_fraction=0.5, strided=True),
        problems.sparse_mla_problem(rng, s_q=4, s_kv=50, h=3, d_qk=40, d_v=19, topk=33, dtype="float32",
                                    invalid_fraction=1.0),
        problems.sparse_mla_problem(rng, s_q=4, s_kv=50, h=3, d_qk=40, d_v=40, topk=33, dtype="float16",
                                    logit_scale=4.0),
        problems.dsa_problem(rng, s_q=40, s_kv=64, h=16, d_qk=576, d_v=512, h_i=8, d_i=64, topk=16,
                             dtype="bfloat16", index_dtype="float8_e4m3fn"),
    ]
    return [_on_gpu(problem) for problem in out]


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(13))
def test_op_matches_reference(index):
    from dsa_ref.testing import check_problem

    backend = _backend()
    problem = _problems()[index]
    check_problem(backend, problem)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [8192, 1500, 0])
def test_topk_every_path_agrees_with_reference(capacity):
    """Every path of the top-k kernel at the benchmark's row length: the candidates above the sampled
    cut refined in shared memory (8192); the coarse-histogram fallback with its threshold bin in shared
    memory (1500: fewer than the ~1.5 k keys above the cut, more than the bin); and with the row
    read again (0)."""
    from dsa_ref.testing import check_problem, problems

    backend = _backend()
    backend.topk_candidate_capacity = capacity
    rng = np.random.default_rng(capacity)
    for problem in (problems.topk_problem(rng, s_q=64, s_kv=32768, topk=2048),
                    problems.topk_problem(rng, s_q=16, s_kv=5000, topk=2048, plateau=True, nan_fraction=0.05),
                    problems.topk_problem(rng, s_q=8, s_kv=65537, topk=2048, masked_fraction=0.3)):
        check_problem(backend, _on_gpu(problem))


@pytest.mark.gpu
def test_runs_are_bitwise_repeatable():
    from dsa_ref import interop, ops

    backend = _backend()
    for problem in _problems():
        native = problem.native_inputs(backend)
        op = getattr(ops, problem.op)
        first = op(**native, backend=backend)
        second = op(**native, backend=backend)
        for a, b in zip(first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,)):
            assert interop.to_numpy(a).tobytes() == interop.to_numpy(b).tobytes(), problem.describe()


@pytest.mark.gpu
def test_conformance_ci_profile(monkeypatch):
    from dsa_ref.testing import Problem, check_backend

    original = Problem.native_inputs
    monkeypatch.setattr(Problem, "native_inputs", lambda self, backend: original(self, _TorchCuda()))
    report = check_backend(_backend(), "ci")
    assert report.ok, str(report)


def test_dynamic_shared_memory_limit_only_grows(monkeypatch):
    """The limit belongs to the compiled function that all launches share: a launch asking for less
    must not lower it below what another launch of the same kernel needs."""
    from dsa_ref_backends.cupy_cuda import kernels

    class CompiledFunction:
        max_dynamic_shared_size_bytes = 0

    compiled = CompiledFunction()
    monkeypatch.setattr(kernels, "_function", lambda source, name, device_id: compiled)
    kernels.kernel("topk.cu", "topk_select", 0, 65536)
    assert compiled.max_dynamic_shared_size_bytes == 65536
    kernels.kernel("topk.cu", "topk_select", 0, 12000)
    assert compiled.max_dynamic_shared_size_bytes == 65536
    with pytest.raises(KeyError, match="not listed"):
        kernels.kernel("topk.cu", "topk_radix", 0)


def test_dynamic_shared_memory_limit_of_a_loaded_cubin_goes_through_the_driver(monkeypatch):
    """A function of a cubin module (the sm_90a sources) has no RawKernel property: the limit is the
    driver's function attribute, raised only when a launch needs more."""
    import sys
    import types

    from dsa_ref_backends.cupy_cuda import kernels

    attributes = {}
    driver = types.SimpleNamespace(
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8,
        funcGetAttribute=lambda attribute, pointer: attributes.get((attribute, pointer), 0),
        funcSetAttribute=lambda pointer, attribute, value: attributes.__setitem__((attribute, pointer), value))
    cuda = types.SimpleNamespace(driver=driver)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.driver", driver)
    compiled = types.SimpleNamespace(ptr=1234)
    monkeypatch.setattr(kernels, "_function", lambda source, name, device_id: compiled)
    kernels.kernel("sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma", 0, 231968)
    assert attributes == {(8, 1234): 231968}
    kernels.kernel("sparse_mla_wgmma.cu", "sparse_mla_fwd_wgmma", 0, 1000)
    assert attributes == {(8, 1234): 231968}


@pytest.mark.parametrize(("chosen", "setting", "expected"), [
    (True, None, True), (False, None, False), (True, "0", False), (False, "1", True), (True, "yes", True)])
def test_kernel_switch_follows_the_attribute_unless_the_variable_says_0_or_1(monkeypatch, chosen, setting, expected):
    from dsa_ref_backends import kernel_switch

    if setting is None:
        monkeypatch.delenv("DSA_REF_SOME_KERNEL", raising=False)
    else:
        monkeypatch.setenv("DSA_REF_SOME_KERNEL", setting)
    assert kernel_switch(chosen, "DSA_REF_SOME_KERNEL") is expected
