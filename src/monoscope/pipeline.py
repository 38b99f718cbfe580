"""`monoscope run`: from a model to a findings report in one command.

Stages (each a folder of the run, skipped when its ``stage.json`` records the same input hash):
    extract   activations of the SAE layer (residual stream + MLP neurons) for training and validation
    saes      train and evaluate the SAE grid (the fidelity/sparsity frontier)
    probe     sparse probing of neurons across layers and of SAE latents at the SAE layer
    stats     one-pass feature statistics of the first SAE and of the layer's MLP neurons
    explain   automated explanations and scores of a sample of features and neurons
    steer     one steering demonstration, measured over many samples
    report    report.html + the feature browser
Stages are also resumable inside (extraction and training checkpoint), so a run killed at any moment and
started again finishes with the same results as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from monoscope.artifacts import library_versions, now_iso, read_json, write_json
from monoscope.config import config_hash, from_dict, to_dict
from monoscope.errors import MonoscopeError
from monoscope.models import DEFAULT_MODEL, LoadedModel, load_model


@dataclass
class RunConfig:
    """Every choice of a run. Saved as run.toml-equivalent JSON in the run folder."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model name or folder"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    layer: int | None = field(default=None, metadata={"help": "layer of the SAEs (default: a third of the depth)"})
    sae_hook_kind: str = field(default="resid_post", metadata={"help": "hook kind the SAEs read"})
    corpus: str = field(default="default", metadata={"help": "corpus for SAE training and feature statistics"})
    tokens: int = field(default=65_536, metadata={"help": "activation rows extracted for SAE training"})
    val_tokens: int = field(default=8_192, metadata={"help": "validation rows for SAE evaluation"})
    context_length: int = field(default=128, metadata={"help": "tokens per context"})
    architectures: tuple[str, ...] = field(default=("topk", "jumprelu"), metadata={"help": "SAE architectures"})
    d_sae: int = field(default=4096, metadata={"help": "latents per SAE"})
    k_values: tuple[int, ...] = field(default=(32,), metadata={"help": "k of the TopK-family SAEs"})
    target_l0_values: tuple[float, ...] = field(default=(32.0,), metadata={"help": "target L0 of JumpReLU SAEs"})
    l1_values: tuple[float, ...] = field(default=(5.0,), metadata={"help": "L1 coefficients of ReLU/Gated SAEs"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training rows"})
    batch_size: int = field(default=2048, metadata={"help": "SAE training batch"})
    lm_contexts: int = field(default=8, metadata={"help": "validation contexts for the spliced LM loss"})
    probe_datasets: tuple[str, ...] = field(default=("is_python_code", "lang:fr", "code:go"),
                                            metadata={"help": "probing datasets (see `monoscope datasets`)"})
    probe_layers: tuple[int, ...] = field(default=(), metadata={"help": "layers to probe (default: every 3rd + last)"})
    probe_ks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32), metadata={"help": "k grid of the probes"})
    probe_methods: tuple[str, ...] = field(default=("adaptive", "mean_diff"),
                                           metadata={"help": "feature-selection methods of the layer sweep"})
    osp_max_k: int = field(default=4, metadata={"help": "largest k of optimal sparse probing (at the SAE layer)"})
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
    return from_dict(RunConfig, data, where=str(path or "the run settings"))


class Run:
    """A run folder whose stages are cached by the hash of their inputs."""

    def __init__(self, cfg: RunConfig, out: str | Path, show_progress: bool | None = None):
        self.cfg, self.out, self.show_progress = cfg, Path(out), show_progress
        self.lm: LoadedModel | None = None
        self.timings: dict[str, float] = {}

    def stage(self, name: str, inputs: Any, body: Callable[[Path], dict]) -> dict:
        folder = self.out / name
        marker = folder / "stage.json"
        digest = config_hash(inputs)
        if marker.exists():
            done = read_json(marker)
            if done.get("input_hash") == digest:
                self.timings[name] = done.get("seconds", 0.0)
                _log(f"{name}: done before, skipped")
                return done["result"]
        folder.mkdir(parents=True, exist_ok=True)
        _log(f"{name}: running")
        started = time.perf_counter()
        result = body(folder)
        seconds = round(time.perf_counter() - started, 1)
        self.timings[name] = seconds
        write_json(marker, {"input_hash": digest, "result": result, "seconds": seconds, "finished": now_iso()})
        _log(f"{name}: finished in {seconds:.0f} s")
        return result


