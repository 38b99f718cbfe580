"""Ground-truth metrics for an SAE trained on synthetic activations whose true feature directions are known.

The definitions are those of SynthSAEBench (D. Chanin and A. Garriga-Alonso, 2026, "SynthSAEBench:
evaluating sparse autoencoders on synthetic data with known ground truth", arXiv:2602.14687) as SAELens
6.54 computes them (``sae_lens.synthetic.evals.eval_sae_on_synthetic_data``); this module reimplements
them without importing SAELens, and tests/test_synth_metrics.py checks the two agree on the same samples.

With x the hidden activation, a its true feature activations, f = sae.encode(x), x̂ = sae.decode(f)
(monoscope SAEs read raw activations, as SAELens's evaluation does without an activation scaler), and
cos the |cosine| matrix between decoder rows and true feature vectors [d_sae, F]:

- ``true_l0``: mean number of true features with a ≠ 0 per sample;
- ``l0``: mean number of latents with f ≠ 0 per sample;
- ``dead_latents``: latents with f = 0 on every sample;
- ``shrinkage``: mean over samples with ‖x‖ > 1e-6 of ‖x̂‖ / ‖x‖ (whole vectors, biases included);
- ``explained_variance``: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), variance summed over dimensions;
- ``mcc``: the one-to-one matching of latents to true features that maximises Σ cos (Hungarian), and the
  mean cos over its min(d_sae, F) pairs;
- ``uniqueness``: (number of distinct true features that are some latent's argmax of cos) / d_sae;
- ``precision`` / ``recall`` / ``f1`` / ``accuracy``: each latent is a detector of its own best true
  feature (argmax of cos, not the Hungarian match; several latents may share one). Per latent, over all
  samples, TP = fires (f ≠ 0) and the feature is active (a > 0), and so on; precision = TP/(TP+FP),
  recall = TP/(TP+FN), F1 their harmonic mean (each 0 where its denominator is 0), accuracy =
  (TP+TN)/N; the reported numbers are means over all latents, dead ones included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import Tensor

from monoscope.errors import MonoscopeError

MIN_INPUT_NORM = 1e-6  # samples this close to 0 have no defined shrinkage


@dataclass
class GroundTruthMetrics:
    """SynthSAEBench's numbers for one SAE (see the module docstring for each definition)."""

    num_samples: int
    true_l0: float
    l0: float
    dead_latents: int
    shrinkage: float
    explained_variance: float
    mcc: float
    uniqueness: float
    precision: float
    recall: float
    f1: float
    accuracy: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def abs_cosines(a: Tensor, b: Tensor) -> Tensor:
    """|cos| between every row of ``a`` [n, d] and of ``b`` [m, d]; a zero row has cosine 0 with everything."""
    def unit(w: Tensor) -> Tensor:
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (unit(a) @ unit(b).T).abs()


