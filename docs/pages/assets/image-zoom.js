// A plot shrunk to fit the column opens at its natural size on click (Escape or a click closes it).
// Works on every page, from a server or from file://: nothing is fetched.
(function () {
  function close() {
    document.querySelectorAll(".dsa-zoom-overlay").forEach(function (overlay) { overlay.remove(); });
  }
  function open(image) {
    close();
    var overlay = document.createElement("div");
    overlay.className = "dsa-zoom-overlay";
    var copy = document.createElement("img");
    copy.src = image.currentSrc || image.src;
    copy.alt = image.alt;
    copy.width = image.naturalWidth;
    overlay.appendChild(copy);
    overlay.addEventListener("click", close);
    document.body.appendChild(overlay);
  }
  function mark(image) {
    var shrunk = image.naturalWidth > image.clientWidth + 1;
    image.classList.toggle("dsa-zoomable", shrunk);
    image.title = shrunk ? "Click to open at full size" : "";
  }
  function setup() {
    document.querySelectorAll("article img").forEach(function (image) {
      if (image.closest("a") || image.dataset.dsaZoom) { return; }
      image.dataset.dsaZoom = "1";
      image.addEventListener("click", function () { if (image.classList.contains("dsa-zoomable")) { open(image); } });
      if (image.complete) { mark(image); } else { image.addEventListener("load", function () { mark(image); }); }
    });
  }
  window.addEventListener("resize", function () { document.querySelectorAll("article img[data-dsa-zoom]").forEach(mark); });
  document.addEventListener("keydown", function (event) { if (event.key === "Escape") { close(); } });
  if (typeof document$ !== "undefined") { document$.subscribe(setup); }  // material's instant navigation
  else if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", setup); }
  else { setup(); }
})();
