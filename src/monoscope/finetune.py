"""KL fine-tuning: make a trained SAE one the language model can run on.

An SAE trained only to reconstruct its hook can still wreck the model's predictions when spliced in (the
default run's TopK SAE: CE loss recovered ≈ 0.76, delta LM loss ≈ 3.5 nats), because reconstruction error
in directions the later layers read costs far more than error elsewhere. Here the SAE is spliced in at its
hook and trained further on

    loss = KL(p_clean ‖ p_spliced)  +  mse_coefficient · FVU at the hook

averaged over next-token predictions, as in end-to-end SAE training (Braun et al. 2024, "Identifying
Functionally Important Features with End-to-End Sparse Dictionary Learning", whose e2e+ds variant adds
the reconstruction term; EleutherAI sparsify trains on the same KL). The model's weights are frozen and
the SAE's sparsity rule is untouched (TopK keeps k, thresholds stay as trained), so L0 stays where
training put it. The contexts come from the store's own token ids (the training text); evaluate on a
held-out store.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monoscope.artifacts import now_iso, write_json
from monoscope.config import add_arguments, from_namespace, to_dict
from monoscope.errors import MonoscopeError
from monoscope.evaluate import _load, model_of_store, replacing, store_contexts
from monoscope.progress import progress_bar
from monoscope.selfcheck import sae_for_store
from monoscope.train import lr_at

LOG_FILE = "finetune.json"


@dataclass
class FinetuneConfig:
    """Flags of ``monoscope finetune`` (the SAE folder is its positional argument)."""

    store: str = field(metadata={"help": "activation store whose contexts (its token ids) the SAE is tuned on"})
    out: str = field(metadata={"help": "folder for the fine-tuned SAE (must not be the input SAE's folder)"})
    tokens: int = field(default=32_768, metadata={"help": "next-token predictions to tune on"})
    lm_batch_size: int = field(default=4, metadata={"help": "contexts per step"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate (constant after a 10%% warm-up, "
                                                      "linear decay over the last 20%%)"})
    mse_coefficient: float = field(default=1.0, metadata={"help": "weight of the hook's FVU beside the KL "
                                                                  "(0: KL only)"})
    seed: int = field(default=0, metadata={"help": "seed of the context order"})
    device: str = field(default="cpu", metadata={"help": "torch device"})


def _check(cfg: FinetuneConfig) -> None:
    if cfg.tokens < 1 or cfg.lm_batch_size < 1:
        raise MonoscopeError("tokens and lm_batch_size must be positive")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise MonoscopeError(f"lr must be a positive number, got {cfg.lr}")
    if not (cfg.mse_coefficient >= 0 and math.isfinite(cfg.mse_coefficient)):
        raise MonoscopeError(f"mse_coefficient must be ≥ 0, got {cfg.mse_coefficient}")


def _batches(contexts: list[list[int]], cfg: FinetuneConfig) -> list[list[list[int]]]:
    """Equal-length groups of ``lm_batch_size`` contexts in a seeded order, until ``tokens`` predictions."""
    by_len: dict[int, list[list[int]]] = {}
    for c in contexts:
        if len(c) >= 3:
            by_len.setdefault(len(c), []).append(c)
    groups = [g[i:i + cfg.lm_batch_size] for g in by_len.values() for i in range(0, len(g), cfg.lm_batch_size)]
    random.Random(cfg.seed).shuffle(groups)
    out, n = [], 0
    while n < cfg.tokens and groups:
        for g in groups:
            out.append(g)
            n += sum(len(c) - 2 for c in g)
            if n >= cfg.tokens:
                break
    return out


def kl_step(sae, model, hook: str, ids: torch.Tensor, skip: int, mse_coefficient: float) -> dict[str, torch.Tensor]:
    """One step's loss terms: the KL of the spliced model's next-token distribution from the clean one (mean
    over predictions after BOS) and the FVU of the SAE at the hook, both with gradients into the SAE only."""
    from monoscope.hookpoints import edit

    seen: list[torch.Tensor] = []

    def splice(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        x_hat = sae(flat)
        seen.append(torch.stack([((flat - x_hat) ** 2).sum(), ((flat - flat.mean(0)) ** 2).sum()]))
        return x_hat.reshape(t.shape)

    with torch.no_grad():
        clean = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, 1:-1].float(), dim=-1)
    with edit(model, hook, replacing(splice, skip)):
        spliced = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, 1:-1].float(), dim=-1)
    kl = (clean.exp() * (clean - spliced)).sum(-1).mean()
    err, var = seen[0]
    fvu = err / var.clamp_min(1e-12)
    return {"loss": kl + mse_coefficient * fvu, "kl": kl.detach(), "fvu": fvu.detach()}


def finetune_sae(sae_or_folder, cfg: FinetuneConfig, lm=None, show_progress: bool | None = None) -> Path:
    """Fine-tune an SAE (object or folder) on the KL of the model it is spliced into; save it to ``cfg.out``
    (cfg.json + weights + finetune.json with the loss curve) and return that folder."""
    from monoscope.sae.io import save_sae
    from monoscope.store import ActivationStore

    _check(cfg)
    sae, folder = _load(sae_or_folder)
    out = Path(cfg.out)
    if folder is not None and out.resolve() == folder.resolve():
        raise MonoscopeError(f"--out {out} is the SAE's own folder; give a new folder for the fine-tuned SAE")
    if out.exists() and any(out.iterdir()):
        raise MonoscopeError(f"--out {out} exists and is not empty; give a new folder or delete it")
    store = ActivationStore(cfg.store)
    hook = sae_for_store(sae, store)
    lm = model_of_store(store, lm, cfg.device)
    n_ctx = math.ceil(cfg.tokens / max(1, store.meta.get("config", {}).get("context_length", 128) - 2))
    batches = _batches(store_contexts(store, n_ctx, lm.bos_token_id), cfg)
    if not batches:
        raise MonoscopeError(f"the store {cfg.store} has no context of two tokens after BOS to tune on")
    sae = sae.to(cfg.device).train()
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    for p in trainable:  # the model is frozen while it runs (and given back as it came)
        p.requires_grad_(False)
    try:
        curve = _tune(sae, lm, hook, batches, cfg, show_progress)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    sae.eval()
    meta = {"finetune": {"config": to_dict(cfg), "from": str(folder) if folder else None,
                         "store_identity": store.content_hash(), "finished": now_iso()}}
    save_sae(sae, out, extra_metadata=meta)  # the folder appears whole
    write_json(out / LOG_FILE, {**meta["finetune"], "curve": curve})
    return out


def _tune(sae, lm, hook: str, batches: list, cfg: FinetuneConfig, show_progress) -> list[dict]:
    """The optimisation loop; returns the loss curve (every step's KL and FVU)."""
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999))
    bar = progress_bar(total=len(batches), unit="step", desc="KL fine-tune", enable=show_progress)
    curve, started = [], time.perf_counter()
    for step, group in enumerate(batches):
        ids = torch.tensor(group, dtype=torch.long, device=cfg.device)
        skip = 1 if lm.bos_token_id is not None and bool((ids[:, 0] == lm.bos_token_id).all()) else 0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, len(batches), cfg.lr, max(1, len(batches) // 10), 0.2)
        terms = kl_step(sae, lm.model, hook, ids, skip, cfg.mse_coefficient)
        if not torch.isfinite(terms["loss"]):
            raise MonoscopeError(f"the fine-tune's loss became non-finite at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sae.before_step()
        opt.step()
        sae.after_step()
        curve.append({"step": step, "kl": round(terms["kl"].item(), 5), "fvu": round(terms["fvu"].item(), 5),
                      "seconds": round(time.perf_counter() - started, 1)})
        bar.update(1)
        bar.set_postfix(kl=f"{curve[-1]['kl']:.3f}", fvu=f"{curve[-1]['fvu']:.3f}")
    bar.close()
    return curve


def setup_finetune(p: argparse.ArgumentParser):
    """`monoscope finetune SAE --store DIR --out DIR`: KL fine-tune, then save the SAE to --out."""
    p.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    add_arguments(p, FinetuneConfig)

    def run(ns):
        out = finetune_sae(ns.sae, from_namespace(FinetuneConfig, ns))
        print(f"saved {out}; evaluate it with `monoscope evaluate {out} --store VALIDATION_STORE`")
    return run
