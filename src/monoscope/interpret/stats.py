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

Artifact folder::

    stats.json            sidecar: format, config, store/SAE/model identity, input_hash, versions, timings
    features.safetensors  dense arrays, F = number of features:
        count [F] int64, density [F], mean [F] (over all rows), mean_nonzero [F], max [F],
        hist [F, B] int64, hist_edges [B+1],
        top_rows / top_values [F, top_k]           (row -1 and value 0 where a feature fired less),
        interval_rows / interval_values [F, n_intervals, per_interval]   (-1 / 0 where empty),
        interval_edges [F, n_intervals+1],
        corr_features / corr_features_r [F, n_correlated], corr_neurons / corr_neurons_r (if asked),
        neighbours / neighbours_cos [F, n_correlated]  (with an SAE),
        logits_pos / logits_pos_values / logits_neg / logits_neg_values [F, n_logits] (with a model)
    contexts.jsonl        one JSON object per feature, line i = feature i:
        {"feature": i, "density": float, "max": float,
         "top": [EXAMPLE, ...],                                  (highest first)
         "intervals": [{"lo": float, "hi": float, "examples": [EXAMPLE, ...]}, ...],   (low to high)
         "logits": {"pos": [[token, value], ...], "neg": [[token, value], ...]}        (with a model)}
        EXAMPLE = {"row": int, "act": float, "context": int, "tokens": [str, ...],
                   "acts": [float | null, ...], "focus": int}
        ``tokens``/``acts`` cover the window (context_window tokens before and after the row, inside its
        context); ``focus`` is the index of the example's own token; a BOS that the store did not keep
        is shown as the tokenizer's BOS string with act null.

Index -1 / r NaN mark empty slots throughout.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monoscope.artifacts import atomic_path, library_versions, now_iso, read_json, write_json
from monoscope.config import config_hash, to_dict
from monoscope.errors import MonoscopeError
from monoscope.progress import progress_bar

FORMAT = "monoscope.feature_stats"
VERSION = 1
HIST_DECADES = (-4, 4)  # log10 range of the fixed histogram bins
HIST_PER_DECADE = 10
INF = float("inf")


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


def hist_edges() -> np.ndarray:
    """0, then log-spaced edges 10^lo .. 10^hi; bin b holds values in [edges[b], edges[b+1])."""
    lo, hi = HIST_DECADES
    return np.concatenate([[0.0], np.logspace(lo, hi, (hi - lo) * HIST_PER_DECADE + 1)])


# ---------------------------------------------------------------------------------------------- helpers

class _TopK:
    """Per group, the k largest values seen so far with their rows (ties: the earlier row first).

    ``add`` only keeps entries above their group's current k-th value (``floor``, 0 while the group has
    fewer than k) and buffers them; ``flush`` (when the buffer holds about as many entries as the table,
    and at the end) merges buffer and table with one stable sort of an int64 key: group in the high bits,
    the value's float bits (monotone for positive floats) reversed in the low bits. The floor is only
    raised at a flush, so between flushes it is merely lower than it could be: nothing is lost.
    """

    def __init__(self, n_groups: int, k: int):
        self.k = k
        self.row = torch.full((n_groups, k), -1, dtype=torch.int64)
        self.val = torch.zeros((n_groups, k))
        self.floor = torch.zeros(n_groups)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._n_buf = 0

    def add(self, groups: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """Entries in stream order (rows ascending); values must be > 0."""
        keep = vals > self.floor[groups]
        g = groups[keep]
        if len(g):
            self._buf.append((g, rows[keep], vals[keep]))
            self._n_buf += len(g)
            if self._n_buf >= self.row.numel():
                self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        have = self.row >= 0
        groups = torch.arange(len(self.row))[:, None].expand_as(self.row)
        # the table first, then the buffer in stream order: a stable sort puts earlier rows first on ties
        g = torch.cat([groups[have]] + [b[0] for b in self._buf])
        r = torch.cat([self.row[have]] + [b[1] for b in self._buf])
        v = torch.cat([self.val[have]] + [b[2] for b in self._buf]).contiguous()
        self._buf, self._n_buf = [], 0
        key = (g << 31) | ((1 << 31) - 1 - v.view(torch.int32).long())
        order = torch.sort(key, stable=True).indices
        g, r, v = g[order], r[order], v[order]
        counts = torch.bincount(g, minlength=len(self.row))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(g)) - starts[g]
        keep = rank < self.k
        self.row.fill_(-1)
        self.val.zero_()
        self.row[g[keep], rank[keep]] = r[keep]
        self.val[g[keep], rank[keep]] = v[keep]
        self.floor = torch.where(self.row[:, -1] >= 0, self.val[:, -1], 0.0)


class _SlotSample:
    """Per group, k slots each holding the smallest-random-key entry routed to it (a partition sample).

    Sampling is one scatter-min per batch; tables are flat [n_groups * k] and viewed as [n_groups, k].
    """

    def __init__(self, n_groups: int, k: int):
        self.k = k
        self.key = torch.full((n_groups * k,), INF, dtype=torch.float64)
        self.row = torch.full((n_groups * k,), -1, dtype=torch.int64)
        self.val = torch.zeros(n_groups * k)

    def add(self, groups: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, gen: torch.Generator) -> None:
        if groups.numel() == 0:
            return
        slot = groups * self.k + torch.randint(self.k, groups.shape, generator=gen)
        keys = torch.rand(groups.shape, generator=gen, dtype=torch.float64)
        self.key.scatter_reduce_(0, slot, keys, "amin")
        win = keys == self.key[slot]
        self.row[slot[win]] = rows[win]
        self.val[slot[win]] = vals[win]


