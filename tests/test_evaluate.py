"""Tests for monoscope.evaluate (metrics against hand computations) and monoscope.sweep."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.evaluate import evaluate_sae, store_contexts
from monoscope.sae import SAEConfig, build_sae
from monoscope.store import StoreWriter

HOOK = "layers.1.resid_post"


def make_store(folder, x: np.ndarray, hook=HOOK, model="synthetic", keep_bos=False):
    n = len(x)
    w = StoreWriter.open(folder, model=model, model_fingerprint=model, hooks={hook: x.shape[1]}, shard_rows=64,
                         meta={"input_hash": "hand", "config": {"keep_bos": keep_bos}})
    ctx = np.arange(n) // 10
    w.append({hook: torch.from_numpy(x.astype(np.float32))}, token_ids=np.full(n, 5), doc_ids=ctx,
             positions=np.arange(n) % 10, context_ids=ctx)
    w.finish()
    return Path(folder)


def signed_identity_sae(d: int, scale: float = 1.0, hook=HOOK, model="synthetic"):
    """TopK SAE with latents (x_i)+ and (−x_i)+ : k = d keeps every non-negative one, so x̂ = scale·x exactly."""
    sae = build_sae(SAEConfig("topk", d_in=d, d_sae=2 * d, k=d, hook_name=hook, model_name=model))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(scale * torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_reconstruction_metrics_match_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4))
    x[:, 0] = np.abs(x[:, 0]) + 3.0   # latent "−x_0" never fires: one dead latent of 8
    x[:, 1] += 1.0                    # a non-zero mean, so centring about 0 or per batch would differ
    x = x.astype(np.float32).astype(np.float64)
    store = make_store(tmp_path / "s", x)
    m = evaluate_sae(signed_identity_sae(4, 0.5), store, lm_contexts=0, batch_size=64)

    xh = 0.5 * x
    sse = ((x - xh) ** 2).sum()
    assert m["tokens"] == 300
    assert m["mse"] == pytest.approx(sse / 300, rel=1e-6)
    ev = 1 - sse / ((x - x.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(ev, rel=1e-6)
    assert m["fvu"] == pytest.approx(1 - ev, rel=1e-6)
    assert m["explained_variance"] != pytest.approx(1 - sse / (x ** 2).sum(), rel=1e-3)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    assert m["norm_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert m["cosine"] == pytest.approx(1.0, rel=1e-6)
    assert m["l0"] == pytest.approx(4.0)
    assert m["l1"] == pytest.approx(np.abs(x).sum(1).mean(), rel=1e-6)
    assert m["dead_fraction"] == pytest.approx(1 / 8)
    density = np.r_[(x > 0).mean(0), (x < 0).mean(0)]
    assert m["dense_fraction_1pct"] == pytest.approx((density > 0.01).mean())
    assert m["dense_fraction_10pct"] == pytest.approx((density > 0.1).mean())
    assert sum(m["density_histogram"]["counts"]) == 7 and m["density_histogram"]["dead"] == 1


def test_bos_rows_are_left_out_of_metrics(tmp_path):
    x = np.random.default_rng(1).standard_normal((300, 4))
    x[::10] *= 1000.0  # the first row of every context plays a huge-norm BOS
    store = make_store(tmp_path / "s", x, keep_bos=True)
    m = evaluate_sae(signed_identity_sae(4, 0.5), store, lm_contexts=0, batch_size=64)
    assert m["tokens"] == 270
    rest = np.delete(x, np.arange(0, 300, 10), axis=0)
    assert m["mse"] == pytest.approx((0.25 * rest ** 2).sum(1).mean(), rel=1e-5)


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    from monoscope.extract import ExtractConfig, extract
    from monoscope.models import tiny_model

    tmp = tmp_path_factory.mktemp("lm")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "code", "text", "neuron"]
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(40)))
    lm = tiny_model("llama")
    cfg = ExtractConfig(model="tiny-llama", hook=(HOOK,), corpus=str(corpus), tokens=1200, context_length=24,
                        batch_size=8, split="all", shard_rows=256)
    return lm, extract(cfg, tmp / "store", lm=lm, show_progress=False).folder


def test_spliced_lm_perfect_and_zero_sae(lm_store):
    lm, store = lm_store
    perfect = evaluate_sae(signed_identity_sae(32, model="tiny-llama"), store, lm=lm, max_tokens=400, lm_contexts=6)
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["ce_loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["delta_loss"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["ce_zero"] > perfect["ce_clean"] and perfect["kl_zero"] > 0

    zero = evaluate_sae(signed_identity_sae(32, 0.0, model="tiny-llama"), store, lm=lm, max_tokens=400, lm_contexts=6)
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero"], abs=1e-6)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-5)

    # clean CE by hand: contexts rebuilt as BOS + stored tokens, the BOS position's prediction left out
    from monoscope.store import ActivationStore

    ctxs = store_contexts(ActivationStore(store), 6, lm.bos_token_id)
    assert all(c[0] == lm.bos_token_id and len(c) == 24 for c in ctxs)
    ids = torch.tensor(ctxs)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    assert perfect["ce_clean"] == pytest.approx(ce.item(), rel=1e-5)
    assert perfect["lm_tokens"] == 6 * 22


def test_mismatches_are_refused(lm_store, tmp_path):
    from monoscope.models import tiny_model

    lm, store = lm_store
    with pytest.raises(MonoscopeError, match="d_in=8 but"):
        evaluate_sae(signed_identity_sae(8, model="tiny-llama"), store, lm_contexts=0)
    with pytest.raises(MonoscopeError, match="reads hook 'layers.0.mlp_out'"):
        evaluate_sae(signed_identity_sae(32, hook="layers.0.mlp_out", model="tiny-llama"), store, lm_contexts=0)
    with pytest.raises(MonoscopeError, match="trained on model 'gpt2'"):
        evaluate_sae(signed_identity_sae(32, model="gpt2"), store, lm_contexts=0)
    with pytest.raises(MonoscopeError, match="not the one the store was extracted from"):
        evaluate_sae(signed_identity_sae(32, model="tiny-llama"), store, lm=tiny_model("llama", seed=1),
                     lm_contexts=2)
    with pytest.raises(MonoscopeError, match="does not exist"):
        evaluate_sae(tmp_path / "nope", store)


def test_cli_evaluate_writes_eval_json(lm_store, tmp_path, capsys):
    import argparse

    from monoscope.evaluate import setup_evaluate
    from monoscope.sae.io import save_sae

    _, store = lm_store
    folder = save_sae(signed_identity_sae(32, model="tiny-llama"), tmp_path / "sae")
    p = argparse.ArgumentParser()
    run = setup_evaluate(p)
    run(p.parse_args([str(folder), "--store", str(store), "--lm-contexts", "2", "--max-tokens", "100"]))
    out = capsys.readouterr().out
    assert "explained_variance" in out and "ce_loss_recovered" in out
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5) and saved["tokens"] == 100


def test_sweep_trains_evaluates_plots_and_reuses(lm_store, tmp_path):
    from monoscope.sweep import SweepConfig, run_sweep

    lm, store = lm_store
    cfg = SweepConfig(architectures=("topk", "relu"), k_values=(4, 8), l1_values=(1.0,), d_sae=64, steps=8,
                      batch_size=128, eval_tokens=300, lm_contexts=3)
    out = run_sweep(cfg, store, store, tmp_path / "sweep", lm=lm, show_progress=False)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["architecture"], float(r["value"])) for r in rows] == [("topk", 4), ("topk", 8), ("relu", 1.0)]
    assert all(r["delta_loss"] and r["fvu"] for r in rows)
    assert float(rows[0]["l0"]) == pytest.approx(4) and float(rows[1]["l0"]) == pytest.approx(8)
    for png in ("fvu_vs_l0.png", "delta_loss_vs_l0.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "saes").glob("*/*.json")}
    run_sweep(cfg, store, store, out, lm=lm, show_progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "saes").glob("*/*.json")}


# ---------------------------------------------------------------------------------------------------------
# One SAE compatibility check (check_sae_fits) for evaluate and probe

def test_evaluate_uses_the_shared_compatibility_check(lm_store):
    _, store = lm_store
    sae = signed_identity_sae(32, model="tiny-llama")
    with pytest.raises(MonoscopeError, match="trained on hook 'layers.1.resid_post', not 'layers.0.mlp_out'"):
        evaluate_sae(sae, store, hook="layers.0.mlp_out", lm_contexts=0)
    unnamed = signed_identity_sae(32, hook="", model="tiny-llama")
    with pytest.raises(MonoscopeError, match="hook 'layers.2.mlp_out' is not in the store, which holds"):
        evaluate_sae(unnamed, store, hook="layers.2.mlp_out", lm_contexts=0)
    assert evaluate_sae(unnamed, store, lm_contexts=0, max_tokens=50)["hook"] == HOOK


@pytest.mark.parametrize("hook, d, model, match", [
    (HOOK, 32, "gpt2", "trained on model 'gpt2' but the activations come from 'tiny-llama'"),
    ("layers.1.mlp_neurons", 32, "tiny-llama", "expects d_in=32 but hook 'layers.1.mlp_neurons' in model "
                                               "'tiny-llama' has width 64"),
    ("layers.9.resid_post", 32, "tiny-llama", "unknown hook 'layers.9.resid_post'"),
])
def test_probe_refuses_an_sae_that_does_not_fit_the_model(lm_store, tmp_path, capsys, hook, d, model, match):
    from monoscope.cli import main
    from monoscope.probing.run import ProbeConfig, run_probing
    from monoscope.sae.io import save_sae

    lm, _ = lm_store
    folder = save_sae(signed_identity_sae(d, hook=hook, model=model), tmp_path / "sae")
    with pytest.raises(MonoscopeError, match=match):
        run_probing(ProbeConfig(model="tiny-llama", source=f"sae:{folder}"), tmp_path / "out", lm=lm)
    assert main(["probe", "--model", "tiny-llama", "--source", f"sae:{folder}", "--out", str(tmp_path / "out")]) == 2
    assert match.split("'")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Non-finite data or weights: refused, and nothing is written

def test_nan_store_fails_and_keeps_the_good_eval_json(tmp_path, capsys):
    from monoscope.cli import main
    from monoscope.sae.io import save_sae

    x = np.random.default_rng(2).standard_normal((200, 4))
    folder = save_sae(signed_identity_sae(4, 0.5), tmp_path / "sae")
    evaluate_sae(folder, make_store(tmp_path / "good", x), lm_contexts=0)
    good = (folder / "eval.json").read_bytes()
    before = sorted(p.name for p in folder.iterdir())
    x[137, 2] = np.nan
    bad = make_store(tmp_path / "bad", x)
    assert main(["evaluate", str(folder), "--store", str(bad), "--lm-contexts", "0"]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "global row 137" in err and "Traceback" not in err
    assert "overflowed" not in err  # a float32 store did not overflow a narrower dtype: the message says so
    assert len(err.strip().splitlines()) == 1
    assert (folder / "eval.json").read_bytes() == good
    assert sorted(p.name for p in folder.iterdir()) == before


def test_non_finite_metrics_are_never_written(tmp_path):
    from monoscope.evaluate import format_metrics

    x = np.random.default_rng(3).standard_normal((100, 4))
    store = make_store(tmp_path / "s", x)
    broken = signed_identity_sae(4)
    with torch.no_grad():
        broken.W_dec[0, 0] = float("inf")
    with pytest.raises(MonoscopeError, match="non-finite mse.*nothing was written"):
        evaluate_sae(broken, store, lm_contexts=0, out=tmp_path / "broken.json")
    assert not (tmp_path / "broken.json").exists()
    # an all-zero reconstruction leaves relative_reconstruction_bias undefined (0/0): saved as null, not NaN
    m = evaluate_sae(signed_identity_sae(4, 0.0), store, lm_contexts=0, out=tmp_path / "zero.json")
    assert m["relative_reconstruction_bias"] is None
    saved = json.loads((tmp_path / "zero.json").read_text(), parse_constant=lambda c: pytest.fail(f"wrote {c}"))
    assert saved["relative_reconstruction_bias"] is None
    assert "relative_reconstruction_bias" in format_metrics(m) and "undefined" in format_metrics(m)
