"""tools/peers_check.py: the FlashMLA and sglang interfaces it builds over sglang-kernel's compiled
operators carry every argument to the right place (checked through the kit, with stand-in operators of
the same signatures), and its adapter selection and merging of runs."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dsa_ref.testing import adapters, check_backend  # noqa: E402
from test_adapters import fake_flash_mla, fake_topk  # noqa: E402

TOOL = Path(__file__).resolve().parents[1] / "tools" / "peers_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("peers_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _operators(peer, topk_peer):
    """Stand-ins for torch.ops.sgl_kernel: the operators' positional signatures, over fake peers."""
    calls = []

    def sparse_prefill_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
        calls.append("prefill")
        return peer.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)

    def sparse_decode_fwd(q, k_cache, indices, topk_length, attn_sink, metadata, splits, extra_k_cache,
                          extra_indices, extra_topk_length, d_v, sm_scale):
        calls.append("decode")
        assert extra_k_cache is None and extra_indices is None and extra_topk_length is None
        out, lse = peer.flash_mla_with_kvcache(q, k_cache, None, None, d_v, "schedule", "splits", softmax_scale=sm_scale,
                                               is_fp8_kvcache=True, indices=indices, attn_sink=attn_sink,
                                               topk_length=topk_length)
        return out, lse, "new schedule", "new splits"

    operators = types.SimpleNamespace(sparse_prefill_fwd=types.SimpleNamespace(default=sparse_prefill_fwd),
                                      sparse_decode_fwd=types.SimpleNamespace(default=sparse_decode_fwd),
                                      fast_topk=topk_peer.fast_topk)
    return operators, calls


def test_the_interfaces_over_the_compiled_operators_pass_the_kit():
    operators, calls = _operators(fake_flash_mla(), fake_topk("sglang"))
    modules = _tool().sgl_kernel_interfaces(operators)
    report = check_backend(adapters.FlashMLA(modules["FlashMLA"], device="cpu"), "ci", ops_to_check=["sparse_mla"])
    assert report.ok, str(report)
    assert {"prefill", "decode"} <= set(calls)  # both kernels were reached
    report = check_backend(adapters.SglangTopK(modules["SglangTopK"], device="cpu"), "ci",
                           ops_to_check=["topk_indices"])
    assert report.ok, str(report)


def test_a_prefill_operator_with_swapped_arguments_fails_the_kit():
    peer = fake_flash_mla()
    operators, _ = _operators(peer, fake_topk("sglang"))
    operators.sparse_prefill_fwd = types.SimpleNamespace(
        default=lambda q, kv, indices, sm_scale, d_v, attn_sink, topk_length:
        peer.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, None, topk_length))  # the sink dropped
    modules = _tool().sgl_kernel_interfaces(operators)
    report = check_backend(adapters.FlashMLA(modules["FlashMLA"], device="cpu"), "ci", ops_to_check=["sparse_mla"])
    assert not report.ok


def test_adapters_are_chosen_by_name_and_runs_merge(tmp_path, monkeypatch):
    tool = _tool()
    ran = []

    def fake_check_all(profile, max_examples, modules=None, only=None):
        ran.append(only)
        return {"profile": profile, "python": "3", "adapters": [{"adapter": name, "ops": []} for name in sorted(only)]}

    monkeypatch.setattr(tool, "check_all", fake_check_all)
    out = tmp_path / "peers.json"
    assert tool.main(["--adapters", "FlashMLA", "--out", str(out)]) == 0
    assert tool.main(["--adapters", "TileLangTopK", "--merge", "--out", str(out)]) == 0
    assert ran == [{"FlashMLA"}, {"TileLangTopK"}]
    names = [entry["adapter"] for entry in json.loads(out.read_text())["adapters"]]
    assert names == ["FlashMLA", "TileLangTopK"]
    assert tool.main(["--adapters", "FlashMLA", "--out", str(out)]) == 0  # without --merge: replaced
    assert [entry["adapter"] for entry in json.loads(out.read_text())["adapters"]] == ["FlashMLA"]


def test_a_merged_file_keeps_when_each_adapter_ran():
    tool = _tool()
    previous = {"date": "2031-01-01", "adapters": [{"adapter": "FlashMLA", "ops": []},  # written before entries were dated
                                                   {"adapter": "SglangTopK", "date": "2031-01-02", "ops": []},
                                                   {"adapter": "TileLangTopK", "date": "2031-01-02", "ops": ["old"]}]}
    results = {"date": "2031-01-05", "adapters": [{"adapter": "TileLangTopK", "date": "2031-01-05", "ops": ["new"]}]}
    merged = tool.merged(previous, results)
    assert merged["date"] == "2031-01-05"
    assert [(entry["adapter"], entry["date"], entry["ops"]) for entry in merged["adapters"]] == [
        ("FlashMLA", "2031-01-01", []), ("SglangTopK", "2031-01-02", []), ("TileLangTopK", "2031-01-05", ["new"])]
