"""The launches the FP8 decode keeps per call signature (``sparse_mla._REPEATED``), on any machine.

With stand-ins for the compiled kernels and the driver (as in ``tests/test_triton_launch.py``) and the
H200's SM count, so that both launch plans run (one split; eight splits and the combine): a repeated
call goes straight to the compiled kernels' launchers, with no plain launch after the first, and hands
them what the general path's launch hands them; a new alignment, dtype, shape or stride never reuses a
kept launch (a new signature compiles, a new shape carries its own ints); hooks, a forced plain
launch or replaced launchers send the call back through the launchers; ``dsa_ref.torch.sparse_mla``
on the ``triton`` backend reaches the kept launches.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from triton.runtime.jit import JITFunction  # noqa: E402

from dsa_ref_backends.torch_triton import launch, sparse_mla  # noqa: E402

pytestmark = pytest.mark.skipif(not triton.__version__.startswith(launch.FAST_PATH_TRITON_RELEASE + "."),
                                reason=f"the fast path is written for Triton {launch.FAST_PATH_TRITON_RELEASE}")

H, TOPK, D_QK, D_V, SCALE = 128, 2048, 576, 512, 576**-0.5
#: Queries of each launch plan on a 132-SM GPU: 128 fill it without splits, 2 take eight splits.
PLANS = {"one split": 128, "splits and combine": 2}


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7000 + device


class _Kernel:
    """One kernel's stand-ins: the plain launches (``JITFunction.run``) and the compiled kernel's launches."""

    def __init__(self, monkeypatch, jit):
        from triton.compiler import CompiledKernel

        self.plain, self.direct = [], []
        compiled = object.__new__(CompiledKernel)
        compiled.module, compiled.function, compiled.packed_metadata = object(), id(self), (8, 1, 0)
        compiled._run = lambda *args: self.direct.append(args)
        self.fn = JITFunction(jit.fn)  # a compiled-kernel JITFunction, also under the interpreter

        def run(*args, grid, warmup, **kwargs):
            self.plain.append(args)
            return compiled

        monkeypatch.setattr(self.fn, "run", run)
        self.launcher = launch.CachedLauncher(self.fn)


def _launcher_calls(monkeypatch, *kernels):
    """The calls that reach the launchers of ``kernels`` from now on (a kept launch reaches none)."""
    calls = []
    for kernel in kernels:
        through = kernel.launcher.launch
        monkeypatch.setattr(kernel.launcher, "launch", lambda *args, _through=through: calls.append(args) or _through(
            *args))
    return calls


@pytest.fixture
def kernels(monkeypatch):
    """``(split kernel, combine kernel)`` stand-ins, installed as the module's launchers, the H200's SM
    count, and empty tables of plans and kept launches (emptied again after the test)."""
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver, "_active", _FakeDriver())
    split = _Kernel(monkeypatch, sparse_mla._sparse_mla_kernel)
    combine = _Kernel(monkeypatch, sparse_mla._combine_kernel)
    monkeypatch.setattr(sparse_mla, "_sparse_mla_launch", split.launcher)
    monkeypatch.setattr(sparse_mla, "_combine_launch", combine.launcher)
    monkeypatch.setattr(sparse_mla, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(sparse_mla, "_REPEATED", {})
    sparse_mla._sparse_mla_config.cache_clear()
    sparse_mla._launch_plan.cache_clear()
    yield split, combine
    sparse_mla._sparse_mla_config.cache_clear()
    sparse_mla._launch_plan.cache_clear()


def _inputs(rows, s_kv=4096, q_dtype=torch.bfloat16, index_dtype=torch.int32):
    q = torch.zeros(rows, H, D_QK, dtype=q_dtype)
    cache = torch.zeros(s_kv, 656, dtype=torch.uint8)
    indices = torch.zeros(rows, TOPK, dtype=index_dtype)
    return q, cache, indices


def _described(args, inputs):
    """A launch's arguments with each fresh buffer as its layout (an input as its position among the
    inputs): two calls' launches compare equal when they hand the kernel the same things."""
    described = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            position = next((i for i, x in enumerate(inputs) if x is arg), None)
            arg = ("input", position) if position is not None else (
                "buffer", arg.dtype, tuple(arg.shape), arg.stride(), arg.storage_offset(), arg.data_ptr() % 16)
        described.append(arg)
    return described


