"""The synthetic model (monoscope.synth): the sampler is exact, files round-trip, SAELens agrees, training
on its stream resumes exactly, and bad models get one line."""
from __future__ import annotations

import json
import math
import subprocess
import textwrap

import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.synth.model import PRESETS, SynthConfig, SyntheticModel, generator_for
from monoscope.synth.source import SyntheticSource

SMALL = SynthConfig(num_features=300, hidden_dim=32, roots=6, branching=3, max_depth=2, ortho_steps=20,
                    ortho_lr=0.01, correlation_rank=6, correlation_scale=0.15, max_prob=0.35, min_prob=0.01, seed=3)


@pytest.fixture(scope="module")
def small() -> SyntheticModel:
    return SyntheticModel.build(SMALL)


def _reference_sample(m: SyntheticModel, n: int, g: torch.Generator) -> torch.Tensor:
    """The model's definition written the slow, obvious way: a dense Gaussian copula over every feature,
    then the forest applied top down (parents gate and scale, exclusive siblings keep one at random)."""
    nf = m.num_features
    z = torch.randn(n, m.factor.shape[1], generator=g) @ m.factor.T + torch.randn(n, nf, generator=g) * m.diag.sqrt()
    fired = z > math.sqrt(2) * torch.erfinv(1 - 2 * m.probs)
    acts = torch.where(fired, (m.mean + m.std * torch.randn(n, nf, generator=g)).relu(), torch.zeros(()))
    t = m.tree
    order = []
    frontier = (t.parent < 0).nonzero().flatten().tolist()
    while frontier:
        order.append(frontier)
        frontier = [c for f in frontier for c in t.child_idx[t.child_ptr[f]:t.child_ptr[f + 1]].tolist()]
    for level in order[1:]:
        for f in level:
            p = int(t.parent[f])
            on = acts[:, p] > 0
            acts[:, f] *= (acts[:, p] / m.mean[p]) if t.rescale[f] else on.float()
        for grp in {int(t.group[f]) for f in level if t.group[f] >= 0}:
            members = (t.group == grp).nonzero().flatten()
            active = acts[:, members] > 0
            score = torch.rand(active.shape, generator=g).masked_fill(~active, -1.0)
            loser = active & (score < score.max(1, keepdim=True).values)
            acts[:, members] = acts[:, members].masked_fill(loser, 0.0)
    return acts


def _summary(acts: torch.Tensor) -> dict:
    on = acts > 0
    n_on = on.sum(0).clamp(min=1)
    mag = acts.sum(0) / n_on
    return {"rate": on.float().mean(0), "l0": on.sum(1).float(), "mag": mag, "n_on": on.sum(0),
            "mag_var": (acts.pow(2).sum(0) / n_on - mag.pow(2)).clamp(min=0) / n_on}


def _assert_same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    sa, sb = _summary(a), _summary(b)
    n = a.shape[0]
    se = torch.sqrt((sa["rate"] * (1 - sa["rate"]) + sb["rate"] * (1 - sb["rate"])) / n).clamp(min=1e-3 / n)
    z = (sa["rate"] - sb["rate"]) / se
    assert z.abs().max() < 5.0, f"firing rates differ (max |z| {z.abs().max():.1f})"
    assert z.pow(2).mean() < 1.3, f"firing rates differ on average (mean z^2 {z.pow(2).mean():.2f})"
    l0_se = math.sqrt((sa["l0"].var() + sb["l0"].var()) / n)
    assert abs(sa["l0"].mean() - sb["l0"].mean()) < 4 * l0_se
    assert abs(sa["l0"].std() / sb["l0"].std() - 1) < 0.05
    common = (sa["n_on"] > 200) & (sb["n_on"] > 200)
    zm = (sa["mag"] - sb["mag"])[common] / (sa["mag_var"] + sb["mag_var"])[common].sqrt().clamp(min=1e-6)
    assert zm.pow(2).mean() < 1.5, f"mean magnitudes differ (mean z^2 {zm.pow(2).mean():.2f})"


