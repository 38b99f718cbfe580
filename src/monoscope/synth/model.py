"""Synthetic models of activations built from known feature directions: SynthSAEBench.

Chanin & Garriga-Alonso (2026), "SynthSAEBench", arXiv 2602.14687. A sample is

    h = b + sum_i a_i f_i        f_i: unit feature directions [F, d], b: a fixed bias

where feature i fires with probability p_i (Zipfian over i), the firing events are correlated through a
Gaussian copula with a low-rank correlation matrix (z = C eps + sqrt(D) eta, fire where z_i > Phi^-1(1-p_i)),
a firing feature's magnitude is relu(N(mu_i, sigma_i^2)), and a forest of hierarchies gates children:
a child survives only when its parent is active, siblings under an exclusive parent are mutually
exclusive (one active sibling, chosen uniformly, survives) and a child's magnitude is scaled by
parent / mean(parent). Firing probabilities are raised so the gated rates come back to p_i.

The model's files are SAELens's layout for a saved ``SyntheticModel`` (``synthetic_model_config.json``,
``synthetic_model.safetensors``, ``hierarchy.json``), so a model published with SAELens (such as the
benchmark's ``synth-sae-bench-16k-v2``) loads here, and SAELens loads a model built here. Building follows
the same recipe and seeds, so the two libraries build the same dictionary (up to float rounding in the
orthogonalisation, which here uses the Gram identity ||E E^T||^2 = ||E^T E||^2: one [d, d] product per step
instead of [F, F] in chunks).

Sampling never draws F Bernoullis per sample. Given the copula's low-rank part m = C eps (one [n, r] x
[r, F] product), each feature fires independently with probability Phi(-(t_i - m_i) / s_i). Pairs whose
probability may exceed a bound q are found from m and drawn directly; all others are drawn by thinning:
candidate pairs at rate q over the whole [n, F] grid (an independent Bernoulli(q) per cell, placed by
geometric gaps), each kept with probability p / q. Both parts are exact, and the hierarchy is applied on
the sparse pairs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from monoscope.artifacts import fsync_dir
from monoscope.errors import MonoscopeError
from monoscope.sae.base import csr_crow
from monoscope.sae.topk import csr_tensor

CONFIG_FILE = "synthetic_model_config.json"
WEIGHTS_FILE = "synthetic_model.safetensors"
HIERARCHY_FILE = "hierarchy.json"
_THINNING_TAU = 2.0  # pairs with (t - m) / s below this are drawn directly; q = Phi(-2) ~ 0.023
_ROW_CHUNK = 512  # rows per block of the [n, F] work (keeps it in cache)


@dataclass
class SynthConfig:
    """How to build a synthetic model. The defaults are SynthSAEBench-16k as published."""

    num_features: int = 16384
    hidden_dim: int = 768
    zipf_exponent: float = 0.5
    max_prob: float = 0.4
    min_prob: float = 5e-4
    roots: int = 128
    branching: int = 4
    max_depth: int = 3
    exclusive_portion: float = 1.0
    compensate: bool = True
    scale_children: bool = True
    correlation_rank: int = 25
    correlation_scale: float = 0.1
    ortho_steps: int = 100
    ortho_lr: float = 3e-4
    mean_start: float = 5.0
    mean_end: float = 4.0
    std_mean: float = 0.5
    std_std: float = 0.5
    bias: float = 0.5
    seed: int = 42

    def validate(self) -> None:
        if self.num_features < 2 or self.hidden_dim < 1:
            raise MonoscopeError(f"a synthetic model needs num_features >= 2 and hidden_dim >= 1, got "
                                 f"{self.num_features} and {self.hidden_dim}")
        if not 0 < self.min_prob < self.max_prob <= 1:
            raise MonoscopeError(f"firing probabilities need 0 < min_prob < max_prob <= 1, got {self.min_prob}, "
                                 f"{self.max_prob}")
        if self.roots and (self.branching < 2 or self.max_depth < 1):
            raise MonoscopeError("a hierarchy needs branching >= 2 and max_depth >= 1")

    def saelens_dict(self) -> dict:
        """The ``synthetic_model_config.json`` SAELens writes for this model."""
        return {
            "num_features": self.num_features, "hidden_dim": self.hidden_dim,
            "firing_probability": {"exponent": self.zipf_exponent, "max_prob": self.max_prob,
                                   "min_prob": self.min_prob, "generator_name": "zipfian"},
            "hierarchy": None if not self.roots else {
                "total_root_nodes": self.roots, "branching_factor": self.branching, "max_depth": self.max_depth,
                "mutually_exclusive_portion": self.exclusive_portion, "mutually_exclusive_min_depth": 0,
                "mutually_exclusive_max_depth": None, "compensate_probabilities": self.compensate,
                "scale_children_by_parent": self.scale_children},
            "orthogonalization": {"num_steps": self.ortho_steps, "lr": self.ortho_lr, "chunk_size": 1024}
            if self.ortho_steps else None,
            "correlation": {"rank": self.correlation_rank, "correlation_scale": self.correlation_scale,
                            "seed": None} if self.correlation_rank else None,
            "std_firing_magnitudes": {"mean": self.std_mean, "std": self.std_std, "min_value": None,
                                      "max_value": None, "generator_name": "folded_normal"},
            "mean_firing_magnitudes": {"start": self.mean_start, "end": self.mean_end, "generator_name": "linear"},
            "bias": self.bias, "dtype": "float32", "seed": self.seed,
        }


PRESETS = {
    "16k": SynthConfig(),
    # a small model of the same shape for tests and quick looks (builds in about a second)
    "tiny": SynthConfig(num_features=1024, hidden_dim=64, roots=16, ortho_steps=50, ortho_lr=0.01,
                        correlation_rank=8, max_prob=0.3, min_prob=2e-3),
}


# ---------------------------------------------------------------------------------------- the recipe

def zipf_probabilities(n: int, exponent: float, max_prob: float, min_prob: float) -> torch.Tensor:
    """1 / rank^exponent, mapped linearly onto [min_prob, max_prob] (most frequent first)."""
    raw = 1.0 / torch.arange(1, n + 1, dtype=torch.float32) ** exponent
    return min_prob + (max_prob - min_prob) * (raw - raw.min()) / (raw.max() - raw.min())


def _node(feature: int, children=None) -> dict:
    return {"feature_index": feature, "mutually_exclusive_children": False, "scale_children_by_parent": False,
            "feature_id": None, "children": children or []}


def generate_forest(cfg: SynthConfig) -> list[dict]:
    """Trees built breadth first over consecutive feature indices: the roots first, then each level."""
    if not cfg.roots:
        return []
    rng = random.Random(cfg.seed + 3)
    roots = [_node(i) for i in range(min(cfg.roots, cfg.num_features))]
    parents, level, nxt = list(roots), [(r, 0) for r in roots], len(roots)
    while level:
        below = []
        for node, depth in level:
            if depth >= cfg.max_depth:
                continue
            for _ in range(cfg.branching):
                if nxt >= cfg.num_features:
                    break
                child = _node(nxt)
                nxt += 1
                node["children"].append(child)
                if depth + 1 < cfg.max_depth:
                    below.append((child, depth + 1))
                    parents.append(child)
        level = below
    eligible = [p for p in parents if len(p["children"]) >= 2]
    for i in rng.sample(range(len(eligible)), int(len(eligible) * cfg.exclusive_portion)):
        eligible[i]["mutually_exclusive_children"] = True
    for p in parents:
        p["scale_children_by_parent"] = cfg.scale_children
    return roots


def compensate(probs: torch.Tensor, roots: list[dict]) -> torch.Tensor:
    """Raise each child's probability by 1 / p(parent), and an exclusive sibling's by 1 + (the others' p) / p(parent),
    so that after gating every feature fires at about its base rate."""
    factor = torch.ones_like(probs)

    def visit(node: dict, parent_p: float) -> None:
        f = node.get("feature_index")
        if f is not None and parent_p > 0:
            factor[f] = 1.0 / parent_p
        p = probs[f].item() if f is not None else parent_p
        for child in node.get("children", []):
            visit(child, p)
        kids = [c["feature_index"] for c in node.get("children", []) if c.get("feature_index") is not None]
        if node.get("mutually_exclusive_children") and len(kids) >= 2 and p > 0:
            total = sum(probs[k].item() for k in kids)
            for k in kids:
                factor[k] *= 1.0 + max(0.0, total - probs[k].item()) / p
    for root in roots:
        visit(root, 1.0)
    return (probs * factor).clamp(max=1.0)


def low_rank_correlation(n: int, rank: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C [n, rank] with entries N(0, scale^2), rows capped so that D = 1 - |C_i|^2 >= 0.01."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, rank, generator=g) * scale
    sq = factor.pow(2).sum(1)
    capped = 1 - sq < 0.01
    factor[capped] *= torch.sqrt(0.99 / sq[capped]).unsqueeze(1)
    return factor, 1 - factor.pow(2).sum(1)


def orthogonalize(vectors: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Adam on sum_{i != j} (f_i . f_j)^2 + F sum_i (|f_i|^2 - 1)^2, then unit rows.

    The off-diagonal sum is ||E^T E||_F^2 - sum_i |f_i|^4 (E: the [F, d] matrix), so a step costs two
    [F, d] x [d, d] products whatever F is."""
    e = (vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-8)).clone().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    n = e.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        sq = e.pow(2).sum(1)
        loss = (e.T @ e).pow(2).sum() - sq.pow(2).sum() + n * (sq - 1).pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (e / e.norm(dim=1, keepdim=True).clamp(min=1e-8)).detach()


