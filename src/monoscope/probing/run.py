"""Sparse-probing sweeps on a real model: datasets × layers × methods × k, on neurons or SAE latents.

All layers' activations of a dataset come from one forward pass (cached on disk), so the sweep over
methods and k never re-runs the model. The output folder holds a tidy ``results.csv`` (one row per
dataset, source, layer, method, k, control), ``top_features.json`` (each task's best units with their
probe weights and the activation histograms of positives vs negatives) and PNG plots.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from monoscope.artifacts import atomic_path, library_versions, now_iso, safe_filename, write_json
from monoscope.config import to_dict
from monoscope.errors import MonoscopeError
from monoscope.models import DEFAULT_MODEL, LoadedModel, cache_dir, load_model
from monoscope.probing.activations import probe_activations
from monoscope.probing.probe import fit_probe, random_rotation, shuffle_labels, split_by_sequence
from monoscope.probing.select import rank_features, sweep
from monoscope.probing.user_data import DATASET_HELP, FileColumns, resolve_datasets

RESULTS = "results.csv"


@dataclass
class ProbeConfig(FileColumns):
    """One probing sweep (the API, the `monoscope probe` flags and the saved config); a dataset file's columns
    come from ``FileColumns``."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model name or folder"})
    dataset: tuple[str, ...] = field(default=("is_python_code",), metadata={"help": DATASET_HELP})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "layers to probe (default: every layer)"})
    hook_kind: str = field(default="mlp_neurons", metadata={"help": "which activations: mlp_neurons, resid_post, ..."})
    source: str = field(default="neurons", metadata={"help": "'neurons' (the raw hook) or 'sae:DIR' (its latents)"})
    ks: tuple[int, ...] = field(default=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256),
                                metadata={"help": "sparsity levels"})
    methods: tuple[str, ...] = field(default=("adaptive", "mean_diff", "f_stat", "l1_logreg", "random", "dense"),
                                     metadata={"help": "ways to choose the k features (also: mutual_info, osp); "
                                                       "'dense' is the L2 probe on every unit, the ceiling"})
    osp_max_k: int = field(default=4, metadata={"help": "largest k for optimal sparse probing"})
    osp_time_limit: float = field(default=60.0, metadata={"help": "seconds per OSP solve"})
    max_examples: int = field(default=2000, metadata={"help": "examples per dataset (balanced)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    controls: bool = field(default=True, metadata={"help": "also run random-rotation and shuffled-label controls"})
    test_fraction: float = field(default=0.3, metadata={"help": "held-out share, split by sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the split and the random choices"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    device: str = field(default="cpu", metadata={"help": "torch device"})


def _sae_encoder(source: str, lm: LoadedModel, layers: list[int], hook_kind: str):
    """For ``sae:DIR``: the SAE, its hook (which fixes the layer) and a content key for the cache.

    The SAE must fit ``lm`` (its model, and the width of its hook there) before any forward pass.
    """
    from monoscope.sae.formats import load_sae, sae_path
    from monoscope.selfcheck import sae_for_model

    folder = sae_path(source.split(":", 1)[1])
    sae = load_sae(folder)
    named = None
    if not sae.cfg.hook_name:  # a file without its hook (Gemma Scope 1): --layers N --hook-kind KIND names it
        if len(layers) != 1:
            raise MonoscopeError(f"the SAE in {folder} does not record its hook; name it with one --layers N and "
                                 f"--hook-kind KIND")
        named = f"layers.{layers[0]}.{hook_kind}"
    hook = sae_for_model(sae, lm, named)
    key = sae.content_hash()

    def encode(x):
        import torch

        with torch.no_grad():
            return sae.encode(x.float())
    return sae, hook, encode, key


def run_probing(cfg: ProbeConfig, out: str | Path, lm: LoadedModel | None = None,
                show_progress: bool | None = None) -> pd.DataFrame:
    """Run the sweep, write results.csv, top_features.json and plots into ``out``; return the table."""
    out = Path(out)
    if not cfg.dataset:
        raise MonoscopeError("no probing dataset given; name one or more with --dataset (see `monoscope datasets`)")
    datasets = resolve_datasets(cfg.dataset, FileColumns.of(cfg), cfg.max_examples, cfg.seed)  # before the model
    lm = lm or load_model(cfg.model, device=cfg.device)
    encode, encode_key = None, None
    if cfg.source == "neurons":
        layers = list(cfg.layers) or list(range(lm.n_layers))
        hooks = {layer: f"layers.{layer}.{cfg.hook_kind}" for layer in layers}
    elif cfg.source.startswith("sae:"):
        sae, hook, enc, encode_key = _sae_encoder(cfg.source, lm, list(cfg.layers), cfg.hook_kind)
        layers = [int(hook.split(".")[1])]
        hooks = {layers[0]: hook}
        encode = {hook: enc}
    else:
        raise MonoscopeError(f"unknown feature source {cfg.source!r}; use 'neurons' or 'sae:DIR'")
    from monoscope.hookpoints import resolve

    for h in hooks.values():
        resolve(lm.model, h)  # bad layer / hook kind fails before any forward pass

    rows, tops = [], {}
    # the table names an SAE by its folder's name; probe.json keeps the path as given (a copied run stays valid)
    source = cfg.source if cfg.source == "neurons" else "sae:" + Path(cfg.source.split(":", 1)[1]).name
    started = time.perf_counter()
    for ds in datasets:
        acts = probe_activations(lm, ds, list(hooks.values()), batch_size=cfg.batch_size, max_length=cfg.max_length,
                                 encode=encode, encode_key=encode_key, cache_dir=cache_dir() / "probe-activations",
                                 progress=show_progress)
        train_idx, test_idx = split_by_sequence(ds.groups, ds.labels, cfg.test_fraction, cfg.seed)
        y = ds.labels
        for layer, hook in hooks.items():
            X = acts[hook]
            base = {"dataset": ds.name, "category": ds.category, "source": source, "hook": hook, "layer": layer,
                    "n_train": len(train_idx), "n_test": len(test_idx), "n_features": X.shape[1]}
            variants = [("none", X, y)]
            if cfg.controls:
                variants += [("rotation", random_rotation(X, cfg.seed), y), ("shuffled", X, shuffle_labels(y, cfg.seed))]
            for control, Xc, yc in variants:
                methods = cfg.methods if control == "none" else ("mean_diff",)
                opts = {"max_k": cfg.osp_max_k, "time_limit": cfg.osp_time_limit}
                for r in sweep(Xc[train_idx], yc[train_idx], Xc[test_idx], yc[test_idx], ks=cfg.ks, methods=methods,
                               seed=cfg.seed, osp_options=opts):
                    rows.append({**base, "control": control, **{k: v for k, v in r.items() if k != "features"},
                                 "features": " ".join(map(str, r["features"][:16]))})
            tops[f"{ds.name}|{hook}"] = _top_units(X, y, train_idx, ds)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RESULTS) as tmp:
        table.to_csv(tmp, index=False)
    write_json(out / "top_features.json", tops)
    _plots(table, out)
    write_json(out / "probe.json", {"config": to_dict(cfg), "model": lm.name, "model_fingerprint": lm.fingerprint,
                                    "datasets": {d.name: {"n": len(d), "category": d.category,
                                                          "description": d.description} for d in datasets},
                                    "seconds": round(time.perf_counter() - started, 1), "created": now_iso(),
                                    "versions": library_versions()})
    return table


def _top_units(X: np.ndarray, y: np.ndarray, train_idx: np.ndarray, ds, n: int = 5, bins: int = 30) -> list[dict]:
    """The best single units by mean difference with their k=n probe weights and class histograms."""
    order = rank_features("mean_diff", X[train_idx], y[train_idx])[:n]
    probe = fit_probe(X[train_idx], y[train_idx], order)
    units = []
    for j, w in zip(order, np.ravel(probe.coef)):
        col = X[:, j]
        edges = np.linspace(float(col.min()), float(col.max()) + 1e-9, bins + 1)
        units.append({"unit": int(j), "weight": float(w),
                      "mean_pos": float(col[y == 1].mean()), "mean_neg": float(col[y == 0].mean()),
                      "edges": edges.tolist(), "hist_pos": np.histogram(col[y == 1], edges)[0].tolist(),
                      "hist_neg": np.histogram(col[y == 0], edges)[0].tolist()})
    return units


def _plots(table: pd.DataFrame, out: Path) -> None:
    """F1 vs k per layer for each dataset, and best F1 by layer at k = 1 and k = 16."""
    if table.empty:
        return
    from monoscope.report.plots import _plt

    plt = _plt()
    real = table[table.control == "none"]
    dense, real = real[real.method == "dense"], real[real.method != "dense"]
    for name, part in real.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        best = part.groupby(["layer", "k"]).f1.max().reset_index()
        for layer, curve in best.groupby("layer"):
            line, = ax.plot(curve.k, curve.f1, marker="o", ms=3, label=f"layer {layer}")
            ceiling = dense[(dense.dataset == name) & (dense.layer == layer)]
            ax.scatter(ceiling.k, ceiling.f1, marker="x", color=line.get_color())  # x: dense probe on every unit
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k (features in the probe)", ylabel="test F1 (best method)", title=f"{name}: F1 vs k")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"f1_vs_k_{safe_filename(name)}.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, part in real.groupby("dataset"):
        for k, style in ((1, "--"), (16, "-")):
            sub = part[part.k == k]
            if not sub.empty:
                best = sub.groupby("layer").f1.max()
                ax.plot(best.index, best.values, style, marker="o", ms=3, label=f"{name} k={k}")
    ax.set(xlabel="layer", ylabel="best test F1", title="Best F1 by layer: k = 1 (dashed) vs k = 16")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "best_f1_by_layer.png", dpi=110)
    plt.close(fig)
    if "osp" in set(real.method):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        small = real[real.k <= real[real.method == "osp"].k.max()]
        for method, part in small.groupby("method"):
            curve = part.groupby("k").f1.mean()
            ax.plot(curve.index, curve.values, marker="o", ms=3, label=method)
        ax.set(xlabel="k", ylabel="mean test F1 over datasets and layers", title="Optimal sparse probing vs heuristics")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "osp_vs_heuristics.png", dpi=110)
        plt.close(fig)



def setup_probe(p):
    from monoscope.config import add_arguments

    add_arguments(p, ProbeConfig)
    p.add_argument("--out", required=True, help="folder for results.csv, top_features.json and plots")

    def run(ns):
        from monoscope.config import from_namespace

        table = run_probing(from_namespace(ProbeConfig, ns), ns.out)
        real = table[table.control == "none"]
        summary = real.groupby(["dataset", "layer", "k"]).f1.max().unstack("k")
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(summary.round(3).to_string())
        print(f"\nwrote {Path(ns.out) / RESULTS}")
    return run


@dataclass
class DatasetsConfig(FileColumns):
    """Flags of ``monoscope datasets``: list the built-in datasets, or check a labelled file."""

    all: bool = field(default=False, metadata={"help": "also list datasets whose source is not installed"})
    check: str = field(default="", metadata={
        "help": "a labelled file (FILE or FILE:CLASS) to check: prints what probing reads from it (classes and "
                "counts, aggregation, rows dropped and why, two example rows); default: list the built-in datasets"})


def setup_datasets(p):
    from monoscope.config import add_arguments

    add_arguments(p, DatasetsConfig)

    def run(ns):
        from monoscope.config import from_namespace
        from monoscope.probing.datasets import dataset_families, list_datasets
        from monoscope.probing.user_data import parse_file_name, read_labelled_file

        cfg = from_namespace(DatasetsConfig, ns)
        if cfg.check:
            parsed = parse_file_name(cfg.check)
            if parsed is None:
                raise MonoscopeError("--check takes a labelled file (.csv, .jsonl or .parquet, optionally "
                                     f"FILE:CLASS), got {cfg.check!r}")
            print(read_labelled_file(parsed[0], FileColumns.of(cfg)).summary(parsed[1]))
            return
        for name in list_datasets(available_only=not cfg.all):
            print(name)
        for prefix, why in dataset_families().items():
            if why:
                print(f"# {prefix}: unavailable ({why})")
    return run
