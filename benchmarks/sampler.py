"""One sampling step of the steering screen: ours (two-level inverse CDF on the logits' own buffer) vs the anchor.

    python benchmarks/sampler.py [--rows 128] [--vocab 262144] [--repeats 10] [--threads 1]

Anchor: softmax over the whole vocabulary, a running sum, then a binary search for one uniform draw per row
(the exact inverse-CDF sampler monoscope used before; ``torch.multinomial`` is slower still and is timed
too). Each step gets a fresh logits buffer, as the model's forward pass hands over. Prints the median time
per step of each and the ratio, and how often both pick the same token from the same uniform draws (they
differ only where float rounding puts a draw on the other side of a token boundary).
"""
import argparse
import statistics
import time

import torch

from monoscope.interpret.steer import _draw


def anchor(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)


def multinomial(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)


def time_step(fn, base: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats):
        logits = base.clone()  # a fresh buffer, as from the model
        start = time.perf_counter()
        fn(logits, 0.7, torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128, help="rows per step (the screen's batch)")
    ap.add_argument("--vocab", type=int, default=262_144, help="vocabulary size (Gemma 3: 262,144)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    base = torch.randn(ns.rows, ns.vocab, generator=torch.Generator().manual_seed(0)) * 3
    t_anchor, t_multi, t_ours = (time_step(f, base, ns.repeats) for f in (anchor, multinomial, _draw))
    same = [(anchor(base.clone(), 0.7, torch.Generator().manual_seed(s))
             == _draw(base.clone(), 0.7, torch.Generator().manual_seed(s))).float().mean().item() for s in range(20)]
    print(f"{ns.rows} rows x {ns.vocab:,} tokens, {ns.threads} thread(s), median of {ns.repeats}")
    print(f"anchor (softmax + cumsum + search): {t_anchor * 1e3:.1f} ms")
    print(f"torch.multinomial:                  {t_multi * 1e3:.1f} ms")
    print(f"ours (two-level, in place):         {t_ours * 1e3:.1f} ms   anchor / ours = {t_anchor / t_ours:.2f}x")
    print(f"same token as the anchor for the same draw: {sum(same) / len(same):.4f}")


if __name__ == "__main__":
    main()
