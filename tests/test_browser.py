"""The feature browser: static site from a feature-statistics artifact, escaping, the local server, and a
real headless Chromium (skipped when /usr/bin/chromium or playwright is missing)."""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from monoscope.errors import MonoscopeError
from monoscope.report import build_browser, make_server
from monoscope.report.browser import StatsArtifact, load_explanations

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'
CHROMIUM = "/usr/bin/chromium"

SENTENCES = [
    "The Eiffel Tower in Paris was finished in 1889 and is 330 metres tall.",
    "In 2024 the company reported revenue of 12 billion dollars, up 8 percent.",
    "She was reading a book about the history of Rome while waiting for the train.",
    "def parse(line): return [int(x) for x in line.split(',')]",
    "Researchers at the University of Toronto published 3 papers on protein folding.",
    "The recipe calls for 2 cups of flour, 1 egg and a pinch of salt.",
    f"A comment that tries to inject {SCRIPT} into the page.",
    f"Another one closes an attribute {IMG} and hopes for the best.",
    "Running, jumping and swimming are the three events of the morning session.",
    "Berlin, Madrid and Lisbon are capitals of countries in the European Union.",
    "The meeting is scheduled for 10:30 on Monday, 14 March, in room 204.",
    "He kept singing the same song over and over, annoying everyone in the house.",
    "Is this the right way to the station? Nobody seemed to know the answer.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.",
    "The Amazon river flows through Brazil, Peru and Colombia before reaching the sea.",
    "Learning a new language takes patience, practice and a lot of listening.",
    "x = np.zeros((3, 4)); y = x.sum(axis=0) # shape (4,)",
    "The museum in London opened a new exhibition on ancient Egypt last spring.",
]
TOKEN_RE = re.compile(r'\s?<script>[^<]*</script>|\s?"><img[^>]*>|\s?\w+|\s?[^\w\s]')


def _tokens(text):
    return TOKEN_RE.findall(text)


RULES = [  # (explanation, activation of a token given the previous token)
    ("numbers and years", lambda t, p: 2.0 + 0.4 * len(t.strip()) if t.strip().isdigit() else 0.0),
    ("capitalised names of places and organisations",
     lambda t, p: 3.0 if t.strip()[:1].isupper() and p not in ("", ".") else 0.0),
    ("the word 'the'", lambda t, p: 4.0 if t.strip().lower() == "the" else 0.0),
    ("punctuation, mostly commas", lambda t, p: (1.5 if t.strip() == "," else 0.6) if re.fullmatch(r"\s?[^\w\s]", t) else 0.0),
    ("HTML markup " + SCRIPT, lambda t, p: 5.0 if "<" in t or ">" in t else 0.0),
    ("words right after 'of'", lambda t, p: 2.5 if p.strip() == "of" else 0.0),
    ("never fires", lambda t, p: 0.0),
    ("long words", lambda t, p: 0.3 * (len(t.strip()) - 7) if len(t.strip()) > 7 else 0.0),
    ("-ing verb forms", lambda t, p: 3.5 if t.strip().endswith("ing") else 0.0),
    ("Python code tokens", lambda t, p: 2.0 if t.strip() in ("def", "return", "np", "x", "y", "=", "(", ")") else 0.0),
]


