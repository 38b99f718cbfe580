"""The run's findings report: one self-contained HTML page (plots inlined) that links to the browser.

Each section states a finding with its number and plot, computed here from the stage outputs — the page
never shows a figure that the run did not measure. Sections with no data say so instead of hiding.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from monoscope.artifacts import atomic_path

REPORT = "report.html"


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f'<p class="missing">(plot {html.escape(path.name)} was not produced)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    if frame is None or frame.empty:
        return '<p class="missing">(no rows)</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v, digits)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def neuron_findings(neurons: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Best F1 at k=1 vs k=16 by layer and category, and sentences that state what it shows."""
    real = neurons[neurons.control == "none"] if not neurons.empty else neurons
    if real.empty:
        return pd.DataFrame(), ["No probing results."]
    best = real.groupby(["dataset", "category", "layer", "k"]).f1.max().reset_index()
    wide = best.pivot_table(index=["dataset", "category", "layer"], columns="k", values="f1").reset_index()
    keep = ["dataset", "category", "layer"] + [k for k in (1, 16) if k in wide.columns]
    wide = wide[keep].rename(columns={1: "F1 k=1", 16: "F1 k=16"})
    notes = []
    if "F1 k=1" in wide and "F1 k=16" in wide:
        wide["gap (k=16 − k=1)"] = wide["F1 k=16"] - wide["F1 k=1"]
        for name, part in wide.groupby("dataset"):
            top = part.loc[part["F1 k=1"].idxmax()]
            early = part[part.layer == part.layer.min()].iloc[0]
            notes.append(
                f"<b>{html.escape(name)}</b>: the best single neuron is in layer {int(top.layer)} "
                f"(F1 {top['F1 k=1']:.3f}; with 16 neurons {top['F1 k=16']:.3f}). In the earliest probed layer "
                f"({int(early.layer)}) one neuron reaches F1 {early['F1 k=1']:.3f} and 16 reach "
                f"{early['F1 k=16']:.3f}: a gap of {early['gap (k=16 − k=1)']:.3f}"
                + (" — the feature is spread over several neurons there (superposition)."
                   if early["gap (k=16 − k=1)"] > 0.05 else "."))
    controls = neurons[neurons.control != "none"]
    if not controls.empty:
        c = controls.groupby(["control", "k"]).f1.mean().unstack("k")
        cols = [k for k in (1, 16) if k in c.columns]
        text = "; ".join(f"{ctl}: " + ", ".join(f"k={k} F1 {c.loc[ctl, k]:.3f}" for k in cols) for ctl in c.index)
        notes.append(f"Controls (mean over datasets and layers, mean-difference ranking) — {text}. A random "
                     f"rotation destroys the privileged basis, so single-neuron F1 should drop there; shuffled "
                     f"labels should give chance-level F1.")
    return wide, notes


def latents_vs_neurons(neurons: pd.DataFrame, sae: pd.DataFrame, resid: pd.DataFrame, layer: int) -> pd.DataFrame:
    """Per dataset at the SAE layer: best F1 of neurons, residual dimensions and SAE latents at k=1 and 16."""
    parts = []
    for label, frame in (("MLP neurons", neurons), ("residual dims", resid), ("SAE latents", sae)):
        if frame.empty:
            continue
        f = frame[(frame.control == "none") & (frame.layer == layer) & frame.k.isin([1, 16])]
        g = f.groupby(["dataset", "k"]).f1.max().unstack("k")
        g.columns = [f"{label} k={k}" for k in g.columns]
        parts.append(g)
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, axis=1).reset_index()


def _explanations(path: str | None) -> pd.DataFrame:
    from monoscope.interpret.autointerp import read_results

    if not path or not Path(path).exists():
        return pd.DataFrame()
    rows = []
    for unit, rec in sorted(read_results(path).items()):
        rows.append({"unit": unit, "explanation": rec.get("explanation") or f"(failed: {rec.get('failure', '?')})",
                     "detection acc": (rec.get("detection") or {}).get("accuracy"),
                     "fuzzing acc": (rec.get("fuzzing") or {}).get("accuracy"),
                     "simulation r": (rec.get("simulation") or {}).get("pearson")})
    return pd.DataFrame(rows)


