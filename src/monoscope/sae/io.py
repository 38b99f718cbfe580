"""Save SAEs in SAELens's disk layout, and load them from the layouts the community shares them in.

- Ours = SAELens's disk layout (``cfg.json`` + ``sae_weights.safetensors``), so ``sae_lens.SAE.load_from_disk``
  opens what we write. BatchTopK and Matryoshka are written as JumpReLU (their inference form); the full
  monoscope config rides in ``metadata.monoscope_config`` so we rebuild the exact class.
- ``load_sae`` reads every layout of ``formats.FORMATS``: monoscope/SAELens folders, EleutherAI sparsify,
  dictionary_learning, Gemma Scope 1 and 2 (see sae/formats.py). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from monoscope.artifacts import fsync_dir
from monoscope.sae.base import SAE
from monoscope.sae.formats import FORMATS, LAYOUTS, find_format, load_sae
from monoscope.sae.reading import CFG_FILE, WEIGHTS_FILE
from monoscope.sae.saelens import from_saelens

# Marks the cfg.json as SAELens >= 6 format, so SAELens reads it without its pre-6 key conversion.
SAELENS_FORMAT_VERSION = "6.0.0"


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
# Loading: every layout monoscope reads is one entry of the table in formats.py.
__all__ = ["FORMATS", "LAYOUTS", "find_format", "from_saelens", "load_sae", "sae_cfg_dict", "save_sae"]
