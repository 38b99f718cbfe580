"""Does a loaded SAE fit the activations it will see? The checks every command that takes an SAE runs first.

Two steps. ``check_sae_fits`` (sae/compat.py) compares names and shapes and raises on a mismatch. Then a
quick self-check encodes a few real activations — the first rows of the store, or a few fixed short texts
(prose, code, French) run through the model — and warns (``MonoscopeWarning``, one line) when the fraction
of variance unexplained or the L0 is implausible: the usual sign of a file read with the wrong
normalisation, architecture or threshold, or an SAE trained on another hook of the same width. It warns
rather than raises because an SAE can be honestly poor; the numbers in the warning let the user decide.
"""
from __future__ import annotations

import weakref

import torch

from monoscope.errors import MonoscopeError
from monoscope.evaluate import rows_without_bos, reconstruction_metrics
from monoscope.sae.compat import check_sae_fits, warn_if_implausible

SAMPLE_TEXTS = (
    "The committee met on Tuesday to discuss the new budget, and most members agreed that the plan was fair.",
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n",
    "Le petit village se trouve au bord de la rivière, entouré de champs et de vieilles maisons en pierre.",
)
STORE_ROWS = 256
_checked_on: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # sae -> {(model name, hook) checked}


@torch.no_grad()
def self_check(sae, acts: torch.Tensor, where: str) -> dict:
    """FVU and L0 of ``sae`` on ``acts`` [n, d_in]; warn when they are implausible. Returns the metrics."""
    device = next(iter(sae.parameters()), torch.empty(0)).device
    m = reconstruction_metrics(sae, [acts], sae.cfg.d_sae, device, show_progress=False)
    warn_if_implausible(m["fvu"], m["l0"], sae.cfg.d_sae, f"{where} ({m['tokens']} activations checked)")
    return m


def sae_for_store(sae, store, hook: str | None = None) -> str:
    """Raise if ``sae`` does not fit ``store`` (model, hook, width), self-check it on the store's first rows,
    and return the hook it reads."""
    hook = check_sae_fits(sae, model_name=store.model, hook=hook, hooks=store.hooks)
    rows = [x for x in rows_without_bos(store, hook, STORE_ROWS, min(STORE_ROWS, store.num_rows))]
    if rows and sum(len(x) for x in rows):
        self_check(sae, torch.cat(rows).float(), f"hook {hook!r} of the store {store.folder}")
    return hook


def sae_for_model(sae, lm, hook: str | None = None) -> str:
    """Raise if ``sae`` does not fit ``lm`` (other model, no hook, other width), self-check it once on a few
    short texts run through ``lm``, and return its hook. ``hook`` names the hook of an SAE whose file does
    not record one (Gemma Scope 1's params.npz); it must agree with the file where the file has one."""
    from monoscope.hookpoints import resolve, text_activations

    check_sae_fits(sae, model_name=lm.name, hook=hook)  # first: another model's hook names may not resolve here
    hook = sae.cfg.hook_name or hook
    if not hook:
        raise MonoscopeError("the SAE does not record the hook it reads; name it (monoscope steer --hook, "
                             "probe --layers N --hook-kind KIND)")
    check_sae_fits(sae, hook=hook, hooks={hook: resolve(lm.model, hook).width}, source=f"model {lm.name!r}")
    sae.cfg.hook_name = hook  # a file without its hook now carries the one named, checked above
    seen = _checked_on.setdefault(sae, set())
    if (lm.name, hook) not in seen:
        seen.add((lm.name, hook))
        self_check(sae, text_activations(lm, hook, SAMPLE_TEXTS), f"hook {hook!r} of {lm.name}")
    return hook
