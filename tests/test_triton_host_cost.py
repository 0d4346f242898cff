"""The per-call shortcuts of the Triton backend's FP8 decode path give what the longer way gave.

On any machine: the split forward's partials share one allocation, and each kernel sees the
pointers' alignment and the strides that two contiguous allocations gave; ``dsa_ref.torch``'s
conversion of the inputs, with the device looked up once, returns what ``backend.to_native``
returns; ``_fresh`` copies exactly the outputs that share an input's memory; the backend's device
follows ``TRITON_INTERPRET`` call by call; the FP8 decode reads no kernel switch; the written-out
signature of a sparse MLA call tells apart every dtype, stride, shape, device, optional input and
scalar, and a call that differs in any is checked again (bad input raising as before); the
launcher's remembered int codes equal its range tests; ``tools/host_cost_cpu.py`` times the cached
launch, not the plain one. On a GPU: CUDA tensors on the current device pass through the conversion
as themselves, without ``Tensor.to``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from dsa_ref import interop, registry  # noqa: E402
from dsa_ref.backend import Backend  # noqa: E402
from dsa_ref.torch import ops  # noqa: E402
from dsa_ref_backends.torch_triton import backend as triton_backend  # noqa: E402
from dsa_ref_backends.torch_triton import launch, sparse_mla  # noqa: E402


class _Launches:
    """A module launcher's stand-in: records ``launch(options, grid, *args)`` and launches nothing."""

    def __init__(self):
        self.calls = []

    def launch(self, options, grid, *args):
        self.calls.append((options, grid, args))


def _recorded_forward(monkeypatch, s_q, h, d_v, d_qk, topk, kv_dtype=torch.bfloat16):
    split, combine = _Launches(), _Launches()
    monkeypatch.setattr(sparse_mla, "_sparse_mla_launch", split)
    monkeypatch.setattr(sparse_mla, "_combine_launch", combine)
    q = torch.zeros(s_q, h, d_qk, dtype=torch.bfloat16)
    kv = torch.zeros(64, d_qk, dtype=kv_dtype)
    indices = torch.zeros(s_q, topk, dtype=torch.int32)
    out, lse = sparse_mla.sparse_mla(q, kv, indices, 0.1, d_v)
    return out, lse, split.calls, combine.calls


@pytest.mark.parametrize("d_v, d_qk", [(512, 576), (3, 20), (0, 16)])
def test_split_partials_share_one_allocation_with_two_allocations_alignment_and_strides(monkeypatch, d_v, d_qk):
    out, lse, split, combine = _recorded_forward(monkeypatch, 1, 16, d_v, d_qk, 2048)
    assert len(split) == 1 and len(combine) == 1, "the problem must take the split path"
    options, grid, args = split[0]
    splits = grid[2]
    assert splits > 1 and options.kwargs["SPLIT"] is True
    part_out, part_lse = args[5], args[6]
    assert part_lse.untyped_storage().data_ptr() == part_out.untyped_storage().data_ptr()
    assert part_out.data_ptr() % 16 == 0 and part_lse.data_ptr() % 16 == 0
    # What the kernels were handed with two contiguous allocations of the partials' shapes.
    expected_out = torch.empty((splits, 1, 16, d_v)).stride()
    expected_lse = torch.empty((splits, 1, 16)).stride()
    assert args[-5:] == (*expected_out[:3], *expected_lse[:2])
    assert part_lse.data_ptr() - part_out.data_ptr() >= 4 * splits * 16 * d_v  # no overlap
    assert part_lse.numel() == splits * 16
    _, combine_grid, combine_args = combine[0]
    assert combine_grid == grid[:2]
    assert all(a is b for a, b in zip(combine_args[:5], (part_out, part_lse, lse, out, lse)))
    assert combine_args[8:] == (*expected_out[:3], *expected_lse[:2], *out.stride()[:2], lse.stride(0))
    # The outputs are the caller's: their own memory, not shared with each other or the partials.
    storages = {t.untyped_storage().data_ptr() for t in (out, lse, part_out)}
    assert len(storages) == 3


def test_one_split_passes_the_outputs_strides(monkeypatch):
    out, lse, split, combine = _recorded_forward(monkeypatch, 8, 16, 3, 20, 64)
    assert len(split) == 1 and not combine
    options, grid, args = split[0]
    assert grid[2] == 1 and options.kwargs["SPLIT"] is False
    assert args[5] is out and args[6] is lse and args[3] is lse and args[4] is lse  # lse: the unread pointers
    assert args[-5:] == (0, *out.stride()[:2], 0, lse.stride(0))


