"""Matryoshka BatchTopK SAE: every prefix of the dictionary (widths m/16 … m) must reconstruct x alone.

Latents are chosen by batch top-k over the whole dictionary; the loss is the mean over prefixes of the
normalised MSE of the reconstruction using only latents below that width (+ AuxK). Early latents thus carry
coarse, general features and later ones refine them. Inference and the saved format are BatchTopK's
(a JumpReLU with the EMA threshold).
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.sae.base import register, sum_sq, total_variance
from monoscope.sae.batchtopk import BatchTopKSAE
from monoscope.sae.topk import sparse_decode


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        ws = cfg.widths_resolved
        if list(ws) != sorted(set(ws)) or ws[0] < 1 or ws[-1] != cfg.d_sae:
            raise MonoscopeError(f"matryoshka_widths {list(ws)} must be strictly increasing, positive and end at "
                                 f"d_sae={cfg.d_sae}, e.g. {[cfg.d_sae // 4, cfg.d_sae // 2, cfg.d_sae]}")

    def _recon_loss(self, x: Tensor, vals: Tensor, idx: Tensor, fvu: Tensor):
        tv = total_variance(x)
        partial = None
        losses = []
        lo = 0
        for w in self.cfg.widths_resolved:
            band = (idx >= lo) & (idx < w)
            part = sparse_decode(vals * band, idx, self.W_dec)
            partial = part if partial is None else partial + part
            losses.append(sum_sq(x - (partial + self.b_dec)) / tv)
            lo = w
        stacked = torch.stack(losses)
        terms = {f"fvu_prefix_{w}": l.detach() for w, l in zip(self.cfg.widths_resolved, losses)}
        return stacked.mean(), terms
