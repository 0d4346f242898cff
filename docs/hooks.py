"""MkDocs hooks of the dsa-ref site (loaded by ``docs/mkdocs.yml``).

* KaTeX is fetched once from the npm registry (``npm pack``) into ``build/katex-<version>/`` and
  served from the site itself: no page loads anything from another host.
* The tutorials (``tutorials/NN_*.py``, jupytext percent format) live outside the docs folder so
  that they stay plain scripts; they are added to the site here and rendered (and executed) by
  mkdocs-jupyter.
* The benchmark and conformance pages are generated from the files committed under
  ``docs/bench/`` and ``docs/reports/``: tables, plots and environment, never retyped.
* The cost-model page gets its table and plot from :mod:`dsa_ref.cost` at build time.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

KATEX_VERSION = "0.16.22"
DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
TUTORIALS = REPO / "tutorials"
KATEX_DIR = REPO / "build" / f"katex-{KATEX_VERSION}"
#: What the site loads from KaTeX's dist (its fonts come along); the fetch is complete when these are there.
KATEX_FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js")
REPORT_DIRS = {"bench": DOCS / "bench", "reports": DOCS / "reports"}
#: The backends' version logs (each kernel version: what changed, the prediction, the measured outcome).
BACKEND_NOTES = {"torch_triton": REPO / "backends" / "torch_triton" / "NOTES.md",
                 "cupy_cuda": REPO / "backends" / "cupy_cuda" / "NOTES.md"}
TUTORIAL_PATTERN = "[0-9][0-9]_*.py"
MARKER = re.compile(r"<!--\s*dsa-ref:(?P<what>[\w-]+)(?:\s+(?P<arg>[\w-]+))?\s*-->")


# ---------------------------------------------------------------------------- KaTeX
def ensure_katex() -> Path:
    """The folder holding KaTeX's dist files, fetched from the npm registry on first use."""
    if all((KATEX_DIR / name).exists() for name in KATEX_FILES):
        return KATEX_DIR
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError("the docs need KaTeX from the npm registry, but `npm` is not installed "
                          "(apt-get install npm, or put KaTeX's dist/ into " + str(KATEX_DIR) + ")")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", f"katex@{KATEX_VERSION}", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=300)
        tarballs = list(Path(tmp).glob("katex-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise PluginError(f"npm pack katex@{KATEX_VERSION} failed: {done.stderr.strip()[-500:]}")
        staging = Path(tmp) / "katex"
        with tarfile.open(tarballs[0]) as archive:
            for member in archive.getmembers():
                name = member.name
                if not member.isfile() or not name.startswith("package/dist/"):
                    continue
                relative = name[len("package/dist/"):]
                if relative in KATEX_FILES or relative.startswith("fonts/"):
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        KATEX_DIR.parent.mkdir(parents=True, exist_ok=True)
        # Two builds may fetch at once (test workers): each copies beside the target and renames it
        # into place, which is atomic; a build that finds the place taken by a complete copy uses it.
        own = Path(tempfile.mkdtemp(prefix=f"{KATEX_DIR.name}.", dir=KATEX_DIR.parent)) / "dist"
        shutil.copytree(staging, own)
        try:
            os.rename(own, KATEX_DIR)
        except OSError:
            if not all((KATEX_DIR / name).exists() for name in KATEX_FILES):  # an interrupted build's copy
                shutil.rmtree(KATEX_DIR, ignore_errors=True)
                os.rename(own, KATEX_DIR)
        finally:
            shutil.rmtree(own.parent, ignore_errors=True)
    return KATEX_DIR


def isolate_ipython() -> None:
    """Run the tutorials' kernels with a profile of the build's own, not the user's.

    No startup files or settings of the person building leak into the executed pages; and the
    kernel, which listens on loopback TCP for the length of one tutorial, logs only errors (it
    would otherwise print a notice about unencrypted local TCP once per tutorial).
    """
    profile = REPO / "build" / "ipython-docs" / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text('c.IPKernelApp.log_level = "ERROR"\n')
    os.environ["IPYTHONDIR"] = str(profile.parent)


def on_config(config):
    ensure_katex()
    isolate_ipython()
    return config


# ---------------------------------------------------------------------------- files
def tutorial_files() -> list[Path]:
    return sorted(TUTORIALS.glob(TUTORIAL_PATTERN))


def tutorial_title(path: Path) -> str:
    """The first markdown heading of a percent-format tutorial."""
    match = re.search(r"^# #\s+(.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return match.group(1).strip() if match else path.stem


def report_files(kind: str) -> list[tuple[str, Path]]:
    """The committed result files a page shows, as ``(folder, path)``.

    The benchmarks page (``"bench"``) shows ``docs/bench/`` and any benchmark file (``*bench*``)
    committed under ``docs/reports/``; the conformance page (``"reports"``) the rest of
    ``docs/reports/``.
    """
    found = []
    for folder, directory in REPORT_DIRS.items():
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            is_bench = folder == "bench" or "bench" in path.name
            if is_bench == (kind == "bench"):
                found.append((folder, path))
    return found


def cost_plot_png() -> bytes:
    """The cost-model figure: per-token FLOPs and decode bytes against position, dense MLA vs DSA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dsa_ref import cost

    t = np.unique(np.geomspace(256, 131072, 400).astype(np.int64))
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("decode", "flops", 1e9, "GFLOP per token (decode)"),
              ("prefill", "flops", 1e9, "GFLOP per token (prefill)"),
              ("decode", "bytes", 1e6, "MB read per token (decode)")]
    for axis, (phase, metric, unit, label) in zip(axes, panels):
        dense = cost.metric_of(cost.dense_token_cost(t, phase=phase), metric, cost.H100) / unit
        dsa = cost.metric_of(cost.dsa_token_cost(t, phase=phase), metric, cost.H100) / unit
        mode = "MQA" if phase == "decode" else "MHA"
        axis.plot(t / 1024, dense, label=f"dense MLA ({mode} mode)")
        axis.plot(t / 1024, dsa, label="DSA (indexer + sparse MLA, k = 2048)")
        point = cost.crossover(phase=phase, metric=metric)
        axis.axvline(point / 1024, color="gray", linestyle=":", label=f"crossover: {point:,} keys")
        axis.set_xlabel("token position (K keys in context)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle("DeepSeek-V3.2, one layer: attention cost of the token at each position")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


@event_priority(100)  # before mkdocs-jupyter, which must see the tutorials
def on_files(files: Files, config) -> Files:
    katex = ensure_katex()
    for path in sorted(katex.rglob("*")):
        if path.is_file():
            files.append(File.generated(config, f"assets/katex/{path.relative_to(katex).as_posix()}",
                                        abs_src_path=str(path)))
    for path in tutorial_files():
        # A real source folder (the repository), not a generated file: mkdocs-jupyter wraps the
        # File and reads its source path through ``src_dir``.
        files.append(File(f"tutorials/{path.name}", src_dir=str(REPO), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    for kind in REPORT_DIRS:
        for folder, path in report_files(kind):
            if path.suffix.lower() != ".md":
                files.append(File.generated(config, f"results/{folder}/{path.name}", abs_src_path=str(path)))
    files.append(File.generated(config, "assets/generated/cost_per_token.png", content=cost_plot_png()))
    return files


# ---------------------------------------------------------------------------- generated markdown
def _as_section(text: str, name: str) -> str:
    """A committed report as one section of a page: every heading moves one level down, so its
    own title becomes a level-2 heading; a report without a title gets its file name as one."""
    lines, fenced, titled = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,5} ", line):
            titled = titled or line.startswith("# ")
            line = "#" + line
        lines.append(line)
    if not titled:
        lines = [f"## `{name}`", ""] + lines
    return "\n".join(lines)


def _json_summary(path: Path) -> str:
    """Top-level scalars (and one level of nested scalars) of a results file, as a table."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"`{path.name}` could not be read: {exc}\n"
    if not isinstance(data, dict):
        return f"`{path.name}`: {type(data).__name__} of {len(data)} entries.\n"
    rows = []
    for key, value in data.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            rows.append((key, value))
        elif isinstance(value, dict):
            rows.extend((f"{key}.{sub}", item) for sub, item in value.items()
                        if isinstance(item, (str, int, float, bool)) or item is None)
        elif isinstance(value, list):
            rows.append((key, f"{len(value)} entries"))
    lines = ["| field | value |", "| --- | --- |"]
    lines += [f"| `{key}` | {str(value).replace('|', '/')} |" for key, value in rows[:40]]
    return "\n".join(lines) + "\n"


def render_reports(kind: str, up: str) -> str:
    """Markdown for every committed result file a page shows; a notice when there is none."""
    found = report_files(kind)
    if not found:
        folder = "docs/bench/" if kind == "bench" else "docs/reports/"
        return (f'!!! note "No GPU report committed yet"\n    No GPU report committed yet: nothing under '
                f"`{folder}`. This section fills itself in when one is committed.\n")
    url = {path.name: f"{up}results/{folder}/{path.name}" for folder, path in found}
    parts, shown = [], set()
    link = re.compile(r"(!?\[[^\]]*\])\((" + "|".join(re.escape(n) for n in url) + r")\)")

    def relink(match):
        shown.add(match.group(2))
        return f"{match.group(1)}({url[match.group(2)]})"

    for folder, path in found:
        if path.suffix.lower() == ".md":
            section = _as_section(path.read_text(encoding="utf-8"), path.name)
            parts.append(link.sub(relink, section) + f"\n\n*From `docs/{folder}/{path.name}`.*\n")
    for folder, path in found:
        if path.suffix.lower() in (".png", ".svg", ".jpg") and path.name not in shown:
            parts.append(f"## `{path.name}`\n\n![{path.stem}]({url[path.name]})\n")
    raw = [(folder, path) for folder, path in found if path.suffix.lower() == ".json"]
    if raw:
        lines = ['??? info "Raw results (JSON): every measurement, with its environment"', ""]
        for folder, path in raw:
            lines += [f"    **[`{path.name}`]({url[path.name]})**", ""]
            lines += ["    " + line if line else "" for line in _json_summary(path).splitlines()]
            lines.append("")
        parts.append("## Raw results\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _context_label(case: str) -> str:
    """``"DSA prefill S=T=8192 h 128"`` -> ``"8K tokens (S=T=8192 h 128)"``; other names as they are."""
    match = re.search(r"S=T=(\d+)", case)
    if not match:
        return f"`{case}`"
    tokens = int(match.group(1))
    short = f"{tokens // 1024}K" if tokens % 1024 == 0 else f"{tokens:,}"
    return f"{short} tokens (`{case}`)"


def render_bench_summary(path: Path | None = None) -> str:
    """Where the committed benchmark ran, and, in words, where DSA is slower or faster than dense
    attention: computed from ``bench.json`` (its ``dsa`` rows, each case's ``baseline`` row
    against the fastest DSA implementation, naive ones aside), so it follows the data."""
    path = REPORT_DIRS["bench"] / "bench.json" if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    env = data.get("environment", {})
    versions = ", ".join(f"{name} {env[key]}" for name, key in (("driver", "driver"), ("CUDA", "cuda"),
                                                                 ("torch", "torch"), ("triton", "triton"))
                         if env.get(key))
    lines = [f"Measured on **{env.get('device', 'an unrecorded device')}**, {env.get('date', 'date not recorded')}"
             + (f" ({versions})." if versions else ".")]
    cases: dict[str, list[dict]] = {}
    for row in data.get("rows", []):
        if row.get("group") == "dsa" and isinstance(row.get("ms"), (int, float)):
            cases.setdefault(row["case"], []).append(row)
    verdicts = []
    for case, rows in cases.items():
        dense = [row for row in rows if row.get("baseline")]
        sparse = [row for row in rows if not row.get("baseline") and not row["impl"].startswith("naive")]
        if not dense or not sparse:
            continue
        dense, best = min(dense, key=lambda row: row["ms"]), min(sparse, key=lambda row: row["ms"])
        slower = best["ms"] > dense["ms"]
        ratio = best["ms"] / dense["ms"] if slower else dense["ms"] / best["ms"]
        verdicts.append((slower, f"at {_context_label(case)} DSA is **{'slower' if slower else 'faster'}** than dense "
                                 f"attention: its fastest implementation, {best['impl']}, takes {best['ms']:.3g} ms "
                                 f"against {dense['ms']:.3g} ms for {dense['impl']} "
                                 f"({ratio:.2f}x {'the time' if slower else 'faster'})"))
    if verdicts:
        slower_at = [text for slower, text in verdicts if slower]
        lines += ["", "Whole DSA prefill against dense attention on this GPU:", ""]
        lines += [f"* {text[0].upper()}{text[1:]}." for _, text in verdicts]
        lines += ["", "DSA is slower than dense attention at every measured length." if len(slower_at) == len(verdicts)
                  else "DSA is faster than dense attention at every measured length." if not slower_at
                  else "Below the crossover, the indexer and the top-k cost more than the dense attention they save; "
                       "see the [cost model](../concepts/cost-model.md) for where it lies in FLOPs and bytes."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- peers page
PEERS_RESULTS = DOCS / "pages" / "results" / "peers.json"
#: How much of a failure's message and input the page shows: a shrunk input is short, but a
#: traceback-sized message or an input with arrays spelled out would bury the table.
PEERS_TEXT_LINES, PEERS_TEXT_CHARS = 30, 2000


def _shorten(text: str, limit: int = 90) -> str:
    """One line of at most ``limit`` characters, for a table cell."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _fenced(text: str) -> str:
    """``text`` as a fenced block, cut to a readable size (and saying how much was cut)."""
    lines = text.splitlines() or [""]
    cut_lines = max(0, len(lines) - PEERS_TEXT_LINES)
    shown = "\n".join(lines[:PEERS_TEXT_LINES])
    cut_chars = max(0, len(shown) - PEERS_TEXT_CHARS)
    if cut_chars:
        shown = shown[:PEERS_TEXT_CHARS]
    if cut_lines or cut_chars:
        hidden = f"{len(text) - len(shown):,} more characters" + (f" on {cut_lines} more lines" if cut_lines else "")
        shown += f"\n… ({hidden}; the JSON file has all of it)"
    # A fence longer than any run of backticks inside, so that the text cannot close it.
    runs = [len(run) for run in re.findall(r"`+", shown)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}text\n{shown}\n{fence}"


def _failure_input(value) -> str:
    if value is None or value == "":
        return "(the input was not recorded)"
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=1, default=str)


def _ratio(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def render_peers_results(path: Path | None = None) -> str:
    """The peers page's results: where ``tools/peers_check.py`` ran, a table of every adapter and
    op (peer imported or why not, examples run and refused, verdict, worst error ratio), the main
    refusal reasons and every failure with the input it failed on; a sentence when there is no
    readable results file."""
    path = PEERS_RESULTS if path is None else path
    shown_path = f"docs/{path.relative_to(DOCS).as_posix()}" if path.is_relative_to(DOCS) else str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f'!!! note "Not yet run"\n    No peer results committed yet: `{shown_path}` is not there. '
                "This section fills itself in when it is committed.\n")
    except (OSError, ValueError) as exc:
        return f'!!! warning "Results unreadable"\n    `{shown_path}` could not be read: {_shorten(exc, 200)}\n'
    adapters = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(entry, dict) for entry in adapters):
        return (f'!!! warning "Results unreadable"\n    `{shown_path}` has no list of adapters '
                "(write it with `tools/peers_check.py`).\n")
    # A file merged over several runs (tools/peers_check.py --merge) dates each adapter's entry: the
    # table then says when each row ran, and the header gives the newest run.
    dated = any(entry.get("date") not in (None, data.get("date")) for entry in adapters)
    lines = [f"Ran on **{data.get('device', 'an unrecorded device')}** with torch {data.get('torch', '(not recorded)')}"
             f" and Python {data.get('python', '(not recorded)')}, {'newest run ' if dated else ''}"
             f"{data.get('date', 'date not recorded')}, profile `{data.get('profile', '(not recorded)')}`. "
             f"*From `{shown_path}`.*", "",
             "| adapter | op | peer | examples run | refused | result | worst error ratio |" + (" ran on |" if dated else ""),
             "| --- | --- | --- | ---: | ---: | --- | ---: |" + (" --- |" if dated else "")]
    row_end = (lambda entry: f" {entry.get('date') or data.get('date', '—')} |") if dated else (lambda entry: "")
    refusals, failures, not_run = [], [], []
    for entry in adapters:
        name = entry.get("adapter", "(unnamed)")
        modules = ", ".join(f"`{module}`" for module in entry.get("peer_modules", []))
        unavailable = entry.get("unavailable") or []
        if unavailable:
            reasons = "; ".join(str(reason) for reason in unavailable)
            lines.append(f"| `{name}` | — | not imported: {_cell(_shorten(reasons))} | — | — | not run here | — |"
                         + row_end(entry))
            not_run.append(f"* `{name}` (tried {modules or 'no module'}): {_cell(_shorten(reasons, 400))}")
            continue
        ops = entry.get("ops") or []
        if not ops:
            lines.append(f"| `{name}` | — | imported ({modules}) | — | — | no op checked | — |" + row_end(entry))
        for op in ops:
            op_name = op.get("op", "(unnamed op)")
            verdict = "PASS" if op.get("ok") else "**FAIL**"
            lines.append(f"| `{name}` | `{op_name}` | imported ({modules}) | {op.get('ran', '—')} | "
                         f"{op.get('refused', '—')} | {verdict} | {_ratio(op.get('worst_error_ratio'))} |"
                         + row_end(entry))
            top = sorted((op.get("refusal_reasons") or {}).items(), key=lambda item: -item[1])[:3]
            if top:
                refusals.append(f"* `{name}` `{op_name}`: "
                                + "; ".join(f"{_cell(_shorten(reason, 160))} ({count}×)" for reason, count in top))
            found = op.get("failures") or []
            for number, failure in enumerate(found, 1):
                label = f"`{name}` `{op_name}`" + (f", failure {number} of {len(found)}" if len(found) > 1 else "")
                failures += [f"#### {label}", "", _fenced(str(failure.get("message", "(no message)"))), "",
                             "Input it failed on:", "", _fenced(_failure_input(failure.get("input"))), ""]
            if not op.get("ok") and not found:
                failures += [f"#### `{name}` `{op_name}`", "", "Failed, with no failure recorded in the file.", ""]
    if not_run:
        lines += ["", "### Not run here", "", "Their peer did not import on this machine:", "", *not_run]
    if refusals:
        lines += ["", "### Main refusal reasons", "",
                  "Inputs an adapter refuses are counted, not failed (the most frequent reasons, per op):", "",
                  *refusals]
    if failures:
        lines += ["", "### Failures", "", "Each distinct failure, with the (shrunk) input it failed on:", "",
                  *failures]
    return "\n".join(lines).rstrip() + "\n"


def render_cost_table() -> str:
    from dsa_ref import cost

    lines = ["| phase | metric | DSA cheaper from (keys in context) |", "| --- | --- | ---: |"]
    for phase, metric, what in (("decode", "flops", "FLOPs"), ("decode", "bytes", "bytes read"),
                                ("decode", "seconds", f"roofline time ({cost.H100.name})"),
                                ("prefill", "flops", "FLOPs (dense in MHA mode)"),
                                ("prefill", "seconds", "roofline time (dense in MHA mode)")):
        lines.append(f"| {phase} | {what} | {cost.crossover(phase=phase, metric=metric):,} |")
    lines += ["", "| keys in context | dense decode GFLOP | DSA decode GFLOP | dense decode MB | DSA decode MB | "
              "dense prefill GFLOP | DSA prefill GFLOP |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in cost.cost_table([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]):
        lines.append(f"| {row['context']:,} | {row['dense_decode_gflop']:.3f} | {row['dsa_decode_gflop']:.3f} | "
                     f"{row['dense_decode_mb']:.2f} | {row['dsa_decode_mb']:.2f} | "
                     f"{row['dense_prefill_gflop']:.3f} | {row['dsa_prefill_gflop']:.3f} |")
    return "\n".join(lines) + "\n"


def render_tolerance_table() -> str:
    """The default tolerance policy, then every installed backend's own declarations."""
    from dsa_ref import registry
    from dsa_ref.testing.tolerances import DEFAULT_TOLERANCES

    lines = ["| input dtype | rtol | atol |", "| --- | ---: | ---: |"]
    lines += [f"| `{dtype}` | {tol.rtol:g} | {tol.atol:g} |" for dtype, tol in DEFAULT_TOLERANCES.items()]
    declared = []
    for name in registry.backend_names():
        try:
            backend_cls = type(registry._load(name))
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load here is reported, not fatal
            declared.append(f"| `{name}` | (not loadable here: {type(exc).__name__}) | | |")
            continue
        for dtype, tol in sorted(backend_cls.tolerances.items()):
            declared.append(f"| `{name}` | `{dtype}` | {tol.rtol:g} | {tol.atol:g} |")
    if declared:
        lines += ["", "Backends' own declarations (they replace the default for that dtype):", "",
                  "| backend | input dtype | rtol | atol |", "| --- | --- | ---: | ---: |", *declared]
    return "\n".join(lines) + "\n"


def render_backend_notes(backend: str) -> str:
    """A backend's NOTES.md as the sections of a page: its own ``##`` sections as they are, its title
    dropped (the page has its own)."""
    path = BACKEND_NOTES[backend]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"`{path.name}` of `backends/{backend}` could not be read: {exc}\n"
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n") + f"\n\n*From `backends/{backend}/NOTES.md`.*\n"


def render_tutorial_list(up: str) -> str:
    lines = []
    for path in tutorial_files():
        lines.append(f"1. [{tutorial_title(path)}]({up}tutorials/{path.name}) — `tutorials/{path.name}`")
    return "\n".join(lines) + "\n" if lines else "No tutorial yet.\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    up = "../" * page.file.src_uri.count("/")  # links in markdown are relative to the source file

    def expand(match):
        what, arg = match.group("what"), match.group("arg")
        if what == "report":
            if arg not in REPORT_DIRS:
                raise PluginError(f"{page.file.src_uri}: unknown report folder {arg!r}")
            return render_reports(arg, up)
        if what == "bench-summary":
            return render_bench_summary()
        if what == "peers-results":
            return render_peers_results()
        if what == "cost-table":
            return render_cost_table()
        if what == "tolerance-table":
            return render_tolerance_table()
        if what == "tutorial-list":
            return render_tutorial_list(up)
        if what == "backend-notes":
            if arg not in BACKEND_NOTES:
                raise PluginError(f"{page.file.src_uri}: unknown backend {arg!r} (known: {sorted(BACKEND_NOTES)})")
            return render_backend_notes(arg)
        raise PluginError(f"{page.file.src_uri}: unknown marker dsa-ref:{what}")

    return MARKER.sub(expand, markdown)


# ---------------------------------------------------------------------------- notebooks
_NOTEBOOK_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)
_NOTEBOOK_MERMAID = re.compile(r'<script type="module">\s*document\.addEventListener\("DOMContentLoaded", async \(\) => \{'
                               r'\s*const diagrams = document\.querySelectorAll\("\.jp-Mermaid.*?</script>', re.DOTALL)


def on_post_page(output: str, page, config) -> str:
    # nbconvert's template loads MathJax (and, for diagrams, mermaid) from a CDN; the site renders
    # math with its own KaTeX and the tutorials have no diagrams.
    output = _NOTEBOOK_MERMAID.sub("", _NOTEBOOK_MATHJAX.sub("", output))
    if page.file.src_uri.startswith("tutorials/") and page.file.src_uri.endswith(".py"):
        # Tutorials link to each other by file name (which works on a checkout); on the site each
        # one is a folder beside this page's folder.
        output = re.sub(r'href="(\d\d_\w+)\.py"', r'href="../\1/"', output)
    return output


def on_serve(server, config, builder):
    for path in (TUTORIALS, *REPORT_DIRS.values(), REPO / "dsa_ref"):
        if path.exists():
            server.watch(str(path))
    return server
