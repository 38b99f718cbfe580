"""Gated SAE (Rajamanoharan et al. 2024a): separate "is it on" and "how much" paths sharing one W_enc.

π_gate = (x − b_dec)·W + b_gate decides which latents fire; π_mag = (x − b_dec)·(W ⊙ exp(r_mag)) + b_mag
sets their size; f = 1[π_gate > 0]·ReLU(π_mag). The L1 penalty acts on ReLU(π_gate) only, so magnitudes
are not shrunk. The step 1[·] passes no gradient, so an auxiliary loss — reconstructing x from ReLU(π_gate)
through a *frozen* copy of the decoder — trains the gate path to be a reconstruction itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoscope.sae.base import SAE, TrainOutput, _flatten, dense_fired, register, require_non_negative, sum_sq


@register("gated")
class GatedSAE(SAE):
    default_decoder_norm = 0.1
    median_init = True
    saelens_architecture = "gated"
    sweep_knobs = ("l1_coefficient",)
    defaults = {"l1_coefficient": 5.0}

    @classmethod
    def check_config(cls, cfg) -> None:
        require_non_negative(cfg, "l1_coefficient")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.b_gate = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    @property
    def b_enc(self) -> Tensor:
        """The gate bias: π_gate = (x − b_dec)·W_enc + b_enc, as in the base-class contract."""
        return self.b_gate

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat, _ = _flatten(x, self.cfg.d_in)
        pre = self._center(flat) @ self.W_enc
        return pre + self.b_gate, pre * self.r_mag.exp() + self.b_mag

    def pre_acts(self, x: Tensor) -> Tensor:
        """π_gate: a latent can only fire where this is positive."""
        flat, lead = _flatten(x, self.cfg.d_in)
        return self._paths(flat)[0].reshape(*lead, self.cfg.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        flat, lead = _flatten(x, self.cfg.d_in)
        gate, mag = self._paths(flat)
        return ((gate > 0) * mag.relu()).reshape(*lead, self.cfg.d_sae)

    def training_forward(self, x: Tensor, *, dead_mask: Tensor | None = None,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        x, _ = _flatten(x, self.cfg.d_in)
        x = x.to(self.W_enc.dtype)
        gate, mag = self._paths(x)
        f = (gate > 0) * mag.relu()
        x_hat = self.decode(f)
        mse = sum_sq(x - x_hat)
        gate_act = gate.relu()
        l1 = (gate_act * self.W_dec.norm(dim=1)).sum(1).mean()
        aux = sum_sq(x - (gate_act @ self.W_dec.detach() + self.b_dec.detach()))
        loss = mse + self.cfg.l1_coefficient * sparsity_scale * l1 + aux
        l0 = (f > 0).sum(1).float().mean()
        return TrainOutput(x_hat=x_hat, loss=loss, l0=l0, fired=dense_fired(f.detach()), f=f,
                           terms={"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach(), "l0": l0})

    def _activation_unit_tensors(self) -> tuple[str, ...]:
        return ("b_dec", "b_gate", "b_mag")

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"b_gate": self.b_gate, "b_mag": self.b_mag, "r_mag": self.r_mag}
