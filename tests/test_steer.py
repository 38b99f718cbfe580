"""Steering with SAE latents on a tiny random Llama: clamp / add / ablate maths, generation, measurement, errors."""
import argparse
import contextlib

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.hookpoints import run_with_capture
from monoscope.interpret.steer import (Intervention, _draw, _features_on_generated, _pair_up, distinct_share,
                                       generate_side_by_side, keyword_p_value, mentions, screen_features,
                                       setup_steer, steer, steering_effect, words)
from monoscope.models import tiny_model
from monoscope.sae import SAEConfig, build_sae, save_sae

HOOK, NEXT = "layers.1.resid_post", "layers.2.resid_pre"


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sae():
    """ReLU SAE with orthonormal decoder rows, W_enc = W_decᵀ and a large b_enc: every latent is active and
    re-encoding x + c·d_i moves exactly latent i by c, so clamping can be checked to the last digit."""
    s = build_sae(SAEConfig("relu", d_in=32, d_sae=16, hook_name=HOOK, model_name="tiny-llama"))
    q, _ = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        s.W_dec.copy_(q.T)
        s.W_enc.copy_(q)
        s.b_dec.zero_()
        s.b_enc.fill_(50.0)
    return s


IDS = torch.tensor([[2, 70, 80, 90, 100, 110, 120]])


def acts_after(lm, ids=IDS):
    return run_with_capture(lm.model, [NEXT], ids)[NEXT][0]


def test_clamp_sets_feature_and_keeps_the_rest(lm, sae):
    x = acts_after(lm)
    with steer(lm, sae, [Intervention(3, 7.5, "clamp"), Intervention(9, 60.0, "clamp")]):
        y = acts_after(lm)
    f0, f1 = sae.encode(x).detach(), sae.encode(y).detach()
    assert torch.allclose(f1[1:, 3], torch.full((6,), 7.5), atol=1e-4)
    assert torch.allclose(f1[1:, 9], torch.full((6,), 60.0), atol=1e-4)
    others = [i for i in range(16) if i not in (3, 9)]
    assert torch.allclose(f1[1:, others], f0[1:, others], atol=1e-4)
    # the SAE error term is kept: x − x̂ is the same before and after
    assert torch.allclose(y[1:] - sae.decode(f1[1:]), x[1:] - sae.decode(f0[1:]), atol=1e-4)
    assert torch.equal(y[0], x[0])  # BOS left alone


def test_clamp_to_current_value_changes_nothing(lm, sae):
    ids = torch.tensor([[75]])  # one position: one current value of the feature
    x = acts_after(lm, ids)
    v = sae.encode(x)[0, 5].item()
    clean = lm.model(input_ids=ids).logits
    with steer(lm, sae, [Intervention(5, v, "clamp")]):
        steered = lm.model(input_ids=ids).logits
    assert torch.allclose(clean, steered, atol=1e-5)


def test_ablate_and_add(lm, sae):
    x = acts_after(lm)
    with steer(lm, sae, [Intervention(4, 123.0, "ablate")]):
        y = acts_after(lm)
    assert torch.allclose(sae.encode(y)[1:, 4], torch.zeros(6), atol=1e-4)
    with steer(lm, sae, [Intervention(2, 3.0, "add"), Intervention(6, -1.5, "add")]):
        z = acts_after(lm)
    want = 3.0 * sae.W_dec[2] - 1.5 * sae.W_dec[6]
    assert torch.allclose(z[1:] - x[1:], want.expand(6, -1), atol=1e-5)
    assert torch.equal(acts_after(lm), x)  # hooks are removed on exit


def test_topk_ablate_inactive_feature_is_a_no_op(lm):
    s = build_sae(SAEConfig("topk", d_in=32, d_sae=64, k=2, hook_name=HOOK, model_name="tiny-llama"))
    f = s.encode(run_with_capture(lm.model, [HOOK], IDS)[HOOK][0])
    silent = int(torch.nonzero((f[1:] == 0).all(0))[0])
    clean = lm.model(input_ids=IDS).logits
    with steer(lm, s, [Intervention(silent, 0.0, "ablate")]):
        assert torch.allclose(lm.model(input_ids=IDS).logits, clean, atol=1e-5)


