"""A user's labelled file wherever a dataset name goes: `monoscope probe`, `specificity`, `run`, `datasets --check`.

Everything runs on the tiny random llama (byte tokenizer: one character is one token) and files written here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.models import tiny_model
from monoscope.pipeline import RunConfig, check_settings
from monoscope.probing.activations import probe_activations
from monoscope.probing.run import ProbeConfig, run_probing
from monoscope.probing.user_data import FileColumns, parse_file_name, read_labelled_file, resolve_datasets

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reviews.csv"
COLUMNS = ["--text-column", "review", "--label-column", "sentiment"]
SMALL = ["--model", "tiny-llama", "--layers", "0", "--ks", "1", "2", "--methods", "mean_diff", "--max-length", "48",
         "--controls", "false"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))


def _reviews() -> list[dict]:
    """The shipped example's rows plus one row without text and one without a label (both dropped)."""
    rows = list(csv.DictReader(EXAMPLE.open()))
    return rows + [{"review": "", "sentiment": "positive"}, {"review": "no label here", "sentiment": ""}]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v != ""}) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).replace("", None).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "cache" not in p.parts}


def _fails_cleanly(argv: list[str], needle: str, folder: Path, capsys) -> None:
    """Exit status 2, one line on stderr naming the problem, no traceback, nothing written under ``folder``."""
    before = _snapshot(folder)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert err and "\n" not in err and "Traceback" not in err, err
    assert needle.lower() in err.lower(), (needle, err)
    assert _snapshot(folder) == before, "a failing command changed or wrote files"