def _log(msg: str) -> None:
    print(f"monoscope run | {msg}", flush=True)


def validate(cfg: RunConfig, lm: LoadedModel) -> dict[str, Any]:
    """Everything checkable before work starts: hooks, layers, datasets, budgets."""
    from monoscope.hookpoints import resolve
    from monoscope.probing.datasets import list_datasets
    from monoscope.sae import REGISTRY

    layer = cfg.layer if cfg.layer is not None else lm.n_layers // 3
    sae_hook = f"layers.{layer}.{cfg.sae_hook_kind}"
    neuron_hook = f"layers.{layer}.mlp_neurons"
    resolve(lm.model, sae_hook)
    probe_layers = sorted({*(cfg.probe_layers or (*range(0, lm.n_layers, 3), lm.n_layers - 1)), layer})
    for pl in probe_layers:
        resolve(lm.model, f"layers.{pl}.mlp_neurons")
    for arch in cfg.architectures:
        if arch not in REGISTRY:
            raise MonoscopeError(f"unknown SAE architecture {arch!r}; valid: {', '.join(REGISTRY)}")
    known = set(list_datasets(available_only=False))
    for name in cfg.probe_datasets:
        if name not in known:
            raise MonoscopeError(f"unknown probing dataset {name!r}; see `monoscope datasets` for valid names")
    if cfg.tokens < 2 * cfg.batch_size:
        raise MonoscopeError(f"tokens={cfg.tokens} is too small to train an SAE with batch_size={cfg.batch_size}; "
                             f"give at least {2 * cfg.batch_size} tokens (or a smaller batch_size)")
    if cfg.val_tokens < cfg.context_length:
        raise MonoscopeError(f"val_tokens={cfg.val_tokens} is smaller than one context ({cfg.context_length})")
    if cfg.epochs <= 0 or cfg.d_sae <= 0:
        raise MonoscopeError("epochs and d_sae must be positive")
    if any(k > cfg.d_sae for k in cfg.k_values):
        raise MonoscopeError(f"k values {cfg.k_values} exceed d_sae={cfg.d_sae}")
    return {"layer": layer, "sae_hook": sae_hook, "neuron_hook": neuron_hook, "probe_layers": probe_layers}


