"""Which SAE features are specific to a labelled concept (REFERENCE.md §4, "Specificity").

Each example of a binary probing dataset (label 1 = about the concept) is encoded with the SAE at its hook
and reduced to one value per latent exactly as sparse probing does (``probe_activations`` with the SAE as
encoder; the dataset's aggregation: mean / last / max over a span / one token). Per latent:

==========================  ===================================================================================
mean_pos / mean_neg         mean activation on positives / negatives
fire_rate_pos / _neg        share of positives / negatives where it is > 0 (fire_rate_pos is the sensitivity)
auc                         ROC-AUC of the latent's value as a detector of the concept (ties count one half)
precision_at_n              of the n examples with the highest activation, the share that are positives; n is
                            the number of positives by default (so a perfect detector scores 1). Ties at the
                            cut-off are shared out (the expected value under random tie-breaking), so a latent
                            that fires on fewer than n examples is filled up with its zeros at the base rate.
precision_when_firing       share of the examples where it fires (> 0) that are positives; None if it never fires
==========================  ===================================================================================

Features are ranked by AUC (default; ``rank_by="precision"`` ranks by precision@n), ties broken by the
other score and then by mean_pos − mean_neg. AUC rewards a latent that orders *all* examples well;
precision@n is Scaling Monosemanticity's "of the top-activating inputs, what share are about the concept".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from monoscope.errors import MonoscopeError
from monoscope.probing.datasets import ProbingDataset
from monoscope.probing.user_data import DATASET_HELP, FileColumns, resolve_datasets
from monoscope.selfcheck import sae_for_model

RANK_BY = ("auc", "precision")
MAX_EXAMPLES = 1000
COLUMNS = ("auc", "precision_at_n", "precision_when_firing", "fire_rate_pos", "fire_rate_neg", "mean_pos", "mean_neg")


# ------------------------------------------------------------------------------------------ scores
def specificity_scores(acts: np.ndarray, labels: np.ndarray, n: int | None = None) -> dict[str, np.ndarray]:
    """Per-latent scores (see the module docstring) for ``acts`` [examples, latents] and 0/1 ``labels``.

    Returns {score name: array [latents]}; ``precision_when_firing`` is NaN for latents that never fire.
    """
    from scipy.stats import rankdata

    X = np.asarray(acts, dtype=np.float32)
    y = np.asarray(labels).astype(bool)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise MonoscopeError(f"acts must be [examples, latents] with one row per label; got {X.shape} for "
                             f"{y.shape[0]} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise MonoscopeError("specificity needs positive and negative examples; this dataset has a single class")
    n = n_pos if n is None else int(n)
    if not 1 <= n <= len(y):
        raise MonoscopeError(f"precision@n needs 1 <= n <= {len(y)} (the number of examples), got {n}")
    out = {name: np.zeros(X.shape[1]) for name in COLUMNS}
    step = max(1, (1 << 22) // max(1, X.shape[0]))  # columns per chunk: bounded memory for wide SAEs
    for lo in range(0, X.shape[1], step):
        part = X[:, lo:lo + step]
        cols = slice(lo, lo + part.shape[1])
        fires = part > 0
        out["mean_pos"][cols] = part[y].mean(0)
        out["mean_neg"][cols] = part[~y].mean(0)
        out["fire_rate_pos"][cols] = fires[y].mean(0)
        out["fire_rate_neg"][cols] = fires[~y].mean(0)
        n_fire = fires.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["precision_when_firing"][cols] = np.where(n_fire > 0, fires[y].sum(0) / n_fire, np.nan)
        ranks = rankdata(part, axis=0)  # average ranks for ties: the Mann-Whitney form of the AUC
        out["auc"][cols] = (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        out["precision_at_n"][cols] = _precision_at(part, y, n)
    return out


def _precision_at(X: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Share of positives among each column's top ``n`` values, ties at the cut-off shared out evenly."""
    cut = np.partition(X, X.shape[0] - n, axis=0)[X.shape[0] - n]  # n-th largest value per column
    above, at = X > cut, X == cut
    n_above, n_at = above.sum(0), at.sum(0)
    return (above[y].sum(0) + (n - n_above) * at[y].sum(0) / n_at) / n


