(function () {
  "use strict";
  /* ------------------------------------------------------------ line breaks */
  /* Long module paths and node names may wrap after . / _ : only. Done here rather than
     in the HTML so the file keeps every name verbatim (grep-able, copy-pastable). */
  function breakable(el) {
    for (var node = el.firstChild; node; node = node.nextSibling) {
      if (node.nodeType !== 3 || node.data.length < 12) continue;
      var pieces = node.data.split(/([.\/_:])/), parts = [];
      for (var k = 0; k < pieces.length; k += 2) parts.push(pieces[k] + (pieces[k + 1] || ""));
      if (parts.length < 2) continue;
      var frag = document.createDocumentFragment();
      for (k = 0; k < parts.length; k++) {
        if (k) frag.appendChild(document.createElement("wbr"));
        frag.appendChild(document.createTextNode(parts[k]));
      }
      var last = frag.lastChild;
      el.replaceChild(frag, node);
      node = last;
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll("td.name, .fd-side .big"), breakable);

  /* ------------------------------------------------------------ pictures */
  /* The button flips PyTorch's and ONNX's output in place (the picture and its crop);
     a button, so Enter and Space flip it too. */
  Array.prototype.forEach.call(document.querySelectorAll(".flip"), function (box) {
    var button = box.querySelector(".flip-btn"), label = box.querySelector(".flip-label");
    button.addEventListener("click", function () {
      var onnx = box.getAttribute("data-show") !== "onnx";
      box.setAttribute("data-show", onnx ? "onnx" : "torch");
      button.setAttribute("aria-pressed", onnx ? "true" : "false");
      label.textContent = onnx ? "ONNX" : "PyTorch";
    });
  });

  var table = document.getElementById("layer-table");
  if (!table) return;
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var search = rows.map(function (r) { return r.textContent.toLowerCase(); });
  var filterBox = document.getElementById("layer-filter");
  var failBox = document.getElementById("layer-fail");
  var carriedBox = document.getElementById("layer-propagated");
  var countEl = document.getElementById("layer-count");

  /* ------------------------------------------------------------ filter */
  /* "show only": none ticked shows every row; otherwise the rows of the ticked kinds:
     failing on their own (and not run), propagated (only carrying upstream error). */
  function applyFilter() {
    var q = filterBox.value.trim().toLowerCase();
    var terms = q ? q.split(/\s+/) : [];
    var wantFail = failBox.checked, wantCarried = carriedBox.checked, any = wantFail || wantCarried;
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i], ok = true, cl = r.classList;
      if (any) {
        ok = (wantFail && (cl.contains("s-fail") || cl.contains("s-not_run"))) ||
             (wantCarried && cl.contains("s-propagated"));
      }
      for (var k = 0; ok && k < terms.length; k++) if (search[i].indexOf(terms[k]) < 0) ok = false;
      r.hidden = !ok;
      if (ok) shown++;
    }
    countEl.textContent = (shown === rows.length) ? rows.length + " rows" : shown + " of " + rows.length + " rows";
  }
  filterBox.addEventListener("input", applyFilter);
  failBox.addEventListener("change", applyFilter);
  carriedBox.addEventListener("change", applyFilter);
  applyFilter();

  /* ------------------------------------------------------------ sort */
  var headers = table.tHead.rows[0].cells;
  function cellKey(row, col, numeric) {
    var c = row.cells[col];
    if (numeric) {
      var v = c.getAttribute("data-v");
      return (v === null || v === "") ? null : parseFloat(v);
    }
    return c.textContent.trim().toLowerCase();
  }
  Array.prototype.forEach.call(headers, function (th, col) {
    th.tabIndex = 0;
    function sort() {
      var numeric = th.getAttribute("data-type") === "num";
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      var keyed = rows.map(function (r, i) { return [cellKey(r, col, numeric), i, r]; });
      keyed.sort(function (a, b) {
        var x = a[0], y = b[0];
        if (x === null && y === null) return a[1] - b[1];
        if (x === null) return 1;          /* missing values always last */
        if (y === null) return -1;
        if (x < y) return -dir;
        if (x > y) return dir;
        return a[1] - b[1];
      });
      var frag = document.createDocumentFragment();
      keyed.forEach(function (k) { frag.appendChild(k[2]); });
      tbody.appendChild(frag);
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });

  /* ------------------------------------------------------------ links to rows */
  function revealTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    if (id.indexOf("layer-") !== 0) return;
    var row = document.getElementById(id);
    if (row && row.hidden) {
      filterBox.value = ""; failBox.checked = false; carriedBox.checked = false; applyFilter();
      row.scrollIntoView({ block: "center" });
    }
  }
  window.addEventListener("hashchange", revealTarget);
  revealTarget();

  /* ------------------------------------------------------------ chart hover */
  var svg = document.getElementById("chart-svg");
  if (!svg) return;
  var tip = document.getElementById("chart-tip");
  var hover = document.getElementById("chart-hover");
  var L = parseFloat(svg.getAttribute("data-l")), step = parseFloat(svg.getAttribute("data-step"));
  var n = parseInt(svg.getAttribute("data-n"), 10);
  var col = {};
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, k) {
    var name = th.getAttribute("data-col");
    if (name) col[name] = k;
  });
  /* a cell's own text, without the badges and notes inside it ("first", the method) */
  function text(cells, name) {
    var k = col[name], out = "";
    if (k === undefined || !cells[k]) return "";
    if (name === "status") return cells[k].textContent.trim();
    for (var node = cells[k].firstChild; node; node = node.nextSibling) {
      if (node.nodeType === 3) out += node.data;
      else if (node.nodeType === 1 && !node.classList.contains("method") && !node.classList.contains("pill")) out += node.textContent;
    }
    return out.trim();
  }
  var byIndex = {};
  rows.forEach(function (r) { byIndex[r.id] = r; });
  function indexAt(evt) {
    var pt = svg.createSVGPoint();
    pt.x = evt.clientX; pt.y = evt.clientY;
    var m = svg.getScreenCTM();
    if (!m) return -1;
    var p = pt.matrixTransform(m.inverse());
    var i = Math.floor((p.x - L) / step);
    return (i < 0 || i >= n) ? -1 : i;
  }
  function esc(s) { return s.replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; }); }
  svg.addEventListener("mousemove", function (evt) {
    var i = indexAt(evt), r = byIndex["layer-" + i];
    if (!r) { tip.hidden = true; hover.setAttribute("visibility", "hidden"); return; }
    var x = L + (i + 0.5) * step;
    hover.setAttribute("x1", x); hover.setAttribute("x2", x); hover.setAttribute("visibility", "visible");
    var c = r.cells;
    function fmtNorm(v) {
      return v === null || v === "" ? "–" : (parseFloat(v) >= 1e308 ? "non-finite" : parseFloat(v).toExponential(2));
    }
    tip.innerHTML = "<b>#" + i + "</b> <span class='mono'>" + esc(text(c, "module")) + "</span><br>" +
      esc(text(c, "type")) + " → " + esc(text(c, "op")) + " <span class='mono'>" + esc(text(c, "node")) + "</span><br>" +
      "total max abs " + esc(text(c, "max_abs")) + " (" + fmtNorm(r.getAttribute("data-norm")) + " of range)<br>" +
      "own max abs " + esc(text(c, "local_max_abs")) + " (" + fmtNorm(r.getAttribute("data-lnorm")) + " of range)<br>" +
      "status: " + esc(text(c, "status"));
    tip.hidden = false;
    var wrap = svg.parentNode.getBoundingClientRect();
    var left = evt.clientX - wrap.left + svg.parentNode.scrollLeft + 14;
    if (left + 300 > wrap.width) left = Math.max(0, left - 330);
    tip.style.left = left + "px";
    tip.style.top = (evt.clientY - wrap.top + 12) + "px";
  });
  svg.addEventListener("mouseleave", function () { tip.hidden = true; hover.setAttribute("visibility", "hidden"); });
  svg.addEventListener("click", function (evt) {
    var i = indexAt(evt);
    if (byIndex["layer-" + i]) location.hash = "layer-" + i;
  });
})();
