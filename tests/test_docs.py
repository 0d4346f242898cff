"""The documentation site: strict build (tutorials executed), generated pages, and a browser check.

The build runs once per test session (about a minute: it executes every tutorial). The
browser test serves the built site on 127.0.0.1, loads the home page, a tutorial and an API page
in headless Chromium, and checks that math is rendered by the site's own KaTeX, that plots are
shown, and that the console has no errors; screenshots are kept in ``build/test-artifacts/docs``
(or ``$DSA_TEST_ARTIFACTS``).

Without the docs tools (mkdocs, Chromium) these tests skip, except under CI (``CI`` set), where
a missing tool is a failure: CI must build the site.
"""

from __future__ import annotations

import functools
import http.server
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
ARTIFACTS = Path(os.environ.get("DSA_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "docs"

pytestmark = pytest.mark.xdist_group("docs")


def require(condition: bool, what: str) -> None:
    """Skip without ``what``, except under CI, where the docs must be built and checked."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must build and check the docs, but {what} is missing (install the docs extra; "
                    "apt-get install chromium chromium-driver)")
    pytest.skip(f"{what} is not installed")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def hooks():
    require(_has_module("mkdocs") and _has_module("matplotlib"), "mkdocs")
    sys.path.insert(0, str(DOCS))
    try:
        import hooks as module
    finally:
        sys.path.remove(str(DOCS))
    return module


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    require(all(_has_module(m) for m in ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter", "ipykernel")),
            "the docs toolchain (mkdocs, mkdocs-material, mkdocstrings, mkdocs-jupyter, ipykernel)")
    site = tmp_path_factory.mktemp("site")
    env = {key: value for key, value in os.environ.items() if key != "DSA_BACKEND"}  # the numpy backend
    env["NO_MKDOCS_2_WARNING"] = "1"
    env.pop("MPLBACKEND", None)  # the notebook kernel must use its inline backend to show the plots
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = done.stdout + done.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "mkdocs-build.log").write_text(log)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    # mkdocs' own log lines ("WARNING -  ...", "ERROR   -  ..."). The kernels that execute the
    # tutorials share the stream, and their own loggers' lines ("ERROR:tornado.general:...", such as
    # ipykernel's occasional ZMQ race at kernel shutdown) are not the build's: a tutorial that fails
    # fails the build above.
    warnings = [line for line in log.splitlines() if re.match(r"(WARNING|ERROR)\s*-\s", line)]
    assert not warnings, "the build logged warnings:\n" + "\n".join(warnings)
    return site


# ---------------------------------------------------------------------------- the build
def test_every_tutorial_is_rendered_executed_and_has_a_plot(built_site):
    nav = (DOCS / "mkdocs.yml").read_text(encoding="utf-8")
    assert len(TUTORIALS) >= 10, [p.name for p in TUTORIALS]
    assert all(tutorial.name in nav for tutorial in TUTORIALS), "every tutorial is in the site's navigation"
    for tutorial in TUTORIALS:
        page = built_site / "tutorials" / tutorial.stem / "index.html"
        assert page.exists(), f"{tutorial.name} has no page"
        html = page.read_text(encoding="utf-8")
        assert re.search(r'<img[^>]+src="data:image/png;base64,', html), f"{tutorial.name}: no plot in the page"
        assert "jp-OutputArea-output" in html, f"{tutorial.name}: not executed (no outputs)"
        assert "Traceback" not in html, f"{tutorial.name}: an error output"
        assert (built_site / "tutorials" / tutorial.stem / tutorial.name).exists(), "the source is offered"


def test_pages_load_nothing_from_other_hosts(built_site):
    remote = re.compile(r'<(?:script|img|iframe)[^>]+src="(?:https?:)?//|<link[^>]+rel="stylesheet"[^>]+href="(?:https?:)?//'
                        r'|import\("https?://|<link[^>]+href="(?:https?:)?//[^"]+"[^>]*rel="stylesheet"')
    offenders = [str(page.relative_to(built_site)) for page in built_site.rglob("*.html")
                 if remote.search(page.read_text(encoding="utf-8"))]
    assert not offenders, f"pages that load from another host: {offenders}"
    assert (built_site / "assets" / "katex" / "katex.min.js").exists()


def test_api_pages_render_docstrings_without_rst_leftovers(built_site):
    html = (built_site / "api" / "reference" / "index.html").read_text(encoding="utf-8")
    assert 'id="dsa_ref.reference.sparse_mla.sparse_mla"' in html
    prose = re.sub(r"<pre[^>]*>.*?</pre>", "", html, flags=re.DOTALL)  # the shown source keeps its docstrings
    assert ":func:" not in prose and ".. math::" not in prose
    assert 'class="arithmatex"' in html  # the docstrings' math reached the math renderer
    assert 'class="autorefs autorefs-internal"' in html  # roles became links


def _parameter_rows(html: str) -> list[dict[str, str]]:
    """The rows of every parameter table of an API page: name, type, description, default (as text)."""
    rows = []
    for table in re.findall(r'<span class="doc-section-title">Parameters:</span>.*?</table>', html, flags=re.DOTALL):
        for row in re.findall(r'<tr class="doc-section-item">(.*?)</tr>', table, flags=re.DOTALL):
            cells = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell)).strip()
                     for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.DOTALL)]
            if len(cells) == 4:
                rows.append(dict(zip(("name", "type", "description", "default"), cells)))
    return rows


def test_api_parameter_tables_show_defaults_and_types(built_site):
    import html as html_module

    pages = {page.parent.name: html_module.unescape(page.read_text(encoding="utf-8"))
             for page in (built_site / "api").glob("*/index.html")}
    rows = {name: _parameter_rows(text) for name, text in pages.items()}
    ops = rows["dsa_ref"]
    assert ops, "no parameter table on the dsa_ref page"
    grouped = [row["name"] for page in rows.values() for row in page if "," in row["name"] or " " in row["name"]]
    assert not grouped, f"entries naming several parameters (the parser takes them for one unknown name): {grouped}"
    for name in ("sm_scale", "key_start", "key_end", "k_scale", "d_v"):
        found = [row for row in ops if row["name"] == name]
        assert found, f"{name} is not in the parameter tables of the dsa_ref page"
        for row in found:
            assert row["default"] != "required" and row["default"], f"{name} has a default but shows {row}"
    d_v_defaults = [row["default"] for row in ops if row["name"] == "d_v"]
    assert len(d_v_defaults) >= 2 and set(d_v_defaults) == {"512"}, d_v_defaults
    assert all(row["default"] == "required" for row in ops if row["name"] in ("q", "kv", "topk"))
    typed = [row for page in rows.values() for row in page if row["type"]]
    total = sum(len(page) for page in rows.values())
    assert len(typed) >= 0.6 * total, f"only {len(typed)} of {total} parameters show a type"
    indexer_q = next(row for row in ops if row["name"] == "q")
    assert "[s_q, h_i, d_i]" in indexer_q["type"] and "float8_e4m3fn" in indexer_q["type"], indexer_q


def test_generated_pages_show_the_cost_model_and_the_policy(built_site):
    from dsa_ref import cost

    html = (built_site / "concepts" / "cost-model" / "index.html").read_text(encoding="utf-8")
    assert f"{cost.crossover(phase='decode', metric='flops'):,}" in html
    assert (built_site / "assets" / "generated" / "cost_per_token.png").stat().st_size > 10_000
    policy = (built_site / "results" / "conformance" / "index.html").read_text(encoding="utf-8")
    assert "<code>bfloat16</code>" in policy and "1.6e-02" not in policy and "0.016" in policy


# ---------------------------------------------------------------------------- the README
def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def test_readme_python_blocks_run_as_written(tmp_path):
    pytest.importorskip("safetensors", reason="the README writes a checkpoint: pip install 'dsa-ref[layer]'")
    blocks = _python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "the README shows the ops and the layer"
    program = "\n".join(blocks)  # one session, as a reader pastes them one after the other
    for call in re.findall(r"dsa_attention\((?:[^()]|\([^()]*\))*\)", program):
        assert "key_start=" in call and "key_end=" in call, f"a non-causal dsa_attention in the README: {call}"
    for name in ("DSALayer", "load_layer", "causal_key_ranges"):
        assert name in program, f"the README's code does not show {name}"
    env = {key: value for key, value in os.environ.items() if key != "DSA_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the README's code fails:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_readme_says_how_to_install_each_extra_and_where_search_works():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for command in ("pip install 'dsa-ref[triton]'", "pip install 'dsa-ref[cupy]'", "'dsa-ref[cupy12]'"):
        assert command in text, command
    assert "dsa-ref check" in text and "out of the box" in text
    assert "file://" in text and "make docs-serve" in text  # the search box needs a served site


# ---------------------------------------------------------------------------- the hooks, directly
def test_katex_fetches_repair_a_partial_copy_and_survive_each_other(hooks, tmp_path, monkeypatch):
    """Seen in CI: two builds fetching KaTeX at once left a copy without its CSS (and failed). A
    partial copy is replaced; concurrent fetches all end with one complete copy."""
    import threading

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    target = tmp_path / "build" / f"katex-{hooks.KATEX_VERSION}"
    monkeypatch.setattr(hooks, "KATEX_DIR", target)
    target.mkdir(parents=True)
    (target / "katex.min.js").write_text("partial")
    assert hooks.ensure_katex() == target
    assert all((target / name).exists() for name in hooks.KATEX_FILES)
    shutil.rmtree(target)
    errors = []

    def fetch():
        try:
            hooks.ensure_katex()
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all((target / name).exists() for name in hooks.KATEX_FILES)
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no leftover temporary copies"


def test_report_pages_say_so_when_nothing_is_committed(hooks, tmp_path, monkeypatch):
    monkeypatch.setitem(hooks.REPORT_DIRS, "bench", tmp_path / "missing")
    monkeypatch.setitem(hooks.REPORT_DIRS, "reports", tmp_path / "missing too")
    for kind in ("bench", "reports"):
        assert "No GPU report committed yet" in hooks.render_reports(kind, "../")


def test_report_pages_render_committed_files(hooks, tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "cupy_bench.md").write_text("## no title here\n")
    (reports / "conformance.md").write_text("# Conformance on H100\n")
    (tmp_path / "bench.md").write_text("# dsa-ref benchmark: H100\n\n| case | ms |\n|---|---:|\n| fwd | 1.5 |\n\n"
                                       "![rates](bench.png)\n")
    (tmp_path / "bench.png").write_bytes(b"\x89PNG")
    (tmp_path / "extra.png").write_bytes(b"\x89PNG")
    (tmp_path / "bench.json").write_text(json.dumps({"env": {"device": "NVIDIA H100", "torch": "2.11"}, "rows": [1, 2]}))
    monkeypatch.setitem(hooks.REPORT_DIRS, "bench", tmp_path)
    monkeypatch.setitem(hooks.REPORT_DIRS, "reports", reports)
    text = hooks.render_reports("bench", "../")
    assert "## dsa-ref benchmark: H100" in text  # headings demoted under the page's title
    assert "| fwd | 1.5 |" in text
    assert "![rates](../results/bench/bench.png)" in text  # relinked to where the file is served
    assert "![extra](../results/bench/extra.png)" in text  # an image no report mentions is still shown
    assert "| `env.device` | NVIDIA H100 |" in text and "| `rows` | 2 entries |" in text
    # A benchmark committed under docs/reports/ is shown with the benchmarks, titled by its name;
    # the other reports go to the conformance page.
    assert "## `cupy_bench.md`\n\n### no title here" in text and "Conformance on H100" not in text
    assert "## Conformance on H100" in hooks.render_reports("reports", "../")


def _bench_json(path: Path, dense_ms: dict[int, float], dsa_ms: dict[int, float]) -> Path:
    rows = []
    for tokens in dense_ms:
        case = f"DSA prefill S=T={tokens} h 128"
        rows += [{"group": "dsa", "case": case, "impl": "dense SDPA", "ms": dense_ms[tokens], "baseline": True},
                 {"group": "dsa", "case": case, "impl": "triton", "ms": dsa_ms[tokens]},
                 {"group": "dsa", "case": case, "impl": "cupy", "ms": dsa_ms[tokens] * 2},
                 {"group": "dsa", "case": case, "impl": "naive PyTorch DSA", "ms": dense_ms[tokens] / 100}]
    rows.append({"group": "topk", "case": "top-k", "impl": "triton", "ms": 0.1})
    path.write_text(json.dumps({"environment": {"device": "NVIDIA Test GPU", "date": "2031-02-03T04:05:06+00:00",
                                                "cuda": "13.1"}, "rows": rows}))
    return path


def test_bench_summary_says_where_dsa_is_slower_than_dense(hooks, tmp_path):
    text = hooks.render_bench_summary(_bench_json(tmp_path / "bench.json", {8192: 5.0, 65536: 300.0},
                                                  {8192: 20.0, 65536: 250.0}))
    assert "Measured on **NVIDIA Test GPU**, 2031-02-03T04:05:06+00:00 (CUDA 13.1)." in text
    lines = [line for line in text.splitlines() if line.startswith("* ")]
    assert len(lines) == 2, text
    assert lines[0].startswith("* At 8K tokens") and "**slower**" in lines[0] and "4.00x the time" in lines[0]
    assert "20 ms against 5 ms" in lines[0]  # the fastest DSA, not the naive one nor the slower backend
    assert lines[1].startswith("* At 64K tokens") and "**faster**" in lines[1] and "1.20x faster" in lines[1]

    everywhere_faster = hooks.render_bench_summary(_bench_json(tmp_path / "fast.json", {8192: 30.0}, {8192: 10.0}))
    assert "**faster**" in everywhere_faster and "**slower**" not in everywhere_faster
    assert "faster than dense attention at every measured length" in everywhere_faster
    assert hooks.render_bench_summary(tmp_path / "missing.json") == ""


def test_bench_summary_follows_the_committed_json(hooks):
    data = json.loads((hooks.REPORT_DIRS["bench"] / "bench.json").read_text())
    text = hooks.render_bench_summary()
    assert f"**{data['environment']['device']}**" in text and data["environment"]["date"] in text


def test_the_layer_docs_name_the_version_of_the_official_code_they_follow():
    from dsa_ref.layer import indexer

    concept = (DOCS / "pages" / "concepts" / "indexer.md").read_text(encoding="utf-8")
    for text in (concept, indexer.__doc__):
        assert "2025-11-17" in text and "non-interleaved" in text and "DeepseekV32Attention" in text, text[:400]


def test_home_page_says_where_search_works():
    home = (DOCS / "pages" / "index.md").read_text(encoding="utf-8")
    assert "file://" in home and "make docs-serve" in home


def test_tutorial_list_links_every_tutorial(hooks):
    text = hooks.render_tutorial_list("../")
    for tutorial in TUTORIALS:
        assert f"(../tutorials/{tutorial.name})" in text
    assert hooks.tutorial_title(TUTORIALS[0]).startswith("Tutorial 1")


def test_griffe_extension_rewrites_roles_and_math():
    require(_has_module("griffe"), "griffe")
    sys.path.insert(0, str(DOCS))
    try:
        import griffe

        import griffe_rst
    finally:
        sys.path.remove(str(DOCS))
    package = griffe.load("dsa_ref", search_paths=[str(REPO)], extensions=griffe.load_extensions(griffe_rst.RstRoles))
    text = griffe_rst.convert("See :func:`~dsa_ref.sparse_mla` and :mod:`dsa_ref.reference`, :math:`x^2`.\n\n"
                              "    .. math:: a = b\n              + c\n\nAfter.", package["ops"])
    assert '<autoref identifier="dsa_ref.sparse_mla" optional><code>sparse_mla</code></autoref>' in text
    assert '<autoref identifier="dsa_ref.reference" optional><code>dsa_ref.reference</code></autoref>' in text
    assert "$x^2$" in text
    assert "    $$\n    a = b\n    + c\n    $$" in text and text.rstrip().endswith("After.")
    relative = griffe_rst.convert(":func:`lightning_indexer`", package["reference"]["topk"])
    assert 'identifier="dsa_ref.reference.lightning_indexer"' in relative  # resolved from the package
    listed = griffe_rst.convert("Attributes:\n\nname\n    Short name,\n    selected by.\nafter\n\nas a toml::\n\n    [x]\n",
                                package["ops"])
    assert "- `name`: Short name, selected by." in listed and "as a toml:\n\n    [x]" in listed
    docstring = package["reference"]["sparse_mla"]["sparse_mla"].docstring.value
    assert ".. math::" not in docstring and "$$" in docstring  # the extension ran on load

    def f(a, b, c: int = 1, d=None):
        """Doc."""

    function = griffe.visit("m", filepath=Path("m.py"), code=textwrap.dedent(inspect.getsource(f)))["f"]
    entries = griffe_rst.convert("Args:\n    a, b: ``[n, d]`` float rows,\n        continued.\n"
                                 "    c: int32 ``[n]``: counts.\n    d: default ``None``.\n\nAfter.", function)
    assert ("    a ([n, d] float): rows,\n        continued.\n    b ([n, d] float): rows,\n        continued.\n"
            "    c: int32 ``[n]``: counts.\n    d: default ``None``.") in entries  # c is annotated: no second type
    parsed = griffe.Docstring(entries, parent=function).parse("google")
    parameters = next(section for section in parsed if section.kind.value == "parameters").value
    assert [(p.name, p.default) for p in parameters] == [("a", None), ("b", None), ("c", "1"), ("d", "None")]


# ---------------------------------------------------------------------------- the browser
def _chromium() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="session")
def served_site(built_site):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(built_site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    require(_has_module("selenium"), "selenium")
    binary, driver_path = _chromium()
    require(binary is not None and driver_path is not None, "chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={WINDOW_WIDTH},1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


PAGES = {
    "home": ("", 1),
    "tutorial": ("tutorials/01_lightning_indexer/", 3),
    "api": ("api/reference/", 3),
    "benchmarks": ("results/benchmarks/", 1),
    "cost-model": ("concepts/cost-model/", 1),
}
#: What the pages are checked at: a laptop-class window, where the content column used to be too narrow.
WINDOW_WIDTH = 1400


@pytest.mark.parametrize("page", list(PAGES))
def test_page_in_a_browser(page, served_site, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    path, min_math = PAGES[page]
    browser.get(f"{served_site}/{path}")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # KaTeX renders after load; wait until every math span holds rendered output.
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const all = document.querySelectorAll('.arithmatex');"
        "return document.querySelectorAll('.katex').length > 0 && "
        "[...all].every(e => e.querySelector('.katex'));"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{page}.png"))

    state = browser.execute_script("""
        const images = [...document.querySelectorAll('article img')];
        return {
            katex: document.querySelectorAll('.katex').length,
            katexErrors: document.querySelectorAll('.katex-error').length,
            rawMath: [...document.querySelectorAll('.arithmatex')].filter(e => !e.querySelector('.katex')).length,
            images: images.length,
            brokenImages: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
            title: document.title,
        };""")
    assert state["katex"] >= min_math, state
    assert state["katexErrors"] == 0 and state["rawMath"] == 0, state
    assert state["brokenImages"] == 0, state
    if page == "tutorial":
        assert state["images"] >= 2, state  # the tutorial's plots
        # Its $...$ math lives in notebook cells: rendered too, no dollar signs left in the prose.
        leftover = browser.execute_script(
            "return [...document.querySelectorAll('.jp-RenderedMarkdown')].map(e => e.innerText)"
            ".join(' ').match(/\\$[^$\\s][^$]*\\$/g)")
        assert not leftover, leftover
    layout = browser.execute_script("""
        const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
        const cut = e => e.scrollWidth > e.clientWidth + 1 && !scrolls(e);
        const column = document.querySelector('.md-content__inner');
        return {
            window: window.innerWidth,
            column: column.clientWidth,
            cutCode: [...document.querySelectorAll('article pre > code')].filter(cut).length,
            cutTables: [...document.querySelectorAll('article table')].filter(table => {
                const wrap = table.closest('.md-typeset__scrollwrap') || table.parentElement;
                return table.scrollWidth > wrap.clientWidth + 1 && !scrolls(wrap) && !scrolls(table);
            }).length,
            pageScrollsSideways: document.documentElement.scrollWidth > window.innerWidth + 1,
            shrunkImages: [...document.querySelectorAll('article img')].filter(i => i.naturalWidth > 0).map(i => ({
                src: i.src.slice(0, 60), rendered: i.getBoundingClientRect().width, natural: i.naturalWidth,
                room: i.parentElement.clientWidth,
            })).filter(i => i.rendered + 1 < Math.min(i.natural, i.room)),
        };""")
    assert layout["window"] >= WINDOW_WIDTH - 20, layout
    # Material stops its grid at 1220 px, which left under 700 px of content between the sidebars.
    assert layout["column"] >= 780, layout
    assert layout["cutCode"] == 0 and layout["cutTables"] == 0 and not layout["pageScrollsSideways"], layout
    assert not layout["shrunkImages"], layout
    if page in ("benchmarks", "cost-model"):
        _check_a_shrunk_plot_opens_at_full_size(browser, page)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def _check_a_shrunk_plot_opens_at_full_size(browser, page: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    images = [image for image in browser.find_elements(By.CSS_SELECTOR, "article img")
              if browser.execute_script("return arguments[0].naturalWidth > arguments[0].clientWidth + 1", image)]
    assert images, f"{page}: no plot wider than the column (the plots are larger than any column)"
    image = images[0]
    assert "dsa-zoomable" in image.get_attribute("class"), f"{page}: a shrunk plot is not marked zoomable"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    image.click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".dsa-zoom-overlay img"))
    opened = browser.execute_script("""
        const shown = document.querySelector('.dsa-zoom-overlay img');
        return {rendered: shown.getBoundingClientRect().width, natural: shown.naturalWidth};""")
    assert abs(opened["rendered"] - opened["natural"]) <= 1, opened
    browser.save_screenshot(str(ARTIFACTS / f"{page}-plot-full-size.png"))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".dsa-zoom-overlay"))


# ---------------------------------------------------------------------------- the peers page
def _peers_json(path: Path) -> Path:
    long_reason = "no module named 'tilelang' " + "(searched $TL_EXAMPLES and sys.path) " * 10
    path.write_text(json.dumps({
        "profile": "ci", "python": "3.12.3", "torch": "2.99.0", "device": "NVIDIA Test GPU", "date": "2031-02-03",
        "adapters": [
            {"adapter": "FlashMLA", "peer_modules": ["flash_mla"], "unavailable": [], "ops": [
                {"op": "sparse_mla", "ok": True, "ran": 57, "refused": 13,
                 "refusal_reasons": {"d_v=256 (supported: 512)": 9, "dtype=float64 (supported: bfloat16)": 4},
                 "worst_error_ratio": 0.0421, "failures": []}]},
            {"adapter": "DeepGEMM", "peer_modules": ["deep_gemm"], "unavailable": [], "ops": [
                {"op": "lightning_indexer", "ok": False, "ran": 3, "refused": 0, "refusal_reasons": {},
                 "worst_error_ratio": float("inf"),
                 "failures": [{"message": "AssertionError: logits differ at [0, 2]", "input": {"q": "(1, 64, 128):e4m3",
                                                                                              "key_end": [1, 2]}},
                              {"message": "RuntimeError: illegal memory access\n" + "frame\n" * 100,
                               "input": "lightning_indexer(q=(2, 64, 128):uint8, weights=" + "9" * 5000 + ")"}]}]},
            {"adapter": "TileLangTopK", "peer_modules": ["tilelang"], "unavailable": [long_reason], "ops": []},
        ]}))
    return path


def test_peers_results_render_every_adapter_op_refusal_and_failure(hooks, tmp_path):
    text = hooks.render_peers_results(_peers_json(tmp_path / "peers.json"))
    assert "**NVIDIA Test GPU**" in text and "torch 2.99.0" in text and "2031-02-03" in text and "`ci`" in text
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| `")}
    assert rows["`FlashMLA`"] == ["`FlashMLA`", "`sparse_mla`", "imported (`flash_mla`)", "57", "13", "PASS",
                                  "0.0421"]
    assert rows["`DeepGEMM`"][1:] == ["`lightning_indexer`", "imported (`deep_gemm`)", "3", "0", "**FAIL**", "inf"]
    not_imported = rows["`TileLangTopK`"]
    assert not_imported[5] == "not run here" and not_imported[2].startswith("not imported: no module named 'tilelang'")
    assert len(not_imported[2]) < 120 and not_imported[2].endswith("…")  # shortened in the table
    assert "### Not run here" in text and "* `TileLangTopK` (tried `tilelang`): no module named" in text
    assert "d_v=256 (supported: 512) (9×); dtype=float64 (supported: bfloat16) (4×)" in text
    assert "#### `DeepGEMM` `lightning_indexer`, failure 1 of 2" in text
    assert "```text\nAssertionError: logits differ at [0, 2]\n```" in text
    assert '"key_end": [\n  1,\n  2\n ]' in text  # a dict input, written out as JSON in a fenced block
    assert "#### `DeepGEMM` `lightning_indexer`, failure 2 of 2" in text
    assert "lightning_indexer(q=(2, 64, 128):uint8, weights=999" in text
    assert "9" * 5000 not in text and "frame\n" * 100 not in text and "more characters" in text  # truncated
    fences = re.findall(r"^```", text, flags=re.MULTILINE)
    assert len(fences) == 8, "each failure's message and input, fenced and closed"


def test_peers_results_merged_over_several_runs_say_when_each_row_ran(hooks, tmp_path):
    path = _peers_json(tmp_path / "peers.json")
    data = json.loads(path.read_text())
    data["adapters"][0]["date"] = "2031-01-30"  # FlashMLA ran in an earlier session than the others
    path.write_text(json.dumps(data))
    text = hooks.render_peers_results(path)
    assert "newest run 2031-02-03" in text and "| ran on |" in text
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| `")}
    assert rows["`FlashMLA`"][-1] == "2031-01-30" and rows["`DeepGEMM`"][-1] == "2031-02-03"
    assert rows["`TileLangTopK`"][-1] == "2031-02-03" and len(rows["`TileLangTopK`"]) == 8
    assert "ran on" not in hooks.render_peers_results(_peers_json(tmp_path / "undated.json"))


def test_peers_results_without_a_readable_file_say_so(hooks, tmp_path):
    missing = hooks.render_peers_results(tmp_path / "peers.json")
    assert "No peer results committed yet" in missing and "peers.json" in missing and "|" not in missing
    (tmp_path / "broken.json").write_text("{not json")
    assert "could not be read" in hooks.render_peers_results(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "has no list of adapters" in hooks.render_peers_results(tmp_path / "list.json")


def test_peers_page_marker_is_expanded_from_the_results_file(hooks, tmp_path, monkeypatch):
    import types

    markdown = (DOCS / "pages" / "results" / "peers.md").read_text(encoding="utf-8")
    assert "<!-- dsa-ref:peers-results -->" in markdown
    assert "tools/peers_check.py --profile ci --out docs/pages/results/peers.json" in markdown
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="results/peers.md"))
    monkeypatch.setattr(hooks, "PEERS_RESULTS", _peers_json(tmp_path / "peers.json"))
    rendered = hooks.on_page_markdown(markdown, page, None, None)
    assert "dsa-ref:peers-results" not in rendered and "| `FlashMLA` | `sparse_mla` |" in rendered
    monkeypatch.setattr(hooks, "PEERS_RESULTS", tmp_path / "absent.json")
    assert "No peer results committed yet" in hooks.on_page_markdown(markdown, page, None, None)


def test_kernel_log_pages_render_the_backends_notes(hooks):
    import types

    for page_name, backend in (("triton-log.md", "torch_triton"), ("cuda-log.md", "cupy_cuda")):
        markdown = (DOCS / "pages" / "backends" / page_name).read_text(encoding="utf-8")
        assert f"<!-- dsa-ref:backend-notes {backend} -->" in markdown
        page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri=f"backends/{page_name}"))
        rendered = hooks.on_page_markdown(markdown, page, None, None)
        notes = hooks.BACKEND_NOTES[backend].read_text(encoding="utf-8").splitlines()
        section = next(line for line in notes if line.startswith("## "))
        assert "dsa-ref:backend-notes" not in rendered and section in rendered
        assert notes[0] not in rendered  # the notes' title gives way to the page's
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="backends/x.md"))
    with pytest.raises(Exception, match="unknown backend"):
        hooks.on_page_markdown("<!-- dsa-ref:backend-notes nope -->", page, None, None)
