"""TopK SAE (Gao et al. 2024) with AuxK dead-latent revival, and the sparse kernels the TopK family shares.

Why custom autograd: only k of the m latents are active per token, so dL/dz is zero outside N·k entries.
Plain autograd still runs three dense [N, m]-sized matmuls backwards (dW_enc, dx, and the dense decoder);
here the encoder backward and the decoder are sparse products over the N·k selected entries:

- forward: z = (x − b_dec)·W_enc + b_enc densely (the one unavoidable matmul), pick latents, gather values,
  decode with ``embedding_bag`` (a gather of k decoder rows per token);
- backward: dW_enc = (x − b_dec)ᵀ·G and dW_dec = Fᵀ·dx̂ as CSR sparse × dense products (G, F hold N·k
  entries), dF at the selected entries only (``sampled_addmm``), db_dec from the encoder path as
  −W_enc·Σ_t G_t (one mat-vec, no [N, d] product).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, TrainOutput, register, sum_sq, total_variance, _flatten

Selector = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" — the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _by_latent(idx: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the (token, slot) pairs of ``idx`` [N, K] by latent: the CSR structure of the [m, N] transpose."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = torch.div(order, k, rounding_mode="floor")
    crow = torch.zeros(m + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=m), 0, out=crow[1:])
    return order, tokens, crow


def _latent_major_mm(idx: Tensor, weights: Tensor, y: Tensor, m: int) -> Tensor:
    """Σ_t Σ_s weights[t,s]·y[t] accumulated into row idx[t,s]: a sparse [m, N] × dense [N, d] product."""
    order, tokens, crow = _by_latent(idx, m)
    g_t = csr_tensor(crow, tokens, weights.reshape(-1)[order], (m, idx.shape[0]))
    return g_t @ y


def _sampled_rowdot(idx: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """out[t, s] = a[t] · w[idx[t, s]] for a [N, d], w [m, d]: the dense product sampled at N·K entries."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    pattern = csr_tensor(crow, idx.reshape(-1), torch.zeros(n * k, dtype=a.dtype, device=a.device), (n, w.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, a, w.t(), beta=0.0)
    return out.values().reshape(n, k)


class SparseEncode(torch.autograd.Function):
    """vals = ReLU(z)[idx] with z = (x − b_dec)·W_enc + b_enc and idx chosen by ``select(z)``.

    ``select`` returns (idx [N, K] long, keep [N, K] bool or None); entries not kept get value 0 and no
    gradient. Duplicate ids in a row (e.g. a latent picked by both TopK and AuxK) are allowed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor,
                select: Selector) -> tuple[Tensor, Tensor]:
        x_c = x - b_dec if b_dec is not None else x
        with torch.no_grad():
            z = torch.addmm(b_enc, x_c, W_enc)
            idx, keep = select(z)
            vals = z.gather(1, idx).relu_()
            del z
            if keep is not None:
                vals.mul_(keep)
        ctx.save_for_backward(x_c, W_enc, idx, vals)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor | None):
        x_c, W_enc, idx, vals = ctx.saved_tensors
        m = W_enc.shape[1]
        g = torch.where(vals > 0, g_vals, torch.zeros((), dtype=g_vals.dtype, device=g_vals.device))
        g_x = g_bdec = g_W = g_benc = None
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        if need_W:
            g_W = _latent_major_mm(idx, g, x_c, m).t()
        if need_benc or need_bdec:
            col_sum = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            g_benc = col_sum if need_benc else None
            if need_bdec and ctx.has_b_dec:
                g_bdec = -(W_enc @ col_sum)
        if need_x:
            g_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        return g_x, g_bdec, g_W, g_benc, None


class SparseDecode(torch.autograd.Function):
    """Σ_s vals[t,s]·W_dec[idx[t,s]] (no b_dec). ``idx`` rows must hold distinct ids."""

    @staticmethod
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_out: Tensor):
        vals, idx, W_dec = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_vals = _sampled_rowdot(idx, g_out, W_dec) if ctx.needs_input_grad[0] else None
        g_W = _latent_major_mm(idx, vals, g_out, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return g_vals, None, g_W


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    return SparseDecode.apply(vals, idx, W_dec)


def topk_indices(z: Tensor, k: int) -> Tensor:
    """Row-wise top-k ids, sorted ascending within each row (the CSR kernels want sorted columns)."""
    return z.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def aux_indices(z: Tensor, dead_idx: Tensor, k_aux: int) -> Tensor:
    """Row-wise top-k_aux among the dead latents only (AuxK)."""
    sub = z.index_select(1, dead_idx)
    pick = sub.topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False).indices
    return dead_idx[pick].sort(dim=1).values


def dead_ids(dead_mask: Tensor | None, m: int) -> Tensor | None:
    if dead_mask is None:
        return None
    ids = torch.nonzero(dead_mask.reshape(-1)[:m], as_tuple=False).reshape(-1)
    return ids if ids.numel() else None


def auxk_loss(x_hat_err: Tensor, aux_vals: Tensor, aux_idx: Tensor, W_dec: Tensor) -> Tensor:
    """‖e − ê‖² / ‖e − ē‖² with e the (detached) residual and ê the dead latents' decode without b_dec."""
    e = x_hat_err.detach()
    e_hat = sparse_decode(aux_vals, aux_idx, W_dec)
    return sum_sq(e - e_hat) / total_variance(e)