def run_pipeline(cfg: RunConfig, out: str | Path, show_progress: bool | None = None) -> Path:
    """Run (or finish) every stage into ``out`` and return the path of report.html."""
    out = Path(out)
    lm = load_model(cfg.model, device=cfg.device)
    plan = validate(cfg, lm)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", to_dict(cfg))
    (out / "run.toml").write_text(_to_toml(to_dict(cfg)))
    run = Run(cfg, out, show_progress)
    started = time.perf_counter()
    base = {"model": lm.fingerprint, "seed": cfg.seed}

    from monoscope.extract import ExtractConfig, extract

    def extract_body(folder: Path) -> dict:
        hooks = (plan["sae_hook"], plan["neuron_hook"])
        common = dict(model=cfg.model, hook=hooks, corpus=cfg.corpus, context_length=cfg.context_length,
                      device=cfg.device, seed=cfg.seed)
        train = extract(ExtractConfig(tokens=cfg.tokens, split="train", **common), folder / "train", lm=lm,
                        show_progress=show_progress)
        val = extract(ExtractConfig(tokens=cfg.val_tokens, split="validation", **common), folder / "validation",
                      lm=lm, show_progress=show_progress)
        return {"train": str(folder / "train"), "validation": str(folder / "validation"),
                "train_rows": train.num_rows, "validation_rows": val.num_rows, "hooks": list(hooks)}
    ext = run.stage("extract", [base, plan, cfg.corpus, cfg.tokens, cfg.val_tokens, cfg.context_length],
                    extract_body)

    from monoscope.sweep import SweepConfig, run_sweep

    sweep_cfg = SweepConfig(architectures=cfg.architectures, k_values=cfg.k_values,
                            target_l0_values=cfg.target_l0_values, l1_values=cfg.l1_values, d_sae=cfg.d_sae,
                            tokens=int(cfg.epochs * ext["train_rows"]), batch_size=cfg.batch_size, seed=cfg.seed,
                            hook=plan["sae_hook"], device=cfg.device, eval_tokens=ext["validation_rows"],
                            lm_contexts=cfg.lm_contexts)

    def saes_body(folder: Path) -> dict:
        run_sweep(sweep_cfg, ext["train"], ext["validation"], folder, lm=lm, show_progress=show_progress)
        import pandas as pd

        table = pd.read_csv(folder / "sweep.csv")
        return {"table": json.loads(table.to_json(orient="records")), "folder": str(folder)}
    saes = run.stage("saes", [ext, to_dict(sweep_cfg)], saes_body)
    main_sae = str(Path(saes["folder"]) / _pick_main_sae(saes["table"]))

    from monoscope.probing.run import ProbeConfig, run_probing

    def probe_body(folder: Path) -> dict:
        common = dict(model=cfg.model, dataset=cfg.probe_datasets, ks=cfg.probe_ks, max_examples=cfg.probe_examples,
                      max_length=cfg.probe_max_length, seed=cfg.seed, device=cfg.device, osp_max_k=cfg.osp_max_k,
                      osp_time_limit=10.0)
        _warm_probe_cache(lm, cfg, [f"layers.{layer}.mlp_neurons" for layer in plan["probe_layers"]]
                          + [plan["sae_hook"]], show_progress)
        neurons = run_probing(ProbeConfig(layers=tuple(plan["probe_layers"]), methods=cfg.probe_methods, **common),
                              folder / "neurons", lm=lm, show_progress=show_progress)
        latents = run_probing(ProbeConfig(source=f"sae:{main_sae}", methods=("mean_diff", "adaptive"),
                                          controls=False, **common), folder / "sae", lm=lm,
                              show_progress=show_progress)
        osp = run_probing(ProbeConfig(layers=(plan["layer"],), methods=("osp", "mean_diff", "adaptive", "l1_logreg"),
                                      controls=False, **{**common, "ks": tuple(k for k in cfg.probe_ks
                                                                              if k <= max(cfg.osp_max_k, 1))}),
                          folder / "osp", lm=lm, show_progress=show_progress)
        resid = run_probing(ProbeConfig(layers=(plan["layer"],), hook_kind=cfg.sae_hook_kind,
                                        methods=("mean_diff", "adaptive"), controls=False, **common),
                            folder / "resid", lm=lm, show_progress=show_progress)
        return {"neurons": str(folder / "neurons"), "sae": str(folder / "sae"), "resid": str(folder / "resid"),
                "osp": str(folder / "osp"), "rows": len(neurons) + len(latents) + len(resid) + len(osp)}
    probe = run.stage("probe", [base, plan, main_sae, cfg.probe_datasets, cfg.probe_ks, cfg.probe_methods,
                                cfg.probe_examples, cfg.probe_max_length, cfg.osp_max_k], probe_body)

    from monoscope.interpret.stats import compute_feature_stats

    def stats_body(folder: Path) -> dict:
        from monoscope.sae.io import load_sae

        compute_feature_stats(ext["train"], folder / "features", sae=load_sae(main_sae), lm=lm, hook=plan["sae_hook"],
                              correlate_with_neurons=plan["neuron_hook"], show_progress=show_progress)
        compute_feature_stats(ext["train"], folder / "neurons", sae=None, lm=lm, hook=plan["neuron_hook"],
                              show_progress=show_progress)
        return {"features": str(folder / "features"), "neurons": str(folder / "neurons")}
    stats = run.stage("stats", [ext, main_sae, saes], stats_body)

    from monoscope.interpret.autointerp import ExplainConfig, explain_features

    backend = cfg.explain_backend or f"hf:{cfg.model}"

    def explain_body(folder: Path) -> dict:
        results = {}
        for kind, n in (("features", cfg.explain_features), ("neurons", cfg.explain_neurons)):
            ids = _sample_units(stats[kind], n, cfg.seed)
            explain_features(stats[kind], ids, backend, folder / f"{kind}.jsonl",
                             ExplainConfig(seed=cfg.seed, n_explain=10, n_score=cfg.explain_score_examples,
                                           scores=cfg.explain_scores,
                                           group_size=8, max_tokens=40),
                             progress=show_progress)
            results[kind] = str(folder / f"{kind}.jsonl")
        return results
    explained = run.stage("explain", [stats, backend, cfg.explain_features, cfg.explain_neurons,
                                        cfg.explain_score_examples, cfg.explain_scores], explain_body)

    def steer_body(folder: Path) -> dict:
        return _steering_demo(lm, main_sae, stats["features"], explained["features"], cfg, folder)
    steering = run.stage("steer", [stats, explained, cfg.steer_samples, cfg.steer_tokens, cfg.steer_candidates],
                         steer_body)

    from monoscope.report.findings import write_report

    def report_body(folder: Path) -> dict:
        path = write_report(out, cfg=cfg, plan=plan, lm=lm, ext=ext, saes=saes, probe=probe, stats=stats,
                            explained=explained, steering=steering, timings=dict(run.timings),
                            versions=library_versions())
        return {"report": str(path)}
    # The report is cheap and should show the latest timings: always rebuilt.
    rep = run.stage("report", [time.time()], report_body)
    _log(f"all stages done in {time.perf_counter() - started:.0f} s; report: {rep['report']}")
    return Path(rep["report"])