def _launcher_launches(split, combine, call, inputs):
    """What the launchers' own cached launch hands the kernels for ``call`` (no kept launches)."""
    kept = dict(sparse_mla._REPEATED)
    sparse_mla._REPEATED.clear()
    seen = len(split.direct), len(combine.direct)
    try:
        call()
    finally:
        sparse_mla._REPEATED.clear()
        sparse_mla._REPEATED.update(kept)
    return ([_described(a, inputs) for a in split.direct[seen[0]:]],
            [_described(a, inputs) for a in combine.direct[seen[1]:]])


@pytest.mark.parametrize("plan", PLANS)
def test_a_repeated_call_launches_directly_what_the_launchers_launch(kernels, plan, monkeypatch):
    split, combine = kernels
    q, cache, indices = inputs = _inputs(PLANS[plan])
    call = lambda: sparse_mla.sparse_mla(q, cache, indices, SCALE, D_V)  # noqa: E731
    first = call()
    assert len(split.plain) == 1 and not split.direct and len(sparse_mla._REPEATED) == 1
    splits = 1 if not combine.plain else len(combine.plain)
    assert (plan == "one split") == (not combine.plain), "the problem must take the plan it names"
    through_launchers = _launcher_calls(monkeypatch, split, combine)
    results = [call() for _ in range(3)]
    assert not through_launchers, "a repeated call must not go through the launchers"
    assert len(split.plain) == 1 and len(combine.plain) == (0 if plan == "one split" else splits)
    assert len(split.direct) == 3 and len(combine.direct) == (0 if plan == "one split" else 3)
    expected = _launcher_launches(split, combine, call, inputs)
    assert expected[0] == [_described(split.direct[0], inputs)]
    assert expected[1] == [_described(a, inputs) for a in combine.direct[:1]]
    # The grid, the current stream, the kernel's handles, then the arguments.
    assert split.direct[0][:9] == (*sparse_mla._REPEATED[next(iter(sparse_mla._REPEATED))].grid, 7000, id(split),
                                   (8, 1, 0), None, None, None)
    for call_index, ((out, lse), args, combined) in enumerate(zip(results, split.direct,
                                                                 combine.direct or [None] * 3)):
        assert out.shape == first[0].shape == (PLANS[plan], H, D_V) and lse.shape == first[1].shape
        assert out.dtype == lse.dtype == torch.float32
        if combined is None:
            assert args[9 + 5] is out and args[9 + 6] is lse
        else:
            assert combined[9 + 3] is out and combined[9 + 4] is lse
            assert combined[9] is args[9 + 5] and combined[9 + 1] is args[9 + 6]  # the partials
        if call_index:
            storages = {t.untyped_storage().data_ptr() for t in (out, lse, *results[0])}
            assert len(storages) == 4, "every call has outputs of its own"


def _misaligned(q):
    buffer = torch.zeros(q.numel() + 1, dtype=q.dtype)
    view = buffer[1:].view(q.shape)
    assert view.data_ptr() % 16
    return view


