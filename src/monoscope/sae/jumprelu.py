"""JumpReLU SAE (Rajamanoharan et al. 2024b; Gemma Scope): f_i = z_i·H(z_i − θ_i) with a learned θ_i > 0.

H has zero derivative almost everywhere, so θ learns through straight-through estimators with a rectangle
kernel K(u) = 1[|u| < ½] of bandwidth ε:  ∂f/∂θ ≈ −(θ/ε)·K((z − θ)/ε) and ∂L0/∂θ ≈ −(1/ε)·K((z − θ)/ε).
z gets the ordinary gradient through f and none through the L0 count.
Training is sparse, as for TopK: after the one dense encoder product, only the entries a gradient can reach
(z_i > max(θ_i − ε/2, 0): the active ones and the kernel's window below θ_i) are gathered as a CSR code list,
so the decoder and the whole backward pass are sparse products over those entries (``sae.topk``'s kernels),
not [N, d_sae] matmuls.
θ is a plain fp32 parameter (a log-parameterised θ barely moves under Adam) and stays fp32 even if the
module is cast to another dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, TrainOutput, _flatten, csr_crow, register, require_non_negative, sum_sq
from monoscope.sae.topk import SparseEncode, fired_from, sparse_decode


def _rect(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return (((z - theta) / eps).abs() < 0.5).to(z.dtype)


def _to_shape(g: Tensor, theta: Tensor) -> Tensor:
    """θ's gradient: summed over tokens for a shared [m] θ, elementwise for θ gathered to z's shape."""
    return (g.sum(0) if g.dim() > theta.dim() else g).to(theta.dtype)


def window_codes(z: Tensor, lo: Tensor) -> tuple[Tensor, Tensor, None]:
    """The entries z > lo as a CSR code list (crow [N+1], col [E], no keep mask), ids ascending per token."""
    rows, col = (z > lo).nonzero(as_tuple=True)
    return csr_crow(rows, z.shape[0]), col, None


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        g_z = g * (z > theta)
        g_theta = -(theta / ctx.eps) * _rect(z, theta, ctx.eps) * g
        return g_z, _to_shape(g_theta, theta), None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _rect(z, theta, ctx.eps) * g
        return None, _to_shape(g_theta, theta), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Loss = mse + λ·mean L0. With ``target_l0`` the L0 is held on the target instead: loss = mse, and
    every threshold is used as θ_i·e^μ where μ integrates the L0 error, μ ← μ + r·(L0/target − 1) per
    step (an integral controller on one global threshold scale; the θ_i still learn their relative levels
    from the reconstruction). ``calibrate`` folds e^μ into θ at the end. Gradient penalties did not land:
    the L0 count reaches θ only through a kernel of width ε, and the encoder's drift moved the L0 faster
    (λ·(L0/target − 1)² at target 64 ended at L0 35; a dual-ascent multiplier at target 8 ended at 4).

    Unit-norm decoder (the L0 penalty does not see decoder norms, so scale must be pinned), W_enc = W_decᵀ,
    b_enc = 0, θ = ``jumprelu_init_threshold`` (or, with a target L0, the data quantile: see init_from_data).
    """

    unit_norm_decoder = True
    # Residual streams have a large shared mean (Gemma: ~85% of E‖x‖²); starting b_dec at the geometric median
    # centres the input so thresholds and latents are spent on variation, not on rebuilding the mean.
    median_init = True
    saelens_architecture = "jumprelu"
    sweep_knobs = ("l0_coefficient", "target_l0")  # explicit L0 coefficients win over the target-L0 default
    defaults = {"l0_coefficient": 1.0, "jumprelu_bandwidth": 0.001, "jumprelu_init_threshold": 0.001}
    target_rate = 0.02  # r: how fast μ integrates the L0 error, per step
    dead_decay = 0.01  # share of θ_i taken off per step while latent i is dead (the trainer's dead_mask): a
    # dead latent never reaches its threshold, so neither θ_i nor its encoder row gets a gradient; lowering θ_i
    # lets it fire again (Gemma layer 6, default budget: 43 % -> 20 % dead, CE loss recovered 0.944 -> 0.945)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.jumprelu_bandwidth <= 0:
            raise MonoscopeError(f"jumprelu_bandwidth must be > 0, got {cfg.jumprelu_bandwidth}")
        if cfg.target_l0 is not None and cfg.target_l0 <= 0:
            raise MonoscopeError(f"target_l0 must be > 0 (or unset), got {cfg.target_l0}")
        require_non_negative(cfg, "l0_coefficient")

    @classmethod
    def config_from_saelens(cls, raw, where):
        return {"jumprelu_init_threshold": 0.0}  # the file's thresholds replace it; 0 keeps validation quiet

    def __init__(self, cfg):
        super().__init__(cfg)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))
        self.register_buffer("log_threshold_scale", torch.zeros(()))  # μ of the target-L0 control (checkpointed)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold.data = self.threshold.data.float()
        return self

    def _theta(self) -> Tensor:
        return self.threshold * self.log_threshold_scale.exp() if self.cfg.target_l0 is not None else self.threshold

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_acts(x)
        return z.relu() * (z > self._theta())

    @torch.no_grad()
    def calibrate(self, sample: Tensor) -> None:
        self.threshold.copy_(self._theta())
        self.log_threshold_scale.zero_()

    def training_forward(self, x: Tensor, *, dead_mask: Tensor | None = None,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        x, _ = _flatten(x, self.cfg.d_in)
        x = x.to(self.W_enc.dtype)
        eps = self.cfg.jumprelu_bandwidth
        if dead_mask is not None and self.dead_decay:
            with torch.no_grad():
                self.threshold[dead_mask] *= 1.0 - self.dead_decay
        theta = self._theta()
        # Gather z_i > max(θ_i − ε/2, 0): every entry with a gradient (z ≤ 0 never fires, so it is left out
        # of the kernel's window too), then apply the jump to the gathered values only.
        lo = (theta.detach() - eps / 2).clamp_min(0.0).to(x.dtype)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        z, col, crow = SparseEncode.apply(x, b_dec, self.W_enc, self.b_enc, lambda pre: window_codes(pre, lo))
        z, theta_g, n = z.float(), theta[col], x.shape[0]
        vals = JumpReLUFn.apply(z, theta_g, eps)
        x_hat = sparse_decode(vals.to(self.W_dec.dtype), col, self.W_dec, crow) + self.b_dec
        mse = sum_sq(x - x_hat)
        if self.cfg.target_l0 is None:
            l0 = StepFn.apply(z, theta_g, eps).sum() / n
            penalty = l0
            loss = mse + self.cfg.l0_coefficient * sparsity_scale * penalty
        else:
            l0 = (vals > 0).sum().float() / n
            penalty = (l0 / self.cfg.target_l0 - 1).detach()  # the controller's error, reported
            loss = mse
            with torch.no_grad():
                self.log_threshold_scale.add_(self.target_rate * penalty)
        return TrainOutput(x_hat=x_hat, loss=loss, l0=l0.detach(), fired=fired_from(col, vals.detach(), self.cfg.d_sae),
                           idx=col, vals=vals, crow=crow,
                           terms={"mse": mse.detach(), "l0_penalty": penalty.detach(), "l0": l0.detach()})

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """With a target L0, start each θ_i at the quantile of z_i that fires on target/d_sae of the sample.

        θ moves by about one learning rate per Adam step, so from θ = 0.001 a short run never reaches
        thresholds of order one and ends far denser than its target; starting at the target density lets
        training spend its steps on reconstruction instead.
        """
        super().init_from_data(sample)
        target = self.cfg.target_l0
        if target is None or target >= self.cfg.d_sae:
            return
        z = self.pre_acts(sample.to(self.W_enc.device, self.W_enc.dtype)).relu().float()
        keep = max(1, int(round(z.shape[0] * target / self.cfg.d_sae)))  # rows above θ_i
        theta = z.kthvalue(z.shape[0] - keep + 1, dim=0).values if keep < z.shape[0] else z.min(0).values
        self.threshold.copy_(theta.clamp(min=float(self.cfg.jumprelu_init_threshold)))

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=0.0)

    def _activation_unit_tensors(self) -> tuple[str, ...]:
        return ("b_dec", "b_enc", "threshold")

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        super().fold_input_scale(s)
        self.cfg.jumprelu_bandwidth /= s  # ε is in activation units too, should training continue

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"b_enc": self.b_enc, "threshold": self.threshold}
