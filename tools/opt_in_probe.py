"""First runs of the opt-in kernels, each in a child process of its own with a time limit, so a kernel
that hangs (a barrier waited on forever) or faults costs its own limit and not the others'.

For each kernel, on one small problem with no awkward input (all slots valid, no sink, no topk_length)
and then on the awkward problem of its GPU tests, the child reports how far the outputs are from the
float64 reference and *where*: the largest error per head, per block of 64 columns and per 64 slots of
the key rows, the NaN count, and for each output column the reference column it matches best (a wrong
fragment layout shows up as a permutation there). The kernels:

* ``gluon``      Triton's Gluon sparse MLA forward (``kernel="gluon"``);
* ``wgmma``      CuPy's wgmma sparse MLA forward (``CupyBackend.hopper_forward``);
* ``det_mma``    CuPy's deterministic tensor-core sparse MLA backward
                 (``CupyBackend.deterministic_tensor_cores`` under ``dsa_ref.use_deterministic(True)``);
* ``wgmma_fp8``  CuPy's wgmma sparse MLA forward over the packed FP8 cache (``CupyBackend.hopper_fp8_decode``);
* ``wgmma_bwd``  CuPy's wgmma sparse MLA backward (``CupyBackend.hopper_backward``, default mode);
* ``wgmma_v2``   CuPy's second wgmma sparse MLA forward (``CupyBackend.hopper_forward_v2``);
* ``gluon_pingpong``  Triton's warp-specialized ping-pong Gluon forward (``kernel="gluon_pingpong"``);
* ``wgmma_det``  CuPy's deterministic wgmma sparse MLA backward (``CupyBackend.hopper_deterministic_backward``
                 under ``dsa_ref.use_deterministic(True)``);
* ``gluon_det``  Triton's deterministic Gluon sparse MLA backward (``TritonBackend.hopper_deterministic_backward``
                 under ``dsa_ref.use_deterministic(True)``);
* ``radix_topk`` Triton's sampled-cut top-k (``TritonBackend.radix_topk``), one pass and two, through the
                 kit's tie-aware check (scores with ties, ``-inf`` and NaN);
* ``paged_v2``   CuPy's second wgmma paged indexer (``CupyBackend.paged_indexer_wgmma_v2``), next_n 1 and 2;
* ``wgmma_fp8_v2``  CuPy's second wgmma forward over the packed FP8 cache (``CupyBackend.hopper_fp8_decode_v2``);
* ``wgmma_fp8_pair``  the same with a query's two head blocks as a cluster pair sharing their tiles
                 (``CupyBackend.hopper_fp8_decode_pair``; both problems have h 128);
* ``wgmma_v3``, ``wgmma_fp8_v3``, ``wgmma_fp8_pair_v3``  the split-V consumers in those three
                 (``CupyBackend.hopper_split_v``);
* ``gluon_fp8``  Triton's ping-pong Gluon forward over the packed FP8 cache, its producer dequantizing
                 (``kernel="gluon_fp8"``, ``TritonBackend.hopper_fp8_decode``).

On a GPU machine, from a checkout::

    python tools/opt_in_probe.py --out probe.json [--kernels gluon,wgmma,det_mma] [--timeout 90]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KERNELS = ("gluon", "wgmma", "det_mma", "wgmma_fp8", "wgmma_bwd", "wgmma_v2", "gluon_pingpong", "wgmma_det",
           "gluon_det", "radix_topk", "paged_v2", "wgmma_fp8_v2", "wgmma_fp8_pair", "wgmma_v3", "wgmma_fp8_v3",
           "wgmma_fp8_pair_v3", "gluon_fp8")
#: The kernels :func:`probe_backward` runs; :func:`probe_topk` and :func:`probe_paged` take one each,
#: :func:`probe_forward` the rest.
BACKWARD_KERNELS = ("det_mma", "wgmma_bwd", "wgmma_det", "gluon_det")
#: The forwards over the packed FP8 cache.
FP8_KERNELS = ("wgmma_fp8", "wgmma_fp8_v2", "wgmma_fp8_pair", "wgmma_fp8_v3", "wgmma_fp8_pair_v3", "gluon_fp8")


def error_pattern(name: str, got: np.ndarray, expected: np.ndarray, *, row_axis_name: str) -> dict:
    """Where ``got`` differs from ``expected`` (same shape, last axis = columns)."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    error = np.where(finite, np.abs(np.nan_to_num(got, nan=np.inf) - expected), 0.0)
    scale = float(np.abs(expected[finite]).max()) if finite.any() else 1.0
    columns = got.reshape(-1, got.shape[-1])
    reference_columns = np.nan_to_num(expected.reshape(-1, expected.shape[-1]))
    row = dict(output=name, shape=list(got.shape), scale=scale, max_error=float(error.max()),
               nan_count=int(np.isnan(got).sum()), relative_max_error=float(error.max() / (scale + 1e-30)))
    if got.ndim >= 2:
        per_column_block = error.reshape(-1, got.shape[-1])
        blocks = [float(per_column_block[:, c:c + 64].max()) for c in range(0, got.shape[-1], 64)]
        row["max_error_per_64_columns"] = blocks
        # the reference column each output column is closest to (mean absolute difference)
        if columns.shape[0] <= 4096:
            distance = np.abs(np.nan_to_num(columns)[:, :, None] - reference_columns[:, None, :]).mean(axis=0)
            best = distance.argmin(axis=1)
            wrong = np.nonzero(best != np.arange(best.size))[0]
            row["columns_matching_another_column"] = [[int(c), int(best[c])] for c in wrong[:64]]
    if got.ndim == 3:
        row[f"max_error_per_{row_axis_name}"] = [float(x) for x in error.max(axis=(0, 2))]
    if got.ndim >= 2:
        per_leading = error.reshape(got.shape[0], -1).max(axis=1)
        row["max_error_per_64_leading"] = [float(per_leading[i:i + 64].max()) for i in range(0, got.shape[0], 64)]
    return row


