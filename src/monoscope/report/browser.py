"""The feature browser: a self-contained static HTML site built from a feature-statistics artifact.

    build_browser("runs/stats", "runs/browser", title="Gemma 3 270M · layer 6 residual SAE")

The site works from ``file://`` with no network: every script and style sheet is vendored into
``static/``, nothing refers to an outside URL. Pages:

- ``index.html``: every feature (or neuron) in one table, sortable by density, maximum activation and the
  automated-interpretability scores, with a filter box and a search box (static mode: searches the stored
  contexts and explanations; under ``monoscope serve``: runs the model + SAE on the pasted text).
- ``features/{id}.html``: density and activation histogram, explanation and scores, logit effects,
  top-activating contexts with per-token colouring (value on hover), interval examples, correlated
  features / neurons and decoder neighbours linked to their pages.
- ``search_index.js``: compact data for the static search; ``browser.json``: the sidecar.

All corpus text goes through jinja2's autoescaping; the JavaScript inserts text only with
``textContent``. The site is built in a temporary folder beside the target and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from monoscope.artifacts import fsync_dir, library_versions, now_iso, read_json, write_json
from monoscope.errors import MonoscopeError
from monoscope.interpret.autointerp import read_results
from monoscope.report.formatting import number as _fmt, percent as _pct
from monoscope.report.plots import svg_histogram

HERE = Path(__file__).parent
SIDE_CAR = "browser.json"
SCORE_KEYS = (("detection", "accuracy"), ("fuzzing", "accuracy"), ("simulation", "pearson"))
# Accent colour for activations (orange); white at zero.
_HI = (234, 88, 12)


# =============================================================================================== reading
@dataclass
class Example:
    """A window of decoded tokens, the feature's activation on each (None: not recorded, e.g. a BOS) and
    the index of the example's own token (``focus``)."""

    tokens: list[str]
    acts: list[float | None]
    focus: int = -1


@dataclass
class FeatureData:
    """Everything one feature page shows, in one normalised form."""

    id: int
    density: float | None = None
    max_act: float | None = None
    mean_act: float | None = None  # mean over the tokens where it fires
    top: list[Example] = field(default_factory=list)
    intervals: list[tuple[str, list[Example]]] = field(default_factory=list)  # (label, examples), low → high
    hist_counts: list[float] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    correlated_features: list[tuple[int, float]] = field(default_factory=list)
    correlated_neurons: list[tuple[int, float]] = field(default_factory=list)
    neighbours: list[tuple[int, float]] = field(default_factory=list)


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _examples(raw: Any) -> list[Example]:
    out = []
    for ex in raw or []:
        toks = [str(t) for t in ex.get("tokens", [])]
        acts = [_num(a) for a in ex.get("acts", [])]
        if len(toks) != len(acts):
            raise MonoscopeError(f"an example has {len(toks)} tokens but {len(acts)} activations; the statistics "
                                 f"artifact is damaged: rebuild it with `monoscope stats --force`")
        if toks:
            focus = ex.get("focus")
            if not isinstance(focus, int) or not 0 <= focus < len(toks):
                focus = max(range(len(toks)), key=lambda i: acts[i] or 0.0)
            out.append(Example(toks, acts, focus))
    return out


def _pairs(ids, values) -> list[tuple[int, float]]:
    """(id, value) pairs from two rows of the arrays, leaving out the empty slots (id -1 or value NaN)."""
    out = []
    for i, v in zip(ids, values):
        v = _num(v)
        if int(i) >= 0 and v is not None:
            out.append((int(i), v))
    return out


