"""The cached launch of the ``triton`` backend's kernels (:mod:`dsa_ref_backends.torch_triton.launch`).

On any machine: the signature key tells apart what Triton 3.6 compiles apart (checked against
Triton's own ``native_specialize_impl``), and the launcher's logic, with a stand-in for the compiled
kernel and the driver: a repeated signature goes straight to the compiled kernel's launcher with
Triton's argument order, anything else through ``kernel[grid]``, and the interpreter, hooks or
another release always through ``kernel[grid]``. On a GPU: the cached launch of the sparse MLA
forward (FP8 decode with splits, dense bf16, the Gluon kernel on Hopper) gives bitwise the plain
launch's results, skips ``JITFunction.run`` after the first call, and takes the plain path again for
a new alignment or dtype.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from dsa_ref_backends.torch_triton import launch, sparse_mla  # noqa: E402
from dsa_ref_backends.torch_triton._interpreter import interpreter_enabled  # noqa: E402

needs_release = pytest.mark.skipif(not triton.__version__.startswith(launch.FAST_PATH_TRITON_RELEASE + "."),
                                   reason=f"the fast path is written for Triton {launch.FAST_PATH_TRITON_RELEASE}")


def _triton_spec(arg):
    """Triton's own specialization of a runtime argument, as ``JITFunction.run``'s binder computes it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, arg, False, True, True)


def _aligned_pair(dtype=torch.float32):
    """Two views of one buffer that differ only in 16-byte alignment (aligned, then not)."""
    base = torch.zeros(256, dtype=torch.uint8)
    begin = -base.data_ptr() % 16
    aligned = base[begin:begin + 64].view(dtype)
    misaligned = base[begin + 8:begin + 72].view(dtype)  # 8 bytes: a multiple of every dtype's size
    return aligned, misaligned


# --------------------------------------------------------------------------- the signature key
INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1,
        -(2**31) - 16, 2**40, 2**63 - 1, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16, 2**64 - 1, -(2**63)]


def test_int_flags_are_the_constant_one_divisibility_and_width():
    key = lambda value: launch.argument_key((value,))[0]  # noqa: E731
    assert key(1) == launch._ONE  # Triton passes 1 as a constexpr
    assert key(16) == launch._INT_CODES[("i32", "D")] and key(17) == launch._INT_CODES[("i32", "")]
    assert len({key(1), key(16), key(17)}) == 3
    # Past int32 the parameter becomes i64 (then u64): the same divisibility, another key.
    assert key(2**31 + 16) == launch._INT_CODES[("i64", "D")] != key(16)
    assert key(2**31 + 17) == launch._INT_CODES[("i64", "")] != key(17)
    assert key(-(2**31) - 1) == launch._INT_CODES[("i64", "")]
    assert key(2**63) == launch._INT_CODES[("u64", "D")] != key(2**62)
    assert launch.argument_key((2**64,)) is None and launch.argument_key((-(2**63) - 1,)) is None  # Triton refuses


@needs_release  # Triton's own specialization, which other releases may change
def test_int_keys_match_triton_specialization():
    for value in INTS:
        spec = _triton_spec(value)
        expected = launch._ONE if spec == ("constexpr", 1) else launch._INT_CODES[spec]
        assert launch.argument_key((value,)) == (expected,), (value, spec)


@needs_release  # Triton's own specialization, which other releases may change
def test_tensors_differing_only_in_alignment_get_different_keys():
    aligned, misaligned = _aligned_pair()
    assert _triton_spec(aligned) != _triton_spec(misaligned)  # what Triton compiles apart
    assert launch.argument_key((aligned,)) != launch.argument_key((misaligned,))
    other = torch.zeros(16)
    other = other if other.data_ptr() % 16 == 0 else _aligned_pair()[0]
    assert launch.argument_key((aligned,)) == launch.argument_key((other,))  # same dtype, both aligned


