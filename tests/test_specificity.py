"""Feature specificity: a hand-made SAE whose latents detect planted characters, scored on a labelled dataset."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.interpret.specificity import (
    feature_specificity,
    load_concept_datasets,
    plot_feature_distribution,
    rank_latents,
    run_specificity,
    specificity_scores,
)
from monoscope.models import tiny_model
from monoscope.probing.datasets import ProbingDataset
from monoscope.sae.base import SAEConfig, build_sae
from monoscope.sae.io import save_sae

HOOK = "layers.0.resid_pre"  # for llama this is the token embedding itself
PLANTED = {"Z": 0, "Q": 1, "X": 2}  # character -> the latent (and embedding axis) that detects it
N_LATENTS = 8


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lm():
    """Tiny llama whose Z, Q, X embeddings are 3·(basis vector 0, 1, 2): far from every other token."""
    lm = tiny_model("llama")
    emb = lm.model.get_input_embeddings().weight
    with torch.no_grad():
        for ch, axis in PLANTED.items():
            (tid,) = lm.tokenizer(ch, add_special_tokens=False)["input_ids"]
            emb[tid] = 0.0
            emb[tid, axis] = 3.0
    return lm


def _sae(model_name: str = "tiny-llama"):
    """ReLU SAE: latent j reads embedding axis j with bias −1 (fires only on its planted character);
    latents 3.. never fire."""
    sae = build_sae(SAEConfig("relu", d_in=32, d_sae=N_LATENTS, hook_name=HOOK, model_name=model_name))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-100.0)
        for axis in PLANTED.values():
            sae.W_enc[axis, axis] = 1.0
            sae.b_enc[axis] = -1.0
    return sae.eval()


def _texts() -> tuple[list[str], list[int]]:
    """12 positives (contain Z; half also Q) and 12 negatives (a quarter have Q, a third X); unique lengths."""
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for label in (1, 0):
        for i in range(12):
            chars = list(rng.choice(list("abcdefghijklmnop "), size=(12 if label else 30) + i))
            if label:
                chars[6] = "Z"
            if (label and i % 2 == 0) or (not label and i % 4 == 0):
                chars[9] = "Q"
            if not label and i % 3 == 0:
                chars[7] = "X"
            texts.append("".join(chars))
            labels.append(label)
    return texts, labels


def _dataset() -> ProbingDataset:
    texts, labels = _texts()
    return ProbingDataset("has_Z", "test", texts, np.array(labels), "mean", positive="contains Z")


def _write_csv(path, texts, labels):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return str(path)


# ------------------------------------------------------------------------------------------ scores only
def test_scores_match_sklearn_and_hand_counts():
    rng = np.random.default_rng(1)
    y = np.array([1] * 10 + [0] * 14)
    X = np.maximum(rng.normal(size=(24, 6)), 0).astype(np.float32)  # many exact zeros: ties
    X[:, 0] = np.round(X[:, 0], 1)  # more ties among non-zero values
    s = specificity_scores(X, y, n=5)
    for j in range(X.shape[1]):
        assert s["auc"][j] == pytest.approx(roc_auc_score(y, X[:, j]))
        fires = X[:, j] > 0
        assert s["fire_rate_pos"][j] == pytest.approx(fires[y == 1].mean())
        assert s["fire_rate_neg"][j] == pytest.approx(fires[y == 0].mean())
        assert s["precision_when_firing"][j] == pytest.approx(y[fires].mean())
        assert s["mean_pos"][j] == pytest.approx(X[y == 1, j].mean())
        # precision@5 by brute force: average over random tie-breaks of the top-5's share of positives
        draws = []
        for seed in range(400):
            perm = np.random.default_rng(seed).permutation(24)
            top = perm[np.argsort(-X[perm, j], kind="stable")[:5]]
            draws.append(y[top].mean())
        assert s["precision_at_n"][j] == pytest.approx(np.mean(draws), abs=0.03)
    order = rank_latents(s, "auc")
    assert list(s["auc"][order]) == sorted(s["auc"], reverse=True)


def test_scores_reject_bad_input():
    X = np.ones((8, 3), dtype=np.float32)
    with pytest.raises(MonoscopeError, match="single class"):
        specificity_scores(X, np.ones(8))
    with pytest.raises(MonoscopeError, match="precision@n"):
        specificity_scores(X, np.array([0, 1] * 4), n=9)
    with pytest.raises(MonoscopeError, match="ranking"):
        rank_latents(specificity_scores(X, np.array([0, 1] * 4)), "f1")


# ------------------------------------------------------------------------------------------ with the model
def test_planted_latent_ranks_first(lm):
    ds = _dataset()
    res = feature_specificity(lm, _sae(), ds, top_n=N_LATENTS, batch_size=5)
    ranked = [f["feature"] for f in res["features"]]
    # Z-detector perfect, Q-detector better than chance, silent ones at 0.5, X-detector (negatives only) last
    assert ranked == [0, 1, 3, 4, 5, 6, 7, 2]
    best = res["features"][0]
    assert best["auc"] == 1.0 and best["precision_at_n"] == 1.0 and best["precision_when_firing"] == 1.0
    assert best["fire_rate_pos"] == 1.0 and best["fire_rate_neg"] == 0.0 and best["mean_pos"] > 0 == best["mean_neg"]
    assert res["n_positive"] == res["n_negative"] == 12 and res["precision_at"] == 12 and res["n_silent"] == 5
    by_id = {f["feature"]: f for f in res["features"]}
    assert by_id[2]["auc"] < 0.5 and by_id[5]["precision_when_firing"] is None
    # Q-detector: fires on 6 positives and 3 negatives; precision@12 takes those 9 plus 3 of the 15 silent
    # examples (6 positive, 9 negative) at random: (6 + 3 * 6/15) / 12
    assert by_id[1]["fire_rate_pos"] == 0.5 and by_id[1]["fire_rate_neg"] == 0.25
    assert by_id[1]["precision_at_n"] == pytest.approx((6 + 3 * 6 / 15) / 12)
    assert res["features"][0]["rank"] == 1 and len(feature_specificity(lm, _sae(), ds, top_n=2)["features"]) == 2


def test_auc_and_precision_against_hand_computation(lm):
    from monoscope.interpret.specificity import latent_activations

    ds = _dataset()
    X = latent_activations(lm, _sae(), ds)
    assert X.shape == (24, N_LATENTS)
    # the Q-latent by hand: mean over the tokens after the first 4 of max(0, 3 − 1) on Q, else 0
    expected = [2.0 / (len(t) - 4) if "Q" in t else 0.0 for t in ds.texts]
    np.testing.assert_allclose(X[:, 1], expected, rtol=1e-5)
    res = feature_specificity(lm, _sae(), ds, top_n=N_LATENTS, n=5)
    by_id = {f["feature"]: f for f in res["features"]}
    for j in range(N_LATENTS):
        assert by_id[j]["auc"] == pytest.approx(roc_auc_score(ds.labels, X[:, j]), abs=1e-6)
    top5 = np.argsort(-X[:, 1])[:5]  # all five fire, with distinct values (unique lengths)
    assert by_id[1]["precision_at_n"] == pytest.approx(ds.labels[top5].mean())
    ranked = feature_specificity(lm, _sae(), ds, top_n=3, rank_by="precision")
    assert ranked["ranked_by"] == "precision" and ranked["features"][0]["feature"] == 0


def test_errors(lm):
    ds = _dataset()
    with pytest.raises(MonoscopeError, match="trained on model 'gemma-3-270m'"):
        feature_specificity(lm, _sae("gemma-3-270m"), ds)
    one_class = _dataset()
    one_class.labels[:] = 1
    with pytest.raises(MonoscopeError, match="single class"):
        feature_specificity(lm, _sae(), one_class)
    with pytest.raises(MonoscopeError, match="unknown probing dataset"):
        load_concept_datasets(["no-such-dataset"])
    with pytest.raises(MonoscopeError, match="top_n"):
        feature_specificity(lm, _sae(), ds, top_n=0)
    sae = _sae()
    sae.cfg.hook_name = ""
    with pytest.raises(MonoscopeError, match="does not record the hook"):
        feature_specificity(lm, sae, ds)


def test_plot_written(tmp_path):
    path = tmp_path / "hist.png"
    plot_feature_distribution([0, 0, 1.5, 2.0], [0, 0, 0, 0.2], path, "feature 3")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_feature_distribution([0.0], [0.0], None).startswith("data:image/png;base64,")


def test_run_specificity_writes_outputs(lm, tmp_path):
    save_sae(_sae(), tmp_path / "sae")
    texts, labels = _texts()
    data = _write_csv(tmp_path / "has_z.csv", texts, labels)
    path = run_specificity(tmp_path / "sae", [data], tmp_path / "out", lm=lm, top_n=3)
    report = json.loads(path.read_text())
    res = report["datasets"]["has_z"]
    assert [f["feature"] for f in res["features"]] == [0, 1, 3]
    assert report["model"] == "tiny-llama" and report["hook"] == HOOK
    rows = list(csv.DictReader(open(tmp_path / "out" / "specificity.csv")))
    assert [(r["dataset"], r["rank"], r["feature"]) for r in rows] == [("has_z", "1", "0"), ("has_z", "2", "1"),
                                                                      ("has_z", "3", "3")]
    assert float(rows[0]["auc"]) == 1.0
    png = tmp_path / "out" / res["plot"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a second run reads the cached latent activations and gives the same answer
    again = run_specificity(tmp_path / "sae", [data], tmp_path / "out2", lm=lm, top_n=3)
    assert json.loads(again.read_text())["datasets"]["has_z"]["features"] == res["features"]


def test_cli(tmp_path, capsys):
    save_sae(_sae(), tmp_path / "sae")
    save_sae(_sae("gemma-3-270m"), tmp_path / "other")
    texts, labels = _texts()
    good = _write_csv(tmp_path / "has_z.csv", texts, labels)
    single = _write_csv(tmp_path / "one.csv", texts, [1] * len(texts))
    base = ["specificity", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "out"), "--dataset"]
    assert main(base + [good, "--top-n", "4", "--precision-at", "5"]) == 0
    out = capsys.readouterr().out
    assert "has_z (12 positive / 12 negative, ranked by auc, precision@5)" in out and "specificity.json" in out
    assert (tmp_path / "out" / "specificity.csv").exists()
    assert main(base + [good, "--precision-at", "99"]) == 2
    assert "precision@n needs" in capsys.readouterr().err
    assert main(base + ["no-such-dataset"]) == 2
    assert "unknown probing dataset" in capsys.readouterr().err
    assert main(base + [single]) == 2
    assert "single class" in capsys.readouterr().err
    other = ["specificity", "--sae", str(tmp_path / "other"), "--model", "tiny-llama", "--out", str(tmp_path / "o")]
    assert main(other + ["--dataset", good]) == 2
    assert "trained on model 'gemma-3-270m'" in capsys.readouterr().err