def test_generate_side_by_side(lm, sae):
    pairs = generate_side_by_side(lm, sae, "hello", [Intervention(0, 0.0, "add")], max_new_tokens=6, n_samples=2)
    assert len(pairs) == 2 and all(p["default"] == p["steered"] for p in pairs)
    pairs = generate_side_by_side(lm, sae, "hello", [Intervention(0, 400.0, "add")], max_new_tokens=6,
                                  temperature=0.0)
    assert pairs[0]["default"] != pairs[0]["steered"]


def test_steering_effect(lm, sae):
    res = steering_effect(lm, sae, 1, 300.0, ["ab", "cd"], mode="add", n_samples=4, max_new_tokens=3,
                          keywords=["a"], n_boot=50)
    assert res["n_samples"] == 4 and res["n_prompts"] == 2
    for arm in ("default", "steered"):
        assert set(res[arm]["mean_activation"]) == {"mean", "se"}
        assert 0.0 <= res[arm]["keyword_rate"]["mean"] <= 1.0
        assert 0.0 < res[arm]["distinct_tokens"]["mean"] <= 1.0
        assert res[arm]["keyword_rate"]["n"] == 8 and len(res[arm]["texts"]) == 8
    lo, hi = res["difference"]["ci95"]
    assert lo <= hi
    assert 0.0 <= res["keyword_p_value"] <= 1.0


def test_steering_effect_other_arms(lm, sae):
    """Extra arms are measured on the same prompts and seeds against the one default arm: an arm that steers
    like the main one gets the same texts and comparison, a no-op arm gets the default's texts and a zero
    difference, and the default arm is what a run without extra arms gives."""
    kw = dict(mode="add", n_samples=4, max_new_tokens=3, keywords=["a"], n_boot=50)
    plain = steering_effect(lm, sae, 1, 300.0, ["ab", "cd"], **kw)
    res = steering_effect(lm, sae, 1, 300.0, ["ab", "cd"], **kw, others={
        "again": lambda: steer(lm, sae, [Intervention(1, 300.0, "add")]), "none": contextlib.nullcontext})
    assert res["default"]["texts"] == plain["default"]["texts"] and res["difference"] == plain["difference"]
    assert res["again"]["texts"] == res["steered"]["texts"] != res["default"]["texts"]
    assert res["again"]["difference"] == res["difference"]
    assert res["again"]["keyword_p_value"] == res["keyword_p_value"]
    assert res["none"]["texts"] == res["default"]["texts"] and res["none"]["difference"]["mean"] == 0.0


def test_steering_effect_with_a_concept_probe_and_no_keywords(lm, sae):
    """A probe scores every arm and every comparison gets its probe difference; without keywords there is no
    keyword rate or p-value; no working keys are left in the result; an arm may not take a result key's name."""
    probe = lambda acts: torch.sigmoid(acts[:, :1].sum(-1))  # noqa: E731  (any map [n, d] -> [n])
    res = steering_effect(lm, sae, 1, 300.0, ["ab"], mode="add", n_samples=3, max_new_tokens=3, n_boot=20,
                          probe=probe, others={"twice": lambda: steer(lm, sae, [Intervention(1, 600.0, "add")])})
    for arm in ("default", "steered", "twice"):
        assert 0.0 < res[arm]["concept_probe"]["mean"] < 1.0 and "keyword_rate" not in res[arm]
        assert not {"_acts", "_probe"} & set(res[arm])
    assert "probe_difference" in res and "probe_difference" in res["twice"]
    assert "keyword_p_value" not in res and "keyword_p_value" not in res["twice"]
    with pytest.raises(MonoscopeError, match="taken by the result"):
        steering_effect(lm, sae, 1, 300.0, ["ab"], n_samples=2, max_new_tokens=2, others={"seed": contextlib.nullcontext})