def make_fake_stats(folder: Path, kind: str = "sae_latents", with_explanations: bool = True) -> Path:
    """A feature-statistics artifact in the exact layout of monoscope.interpret.stats, from rule features."""
    import torch

    from monoscope.interpret.accumulate import hist_edges
    from monoscope.interpret.feature_stats import FeatureStats

    folder.mkdir(parents=True)
    contexts = [_tokens(s) for s in SENTENCES]
    rows = [(c, i) for c, toks in enumerate(contexts) for i in range(len(toks))]
    F = len(RULES)
    acts = np.zeros((len(rows), F))
    for r, (c, i) in enumerate(rows):
        prev = contexts[c][i - 1] if i else ""
        for f, (_, rule) in enumerate(RULES):
            acts[r, f] = rule(contexts[c][i], prev) * (1 + 0.1 * math.sin(r + f))
    edges = hist_edges()
    rng = random.Random(0)

    def example(r, f):
        c, i = rows[r]
        lo, hi = max(0, i - 16), min(len(contexts[c]), i + 5)
        base = r - i
        toks = ["<bos>"] if lo == 0 else []
        a = [None] if lo == 0 else []
        toks += contexts[c][lo:hi]
        a += [round(float(acts[base + j, f]), 4) for j in range(lo, hi)]
        return {"row": int(r), "act": round(float(acts[r, f]), 5), "context": c, "tokens": toks, "acts": a,
                "focus": i - lo + (1 if lo == 0 else 0)}

    lines, top_rows = [], []
    for f in range(F):
        col = acts[:, f]
        order = [r for r in np.argsort(-col, kind="stable") if col[r] > 0][:6]
        mx = float(col.max())
        intervals = []
        for j in range(4):
            lo_v, hi_v = j * mx / 4, (j + 1) * mx / 4
            pool = [r for r in range(len(rows)) if lo_v < col[r] <= hi_v]
            pick = sorted(rng.sample(pool, min(3, len(pool))))
            intervals.append({"lo": lo_v, "hi": hi_v, "examples": [example(r, f) for r in pick]})
        rec = {"feature": f, "density": float((col > 0).mean()), "max": mx, "top": [example(r, f) for r in order],
               "intervals": intervals}
        if kind == "sae_latents":
            rec["logits"] = {"pos": [[" Paris", 1.25], [SCRIPT, 0.9], [" 1889", 0.5]],
                             "neg": [[IMG, -1.1], [" the", -0.4]]}
        lines.append(json.dumps(rec))
        top_rows.append(order)
    hist = np.zeros((F, len(edges) - 1), np.int64)
    for f in range(F):
        v = acts[:, f][acts[:, f] > 0]
        hist[f] = np.bincount(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2),
                              minlength=len(edges) - 1)
    corr = np.corrcoef(acts.T + 1e-9 * np.random.default_rng(0).standard_normal(acts.T.shape))
    np.fill_diagonal(corr, -np.inf)
    corr_ids = np.argsort(-corr, 1)[:, :3]
    arrays = {
        "count": (acts > 0).sum(0).astype(np.int64), "density": (acts > 0).mean(0).astype(np.float32),
        "mean": acts.mean(0).astype(np.float32),
        "mean_nonzero": np.array([acts[:, f][acts[:, f] > 0].mean() if (acts[:, f] > 0).any() else 0.0
                                  for f in range(F)], np.float32),
        "max": acts.max(0).astype(np.float32), "hist": hist, "hist_edges": edges.astype(np.float32),
        "corr_features": corr_ids.astype(np.int64),
        "corr_features_r": np.take_along_axis(np.nan_to_num(corr, neginf=np.nan), corr_ids, 1).astype(np.float32),
    }
    arrays["corr_features"][6] = -1  # a dead feature has no correlations
    arrays["corr_features_r"][6] = np.nan
    if kind == "sae_latents":
        arrays["neighbours"] = np.roll(np.arange(F), -1)[:, None].repeat(3, 1).astype(np.int64)
        arrays["neighbours"][:, 1:] = -1
        arrays["neighbours_cos"] = np.full((F, 3), np.nan, np.float32)
        arrays["neighbours_cos"][:, 0] = 0.42
        arrays["corr_neurons"] = np.tile(np.array([[5, 17, 3]], np.int64), (F, 1))
        arrays["corr_neurons_r"] = np.tile(np.array([[0.6, 0.3, 0.1]], np.float32), (F, 1))
    top = np.full((F, 6), -1, np.int64)
    for f, order in enumerate(top_rows):
        top[f, :len(order)] = order
    arrays["top_rows"] = top
    arrays["top_values"] = np.where(top >= 0, np.take_along_axis(acts.T, np.maximum(top, 0), 1), 0).astype(np.float32)
    arrays["interval_rows"] = np.full((F, 4, 3), -1, np.int64)
    arrays["interval_values"] = np.zeros((F, 4, 3), np.float32)
    arrays["interval_edges"] = (acts.max(0)[:, None] * np.arange(5)[None, :] / 4).astype(np.float32)
    FeatureStats.write(folder, {
        "kind": kind, "hook": "layers.1.resid_post", "config": {"correlate_with_neurons": "layers.1.mlp_neurons"},
        "store": {"model": "tiny-llama", "num_rows": len(rows)}, "sae": None, "model": None},
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, [line + "\n" for line in lines])
    if with_explanations:
        recs = []
        for f, (text, _) in enumerate(RULES):
            if f == 6:
                recs.append({"feature": f, "status": "failed", "failure": "no activating examples (dead feature?)"})
                continue
            recs.append({"feature": f, "explanation": text, "status": "ok",
                         "detection": {"accuracy": 0.5 + 0.04 * f, "precision": 0.7, "recall": 0.6, "f1": 0.65, "n": 20},
                         "fuzzing": {"accuracy": 0.9 - 0.05 * f, "f1": 0.8, "n": 20},
                         "simulation": {"pearson": 0.1 * f - 0.2, "n": 300}})
        (folder / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"feature": 3, "tor')
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    stats = make_fake_stats(root / "stats")
    out = build_browser(stats, root / "site", title="Demo · rule-based features on a small corpus")
    return dict(root=root, stats=stats, out=out)


# ------------------------------------------------------------------------------------------ static site
def test_builds_every_page_and_sidecar(site):
    out = site["out"]
    assert (out / "index.html").exists() and (out / "search_index.js").exists()
    assert sorted(int(p.stem) for p in (out / "features").glob("*.html")) == list(range(len(RULES)))
    side = json.loads((out / "browser.json").read_text())
    assert side["n_pages"] == len(RULES) and side["kind"] == "features"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".site.")]  # no temp folder left


