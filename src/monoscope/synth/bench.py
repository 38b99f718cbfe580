"""`monoscope synth`: train a grid of SAEs on a synthetic model and score them against its true features.

The grid is the sweep's (monoscope.sweep: architectures x their sparsity knob); the data is a synthetic
model's endless stream (monoscope.synth.source); the scores are SynthSAEBench's ground-truth metrics
(monoscope.synth.metrics) on fresh samples no SAE trained on. Output:

    out/saes/<arch>_<knob><value>_<hash>/   each SAE (train.json, metrics.csv) + ground_truth.json
    out/synth.csv, out/synth.json           one row per SAE
    out/f1_vs_l0.png, out/mcc_vs_l0.png     one curve per architecture
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from monoscope.artifacts import read_json, write_csv, write_json
from monoscope.config import to_dict
from monoscope.sweep import SweepConfig, grid_runs, plot_frontier, train_config_for
from monoscope.errors import MonoscopeError
from monoscope.synth.source import HOOK, PREFIX, SyntheticSource
from monoscope.train import SIDECAR, check_config, run_hash, train_sae

GROUND_TRUTH = "ground_truth.json"
COLUMNS = ("architecture", "knob", "value", "d_sae", "train_samples", "l0", "true_l0", "f1", "precision", "recall",
           "accuracy", "mcc", "uniqueness", "explained_variance", "dead_latents", "shrinkage", "train_samples_per_s",
           "folder")


@dataclass
class SynthBenchConfig:
    """Which synthetic model, and how many fresh samples score each SAE."""

    model: str = field(default="16k", metadata={"help": "synthetic model: a preset (16k = SynthSAEBench-16k, "
                                                       "tiny) or the folder of a saved SyntheticModel (SAELens's)"})
    eval_samples: int = field(default=100_000, metadata={"help": "fresh samples for the ground-truth metrics"})
    eval_batch_size: int = field(default=2048, metadata={"help": "samples per evaluation batch"})

    def validate(self) -> None:
        for name in ("eval_samples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise MonoscopeError(f"{name} must be a positive number of samples, got {getattr(self, name)}")


def _scores(folder: Path, source: SyntheticSource, bench: SynthBenchConfig, seed: int) -> dict:
    """The SAE's ground-truth metrics, computed once per (model, samples) and kept beside it."""
    from monoscope.sae.io import load_sae
    from monoscope.synth.metrics import ground_truth_metrics

    path = folder / GROUND_TRUTH
    key = {"model_fingerprint": source.content_hash(), "eval_samples": bench.eval_samples, "seed": seed,
           "sae_run_hash": read_json(folder / SIDECAR)["run_hash"]}
    if path.exists() and read_json(path).get("key") == key:
        return read_json(path)["metrics"]
    sae = load_sae(folder)
    batches = source.eval_batches(bench.eval_samples, bench.eval_batch_size, seed)
    metrics = ground_truth_metrics(sae, source.synthetic.vectors, batches).to_dict()
    write_json(path, {"key": key, "metrics": metrics})
    return metrics


def run_synth_bench(grid: SweepConfig, bench: SynthBenchConfig, out, show_progress: bool | None = None) -> Path:
    """Train (or reuse) every SAE of ``grid`` on ``bench.model``'s stream and score it; write the table and plots."""
    out = Path(out)
    bench.validate()
    source = SyntheticSource(bench.model)
    runs = grid_runs(grid)
    for arch, knob, value in runs:  # every run's settings, before the first one trains
        check_config(train_config_for(grid, arch, knob, value), source.d(), HOOK, source.model)
    rows = []
    for i, (arch, knob, value) in enumerate(runs):
        tc = train_config_for(grid, arch, knob, value)
        folder = out / "saes" / f"{arch}_{knob}{value:g}_{run_hash(tc, source.content_hash())[:8]}"
        print(f"[{i + 1}/{len(runs)}] {arch} {knob}={value:g} -> {folder}", flush=True)
        train_sae(tc, PREFIX + bench.model, folder, show_progress=show_progress)
        t = read_json(folder / SIDECAR)
        rows.append({"architecture": arch, "knob": knob, "value": value, "d_sae": t["d_sae"],
                     "train_samples": t["total_tokens"], "train_samples_per_s": t["timings"]["tokens_per_s"],
                     "folder": str(folder.relative_to(out)), **_scores(folder, source, bench, grid.seed)})
    write_csv(out / "synth.csv", COLUMNS, rows)
    title = (f"synthetic {bench.model} (F={source.synthetic.num_features}, d={source.synthetic.hidden_dim}): "
             f"d_sae {rows[0]['d_sae']}, {rows[0]['train_samples']:,} samples")
    plot_frontier(rows, "f1", "F1 (latents vs their best true feature)", title, out / "f1_vs_l0.png")
    plot_frontier(rows, "mcc", "MCC (matched decoder vs true features)", title, out / "mcc_vs_l0.png")
    write_json(out / "synth.json", {"grid": to_dict(grid), "bench": to_dict(bench),
                                    "model_fingerprint": source.content_hash(), "runs": rows})
    return out


def setup_synth(p: argparse.ArgumentParser):
    """`monoscope synth --out DIR [--model 16k] [grid flags]`."""
    from monoscope.config import add_arguments, from_namespace

    add_arguments(p, SynthBenchConfig)
    add_arguments(p, SweepConfig, skip=("hook", "eval_tokens", "lm_contexts"))
    p.add_argument("--out", required=True, help="output folder (finished SAEs in it are reused)")

    def run(ns):
        out = run_synth_bench(from_namespace(SweepConfig, ns), from_namespace(SynthBenchConfig, ns), ns.out)
        print((out / "synth.csv").read_text())
        print(f"plots in {out}")
    return run
