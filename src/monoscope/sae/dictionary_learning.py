"""dictionary_learning (saprmarks) checkpoints: ``ae.pt`` (a state dict) + ``config.json`` ({"trainer": {...}}).

The dictionary class comes from ``trainer.dict_class`` (or, without config.json, from keys only one class has).
Each class is one small mapper from its parameter names to a monoscope SAE:

| dict_class             | keys                                                        | becomes    |
|------------------------|-------------------------------------------------------------|------------|
| AutoEncoder            | encoder.weight [m, d], encoder.bias, decoder.weight [d, m], bias | relu  |
| AutoEncoderNew         | encoder.*, decoder.weight, decoder.bias (x not centred)      | relu       |
| GatedAutoEncoder       | encoder.weight, decoder.weight, decoder_bias, r_mag, gate_bias, mag_bias | gated |
| AutoEncoderTopK        | encoder.*, decoder.weight, b_dec, k, threshold              | topk       |
| BatchTopKSAE           | as AutoEncoderTopK; inference thresholds relu(pre) at θ     | batchtopk  |
| MatryoshkaBatchTopKSAE | W_enc [d, m], b_enc, W_dec, b_dec, k, threshold, group_sizes | matryoshka |
| JumpReluAutoEncoder    | W_enc [d, m], b_enc, W_dec, b_dec, threshold (x not centred) | jumprelu  |

AutoEncoder is read as the library's ``from_pretrained`` reads it by default: decoder columns normalised to 1
with the norms moved into the encoder (same reconstruction; latents in units of unit decoder directions).
The file is read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, SAEConfig
from monoscope.sae.reading import build, fill, int_setting, matrix_shape, pick, read_json_object, read_torch_state

Mapped = tuple[str, dict[str, Any], dict[str, torch.Tensor], list[str]]  # architecture, settings, tensors, notes


def _encoder_linear(state: dict, where: Path) -> tuple[int, int]:
    m, d = matrix_shape(state, "encoder.weight", where)
    return d, m


def _k(state: dict, trainer: dict, where: Path) -> int:
    """k from the state dict's buffer and/or config.json; both absent asks, a disagreement is an error."""
    in_file = None
    if isinstance(state.get("k"), torch.Tensor):
        if state["k"].numel() != 1:
            raise MonoscopeError(f"{where}: tensor 'k' has shape {tuple(state['k'].shape)}, expected ()")
        in_file = int(state["k"].item())
    in_cfg = trainer.get("k")
    if in_file is not None and in_cfg is not None and in_file != in_cfg:
        raise MonoscopeError(f"{where}: k is {in_file} in the file but {in_cfg!r} in config.json; make them agree")
    k = in_file if in_file is not None else in_cfg
    if k is None:
        raise MonoscopeError(f"{where}: a TopK dictionary without k; put config.json ({{\"trainer\": {{\"k\": ...}}}}) "
                             f"beside it with the k it was trained with")
    return int_setting({"k": k}, "k", where)


def _relu(state: dict, trainer: dict, where: Path) -> Mapped:
    d, m = _encoder_linear(state, where)
    t = pick(state, {"encoder.weight": (m, d), "encoder.bias": (m,), "decoder.weight": (d, m), "bias": (d,)}, where)
    w_dec = t["decoder.weight"].t().float()
    norms = w_dec.norm(dim=1).clamp_min(1e-12)
    tensors = {"W_enc": t["encoder.weight"].t().float() * norms, "b_enc": t["encoder.bias"].float() * norms,
               "W_dec": w_dec / norms[:, None], "b_dec": t["bias"]}
    return "relu", {}, tensors, ["decoder columns normalised to 1, norms folded into the encoder "
                                 "(as dictionary_learning's from_pretrained does by default)"]


def _relu_new(state: dict, trainer: dict, where: Path) -> Mapped:
    d, m = _encoder_linear(state, where)
    t = pick(state, {"encoder.weight": (m, d), "encoder.bias": (m,), "decoder.weight": (d, m),
                     "decoder.bias": (d,)}, where)
    tensors = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].t(),
               "b_dec": t["decoder.bias"]}
    return "relu", {"apply_b_dec_to_input": False}, tensors, []


def _gated(state: dict, trainer: dict, where: Path) -> Mapped:
    d, m = _encoder_linear(state, where)
    t = pick(state, {"encoder.weight": (m, d), "decoder.weight": (d, m), "decoder_bias": (d,), "r_mag": (m,),
                     "gate_bias": (m,), "mag_bias": (m,)}, where)
    tensors = {"W_enc": t["encoder.weight"].t(), "W_dec": t["decoder.weight"].t(), "b_dec": t["decoder_bias"],
               "b_gate": t["gate_bias"], "b_mag": t["mag_bias"], "r_mag": t["r_mag"]}
    return "gated", {}, tensors, []


def _topk_like(state: dict, trainer: dict, where: Path, arch: str) -> Mapped:
    d, m = _encoder_linear(state, where)
    shapes = {"encoder.weight": (m, d), "encoder.bias": (m,), "decoder.weight": (d, m), "b_dec": (d,)}
    if arch == "batchtopk":
        shapes["threshold"] = ()
    t = pick(state, shapes, where, optional=("k", "threshold"))
    tensors = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].t(),
               "b_dec": t["b_dec"]}
    notes = []
    if arch == "batchtopk":
        tensors["threshold"] = _global_threshold(t["threshold"], m, where)
        notes.append("inference form: relu(pre) kept where above the global threshold (the library's default)")
    return arch, {"k": _k(state, trainer, where)}, tensors, notes


