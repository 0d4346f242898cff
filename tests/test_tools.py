"""GPU-run tooling lives in tools/, outside the installed packages; backends/ holds backends."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL_NAMES = ("gpu_run", "gpu_session", "device_check", "topk_tune")


def test_backends_hold_no_gpu_run_tooling():
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*")
             if p.is_file() and any(name in p.name for name in TOOL_NAMES)]
    assert not stray, f"tooling belongs in tools/, not in the installed backends: {stray}"


def test_every_tool_is_listed_in_the_tools_readme():
    readme = (ROOT / "tools" / "README.md").read_text()
    for script in (ROOT / "tools").iterdir():
        if script.suffix in (".py", ".sh"):
            assert script.name in readme, f"tools/{script.name} is not described in tools/README.md"


def test_the_kernel_switches_the_gpu_tools_set_exist_on_the_backends():
    """A switch set on a backend instance under a wrong name creates a new attribute and changes nothing:
    the probe or benchmark would time the default kernel under the candidate's name."""
    import re

    from dsa_ref_backends.cupy_cuda.backend import CupyBackend
    from dsa_ref_backends.torch_triton.backend import TritonBackend

    switches = {name for cls in (CupyBackend, TritonBackend) for name in dir(cls) if not name.startswith("_")}
    for tool in ("opt_in_probe.py", "opt_in_bench.py"):
        source = (ROOT / "tools" / tool).read_text()
        set_names = {attribute for _, attribute in re.findall(r"(\w+)\.(\w+)\s*=(?!=)", source)}
        assert set_names, f"tools/{tool} sets no backend switch: the pattern no longer matches it"
        unknown = sorted(set_names - switches)
        assert not unknown, f"tools/{tool} sets switches no backend has: {unknown}"


def _racecheck_log(sites: list[tuple[str, int, str, int]], errors: int | None = None) -> str:
    """A racecheck hazard report (the shape CUDA 13.0's prints) with one hazard per (write, read) site pair."""
    rows = ["========= COMPUTE-SANITIZER"]
    for n, (write_file, write_line, read_file, read_line) in enumerate(sites):
        rows += [f"========= Error: Potential RAW hazard detected at __shared__ 0x38b3{n} in block (2,0,0) :",
                 f"=========     Write Thread (31,0,0) at kernel+0xa350 in {write_file}:{write_line}",
                 f"=========     Read Thread ({128 + 32 * n},0,0) at kernel+0x280 in {read_file}:{read_line}",
                 "=========     Current Value : 0",
                 "=========         Host Frame: launch [0x2424] in __triton_launcher.so"]
    count = len(sites) if errors is None else errors
    rows.append(f"========= RACECHECK SUMMARY: {len(sites)} hazards displayed ({count} errors, 0 warnings)")
    return "\n".join(rows) + "\n"


def test_racecheck_report_tells_the_warp_specialize_dispatch_from_the_kernels_own_hazards(tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("racecheck_report", ROOT / "tools" / "racecheck_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    source = ROOT / "backends" / "torch_triton" / "sparse_mla_gluon_pingpong.py"
    lines = source.read_text().splitlines()
    kernel_def = 1 + next(i for i, text in enumerate(lines) if text.startswith("def _sparse_mla_gluon_pingpong_kernel("))
    dispatch = 1 + next(i for i, text in enumerate(lines) if "gl.warp_specialize(" in text)
    own = 1 + next(i for i, text in enumerate(lines) if "_publish(tile, b_logits" in text)
    name = source.name
    log = tmp_path / "racecheck.log"

    def judged(text):
        log.write_text(text)
        status = report.main([str(log), "--source-root", str(ROOT / "backends")])
        return status, json.loads(capsys.readouterr().out)

    status, result = judged(_racecheck_log([(name, kernel_def, name, kernel_def), (name, dispatch, name, kernel_def)]))
    assert status == 0 and result["warp_specialize_dispatch"] == 2 and result["kernels_own"] == 0, result
    status, result = judged(_racecheck_log([(name, kernel_def, name, kernel_def), (name, own, name, kernel_def)]))
    assert status == 1 and result["kernels_own"] == 1, result  # one access on a line of the kernel's own
    status, result = judged(_racecheck_log([(name, kernel_def, name, kernel_def)], errors=61))
    assert status == 1 and result["complete"] is False, result  # the print limit cut the list: not judged
    status, result = judged("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert status == 0 and result["hazards"] == 0, result


def _source_page(rows: list[tuple[str, str, int, int, int]]) -> str:
    """An ncu source page (``--page source --csv --print-source sass``, the columns the summary reads) with rows
    ``(address, source, samples, long scoreboard samples, barrier samples)``."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
              "stall_long_sb", "stall_barrier", "stall_long_sb (Not Issued)"]
    lines = ['"Kernel Name","toy_kernel",', ",".join(f'"{name}"' for name in header)]
    for address, source, samples, long_sb, barrier in rows:
        lines.append(",".join(f'"{value}"' for value in (address, source, samples, samples, long_sb, barrier, long_sb)))
    return "\n".join(lines) + "\n"


def test_ncu_stalls_ranks_instructions_and_reasons(tmp_path, capsys):
    import importlib.util
    import json

    import pytest

    spec = importlib.util.spec_from_file_location("ncu_stalls", ROOT / "tools" / "ncu_stalls.py")
    stalls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stalls)
    page = tmp_path / "page.csv"
    page.write_text(_source_page([("0x10", "LDS R1, [R2]", 10, 0, 10), ("0x20", "@!P0  BRA 0x10", 30, 30, 0),
                                  ("0x30", "FADD R1, R1, R2", 0, 0, 0)]))
    out = tmp_path / "stalls.json"
    assert stalls.main([str(page), "--top", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["toy_kernel"]
    assert summary["samples"] == 40
    assert summary["reasons"] == {"stall_long_sb": 0.75, "stall_barrier": 0.25}  # "Not Issued" columns left out
    first, second = summary["instructions"]
    assert (first["source"], first["share"], first["reasons"]) == ("@!P0 BRA 0x10", 0.75, {"stall_long_sb": 30.0})
    assert (second["source"], second["share"], second["reasons"]) == ("LDS R1, [R2]", 0.25, {"stall_barrier": 10.0})
    assert "toy_kernel: 40 samples" in capsys.readouterr().out
    wrong = tmp_path / "details.txt"
    wrong.write_text("Section: GPU Speed Of Light Throughput\n")
    with pytest.raises(ValueError, match="not an ncu source page"):
        stalls.read_source_page(wrong)
