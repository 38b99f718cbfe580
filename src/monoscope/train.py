"""Train a sparse autoencoder on an activation store.

One loop for every architecture in ``monoscope.sae.REGISTRY``: the SAE computes its own loss
(``training_forward``), the trainer owns everything around it:

- data: shuffled batches streamed from the store, epoch after epoch, scaled by a constant s so that
  E‖s·x‖² = d (estimated on a sample and folded into the saved weights);
- optimisation: Adam, linear lr warm-up, linear decay to 0 over the last ``lr_decay_fraction`` of the
  steps, a linear warm-up of the sparsity coefficient, gradient clipping, unit-norm decoder handling via
  the SAE's ``before_step`` / ``after_step``;
- dead latents: tokens since each latent last fired, turned into the ``dead_mask`` AuxK needs;
- checkpoints: every ``checkpoint_every`` steps (weights, Adam state, step, dead counters, RNG state) in
  safetensors + JSON, written atomically. The data position is a pure function of the step
  (epoch = step // batches_per_epoch, start_batch = step % batches_per_epoch), so a run killed at any
  moment and started again ends with exactly the weights of an uninterrupted run;
- several processes: under ``torchrun`` (WORLD_SIZE > 1) every rank reads its own disjoint part of each
  epoch (global batch / world size rows per step) and gradients are averaged with one all-reduce, which
  is the whole of what DistributedDataParallel would do here. Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from monoscope.artifacts import atomic_path, fsync_dir, library_versions, now_iso, read_json, write_json
from monoscope.config import config_hash, to_dict
from monoscope.errors import MonoscopeError
from monoscope.progress import progress_bar

CHECKPOINT_DIR = "checkpoint"
SIDECAR = "train.json"
METRICS = "metrics.csv"
# Default optimiser settings. At 65k-1M activations an SAE is short of optimiser steps: on Gemma 3 270M layer 6
# (TopK 4,096, k 32) batch 512 and lr 1e-3 reach CE loss recovered 0.94 (65k rows x 3) and 0.98 (1M rows once),
# where batch 2048 with the 2e-4/sqrt(m/2^14) rule of Gao et al. (2024) gives 0.76 and 0.94 (docs/benchmarks.md).
DEFAULT_BATCH_SIZE = 512
DEFAULT_LR = 1e-3
# Settings that change how a run is watched or where it runs, never its result.
_NOT_HASHED = ("device", "log_every", "checkpoint_every")
# Bump when a code change makes the same settings and data give other weights, so that no cache, sweep folder
# or checkpoint serves an SAE of the old code. 2: JumpReLU's dead-threshold decay, the synthetic sampler's
# geometric-gap thinning. 3: JumpReLU trains on the sparse entries above max(θ − ε/2, 0) (its threshold no
# longer learns from tokens where z ≤ 0).
RECIPE_VERSION = 3


@dataclass
class TrainConfig:
    """How to train one SAE. Sparsity settings left at None take the architecture's defaults."""

    architecture: str = field(default="topk", metadata={"help": "SAE architecture: topk, batchtopk, jumprelu, "
                                                                 "relu, gated, matryoshka (see monoscope.sae)"})
    d_sae: int | None = field(default=None, metadata={"help": "number of latents; unset: expansion_factor * d"})
    expansion_factor: int = field(default=16, metadata={"help": "latents per input dimension when d_sae is not given"})
    k: int = field(default=32, metadata={"help": "active latents per token (topk, batchtopk, matryoshka)"})
    l1_coefficient: float | None = field(default=None, metadata={"help": "L1 penalty weight (relu, gated)"})
    l0_coefficient: float | None = field(default=None, metadata={"help": "L0 penalty weight (jumprelu)"})
    target_l0: float | None = field(default=None, metadata={"help": "jumprelu: aim the L0 penalty at this L0"})
    aux_k: int | None = field(default=None, metadata={"help": "dead latents used by the AuxK loss; unset: d/2"})
    aux_coefficient: float | None = field(default=None, metadata={"help": "weight of the AuxK loss; unset: 1/32"})
    matryoshka_widths: tuple[int, ...] = field(default=(), metadata={"help": "nested prefix widths (matryoshka)"})
    lr: float | None = field(default=DEFAULT_LR, metadata={"help": "Adam learning rate (None in the API: the "
                                                                    "2e-4/sqrt(d_sae/2^14) rule of Gao et al. 2024)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    lr_decay_fraction: float = field(default=0.2, metadata={"help": "final share of steps with linear lr decay to 0"})
    sparsity_warmup_fraction: float = field(default=0.05, metadata={"help": "share of steps over which the "
                                                                             "sparsity coefficient ramps up"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "tokens per step (global, over all "
                                                                           "processes)"})
    tokens: int | None = field(default=None, metadata={"help": "training tokens; unset: one pass over the store"})
    steps: int | None = field(default=None, metadata={"help": "training steps (instead of --tokens)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the data order"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between resumable checkpoints (0: none)"})
    dead_window_tokens: int | None = field(default=None, metadata={
        "help": "a latent is dead after this many tokens without firing; unset: min(10M, tokens/10)"})
    log_every: int = field(default=50, metadata={"help": "steps between rows of metrics.csv"})
    hook: str | None = field(default=None, metadata={"help": "hook to train on; unset: the store's only hook"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    normalize: bool = field(default=True, metadata={"help": "scale inputs so E|s x|^2 = d; s is folded into "
                                                            "the saved weights"})
    shuffle_buffer_rows: int = field(default=262144, metadata={"help": "rows in the shuffle buffer"})
    sample_rows: int = field(default=16384, metadata={"help": "rows sampled for the input scale and b_dec init"})


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(rank, world, local, owns)


def default_lr(d_sae: int) -> float:
    """Adam lr rule of thumb from Gao et al. (2024): 2e-4 scaled by 1/sqrt(m / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2 ** 14)


def lr_at(step: int, total: int, base: float, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``decay_fraction`` of the steps."""
    scale = 1.0
    if warmup > 0 and step < warmup:
        scale = (step + 1) / warmup
    decay_steps = int(total * decay_fraction)
    if decay_steps > 0 and step >= total - decay_steps:
        scale = min(scale, (total - step) / decay_steps)
    return base * scale


def sparsity_scale_at(step: int, total: int, fraction: float) -> float:
    warm = int(total * fraction)
    return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)


def run_hash(cfg: TrainConfig, store_identity: str) -> str:
    """Identity of a run's result: every setting that changes the weights, the training data, and the version
    of the code that turns them into weights (RECIPE_VERSION)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_HASHED}
    return config_hash(settings, store_identity, RECIPE_VERSION)


def _sae_config(cfg: TrainConfig, d_in: int, d_sae: int, hook: str, model: str, dead_window: int | None = None):
    """Build the SAE's config, passing only the settings the user gave (None keeps the SAE default)."""
    from monoscope.sae import SAEConfig

    wanted: dict[str, Any] = dict(architecture=cfg.architecture, d_in=d_in, d_sae=d_sae, k=cfg.k,
                                  l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient,
                                  target_l0=cfg.target_l0, aux_k=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
                                  matryoshka_widths=tuple(cfg.matryoshka_widths) or None,
                                  hook_name=hook, model_name=model, dead_tokens_threshold=dead_window)
    names = {f.name for f in dataclasses.fields(SAEConfig)}
    return SAEConfig(**{k: v for k, v in wanted.items() if v is not None and k in names})


def check_config(cfg: TrainConfig, d_in: int, hook: str, model: str, world: int = 1) -> int:
    """Every setting of a run on d_in-wide activations, checked before any work; returns d_sae."""
    d_sae = cfg.d_sae if cfg.d_sae is not None else cfg.expansion_factor * d_in
    check_settings(cfg, d_sae, world)
    _sae_config(cfg, d_in, d_sae, hook, model).validate()  # architecture settings
    return d_sae


def check_settings(cfg: TrainConfig, d_sae: int, world: int = 1) -> None:
    """The trainer's own settings; the SAE's (architecture, k, coefficients...) are checked by its class.
    Needs no store or model, so ``monoscope run`` calls it before any work."""
    if d_sae < 1 or cfg.expansion_factor < 1:
        raise MonoscopeError(f"d_sae must be a positive number of latents, got {d_sae}")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise MonoscopeError(f"batch_size {cfg.batch_size} must be a positive multiple of the number of "
                             f"processes ({world}); each process takes batch_size / {world} rows per step")
    for name in ("tokens", "steps"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise MonoscopeError(f"{name} must be positive, got {v}")
    if cfg.tokens is not None and cfg.steps is not None and math.ceil(cfg.tokens / cfg.batch_size) != cfg.steps:
        raise MonoscopeError(f"give either --tokens or --steps, not both (tokens={cfg.tokens} is "
                             f"{math.ceil(cfg.tokens / cfg.batch_size)} steps at batch {cfg.batch_size}, steps={cfg.steps})")
    if not 0 <= cfg.lr_decay_fraction <= 1 or not 0 <= cfg.sparsity_warmup_fraction <= 1:
        raise MonoscopeError("lr_decay_fraction and sparsity_warmup_fraction must lie in [0, 1]")
    if cfg.lr is not None and not cfg.lr > 0:  # NaN too
        raise MonoscopeError(f"lr must be positive (or unset for the default rule), got {cfg.lr}")


def input_scale(sample: torch.Tensor) -> float:
    """s with E‖s·x‖² = d on the sample."""
    mean_sq = sample.double().pow(2).sum(1).mean().item()
    if not mean_sq > 0:
        raise MonoscopeError("the activations are all zero; nothing to train an SAE on (check the hook)")
    return math.sqrt(sample.shape[1] / mean_sq)


# ------------------------------------------------------------------------------------------ checkpoints

def _save_checkpoint(out: Path, step: int, sae, opt, since_fired: torch.Tensor, state: dict) -> None:
    """Tensors to a new safetensors file, then the JSON that points at it (the commit), then clean up."""
    from safetensors.torch import save_file

    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in sae.state_dict().items()}
    opt_sd = opt.state_dict()
    for i, st in opt_sd["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["dead.tokens_since_fired"] = since_fired
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    name = f"state_{step:09d}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / "checkpoint.json", {**state, "step": step, "file": name,
                                            "param_groups": opt_sd["param_groups"], "saved": now_iso()})
    for old in folder.glob("state_*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(out: Path, want_hash: str, sae, opt, device) -> tuple[dict, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = out / CHECKPOINT_DIR / "checkpoint.json"
    if not path.exists():
        return None
    state = read_json(path)
    if state.get("run_hash") != want_hash:
        raise MonoscopeError(f"{out} holds a checkpoint of a run with other settings or other data "
                             f"(hash {state.get('run_hash')} vs {want_hash}); resume with the same config and "
                             f"store, or choose a new output folder (or delete {out / CHECKPOINT_DIR})")
    tensors = load_file(str(out / CHECKPOINT_DIR / state["file"]), device="cpu")
    sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return state, tensors["dead.tokens_since_fired"].to(device)


# ---------------------------------------------------------------------------------------------- metrics

class _MetricsLog:
    """metrics.csv, appended row by row; on resume rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.columns = path, None
        if resume_step is None or not path.exists():
            path.unlink(missing_ok=True)
            return
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows = [r for r in rows if int(r["step"]) <= resume_step]
        if rows:
            self.columns = list(rows[0])
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            if rows:
                w = csv.DictWriter(fh, self.columns)
                w.writeheader()
                w.writerows(rows)

    def write(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


# ---------------------------------------------------------------------------------------------- training

def train_sae(cfg: TrainConfig, store_folder: str | Path, out_folder: str | Path,
              show_progress: bool | None = None,
              callback: Callable[[int, dict], None] | None = None) -> Path:
    """Train an SAE on ``store_folder`` (an activation store, or ``synth:NAME`` / ``synth:FOLDER`` for a
    synthetic model's endless stream, see monoscope.synth) into ``out_folder`` (resuming a checkpoint there); return the folder.

    A folder already holding a finished run with the same settings and data is returned untouched.
    ``callback(step, info)`` runs on rank 0 after every step (custom logging; raising stops the run).
    """
    from monoscope.synth.source import open_source

    started = time.perf_counter()
    out = Path(out_folder)
    dist_ = _init_distributed(cfg.device)
    try:
        store = open_source(store_folder)
        plan = _plan(cfg, store, dist_.world)
        if _already_trained(out, plan.run_hash):
            return out
        store.check_finite(plan.hook)  # NaN/inf anywhere (names shard and row), before any work
        device = torch.device(f"cuda:{dist_.local_rank}" if cfg.device == "cuda" and dist_.world > 1 else cfg.device)
        run = _start(cfg, plan, store, out, device)
        log = None
        if dist_.main:
            out.mkdir(parents=True, exist_ok=True)
            log = _MetricsLog(out / METRICS, run.step if run.resumed else None)
        bar = progress_bar(total=plan.total_steps * cfg.batch_size, initial=run.step * cfg.batch_size, unit="tok",
                           desc=f"train {cfg.architecture} {plan.hook}", enable=show_progress if dist_.main else False)
        final, loop_seconds = _loop(cfg, plan, run, store, dist_, out, log, bar, callback, started)
        bar.close()
        if dist_.world > 1:
            _check_replicas_agree(run.sae)
        if dist_.main:
            _finish(cfg, plan, run, store, out, final, loop_seconds, time.perf_counter() - started)
        if dist_.world > 1:
            torch.distributed.barrier()
        return out
    finally:
        if dist_.owns_group:
            torch.distributed.destroy_process_group()


@dataclass
class _Plan:
    """What a training run will do, fixed before any work: the data, the sizes and the run's identity."""
    hook: str
    d: int
    d_sae: int
    world: int
    per_rank: int  # rows per step on each process
    batches_per_epoch: int
    total_steps: int
    dead_window: int
    identity: str
    run_hash: str


def _plan(cfg: TrainConfig, store, world: int) -> _Plan:
    """Check every setting against the store and work out the run's sizes; raise before any work."""
    hook = store.hook(cfg.hook)
    d = store.d(hook)
    d_sae = check_config(cfg, d, hook, store.model, world)
    per_rank = cfg.batch_size // world
    batches_per_epoch = (store.num_rows // world) // per_rank
    if batches_per_epoch < 1:
        raise MonoscopeError(f"the store has {store.num_rows} rows, fewer than one batch of {cfg.batch_size}; "
                             f"lower --batch-size or extract more tokens")
    total_steps = cfg.steps or math.ceil((cfg.tokens or batches_per_epoch * cfg.batch_size) / cfg.batch_size)
    dead_window = cfg.dead_window_tokens or max(cfg.batch_size, min(10_000_000, total_steps * cfg.batch_size // 10))
    identity = store.content_hash()
    return _Plan(hook, d, d_sae, world, per_rank, batches_per_epoch, total_steps, dead_window, identity,
                 run_hash(cfg, identity))


def _already_trained(out: Path, rhash: str) -> bool:
    """``out`` holds a finished run of this hash (True), nothing finished (False), or another run (error)."""
    if out.exists() and not out.is_dir():
        raise MonoscopeError(f"{out} is a file; the SAE output must be a folder")
    if not (out / SIDECAR).exists():
        return False
    if read_json(out / SIDECAR).get("run_hash") == rhash:
        return True
    raise MonoscopeError(f"{out} already holds an SAE trained with other settings or data; choose a new "
                         f"output folder or delete it")


@dataclass
class _Run:
    """The state a training run carries from step to step (what a checkpoint saves)."""
    sae: Any
    sae_cfg: Any
    opt: torch.optim.Optimizer
    params: list
    since_fired: torch.Tensor  # tokens since each latent last fired
    step: int
    scale: float
    lr: float
    resumed: bool
    first_step: int


def _start(cfg: TrainConfig, plan: _Plan, store, out: Path, device) -> _Run:
    """A fresh SAE initialised from a data sample, or the checkpoint in ``out`` when there is one."""
    from monoscope.sae import build_sae

    sample = store.sample_rows(plan.hook, cfg.sample_rows, cfg.seed)
    scale = input_scale(sample) if cfg.normalize else 1.0
    torch.manual_seed(cfg.seed)
    sae_cfg = _sae_config(cfg, plan.d, plan.d_sae, plan.hook, store.model, plan.dead_window)
    sae = build_sae(sae_cfg)
    sae.init_from_data(sample * scale)
    sae.to(device)
    lr = cfg.lr or default_lr(plan.d_sae)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    since_fired = torch.zeros(plan.d_sae, dtype=torch.long, device=device)
    step = 0
    resumed = _load_checkpoint(out, plan.run_hash, sae, opt, device)
    if resumed is not None:
        state, since_fired = resumed
        step = int(state["step"])
        if abs(state["scale"] - scale) > 1e-12 * max(1.0, scale):
            raise MonoscopeError(f"the checkpoint in {out} was made with input scale {state['scale']}, "
                                 f"this run computes {scale}; the store changed: start a new output folder")
    return _Run(sae, sae_cfg, opt, params, since_fired, step, scale, lr, resumed is not None, step)


def _loop(cfg: TrainConfig, plan: _Plan, run: _Run, store, dist_: _Dist, out: Path, log, bar, callback,
          started: float) -> tuple[dict[str, float], float]:
    """Train from ``run.step`` to the last step; return the last logged metrics and the loop's seconds."""
    state_json = {"run_hash": plan.run_hash, "scale": run.scale, "total_steps": plan.total_steps,
                  "config": to_dict(cfg), "world_size": dist_.world}
    window: dict[str, torch.Tensor] = {}
    window_steps = 0
    loop_started = time.perf_counter()
    final: dict[str, float] = {}
    device = run.since_fired.device
    while run.step < plan.total_steps:
        epoch, start_batch = divmod(run.step, plan.batches_per_epoch)
        stream = store.batches(plan.hook, plan.per_rank, shuffle=True, seed=cfg.seed, epoch=epoch,
                               buffer_rows=max(cfg.shuffle_buffer_rows, plan.per_rank), rank=dist_.rank,
                               world_size=dist_.world, drop_last=True, start_batch=start_batch, device=device)
        for x in stream:
            x = x * run.scale if run.scale != 1.0 else x
            res = _step(cfg, plan, run, x)
            with torch.no_grad():
                _accumulate(window, x, res)
            window_steps += 1
            bar.update(cfg.batch_size)
            if run.step % cfg.log_every == 0 or run.step == plan.total_steps:
                row = _summarise(window, window_steps, dist_.world)
                row.update(step=run.step, tokens=run.step * cfg.batch_size, lr=run.opt.param_groups[0]["lr"],
                           dead_fraction=(run.since_fired >= plan.dead_window).float().mean().item(),
                           elapsed_s=round(time.perf_counter() - started, 3),
                           tokens_per_s=round((run.step - run.first_step) * cfg.batch_size
                                              / max(1e-9, time.perf_counter() - loop_started), 1))
                window, window_steps, final = {}, 0, row
                if dist_.main:
                    log.write({k: row[k] for k in ("step", "tokens", "lr")} | row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", L0=f"{row['l0']:.1f}", FVU=f"{row['fvu']:.3f}",
                                    dead=f"{row['dead_fraction']:.1%}", refresh=False)
            if dist_.main and callback is not None:
                callback(run.step, {"loss": res.loss.item()})
            if dist_.main and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 \
                    and run.step < plan.total_steps:
                _save_checkpoint(out, run.step, run.sae, run.opt, run.since_fired, state_json)
            if run.step >= plan.total_steps:
                break
    return final, time.perf_counter() - loop_started


def _step(cfg: TrainConfig, plan: _Plan, run: _Run, x: torch.Tensor):
    """One optimiser step on the scaled batch ``x``; returns the SAE's training output."""
    run.sae.train()
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, plan.total_steps, run.lr, cfg.lr_warmup_steps, cfg.lr_decay_fraction)
    res = run.sae.training_forward(x, dead_mask=run.since_fired >= plan.dead_window,
                                   sparsity_scale=sparsity_scale_at(run.step, plan.total_steps,
                                                                    cfg.sparsity_warmup_fraction))
    run.opt.zero_grad(set_to_none=True)
    res.loss.backward()
    fired = res.fired
    if plan.world > 1:
        fired = _sync(run.params, fired, run.sae, plan.world)
    run.sae.before_step()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.opt.step()
    run.sae.after_step()
    with torch.no_grad():
        run.since_fired += cfg.batch_size
        run.since_fired[fired.to(run.since_fired.device)] = 0
    run.step += 1
    return res


def _finish(cfg: TrainConfig, plan: _Plan, run: _Run, store, out: Path, final: dict,
            loop_seconds: float, seconds: float) -> None:
    """Calibrate inference on a fresh sample, fold the input scale into the weights, save the SAE and
    train.json, and drop the checkpoint."""
    run.sae.eval()
    run.sae.calibrate(store.sample_rows(plan.hook, cfg.sample_rows, cfg.seed + 1).to(run.since_fired.device) * run.scale)
    run.sae.fold_input_scale(run.scale)
    _save_into(run.sae.to("cpu"), out, {"trained_by": "monoscope", "run_hash": plan.run_hash,
                                        "input_scale": run.scale})
    trained = plan.total_steps - run.first_step
    write_json(out / SIDECAR, {
        "kind": "sae", "run_hash": plan.run_hash, "config": to_dict(cfg), "sae_config": to_dict(run.sae_cfg),
        "store": {**store.provenance(out), "identity": plan.identity, "hook": plan.hook},
        "d_in": plan.d, "d_sae": plan.d_sae, "input_scale": run.scale, "lr": run.lr, "total_steps": plan.total_steps,
        "total_tokens": plan.total_steps * cfg.batch_size, "dead_window_tokens": plan.dead_window,
        "world_size": plan.world, "resumed_from_step": run.first_step if run.resumed else None,
        "timings": {"seconds": round(seconds, 3), "train_loop_seconds": round(loop_seconds, 3),
                    "tokens_per_s": round(trained * cfg.batch_size / max(loop_seconds, 1e-9), 1)},
        "final_metrics": final, "library_versions": library_versions(), "finished": now_iso(),
    })
    for f in (out / CHECKPOINT_DIR).glob("*"):
        f.unlink(missing_ok=True)
    if (out / CHECKPOINT_DIR).exists():
        (out / CHECKPOINT_DIR).rmdir()


def _save_into(sae, out: Path, metadata: dict) -> None:
    """save_sae replaces a whole folder, so save beside ``out`` and move the two files in (each atomically);
    metrics.csv and the checkpoint stay. train.json, written after this, marks the run finished."""
    import shutil

    from monoscope.sae.io import save_sae

    tmp = out.parent / f".{out.name}.sae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(sae, tmp, extra_metadata=metadata)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)


def _sync(params, fired: torch.Tensor, sae, world: int) -> torch.Tensor:
    """Average gradients and float buffers over ranks; OR the fired masks (one all-reduce each)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    bufs = [b for b in sae.buffers() if b.is_floating_point()]
    if bufs:  # e.g. BatchTopK's running threshold: keep the replicas identical
        flatb = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flatb)
        flatb /= world
        offset = 0
        for b in bufs:
            b.copy_(flatb[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
    f = fired.to(torch.uint8)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return f.bool()


def _check_replicas_agree(sae) -> None:
    """Every rank must end with the same weights; anything else is a bug in the gradient sync."""
    import torch.distributed as dist

    with torch.no_grad():
        c = torch.stack([p.double().sum() for p in sae.parameters()])
        lo, hi = c.clone(), c.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("SAE replicas diverged across ranks; gradient synchronisation is broken")


def _accumulate(window: dict[str, torch.Tensor], x: torch.Tensor, res) -> None:
    """Sum per-step statistics on the device; read back only when a metrics row is written."""
    sse = (x - res.x_hat).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    items = {"loss": res.loss.detach(), "l0": torch.as_tensor(res.l0, dtype=torch.float32).detach(),
             "_sse": sse, "_var": var}
    items.update({k: torch.as_tensor(v).detach().float() for k, v in (res.terms or {}).items()})
    for k, v in items.items():
        v = v.reshape(()).to(torch.float64)
        window[k] = window[k] + v if k in window else v


def _summarise(window: dict[str, torch.Tensor], n: int, world: int) -> dict[str, float]:
    keys = sorted(window)
    vals = torch.stack([window[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(vals)
    vals = vals.tolist()
    sums = dict(zip(keys, vals))
    row = {k: v / (n * world) for k, v in sums.items() if not k.startswith("_")}
    row["fvu"] = sums["_sse"] / max(sums["_var"], 1e-30) if "_sse" in sums else float("nan")
    return row


# -------------------------------------------------------------------------------------------------- CLI

def setup_train(p: argparse.ArgumentParser):
    """`monoscope train --store DIR --out DIR [flags]`."""
    from monoscope.config import add_arguments, from_namespace

    add_arguments(p, TrainConfig)
    p.add_argument("--store", required=True, help="activation store folder to train on")
    p.add_argument("--out", required=True, help="SAE folder to write (a checkpoint there is resumed)")

    def run(ns):
        out = train_sae(from_namespace(TrainConfig, ns), ns.store, ns.out)
        info = read_json(out / SIDECAR)
        m = info.get("final_metrics", {})
        print(f"SAE saved to {out}: {info['config']['architecture']} d_in {info['d_in']} d_sae {info['d_sae']}, "
              f"{info['total_tokens']:,} tokens; final L0 {m.get('l0', float('nan')):.1f}, "
              f"FVU {m.get('fvu', float('nan')):.4f}, dead {m.get('dead_fraction', float('nan')):.1%}")
    return run
