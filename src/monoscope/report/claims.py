"""The seed findings of the field, each tested on the run's own numbers: claim, measure, baseline, verdict.

A verdict is **reproduced** when the 95 % intervals separate in the claimed direction, **not reproduced**
when they separate the other way, **inconclusive** when they overlap, and **not measured** when the run
lacks the data (e.g. one dictionary size: no splitting). Claims over many datasets count the datasets each
way and take the majority. Each claim also says when the run's size is below what the claim needs; its verdict
is then computed all the same but should not be quoted. ``claims_markdown`` writes the table of
``findings.md``.

Sources: Gurnee et al. 2023 (sparse probing, dedicated neurons vs superposition), Gao et al. 2024 and
Kantamneni et al. 2025 (SAE latents as probes), Rajamanoharan et al. 2024 (JumpReLU vs TopK at equal L0),
Templeton et al. 2024 and Wu et al. 2025 "AxBench" (steering, difference of means), Bricken et al. 2023
(feature splitting; specificity of features vs neurons), Bills et al. 2023 and Paulo et al. 2024 (LLM
explanations, against a model-free baseline).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from monoscope.intervals import mean_interval, wilson
from monoscope.report.formatting import number, with_interval

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_MEASURED = "reproduced", "not reproduced", "inconclusive", "not measured"
RESEARCH = {"probe_examples": 1000, "seeds": 3, "steer_samples": 40}  # the sizes the claims are made at


@dataclass
class Claim:
    id: str
    claim: str
    measured: str
    baseline: str
    verdict: str
    size_note: str = ""


def greater(a: tuple, b: tuple) -> str:
    """Verdict of "a > b" for (value, low, high) triples: reproduced when a's interval lies above b's."""
    (_, a_lo, a_hi), (_, b_lo, b_hi) = a, b
    if any(v is None or v != v for v in (a_lo, a_hi, b_lo, b_hi)):
        return INCONCLUSIVE
    return REPRODUCED if a_lo > b_hi else NOT_REPRODUCED if a_hi < b_lo else INCONCLUSIVE


def tally(verdicts: list[str]) -> tuple[str, str]:
    """The majority verdict of per-dataset verdicts and the counts ("3 of 5 reproduced, 1 not, 1 inconclusive")."""
    n = len(verdicts)
    if not n:
        return NOT_MEASURED, "no datasets"
    counts = {v: verdicts.count(v) for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
    top = REPRODUCED if counts[REPRODUCED] > n / 2 else NOT_REPRODUCED if counts[NOT_REPRODUCED] > n / 2 else INCONCLUSIVE
    return top, (f"{counts[REPRODUCED]} of {n} datasets reproduced, {counts[NOT_REPRODUCED]} not, "
                 f"{counts[INCONCLUSIVE]} inconclusive")


def _best(frame: pd.DataFrame, **where) -> pd.Series | None:
    """The row of the highest F1 among ``frame``'s real (uncontrolled) rows matching ``where``."""
    if frame.empty:
        return None
    f = frame[frame.control == "none"] if "control" in frame else frame
    for col, val in where.items():
        f = f[f[col] == val]
    f = f[f.method != "dense"] if "method" in f else f
    return None if f.empty else f.loc[f.f1.idxmax()]


def _triple(row: pd.Series | None, metric: str = "f1") -> tuple:
    if row is None:
        return (float("nan"),) * 3
    return (row[metric], row.get(f"{metric}_low"), row.get(f"{metric}_high"))


def _size_note(cfg, needed: str) -> str:
    have = getattr(cfg, needed)
    return (f"this run's size cannot support it: {needed} = {have} (the research profile uses {RESEARCH[needed]})"
            if have < RESEARCH[needed] else "")


