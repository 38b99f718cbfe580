"""`monoscope run`: from a model to a findings report in one command.

Stages (folders of the run, chained by content in monoscope.stages: each re-runs exactly when its settings
or the content of a stage it reads changed):
    extract   activations of the SAE layer (residual stream + MLP neurons) for training and validation
    saes      train and evaluate the SAE grid (the fidelity/sparsity frontier), the main SAE's extra seeds
              and dictionary sizes                                                       ← extract
    split     feature splitting: the main SAE's features matched to the larger SAEs'     ← extract, saes
    probe     sparse probing of neurons across layers and of SAE latents at the SAE layer ← saes
    stats     one-pass feature statistics of the main SAE and of the layer's MLP neurons ← extract, saes
    explain   automated explanations and scores of a sample of features and neurons      ← stats
    steer     the steering demonstration (monoscope.interpret.steering_demo)              ← saes, stats, explain
    report    report.html + the feature browsers                                          ← all
Stages are also resumable inside (extraction and training checkpoint), so a run killed at any moment and
started again finishes with the same results as an uninterrupted one.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monoscope.artifacts import library_versions, write_json
from monoscope.config import from_dict, to_dict
from monoscope.errors import MonoscopeError
from monoscope.models import DEFAULT_MODEL, LoadedModel, load_model
from monoscope.probing.user_data import DATASET_HELP, FileColumns
from monoscope.stages import Run, Stage
from monoscope.train import DEFAULT_BATCH_SIZE, DEFAULT_LR, RECIPE_VERSION, TrainConfig
from monoscope.train import check_settings as check_train_settings


PROFILES = ("default", "research")


def profile_settings(name: str) -> dict[str, Any]:
    """The settings a profile changes from RunConfig's defaults ("default" changes none).

    research: the serious run of issue "findings a researcher can trust", sized to finish within 3 h on 2
    CPU cores: 1M training activations seen once, 4k and 16k SAEs, 3 seeds of the main one, 1,000 examples
    over every lang:* and code:* dataset, 20 scored excerpts per class, 40 generations per steering arm.
    """
    if name not in PROFILES:
        raise MonoscopeError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    if name == "default":
        return {}
    from monoscope.probing.datasets import list_datasets

    return {"tokens": 1_048_576, "val_tokens": 32_768, "epochs": 1.0, "seeds": 3, "extra_d_sae": (16_384,),
            "lm_contexts": 32, "probe_examples": 1000,
            "probe_datasets": tuple(n for n in list_datasets() if n.startswith(("lang:", "code:"))),
            "explain_features": 8, "explain_neurons": 8, "explain_score_examples": 20, "steer_samples": 40}


@dataclass
class RunConfig(FileColumns):
    """Every choice of a run. Saved as run.toml-equivalent JSON in the run folder. The columns of a labelled
    file among ``probe_datasets`` come from ``FileColumns``."""

    profile: str = field(default="default", metadata={
        "choices": PROFILES, "help": "a preset of the settings below: default (about 12 min on a 2-core CPU) or "
                                     "research (about 2 h there: 1M activations, 4k and 16k SAEs, 3 seeds, 1,000 "
                                     "examples over every lang:* and code:* dataset); a setting given in the "
                                     "--config file or as a flag wins over the preset"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model name or folder"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    layer: int | None = field(default=None, metadata={"help": "layer of the SAEs (default: a third of the depth)"})
    sae_hook_kind: str = field(default="resid_post", metadata={"help": "hook kind the SAEs read"})
    corpus: str = field(default="default", metadata={
        "help": "corpus for SAE training and feature statistics (as extract --corpus)"})
    corpus_column: str = field(default="", metadata={"help": "corpus files: the column of the texts"})
    tokens: int = field(default=65_536, metadata={"help": "activation rows extracted for SAE training"})
    val_tokens: int = field(default=8_192, metadata={"help": "validation rows for SAE evaluation"})
    context_length: int = field(default=128, metadata={"help": "tokens per context"})
    architectures: tuple[str, ...] = field(default=("topk", "jumprelu"), metadata={
        "help": "SAE architectures; the later stages interpret the first one's first SAE"})
    d_sae: int = field(default=4096, metadata={"help": "latents per SAE"})
    seeds: int = field(default=1, metadata={
        "help": "seeds of the main SAE (the first architecture's first setting); the report's SAE figures get "
                "intervals over them"})
    extra_d_sae: tuple[int, ...] = field(default=(), metadata={
        "help": "more dictionary sizes of the main SAE, each matched to it for feature splitting"})
    k_values: tuple[int, ...] = field(default=(32,), metadata={"help": "k of the TopK-family SAEs"})
    target_l0_values: tuple[float, ...] = field(default=(32.0,), metadata={"help": "target L0 of JumpReLU SAEs"})
    l1_values: tuple[float, ...] = field(default=(5.0,), metadata={"help": "L1 coefficients of ReLU/Gated SAEs"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training rows"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "SAE training batch"})
    lr: float | None = field(default=DEFAULT_LR, metadata={"help": "SAE learning rate (None in the API: the "
                                                                   "1/sqrt(m) rule)"})
    lm_contexts: int = field(default=8, metadata={"help": "validation contexts for the spliced LM loss"})
    probe_datasets: tuple[str, ...] = field(default=("is_python_code", "lang:fr", "code:go"),
                                            metadata={"help": DATASET_HELP})
    probe_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers to probe (default: every 3rd + last)"})
    probe_ks: tuple[int, ...] = field(default=(1, 2, 4, 5, 8, 16, 32), metadata={
        "help": "k grid of the probes (1, 2 and 5 give SAEBench's sparse-probing table)"})
    probe_methods: tuple[str, ...] = field(default=("adaptive", "mean_diff", "dense"),
                                           metadata={"help": "feature-selection methods of the layer sweep"})
    osp_max_k: int = field(default=4, metadata={"help": "largest k of optimal sparse probing (at the SAE layer)"})
    osp_time_limit: float = field(default=10.0, metadata={"help": "seconds per optimal-sparse-probing solve"})
    probe_examples: int = field(default=240, metadata={"help": "examples per probing dataset"})
    probe_max_length: int = field(default=64, metadata={"help": "tokens per probing example"})
    explain_features: int = field(default=2, metadata={"help": "SAE features explained automatically"})
    explain_neurons: int = field(default=2, metadata={"help": "MLP neurons explained automatically"})
    explain_score_examples: int = field(default=2, metadata={
        "help": "activating (and as many non-activating) examples each score uses; simulation makes one call per "
                "example, so this sets the cost of the local backend"})
    explain_scores: tuple[str, ...] = field(default=("detection", "fuzzing"), metadata={
        "help": "scores of the explanations: detection, fuzzing, simulation (simulation asks the local model for "
                "one number per token, which takes minutes per feature on a CPU)"})
    explain_examples: int = field(default=10, metadata={"help": "most excerpts shown when asking for an explanation"})
    explain_group_size: int = field(default=8, metadata={"help": "excerpts per detection/fuzzing prompt"})
    explain_max_tokens: int = field(default=40, metadata={"help": "token budget of each explanation"})
    explain_backend: str = field(default="", metadata={"help": "autointerp backend spec (default: hf:<model>)"})
    steer_samples: int = field(default=20, metadata={"help": "generations per arm of the steering demo"})
    steer_candidates: int = field(default=1024, metadata={
        "help": "features the steering demo screens (those whose top examples sit most on one word first)"})
    steer_tokens: int = field(default=24, metadata={"help": "tokens generated per steering sample"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})


def load_run_config(path: str | Path | None, **overrides: Any) -> RunConfig:
    """Read a TOML (or YAML) run file; ``overrides`` (CLI flags) win. Unknown keys are an error."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MonoscopeError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise MonoscopeError(f"cannot parse {path}: {exc}") from None
        data = data.get("run", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise MonoscopeError(f"{path} must hold a table of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    preset = profile_settings(data.get("profile", "default")) if isinstance(data.get("profile", ""), str) else {}
    return from_dict(RunConfig, {**preset, **data}, where=str(path or "the run settings"))


POSITIVE = ("tokens", "val_tokens", "context_length", "d_sae", "seeds", "batch_size", "lm_contexts", "probe_examples",
            "probe_max_length", "steer_samples", "steer_candidates", "steer_tokens", "explain_score_examples",
            "explain_examples", "explain_group_size", "explain_max_tokens")


def check_settings(cfg: RunConfig) -> None:
    """Every setting that can be checked without the model: sizes, grids, names. Runs before any work."""
    from monoscope.sae import REGISTRY

    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise MonoscopeError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("explain_features", "explain_neurons", "osp_max_k"):
        if getattr(cfg, name) < 0:
            raise MonoscopeError(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.epochs > 0 or not cfg.osp_time_limit > 0:
        raise MonoscopeError(f"epochs and osp_time_limit must be positive, got {cfg.epochs} and {cfg.osp_time_limit}")
    check_train_settings(TrainConfig(d_sae=cfg.d_sae, batch_size=cfg.batch_size, lr=cfg.lr), cfg.d_sae)
    for name in ("k_values", "probe_ks"):
        bad = [v for v in getattr(cfg, name) if v < 1]
        if bad or not getattr(cfg, name):
            raise MonoscopeError(f"{name} must be a non-empty list of integers ≥ 1, got {list(getattr(cfg, name))}")
    if any(d <= cfg.d_sae for d in cfg.extra_d_sae):
        raise MonoscopeError(f"extra_d_sae {list(cfg.extra_d_sae)} must be larger than d_sae={cfg.d_sae} (feature "
                             f"splitting matches the main SAE to larger ones)")
    if any(k > cfg.d_sae for k in cfg.k_values):
        raise MonoscopeError(f"k values {list(cfg.k_values)} exceed d_sae={cfg.d_sae}")
    if any(not v > 0 for v in cfg.target_l0_values) or any(v < 0 for v in cfg.l1_values):
        raise MonoscopeError("target_l0_values must be positive and l1_values non-negative")
    if not cfg.architectures:
        raise MonoscopeError(f"architectures is empty; choose from {', '.join(REGISTRY)}")
    for arch in cfg.architectures:
        if arch not in REGISTRY:
            raise MonoscopeError(f"unknown SAE architecture {arch!r}; valid: {', '.join(REGISTRY)}")
    if cfg.tokens < 2 * cfg.batch_size:
        raise MonoscopeError(f"tokens={cfg.tokens} is too small to train an SAE with batch_size={cfg.batch_size}; "
                             f"give at least {2 * cfg.batch_size} tokens (or a smaller batch_size)")
    if cfg.val_tokens < cfg.context_length:
        raise MonoscopeError(f"val_tokens={cfg.val_tokens} is smaller than one context ({cfg.context_length})")
    _check_names(cfg)


def _check_names(cfg: RunConfig) -> None:
    """Probing datasets, explanation settings and the backend spec: known names only."""
    from monoscope.interpret.backends import make_backend
    from monoscope.probing.user_data import check_dataset_names

    if not cfg.probe_datasets:
        raise MonoscopeError("probe_datasets is empty; name one or more (see `monoscope datasets`)")
    check_dataset_names(cfg.probe_datasets, FileColumns.of(cfg))
    _explain_config(cfg)  # ExplainConfig checks the scores (the sizes are checked above under the run's names)
    if cfg.explain_backend and not cfg.explain_backend.startswith("hf:"):
        make_backend(cfg.explain_backend)  # a malformed or scheme-less endpoint fails here, before any work


def plan_run(cfg: RunConfig, lm: LoadedModel) -> dict[str, Any]:
    """What the model decides: hooks and layers (all resolved now), and the corpus's content hash."""
    from monoscope.corpus import corpus_fingerprint
    from monoscope.hookpoints import resolve

    layer = cfg.layer if cfg.layer is not None else lm.n_layers // 3
    sae_hook = f"layers.{layer}.{cfg.sae_hook_kind}"
    neuron_hook = f"layers.{layer}.mlp_neurons"
    resolve(lm.model, sae_hook)
    probe_layers = sorted({*(cfg.probe_layers or (*range(0, lm.n_layers, 3), lm.n_layers - 1)), layer})
    for pl in probe_layers:
        resolve(lm.model, f"layers.{pl}.mlp_neurons")
    return {"layer": layer, "sae_hook": sae_hook, "neuron_hook": neuron_hook, "probe_layers": probe_layers,
            "corpus": corpus_fingerprint(cfg.corpus, text_field=cfg.corpus_column or None)}


def validate(cfg: RunConfig, lm: LoadedModel) -> dict[str, Any]:
    """All checks of a run before any work; returns the plan."""
    check_settings(cfg)
    return plan_run(cfg, lm)


def run_pipeline(cfg: RunConfig, out: str | Path, show_progress: bool | None = None) -> Path:
    """Run (or finish) every stage into ``out`` and return the path of report.html."""
    import time

    check_settings(cfg)
    out = Path(out)
    lm = load_model(cfg.model, device=cfg.device)
    plan = plan_run(cfg, lm)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", to_dict(cfg))
    (out / "run.toml").write_text(_to_toml(to_dict(cfg)))
    run = Run(out, log=_log)
    started = time.perf_counter()
    ctx = _Context(cfg, lm, plan, run, show_progress)
    ext = _extract_stage(ctx)
    saes = _saes_stage(ctx, ext)
    split = _split_stage(ctx, ext, saes)
    probe = _probe_stage(ctx, saes)
    stats = _stats_stage(ctx, ext, saes)
    explained = _explain_stage(ctx, stats)
    steering = _steer_stage(ctx, saes, stats, explained)
    rep = _report_stage(ctx, [ext, saes, *([split] if split else []), probe, stats, explained, steering])
    unfinished = [s.name for s in run.stages.values() if not s.complete]
    _log(f"all stages done in {time.perf_counter() - started:.0f} s; report: {rep['report']}"
         + (f"; UNFINISHED: {', '.join(unfinished)} (rerun to retry)" if unfinished else ""))
    return rep["report"]


@dataclass
class _Context:
    cfg: RunConfig
    lm: LoadedModel
    plan: dict
    run: Run
    show_progress: bool | None

    @property
    def base(self) -> dict:
        return {"model": self.lm.fingerprint, "seed": self.cfg.seed}


def _log(msg: str) -> None:
    print(f"monoscope run | {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- stages

def _extract_stage(c: _Context) -> Stage:
    from monoscope.extract import ExtractConfig, extract

    cfg, plan = c.cfg, c.plan
    hooks = (plan["sae_hook"], plan["neuron_hook"])
    common = dict(model=cfg.model, hook=hooks, corpus=cfg.corpus, text_column=cfg.corpus_column,
                  context_length=cfg.context_length,
                  device=cfg.device, seed=cfg.seed)

    def body(folder: Path) -> dict:
        train = extract(ExtractConfig(tokens=cfg.tokens, split="train", **common), folder / "train", lm=c.lm,
                        show_progress=c.show_progress)
        val = extract(ExtractConfig(tokens=cfg.val_tokens, split="validation", **common), folder / "validation",
                      lm=c.lm, show_progress=c.show_progress)
        return {"train": folder / "train", "validation": folder / "validation",
                "train_rows": train.num_rows, "validation_rows": val.num_rows, "hooks": list(hooks)}
    settings = [c.base, hooks, plan["corpus"], cfg.tokens, cfg.val_tokens, cfg.context_length]
    return c.run.stage("extract", settings, [], body)


def _saes_stage(c: _Context, ext: Stage) -> Stage:
    """The grid, then the main SAE again with each extra seed (``seed<n>/``) and size (``d<size>/``)."""
    import dataclasses

    from monoscope.sweep import SweepConfig, run_sweep

    cfg = c.cfg
    sweep_cfg = SweepConfig(architectures=cfg.architectures, k_values=cfg.k_values,
                            target_l0_values=cfg.target_l0_values, l1_values=cfg.l1_values, d_sae=cfg.d_sae,
                            tokens=int(cfg.epochs * ext["train_rows"]), batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=cfg.seed, hook=c.plan["sae_hook"], device=cfg.device,
                            eval_tokens=ext["validation_rows"], lm_contexts=cfg.lm_contexts)
    main_only = dataclasses.replace(sweep_cfg, architectures=cfg.architectures[:1], k_values=cfg.k_values[:1],
                                    target_l0_values=cfg.target_l0_values[:1], l1_values=cfg.l1_values[:1])
    variants = {"": sweep_cfg,
                **{f"seed{cfg.seed + i}": dataclasses.replace(main_only, seed=cfg.seed + i) for i in range(1, cfg.seeds)},
                **{f"d{d}": dataclasses.replace(main_only, d_sae=d) for d in cfg.extra_d_sae}}

    def body(folder: Path) -> dict:
        import pandas as pd

        table, larger = [], {}  # folders relative to the stage folder, as in the sweep tables
        for name, vc in variants.items():
            run_sweep(vc, ext["train"], ext["validation"], folder / name, lm=c.lm, show_progress=c.show_progress)
            rows = [{**r, "seed": vc.seed, "folder": (Path(name) / r["folder"]).as_posix()}
                    for r in pd.read_csv(folder / name / "sweep.csv").to_dict(orient="records")]
            table += rows
            if name and not name.startswith("seed"):
                larger[str(vc.d_sae)] = rows[0]["folder"]
        main = _pick_main_sae(table, cfg.architectures)
        return {"table": table, "main": folder / main, "folder": folder, "larger": larger}
    settings = to_dict(sweep_cfg) if len(variants) == 1 else [to_dict(sweep_cfg), sorted(variants)]
    return c.run.stage("saes", [settings, RECIPE_VERSION], [ext], body)


def _split_stage(c: _Context, ext: Stage, saes: Stage) -> Stage | None:
    """The main SAE's features matched to their families in each larger SAE (none without extra sizes)."""
    from dataclasses import asdict

    from monoscope.interpret.splitting import SplitConfig, find_families
    from monoscope.sae.io import load_sae
    from monoscope.store import ActivationStore

    if not saes.get("larger"):
        return None
    split_cfg = SplitConfig(seed=c.cfg.seed)

    def body(folder: Path) -> dict:
        val = ActivationStore(ext["validation"])
        rows = val.sample_rows(c.plan["sae_hook"], min(split_cfg.rows, val.num_rows), split_cfg.seed)
        small = load_sae(saes["main"])
        for d, rel in saes["larger"].items():
            find_families(small, load_sae(saes["folder"] / rel), rows, split_cfg).save(folder / f"d{d}")
        return {"folder": folder, "sizes": sorted(saes["larger"], key=int)}
    return c.run.stage("split", [c.base, asdict(split_cfg)], [ext, saes], body)


def _probe_stage(c: _Context, saes: Stage) -> Stage:
    from monoscope.artifacts import sha256_file
    from monoscope.probing.run import ProbeConfig, run_probing
    from monoscope.probing.user_data import dataset_files

    cfg, plan = c.cfg, c.plan
    common = dict(model=cfg.model, dataset=cfg.probe_datasets, ks=cfg.probe_ks, max_examples=cfg.probe_examples,
                  max_length=cfg.probe_max_length, seed=cfg.seed, device=cfg.device, osp_max_k=cfg.osp_max_k,
                  osp_time_limit=cfg.osp_time_limit, **vars(FileColumns.of(cfg)))
    osp_ks = tuple(k for k in cfg.probe_ks if k <= max(cfg.osp_max_k, 1))
    sweeps = {
        "neurons": ProbeConfig(layers=tuple(plan["probe_layers"]), methods=cfg.probe_methods, **common),
        "sae": ProbeConfig(source=f"sae:{saes['main']}", methods=("mean_diff", "adaptive", "dense"), controls=False,
                           **common),
        "osp": ProbeConfig(layers=(plan["layer"],), methods=("osp", "mean_diff", "adaptive", "l1_logreg"),
                           controls=False, **{**common, "ks": osp_ks}),
        "resid": ProbeConfig(layers=(plan["layer"],), hook_kind=cfg.sae_hook_kind,
                             methods=("mean_diff", "adaptive", "dense"), controls=False, **common)}

    def body(folder: Path) -> dict:
        _warm_probe_cache(c, [f"layers.{layer}.mlp_neurons" for layer in plan["probe_layers"]] + [plan["sae_hook"]])
        rows = sum(len(run_probing(pc, folder / name, lm=c.lm, show_progress=c.show_progress))
                   for name, pc in sweeps.items())
        return {**{name: folder / name for name in sweeps}, "rows": rows}
    # the SAE sweep's source path is replaced by the SAEs' content hash: a copied run folder keeps its key
    settings = [c.base, {n: {**to_dict(pc), "source": pc.source.split(":")[0]} for n, pc in sweeps.items()}]
    files = {name: sha256_file(path) for name, path in dataset_files(cfg.probe_datasets).items()}
    if files:  # a labelled file's content is part of the key (only then, so other runs keep their keys)
        settings.append(files)
    return c.run.stage("probe", settings, [saes], body)


def _stats_stage(c: _Context, ext: Stage, saes: Stage) -> Stage:
    import dataclasses

    from monoscope.interpret.stats import StatsConfig, compute_feature_stats
    from monoscope.sae.io import load_sae

    plan, stats_cfg = c.plan, StatsConfig(seed=c.cfg.seed)

    def body(folder: Path) -> dict:
        compute_feature_stats(ext["train"], folder / "features",
                              dataclasses.replace(stats_cfg, correlate_with_neurons=plan["neuron_hook"]),
                              sae=load_sae(saes["main"]), lm=c.lm, hook=plan["sae_hook"],
                              show_progress=c.show_progress)
        compute_feature_stats(ext["train"], folder / "neurons", stats_cfg, sae=None, lm=c.lm,
                              hook=plan["neuron_hook"], show_progress=c.show_progress)
        return {"features": folder / "features", "neurons": folder / "neurons"}
    return c.run.stage("stats", [c.base, plan["sae_hook"], plan["neuron_hook"], to_dict(stats_cfg)], [ext, saes],
                       body)


def _explain_config(cfg: RunConfig):
    from monoscope.interpret.autointerp import ExplainConfig

    return ExplainConfig(backend=cfg.explain_backend or f"hf:{cfg.model}", seed=cfg.seed, n_explain=cfg.explain_examples,
                         n_score=cfg.explain_score_examples, scores=cfg.explain_scores,
                         group_size=cfg.explain_group_size, max_tokens=cfg.explain_max_tokens, retry_failed=True)


def _explain_stage(c: _Context, stats: Stage) -> Stage:
    from monoscope.interpret.autointerp import backend_failed, explain_features, not_ok

    cfg, ecfg = c.cfg, _explain_config(c.cfg)

    def body(folder: Path) -> dict:
        result, failed, unparsed = {}, [], 0
        for kind, n in (("features", cfg.explain_features), ("neurons", cfg.explain_neurons)):
            ids = _sample_units(stats[kind], n, cfg.seed)
            records = explain_features(stats[kind], ids, None, folder / f"{kind}.jsonl", ecfg,
                                       progress=c.show_progress)
            failed += backend_failed(records)
            unparsed += len(not_ok(records))
            result[kind] = folder / f"{kind}.jsonl"
        if failed:
            _log(f"explain: the backend failed for {len(failed)} unit(s) ({failed[0].get('failure', '?')}); "
                 f"the stage stays unfinished and the next run retries them")
        return {**result, "not_ok": unparsed, "backend_failures": len(failed), "incomplete": bool(failed)}
    settings = [to_dict(ecfg), cfg.explain_features, cfg.explain_neurons]
    return c.run.stage("explain", settings, [stats], body)


def _steer_stage(c: _Context, saes: Stage, stats: Stage, explained: Stage) -> Stage:
    from monoscope.interpret.autointerp import read_results
    from monoscope.interpret.steering_demo import DemoConfig, find_steering_feature
    from monoscope.sae.io import load_sae

    cfg = c.cfg
    demo_cfg = DemoConfig(samples=cfg.steer_samples, tokens=cfg.steer_tokens, candidates=cfg.steer_candidates,
                          seed=cfg.seed)

    def body(folder: Path) -> dict:
        texts = {f: r["explanation"] for f, r in read_results(explained["features"]).items()
                 if r.get("status") == "ok" and r.get("explanation")}
        demo = find_steering_feature(c.lm, load_sae(saes["main"]), stats["features"], demo_cfg, texts)
        demo.save(folder)
        return {"demo": folder}
    return c.run.stage("steer", [c.base, to_dict(demo_cfg)], [saes, stats, explained], body)


def _report_stage(c: _Context, inputs: list[Stage]) -> Stage:
    from monoscope.interpret.steering_demo import SteeringDemo
    from monoscope.report.findings import write_report

    out, versions = c.run.out, library_versions()
    views = {s.name: s.view() for s in inputs}

    def body(folder: Path) -> dict:
        steering = SteeringDemo.load(views["steer"]["demo"]).to_dict()
        path = write_report(out, cfg=c.cfg, plan=c.plan, lm=c.lm, ext=views["extract"], saes=views["saes"],
                            probe=views["probe"], stats=views["stats"], explained=views["explain"],
                            steering=steering, timings=c.run.timings, versions=versions, split=views.get("split"),
                            command=command_line(c.cfg, out.name))
        return {"report": path, "findings": out / "findings.md", "browser": out / "browser",
                "browser_neurons": out / "browser_neurons"}
    return c.run.stage("report", [to_dict(c.cfg), versions, c.run.timings], inputs, body)


def _warm_probe_cache(c: _Context, hooks: list[str]) -> None:
    """One forward pass per dataset for every raw hook the probing runs read (they then hit the cache)."""
    from monoscope.models import cache_dir
    from monoscope.probing.activations import probe_activations
    from monoscope.probing.user_data import resolve_datasets

    for ds in resolve_datasets(c.cfg.probe_datasets, FileColumns.of(c.cfg), c.cfg.probe_examples, c.cfg.seed):
        probe_activations(c.lm, ds, hooks, max_length=c.cfg.probe_max_length,
                          cache_dir=cache_dir() / "probe-activations", progress=c.show_progress)


def _pick_main_sae(table: list[dict], architectures: tuple[str, ...]) -> str:
    """The SAE the later stages interpret: the first one of the first architecture listed."""
    rows = [row for row in table if row.get("architecture") == architectures[0]] or table
    if not rows:
        raise MonoscopeError("the SAE stage produced no SAE")
    return rows[0]["folder"]


def _sample_units(stats_folder, n: int, seed: int) -> list[int]:
    """n live units, spread over density ranks (not only the most frequent ones)."""
    import numpy as np

    from monoscope.interpret.feature_stats import FeatureStats

    density = FeatureStats(stats_folder).arrays["density"].numpy()
    alive = np.flatnonzero(density > 1e-4)
    if len(alive) == 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    order = alive[np.argsort(-density[alive])]
    picks = np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int)
    chosen = order[picks]
    rng.shuffle(chosen)
    return sorted(int(i) for i in chosen)


def command_line(cfg: RunConfig, out: str) -> str:
    """The `monoscope run` line that makes ``cfg``: its profile and every setting that differs from it."""
    preset = to_dict(load_run_config(None, profile=cfg.profile))
    flags = [f"--profile {cfg.profile}"] if cfg.profile != "default" else []
    for key, value in to_dict(cfg).items():
        if key != "profile" and value != preset[key]:
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            flags.append(f"--{key.replace('_', '-')} {shown}")
    return " ".join(["monoscope run", *flags, f"--out {out}"])


def _to_toml(data: dict) -> str:
    """A minimal TOML writer for the flat run config (strings, numbers, booleans, lists, None skipped)."""
    import json

    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in data.items() if value is not None)


def setup_run(p):
    """``monoscope run``: every RunConfig key is a flag (and a key of the --config file); flags win."""
    from monoscope.config import add_arguments

    p.add_argument("--config", help="a run.toml (or .yaml) with any of the keys below")
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    add_arguments(p, RunConfig)

    def run(ns):
        names = RunConfig.__dataclass_fields__
        cfg = load_run_config(ns.config, **{k: v for k, v in vars(ns).items() if k in names})
        report = run_pipeline(cfg, ns.out)
        print(f"report: {report}")
    return run


__all__ = ["RunConfig", "load_run_config", "run_pipeline", "validate", "check_settings"]