# --------------------------------------------------------------------------- dsa_ref.torch's conversion
def test_native_inputs_are_what_to_native_gives():
    backend = registry._load("triton")
    # Made where the backend works (a GPU where there is one), so that to_native keeps them: a copy
    # would be a new tensor on each call and nothing to compare by identity.
    device = backend.to_native(torch.zeros(1)).device
    inputs = dict(q=torch.zeros(2, 3, device=device), kv=torch.zeros(4, 3, dtype=torch.bfloat16, device=device),
                  scale=0.5, length=None)
    native = ops._native_inputs(backend, inputs)
    expected = {k: backend.to_native(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    assert native.keys() == expected.keys()
    for key, value in native.items():
        assert value is expected[key], key


def test_native_inputs_copy_to_the_backends_device(monkeypatch):
    backend = registry._load("triton")
    monkeypatch.setattr(type(backend), "device", lambda self: "meta")
    native = ops._native_inputs(backend, dict(q=torch.zeros(2, 3)))
    assert native["q"].device == torch.device("meta")


def test_native_inputs_call_an_overridden_to_native():
    class Converting(type(registry._load("triton"))):
        def to_native(self, x):
            return x + 1

    native = ops._native_inputs(Converting(), dict(q=torch.zeros(2), n=3))
    assert torch.equal(native["q"], torch.ones(2)) and native["n"] == 3


def test_native_inputs_of_a_numpy_backend_convert():
    np = pytest.importorskip("numpy")

    class NumPy(Backend):
        name = "numpy-like"
        array_kind = "numpy"

    native = ops._native_inputs(NumPy(), dict(q=torch.arange(3.0)))
    assert isinstance(native["q"], np.ndarray) and native["q"].tolist() == [0.0, 1.0, 2.0]


def test_results_of_plain_tensors_come_back_as_themselves():
    x, like = torch.zeros(2), torch.zeros(1)
    assert ops._like(x, like) is x and ops._like(None, like) is None
    assert ops._like(x, torch.nn.Parameter(like)) is interop.convert_like(x, torch.nn.Parameter(like))


def test_fresh_copies_only_outputs_that_share_an_inputs_memory():
    q = torch.zeros(4, 3)
    other = torch.zeros(2)
    copied = ops._fresh(q[1:], None, other, q)
    assert copied is not q and torch.equal(copied, q[1:])
    assert copied.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
    own = torch.zeros(2)
    assert ops._fresh(own, q, None, other) is own
    empty = q[:0]
    assert ops._fresh(empty, q) is empty  # nothing to share


def test_fresh_pair_copies_what_fresh_copies():
    q, kv = torch.zeros(4, 3), torch.zeros(5, 2)
    cases = [(torch.zeros(2), torch.zeros(3)), (q[1:], torch.zeros(3)), (torch.zeros(2), kv[2]), (q, kv[:0]),
             (q[:0], kv)]
    for out, lse in cases:
        got = ops._fresh_pair(out, lse, q, kv)
        expected = ops._fresh(out, q, kv), ops._fresh(lse, q, kv)
        for g, e, given in zip(got, expected, (out, lse)):
            assert (g is given) == (e is given)
            assert torch.equal(g, e)
            if g is not given:
                assert g.untyped_storage().data_ptr() not in (q.untyped_storage().data_ptr(),
                                                                kv.untyped_storage().data_ptr())


def test_native_inputs_keep_plain_tensors_on_the_device_without_converting(monkeypatch):
    backend = registry._load("triton")
    monkeypatch.setattr(type(backend), "device", lambda self: "meta")
    converted = []
    convert = interop.convert
    monkeypatch.setattr(interop, "convert", lambda x, *a: converted.append(x) or convert(x, *a))
    q, cpu = torch.zeros(2, device="meta"), torch.zeros(2)
    parameter = torch.nn.Parameter(torch.zeros(2, device="meta"))
    native = ops._native_inputs(backend, dict(q=q, p=parameter, c=cpu, n=3, none=None))
    assert native["q"] is q and native["n"] == 3 and native["none"] is None
    assert len(converted) == 2 and converted[0] is parameter and converted[1] is cpu  # a subclass, another device
    assert native["p"] is parameter and native["c"].device == torch.device("meta")


def test_native_inputs_of_cupy_on_torchs_stream_name_the_device(monkeypatch):
    class CupyLike(Backend):
        name, array_kind = "cupy-like", "cupy"

    seen = []
    monkeypatch.setattr(interop, "to_cupy_on_torch_stream", lambda x, device, stream_device: seen.append(
        (x, device, stream_device)) or "wrapped")
    monkeypatch.setattr(interop, "convert", lambda x, kind, device=None: "converted")
    q = torch.zeros(2)
    assert ops._native_inputs(CupyLike(), dict(q=q, n=1), 3) == dict(q="wrapped", n=1)
    assert len(seen) == 1 and seen[0][0] is q and seen[0][1:] == (None, 3)
    assert ops._native_inputs(CupyLike(), dict(q=q, n=1)) == dict(q="converted", n=1)  # no stream made current


# --------------------------------------------------------------------------- the accepted signatures
def _details(q, kv, indices, topk_length=None, attn_sink=None, sm_scale=0.5, d_v=4):
    return ops._sparse_mla_details(q, kv, indices, topk_length, attn_sink, sm_scale, d_v)


def test_the_written_out_signature_tells_apart_what_the_generic_one_does():
    q, kv, indices = torch.zeros(3, 2, 8), torch.zeros(5, 8), torch.zeros(3, 4, dtype=torch.int32)
    base = _details(q, kv, indices)
    assert base == _details(q.clone(), kv.clone(), indices.clone())  # values are no part of it
    others = [
        _details(q.to(torch.float64), kv, indices),  # dtype
        _details(torch.zeros(3, 8, 2).transpose(1, 2), kv, indices),  # strides, same shape
        _details(torch.zeros(4, 2, 8), kv, indices),  # shape
        _details(q, torch.zeros(5, 8, device="meta"), indices),  # device
        _details(q, kv, indices.to(torch.int64)),
        _details(q, kv, indices, topk_length=torch.zeros(3, dtype=torch.int32)),
        _details(q, kv, indices, attn_sink=torch.zeros(2)),
        _details(q, kv, indices, sm_scale=0.25),
        _details(q, kv, indices, d_v=3),
    ]
    assert all(other != base for other in others)
    assert len(set(others)) == len(others)
    # The generic signature of the same inputs tells the same calls apart.
    def generic(q, kv, indices, topk_length=None, attn_sink=None, sm_scale=0.5, d_v=4):
        return ops._signature("sparse_mla", None, dict(q=q, kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v,
                                                       topk_length=topk_length, attn_sink=attn_sink))
    assert generic(q, kv, indices) == generic(q.clone(), kv.clone(), indices.clone())
    assert generic(q, kv, indices) != generic(q, kv, indices, topk_length=torch.zeros(3, dtype=torch.int32))
    assert generic(q, kv, indices) != generic(q, kv, indices.to(torch.int64))


def test_a_repeated_shape_with_other_strides_or_a_bad_dtype_is_checked_again(monkeypatch):
    import dsa_ref.torch as dt

    q, kv = torch.randn(3, 2, 8), torch.randn(5, 8)
    indices = torch.tensor([[0, 1], [2, -1], [4, 3]], dtype=torch.int32)
    ops._ACCEPTED.clear()
    calls = []
    checks = ops._sparse_mla_checks
    monkeypatch.setattr(ops, "_sparse_mla_checks", lambda *a: calls.append(1) or checks(*a))
    with torch.no_grad():
        expected = dt.sparse_mla(q, kv, indices, d_v=4, backend="numpy")
        dt.sparse_mla(q, kv, indices, d_v=4, backend="numpy")
        assert len(calls) == 1
        strided = torch.randn(3, 8, 2).transpose(1, 2).copy_(q)
        got = dt.sparse_mla(strided, kv, indices, d_v=4, backend="numpy")
        assert len(calls) == 2
        torch.testing.assert_close(got, expected)
        with pytest.raises(TypeError, match="indices.dtype must be one of int32, int64, got float32"):
            dt.sparse_mla(q, kv, indices.float(), d_v=4, backend="numpy")
        with pytest.raises(TypeError, match="q.dtype must be one of .*, got int32"):
            dt.sparse_mla(q.int(), kv, indices, d_v=4, backend="numpy")
        with pytest.raises(ValueError, match="topk_length must have shape"):
            dt.sparse_mla(q, kv, indices, d_v=4, topk_length=torch.zeros(2, dtype=torch.int32), backend="numpy")
        with pytest.raises(ValueError, match="sm_scale must be finite"):
            dt.sparse_mla(q, kv, indices, d_v=4, sm_scale=float("nan"), backend="numpy")
        with pytest.raises(ValueError, match="sm_scale must be finite"):  # NaN never equals a seen signature
            dt.sparse_mla(q, kv, indices, d_v=4, sm_scale=float("nan"), backend="numpy")


# --------------------------------------------------------------------------- the launcher's key
def test_int_codes_remembered_equal_the_range_tests(monkeypatch):
    from dsa_ref_backends.torch_triton import launch

    monkeypatch.setattr(launch, "_INT_CODE_OF", {})
    values = [0, 1, 15, 16, 17, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1,
              2**63 - 16, 2**63, 2**64 - 16, 2**64 - 1]
    cold = [launch._int_code(v) for v in values]
    launch._INT_CODE_OF.clear()
    for _ in range(2):  # the second round from the memo
        assert [launch.argument_key((v,))[0] for v in values] == cold
    assert launch.argument_key((True,)) != launch.argument_key((1,))  # True == 1, but a bool is u1
    assert launch.argument_key((2**64,)) is None and 2**64 not in launch._INT_CODE_OF
    monkeypatch.setattr(launch, "INT_CODES_LIMIT", 4)
    for v in range(100, 110):
        launch.argument_key((v,))
    assert len(launch._INT_CODE_OF) <= 4


# --------------------------------------------------------------------------- the CPU measurement
@pytest.mark.skipif(not triton.__version__.startswith(launch.FAST_PATH_TRITON_RELEASE + "."),
                    reason=f"the cached launch it times is written for Triton {launch.FAST_PATH_TRITON_RELEASE}")
def test_the_cpu_measurement_times_the_cached_launch():
    """tools/host_cost_cpu.py fails when a timed call reaches the plain launch (as it did with launchers
    made before its stand-ins were set)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "host_cost_cpu.py"
    done = subprocess.run([sys.executable, str(tool), "--calls", "3", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "launch _combine_launch (launch)" in done.stdout


# --------------------------------------------------------------------------- the backend
def test_the_device_follows_the_interpreter_switch_call_by_call(monkeypatch):
    backend = registry._load("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.device() == torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.device() == torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backend.device() == torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.device() == torch.device("cpu")


def test_the_fp8_decode_reads_only_its_own_kernel_switch_and_bf16_rows_the_gluon_ones(monkeypatch):
    read, forwarded = [], []

    def switch(chosen, variable):
        read.append(variable)
        return False

    monkeypatch.setattr(triton_backend, "kernel_switch", switch)
    monkeypatch.setattr(sparse_mla, "sparse_mla", lambda *args, **kwargs: forwarded.append(kwargs["kernel"]))
    backend = registry._load("triton")
    q = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    indices = torch.zeros(2, 8, dtype=torch.int32)
    backend.sparse_mla(q, torch.zeros(8, 656, dtype=torch.uint8), indices, sm_scale=0.1, d_v=512,
                       topk_length=None, attn_sink=None)
    # One switch, the Gluon FP8 kernel's (off: the tl kernel); none of the bf16 kernels' switches.
    assert read == ["DSA_REF_TRITON_GLUON_FP8"] and forwarded == ["tl"]
    read.clear()
    backend.sparse_mla(q, torch.zeros(8, 576, dtype=torch.bfloat16), indices, sm_scale=0.1, d_v=512,
                       topk_length=None, attn_sink=None)
    # bf16 rows read the Gluon switch first (and whatever variants of it the backend has).
    assert read[:1] == ["DSA_REF_TRITON_GLUON"] and forwarded == ["tl", "tl"]


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_gpu_tensors_on_the_current_device_pass_through_without_tensor_to(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend = registry._load("triton")
    assert backend.device() == torch.device("cuda")
    q = torch.zeros(2, 3, device="cuda")
    assert q.to(torch.device("cuda")) is q  # what the longer way, through Tensor.to, returned
    calls = []
    original = torch.Tensor.to

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting)
    native = ops._native_inputs(backend, dict(q=q, cpu=torch.zeros(2)))
    assert native["q"] is q and native["cpu"].is_cuda
    assert len(calls) == 1, "only the CPU tensor goes through Tensor.to"
    assert backend.to_native(q) is q
