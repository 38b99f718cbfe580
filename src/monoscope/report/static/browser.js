// monoscope feature browser. Plain JavaScript, no dependencies, no network except the local /api of
// `monoscope serve`. Text from the corpus or the user is only ever inserted with textContent.
(function () {
  "use strict";

  var root = document.body.getAttribute("data-root") || "";
  var INDEX = window.MONOSCOPE_INDEX || null;
  var byId = {};
  if (INDEX) INDEX.features.forEach(function (f) { byId[f.id] = f; });
  var unit = (INDEX && INDEX.unit) || "Feature";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(x) {
    if (x === null || x === undefined || isNaN(x)) return "–";
    var a = Math.abs(x);
    if (a === 0) return "0";
    if (a < 1e-3 || a >= 1e5) return x.toExponential(2);
    return String(Number(x.toPrecision(3)));
  }
  function showToken(t) {  // newlines, tabs and other control characters made visible
    return String(t).replace(/\r?\n/g, "⏎").replace(/\t/g, "⇥").replace(/[\u0000-\u001f\u007f]/g, function (c) {
      return c === "\r" ? "" : c === "\u007f" ? "␡" : String.fromCharCode(0x2400 + c.charCodeAt(0));
    });
  }
  function colour(frac) {
    var f = Math.pow(Math.min(1, Math.max(0, frac)), 0.8) * 0.9;
    var hi = [234, 88, 12];
    var c = hi.map(function (v) { return Math.round(255 + (v - 255) * f); });
    return "rgb(" + c.join(",") + ")";
  }
  function featureLink(id) {
    var label = "#" + id;
    if (byId[id] === undefined) return el("span", "", label);
    var a = el("a", "", label);
    a.href = root + "features/" + encodeURIComponent(id) + ".html";
    return a;
  }

  // ---------------------------------------------------------------- tooltips for tokens
  var tip = document.getElementById("tooltip");
  document.addEventListener("mouseover", function (ev) {
    var t = ev.target;
    if (!tip || !t.classList || !t.classList.contains("tok") || !t.hasAttribute("data-v")) return;
    tip.textContent = JSON.stringify(t.textContent) + "  →  " + t.getAttribute("data-v");
    tip.hidden = false;
    var r = t.getBoundingClientRect();
    tip.style.left = Math.max(4, r.left) + "px";
    tip.style.top = Math.max(4, r.top - 30) + "px";
  });
  document.addEventListener("mouseout", function (ev) {
    if (tip && ev.target.classList && ev.target.classList.contains("tok")) tip.hidden = true;
  });

  // ---------------------------------------------------------------- index: sort and filter
  var table = document.getElementById("features");
  if (table) {
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var headers = table.querySelectorAll("th.sortable");
    Array.prototype.forEach.call(headers, function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        var desc = !th.classList.contains("desc");  // first click: descending (largest first)
        if (key === "id" || key === "explanation") desc = th.classList.contains("asc");
        Array.prototype.forEach.call(headers, function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(desc ? "desc" : "asc");
        sortRows(key, th.getAttribute("data-type"), desc);
      });
    });
    var sortRows = function (key, type, desc) {
      var val = function (tr) {
        if (type === "text") return (tr.cells[1].textContent || "").trim().toLowerCase();
        var s = tr.getAttribute("data-" + key);
        return s === "" || s === null ? null : parseFloat(s);
      };
      rows.sort(function (a, b) {
        var x = val(a), y = val(b);
        if (x === null || x === "" ) return (y === null || y === "") ? 0 : 1;  // missing values last
        if (y === null || y === "") return -1;
        var c = x < y ? -1 : x > y ? 1 : 0;
        return desc ? -c : c;
      });
      rows.forEach(function (tr) { tbody.appendChild(tr); });
    };
    var filter = document.getElementById("filter");
    var count = document.getElementById("filter-count");
    var texts = rows.map(function (tr) { return tr.textContent.toLowerCase(); });
    filter.addEventListener("input", function () {
      var terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (tr, i) {
        var ok = terms.every(function (t) { return texts[i].indexOf(t) >= 0; });
        tr.hidden = !ok;
        if (ok) shown += 1;
      });
      count.textContent = shown + " shown";
    });
  }

  // ---------------------------------------------------------------- search box
  var form = document.getElementById("search-form");
  if (!form) return;
  var box = document.getElementById("search-text");
  var results = document.getElementById("search-results");
  var status = document.getElementById("search-status");
  var modeLine = document.getElementById("search-mode");
  var live = null;  // filled by /api/info when served by `monoscope serve` with a model

  if (location.protocol === "http:" || location.protocol === "https:") {
    fetch(root + "api/info").then(function (r) { return r.ok ? r.json() : null; }).then(function (info) {
      if (info && info.live) {
        live = info;
        modeLine.textContent = "Live: runs " + info.model + " (" + info.hook + ")" +
          (info.sae ? " and the SAE" : "") + " on your text and shows the " + unit.toLowerCase() +
          "s firing on each token.";
      } else {
        modeLine.textContent = "Searches the stored examples and explanations. For live search start the " +
          "server with a model: monoscope serve DIR --sae SAE_DIR (or --model NAME).";
      }
    }).catch(function () {});
  } else {
    modeLine.textContent = "Offline mode: searches the stored examples and explanations. Live search " +
      "(running the model on your text) needs monoscope serve.";
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = box.value;
    if (!text.trim()) { status.textContent = "type or paste some text first"; return; }
    if (live) liveSearch(text); else staticSearch(text);
  });

  function staticSearch(text) {
    clear(results);
    if (!INDEX) { status.textContent = "no search index found"; return; }
    var q = text.trim().toLowerCase();
    var words = q.split(/\s+/).filter(function (w) { return w.length > 1; });
    var hits = [];
    INDEX.features.forEach(function (f) {
      var hay = [f.e || ""].concat(f.t || [], f.c || []);
      var low = hay.map(function (s) { return String(s).toLowerCase(); });
      var score = 0, where = -1, term = q;
      low.forEach(function (s, i) { if (s.indexOf(q) >= 0) { score += 10; if (where < 0) where = i; } });
      if (!score) {
        words.forEach(function (w) {
          var i = low.findIndex(function (s) { return s.indexOf(w) >= 0; });
          if (i >= 0) { score += 1; if (where < 0) { where = i; term = w; } }
        });
      }
      if (score) hits.push({ f: f, score: score, text: hay[where], term: term });
    });
    hits.sort(function (a, b) { return b.score - a.score || b.f.m - a.f.m; });
    status.textContent = hits.length + " " + unit.toLowerCase() + (hits.length === 1 ? "" : "s") + " match";
    hits.slice(0, 25).forEach(function (h) {
      var div = el("div", "hit");
      var head = el("div");
      head.appendChild(featureLink(h.f.id));
      if (h.f.e) head.appendChild(el("span", "", " — " + h.f.e));
      div.appendChild(head);
      div.appendChild(snippet(h.text, h.term));
      results.appendChild(div);
    });
  }

  function snippet(text, term) {
    var s = showToken(text || "");
    var i = s.toLowerCase().indexOf(term);
    var node = el("div", "snippet");
    if (i < 0) { node.textContent = s.slice(0, 160); return node; }
    var start = Math.max(0, i - 70), end = Math.min(s.length, i + term.length + 70);
    node.appendChild(document.createTextNode((start > 0 ? "…" : "") + s.slice(start, i)));
    node.appendChild(el("mark", "", s.slice(i, i + term.length)));
    node.appendChild(document.createTextNode(s.slice(i + term.length, end) + (end < s.length ? "…" : "")));
    return node;
  }

  function liveSearch(text) {
    status.textContent = "running the model…";
    fetch(root + "api/activations", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: text, top_n: 8 })
    }).then(function (r) {
      return r.json().then(function (body) { return { ok: r.ok, body: body }; });
    }).then(function (res) {
      if (!res.ok) { status.textContent = "error: " + (res.body.error || "request failed"); return; }
      status.textContent = res.body.tokens.length + " tokens" + (res.body.truncated ? " (text was cut)" : "");
      renderLive(res.body);
    }).catch(function (e) { status.textContent = "error: " + e; });
  }

  function renderLive(data) {
    clear(results);
    var textDiv = el("div", "live-text");
    var spans = [];
    data.tokens.forEach(function (tok, i) {
      var s = el("span", "tok", showToken(tok.text));
      s.addEventListener("click", function () { showTokenFeatures(i); });
      spans.push(s);
      textDiv.appendChild(s);
    });
    results.appendChild(textDiv);
    var hint = el("div", "muted small", "Colour: the strongest " + unit.toLowerCase() +
      " on each token (relative to its maximum in the statistics). Click a token or a " + unit.toLowerCase() + ".");
    results.appendChild(hint);
    var list = el("div", "feat-list");
    results.appendChild(list);

    function scale(id, fallback) { var f = byId[id]; return f && f.m > 0 ? f.m : fallback; }
    var overallMax = 0;
    data.tokens.forEach(function (t) { t.features.forEach(function (p) { overallMax = Math.max(overallMax, p[1]); }); });

    function colourByStrongest() {
      data.tokens.forEach(function (t, i) {
        var best = 0, bestId = null;
        t.features.forEach(function (p) {
          var r = p[1] / scale(p[0], overallMax || 1);
          if (r > best) { best = r; bestId = p[0]; }
        });
        paint(spans[i], best, bestId === null ? null : unit + " " + bestId + ": " + fmt(
          t.features.filter(function (p) { return p[0] === bestId; })[0][1]));
      });
    }
    function colourBy(id) {
      data.tokens.forEach(function (t, i) {
        var v = 0;
        t.features.forEach(function (p) { if (p[0] === id) v = p[1]; });
        paint(spans[i], v / scale(id, overallMax || 1), v > 0 ? unit + " " + id + ": " + fmt(v) : null);
      });
    }
    function paint(span, frac, label) {
      span.style.background = frac > 0 ? colour(frac) : "";
      if (label) span.setAttribute("data-v", label); else span.removeAttribute("data-v");
    }
    function featureRow(id, value, onClick) {
      var row = el("div", "feat");
      row.appendChild(el("span", "v", fmt(value)));
      row.appendChild(featureLink(id));
      var info = byId[id];
      if (info && info.e) row.appendChild(el("span", "", info.e));
      else if (info && info.t && info.t.length) row.appendChild(el("span", "muted", "top tokens: " + info.t.join(" · ")));
      var b = el("button", "link", "highlight");
      b.type = "button";
      b.addEventListener("click", onClick);
      row.appendChild(b);
      return row;
    }
    function showSummary() {
      clear(list);
      var best = {};
      data.tokens.forEach(function (t) {
        t.features.forEach(function (p) { best[p[0]] = Math.max(best[p[0]] || 0, p[1]); });
      });
      var ids = Object.keys(best).map(Number).sort(function (a, b) { return best[b] - best[a]; });
      list.appendChild(el("div", "label", "Strongest " + unit.toLowerCase() + "s on this text"));
      ids.slice(0, 15).forEach(function (id) {
        list.appendChild(featureRow(id, best[id], function () { colourBy(id); }));
      });
      if (!ids.length) list.appendChild(el("div", "muted", "Nothing fired."));
      colourByStrongest();
    }
    function showTokenFeatures(i) {
      spans.forEach(function (s) { s.classList.remove("sel"); });
      spans[i].classList.add("sel");
      clear(list);
      var head = el("div", "label", "Token " + JSON.stringify(data.tokens[i].text) + " — ");
      var back = el("button", "link", "back to the whole text");
      back.type = "button";
      back.addEventListener("click", function () { spans[i].classList.remove("sel"); showSummary(); });
      head.appendChild(back);
      list.appendChild(head);
      data.tokens[i].features.forEach(function (p) {
        list.appendChild(featureRow(p[0], p[1], function () { colourBy(p[0]); }));
      });
      if (!data.tokens[i].features.length) list.appendChild(el("div", "muted", "Nothing fires on this token."));
    }
    showSummary();
  }
})();