def mcc(cos: Tensor) -> float:
    """Mean |cos| over the optimal one-to-one matching of rows to columns of ``cos`` (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    c = cos.detach().cpu()
    rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
    return float(c[torch.as_tensor(rows), torch.as_tensor(cols)].double().mean())


def uniqueness(best: Tensor) -> float:
    """Distinct best-matching true features over the number of latents (1 = no two latents share one)."""
    return best.unique().numel() / best.numel() if best.numel() else 0.0


class _Accumulator:
    """Running sums over batches; every sample weighs the same whatever the batch sizes."""

    def __init__(self, best: Tensor):
        self.best = best
        m, dev = best.numel(), best.device
        self.n = self.n_shrink = 0
        self.true_active = self.latent_active = 0
        self.shrink = self.sq_resid = self.sq_norm = 0.0
        self.shift: Tensor | None = None  # E‖x−c‖² − ‖E(x−c)‖² avoids the cancellation of E‖x‖² − ‖Ex‖²
        self.sum_x: Tensor | None = None
        self.fires = torch.zeros(m, dtype=torch.long, device=dev)
        self.gt = torch.zeros(m, dtype=torch.long, device=dev)
        self.tp = torch.zeros(m, dtype=torch.long, device=dev)
        self.ever = torch.zeros(m, dtype=torch.bool, device=dev)

    def add(self, x: Tensor, acts: Tensor, f: Tensor, x_hat: Tensor) -> None:
        x64, x_hat64 = x.double(), x_hat.double()
        if self.shift is None:
            self.shift = x64.mean(0)
            self.sum_x = torch.zeros_like(self.shift)
        xc = x64 - self.shift
        self.sum_x += xc.sum(0)
        self.sq_norm += float(xc.pow(2).sum())
        self.sq_resid += float((x64 - x_hat64).pow(2).sum())
        norms = x64.norm(dim=1)
        ok = norms > MIN_INPUT_NORM
        self.shrink += float((x_hat64.norm(dim=1)[ok] / norms[ok]).sum())
        self.n_shrink += int(ok.sum())
        fired, gt = f != 0, acts[:, self.best] > 0
        self.fires += fired.sum(0)
        self.gt += gt.sum(0)
        self.tp += (fired & gt).sum(0)
        self.ever |= fired.any(0)
        self.true_active += int((acts != 0).sum())
        self.latent_active += int(fired.sum())
        self.n += x.shape[0]

    def explained_variance(self) -> float:
        var = self.sq_norm / self.n - float(self.sum_x.div(self.n).pow(2).sum())
        mse = self.sq_resid / self.n
        if var < 1e-10:  # constant inputs: all explained only if reconstructed exactly
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / var

    def detection(self) -> dict[str, float]:
        tp, fires, gt = self.tp.double().cpu(), self.fires.double().cpu(), self.gt.double().cpu()
        zero = torch.zeros_like(tp)
        precision = torch.where(fires > 0, tp / fires.clamp_min(1), zero)
        recall = torch.where(gt > 0, tp / gt.clamp_min(1), zero)
        s = precision + recall
        f1 = torch.where(s > 0, 2 * precision * recall / s.clamp_min(1e-300), zero)
        tn = self.n - fires - gt + tp
        accuracy = (tp + tn) / self.n
        return {name: float(v.mean()) if v.numel() else 0.0
                for name, v in (("precision", precision), ("recall", recall), ("f1", f1), ("accuracy", accuracy))}


def _check(x: Tensor, acts: Tensor, d_in: int, num_features: int, i: int) -> None:
    if x.ndim != 2 or x.shape[1] != d_in or acts.ndim != 2 or acts.shape != (x.shape[0], num_features):
        raise MonoscopeError(f"batch {i}: expected hidden [B, {d_in}] and feature activations "
                             f"[B, {num_features}], got {tuple(x.shape)} and {tuple(acts.shape)}")


@torch.no_grad()
def ground_truth_metrics(sae, feature_vectors: Tensor, batches: Iterable[tuple[Tensor, Tensor]]) -> GroundTruthMetrics:
    """Score ``sae`` against the true features [F, d_in] on ``batches`` of (hidden [B, d_in], dense true
    feature activations [B, F]); batches are consumed one at a time, so any number of samples fits."""
    W_dec = sae.W_dec.detach()
    d_sae, d_in = W_dec.shape
    if feature_vectors.ndim != 2 or feature_vectors.shape[1] != d_in:
        raise MonoscopeError(f"feature_vectors must be [num_true_features, {d_in}] to match the SAE's d_in, "
                             f"got {tuple(feature_vectors.shape)}")
    num_features = feature_vectors.shape[0]
    dev = W_dec.device
    cos = abs_cosines(W_dec, feature_vectors.to(dev, W_dec.dtype))
    acc = _Accumulator(cos.argmax(dim=1))
    for i, (x, acts) in enumerate(batches):
        acts = acts.to_dense() if acts.is_sparse else acts
        _check(x, acts, d_in, num_features, i)
        x, acts = x.to(dev), acts.to(dev)
        f = sae.encode(x)
        f = f.to_dense() if f.is_sparse else f
        acc.add(x, acts, f, sae.decode(f))
    if acc.n == 0:
        raise MonoscopeError("no samples to score the SAE on; pass at least one (hidden, feature_acts) batch")
    return GroundTruthMetrics(
        num_samples=acc.n, true_l0=acc.true_active / acc.n, l0=acc.latent_active / acc.n,
        dead_latents=int((~acc.ever).sum()), shrinkage=acc.shrink / acc.n_shrink if acc.n_shrink else 0.0,
        explained_variance=acc.explained_variance(), mcc=mcc(cos), uniqueness=uniqueness(acc.best),
        **acc.detection())