# ---------------------------------------------------------------------------------------------- the rule
def test_a_path_is_told_from_a_name():
    assert parse_file_name("my.csv") == (Path("my.csv"), None)
    assert parse_file_name("data/my.JSONL:positive") == (Path("data/my.JSONL"), "positive")
    assert parse_file_name("x.parquet") == (Path("x.parquet"), None)
    assert parse_file_name("data/labels") == (Path("data/labels"), None)
    for name in ("lang:fr", "is_python_code", "sae-probes:5_hist_fig_ismale", "bigram:high-school"):
        assert parse_file_name(name) is None


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_file_through_probe_cli(tmp_path, capsys, suffix):
    path = _write(tmp_path / f"reviews{suffix}", _reviews())
    out = tmp_path / "out"
    assert main(["probe", "--dataset", str(path), *COLUMNS, *SMALL, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    table = pd.read_csv(out / "results.csv")
    assert set(table.dataset) == {"reviews"} and set(table.category) == {"user"}
    assert (table.n_train + table.n_test == 48).all()
    meta = json.loads((out / "probe.json").read_text())
    facts = meta["datasets"]["reviews"]
    assert facts["n"] == 48 and "sentiment == 'positive'" in facts["description"]
    assert meta["config"]["text_column"] == "review"


def test_library_api_reads_every_format_alike(tmp_path):
    cols = FileColumns(text_column="review", label_column="sentiment")
    pytest.importorskip("pyarrow")
    paths = [_write(tmp_path / f"reviews{s}", _reviews()) for s in (".csv", ".jsonl", ".parquet")]
    found = [resolve_datasets([str(p)], cols, max_examples=1000) for p in paths]
    for (ds,) in found:
        assert ds.name == "reviews" and ds.positive == "positive" and len(ds) == 48
        assert ds.texts == found[0][0].texts and ds.labels.tolist() == found[0][0].labels.tolist()
    table = run_probing(ProbeConfig(model="tiny-llama", dataset=(str(paths[0]),), text_column="review",
                                    label_column="sentiment", layers=(0,), ks=(1,), methods=("mean_diff",),
                                    controls=False, max_length=48), tmp_path / "out", lm=tiny_model("llama"))
    assert set(table.dataset) == {"reviews"}


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch, capsys):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    _fails_cleanly(["datasets", "--check", str(path)], "needs the package pyarrow", tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- token level
def _token_rows(n: int = 16) -> list[dict]:
    """'the cat sat' / 'a dog ran': label 1 = the animal word; its span and its first token's index."""
    rows = []
    for i in range(n):
        text = f"the {'cat' if i % 2 else 'dog'} sat on mat {i}"
        rows.append({"sentence": text, "is_cat": i % 2, "start": 4, "end": 7, "tok": 4, "doc": i % 6})
    return rows


def test_token_level_labels_read_one_token(tmp_path):
    path = _write(tmp_path / "animals.csv", _token_rows())
    lm = tiny_model("llama")
    by_span = read_labelled_file(path, FileColumns(text_column="sentence", label_column="is_cat",
                                                   span_columns=("start", "end"), file_aggregation="token",
                                                   group_column="doc")).datasets()[0]
    by_index = read_labelled_file(path, FileColumns(text_column="sentence", label_column="is_cat",
                                                    token_column="tok")).datasets()[0]
    assert by_span.aggregation == by_index.aggregation == "token"
    assert by_span.spans[0] == (4, 7) and by_index.token_index[0] == 4 and len(np.unique(by_span.groups)) == 6
    hook = ["layers.0.resid_post"]
    a = probe_activations(lm, by_span, hook)[hook[0]]
    b = probe_activations(lm, by_index, hook)[hook[0]]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the span's first token is token 4
    maxed = read_labelled_file(path, FileColumns(text_column="sentence", label_column="is_cat",
                                                 span_columns=("start", "end"))).datasets()[0]
    assert maxed.aggregation == "max_span"


def test_token_level_through_probe_cli(tmp_path, capsys):
    path = _write(tmp_path / "animals.jsonl", _token_rows(24))
    out = tmp_path / "out"
    argv = ["probe", "--dataset", str(path), "--text-column", "sentence", "--label-column", "is_cat",
            "--span-columns", "start", "end", "--file-aggregation", "token", "--group-column", "doc", *SMALL,
            "--out", str(out)]
    assert main(argv) == 0
    assert set(pd.read_csv(out / "results.csv").dataset) == {"animals"}


# ---------------------------------------------------------------------------------------------- classes
def _three_classes(path: Path) -> Path:
    return _write(path, [{"text": f"{c} number {i}", "label": c} for i in range(8) for c in ("bird", "cat", "dog")])


def test_one_vs_rest_over_many_classes(tmp_path, capsys):
    path = _three_classes(tmp_path / "pets.csv")
    names = [ds.name for ds in resolve_datasets([str(path)])]
    assert names == ["pets:bird", "pets:cat", "pets:dog"]
    (cat,) = resolve_datasets([f"{path}:cat"])
    assert cat.name == "pets:cat" and cat.positive == "cat" and cat.labels.sum() == 8 and len(cat) == 16  # balanced
    (binary,) = resolve_datasets([str(_write(tmp_path / "yn.csv", [{"text": f"t{i}", "label": i % 2}
                                                                   for i in range(10)]))])
    assert binary.name == "yn" and binary.positive == "1"
    assert [d.name for d in resolve_datasets([f"{tmp_path / 'yn.csv'}:0"])] == ["yn:0"]
    out = tmp_path / "out"
    assert main(["probe", "--dataset", f"{path}:dog", *SMALL, "--out", str(out)]) == 0
    assert set(pd.read_csv(out / "results.csv").dataset) == {"pets:dog"}
    _fails_cleanly(["probe", "--dataset", f"{path}:fish", *SMALL, "--out", str(tmp_path / "o2")],
                   "no class 'fish' in column 'label'; its classes are ['bird', 'cat', 'dog']", tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- datasets --check
def test_check_prints_what_probing_reads(tmp_path, capsys):
    path = _write(tmp_path / "reviews.csv", _reviews())
    before = _snapshot(tmp_path)
    assert main(["datasets", "--check", str(path), *COLUMNS]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 50 rows read, 48 examples kept, 2 dropped (1 empty text, 1 missing label)"
    assert "aggregation: mean" in out[2] and out[3] == "classes: 'negative' 24, 'positive' 24"
    assert out[4].startswith("dataset reviews: label 1 = 'positive', 24 positive / 24 negative")
    assert out[5] == "example rows:" and len(out) == 8
    assert out[6].startswith("  row 1: label 'positive', text 'A warm, funny film")
    assert out[7].startswith("  row 2: label 'negative'")
    assert _snapshot(tmp_path) == before

    spans = _write(tmp_path / "animals.jsonl", _token_rows())
    assert main(["datasets", "--check", f"{spans}:1", "--text-column", "sentence", "--label-column", "is_cat",
                 "--span-columns", "start", "end"]) == 0
    out = capsys.readouterr().out
    assert "aggregation: max_span" in out and "dataset animals: label 1 = '1'" in out
    assert "line 1: label '0', span (4, 7) = 'dog', text 'the dog sat on mat 0'" in out


# ---------------------------------------------------------------------------------------------- bad input
BAD = {  # case -> (file name, content, extra flags, what the error line names)
    "missing file": ("nowhere.csv", None, [], "does not exist"),
    "unknown column": ("r.csv", "review,sentiment\nhi,1\n", ["--text-column", "body"],
                       "no column(s) ['body', 'label']; its columns are ['review', 'sentiment']"),
    "one class": ("one.csv", "text,label\n" + "".join(f"t{i},yes\n" for i in range(10)), [], "single class"),
    "empty file": ("empty.csv", "", [], "is empty"),
    "header only": ("header.csv", "text,label\n", [], "no rows"),
    "all rows dropped": ("blank.csv", "text,label\n,1\n,0\n", [], "all 2 rows were dropped (2 empty text)"),
    "malformed jsonl": ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n', [],
                        "line 3 is not valid JSON"),
    "jsonl not an object": ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', [], "line 2 is a JSON list"),
    "span outside text": ("span.csv", "text,label,s,e\n" + "".join(f"abc,{i % 2},0,{9 if i == 3 else 2}\n"
                                                                    for i in range(10)),
                          ["--span-columns", "s", "e"], "row 4: span (0, 9) lies outside its text of 3 characters"),
    "token index not a number": ("tok.csv", "text,label,t\n" + "".join(f"abc,{i % 2},{'x' if i else 1}\n"
                                                                      for i in range(10)),
                                 ["--token-column", "t"], "row 2: column 't' must hold whole numbers, found 'x'"),
    "one span column": ("span1.csv", "text,label,s\nabc,1,0\n", ["--span-columns", "s"], "START END"),
    "unknown aggregation": ("agg.csv", "text,label\na,1\nb,0\n", ["--file-aggregation", "median"],
                            "unknown aggregation 'median'"),
    "token without position": ("tok2.csv", "text,label\na,1\nb,0\n", ["--file-aggregation", "token"],
                               "give --token-column or --span-columns"),
    "unsupported type": ("data/x.txt", "text,label\n", [], "unsupported file type '.txt'"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["probe", "datasets"])
def test_bad_file_fails_cleanly(tmp_path, capsys, case, command):
    name, content, flags, needle = BAD[case]
    path = tmp_path / name
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if command == "probe":
        argv = ["probe", "--model", "tiny-llama", "--dataset", str(path), *flags, "--out", str(tmp_path / "out")]
    else:
        argv = ["datasets", "--check", str(path), *flags]
    _fails_cleanly(argv, needle, tmp_path, capsys)


def test_check_refuses_a_builtin_name(tmp_path, capsys):
    _fails_cleanly(["datasets", "--check", "lang:fr"], "takes a labelled file", tmp_path, capsys)


def test_two_files_of_one_name_are_refused(tmp_path):
    a = _write(tmp_path / "a" / "x.csv", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    b = _write(tmp_path / "b" / "x.csv", [{"text": f"u{i}", "label": i % 2} for i in range(10)])
    with pytest.raises(MonoscopeError, match="both named 'x'"):
        resolve_datasets([str(a), str(b)])
    assert len(resolve_datasets([str(a), f"{a}:1"])) == 1  # the same dataset named twice is read once


# ---------------------------------------------------------------------------------------------- specificity
def test_specificity_reads_a_file_with_its_columns(tmp_path, capsys):
    from monoscope.sae.base import SAEConfig, build_sae
    from monoscope.sae.io import save_sae

    save_sae(build_sae(SAEConfig("relu", d_in=32, d_sae=8, hook_name="layers.0.resid_post", model_name="tiny-llama")),
             tmp_path / "sae")
    path = _write(tmp_path / "reviews.jsonl", _reviews())
    argv = ["specificity", "--sae", str(tmp_path / "sae"), "--dataset", str(path), *COLUMNS, "--top-n", "3",
            "--max-length", "48", "--out", str(tmp_path / "spec")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "spec" / "specificity.json").read_text())["datasets"]["reviews"]
    assert result["n_positive"] == result["n_negative"] == 24 and len(result["features"]) == 3
    _fails_cleanly(argv[:-1] + [str(tmp_path / "spec2"), "--label-column", "stars"], "no column(s) ['stars']",
                   tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- monoscope run
def test_run_config_accepts_and_checks_a_file(tmp_path):
    path = _write(tmp_path / "reviews.csv", _reviews())
    check_settings(RunConfig(probe_datasets=(str(path), "lang:fr"), text_column="review", label_column="sentiment"))
    with pytest.raises(MonoscopeError, match="no column"):
        check_settings(RunConfig(probe_datasets=(str(path),)))
    with pytest.raises(MonoscopeError, match="does not exist"):
        check_settings(RunConfig(probe_datasets=(str(tmp_path / "gone.csv"),)))
    with pytest.raises(MonoscopeError, match="unknown probing dataset 'banana'"):
        check_settings(RunConfig(probe_datasets=("banana",)))


def test_run_probes_a_csv_and_reruns_when_it_changes(tmp_path, capsys):
    from test_pipeline import TINY

    path = _write(tmp_path / "reviews.csv", _reviews())
    replaced = ("probe_datasets", "probe_examples")
    lines = [line for line in TINY.splitlines() if line.split("=")[0].strip() not in replaced]
    lines += [f'probe_datasets = ["{path}"]', 'text_column = "review"', 'label_column = "sentiment"',
              "probe_examples = 48"]
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    argv = ["run", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    for sweep in ("neurons", "sae", "osp", "resid"):
        assert set(pd.read_csv(tmp_path / "r" / "probe" / sweep / "results.csv").dataset) == {"reviews"}
    capsys.readouterr()
    rows = _reviews()
    rows[0]["review"] = "An edited first review, still glowing."
    _write(path, rows)
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "probe: running" in log and "saes: done before, skipped" in log