def rank_latents(scores: dict[str, np.ndarray], rank_by: str = "auc") -> np.ndarray:
    """Latent ids, most specific first: by AUC or precision@n, then the other, then the mean difference."""
    if rank_by not in RANK_BY:
        raise MonoscopeError(f"unknown ranking {rank_by!r}; use one of {', '.join(RANK_BY)}")
    first, second = ("auc", "precision_at_n") if rank_by == "auc" else ("precision_at_n", "auc")
    diff = scores["mean_pos"] - scores["mean_neg"]
    return np.lexsort((-diff, -scores[second], -scores[first]))  # last key sorts first


# ------------------------------------------------------------------------------------------ model side
def latent_activations(lm, sae, dataset: ProbingDataset, *, batch_size: int = 16, max_length: int = 128,
                       cache_dir: str | Path | None = None, progress: bool | None = None) -> np.ndarray:
    """[examples, d_sae]: every SAE latent on each example, aggregated as the dataset says."""
    from monoscope.probing.activations import probe_activations

    hook = sae_for_model(sae, lm)
    device = next(sae.parameters()).device

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae.encode(x.to(device))

    key = sae.content_hash() if cache_dir is not None else None
    acts = probe_activations(lm, dataset, [hook], batch_size=batch_size, max_length=max_length,
                             encode={hook: encode}, encode_key=key, cache_dir=cache_dir, progress=progress)
    return acts[hook]


def feature_specificity(lm, sae, dataset: ProbingDataset | str, *, batch_size: int = 16, max_length: int = 128,
                        cache_dir: str | Path | None = None, top_n: int = 20, rank_by: str = "auc",
                        n: int | None = None, progress: bool | None = None) -> dict:
    """The ``top_n`` latents most specific to ``dataset``'s concept (label 1), each with its scores.

    ``dataset`` is a ``ProbingDataset`` or a name for ``load_concept_datasets``. ``n`` is the n of
    precision@n (default: the number of positives). Returns a JSON-ready dict with the dataset's
    facts and ``features``: [{rank, feature, auc, precision_at_n, ...}] best first.
    """
    return _specificity(lm, sae, dataset, batch_size=batch_size, max_length=max_length, cache_dir=cache_dir,
                        top_n=top_n, rank_by=rank_by, n=n, progress=progress)[0]


def _specificity(lm, sae, dataset, *, top_n, rank_by, n, **kw) -> tuple[dict, np.ndarray]:
    """feature_specificity's result plus the activation matrix it came from (for plots)."""
    if isinstance(dataset, str):
        found = load_concept_datasets([dataset])
        if len(found) != 1:
            raise MonoscopeError(f"{dataset!r} holds {len(found)} datasets ({', '.join(d.name for d in found)}); "
                                 "pass one ProbingDataset, or use run_specificity for all of them")
        dataset = found[0]
    if not isinstance(dataset, ProbingDataset):
        raise MonoscopeError(f"dataset must be a ProbingDataset or a dataset name, got {type(dataset).__name__}")
    if top_n < 1:
        raise MonoscopeError(f"top_n must be at least 1, got {top_n}")
    if rank_by not in RANK_BY:
        raise MonoscopeError(f"unknown ranking {rank_by!r}; use one of {', '.join(RANK_BY)}")
    labels = np.asarray(dataset.labels)
    if np.unique(labels).size < 2:
        raise MonoscopeError(f"dataset {dataset.name!r} has a single class (every label is {labels[0]}); "
                             "specificity needs examples with and without the concept")
    X = latent_activations(lm, sae, dataset, **kw)
    scores = specificity_scores(X, labels, n)
    order = rank_latents(scores, rank_by)[:top_n]
    features = []
    for rank, j in enumerate(order, 1):
        row = {"rank": rank, "feature": int(j)}
        for name in COLUMNS:
            value = float(scores[name][j])
            row[name] = None if np.isnan(value) else round(value, 6)
        features.append(row)
    result = {"dataset": dataset.name, "description": dataset.description, "positive": dataset.positive,
              "aggregation": dataset.aggregation, "hook": sae.cfg.hook_name, "n_examples": len(labels),
              "n_positive": int(labels.sum()), "n_negative": int((labels == 0).sum()),
              "precision_at": int(labels.sum()) if n is None else int(n), "ranked_by": rank_by,
              "n_latents": int(X.shape[1]), "n_silent": int((X.max(0) <= 0).sum()), "features": features}
    return result, X


