"""What a latent's decoder direction says on its own: nearest decoder neighbours and direct logit effects.

Neighbours: cosine of decoder directions, W_dec·W_decᵀ one block of rows at a time. Logit effects: the
direction scaled by the final norm's weight (1 + weight for Gemma RMSNorms; centred first for LayerNorm)
times the unembedding → top promoted / suppressed tokens.
"""
from __future__ import annotations

import torch

INF = float("inf")


def decoder_directions(sae) -> torch.Tensor:
    """Each latent's direction in the raw activation space: decode(e_i) − decode(0) (so any folded
    normalisation or scaling inside ``decode`` is respected)."""
    W = sae.W_dec.detach().float()
    probe = torch.zeros(2, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    probe[1, 0] = 1.0
    with torch.no_grad():
        d0 = sae.decode(probe)
    if torch.allclose((d0[1] - d0[0]).float().cpu(), W[0].cpu(), atol=1e-5, rtol=1e-4):
        return W.cpu()
    # decode is not plain f·W_dec + b_dec: build every direction through it, in blocks
    rows = []
    with torch.no_grad():
        zero = sae.decode(torch.zeros(1, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device))
        for a in range(0, sae.cfg.d_sae, 1024):
            b = min(a + 1024, sae.cfg.d_sae)
            eye = torch.zeros(b - a, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            eye[torch.arange(b - a), torch.arange(a, b)] = 1.0
            rows.append((sae.decode(eye) - zero).float().cpu())
    return torch.cat(rows)


def decoder_neighbours(sae, n: int, block: int = 1024) -> dict[str, torch.Tensor]:
    """Top-n other latents by cosine of decoder directions (W_dec·W_decᵀ one block of rows at a time)."""
    W = decoder_directions(sae)
    m = W.shape[0]
    if n == 0 or m < 2:
        return {}
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx, cos = [], []
    for a in range(0, m, block):
        b = min(a + block, m)
        sim = Wn[a:b] @ Wn.T
        sim[torch.arange(b - a), torch.arange(a, b)] = -INF
        t = torch.topk(sim, min(n, m - 1), dim=1)
        idx.append(t.indices)
        cos.append(t.values)
    return {"neighbours": torch.cat(idx), "neighbours_cos": torch.cat(cos)}


def final_norm_scale(lm) -> tuple[torch.Tensor | None, bool]:
    """(per-dimension scale of the final norm or None, whether it centres like LayerNorm)."""
    from monoscope.hookpoints import family_spec

    norm = lm.model.get_submodule(family_spec(lm.model).final_norm)
    weight = getattr(norm, "weight", None)
    centred = isinstance(norm, torch.nn.LayerNorm)
    if weight is None:
        return None, centred
    w = weight.detach().float().cpu()
    if lm.model.config.model_type in ("gemma", "gemma2", "gemma3_text", "gemma3"):
        w = 1.0 + w  # Gemma's RMSNorm multiplies by (1 + weight)
    return w, centred


def logit_effects(lm, directions: torch.Tensor, n: int, block_elems: int = 1 << 25) -> dict[str, torch.Tensor]:
    """Direct effect of each direction on the logits: (d ⊙ final-norm scale) · W_Uᵀ; top ±n tokens."""
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    if directions.shape[1] != W_U.shape[1]:
        return {}  # e.g. an SAE on mlp_neurons: not in the residual space the unembedding reads
    scale, centred = final_norm_scale(lm)
    D = directions.float()
    if centred:
        D = D - D.mean(1, keepdim=True)
    if scale is not None:
        D = D * scale
    V = W_U.shape[0]
    n = min(n, V)
    step = max(1, block_elems // V)
    pos_i, pos_v, neg_i, neg_v = [], [], [], []
    for a in range(0, D.shape[0], step):
        logits = D[a:a + step] @ W_U.T
        p, q = torch.topk(logits, n, dim=1), torch.topk(logits, n, dim=1, largest=False)
        pos_i.append(p.indices), pos_v.append(p.values), neg_i.append(q.indices), neg_v.append(q.values)
    return {"logits_pos": torch.cat(pos_i), "logits_pos_values": torch.cat(pos_v),
            "logits_neg": torch.cat(neg_i), "logits_neg_values": torch.cat(neg_v)}
