"""Every SAE file layout monoscope reads, as one table: a format is one reader function plus one entry.

| format              | folder holds                                  | becomes                                  |
|---------------------|-----------------------------------------------|------------------------------------------|
| monoscope / SAELens | cfg.json + sae_weights.safetensors            | its architecture (see sae/saelens.py)    |
| sparsify            | cfg.json + sae.safetensors (one per hook)     | TopK                                     |
| dictionary_learning | ae.pt (+ config.json)                         | ReLU, TopK, BatchTopK, Matryoshka, Gated, JumpReLU |
| Gemma Scope         | params.npz                                    | JumpReLU, x not centred by b_dec         |
| Gemma Scope 2       | params.safetensors (+ config.json)            | JumpReLU, x not centred by b_dec         |

Each reader checks keys and shapes against what the file's own config (or folder name) says and raises one
MonoscopeError line naming the file, the key and the mismatch; an ambiguous file (TopK without k, a
dictionary class the keys do not settle) asks for the missing setting. Readers record what they folded
or inferred in ``sae.load_notes``; ``describe_sae`` (``monoscope info SAE_FOLDER``) prints it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, SAEConfig
from monoscope.sae.dictionary_learning import read_dictionary_learning
from monoscope.sae.reading import (CANONICAL, CFG_FILE, WEIGHTS_FILE, build, canonical_hook, fill, int_setting,
                                   matrix_shape, pick, read_json_object, read_npz, read_safetensors)
from monoscope.sae.releases import release_folder
from monoscope.sae.saelens import read_saelens

DEFAULT_GEMMA3 = "gemma-3-270m"  # monoscope's built-in name for google/gemma-3-270m


@dataclass(frozen=True)
class Format:
    name: str
    files: tuple[str, ...]  # all present = this format
    read: Callable[[Path], SAE]

    @property
    def layout(self) -> str:
        return f"{self.name} ({' + '.join(self.files)})"

    def matches(self, folder: Path) -> bool:
        return all((folder / f).is_file() for f in self.files)


# ---------------------------------------------------------------------------------------------- hooks, models
def gemma_model_name(name: str) -> str:
    """Gemma 3 names as Gemma Scope 2 writes them ('gemma-v3-270m-pt', 'google/gemma-3-1b-it') -> the name
    monoscope loads the model by ('gemma-3-270m' built in, else the HF id)."""
    m = re.search(r"gemma-v?3-(\d+(?:\.\d+)?[mb])(?:-(pt|it))?", name)
    if not m:
        return name
    size, kind = m.group(1), m.group(2) or "pt"
    if size == "270m" and kind == "pt":
        return DEFAULT_GEMMA3
    return f"google/gemma-3-{size}-{kind}"


def _release_parts(path: Path, depth: int) -> dict[str, str]:
    """What a Gemma Scope release path says: layer, site, width (from its last ``depth`` folder names) and
    model (from the HF repo folder above, if any)."""
    text = "/".join(path.resolve().parts[-depth:])
    out = {}
    if m := re.search(r"layer_(\d+)", text):
        out["layer"] = m.group(1)
    if m := re.search(r"(resid_post|mlp_out|attn_out|transcoder|clt)", text):
        out["site"] = m.group(1)
    if m := re.search(r"width_(\d+)([km]?)(?![a-z0-9])", text):
        out["width"] = m.group(1) + m.group(2)
    if m := re.search(r"gemma-scope-2-(\d+(?:\.\d+)?[mb])-(pt|it)", str(path.resolve())):
        out["model"] = gemma_model_name(f"gemma-3-{m.group(1)}-{m.group(2)}")
    return out


def _check_width(named: str | None, d_sae: int, where: Path) -> None:
    """Release folders name their width ('width_16k' = 16,384 latents, '1m' = 1,048,576); it must fit the file."""
    if not named:
        return
    number, unit = int(named.rstrip("km")), named[-1] if named[-1] in "km" else ""
    got = d_sae // {"k": 1000, "m": 1_000_000, "": 1}[unit]
    if got != number:
        raise MonoscopeError(f"{where}: the folder name says width_{named} but the file has d_sae={d_sae}; "
                             f"the file belongs to another release folder")


# --------------------------------------------------------------------------------------------------- Gemma Scope
def _gemma_sae(tensors: dict[str, torch.Tensor], where: Path, model_name: str, hook_name: str) -> SAE:
    """A JumpReLU SAE (x not centred by b_dec) from Gemma Scope tensors (``W_enc`` or ``w_enc`` spelling)."""
    if "affine_skip_connection" in tensors or "W_skip" in tensors:
        raise MonoscopeError(f"{where} is a skip transcoder, not an SAE; monoscope loads Gemma Scope SAEs only")
    w = "w_" if "w_enc" in tensors else "W_"
    d_in, d_sae = matrix_shape(tensors, w + "enc", where)
    dec = tensors.get(w + "dec")
    if isinstance(dec, torch.Tensor) and dec.ndim == 2 and dec.shape[0] == d_sae and dec.shape[1] != d_in:
        raise MonoscopeError(f"{where}: {w}dec has shape {tuple(dec.shape)} but {w}enc is {(d_in, d_sae)}; "
                             f"transcoders and crosscoders (output ≠ input) are not supported")
    t = pick(tensors, {w + "enc": (d_in, d_sae), w + "dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                       "threshold": (d_sae,)}, where)
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False,
                    jumprelu_init_threshold=0.0, model_name=model_name, hook_name=hook_name)
    ours = {"W_enc": t[w + "enc"], "W_dec": t[w + "dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
            "threshold": t["threshold"]}
    return fill(build(cfg, where), {k: v.float() for k, v in ours.items()}, str(where))


def _gemma_scope_1_source(path: Path, layer: str | None) -> tuple[str, str]:
    """(model, hook) from a hub-cache path such as models--google--gemma-scope-2b-pt-res/…/layer_20/…; empty
    where the path does not say (a copied folder) or the site has no monoscope hook (attention's hook_z)."""
    m = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp)(?![a-z])", str(path.resolve()))
    if not m or layer is None:
        return "", ""
    model = f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")
    return model, f"layers.{layer}.{'resid_post' if m.group(3) == 'res' else 'mlp_out'}"