def load_concept_datasets(names: list[str], max_examples: int = MAX_EXAMPLES, seed: int = 0,
                          columns: FileColumns | None = None) -> list[ProbingDataset]:
    """Built-in datasets by name and user files read with ``columns`` (see ``probing.user_data``), balanced."""
    if not names:
        raise MonoscopeError("no dataset given; name one or more (see `monoscope datasets`) or give a .csv/.jsonl/"
                             ".parquet file")
    return resolve_datasets(names, columns, max_examples, seed)


# ------------------------------------------------------------------------------------------ outputs
def plot_feature_distribution(values_pos, values_neg, path: str | Path | None, title: str = "") -> str:
    """Overlaid histograms (shared bins) of one feature on positives vs negatives; PNG path or data URI."""
    from monoscope.report.plots import ACCENT, MUTED, _axes, figure_png

    pos = np.asarray(values_pos, dtype=float).ravel()
    neg = np.asarray(values_neg, dtype=float).ravel()
    both = np.concatenate([pos, neg])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig, ax = _axes(title=title, xlabel="feature activation", ylabel="examples")
    for vals, color, name in ((neg, MUTED, "negatives"), (pos, ACCENT, "positives")):
        if vals.size:
            zero = float((vals <= 0).mean())
            ax.hist(vals, bins=edges, color=color, alpha=0.6, label=f"{name} (n={vals.size}, {zero:.0%} silent)")
    ax.legend(fontsize=8, frameon=False)
    return figure_png(fig, path)


def run_specificity(sae_folder: str | Path, datasets: list[str], out: str | Path, lm=None, top_n: int = 20,
                    max_examples: int = MAX_EXAMPLES, *, rank_by: str = "auc", batch_size: int = 16,
                    max_length: int = 128, device: str = "cpu", seed: int = 0, precision_at: int | None = None,
                    progress: bool | None = None, columns: FileColumns | None = None) -> Path:
    """Score every latent of the SAE in ``sae_folder`` on each dataset; write specificity.json/.csv + plots.

    ``lm`` is a loaded model, a model name, or None for the model the SAE records; ``precision_at`` is the n
    of precision@n (default: each dataset's number of positives); ``columns`` say how to read dataset files.
    Writes into ``out``:
    ``specificity.json`` (per dataset: its facts and top features), ``specificity.csv`` (one row per
    dataset and ranked feature) and ``specificity_<dataset>.png`` (the top feature on positives vs
    negatives). Returns the path of specificity.json.
    """
    from monoscope.artifacts import library_versions, now_iso, safe_filename, write_csv, write_json
    from monoscope.models import cache_dir, load_model
    from monoscope.sae.io import load_sae

    if rank_by not in RANK_BY:
        raise MonoscopeError(f"unknown ranking {rank_by!r}; use one of {', '.join(RANK_BY)}")
    sae = load_sae(sae_folder)
    # bad names and files fail before the model loads
    concept_sets = load_concept_datasets(list(datasets), max_examples, seed, columns)
    if lm is None or isinstance(lm, str):
        name = lm or sae.cfg.model_name
        if not name:
            raise MonoscopeError("the SAE does not record its model; pass the model (--model)")
        lm = load_model(name, device=device)
    sae_for_model(sae, lm)
    sae.to(lm.device)

    out = Path(out)
    results, rows = {}, []
    for ds in concept_sets:
        result, X = _specificity(lm, sae, ds, top_n=top_n, rank_by=rank_by, n=precision_at, batch_size=batch_size,
                                 max_length=max_length, cache_dir=cache_dir() / "probe-activations", progress=progress)
        best = result["features"][0]
        plot = out / f"specificity_{safe_filename(ds.name)}.png"
        col = X[:, best["feature"]]
        plot_feature_distribution(col[ds.labels == 1], col[ds.labels == 0], plot,
                                  f"{ds.name}: feature {best['feature']} (AUC {best['auc']:.3f})")
        result["plot"] = plot.name
        results[ds.name] = result
        rows += [{"dataset": ds.name, **f} for f in result["features"]]
    write_csv(out / "specificity.csv", ["dataset", "rank", "feature", *COLUMNS], rows)
    path = out / "specificity.json"
    write_json(path, {"sae": str(sae_folder), "model": lm.name, "hook": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae,
                      "ranked_by": rank_by, "top_n": top_n, "max_examples": max_examples, "seed": seed,
                      "created": now_iso(), "versions": library_versions(), "datasets": results})
    return path


