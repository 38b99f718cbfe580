"""Probing datasets (built-in and user files) and the activations read for them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.hookpoints import run_with_capture
from monoscope.models import tiny_model
from monoscope.probing import activations as act_mod
from monoscope.probing.activations import probe_activations
from monoscope.probing.datasets import (
    MIN_PER_CLASS,
    ProbingDataset,
    dataset_families,
    from_file,
    list_datasets,
    load_dataset,
)

HOOKS = ["layers.0.mlp_neurons", "layers.2.resid_post"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _toy(aggregation="mean", **kw) -> ProbingDataset:
    """ASCII texts of very different lengths, so batches need padding (byte tokenizer: 1 char = 1 token)."""
    texts = ["the cat sat on the mat", "a dog", "some much longer sentence about nothing in particular here",
             "xy", "hello world again", "probing is fun", "tiny", "another medium sized text"]
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    return ProbingDataset("toy", "test", texts, np.array(labels), aggregation, **kw)


def _hand(lm, ds: ProbingDataset, hook: str, skip_first: int) -> np.ndarray:
    """Each example alone (no padding), aggregated by hand from character positions (= token positions)."""
    rows = []
    for i, text in enumerate(ds.texts):
        ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) + 1
        a = run_with_capture(lm.model, [hook], torch.tensor([ids]))[hook][0].float().numpy()
        content = a[1:]  # drop BOS
        if ds.aggregation == "last":
            rows.append(content[-1])
        elif ds.aggregation == "mean":
            rows.append(content[skip_first:].mean(0) if len(text) > skip_first else content.mean(0))
        elif ds.aggregation == "max_span":
            s, e = ds.spans[i]
            rows.append(content[s:e].max(0))
        elif ds.token_index is not None:
            rows.append(content[ds.token_index[i]])
        else:
            rows.append(content[ds.spans[i][0]])
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------

def _spans(texts):
    return [(1, min(4, len(t))) if len(t) > 2 else (0, len(t)) for t in texts]


@pytest.mark.parametrize("aggregation", ["last", "mean", "max_span", "token_index", "token_span"])
def test_aggregation_matches_hand_computation(lm, aggregation):
    base = _toy()
    kw = {}
    if aggregation in ("max_span", "token_span"):
        kw["spans"] = _spans(base.texts)
    if aggregation == "token_index":
        kw["token_index"] = [min(3, len(t) - 1) for t in base.texts]
    agg = {"token_index": "token", "token_span": "token"}.get(aggregation, aggregation)
    ds = _toy(agg, **kw)
    got = probe_activations(lm, ds, HOOKS, batch_size=3, skip_first=2)
    assert list(got) == HOOKS
    for hook in HOOKS:
        want = _hand(lm, ds, hook, skip_first=2)
        assert got[hook].shape == want.shape and got[hook].dtype == np.float32
        np.testing.assert_allclose(got[hook], want, rtol=1e-4, atol=1e-5)


def test_result_does_not_depend_on_batch_composition(lm):
    ds = _toy("mean")
    one = probe_activations(lm, ds, HOOKS, batch_size=1)
    many = probe_activations(lm, ds, HOOKS, batch_size=8)
    perm = np.random.default_rng(0).permutation(len(ds))
    shuffled = probe_activations(lm, ds.subset(perm), HOOKS, batch_size=3)
    for hook in HOOKS:
        np.testing.assert_allclose(one[hook], many[hook], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shuffled[hook], one[hook][perm], rtol=1e-4, atol=1e-5)


def test_encode_is_applied_before_the_reduction(lm):
    ds = _toy("max_span", spans=_spans(_toy().texts))
    torch.manual_seed(0)
    W = torch.randn(32, 10)
    got = probe_activations(lm, ds, ["layers.1.resid_post"], encode=lambda x: torch.relu(x @ W))
    rows = []
    for i, text in enumerate(ds.texts):
        ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        a = run_with_capture(lm.model, ["layers.1.resid_post"], torch.tensor([ids]))["layers.1.resid_post"][0, 1:]
        s, e = ds.spans[i]
        rows.append(torch.relu(a[s:e] @ W).amax(0).numpy())
    np.testing.assert_allclose(got["layers.1.resid_post"], np.stack(rows), rtol=1e-4, atol=1e-5)


def test_cache_hit_skips_the_model(lm, tmp_path, monkeypatch):
    ds = _toy("last")
    first = probe_activations(lm, ds, HOOKS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == len(HOOKS)

    def boom(*a, **k):
        raise AssertionError("the model ran although every hook was cached")

    monkeypatch.setattr(act_mod, "run_with_capture", boom)
    second = probe_activations(lm, ds, HOOKS, cache_dir=tmp_path)
    for hook in HOOKS:
        np.testing.assert_array_equal(first[hook], second[hook])
    # another setting is another cache entry, so the model must run
    with pytest.raises(AssertionError, match="the model ran"):
        probe_activations(lm, ds, HOOKS, cache_dir=tmp_path, max_length=64)
    with pytest.raises(MonoscopeError, match="encode_key"):
        probe_activations(lm, ds, HOOKS, cache_dir=tmp_path, encode=lambda x: x)


def test_token_index_past_truncation_is_an_error(lm):
    ds = _toy("token", token_index=[30] * 8)
    with pytest.raises(MonoscopeError, match="toy.*token_index 30.*max_length"):
        probe_activations(lm, ds, HOOKS, max_length=16)


# ---------------------------------------------------------------------------------------------------
# user files and validation
# ---------------------------------------------------------------------------------------------------

def test_csv_multiclass_becomes_one_vs_rest(tmp_path):
    path = tmp_path / "animals.csv"
    classes = ["cat", "dog", "bird"] * 6
    path.write_text("text,label\n" + "".join(f"text number {i},{c}\n" for i, c in enumerate(classes)))
    datasets = from_file(path)
    assert [d.name for d in datasets] == ["animals:bird", "animals:cat", "animals:dog"]
    for d in datasets:
        positive = d.name.split(":")[1]
        assert d.positive == positive and d.aggregation == "mean" and len(d) == 18
        assert d.labels.tolist() == [int(c == positive) for c in classes]


def test_binary_jsonl_with_spans_and_groups(tmp_path):
    path = tmp_path / "ents.jsonl"
    lines = [json.dumps({"text": f"Paris is nice {i}", "label": bool(i % 2), "s": 0, "e": 5, "doc": i // 2})
             for i in range(12)]
    path.write_text("\n".join(lines))
    (d,) = from_file(path, span_cols=("s", "e"), group_col="doc")
    assert d.name == "ents" and d.aggregation == "max_span" and d.positive == "1"
    assert d.labels.tolist() == [i % 2 for i in range(12)] and d.spans[0] == (0, 5)
    assert len(np.unique(d.groups)) == 6


def test_user_mistakes_name_the_dataset_and_the_fix(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,y\nhello,1\nworld,0\n")
    with pytest.raises(MonoscopeError, match=r"bad.csv'.*\['label'\].*its columns are \['sentence', 'y'\]"):
        from_file(bad, text_col="sentence")
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"t{i},1\n" for i in range(10)))
    with pytest.raises(MonoscopeError, match="one.csv'.*single class"):
        from_file(one)
    few = tmp_path / "few.csv"
    few.write_text("text,label\na,1\nb,0\nc,0\nd,0\ne,0\n")
    with pytest.raises(MonoscopeError, match=f"'few'.*too few.*at least {MIN_PER_CLASS}"):
        from_file(few)
    span = tmp_path / "span.csv"
    span.write_text("text,label,s,e\n" + "".join(f"abc,{i % 2},0,{9 if i == 3 else 2}\n" for i in range(10)))
    with pytest.raises(MonoscopeError, match=r"span.csv' row 4: span \(0, 9\) lies outside"):
        from_file(span, span_cols=("s", "e"))
    with pytest.raises(MonoscopeError, match=r"unknown probing dataset 'lang:xx'.*sae-probes:<n>_<tag>"):
        load_dataset("lang:xx")


# ---------------------------------------------------------------------------------------------------
# built-in datasets
# ---------------------------------------------------------------------------------------------------

def test_sae_probes_dataset_loads():
    why = dataset_families()["sae-probes"]
    if why is not None:
        pytest.skip(why)
    names = [n for n in list_datasets() if n.startswith("sae-probes:")]
    assert len(names) == 113 and "sae-probes:5_hist_fig_ismale" in names
    ds = load_dataset("sae-probes:5_hist_fig_ismale", max_examples=200)
    assert ds.aggregation == "last" and len(ds) == 200 and ds.labels.sum() == 100
    again = load_dataset("sae-probes:5_hist_fig_ismale", max_examples=200)
    assert again.texts == ds.texts  # deterministic


@pytest.mark.parametrize("family", ["lang", "code", "is_python_code", "pos", "bigram", "position"])
def test_builtin_family_yields_both_classes(family):
    why = dataset_families()[family]
    if why is not None:
        pytest.skip(f"{family}: {why}")
    names = [n for n in list_datasets() if n.split(":")[0] == family]
    assert names
    ds = load_dataset(names[-1], max_examples=60)
    counts = np.bincount(ds.labels, minlength=2)
    assert counts[0] == counts[1] >= MIN_PER_CLASS and len(ds) <= 60
    assert len(np.unique(ds.groups)) >= 4
    if ds.aggregation == "token":
        assert ds.spans is not None or ds.token_index is not None


def test_token_level_builtin_reads_inside_the_text(lm):
    why = dataset_families()["bigram"]
    if why is not None:
        pytest.skip(why)
    ds = load_dataset("bigram:high-school", max_examples=16)
    for text, (s, e) in zip(ds.texts, ds.spans):
        assert text[s:e].lower() == "school"
    out = probe_activations(lm, ds, ["layers.0.resid_post"], max_length=512)
    assert out["layers.0.resid_post"].shape == (16, 32)
