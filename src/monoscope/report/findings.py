"""The run's findings report: one self-contained HTML page (plots inlined) that links to the browser.

Each section states a finding with its number and plot, computed here from the stage outputs — the page
never shows a figure that the run did not measure. Sections with no data say so instead of hiding.
"""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd

from monoscope.artifacts import atomic_path
from monoscope.intervals import mean_interval
from monoscope.report.formatting import number, with_interval

REPORT = "report.html"
FINDINGS = "findings.md"


def _img(path: Path, alt: str) -> dict:
    """An inlined PNG block, or a note that the plot was not produced."""
    if not path.exists():
        return {"kind": "missing", "text": f"(plot {path.name} was not produced)"}
    return {"kind": "img", "alt": alt, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}


def _table(frame: pd.DataFrame | None, digits: int = 3) -> dict:
    """A table block: column names and formatted cells (the template escapes them)."""
    if frame is None or frame.empty:
        return {"kind": "missing", "text": "(no rows)"}
    return {"kind": "table", "columns": [str(c) for c in frame.columns],
            "rows": [[number(v, digits) for v in row] for row in frame.itertuples(index=False)]}


def _p(text: str, kind: str = "p") -> dict:
    return {"kind": kind, "text": text}


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
                f"{name}: the best single neuron is in layer {int(top.layer)} "
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


def _at_layer(frame: pd.DataFrame, layer: int) -> pd.DataFrame:
    """Probe results of one layer without the controls."""
    return frame[(frame.control == "none") & (frame.layer == layer)]


def latents_vs_neurons(neurons: pd.DataFrame, sae: pd.DataFrame, resid: pd.DataFrame, layer: int) -> pd.DataFrame:
    """Per dataset at the SAE layer: best F1 of neurons, residual dimensions and SAE latents at k=1 and 16, and
    the dense probe on all of them (the ceiling), each with its 95 % bootstrap interval over test examples."""
    parts = []
    for label, frame in (("MLP neurons", neurons), ("residual dims", resid), ("SAE latents", sae)):
        if frame.empty:
            continue
        f = _at_layer(frame, layer)
        f = f.assign(column=np.where(f.method == "dense", f"{label} dense", label + " k=" + f.k.astype(str)))
        f = f[(f.method == "dense") | f.k.isin([1, 16])]
        best = f.loc[f.groupby(["dataset", "column"]).f1.idxmax()]
        parts.append(best.assign(cell=[with_interval(r.f1, getattr(r, "f1_low", None), getattr(r, "f1_high", None))
                                       for r in best.itertuples()]).pivot(index="dataset", columns="column",
                                                                           values="cell"))
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, axis=1).reset_index()


SAEBENCH_KS = (1, 2, 5)


def saebench_probing(frames: dict[str, pd.DataFrame], layer: int) -> pd.DataFrame:
    """SAEBench's sparse-probing protocol (Karvonen et al. 2025) at the SAE layer: the k units of largest class
    mean difference, a logistic probe on them, test accuracy for k = 1, 2, 5, beside the dense probe on every
    unit; one row per unit basis (``frames``: label -> probe results), each cell the mean over the datasets
    with its 95 % t interval over them (the datasets, not the examples, are the sample), clipped to [0, 1]."""
    rows = []
    for label, frame in frames.items():
        if frame.empty:
            continue
        f = _at_layer(frame, layer)
        row = {"units": label, "datasets": f.dataset.nunique()}
        for name, part in (("dense", f[f.method == "dense"]),
                           *((f"k={k}", f[(f.method == "mean_diff") & (f.k == k)]) for k in SAEBENCH_KS)):
            per_dataset = part.groupby("dataset").accuracy.max()
            mean, low, high = mean_interval(per_dataset)
            row[name] = with_interval(mean, max(low, 0.0), min(high, 1.0), digits=3) if len(per_dataset) else "not run"
        rows.append(row)
    return pd.DataFrame(rows)


def saebench_plot(frames: dict[str, pd.DataFrame], layer: int) -> str | None:
    """Mean test accuracy over the datasets against k (mean-difference selection), one line per unit basis, as
    a PNG data URI (None without rows)."""
    from monoscope.report.plots import line_png

    series = {}
    for label, frame in frames.items():
        if frame.empty:
            continue
        f = _at_layer(frame, layer)
        by_k = f[f.method == "mean_diff"].groupby(["k", "dataset"]).accuracy.max().groupby("k").mean()
        if len(by_k):
            series[label] = (by_k.index.tolist(), by_k.tolist())
    if not series:
        return None
    return line_png(series, None, title=f"Sparse probing at layer {layer} (mean over datasets)", xlabel="k",
                    ylabel="test accuracy", log_x=True)


