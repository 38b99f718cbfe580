"""Bad input and faults, as a new user meets them (issue 12's campaign, kept so the answers stay right).

Every case runs a real command line on a copy of one tiny `monoscope run` (tiny random model) with one
thing wrong, and checks the contract: exit status 2, exactly one line on stderr that names the problem,
no traceback, and nothing that existed before changed (and nothing new written).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from monoscope.cli import main
from test_pipeline import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """One finished tiny run: stores, two SAEs, feature statistics, explanations, a browser, stage files."""
    root = tmp_path_factory.mktemp("world")
    (root / "run.toml").write_text(TINY)
    assert main(["run", "--config", str(root / "run.toml"), "--out", str(root / "r")]) == 0
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


class Case:
    """A copy of the world with paths by name: {r} run, {S} train store, {V} validation store, {T} TopK SAE,
    {J} JumpReLU SAE, {F} feature stats, {E} explanations, {B} browser, {X} a path that does not exist."""

    def __init__(self, world: Path, tmp: Path):
        shutil.copytree(world, tmp / "w", symlinks=True)
        self.root = tmp / "w"
        r = self.root / "r"
        saes = r / "saes" / "saes"
        self.paths = {"r": r, "S": r / "extract" / "train", "V": r / "extract" / "validation",
                      "T": next(saes.glob("topk_*")), "J": next(saes.glob("jumprelu_*")),
                      "F": r / "stats" / "features", "E": r / "explain" / "features.jsonl", "B": r / "browser",
                      "X": self.root / "missing", "O": self.root / "out", "cfg": self.root / "run.toml"}

    def __getitem__(self, key: str) -> Path:
        return self.paths[key]

    def argv(self, template: str) -> list[str]:
        return [part.format(**{k: str(v) for k, v in self.paths.items()}) for part in template.split()]


def _fails_cleanly(case: Case, template: str, needle: str, capsys) -> None:
    before = _snapshot(case.root)
    capsys.readouterr()
    status = main(case.argv(template))
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert err and "\n" not in err, err
    assert "Traceback" not in err
    assert needle.lower() in err.lower(), (needle, err)
    assert _snapshot(case.root) == before, "a failing command changed or wrote files"


# ---------------------------------------------------------------------------------------- bad flags
FLAGS = [
    ("train --store {S} --hook layers.1.resid_post --out {O} --k 0", "k"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --batch-size 0", "batch_size"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --architecture banana", "banana"),
    ("train --store {S} --out {O} --hook layers.9.resid_post", "layers.9.resid_post"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --lr -1", "lr"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --tokens 0", "tokens"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --d-sae 0", "d_sae"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --architecture relu --l1-coefficient -1", "l1_coefficient"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --k 100000 --d-sae 64", "k"),
    ("train --store {S} --hook layers.1.resid_post --out {O} --tokens 100 --steps 7", "not both"),
    ("train --store {X} --out {O}", "missing"),
    ("train --store {S}/manifest.json --out {O}", "manifest.json"),
    ("train --store {T} --out {O}", "store"),
    ("train --store synth:banana --out {O}", "banana"),
    ("evaluate {X} --store {V}", "missing"),
    ("evaluate {T} --store {X}", "missing"),
    ("evaluate {S} --store {V}", "SAE"),
    ("evaluate {T} --store {V} --hook layers.9.resid_post", "layers.9.resid_post"),
    ("sweep --architectures banana --train-store {S} --val-store {V} --out {O}", "banana"),
    ("sweep --architectures topk --k-values 0 --train-store {S} --val-store {V} --out {O} --d-sae 64", "k"),
    ("sweep --architectures topk --train-store {S} --val-store {X} --out {O}", "missing"),
    ("probe --model tiny-llama --dataset no_such_dataset --out {O}", "no_such_dataset"),
    ("probe --model tiny-llama --dataset lang:fr --source sae:{X} --out {O}", "missing"),
    ("probe --model tiny-llama --dataset lang:fr --ks 0 --out {O}", "k"),
    ("probe --model tiny-llama --dataset lang:fr --layers 99 --out {O}", "99"),
    ("stats --store {S} --sae {X} --out {O}", "missing"),
    ("stats --store {X} --sae {T} --out {O}", "missing"),
    ("stats --store {S} --sae {T} --out {O} --top-k 0", "top_k"),
    ("explain --stats {X} --top-n 1 --backend hf:tiny-llama", "missing"),
    ("explain --stats {F} --top-n 1 --backend openai:m@127.0.0.1:9/v1", "http"),
    ("explain --stats {F} --top-n 1 --backend banana:x", "banana"),
    ("explain --stats {F} --backend hf:tiny-llama --features 99999", "99999"),
    ("steer --sae {T} --feature 99999 --value 4 hello", "99999"),
    ("steer --sae {X} --feature 1 --value 4 hello", "missing"),
    ("specificity --sae {T} --dataset no_such_dataset --out {O}", "no_such_dataset"),
    ("specificity --sae {X} --dataset lang:fr --out {O}", "missing"),
    ("browser --stats {X} --out {O}", "missing"),
    ("serve {X}", "missing"),
    ("info {X}", "missing"),
    ("extract --model tiny-llama --hook layers.1.resid_post --corpus {X} --out {O}", "missing"),
    ("extract --model tiny-llama --hook layers.1.resid_post --tokens 0 --out {O}", "tokens"),
    ("extract --model tiny-llama --hook layers.99.resid_post --out {O}", "layers.99"),
    ("hookpoints no-such-model-anywhere", "no-such-model-anywhere"),
    ("run --config {X} --out {O}", "missing"),
]


@pytest.mark.parametrize("template,needle", FLAGS, ids=[t for t, _ in FLAGS])
def test_bad_flag(world, tmp_path, capsys, template, needle):
    _fails_cleanly(Case(world, tmp_path), template, needle, capsys)


# ---------------------------------------------------------------------------------------- bad run files
RUN_FILES = [
    ('tokens = "abc"', "tokens"),
    ("tokens = [", "run.toml"),
    ("no_such_key = 1", "no_such_key"),
    ("k_values = [0]", "k"),
    ("batch_size = 0", "batch_size"),
    ("probe_examples = 0", "probe_examples"),
    ("probe_ks = [0]", "probe_ks"),
    ('corpus = "/no/such/corpus.txt"', "corpus"),
    ('architectures = ["banana"]', "banana"),
    ("d_sae = -4", "d_sae"),
]


@pytest.mark.parametrize("line,needle", RUN_FILES, ids=[l for l, _ in RUN_FILES])
def test_bad_run_file(world, tmp_path, capsys, line, needle):
    case = Case(world, tmp_path)
    body = "\n".join(x for x in TINY.splitlines() if x.split("=")[0].strip() != line.split("=")[0].strip())
    case["cfg"].write_text(body + "\n" + line + "\n")
    _fails_cleanly(case, "run --config {cfg} --out {O}", needle, capsys)


# ------------------------------------------------------------------------------- corrupted artifacts
def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


CORRUPT = {
    "manifest not json": (lambda c: c["S"].joinpath("manifest.json").write_text("{oops"),
                          "train --store {S} --hook layers.1.resid_post --out {O}", "manifest"),
    "manifest without shards": (lambda c: _edit_json(c["S"] / "manifest.json", lambda d: {k: v for k, v in d.items()
                                                                                          if k != "shards"}),
                                "train --store {S} --hook layers.1.resid_post --out {O}", "shards"),
    "shard truncated": (lambda c: _truncate(next(c["S"].glob("shard_*"))), "info {S} --verify", "shard"),
    "shard deleted": (lambda c: next(c["S"].glob("shard_*")).unlink(), "train --store {S} --hook layers.1.resid_post --out {O}", "shard"),
    "sae cfg a list": (lambda c: c["T"].joinpath("cfg.json").write_text("[1, 2]"), "evaluate {T} --store {V}",
                       "cfg.json"),
    "sae d_sae a string": (lambda c: _edit_json(c["T"] / "cfg.json", lambda d: {**d, "d_sae": "many"}),
                           "evaluate {T} --store {V}", "d_sae"),
    "sae cfg without d_in": (lambda c: _edit_json(c["T"] / "cfg.json", lambda d: {k: v for k, v in d.items()
                                                                                  if k != "d_in"}),
                             "evaluate {T} --store {V}", "d_in"),
    "sae weights truncated": (lambda c: _truncate(c["T"] / "sae_weights.safetensors"), "evaluate {T} --store {V}",
                              "sae_weights.safetensors"),
    "sae weights of another sae": (lambda c: shutil.copy(c["J"] / "sae_weights.safetensors",
                                                         c["T"] / "sae_weights.safetensors"),
                                   "evaluate {T} --store {V}", "tensors"),
    "sae of another width": (lambda c: _edit_json(c["T"] / "cfg.json", lambda d: {**d, "d_in": d["d_in"] * 2}),
                             "evaluate {T} --store {V}", "d_in"),
    "stats.json not json": (lambda c: c["F"].joinpath("stats.json").write_text("nope"),
                            "browser --stats {F} --out {O}", "stats.json"),
    "stats tensors truncated": (lambda c: _truncate(c["F"] / "features.safetensors"),
                                "browser --stats {F} --out {O}", "features.safetensors"),
    "stats contexts garbage": (lambda c: c["F"].joinpath("contexts.jsonl").write_text("garbage\n"),
                               "browser --stats {F} --out {O}", "contexts.jsonl"),
    "stats tensors missing": (lambda c: (c["F"] / "features.safetensors").unlink(),
                              "browser --stats {F} --out {O}", "features.safetensors"),
    "explanations garbage": (lambda c: c["E"].write_text("{not json\n"),
                             "browser --stats {F} --out {O} --explanations {E}", "features.jsonl"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupted_artifact(world, tmp_path, capsys, name):
    damage, template, needle = CORRUPT[name]
    case = Case(world, tmp_path)
    damage(case)
    _fails_cleanly(case, template, needle, capsys)


# ------------------------------------------------------------------------------------ NaN and models
def _poison_store(store: Path) -> None:
    """One NaN in the first shard's first hook row, with the manifest's checksum kept consistent."""
    from safetensors.torch import load_file, save_file

    shard = next(store.glob("shard_*"))
    tensors = load_file(str(shard))
    name = next(k for k in tensors if "resid_post" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    _edit_json(store / "manifest.json", lambda d: {**d, "shards": [
        {**s, "sha256": digest, "bytes": shard.stat().st_size} if s["file"] == shard.name else s
        for s in d["shards"]]})


@pytest.mark.parametrize("template", ["evaluate {T} --store {V}", "stats --store {V} --sae {T} --out {O}",
                                      "train --store {V} --hook layers.1.resid_post --out {O} --d-sae 64 --batch-size 64"])
def test_nan_store(world, tmp_path, capsys, template):
    case = Case(world, tmp_path)
    _poison_store(case["V"])
    _fails_cleanly(case, template, "NaN", capsys)


@pytest.mark.parametrize("template", ["evaluate {T} --store {V}", "stats --store {S} --sae {T} --out {O}",
                                      "steer --sae {T} --feature 1 --value 4 hello",
                                      "probe --model tiny-llama --dataset lang:fr --source sae:{T} --out {O}"])
def test_sae_of_another_model(world, tmp_path, capsys, template):
    case = Case(world, tmp_path)
    def other(d):
        meta = d["metadata"]
        return {**d, "metadata": {**meta, "model_name": "another-model",
                                  "monoscope_config": {**meta["monoscope_config"], "model_name": "another-model"}}}
    _edit_json(case["T"] / "cfg.json", other)
    _fails_cleanly(case, template, "another-model", capsys)


# ------------------------------------------------------------------------------ moved and copied runs
def test_moved_run_resumes_in_place(world, tmp_path, capsys):
    case = Case(world, tmp_path)
    moved = case.root / "moved"
    case["r"].rename(moved)
    capsys.readouterr()
    assert main(["run", "--config", str(case["cfg"]), "--out", str(moved)]) == 0
    out = capsys.readouterr().out
    assert "running" not in out  # every stage was done before, found by content
    assert not case["r"].exists()


def test_copied_run_with_a_missing_artifact_rebuilds_it(world, tmp_path, capsys):
    case = Case(world, tmp_path)
    (case["F"] / "stats.json").unlink()
    assert main(["run", "--config", str(case["cfg"]), "--out", str(case["r"])]) == 0
    assert (case["F"] / "stats.json").exists()
    assert "stats: running" in capsys.readouterr().out


def test_unreadable_stage_marker_reruns_the_stage_and_says_so(world, tmp_path, capsys):
    """stage.json is a cache marker, not a result: an unreadable one costs a rerun of that stage (named in the
    output), never a crash and never a skip."""
    case = Case(world, tmp_path)
    (case["r"] / "saes" / "stage.json").write_text("{")
    capsys.readouterr()
    assert main(["run", "--config", str(case["cfg"]), "--out", str(case["r"])]) == 0
    out = capsys.readouterr().out
    assert "saes: stage.json is unreadable" in out and "saes: running" in out
    assert json.loads((case["r"] / "saes" / "stage.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------------- endpoint faults
def test_endpoint_refusing_connections_fails_loudly(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path / "cache"))
    case = Case(world, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = case.root / "expl.jsonl"
    capsys.readouterr()
    status = main(["explain", "--stats", str(case["F"]), "--backend", f"openai:m@http://127.0.0.1:{port}/v1",
                   "--top-n", "1", "--scores", "detection", "--out", str(out)])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert "retry-failed" in err or "failed" in err.lower()
    if out.exists():
        assert all(json.loads(line).get("status") != "ok" for line in out.read_text().splitlines() if line.strip())
