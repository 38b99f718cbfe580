"""Evaluate an SAE: reconstruction and sparsity on stored activations, and the LM with the SAE spliced in.

Reconstruction sums are accumulated in float64 over every eval token
and combined at the end, so explained variance is 1 − Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the mean over all eval
tokens (not per batch, not zero). For the spliced-LM numbers the contexts are rebuilt from the store
(BOS + the stored tokens of each context); the BOS activation is never replaced and the prediction made at
the BOS position is left out, because it is the same in every run and would only dilute the differences.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monoscope.artifacts import library_versions, now_iso, write_json
from monoscope.config import add_arguments, from_namespace, to_dict
from monoscope.errors import MonoscopeError
from monoscope.progress import progress_bar
from monoscope.sae.compat import check_sae_fits, warn_if_implausible

EVAL_FILE = "eval.json"
HIST_EDGES = np.arange(-8.0, 0.25, 0.25)  # log10 feature density bins, 1e-8 .. 1


def _load(sae_or_folder) -> tuple[Any, Path | None]:
    if isinstance(sae_or_folder, (str, Path)):
        from monoscope.sae.formats import load_sae, sae_path

        folder = sae_path(sae_or_folder)
        return load_sae(folder), folder
    return sae_or_folder, None


# Sums and means that are finite whenever the SAE and the activations are; a non-finite one means NaN/inf
# weights or data, and is refused rather than saved. (Ratios such as ce_loss_recovered may be undefined,
# 0/0, on degenerate data; those are saved as null.)
MUST_BE_FINITE = ("mse", "cosine", "norm_ratio", "l0", "l1", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
                  "kl_sae", "kl_zero", "kl_mean")


def _checked(metrics: dict, where: str) -> dict:
    """``metrics`` with undefined (non-finite) ratios set to None; raise if a sum or mean is non-finite."""
    bad = [k for k in MUST_BE_FINITE if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        raise MonoscopeError(f"evaluating {where} gave non-finite {', '.join(bad)}: the SAE's weights hold "
                             f"NaN/inf (retrain it); nothing was written")
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


@torch.no_grad()
def reconstruction_metrics(sae, batches, d_sae: int, device="cpu", show_progress=None, total=None) -> dict:
    """Reconstruction and sparsity metrics over an iterable of [B, d] batches."""
    n = 0
    sse = sum_x2 = sum_xhat2 = sum_dot = sum_cos = sum_ratio = sum_l0 = sum_l1 = 0.0
    sum_x = shift = None  # sums of x − shift (shift = first batch's mean) keep the variance well conditioned
    counts = torch.zeros(d_sae, dtype=torch.float64, device=device)
    bar = progress_bar(total=total, unit="tok", desc="evaluate", enable=show_progress)
    for x in batches:
        x = x.to(device, torch.float32)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        xd, hd = x.double(), x_hat.double()
        sse += (xd - hd).pow(2).sum().item()
        if shift is None:
            shift = xd.mean(0)
        xs = xd - shift
        sum_x2 += xs.pow(2).sum().item()
        sum_xhat2 += hd.pow(2).sum().item()
        sum_dot += (xd * hd).sum().item()
        xn, hn = xd.norm(dim=1), hd.norm(dim=1)
        sum_cos += ((xd * hd).sum(1) / (xn * hn).clamp_min(1e-30)).sum().item()
        sum_ratio += (hn / xn.clamp_min(1e-30)).sum().item()
        active = f != 0
        sum_l0 += active.sum().item()
        sum_l1 += f.double().abs().sum().item()
        counts += active.sum(0, dtype=torch.float64)
        sum_x = xs.sum(0) if sum_x is None else sum_x + xs.sum(0)
        n += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    if n == 0:
        raise MonoscopeError("no activations to evaluate on; the store is empty or max_tokens is 0")
    mean_shifted = sum_x / n
    total_var = sum_x2 - n * mean_shifted.pow(2).sum().item()  # Σ‖x − μ‖² = Σ‖x − c‖² − n‖μ − c‖²
    mean = mean_shifted + shift
    ev = 1.0 - sse / total_var if total_var > 0 else float("nan")
    density = (counts / n).cpu().numpy()
    live = density[density > 0]
    hist, _ = np.histogram(np.log10(live), bins=HIST_EDGES) if len(live) else (np.zeros(len(HIST_EDGES) - 1), None)
    return {
        "tokens": n,
        "mse": sse / n,
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "cosine": sum_cos / n,
        "norm_ratio": sum_ratio / n,
        "relative_reconstruction_bias": sum_xhat2 / sum_dot if sum_dot != 0 else float("nan"),
        "l0": sum_l0 / n,
        "l1": sum_l1 / n,
        "dead_fraction": float((density == 0).mean()),
        "dense_fraction_1pct": float((density > 0.01).mean()),
        "dense_fraction_10pct": float((density > 0.10).mean()),
        "density_histogram": {"log10_edges": HIST_EDGES.round(2).tolist(), "counts": [int(c) for c in hist],
                              "dead": int((density == 0).sum())},
        "_mean": mean.float(),
    }


def rows_without_bos(store, hook: str, batch_size: int, n: int):
    """The first ``n`` rows in order; in a store extracted with keep_bos the BOS rows (each context's first
    row) are dropped, so BOS's huge norm never enters the metrics."""
    keep_bos = bool(store.meta.get("config", {}).get("keep_bos", False))
    if not keep_bos:
        yield from store.iter_rows(hook, batch_size, stop=n)
        return
    ctx = store.context_ids()[:n]
    first = np.r_[True, ctx[1:] != ctx[:-1]]
    for a, x in zip(range(0, n, batch_size), store.iter_rows(hook, batch_size, stop=n)):
        yield x[torch.from_numpy(~first[a:a + len(x)])]


