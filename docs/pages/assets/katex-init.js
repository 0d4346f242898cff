// Render the math of every page with the site's own KaTeX (no CDN).
// Markdown pages: pymdownx.arithmatex wraps math in .arithmatex as \( \) and \[ \].
// Tutorial pages (notebooks): markdown cells keep $ and $$ delimiters.
(function () {
  function render() {
    if (typeof renderMathInElement !== "function") { return; }
    document.querySelectorAll(".arithmatex").forEach(function (element) {
      renderMathInElement(element, {
        delimiters: [
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true },
        ],
        throwOnError: false,
      });
    });
    document.querySelectorAll(".jupyter-wrapper .jp-RenderedMarkdown, .jupyter-wrapper .jp-MarkdownOutput").forEach(function (element) {
      renderMathInElement(element, {
        delimiters: [
          { left: "$$", right: "$$", display: true },
          { left: "$", right: "$", display: false },
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true },
        ],
        throwOnError: false,
      });
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(render);  // mkdocs-material: runs on every page load
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", render);
  } else {
    render();
  }
})();
