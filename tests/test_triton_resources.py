"""The Triton kernels compile for the H100 (sm_90) on this machine and fit its shared memory.

Triton compiles for a named GPU target without a GPU present, so a launch configuration that asks
for more shared memory than Hopper has (which fails only at run time on the card) fails here.
The compilation runs in a subprocess: in this test process, triton may have been imported in
interpreter mode (TRITON_INTERPRET=1), in which the kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

H100_SHARED_MEMORY_PER_BLOCK = 232448  # 227 KiB, the opt-in maximum of sm_90
INDEXER_CASES = [(dtype, heads) for dtype in ("float32", "bfloat16", "float8_e4m3fn") for heads in (1, 64)]
# (dtype, packed FP8 cache, heads, d_v, d_qk): the V3.2 shape, and the widest rest (d_qk - d_v = 256).
SPARSE_MLA_CASES = [("float32", False, 128, 512, 576), ("bfloat16", False, 128, 512, 576),
                    ("bfloat16", True, 128, 512, 576), ("float32", True, 128, 512, 576),
                    ("float32", False, 128, 320, 576), ("float16", False, 128, 320, 576)]
TOPK_CASES = [False, True]  # key ranges or whole rows


def _compile_all() -> dict[str, int]:
    """Shared memory (bytes) of every case, compiled for sm_90; run in a process without the interpreter."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsa_ref_backends.torch_triton import indexer, sparse_mla, topk
    from dsa_ref_backends.torch_triton.precision import dot_precision

    pointer = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float8_e4m3fn": "*fp8e4nv"}

    def shared_memory(kernel, pointers, constants, num_warps, num_stages):
        signature = {name: "constexpr" if name in constants else pointers.get(name, "i32")
                     for name in kernel.arg_names}
        signature.update({name: "fp32" for name in kernel.arg_names if name.startswith("scale")})
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        options = dict(num_warps=num_warps, num_stages=num_stages)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared

    used = {}
    for dtype_name, heads in INDEXER_CASES:
        dtype = getattr(torch, dtype_name)
        config = indexer.indexer_config(heads, 128, 65536, dtype)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        pointers = dict(p_q=pointer[dtype_name], p_weights="*fp32", p_k=pointer[dtype_name], p_k_scale="*fp32",
                        p_key_start="*i32", p_key_end="*i32", p_scores="*fp32")
        constants = dict(HAS_K_SCALE=True, FILL_MASKED=True, DOT_PRECISION=dot_precision(dtype), **config)
        used[f"indexer-{dtype_name}-{heads}"] = shared_memory(indexer._indexer_kernel, pointers, constants, warps, stages)
        if dtype_name != "float32":  # the keys-on-rows product (indexer.KEYS_ON_ROWS), 16-bit and fp8 only
            constants["KEYS_ON_ROWS"] = True
            used[f"indexer-keys-on-rows-{dtype_name}-{heads}"] = shared_memory(indexer._indexer_kernel, pointers,
                                                                             constants, warps, stages)
    for dtype_name, kv_fp8, heads, d_v, d_qk in SPARSE_MLA_CASES:
        dtype = getattr(torch, dtype_name)
        config = sparse_mla.sparse_mla_config(4096, heads, 2048, d_v, d_qk, kv_fp8, dtype, torch.device("cpu"))
        config.pop("num_splits")
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        pointers = dict(p_q=pointer[dtype_name], p_kv="*u8" if kv_fp8 else pointer[dtype_name], p_indices="*i32",
                        p_topk_length="*i32", p_sink="*fp32", p_out="*fp32", p_lse="*fp32")
        constants = dict(HAS_TOPK_LENGTH=True, HAS_SINK=True, KV_FP8=kv_fp8, SPLIT=False, SCALE_BLOCKS=4,
                         COMPUTE_DTYPE=sparse_mla._COMPUTE_DTYPES[dtype], DOT_PRECISION=dot_precision(dtype), **config)
        if kv_fp8:
            constants["D_V"], constants["D_R"] = 512, 64
        used[f"sparse_mla-{dtype_name}-{kv_fp8}-{heads}-{d_v}-{d_qk}"] = shared_memory(sparse_mla._sparse_mla_kernel, pointers, constants,
                                                                  warps, stages)
    for has_ranges in TOPK_CASES:
        config = topk.topk_config(65536)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        pointers = dict(p_scores="*fp32", p_key_start="*i32", p_key_end="*i32", p_indices="*i32",
                        p_cand_key="*i32", p_cand_index="*i32")
        used[f"topk-{has_ranges}"] = shared_memory(topk._topk_kernel, pointers, dict(HAS_RANGES=has_ranges, **config),
                                                   warps, stages)
    return used


