"""End-to-end TopK SAE training: monoscope vs SAELens 6.x, side by side in one run on the same activations.

    python benchmarks/train_sae.py [--steps 20] [--store DIR] [--tokens 65536] [--saelens-python PATH]

Both train a TopK SAE (d_in 640 from Gemma 3 270M layers.6.resid_post, d_sae 10,240, k 32, batch 4096,
Adam at the same lr, grad-norm clip 1, AuxK on) for the same number of steps on the same stored
activations, scaled by the same constant (E‖s·x‖² = d). Reported per contender:
  tokens/s   training-loop throughput (ours: streaming from the store; SAELens: rows already in memory,
             its own TopKTrainingSAE.training_forward_pass + the step its SAETrainer takes)
  FVU        on the same first --eval-rows rows, 1 − Σ‖x − x̂‖² / Σ‖x − μ‖² (global mean)
  peak frac  tokens/s × 12·d·m (dense-equivalent fwd+bwd FLOPs per token) / fp32 matmul peak measured
             here with torch.mm at the encoder's shape; monoscope's sparse backward can exceed 1.
SAELens runs in its own interpreter (default: the venv that `scripts/setup.sh dev` puts in the
monoscope cache, $MONOSCOPE_CACHE/venv-saelens) so its pins do not touch ours;
without it the script says so and prints monoscope's numbers only. The store is extracted once if missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEAD_WINDOW_STEPS = 1000  # SAELens's default dead_feature_window, used by both
SAELENS_WORKER = r"""
import json, sys, time
import numpy as np, torch
from safetensors.numpy import load_file
import sae_lens
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
if a["threads"]:
    torch.set_num_threads(a["threads"])
man = json.load(open(a["store"] + "/manifest.json"))
x = np.concatenate([load_file(a["store"] + "/" + s["file"])[a["hook"]] for s in man["shards"]]).astype(np.float32)
x = torch.from_numpy(x) * a["scale"]
cfg = TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a["d_sae"], k=a["k"], dtype="float32", device="cpu")
sae = TopKTrainingSAE(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=a["lr"], betas=(0.9, 0.999))
since = torch.zeros(a["d_sae"], dtype=torch.long)
B, n = a["batch"], x.shape[0]
perm = torch.randperm(n)
pos, times = 0, []
for step in range(a["steps"]):
    if pos + B > n:
        perm, pos = torch.randperm(n), 0
    batch = x[perm[pos:pos + B]]
    pos += B
    t0 = time.perf_counter()
    sae.train()
    out = sae.training_forward_pass(TrainStepInput(sae_in=batch, coefficients={}, n_training_steps=step,
                                                   dead_neuron_mask=since > a["dead_window_steps"],
                                                   is_logging_step=False))
    with torch.no_grad():
        fired = out.feature_acts.bool().any(0)
        since += 1
        since[fired] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
sae.eval()
with torch.no_grad():
    ev = x[: a["eval_rows"]].double()
    xh = sae(x[: a["eval_rows"]]).double()
    fvu = ((ev - xh) ** 2).sum().item() / ((ev - ev.mean(0)) ** 2).sum().item()
loop = sum(times)
print(json.dumps({"version": sae_lens.__version__, "tokens_per_s": a["steps"] * B / loop, "loop_seconds": loop,
                  "fvu": fvu, "first_step_s": times[0]}))
"""


def matmul_peak(d: int, m: int, batch: int, repeats: int = 5) -> float:
    """fp32 GFLOP/s of torch.mm at the encoder's shape (best of a few runs)."""
    a, b = torch.randn(batch, d), torch.randn(d, m)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d * m / best / 1e9


def ensure_store(folder: Path, tokens: int, hook: str) -> Path:
    from monoscope.extract import ExtractConfig, extract

    if not (folder / "manifest.json").exists() or not json.loads((folder / "manifest.json").read_text())["finished"]:
        print(f"extracting {tokens:,} tokens of gemma-3-270m {hook} into {folder} (once)...", flush=True)
    extract(ExtractConfig(model="gemma-3-270m", hook=(hook,), tokens=tokens), folder)
    return folder