CHANGES = {
    "misaligned q": lambda q, cache, indices: (_misaligned(q), cache, indices),
    "float32 q": lambda q, cache, indices: (q.float(), cache, indices),
    "int64 indices": lambda q, cache, indices: (q, cache, indices.long()),
    "a longer cache": lambda q, cache, indices: (q, torch.zeros(2 * cache.shape[0], 656, dtype=torch.uint8), indices),
    "q strided over heads": lambda q, cache, indices: (torch.zeros(q.shape[0], 2 * H, D_QK, dtype=q.dtype)[:, :H],
                                                       cache, indices),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("plan", PLANS)
def test_a_new_alignment_dtype_shape_or_stride_never_reuses_a_kept_launch(kernels, plan, change):
    split, combine = kernels
    base = _inputs(PLANS[plan])
    for _ in range(2):
        sparse_mla.sparse_mla(*base, SCALE, D_V)
    plain, direct = len(split.plain), len(split.direct)
    changed = CHANGES[change](*base)
    sparse_mla.sparse_mla(*changed, SCALE, D_V)
    new_signature = change in ("misaligned q", "float32 q", "int64 indices")
    assert len(split.plain) == plain + new_signature, "a new signature is compiled (found) by the plain launch"
    expected = _launcher_launches(split, combine, lambda: sparse_mla.sparse_mla(*changed, SCALE, D_V), changed)
    for _ in range(2):
        sparse_mla.sparse_mla(*changed, SCALE, D_V)
    assert len(split.plain) == plain + new_signature, "and launched without it from then on"
    got = [_described(a, changed) for a in split.direct[-2:]]
    assert got == expected[0] * 2, "the changed call's own arguments, not a kept call's"
    if change == "a longer cache":
        assert got[0][9 + 9] == changed[1].shape[0]
    # The first inputs still find their own launch.
    sparse_mla.sparse_mla(*base, SCALE, D_V)
    assert _described(split.direct[-1], base) == _described(split.direct[direct - 1], base)


def test_optional_inputs_and_a_numpy_scale_keep_the_general_paths_launch(kernels):
    np = pytest.importorskip("numpy")
    split, _ = kernels
    q, cache, indices = _inputs(2)
    lengths = torch.full((2,), 100, dtype=torch.int32)
    sink = torch.zeros(H)
    for _ in range(3):
        sparse_mla.sparse_mla(q, cache, indices, SCALE, D_V, lengths, sink)
    expected = _launcher_launches(split, kernels[1],
                                  lambda: sparse_mla.sparse_mla(q, cache, indices, SCALE, D_V, lengths, sink),
                                  (q, cache, indices, lengths, sink))
    assert [_described(split.direct[-2], (q, cache, indices, lengths, sink))] == expected[0]
    assert split.direct[-2][9 + 3] is lengths and split.direct[-2][9 + 4] is sink
    # int64 lengths: the general path casts them (a new tensor each call), so no launch is kept for them.
    kept = len(sparse_mla._REPEATED)
    for _ in range(2):
        sparse_mla.sparse_mla(q, cache, indices, SCALE, D_V, lengths.long(), sink)
    assert split.direct[-1][9 + 3].dtype == torch.int32 and len(sparse_mla._REPEATED) == kept
    # A numpy scale is another argument type for Triton: the launchers' plain launch takes it.
    plain = len(split.plain)
    sparse_mla.sparse_mla(q, cache, indices, np.float64(SCALE), D_V, lengths, sink)
    assert len(split.plain) == plain + 1


def test_hooks_a_forced_plain_launch_and_replaced_launchers_go_through_the_launchers(kernels, monkeypatch):
    from triton import knobs

    split, _ = kernels
    inputs = _inputs(2)
    for _ in range(2):
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    plain, direct = len(split.plain), len(split.direct)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(split.plain) == plain + 1 and len(split.direct) == direct, "a hook must see the launch"
    with monkeypatch.context() as patch:
        patch.setattr(split.launcher, "plain_only", "forced by the test")
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    assert len(split.plain) == plain + 2 and len(split.direct) == direct
    with monkeypatch.context() as patch:
        patch.setattr(split.fn, "pre_run_hooks", [lambda *args, **kwargs: None])
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    assert len(split.plain) == plain + 3 and len(split.direct) == direct

    class Recorder:
        def __init__(self, target):
            self.target, self.calls = target, []

        def launch(self, options, grid, *args):
            self.calls.append(args)
            return self.target.launch(options, grid, *args)

    recorder = Recorder(split.launcher)
    with monkeypatch.context() as patch:
        patch.setattr(sparse_mla, "_sparse_mla_launch", recorder)
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
        sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    assert len(recorder.calls) == 2, "a stand-in launcher sees every launch"
    sparse_mla.sparse_mla(*inputs, SCALE, D_V)
    assert len(split.plain) == plain + 3 and len(split.direct) == direct + 3


def test_the_torch_op_reaches_the_kept_launches(kernels, monkeypatch):
    import dsa_ref.torch as dsa_torch
    from dsa_ref import registry

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend's device: the CPU, where these tensors are
    split, combine = kernels
    registry.get_backend("triton")
    q, cache, indices = _inputs(2)
    with torch.no_grad():
        dsa_torch.sparse_mla(q, cache, indices, backend="triton")
        through_launchers = _launcher_calls(monkeypatch, split, combine)
        for _ in range(3):
            out, lse = dsa_torch.sparse_mla(q, cache, indices, backend="triton")
    assert not through_launchers, "the op's repeated calls must take the kept launches"
    assert len(split.plain) == 1 and len(split.direct) == 3 and len(combine.direct) == 3
    assert combine.direct[-1][9 + 3] is out and combine.direct[-1][9 + 4] is lse