def _warm_probe_cache(lm, cfg: RunConfig, hooks: list[str], show_progress) -> None:
    """One forward pass per dataset for every raw hook the probing runs read (they then hit the cache)."""
    from monoscope.models import cache_dir
    from monoscope.probing.activations import probe_activations
    from monoscope.probing.datasets import load_dataset

    for name in cfg.probe_datasets:
        probe_activations(lm, load_dataset(name, cfg.probe_examples, cfg.seed), hooks,
                          max_length=cfg.probe_max_length, cache_dir=cache_dir() / "probe-activations",
                          progress=show_progress)


def _pick_main_sae(table: list[dict]) -> str:
    """The SAE the later stages interpret: the first TopK one (else the first)."""
    if not table:
        raise MonoscopeError("the SAE stage produced no SAE")
    for row in table:
        if row.get("architecture") == "topk":
            return row["folder"]
    return table[0]["folder"]


def _sample_units(stats_folder: str, n: int, seed: int) -> list[int]:
    """n live units, spread over density ranks (not only the most frequent ones)."""
    import numpy as np

    from monoscope.interpret.stats import load_feature_stats

    _, arrays = load_feature_stats(stats_folder)
    density = arrays["density"].numpy()
    alive = np.flatnonzero(density > 1e-4)
    if len(alive) == 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    order = alive[np.argsort(-density[alive])]
    picks = np.linspace(0, len(order) - 1, num=min(n, len(order))).round().astype(int)
    chosen = order[picks]
    rng.shuffle(chosen)
    return sorted(int(i) for i in chosen)


STEER_PROMPTS = ("I think that", "The most important thing is", "Here is a short story:")
KEYWORD_MAX_SHARE = 0.2  # a keyword found in more unsteered continuations than this cannot show an increase
STEER_FINALISTS = 32  # candidates of the screen's second round


