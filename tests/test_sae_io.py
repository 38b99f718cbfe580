"""Saving and loading SAEs: our SAELens-layout folders, SAELens folders, Gemma Scope (1 and 2) files.

The SAELens cross-check runs sae-lens in a separate interpreter (it drags in transformer-lens, wandb, …).
It is found via $MONOSCOPE_SAELENS_PYTHON, else the current interpreter if it can import sae_lens, else a
the venv that `scripts/setup.sh dev` makes in the monoscope cache, or ``venv-saelens`` beside the
active venv; otherwise the test is skipped.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from monoscope.errors import MonoscopeError
from monoscope.sae import ARCHITECTURES, SAEConfig, build_sae, load_sae, save_sae

D, M, K = 12, 48, 4


def trained_like(arch: str, seed: int = 0):
    """A small SAE with non-trivial weights, biases and (where it has one) threshold."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, d_in=D, d_sae=M, k=K, hook_name="blocks.3.hook_resid_post",
                              model_name="tiny-model"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if arch in ("batchtopk", "matryoshka"):
        sae.training_forward(torch.randn(64, D))
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(M) * 0.5)
    return sae.eval()


def x_data(n=20):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip(tmp_path, arch):
    sae = trained_like(arch)
    folder = save_sae(sae, tmp_path / arch, extra_metadata={"run": "abc"})
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                     "gated": "gated", "jumprelu": "jumprelu"}[arch]
    assert cfg["architecture"] == expected_arch
    assert cfg["d_in"] == D and cfg["d_sae"] == M and cfg["dtype"] == "float32"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "tiny-model"
    assert meta["monoscope_architecture"] == arch and meta["run"] == "abc"
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (D, M) and tensors["W_dec"].shape == (M, D)
    if expected_arch == "jumprelu":
        assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if arch == "gated":
        assert set(tensors) == {"W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec"}

    back = load_sae(folder)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = x_data()
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert torch.equal(back(x), sae(x))


def test_save_overwrites_atomically(tmp_path):
    folder = tmp_path / "sae"
    save_sae(trained_like("relu", seed=0), folder)
    second = trained_like("topk", seed=1)
    save_sae(second, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp or backup folders left
    assert load_sae(folder).architecture == "topk"


def _manual_jumprelu(x, t, centre):
    pre = (x - t["b_dec"] if centre else x) @ t["W_enc"] + t["b_enc"]
    return pre.relu() * (pre > t["threshold"])


def _gemma_tensors():
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(D, M, generator=g), "W_dec": torch.randn(M, D, generator=g),
            "b_enc": torch.randn(M, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g),
            "threshold": torch.rand(M, generator=g)}


def test_gemma_scope_npz(tmp_path):
    t = _gemma_tensors()
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = load_sae(tmp_path)
    assert sae.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    x = x_data()
    with torch.no_grad():
        f = sae.encode(x)
        assert torch.allclose(f, _manual_jumprelu(x, t, centre=False))
        assert torch.allclose(sae.decode(f), f @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert load_sae(tmp_path / "params.npz").cfg.d_sae == M  # a path to the file works too


def test_gemma_scope_npz_never_unpickles(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(MonoscopeError, match="unpickl"):
        load_sae(tmp_path)


def test_gemma_scope_2_safetensors(tmp_path):
    t = _gemma_tensors()
    save_file({k.replace("W_", "w_"): v.contiguous() for k, v in t.items()}, str(tmp_path / "params.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.6.output", "width": M}))
    sae = load_sae(tmp_path)
    # HF hook point and Gemma Scope 2's model name, in monoscope's names (so the SAE fits a store of that hook)
    assert sae.cfg.hook_name == "layers.6.resid_post" and sae.cfg.model_name == "gemma-3-270m"
    x = x_data()
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), _manual_jumprelu(x, t, centre=False))
    # without config.json it still loads
    (tmp_path / "config.json").unlink()
    assert load_sae(tmp_path).cfg.d_in == D


def test_gemma_scope_2_transcoder_rejected(tmp_path):
    t = {k.replace("W_", "w_"): v for k, v in _gemma_tensors().items()}
    t["affine_skip_connection"] = torch.zeros(D, D)
    save_file(t, str(tmp_path / "params.safetensors"))
    with pytest.raises(MonoscopeError, match="transcoder"):
        load_sae(tmp_path)


