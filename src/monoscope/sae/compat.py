"""One compatibility check for every command that takes an SAE (stats, evaluate, steer, probe, specificity)."""
from __future__ import annotations

from monoscope.errors import MonoscopeError


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