def common_words(texts: list[str], max_share: float = 0.03) -> set[str]:
    """Words found in more than ``max_share`` of the model's own unsteered continuations ('the', 'what', 'think').

    A feature whose concept is such a word cannot show steering by its keyword rate (it is there anyway),
    and clamping a function-word feature breaks the text rather than adding a topic; this list, taken from
    the model's own text, keeps them out without a hand-written stop list.
    """
    from collections import Counter

    from monoscope.interpret.steer import words

    df = Counter(w for t in texts for w in set(words(t)))
    return {w for w, c in df.items() if c > max_share * max(1, len(texts))}


def special_words(tokenizer) -> set[str]:
    """The words inside the tokenizer's special tokens ('<eos>' -> 'eos'): never a concept or a keyword."""
    from monoscope.interpret.steer import words

    return {w for tok in tokenizer.all_special_tokens for w in words(tok)}


def _focus_words(record: dict):
    """How often each word is the token a feature's top examples sit on (a Counter)."""
    from collections import Counter

    from monoscope.interpret.steer import words

    return Counter(w for ex in record.get("top", []) if ex.get("tokens") for w in words(ex["tokens"][ex["focus"]]))


def feature_keywords(record: dict, common: set[str] = frozenset(), min_count: int = 2) -> list[str]:
    """The words a feature stands for: those its top examples sit on (at least ``min_count`` times), plus the
    promoted tokens that are inflections of them (same first four letters: 'vehicle' → 'vehicles'), lower-cased,
    3+ letters, minus ``common`` words. Promoted tokens alone are not taken: at a middle layer they are
    mostly unrelated fragments ('same', 'along') that would count as hits by chance."""
    from monoscope.interpret.steer import words

    keys = {w for w, c in _focus_words(record).items() if c >= min_count and len(w) >= 3}
    stems = {w[:4] for w in keys if len(w) >= 4}
    promoted = {w for tok, _ in (record.get("logits") or {}).get("pos", []) for w in words(tok)}
    keys |= {w for w in promoted if len(w) >= 4 and w[:4] in stems}
    return sorted(w for w in keys if w not in common)


def concept_candidates(stats_folder: str, common: set[str] = frozenset(), max_density: float = 0.05,
                       min_density: float = 2e-4, min_share: float = 0.3, n: int = 128,
                       frequent: set[str] | None = None) -> list[dict]:
    """Features whose top examples mostly sit on one uncommon word (a concrete concept), best first.

    Dense features (above ``max_density``) are skipped: clamping one changes everything and shows no
    concept. Ranked by the share of top examples on that word (ties: the denser feature, so the demo has
    examples to show). Each candidate carries its concept word, that share and its keywords (minus the
    ``frequent`` words, by default the ``common`` ones).
    """
    from collections import Counter

    import numpy as np

    from monoscope.interpret.autointerp import StatsReader
    from monoscope.interpret.stats import load_feature_stats

    _, arrays = load_feature_stats(stats_folder)
    density = arrays["density"].numpy()
    pool = np.flatnonzero((density >= min_density) & (density <= max_density))
    reader = StatsReader(stats_folder)
    found = []
    for f in pool:
        rec = reader.record(int(f))
        focus = Counter({w: c for w, c in _focus_words(rec).items() if len(w) >= 3 and w not in common})
        if not focus:
            continue
        word, count = focus.most_common(1)[0]
        share = count / max(1, len(rec.get("top", [])))
        if share >= min_share:
            found.append({"feature": int(f), "word": word, "share": share, "density": float(density[f]),
                          "keywords": feature_keywords(rec, common if frequent is None else frequent)})
    found.sort(key=lambda c: (-c["share"], -c["density"]))
    return found[:n]


def steering_value(max_activation: float) -> float:
    """Clamp value of the demo: the feature's largest activation seen in the corpus.

    On Gemma 3 270M (layer 6, TopK, feature 1069 'first/last') 0.5× the max lifted the keyword rate 0 → 4/24,
    1× to 10/24 with readable text (distinct-token share 0.81 → 0.70), 1.5× to 7/24 with number soup (0.52);
    2× (the old rule) turned text into loops and the keyword rate fell.
    """
    return float(max_activation)


