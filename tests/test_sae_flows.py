"""Every SAE layout monoscope reads, end to end, on a tiny random Llama.

Two SAEs are trained on its activations (TopK and JumpReLU). Each is then written by hand in the layouts of
the libraries that publish that architecture — SAELens, EleutherAI sparsify and dictionary_learning for TopK;
SAELens, Gemma Scope 2 and Gemma Scope 1 for JumpReLU (key names and shapes as in test_sae_formats.py) —
and every copy goes through ``load_sae``, ``monoscope evaluate``, ``stats``, ``probe --source sae:DIR`` and
``steer``, where it must give the original's numbers and pass the self-check without a warning.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from monoscope.cli import main
from monoscope.errors import MonoscopeWarning
from monoscope.evaluate import evaluate_sae
from monoscope.extract import ExtractConfig, extract
from monoscope.models import tiny_model
from monoscope.sae import load_sae
from monoscope.store import ActivationStore
from monoscope.train import TrainConfig, train_sae

MODEL, HOOK, LAYER = "tiny-llama", "layers.1.resid_post", 1


def saelens(sae, folder: Path) -> Path:
    """The folder monoscope writes is SAELens's own layout (cfg.json + sae_weights.safetensors)."""
    from monoscope.sae import save_sae

    save_sae(sae, folder)
    return folder


def sparsify(sae, root: Path) -> Path:
    run = root / "sparsify-run"
    (run / f"layers.{LAYER}").mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 0, "normalize_decoder": True, "num_latents": sae.cfg.d_sae,
           "k": sae.cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.cfg.d_in}
    (run / "config.json").write_text(json.dumps({"sae": cfg, "model": MODEL, "hookpoints": [f"layers.{LAYER}"]}))
    (run / f"layers.{LAYER}" / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc.clone(),
               "W_dec": sae.W_dec.clone(), "b_dec": sae.b_dec.clone()}, str(run / f"layers.{LAYER}" / "sae.safetensors"))
    return run / f"layers.{LAYER}"


def dictionary_learning(sae, root: Path) -> Path:
    folder = root / "dl" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc.clone(),
                "decoder.weight": sae.W_dec.T.contiguous(), "b_dec": sae.b_dec.clone(),
                "k": torch.tensor(sae.cfg.k, dtype=torch.int), "threshold": torch.tensor(-1.0)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "AutoEncoderTopK", "activation_dim": sae.cfg.d_in, "dict_size": sae.cfg.d_sae, "k": sae.cfg.k,
        "lm_name": MODEL, "layer": LAYER, "submodule_name": f"resid_post_layer_{LAYER}"}}))
    return folder


def _gemma_tensors(sae) -> dict:
    """Gemma Scope's JumpReLU does not centre x by b_dec: fold it into b_enc (x−b)W + c = xW + (c − bW)."""
    b_enc = sae.b_enc - (sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else 0)
    return {"w_enc": sae.W_enc.clone(), "w_dec": sae.W_dec.clone(), "b_enc": b_enc.contiguous(),
            "b_dec": sae.b_dec.clone(), "threshold": sae.threshold.clone()}


def gemma_scope_2(sae, root: Path) -> Path:
    folder = root / "resid_post" / f"layer_{LAYER}_width_{sae.cfg.d_sae}_l0_medium"
    folder.mkdir(parents=True)
    save_file(_gemma_tensors(sae), str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": MODEL,
                                                    "hf_hook_point_in": f"model.layers.{LAYER}.output"}))
    return folder


def gemma_scope_1(sae, root: Path) -> Path:
    folder = root / f"layer_{LAYER}" / f"width_{sae.cfg.d_sae}" / "average_l0_9"
    folder.mkdir(parents=True)
    t = _gemma_tensors(sae)
    np.savez(folder / "params.npz", **{("W_" + k[2:] if k.startswith("w_") else k): v.detach().numpy()
                                       for k, v in t.items()})
    return folder


LAYOUTS = {"saelens-topk": ("topk", saelens), "sparsify": ("topk", sparsify),
           "dictionary_learning": ("topk", dictionary_learning), "saelens-jumprelu": ("jumprelu", saelens),
           "gemma_scope_2": ("jumprelu", gemma_scope_2), "gemma_scope_1": ("jumprelu", gemma_scope_1)}
NO_HOOK = {"gemma_scope_1"}  # params.npz records neither hook nor model: the commands name them


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    lm = tiny_model("llama")
    extract(ExtractConfig(model=MODEL, hook=(HOOK,), tokens=6000, context_length=48), root / "acts", lm=lm)
    saes = {}
    for arch, extra in (("topk", {"k": 8}), ("jumprelu", {})):
        train_sae(TrainConfig(architecture=arch, d_sae=64, tokens=60_000, batch_size=512, **extra), root / "acts",
                  root / arch)
        saes[arch] = load_sae(root / arch)
    return root, saes


def _quiet(fn, *args):
    """fn(*args), failing on any MonoscopeWarning (the self-check must pass a faithfully read SAE)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonoscopeWarning)
        return fn(*args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_runs_every_command_with_the_originals_numbers(trained, tmp_path, capsys, layout):
    root, saes = trained
    arch, write = LAYOUTS[layout]
    original = saes[arch]
    folder = write(original, tmp_path / "sae")
    copy = load_sae(folder)
    x = ActivationStore(root / "acts").rows(np.arange(300), HOOK).float()
    with torch.no_grad():
        torch.testing.assert_close(copy.encode(x), original.encode(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(copy.decode(copy.encode(x)), original.decode(original.encode(x)),
                                   atol=1e-4, rtol=1e-4)
    hook = ["--hook", HOOK] if layout in NO_HOOK else []

    assert _quiet(main, ["evaluate", str(folder), "--store", str(root / "acts"), "--lm-contexts", "0", *hook]) == 0
    got, ref = json.loads((folder / "eval.json").read_text()), evaluate_sae(original, root / "acts", lm_contexts=0)
    assert got["fvu"] == pytest.approx(ref["fvu"], abs=1e-5) and got["l0"] == pytest.approx(ref["l0"], abs=1e-3)

    model = ["--model", MODEL] if layout in NO_HOOK else []
    assert _quiet(main, ["stats", "--store", str(root / "acts"), "--sae", str(folder), "--out",
                         str(tmp_path / "stats"), "--top-k", "3", *hook, *model]) == 0
    assert (tmp_path / "stats").is_dir()

    probe_hook = ["--layers", str(LAYER), "--hook-kind", "resid_post"]
    assert _quiet(main, ["probe", "--model", MODEL, "--dataset", "lang:fr", "--source", f"sae:{folder}",
                         *probe_hook, "--ks", "1", "2", "--methods", "mean_diff", "--max-length", "32",
                         "--controls", "false", "--out", str(tmp_path / "probe")]) == 0
    table = pd.read_csv(tmp_path / "probe" / "results.csv")
    assert len(table) and table["f1"].notna().all()

    capsys.readouterr()
    assert _quiet(main, ["steer", "--sae", str(folder), "--feature", "3", "--value", "20", "--max-new-tokens",
                         "3", "--temperature", "0", *(["--hook", HOOK] if layout in NO_HOOK else []),
                         *model, "hello there"]) == 0
    assert "steered" in capsys.readouterr().out