def test_all_corpus_text_is_escaped(site):
    out = site["out"]
    for page in [out / "index.html", *(out / "features").glob("*.html")]:
        html = page.read_text()
        assert "<script>alert" not in html, page
        assert "<img" not in html, page
        assert "onerror=alert(2)>" not in html.replace("&gt;", ">") or "&lt;img" in html
    feature4 = (out / "features" / "4.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in feature4  # shown as text
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in feature4
    js = (out / "search_index.js").read_text()
    assert "<" not in js and ">" not in js  # \u003c escapes only: corpus text cannot end the script
    assert json.loads(js[js.index("{"):js.rindex("}") + 1])["features"][4]["e"].endswith(SCRIPT)


def test_no_external_resources(site):
    for page in site["out"].rglob("*"):
        if page.suffix in (".html", ".js", ".css"):
            text = page.read_text()
            for m in re.finditer(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", text):
                assert not re.match(r"(?:[a-z]+:)?//", m.group(1)), (page, m.group(1))
            assert "url(http" not in text and "@import" not in text
            # the only absolute URL allowed is the SVG namespace
            assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", text), page


def test_feature_page_content(site):
    html = (site["out"] / "features" / "0.html").read_text()
    assert "numbers and years" in html  # explanation
    assert "detection" in html and "fuzzing" in html and "simulation" in html
    assert 'data-v="' in html and "<svg" in html  # token values and the histogram
    assert 'href="1.html"' in html  # next page / neighbour link
    assert "Paris" in html  # logit effects
    assert "layers.1.mlp_neurons" in html  # correlated neurons' hook
    dead = (site["out"] / "features" / "6.html").read_text()
    assert "never fired" in dead and "failed" in dead


def test_explanations_reader_skips_torn_lines(site):
    recs = load_explanations(site["stats"] / "explanations.jsonl")
    assert len(recs) == len(RULES) and recs[6]["status"] == "failed"


def test_neuron_artifact_and_options(tmp_path):
    stats = make_fake_stats(tmp_path / "stats", kind="hook_units", with_explanations=False)
    out = build_browser(stats, tmp_path / "site", max_features=4, title=f"units {SCRIPT}")
    index = (out / "index.html").read_text()
    assert "<title>units &lt;script&gt;alert(1)&lt;/script&gt;</title>" in index
    assert "Neurons shown" in index and len(list((out / "features").glob("*.html"))) == 4
    page = (out / "features" / "2.html").read_text()
    assert "Neuron 2" in page and "Decoder neighbours" not in page
    # rebuilding replaces the old site; a foreign non-empty folder is refused
    out = build_browser(stats, tmp_path / "site", features=[1, 3])
    assert sorted(p.stem for p in (out / "features").glob("*.html")) == ["1", "3"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MonoscopeError, match="not a feature browser"):
        build_browser(stats, tmp_path / "other")
    with pytest.raises(MonoscopeError, match="valid ids"):
        build_browser(stats, tmp_path / "x", features=[99])
    with pytest.raises(MonoscopeError, match="no feature statistics"):
        build_browser(tmp_path, tmp_path / "y")


def test_real_stats_artifact(tmp_path):
    """The browser reads what monoscope.interpret.stats really writes."""
    import torch

    from monoscope.interpret.stats import StatsConfig, compute_feature_stats
    from monoscope.models import tiny_model
    from monoscope.sae import SAEConfig, build_sae
    from synthetic import random_store

    hook = "layers.1.resid_post"
    random_store(tmp_path / "store", hook, d=32, ctx_len=15)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("topk", d_in=32, d_sae=24, k=4, hook_name=hook, model_name="tiny-llama"))
    cfg = StatsConfig(top_k=5, n_intervals=3, per_interval=2, batch_size=256, n_correlated=3)
    stats = compute_feature_stats(tmp_path / "store", tmp_path / "stats", cfg, sae=sae, lm=tiny_model("llama"),
                                  show_progress=False)
    art = StatsArtifact(stats)
    assert art.kind == "features" and art.model == "tiny-llama" and art.n == 24
    out = build_browser(stats, tmp_path / "site")
    assert len(list((out / "features").glob("*.html"))) == 24
    alive = int(np.argmax(art.arrays["density"]))
    html = (out / "features" / f"{alive}.html").read_text()
    assert 'class="tok on' in html and "<svg" in html and "Promoted" in html


def test_cli_functions(site, tmp_path, capsys):
    import argparse

    from monoscope.report.browser import setup_browser
    from monoscope.config import from_namespace
    from monoscope.report.serve import ServeConfig, setup_serve

    p = argparse.ArgumentParser()
    run = setup_browser(p)
    run(p.parse_args(["--stats", str(site["stats"]), "--out", str(tmp_path / "cli"), "--max-features", "3"]))
    assert "wrote 3 pages" in capsys.readouterr().out
    p = argparse.ArgumentParser()
    run = setup_serve(p)
    ns = p.parse_args([str(tmp_path / "nothing"), "--port", "0"])
    assert from_namespace(ServeConfig, ns).host == "127.0.0.1"  # this machine only, unless asked
    with pytest.raises(MonoscopeError, match="no index.html"):
        run(ns)


# ------------------------------------------------------------------------------------------ server
def _tiny_live():
    """The tiny llama and a small random SAE at its layer-1 residual (a stub encoder if monoscope.sae fails)."""
    import torch

    from monoscope.models import tiny_model

    lm = tiny_model("llama")
    try:
        from monoscope.sae import SAEConfig, build_sae

        torch.manual_seed(0)
        sae = build_sae(SAEConfig("topk", d_in=lm.d_model, d_sae=len(RULES) * 4, k=4,
                                  hook_name="layers.1.resid_post", model_name=lm.name))
    except ImportError:  # pragma: no cover - only while the SAE package is incomplete
        class Stub:
            class cfg:
                hook_name = "layers.1.resid_post"
            W = torch.randn(lm.d_model, len(RULES) * 4)

            def encode(self, x):
                return torch.relu(x @ self.W)
        sae = Stub()
    return lm, sae


@pytest.fixture(scope="module")
def server(site):
    lm, sae = _tiny_live()
    srv = make_server(site["out"], port=0, lm=lm, sae=sae)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield dict(port=srv.server_address[1], lm=lm, sae=sae)
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, resp


def test_server_static_api_and_guards(server, site):
    port = server["port"]
    status, data, resp = _request(port, "GET", "/")
    assert status == 200 and b"<table" in data and "Content-Security-Policy" in resp.headers
    for path in ("/../stats/stats.json", "/%2e%2e/stats/stats.json", "/features/../../stats/contexts.jsonl",
                 "/features/"):
        assert _request(port, "GET", path)[0] == 404, path
    status, data, _ = _request(port, "GET", "/api/info")
    info = json.loads(data)
    assert status == 200 and info["live"] and info["hook"] == "layers.1.resid_post"
    body = json.dumps({"text": f"Paris {SCRIPT}", "top_n": 3})
    status, data, _ = _request(port, "POST", "/api/activations", body, {"Content-Type": "application/json"})
    result = json.loads(data)
    assert status == 200 and "".join(t["text"] for t in result["tokens"]) == f"Paris {SCRIPT}"
    assert all(len(t["features"]) <= 3 and all(v > 0 for _, v in t["features"]) for t in result["tokens"])
    assert _request(port, "POST", "/api/activations", body, {"Content-Type": "text/plain"})[0] == 415
    bad = _request(port, "POST", "/api/activations", json.dumps({"text": " "}), {"Content-Type": "application/json"})
    assert bad[0] == 400 and b"non-empty" in bad[1]
    evil_host = {"Content-Type": "application/json", "Host": "evil.example:80"}
    assert _request(port, "POST", "/api/activations", body, evil_host)[0] == 403


def test_server_answers_400_to_a_lone_surrogate(server):
    port = server["port"]
    for body in ('{"text": "\\ud800"}', '{"text": "a\\udfffb", "top_n": 2}'):
        status, data, _ = _request(port, "POST", "/api/activations", body, {"Content-Type": "application/json"})
        assert status == 400 and b"surrogate" in data, body
    assert _request(port, "GET", "/api/info")[0] == 200  # the server is still up


def test_activations_for_text_matches_manual(server):
    import torch

    from monoscope.hookpoints import run_with_capture
    from monoscope.report import activations_for_text

    lm, sae = server["lm"], server["sae"]
    res = activations_for_text(lm, sae, None, "ab", top_n=2)
    ids = torch.tensor([[lm.tokenizer.bos_token_id] + lm.tokenizer("ab", add_special_tokens=False)["input_ids"]])
    f = sae.encode(run_with_capture(lm.model, ["layers.1.resid_post"], ids)["layers.1.resid_post"][0, 1:])
    for pos, tok in enumerate(res["tokens"]):
        for fid, v in tok["features"]:
            assert abs(f[pos, fid].item() - v) < 1e-4
    neurons = activations_for_text(lm, None, "layers.1.mlp_neurons", "ab", top_n=5)
    assert len(neurons["tokens"]) == 2
    with pytest.raises(MonoscopeError):
        activations_for_text(lm, sae, None, "ab", top_n=0)


# ------------------------------------------------------------------------------------------ Chromium
def _playwright():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


class PageWatch:
    """Console errors, page errors, dialogs and any request that leaves the site."""

    def __init__(self, page, allowed_prefix: str):
        self.errors, self.dialogs, self.outside = [], [], []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: None if r.url.startswith((allowed_prefix, "data:"))
                else self.outside.append(r.url))
        page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def check(self):
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, f"console errors: {self.errors}"
        assert not self.outside, f"requests outside the site: {self.outside}"