def test_sampler_matches_the_definition(small):
    ours = small.sample(40_000, generator_for(1), with_features=True)[1]
    ref = _reference_sample(small, 40_000, generator_for(2))
    _assert_same_distribution(ours, ref)


def test_exclusive_siblings_never_fire_together_and_children_need_parents(small):
    acts = small.sample(20_000, generator_for(5), with_features=True)[1]
    t = small.tree
    for grp in range(t.groups):
        members = (t.group == grp).nonzero().flatten()
        assert ((acts[:, members] > 0).sum(1) <= 1).all()
    child = (t.parent >= 0).nonzero().flatten()
    assert not ((acts[:, child] > 0) & (acts[:, t.parent[child]] <= 0)).any()


def test_hidden_is_bias_plus_weighted_features(small):
    g1, g2 = generator_for(9), generator_for(9)
    hidden, acts = small.sample(500, g1, with_features=True)
    assert torch.allclose(hidden, acts @ small.vectors + small.bias, atol=1e-4)
    assert torch.equal(small.sample(500, g2), hidden)  # a generator's seed fixes the batch


def test_save_load_round_trip(small, tmp_path):
    small.save(tmp_path / "m")
    back = SyntheticModel.load(tmp_path / "m")
    assert back.content_hash() == small.content_hash()
    assert torch.equal(back.sample(300, generator_for(4)), small.sample(300, generator_for(4)))
    with pytest.raises(MonoscopeError, match="already exists"):
        small.save(tmp_path / "m")


def test_16k_preset_has_the_published_sparsity():
    """SynthSAEBench-16k: true L0 about 34 overall and about 25 over the 4,096 most frequent features."""
    from monoscope.synth.model import open_model

    m = open_model("16k")
    assert (m.num_features, m.hidden_dim) == (16384, 768)
    r, f, _ = m.sample_sparse(20_000, generator_for(0))
    l0 = len(f) / 20_000
    top = (f < 4096).sum().item() / 20_000  # features are numbered most frequent first
    assert 32.5 < l0 < 35.5, l0
    assert 23.5 < top < 26.5, top


# ------------------------------------------------------------------------------------------ training

def test_training_on_the_stream_resumes_exactly(tmp_path):
    from monoscope.train import TrainConfig, train_sae
    from safetensors.torch import load_file

    cfg = TrainConfig(architecture="topk", d_sae=128, k=4, batch_size=256, steps=30, checkpoint_every=10,
                      lr=1e-3, seed=1)
    train_sae(cfg, "synth:tiny", tmp_path / "whole", show_progress=False)

    def stop(step, _info):
        if step == 17:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, "synth:tiny", tmp_path / "cut", show_progress=False, callback=stop)
    train_sae(cfg, "synth:tiny", tmp_path / "cut", show_progress=False)
    a = load_file(str(tmp_path / "whole" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "cut" / "train.json").read_text())
    assert info["resumed_from_step"] == 10 and info["store"]["source"] == "synth:tiny"


# ------------------------------------------------------------------------------------------ bad input

