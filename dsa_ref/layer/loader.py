"""Load one attention layer out of a DeepSeek-V3.2 safetensors checkpoint, reading only its tensors.

Accepted layouts and names:

* the Hugging Face checkpoint: ``model.layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj,
  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, indexer.*}.weight``, fp8 e4m3 linear
  weights with one float32 ``weight_scale_inv`` per 128 x 128 block;
* the official inference code's converted checkpoint: ``layers.{i}.attn.{wq_a, q_norm, ...}.weight``
  with the block scales named ``.scale`` (only a single model-parallel part, ``mp=1``);
* a single ``.safetensors`` file, a directory of shards with ``model.safetensors.index.json``
  (its ``weight_map`` says which shards to open), or a directory of shards without one (each
  shard's header is read to find the layer).

The safetensors format is read directly (an 8-byte header length, a JSON header, then raw
little-endian data): ``safetensors.numpy`` cannot return fp8 tensors, and reading a tensor's byte
range out of a memory map touches nothing else of a 600+ GB checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import DSAConfig
from .layer import DSALayer, parameter_shapes

#: Hugging Face module names -> official inference names.
HF_TO_INFERENCE = {
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}

#: Side length of the square weight blocks sharing one fp8 scale.
WEIGHT_BLOCK = 128

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


# ---------------------------------------------------------------------------- the file format
def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}`` (no metadata)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["_data_start"] = 8 + length
    return header


def read_safetensors_tensor(path, entry: dict) -> np.ndarray:
    """One tensor, read through a memory map of its byte range only."""
    dtype_name = entry["dtype"]
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor dtype {dtype_name} is not supported (known: {sorted(_SAFETENSORS_DTYPES)})")
    dtype = _SAFETENSORS_DTYPES[dtype_name]
    begin, end = entry["data_offsets"]
    count = (end - begin) // dtype.itemsize
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=entry["_data_start"] + begin, shape=(end - begin,))
    return np.array(raw).view(dtype).reshape(entry["shape"]) if count else np.zeros(entry["shape"], dtype)


# ---------------------------------------------------------------------------- fp8 weights
def quantize_weight_fp8(weight, block: int = WEIGHT_BLOCK):
    """fp8 e4m3 weight with one scale per ``block x block`` tile, the checkpoint's format.

    Returns ``(weight_fp8 [out, in], scale_inv float32 [ceil(out/block), ceil(in/block)])`` with
    ``weight ≈ weight_fp8 * scale_inv`` tile by tile (``scale_inv = amax / 448``).
    """
    weight = np.asarray(weight, np.float64)  # [out, in]
    rows, cols = weight.shape
    tiles = -(-rows // block), -(-cols // block)
    padded = np.zeros((tiles[0] * block, tiles[1] * block))  # [R, C]
    padded[:rows, :cols] = weight
    blocks = padded.reshape(tiles[0], block, tiles[1], block)  # [R/b, b, C/b, b]
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4) / 448.0  # [R/b, C/b]
    quantized = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]  # [out, in]
    return quantized.astype(np.float32).astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


def dequantize_weight_fp8(weight_fp8, scale_inv, block: int = WEIGHT_BLOCK) -> np.ndarray:
    """``weight_fp8 [out, in] * scale_inv[i // block, j // block]``, float64."""
    weight = np.asarray(weight_fp8).astype(np.float64)  # [out, in]
    scale = np.asarray(scale_inv, np.float64)  # [ceil(out/b), ceil(in/b)]
    rows, cols = weight.shape
    if scale.shape != (-(-rows // block), -(-cols // block)):
        raise ValueError(f"fp8 weight [{rows}, {cols}] needs scales of shape "
                         f"[{-(-rows // block)}, {-(-cols // block)}] (one per {block}x{block} block), got {scale.shape}")
    expanded = np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[:rows, :cols]  # [out, in]
    return weight * expanded


# ---------------------------------------------------------------------------- names
def _canonical_name(name: str, layer_index: int) -> tuple[str, str] | None:
    """``(parameter, kind)`` for a tensor of layer ``layer_index`` (kind ``"weight"`` or ``"scale"``), else None."""
    for prefix in (f"model.layers.{layer_index}.self_attn.", f"layers.{layer_index}.attn."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        return None
    module, _, leaf = rest.rpartition(".")
    module = HF_TO_INFERENCE.get(module, module)
    if leaf in ("weight_scale_inv", "scale"):
        return f"{module}.weight", "scale"
    return f"{module}.{leaf}", "weight"


def _shard_files(path: Path, layer_index: int) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is neither a .safetensors file nor a directory")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted({file for name, file in weight_map.items() if _canonical_name(name, layer_index)})
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def load_layer_state_dict(path, layer_index: int, config: DSAConfig) -> dict[str, np.ndarray]:
    """The parameters of attention layer ``layer_index`` by their official names, float64, fp8 dequantized."""
    path = Path(os.fspath(path))
    tensors: dict[tuple[str, str], np.ndarray] = {}
    sources: dict[tuple[str, str], Path] = {}
    for file in _shard_files(path, layer_index):
        for name, entry in read_safetensors_header(file).items():
            key = _canonical_name(name, layer_index)
            if key is None:
                continue
            if key in tensors:
                raise ValueError(f"{key[0]} ({key[1]}) of layer {layer_index} appears in both {sources[key]} and {file}: "
                                 "model-parallel parts must be merged first (the official convert.py with "
                                 "--model-parallel 1), or the checkpoint mixes names")
            tensors[key] = read_safetensors_tensor(file, entry)
            sources[key] = file

    shapes = parameter_shapes(config)
    found = {name for name, kind in tensors if kind == "weight"}
    missing = sorted(set(shapes) - found)
    if missing:
        raise ValueError(f"{path}: layer {layer_index} lacks {missing} (found {sorted(found)}); "
                         "is layer_index right, and does the checkpoint hold DeepSeek-V3.2 attention layers?")
    unexpected = sorted(found - set(shapes))
    if unexpected:
        raise ValueError(f"{path}: layer {layer_index} has tensors the layer does not know: {unexpected}")

    state = {}
    for name, shape in shapes.items():
        value = tensors[(name, "weight")]
        scale = tensors.get((name, "scale"))
        if value.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            if scale is None:
                raise ValueError(f"{path}: fp8 weight {name} of layer {layer_index} has no block scale "
                                 "(weight_scale_inv / scale)")
            value = dequantize_weight_fp8(value, scale)
        elif scale is not None:
            raise ValueError(f"{path}: {name} of layer {layer_index} has a block scale but dtype {value.dtype}, not fp8")
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {name} of layer {layer_index} has shape {tuple(value.shape)}, "
                             f"this config expects {shape}")
        state[name] = value.astype(np.float64)
    return state


def load_layer(path, layer_index: int, config: DSAConfig | None = None, **layer_kwargs) -> DSALayer:
    """One DSA layer from a safetensors checkpoint (see the module docstring for the layouts).

    Args:
        path: a ``.safetensors`` file or a checkpoint directory.
        layer_index: which decoder layer's attention to load.
        config: the model's shapes, default :class:`DSAConfig` (V3.2). Lower ``max_seq_len`` and
            ``max_batch_size`` to shrink the caches.
        layer_kwargs: passed to :class:`DSALayer` (``kv_cache_dtype``, ``block_size``, ``mode``, ``backend``).
    """
    config = DSAConfig() if config is None else config
    return DSALayer.from_state_dict(load_layer_state_dict(path, layer_index, config), config, **layer_kwargs)
