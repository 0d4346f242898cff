"""dsa_ref.torch: differentiable custom ops. gradcheck in float64 on the NumPy reference, opcheck of
every op's schema and fake function, torch.compile without graph breaks, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dsa_ref  # noqa: E402
import dsa_ref.torch as dt  # noqa: E402
from dsa_ref import reference  # noqa: E402


def _sparse_inputs(dtype=torch.float64, s_q=5, s_kv=7, h=2, d_qk=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s_q, h, d_qk, dtype=dtype, generator=gen)
    kv = torch.randn(s_kv, d_qk, dtype=dtype, generator=gen)
    indices = torch.tensor([[0, 1, 2], [3, 3, -1], [6, 0, 1], [-1, -1, -1], [2, 4, 2**31 - 1]], dtype=torch.int32)
    return q, kv, indices


def _finite(lse):
    return torch.where(torch.isinf(lse), 0.0, lse)


@pytest.mark.parametrize("with_sink,with_length", [(False, False), (True, True)])
def test_sparse_mla_gradcheck_on_the_reference(with_sink, with_length):
    q, kv, indices = _sparse_inputs()
    q.requires_grad_(True)
    kv.requires_grad_(True)
    sink = torch.randn(2, dtype=torch.float64, requires_grad=True) if with_sink else None
    length = torch.tensor([3, 1, 2, 0, 3], dtype=torch.int32) if with_length else None

    def f(q, kv, *sink_arg):
        out, lse = dt.sparse_mla(q, kv, indices, sm_scale=0.4, d_v=6, topk_length=length,
                                 attn_sink=sink_arg[0] if sink_arg else None, backend="numpy")
        return out, _finite(lse)

    assert torch.autograd.gradcheck(f, (q, kv) + ((sink,) if with_sink else ()))


def test_sparse_mla_equals_the_public_op_and_its_backward():
    q, kv, indices = _sparse_inputs(torch.float32)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    out, lse = dt.sparse_mla(q, kv, indices, d_v=6, backend="numpy")
    d_out = torch.randn_like(out)
    out.backward(d_out)
    with torch.no_grad():
        ref_out, ref_lse = dsa_ref.sparse_mla(q, kv, indices, d_v=6)
        dq, dkv = dsa_ref.sparse_mla_backward(q, kv, indices, ref_out, ref_lse, d_out, d_v=6)
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(q.grad, dq)
    torch.testing.assert_close(kv.grad, dkv)
    assert q.grad.dtype == q.dtype and torch.all(kv.grad[5] == 0)  # row 5 is read by nobody


def test_dsa_attention_gradients_reach_q_and_kv_not_the_indexer():
    gen = torch.Generator().manual_seed(1)
    s, h, d, h_i, d_i = 6, 2, 8, 3, 4
    q = torch.randn(s, h, d, dtype=torch.float64, generator=gen, requires_grad=True)
    kv = torch.randn(s, d, dtype=torch.float64, generator=gen, requires_grad=True)
    q_index = torch.randn(s, h_i, d_i, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.randn(s, h_i, dtype=torch.float64, generator=gen)
    k_index = torch.randn(s, d_i, dtype=torch.float64, generator=gen)
    start, end = (torch.from_numpy(x) for x in dsa_ref.causal_key_ranges(s, s))

    def f(q, kv):
        out, lse, _ = dt.dsa_attention(q, kv, q_index, weights, k_index, topk=3, key_start=start, key_end=end,
                                       d_v=8, backend="numpy")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, kv))
    out, lse, indices = dt.dsa_attention(q, kv, q_index, weights, k_index, topk=3, key_start=start, key_end=end,
                                         d_v=8, backend="numpy")
    assert indices.dtype == torch.int32 and not indices.requires_grad
    assert bool((indices <= torch.arange(s)[:, None]).all()), "causal ranges respected"
    out.sum().backward()
    assert q_index.grad is None


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_gradcheck_and_detached_target(sparse):
    gen = torch.Generator().manual_seed(2)
    s_q, s_kv, h_i, d_i = 4, 6, 3, 5
    q = torch.randn(s_q, h_i, d_i, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(s_q, h_i, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(s_kv, d_i, dtype=torch.float64, generator=gen, requires_grad=True)
    k_scale = torch.rand(s_kv, dtype=torch.float64, generator=gen) + 0.5
    if sparse:
        indices = torch.tensor([[0, 1, 2], [3, 3, -1], [5, 0, 1], [-1, -1, -1]], dtype=torch.int32)
        target = torch.rand(s_q, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        kwargs = dict(indices=indices)
    else:
        start, end = (torch.from_numpy(x) for x in dsa_ref.causal_key_ranges(s_q, s_kv))
        target = torch.rand(s_q, s_kv, dtype=torch.float64, generator=gen, requires_grad=True)
        kwargs = dict(key_start=start, key_end=end)

    def f(q, w, k):
        return dt.indexer_loss(q, w, k, target, k_scale=k_scale, backend="numpy", **kwargs)

    assert torch.autograd.gradcheck(f, (q, w, k))
    f(q, w, k).sum().backward()
    assert target.grad is None, "the target is a constant of the loss"
    expected = reference.indexer_loss(q.detach().numpy(), w.detach().numpy(), k.detach().numpy(),
                                      target.detach().numpy(), k_scale=k_scale.numpy(),
                                      **{key: v.numpy() for key, v in kwargs.items()})
    np.testing.assert_allclose(f(q, w, k).detach().numpy(), expected)


def test_attention_target_is_the_reference_and_carries_no_gradient():
    q, kv, indices = _sparse_inputs(torch.float32)
    q.requires_grad_(True)
    out, lse = dt.sparse_mla(q, kv, indices, d_v=8, backend="numpy")
    target = dt.attention_target(q, kv, indices, lse, backend="numpy")
    assert not target.requires_grad
    expected = reference.attention_target(q.detach().numpy(), kv.numpy(), indices.numpy(), lse.detach().numpy())
    np.testing.assert_allclose(target.numpy(), expected)


def test_opcheck_every_op():
    q, kv, indices = _sparse_inputs(torch.float32)
    out, lse = dt.sparse_mla(q, kv, indices, d_v=8, backend="numpy")
    q_index, weights, k_index = torch.randn(5, 2, 4), torch.randn(5, 2), torch.randn(7, 4)
    start, end = torch.zeros(5, dtype=torch.int32), torch.full((5,), 7, dtype=torch.int32)
    scores = dt.lightning_indexer(q_index, weights, k_index, backend="numpy")
    target = dt.attention_target(q, kv, indices, lse, backend="numpy")
    ops = torch.ops.dsa_ref
    cases = [
        (ops.sparse_mla, (q.requires_grad_(True), kv.requires_grad_(True), indices, None, None, 0.3, 8, "numpy")),
        (ops.sparse_mla_backward, (q.detach(), kv.detach(), indices, out, lse, torch.randn_like(out), None, None,
                                   None, 0.3, 8, False, "numpy")),
        (ops.lightning_indexer, (q_index, weights, k_index, start, end, None, "numpy")),
        (ops.topk_indices, (scores, 3, "numpy")),
        (ops.attention_target, (q.detach(), kv, indices, lse, None, 0.3, "numpy")),
        (ops.indexer_loss, (q_index.requires_grad_(True), weights, k_index, target, indices, None, None, None,
                            "numpy")),
        (ops.dsa_attention, (q, kv, q_index.detach(), weights, k_index, start, end, None, 3, 0.3, 8, "numpy")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_the_paged_indexer_op_is_the_reference_and_passes_opcheck():
    from dsa_ref.testing import problems

    problem = problems.paged_indexer_problem(np.random.default_rng(2), batch=3, next_n=2, h_i=4, d_i=16,
                                             block_size=4, max_blocks=5, unallocated_fraction=0.2,
                                             max_context_len=True)
    inputs = {name: torch.from_numpy(np.ascontiguousarray(value.view(np.uint8))).view(torch.float8_e4m3fn)
              if isinstance(value, np.ndarray) and value.dtype.itemsize == 1 and value.dtype != np.uint8
              else torch.from_numpy(value) if isinstance(value, np.ndarray) else value
              for name, value in problem.inputs.items()}
    got = dt.lightning_indexer_paged(**inputs, backend="numpy")
    np.testing.assert_array_equal(got.numpy(), reference.lightning_indexer_paged(**problem.inputs))
    # A context length past the table's positions is clamped on the device, not read (no sync).
    longer = dict(inputs, context_lens=inputs["context_lens"] + 1000)
    assert dt.lightning_indexer_paged(**longer, backend="numpy").shape == got.shape
    # (opcheck's schema test compares with arithmetic torch has no float8 kernel for: float32 queries)
    torch.library.opcheck(torch.ops.dsa_ref.lightning_indexer_paged,
                          (inputs["q"].float(), inputs["weights"], inputs["k_cache"], inputs["block_table"],
                           inputs["context_lens"], 2, inputs["max_context_len"], "numpy"),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_training_step_compiles_with_no_graph_break():
    q, kv, indices = _sparse_inputs(torch.float32)
    q.requires_grad_(True)
    kv.requires_grad_(True)
    q_index = torch.randn(5, 2, 4, requires_grad=True)
    weights, k_index = torch.randn(5, 2), torch.randn(7, 4)

    def step(q, kv, q_index):
        out, lse = dt.sparse_mla(q, kv, indices, d_v=8)
        target = dt.attention_target(q, kv, indices, lse)
        return out.square().mean() + dt.indexer_loss(q_index, weights, k_index, target, indices=indices).mean()

    with dsa_ref.use_backend("numpy"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(q, kv, q_index)
        loss.backward()
        grads = [x.grad.clone() for x in (q, kv, q_index)]
        for x in (q, kv, q_index):
            x.grad = None
        step(q, kv, q_index).backward()
    for got, x in zip(grads, (q, kv, q_index)):
        torch.testing.assert_close(got, x.grad)


def test_bad_inputs_get_the_public_ops_errors():
    q, kv, indices = _sparse_inputs(torch.float32)
    with pytest.raises(ValueError, match="kv must have shape"):
        dt.sparse_mla(q, kv[:, :4], indices, d_v=4, backend="numpy")
    with pytest.raises(ValueError, match="d_v must be <= d_qk"):
        dt.sparse_mla(q, kv, indices, d_v=9, backend="numpy")
    with pytest.raises(TypeError, match="backend must be a backend name"):
        dt.sparse_mla(q, kv, indices, d_v=8, backend=3)
    with pytest.raises(ValueError, match="not a valid dsa_ref backend"):
        dt.sparse_mla(q, kv, indices, d_v=8, backend="nope")


def test_the_packed_fp8_cache_is_refused_while_recording_gradients_and_runs_without():
    q = torch.randn(2, 2, 576, requires_grad=True)
    cache = torch.from_numpy(dsa_ref.pack_kv_cache_fp8(np.random.default_rng(0).standard_normal((4, 576))))
    indices = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    with pytest.raises(TypeError, match="packed FP8 cache"):
        dt.sparse_mla(q, cache, indices, backend="numpy")
    with torch.no_grad():
        out, lse = dt.sparse_mla(q, cache, indices, backend="numpy")
    assert out.shape == (2, 2, 512) and torch.isfinite(lse).all()


def test_key_ranges_are_clamped_not_read():
    q_index, weights, k_index = torch.randn(3, 2, 4), torch.randn(3, 2), torch.randn(5, 4)
    scores = dt.lightning_indexer(q_index, weights, k_index, key_start=torch.tensor([-2, 1, 4]),
                                  key_end=torch.tensor([2, 9, 3]), backend="numpy")
    expected = dt.lightning_indexer(q_index, weights, k_index, key_start=torch.tensor([0, 1, 4]),
                                    key_end=torch.tensor([2, 5, 4]), backend="numpy")
    torch.testing.assert_close(scores, expected)


# ---------------------------------------------------------------------------- on a GPU
def _cuda_backends():
    return [name for name in ("triton", "cupy") if name in dsa_ref.available_backends()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_a_training_step_compiles_with_inductor_on_the_gpu(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"backend {backend} is not available")
    torch.manual_seed(0)
    s, s_kv, h, d_qk, d_v, topk, h_i, d_i = 256, 1024, 16, 576, 512, 128, 64, 128
    q = torch.randn(s, h, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(s_kv, d_qk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q_index = torch.randn(s, h_i, d_i, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.randn(s, h_i, device="cuda") * h_i**-0.5
    k_index = torch.randn(s_kv, d_i, device="cuda", dtype=torch.bfloat16)
    start = torch.zeros(s, dtype=torch.int32, device="cuda")
    end = torch.arange(s_kv - s + 1, s_kv + 1, dtype=torch.int32, device="cuda")

    def step(q, kv, q_index):
        out, lse, indices = dt.dsa_attention(q, kv, q_index, weights, k_index, topk=topk, key_start=start,
                                             key_end=end, d_v=d_v, backend=backend)
        target = dt.attention_target(q, kv, indices, lse, backend=backend)
        loss = dt.indexer_loss(q_index, weights, k_index, target, indices=indices, backend=backend)
        return out.float().square().mean() + loss.mean()

    compiled = torch.compile(step, fullgraph=True)
    compiled(q, kv, q_index).backward()
    grads = [x.grad.clone() for x in (q, kv, q_index)]
    for x in (q, kv, q_index):
        x.grad = None
    step(q, kv, q_index).backward()
    for got, x in zip(grads, (q, kv, q_index)):
        torch.testing.assert_close(got.float(), x.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_a_decode_step_replays_in_a_cuda_graph_equal_to_eager(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"backend {backend} is not available")
    from dsa_ref_backends.bench import random_fp8_cache

    torch.manual_seed(1)
    batch, s_kv, h, topk, h_i, d_i = 8, 4096, 128, 2048, 64, 128
    cache = random_fp8_cache(torch, batch * s_kv, "cuda")
    q = torch.randn(batch, h, 576, device="cuda", dtype=torch.bfloat16)
    q_index = torch.randn(batch, h_i, d_i, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn(batch, h_i, device="cuda") * h_i**-0.5
    k_index = torch.randn(batch * s_kv, d_i, device="cuda", dtype=torch.bfloat16)
    start = torch.arange(batch, dtype=torch.int32, device="cuda") * s_kv  # each sequence's keys: its own slots
    end = start + torch.randint(1, s_kv + 1, (batch,), dtype=torch.int32, device="cuda")

    def decode_step():
        scores = dt.lightning_indexer(q_index, weights, k_index, key_start=start, key_end=end, backend=backend)
        indices = dt.topk_indices(scores, topk, backend=backend)
        return dt.sparse_mla(q, cache, indices, backend=backend)

    from dsa_ref_backends.bench import capture_cuda_graph

    graph, captured = capture_cuda_graph(torch, decode_step)
    eager = decode_step()
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, eager):
        assert torch.equal(got, expected), "the replayed graph differs from the eager step"


# ---------------------------------------------------------------------------- the eager fast path
def test_eager_inference_skips_the_dispatcher_and_repeated_checks(monkeypatch):
    """A call that records no gradient runs the op's body directly, and a repeated signature skips the
    argument checks; a new signature is checked again, and bad input still raises."""
    from dsa_ref.torch import ops as torch_ops

    q, kv, indices = _sparse_inputs(torch.float32)
    torch_ops._ACCEPTED.clear()
    calls = []
    checks = torch_ops._sparse_mla_checks
    monkeypatch.setattr(torch_ops, "_sparse_mla_checks", lambda *a: calls.append(1) or checks(*a))
    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through torch.library's dispatch")
    monkeypatch.setattr(torch_ops, "_sparse_mla", refuse)
    with torch.no_grad():
        first = dt.sparse_mla(q, kv, indices, d_v=6, backend="numpy")
        again = dt.sparse_mla(q, kv, indices, d_v=6, backend="numpy")
        assert len(calls) == 1
        dt.sparse_mla(q, kv, indices, d_v=5, backend="numpy")  # another signature: checked
        assert len(calls) == 2
        with pytest.raises(ValueError, match="d_v"):
            dt.sparse_mla(q, kv, indices, d_v=9, backend="numpy")
        with pytest.raises(ValueError, match="indices"):
            dt.sparse_mla(q, kv, indices[:4], d_v=6, backend="numpy")
    ref_out, ref_lse = dsa_ref.sparse_mla(q, kv, indices, d_v=6)
    for out, lse in (first, again):
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)
    q.requires_grad_(True)  # recording a gradient: the custom op, never the shortcut
    with pytest.raises(AssertionError, match="dispatch"):
        dt.sparse_mla(q, kv, indices, d_v=6, backend="numpy")


def test_eager_path_clamps_topk_length_and_key_ranges_every_call():
    """The clamps are data operations: a repeated signature with other values still gets them."""
    from dsa_ref.torch import ops as torch_ops

    q, kv, indices = _sparse_inputs(torch.float32)
    torch_ops._ACCEPTED.clear()
    with torch.no_grad():
        for length in ([3, 1, 2, 0, 3], [9, -4, 2, 0, 7]):
            length = torch.tensor(length, dtype=torch.int32)
            out, lse = dt.sparse_mla(q, kv, indices, d_v=6, topk_length=length, backend="numpy")
            ref_out, ref_lse = reference.sparse_mla(q.numpy(), kv.numpy(), indices.numpy(), d_v=6,
                                                    topk_length=length.clip(0, 3).numpy())
            np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-6)
        k = torch.randn(7, 4)
        q_index, weights = torch.randn(5, 2, 4), torch.rand(5, 2)
        for start, end in (([0, 1, 2, 3, 4], [3, 4, 5, 6, 7]), ([-3, 1, 6, 3, 4], [3, 99, 2, 6, 7])):
            start, end = torch.tensor(start, dtype=torch.int32), torch.tensor(end, dtype=torch.int32)
            scores = dt.lightning_indexer(q_index, weights, k, key_start=start, key_end=end, backend="numpy")
            lo = start.clip(0, 7)
            hi = lo + (end.clip(0, 7) - lo).clip(0, 7)
            ref = reference.lightning_indexer(q_index.numpy(), weights.numpy(), k.numpy(), key_start=lo.numpy(),
                                              key_end=hi.numpy())
            np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_cupy_results_go_back_to_torch_on_torch_stream(monkeypatch):
    """A CuPy backend's results are handed to torch inside the block that makes CuPy's current stream
    torch's: outside it, DLPack's exchange records an event on CuPy's own stream for torch's stream to
    wait on, which a CUDA graph capture refuses (cudaErrorStreamCaptureIsolation)."""
    import contextlib

    from dsa_ref.torch import ops as torch_ops

    state = {"inside": False}
    converted = []

    @contextlib.contextmanager
    def on_torch_stream(backend, like):
        state["inside"] = True
        yield
        state["inside"] = False

    class CudaLike:  # what _run_inputs reads of ``like``
        is_cuda = True

        @staticmethod
        def get_device():
            return 0

    class CupyLikeBackend:
        array_kind = "cupy"

        @staticmethod
        def to_native(value):
            return value

        @staticmethod
        def sparse_mla(**inputs):
            return "out", "lse"

    monkeypatch.setattr(torch_ops, "_on_torch_stream", on_torch_stream)
    monkeypatch.setattr(torch_ops, "_like", lambda x, like: converted.append((x, state["inside"])) or x)
    assert torch_ops._run_inputs(CupyLikeBackend(), "sparse_mla", CudaLike(), {}, True) == ("out", "lse")
    assert converted == [("out", True), ("lse", True)], converted


# ---------------------------------------------------------------------------- backends taking torch tensors
def test_a_backend_taking_torch_tensors_gets_them_as_they_are(monkeypatch):
    """Backend.sparse_mla_torch: called first with the tensors themselves (topk_length clamped); its result
    is the op's; None hands the call to the general path (conversions, Backend.sparse_mla)."""
    from dsa_ref import registry
    from dsa_ref.torch import ops as torch_ops

    q, kv, indices = _sparse_inputs(torch.float32)
    length = torch.tensor([3, 9, -2, 0, 3], dtype=torch.int32)
    backend = registry.get_backend("numpy")
    seen = []

    def take(q_, kv_, indices_, topk_length, attn_sink, sm_scale, d_v):
        seen.append((q_, kv_, indices_, topk_length, attn_sink, sm_scale, d_v))
        return None if len(seen) == 1 else (torch.ones(5, 2, 6), torch.zeros(5, 2))

    monkeypatch.setattr(type(backend), "sparse_mla_torch", staticmethod(take), raising=False)
    torch_ops._ACCEPTED.clear()
    with torch.no_grad():
        general = dt.sparse_mla(q, kv, indices, d_v=6, topk_length=length, backend="numpy")
        taken = dt.sparse_mla(q, kv, indices, d_v=6, topk_length=length, backend="numpy")
    assert seen[0][0] is q and seen[0][1] is kv and seen[0][2] is indices and seen[0][6] == 6
    assert torch.equal(seen[0][3], length.clip(0, 3))
    expected = dsa_ref.sparse_mla(q.numpy(), kv.numpy(), indices.numpy(), d_v=6, topk_length=length.clip(0, 3).numpy())
    np.testing.assert_allclose(general[0].numpy(), expected[0])
    assert torch.equal(taken[0], torch.ones(5, 2, 6)) and torch.equal(taken[1], torch.zeros(5, 2))