def _smallest_per_group(groups: torch.Tensor, keys: torch.Tensor, k: int, n_groups: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot index into the inputs or -1 [n_groups, k]) of the k smallest keys per group, ascending."""
    out = torch.full((n_groups, k), -1, dtype=torch.int64)
    if groups.numel() == 0:
        return out, out >= 0
    order = torch.argsort(groups.double() + keys.double())  # keys lie in [0, 1)
    g = groups[order]
    uniq, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(g)) - torch.repeat_interleave(starts, counts)
    keep = rank < k
    out[g[keep], rank[keep]] = order[keep]
    return out, out >= 0


class _Encoder:
    """Batch of activations -> non-zero entries (local row, feature, value), via the cheapest SAE path.

    The SAE runs on ``threads`` threads; the rest of the pass runs on one (see ``_threads``).
    """

    def __init__(self, sae, threads: int):
        self.sae = sae
        self.threads = threads

    def __call__(self, x: torch.Tensor):
        sae = self.sae
        if sae is not None and getattr(sae, "architecture", "") == "topk" and hasattr(sae, "encode_sparse"):
            with _threads(self.threads):
                vals, idx = sae.encode_sparse(x)  # [B, k], ids sorted within a row: entries stay row-major
            rows = torch.arange(x.shape[0]).repeat_interleave(idx.shape[1])
            vals, idx = vals.reshape(-1).float(), idx.reshape(-1)
            keep = vals > 0
            if bool(keep.all()):
                return rows, idx, vals
            return rows[keep], idx[keep], vals[keep]
        if sae is not None:
            with _threads(self.threads):
                x = sae.encode(x)
        rows, feats = (x > 0).nonzero(as_tuple=True)
        return rows, feats, x[rows, feats].float()


@contextmanager
def _threads(n: int):
    """Run torch ops on ``n`` threads inside the block.

    The pass's bookkeeping is many short ops on ~10^5 entries: split over threads, each op waits for
    every thread to be scheduled, which on a busy machine costs a time slice per op (measured: ~25× slower
    on 2 shared cores than on one thread). Only the SAE's matmul is worth the hand-off.
    """
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sae_identity(sae, source: str | None) -> dict[str, Any]:
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    cfg = sae.config_dict() if hasattr(sae, "config_dict") else {}
    return {"source": source, "architecture": getattr(sae, "architecture", type(sae).__name__),
            "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "hook_name": sae.cfg.hook_name,
            "model_name": sae.cfg.model_name, "weights_sha256": h.hexdigest()[:16], "config": cfg}


def _load_sae(sae):
    if sae is None or hasattr(sae, "encode"):
        return sae, None
    from monoscope.sae.io import load_sae

    return load_sae(sae), str(sae)


def check_sae_matches(sae, *, model_name: str | None = None, hook: str | None = None,
                      hooks: dict[str, int] | None = None) -> str:
    """Raise if ``sae`` was trained on another model or hook; return the hook it reads."""
    cfg = sae.cfg
    if model_name and cfg.model_name and cfg.model_name != model_name:
        raise MonoscopeError(f"the SAE was trained on model {cfg.model_name!r} but the activations come from "
                             f"{model_name!r}; use an SAE trained on {model_name!r}")
    name = hook or cfg.hook_name
    if hooks is not None:
        if not name:
            if len(hooks) != 1:
                raise MonoscopeError(f"the SAE names no hook and the store holds several ({', '.join(hooks)}); "
                                     f"pass hook=")
            name = next(iter(hooks))
        if name not in hooks:
            raise MonoscopeError(f"the SAE reads hook {name!r} but the store holds {', '.join(hooks)}; "
                                 f"extract that hook or use an SAE trained on one of these")
        if hooks[name] != cfg.d_in:
            raise MonoscopeError(f"the SAE expects d_in={cfg.d_in} but hook {name!r} in the store has width "
                                 f"{hooks[name]}; is this the hook the SAE was trained on?")
    if hook and cfg.hook_name and cfg.hook_name != hook:
        raise MonoscopeError(f"the SAE was trained on hook {cfg.hook_name!r}, not {hook!r}")
    return name


def load_tokenizer(model_name: str):
    """The tokenizer of a store's model without loading the model (None when it cannot be had offline)."""
    from monoscope import models

    if model_name.startswith(models.TINY_PREFIX):
        return models.byte_tokenizer()
    try:
        from transformers import AutoTokenizer

        path = models.cache_dir() / "models" / model_name if model_name == models.DEFAULT_MODEL else model_name
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure just means ids are shown instead of strings
        return None


# ---------------------------------------------------------------------------------------------- main

