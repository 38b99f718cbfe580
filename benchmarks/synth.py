"""Synthetic data: does the generator outpace the trainer, and how does it compare with SAELens's?

    python benchmarks/synth.py [--model 16k] [--batches 20] [--saelens-python PATH]

Measured side by side in one run on SynthSAEBench-16k (F 16,384, d 768), batch 1,024:
  generator   monoscope's sampler (hidden activations, as the trainer draws them), samples/s
  SAELens     SAELens's SyntheticModel.sample on the same saved model, in its own interpreter
              ($MONOSCOPE_CACHE/venv-saelens, what `scripts/setup.sh dev` makes), samples/s
  trainer     one training step (forward, backward, Adam) of each architecture at width 4,096 on batches
              already in memory, samples/s
Printed ratios: generator / trainer for each architecture (the anchor: the trainer; wanted >= 5) and
generator / SAELens. Load average is printed beside the timings; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAELENS_WORKER = r"""
import sys, time, torch
from sae_lens.synthetic import SyntheticModel
m = SyntheticModel.load_from_disk(sys.argv[1])
n, batch = int(sys.argv[2]), int(sys.argv[3])
m.sample(batch)
t = time.perf_counter()
for _ in range(n):
    m.sample(batch)
print(n * batch / (time.perf_counter() - t))
"""


def generator_rate(model, batches: int, batch: int) -> float:
    from monoscope.synth.model import generator_for

    model.sample(batch, generator_for(0, 0))
    t = time.perf_counter()
    for i in range(batches):
        model.sample(batch, generator_for(0, i + 1))
    return batches * batch / (time.perf_counter() - t)


def trainer_rate(arch: str, x: list[torch.Tensor], d_sae: int, l0: int) -> float:
    from monoscope.sae import SAEConfig, build_sae

    extra = {"k": l0} if arch in ("topk", "batchtopk", "matryoshka") else {}
    if arch == "jumprelu":
        extra = {"target_l0": float(l0)}
    sae = build_sae(SAEConfig(architecture=arch, d_in=x[0].shape[1], d_sae=d_sae, **extra))
    sae.init_from_data(x[0])
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step(batch):
        res = sae.training_forward(batch, dead_mask=dead, sparsity_scale=1.0)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        sae.before_step()
        opt.step()
        sae.after_step()
    step(x[0])
    t = time.perf_counter()
    for batch in x[1:]:
        step(batch)
    return (len(x) - 1) * x[0].shape[0] / (time.perf_counter() - t)


def saelens_rate(python: str, model, batches: int, batch: int) -> float | None:
    if not Path(python).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m")
        run = subprocess.run([python, "-c", SAELENS_WORKER, str(Path(tmp) / "m"), str(batches), str(batch)],
                             capture_output=True, text=True)
    if run.returncode:
        print(f"SAELens failed: {run.stderr.strip().splitlines()[-1:]}")
        return None
    return float(run.stdout.strip().splitlines()[-1])


def main() -> None:
    from monoscope.models import cache_dir
    from monoscope.synth.model import generator_for, open_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="16k")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--l0", type=int, default=25)
    ap.add_argument("--architectures", default="topk,batchtopk,matryoshka,jumprelu,relu")
    ap.add_argument("--saelens-python", default=str(cache_dir() / "venv-saelens" / "bin" / "python"))
    args = ap.parse_args()

    model = open_model(args.model)
    print(f"model {args.model}: F {model.num_features:,}, d {model.hidden_dim}; batch {args.batch_size}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    gen = generator_rate(model, args.batches, args.batch_size)
    print(f"generator (monoscope): {gen:,.0f} samples/s")
    theirs = saelens_rate(args.saelens_python, model, max(3, args.batches // 4), args.batch_size)
    if theirs is None:
        print("SAELens: not available (bash scripts/setup.sh dev makes its venv)")
    else:
        print(f"generator (SAELens):   {theirs:,.0f} samples/s   monoscope / SAELens = {gen / theirs:.2f}")
    x = [model.sample(args.batch_size, generator_for(1, i)) for i in range(min(args.batches, 12))]
    for arch in args.architectures.split(","):
        rate = trainer_rate(arch, x, args.d_sae, args.l0)
        print(f"trainer {arch:<10} d_sae {args.d_sae}: {rate:,.0f} samples/s   generator / trainer = {gen / rate:.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
