"""Train and evaluate a grid of SAEs (architectures × sparsity settings) and plot the sparsity frontier.

The headline comparison of the JumpReLU paper: delta LM loss (and FVU) against L0, one curve per
architecture, at one dictionary size. Every SAE lives in its own folder named by its settings and run hash,
so a rerun reuses finished SAEs and evaluations and only does what is missing.

    out/
      saes/topk_k32_<hash>/       cfg.json, sae_weights.safetensors, train.json, metrics.csv, eval.json
      sweep.csv                   one row per SAE
      delta_loss_vs_l0.png        (when the LM was evaluated)
      fvu_vs_l0.png
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from monoscope.artifacts import atomic_path, read_json, write_csv, write_json
from monoscope.config import to_dict
from monoscope.errors import MonoscopeError
from monoscope.train import DEFAULT_BATCH_SIZE, DEFAULT_LR, SIDECAR, TrainConfig, run_hash, train_sae

# Each sparsity knob an architecture may name in its ``sweep_knobs`` (a TrainConfig field): the SweepConfig
# field holding its values and their type.
KNOB_VALUES = {
    "k": ("k_values", int),
    "target_l0": ("target_l0_values", float),
    "l0_coefficient": ("l0_values", float),
    "l1_coefficient": ("l1_values", float),
}
COLUMNS = ("architecture", "knob", "value", "d_in", "d_sae", "train_tokens", "l0", "fvu", "explained_variance",
           "mse", "cosine", "relative_reconstruction_bias", "dead_fraction", "delta_loss", "ce_loss_recovered",
           "kl_score", "train_tokens_per_s", "folder")


@dataclass
class SweepConfig:
    """A grid of SAEs: every architecture with each value of its sparsity knob, all at one size."""

    architectures: tuple[str, ...] = field(default=("topk", "batchtopk", "jumprelu"),
                                           metadata={"help": "architectures to train"})
    k_values: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "k for topk, batchtopk, matryoshka"})
    target_l0_values: tuple[float, ...] = field(default=(16.0, 32.0, 64.0),
                                                metadata={"help": "target L0 for jumprelu"})
    l0_values: tuple[float, ...] = field(default=(), metadata={
        "help": "jumprelu L0 coefficients, used instead of target L0 values when given"})
    l1_values: tuple[float, ...] = field(default=(2.0, 5.0, 10.0), metadata={"help": "L1 coefficients for relu, gated"})
    d_sae: int | None = field(default=None, metadata={"help": "latents per SAE; unset: expansion_factor * d"})
    expansion_factor: int = field(default=16, metadata={"help": "latents per input dimension"})
    tokens: int | None = field(default=None, metadata={"help": "training tokens per SAE; unset: one epoch"})
    steps: int | None = field(default=None, metadata={"help": "training steps per SAE (instead of tokens)"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "tokens per step"})
    lr: float | None = field(default=DEFAULT_LR, metadata={"help": "learning rate (None in the API: the 1/sqrt(m) "
                                                                   "rule)"})
    seed: int = field(default=0, metadata={"help": "seed of every run"})
    hook: str | None = field(default=None, metadata={"help": "hook; unset: the store's only hook"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    eval_tokens: int = field(default=100_000, metadata={"help": "validation rows for the reconstruction metrics"})
    lm_contexts: int = field(default=32, metadata={"help": "validation contexts for the spliced LM loss (0: skip)"})


def sweep_knob(cfg: SweepConfig, arch: str) -> str:
    """The knob ``arch`` is swept over: the first of its ``sweep_knobs`` that ``cfg`` gives values for."""
    from monoscope.sae import REGISTRY

    if arch not in REGISTRY:
        raise MonoscopeError(f"unknown architecture {arch!r} in the sweep; choose from {', '.join(REGISTRY)}")
    knobs = REGISTRY[arch].sweep_knobs
    for knob in knobs:
        if getattr(cfg, KNOB_VALUES[knob][0]):
            return knob
    flags = " or ".join("--" + KNOB_VALUES[k][0].replace("_", "-") for k in knobs)
    raise MonoscopeError(f"no values to sweep for {arch} (set {flags})")


def grid_runs(cfg: SweepConfig) -> list[tuple[str, str, float]]:
    runs = []
    for arch in cfg.architectures:
        knob = sweep_knob(cfg, arch)
        values_field, kind = KNOB_VALUES[knob]
        runs += [(arch, knob, kind(v)) for v in getattr(cfg, values_field)]
    return runs


def train_config_for(cfg: SweepConfig, arch: str, knob: str, value: float) -> TrainConfig:
    tc = TrainConfig(architecture=arch, d_sae=cfg.d_sae, expansion_factor=cfg.expansion_factor, tokens=cfg.tokens,
                     steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, hook=cfg.hook,
                     device=cfg.device)
    setattr(tc, knob, value)
    return tc


def _eval_is_current(path: Path, val, tokens: int, lm_contexts: int) -> bool:
    """``path`` holds an evaluation on the same validation data (by content, wherever the store now lies)."""
    if not path.exists():
        return False
    m = read_json(path)
    return (m.get("store_identity") == val.content_hash() and m.get("tokens") == tokens
            and m.get("lm_contexts", 0) == lm_contexts)


def run_sweep(cfg: SweepConfig, train_store, val_store, out, lm=None, show_progress: bool | None = None) -> Path:
    """Train (or reuse) and evaluate every SAE of the grid; write sweep.csv and the plots into ``out``."""
    from monoscope.evaluate import EVAL_FILE, evaluate_sae
    from monoscope.store import ActivationStore

    out, val_store = Path(out), Path(val_store)
    runs = grid_runs(cfg)
    train = ActivationStore(train_store)
    val = ActivationStore(val_store)
    hook = train.hook(cfg.hook)
    if hook not in val.hooks or val.d(hook) != train.d(hook) or val.model != train.model:
        raise MonoscopeError(f"the validation store ({val.model}, hooks {val.hooks}) does not match the training "
                             f"store ({train.model}, {hook} d={train.d(hook)}); extract both from the same model "
                             f"and hook")
    identity = train.content_hash()
    eval_tokens = min(cfg.eval_tokens, val.num_rows)
    lm_contexts = min(cfg.lm_contexts, val.contexts_done) if cfg.lm_contexts else 0
    if lm_contexts and lm is None:
        from monoscope.models import load_model

        lm = load_model(val.model, device=cfg.device)

    rows = []
    for i, (arch, knob, value) in enumerate(runs):
        tc = train_config_for(cfg, arch, knob, value)
        folder = out / "saes" / f"{arch}_{knob}{value:g}_{run_hash(tc, identity)[:8]}"
        print(f"[{i + 1}/{len(runs)}] {arch} {knob}={value:g} -> {folder}", flush=True)
        train_sae(tc, train_store, folder, show_progress=show_progress)
        eval_path = folder / EVAL_FILE
        if _eval_is_current(eval_path, val, eval_tokens, lm_contexts):
            m = read_json(eval_path)
        else:
            m = evaluate_sae(folder, val_store, lm=lm, max_tokens=eval_tokens, lm_contexts=lm_contexts,
                             hook=hook, device=cfg.device, show_progress=show_progress)
        t = read_json(folder / SIDECAR)
        rows.append({"architecture": arch, "knob": knob, "value": value, "d_in": t["d_in"], "d_sae": t["d_sae"],
                     "train_tokens": t["total_tokens"], "train_tokens_per_s": t["timings"]["tokens_per_s"],
                     "folder": str(folder.relative_to(out)), **{k: m.get(k) for k in COLUMNS if k in m}})

    write_csv(out / "sweep.csv", COLUMNS, rows)
    title = (f"{train.model} {hook}: d_in {rows[0]['d_in']}, d_sae {rows[0]['d_sae']}, "
             f"{rows[0]['train_tokens']:,} training tokens")
    plot_frontier(rows, "fvu", "FVU (fraction of variance unexplained)", title, out / "fvu_vs_l0.png")
    if lm_contexts:
        plot_frontier(rows, "delta_loss", "delta LM loss (nats)", title, out / "delta_loss_vs_l0.png")
    write_json(out / "sweep.json", {"config": to_dict(cfg), "train_store_identity": identity,
                                    "val_store_identity": val.content_hash(), "runs": rows})
    return out


def plot_frontier(rows: list[dict], metric: str, ylabel: str, title: str, path: Path) -> None:
    """One curve per architecture of ``metric`` against L0 (log x), saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        pts = sorted((r["l0"], r[metric]) for r in rows if r["architecture"] == arch and r.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def setup_sweep(p: argparse.ArgumentParser):
    """`monoscope sweep --train-store DIR --val-store DIR --out DIR [grid flags]`."""
    from monoscope.config import add_arguments, from_namespace

    add_arguments(p, SweepConfig)
    p.add_argument("--train-store", required=True, help="activation store to train on")
    p.add_argument("--val-store", required=True, help="held-out activation store to evaluate on")
    p.add_argument("--out", required=True, help="sweep folder (finished SAEs in it are reused)")

    def run(ns):
        out = run_sweep(from_namespace(SweepConfig, ns), ns.train_store, ns.val_store, ns.out)
        print((out / "sweep.csv").read_text())
        print(f"plots in {out}")
    return run
