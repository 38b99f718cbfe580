"""BatchTopK SAE (Bussmann et al. 2024): the top k·N activations over the whole batch, k per token on average.

Training picks latents batch-wide, which inference cannot do one token at a time, so a single threshold θ
replaces the selection at inference: ``encode`` is a JumpReLU with θ on every latent, and the SAE is saved
as one. During training θ follows an EMA (rate ``batchtopk_threshold_rate``) of the smallest activation
kept in each batch, as in the paper; at the end ``calibrate`` sets it to the smallest activation the
batch-wide selection keeps on a fresh sample, so inference fires k latents per token on average. (The EMA
alone lags: in a short run it still remembers the first batches of an untrained SAE, and the default
run's SAE fired 9.8 latents per token at k = 32.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.sae.base import register
from monoscope.sae.topk import TopKSAE


def batch_topk_indices(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(idx, keep) [N, K'] holding exactly the k·N largest entries of z, ids sorted within each row.

    Exact but cheap: take each row's top candidates (4k to start), choose the global top k·N among them,
    and widen the candidate set only if some row had every candidate chosen (it might own more).
    """
    n, m = z.shape
    total = k * n
    kc = min(m, 4 * k)
    while True:
        cand_vals, cand_idx = z.topk(kc, dim=1, sorted=True)
        flat = cand_vals.reshape(-1)
        chosen = flat.topk(min(total, flat.numel()), sorted=False).indices
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=z.device)
        keep[chosen] = True
        keep = keep.reshape(n, kc)
        if kc == m or not bool(keep[:, -1].any()):
            break
        kc = min(m, kc * 2)
    pos = torch.arange(1, kc + 1, device=z.device)
    width = max(1, int((keep * pos).max()))
    idx, perm = cand_idx[:, :width].sort(dim=1)
    return idx, keep[:, :width].gather(1, perm)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """TopK with batch-wide selection; AuxK, unit-norm decoder and median init as for TopK."""

    saelens_architecture = "jumprelu"  # its inference form
    saelens_exact = False
    has_sparse_encode = False  # a variable number of latents per token at inference
    defaults = {**TopKSAE.defaults, "batchtopk_threshold_rate": 0.01}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not 0 < cfg.batchtopk_threshold_rate <= 1:
            raise MonoscopeError(f"batchtopk_threshold_rate must be in (0, 1], got {cfg.batchtopk_threshold_rate}")

    @classmethod
    def saelens_fields(cls, cfg) -> dict:
        return {}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        # False until the first training batch sets θ (an EMA started at 0 would lag for ~100 steps).
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    def _select_main(self, z: Tensor):
        return batch_topk_indices(z, self.cfg.k)

    @torch.no_grad()
    def _observe_selection(self, z: Tensor, idx: Tensor, keep: Tensor | None) -> None:
        vals = z.gather(1, idx)
        kept = vals[(vals > 0) & keep] if keep is not None else vals[vals > 0]
        if kept.numel() == 0:
            return
        low = kept.min().to(self.threshold.dtype)
        if bool(self.threshold_initialised):
            r = self.cfg.batchtopk_threshold_rate
            self.threshold.mul_(1 - r).add_(r * low)
        else:
            self.threshold.fill_(low)
            self.threshold_initialised.fill_(True)

    @torch.no_grad()
    def calibrate(self, sample: Tensor) -> None:
        z = self.pre_acts(sample[:4096].to(self.W_enc.device)).relu()
        idx, keep = batch_topk_indices(z, self.cfg.k)
        kept = z.gather(1, idx)[keep]
        kept = kept[kept > 0]
        if kept.numel():
            self.threshold.fill_(kept.min().item())
            self.threshold_initialised.fill_(True)

    def encode(self, x: Tensor) -> Tensor:
        """Inference: JumpReLU with the learned global threshold (no batch dependence)."""
        z = self.pre_acts(x)
        return z.relu() * (z > self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode_sparse(self, x: Tensor):
        raise NotImplementedError("BatchTopK keeps a variable number of latents per token; use encode()")

    def _activation_unit_tensors(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc", "threshold")

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"b_enc": self.b_enc, "threshold": self.threshold}