def magnitudes(spec, n: int, seed: int) -> torch.Tensor:
    """Per-feature mean or std of the firing magnitude, from SAELens's config forms."""
    if isinstance(spec, (int, float)):
        return torch.full((n,), float(spec))
    kind = spec.get("generator_name")
    if kind == "constant":
        return torch.full((n,), float(spec["value"]))
    if kind == "linear":
        return torch.linspace(spec["start"], spec["end"], n) if n > 1 else torch.tensor([float(spec["start"])])
    if kind == "exponential":
        return spec["start"] * (spec["end"] / spec["start"]) ** torch.linspace(0, 1, n)
    if kind == "folded_normal":
        x = (spec["mean"] + torch.randn(n, generator=torch.Generator().manual_seed(seed)) * spec["std"]).abs()
        lo, hi = spec.get("min_value"), spec.get("max_value")
        return x.clamp(min=lo, max=hi) if lo is not None or hi is not None else x
    raise MonoscopeError(f"unknown firing-magnitude generator {kind!r} in the synthetic model's config; "
                         f"known: constant, linear, exponential, folded_normal")


# ----------------------------------------------------------------------------------------- hierarchy

@dataclass
class _Tree:
    """The forest as arrays: each feature's effective parent, its children (CSR), rescaling and exclusive groups."""
    parent: torch.Tensor  # [F] parent feature or -1
    rescale: torch.Tensor  # [F] scale by parent / mean(parent)
    group: torch.Tensor  # [F] exclusive sibling group or -1
    groups: int
    child_ptr: torch.Tensor  # [F + 1] children of f: child_idx[child_ptr[f]:child_ptr[f + 1]]
    child_idx: torch.Tensor

    @classmethod
    def from_roots(cls, roots: list[dict], n: int) -> "_Tree":
        parent, rescale = torch.full((n,), -1), torch.zeros(n, dtype=torch.bool)
        group, seen, groups = torch.full((n,), -1), torch.zeros(n, dtype=torch.bool), 0
        stack = [(r, -1, False) for r in roots]
        while stack:
            node, eff_parent, scaled = stack.pop()
            f = node.get("feature_index")
            if f is not None:
                if not isinstance(f, int) or not 0 <= f < n or seen[f]:
                    raise MonoscopeError(f"the synthetic model's hierarchy names feature {f!r} twice or outside "
                                         f"0..{n - 1}; the hierarchy file does not fit the model")
                seen[f], parent[f], rescale[f] = True, eff_parent, scaled
            kids = [c["feature_index"] for c in node.get("children", []) if c.get("feature_index") is not None]
            if node.get("mutually_exclusive_children") and len(kids) >= 2:
                group[torch.tensor(kids)] = groups
                groups += 1
            for c in node.get("children", []):
                stack.append((c, f if f is not None else eff_parent, bool(node.get("scale_children_by_parent"))))
        has = parent >= 0
        order = torch.argsort(parent[has], stable=True)
        child_idx = has.nonzero(as_tuple=True)[0][order]
        counts = torch.bincount(parent[has], minlength=n)
        child_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        return cls(parent, rescale, group, groups, child_ptr, child_idx)


