"""SAEs from every library monoscope reads, each written by hand in that library's published layout.

Key names and shapes come from the libraries' own code (SAELens 6.54 ``sae_lens/saes``, EleutherAI sparsify
``sparse_coder.py`` / ``fused_encoder.py``, saprmarks dictionary_learning ``dictionary.py`` / ``trainers``,
SAELens's Gemma Scope 2 loader); each test checks encode/decode against that library's documented maths,
written out here. Then every loader gets bad input: a truncated file, a wrong-shape tensor, a missing key, a
pickle where weights are expected (refused, never run) and a file for another width — one MonoscopeError line,
and from the CLI (``monoscope info``, ``monoscope evaluate``) exit status 2 with nothing written.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from test_evaluate import make_store

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.sae import load_sae
from monoscope.sae.formats import describe_sae

D, M, K = 16, 32, 4


def rnd(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


X = rnd(99, 24, D) * 2


def topk_of(acts: torch.Tensor, k: int) -> torch.Tensor:
    top = acts.topk(k, dim=1)
    return torch.zeros_like(acts).scatter(1, top.indices, top.values)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ writers
def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    base = {"d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": "blocks.3.hook_resid_post", "sae_lens_version": "6.54.0"}}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_tensors(extra: tuple[str, ...] = ("b_enc",)) -> dict:
    t = {"W_enc": rnd(1, D, M, scale=0.3), "W_dec": rnd(2, M, D, scale=0.3), "b_dec": rnd(3, D, scale=0.1)}
    for i, name in enumerate(extra):
        t[name] = rnd(10 + i, M, scale=0.2) if name != "threshold" else rnd(10 + i, M).abs() * 0.3
    return t


def gemma2_tensors() -> dict:
    return {"w_enc": rnd(1, D, M, scale=0.3), "w_dec": rnd(2, M, D, scale=0.3), "b_enc": rnd(3, M, scale=0.2),
            "b_dec": rnd(4, D, scale=0.1), "threshold": rnd(5, M).abs() * 0.3}


def write_gemma2(root: Path, site: str = "resid_post", name: str = "layer_12_width_32_l0_medium") -> Path:
    folder = root / "models--google--gemma-scope-2-270m-pt" / "snapshots" / "abc123" / site / name
    folder.mkdir(parents=True)
    save_file(gemma2_tensors(), str(folder / "params.safetensors"))
    return folder


def write_gemma1(root: Path, width: str = "32") -> Path:
    folder = root / "layer_3" / f"width_{width}" / "average_l0_5"
    folder.mkdir(parents=True)
    t = {("W_" + k[2:] if k.startswith("w_") else k): v.numpy() for k, v in gemma2_tensors().items()}
    np.savez(folder / "params.npz", **t)
    return folder


SPARSIFY_CFG = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": K,
                "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}


def sparsify_tensors() -> dict:
    return {"encoder.weight": rnd(1, M, D, scale=0.3), "encoder.bias": rnd(2, M, scale=0.2),
            "W_dec": rnd(3, M, D, scale=0.3), "b_dec": rnd(4, D, scale=0.1)}


def write_sparsify(root: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    """A sparsify run folder: config.json (the train config) + one folder per hookpoint."""
    run = root / "sparsify-run"
    (run / "layers.6").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sae": SPARSIFY_CFG, "model": "EleutherAI/pythia-70m",
                                                 "hookpoints": ["layers.6"], "batch_size": 8}))
    (run / "layers.6" / "cfg.json").write_text(json.dumps(cfg or SPARSIFY_CFG))
    save_file(tensors or sparsify_tensors(), str(run / "layers.6" / "sae.safetensors"))
    return run / "layers.6"


def dl_state(dict_class: str) -> dict:
    """A dictionary_learning state dict, parameter names and shapes as in dictionary.py / trainers/*.py."""
    enc = {"encoder.weight": rnd(1, M, D, scale=0.3), "encoder.bias": rnd(2, M, scale=0.2)}
    dec_w = rnd(3, D, M, scale=0.3)  # nn.Linear(dict_size, activation_dim).weight: [d_in, d_sae]
    direct = {"W_enc": rnd(1, D, M, scale=0.3), "b_enc": rnd(2, M, scale=0.2), "W_dec": rnd(3, M, D, scale=0.3),
              "b_dec": rnd(4, D, scale=0.1)}
    states = {
        "AutoEncoder": {**enc, "decoder.weight": dec_w, "bias": rnd(4, D, scale=0.1)},
        "AutoEncoderNew": {**enc, "decoder.weight": dec_w, "decoder.bias": rnd(4, D, scale=0.1)},
        "GatedAutoEncoder": {"encoder.weight": enc["encoder.weight"], "decoder.weight": dec_w,
                             "decoder_bias": rnd(4, D, scale=0.1), "r_mag": rnd(5, M, scale=0.3),
                             "gate_bias": rnd(6, M, scale=0.2), "mag_bias": rnd(7, M, scale=0.2)},
        "AutoEncoderTopK": {**enc, "decoder.weight": dec_w, "b_dec": rnd(4, D, scale=0.1),
                            "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(-1.0)},
        "BatchTopKSAE": {**enc, "decoder.weight": dec_w, "b_dec": rnd(4, D, scale=0.1),
                         "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25)},
        "MatryoshkaBatchTopKSAE": {**direct, "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25),
                                   "group_sizes": torch.tensor([8, 8, 16])},
        "JumpReluAutoEncoder": {**direct, "threshold": rnd(8, M).abs() * 0.3},
    }
    return states[dict_class]


def write_dl(root: Path, dict_class: str, state: dict | None = None, trainer: dict | None = None,
             config: bool = True) -> Path:
    folder = root / "dl" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(state if state is not None else dl_state(dict_class), folder / "ae.pt")
    if config:
        t = {"dict_class": dict_class, "trainer_class": "Trainer", "activation_dim": D, "dict_size": M,
             "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, "submodule_name": "resid_post_layer_3"}
        if "TopK" in dict_class:
            t["k"] = K
        (folder / "config.json").write_text(json.dumps({"trainer": {**t, **(trainer or {})}}))
    return folder


# ---------------------------------------------------------------------------------------------- SAELens
def test_saelens_gated(tmp_path):
    t = saelens_tensors(("b_gate", "b_mag", "r_mag"))
    sae = load_sae(write_saelens(tmp_path / "g", {"architecture": "gated"}, t))
    pre = (X - t["b_dec"]) @ t["W_enc"]
    f = ((pre + t["b_gate"]) > 0) * (pre * t["r_mag"].exp() + t["b_mag"]).relu()
    with torch.no_grad():
        assert sae.architecture == "gated" and close(sae.encode(X), f)
        assert close(sae(X), f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_norm_scaling_factor_is_folded(tmp_path, arch):
    """expected_average_only_in: trained on s·x; SAELens folds s as W_enc·s, W_dec/s, b_dec/s (sae.py)."""
    s = 2.5
    extra = {"standard": ("b_enc",), "jumprelu": ("b_enc", "threshold"), "topk": ("b_enc",)}[arch]
    t = saelens_tensors(extra)
    cfg = {"architecture": arch, "normalize_activations": "expected_average_only_in", "norm_scaling_factor": s}
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=True)
    sae = load_sae(write_saelens(tmp_path / arch, cfg, t))
    w_enc, w_dec, b_dec = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s  # SAELens's folded SAE
    pre = (X - b_dec) @ w_enc + t["b_enc"]
    if arch == "standard":
        f_ref, dec = pre.relu(), w_dec
    elif arch == "jumprelu":
        f_ref, dec = (pre > t["threshold"]) * pre.relu(), w_dec
    else:  # topk_sae.py: topk of pre·‖W_dec‖, decode (f/‖W_dec‖)·W_dec
        n = w_dec.norm(dim=1)
        f_ref, dec = topk_of((pre * n).relu(), K), w_dec / n[:, None]
    # the unfolded SAE reads s·x; mapped back by 1/s its reconstruction is the folded one's
    pre_s = (s * X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if arch == "topk":
        n0 = t["W_dec"].norm(dim=1)
        x_hat_s = (topk_of((pre_s * n0).relu(), K) / n0) @ t["W_dec"] + t["b_dec"]
    else:
        x_hat_s = (pre_s.relu() * (pre_s > t.get("threshold", -1.0))) @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        assert close(sae.encode(X), f_ref)
        assert close(sae(X), f_ref @ dec + b_dec)
        assert close(sae(X), x_hat_s / s)
    assert "2.5 folded" in describe_sae(tmp_path / arch)


def test_saelens_pre_6_topk_config(tmp_path):
    """Before 6.0 a TopK SAE was architecture 'standard' with activation_fn_str 'topk' (handle_pre_6_0_config)."""
    t = saelens_tensors()
    cfg = {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "hook_point": "blocks.2.hook_resid_pre",
           "metadata": {}}
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": M, "apply_b_dec_to_input": True, **cfg}))
    save_file(t, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg.k == K and sae.cfg.hook_name == "layers.2.resid_pre"
    with torch.no_grad():
        assert close(sae.encode(X), topk_of(((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu(), K))


@pytest.mark.parametrize("cfg, match", [
    ({"architecture": "standard", "activation_fn_str": "topk"}, "no k is given"),
    ({"architecture": "standard", "activation_fn": "tanh"}, "activation function 'tanh'"),
    ({"architecture": "standard", "normalize_activations": "constant_norm_rescale"}, "not supported"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, "not supported"),
    ({"architecture": "standard", "normalize_activations": "expected_average_only_in"}, "norm_scaling_factor"),
    ({"architecture": "standard", "normalize_activations": True}, "norm_scaling_factor"),
    ({"architecture": "standard", "normalize_activations": "expected_average_only_in", "norm_scaling_factor": -1},
     "positive"),
    ({"architecture": "standard", "reshape_activations": "hook_z"}, "hook_z"),
    ({"architecture": "standard", "hook_head_index": 3}, "single attention head"),
    ({"architecture": "jumprelu_skip_transcoder"}, "not supported"),
])
def test_saelens_ambiguous_or_unsupported_configs_are_refused(tmp_path, cfg, match):
    folder = write_saelens(tmp_path / "s", cfg, saelens_tensors())
    one_line_error(folder, match)


# -------------------------------------------------------------------------------------------- Gemma Scope
def _gemma_ref(t: dict, x: torch.Tensor) -> torch.Tensor:
    pre = x @ t["w_enc"] + t["b_enc"]  # no b_dec subtraction; (pre > θ)·relu(pre)
    return (pre > t["threshold"]) * pre.relu()


def test_gemma_scope_2_release_folder(tmp_path):
    folder = write_gemma2(tmp_path)
    sae = load_sae(folder)
    t = gemma2_tensors()
    assert sae.cfg.hook_name == "layers.12.resid_post" and sae.cfg.model_name == "gemma-3-270m"
    assert sae.cfg.apply_b_dec_to_input is False
    with torch.no_grad():
        f = sae.encode(X)
        assert close(f, _gemma_ref(t, X))
        assert close(sae.decode(f), f @ t["w_dec"] + t["b_dec"])


@pytest.mark.parametrize("site, hook", [("mlp_out", "layers.12.mlp_out"),
                                        ("attn_out", "model.layers.12.self_attn.o_proj.input")])
def test_gemma_scope_2_sites(tmp_path, site, hook):
    folder = write_gemma2(tmp_path, site=site)
    assert load_sae(folder).cfg.hook_name == hook
    if site == "attn_out":
        assert "fits no store" in describe_sae(folder)


def test_gemma_scope_2_config_and_folder_must_agree(tmp_path):
    folder = write_gemma2(tmp_path)
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                                    "hf_hook_point_in": "model.layers.6.output"}))
    one_line_error(folder, "folder name says 'model.layers.12.output'")


def test_gemma_scope_2_transcoder_folder_is_refused(tmp_path):
    one_line_error(write_gemma2(tmp_path, site="transcoder"), "transcoder")


def test_gemma_scope_1_folder(tmp_path):
    sae = load_sae(write_gemma1(tmp_path))
    t = gemma2_tensors()
    with torch.no_grad():
        assert close(sae.encode(X), _gemma_ref(t, X))


# ------------------------------------------------------------------ SAELens release names, local HF cache
RELEASE_ID = "gemma-scope-2-270m-pt-res/layer_12_width_32_l0_medium"


def test_gemma_scope_2_release_name_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    folder = write_gemma2(tmp_path)
    by_name, by_folder = load_sae(RELEASE_ID), load_sae(folder)
    assert by_name.cfg.hook_name == "layers.12.resid_post" and by_name.cfg.model_name == "gemma-3-270m"
    assert by_name.content_hash() == by_folder.content_hash()
    assert main(["info", RELEASE_ID]) == 0 and "layers.12.resid_post" in capsys.readouterr().out
    write_gemma2(tmp_path, site="mlp_out_all", name="layer_4_width_32_l0_small")
    assert load_sae("gemma-scope-2-270m-pt-mlp-all/layer_4_width_32_l0_small").cfg.hook_name == "layers.4.mlp_out"
    repo = tmp_path / "models--google--gemma-scope-2-270m-pt"
    (repo / "snapshots" / "newer").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("newer")  # the SAE sits in an older snapshot only
    assert load_sae(RELEASE_ID).content_hash() == by_folder.content_hash()


@pytest.mark.parametrize("name, match", [
    ("gemma-scope-2-1b-it-res/layer_3_width_16k_l0_small",
     "not in the local Hugging Face cache (TMP); nothing is downloaded at run time: fetch this SAE once with: "
     "hf download google/gemma-scope-2-1b-it --include 'resid_post/layer_3_width_16k_l0_small/*'"),
    ("gemma-scope-2-270m-pt-res/layer_9_width_16k_l0_big", "cached ids of gemma-scope-2-270m-pt-res: "
                                                           "layer_12_width_32_l0_medium"),
    ("gemma-scope-2-270m-pt-transcoders/layer_3", "transcoders are not supported"),
    ("gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical", "gemma-scope-2b-pt-res/layer_N/width_16k/"),
])
def test_release_names_that_cannot_be_read_say_why(tmp_path, monkeypatch, name, match):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_gemma2(tmp_path)
    one_line_error(name, match.replace("TMP", str(tmp_path)))


def test_gemma_scope_1_release_path_names_model_and_hook(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_gemma1(tmp_path / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "r1")
    sae = load_sae("gemma-scope-2b-pt-res/layer_3/width_32/average_l0_5")
    assert (sae.cfg.model_name, sae.cfg.hook_name) == ("", "layers.3.resid_post")
    assert "trained on google/gemma-2-2b" in sae.load_notes[0]
    with torch.no_grad():
        assert close(sae.encode(X), _gemma_ref(gemma2_tensors(), X))


# ----------------------------------------------------------------------------------------------- sparsify
def test_sparsify_checkpoint(tmp_path):
    folder = write_sparsify(tmp_path)
    sae = load_sae(folder)
    t = sparsify_tensors()
    assert sae.architecture == "topk" and sae.cfg.k == K and (sae.cfg.d_in, sae.cfg.d_sae) == (D, M)
    assert sae.cfg.hook_name == "layers.6.resid_post" and sae.cfg.model_name == "EleutherAI/pythia-70m"
    # fused_encoder: topk(relu(encoder(x − b_dec))); decode: top_acts·W_dec + b_dec
    f_ref = topk_of(((X - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu(), K)
    with torch.no_grad():
        assert close(sae.encode(X), f_ref)
        assert close(sae(X), f_ref @ t["W_dec"] + t["b_dec"])


def test_sparsify_run_folder_names_its_hooks(tmp_path):
    folder = write_sparsify(tmp_path)
    one_line_error(folder.parent, "one SAE per subfolder (layers.6)")


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("k"), "has no 'k'"),
    (lambda c: c.update(num_latents=0, expansion_factor=0), "neither 'num_latents' nor 'expansion_factor'"),
    (lambda c: c.update(transcode=True), "transcoder"),
    (lambda c: c.update(skip_connection=True), "skip connection"),
    (lambda c: c.update(activation="groupmax"), "groupmax"),
    (lambda c: c.update(k="4"), "'k' must be a positive integer"),
])
def test_sparsify_ambiguous_or_unsupported(tmp_path, change, match):
    cfg = dict(SPARSIFY_CFG)
    change(cfg)
    one_line_error(write_sparsify(tmp_path, cfg=cfg), match)


def test_sparsify_skip_weights_are_refused(tmp_path):
    t = {**sparsify_tensors(), "W_skip": torch.zeros(D, D)}
    one_line_error(write_sparsify(tmp_path, tensors=t), "W_skip")


# ------------------------------------------------------------------------------------ dictionary_learning
def _dl_reference(name: str, s: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, x̂) as dictionary_learning computes them (after its from_pretrained defaults)."""
    if name == "AutoEncoder":
        f = ((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"]).relu()
        return f, f @ s["decoder.weight"].T + s["bias"]
    if name == "AutoEncoderNew":
        f = (x @ s["encoder.weight"].T + s["encoder.bias"]).relu()
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if name == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = ((x_enc + s["gate_bias"]) > 0) * (s["r_mag"].exp() * x_enc + s["mag_bias"]).relu()
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if name in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = ((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]).relu()
        f = topk_of(post, K) if name == "AutoEncoderTopK" else post * (post > s["threshold"])
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if name == "MatryoshkaBatchTopKSAE":
        post = ((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"]).relu()
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    pre = x @ s["W_enc"] + s["b_enc"]  # JumpReluAutoEncoder, apply_b_dec_to_input = False
    f = (pre * (pre > s["threshold"])).relu()
    return f, f @ s["W_dec"] + s["b_dec"]


DL_ARCH = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated", "AutoEncoderTopK": "topk",
           "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka", "JumpReluAutoEncoder": "jumprelu"}


@pytest.mark.parametrize("name", list(DL_ARCH))
def test_dictionary_learning_checkpoint(tmp_path, name):
    sae = load_sae(write_dl(tmp_path, name))
    f_ref, x_hat_ref = _dl_reference(name, dl_state(name), X)
    assert sae.architecture == DL_ARCH[name] and (sae.cfg.d_in, sae.cfg.d_sae) == (D, M)
    assert sae.cfg.hook_name == "layers.3.resid_post" and sae.cfg.model_name == "EleutherAI/pythia-70m-deduped"
    with torch.no_grad():
        if name == "AutoEncoder":  # from_pretrained normalises decoder columns; f scales by their norms
            f_ref = f_ref * dl_state(name)["decoder.weight"].norm(dim=0)
        assert close(sae.encode(X), f_ref)
        assert close(sae(X), x_hat_ref)


@pytest.mark.parametrize("name", ["AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_class_from_unique_keys(tmp_path, name):
    assert load_sae(write_dl(tmp_path, name, config=False)).architecture == DL_ARCH[name]


def test_dictionary_learning_training_backup_folds_norm_factor(tmp_path):
    """A backup ae.pt wraps the state of an SAE trained on x/s; the final save scales biases by s."""
    name, s = "JumpReluAutoEncoder", 2.0
    state = dl_state(name)
    folder = write_dl(tmp_path, name, state={"step": 5, "ae": state, "optimizer": {"state": {}}, "norm_factor": s,
                                             "config": {"dict_class": name}})
    scaled = {**state, **{k: state[k] * s for k in ("b_enc", "b_dec", "threshold")}}  # scale_biases(s)
    f_ref, x_hat_ref = _dl_reference(name, scaled, X)
    with torch.no_grad():
        sae = load_sae(folder)
        assert close(sae.encode(X), f_ref) and close(sae(X), x_hat_ref)


@pytest.mark.parametrize("make, match", [
    (lambda p: write_dl(p, "AutoEncoderTopK", config=False), "add config.json with trainer.dict_class"),
    (lambda p: write_dl(p, "AutoEncoderTopK", state={k: v for k, v in dl_state("AutoEncoderTopK").items()
                                                     if k != "k"}, trainer={"k": None}), "without k"),
    (lambda p: write_dl(p, "AutoEncoderTopK", trainer={"k": K + 1}), "k is 4 in the file but 5"),
    (lambda p: write_dl(p, "BatchTopKSAE", state={**dl_state("BatchTopKSAE"), "threshold": torch.tensor(-1.0)}),
     "never set"),
    (lambda p: write_dl(p, "AutoEncoder", trainer={"dict_class": "CrossCoder"}),
     "dict_class 'CrossCoder' is not supported"),
    (lambda p: write_dl(p, "MatryoshkaBatchTopKSAE", state={**dl_state("MatryoshkaBatchTopKSAE"),
                                                            "group_sizes": torch.tensor([8, 8])}), "sum to"),
])
def test_dictionary_learning_ambiguous_or_unsupported(tmp_path, make, match):
    one_line_error(make(tmp_path), match)


class RunsCode:
    """Unpickling this would create a folder: the marker of arbitrary code having run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickled_objects_are_refused_not_run(tmp_path, how):
    folder = write_dl(tmp_path, "AutoEncoder")
    marker = tmp_path / "code-ran"
    evil = {"encoder.weight": RunsCode(marker)}
    if how == "torch.save":
        torch.save(evil, folder / "ae.pt")
    else:
        (folder / "ae.pt").write_bytes(pickle.dumps(evil))
    one_line_error(folder, "never unpickles")
    assert not marker.exists()


# ----------------------------------------------------------------------- bad input, every loader, one table
def _edit_tensors(file: Path, fn) -> None:
    """Rewrite the weights in ``file`` (safetensors, npz or torch) through ``fn(dict) -> dict``."""
    if file.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in fn(load_file(str(file))).items()}, str(file))
    elif file.suffix == ".npz":
        with np.load(file) as data:
            arrays = {k: torch.from_numpy(data[k]) for k in data.files}
        np.savez(file, **{k: v.numpy() for k, v in fn(arrays).items()})
    else:
        torch.save(fn(torch.load(file, weights_only=True)), file)


def _edit_json(file: Path, fn) -> None:
    raw = json.loads(file.read_text())
    fn(raw)
    file.write_text(json.dumps(raw))


def _rename_width(folder: Path) -> Path:
    """Move a release folder under the name of another width (its file stays d_sae = 32)."""
    target = folder.parent / folder.name.replace("width_32", "width_16k")
    if folder.name == "average_l0_5":  # Gemma Scope 1: layer_3/width_32/average_l0_5
        target = folder.parent.parent / "width_16k" / folder.name
        target.parent.mkdir()
    shutil.move(str(folder), str(target))
    return target


# name -> (write a valid folder, weights file, a key to drop or misshape, make it a file of another width)
LOADERS = {
    "saelens": (lambda p: write_saelens(p / "s", {"architecture": "standard"}, saelens_tensors()),
                "sae_weights.safetensors", "b_dec",
                lambda f: (_edit_json(f / "cfg.json", lambda c: c.update(d_in=24)), f)[1]),
    "sparsify": (write_sparsify, "sae.safetensors", "b_dec",
                 lambda f: (_edit_json(f / "cfg.json", lambda c: c.update(d_in=24)), f)[1]),
    "dictionary_learning": (lambda p: write_dl(p, "AutoEncoderTopK"), "ae.pt", "b_dec",
                            lambda f: (_edit_json(f / "config.json", lambda c: c["trainer"].update(
                                activation_dim=24)), f)[1]),
    "gemma_scope": (write_gemma1, "params.npz", "b_dec", _rename_width),
    "gemma_scope_2": (write_gemma2, "params.safetensors", "b_dec", _rename_width),
}


def _truncate(folder: Path, file: str, key: str) -> Path:
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    return folder


def _misshape(folder: Path, file: str, key: str) -> Path:
    _edit_tensors(folder / file, lambda t: {**t, key: torch.zeros(D + 3)})
    return folder


def _drop(folder: Path, file: str, key: str) -> Path:
    _edit_tensors(folder / file, lambda t: {k: v for k, v in t.items() if k != key})
    return folder


def _pickle(folder: Path, file: str, key: str) -> Path:
    (folder / file).write_bytes(pickle.dumps({key: RunsCode(folder.parent / "code-ran")}))
    return folder


BAD = {"truncated": (_truncate, "complete"), "wrong shape": (_misshape, "(19,)"), "missing key": (_drop, "b_dec"),
       "pickle": (_pickle, "unpickl"), "another width": (None, "")}
CASES = [(loader, bad) for loader in LOADERS for bad in BAD]


def bad_folder(tmp_path: Path, loader: str, bad: str) -> tuple[Path, str]:
    write, file, key, other_width = LOADERS[loader]
    folder = write(tmp_path)
    damage, needle = BAD[bad]
    folder = other_width(folder) if damage is None else damage(folder, file, key)
    return folder, needle


def one_line_error(folder: Path, match: str) -> str:
    with pytest.raises(MonoscopeError) as info:
        load_sae(folder)
    msg = str(info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


@pytest.mark.parametrize("loader, bad", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_bad_input_is_one_clear_error(tmp_path, loader, bad):
    folder, needle = bad_folder(tmp_path, loader, bad)
    msg = one_line_error(folder, needle)
    assert str(folder) in msg or str(folder.resolve()) in msg, msg  # names the file
    if bad == "another width":
        assert "24" in msg or "16k" in msg, msg
    assert not (folder.parent / "code-ran").exists()


# --------------------------------------------------------------------------------------------------- CLI
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("loader, bad", [c for c in CASES if c[1] in ("truncated", "pickle", "another width")],
                         ids=lambda v: v)
@pytest.mark.parametrize("command", ["info", "evaluate"])
def test_cli_bad_sae_exits_2(tmp_path, capsys, loader, bad, command):
    folder, needle = bad_folder(tmp_path / "w", loader, bad)
    store = make_store(tmp_path / "store", rnd(7, 40, D).numpy())
    before = _snapshot(tmp_path)
    capsys.readouterr()
    argv = ["info", str(folder)] if command == "info" else ["evaluate", str(folder), "--store", str(store),
                                                            "--lm-contexts", "0"]
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err and "\n" not in err and "Traceback" not in err, (status, err)
    assert _snapshot(tmp_path) == before, "a failing command wrote files"


# loader -> (architecture, hook, model) that `monoscope info` must report
INFO = {"saelens": ("relu", "layers.3.resid_post", "(not stated)"),
        "sparsify": ("topk", "layers.6.resid_post", "EleutherAI/pythia-70m"),
        "dictionary_learning": ("topk", "layers.3.resid_post", "EleutherAI/pythia-70m-deduped"),
        "gemma_scope": ("jumprelu", "(not stated", "(not stated)"),
        "gemma_scope_2": ("jumprelu", "layers.12.resid_post", "gemma-3-270m")}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_cli_info_and_evaluate(tmp_path, capsys, loader):
    folder = LOADERS[loader][0](tmp_path)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    arch, hook, model = INFO[loader]
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert lines["architecture"].startswith(arch) and lines["hook"].startswith(hook), out
    assert lines["model"] == model and "16 / 32" in out and "format" in lines, out
    if arch == "topk":
        assert f"k = {K}" in out
    # evaluate runs on a store of the SAE's model and hook; a store of another width exits 2
    store_hook = hook if hook.startswith("layers.") else "layers.1.resid_post"
    store_model = model if not model.startswith("(") else "synthetic"
    store = make_store(tmp_path / "store", rnd(7, 40, D).numpy(), hook=store_hook, model=store_model)
    assert main(["evaluate", str(folder), "--store", str(store), "--lm-contexts", "0"]) == 0
    assert (folder / "eval.json").exists()
    wide = make_store(tmp_path / "wide", rnd(7, 40, 24).numpy(), hook=store_hook, model=store_model)
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--store", str(wide), "--lm-contexts", "0"]) == 2
    assert "d_in=16" in capsys.readouterr().err


def test_cli_info_of_a_monoscope_sae_and_of_a_run_folder(tmp_path, capsys):
    from monoscope.sae import SAEConfig, build_sae, save_sae

    sae = build_sae(SAEConfig("batchtopk", d_in=D, d_sae=M, k=K, hook_name="layers.2.mlp_out", model_name="tiny"))
    save_sae(sae, tmp_path / "ours")
    assert main(["info", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("format        monoscope") and "batchtopk (BatchTopKSAE)" in out
    assert "k = 4 latents per token on average; threshold" in out and "layers.2.mlp_out" in out
    run = write_sparsify(tmp_path).parent
    assert main(["info", str(run)]) == 2
    assert "one SAE per subfolder (layers.6)" in capsys.readouterr().err
