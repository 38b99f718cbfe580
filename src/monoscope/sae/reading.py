"""What every SAE file reader shares: opening files without trusting them, and checked copies into an SAE.

Each helper raises one MonoscopeError line that names the file, the key and what was expected. Nothing is
ever unpickled: ``.pt`` files go through ``torch.load(weights_only=True)``, npz files ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, SAEConfig, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

CANONICAL = re.compile(r"^layers\.\d+\.(resid_pre|attn_out|mlp_neurons|mlp_out|resid_post)$")
# Other libraries' names of monoscope's hooks: TransformerLens (SAELens; hook_attn_out / hook_mlp_out are what
# the sub-block adds to the residual stream, after Gemma's post-norms, as ours) and HF module paths (Gemma Scope 2).
_FOREIGN_HOOKS = (
    (re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$"), None),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$"), "mlp_neurons"),
    (re.compile(r"^model\.layers\.(\d+)\.output$"), "resid_post"),
    (re.compile(r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"), "mlp_out"),
)


def canonical_hook(name: str) -> str:
    """Another library's name of a monoscope hook as monoscope's name ('blocks.3.hook_resid_post' ->
    'layers.3.resid_post'); names with no monoscope hook are returned unchanged (they then fit no store, loudly)."""
    for pattern, kind in _FOREIGN_HOOKS:
        m = pattern.match(name)
        if m:
            return f"layers.{m.group(1)}.{kind or m.group(2)}"
    return name


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "…"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # a pickle / torch.save zip where safetensors belong
            raise MonoscopeError(f"{path} holds a pickle (torch.save / pickle.dump), not safetensors; monoscope never "
                                 f"unpickles files — convert it with safetensors.torch.save_file") from exc
        raise MonoscopeError(f"cannot read {str(path)!r} as safetensors ({_first_line(exc)}); "
                             f"is the file complete?") from exc


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k], dtype=np.float32)) for k in data.files}
    except Exception as exc:  # ValueError for pickled data; zip, OS and shape errors for damaged files
        if "pickle" in str(exc):
            raise MonoscopeError(f"{path} holds pickled (object) data; monoscope never unpickles files — re-save "
                                 f"the arrays as plain float arrays (np.savez)") from exc
        raise MonoscopeError(f"cannot read {str(path)!r} as an npz archive ({_first_line(exc)}); "
                             f"is the file complete?") from exc


def read_torch_state(path: Path) -> dict[str, Any]:
    """A ``torch.save``d dict of tensors, read with ``weights_only=True`` (no arbitrary objects, no code)."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not support; it refuses them
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported [^.\n]*", str(exc))
        raise MonoscopeError(f"{path} holds Python objects other than tensors ({found.group(0) if found else 'refused'});"
                             f" monoscope reads .pt files with torch.load(weights_only=True) only and never unpickles — "
                             f"save the state dict alone (torch.save(ae.state_dict(), path))") from exc
    except Exception as exc:  # zip/stream errors of truncated or foreign files
        raise MonoscopeError(f"cannot read {path} as a torch state dict ({_first_line(exc)}); "
                             f"is the file complete?") from exc
    if not isinstance(obj, dict):
        raise MonoscopeError(f"{path} must hold a dict of tensors (a state dict), got a {type(obj).__name__}")
    return obj


def read_json_object(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or one MonoscopeError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MonoscopeError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise MonoscopeError(f"{path} must hold a JSON object of SAE settings, got a {type(raw).__name__}")
    return raw


def int_setting(raw: dict[str, Any], key: str, where: Path | str) -> int:
    """``raw[key]`` as a positive int, or an error naming the file and the key."""
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MonoscopeError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def pick(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: Path | str,
         optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``shapes`` (by the file's own names), each checked against its expected shape.

    A missing or unexpected key (other than ``optional`` ones) or a wrong shape is an error naming the file,
    the key and the expected shape. ``optional`` keys are returned when present, unchecked.
    """
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes) - set(optional))
    if missing or extra:
        raise MonoscopeError(f"{where}: keys do not fit (missing {missing}, unexpected {extra}); "
                             f"expected {sorted(shapes)}")
    out = {}
    for key in [*shapes, *(k for k in optional if k in tensors)]:
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            raise MonoscopeError(f"{where}: {key!r} must be a tensor, got a {type(value).__name__}")
        if key in shapes and tuple(value.shape) != tuple(shapes[key]):
            raise MonoscopeError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(shapes[key])}")
        out[key] = value
    return out


def matrix_shape(tensors: dict[str, Any], key: str, where: Path | str) -> tuple[int, int]:
    """The shape of the 2-D tensor ``key`` (used to read d_in / d_sae off a file), or an error."""
    value = tensors.get(key)
    if not isinstance(value, torch.Tensor) or value.ndim != 2:
        raise MonoscopeError(f"{where}: no 2-D tensor {key!r} (found {sorted(tensors)[:8]}); "
                             f"is this the right kind of file?")
    return int(value.shape[0]), int(value.shape[1])


def build(cfg: SAEConfig, where: Path | str) -> SAE:
    """build_sae with the file named in any error."""
    try:
        return build_sae(cfg)
    except MonoscopeError as exc:
        raise MonoscopeError(f"{where}: {exc}") from exc


def fill(sae: SAE, tensors: dict[str, torch.Tensor], where: str) -> SAE:
    """Copy ``tensors`` (monoscope names) into ``sae`` after checking names and shapes against it."""
    expected = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **sae.extra_tensors()}
    tensors = dict(tensors)
    scale = tensors.pop("scaling_factor", None)
    if scale is None:
        scale = tensors.pop("finetuning_scaling_factor", None)
    if scale is not None and not torch.allclose(scale.float(), torch.ones_like(scale.float())):
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