def test_keyword_p_value():
    assert keyword_p_value({"hits": 0, "n": 24}, {"hits": 10, "n": 24}) < 1e-3  # a clear rise
    assert keyword_p_value({"hits": 3, "n": 24}, {"hits": 3, "n": 24}) > 0.5  # no rise
    assert keyword_p_value({"hits": 10, "n": 24}, {"hits": 0, "n": 24}) == 1.0  # a fall is not a rise


def test_draw_samples_the_softmax():
    """The inverse-CDF sampler draws each token at its softmax probability and never a zero-probability one."""
    probs = torch.tensor([0.2, 0.0, 0.3, 0.5])
    logits = torch.log(probs).expand(20_000, 4)
    drawn = _draw(logits, 1.0, torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.015)
    sharp = _draw(logits[:2000], 0.25, torch.Generator().manual_seed(1))[:, 0]  # low temperature: the mode
    assert (sharp == 3).float().mean() > 0.85


def test_draw_two_levels_match_the_softmax_across_blocks():
    """Blocks of 4 over a 10-token vocabulary (the last block padded): every token at its probability, the
    zero-probability tokens (a block's last one, a whole block, the vocabulary's last) never; the input is
    consumed, and a sharp distribution still gives its mode."""
    probs = torch.tensor([0.05, 0.1, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.0])
    logits = torch.log(probs).expand(40_000, 10).clone()
    drawn = _draw(logits, 1.0, torch.Generator().manual_seed(2), block=4)[:, 0]
    freq = torch.bincount(drawn, minlength=10).float() / len(drawn)
    assert torch.all(freq[probs == 0] == 0) and torch.allclose(freq, probs, atol=0.01)
    assert (logits >= 0).all() and torch.all(logits.amax(1) == 1.0)  # consumed: now the weights exp(l - max)
    peaked = torch.full((3, 1000), -30.0)
    peaked[:, 777] = 0.0
    assert _draw(peaked, 0.7, torch.Generator().manual_seed(0), block=64)[:, 0].tolist() == [777] * 3


def test_keywords_match_whole_words():
    assert words("The Korean-born DJ's 2 cars!") == ["the", "korean", "born", "dj", "s", "cars"]
    assert mentions("Talks with North Korean officials", ["korea"])  # 5+ letters: inflections count
    assert mentions("I like CARS", ["cars"]) and not mentions("a scare", ["car"]) and not mentions("careful", ["car"])
    assert not mentions("anything", []) and not mentions("", ["car"])


def test_distinct_share_shows_loops():
    share = distinct_share(torch.tensor([[1, 2, 3, 4], [5, 6, 5, 6], [7, 7, 7, 7]]))
    assert share.tolist() == [1.0, 0.5, 0.25]