# ----------------------------------------------------------------------------------------- the model

class SyntheticModel:
    """A synthetic model: its tensors, the sampler and the files (SAELens's layout)."""

    def __init__(self, config: dict, vectors, bias, probs, mean, std, roots: list[dict], factor=None, diag=None):
        self.config, self.roots = config, roots
        self.vectors, self.bias, self.probs = vectors.float(), bias.float(), probs.float()
        self.mean, self.std = mean.float(), std.float()
        self.factor = None if factor is None else factor.float()
        self.diag = None if diag is None else diag.float()
        self.tree = _Tree.from_roots(roots, self.num_features)
        self._threshold = math.sqrt(2) * torch.erfinv(1 - 2 * self.probs.double()).float()
        self._q = 0.5 * math.erfc(_THINNING_TAU / math.sqrt(2))
        self._s = torch.ones_like(self.probs) if self.diag is None else self.diag.sqrt()
        self._cut = self._threshold - _THINNING_TAU * self._s  # m above this: drawn directly
        self._slope = 1 / (self._s * math.sqrt(2))  # P(fire | m) = erfc((t - m) / (s sqrt 2)) / 2, as a - b m
        self._offset = self._threshold * self._slope
        self._free = (self.tree.parent < 0).nonzero(as_tuple=True)[0]  # roots and features in no tree

    @property
    def num_features(self) -> int:
        return self.vectors.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def build(cls, cfg: SynthConfig) -> "SyntheticModel":
        """The model SAELens's ``SyntheticModel(cfg)`` builds for the same settings."""
        cfg.validate()
        roots = generate_forest(cfg)
        probs = zipf_probabilities(cfg.num_features, cfg.zipf_exponent, cfg.max_prob, cfg.min_prob)
        if roots and cfg.compensate:
            probs = compensate(probs, roots)
        factor = diag = None
        if cfg.correlation_rank:
            factor, diag = low_rank_correlation(cfg.num_features, cfg.correlation_rank, cfg.correlation_scale,
                                                cfg.seed + 4)
        g = torch.Generator().manual_seed(cfg.seed)
        vectors = torch.randn(cfg.num_features, cfg.hidden_dim, generator=g)
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-8)
        bias = torch.zeros(cfg.hidden_dim)
        if cfg.bias:
            b = torch.randn(cfg.hidden_dim, generator=g)
            bias = b / b.norm().clamp(min=1e-8) * float(cfg.bias)
        if cfg.ortho_steps:
            vectors = orthogonalize(vectors, cfg.ortho_steps, cfg.ortho_lr)
        d = cfg.saelens_dict()
        return cls(d, vectors, bias, probs, magnitudes(d["mean_firing_magnitudes"], cfg.num_features, cfg.seed + 2),
                   magnitudes(d["std_firing_magnitudes"], cfg.num_features, cfg.seed + 1), roots, factor, diag)

    # ------------------------------------------------------------------------------------ sampling

    def sample_sparse(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n samples' true feature activations as (row, feature, value) triples, sorted by row then feature.

        Given the copula's low-rank part (eps per row) every firing event is independent, so the trees are
        sampled from the top: a child is drawn only in the rows where its parent survived (a child's draw
        in a row whose parent is off never shows). Exact, and the work follows the active features."""
        eps = (torch.randn(n, self.factor.shape[1], generator=g) if self.factor is not None
               else torch.zeros(n, 0))
        parts = []
        for start in range(0, n, _ROW_CHUNK):
            r, f = self._fire_free(eps[start:start + _ROW_CHUNK], g)
            parts.append((r + start, f))
        r, f = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        r, f, v = self._magnitudes(r, f, g)
        r, f, v = self._exclusive(r, f, v, g)
        out = [(r, f, v)]
        while r.numel():  # one level of the forest per turn
            r, f, v = self._children(r, f, v, eps, g)
            out.append((r, f, v))
        r, f, v = (torch.cat(x) for x in zip(*out))
        order = (r * self.num_features + f).argsort()
        return r[order], f[order], v[order]

    def sample(self, n: int, g: torch.Generator, with_features: bool = False):
        """n hidden activations [n, d] (and, with_features, the dense true activations [n, F])."""
        r, f, v = self.sample_sparse(n, g)
        hidden = csr_tensor(csr_crow(r, n), f, v, (n, self.num_features)) @ self.vectors + self.bias
        if not with_features:
            return hidden
        acts = torch.zeros(n, self.num_features)
        acts[r, f] = v
        return hidden, acts

    def _fire_free(self, eps: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The firing (row, feature) pairs among the features with no parent."""
        free, n = self._free, eps.shape[0]
        nf = free.numel()
        m = eps @ self.factor[free].T if self.factor is not None else torch.zeros(1, nf)
        direct = (m > self._cut[free]).expand(n, -1)
        r, c = direct.nonzero(as_tuple=True)
        keep = torch.rand(r.shape, generator=g) < self._p(m[r if m.shape[0] > 1 else 0, c], free[c])
        r, c = r[keep], c[keep]
        cand = _bernoulli_cells(n * nf, self._q, g)
        cr, cc = cand // nf, cand % nf
        thin = ~direct[cr, cc] & (torch.rand(cand.shape, generator=g) * self._q
                                  < self._p(m[cr if m.shape[0] > 1 else 0, cc], free[cc]))
        return torch.cat([r, cr[thin]]), free[torch.cat([c, cc[thin]])]

    def _p(self, m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """P(feature f fires | the copula's low-rank part m of that feature in that row)."""
        return 0.5 * torch.erfc(self._offset[f] - m * self._slope[f])

    def _magnitudes(self, r, f, g):
        v = (self.mean[f] + self.std[f] * torch.randn(f.shape, generator=g)).relu()
        on = v > 0  # a zero magnitude is not active (it neither gates children nor competes)
        return r[on], f[on], v[on]

    def _children(self, r, f, v, eps, g):
        """The next level: each active parent's children drawn in its row, exclusive siblings thinned to
        one, magnitudes scaled by parent / mean(parent) where the tree says so."""
        t = self.tree
        counts = t.child_ptr[f + 1] - t.child_ptr[f]
        seg = torch.repeat_interleave(torch.arange(r.numel()), counts)  # the parent pair of each draw
        offset = torch.arange(seg.numel()) - (counts.cumsum(0) - counts)[seg]
        kids = t.child_idx[t.child_ptr[f][seg] + offset]
        rows = r[seg]
        m = (eps[rows] * self.factor[kids]).sum(1) if self.factor is not None else torch.zeros(kids.shape)
        mag = (self.mean[kids] + self.std[kids] * torch.randn(kids.shape, generator=g)).relu()
        on = (torch.rand(kids.shape, generator=g) < self._p(m, kids)) & (mag > 0)
        seg, kids, mag = seg[on], kids[on], mag[on]
        exclusive = t.group[kids] >= 0  # all children of one parent share its exclusivity
        score = torch.rand(kids.shape, generator=g)
        best = torch.full((r.numel(),), -1.0).scatter_reduce(0, seg[exclusive], score[exclusive], "amax")
        keep = ~exclusive | (score == best[seg])
        seg, kids, mag = seg[keep], kids[keep], mag[keep]
        mag = mag * torch.where(t.rescale[kids], v[seg] / self.mean[f[seg]], torch.ones(()))
        return r[seg], kids, mag

    def _exclusive(self, r, f, v, g):
        """Exclusive siblings with no parent feature (children of a node that is no feature): one of those
        active in a row, chosen uniformly, survives."""
        grp = self.tree.group[f]
        idx = (grp >= 0).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return r, f, v
        gkey = r[idx] * self.tree.groups + grp[idx]
        order = torch.rand(idx.shape, generator=g).argsort()
        order = order[gkey[order].argsort(stable=True)]  # groups in turn, a random order inside each
        sk = gkey[order]
        first = torch.ones_like(sk, dtype=torch.bool)
        first[1:] = sk[1:] != sk[:-1]
        keep = torch.ones_like(r, dtype=torch.bool)
        keep[idx[order[~first]]] = False
        return r[keep], f[keep], v[keep]

    # ---------------------------------------------------------------------------------------- files

    def save(self, folder: str | Path) -> Path:
        """Write the model in SAELens's layout into a new folder (complete or not at all)."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists():
            raise MonoscopeError(f"{folder} already exists; a synthetic model is saved into a new folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            weights = {"feature_vectors": self.vectors, "bias": self.bias, "firing_probabilities": self.probs}
            if self.factor is not None:
                weights.update(correlation_factor=self.factor, correlation_diag=self.diag)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
            if self.roots:
                (tmp / HIERARCHY_FILE).write_text(json.dumps({"roots": self.roots}) + "\n")
            fsync_dir(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticModel":
        """A model saved here or by SAELens (``SyntheticModel.save``); every mismatch is one clear error."""
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise MonoscopeError(f"{folder} is not a synthetic model: {name} is missing (a SAELens "
                                     f"SyntheticModel folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = _json(folder / CONFIG_FILE)
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in ("num_features", "hidden_dim")):
            raise MonoscopeError(f"{folder / CONFIG_FILE} has no integer num_features and hidden_dim")
        w = _read_weights(folder / WEIGHTS_FILE)
        n, d = cfg["num_features"], cfg["hidden_dim"]
        shapes = {"feature_vectors": (n, d), "bias": (d,), "firing_probabilities": (n,), "correlation_diag": (n,)}
        if "correlation_factor" in w:
            shapes["correlation_factor"] = (n, w["correlation_factor"].shape[-1])
        for key, shape in shapes.items():
            if key in w and tuple(w[key].shape) != shape or key not in w and key in ("feature_vectors", "bias",
                                                                                     "firing_probabilities"):
                got = tuple(w[key].shape) if key in w else "missing"
                raise MonoscopeError(f"{folder / WEIGHTS_FILE}: {key} is {got}, the config says {shape}; the "
                                     f"files do not belong together")
        roots = []
        if (folder / HIERARCHY_FILE).exists():
            h = _json(folder / HIERARCHY_FILE)
            roots = h.get("roots") if isinstance(h, dict) else None
            if not isinstance(roots, list):
                raise MonoscopeError(f"{folder / HIERARCHY_FILE} has no list of roots")
        seed = cfg.get("seed") or 0
        return cls(cfg, w["feature_vectors"], w["bias"], w["firing_probabilities"],
                   magnitudes(cfg.get("mean_firing_magnitudes", 1.0), n, seed + 2),
                   magnitudes(cfg.get("std_firing_magnitudes", 0.0), n, seed + 1), roots,
                   w.get("correlation_factor"), w.get("correlation_diag"))

    # ------------------------------------------------------------------------------------- identity

    def content_hash(self) -> str:
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for t in (self.vectors, self.bias, self.probs, self.mean, self.std, self.factor, self.diag):
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps(self.roots, sort_keys=True).encode())
        return h.hexdigest()[:16]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MonoscopeError(f"{path} is not readable JSON ({err}); copy the synthetic model again") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a truncated or foreign file
        raise MonoscopeError(f"{path} is not a readable safetensors file ({err}); copy it again") from None


def open_model(spec: str) -> SyntheticModel:
    """``16k`` / ``tiny`` (a preset, built once and kept in the cache) or the folder of a saved model."""
    from monoscope.models import cache_dir

    if spec in PRESETS:
        cfg = PRESETS[spec]
        key = hashlib.sha256(json.dumps(cfg.saelens_dict(), sort_keys=True).encode()).hexdigest()[:12]
        folder = cache_dir() / "synth" / f"{spec}-{key}"
        if not (folder / CONFIG_FILE).exists():
            try:
                SyntheticModel.build(cfg).save(folder)
            except MonoscopeError:
                if not (folder / CONFIG_FILE).exists():  # another process saved it first: fine
                    raise
        return SyntheticModel.load(folder)
    if Path(spec).is_dir():
        return SyntheticModel.load(spec)
    raise MonoscopeError(f"unknown synthetic model {spec!r}: name a preset ({', '.join(PRESETS)}) or the folder "
                         f"of a saved SyntheticModel (SAELens's layout)")


def _bernoulli_cells(total: int, q: float, g: torch.Generator) -> torch.Tensor:
    """The cells of range(total) where independent Bernoulli(q) draws succeed, in increasing order: the gaps
    between successes are Geometric(q), floor(log U / log(1 - q)) + 1, so the work follows the successes
    (no sort, no draw per cell)."""
    log_miss, mean = math.log1p(-q), total * q
    parts, last = [], -1
    while True:
        u = 1.0 - torch.rand(int(mean + 4 * math.sqrt(mean) + 64), generator=g, dtype=torch.float64)  # (0, 1]
        cells = last + ((u.log() / log_miss).floor().long() + 1).cumsum(0)
        parts.append(cells[cells < total])
        if cells[-1] >= total:
            return torch.cat(parts)
        last, mean = int(cells[-1]), (total - int(cells[-1])) * q


def generator_for(*parts: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (seed, stream, batch...)."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)



