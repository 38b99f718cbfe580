"""Reading SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), ours included.

- Ours carry the full monoscope config in ``metadata.monoscope_config``: the exact class is rebuilt and the
  SAELens-level fields must agree with it.
- Plain SAELens folders of architecture standard / topk / jumprelu / gated (BatchTopK and Matryoshka are saved
  by SAELens as jumprelu). Pre-6.0 configs are read too (``hook_point``, ``activation_fn_str`` "topk" with
  ``activation_fn_kwargs.k`` is a TopK SAE, never a ReLU one).
- ``normalize_activations``: "none"; "expected_average_only_in" with its factor given as ``norm_scaling_factor``
  in cfg.json (folded as SAELens's fold_activation_norm_scaling_factor does: W_enc·s, W_dec/s, b_dec/s). The
  per-token modes (constant_norm_rescale, layer_norm) and covariance_whitening are refused: their decoder needs
  the input's own norm or statistics that monoscope's fixed affine SAEs cannot hold.
- ``rescale_acts_by_decoder_norm`` (topk) is folded into the weights by TopKSAE.after_saelens_load.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from monoscope.config import from_dict
from monoscope.errors import MonoscopeError
from monoscope.sae.base import REGISTRY, SAE, SAEConfig
from monoscope.sae.reading import (CFG_FILE, WEIGHTS_FILE, build, canonical_hook, fill, read_json_object,
                                   read_safetensors)

PER_TOKEN_NORMS = ("constant_norm_rescale", "layer_norm", "covariance_whitening")


def from_saelens() -> dict[str, str]:
    """SAELens architecture name -> ours, for the architectures whose saved form is the whole model."""
    return {cls.saelens_architecture: name for name, cls in REGISTRY.items() if cls.saelens_exact}


def read_saelens(path: Path) -> SAE:
    """The SAE in the SAELens-layout folder ``path`` (ours or SAELens's own)."""
    cfg_path = path / CFG_FILE
    raw = read_json_object(cfg_path)
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise MonoscopeError(f"{cfg_path}: 'metadata' must be a JSON object, got {meta!r}")
    if meta.get("monoscope_config") is not None:
        return _read_ours(path, raw, meta)
    return _read_plain(path, _as_saelens_6(raw, cfg_path), meta)


def _read_ours(path: Path, raw: dict[str, Any], meta: dict[str, Any]) -> SAE:
    cfg_path = path / CFG_FILE
    cfg = _our_config(meta["monoscope_config"], cfg_path)
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise MonoscopeError(f"{cfg_path} has no {key!r}; SAELens needs it: save the SAE again")
    _check_agrees(cfg, {"d_in": raw.get("d_in"), "d_sae": raw.get("d_sae"), "model_name": meta.get("model_name"),
                        "hook_name": meta.get("hook_name")}, cfg_path)
    sae = fill(build(cfg, cfg_path), read_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
    sae.loaded_format = f"monoscope ({CFG_FILE} + {WEIGHTS_FILE}, SAELens layout, exact config in metadata)"
    sae.load_notes = []
    return sae


def _as_saelens_6(raw: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """A pre-6.0 SAELens cfg.json in 6.0 terms (as SAELens's handle_pre_6_0_config reads it), but a TopK
    activation without k is an error, not a ReLU SAE."""
    raw = dict(raw)
    act = raw.get("activation_fn", raw.get("activation_fn_str"))
    arch = raw.get("architecture", "standard")
    if act == "topk" and arch == "standard":
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise MonoscopeError(f"{cfg_path}: activation_fn is 'topk' but no k is given; add \"k\": <latents per "
                                 f"token> to cfg.json (SAELens would silently load it as a ReLU SAE)")
        raw.update(architecture="topk", k=k)
    elif act not in (None, "relu", "topk") and arch == "standard":
        raise MonoscopeError(f"{cfg_path}: activation function {act!r} is not supported; standard SAEs use relu")
    if isinstance(raw.get("normalize_activations"), bool):
        raw["normalize_activations"] = "expected_average_only_in" if raw["normalize_activations"] else "none"
    return raw


def _input_scale(raw: dict[str, Any], cfg_path: Path) -> float | None:
    """The constant s the SAE's training inputs were multiplied by (None: none)."""
    norm = raw.get("normalize_activations", "none")
    if norm in ("none", None):
        return None
    if norm in PER_TOKEN_NORMS:
        raise MonoscopeError(f"{cfg_path}: normalize_activations={norm!r} is not supported: the reconstruction "
                             f"depends on statistics of each input that a fixed SAE cannot hold; fold it with "
                             f"SAELens if it can, or use an SAE trained without it")
    if norm != "expected_average_only_in":
        raise MonoscopeError(f"{cfg_path}: unknown normalize_activations {norm!r}; SAELens knows none, "
                             f"expected_average_only_in, {', '.join(PER_TOKEN_NORMS)}")
    s = raw.get("norm_scaling_factor")
    if s is None:
        raise MonoscopeError(f"{cfg_path}: normalize_activations='expected_average_only_in' scales inputs by a factor "
                             f"that is not in this folder; add it to cfg.json as \"norm_scaling_factor\" (SAELens's "
                             f"pretrained_saes.yaml lists it), or fold it with SAELens "
                             f"(fold_activation_norm_scaling_factor) and save again")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
        raise MonoscopeError(f"{cfg_path}: norm_scaling_factor must be a finite positive number, got {s!r}")
    return float(s)


def _read_plain(path: Path, raw: dict[str, Any], meta: dict[str, Any]) -> SAE:
    cfg_path, where = path / CFG_FILE, str(path / WEIGHTS_FILE)
    arch_name = raw.get("architecture", "standard")
    known = from_saelens()
    if not isinstance(arch_name, str) or arch_name not in known:
        raise MonoscopeError(f"{cfg_path}: SAELens architecture {arch_name!r} is not supported; "
                             f"supported: {', '.join(known)}")
    if raw.get("reshape_activations") not in (None, "none"):
        raise MonoscopeError(f"{cfg_path}: reshape_activations={raw['reshape_activations']!r} (per-head hook_z SAEs) "
                             f"is not supported; monoscope's hooks are flat [.., d_model] activations")
    if raw.get("hook_head_index", raw.get("hook_point_head_index")) is not None:
        raise MonoscopeError(f"{cfg_path}: SAEs of a single attention head (hook_head_index) are not supported")
    scale = _input_scale(raw, cfg_path)
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
            raise MonoscopeError(f"{cfg_path}: {key!r} must be an integer, got {raw.get(key)!r}")
    cls = REGISTRY[known[arch_name]]
    hook = str(meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "")
    cfg = SAEConfig(
        architecture=known[arch_name], d_in=raw["d_in"], d_sae=raw["d_sae"],
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_name=canonical_hook(hook),
        model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
        **cls.config_from_saelens(raw, str(cfg_path)),
    )
    sae = build(cfg, cfg_path)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    notes = [f"hook {hook!r} read as monoscope's {cfg.hook_name!r}"] if hook != cfg.hook_name else []
    if scale is not None:
        tensors = _fold_norm_scaling(tensors, scale, where)
        notes.append(f"normalize_activations expected_average_only_in: factor {scale:g} folded into the weights")
    sae = fill(sae, tensors, where)
    sae.after_saelens_load(raw)
    if raw.get("rescale_acts_by_decoder_norm"):
        notes.append("rescale_acts_by_decoder_norm: decoder norms folded into the encoder (unit-norm decoder)")
    sae.load_notes = notes
    return sae


def _fold_norm_scaling(tensors: dict[str, torch.Tensor], s: float, where: str) -> dict[str, torch.Tensor]:
    """SAELens's fold_activation_norm_scaling_factor on the raw tensors: the SAE then reads raw activations."""
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise MonoscopeError(f"{where}: tensors {missing} are missing")
    out = dict(tensors)
    out["W_enc"] = tensors["W_enc"].float() * s
    out["W_dec"] = tensors["W_dec"].float() / s
    out["b_dec"] = tensors["b_dec"].float() / s
    return out


def _check_agrees(cfg: SAEConfig, stated: dict[str, Any], cfg_path: Path) -> None:
    """The SAELens-level fields of cfg.json (what other tools read) must say what monoscope's own config says;
    a hand edit of one but not the other is an error, not a silent choice."""
    for key, value in stated.items():
        if value is not None and value != getattr(cfg, key):
            raise MonoscopeError(f"{cfg_path}: {key} is {value!r} but metadata.monoscope_config says "
                                 f"{getattr(cfg, key)!r}; the file was edited by hand, make them agree or save "
                                 f"the SAE again")


def _our_config(ours: Any, cfg_path: Path) -> SAEConfig:
    """The SAEConfig saved in ``metadata.monoscope_config``, every field checked (type, presence)."""
    if not isinstance(ours, dict):
        raise MonoscopeError(f"{cfg_path}: metadata.monoscope_config must be a JSON object, got {ours!r}")
    required = [f.name for f in dataclasses.fields(SAEConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in ours]
    if missing:
        raise MonoscopeError(f"{cfg_path}: metadata.monoscope_config lacks {missing}; the file is incomplete, "
                             f"save the SAE again")
    return from_dict(SAEConfig, ours, where=str(cfg_path))