def main() -> None:
    from monoscope.evaluate import reconstruction_metrics
    from monoscope.models import cache_dir
    from monoscope.sae.io import load_sae
    from monoscope.store import ActivationStore
    from monoscope.train import TrainConfig, default_lr, train_sae

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--store", default=None, help="activation store (default: extracted once into the cache)")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens to extract when the store is missing")
    ap.add_argument("--hook", default="layers.6.resid_post")
    ap.add_argument("--d-sae", type=int, default=10240)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--eval-rows", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = default)")
    from monoscope.models import cache_dir

    ap.add_argument("--saelens-python", default=str(cache_dir() / "venv-saelens" / "bin" / "python"),
                    help="SAELens's interpreter (default: the venv `scripts/setup.sh dev` makes in the monoscope cache)")
    ap.add_argument("--skip-saelens", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    store_dir = Path(args.store) if args.store else cache_dir() / "benchmarks" / f"gemma-3-270m-{args.hook}-{args.tokens}"
    ensure_store(store_dir, args.tokens, args.hook)
    store = ActivationStore(store_dir)
    d, m = store.d(args.hook), args.d_sae
    lr = default_lr(m)
    flops_per_token = 12 * d * m
    peak = matmul_peak(d, m, args.batch_size)
    eval_rows = min(args.eval_rows, store.num_rows)
    print(f"store {store_dir}: {store.num_rows:,} rows, d {d}; SAE d_sae {m}, k {args.k}, batch {args.batch_size}, "
          f"{args.steps} steps, lr {lr:.3g}; fp32 matmul peak {peak:.1f} GFLOP/s; torch threads {torch.get_num_threads()}")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(architecture="topk", d_sae=m, k=args.k, batch_size=args.batch_size, steps=args.steps,
                          lr=lr, checkpoint_every=0, log_every=max(1, args.steps), hook=args.hook,
                          lr_decay_fraction=0.0, sparsity_warmup_fraction=0.0,
                          dead_window_tokens=DEAD_WINDOW_STEPS * args.batch_size)
        out = train_sae(cfg, store_dir, Path(tmp) / "ours")
        info = json.loads((out / "train.json").read_text())
        sae = load_sae(out)
        fvu = reconstruction_metrics(sae, store.iter_rows(args.hook, 4096, stop=eval_rows), m)["fvu"]
        results["monoscope"] = {"tokens_per_s": info["timings"]["tokens_per_s"], "fvu": fvu}
        scale = info["input_scale"]

    python = Path(args.saelens_python)
    if args.skip_saelens:
        print("SAELens: skipped (--skip-saelens)")
    elif not python.exists():
        print(f"SAELens: not available ({python} not found; install sae-lens 6.x into its own venv and pass "
              f"--saelens-python); showing monoscope only")
    else:
        job = {"store": str(store_dir), "hook": args.hook, "scale": scale, "d_sae": m, "k": args.k, "lr": lr,
               "batch": args.batch_size, "steps": args.steps, "seed": 0, "eval_rows": eval_rows,
               "threads": args.threads, "dead_window_steps": DEAD_WINDOW_STEPS}
        p = subprocess.run([str(python), "-c", SAELENS_WORKER, json.dumps(job)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": ""})
        if p.returncode != 0:
            print(f"SAELens: failed to run ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
        else:
            results[f"SAELens {json.loads(p.stdout.strip().splitlines()[-1])['version']}"] = \
                json.loads(p.stdout.strip().splitlines()[-1])

    print(f"\n{'':<16}{'tokens/s':>10}{'FVU':>9}{'peak frac':>11}")
    for name, r in results.items():
        frac = r["tokens_per_s"] * flops_per_token / (peak * 1e9)
        print(f"{name:<16}{r['tokens_per_s']:>10,.0f}{r['fvu']:>9.4f}{frac:>11.2f}")
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        print(f"\nspeed ratio {a}/{b}: {ra['tokens_per_s'] / rb['tokens_per_s']:.2f}x   "
              f"FVU {ra['fvu']:.4f} vs {rb['fvu']:.4f} after {args.steps} steps")
    print(f"(peak frac = tokens/s x 12*d*m dense-equivalent FLOPs / measured fp32 matmul peak)")


if __name__ == "__main__":
    sys.exit(main())