def read_gemma_scope(path: Path) -> SAE:
    """Gemma Scope (Gemma 2): params.npz in folders such as layer_20/width_16k/average_l0_71."""
    where = path / "params.npz"
    parts = _release_parts(path, depth=3)  # layer_20/width_16k/average_l0_71
    model, hook = _gemma_scope_1_source(path, parts.get("layer"))
    # the model is only noted: a user's local copy of it has another name, and an exact-name check would refuse it
    sae = _gemma_sae(read_npz(where), where, model_name="", hook_name=hook)
    _check_width(parts.get("width"), sae.cfg.d_sae, where)
    sae.load_notes = ([f"hook {hook} inferred from the release path; trained on {model} (not stored: pass --model)"]
                      if hook else ["hook and model are not stored in params.npz: pass the hook to use"])
    return sae


def _gemma2_hook(conf: dict, parts: dict[str, str], path: Path) -> str:
    """The hook a Gemma Scope 2 folder reads: config.json's hf_hook_point_in, else the release folder name."""
    site = parts.get("site")
    if site in ("transcoder", "clt") or conf.get("hf_hook_point_out"):
        raise MonoscopeError(f"{path} is a transcoder (it maps one hook to another); monoscope loads SAEs only")
    stated = str(conf.get("hf_hook_point_in") or "")
    from_name = ""
    if "layer" in parts and site:
        from_name = {"resid_post": f"model.layers.{parts['layer']}.output",
                     "mlp_out": f"model.layers.{parts['layer']}.post_feedforward_layernorm.output",
                     "attn_out": f"model.layers.{parts['layer']}.self_attn.o_proj.input"}[site]
    if stated and from_name and stated != from_name:
        raise MonoscopeError(f"{path / 'config.json'}: hf_hook_point_in is {stated!r} but the folder name says "
                             f"{from_name!r}; the config belongs to another SAE")
    return canonical_hook(stated or from_name)


def read_gemma_scope_2(path: Path) -> SAE:
    """Gemma Scope 2 (Gemma 3): params.safetensors (+ config.json) in folders such as
    resid_post/layer_12_width_16k_l0_medium; encoder (pre > θ)·relu(pre), pre = x·w_enc + b_enc."""
    conf: dict = {}
    if (path / "config.json").exists():
        conf = read_json_object(path / "config.json")
        arch = conf.get("architecture", "jump_relu")
        if arch not in ("jump_relu", "jumprelu"):
            raise MonoscopeError(f"{path / 'config.json'}: architecture {arch!r} is not supported; "
                                 f"Gemma Scope 2 SAEs are 'jump_relu'")
    parts = _release_parts(path, depth=2)  # resid_post/layer_12_width_16k_l0_medium
    hook = _gemma2_hook(conf, parts, path)
    model = gemma_model_name(str(conf["model_name"])) if conf.get("model_name") else parts.get("model", "")
    where = path / "params.safetensors"
    sae = _gemma_sae(read_safetensors(where), where, model_name=model, hook_name=hook)
    _check_width(parts.get("width"), sae.cfg.d_sae, where)
    notes = [] if conf.get("hf_hook_point_in") else ([f"hook {hook} inferred from the folder name"] if hook else
                                                     ["no config.json and no release folder name: hook unknown"])
    if hook and not CANONICAL.match(hook):
        notes.append(f"{hook} has no monoscope hook (attention heads before o_proj); it fits no store")
    sae.load_notes = notes
    return sae