def _explanations(path: str | None) -> pd.DataFrame:
    from monoscope.interpret.autointerp import read_results

    if not path or not Path(path).exists():
        return pd.DataFrame()
    rows = []
    for unit, rec in sorted(read_results(path).items()):
        other = (rec.get("candidates") or {}).get("tokens" if rec.get("explained_by") == "llm" else "llm") or {}
        rows.append({"unit": unit, "explanation": rec.get("explanation") or f"(failed: {rec.get('failure', '?')})",
                     "by": {"llm": "LLM", "tokens": "token baseline"}.get(rec.get("explained_by"), "LLM"),
                     "detection acc": (rec.get("detection") or {}).get("accuracy"),
                     "fuzzing acc": (rec.get("fuzzing") or {}).get("accuracy"),
                     "simulation r": (rec.get("simulation") or {}).get("pearson"),
                     "intruder acc": (rec.get("intruder") or {}).get("accuracy"),
                     "other explainer": other.get("explanation") or (f"(failed: {other['failure']})"
                                                                     if other.get("failure") else ""),
                     "its detection acc": (other.get("detection") or {}).get("accuracy")})
    return pd.DataFrame(rows)


def write_report(out: Path, *, cfg, plan, lm, ext, saes, probe, stats, explained, steering, timings, versions,
                 split: dict | None = None, command: str = "monoscope run") -> Path:
    """Build report.html, findings.md (the claims' table) and the feature browsers from the stage results."""
    from monoscope.report.browser import template_environment, build_browser
    from monoscope.report.claims import all_claims, findings_markdown, sae_headline, stage_times

    out = Path(out)
    sizes = (split or {}).get("sizes") or []
    build_browser(stats["features"], out / "browser", title=f"{lm.name} · {plan['sae_hook']} SAE features",
                  explanations=explained.get("features"),
                  splitting=Path(split["folder"]) / f"d{sizes[0]}" if sizes else None)
    build_browser(stats["neurons"], out / "browser_neurons", title=f"{lm.name} · {plan['neuron_hook']} neurons",
                  explanations=explained.get("neurons"))
    claims = all_claims(cfg, plan, saes, probe, split, steering, explained)
    headline = sae_headline(saes["table"])
    times = stage_times(timings, ext, saes, probe, cfg, steering)
    sections = [_claims_section(cfg, claims, command), *_probing_sections(probe, plan), _sae_section(saes, headline),
                _explain_section(cfg, explained), _steer_section(steering),
                _settings_section(cfg, ext, probe, times, versions)]
    with atomic_path(out / FINDINGS) as tmp:
        tmp.write_text(findings_markdown(claims, headline, title=f"monoscope findings: {lm.name} ({cfg.profile} "
                                         f"profile)", command=command, times=times, note=_size_warning(cfg)))
    page = template_environment().get_template("report.html").render(
        title=f"monoscope findings: {lm.name}", model=lm.name, hook=plan["sae_hook"], sections=sections)
    path = out / REPORT
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path