def _forward_problem(small: bool, packed_fp8: bool = False, pairs: bool = False):
    from dsa_ref.testing import problems

    rng = np.random.default_rng(3 if small else 4)
    if small:
        problem = problems.sparse_mla_problem(rng, s_q=4, s_kv=600, h=128 if pairs else 64, d_qk=576, d_v=512,
                                              topk=128, dtype="bfloat16", packed_fp8=packed_fp8)
    else:
        problem = problems.sparse_mla_problem(rng, s_q=4, s_kv=600, h=128, d_qk=576, d_v=512, topk=320,
                                              dtype="bfloat16", invalid_fraction=0.2, duplicate_fraction=0.25,
                                              attn_sink=True, topk_length=True, packed_fp8=packed_fp8)
    return problem


def probe_forward(kernel: str, small: bool) -> list[dict]:
    import dsa_ref
    from dsa_ref import interop, reference

    # The pair kernel takes h a multiple of 128 (smaller h runs the v2 kernel).
    problem = _forward_problem(small, packed_fp8=kernel in FP8_KERNELS, pairs=kernel.startswith("wgmma_fp8_pair"))
    inputs = problem.inputs
    if kernel in ("gluon", "gluon_pingpong", "gluon_fp8"):
        import torch

        from dsa_ref_backends.torch_triton import sparse_mla as triton_forward

        def cuda(x):
            return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).cuda()

        q = cuda(inputs["q"].astype(np.float32)).to(torch.bfloat16)
        # The packed FP8 cache is uint8 bytes as it is; dense rows are rounded to bf16.
        kv = cuda(inputs["kv"]) if kernel == "gluon_fp8" else cuda(inputs["kv"].astype(np.float32)).to(torch.bfloat16)
        out, lse = triton_forward.sparse_mla(q, kv, cuda(inputs["indices"]), 576**-0.5, 512,
                                             cuda(inputs.get("topk_length")), cuda(inputs.get("attn_sink")),
                                             kernel=kernel)
        torch.cuda.synchronize()
    else:
        from dsa_ref_backends.cupy_cuda.backend import CupyBackend

        backend = CupyBackend()
        backend.hopper_forward = kernel in ("wgmma", "wgmma_v2", "wgmma_v3")
        backend.hopper_forward_v2 = kernel in ("wgmma_v2", "wgmma_v3")
        backend.hopper_fp8_decode = kernel in FP8_KERNELS
        backend.hopper_fp8_decode_v2 = kernel in FP8_KERNELS[1:]
        backend.hopper_fp8_decode_pair = kernel.startswith("wgmma_fp8_pair")
        backend.hopper_split_v = kernel.endswith("_v3")
        backend.poison_outputs = True
        out, lse = dsa_ref.sparse_mla(**problem.native_inputs(backend), backend=backend)
    out, lse = interop.to_numpy(out), interop.to_numpy(lse)
    expected_out, expected_lse = reference.sparse_mla(**inputs)
    return [error_pattern("out", out, expected_out, row_axis_name="head"),
            error_pattern("lse", lse, expected_lse, row_axis_name="head")]


