"""Save and load SAEs in the formats the community shares them in.

- Ours = SAELens's disk layout (``cfg.json`` + ``sae_weights.safetensors``), so ``sae_lens.SAE.load_from_disk``
  opens what we write. BatchTopK and Matryoshka are written as JumpReLU (their inference form); the full
  monoscope config rides in ``metadata.monoscope_config`` so we rebuild the exact class.
- SAELens folders of architecture standard / topk / jumprelu / gated.
- Gemma Scope (Gemma 2): ``params.npz``; Gemma Scope 2 (Gemma 3): ``params.safetensors`` (+ ``config.json``).
  Both are JumpReLU SAEs that encode x directly (no b_dec subtraction).

Nothing is ever unpickled: npz files are opened with ``allow_pickle=False``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monoscope.artifacts import fsync_dir
from monoscope.config import from_dict
from monoscope.errors import MonoscopeError
from monoscope.sae.base import REGISTRY, SAE, SAEConfig, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# Marks the cfg.json as SAELens >= 6 format, so SAELens reads it without its pre-6 key conversion.
SAELENS_FORMAT_VERSION = "6.0.0"
LAYOUTS = ("a SAELens/monoscope folder (cfg.json + sae_weights.safetensors)",
           "a Gemma Scope folder (params.npz)",
           "a Gemma Scope 2 folder (params.safetensors [+ config.json])")


def _tensors_for(sae: SAE) -> dict[str, torch.Tensor]:
    out = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **sae.extra_tensors()}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def sae_cfg_dict(sae: SAE, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json content for ``sae``."""
    import monoscope

    cfg = sae.cfg
    arch = type(sae).saelens_architecture
    metadata: dict[str, Any] = {
        "hook_name": cfg.hook_name,
        "model_name": cfg.model_name,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "monoscope_version": monoscope.__version__,
        "monoscope_architecture": cfg.architecture,
        "monoscope_config": sae.config_dict(),
    }
    metadata.update(extra_metadata or {})
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    out.update(type(sae).saelens_fields(cfg))
    return out