def store_contexts(store, n_contexts: int, bos_id: int | None) -> list[list[int]]:
    """Rebuild the first ``n_contexts`` contexts of a store: BOS + the context's stored tokens in row order."""
    ctx = store.context_ids()
    tok = store.token_ids()
    if len(ctx) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
    ends = np.r_[starts[1:], len(ctx)]
    keep_bos = bool(store.meta.get("config", {}).get("keep_bos", False))
    out = []
    for a, b in zip(starts[:n_contexts], ends[:n_contexts]):
        ids = tok[a:b].astype(np.int64).tolist()
        if not keep_bos and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        out.append(ids)
    return out


def replacing(fn, skip: int):
    """A hook edit that puts ``fn(activation)`` (in float32) in place of the activation at every position from
    ``skip`` on (skip 1 leaves the BOS position, whose activation an SAE never saw, as it is)."""
    def hook_fn(a):
        a = a.clone()
        a[:, skip:] = fn(a[:, skip:].float()).to(a.dtype)
        return a
    return hook_fn


def model_of_store(store, lm=None, device: str = "cpu"):
    """The LoadedModel a store was extracted from: ``lm`` checked against the store's fingerprint, or loaded."""
    if lm is None:
        from monoscope.models import load_model

        lm = load_model(store.model, device=device)
    if lm.fingerprint != store.model_fingerprint:
        raise MonoscopeError(f"the model given ({lm.name}, fingerprint {lm.fingerprint}) is not the one the "
                             f"store was extracted from ({store.model}, fingerprint {store.model_fingerprint}); "
                             f"pass that model or omit lm to load it")
    return lm


@torch.no_grad()
def spliced_lm_metrics(sae, model, hook: str, contexts: list[list[int]], mean_act: torch.Tensor,
                       bos_id: int | None, batch_size: int = 4, show_progress=None) -> dict:
    """CE and KL of the LM with the activation at ``hook`` replaced by: the SAE output, zeros, the mean."""
    from monoscope.hookpoints import edit

    device = next(model.parameters()).device
    sums = {k: 0.0 for k in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean")}
    n_pred = 0
    by_len: dict[int, list[list[int]]] = {}
    for c in contexts:
        if len(c) >= 3:  # need at least one prediction after the BOS position
            by_len.setdefault(len(c), []).append(c)
    if not by_len:
        raise MonoscopeError("no context has two tokens after BOS; extract longer contexts to measure LM loss")
    bar = progress_bar(total=sum(len(v) for v in by_len.values()), unit="ctx", desc="spliced LM",
                       enable=show_progress)
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i:i + batch_size], dtype=torch.long, device=device)
            skip = 1 if bos_id is not None and bool((ids[:, 0] == bos_id).all()) else 0

            def logprobs():
                logits = model(input_ids=ids, use_cache=False).logits
                return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)  # predictions after BOS

            target = ids[:, 2:]
            clean = logprobs()
            sums["ce_clean"] += -clean.gather(-1, target[..., None]).sum().item()
            variants = {
                "sae": lambda t: sae(t.reshape(-1, t.shape[-1])).reshape(t.shape),
                "zero": torch.zeros_like,
                "mean": lambda t: mean_act.to(t.device, t.dtype).expand_as(t),
            }
            p_clean = clean.exp()
            for name, fn in variants.items():
                with edit(model, hook, replacing(fn, skip)):
                    lp = logprobs()
                sums[f"ce_{name}"] += -lp.gather(-1, target[..., None]).sum().item()
                sums[f"kl_{name}"] += (p_clean * (clean - lp)).sum().item()
                del lp
            n_pred += target.numel()
            bar.update(ids.shape[0])
    bar.close()
    r = {k: v / n_pred for k, v in sums.items()}

    def ratio(a: float, b: float) -> float:
        return a / b if b != 0 else float("nan")

    r["lm_tokens"] = n_pred
    r["lm_contexts"] = len(contexts)
    r["delta_loss"] = r["ce_sae"] - r["ce_clean"]
    r["ce_loss_recovered"] = ratio(r["ce_zero"] - r["ce_sae"], r["ce_zero"] - r["ce_clean"])
    r["ce_loss_recovered_mean_ablation"] = ratio(r["ce_mean"] - r["ce_sae"], r["ce_mean"] - r["ce_clean"])
    r["kl_score"] = ratio(r["kl_zero"] - r["kl_sae"], r["kl_zero"])
    return r