def test_the_triton_backend_takes_plain_tensors_on_its_device_as_they_are(monkeypatch):
    pytest.importorskip("triton")
    if "triton" not in dsa_ref.available_backends():
        pytest.skip("the triton backend is not available here")
    from dsa_ref import registry

    backend = registry.get_backend("triton")
    q, kv, indices = _sparse_inputs(torch.float32, h=16, d_qk=32)
    q, kv = q.to(backend.device()), kv.to(backend.device())
    indices = indices.to(backend.device())
    calls = []
    monkeypatch.setattr(type(backend), "sparse_mla", lambda self, *a, **k: calls.append((a, k)) or "ran")
    assert backend.sparse_mla_torch(q, kv, indices, None, None, 0.5, 16) == "ran"
    (arguments, keywords), = calls
    assert arguments[0] is q and arguments[1] is kv and arguments[2] is indices
    assert keywords == dict(sm_scale=0.5, d_v=16, topk_length=None, attn_sink=None)
    parameter = torch.nn.Parameter(q.clone())  # a subclass: the general path converts it
    assert backend.sparse_mla_torch(parameter, kv, indices, None, None, 0.5, 16) is None
    elsewhere = torch.device("meta")
    assert backend.sparse_mla_torch(q, kv.to(elsewhere), indices, None, None, 0.5, 16) is None
    assert len(calls) == 1