def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_unknown_model_name(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--store", "synth:banana", "--out", str(tmp_path / "o")], "banana", "16k")
    assert not (tmp_path / "o").exists()


def test_saved_model_with_missing_or_mismatched_files(capsys, small, tmp_path):
    small.save(tmp_path / "m")
    (tmp_path / "m" / "synthetic_model.safetensors").rename(tmp_path / "w.safetensors")
    _one_line_error(capsys, ["train", "--store", f"synth:{tmp_path / 'm'}", "--out", str(tmp_path / "o")],
                    "synthetic_model.safetensors is missing")
    other = SyntheticModel.build(SynthConfig(num_features=300, hidden_dim=16, roots=0, ortho_steps=0,
                                             correlation_rank=0))
    other.save(tmp_path / "n")
    (tmp_path / "n" / "synthetic_model_config.json").write_text(
        (tmp_path / "m" / "synthetic_model_config.json").read_text())
    _one_line_error(capsys, ["train", "--store", f"synth:{tmp_path / 'n'}", "--out", str(tmp_path / "o")],
                    "feature_vectors", "do not belong together")
    (tmp_path / "n" / "synthetic_model_config.json").write_text("{not json")
    _one_line_error(capsys, ["train", "--store", f"synth:{tmp_path / 'n'}", "--out", str(tmp_path / "o")],
                    "not readable JSON")
    assert not (tmp_path / "o").exists()


def test_a_synthetic_source_has_one_hook(small):
    with pytest.raises(MonoscopeError, match="one hook"):
        SyntheticSource("small", small).hook("blocks.0")


# ------------------------------------------------------------------------------------ SAELens agrees

def _saelens_python():
    from tests.test_sae_io import _saelens_python as find

    return find()


SAELENS_SIDE = textwrap.dedent("""
    import json, sys, torch
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    out = sys.argv[1]
    cfg = SyntheticModelConfig.from_dict(json.load(open(out + "/cfg.json")))
    m = SyntheticModel(cfg)
    m.save(out + "/theirs")
    mine = SyntheticModel.load_from_disk(out + "/ours")
    torch.manual_seed(0)
    torch.save({"theirs": m.sample_with_features(40000)[1], "ours": mine.sample_with_features(40000)[1]},
               out + "/samples.pt")
""")


def test_saelens_builds_the_same_model_and_samples_agree(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("sae-lens interpreter not found (bash scripts/setup.sh dev makes it)")
    cfg = PRESETS["tiny"]
    ours = SyntheticModel.build(cfg)
    ours.save(tmp_path / "ours")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.saelens_dict()))
    subprocess.run([py, "-c", SAELENS_SIDE, str(tmp_path)], check=True, capture_output=True, timeout=600)
    theirs = SyntheticModel.load(tmp_path / "theirs")
    assert torch.equal(theirs.probs, ours.probs) and torch.equal(theirs.factor, ours.factor)
    assert theirs.roots == ours.roots and torch.equal(theirs.bias, ours.bias)
    assert (theirs.vectors - ours.vectors).abs().max() < 1e-3  # orthogonalisation: float rounding only
    samples = torch.load(tmp_path / "samples.pt")
    mine = theirs.sample(40_000, generator_for(11), with_features=True)[1]
    _assert_same_distribution(mine, samples["theirs"])  # their model, our sampler vs theirs
    _assert_same_distribution(samples["ours"], samples["theirs"])  # our files, read by SAELens
    t = theirs.tree
    for grp in range(t.groups):
        members = (t.group == grp).nonzero().flatten()
        assert ((samples["theirs"][:, members] > 0).sum(1) <= 1).all()


# ------------------------------------------------------------------------------------- monoscope synth

def test_synth_command_trains_scores_and_reuses(tmp_path, capsys):
    import csv

    argv = ["synth", "--model", "tiny", "--architectures", "topk", "relu", "--k-values", "8", "--l1-values", "3",
            "--d-sae", "128", "--batch-size", "256", "--tokens", "25600", "--lr", "1e-3", "--eval-samples", "4000",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "synth.csv")))
    assert [r["architecture"] for r in rows] == ["topk", "relu"]
    topk = rows[0]
    assert abs(float(topk["l0"]) - 8) < 1e-6  # TopK fires exactly k latents
    for key in ("f1", "mcc", "precision", "recall", "explained_variance"):
        assert 0 < float(topk[key]) <= 1, (key, topk[key])
    assert (tmp_path / "s" / "f1_vs_l0.png").stat().st_size > 1000
    assert (tmp_path / "s" / "mcc_vs_l0.png").stat().st_size > 1000
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "saes").rglob("*.json")}
    assert main(argv) == 0  # everything finished is reused, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "saes").rglob("*.json")} == kept
    capsys.readouterr()
    _one_line_error(capsys, [*argv[:-2], "--eval-samples", "0", "--out", str(tmp_path / "t")], "eval_samples")
    assert not (tmp_path / "t").exists()
