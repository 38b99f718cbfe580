"""Micro-benchmark: one TopK SAE training step (forward + backward + Adam + decoder-norm hooks) on CPU.

Reports tokens/s for monoscope's sparse-backward TopK, for a dense-autograd TopK written the usual way
(what SAELens-style code costs: the backward pays for all m latents), and the fp32 matmul peak measured
with ``torch.mm`` at the encoder's shape, so the step time can be read as a fraction of that peak.

    python benchmarks/sae_step.py [--d-in 640 --d-sae 10240 --k 32 --batch 4096 --steps 5 --dead 0.0]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.base import sum_sq, total_variance


def timeit(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def dense_topk_step(sae, x, opt):
    """Reference: TopK with plain autograd (dense decoder product, dense backward)."""
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = z.topk(sae.cfg.k, dim=1, sorted=False)
    f = torch.zeros_like(z).scatter(1, i, v.relu())
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = sum_sq(x - x_hat) / total_variance(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_step()
    opt.step()
    sae.after_step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--d-sae", type=int, default=10240)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead (AuxK on)")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d, m = args.batch, args.d_in, args.d_sae
    x = torch.randn(n, d)
    a, b = torch.randn(n, d), torch.randn(d, m)
    peak_s = timeit(lambda: torch.mm(a, b), args.steps)
    flops = 2 * n * d * m
    peak = flops / peak_s

    sae = build_sae(SAEConfig("topk", d_in=d, d_sae=m, k=args.k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = (torch.rand(m) < args.dead) if args.dead > 0 else None

    def step():
        out = sae.training_forward(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_step()
        opt.step()
        sae.after_step()

    ours_s = timeit(step, args.steps)
    res = {
        "shape": {"batch": n, "d_in": d, "d_sae": m, "k": args.k, "dead_fraction": args.dead},
        "threads": torch.get_num_threads(),
        "mm_peak_gflops": round(peak / 1e9, 1),
        "encoder_mm_s": round(peak_s, 4),
        "ours_step_s": round(ours_s, 4),
        "ours_tokens_per_s": round(n / ours_s),
        # The step does 2·N·d·m FLOPs that matter; at the mm peak it would take encoder_mm_s.
        "ours_fraction_of_mm_peak": round(peak_s / ours_s, 3),
    }
    if not args.skip_dense:
        sae2 = build_sae(SAEConfig("topk", d_in=d, d_sae=m, k=args.k))
        opt2 = torch.optim.Adam(sae2.parameters(), lr=1e-4, foreach=True)
        dense_s = timeit(lambda: dense_topk_step(sae2, x, opt2), max(1, args.steps // 2))
        res["dense_autograd_step_s"] = round(dense_s, 4)
        res["dense_autograd_tokens_per_s"] = round(n / dense_s)
        res["speedup_vs_dense_autograd"] = round(dense_s / ours_s, 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
