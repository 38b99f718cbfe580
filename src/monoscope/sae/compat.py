"""One compatibility check for every command that takes an SAE (stats, evaluate, steer, probe, specificity)."""
from __future__ import annotations

from monoscope.errors import MonoscopeError, warn


def check_sae_fits(sae, *, model_name: str | None = None, hook: str | None = None,
                   hooks: dict[str, int] | None = None, source: str = "the store") -> str:
    """Raise a MonoscopeError if ``sae`` was trained on another model, hook or width; return the hook it reads.

    ``model_name``: the model whose activations it will see; ``hook``: the hook asked for (default: the
    SAE's own); ``hooks``: the hook widths available (a store's ``hooks`` or a model's hook table), named
    ``source`` in messages. Every command that takes an SAE calls this before any work.
    """
    cfg = sae.cfg
    if model_name and cfg.model_name and cfg.model_name != model_name:
        raise MonoscopeError(f"the SAE was trained on model {cfg.model_name!r} but the activations come from "
                             f"{model_name!r}; use an SAE trained on {model_name!r}")
    if hook and cfg.hook_name and cfg.hook_name != hook:
        raise MonoscopeError(f"the SAE was trained on hook {cfg.hook_name!r}, not {hook!r}; "
                             f"use hook {cfg.hook_name!r} or an SAE trained on {hook!r}")
    name = hook or cfg.hook_name
    if hooks is None:
        return name
    if not name:
        if len(hooks) != 1:
            raise MonoscopeError(f"the SAE names no hook and {source} holds several ({', '.join(hooks)}); "
                                 f"pass the hook to use")
        name = next(iter(hooks))
    if name not in hooks and not cfg.hook_name:
        raise MonoscopeError(f"hook {name!r} is not in {source}, which holds {', '.join(hooks)}; pass one of these")
    if name not in hooks:
        raise MonoscopeError(f"the SAE reads hook {name!r} but {source} holds {', '.join(hooks)}; "
                             f"extract that hook or use an SAE trained on one of these")
    if hooks[name] != cfg.d_in:
        raise MonoscopeError(f"the SAE expects d_in={cfg.d_in} but hook {name!r} in {source} has width "
                             f"{hooks[name]}; use an SAE trained on this hook of this model")
    return name


def implausible(fvu: float, l0: float, d_sae: int) -> str | None:
    """Why reconstruction numbers measured on real activations say the SAE does not fit them, or None.

    FVU above 1 means the reconstruction is worse than predicting the mean; an L0 of 0 means no latent
    fires; an L0 above half the dictionary means the encoder is not sparse at all.
    """
    if l0 == 0:
        return "no latent fires (L0 = 0)"
    if l0 > d_sae / 2:
        return f"L0 is {l0:.0f} of {d_sae} latents (more than half fire: not sparse)"
    if not fvu == fvu or fvu > 1.0:  # NaN or worse than the mean
        return f"the fraction of variance unexplained is {fvu:.3g} (> 1: worse than predicting the mean)"
    return None


def warn_if_implausible(fvu: float, l0: float, d_sae: int, where: str) -> bool:
    """One warning line when FVU and L0 measured on real activations (``where``) say the SAE does not fit."""
    reason = implausible(fvu, l0, d_sae)
    if reason:
        warn(f"the SAE may not fit {where}: {reason}; check that it was trained on this hook of this model and "
             f"is read with its normalisation (`monoscope info SAE_FOLDER`)")
    return reason is not None