def steer_samples_per_prompt(cfg: RunConfig) -> int:
    """The demo's ``steer_samples`` continuations per arm, spread over its prompts (at least 2 each)."""
    return max(2, -(-cfg.steer_samples // len(STEER_PROMPTS)))


def unsteered_texts(lm, cfg: RunConfig) -> list[str]:
    """The model's own continuations of the demo prompts (seeds apart from the measured ones): the words it
    uses anyway, which a keyword must not be."""
    from monoscope.interpret.steer import _decode, _prompt_ids, _sample

    n = steer_samples_per_prompt(cfg)
    return [t for i, p in enumerate(STEER_PROMPTS)
            for t in _decode(lm, _sample(lm, _prompt_ids(lm, p), n, cfg.steer_tokens, 0.7, cfg.seed + 1000 + i))]


def _steering_demo(lm, sae_folder: str, stats_folder: str, explained_path: str, cfg: RunConfig, folder: Path) -> dict:
    """Find a feature whose clamping makes the text mention its concept, then measure that on fresh seeds.

    1. The model's unsteered continuations give the common words to leave out (``common_words``).
    2. Features whose top examples sit on one uncommon word are the candidates (``concept_candidates``,
       up to ``cfg.steer_candidates``).
    3. A screen clamps every candidate once per prompt (short continuations, a bfloat16 copy of the model
       where that is fast), then the best ``STEER_FINALISTS`` four more times per prompt at full length and
       the best four of those eight more times, and keeps the one whose keywords appear most beyond their
       unsteered rate while the text stays readable (ties: the feature's own activation on the text). Most
       candidates do nothing when clamped, so the screen must be wide: on the default run's SAE only a
       handful of ~900 raised their keyword rate clearly.
    4. ``steering_effect`` measures it on other seeds in full precision: keyword rate (with a Fisher exact
       p-value), the feature's activation on the generated text and the distinct-token share, default vs
       steered. Choosing on the screen and measuring on fresh samples keeps the reported effect free of the
       selection.
    """
    from scipy.stats import binom

    from monoscope.interpret.autointerp import read_results
    from monoscope.interpret.stats import load_feature_stats
    from monoscope.interpret.steer import (Intervention, generate_side_by_side, mentions, screen_features,
                                           steering_effect)
    from monoscope.models import screening_copy
    from monoscope.sae.io import load_sae

    sae = load_sae(sae_folder)
    _, arrays = load_feature_stats(stats_folder)
    prompts = list(STEER_PROMPTS)
    n_per = steer_samples_per_prompt(cfg)
    plain = unsteered_texts(lm, cfg)
    special = special_words(lm.tokenizer)
    frequent = common_words(plain, KEYWORD_MAX_SHARE)
    found = concept_candidates(stats_folder, common_words(plain) | special, frequent=frequent | special,
                               n=cfg.steer_candidates)
    if not found:  # nothing uncommon (a tiny model): fall back to the best shared word of any kind
        found = concept_candidates(stats_folder, min_share=0.0, frequent=frequent, n=cfg.steer_candidates)
    for c in found:
        c["value"] = steering_value(float(arrays["max"][c["feature"]]))
        # how often the unsteered text has the keywords anyway (add-one smoothed: never exactly zero)
        c["base_rate"] = (sum(mentions(t, c["keywords"]) for t in plain) + 1) / (len(plain) + 2)
    fast = screening_copy(lm)

    def screen(cands: list[dict], repeats: int, tokens: int, seed: int) -> dict[int, dict]:
        rows = [c for c in cands for _ in range(repeats)]  # repeated rows: more continuations per feature
        out = screen_features(fast, sae, [c["feature"] for c in rows], [c["value"] for c in rows],
                              [c["keywords"] for c in rows], prompts, max_new_tokens=tokens, seed=seed)
        return {r["feature"]: r for r in out}

    def promise(result: dict[int, dict]):
        """Readable text first, then how unlikely its keyword hits are at the unsteered rate (a binomial tail:
        5 of 12 is striking for a word the model never says, chance for one it says every fifth time),
        then the feature's activation on the text."""
        def key(c):
            r = result[c["feature"]]
            return r["distinct_tokens"] >= 0.6, -binom.sf(r["hits"] - 1, r["n"], c["base_rate"]), r["activation"]
        return key

    first = screen(found, 1, min(cfg.steer_tokens, 12), cfg.seed + 2000)
    finalists = sorted(found, key=promise(first), reverse=True)[:STEER_FINALISTS]
    second = screen(finalists, 4, cfg.steer_tokens, cfg.seed + 3000)
    # the best of 32 on 12 samples is partly luck: the top four get 24 more, and the pooled counts decide
    best = sorted(finalists, key=promise(second), reverse=True)[:4]
    third = screen(best, 8, cfg.steer_tokens, cfg.seed + 4000)
    del fast
    pooled = {f: _pool(second[f], third[f]) for f in third}
    pick = max(best, key=promise(pooled))
    feature, value = pick["feature"], pick["value"]
    explanation = (read_results(explained_path).get(feature) or {}).get("explanation") or ""
    effect = steering_effect(lm, sae, feature, value, prompts, n_samples=n_per, max_new_tokens=cfg.steer_tokens,
                             seed=cfg.seed, keywords=pick["keywords"])
    texts = {arm: effect[arm].pop("texts") for arm in ("default", "steered")}
    pairs = generate_side_by_side(lm, sae, prompts[0], [Intervention(feature, value, "clamp")],
                                  max_new_tokens=cfg.steer_tokens, n_samples=3, seed=cfg.seed)
    result = {"feature": feature, "value": value, "mode": "clamp", "keyword": pick["word"],
              "keywords": pick["keywords"], "keyword_share_of_top_examples": pick["share"],
              "density": pick["density"],
              "explanation": explanation or f"its top examples sit on the word '{pick['word']}' "
                                            f"({pick['share']:.0%} of them)",
              "screen": {"candidates": len(found), "finalists": len(finalists),
                         "keyword_base_rate": pick["base_rate"],
                         **{k: pooled[feature][k] for k in ("keyword_rate", "activation", "distinct_tokens")}},
              "effect": _jsonable(effect), "examples": pairs, "prompt": prompts[0], "texts": texts}
    write_json(folder / "steering.json", result)
    return result


def _pool(a: dict, b: dict) -> dict:
    """Two screens of the same feature as one: summed hits, sample-weighted means."""
    n = a["n"] + b["n"]
    mean = {k: (a[k] * a["n"] + b[k] * b["n"]) / n for k in ("activation", "distinct_tokens")}
    return {"feature": a["feature"], "hits": a["hits"] + b["hits"], "n": n,
            "keyword_rate": (a["hits"] + b["hits"]) / n, **mean}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _to_toml(data: dict) -> str:
    """A minimal TOML writer for the flat run config (strings, numbers, booleans, lists, None skipped)."""
    lines = []
    for key, value in data.items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def setup_run(p):
    p.add_argument("--config", help="a run.toml (or .yaml) with any RunConfig keys")
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default)")
    p.add_argument("--model", help="override the model")
    p.add_argument("--layer", type=int, help="override the SAE layer")
    p.add_argument("--tokens", type=int, help="override the SAE training tokens")
    p.add_argument("--device", help="override the torch device (e.g. cuda)")

    def run(ns):
        cfg = load_run_config(ns.config, model=ns.model, layer=ns.layer, tokens=ns.tokens, device=ns.device)
        report = run_pipeline(cfg, ns.out)
        print(f"report: {report}")
    return run


__all__ = ["RunConfig", "load_run_config", "run_pipeline", "validate", "dataclasses"]