def _probing_sections(probe: dict, plan: dict) -> list[dict]:
    """Dedicated neurons by layer, optimal sparse probing vs the heuristics, latents vs neurons."""
    neurons = _read(Path(probe["neurons"]) / "results.csv")
    by_layer, notes = neuron_findings(neurons)
    sae, resid = _read(Path(probe["sae"]) / "results.csv"), _read(Path(probe["resid"]) / "results.csv")
    versus = latents_vs_neurons(neurons, sae, resid, plan["layer"])
    osp_all = _read(Path(probe["osp"]) / "results.csv") if probe.get("osp") else pd.DataFrame()
    osp = osp_all[osp_all.method == "osp"] if not osp_all.empty else osp_all
    osp_cols = [c for c in ("dataset", "layer", "k", "f1", "osp_objective", "osp_gap", "certified", "fit_s")
                if c in osp.columns]
    heur = (osp_all.groupby(["method", "k"]).f1.mean().unstack("k").reset_index()
            if not osp_all.empty else pd.DataFrame())
    dedicated = [*map(_p, notes), _img(Path(probe["neurons"]) / "best_f1_by_layer.png", "best F1 by layer"),
                 *(_img(p, p.stem) for p in sorted(Path(probe["neurons"]).glob("f1_vs_k_*.png"))), _table(by_layer)]
    optimal = [_p("Optimal sparse probing solves for the best k-subset of a 50-neuron pool exactly (hinge loss + "
                  "ridge, HiGHS MILP); gap 0 means certified optimal for that objective."),
               _img(Path(probe.get("osp", probe["neurons"])) / "osp_vs_heuristics.png", "OSP vs heuristics"),
               _p("Mean test F1 by method and k", "h3"), _table(heur),
               _p("OSP solves", "h3"), _table(osp[osp_cols] if osp_cols else osp)]
    frames = {"MLP neurons": neurons, "residual dims": resid, "SAE latents": sae}
    plot = saebench_plot(frames, plan["layer"])
    latents = [_p("The same datasets probed on the layer's MLP neurons, its residual-stream dimensions and the SAE's "
                  "latents (best method). A feature that one SAE latent captures better than any single neuron is a "
                  "sign the SAE found a monosemantic direction the neuron basis lacks."), _table(versus),
               _p("SAEBench's sparse probing (k = 1, 2, 5)", "h3"),
               _p("Test accuracy of a logistic probe on the k units of largest class mean difference, mean over the "
                  "datasets [95 % t interval over them, clipped to [0, 1]]; 'not run': k is not in probe_ks."),
               _table(saebench_probing(frames, plan["layer"])),
               *([{"kind": "img", "alt": "SAEBench sparse probing", "src": plot}] if plot else [])]
    return [{"title": "Where features have dedicated neurons", "blocks": dedicated},
            {"title": "Optimal sparse probing vs heuristics", "blocks": optimal},
            {"title": f"SAE latents vs neurons at layer {plan['layer']}", "blocks": latents}]


def _claims_section(cfg, claims, command: str) -> dict:
    from monoscope.report.claims import claims_table

    blocks = [_p("Each finding of the field this run can test, measured here with its 95 % interval beside the "
                 "baseline it must beat. Reproduced: the intervals separate in the claimed direction; not reproduced: "
                 "they separate the other way; inconclusive: they overlap. Produced by: " + command)]
    if warning := _size_warning(cfg):
        blocks.append(_p(warning, "warn"))
    return {"title": "Claims, baselines and verdicts", "blocks": [*blocks, _table(claims_table(claims))]}


def _size_warning(cfg) -> str:
    if cfg.profile == "research":
        return ""
    return ("This is a small run: a claim whose 'size note' is filled cannot be supported at this size, whatever its "
            "verdict; `monoscope run --profile research` measures every claim at the sizes it needs.")


def _sae_section(saes: dict, headline: pd.DataFrame) -> dict:
    sweep = pd.DataFrame(saes["table"])
    cols = [c for c in ("architecture", "knob", "value", "d_sae", "seed", "train_tokens", "l0", "fvu", "explained_variance",
                        "delta_loss", "ce_loss_recovered", "kl_score", "dead_fraction", "train_tokens_per_s")
            if c in sweep.columns]
    return {"title": "Fidelity / sparsity frontier of the SAEs",
            "blocks": [_p("The main SAE (the later stages interpret it), mean [95 % interval] over its seeds:"),
                       _table(headline), _img(Path(saes["folder"]) / "delta_loss_vs_l0.png", "delta loss vs L0"),
                       _img(Path(saes["folder"]) / "fvu_vs_l0.png", "FVU vs L0"),
                       _table(sweep[cols] if cols else sweep)]}


def _explain_section(cfg, explained: dict) -> dict:
    feats, neus = _explanations(explained.get("features")), _explanations(explained.get("neurons"))
    score_cols = ["detection acc", "fuzzing acc", "simulation r", "intruder acc"]
    compare = pd.DataFrame([{"units": label, **{c: frame[c].astype(float).mean() if c in frame else None
                                                for c in score_cols}, "n": len(frame)}
                            for label, frame in (("SAE features", feats), ("MLP neurons", neus))])
    backend = cfg.explain_backend or "hf:" + cfg.model
    return {"title": "Most interpretable features (automated interpretability)", "browser_links": True,
            "blocks": [_p(f"Explanations written and scored by {backend}, each beside the model-free baseline "
                          "(the unit's most distinctive firing tokens against random corpus contexts), scored by the "
                          "same judge on the same held-out excerpts; a unit shows the better of the two ('by'), so an "
                          "LLM explanation appears only where it beat the baseline, and the scores shown are the "
                          "better of two noisy estimates on the same excerpts (optimistic; both are in the table). A small local model writes weak "
                          "explanations and judges weakly; the scores measure that honestly, and with 2 scored "
                          "excerpts per class a unit's accuracy is one of a handful of values. Browse every feature "
                          "and neuron in the browsers linked here."),
                       _p("Neurons vs features on the same scores", "h3"), _table(compare),
                       _p("SAE features", "h3"), _table(feats), _p("MLP neurons", "h3"), _table(neus)]}