def evaluate_sae(sae_or_folder, store_folder, lm=None, max_tokens: int = 200_000, lm_contexts: int = 64,
                 batch_size: int = 2048, *, hook: str | None = None, lm_batch_size: int = 4, device: str = "cpu",
                 out: str | Path | None = None, show_progress: bool | None = None) -> dict:
    """Every reconstruction, sparsity and spliced-LM metric of an SAE on a store, saved as ``eval.json``.

    The SAE must fit the store (model, hook, width) and the store's activations must be finite; a failed
    evaluation writes nothing, so a good eval.json is never replaced by NaNs. ``lm``: a LoadedModel for the spliced-LM metrics (default: load the store's model when
    ``lm_contexts`` > 0). ``lm_contexts=0`` skips the LM. ``out``: where eval.json goes (default: the SAE
    folder when a folder was given; nothing is written for an in-memory SAE without ``out``).
    """
    from monoscope.store import ActivationStore

    started = time.perf_counter()
    sae, folder = _load(sae_or_folder)
    store = ActivationStore(store_folder)
    hook = check_sae_fits(sae, model_name=store.model, hook=hook, hooks=store.hooks)
    if max_tokens < 1 or batch_size < 1 or lm_contexts < 0:
        raise MonoscopeError("max_tokens and batch_size must be positive and lm_contexts non-negative")
    store.check_finite(hook)
    sae = sae.to(device).eval()
    n = min(max_tokens, store.num_rows)
    result = reconstruction_metrics(sae, rows_without_bos(store, hook, batch_size, n), sae.cfg.d_sae, device,
                                    show_progress, total=n)
    mean_act = result.pop("_mean")

    if lm_contexts > 0:
        lm = model_of_store(store, lm, device)
        contexts = store_contexts(store, lm_contexts, lm.bos_token_id)
        result.update(spliced_lm_metrics(sae, lm.model, hook, contexts, mean_act, lm.bos_token_id,
                                         lm_batch_size, show_progress))

    result = _checked(result, str(folder) if folder else "the SAE")
    if result["fvu"] is not None:
        warn_if_implausible(result["fvu"], result["l0"], sae.cfg.d_sae, f"hook {hook!r} of the store {store_folder}")
    target = Path(out) if out is not None else (folder / EVAL_FILE if folder else None)
    if target is not None and (target.is_dir() or target.suffix != ".json"):
        target = target / EVAL_FILE
    here = (target.parent if target is not None else Path.cwd()).resolve()  # paths are relative to eval.json
    result.update({
        "hook": hook, "model": store.model, "store": os.path.relpath(Path(store_folder).resolve(), here),
        "store_input_hash": store.meta.get("input_hash"), "store_identity": store.content_hash(),
        "sae": os.path.relpath(folder.resolve(), here) if folder else None,
        "architecture": getattr(sae, "architecture", None),
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "seconds": round(time.perf_counter() - started, 2),
        "library_versions": library_versions(), "evaluated": now_iso(),
    })
    if target is not None:
        write_json(target, result)
    return result


def format_metrics(m: dict) -> str:
    keys = ["tokens", "mse", "explained_variance", "fvu", "cosine", "norm_ratio", "relative_reconstruction_bias",
            "l0", "l1", "dead_fraction", "dense_fraction_1pct", "dense_fraction_10pct", "ce_clean", "ce_sae",
            "ce_zero", "ce_mean", "delta_loss", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_sae",
            "kl_zero", "kl_score"]
    lines = []
    for k in keys:
        if k in m:
            v = m[k]
            text = "undefined" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.6g}"
            lines.append(f"{k:<32} {text}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    """Flags of ``monoscope evaluate`` (the SAE folder is its one positional argument); the keyword arguments
    of ``evaluate_sae``."""
    store: str = field(metadata={"help": "activation store to evaluate on (ideally held-out text)"})
    hook: str | None = field(default=None, metadata={"help": "hook in the store (default: the SAE's hook)"})
    max_tokens: int = field(default=200_000, metadata={"help": "activation rows used"})
    lm_contexts: int = field(default=64, metadata={"help": "contexts for the spliced-LM loss; 0 skips the LM"})
    batch_size: int = field(default=2048, metadata={"help": "rows per SAE batch"})
    lm_batch_size: int = field(default=4, metadata={"help": "contexts per LM forward"})
    device: str = field(default="cpu", metadata={"help": "torch device"})


def setup_evaluate(p: argparse.ArgumentParser):
    """`monoscope evaluate SAE --store DIR`: print the metrics and save them as SAE/eval.json."""
    p.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    add_arguments(p, EvalConfig)

    def run(ns):
        options = to_dict(from_namespace(EvalConfig, ns))
        m = evaluate_sae(ns.sae, options.pop("store"), **options)
        print(format_metrics(m))
        print(f"saved {Path(ns.sae) / EVAL_FILE}")
    return run