def _write_saelens(folder: Path, cfg: dict, tensors: dict):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def test_plain_saelens_folders(tmp_path):
    t = _gemma_tensors()
    base = {"d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "metadata": {"hook_name": "blocks.0.hook_resid_pre",
                                                          "sae_lens_version": "6.5.0"}}
    _write_saelens(tmp_path / "std", {**base, "architecture": "standard"},
                   {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    sae = load_sae(tmp_path / "std")
    assert sae.architecture == "relu" and sae.cfg.hook_name == "layers.0.resid_pre"  # TransformerLens name mapped
    x = x_data()
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu())

    _write_saelens(tmp_path / "jr", {**base, "architecture": "jumprelu"}, t)
    with torch.no_grad():
        assert torch.allclose(load_sae(tmp_path / "jr").encode(x), _manual_jumprelu(x, t, centre=True))

    # TopK with rescale_acts_by_decoder_norm: SAELens picks top-k of z·‖d‖ and decodes (f/‖d‖)·W_dec
    _write_saelens(tmp_path / "tk", {**base, "architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True},
                   {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    sae = load_sae(tmp_path / "tk")
    n = t["W_dec"].norm(dim=1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
    top = pre.topk(K, dim=1)
    f_ref = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f_ref, atol=1e-5)
        assert torch.allclose(sae(x), (f_ref / n) @ t["W_dec"] + t["b_dec"], atol=1e-4)


def test_load_errors(tmp_path):
    with pytest.raises(MonoscopeError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(MonoscopeError, match="no SAE found.*params.npz"):
        load_sae(tmp_path / "empty")
    t = _gemma_tensors()
    base = {"d_in": D, "d_sae": M, "apply_b_dec_to_input": True}
    _write_saelens(tmp_path / "bad_shape", {**base, "architecture": "standard"},
                   {"W_enc": t["W_enc"][:, :10], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]})
    with pytest.raises(MonoscopeError, match=r"W_enc has shape \(12, 10\), expected \(12, 48\)"):
        load_sae(tmp_path / "bad_shape")
    _write_saelens(tmp_path / "missing", {**base, "architecture": "jumprelu"},
                   {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    with pytest.raises(MonoscopeError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path / "missing")
    _write_saelens(tmp_path / "arch", {**base, "architecture": "matching_pursuit"}, t)
    with pytest.raises(MonoscopeError, match="not supported"):
        load_sae(tmp_path / "arch")
    _write_saelens(tmp_path / "norm", {**base, "architecture": "standard",
                                       "normalize_activations": "expected_average_only_in"}, t)
    with pytest.raises(MonoscopeError, match="fold"):
        load_sae(tmp_path / "norm")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "cfg.json").write_text(json.dumps({**base, "architecture": "standard"}))
    (tmp_path / "trunc" / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(MonoscopeError, match="safetensors"):
        load_sae(tmp_path / "trunc")


def _saved(tmp_path, arch="topk"):
    folder = save_sae(trained_like(arch), tmp_path / "sae")
    return folder, json.loads((folder / "cfg.json").read_text())


def _one_clear_error(folder: Path, file: str, match: str):
    """load_sae raises a MonoscopeError (no other exception type) that names ``file`` and matches ``match``."""
    with pytest.raises(MonoscopeError) as info:
        load_sae(folder)
    msg = str(info.value)
    assert str(folder / file) in msg and "\n" not in msg, msg
    assert re.search(match, msg), msg


@pytest.mark.parametrize("content, match", [
    ([1, 2, 3], "JSON object.*list"),
    ("not json", "not valid JSON"),
    ({"architecture": "standard", "d_in": "12", "d_sae": M}, "'d_in' must be an integer"),
    ({"architecture": "standard", "d_in": D}, "'d_sae' must be an integer, got None"),
    ({"architecture": ["topk"], "d_in": D, "d_sae": M}, "not supported"),
    ({"architecture": "topk", "d_in": D, "d_sae": M, "k": "4"}, "integer 'k'"),
    ({"architecture": "standard", "d_in": D, "d_sae": -1}, "must be positive"),
    ({"architecture": "standard", "d_in": D, "d_sae": M, "metadata": [1]}, "'metadata' must be a JSON object"),
])
def test_bad_plain_cfg_json_is_one_clear_error(tmp_path, content, match):
    folder, _ = _saved(tmp_path)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "cfg.json").write_text(text)
    _one_clear_error(folder, "cfg.json", match)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(d_sae="48"), "d_sae .*must be an int, got '48'"),
    (lambda c: c.pop("d_in"), r"lacks \['d_in'\]"),
    (lambda c: c.update(k="4"), "k .*must be an int, got .4."),
    (lambda c: c.update(k=1000), "k=1000 must be between 1 and d_sae=48"),
    (lambda c: c.update(architecture="banana"), "unknown SAE architecture 'banana'"),
    (lambda c: c.update(nonsense=1), r"unknown key\(s\) \['nonsense'\]"),
    (lambda c: c.update(l1_coefficient=-1.0, architecture="relu"), "l1_coefficient must be a finite number"),
])
def test_bad_monoscope_config_is_one_clear_error(tmp_path, change, match):
    folder, cfg = _saved(tmp_path)
    change(cfg["metadata"]["monoscope_config"])
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _one_clear_error(folder, "cfg.json", match)
    cfg["metadata"]["monoscope_config"] = "topk"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _one_clear_error(folder, "cfg.json", "monoscope_config must be a JSON object")


def test_truncated_or_wrong_shape_weights_are_one_clear_error(tmp_path):
    folder, _ = _saved(tmp_path)
    weights = folder / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    _one_clear_error(folder, "sae_weights.safetensors", "cannot read .* as safetensors.*is the file complete")
    weights.write_bytes(b"")
    _one_clear_error(folder, "sae_weights.safetensors", "cannot read")
    t = dict(load_bytes(good))
    t["W_dec"] = t["W_dec"].t().contiguous()
    save_file(t, str(weights))
    _one_clear_error(folder, "sae_weights.safetensors", r"W_dec has shape \(12, 48\), expected \(48, 12\)")
    t["W_dec"] = t["W_enc"].t().contiguous()
    del t["b_enc"]
    save_file(t, str(weights))
    _one_clear_error(folder, "sae_weights.safetensors", r"missing \['b_enc'\]")


def test_gemma_scope_2_config_must_be_an_object(tmp_path):
    save_file({k.replace("W_", "w_"): v for k, v in _gemma_tensors().items()}, str(tmp_path / "params.safetensors"))
    (tmp_path / "config.json").write_text("[]")
    _one_clear_error(tmp_path, "config.json", "JSON object")


# ---------------------------------------------------------------------------------------------------------
# SAELens itself reads what we write

def _saelens_python() -> str | None:
    env = os.environ.get("MONOSCOPE_SAELENS_PYTHON")
    if env:
        return env if Path(env).exists() else None
    import importlib.util
    if importlib.util.find_spec("sae_lens") is not None:
        return sys.executable
    from monoscope.models import cache_dir

    for cand in (cache_dir() / "venv-saelens" / "bin" / "python",
                 Path(sys.prefix).parent / "venv-saelens" / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return None


SAELENS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE
    x = load_file(sys.argv[1])["x"]
    out = {}
    for folder in sys.argv[3:]:
        sae = SAE.load_from_disk(folder, device="cpu")
        with torch.no_grad():
            f = sae.encode(x)
            name = folder.rstrip("/").split("/")[-1]
            out[name + ".f"] = f.to_dense().contiguous() if f.is_sparse else f.contiguous()
            out[name + ".x_hat"] = sae.decode(f).contiguous()
            out[name + ".arch"] = torch.tensor([ord(c) for c in sae.cfg.architecture()])
    save_file(out, sys.argv[2])
""")


def test_saelens_loads_our_saves(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("sae-lens interpreter not found: create it with `python -m venv venv-saelens && "
                    "venv-saelens/bin/pip install -c constraints.txt torch==2.13.0 sae-lens` beside the "
                    "project venv, or set MONOSCOPE_SAELENS_PYTHON")
    x = x_data(32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours = {}
    for arch in ARCHITECTURES:
        sae = trained_like(arch)
        save_sae(sae, tmp_path / arch)
        with torch.no_grad():
            ours[arch] = (sae.encode(x), sae(x))
    (tmp_path / "run.py").write_text(SAELENS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    proc = subprocess.run([py, str(tmp_path / "run.py"), str(tmp_path / "x.safetensors"), str(tmp_path / "out.st"),
                           *[str(tmp_path / a) for a in ARCHITECTURES]],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.st"))
    for arch in ARCHITECTURES:
        f, x_hat = ours[arch]
        their_arch = "".join(chr(int(c)) for c in got[f"{arch}.arch"])
        assert their_arch == {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(arch, arch)
        assert torch.allclose(got[f"{arch}.f"], f, atol=1e-5), arch
        assert torch.allclose(got[f"{arch}.x_hat"], x_hat, atol=1e-5), arch
