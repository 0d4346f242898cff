"""Loading one layer out of safetensors checkpoints that the tests write themselves."""

import json

import ml_dtypes
import numpy as np
import pytest

from dsa_ref.layer import DSAConfig, DSALayer, load_layer, load_layer_state_dict
from dsa_ref.layer import loader
from dsa_ref.layer.loader import HF_TO_INFERENCE, dequantize_weight_fp8, quantize_weight_fp8

safetensors_numpy = pytest.importorskip("safetensors.numpy")

# A config whose linear weights are not multiples of 128, so partial scale blocks are exercised.
CONFIG = DSAConfig.tiny(dim=200, q_lora_rank=136)
INFERENCE_TO_HF = {value: key for key, value in HF_TO_INFERENCE.items()}


def hf_name(name, layer_index):
    module, leaf = name.rsplit(".", 1)
    return f"model.layers.{layer_index}.self_attn.{INFERENCE_TO_HF.get(module, module)}.{leaf}"


def hf_tensors(layer, layer_index, fp8=True):
    """The layer as the Hugging Face checkpoint stores it: fp8 linears with block scales, bf16 norms."""
    tensors = {}
    for name, value in layer.state_dict().items():
        if value.ndim == 2 and fp8 and name != "indexer.weights_proj.weight":
            weight, scale = quantize_weight_fp8(value)
            tensors[hf_name(name, layer_index)] = weight
            tensors[hf_name(name, layer_index) + "_scale_inv"] = scale
        else:
            tensors[hf_name(name, layer_index)] = value.astype(ml_dtypes.bfloat16 if fp8 else np.float32)
    return tensors


def write_sharded(directory, tensors, shards=2):
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        safetensors_numpy.save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_fp8_weight_quantization_round_trip():
    weight = np.random.default_rng(0).standard_normal((300, 130)) * np.linspace(0.01, 10, 130)
    weight_fp8, scale = quantize_weight_fp8(weight)
    assert weight_fp8.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (3, 2)
    restored = dequantize_weight_fp8(weight_fp8, scale)
    assert np.all(np.abs(restored - weight) <= 2 ** -4 * np.abs(weight) + 1e-3 * np.abs(weight).max())
    with pytest.raises(ValueError, match=r"needs scales of shape \[3, 2\]"):
        dequantize_weight_fp8(weight_fp8, scale[:, :1])


def test_hf_fp8_sharded_checkpoint_loads_only_its_layer(tmp_path, monkeypatch):
    layer = DSALayer(CONFIG, seed=3)
    tensors = {**hf_tensors(DSALayer(CONFIG, seed=9), 0), **hf_tensors(layer, 1), **hf_tensors(DSALayer(CONFIG, seed=8), 2)}
    tensors["model.layers.1.mlp.gate_proj.weight"] = np.ones((4, 4), np.float32)
    tensors["model.embed_tokens.weight"] = np.ones((4, 4), np.float32)
    write_sharded(tmp_path, tensors, shards=3)

    reads = []
    original = loader.read_safetensors_tensor
    monkeypatch.setattr(loader, "read_safetensors_tensor", lambda path, entry: reads.append(entry) or original(path, entry))
    state = load_layer_state_dict(tmp_path, 1, CONFIG)
    layer_tensors = [name for name in tensors if name.startswith("model.layers.1.self_attn.")]
    assert len(reads) == len(layer_tensors) == 12 + 7  # the 7 fp8 linears carry a scale each

    for name, value in layer.state_dict().items():
        stored = tensors[hf_name(name, 1)]
        if stored.dtype == ml_dtypes.float8_e4m3fn:
            expected = dequantize_weight_fp8(stored, tensors[hf_name(name, 1) + "_scale_inv"])
        else:
            expected = stored.astype(np.float64)
        np.testing.assert_array_equal(state[name], expected)
        assert np.abs(state[name] - value).max() <= 0.07 * np.abs(value).max()

    x = np.random.default_rng(4).standard_normal((1, 12, CONFIG.dim))
    loaded = load_layer(tmp_path, 1, CONFIG, mode="mha").forward(x)
    exact = DSALayer.from_state_dict(state, CONFIG, mode="mha").forward(x)
    np.testing.assert_allclose(loaded, exact, rtol=1e-12, atol=1e-12)


def test_inference_names_single_file_round_trip_exactly(tmp_path):
    layer = DSALayer(CONFIG, seed=5)
    tensors = {f"layers.0.attn.{name}": value.astype(np.float32) for name, value in layer.state_dict().items()}
    tensors["layers.0.ffn.w1.weight"] = np.zeros((2, 2), np.float32)
    path = tmp_path / "model0-mp1.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    state = load_layer_state_dict(path, 0, CONFIG)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(state[name], value.astype(np.float32).astype(np.float64))
    # Inference names with fp8 weights call their scales ".scale"; shards without an index are scanned.
    weight, scale = quantize_weight_fp8(layer.weights["wo.weight"])
    tensors.update({"layers.0.attn.wo.weight": weight, "layers.0.attn.wo.scale": scale})
    directory = tmp_path / "scan"
    directory.mkdir()
    safetensors_numpy.save_file(tensors, str(directory / "model0-mp1.safetensors"))
    np.testing.assert_array_equal(load_layer_state_dict(directory, 0, CONFIG)["wo.weight"],
                                  dequantize_weight_fp8(weight, scale))


def test_loader_errors(tmp_path):
    layer = DSALayer(CONFIG, seed=6)
    tensors = hf_tensors(layer, 0)
    path = tmp_path / "one.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    with pytest.raises(ValueError, match="layer 3 lacks"):
        load_layer_state_dict(path, 3, CONFIG)
    with pytest.raises(ValueError, match=r"wq_a.weight of layer 0 has shape \(136, 200\), this config expects \(32, 200\)"):
        load_layer_state_dict(path, 0, CONFIG.replace(q_lora_rank=32))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    safetensors_numpy.save_file(tensors, str(path))
    with pytest.raises(ValueError, match="fp8 weight wo.weight of layer 0 has no block scale"):
        load_layer_state_dict(path, 0, CONFIG)
    safetensors_numpy.save_file({"layers.0.attn.wo.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "a.safetensors"))
    safetensors_numpy.save_file({"layers.0.attn.wo.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "one.safetensors").unlink()
    with pytest.raises(ValueError, match="model-parallel parts must be merged"):
        load_layer_state_dict(tmp_path, 0, CONFIG)
    with pytest.raises(FileNotFoundError):
        load_layer_state_dict(tmp_path / "missing", 0, CONFIG)
