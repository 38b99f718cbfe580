"""monoscope vs SAELens training on the same synthetic batches: samples/s, and F1 / MCC at equal samples.

    python benchmarks/synth_saelens.py [--samples 1000000] [--architectures topk,batchtopk,matryoshka,jumprelu]

Both trainers read the same stream: monoscope's SynthSAEBench-16k generator, seed 0, batch after batch
(SAELens's own generator is ~20x slower, so it would measure the generator, not the trainer). SAELens
6.54 runs in its own interpreter ($MONOSCOPE_CACHE/venv-saelens, what `scripts/setup.sh dev` makes) with
its SAETrainer set up as its `train_toy_sae` sets it up (Adam 0.9/0.999, constant lr); monoscope runs
`train_sae` with its defaults (input normalisation, lr decay over the last 20 %, sparsity warm-up).
Width 4,096, L0 25 (k = 25; JumpReLU aimed at 25: monoscope's target_l0, SAELens's quadratic loss around
target_l0), batch 1,024, lr 3e-4, as SynthSAEBench publishes. Both SAEs are scored by monoscope's
ground-truth metrics (cross-checked against SAELens's `eval_sae_on_synthetic_data` in the tests) on the
same fresh evaluation samples. Printed: samples/s of each, the ratio (the anchor: SAELens; wanted >= 3),
and F1 / MCC of each (wanted: monoscope >= SAELens - 0.01). Load average is printed beside the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

SAELENS_WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
a = json.loads(sys.argv[2])
from monoscope.synth.source import SyntheticSource
import sae_lens as sl
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

common = dict(d_in=a["d_in"], d_sae=a["d_sae"])
arch = a["arch"]
if arch == "topk":
    sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=a["l0"], **common))
elif arch == "batchtopk":
    sae = sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=a["l0"], **common))
elif arch == "matryoshka":
    sae = sl.MatryoshkaBatchTopKTrainingSAE(sl.MatryoshkaBatchTopKTrainingSAEConfig(
        k=a["l0"], matryoshka_widths=a["widths"], **common))
elif arch == "jumprelu":
    sae = sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(
        jumprelu_sparsity_loss_mode="quadratic", target_l0=float(a["l0"]), **common))
else:
    raise SystemExit(f"no SAELens counterpart for {arch}")
stream = SyntheticSource(a["model"]).batches(batch_size=a["batch"], seed=0)
cfg = SAETrainerConfig(
    n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
    total_training_samples=a["samples"], device="cpu", autocast=False, lr=a["lr"], lr_end=a["lr"],
    lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0,
    n_restart_cycles=1, train_batch_size_samples=a["batch"], dead_feature_window=1000,
    feature_sampling_window=2000, n_batches_for_norm_estimate=1000,
    logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2 ** 31 - 1))
trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=stream, save_checkpoint_fn=lambda path: None)
t = time.perf_counter()  # the training loop only, as monoscope's tokens_per_s
trainer.fit()
seconds = time.perf_counter() - t
sae.save_inference_model(a["out"])
print(json.dumps({"seconds": seconds, "samples": trainer.n_training_samples}))
"""


def train_saelens(python: str, arch: str, args, d_in: int, out: Path) -> dict | None:
    from monoscope.sae import SAEConfig

    widths = list(SAEConfig(architecture="matryoshka", d_in=d_in, d_sae=args.d_sae, k=args.l0).widths_resolved)
    spec = {"arch": arch, "model": args.model, "d_in": d_in, "d_sae": args.d_sae, "l0": args.l0, "lr": args.lr,
            "batch": args.batch_size, "samples": args.samples, "widths": widths, "out": str(out)}
    run = subprocess.run([python, "-c", SAELENS_WORKER, SRC, json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if run.returncode:
        print(f"SAELens {arch} failed: {run.stderr.strip().splitlines()[-3:]}")
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def train_ours(arch: str, args, out: Path) -> dict:
    from monoscope.artifacts import read_json
    from monoscope.train import SIDECAR, TrainConfig, train_sae

    knob = {"jumprelu": {"target_l0": float(args.l0)}}.get(arch, {"k": args.l0})
    tc = TrainConfig(architecture=arch, d_sae=args.d_sae, batch_size=args.batch_size, lr=args.lr,
                     tokens=args.samples, checkpoint_every=0, **knob)
    train_sae(tc, "synth:" + args.model, out, show_progress=False)
    t = read_json(out / SIDECAR)
    return {"seconds": t["total_tokens"] / t["timings"]["tokens_per_s"], "samples": t["total_tokens"]}


def score(folder: Path, source, args) -> dict:
    from monoscope.sae.io import load_sae
    from monoscope.synth.metrics import ground_truth_metrics

    batches = source.eval_batches(args.eval_samples, 2048, seed=0)
    return ground_truth_metrics(load_sae(folder), source.synthetic.vectors, batches).to_dict()


def main() -> None:
    from monoscope.models import cache_dir
    from monoscope.synth.source import SyntheticSource

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="16k")
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--eval-samples", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--l0", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--architectures", default="topk,batchtopk,matryoshka,jumprelu")
    ap.add_argument("--saelens-python", default=str(cache_dir() / "venv-saelens" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.saelens_python).exists():
        sys.exit(f"no SAELens interpreter at {args.saelens_python}: run `bash scripts/setup.sh dev` first")

    source = SyntheticSource(args.model)
    print(f"model {args.model}; {args.samples:,} samples each, batch {args.batch_size}, d_sae {args.d_sae}, "
          f"L0 {args.l0}, lr {args.lr:g}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("arch        | samples/s ours | SAELens | ratio | L0 ours / SAELens | F1 ours / SAELens | "
          "MCC ours / SAELens")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.architectures.split(","):
            ours, theirs = Path(tmp) / f"ours_{arch}", Path(tmp) / f"saelens_{arch}"
            t_ours = train_ours(arch, args, ours)
            t_theirs = train_saelens(args.saelens_python, arch, args, source.d(), theirs)
            if t_theirs is None:
                continue
            a, b = score(ours, source, args), score(theirs, source, args)
            r_ours, r_theirs = t_ours["samples"] / t_ours["seconds"], t_theirs["samples"] / t_theirs["seconds"]
            print(f"{arch:<11} | {r_ours:14,.0f} | {r_theirs:7,.0f} | {r_ours / r_theirs:5.2f} | "
                  f"{a['l0']:7.2f} / {b['l0']:7.2f} | {a['f1']:.3f} / {b['f1']:.3f} | "
                  f"{a['mcc']:.3f} / {b['mcc']:.3f}   (load average {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
