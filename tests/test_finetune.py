"""KL fine-tuning (monoscope.finetune) on a tiny random model: the loss it minimises is the evaluation's KL,
it lowers that KL on held-out contexts at unchanged L0, the model stays frozen, and bad input is refused."""
from __future__ import annotations

import json

import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.evaluate import evaluate_sae, store_contexts
from monoscope.finetune import FinetuneConfig, finetune_sae, kl_step
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import load_sae, save_sae
from test_evaluate import HOOK, lm_store, signed_identity_sae  # noqa: F401  (lm_store is a fixture)


def _small_sae(store) -> torch.nn.Module:
    """A TopK SAE with k 4 of 64 latents trained briefly on the store: a poor replacement, room to improve."""
    from monoscope.train import TrainConfig, train_sae

    cfg = TrainConfig(architecture="topk", d_sae=64, k=4, batch_size=128, tokens=2400, lr=3e-3, seed=0,
                      log_every=1000)
    return train_sae(cfg, store, store.parent / "sae", show_progress=False)


def test_the_step_loss_is_the_evaluations_kl(lm_store):
    lm, store = lm_store
    perfect = signed_identity_sae(32, model="tiny-llama")
    ids = torch.tensor(store_contexts(load_store(store), 2, lm.bos_token_id))
    terms = kl_step(perfect, lm.model, HOOK, ids, 1, 1.0)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6) and terms["fvu"].item() == pytest.approx(0.0, abs=1e-9)

    half = signed_identity_sae(32, 0.5, model="tiny-llama")
    terms = kl_step(half, lm.model, HOOK, ids, 1, 0.0)
    m = evaluate_sae(half, store, lm=lm, max_tokens=48, lm_contexts=2, lm_batch_size=2)
    assert terms["kl"].item() == pytest.approx(m["kl_sae"], rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["kl"].item())  # mse_coefficient 0: KL only


def load_store(folder):
    from monoscope.store import ActivationStore

    return ActivationStore(folder)


def test_finetune_lowers_kl_at_the_same_l0_and_leaves_the_model_alone(lm_store, tmp_path):
    lm, store = lm_store
    sae_folder = _small_sae(store)
    before = evaluate_sae(sae_folder, store, lm=lm, max_tokens=400, lm_contexts=10, out=tmp_path / "before.json")
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = FinetuneConfig(store=str(store), out=str(tmp_path / "tuned"), tokens=3000, lm_batch_size=4, lr=3e-3)
    out = finetune_sae(sae_folder, cfg, lm=lm, show_progress=False)
    after = evaluate_sae(out, store, lm=lm, max_tokens=400, lm_contexts=10)
    assert after["kl_sae"] < 0.8 * before["kl_sae"], (before["kl_sae"], after["kl_sae"])
    assert after["l0"] == pytest.approx(4.0)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in weights.items())
    assert all(p.requires_grad for p in lm.model.parameters())
    log = json.loads((out / "finetune.json").read_text())
    assert sum(1 for _ in log["curve"]) >= 10 and log["config"]["tokens"] == 3000
    assert load_sae(out).cfg.k == 4 and load_sae(out).cfg.hook_name == HOOK


def test_bad_input_is_refused_and_writes_nothing(lm_store, tmp_path, capsys):
    lm, store = lm_store
    folder = save_sae(signed_identity_sae(32, model="tiny-llama"), tmp_path / "sae")
    cases = {
        "its own folder": (["--out", str(folder)], "own folder"),
        "no tokens": (["--out", str(tmp_path / "o1"), "--tokens", "0"], "positive"),
        "negative mse weight": (["--out", str(tmp_path / "o2"), "--mse-coefficient", "-1"], "mse_coefficient"),
    }
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    cases["a full folder"] = (["--out", str(tmp_path / "full")], "not empty")
    for name, (flags, needle) in cases.items():
        capsys.readouterr()
        assert main(["finetune", str(folder), "--store", str(store), *flags]) == 2, name
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (name, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert (tmp_path / "full" / "x").read_text() == "keep"
    other = build_sae(SAEConfig("topk", d_in=32, d_sae=8, k=2, hook_name=HOOK, model_name="gpt2"))
    with pytest.raises(MonoscopeError, match="gpt2"):
        finetune_sae(other, FinetuneConfig(store=str(store), out=str(tmp_path / "o3")), lm=lm)
