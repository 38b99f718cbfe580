"""Feature statistics for every latent of an SAE (or every unit of a hook) in ONE pass over a store.

The anchors (sae_vis, SAEDashboard) re-run the encoder once per group of features and hold activations in
memory. Here each batch of stored activations is encoded once for all latents, and only the non-zero
entries are folded into running state whose size depends on d_sae, never on the corpus:

- counts, sums, max → density, means, max per feature;
- a histogram of the non-zero activations on **fixed log-spaced bins shared by every feature**
  (``hist_edges``: 0, then 10^lo .. 10^hi, 10 bins a decade; the last bin also takes anything larger).
  Fixed bins need no max, so one pass gives exact counts and features can be compared; a browser can
  re-bin them for display;
- top-k rows per feature: entries above a feature's current k-th value are buffered and merged with the
  running top-k by one sort when the buffer is about as big as the table (rarely, once the top-k fill up);
  ties keep the earlier row;
- interval examples (equal-width intervals between 0 and the max): the max is only known at the end, so
  each feature keeps a random sample for each of S sub-bins of [0, M), where M is the smallest power of
  two above the running max. The sample is a k-slot partition sample: every entry gets a random slot
  and a random key and each slot keeps its smallest-key entry (one scatter-min per batch, no sort). When
  the max outgrows M, M doubles and neighbouring sub-bins merge slot by slot (the min over the merged
  slots is again a partition sample of the union, so merging loses nothing). At the end the final
  intervals [j·max/n, (j+1)·max/n) take the per_interval smallest keys among the sub-bins they cover
  plus the exact top-k. Weak spots: a sub-bin with few members can lose some to slot collisions, and
  the partly covered sub-bins at an interval's edges can under-sample, so a sparse interval may show
  fewer examples than it has members. No second encode is needed;
- correlated features (and neurons): Pearson r over a uniform sample of ``corr_rows`` rows, whose sparse
  codes are kept; the d_sae × d_sae product is formed block of rows by block at the end (never a dense
  d_sae² accumulator), from the pairs of entries sharing a sampled row when codes are sparse (TopK:
  rows·k² pairs), else as a sparse × dense product;
- per-token activations for the context windows: the batch's sparse codes are appended to a temporary
  file in the output folder (12 bytes per non-zero; deleted at the end) and looked up at the end. With
  raw hook units (``sae=None``) the store itself is read instead.

Threads: only the SAE's encoder and the decoder products run on all of torch's threads; the bookkeeping
(many short ops) runs on one, where thread hand-offs on a busy machine would cost more than they save.

After the pass: nearest decoder neighbours by cosine (W_dec·W_decᵀ in blocks) and, given a model, logit
effects: the decoder row scaled by the final norm's weight (1 + weight for Gemma RMSNorms; centred first
for LayerNorm) times the unembedding → top promoted / suppressed tokens.

Modules: ``accumulate`` (the pass and its accumulators), ``decoder`` (neighbours, logit effects),
``contexts`` (the example windows), ``feature_stats`` (the artifact: format, writing, reading).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from monoscope.artifacts import library_versions, now_iso
from monoscope.config import config_hash, to_dict
from monoscope.errors import MonoscopeError
from monoscope.interpret.accumulate import (HIST_DECADES, HIST_PER_DECADE, correlations, finish_arrays, one_pass,
                                            torch_threads)
from monoscope.interpret.contexts import context_lines, load_tokenizer
from monoscope.interpret.decoder import decoder_directions, decoder_neighbours, logit_effects
from monoscope.interpret.feature_stats import SIDECAR, FeatureStats
from monoscope.selfcheck import sae_for_store


@dataclass
class StatsConfig:
    """What to compute for every feature (the saved config and the CLI flags of ``monoscope stats``)."""

    top_k: int = field(default=20, metadata={"help": "top-activating examples kept per feature"})
    n_intervals: int = field(default=10, metadata={"help": "equal-width activation intervals between 0 and the max"})
    per_interval: int = field(default=5, metadata={"help": "random examples per interval"})
    context_window: tuple[int, ...] = field(default=(16, 4), metadata={"help": "tokens before and after an example"})
    batch_size: int = field(default=4096, metadata={"help": "rows encoded at once"})
    n_correlated: int = field(default=5, metadata={"help": "correlated features / neurons / decoder neighbours kept"})
    correlate_with_neurons: str | None = field(default=None, metadata={
        "help": "a store hook (e.g. layers.6.mlp_neurons) whose units are correlated with each feature"})
    corr_rows: int = field(default=8192, metadata={"help": "rows sampled for the correlations"})
    n_logits: int = field(default=10, metadata={"help": "promoted / suppressed tokens kept per feature"})
    seed: int = field(default=0, metadata={"help": "seed of the interval and correlation sampling"})


def compute_feature_stats(store_folder, out_folder, cfg: StatsConfig, *, sae=None, lm=None,
                          hook: str | None = None, tokenizer=None, show_progress: bool | None = None,
                          force: bool = False) -> Path:
    """Compute every feature's statistics in one pass over the store at ``store_folder``; return the folder.

    ``cfg`` says what to compute. ``sae`` is an SAE object or folder; None studies the raw units of ``hook``
    (e.g. mlp_neurons). ``lm`` (a LoadedModel) adds logit effects and supplies the tokenizer. A finished artifact with the same inputs in ``out_folder`` is reused unless
    ``force``; read the result with ``FeatureStats(folder)``.
    """
    from monoscope.store import ActivationStore

    cfg = _validate(cfg)
    t0 = time.perf_counter()
    store = ActivationStore(store_folder)
    if store.num_rows == 0:
        raise MonoscopeError(f"the activation store {store_folder} holds no rows; extract some first")
    sae, sae_source = _load_sae(sae)
    if sae is not None:
        hook = sae_for_store(sae, store, hook)
        sae.eval()
    else:
        hook = store.hook(hook)
    if lm is not None and lm.name != store.model:
        raise MonoscopeError(f"the model {lm.name!r} is not the store's model {store.model!r}; pass the model "
                             f"the activations came from")
    if cfg.correlate_with_neurons is not None:
        store.hook(cfg.correlate_with_neurons)
    identity = _identity(store, hook, sae, sae_source, lm)
    input_hash = config_hash(to_dict(cfg), identity)
    out = Path(out_folder)
    if not force and _finished_with(out, input_hash):
        return out
    for name in {hook, cfg.correlate_with_neurons} - {None}:
        store.check_finite(name)  # NaN/inf anywhere (names shard and row), before anything is written
    out.mkdir(parents=True, exist_ok=True)
    timings = {"setup_s": time.perf_counter() - t0}
    codes = out / ".codes.tmp"  # the pass's sparse codes, for the context windows; deleted at the end
    shutil.rmtree(codes, ignore_errors=True)
    try:
        arrays = _compute_arrays(store, hook, sae, lm, cfg, codes if sae is not None else None, show_progress,
                                 timings)
        t = time.perf_counter()
        tok = tokenizer if tokenizer is not None else (lm.tokenizer if lm is not None else load_tokenizer(store.model))
        with torch_threads(1):
            lines = context_lines(store, hook, sae, codes, arrays, cfg, tok)
    finally:
        shutil.rmtree(codes, ignore_errors=True)
    timings["contexts_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    FeatureStats.write(out, {
        "created": now_iso(), "input_hash": input_hash,
        "kind": "sae_latents" if sae is not None else "hook_units", "hook": hook,
        "config": to_dict(cfg), **identity, "library_versions": library_versions(),
        "hist": {"bins": "fixed log-spaced, shared by all features", "decades": list(HIST_DECADES),
                 "per_decade": HIST_PER_DECADE},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }, arrays, lines)
    return out


def _compute_arrays(store, hook: str, sae, lm, cfg: StatsConfig, codes_dir: Path | None, show_progress,
                    timings: dict[str, float]) -> dict[str, torch.Tensor]:
    """The artifact's arrays: the pass, its finishing, correlations, decoder neighbours, logit effects."""
    n_feat = sae.cfg.d_sae if sae is not None else store.d(hook)
    threads = torch.get_num_threads()  # the SAE's and the decoder's matmuls use them all, the rest one

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - t
        return result

    with torch.inference_mode():
        with torch_threads(1):
            state = timed("pass_s", one_pass, store, hook, sae, n_feat, cfg, codes_dir, show_progress, threads)
            arrays = timed("finish_s", finish_arrays, state, cfg, n_feat, store.num_rows)
            arrays.update(timed("correlations_s", correlations, state, cfg, n_feat, store))
        if sae is not None:
            arrays.update(timed("neighbours_s", decoder_neighbours, sae, cfg.n_correlated))
        if lm is not None and sae is not None:
            arrays.update(timed("logits_s", lambda: logit_effects(lm, decoder_directions(sae), cfg.n_logits)))
    return arrays