def probe_backward(small: bool, kernel: str) -> list[dict]:
    import dsa_ref
    from dsa_ref import interop, reference
    from dsa_ref_backends.cupy_cuda.backend import CupyBackend

    problem = _forward_problem(small)
    inputs = dict(problem.inputs)
    out, lse = reference.sparse_mla(**inputs)
    rng = np.random.default_rng(9)
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    deterministic = kernel in ("det_mma", "wgmma_det", "gluon_det")
    if kernel == "gluon_det":
        from dsa_ref_backends.torch_triton.backend import TritonBackend

        backend = TritonBackend()
        backend.hopper_backward = backend.hopper_deterministic_backward = True
    else:
        backend = CupyBackend()
        backend.deterministic_tensor_cores = deterministic
        backend.hopper_backward = kernel in ("wgmma_bwd", "wgmma_det")
        backend.hopper_deterministic_backward = kernel == "wgmma_det"
    arguments = dict(q=inputs["q"], kv=inputs["kv"], indices=inputs["indices"], out=out.astype(np.float32),
                     lse=lse.astype(np.float32), d_out=d_out, topk_length=inputs.get("topk_length"),
                     attn_sink=inputs.get("attn_sink"))
    native = {name: (backend.to_native(value) if isinstance(value, np.ndarray) else value)
              for name, value in arguments.items()}
    with dsa_ref.use_deterministic(deterministic):
        got = dsa_ref.sparse_mla_backward(**native, backend=backend)
        again = dsa_ref.sparse_mla_backward(**native, backend=backend)
    expected = reference.sparse_mla_backward(**arguments)
    rows = [error_pattern(name, interop.to_numpy(g), e, row_axis_name="head")
            for name, g, e in zip(("dq", "dkv", "d_attn_sink"), got, expected)]
    rows.append(dict(output="dkv bitwise equal on a rerun",
                     equal=bool(np.array_equal(interop.to_numpy(got[1]), interop.to_numpy(again[1])))))
    return rows


def probe_topk(small: bool) -> list[dict]:
    """The sampled-cut top-k against the kit's tie-aware check (:func:`dsa_ref.testing.assertions.check_topk`):
    one pass (small: 64 rows of 8192) and two passes (awkward: few long rows, ties, -inf and NaN)."""
    import torch

    from dsa_ref.testing import problems
    from dsa_ref.testing.assertions import check_topk
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    rng = np.random.default_rng(5 if small else 6)
    if small:
        problem = problems.topk_problem(rng, s_q=64, s_kv=8192, topk=2048)
    else:
        problem = problems.topk_problem(rng, s_q=4, s_kv=65536, topk=2048, plateau=True, nan_fraction=0.01)
    scores, topk = problem.inputs["scores"], problem.inputs["topk"]
    backend = TritonBackend()
    backend.radix_topk = True
    got = backend.topk_indices(torch.from_numpy(scores).cuda(), topk).cpu().numpy()
    try:
        check_topk(got, scores, topk)
        failure = None
    except AssertionError as error:
        failure = str(error)[:2000]
    return [dict(output="indices", rows=int(got.shape[0]), conforms=failure is None, failure=failure)]


def probe_paged(small: bool) -> list[dict]:
    """The second wgmma paged indexer against the reference: next_n 1 (small) and 2 with holes in the
    block table (awkward), pages of 64, H_I 64, d_I 128 in fp8."""
    import dsa_ref
    from dsa_ref import interop, reference
    from dsa_ref.testing import problems
    from dsa_ref_backends.cupy_cuda.backend import CupyBackend

    rng = np.random.default_rng(7 if small else 8)
    problem = problems.paged_indexer_problem(rng, batch=4, next_n=1 if small else 2, h_i=64, d_i=128,
                                             block_size=64, max_blocks=8, spare_blocks=0 if small else 3,
                                             unallocated_fraction=0.0 if small else 0.1)
    backend = CupyBackend()
    backend.paged_indexer_wgmma_v2 = True
    backend.poison_outputs = True
    got = interop.to_numpy(dsa_ref.lightning_indexer_paged(**problem.native_inputs(backend), backend=backend))
    expected = reference.lightning_indexer_paged(**problem.inputs)
    return [error_pattern("scores", got, expected, row_axis_name="query")]


def child(kernel: str) -> int:
    for small in (True, False):
        start = time.perf_counter()
        try:
            if kernel == "radix_topk":
                rows = probe_topk(small)
            elif kernel == "paged_v2":
                rows = probe_paged(small)
            else:
                rows = probe_backward(small, kernel) if kernel in BACKWARD_KERNELS else probe_forward(kernel, small)
            result = dict(kernel=kernel, problem="small" if small else "awkward", rows=rows)
        except Exception as error:  # noqa: BLE001 - the parent records what went wrong
            result = dict(kernel=kernel, problem="small" if small else "awkward",
                          error=f"{type(error).__name__}: {error}"[:2000])
        result["seconds"] = round(time.perf_counter() - start, 2)
        print("PROBE " + json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("probe.json"))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--child", choices=KERNELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    results = []
    for kernel in args.kernels.split(","):
        try:
            run = subprocess.run([sys.executable, __file__, "--child", kernel], capture_output=True, text=True,
                                 timeout=args.timeout)
            stdout, stderr, status = run.stdout, run.stderr, run.returncode
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
            status = f"timed out after {args.timeout} s"
        found = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("PROBE ")]
        results.append(dict(kernel=kernel, status=status, results=found, stderr_tail=stderr[-3000:]))
        print(json.dumps(results[-1])[:3000], flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