@needs_release  # Triton's own specialization, which other releases may change
def test_tensor_keys_follow_triton_specialization():
    tensors = [view for dtype in (torch.float32, torch.bfloat16, torch.int32, torch.int64, torch.uint8)
               for view in _aligned_pair(dtype)]
    for a in tensors:
        for b in tensors:
            same_key = launch.argument_key((a,)) == launch.argument_key((b,))
            assert same_key == (a.dtype == b.dtype and _triton_spec(a) == _triton_spec(b)), (a.dtype, b.dtype)


def test_other_scalars_key_by_type_and_unknown_types_have_no_key():
    assert launch.argument_key((0.5,)) == launch.argument_key((1e30,)) != launch.argument_key((True,))
    assert launch.argument_key((True,)) == launch.argument_key((False,)) != launch.argument_key((1,))
    assert launch.argument_key((None,)) != launch.argument_key((0,))
    np = pytest.importorskip("numpy")
    assert launch.argument_key((np.int64(16),)) is None
    assert launch.argument_key((torch.nn.Parameter(torch.zeros(4)),)) is None  # a subclass may change data_ptr


def test_positions_are_kept_apart():
    aligned, _ = _aligned_pair()
    assert launch.argument_key((aligned, 16)) != launch.argument_key((16, aligned))
    assert launch.argument_key((16, 17)) != launch.argument_key((17, 16))