def _finished_with(out: Path, input_hash: str) -> bool:
    """Whether ``out`` holds a valid artifact computed from the same inputs."""
    if not (out / SIDECAR).exists():
        return False
    try:
        return FeatureStats(out).input_hash == input_hash
    except MonoscopeError:
        return False  # damaged or from another version: recompute


def _identity(store, hook: str, sae, sae_source: str | None, lm) -> dict[str, Any]:
    """What the statistics were computed from (no paths: the inputs are named by content)."""
    return {
        "store": {"model": store.model, "model_fingerprint": store.model_fingerprint, "hook": hook,
                  "num_rows": store.num_rows, "input_hash": store.meta.get("input_hash"),
                  "shards_sha256": config_hash([s["sha256"] for s in store.shards])},
        "sae": _sae_identity(sae, sae_source) if sae is not None else None,
        "model": {"name": lm.name, "fingerprint": lm.fingerprint} if lm is not None else None,
    }


def _sae_identity(sae, source: str | None) -> dict[str, Any]:
    return {"source": source, "architecture": getattr(sae, "architecture", type(sae).__name__),
            "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "hook_name": sae.cfg.hook_name,
            "model_name": sae.cfg.model_name, "content_hash": sae.content_hash(), "config": sae.config_dict()}


def _load_sae(sae):
    """(SAE object or None, the folder's name when it was loaded from one).

    A path is told from an SAE by its type: ``str`` has an ``encode`` method too.
    """
    if not isinstance(sae, (str, os.PathLike)):
        return sae, None
    from monoscope.sae.io import load_sae

    return load_sae(sae), Path(sae).name