class StatsArtifact:
    """The browser's view of a feature-statistics folder, read through its owner ``FeatureStats``.

    ``stats`` is the FeatureStats, ``arrays`` its arrays as numpy, and ``features(ids)`` yields one
    ``FeatureData`` per wanted id.
    """

    def __init__(self, folder: str | os.PathLike):
        from monoscope.interpret.feature_stats import FeatureStats

        self.stats = FeatureStats(folder)
        self.folder = self.stats.folder
        self.meta: dict = self.stats.sidecar
        self.kind = "neurons" if self.stats.kind == "hook_units" else "features"
        self.arrays = {k: v.numpy() for k, v in self.stats.arrays.items()}
        self.n = self.stats.n_features
        self.model, self.hook = self.stats.model, self.stats.hook
        self.n_tokens, self.neuron_hook = self.stats.n_tokens, self.stats.neuron_hook

    @property
    def ids(self) -> list[int]:
        return list(range(self.n))

    def column(self, name: str, i: int) -> float | None:
        arr = self.arrays.get(name)
        return _num(arr[i]) if arr is not None and i < len(arr) else None

    def _feature(self, fid: int, rec: dict) -> FeatureData:
        a = self.arrays
        fd = FeatureData(
            id=fid,
            density=self.column("density", fid), max_act=self.column("max", fid),
            mean_act=self.column("mean_nonzero", fid),
            top=_examples(rec.get("top")),
            intervals=[(f"{_fmt(_num(g.get('lo')))} – {_fmt(_num(g.get('hi')))}", _examples(g.get("examples")))
                       for g in rec.get("intervals", [])],
            promoted=[(str(t), float(v)) for t, v in (rec.get("logits") or {}).get("pos", []) if _num(v) is not None],
            suppressed=[(str(t), float(v)) for t, v in (rec.get("logits") or {}).get("neg", [])
                        if _num(v) is not None],
        )
        fd.intervals = [(label, exs) for label, exs in fd.intervals if exs]
        if "hist" in a and "hist_edges" in a:
            fd.hist_counts = a["hist"][fid].astype(float).tolist()
            fd.hist_edges = a["hist_edges"].astype(float).tolist()
        if "corr_features" in a:
            fd.correlated_features = _pairs(a["corr_features"][fid], a["corr_features_r"][fid])
        if "corr_neurons" in a:
            fd.correlated_neurons = _pairs(a["corr_neurons"][fid], a["corr_neurons_r"][fid])
        if "neighbours" in a:
            fd.neighbours = _pairs(a["neighbours"][fid], a["neighbours_cos"][fid])
        if fd.max_act is None:
            fd.max_act = _num(rec.get("max"))
        if fd.density is None:
            fd.density = _num(rec.get("density"))
        return fd

    def features(self, ids: Iterable[int]) -> Iterator[FeatureData]:
        """FeatureData for ``ids`` in ascending order."""
        for fid, rec in self.stats.records(sorted(set(int(i) for i in ids))):
            yield self._feature(fid, rec)


def load_explanations(path: str | os.PathLike | None) -> dict[int, dict]:
    """Records of an ``explanations.jsonl`` (read by its owner, monoscope.interpret.autointerp) by feature id;
    {} if absent."""
    return {} if path is None else read_results(path)


def explanation_scores(rec: dict | None) -> dict[str, float | None]:
    """{"detection": acc, "fuzzing": acc, "simulation": r} from one autointerp record (None when missing)."""
    out: dict[str, float | None] = {}
    for name, key in SCORE_KEYS:
        part = (rec or {}).get(name)
        out[name] = _num(part.get(key)) if isinstance(part, dict) and part.get("n", 1) else None
    return out


# =============================================================================================== building
def _colour(frac: float) -> str:
    f = min(1.0, max(0.0, frac)) ** 0.8 * 0.9
    r, g, b = (round(255 + (c - 255) * f) for c in _HI)
    return f"#{r:02x}{g:02x}{b:02x}"


_CONTROL = {c: chr(0x2400 + c) for c in range(32)}  # control characters → Unicode control pictures
_CONTROL.update({10: "⏎", 9: "⇥", 13: "", 127: "␡"})


def _show_token(tok: str) -> str:
    """Make newlines, tabs and other control characters visible (⏎, ⇥, ␀ …)."""
    return tok.replace("\r\n", "⏎").translate(_CONTROL)


