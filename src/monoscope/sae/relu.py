"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "April 2024 update").

Weighting each latent's L1 by its decoder norm makes the penalty invariant to trading encoder scale for
decoder scale, so the decoder can stay unconstrained (no renormalisation, no gradient projection).
Init: decoder rows of norm 0.1, W_enc = W_decᵀ, b_enc = 0. Unlike Anthropic's zero b_dec, b_dec starts at the
geometric median (as for TopK): residual streams carry a large shared mean, and every architecture in a
frontier comparison should start from the same centring.
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoscope.sae.base import SAE, TrainOutput, _flatten, dense_fired, register, require_non_negative, sum_sq


@register("relu")
class ReLUSAE(SAE):
    default_decoder_norm = 0.1
    median_init = True
    saelens_architecture = "standard"
    sweep_knobs = ("l1_coefficient",)
    defaults = {"l1_coefficient": 5.0}

    @classmethod
    def check_config(cls, cfg) -> None:
        require_non_negative(cfg, "l1_coefficient")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def training_forward(self, x: Tensor, *, dead_mask: Tensor | None = None,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        x, _ = _flatten(x, self.cfg.d_in)
        x = x.to(self.W_enc.dtype)
        f = self.pre_acts(x).relu()
        x_hat = self.decode(f)
        mse = sum_sq(x - x_hat)
        l1 = (f * self.W_dec.norm(dim=1)).sum(1).mean()
        loss = mse + self.cfg.l1_coefficient * sparsity_scale * l1
        l0 = (f > 0).sum(1).float().mean()
        return TrainOutput(x_hat=x_hat, loss=loss, terms={"mse": mse.detach(), "l1": l1.detach(), "l0": l0},
                           l0=l0, fired=dense_fired(f.detach()), f=f)