@pytest.fixture(scope="module")
def compiled() -> dict[str, int]:
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"indexer-{d}-{h}" for d, h in INDEXER_CASES]
                         + [f"indexer-keys-on-rows-{d}-{h}" for d, h in INDEXER_CASES if d != "float32"]
                         + ["sparse_mla-{}-{}-{}-{}-{}".format(*case) for case in SPARSE_MLA_CASES]
                         + [f"topk-{has_ranges}" for has_ranges in TOPK_CASES])
def test_kernel_fits_in_h100_shared_memory(compiled, case):
    assert compiled[case] <= H100_SHARED_MEMORY_PER_BLOCK, f"{case}: {compiled[case]} bytes of shared memory"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))


# (dtype, deterministic) of the training kernels at the V3.2 shape: h 128, d_qk 576, d_v 512.
TRAINING_CASES = [("bfloat16", False), ("bfloat16", True)]


def _compile_training() -> dict[str, int]:
    """Shared memory (bytes) of the sparse MLA backward kernels, compiled for sm_90 (no interpreter)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsa_ref_backends.torch_triton import sparse_mla_backward
    from dsa_ref_backends.torch_triton.precision import dot_precision
    from dsa_ref_backends.torch_triton.sparse_mla import _COMPUTE_DTYPES

    used = {}
    for dtype_name, deterministic in TRAINING_CASES:
        dtype = getattr(torch, dtype_name)
        element = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[dtype_name]
        configs = sparse_mla_backward.backward_config(128, 2048, 512, 576, dtype)
        for name, kernel in (("dq", sparse_mla_backward._dq_kernel), ("dkv", sparse_mla_backward._dkv_kernel)):
            config = dict(configs[name])
            warps, stages = config.pop("num_warps"), config.pop("num_stages")
            constants = dict(HAS_TOPK_LENGTH=True, HAS_D_LSE=True, COMPUTE_DTYPE=_COMPUTE_DTYPES[dtype],
                             DOT_PRECISION=dot_precision(dtype), **config)
            if name == "dkv":
                constants["DETERMINISTIC"] = deterministic
            signature = {arg: "constexpr" if arg in constants else ("fp32" if "scale" in arg else "i32")
                         for arg in kernel.arg_names}
            signature.update({arg: "*fp32" for arg in kernel.arg_names if arg.startswith("p_")})
            signature.update(p_q=element, p_kv=element, p_indices="*i32", p_topk_length="*i32")
            source = ASTSource(fn=kernel, signature=signature,
                               constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            used[f"{name}-{dtype_name}-{deterministic}"] = compiled.metadata.shared
    return used


@pytest.fixture(scope="module")
def compiled_training() -> dict[str, int]:
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, test_triton_resources as t; print(json.dumps(t._compile_training()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{name}-{dtype}-{deterministic}" for dtype, deterministic in TRAINING_CASES
                                  for name in ("dq", "dkv")])
def test_sparse_mla_backward_fits_in_h100_shared_memory(compiled_training, case):
    assert compiled_training[case] <= H100_SHARED_MEMORY_PER_BLOCK, (
        f"{case}: {compiled_training[case]} bytes of shared memory")
