"""Feature splitting: a feature of a small dictionary matched to the family of features it becomes in a larger
dictionary trained on the same activations (Bricken et al. 2023, "Towards Monosemanticity", the section on
feature splitting; Bussmann et al. 2024 "Showing SAE latents are not atomic using meta-SAEs" for the caveats).

For each tested small feature ``u`` the **family** is every large feature whose decoder direction has cosine
≥ ``min_cosine`` with ``u``'s (at most ``max_family``, closest first). On held-out rows:

    coverage   P(some family member fires | u fires): the family reproduces where u is active
    precision  P(u fires | some family member fires): the family does not fire where u is silent

``u`` **splits** when its family has two or more members and coverage ≥ ``min_coverage``; it is **kept**
(one-to-one) when a single member does. The result's headline is the share of tested features that split,
with a 95 % Wilson interval over features.

The artifact is one JSON file (``splitting.json``) owned by ``Splitting``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from monoscope.artifacts import JsonResult
from monoscope.errors import MonoscopeError
from monoscope.intervals import wilson


@dataclass
class SplitConfig:
    min_cosine: float = 0.5
    min_coverage: float = 0.5
    max_family: int = 8
    rows: int = 16_384       # held-out rows encoded by both SAEs
    units: int = 256         # live small features tested (a random sample)
    min_firings: int = 20    # a small feature must fire this often on the rows to be tested
    seed: int = 0


@dataclass
class Splitting(JsonResult):
    """Families of the tested small features and the summary; ``save`` / ``load`` own ``splitting.json``."""

    FILE = "splitting.json"
    WHAT = "splitting result"
    FIX = "rerun the split stage (`monoscope run --extra-d-sae ...`)"

    small_d_sae: int
    large_d_sae: int
    config: dict
    families: list[dict] = field(default_factory=list)  # unit, members, cosines, coverage, precision, firings

    @property
    def summary(self) -> dict:
        n = len(self.families)
        split = sum(1 for f in self.families if f["splits"])
        kept = sum(1 for f in self.families if len(f["members"]) == 1 and f["coverage"] >= self.config["min_coverage"])
        low, high = wilson(split, n)
        sizes = [len(f["members"]) for f in self.families]
        return {"tested": n, "split": split, "split_share": split / n if n else float("nan"),
                "split_low": low, "split_high": high, "kept_one_to_one": kept,
                "no_match": sum(1 for s in sizes if s == 0),
                "median_family": float(np.median(sizes)) if sizes else float("nan")}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "summary": self.summary}

    def family_of(self, unit: int) -> dict | None:
        return next((f for f in self.families if f["unit"] == unit), None)


def _firing(sae, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """[rows, d_sae] bool: which latents fire on each row."""
    with torch.no_grad():
        return torch.cat([sae.encode(x[i:i + batch]) > 0 for i in range(0, len(x), batch)])


def find_families(small, large, rows: torch.Tensor, cfg: SplitConfig = SplitConfig()) -> Splitting:
    """Match a sample of ``small``'s live features to their families in ``large`` (see the module docstring);
    ``rows`` are held-out activations at both SAEs' hook."""
    if small.cfg.d_in != large.cfg.d_in or rows.shape[-1] != small.cfg.d_in:
        raise MonoscopeError(f"the SAEs and rows disagree on the input width ({small.cfg.d_in}, {large.cfg.d_in}, "
                             f"{rows.shape[-1]}); match SAEs trained on the same hook")
    x = rows[:cfg.rows].float()
    fires_small = _firing(small, x)
    counts = fires_small.sum(0)
    live = torch.nonzero(counts >= cfg.min_firings).flatten().numpy()
    rng = np.random.default_rng(cfg.seed)
    units = np.sort(rng.choice(live, size=min(cfg.units, len(live)), replace=False)) if len(live) else live
    with torch.no_grad():
        a = torch.nn.functional.normalize(small.W_dec[torch.as_tensor(units, dtype=torch.long)].float(), dim=1)
        b = torch.nn.functional.normalize(large.W_dec.float(), dim=1)
        cos = a @ b.T
    top = cos.topk(min(cfg.max_family, cos.shape[1]), dim=1)
    fires_large = _firing(large, x)
    families = []
    for i, u in enumerate(units.tolist()):
        keep = top.values[i] >= cfg.min_cosine
        members, cosines = top.indices[i][keep].tolist(), top.values[i][keep].tolist()
        on = fires_small[:, u]
        fam = fires_large[:, members].any(1) if members else torch.zeros_like(on)
        coverage = float((on & fam).sum() / on.sum())
        precision = float((on & fam).sum() / fam.sum()) if fam.any() else float("nan")
        families.append({"unit": int(u), "members": members, "cosines": [round(c, 4) for c in cosines],
                         "coverage": coverage, "precision": precision, "firings": int(on.sum()),
                         "splits": len(members) >= 2 and coverage >= cfg.min_coverage})
    return Splitting(small.cfg.d_sae, large.cfg.d_sae, asdict(cfg), families)
