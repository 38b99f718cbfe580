"""Corpora and models from the local Hugging Face caches (issue 14.2, 14.3), never downloaded.

The hub cache layout (``{models|datasets}--OWNER--NAME/refs/main`` + ``snapshots/REV/``) and the layout of
``Dataset.save_to_disk`` (state.json + Arrow stream files) are written by hand here from huggingface_hub's
and datasets' documented layouts; one test has the real ``datasets`` library (the SAELens venv has it)
write save_to_disk folders and checks monoscope reads them.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from monoscope.cli import main
from monoscope.corpus import corpus_fingerprint, load_corpus
from monoscope.errors import MonoscopeError
from monoscope.hookpoints import FAMILIES, KINDS, run_with_capture
from monoscope.models import TINY_FAMILIES, load_model, tiny_model


def _arrow_stream(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa

    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _parquet(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _saved_dataset(folder: Path, columns: dict[str, list], shards: int = 1) -> Path:
    """What Dataset.save_to_disk writes: data-0000i-of-0000n.arrow, dataset_info.json, state.json."""
    n = len(next(iter(columns.values())))
    names = []
    for i in range(shards):
        part = {k: v[i * n // shards:(i + 1) * n // shards] for k, v in columns.items()}
        names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
        _arrow_stream(folder / names[-1], part)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in names],
                                                   "_fingerprint": "abc", "_split": None}))
    return folder


def _hub_repo(cache: Path, kind: str, repo: str, rev: str = "0123abcd") -> Path:
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return cache


# ------------------------------------------------------------------------------------------------ corpora
def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    texts = [f"document number {i}" for i in range(7)]
    folder = _saved_dataset(tmp_path / "ds", {"body": texts, "n": list(range(7))}, shards=2)
    docs = load_corpus(folder, text_field="body")
    assert [d.text for d in docs] == texts
    assert docs[0].id == "ds/data-00000-of-00002.arrow:0" and len({d.id for d in docs}) == 7
    with pytest.raises(MonoscopeError, match="no text column.*body"):
        load_corpus(folder)

    dd = tmp_path / "dd"
    _saved_dataset(dd / "train", {"text": ["a train text", "another"]})
    _saved_dataset(dd / "test", {"text": ["a test text"]})
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [d.text for d in load_corpus(dd)] == ["a train text", "another"]
    assert [d.text for d in load_corpus(dd / "test")] == ["a test text"]
    before = corpus_fingerprint(dd)
    _saved_dataset(dd / "train", {"text": ["a train text", "changed"]})
    assert corpus_fingerprint(dd) != before


def test_save_to_disk_faults(tmp_path):
    only_test = tmp_path / "dd"
    _saved_dataset(only_test / "test", {"text": ["x"]})
    (only_test / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(MonoscopeError, match="without a 'train' split.*dd/test"):
        load_corpus(only_test)
    gone = _saved_dataset(tmp_path / "gone", {"text": ["x"]})
    (gone / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(MonoscopeError, match="data files are missing"):
        load_corpus(gone)
    torn = _saved_dataset(tmp_path / "torn", {"text": ["some text"] * 50})
    data = torn / "data-00000-of-00001.arrow"
    data.write_bytes(data.read_bytes()[:40])
    with pytest.raises(MonoscopeError, match="not a readable arrow file"):
        load_corpus(torn)
    numbers = _saved_dataset(tmp_path / "numbers", {"text": [1, 2]})
    with pytest.raises(MonoscopeError, match="non-text values"):
        load_corpus(numbers)


def test_hub_dataset_snapshot_splits_and_configs(hub):
    snap = _hub_repo(hub, "dataset", "someone/reviews")
    _parquet(snap / "data" / "train-00000-of-00002.parquet", {"text": ["t0", "t1"]})
    _parquet(snap / "data" / "train-00001-of-00002.parquet", {"text": ["t2"]})
    _parquet(snap / "data" / "test-00000-of-00001.parquet", {"text": ["e0"]})
    (snap / "README.md").write_text("card")
    assert [d.text for d in load_corpus("hf:someone/reviews")] == ["t0", "t1", "t2"]
    assert [d.text for d in load_corpus("hf:someone/reviews:test")] == ["e0"]
    assert load_corpus("hf:someone/reviews")[0].id == "someone/reviews/data/train-00000-of-00002.parquet:0"
    with pytest.raises(MonoscopeError, match="no 'validation' data files.*hf:someone/reviews:SPLIT"):
        load_corpus("hf:someone/reviews:validation")

    multi = _hub_repo(hub, "dataset", "someone/multi")
    (multi / "en").mkdir()
    (multi / "en" / "train.jsonl").write_text('{"text": "hello"}\n')
    _parquet(multi / "fr" / "train-00000-of-00001.parquet", {"text": ["bonjour"]})
    with pytest.raises(MonoscopeError, match=r"several configurations \(en, fr\).*hf:someone/multi:en/train"):
        load_corpus("hf:someone/multi")
    assert [d.text for d in load_corpus("hf:someone/multi:fr/train")] == ["bonjour"]
    assert [d.text for d in load_corpus("hf:someone/multi:en/train")] == ["hello"]


def test_prepared_datasets_cache_and_missing(hub, tmp_path):
    build = tmp_path / "hf" / "datasets" / "someone___plain" / "default" / "0.0.0" / "f00d"
    _arrow_stream(build / "plain-train.arrow", {"text": ["from the datasets cache"]})
    _arrow_stream(build / "plain-test.arrow", {"text": ["held out"]})
    assert [d.text for d in load_corpus("hf:someone/plain")] == ["from the datasets cache"]
    assert [d.text for d in load_corpus("hf:someone/plain:test")] == ["held out"]
    with pytest.raises(MonoscopeError, match="in neither local Hugging Face cache.*hf download nobody/nothing"):
        load_corpus("hf:nobody/nothing")


def test_cli_extract_from_a_cached_hub_dataset(hub, tmp_path, capsys):
    snap = _hub_repo(hub, "dataset", "someone/stories")
    _parquet(snap / "data" / "train-00000-of-00001.parquet",
             {"story": [f"once upon a time there was a story number {i}, told slowly" for i in range(40)]})
    out = tmp_path / "store"
    args = ["extract", "--model", "tiny-llama", "--hook", "layers.1.resid_post", "--corpus", "hf:someone/stories",
            "--tokens", "256", "--context-length", "32", "--split", "all", "--out", str(out)]
    assert main(args) == 2
    assert "no text column" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--text-column", "story"]) == 0
    from monoscope.store import ActivationStore

    assert ActivationStore(out).num_rows >= 256  # whole contexts
    capsys.readouterr()
    assert main(["extract", "--model", "tiny-llama", "--hook", "layers.1.resid_post", "--corpus", "hf:nobody/nothing", "--out",
                 str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf download nobody/nothing" in err[0] and not (tmp_path / "no").exists()


def _saelens_python():
    from tests.test_sae_io import _saelens_python as find

    return find()


def test_datasets_library_save_to_disk_is_read(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("the SAELens venv (which has the datasets library) is not installed")
    script = f"""
