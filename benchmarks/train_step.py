"""Milliseconds per training step, split into forward / backward / optimiser, on SynthSAEBench-16k batches.

    python benchmarks/train_step.py [topk,batchtopk,matryoshka,jumprelu] [DEAD_LATENTS]

Width 4,096, batch 1,024, L0 25 (k = 25; JumpReLU target_l0 25), Adam lr 3e-4, the first DEAD_LATENTS
latents (default 0) marked dead so AuxK / the dead-threshold decay run. Ten timed steps after four warm-up
steps on eight pre-generated batches (the generator's time is printed apart). No anchor: this is a profile,
to see which part of a step a change moves; run it before and after the change on the same quiet machine.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from monoscope.sae import SAEConfig, build_sae
from monoscope.synth.source import SyntheticSource


def main() -> None:
    archs = (sys.argv[1] if len(sys.argv) > 1 else "topk,batchtopk,matryoshka,jumprelu").split(",")
    n_dead = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    torch.manual_seed(0)
    stream = SyntheticSource("16k").batches(batch_size=1024, seed=0)
    xs = [next(stream) for _ in range(8)]
    t = time.perf_counter()
    for _ in range(10):
        next(stream)
    print(f"generator {(time.perf_counter() - t) * 100:.1f} ms per batch; load average {os.getloadavg()[0]:.2f}")
    for arch in archs:
        knob = {"target_l0": 25.0} if arch == "jumprelu" else {"k": 25}
        sae = build_sae(SAEConfig(architecture=arch, d_in=xs[0].shape[1], d_sae=4096, **knob))
        sae.init_from_data(torch.cat(xs[:4]))
        opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=3e-4)
        dead = torch.zeros(4096, dtype=torch.bool)
        dead[:n_dead] = True
        ms = dict.fromkeys(("forward", "backward", "optimiser"), 0.0)
        for i in range(14):
            t0 = time.perf_counter()
            out = sae.training_forward(xs[i % 8], dead_mask=dead)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            t2 = time.perf_counter()
            sae.before_step()
            opt.step()
            sae.after_step()
            t3 = time.perf_counter()
            if i >= 4:
                for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimiser", t2, t3)):
                    ms[k] += (b - a) * 100  # mean over 10 steps, in ms
        print(f"{arch:<11} " + "  ".join(f"{k} {v:6.1f}" for k, v in ms.items())
              + f"  total {sum(ms.values()):6.1f} ms  (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