def compute_feature_stats(store_folder, out_folder, *, sae=None, lm=None, hook: str | None = None,
                          top_k: int = 20, n_intervals: int = 10, per_interval: int = 5,
                          context_window: tuple[int, int] = (16, 4), batch_size: int = 4096,
                          n_correlated: int = 5, correlate_with_neurons: str | None = None,
                          corr_rows: int = 8192, n_logits: int = 10, seed: int = 0,
                          tokenizer=None, show_progress: bool | None = None, force: bool = False) -> Path:
    """Compute every feature's statistics in one pass over the store at ``store_folder``; return the folder.

    ``sae`` is an SAE object or folder; None studies the raw units of ``hook`` (e.g. mlp_neurons).
    ``lm`` (a LoadedModel) adds logit effects and supplies the tokenizer. A finished artifact with the
    same inputs in ``out_folder`` is reused unless ``force``.
    """
    from monoscope.store import ActivationStore

    cfg = StatsConfig(top_k=top_k, n_intervals=n_intervals, per_interval=per_interval,
                      context_window=tuple(int(c) for c in context_window), batch_size=batch_size,
                      n_correlated=n_correlated, correlate_with_neurons=correlate_with_neurons,
                      corr_rows=corr_rows, n_logits=n_logits, seed=seed)
    _validate(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    store = ActivationStore(store_folder)
    if store.num_rows == 0:
        raise MonoscopeError(f"the activation store {store_folder} holds no rows; extract some first")
    sae, sae_source = _load_sae(sae)
    if sae is not None:
        hook = check_sae_matches(sae, model_name=store.model, hook=hook, hooks=store.hooks)
        sae.eval()
    else:
        hook = store.hook(hook)
    if lm is not None and lm.name != store.model:
        raise MonoscopeError(f"the model {lm.name!r} is not the store's model {store.model!r}; pass the model "
                             f"the activations came from")
    if correlate_with_neurons is not None:
        store.hook(correlate_with_neurons)
    n_feat = sae.cfg.d_sae if sae is not None else store.d(hook)

    identity = {
        "store": {"folder": str(Path(store_folder).resolve()), "model": store.model,
                  "model_fingerprint": store.model_fingerprint, "hook": hook, "num_rows": store.num_rows,
                  "input_hash": store.meta.get("input_hash"),
                  "shards_sha256": config_hash([s["sha256"] for s in store.shards])},
        "sae": _sae_identity(sae, sae_source) if sae is not None else None,
        "model": {"name": lm.name, "fingerprint": lm.fingerprint} if lm is not None else None,
    }
    input_hash = config_hash(to_dict(cfg), identity)
    out = Path(out_folder)
    if (out / "stats.json").exists() and not force:
        try:
            old = read_json(out / "stats.json")
        except (OSError, ValueError):
            old = {}
        if old.get("input_hash") == input_hash:
            return out
    out.mkdir(parents=True, exist_ok=True)
    tmp_codes = out / ".codes.tmp"
    shutil.rmtree(tmp_codes, ignore_errors=True)

    # the SAE's and the decoder's matmuls use all of torch's threads, everything else one (see _threads)
    threads = torch.get_num_threads()
    timings["setup_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    with torch.inference_mode():
        with _threads(1):
            state = _one_pass(store, hook, sae, n_feat, cfg, tmp_codes if sae is not None else None,
                              show_progress, threads)
            timings["pass_s"] = time.perf_counter() - t
            t = time.perf_counter()
            arrays = _finish_arrays(state, cfg, n_feat, store.num_rows)
            timings["finish_s"] = time.perf_counter() - t
            t = time.perf_counter()
            arrays.update(_correlations(state, cfg, n_feat, store))
            timings["correlations_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if sae is not None:
            arrays.update(decoder_neighbours(sae, cfg.n_correlated))
        timings["neighbours_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if lm is not None and sae is not None:
            arrays.update(logit_effects(lm, decoder_directions(sae), cfg.n_logits))
        timings["logits_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tok = tokenizer if tokenizer is not None else (lm.tokenizer if lm is not None else load_tokenizer(store.model))
    with _threads(1):
        _write_contexts(out, store, hook, sae, tmp_codes, arrays, cfg, tok)
    shutil.rmtree(tmp_codes, ignore_errors=True)
    timings["contexts_s"] = time.perf_counter() - t

    from safetensors.torch import save_file

    with atomic_path(out / "features.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp), metadata={"format": FORMAT})
    timings["total_s"] = time.perf_counter() - t0
    write_json(out / "stats.json", {
        "format": FORMAT, "version": VERSION, "created": now_iso(), "input_hash": input_hash,
        "n_features": n_feat, "kind": "sae_latents" if sae is not None else "hook_units", "hook": hook,
        "config": to_dict(cfg), **identity, "library_versions": library_versions(),
        "hist": {"bins": "fixed log-spaced, shared by all features", "decades": list(HIST_DECADES),
                 "per_decade": HIST_PER_DECADE},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    })
    return out


def _validate(cfg: StatsConfig) -> None:
    for name in ("top_k", "n_intervals", "per_interval", "batch_size", "corr_rows", "n_logits"):
        if getattr(cfg, name) < 1:
            raise MonoscopeError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_correlated < 0:
        raise MonoscopeError(f"n_correlated must be ≥ 0, got {cfg.n_correlated}")
    if len(cfg.context_window) != 2 or min(cfg.context_window) < 0:
        raise MonoscopeError(f"context_window must be two non-negative token counts (before, after), "
                             f"got {cfg.context_window}")


def _sub_bins(n_intervals: int) -> int:
    """Sub-bins of [0, M) for the interval reservoirs: a power of two ≥ 6 per interval."""
    return 1 << math.ceil(math.log2(6 * n_intervals))


def _one_pass(store, hook, sae, m, cfg: StatsConfig, codes_dir: Path | None, show_progress,
              threads: int) -> dict:
    """Stream the store once; fold each batch's non-zero entries into bounded running state.

    Called on one thread; only the SAE runs on ``threads`` (see ``_threads``).
    """
    encode = _Encoder(sae, threads)
    edges = torch.from_numpy(hist_edges()).float()
    nb = len(edges) - 1
    S = _sub_bins(cfg.n_intervals)
    count = torch.zeros(m, dtype=torch.int64)
    total = torch.zeros(m, dtype=torch.float64)
    vmax = torch.zeros(m)
    hist = torch.zeros(m * nb, dtype=torch.int64)
    top = _TopK(m, cfg.top_k)
    inter = _SlotSample(m * S, cfg.per_interval)
    expo = torch.full((m,), -1000, dtype=torch.int64)  # grid max M = 2**expo (−1000: never fired)
    gen = torch.Generator().manual_seed(cfg.seed)
    p_sample = min(1.0, cfg.corr_rows / store.num_rows)
    sample_rows, sample_ent = [], []
    n_sampled = 0
    if codes_dir is not None:
        codes_dir.mkdir(parents=True)
        fk, fv = open(codes_dir / "keys.i64", "wb"), open(codes_dir / "vals.f32", "wb")
    bar = progress_bar(total=store.num_rows, unit="tok", desc="feature stats", enable=show_progress)
    start = 0
    try:
        for x in store.iter_rows(hook, batch_size=cfg.batch_size):
            B = x.shape[0]
            rows, feats, vals = encode(x)
            grow = rows + start
            if codes_dir is not None:
                fk.write((grow * m + feats).numpy().tobytes())
                fv.write(vals.numpy().tobytes())
            count += torch.bincount(feats, minlength=m)
            total += torch.bincount(feats, weights=vals.double(), minlength=m)
            bmax = torch.zeros(m).scatter_reduce_(0, feats, vals, "amax")
            torch.maximum(vmax, bmax, out=vmax)
            b = (torch.bucketize(vals, edges, right=True) - 1).clamp_(0, nb - 1)
            hist += torch.bincount(feats * nb + b, minlength=m * nb)
            top.add(feats, grow, vals)
            # interval reservoirs on the power-of-two grid
            _grow_grid(inter, expo, bmax, S)
            sub = torch.ldexp(vals, -expo[feats].float()).mul_(S).long().clamp_(0, S - 1)
            groups = feats * S + sub
            inter.add(groups, grow, vals, gen)
            # correlation sample: whole rows, kept sparse
            pick = torch.rand(B, generator=gen) < p_sample
            if pick.any():
                pos = torch.full((B,), -1, dtype=torch.int64)
                pos[pick] = torch.arange(n_sampled, n_sampled + int(pick.sum()))
                sel = pick[rows]
                sample_ent.append((pos[rows[sel]], feats[sel], vals[sel]))
                sample_rows.append(torch.nonzero(pick).reshape(-1) + start)
                n_sampled += int(pick.sum())
            start += B
            bar.update(B)
        top.flush()
    finally:
        bar.close()
        if codes_dir is not None:
            fk.close()
            fv.close()
    cat = (lambda i: torch.cat([e[i] for e in sample_ent]) if sample_ent else torch.zeros(0, dtype=torch.int64))
    return {"count": count, "total": total, "max": vmax, "hist": hist.reshape(m, nb), "top": top,
            "inter": inter, "S": S,
            "sample": {"rows": torch.cat(sample_rows) if sample_rows else torch.zeros(0, dtype=torch.int64),
                       "pos": cat(0), "feat": cat(1), "val": cat(2).float() if sample_ent else torch.zeros(0)}}


def _grow_grid(inter: _SlotSample, expo: torch.Tensor, bmax: torch.Tensor, S: int) -> None:
    """Raise each feature's grid max to the power of two above ``bmax``, merging sub-bins as it doubles."""
    fired = bmax > 0
    need = torch.full_like(expo, -1000)
    _, e = torch.frexp(bmax[fired])  # bmax = mant·2^e with mant in [0.5, 1): 2^e ≥ bmax
    need[fired] = e.long()
    up = need > expo
    if not up.any():
        return
    old = expo[up]
    feats = torch.nonzero(up).reshape(-1)
    shift = (need[up] - old)
    merge = old > -1000  # first firing: the table is still empty, nothing to merge
    k = inter.k
    log_s = int(math.log2(S))
    for t in torch.unique(shift[merge]).tolist():
        fs = feats[merge & (shift == t)]
        width = S >> min(t, log_s)  # sub-bins left after merging 2^t neighbours
        g = (fs[:, None] * S + torch.arange(S)).reshape(-1)
        key = inter.key.view(-1, k)[g].reshape(len(fs), width, -1, k)
        best = key.argmin(2, keepdim=True)
        fills = (INF, -1, 0.0)
        for tab, fill in zip((inter.key, inter.row, inter.val), fills):
            merged = tab.view(-1, k)[g].reshape(len(fs), width, -1, k).gather(2, best).squeeze(2)
            block = torch.full((len(fs), S, k), fill, dtype=tab.dtype)
            block[:, :width] = merged
            tab.view(-1, k)[g] = block.reshape(len(fs) * S, k)
    expo[up] = need[up]


def _finish_arrays(state: dict, cfg: StatsConfig, m: int, n_rows: int) -> dict[str, torch.Tensor]:
    count, vmax = state["count"], state["max"]
    top = state["top"]
    out = {
        "count": count, "density": count.double().div(n_rows).float(),
        "mean": (state["total"] / n_rows).float(),
        "mean_nonzero": torch.where(count > 0, state["total"] / count.clamp_min(1), 0.0).float(),
        "max": vmax, "hist": state["hist"], "hist_edges": torch.from_numpy(hist_edges()).float(),
        "top_rows": top.row.clone(), "top_values": torch.where(top.row >= 0, top.val, 0.0),
    }
    # final intervals from the reservoirs: candidates = every kept entry of the feature
    n, per, S = cfg.n_intervals, cfg.per_interval, state["S"]
    inter = state["inter"]
    key, row, val = inter.key.reshape(m, -1).float(), inter.row.reshape(m, -1), inter.val.reshape(m, -1)
    # the exact top-k join the candidates (with fresh random keys): the sparse top intervals then never
    # miss members that a partly covered sub-bin at their edge dropped
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    in_res = torch.zeros_like(top.row, dtype=torch.bool)
    for c in range(top.k):  # top-k rows already in the feature's reservoir would appear twice
        in_res[:, c] = (row == top.row[:, c:c + 1]).any(1)
    extra = (top.row >= 0) & ~in_res
    key = torch.cat([key, torch.rand(top.row.shape, generator=gen)], 1)
    row = torch.cat([row, torch.where(extra, top.row, -1)], 1)
    val = torch.cat([val, top.val], 1)
    ok = row >= 0
    feat = torch.arange(m)[:, None].expand_as(row)[ok]
    v, r, kk = val[ok], row[ok], key[ok]
    j = (v / vmax[feat] * n).long().clamp_(0, n - 1)
    slots, filled = _smallest_per_group(feat * n + j, kk, per, m * n)
    safe = slots.clamp_min(0)
    out["interval_rows"] = torch.where(filled, r[safe], -1).reshape(m, n, per)
    out["interval_values"] = torch.where(filled, v[safe], 0.0).reshape(m, n, per)
    out["interval_edges"] = vmax[:, None] * torch.arange(n + 1)[None, :] / n
    return out


# ---------------------------------------------------------------------------------------------- correlations

def _pearson_topk(gram_rows, mean, std, R: int, n: int, block: int = 1024):
    """Top-n Pearson partners (other than itself) of every feature; ``gram_rows(a, b)`` gives the dense
    rows [b-a, m] of the product Σ_rows f_i·f_j over the R sampled rows.

    r_ij = G_ij / (R σ_i σ_j) − (μ_i/σ_i)(μ_j/σ_j); a feature with σ = 0 has no partners and is no partner.
    """
    m = len(mean)
    ok = std > 0
    inv = torch.where(ok, 1.0 / std, 0.0)
    u = mean * inv
    best_r, best_i = [], []
    for a in range(0, m, block):
        b = min(a + block, m)
        r = gram_rows(a, b)
        r.mul_((inv[a:b] / R)[:, None]).mul_(inv[None, :])
        r.sub_(u[a:b, None] * u[None, :])
        r[:, ~ok] = -INF
        r[~ok[a:b]] = -INF
        r[torch.arange(b - a), torch.arange(a, b)] = -INF
        top = torch.topk(r, min(n, m), dim=1)
        best_r.append(top.values)
        best_i.append(top.indices)
    best_r, best_i = torch.cat(best_r), torch.cat(best_i)
    if best_r.shape[1] < n:  # fewer features than partners asked for
        pad = n - best_r.shape[1]
        best_r = torch.cat([best_r, torch.full((m, pad), -INF)], 1)
        best_i = torch.cat([best_i, torch.full((m, pad), -1, dtype=torch.int64)], 1)
    empty = ~torch.isfinite(best_r)
    return torch.where(empty, -1, best_i), torch.where(empty, float("nan"), best_r)


def _correlations(state: dict, cfg: StatsConfig, m: int, store) -> dict[str, torch.Tensor]:
    n = cfg.n_correlated
    smp = state["sample"]
    R = len(smp["rows"])
    if n == 0 or R < 2:
        return {}
    pos, feat, val = smp["pos"], smp["feat"], smp["val"]
    s1 = torch.bincount(feat, weights=val.double(), minlength=m)
    s2 = torch.bincount(feat, weights=val.double() ** 2, minlength=m)
    mean = s1 / R
    std = (s2 / R - mean ** 2).clamp_min(0).sqrt()
    mean, std = mean.float(), std.float()
    order = torch.argsort(feat, stable=True)
    fs, ps, vs = feat[order], pos[order], val[order]  # entries by feature
    by_pos = torch.argsort(pos, stable=True)
    pp, ff, vv = pos[by_pos], feat[by_pos], val[by_pos]  # entries by sampled row
    per_row = torch.bincount(pos, minlength=R)
    row_start = torch.cumsum(per_row, 0) - per_row

    def gram_pairs(a, b):
        """Rows [a, b) of the Gram matrix from the pairs of entries that share a sampled row."""
        lo, hi = int(torch.searchsorted(fs, a)), int(torch.searchsorted(fs, b))
        f, p, v = fs[lo:hi] - a, ps[lo:hi], vs[lo:hi]
        rep = per_row[p]
        # partner j of the t-th pair of entry e: entry row_start[p_e] + t of its sampled row
        first = torch.repeat_interleave(row_start[p] - (torch.cumsum(rep, 0) - rep), rep)
        j = first + torch.arange(len(first))
        flat = torch.repeat_interleave(f * m, rep) + ff[j]
        g = torch.zeros((b - a) * m)
        g.index_add_(0, flat, torch.repeat_interleave(v, rep) * vv[j])
        return g.view(b - a, m)

    def gram_product(a, b):
        """Rows [a, b) of the Gram matrix as (F_t @ dense columns [a, b)).T, for dense-ish codes."""
        lo, hi = torch.searchsorted(fs, a), torch.searchsorted(fs, b)
        d = torch.zeros(R, b - a)
        d[ps[lo:hi], fs[lo:hi] - a] = vs[lo:hi]
        return (F_t @ d).T.contiguous()

    # sparse codes (TopK: R·k² pairs) are far cheaper as pairs than as a sparse × dense product
    if int((per_row * per_row).sum()) * 4 <= len(feat) * m:
        gram_rows = gram_pairs
    else:
        F_t = torch.sparse_coo_tensor(torch.stack([feat, pos]), val, (m, R)).coalesce().to_sparse_csr()
        gram_rows = gram_product
    out = {}
    idx, r = _pearson_topk(gram_rows, mean, std, R, n)
    out["corr_features"], out["corr_features_r"] = idx, r
    if cfg.correlate_with_neurons is not None:
        rows = smp["rows"].numpy()
        n_units = store.d(cfg.correlate_with_neurons)
        acc = torch.zeros(m, n_units)
        t1, t2 = torch.zeros(n_units, dtype=torch.float64), torch.zeros(n_units, dtype=torch.float64)
        for a in range(0, R, 4096):
            b = min(a + 4096, R)
            N = store.rows(rows[a:b], hook=cfg.correlate_with_neurons)
            lo, hi = torch.searchsorted(pp, a), torch.searchsorted(pp, b)
            Fc = torch.sparse_coo_tensor(torch.stack([ff[lo:hi], pp[lo:hi] - a]), vv[lo:hi], (m, b - a))
            acc += torch.sparse.mm(Fc.coalesce(), N)
            t1 += N.double().sum(0)
            t2 += N.double().pow(2).sum(0)
        mo = t1 / R
        so = (t2 / R - mo ** 2).clamp_min(0).sqrt()
        idx, r = _pearson_from_product(acc, mean, std, mo.float(), so.float(), R, n)
        out["corr_neurons"], out["corr_neurons_r"] = idx, r
    return out


def _pearson_from_product(prod, mean_f, std_f, mean_o, std_o, R, n):
    cov = prod / R - mean_f[:, None] * mean_o[None, :]
    r = torch.nan_to_num(cov / (std_f[:, None] * std_o[None, :]), nan=-INF, posinf=-INF, neginf=-INF)
    top = torch.topk(r, min(n, r.shape[1]), dim=1)
    empty = ~torch.isfinite(top.values)
    return torch.where(empty, -1, top.indices), torch.where(empty, float("nan"), top.values)


# ---------------------------------------------------------------------------------------------- decoder

def decoder_directions(sae) -> torch.Tensor:
    """Each latent's direction in the raw activation space: decode(e_i) − decode(0) (so any folded
    normalisation or scaling inside ``decode`` is respected)."""
    W = sae.W_dec.detach().float()
    probe = torch.zeros(2, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    probe[1, 0] = 1.0
    with torch.no_grad():
        d0 = sae.decode(probe)
    if torch.allclose((d0[1] - d0[0]).float().cpu(), W[0].cpu(), atol=1e-5, rtol=1e-4):
        return W.cpu()
    # decode is not plain f·W_dec + b_dec: build every direction through it, in blocks
    rows = []
    with torch.no_grad():
        zero = sae.decode(torch.zeros(1, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device))
        for a in range(0, sae.cfg.d_sae, 1024):
            b = min(a + 1024, sae.cfg.d_sae)
            eye = torch.zeros(b - a, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            eye[torch.arange(b - a), torch.arange(a, b)] = 1.0
            rows.append((sae.decode(eye) - zero).float().cpu())
    return torch.cat(rows)


def decoder_neighbours(sae, n: int, block: int = 1024) -> dict[str, torch.Tensor]:
    """Top-n other latents by cosine of decoder directions (W_dec·W_decᵀ one block of rows at a time)."""
    W = decoder_directions(sae)
    m = W.shape[0]
    if n == 0 or m < 2:
        return {}
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx, cos = [], []
    for a in range(0, m, block):
        b = min(a + block, m)
        sim = Wn[a:b] @ Wn.T
        sim[torch.arange(b - a), torch.arange(a, b)] = -INF
        t = torch.topk(sim, min(n, m - 1), dim=1)
        idx.append(t.indices)
        cos.append(t.values)
    return {"neighbours": torch.cat(idx), "neighbours_cos": torch.cat(cos)}


def final_norm_scale(lm) -> tuple[torch.Tensor | None, bool]:
    """(per-dimension scale of the final norm or None, whether it centres like LayerNorm)."""
    from monoscope.hookpoints import family_spec

    norm = lm.model.get_submodule(family_spec(lm.model).final_norm)
    weight = getattr(norm, "weight", None)
    centred = isinstance(norm, torch.nn.LayerNorm)
    if weight is None:
        return None, centred
    w = weight.detach().float().cpu()
    if lm.model.config.model_type in ("gemma", "gemma2", "gemma3_text", "gemma3"):
        w = 1.0 + w  # Gemma's RMSNorm multiplies by (1 + weight)
    return w, centred


def logit_effects(lm, directions: torch.Tensor, n: int, block_elems: int = 1 << 25) -> dict[str, torch.Tensor]:
    """Direct effect of each direction on the logits: (d ⊙ final-norm scale) · W_Uᵀ; top ±n tokens."""
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    if directions.shape[1] != W_U.shape[1]:
        return {}  # e.g. an SAE on mlp_neurons: not in the residual space the unembedding reads
    scale, centred = final_norm_scale(lm)
    D = directions.float()
    if centred:
        D = D - D.mean(1, keepdim=True)
    if scale is not None:
        D = D * scale
    V = W_U.shape[0]
    n = min(n, V)
    step = max(1, block_elems // V)
    pos_i, pos_v, neg_i, neg_v = [], [], [], []
    for a in range(0, D.shape[0], step):
        logits = D[a:a + step] @ W_U.T
        p, q = torch.topk(logits, n, dim=1), torch.topk(logits, n, dim=1, largest=False)
        pos_i.append(p.indices), pos_v.append(p.values), neg_i.append(q.indices), neg_v.append(q.values)
    return {"logits_pos": torch.cat(pos_i), "logits_pos_values": torch.cat(pos_v),
            "logits_neg": torch.cat(neg_i), "logits_neg_values": torch.cat(neg_v)}


# ---------------------------------------------------------------------------------------------- contexts

def _lookup_codes(codes_dir: Path, q: np.ndarray) -> np.ndarray:
    """f[row, feat] for many keys row·m + feat from the sorted sparse-code file written during the pass
    (queries in roughly ascending order search fastest)."""
    keys = np.fromfile(codes_dir / "keys.i64", dtype=np.int64)
    vals = np.fromfile(codes_dir / "vals.f32", dtype=np.float32)
    out = np.zeros(len(q), np.float32)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        hit = keys[at] == q
        out[hit] = vals[at[hit]]
    return out


def _lookup_store(store, hook: str, rows: np.ndarray, feats: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """f[row, unit] for raw hook units: read each needed row once, in chunks."""
    out = np.zeros(len(rows), np.float32)
    uniq, inv = np.unique(rows, return_inverse=True)
    for a in range(0, len(uniq), chunk):
        block = store.rows(uniq[a:a + chunk], hook=hook).numpy()
        sel = np.nonzero((inv >= a) & (inv < a + chunk))[0]
        out[sel] = block[inv[sel] - a, feats[sel]]
    return out


def _write_contexts(out: Path, store, hook: str, sae, codes_dir: Path, arrays: dict, cfg: StatsConfig, tok) -> None:
    """contexts.jsonl: decoded windows with per-token activations for every example of every feature.

    Lookups are vectorised; the Python loops only join ready-made strings (the rows' token strings, "0.0"
    or a number per activation), once per example and once per feature.
    """
    m = arrays["top_rows"].shape[0]
    k, n_int, per = cfg.top_k, cfg.n_intervals, cfg.per_interval
    before, after = cfg.context_window
    W = before + after + 1
    ex_rows = torch.cat([arrays["top_rows"], arrays["interval_rows"].reshape(m, -1)], 1).numpy()  # [m, E]
    ex_vals = torch.cat([arrays["top_values"], arrays["interval_values"].reshape(m, -1)], 1).numpy()
    # only the examples that exist, in (feature, example) order
    fi, ei = np.nonzero(ex_rows >= 0)
    r = ex_rows[fi, ei]
    ctx = store.context_ids()
    token_ids = store.token_ids()
    # context of each row: [start, end) in store order (contexts are contiguous and ascending)
    c = ctx[r]
    c_start = np.searchsorted(ctx, c, side="left")
    c_end = np.searchsorted(ctx, c, side="right")
    # the in-context part of every window is the slice [lo, hi) of its W slots
    lo = np.maximum(c_start - (r - before), 0)
    hi = np.minimum(c_end - (r - before), W)
    win = r[:, None] + np.arange(-before, after + 1)  # [X, W]
    in_ctx = (win >= c_start[:, None]) & (win < c_end[:, None])
    # look the activations up example by example in row order (then the queries are nearly sorted)
    by_row = np.argsort(r * m + fi)
    ok = in_ctx[by_row]
    q_rows, q_feat = win[by_row][ok], np.broadcast_to(fi[by_row, None], win.shape)[ok]
    acts_by_row = np.zeros(win.shape, np.float32)
    if sae is not None:
        acts_by_row[ok] = _lookup_codes(codes_dir, q_rows * m + q_feat)
    else:
        acts_by_row[ok] = _lookup_store(store, hook, q_rows, q_feat)
    acts = np.empty_like(acts_by_row)
    acts[by_row] = acts_by_row
    keep_bos = bool(store.meta.get("config", {}).get("keep_bos", False))
    bos_id = getattr(tok, "bos_token_id", None) if tok is not None else None
    # show a BOS the store dropped when the window reaches the start of its context
    if keep_bos or bos_id is None:
        add_bos = np.zeros(len(r), bool)
    else:
        add_bos = (r - before <= c_start) & (token_ids[c_start] != bos_id)
    bos_json = json.dumps(getattr(tok, "bos_token", None) or "<bos>") if tok is not None else '"<bos>"'
    # JSON text of every store row's token (only the tokens some window shows are decoded)
    used = np.unique(token_ids[win[in_ctx]])
    table = np.full(int(token_ids.max()) + 1 if len(token_ids) else 1, '"?"', dtype=object)
    for t, js in _token_strings(tok, used).items():
        table[t] = js
    row_tok = table[token_ids].tolist()
    # activations: "0.0" except at the few non-zero slots of each window
    nz_x, nz_w = np.nonzero(acts)
    nz_s = _nums(acts[nz_x, nz_w], 4)
    nz_at, nz_w = np.searchsorted(nz_x, np.arange(len(r) + 1)).tolist(), nz_w.tolist()
    zeros = ["0.0"] * W
    examples = []
    for x, (row, act, cid, a, b, bos) in enumerate(zip(
            r.tolist(), _nums(ex_vals[fi, ei]), c.tolist(), lo.tolist(), hi.tolist(), add_bos.tolist())):
        ac = zeros[a:b]
        for q in range(nz_at[x], nz_at[x + 1]):
            ac[nz_w[q] - a] = nz_s[q]
        tk = row_tok[row - before + a:row - before + b]
        if bos:
            tk.insert(0, bos_json)
            ac.insert(0, "null")
        examples.append('{"row":%d,"act":%s,"context":%d,"tokens":[%s],"acts":[%s],"focus":%d}'
                        % (row, act, cid, ",".join(tk), ",".join(ac), before - a + bos))
    # examples of feature i, part p (0: top, 1 + j: interval j) are examples[bounds[g]:bounds[g+1]], g = i·(n+1)+p
    part = np.concatenate([np.zeros(k, np.int64), 1 + np.arange(n_int * per) // per])
    bounds = np.searchsorted(fi * (n_int + 1) + part[ei], np.arange(m * (n_int + 1) + 1)).tolist()
    groups = [",".join(examples[bounds[g]:bounds[g + 1]]) for g in range(m * (n_int + 1))]
    density, vmax = _nums(arrays["density"].numpy()), _nums(arrays["max"].numpy())
    edges = _nums(arrays["interval_edges"].numpy())
    logit_json = None
    if "logits_pos" in arrays:
        n_l = arrays["logits_pos"].shape[1]
        ids_l = np.concatenate([arrays["logits_pos"].numpy(), arrays["logits_neg"].numpy()], 1)  # [m, 2n]
        ls = _token_strings(tok, np.unique(ids_l))
        vals_l = _nums(np.concatenate([arrays["logits_pos_values"].numpy(), arrays["logits_neg_values"].numpy()], 1))
        pairs = ["[%s,%s]" % (ls[t], v) for t, v in zip(ids_l.reshape(-1).tolist(), vals_l)]
        logit_json = [',"logits":{"pos":[%s],"neg":[%s]}' % (
            ",".join(pairs[2 * n_l * i:2 * n_l * i + n_l]), ",".join(pairs[2 * n_l * i + n_l:2 * n_l * (i + 1)]))
            for i in range(m)]
    with atomic_path(out / "contexts.jsonl") as tmp, open(tmp, "w") as fh:
        for i in range(m):
            g, e = i * (n_int + 1), i * (n_int + 1)
            ints = ",".join('{"lo":%s,"hi":%s,"examples":[%s]}' % (edges[e + j], edges[e + j + 1], groups[g + 1 + j])
                            for j in range(n_int))
            fh.write('{"feature":%d,"density":%s,"max":%s,"top":[%s],"intervals":[%s]%s}\n' % (
                i, density[i], vmax[i], groups[g], ints, logit_json[i] if logit_json else ""))


def _nums(a: np.ndarray, places: int = 5) -> list[str]:
    """JSON numbers of an array's values rounded to ``places`` (null for NaN / inf), flattened."""
    return [repr(round(v, places)) if math.isfinite(v) else "null"
            for v in np.asarray(a, dtype=np.float64).reshape(-1).tolist()]


def _token_strings(tok, ids: np.ndarray) -> dict[int, str]:
    """JSON-encoded display string of each token id (``<id>`` when no tokenizer is available)."""
    out = {}
    for t in ids.tolist():
        try:
            s = tok.decode([t]) if tok is not None else f"<{t}>"
        except Exception:  # noqa: BLE001
            s = f"<{t}>"
        out[t] = json.dumps(s)
    return out


# ---------------------------------------------------------------------------------------------- reading

def load_feature_stats(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sidecar, arrays) of a finished stats artifact."""
    folder = Path(folder)
    if not (folder / "stats.json").exists():
        raise MonoscopeError(f"{folder} holds no feature statistics (no stats.json); run `monoscope stats` first")
    from safetensors.torch import load_file

    return read_json(folder / "stats.json"), load_file(str(folder / "features.safetensors"))


def read_feature_contexts(folder, feature: int) -> dict:
    """The contexts.jsonl record of one feature (reads lines up to it)."""
    with open(Path(folder) / "contexts.jsonl") as fh:
        for i, line in enumerate(fh):
            if i == feature:
                return json.loads(line)
    raise MonoscopeError(f"feature {feature} is out of range for the statistics in {folder}")


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
        out = compute_feature_stats(ns.store, ns.out, sae=ns.sae, lm=lm, hook=ns.hook, force=ns.force,
                                    **dataclasses.asdict(cfg))
        side = read_json(out / "stats.json")
        print(f"feature statistics for {side['n_features']} features of {side['hook']} over "
              f"{side['store']['num_rows']:,} rows written to {out} ({side['timings']['total_s']:.1f} s)")
    return run