def _validate(cfg: StatsConfig) -> StatsConfig:
    """``cfg`` checked, with ``context_window`` as a tuple of ints."""
    for name in ("top_k", "n_intervals", "per_interval", "batch_size", "corr_rows", "n_logits"):
        if getattr(cfg, name) < 1:
            raise MonoscopeError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_correlated < 0:
        raise MonoscopeError(f"n_correlated must be ≥ 0, got {cfg.n_correlated}")
    if len(cfg.context_window) != 2 or min(cfg.context_window) < 0:
        raise MonoscopeError(f"context_window must be two non-negative token counts (before, after), "
                             f"got {cfg.context_window}")
    return replace(cfg, context_window=tuple(int(c) for c in cfg.context_window))


# ---------------------------------------------------------------------------------------------- CLI

def setup_stats(p):
    """``monoscope stats --store DIR [--sae DIR] --out DIR``: flags of StatsConfig plus inputs."""
    from monoscope.config import add_arguments

    p.add_argument("--store", required=True, help="activation store folder")
    p.add_argument("--sae", default=None, help="SAE folder (omit to study the raw units of --hook)")
    p.add_argument("--out", required=True, help="folder for the statistics artifact")
    p.add_argument("--hook", default=None, help="store hook (default: the SAE's hook, or the store's only hook)")
    p.add_argument("--model", default=None,
                   help="load this model for logit effects (the store's model name; omit to skip logit effects)")
    p.add_argument("--force", action="store_true", help="recompute even if a matching artifact exists")
    add_arguments(p, StatsConfig)

    def run(ns):
        from monoscope.config import from_namespace

        cfg = from_namespace(StatsConfig, ns)
        lm = None
        if ns.model:
            from monoscope.models import load_model

            lm = load_model(ns.model)
        out = compute_feature_stats(ns.store, ns.out, cfg, sae=ns.sae, lm=lm, hook=ns.hook, force=ns.force)
        stats = FeatureStats(out)
        print(f"feature statistics for {stats.n_features} features of {stats.hook} over "
              f"{stats.n_tokens:,} rows written to {out} ({stats.sidecar['timings']['total_s']:.1f} s)")
    return run