def save_sae(sae: SAE, folder: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write ``folder``/cfg.json and ``folder``/sae_weights.safetensors; readers never see half a folder.

    Both files go into a temporary sibling folder that is fsynced and renamed into place; an existing
    ``folder`` is moved aside first and deleted after the swap.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old: Path | None = None
    try:
        save_file(_tensors_for(sae), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(json.dumps(sae_cfg_dict(sae, extra_metadata), indent=2, default=str) + "\n")
        for name in (WEIGHTS_FILE, CFG_FILE):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{tmp.name[-12:]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Loading

def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from any supported layout (see module docstring); the result is in eval mode."""
    path = Path(folder)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise MonoscopeError(f"SAE folder {str(folder)!r} does not exist; pass a folder holding one of: "
                             + "; ".join(LAYOUTS))
    if (path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        sae = _load_saelens(path)
    elif (path / "params.npz").exists():
        sae = _load_gemma_scope_npz(path / "params.npz")
    elif (path / "params.safetensors").exists():
        sae = _load_gemma_scope_2(path)
    else:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise MonoscopeError(f"no SAE found in {str(path)!r} (it holds {found}); expected one of: "
                             + "; ".join(LAYOUTS))
    return sae.to(device).eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise MonoscopeError(f"cannot read {str(path)!r} as safetensors ({exc}); is the file complete?") from exc


def _fill(sae: SAE, tensors: dict[str, torch.Tensor], where: str) -> SAE:
    """Copy ``tensors`` into ``sae`` after checking names and shapes against it."""
    expected = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **sae.extra_tensors()}
    tensors = dict(tensors)
    scale = tensors.pop("scaling_factor", None)
    if scale is None:
        scale = tensors.pop("finetuning_scaling_factor", None)
    if scale is not None:
        if not torch.allclose(scale.float(), torch.ones_like(scale.float())):
            raise MonoscopeError(f"{where} has a non-trivial finetuning scaling factor; fold it into W_dec with "
                                 f"SAELens (sae.fold_W_dec_norm / finetuning scaling) before loading")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise MonoscopeError(f"{where}: tensors do not match a {sae.cfg.architecture} SAE "
                             f"(missing {missing}, unexpected {extra}); expected {sorted(expected)}")
    with torch.no_grad():
        for name, target in expected.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(target.shape):
                raise MonoscopeError(f"{where}: tensor {name} has shape {tuple(src.shape)}, expected "
                                     f"{tuple(target.shape)} for d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}")
            target.copy_(src.to(target.dtype))
    if hasattr(sae, "threshold_initialised"):
        sae.threshold_initialised.fill_(True)
    return sae


def from_saelens() -> dict[str, str]:
    """SAELens architecture name -> ours, for the architectures whose saved form is the whole model."""
    return {cls.saelens_architecture: name for name, cls in REGISTRY.items() if cls.saelens_exact}


def _read_json_object(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or one MonoscopeError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MonoscopeError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise MonoscopeError(f"{path} must hold a JSON object of SAE settings, got a {type(raw).__name__}")
    return raw


def _build(cfg: SAEConfig, where: Path) -> SAE:
    """build_sae with the config file named in any error."""
    try:
        return build_sae(cfg)
    except MonoscopeError as exc:
        raise MonoscopeError(f"{where}: {exc}") from exc


def _load_saelens(path: Path) -> SAE:
    cfg_path, where = path / CFG_FILE, str(path / WEIGHTS_FILE)
    raw = _read_json_object(cfg_path)
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise MonoscopeError(f"{cfg_path}: 'metadata' must be a JSON object, got {meta!r}")
    ours = meta.get("monoscope_config")
    if ours is not None:
        cfg = _our_config(ours, cfg_path)
        for key in ("d_in", "d_sae"):
            if key not in raw:
                raise MonoscopeError(f"{cfg_path} has no {key!r}; SAELens needs it: save the SAE again")
        _check_agrees(cfg, {"d_in": raw.get("d_in"), "d_sae": raw.get("d_sae"), "model_name": meta.get("model_name"),
                            "hook_name": meta.get("hook_name")}, cfg_path)
        return _fill(_build(cfg, cfg_path), _read_safetensors(path / WEIGHTS_FILE), where)

    arch_name = raw.get("architecture", "standard")
    known = from_saelens()
    if not isinstance(arch_name, str) or arch_name not in known:
        raise MonoscopeError(f"{cfg_path}: SAELens architecture {arch_name!r} is not supported; "
                             f"supported: {', '.join(known)}")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise MonoscopeError(f"{cfg_path}: normalize_activations={norm!r} is not folded into the weights; "
                             f"fold it with SAELens (fold_activation_norm_scaling_factor) and save again")
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
            raise MonoscopeError(f"{cfg_path}: {key!r} must be an integer, got {raw.get(key)!r}")
    cls = REGISTRY[known[arch_name]]
    cfg = SAEConfig(
        architecture=known[arch_name], d_in=raw["d_in"], d_sae=raw["d_sae"],
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_name=str(meta.get("hook_name") or raw.get("hook_name") or ""),
        model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
        **cls.config_from_saelens(raw, str(cfg_path)),
    )
    sae = _fill(_build(cfg, cfg_path), _read_safetensors(path / WEIGHTS_FILE), where)
    sae.after_saelens_load(raw)
    return sae


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


def _gemma_scope(tensors: dict[str, torch.Tensor], where: str, model_name: str = "", hook_name: str = "") -> SAE:
    """Build a JumpReLU SAE (x not centred by b_dec) from Gemma Scope tensors, keys in either case."""
    t = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    if "affine_skip_connection" in t or "W_skip" in t:
        raise MonoscopeError(f"{where} is a skip transcoder, not an SAE; monoscope loads Gemma Scope SAEs only")
    if "W_enc" not in t or t["W_enc"].ndim != 2:
        raise MonoscopeError(f"{where} has no 2-D W_enc/w_enc tensor (found {sorted(tensors)}); "
                             f"is this a Gemma Scope SAE params file?")
    d_in, d_sae = t["W_enc"].shape
    if "W_dec" in t and tuple(t["W_dec"].shape) not in ((d_sae, d_in),):
        raise MonoscopeError(f"{where}: W_dec has shape {tuple(t['W_dec'].shape)} but W_enc is {(d_in, d_sae)}; "
                             f"transcoders and crosscoders (output ≠ input) are not supported")
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False,
                    jumprelu_init_threshold=0.0, model_name=model_name, hook_name=hook_name)
    return _fill(_build(cfg, Path(where)), {k: v.float() for k, v in t.items()}, where)


def _load_gemma_scope_npz(path: Path) -> SAE:
    try:
        with np.load(path, allow_pickle=False) as data:
            tensors = {k: torch.from_numpy(np.array(data[k], dtype=np.float32)) for k in data.files}
    except ValueError as exc:  # raised for object arrays that would need unpickling, and for bad files
        raise MonoscopeError(f"cannot read {str(path)!r} without unpickling ({exc}); monoscope never unpickles "
                             f"files — re-save the arrays as plain float arrays") from exc
    except (OSError, EOFError) as exc:
        raise MonoscopeError(f"cannot read {str(path)!r} as an npz archive ({exc}); is the file complete?") from exc
    return _gemma_scope(tensors, str(path))


def _load_gemma_scope_2(path: Path) -> SAE:
    conf: dict[str, Any] = {}
    if (path / "config.json").exists():
        conf = _read_json_object(path / "config.json")
        arch = conf.get("architecture", "jump_relu")
        if arch not in ("jump_relu", "jumprelu"):
            raise MonoscopeError(f"{path / 'config.json'}: architecture {arch!r} is not supported; "
                                 f"Gemma Scope 2 SAEs are 'jump_relu'")
        if conf.get("hf_hook_point_out"):
            raise MonoscopeError(f"{path} is a transcoder (it has hf_hook_point_out); monoscope loads SAEs only")
    tensors = _read_safetensors(path / "params.safetensors")
    return _gemma_scope(tensors, str(path / "params.safetensors"), model_name=str(conf.get("model_name", "")),
                        hook_name=str(conf.get("hf_hook_point_in", "")))