def _save(page, path: Path, docs_name: str | None = None, full_page: bool = True):
    page.screenshot(path=str(path), full_page=full_page)
    if docs_name and os.environ.get("MONOSCOPE_SAVE_SCREENSHOTS"):
        docs = Path(__file__).resolve().parents[1] / "docs" / "img"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, docs / docs_name)


def _max_column(page):
    return page.eval_on_selector_all("#features tbody tr", "rs => rs.map(r => parseFloat(r.dataset.max))")


def test_chromium_static_file_mode(browser, site, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, "file://")
    page.goto((site["out"] / "index.html").as_uri())
    assert "Offline mode" in page.text_content("#search-mode")
    # sort by max activation (largest first), then ascending
    page.click("th[data-key=max]")
    col = _max_column(page)
    assert col == sorted(col, reverse=True)
    page.click("th[data-key=max]")
    col = _max_column(page)
    assert col == sorted(col)
    page.click("th[data-key=simulation]")
    first = page.get_attribute("#features tbody tr:first-child", "data-id")
    assert first == "9"  # highest simulation score
    # filter
    page.fill("#filter", "commas")
    assert page.text_content("#filter-count") == "1 shown"
    page.fill("#filter", "")
    # static search over the stored contexts, including the malicious ones
    page.fill("#search-text", "Paris")
    page.click("#search-go")
    page.wait_for_selector("#search-results .hit")
    assert "Paris" in page.text_content("#search-results")
    page.fill("#search-text", "<script>alert(1)</script>")
    page.click("#search-go")
    page.wait_for_selector("#search-results .hit mark")
    assert page.eval_on_selector_all("#search-results script, #search-results img", "n => n.length") == 0
    page.fill("#search-text", "Paris")
    page.click("#search-go")
    _save(page, tmp_path / "index.png", "browser_index.png", full_page=False)
    # open a feature page from the table
    page.click("#features a[href='features/4.html']")
    page.wait_for_selector("h1")
    assert "Feature 4" in page.text_content("h1")
    assert page.eval_on_selector_all(".ctx script, .ctx img, main img", "n => n.length") == 0
    assert SCRIPT in page.text_content("main")  # shown as text
    page.hover(".tok.on.focus")
    assert page.is_visible("#tooltip") and "→" in page.text_content("#tooltip")
    page.goto((site["out"] / "features" / "0.html").as_uri())
    page.hover(".tok.on.focus")
    _save(page, tmp_path / "feature.png", "browser_feature.png")
    page.click("a[rel=next]")
    assert "Feature 1" in page.text_content("h1")
    watch.check()
    page.close()


def test_chromium_served_live_search(browser, site, server, tmp_path):
    base = f"http://127.0.0.1:{server['port']}/"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, base)
    page.goto(base)
    page.wait_for_function("document.querySelector('#search-mode').textContent.startsWith('Live')")
    page.fill("#search-text", f"Paris in 1889 {IMG}")
    page.click("#search-go")
    page.wait_for_selector("#search-results .live-text .tok")
    n_tokens = page.eval_on_selector_all("#search-results .live-text .tok", "n => n.length")
    assert n_tokens == len(f"Paris in 1889 {IMG}")  # the tiny model's tokenizer is byte-level
    assert page.eval_on_selector_all("#search-results img, #search-results script", "n => n.length") == 0
    assert page.eval_on_selector_all("#search-results .feat", "n => n.length") > 0
    page.click("#search-results .live-text .tok:nth-child(3)")
    assert "Token" in page.text_content("#search-results .feat-list")
    page.click("#search-results .feat-list .feat button.link")
    _save(page, tmp_path / "live.png", "browser_live.png", full_page=False)
    page.goto(base + "features/2.html")
    assert "Feature 2" in page.text_content("h1")
    watch.check()
    page.close()