def _render_example(ex: Example, scale: float, before: int = 32, after: int = 12) -> dict:
    """Cut a window around the example's own token and render it as HTML: one span per token, its
    background ∝ act / scale, its value in ``data-v``. Every token goes through ``markupsafe.escape``."""
    from markupsafe import Markup, escape

    n = len(ex.tokens)
    focus = ex.focus if 0 <= ex.focus < n else 0
    lo, hi = max(0, focus - before), min(n, focus + after + 1)
    parts = ['<div class="ctx">']
    if lo > 0:
        parts.append('<span class="ell">…</span>')
    for i in range(lo, hi):
        a = ex.acts[i]
        text = escape(_show_token(ex.tokens[i]))
        cls = "tok focus" if i == focus else "tok"
        if a is not None and a > 0:
            colour = _colour(a / scale if scale > 0 else 0.0)
            parts.append(f'<span class="{cls} on" style="background:{colour}" data-v="{escape(_fmt(a))}">{text}</span>')
        elif a is None:
            parts.append(f'<span class="{cls} special">{text}</span>')
        else:
            parts.append(f'<span class="{cls}">{text}</span>')
    if hi < n:
        parts.append('<span class="ell">…</span>')
    parts.append("</div>")
    return {"html": Markup("".join(parts)), "act": _fmt(ex.acts[focus] or 0.0)}


def _top_tokens(fd: FeatureData, n: int = 5) -> list[str]:
    """The most frequent focus tokens of the top examples (whitespace trimmed), most frequent first."""
    seen: dict[str, int] = {}
    for ex in fd.top:
        tok = ex.tokens[ex.focus] if 0 <= ex.focus < len(ex.tokens) else ""
        t = tok.strip() or _show_token(tok)
        seen[t] = seen.get(t, 0) + 1
    return [t for t, _ in sorted(seen.items(), key=lambda kv: -kv[1])][:n]


def _hist_svg(counts: list[float], edges: list[float], mean: float | None) -> str:
    """The shared fixed log-spaced histogram, cut to its non-empty range and drawn on a log10 x axis."""
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz or len(edges) != len(counts) + 1:
        return ""
    a, b = nz[0], nz[-1] + 1
    cnt, e = counts[a:b], list(edges[a:b + 1])
    if e[0] <= 0:  # the first bin starts at 0: give it the width of its neighbour on the log axis
        step = math.log10(e[2] / e[1]) if len(e) > 2 and e[1] > 0 else 0.1
        e[0] = e[1] / 10 ** step
    logs = [math.log10(x) for x in e]
    return svg_histogram(cnt, logs, width=560, height=170, xlabel="activation (log scale)", x_is_log10=True,
                         marker=math.log10(mean) if mean and mean > 0 else None)