def write_report(out: Path, *, cfg, plan, lm, ext, saes, probe, stats, explained, steering, timings, versions) -> Path:
    """Build report.html (and the feature browser beside it) from the stage results."""
    from monoscope.config import to_dict
    from monoscope.report.browser import build_browser

    out = Path(out)
    browser = out / "browser"
    build_browser(stats["features"], browser, title=f"{lm.name} · {plan['sae_hook']} SAE features",
                  explanations=explained.get("features"))
    build_browser(stats["neurons"], out / "browser_neurons", title=f"{lm.name} · {plan['neuron_hook']} neurons",
                  explanations=explained.get("neurons"))

    neurons = _read(Path(probe["neurons"]) / "results.csv")
    sae_rows = _read(Path(probe["sae"]) / "results.csv")
    resid = _read(Path(probe["resid"]) / "results.csv")
    by_layer, notes = neuron_findings(neurons)
    versus = latents_vs_neurons(neurons, sae_rows, resid, plan["layer"])
    osp_all = _read(Path(probe.get("osp", "")) / "results.csv") if probe.get("osp") else pd.DataFrame()
    osp = osp_all[osp_all.method == "osp"] if not osp_all.empty else osp_all
    osp_cols = [c for c in ("dataset", "layer", "k", "f1", "osp_objective", "osp_gap", "certified", "fit_s")
                if c in osp.columns]
    heur = (osp_all.groupby(["method", "k"]).f1.mean().unstack("k").reset_index()
            if not osp_all.empty else pd.DataFrame())
    sweep = pd.DataFrame(saes["table"])
    sweep_cols = [c for c in ("architecture", "knob", "value", "d_sae", "train_tokens", "l0", "fvu", "explained_variance",
                              "delta_loss", "ce_loss_recovered", "kl_score", "dead_fraction", "train_tokens_per_s")
                  if c in sweep.columns]
    feats, neus = _explanations(explained.get("features")), _explanations(explained.get("neurons"))
    score_cols = ["detection acc", "fuzzing acc", "simulation r"]
    compare = pd.DataFrame([{"units": label, **{c: (frame[c].astype(float).mean() if c in frame else None) for c in score_cols},
                             "n": len(frame)} for label, frame in (("SAE features", feats), ("MLP neurons", neus))])
    eff = steering.get("effect", {})
    small = cfg.tokens < 1_000_000
    sections = []
    sections.append(("Where features have dedicated neurons", "".join(f"<p>{n}</p>" for n in notes)
                     + _img(Path(probe["neurons"]) / "best_f1_by_layer.png", "best F1 by layer")
                     + "".join(_img(p, p.stem) for p in sorted(Path(probe["neurons"]).glob("f1_vs_k_*.png")))
                     + _table(by_layer)))
    sections.append(("Optimal sparse probing vs heuristics",
                     "<p>Optimal sparse probing solves for the best k-subset of a 50-neuron pool exactly "
                     "(hinge loss + ridge, HiGHS MILP); <i>gap</i> 0 means certified optimal for that objective.</p>"
                     + _img(Path(probe.get("osp", probe["neurons"])) / "osp_vs_heuristics.png", "OSP vs heuristics")
                     + "<h3>Mean test F1 by method and k</h3>" + _table(heur)
                     + "<h3>OSP solves</h3>" + _table(osp[osp_cols] if osp_cols else osp)))
    sections.append((f"SAE latents vs neurons at layer {plan['layer']}",
                     "<p>The same datasets probed on the layer's MLP neurons, its residual-stream dimensions and "
                     "the SAE's latents (best method). A feature that one SAE latent captures better than any "
                     "single neuron is a sign the SAE found a monosemantic direction the neuron basis lacks.</p>"
                     + _table(versus)))
    sections.append(("Fidelity / sparsity frontier of the SAEs",
                     _img(Path(saes["folder"]) / "delta_loss_vs_l0.png", "delta loss vs L0")
                     + _img(Path(saes["folder"]) / "fvu_vs_l0.png", "FVU vs L0")
                     + _table(sweep[sweep_cols] if sweep_cols else sweep)))
    sections.append(("Most interpretable features (automated interpretability)",
                     f"<p>Explanations written and scored by <code>{html.escape(cfg.explain_backend or 'hf:' + cfg.model)}"
                     "</code>. A small local model writes weak explanations; the scores measure that honestly. "
                     "Browse every feature in the <a href=\"browser/index.html\">feature browser</a> and the "
                     "neurons in the <a href=\"browser_neurons/index.html\">neuron browser</a>.</p>"
                     "<h3>Neurons vs features on the same scores</h3>" + _table(compare)
                     + "<h3>SAE features</h3>" + _table(feats) + "<h3>MLP neurons</h3>" + _table(neus)))
    steer_html = (f"<p>Feature {steering.get('feature')} ({html.escape(steering.get('explanation') or 'no explanation')}) "
                  f"clamped to {_fmt(steering.get('value'), 2)} during generation. Its own activation on the "
                  f"generated text (re-encoded without steering):</p>" + _table(pd.json_normalize(eff, sep=" ")
                                                                              .T.reset_index()
                                                                              .rename(columns={"index": "measure", 0: "value"}))
                  + "<h3>Side by side</h3>" + "".join(
                      f"<div class=pair><div><b>default</b><pre>{html.escape(p.get('default', ''))}</pre></div>"
                      f"<div><b>steered</b><pre>{html.escape(p.get('steered', ''))}</pre></div></div>"
                      for p in steering.get("examples", [])))
    sections.append(("Steering", steer_html))
    settings = pd.DataFrame(sorted(to_dict(cfg).items()), columns=["setting", "value"])
    sizes = pd.DataFrame([{"what": "SAE training rows", "n": ext["train_rows"]},
                          {"what": "validation rows", "n": ext["validation_rows"]},
                          {"what": "probing rows (all sweeps)", "n": probe.get("rows")}])
    times = pd.DataFrame(sorted(timings.items()), columns=["stage", "seconds"])
    vers = pd.DataFrame(sorted(versions.items()), columns=["library", "version"])
    caution = ("<p class=warn>This is a small CPU run: SAEs trained on "
               f"{ext['train_rows']:,} activations and probes fitted on {cfg.probe_examples} examples per dataset. "
               "Differences of a few hundredths in F1 or loss are within noise; treat the numbers as a smoke test "
               "of the method, not as measurements of the model. Scale up with --tokens and a GPU.</p>") if small else ""
    sections.append(("Run settings, sizes, timings and versions", caution + _table(sizes) + _table(times, 1)
                     + _table(settings) + _table(vers)))
    body = "".join(f"<section><h2>{html.escape(title)}</h2>{content}</section>" for title, content in sections)
    page = _PAGE.format(title=html.escape(f"monoscope findings: {lm.name}"), model=html.escape(lm.name),
                        hook=html.escape(plan["sae_hook"]), body=body)
    path = out / REPORT
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#212529}}
h1{{font-size:1.7em;margin-bottom:.2em}} h2{{border-bottom:2px solid #e9ecef;padding-bottom:.2em;margin-top:2em}}
table{{border-collapse:collapse;font-size:13px;margin:.8em 0;display:block;overflow-x:auto}}
th,td{{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top}} th{{background:#f8f9fa}}
img{{max-width:540px;margin:.4em .6em .4em 0;border:1px solid #eee}} .missing{{color:#868e96;font-style:italic}}
.warn{{background:#fff4e6;border-left:4px solid #d9480f;padding:.5em 1em}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:1em}} pre{{white-space:pre-wrap;background:#f8f9fa;padding:.5em}}
nav a{{margin-right:1em}}
</style></head><body>
<h1>{title}</h1>
<p>Model <b>{model}</b>, SAEs at <code>{hook}</code>. <nav><a href="browser/index.html">Feature browser</a>
<a href="browser_neurons/index.html">Neuron browser</a></nav></p>
{body}
<footer><p class=missing>Generated by monoscope. Every number above was computed by this run.</p></footer>
</body></html>
"""