def superposition_claims(neurons: pd.DataFrame, cfg) -> list[Claim]:
    """(a) early layers in superposition (16 neurons beat 1), and a layer with a dedicated neuron."""
    early, dedicated, details = [], [], []
    for name, part in (neurons[neurons.control == "none"].groupby("dataset") if not neurons.empty else []):
        first = part.layer.min()
        one, sixteen = _triple(_best(part, layer=first, k=1)), _triple(_best(part, layer=first, k=16))
        early.append(greater(sixteen, one))
        per_layer = [(layer, _triple(_best(part, layer=layer, k=1)), _triple(_best(part, layer=layer, k=16)))
                     for layer in sorted(part.layer.unique())]
        layer, top1, top16 = max(per_layer, key=lambda t: t[1][0])
        dedicated.append(REPRODUCED if greater(top16, top1) == INCONCLUSIVE and top1[0] >= 0.8
                         else NOT_REPRODUCED if greater(top16, top1) == REPRODUCED else INCONCLUSIVE)
        details.append(f"{name}: layer {first} k=1 {with_interval(*one)} vs k=16 {with_interval(*sixteen)}; "
                       f"best neuron layer {layer} k=1 {with_interval(*top1)} vs k=16 {with_interval(*top16)}")
    note = _size_note(cfg, "probe_examples")
    v1, c1 = tally(early)
    v2, c2 = tally(dedicated)
    return [Claim("a1", "In the first probed layer the features are spread over several neurons (superposition): "
                        "the best 16 neurons beat the best single neuron [Gurnee et al. 2023]",
                  c1 + ". " + "; ".join(details[:4]) + ("; …" if len(details) > 4 else ""),
                  "the best single neuron (k = 1) at the same layer", v1, note),
            Claim("a2", "Some layer has a dedicated neuron: one neuron reaches F1 ≥ 0.8 and is not significantly "
                        "below 16 neurons [Gurnee et al. 2023]", c2,
                  "16 neurons at the neuron's layer", v2, note)]


def latent_claims(neurons: pd.DataFrame, sae: pd.DataFrame, resid: pd.DataFrame, layer: int, cfg) -> list[Claim]:
    """(b) at k = 1 the best SAE latent beats the best neuron and residual dimension; (f) it is more specific."""
    b, f, details, spec = [], [], [], []
    for name in sorted(sae.dataset.unique()) if not sae.empty else []:
        s = _best(sae, dataset=name, layer=layer, k=1)
        n = _best(neurons, dataset=name, layer=layer, k=1)
        r = _best(resid, dataset=name, layer=layer, k=1)
        rival = max((_triple(n), _triple(r)), key=lambda t: t[0] if t[0] == t[0] else -1)
        b.append(greater(_triple(s), rival))
        f.append(greater(_triple(s, "precision"), _triple(n, "precision")))
        details.append(f"{name}: latent {with_interval(*_triple(s))}, neuron {with_interval(*_triple(n))}, "
                       f"residual {with_interval(*_triple(r))}")
        spec.append(f"{name}: latent precision {with_interval(*_triple(s, 'precision'))} "
                    f"recall {with_interval(*_triple(s, 'recall'))}; "
                    f"neuron {with_interval(*_triple(n, 'precision'))} / {with_interval(*_triple(n, 'recall'))}")
    note = _size_note(cfg, "probe_examples")
    vb, cb = tally(b)
    vf, cf = tally(f)
    return [Claim("b", f"At k = 1 (layer {layer}) the best SAE latent is a better probe than the best MLP neuron or "
                       "residual dimension [Gao et al. 2024; Kantamneni et al. 2025 find SAE probes rarely beat "
                       "baselines]", cb + ". " + "; ".join(details[:4]) + ("; …" if len(details) > 4 else ""),
                  "the best neuron / residual dimension at k = 1 (the dense probes' ceiling is in the table "
                  "below)", vb, note),
            Claim("f", "The best SAE feature for a concept is more specific (precision when it fires as the "
                       "probe's single unit) than the best neuron [Bricken et al. 2023]",
                  cf + ". " + "; ".join(spec[:3]) + ("; …" if len(spec) > 3 else ""),
                  "the best neuron's precision at the same layer", vf, note)]


def frontier_claims(table: list[dict], cfg) -> list[Claim]:
    """(c) JumpReLU at equal L0 reaches a lower delta LM loss than TopK, against TopK's seed interval."""
    rows = pd.DataFrame(table)
    if rows.empty or "delta_loss" not in rows or not {"topk", "jumprelu"} <= set(rows.architecture):
        return [Claim("c", "JumpReLU reaches a lower delta LM loss than TopK at equal L0 [Rajamanoharan et al. "
                           "2024]", "the run trained no TopK and JumpReLU pair with the LM loss", "—", NOT_MEASURED)]
    main_d = rows.d_sae.iloc[0]
    topk = rows[(rows.architecture == "topk") & (rows.d_sae == main_d)]
    topk = topk[topk.value == topk.value.iloc[0]]
    jump = rows[(rows.architecture == "jumprelu") & (rows.d_sae == main_d)].iloc[0]
    t_mean, t_lo, t_hi = mean_interval(topk.delta_loss)
    l0_ratio = jump.l0 / topk.l0.mean()
    verdict = greater((t_mean, t_lo, t_hi), (jump.delta_loss, jump.delta_loss, jump.delta_loss))
    note = _size_note(cfg, "seeds")
    if not 0.8 <= l0_ratio <= 1.25:
        verdict, note = INCONCLUSIVE, (note + "; " if note else "") + f"L0 differs by {l0_ratio:.2f}× (not equal L0)"
    return [Claim("c", "JumpReLU reaches a lower delta LM loss than TopK at equal L0 [Rajamanoharan et al. 2024]",
                  f"JumpReLU {jump.delta_loss:.2f} nats at L0 {jump.l0:.1f} (one seed)",
                  f"TopK {with_interval(t_mean, t_lo, t_hi)} nats at L0 {topk.l0.mean():.1f} over {len(topk)} seed(s)",
                  verdict, note)]