from datasets import Dataset, DatasetDict
d = Dataset.from_dict({{"sentence": ["alpha beta", "gamma", "", "delta epsilon"], "label": [0, 1, 0, 1]}})
d.save_to_disk({str(tmp_path / 'one')!r})
DatasetDict(train=d, test=d.select([0])).save_to_disk({str(tmp_path / 'dict')!r}, num_shards={{"train": 2, "test": 1}})
"""
    subprocess.run([py, "-c", script], check=True, capture_output=True, timeout=300)
    want = ["alpha beta", "gamma", "delta epsilon"]
    assert [d.text for d in load_corpus(tmp_path / "one", text_field="sentence")] == want
    assert [d.text for d in load_corpus(tmp_path / "dict", text_field="sentence")] == want
    assert [d.text for d in load_corpus(tmp_path / "dict" / "test", text_field="sentence")] == ["alpha beta"]


# ------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_loads_from_a_folder_and_the_hub_cache(family, hub, tmp_path):
    """Every family of the hook table: a saved folder and a cached hub id load, with every hook readable."""
    assert family in TINY_FAMILIES, f"the hook table knows {family!r}: give it a tiny model so it is tested"
    original = tiny_model(family)
    folder = tmp_path / "saved"
    original.model.save_pretrained(folder)
    original.tokenizer.save_pretrained(folder)
    snap = _hub_repo(hub, "model", f"someone/tiny-{family}")
    for f in folder.iterdir():
        (snap / f.name).symlink_to(f)  # the hub cache links snapshot files to blobs
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    prints = set()
    for source in (str(folder), f"someone/tiny-{family}"):
        lm = load_model(source)
        assert lm.name == source and lm.family == family
        prints.add(lm.fingerprint)
        names = [f"layers.1.{k}" for k in KINDS]
        got = run_with_capture(lm.model, names, ids)
        want = run_with_capture(original.model, names, ids)
        for n in names:
            torch.testing.assert_close(got[n], want[n])
    assert len(prints) == 1  # one identity wherever the same files are read from


def test_unsupported_family_and_broken_folders(tmp_path, hub, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from monoscope.models import byte_tokenizer

    opt = tmp_path / "opt"
    config = AutoConfig.for_model("opt", vocab_size=259, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(opt)
    byte_tokenizer().save_pretrained(opt)
    with pytest.raises(MonoscopeError, match=r"family 'opt'.*supported families: gpt2.*FAMILIES an entry"):
        load_model(str(opt))
    capsys.readouterr()
    assert main(["extract", "--model", str(opt), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'opt'" in err[0] and not (tmp_path / "s").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MonoscopeError, match="has no config.json"):
        load_model(str(empty))
    llama = tmp_path / "llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(llama)
    with pytest.raises(MonoscopeError, match="cannot load the tokenizer"):
        load_model(str(llama))
    lm.tokenizer.save_pretrained(llama)
    weights = llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MonoscopeError, match="cannot load the weights"):
        load_model(str(llama))
    with pytest.raises(MonoscopeError, match="nor in the local Hugging Face cache.*hf download someone/absent"):
        load_model("someone/absent")
