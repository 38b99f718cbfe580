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
from monoscope.sae.base import SAE, TrainOutput, csr_crow, csr_rows, register, sum_sq, total_variance, _flatten

Selector = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" — the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def uniform_crow(n: int, k: int, device=None) -> Tensor:
    """CSR row pointers of [N, k] codes: k entries per token."""
    return torch.arange(0, n * k + 1, k, device=device)


def _latent_major_mm(crow: Tensor, col: Tensor, weights: Tensor, y: Tensor, m: int) -> Tensor:
    """Σ_e weights[e]·y[token(e)] accumulated into row col[e]: a sparse [m, N] × dense [N, d] product."""
    order = torch.argsort(col, stable=True)
    g_t = csr_tensor(csr_crow(col, m), csr_rows(crow)[order], weights[order], (m, crow.numel() - 1))
    return g_t @ y


def _sampled_rowdot(crow: Tensor, col: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """out[e] = a[token(e)] · w[col[e]] for a [N, d], w [m, d]: the dense product sampled at the entries."""
    pattern = csr_tensor(crow, col, torch.zeros(col.numel(), dtype=a.dtype, device=a.device), (a.shape[0], w.shape[0]))
    return torch.sparse.sampled_addmm(pattern, a, w.t(), beta=0.0).values()


def _bag(col: Tensor, crow: Tensor, w: Tensor, weights: Tensor) -> Tensor:
    """Σ_e weights[e]·w[col[e]] per token: [N, d]."""
    return F.embedding_bag(col, w, crow[:-1], per_sample_weights=weights, mode="sum")


class SparseEncode(torch.autograd.Function):
    """vals = ReLU(z) at the entries ``select(z)`` picks, z = (x − b_dec)·W_enc + b_enc, as a CSR code list.

    ``select`` returns (crow [N+1], col [E], keep [E] bool or None): each token's entries, ids ascending;
    entries not kept get value 0 and no gradient. Duplicate ids in a token (e.g. a latent picked by both
    TopK and AuxK) are allowed. Returns (vals [E], col, crow).
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, select) -> tuple:
        x_c = x - b_dec if b_dec is not None else x
        with torch.no_grad():
            z = torch.addmm(b_enc, x_c, W_enc)
            crow, col, keep = select(z)
            vals = z[csr_rows(crow), col].relu_()
            del z
            if keep is not None:
                vals.mul_(keep)
        ctx.save_for_backward(x_c, W_enc, crow, col, vals)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(col, crow)
        return vals, col, crow

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_col, _g_crow):
        x_c, W_enc, crow, col, vals = ctx.saved_tensors
        m = W_enc.shape[1]
        g = torch.where(vals > 0, g_vals, torch.zeros((), dtype=g_vals.dtype, device=g_vals.device))
        g_x = g_bdec = g_W = g_benc = None
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        if need_W:
            g_W = _latent_major_mm(crow, col, g, x_c, m).t()
        if need_benc or need_bdec:
            col_sum = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, col, g)
            g_benc = col_sum if need_benc else None
            if need_bdec and ctx.has_b_dec:
                g_bdec = -(W_enc @ col_sum)
        if need_x:
            g_x = _bag(col, crow, W_enc.t().contiguous(), g)
        return g_x, g_bdec, g_W, g_benc, None


def sparse_encode(x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor,
                  select: Selector) -> tuple[Tensor, Tensor]:
    """(vals, idx) [N, K] for a selection of K entries per token: ``select(z)`` returns (idx, keep) [N, K]."""
    def flat(z: Tensor):
        idx, keep = select(z)
        shape.append(idx.shape)
        return uniform_crow(*idx.shape, device=z.device), idx.reshape(-1), None if keep is None else keep.reshape(-1)

    shape: list = []
    vals, col, _ = SparseEncode.apply(x, b_dec, W_enc, b_enc, flat)
    return vals.reshape(shape[0]), col.reshape(shape[0])


class SparseDecode(torch.autograd.Function):
    """Σ_e vals[e]·W_dec[col[e]] per token (no b_dec), for a CSR code list whose tokens hold distinct ids."""

    @staticmethod
    def forward(ctx, vals: Tensor, col: Tensor, crow: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(vals, col, crow, W_dec)
        return _bag(col, crow, W_dec, vals)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        vals, col, crow, W_dec = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_vals = _sampled_rowdot(crow, col, g_out, W_dec) if ctx.needs_input_grad[0] else None
        g_W = _latent_major_mm(crow, col, vals, g_out, W_dec.shape[0]) if ctx.needs_input_grad[3] else None
        return g_vals, None, None, g_W


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, crow: Tensor | None = None) -> Tensor:
    """Decode [N, K] codes (``crow`` None) or a CSR code list (vals, col = idx, crow)."""
    if crow is None:
        crow = uniform_crow(*idx.shape, device=idx.device)
    return SparseDecode.apply(vals.reshape(-1), idx.reshape(-1), crow, W_dec)


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
        return sparse_encode(flat.to(self.W_enc.dtype), b_dec, self.W_enc, self.b_enc,
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
        vals, idx = sparse_encode(x.to(self.W_enc.dtype), b_dec, self.W_enc, self.b_enc, select)
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