def steering_claims(steering: dict, cfg) -> list[Claim]:
    """(d) the clamped feature raises its concept's keyword rate; the difference of means beside it."""
    effect, base = steering.get("effect") or {}, steering.get("baseline") or {}
    if not effect.get("steered", {}).get("keyword_rate"):
        return [Claim("d", "Clamping a feature moves generations toward its concept [Templeton et al. 2024]",
                      "no steering measurement", "—", NOT_MEASURED)]

    def rate(arm: dict) -> tuple:
        kw = arm.get("keyword_rate") or {}
        return (kw.get("mean", float("nan")), *wilson(kw.get("hits", 0), kw.get("n", 0)))
    p = effect.get("keyword_p_value")
    steered, default = rate(effect["steered"]), rate(effect["default"])
    verdict = REPRODUCED if p is not None and p < 0.05 else (
        NOT_REPRODUCED if steered[0] <= default[0] else INCONCLUSIVE)
    dim = (f"difference of means {with_interval(*rate(base['steered']))} "
           f"(p {base.get('keyword_p_value', float('nan')):.3g} "
           f"vs unsteered)" if base.get("steered") else f"no difference-of-means baseline ({base.get('failure', '?')})")
    tried = (steering.get("screen") or {}).get("candidates", "?")
    return [Claim("d", f"Clamping feature {steering.get('feature')} ('{steering.get('keyword', '')}') raises the rate "
                       "of generations that mention its concept [Templeton et al. 2024; AxBench 2025 finds a "
                       "difference-of-means direction steers better]",
                  f"keyword rate {with_interval(*steered)} vs unsteered {with_interval(*default)}, one-sided Fisher p "
                  f"{p if p is None else f'{p:.3g}'}; picked from {tried} screened candidates, measured on fresh seeds",
                  dim, verdict, _size_note(cfg, "steer_samples"))]


def splitting_claims(split_folder: str | None, cfg) -> list[Claim]:
    """(e) most tested features of the main SAE split into a family in the larger SAE."""
    from monoscope.interpret.splitting import Splitting

    text = ("Features of the main SAE split into families in a larger SAE: most have ≥ 2 larger-SAE features "
            "with decoder cosine ≥ 0.5 that together cover ≥ 50 % of their firings [Bricken et al. 2023]")
    if not split_folder:
        return [Claim("e", text, "one dictionary size only (set extra_d_sae, or --profile research)", "—",
                      NOT_MEASURED)]
    claims = []
    for sub in sorted(Path(split_folder).glob("d*/"), key=lambda p: int(p.name[1:])):
        s = Splitting.load(sub)
        m = s.summary
        claims.append(Claim("e", text.replace("a larger SAE", f"the {s.large_d_sae:,}-latent SAE"),
                            f"{m['split']} of {m['tested']} features split: "
                            f"{with_interval(m['split_share'], m['split_low'], m['split_high'])}"
                            f" (median family {m['median_family']:g})",
                            f"{m['kept_one_to_one']} kept one-to-one, {m['no_match']} with no match",
                            greater((m["split_share"], m["split_low"], m["split_high"]), (0.5, 0.5, 0.5))))
    return claims


def explanation_claims(explained: dict, cfg) -> list[Claim]:
    """(g) the LLM's explanations score higher than the model-free token baseline's, paired over units."""
    from monoscope.interpret.autointerp import read_results

    diffs, n_units, failed = [], 0, 0
    for kind in ("features", "neurons"):
        path = explained.get(kind)
        for rec in (read_results(path).values() if path and Path(path).exists() else []):
            n_units += 1
            cands = rec.get("candidates") or {}
            llm, tok = [((cands.get(c) or {}).get("detection") or {}).get("accuracy") for c in ("llm", "tokens")]
            failed += (cands.get("llm") or {}).get("status") == "failed"
            if llm is not None and tok is not None:
                diffs.append(llm - tok)
    text = ("The LLM explainer's explanations score higher on detection than the model-free token baseline's "
            "[the premise of LLM autointerpretability; Bills et al. 2023, Paulo et al. 2024]")
    if len(diffs) < 2:
        return [Claim("g", text, f"{len(diffs)} of {n_units} units scored by both ({failed} LLM explanations "
                                 f"failed)", "—", NOT_MEASURED)]
    mean, low, high = mean_interval(diffs)
    verdict = greater((mean, low, high), (0.0, 0.0, 0.0))
    note = (f"this run's size cannot support it: explain_score_examples = {cfg.explain_score_examples} (the research "
            f"profile uses 20)" if cfg.explain_score_examples < 20 else "")
    return [Claim("g", text, f"detection accuracy LLM − baseline {with_interval(mean, low, high)} "
                             f"over {len(diffs)} units "
                             f"(paired); {failed} of {n_units} LLM explanations failed (not counted)", "the token baseline's detection accuracy on the same excerpts", verdict, note)]


