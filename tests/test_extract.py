"""Extraction on tiny models: rows match a direct forward pass, BOS and padding never enter, resume works."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.extract import ExtractConfig, extract
from monoscope.hookpoints import run_with_capture
from monoscope.models import tiny_model


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "code", "text", "neuron"]
    with open(path, "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choice(words, size=30))}) + "\n")
    return path


def _cfg(corpus_file, **kw):
    base = dict(model="tiny-llama", hook=("layers.1.resid_post", "layers.0.mlp_neurons"), corpus=str(corpus_file),
                tokens=600, context_length=32, batch_size=4, split="all", shard_rows=128)
    base.update(kw)
    return ExtractConfig(**base)


def test_rows_match_direct_forward(tmp_path, corpus_file):
    lm = tiny_model("llama")
    store = extract(_cfg(corpus_file), tmp_path / "store", lm=lm)
    assert store.num_rows >= 600
    tokens, contexts = store.token_ids(), store.context_ids()
    assert not np.any(tokens == lm.tokenizer.bos_token_id)  # BOS excluded by default
    assert not np.any(tokens == lm.tokenizer.pad_token_id)
    first = np.flatnonzero(contexts == 3)
    ids = torch.tensor([[lm.tokenizer.bos_token_id] + tokens[first].tolist()])
    direct = run_with_capture(lm.model, ["layers.1.resid_post", "layers.0.mlp_neurons"], ids)
    for hook in ("layers.1.resid_post", "layers.0.mlp_neurons"):
        got = store.rows(first, hook)
        torch.testing.assert_close(got, direct[hook][0, 1:], atol=1e-5, rtol=1e-5)


def test_keep_bos_flag(tmp_path, corpus_file):
    lm = tiny_model("llama")
    store = extract(_cfg(corpus_file, keep_bos=True, tokens=200), tmp_path / "s", lm=lm)
    assert np.sum(store.token_ids() == lm.tokenizer.bos_token_id) == len(np.unique(store.context_ids()))


def test_rerun_is_a_noop_and_other_settings_refused(tmp_path, corpus_file):
    lm = tiny_model("llama")
    a = extract(_cfg(corpus_file), tmp_path / "s", lm=lm)
    b = extract(_cfg(corpus_file), tmp_path / "s", lm=lm)
    assert a.num_rows == b.num_rows
    with pytest.raises(MonoscopeError, match="other settings"):
        extract(_cfg(corpus_file, tokens=900), tmp_path / "s", lm=lm)


def test_cli_errors_exit_2(tmp_path, corpus_file, capsys):
    assert main(["extract", "--model", "tiny-llama", "--hook", "layers.7.resid_post", "--corpus", str(corpus_file),
                 "--out", str(tmp_path / "x")]) == 2
    assert "valid hooks are" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
    assert main(["extract", "--model", "no-such-model", "--out", str(tmp_path / "y")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["extract", "--model", "tiny-llama", "--corpus", str(empty), "--hook", "layers.0.resid_post",
                 "--out", str(tmp_path / "z")]) == 2


def test_cli_extract_and_info(tmp_path, corpus_file, capsys):
    out = tmp_path / "cli"
    assert main(["extract", "--model", "tiny-gpt2", "--hook", "layers.2.attn_out", "--corpus", str(corpus_file),
                 "--tokens", "300", "--context-length", "16", "--split", "all", "--out", str(out)]) == 0
    assert main(["info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "layers.2.attn_out" in text and "tiny-gpt2" in text


def test_killed_extraction_resumes_exactly(tmp_path, corpus_file):
    """A real `kill -9` in the middle of an extraction, then a rerun: same rows as an uninterrupted run."""
    ref = extract(_cfg(corpus_file, tokens=1500), tmp_path / "ref", lm=tiny_model("llama"))
    script = (
        "import sys, time, monoscope.store as s\n"
        "orig = s.StoreWriter.append\n"
        "def slow(self, *a, **k):\n"
        "    orig(self, *a, **k); time.sleep(0.05)\n"
        "s.StoreWriter.append = slow\n"
        "from monoscope.extract import ExtractConfig, extract\n"
        f"extract(ExtractConfig(model='tiny-llama', hook=('layers.1.resid_post', 'layers.0.mlp_neurons'), "
        f"corpus={str(corpus_file)!r}, tokens=1500, context_length=32, batch_size=4, split='all', shard_rows=128), "
        f"{str(tmp_path / 'run')!r})\n"
    )
    for delay in (1.5, 2.5):
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    got = extract(_cfg(corpus_file, tokens=1500), tmp_path / "run", lm=tiny_model("llama"))
    got.verify()
    assert got.num_rows == ref.num_rows
    np.testing.assert_array_equal(got.token_ids(), ref.token_ids())
    np.testing.assert_array_equal(got.context_ids(), ref.context_ids())
    idx = np.arange(ref.num_rows)
    torch.testing.assert_close(got.rows(idx, "layers.1.resid_post"), ref.rows(idx, "layers.1.resid_post"))


@pytest.mark.slow
def test_real_gemma_extraction(tmp_path):
    """A few thousand tokens from the real Gemma 3 270M."""
    store = extract(ExtractConfig(hook=("layers.6.resid_post",), corpus="default", tokens=3000, batch_size=8),
                    tmp_path / "gemma")
    assert store.num_rows >= 3000 and store.d("layers.6.resid_post") == 640
    x = store.rows(np.arange(store.num_rows), "layers.6.resid_post")
    assert torch.isfinite(x).all()
    norms = x.norm(dim=1)
    # BOS (norm in the thousands) is excluded, so no row is an extreme outlier.
    assert norms.max() < 20 * norms.median()


def test_failed_extraction_leaves_nothing_that_blocks_the_rerun(tmp_path, corpus_file):
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    out = tmp_path / "store"
    with pytest.raises(MonoscopeError, match="one context"):
        extract(_cfg(short, context_length=512, tokens=100), out)
    assert not out.exists()
    store = extract(_cfg(corpus_file), out)  # the corrected rerun into the same folder
    assert store.num_rows >= 600