def format_table(result: dict, rows: int = 10) -> str:
    """A short plain-text table of one dataset's top features."""
    lines = [f"{result['dataset']} ({result['n_positive']} positive / {result['n_negative']} negative, "
             f"ranked by {result['ranked_by']}, precision@{result['precision_at']})",
             f"{'rank':>4} {'feature':>8} {'auc':>6} {'prec@n':>6} {'p|fire':>6} {'fire+':>6} {'fire-':>6} "
             f"{'mean+':>8} {'mean-':>8}"]
    for f in result["features"][:rows]:
        pf = "-" if f["precision_when_firing"] is None else f"{f['precision_when_firing']:.3f}"
        lines.append(f"{f['rank']:>4} {f['feature']:>8} {f['auc']:>6.3f} {f['precision_at_n']:>6.3f} {pf:>6} "
                     f"{f['fire_rate_pos']:>6.3f} {f['fire_rate_neg']:>6.3f} {f['mean_pos']:>8.3g} "
                     f"{f['mean_neg']:>8.3g}")
    return "\n".join(lines)



@dataclass
class SpecificityConfig(FileColumns):
    """Flags of ``monoscope specificity`` (a dataset file's columns come from ``FileColumns``)."""
    sae: str = field(metadata={"help": "SAE folder"})
    dataset: tuple[str, ...] = field(metadata={"help": DATASET_HELP})
    out: str = field(metadata={"help": "folder for specificity.json, specificity.csv and plots"})
    model: str | None = field(default=None, metadata={
        "help": "model to load (default: the model the SAE was trained on)"})
    top_n: int = field(default=20, metadata={"help": "features kept per dataset"})
    max_examples: int = field(default=MAX_EXAMPLES, metadata={"help": "examples per dataset (balanced)"})
    rank_by: str = field(default="auc", metadata={"choices": RANK_BY, "help": "rank by ROC-AUC or by precision@n"})
    precision_at: int | None = field(default=None, metadata={
        "help": "n of precision@n (default: the number of positives of each dataset)"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    seed: int = 0
    device: str = "cpu"


def setup_specificity(p):
    """``monoscope specificity --sae DIR --dataset NAME [NAME ...] --out DIR``."""
    from monoscope.config import add_arguments

    add_arguments(p, SpecificityConfig)

    def run(ns):
        from monoscope.artifacts import read_json
        from monoscope.config import from_namespace, to_dict

        cfg = from_namespace(SpecificityConfig, ns)
        options = {k: v for k, v in to_dict(cfg).items() if k not in FileColumns.names()}
        path = run_specificity(options.pop("sae"), options.pop("dataset"), options.pop("out"),
                               lm=options.pop("model"), columns=FileColumns.of(cfg), **options)
        for result in read_json(path)["datasets"].values():
            print(format_table(result) + "\n")
        print(f"wrote {path}")
    return run