def sae_headline(table: list[dict]) -> pd.DataFrame:
    """The main SAE's metrics as mean [95 % interval] over its seeds (the value alone for one seed)."""
    rows = pd.DataFrame(table)
    if rows.empty:
        return rows
    first = rows.iloc[0]
    same = rows[(rows.architecture == first.architecture) & (rows.value == first.value) & (rows.d_sae == first.d_sae)]
    out = {"SAE": f"{first.architecture} {first.knob} {first.value:g}, d_sae {first.d_sae}", "seeds": len(same)}
    for col in ("l0", "fvu", "delta_loss", "ce_loss_recovered", "dead_fraction"):
        if col in same:
            out[col] = with_interval(*mean_interval(same[col]), digits=3)
    return pd.DataFrame([out])


def all_claims(cfg, plan: dict, saes: dict, probe: dict, split: dict | None, steering: dict,
               explained: dict | None = None) -> list[Claim]:
    """Every claim of the module on a finished run's stage results."""
    def read(name: str) -> pd.DataFrame:
        path = Path(probe[name]) / "results.csv" if probe.get(name) else None
        return pd.read_csv(path) if path and path.exists() else pd.DataFrame()
    neurons = read("neurons")
    return [*superposition_claims(neurons, cfg), *latent_claims(neurons, read("sae"), read("resid"), plan["layer"], cfg),
            *frontier_claims(saes["table"], cfg), *steering_claims(steering, cfg),
            *splitting_claims((split or {}).get("folder"), cfg), *explanation_claims(explained or {}, cfg)]


def claims_table(claims: list[Claim]) -> pd.DataFrame:
    return pd.DataFrame([asdict(c) for c in claims])


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (cells as text, pipes escaped)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    head = "| " + " | ".join(map(cell, frame.columns)) + " |\n| " + " | ".join("---" for _ in frame.columns) + " |\n"
    return head + "".join("| " + " | ".join(map(cell, row)) + " |\n" for row in frame.itertuples(index=False))


def findings_markdown(claims: list[Claim], headline: pd.DataFrame, *, title: str, command: str,
                      times: pd.DataFrame, note: str) -> str:
    """findings.md: the command that produced it, the claims with their verdicts, the main SAE, the stages'
    wall times and throughput (``stage_times``)."""
    table = claims_table(claims).assign(verdict=lambda f: "**" + f.verdict + "**")
    return (f"# {title}\n\nProduced by `{command}`. {note}\n\n## Claims, baselines and verdicts\n\n"
            f"{markdown_table(table)}\n## Main SAE (mean [95 % interval] over seeds)\n\n{markdown_table(headline)}\n"
            f"## Stage wall times and throughput\n\n{markdown_table(times)}")


def stage_times(timings: dict[str, float], ext: dict, saes: dict, probe: dict, cfg, steering: dict) -> pd.DataFrame:
    """Each stage's wall time in run order, with what it processed and that per second where it is a count
    (a stage served from its cache shows the seconds of the run that made it)."""
    work = {"extract": (ext.get("train_rows", 0) + ext.get("validation_rows", 0), "activations extracted"),
            "saes": (sum(r.get("train_tokens", 0) for r in saes.get("table", [])), "activations trained on, all SAEs"),
            "probe": (probe.get("rows"), "probe fits (all sweeps)"),
            "stats": (2 * ext.get("train_rows", 0), "rows summarised (SAE latents and neurons)"),
            "explain": (cfg.explain_features + cfg.explain_neurons, "units explained and scored"),
            "steer": ((steering.get("screen") or {}).get("candidates"), "candidate features screened")}
    rows = []
    for stage, seconds in timings.items():
        n, what = work.get(stage, (None, ""))
        rows.append({"stage": stage, "seconds": f"{seconds:.0f}", "processed": f"{n:,} {what}" if n else "",
                     "per second": number(n / seconds) if n and seconds > 0 else ""})
    total = sum(timings.values())
    rows.append({"stage": "all stages above", "seconds": f"{total:.0f}", "processed": "", "per second": ""})
    return pd.DataFrame(rows)