def test_screen_features(lm, sae):
    rows = screen_features(lm, sae, [1, 2, 3], [0.0, 400.0, 5.0], [["a"], ["b"], []], ["ab", "cd"],
                           max_new_tokens=4, batch=2)
    assert [r["feature"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["keyword_rate"] <= 1.0 and 0.0 < r["distinct_tokens"] <= 1.0 for r in rows)
    assert rows[2]["keyword_rate"] == 0.0  # no keywords, no hits
    with pytest.raises(MonoscopeError, match="one value"):
        screen_features(lm, sae, [1, 2], [1.0], [["a"], ["b"]], ["ab"])


def test_screen_row_matches_steer(lm, sae):
    """Row r of the batched screen is the same clamp as ``steer`` with that one feature (greedy decoding)."""
    from monoscope.interpret.steer import _decode, _prompt_ids, _sample

    with steer(lm, sae, [Intervention(2, 400.0, "clamp")]):
        want = _decode(lm, _sample(lm, _prompt_ids(lm, "hello"), 1, 5, 0.0, 0))[0]
    key = words(want)[:1]
    rows = screen_features(lm, sae, [5, 2], [0.0, 400.0], [[], key], ["hello"], max_new_tokens=5, temperature=0.0)
    assert rows[1]["keyword_rate"] == (1.0 if key else 0.0)
    with steer(lm, sae, [Intervention(2, 400.0, "clamp")]):
        new = _sample(lm, _prompt_ids(lm, "hello"), 1, 5, 0.0, 0)
    act = _features_on_generated(lm, sae, _prompt_ids(lm, "hello"), new, [2])[0][0]
    assert rows[1]["activation"] == pytest.approx(float(act), rel=1e-4, abs=1e-4)  # re-encoded without steering


def test_errors(lm, sae):
    with pytest.raises(MonoscopeError, match="out of range"):
        with steer(lm, sae, [Intervention(16, 1.0)]):
            pass
    with pytest.raises(MonoscopeError, match="mode"):
        with steer(lm, sae, [Intervention(1, 1.0, "multiply")]):
            pass
    with pytest.raises(MonoscopeError, match="twice"):
        with steer(lm, sae, [Intervention(1, 1.0), Intervention(1, 2.0)]):
            pass
    other = build_sae(SAEConfig("relu", d_in=32, d_sae=4, hook_name=HOOK, model_name="gemma-3-270m"))
    with pytest.raises(MonoscopeError, match="model"):
        generate_side_by_side(lm, other, "x", [Intervention(0, 1.0)])
    wrong_hook = build_sae(SAEConfig("relu", d_in=32, d_sae=4, hook_name="layers.1.mlp_neurons", model_name="tiny-llama"))
    with pytest.raises(MonoscopeError, match="width"):
        with steer(lm, wrong_hook, [Intervention(0, 1.0)]):
            pass
    with pytest.raises(MonoscopeError, match="n_samples"):
        steering_effect(lm, sae, 0, 1.0, ["x"], n_samples=1)
    with pytest.raises(MonoscopeError, match="one --value"):
        _pair_up([1, 2, 3], [1.0, 2.0], None)


def test_cli(tmp_path, sae, capsys):
    save_sae(sae, tmp_path / "sae")
    p = argparse.ArgumentParser()
    run = setup_steer(p)
    run(p.parse_args(["--sae", str(tmp_path / "sae"), "--feature", "2", "--value", "200", "--mode", "add",
                      "--feature", "3", "--value", "5", "--mode", "clamp", "--max-new-tokens", "4", "hi there"]))
    out = capsys.readouterr().out
    assert "default" in out and "steered" in out and "add #2 = 200" in out and "clamp #3 = 5" in out


def test_add_vector_shifts_every_position_but_bos(lm):
    from monoscope.interpret.steer import add_vector

    plain = acts_after(lm)
    vec = torch.arange(32, dtype=torch.float32) / 10
    with add_vector(lm, HOOK, vec):
        shifted = acts_after(lm)
    torch.testing.assert_close(shifted[1:], plain[1:] + vec)
    torch.testing.assert_close(shifted[0], plain[0])


def test_concept_probe_separates_its_examples():
    """The concept probe scores activations like its positives high and like its negatives low, and reports
    a cross-validated accuracy (none with too few positives for two folds)."""
    from monoscope.interpret.steering_demo import concept_probe

    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(12)
    direction[3] = 4.0
    pos, neg = torch.randn(20, 12, generator=g) + direction, torch.randn(300, 12, generator=g)
    score, info = concept_probe(pos, neg)
    assert info["cv_balanced_accuracy"] > 0.9 and info["n_positive"] == 20 and info["n_negative"] == 300
    fresh_pos, fresh_neg = torch.randn(50, 12, generator=g) + direction, torch.randn(50, 12, generator=g)
    assert score(fresh_pos).mean() > 0.8 and score(fresh_neg).mean() < 0.2
    assert concept_probe(pos[:3], neg)[1]["cv_balanced_accuracy"] is None