def _global_threshold(theta: torch.Tensor, m: int, where: Path) -> torch.Tensor:
    value = float(theta)
    if value < 0:
        raise MonoscopeError(f"{where}: threshold is {value:g}: it was never set (saved before threshold_start_step), "
                             f"so its inference form is undefined; use a checkpoint from later in training")
    return torch.full((m,), value)


def _matryoshka(state: dict, trainer: dict, where: Path) -> Mapped:
    d, m = matrix_shape(state, "W_enc", where)
    t = pick(state, {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": ()}, where,
             optional=("k", "group_sizes"))
    sizes = [int(s) for s in t.get("group_sizes", torch.tensor(trainer.get("group_sizes") or [m])).reshape(-1)]
    if sum(sizes) != m or min(sizes) < 1:
        raise MonoscopeError(f"{where}: group_sizes {sizes} must be positive and sum to dict_size {m}")
    widths = tuple(int(w) for w in torch.tensor(sizes).cumsum(0))
    tensors = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors["threshold"] = _global_threshold(t["threshold"], m, where)
    return "matryoshka", {"k": _k(state, trainer, where), "matryoshka_widths": widths}, tensors, []


def _jumprelu(state: dict, trainer: dict, where: Path) -> Mapped:
    d, m = matrix_shape(state, "W_enc", where)
    t = pick(state, {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}, where)
    return "jumprelu", {"apply_b_dec_to_input": False, "jumprelu_init_threshold": 0.0}, dict(t), []


CLASSES: dict[str, Callable[[dict, dict, Path], Mapped]] = {
    "AutoEncoder": _relu,
    "AutoEncoderNew": _relu_new,
    "GatedAutoEncoder": _gated,
    "AutoEncoderTopK": lambda s, c, w: _topk_like(s, c, w, "topk"),
    "BatchTopKSAE": lambda s, c, w: _topk_like(s, c, w, "batchtopk"),
    "MatryoshkaBatchTopKSAE": _matryoshka,
    "JumpReluAutoEncoder": _jumprelu,
}


def _class_from_keys(state: dict, where: Path) -> str:
    """The dictionary class when no config.json names it: only from keys that one class alone has."""
    keys = set(state)
    for key, name in (("bias", "AutoEncoder"), ("decoder.bias", "AutoEncoderNew"), ("gate_bias", "GatedAutoEncoder"),
                      ("group_sizes", "MatryoshkaBatchTopKSAE")):
        if key in keys:
            return name
    if {"W_enc", "threshold"} <= keys and "k" not in keys:
        return "JumpReluAutoEncoder"
    raise MonoscopeError(f"{where}: no config.json beside it and its keys {sorted(keys)[:8]} fit several dictionary "
                         f"classes (e.g. AutoEncoderTopK and BatchTopKSAE); add config.json with trainer.dict_class")


def _trainer(path: Path) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        return {}
    trainer = read_json_object(path / "config.json").get("trainer", {})
    if not isinstance(trainer, dict):
        raise MonoscopeError(f"{path / 'config.json'}: 'trainer' must be a JSON object, got {trainer!r}")
    return trainer


def _hook(trainer: dict) -> str:
    """'resid_post_layer_3' (the library's submodule names) -> 'layers.3.resid_post'."""
    m = re.fullmatch(r"(resid_pre|resid_post|attn_out|mlp_out|mlp_neurons)_layer_(\d+)",
                     str(trainer.get("submodule_name") or ""))
    return f"layers.{m.group(2)}.{m.group(1)}" if m else ""


def _unwrap(state: dict, where: Path) -> tuple[dict, float | None]:
    """A final ae.pt is the state dict; a mid-training backup wraps it as {"ae": ..., "norm_factor": s}, its
    biases still in units of x/s."""
    if not isinstance(state.get("ae"), dict):
        return state, None
    scale = state.get("norm_factor")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise MonoscopeError(f"{where}: norm_factor must be a positive number, got {scale!r}")
    return state["ae"], (float(scale) if scale is not None else None)


def read_dictionary_learning(path: Path) -> SAE:
    where = path / "ae.pt"
    state, scale = _unwrap(read_torch_state(where), where)
    trainer = _trainer(path)
    name = trainer.get("dict_class") or _class_from_keys(state, where)
    if name not in CLASSES:
        raise MonoscopeError(f"{path / 'config.json'}: dict_class {name!r} is not supported; "
                             f"supported: {', '.join(CLASSES)}")
    arch, settings, tensors, notes = CLASSES[name](state, trainer, where)
    d_in, d_sae = tensors["W_enc"].shape
    for key, have in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key) is not None and trainer[key] != have:
            raise MonoscopeError(f"{where}: config.json says {key}={trainer[key]!r} but the file has {have}; "
                                 f"the config belongs to another dictionary")
    cfg = SAEConfig(architecture=arch, d_in=int(d_in), d_sae=int(d_sae), hook_name=_hook(trainer),
                    model_name=str(trainer.get("lm_name") or ""), **settings)
    sae = fill(build(cfg, where), {k: v.float() for k, v in tensors.items()}, str(where))
    if scale is not None and scale != 1.0:
        sae.fold_input_scale(1.0 / scale)  # biases (and thresholds) × s, as the library's scale_biases(s)
        notes.append(f"training backup: norm_factor {scale:g} folded into the biases (reads raw activations)")
    if not cfg.hook_name and trainer.get("layer") is not None:
        notes.append(f"trained on layer {trainer['layer']}; the hook kind is not stated: pass the hook to use")
    sae.load_notes = [f"dictionary_learning {name}", *notes]
    return sae