# ------------------------------------------------------------------------------------------------------ sparsify
def _sparsify_hook(path: Path) -> str:
    """sparsify names each SAE's folder by its hookpoint; 'layers.6' / 'h.6' (a block's output) is resid_post."""
    m = re.fullmatch(r"(?:layers|h|model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)", path.name)
    return f"layers.{m.group(1)}.resid_post" if m else (path.name if CANONICAL.match(path.name) else "")


def _sparsify_model(path: Path) -> str:
    """The model of a sparsify run: ``model`` in the run folder's config.json (its train config), if any."""
    run_cfg = path.parent / "config.json"
    if not run_cfg.is_file():
        return ""
    try:
        raw = read_json_object(run_cfg)
    except MonoscopeError:
        return ""  # not sparsify's file; the SAE's own cfg.json is what counts
    return str(raw.get("model") or "") if isinstance(raw.get("sae"), dict) else ""


def read_sparsify(path: Path) -> SAE:
    """EleutherAI sparsify: cfg.json (d_in, num_latents or expansion_factor, k, ...) + sae.safetensors;
    encode topk(relu(encoder(x − b_dec))), decode top_acts·W_dec + b_dec."""
    cfg_path, where = path / CFG_FILE, path / "sae.safetensors"
    raw = read_json_object(cfg_path)
    for key, why in (("transcode", "it is a transcoder (predicts another hook's output)"),
                     ("skip_connection", "it has a skip connection W_skip (output += x·W_skipᵀ)"),
                     ("signed", "it is a legacy signed SAE")):
        if raw.get(key):
            raise MonoscopeError(f"{cfg_path}: {key} is true: {why}; monoscope loads plain TopK SAEs only")
    if raw.get("activation", "topk") != "topk":
        raise MonoscopeError(f"{cfg_path}: activation {raw['activation']!r} is not supported; only 'topk' is")
    d_in = int_setting(raw, "d_in", cfg_path)
    if "k" not in raw:
        raise MonoscopeError(f"{cfg_path} has no 'k'; add \"k\": <latents per token> (the value it was trained "
                             f"with) instead of letting a default guess it")
    k = int_setting(raw, "k", cfg_path)
    if raw.get("num_latents"):
        d_sae = int_setting(raw, "num_latents", cfg_path)
    elif raw.get("expansion_factor"):
        d_sae = d_in * int_setting(raw, "expansion_factor", cfg_path)
    else:
        raise MonoscopeError(f"{cfg_path} gives neither 'num_latents' nor 'expansion_factor'; add the number of "
                             f"latents as \"num_latents\"")
    tensors = read_safetensors(where)
    if "W_skip" in tensors:
        raise MonoscopeError(f"{where} holds W_skip (a skip connection) although cfg.json says none; "
                             f"monoscope loads plain TopK SAEs only")
    t = pick(tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                       "b_dec": (d_in,)}, where)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=_sparsify_hook(path),
                    model_name=_sparsify_model(path))
    ours = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    sae = fill(build(cfg, cfg_path), {n: v.float() for n, v in ours.items()}, str(where))
    sae.load_notes = [f"hook {cfg.hook_name} from the folder name {path.name!r}" if cfg.hook_name else
                      f"hookpoint {path.name!r} has no monoscope hook name: pass the hook to use"]
    if raw.get("multi_topk"):
        sae.load_notes.append("multi_topk was a training loss only; inference keeps the top k")
    return sae


# --------------------------------------------------------------------------------------------------------- table
FORMATS: tuple[Format, ...] = (
    Format("SAELens", (CFG_FILE, WEIGHTS_FILE), read_saelens),
    Format("sparsify", (CFG_FILE, "sae.safetensors"), read_sparsify),
    Format("dictionary_learning", ("ae.pt",), read_dictionary_learning),
    Format("Gemma Scope", ("params.npz",), read_gemma_scope),
    Format("Gemma Scope 2", ("params.safetensors",), read_gemma_scope_2),
)
LAYOUTS = tuple(f.layout for f in FORMATS)


