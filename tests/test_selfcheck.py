"""The post-load self-check: an SAE that fits its hook passes quietly, a mis-read or mis-placed one warns once,
in one line, in the library and on the command line."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeWarning
from monoscope.hookpoints import resolve
from monoscope.models import tiny_model
from monoscope.sae import SAEConfig, build_sae, save_sae
from monoscope.sae.compat import implausible
from monoscope.selfcheck import sae_for_model, sae_for_store
from monoscope.store import ActivationStore
from test_evaluate import make_store, signed_identity_sae

HOOK = "layers.1.resid_post"


def fit_warnings(fn, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    return [str(w.message) for w in caught if issubclass(w.category, MonoscopeWarning)]


def test_implausible_names_each_reason():
    assert implausible(0.3, 32, 4096) is None
    assert implausible(1.0, 32, 4096) is None  # as bad as the mean, but not worse
    assert "worse than predicting the mean" in implausible(1.7, 32, 4096)
    assert "1.7" in implausible(1.7, 32, 4096)
    assert "nan" in implausible(float("nan"), 32, 4096)
    assert "no latent fires" in implausible(0.2, 0.0, 4096)
    assert "not sparse" in implausible(0.01, 3000, 4096)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_model_check_passes_a_fitting_sae_and_warns_once_for_a_misscaled_one(lm):
    d = resolve(lm.model, HOOK).width
    good = signed_identity_sae(d, 1.0, model="tiny-llama")
    assert fit_warnings(sae_for_model, good, lm) == []
    bad = signed_identity_sae(d, 10.0, model="tiny-llama")  # a decoder read 10x too large
    [message] = fit_warnings(sae_for_model, bad, lm)
    assert "\n" not in message and f"hook {HOOK!r} of tiny-llama" in message and "worse than predicting" in message
    assert fit_warnings(sae_for_model, bad, lm) == []  # checked once per SAE, model and hook


def test_store_check_uses_the_store_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 6))
    store = ActivationStore(make_store(tmp_path / "s", x))
    assert fit_warnings(sae_for_store, signed_identity_sae(6, 1.0), store) == []
    [message] = fit_warnings(sae_for_store, signed_identity_sae(6, -1.0), store)  # a sign flip: FVU 4
    assert "of the store" in message and "4" in message and "256 activations" in message
    dead = build_sae(SAEConfig("relu", d_in=6, d_sae=12, hook_name=HOOK, model_name="synthetic"))
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)  # no pre-activation gets above zero
    [message] = fit_warnings(sae_for_store, dead, store)
    assert "no latent fires" in message


def test_cli_prints_one_warning_line(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 6))
    store = make_store(tmp_path / "s", x)
    save_sae(signed_identity_sae(6, 3.0), tmp_path / "sae")
    r = subprocess.run([sys.executable, "-m", "monoscope", "evaluate", str(tmp_path / "sae"), "--store", str(store),
                        "--lm-contexts", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("monoscope: warning: the SAE may not fit hook"), r.stderr
    assert "(> 1: worse than predicting the mean)" in lines[0]


@pytest.mark.slow
def test_real_gemma_sae_fits_its_layer_and_not_another(tmp_path):
    """On Gemma 3 270M an SAE trained on layer 6 passes there and warns when it claims layer 3 (same width)."""
    from monoscope.extract import ExtractConfig, extract
    from monoscope.models import load_model
    from monoscope.sae import load_sae
    from monoscope.train import TrainConfig, train_sae

    lm = load_model("gemma-3-270m")
    extract(ExtractConfig(hook=("layers.6.resid_post",), corpus="default", tokens=12_000, batch_size=8),
            tmp_path / "acts", lm=lm)
    train_sae(TrainConfig(architecture="topk", k=32, d_sae=1024, tokens=120_000), tmp_path / "acts", tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert fit_warnings(sae_for_model, sae, lm) == []
    sae.cfg.hook_name = "layers.3.resid_post"
    [message] = fit_warnings(sae_for_model, sae, lm)
    assert "layers.3.resid_post" in message