# --------------------------------------------------------------------------- the launcher's logic
def _toy(p_x, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
    pass


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7000 + device


class _Launches:
    """A compiled kernel's launcher stand-in: records each launch's arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _stand_in(monkeypatch, fn):
    """``(launcher, plain launches, direct launches)`` of a real ``JITFunction`` whose ``run`` (the plain
    path: compile and launch) returns a stand-in compiled kernel, on a stand-in driver."""
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver

    compiled = object.__new__(CompiledKernel)
    compiled.module, compiled.function, compiled.packed_metadata = object(), 1234, (4, 1, 0)
    compiled._run = _Launches()
    plain = []

    def run(*args, grid, warmup, **kwargs):
        plain.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(fn, "run", run)
    monkeypatch.setattr(driver, "_active", _FakeDriver())
    return launch.CachedLauncher(fn), plain, compiled._run.calls


@pytest.fixture
def toy(monkeypatch):
    return _stand_in(monkeypatch, JITFunction(_toy))


@needs_release
def test_a_repeated_signature_goes_straight_to_the_launcher_in_tritons_argument_order(toy):
    launcher, plain, direct = toy
    x, _ = _aligned_pair()
    assert launcher.plain_only is None
    launcher((3, 2), x, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(plain) == 1 and not direct
    launcher((5, 2), x, 80, 0.25, BLOCK=32, num_warps=4)  # other values, same signature
    assert len(plain) == 1
    # grid, stream, function, packed metadata, no launch metadata or hooks, then every parameter
    # (constexprs and defaults too), as JITFunction.run passes them.
    assert direct == [(5, 2, 1, 7000, 1234, (4, 1, 0), None, None, None, x, 80, 0.25, 32, True)]


@needs_release
def test_the_sparse_mla_launch_passes_the_launcher_what_jit_run_passes(monkeypatch):
    """The decode's split launch: the parameters JITFunction.run's binder binds (the ones it hands the
    launcher), as many as the launcher's argument format that Triton generates for the signature."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.backends.nvidia.driver import _BASE_ARGS_FORMAT, make_launcher
    from triton.runtime.jit import create_function_from_signature

    fn = JITFunction(sparse_mla._sparse_mla_kernel.fn)  # a compiled-kernel JITFunction, also under the interpreter
    launcher, plain, direct = _stand_in(monkeypatch, fn)
    q, kv = torch.zeros(2, 128, 576, dtype=torch.bfloat16), torch.zeros(16, 656, dtype=torch.uint8)
    indices = torch.zeros(2, 64, dtype=torch.int32)
    part_out, part_lse = torch.zeros(4, 2, 128, 512), torch.zeros(4, 2, 128)
    common = sparse_mla._launch_plan(2, 128, 64, 512, 576, True, torch.bfloat16, torch.device("cpu"), False, False)[2]
    args = (q, kv, indices, part_lse, part_lse, part_out, part_lse, 2, 128, 16, 64, 512, 576, 16, 0.06,
            73728, 576, 656, 64, 131072, 65536, 512, 256, 128)
    for _ in range(2):
        launcher((2, 2, 4), *args, SPLIT=True, **common)
    assert len(plain) == 1 and len(direct) == 1
    passed = direct[0][9:]
    binder = create_function_from_signature(fn.signature, fn.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    bound, specialization, _ = binder(*args, SPLIT=True, **common)
    assert len(passed) == len(bound) and all(a is b for a, b in zip(passed, bound.values()))
    source = make_launcher({}, dict(enumerate(spec[0] for spec in specialization)), None)
    arg_format = re.search(r'PyArg_ParseTuple\(args, "([^"]*)"', source).group(1)
    assert len(arg_format) == len(_BASE_ARGS_FORMAT) + len(passed)


@needs_release
@pytest.mark.parametrize("change", ["alignment", "dtype", "int 1", "int past int32", "constexpr", "option", "flag"])
def test_a_new_signature_takes_the_plain_launch(toy, change):
    launcher, plain, direct = toy
    x, misaligned = _aligned_pair()
    args, kwargs = [x, 64, 0.5], dict(BLOCK=32, FLAG=True, num_warps=4)
    launcher((1,), *args, **kwargs)
    launcher((1,), *args, **kwargs)
    assert len(plain) == 1 and len(direct) == 1
    if change == "alignment":
        args[0] = misaligned
    elif change == "dtype":
        args[0] = _aligned_pair(torch.bfloat16)[0]
    elif change == "int 1":
        args[1] = 1
    elif change == "int past int32":
        args[1] = 2**32
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        kwargs["FLAG"] = 1  # == True and hashes alike, but another constexpr for Triton
    launcher((1,), *args, **kwargs)
    assert len(plain) == 2 and len(direct) == 1
    launcher((1,), *args, **kwargs)  # and that signature is cached in turn
    assert len(plain) == 2 and len(direct) == 2


@needs_release
def test_a_launch_patched_after_the_launcher_was_made_takes_the_plain_path(toy, monkeypatch):
    launcher, plain, direct = toy
    x, _ = _aligned_pair()
    launcher((3, 2), x, 64, 0.5, BLOCK=32, num_warps=4)
    launcher((3, 2), x, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(plain) == 1 and len(direct) == 1
    patched = []
    monkeypatch.setattr(launcher.fn, "run", lambda *args, **kwargs: patched.append(kwargs["grid"]))
    launcher((3, 2), x, 64, 0.5, BLOCK=32, num_warps=4)
    assert patched == [(3, 2)] and len(direct) == 1


@needs_release
def test_hooks_callable_grids_and_constexprs_by_position_take_the_plain_launch(toy, monkeypatch):
    from triton import knobs

    launcher, plain, direct = toy
    x, _ = _aligned_pair()
    launcher((1,), x, 64, 0.5, BLOCK=32)
    launcher((1,), x, 64, 0.5, BLOCK=32)
    assert len(plain) == 1 and len(direct) == 1
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher((1,), x, 64, 0.5, BLOCK=32)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launcher(lambda meta: (1,), x, 64, 0.5, BLOCK=32)
    monkeypatch.setattr(launcher.fn, "pre_run_hooks", [lambda *args, **kwargs: None])
    launcher((1,), x, 64, 0.5, BLOCK=32)
    monkeypatch.setattr(launcher.fn, "pre_run_hooks", [])
    assert len(plain) == 4 and len(direct) == 1
    for _ in range(2):  # BLOCK by position: its value would not be in the key
        launcher((1,), x, 64, 0.5, 32)
    launcher((1,), x, 64, 0.5, 64)
    assert len(plain) == 7 and len(direct) == 1
    launcher((1,), x, 64, 0.5, BLOCK=32)
    assert len(direct) == 2


# --------------------------------------------------------------------------- options made once
def test_equal_keyword_arguments_give_one_options_object_and_types_tell_them_apart():
    a = launch.launch_options(BLOCK=32, FLAG=True, num_warps=4)
    assert launch.launch_options(BLOCK=32, FLAG=True, num_warps=4) is a
    assert launch.launch_options(BLOCK=32, FLAG=1, num_warps=4) is not a  # == True, another constexpr
    assert launch.launch_options(BLOCK=64, FLAG=True, num_warps=4) is not a
    assert launch.launch_options(FLAG=True, BLOCK=32, num_warps=4) is not a  # another order: a key of its own
    assert dict(a.kwargs) == dict(BLOCK=32, FLAG=True, num_warps=4) and a.cacheable
    with pytest.raises(TypeError):
        a.kwargs["BLOCK"] = 64  # the cache keys on what it was made with
    unhashable = launch.launch_options(BLOCK=[32])
    assert not unhashable.cacheable and launch.launch_options(BLOCK=[32]) is not unhashable


@needs_release
def test_launch_with_options_is_the_keyword_call(toy):
    launcher, plain, direct = toy
    x, misaligned = _aligned_pair()
    options = launch.launch_options(BLOCK=32, num_warps=4)
    launcher.launch(options, (3, 2), x, 64, 0.5)
    assert len(plain) == 1 and not direct
    assert plain[0][1] == (x, 64, 0.5) and plain[0][2] == dict(BLOCK=32, num_warps=4)
    launcher.launch(options, (5, 2), x, 80, 0.25)
    assert direct == [(5, 2, 1, 7000, 1234, (4, 1, 0), None, None, None, x, 80, 0.25, 32, True)]
    launcher((5, 2), x, 80, 0.25, BLOCK=32, num_warps=4)  # the same options: the same cached kernel
    assert len(plain) == 1 and len(direct) == 2
    launcher.launch(options, (5, 2), misaligned, 80, 0.25)  # a new signature
    assert len(plain) == 2 and len(direct) == 2
    launcher.launch(launch.launch_options(BLOCK=64, num_warps=4), (5, 2), x, 80, 0.25)
    assert len(plain) == 3 and len(direct) == 2


@needs_release
def test_unhashable_options_always_take_the_plain_launch(toy):
    launcher, plain, direct = toy
    x, _ = _aligned_pair()
    options = launch.launch_options(BLOCK=32, FLAG=[1])
    for _ in range(3):
        launcher.launch(options, (1,), x, 64, 0.5)
    launcher((1,), x, 64, 0.5, BLOCK=32, FLAG=[1])
    assert len(plain) == 4 and not direct


@needs_release
def test_options_made_before_the_table_starts_over_stay_cached(toy, monkeypatch):
    launcher, plain, direct = toy
    x, _ = _aligned_pair()
    monkeypatch.setattr(launch, "OPTIONS_LIMIT", 2)
    monkeypatch.setattr(launch, "_OPTIONS", {})
    old = launch.launch_options(BLOCK=32)
    launcher.launch(old, (1,), x, 64, 0.5)
    launch.launch_options(BLOCK=16)
    launch.launch_options(BLOCK=8)  # the table is full: it starts over
    new = launch.launch_options(BLOCK=32)
    assert new is not old
    launcher.launch(old, (1,), x, 64, 0.5)
    assert len(plain) == 1 and len(direct) == 1
    launcher.launch(new, (1,), x, 64, 0.5)  # a new object: a new entry, found by the plain launch once
    launcher.launch(new, (1,), x, 64, 0.5)
    assert len(plain) == 2 and len(direct) == 2


def test_the_forward_binds_its_launch_options_with_its_plan():
    plan = sparse_mla._launch_plan(1, 64, 2048, 512, 576, True, torch.bfloat16, torch.device("cpu"), False, True)
    splits, _, common, options, combine = plan
    assert splits > 1
    assert dict(options.kwargs) == dict(SPLIT=True, **common)
    assert dict(combine.kwargs) == dict(HAS_SINK=True, BLOCK_H=common["BLOCK_H"], D_V=common["D_V"], num_warps=4)
    one = sparse_mla._launch_plan(128, 128, 2048, 512, 576, True, torch.bfloat16, torch.device("cpu"), False, False)
    assert one[0] == 1 and dict(one[3].kwargs) == dict(SPLIT=False, **one[2]) and one[4] is None
    # The tuning path makes its options per call: equal ones are the same object, so it stays cached.
    assert sparse_mla._launch_options(splits, dict(common), True)[0] is options


def test_other_releases_and_the_interpreter_always_take_the_plain_launch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    assert launch.CachedLauncher(InterpretedFunction(_toy)).plain_only
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert "3.9.0" in launch.CachedLauncher(JITFunction(_toy)).plain_only
    if interpreter_enabled():  # this process's kernels are interpreted: every launch is the plain one
        assert sparse_mla._sparse_mla_launch.plain_only and sparse_mla._combine_launch.plain_only


def test_the_interpreter_launch_through_the_launcher_computes():
    if not interpreter_enabled():
        pytest.skip("runs the kernel on Triton's interpreter (TRITON_INTERPRET=1)")

    @triton.jit
    def double(p_x, p_y, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(p_y + o, tl.load(p_x + o, mask=o < n) * 2, mask=o < n)

    launcher = launch.CachedLauncher(double)
    x = torch.arange(40, dtype=torch.float32)
    for _ in range(2):
        y = torch.zeros_like(x)
        launcher((3,), x, y, 40, BLOCK=16)
        assert torch.equal(y, 2 * x)


# --------------------------------------------------------------------------- on a GPU
def _fp8_decode(device, q_dtype=torch.bfloat16):
    """The host-time problem of tools/host_profile.py: s_q 2, h 128, topk 2048 over the FP8 cache (4
    splits on a 132-SM GPU, so both kernels launch)."""
    from dsa_ref_backends.bench import make_indices, random_fp8_cache

    torch.manual_seed(0)
    cache = random_fp8_cache(torch, 4096, device)
    q = torch.randn(2, 128, 576, device=device).to(q_dtype)
    indices = make_indices(torch, 2, 4096, 2048, "uniform", device)
    return q, cache, indices


def _bits(x):
    return x.view(torch.int32)


def _counting_run(monkeypatch):
    calls = []
    original = JITFunction.run

    def run(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", run)
    return calls


def _counted_fresh_launchers(monkeypatch):
    """``JITFunction.run`` counted, and the forward's launchers made anew after the count is in place:
    a launcher made before it would see a patched launch and take the plain path every call."""
    from dsa_ref_backends.torch_triton import sparse_mla_gluon

    calls = _counting_run(monkeypatch)
    monkeypatch.setattr(sparse_mla, "_sparse_mla_launch", launch.CachedLauncher(sparse_mla._sparse_mla_kernel))
    monkeypatch.setattr(sparse_mla, "_combine_launch", launch.CachedLauncher(sparse_mla._combine_kernel))
    monkeypatch.setattr(sparse_mla_gluon, "_gluon_launch", launch.CachedLauncher(sparse_mla_gluon._gluon_launch.fn))
    return calls


def _plain(monkeypatch, fn, *args, **kwargs):
    """``fn`` with every cached launcher of the forward forced onto the plain launch."""
    from dsa_ref_backends.torch_triton import sparse_mla_gluon

    with monkeypatch.context() as patch:
        for launcher in (sparse_mla._sparse_mla_launch, sparse_mla._combine_launch, sparse_mla_gluon._gluon_launch):
            patch.setattr(launcher, "plain_only", "forced by the test")
        return fn(*args, **kwargs)


def _assert_bitwise(got, expected, what):
    torch.cuda.synchronize()
    assert torch.equal(_bits(got[0]), _bits(expected[0])), f"{what}: out differs from the plain launch's"
    assert torch.equal(_bits(got[1]), _bits(expected[1])), f"{what}: lse differs from the plain launch's"


@pytest.mark.gpu
@needs_release
def test_gpu_cached_fp8_decode_is_bitwise_the_plain_launch_and_skips_jit_run(monkeypatch):
    device = torch.device("cuda")
    q, cache, indices = _fp8_decode(device)
    splits = sparse_mla._launch_plan(2, 128, 2048, 512, 576, True, torch.bfloat16, q.device, False, False)[0]
    launches = 1 if splits == 1 else 2  # the split kernel, and its combine
    calls = _counted_fresh_launchers(monkeypatch)
    assert sparse_mla._sparse_mla_launch.plain_only is None
    expected = _plain(monkeypatch, sparse_mla.sparse_mla, q, cache, indices, 576**-0.5, 512)
    calls.clear()
    first = sparse_mla.sparse_mla(q, cache, indices, 576**-0.5, 512)
    assert len(calls) == launches, "the first call of a signature is the plain launch"
    for _ in range(3):
        again = sparse_mla.sparse_mla(q, cache, indices, 576**-0.5, 512)
    assert len(calls) == launches, "a repeated signature must not go through JITFunction.run"
    _assert_bitwise(first, expected, "first call")
    _assert_bitwise(again, expected, "repeated call")

    # q 2 bytes past 16-byte alignment: the split kernel is specialized anew, the combine is not.
    buffer = torch.empty(q.numel() + 1, dtype=q.dtype, device=device)
    misaligned = buffer[1:].view(q.shape)
    misaligned.copy_(q)
    seen = len(calls)
    got = sparse_mla.sparse_mla(misaligned, cache, indices, 576**-0.5, 512)
    assert calls[seen:] == [sparse_mla._sparse_mla_kernel], "a new alignment takes the plain launch, once"
    sparse_mla.sparse_mla(misaligned, cache, indices, 576**-0.5, 512)
    assert len(calls) == seen + 1
    _assert_bitwise(got, _plain(monkeypatch, sparse_mla.sparse_mla, misaligned, cache, indices, 576**-0.5, 512),
                    "misaligned q")

    # float32 queries over the cache: other kernels (and block sizes), specialized once.
    q32 = q.float()
    seen = len(calls)
    got = sparse_mla.sparse_mla(q32, cache, indices, 576**-0.5, 512)
    assert sparse_mla._sparse_mla_kernel in calls[seen:], "a new dtype takes the plain launch"
    seen = len(calls)
    sparse_mla.sparse_mla(q32, cache, indices, 576**-0.5, 512)
    assert len(calls) == seen
    _assert_bitwise(got, _plain(monkeypatch, sparse_mla.sparse_mla, q32, cache, indices, 576**-0.5, 512),
                    "float32 q")


@pytest.mark.gpu
@needs_release
def test_gpu_cached_launch_replays_in_a_cuda_graph():
    q, cache, indices = _fp8_decode(torch.device("cuda"))
    expected = sparse_mla.sparse_mla(q, cache, indices, 576**-0.5, 512)  # compiled and cached
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sparse_mla.sparse_mla(q, cache, indices, 576**-0.5, 512)  # warm on the side stream
        with torch.cuda.graph(graph, stream=stream):
            captured = sparse_mla.sparse_mla(q, cache, indices, 576**-0.5, 512)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    _assert_bitwise(captured, expected, "CUDA-graph replay")


@pytest.mark.gpu
@needs_release
def test_gpu_cached_dense_and_gluon_forwards_are_bitwise_the_plain_launch(monkeypatch):
    from dsa_ref_backends.torch_triton import sparse_mla_gluon

    device = torch.device("cuda")
    torch.manual_seed(1)
    q = torch.randn(3, 64, 576, device=device).to(torch.bfloat16)
    kv = torch.randn(1000, 576, device=device).to(torch.bfloat16)
    indices = torch.randint(-1, 1000, (3, 300), device=device, dtype=torch.int32)
    sink = torch.randn(64, device=device)
    kernels = ["tl"]
    if not sparse_mla_gluon.gluon_applies(q, kv, 512, indices, None, sink):
        kernels.append("gluon")
    calls = _counted_fresh_launchers(monkeypatch)
    for kernel in kernels:
        expected = _plain(monkeypatch, sparse_mla.sparse_mla, q, kv, indices, 0.05, 512, None, sink, kernel=kernel)
        sparse_mla.sparse_mla(q, kv, indices, 0.05, 512, None, sink, kernel=kernel)
        calls.clear()
        got = sparse_mla.sparse_mla(q, kv, indices, 0.05, 512, None, sink, kernel=kernel)
        assert not calls, f"{kernel}: a repeated signature went through JITFunction.run"
        _assert_bitwise(got, expected, kernel)