def sae_path(name: str | os.PathLike) -> Path:
    """``name`` as an SAE folder: the path itself (a file's folder) when it exists, else the cached folder of
    a Gemma Scope SAELens ``RELEASE/SAE_ID`` (sae/releases.py), else the path as given."""
    path = Path(name)
    if path.exists():
        return path.parent if path.is_file() else path
    return release_folder(name) or path


def find_format(folder: str | os.PathLike) -> Format | None:
    """The format of the SAE in ``folder`` (or of the folder holding the file ``folder``), None if none."""
    path = sae_path(folder)
    return next((f for f in FORMATS if path.is_dir() and f.matches(path)), None)


def sae_subfolders(folder: Path) -> list[str]:
    """Subfolders that hold an SAE (a sparsify run's hooks, a dictionary_learning run's trainer_i)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and find_format(p) is not None)


def is_sae_folder(folder: str | os.PathLike) -> bool:
    return find_format(folder) is not None or bool(sae_subfolders(sae_path(folder)))


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from any layout of FORMATS; the result is in eval mode, with ``loaded_format`` and
    ``load_notes`` telling how it was read."""
    path = sae_path(folder)
    if not path.is_dir():
        raise MonoscopeError(f"SAE folder {str(folder)!r} does not exist; pass a folder holding one of: "
                             + "; ".join(LAYOUTS) + ", or a Gemma Scope SAELens name RELEASE/SAE_ID in the "
                             "local HF cache")
    fmt = find_format(path)
    if fmt is None:
        inner = sae_subfolders(path)
        if inner:
            raise MonoscopeError(f"{str(path)!r} holds one SAE per subfolder ({', '.join(inner[:8])}); "
                                 f"pass one of them, e.g. {str(path / inner[0])!r}")
        found = sorted(p.name for p in path.iterdir())[:10]
        raise MonoscopeError(f"no SAE found in {str(path)!r} (it holds {found}); expected one of: "
                             + "; ".join(LAYOUTS))
    sae = fmt.read(path)
    sae.loaded_format = getattr(sae, "loaded_format", None) or fmt.layout
    sae.load_notes = list(getattr(sae, "load_notes", []))
    return sae.to(device).eval()


# ---------------------------------------------------------------------------------------------- monoscope info
def _sparsity(sae: SAE) -> str:
    cfg = sae.cfg
    parts = []
    if cfg.architecture in ("topk", "batchtopk", "matryoshka"):
        parts.append(f"k = {cfg.k} latents per token" + ("" if cfg.architecture == "topk" else " on average"))
    threshold = getattr(sae, "threshold", None)
    if isinstance(threshold, torch.Tensor) and cfg.architecture != "topk":
        t = threshold.detach().float()
        parts.append(f"threshold θ min {t.min():.4g} / median {t.median():.4g} / max {t.max():.4g}")
    if cfg.architecture == "relu":
        parts.append("ReLU: fires where the pre-activation > 0 (no k, no threshold)")
    if cfg.architecture == "gated":
        parts.append("gated: fires where the gate pre-activation > 0")
    return "; ".join(parts)


def describe_sae(folder: str | os.PathLike) -> str:
    """What ``monoscope info SAE_FOLDER`` prints: format, architecture, hook, model, widths, sparsity rule,
    normalisation and anything the reader folded or inferred."""
    sae = load_sae(folder)
    cfg = sae.cfg
    norms = sae.W_dec.detach().float().norm(dim=1)
    notes = sae.load_notes
    folded = [n for n in notes if "normalize" in n or "norm factor" in n or "norm_factor" in n]
    rows = [
        ("format", sae.loaded_format),
        ("architecture", f"{cfg.architecture} ({type(sae).__name__})"),
        ("hook", cfg.hook_name or "(not stated: pass the hook to use)"),
        ("model", cfg.model_name or "(not stated)"),
        ("d_in / d_sae", f"{cfg.d_in} / {cfg.d_sae}"),
        ("sparsity", _sparsity(sae)),
        ("input", "x − b_dec" if cfg.apply_b_dec_to_input else "x (not centred by b_dec)"),
        ("normalisation", "; ".join(folded) if folded else "none (reads raw activations)"),
        ("decoder norms", f"min {norms.min():.4g} / max {norms.max():.4g}"),
    ]
    rows += [("note", n) for n in notes if n not in folded]
    return "\n".join(f"{k:<14}{v}" for k, v in rows)