def fired_from(idx: Tensor, vals: Tensor, m: int) -> Tensor:
    fired = torch.zeros(m, dtype=torch.bool, device=idx.device)
    fired[idx[vals > 0]] = True
    return fired


@register("topk")
class TopKSAE(SAE):
    """Keep the k largest pre-activations per token (ReLU'd). Unit-norm decoder, b_dec from the median."""

    unit_norm_decoder = True
    median_init = True
    saelens_architecture = "topk"
    sweep_knobs = ("k",)
    has_sparse_encode = True
    defaults = {"k": 32, "aux_coefficient": 1 / 32}

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 1 <= cfg.k <= cfg.d_sae:
            raise MonoscopeError(f"k={cfg.k} must be between 1 and d_sae={cfg.d_sae}; lower k or widen the SAE")
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise MonoscopeError(f"aux_k={cfg.aux_k} must be ≥ 1 (or unset for d_in // 2)")

    @classmethod
    def saelens_fields(cls, cfg) -> dict:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def config_from_saelens(cls, raw, where):
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
        if not (isinstance(k, int) and not isinstance(k, bool)):
            raise MonoscopeError(f"{where}: a topk SAE needs an integer 'k', got {k!r}")
        return {"k": k}

    @torch.no_grad()
    def after_saelens_load(self, raw) -> None:
        """SAELens's rescale_acts_by_decoder_norm computes topk(z·‖d‖) and decodes (f/‖d‖)·W_dec; fold the
        norms into W_enc, b_enc and W_dec so the plain TopK maps compute the same."""
        if raw.get("rescale_acts_by_decoder_norm"):
            n = self.W_dec.norm(dim=1)
            self.W_enc.mul_(n)
            self.b_enc.mul_(n)
            self.W_dec.div_(n[:, None])

    def __init__(self, cfg):
        super().__init__(cfg)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(vals, idx) [N, k] for [N, d_in] input, without materialising a dense f."""
        flat, _ = _flatten(x, self.cfg.d_in)
        k = self.cfg.k
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return SparseEncode.apply(flat.to(self.W_enc.dtype), b_dec, self.W_enc, self.b_enc,
                                  lambda z: (topk_indices(z, k), None))

    def encode(self, x: Tensor) -> Tensor:
        flat, lead = _flatten(x, self.cfg.d_in)
        vals, idx = self.encode_sparse(flat)
        f = torch.zeros(flat.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return f.scatter_(1, idx, vals).reshape(*lead, self.cfg.d_sae)

    def forward(self, x: Tensor) -> Tensor:
        flat, lead = _flatten(x, self.cfg.d_in)
        vals, idx = self.encode_sparse(flat)
        return (sparse_decode(vals, idx, self.W_dec) + self.b_dec).reshape(*lead, self.cfg.d_in)

    # The selection rule is the only thing BatchTopK / Matryoshka change.
    def _select_main(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return topk_indices(z, self.cfg.k), None

    def _encode_train(self, x: Tensor, dead_mask: Tensor | None):
        """Main (vals, idx) and AuxK (vals, idx) from one dense encoder matmul."""
        m = self.cfg.d_sae
        dead = dead_ids(dead_mask, m)
        split: list[int] = []

        def select(z: Tensor):
            idx, keep = self._select_main(z)
            split.append(idx.shape[1])
            self._observe_selection(z, idx, keep)
            if dead is None:
                return idx, keep
            aux = aux_indices(z, dead, self.cfg.aux_k_resolved)
            if keep is not None:
                keep = torch.cat([keep, torch.ones_like(aux, dtype=torch.bool)], 1)
            return torch.cat([idx, aux], 1), keep

        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        vals, idx = SparseEncode.apply(x.to(self.W_enc.dtype), b_dec, self.W_enc, self.b_enc, select)
        k = split[0]
        main = (vals[:, :k], idx[:, :k])
        aux = (vals[:, k:], idx[:, k:]) if dead is not None else None
        return main, aux

    def _observe_selection(self, z: Tensor, idx: Tensor, keep: Tensor | None) -> None:
        """Hook for BatchTopK's threshold EMA (called under no_grad inside the forward)."""

    def training_forward(self, x: Tensor, *, dead_mask: Tensor | None = None,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        x, _ = _flatten(x, self.cfg.d_in)
        x = x.to(self.W_enc.dtype)
        (vals, idx), aux = self._encode_train(x, dead_mask)
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        err = x - x_hat
        mse = sum_sq(err)
        fvu = mse / total_variance(x)
        loss, extra = self._recon_loss(x, vals, idx, fvu)
        terms = {"mse": mse.detach(), "fvu": fvu.detach(), **extra}
        if aux is not None:
            l_aux = auxk_loss(err, aux[0], aux[1], self.W_dec)
            loss = loss + self.cfg.aux_coefficient * l_aux
            terms["aux"] = l_aux.detach()
        else:
            terms["aux"] = torch.zeros((), device=x.device)
        l0 = (vals > 0).sum(1).float().mean()
        terms["l0"] = l0
        return TrainOutput(x_hat=x_hat, loss=loss, terms=terms, l0=l0, fired=fired_from(idx, vals, self.cfg.d_sae),
                           idx=idx, vals=vals)

    def _recon_loss(self, x: Tensor, vals: Tensor, idx: Tensor, fvu: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The reconstruction part of the loss (Matryoshka replaces it with its prefix losses)."""
        return fvu, {}
