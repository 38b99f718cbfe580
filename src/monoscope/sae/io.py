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
from monoscope.sae.base import SAE, SAEConfig, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens architecture name each of ours is saved as (its inference form).
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                "gated": "gated", "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
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
    arch = SAELENS_ARCH[cfg.architecture]
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
    if arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
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


def _load_saelens(path: Path) -> SAE:
    where = str(path / WEIGHTS_FILE)
    try:
        raw = json.loads((path / CFG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise MonoscopeError(f"{path / CFG_FILE} is not valid JSON ({exc})") from exc
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    meta = raw.get("metadata") or {}
    ours = meta.get("monoscope_config")
    if ours is not None:
        ours = dict(ours)
        if isinstance(ours.get("matryoshka_widths"), list):
            ours["matryoshka_widths"] = tuple(ours["matryoshka_widths"])
        cfg = from_dict(SAEConfig, ours, where=str(path / CFG_FILE))
        return _fill(build_sae(cfg), tensors, where)

    arch_name = raw.get("architecture", "standard")
    if arch_name not in FROM_SAELENS:
        raise MonoscopeError(f"{path / CFG_FILE}: SAELens architecture {arch_name!r} is not supported; "
                             f"supported: {', '.join(FROM_SAELENS)}")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise MonoscopeError(f"{path / CFG_FILE}: normalize_activations={norm!r} is not folded into the weights; "
                             f"fold it with SAELens (fold_activation_norm_scaling_factor) and save again")
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int):
            raise MonoscopeError(f"{path / CFG_FILE} lacks an integer {key!r}")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k") or 32
    cfg = SAEConfig(
        architecture=FROM_SAELENS[arch_name], d_in=raw["d_in"], d_sae=raw["d_sae"], k=int(k),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_name=str(meta.get("hook_name") or raw.get("hook_name") or ""),
        model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
    )
    if cfg.architecture == "jumprelu":
        cfg.jumprelu_init_threshold = 0.0
    sae = _fill(build_sae(cfg), tensors, where)
    if cfg.architecture == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        # SAELens computes topk(z·‖d‖) and decodes (f/‖d‖)·W_dec; the same maps with the norms folded in.
        with torch.no_grad():
            n = sae.W_dec.norm(dim=1)
            sae.W_enc.mul_(n)
            sae.b_enc.mul_(n)
            sae.W_dec.div_(n[:, None])
    return sae


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
    return _fill(build_sae(cfg), {k: v.float() for k, v in t.items()}, where)


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
        try:
            conf = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise MonoscopeError(f"{path / 'config.json'} is not valid JSON ({exc})") from exc
        arch = conf.get("architecture", "jump_relu")
        if arch not in ("jump_relu", "jumprelu"):
            raise MonoscopeError(f"{path / 'config.json'}: architecture {arch!r} is not supported; "
                                 f"Gemma Scope 2 SAEs are 'jump_relu'")
        if conf.get("hf_hook_point_out"):
            raise MonoscopeError(f"{path} is a transcoder (it has hf_hook_point_out); monoscope loads SAEs only")
    tensors = _read_safetensors(path / "params.safetensors")
    return _gemma_scope(tensors, str(path / "params.safetensors"), model_name=str(conf.get("model_name", "")),
                        hook_name=str(conf.get("hf_hook_point_in", "")))