def template_environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    env.filters["pct"] = _pct
    env.filters["score"] = lambda x: "–" if x is None else f"{x:.2f}"
    return env


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an older browser there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def _check_target(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise MonoscopeError(f"{out} exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not (out / SIDE_CAR).exists():
            raise MonoscopeError(f"{out} is a non-empty folder that is not a feature browser; refusing to "
                                 f"replace it. Choose an empty or new --out folder")


def _page_ids(stats: StatsArtifact, features: Iterable[int] | None, max_features: int | None) -> list[int]:
    """The feature ids that get pages: ``features`` (checked against the stats) or all, cut to ``max_features``."""
    if max_features is not None and max_features < 1:
        raise MonoscopeError(f"max_features must be at least 1, got {max_features}")
    if features is not None:
        ids = sorted(set(int(f) for f in features))
        bad = [f for f in ids if not 0 <= f < stats.n]
        if bad:
            raise MonoscopeError(f"features {bad[:5]} are not in {stats.folder}: valid ids are 0 to {stats.n - 1}")
    else:
        ids = stats.ids
    if max_features is not None:
        ids = ids[:max_features]
    if not ids:
        raise MonoscopeError(f"{stats.folder} describes no features; is the statistics run finished?")
    return ids


def build_browser(stats_folder: str | os.PathLike, out_folder: str | os.PathLike, title: str | None = None,
                  explanations: str | os.PathLike | None = None, max_features: int | None = None,
                  features: Iterable[int] | None = None, splitting: str | os.PathLike | None = None) -> Path:
    """Build the static feature browser for ``stats_folder`` into ``out_folder``; returns ``out_folder``.

    ``explanations``: an autointerp JSON-lines file (default: ``explanations.jsonl`` in the stats folder
    when present). ``max_features``: only the first N ids get pages (all by default); ``features``:
    exactly these ids. ``splitting``: a split-stage folder (``splitting.json``); its tested features' pages show
    the family they split into in the larger SAE. An existing browser at ``out_folder`` is replaced atomically.
    """
    from monoscope.interpret.splitting import Splitting

    stats = StatsArtifact(stats_folder)
    out = Path(out_folder)
    _check_target(out)
    ids = _page_ids(stats, features, max_features)
    if explanations is None and (stats.folder / "explanations.jsonl").exists():
        explanations = stats.folder / "explanations.jsonl"
    elif explanations is not None and not Path(explanations).exists():
        raise MonoscopeError(f"explanations file {explanations} does not exist")
    expl = load_explanations(explanations)
    split = Splitting.load(splitting) if splitting else None

    unit = "Neuron" if stats.kind == "neurons" else "Feature"
    title = title or " · ".join(x for x in (stats.model, stats.hook, unit.lower() + "s") if x)
    site = dict(title=title, unit=unit, kind=stats.kind, model=stats.model, hook=stats.hook,
                n_tokens=stats.n_tokens, neuron_hook=stats.neuron_hook, split_size=split.large_d_sae if split else None,
                has_scores=any(v is not None for r in expl.values() for v in explanation_scores(r).values()))
    env = template_environment()
    feature_tpl = env.get_template("feature.html")
    page_ids = set(ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.copytree(HERE / "static", tmp / "static")
        (tmp / "features").mkdir()
        rows, search = [], []
        for pos, fd in enumerate(stats.features(ids)):
            rec = expl.get(fd.id)
            scores = explanation_scores(rec)
            top_toks = _top_tokens(fd)
            explanation = str((rec or {}).get("explanation") or "")
            rows.append(dict(id=fd.id, density=fd.density, max_act=fd.max_act, explanation=explanation,
                             scores=scores, top_tokens=top_toks))
            search.append({"id": fd.id, "e": explanation, "t": top_toks, "m": fd.max_act or 0.0,
                           "c": ["".join(ex.tokens) for ex in fd.top[:5]]})
            page = _feature_context(fd, rec, scores, stats, page_ids,
                                    prev_id=ids[pos - 1] if pos > 0 else None,
                                    next_id=ids[pos + 1] if pos + 1 < len(ids) else None)
            family = split.family_of(fd.id) if split else None
            page["family"] = family and {**family, "rows": [dict(id=i, value=c, href=None)
                                                            for i, c in zip(family["members"], family["cosines"])]}
            (tmp / "features" / f"{fd.id}.html").write_text(
                feature_tpl.render(site=site, f=page, root="../"), encoding="utf-8")
        summary = _index_summary(rows, stats)
        (tmp / "index.html").write_text(
            env.get_template("index.html").render(site=site, rows=rows, summary=summary, root=""), encoding="utf-8")
        payload = {"kind": stats.kind, "unit": unit, "features": search}
        (tmp / "search_index.js").write_text("window.MONOSCOPE_INDEX = " + _js_json(payload) + ";\n", encoding="ascii")
        write_json(tmp / SIDE_CAR, {
            "artifact": "feature-browser", "title": title, "kind": stats.kind, "model": stats.model,
            "hook": stats.hook, "stats_folder": os.path.relpath(stats.folder.resolve(), out.resolve()),
            "stats_input_hash": stats.stats.input_hash, "stats_content_hash": stats.stats.content_hash,
            "explanations": os.path.relpath(Path(explanations).resolve(), out.resolve()) if explanations else None,
            "n_pages": len(ids), "created": now_iso(), "versions": library_versions()})
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _js_json(data: Any) -> str:
    """JSON that is also safe inside a script: pure ASCII, with <, > and & written as \\u escapes."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _index_summary(rows: list[dict], stats: StatsArtifact) -> dict:
    dens = [r["density"] for r in rows if r["density"] is not None]
    alive = [d for d in dens if d > 0]
    hist = ""
    if alive:
        logs = [math.log10(d) for d in alive]
        lo, hi = math.floor(min(logs)), math.ceil(max(logs))
        if hi == lo:
            hi = lo + 1
        nb = max(10, min(40, 8 * (hi - lo)))
        width = (hi - lo) / nb
        counts = [0] * nb
        for v in logs:
            counts[min(nb - 1, int((v - lo) / width))] += 1
        hist = svg_histogram(counts, [lo + i * width for i in range(nb + 1)], width=560, height=150,
                             xlabel="firing density (log scale)", x_is_log10=True)
    dens_sorted = sorted(dens)
    return dict(n=len(rows), dead=sum(1 for d in dens if d == 0), n_total=stats.n,
                median_density=dens_sorted[len(dens_sorted) // 2] if dens_sorted else None,
                density_hist=hist, n_explained=sum(1 for r in rows if r["explanation"]))


def _feature_context(fd: FeatureData, rec: dict | None, scores: dict, stats: StatsArtifact, page_ids: set[int],
                     prev_id: int | None, next_id: int | None) -> dict:
    scale = fd.max_act or max((a or 0.0 for e in fd.top for a in e.acts), default=0.0)

    def links(pairs, linkable: bool):
        return [dict(id=i, value=v, href=f"{i}.html" if linkable and i in page_ids else None) for i, v in pairs]

    record = rec or {}
    detail = {}
    for name, _ in SCORE_KEYS:
        part = record.get(name)
        if isinstance(part, dict):
            bits = [f"{k} {_fmt(_num(part.get(k)))}" for k in ("accuracy", "precision", "recall", "f1", "pearson")
                    if _num(part.get(k)) is not None]
            if part.get("n") is not None:
                bits.append(f"n = {part.get('n')}")
            if part.get("failure"):
                bits.append(str(part["failure"]))
            detail[name] = " · ".join(bits)
    return dict(
        id=fd.id, density=fd.density, max_act=fd.max_act, mean_act=fd.mean_act,
        top=[_render_example(e, scale) for e in fd.top],
        intervals=[(label, [_render_example(e, scale) for e in exs]) for label, exs in fd.intervals],
        hist=_hist_svg(fd.hist_counts, fd.hist_edges, fd.mean_act), promoted=fd.promoted, suppressed=fd.suppressed,
        # correlated "features" are units of the artifact's own kind: link them; correlated neurons of
        # another hook have no pages
        correlated_features=links(fd.correlated_features, True),
        correlated_neurons=links(fd.correlated_neurons, False),
        neighbours=links(fd.neighbours, True),
        explanation=str(record.get("explanation") or ""), status=record.get("status"),
        failure=record.get("failure"), scores=scores, score_detail=detail, has_record=rec is not None,
        prev_id=prev_id, next_id=next_id, top_tokens=_top_tokens(fd))


# =============================================================================================== CLI
@dataclass
class BrowserConfig:
    """Flags of ``monoscope browser``; the arguments of ``build_browser``."""
    stats: str = field(metadata={"help": "feature-statistics folder (monoscope stats)"})
    out: str = field(metadata={"help": "folder to write the site into (replaced atomically)"})
    title: str | None = field(default=None, metadata={"help": "page title (default: model · hook)"})
    explanations: str | None = field(default=None, metadata={
        "help": "autointerp results (JSON lines; default: STATS/explanations.jsonl when present)"})
    max_features: int | None = field(default=None, metadata={"help": "only the first N features get pages"})


def setup_browser(p):
    """Flags of ``monoscope browser``; returns the function that runs it."""
    from monoscope.config import add_arguments, from_namespace, to_dict

    add_arguments(p, BrowserConfig)

    def run(ns):
        options = to_dict(from_namespace(BrowserConfig, ns))
        out = build_browser(options.pop("stats"), options.pop("out"), **options)
        n = read_json(out / SIDE_CAR)["n_pages"]
        print(f"wrote {n} pages to {out}; open {out / 'index.html'} or run `monoscope serve {out}`")
    return run