def _steer_section(steering: dict) -> dict:
    effect = (pd.json_normalize(steering.get("effect", {}), sep=" ").T.reset_index()
              .rename(columns={"index": "measure", 0: "value"}))
    return {"title": "Steering", "blocks": [
        _p(f"Feature {steering.get('feature')} ({steering.get('explanation') or 'no explanation'}) clamped to "
           f"{number(steering.get('value'), 2)} during generation, picked by a screen of "
           f"{(steering.get('screen') or {}).get('candidates', '?')} candidate features and measured here on fresh "
           f"seeds. Its own activation on the generated text (re-encoded without steering):"), _table(effect),
        *_steer_baseline(steering), _p("Side by side", "h3"),
        *({"kind": "pair", "default": p.get("default", ""), "steered": p.get("steered", "")}
          for p in steering.get("examples", []))]}


def _steer_baseline(steering: dict) -> list[dict]:
    """The difference-of-means direction for the same concept beside the feature, same prompts and seeds."""
    base, effect = steering.get("baseline") or {}, steering.get("effect") or {}
    if not base.get("steered"):
        return [_p(f"No difference-of-means baseline: {base.get('failure', 'not measured')}.")] if base else []
    rows = []
    for label, arm, p in (("unsteered", effect.get("default", {}), None),
                          ("SAE feature (clamp)", effect.get("steered", {}), effect.get("keyword_p_value")),
                          ("difference of means (add, matched norm)", base["steered"], base.get("keyword_p_value"))):
        kw = arm.get("keyword_rate") or {}
        rows.append({"steered by": label, "keyword rate": kw.get("mean"), "hits / n": f"{kw.get('hits')}/{kw.get('n')}",
                     "keyword p (vs unsteered)": p, "feature activation": (arm.get("mean_activation") or {}).get("mean"),
                     "concept probe": _mean_se(arm.get("concept_probe")),
                     "distinct-token share": (arm.get("distinct_tokens") or {}).get("mean")})
    return [_p("Against the baseline", "h3"),
            _p(f"The difference-of-means direction of the same concept (the activation at the firing token of "
               f"{base['n_positive']} top examples minus the mean over {base['n_negative']} tokens of non-activating "
               f"windows; cosine "
               f"{number(base.get('cosine_with_feature'), 2)} "
               f"with the feature's decoder direction), added at the clamp's norm on the same prompts and seeds."
               + _probe_note(base.get("concept_probe") or {})),
            _table(pd.DataFrame(rows))]


def _mean_se(summary: dict | None) -> str:
    return "—" if not summary else f"{summary['mean']:.3f} ± {summary['se']:.3f}"


def _probe_note(probe: dict) -> str:
    if not probe:
        return ""
    cv = probe.get("cv_balanced_accuracy")
    return (f" The concept probe (a logistic regression on the hook's activations, the same {probe['n_positive']} "
            f"firing tokens vs {probe['n_negative']} non-activating tokens; cross-validated balanced accuracy "
            f"{'—' if cv is None else f'{cv:.2f}'}) scores each arm's text: its mean probability over the generated "
            f"tokens ± standard error.")


def _settings_section(cfg, ext: dict, probe: dict, times: pd.DataFrame, versions: dict) -> dict:
    from monoscope.config import to_dict

    sizes = pd.DataFrame([{"what": "SAE training rows", "n": ext["train_rows"]},
                          {"what": "validation rows", "n": ext["validation_rows"]},
                          {"what": "probing rows (all sweeps)", "n": probe.get("rows")}])
    blocks = []
    if cfg.tokens < 1_000_000:
        blocks.append(_p(f"This is a small CPU run: SAEs trained on {ext['train_rows']:,} activations and probes "
                         f"fitted on {cfg.probe_examples} examples per dataset. Differences of a few hundredths in "
                         "F1 or loss are within noise; treat the numbers as a smoke test of the method, not as "
                         "measurements of the model. Scale up with --tokens and a GPU.", "warn"))
    blocks += [_table(sizes), _table(times),
               _table(pd.DataFrame(sorted(to_dict(cfg).items()), columns=["setting", "value"])),
               _table(pd.DataFrame(sorted(versions.items()), columns=["library", "version"]))]
    return {"title": "Run settings, sizes, timings and versions", "blocks": blocks}
