"""The feature-statistics artifact's owner: validation of damaged folders, the content hash, and the CLI."""
import json
import shutil

import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.interpret.feature_stats import FeatureStats
from monoscope.interpret.stats import StatsConfig, compute_feature_stats
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae
from synthetic import random_store

HOOK = "layers.1.resid_post"


def tiny_sae():
    torch.manual_seed(0)
    return build_sae(SAEConfig("topk", d_in=16, d_sae=12, k=3, hook_name=HOOK, model_name="tiny-llama"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    random_store(root / "store", HOOK, d=16, ctx_len=10, n_contexts=20)
    cfg = StatsConfig(top_k=4, n_intervals=2, per_interval=2, batch_size=64, context_window=(3, 1))
    return compute_feature_stats(root / "store", root / "stats", cfg, sae=tiny_sae(), show_progress=False)


@pytest.fixture
def copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


def one_line_error(folder, match):
    with pytest.raises(MonoscopeError, match=match) as info:
        FeatureStats(folder)
    msg = str(info.value)
    assert "\n" not in msg and "rerun `monoscope stats`" in msg
    return msg


def test_opens_and_reads(artifact):
    stats = FeatureStats(artifact)
    assert stats.n_features == len(stats) == 12 and stats.hook == HOOK and stats.model == "tiny-llama"
    assert stats.record(3)["feature"] == 3
    assert [f for f, _ in stats.records([5, 1])] == [5, 1]
    assert stats.arrays["density"].shape == (12,)
    assert stats.top_features(3) == sorted(stats.top_features(3), key=lambda f: -stats.arrays["density"][f])
    stats.verify()
    text = (artifact / "stats.json").read_text()
    assert str(artifact.parent) not in text  # no absolute paths: the folder can move


def test_corrupted_sidecar(copy):
    (copy / "stats.json").write_text('{"format": "monoscope.feature_st')
    assert "stats.json" in one_line_error(copy, "not readable JSON")


def test_missing_or_damaged_arrays(copy):
    (copy / "features.safetensors").unlink()
    assert "features.safetensors" in one_line_error(copy, "missing")


def test_arrays_without_a_tensor(copy):
    from safetensors.torch import load_file, save_file

    from monoscope.artifacts import sha256_file

    arrays = load_file(str(copy / "features.safetensors"))
    del arrays["top_rows"]
    save_file(arrays, str(copy / "features.safetensors"))
    side = json.loads((copy / "stats.json").read_text())  # the sidecar made to agree on the size: still caught
    side["files"]["features.safetensors"] = {"bytes": (copy / "features.safetensors").stat().st_size,
                                             "sha256": sha256_file(copy / "features.safetensors")}
    (copy / "stats.json").write_text(json.dumps(side))
    one_line_error(copy, "lacks the arrays top_rows")


def test_truncated_contexts(copy):
    lines = (copy / "contexts.jsonl").read_text().splitlines(keepends=True)
    (copy / "contexts.jsonl").write_text("".join(lines[:-2]))
    assert "contexts.jsonl" in one_line_error(copy, "truncated or edited")


def test_content_hash_stable_across_moves_and_changes_with_content(artifact, tmp_path):
    h = FeatureStats(artifact).content_hash
    moved = shutil.move(str(shutil.copytree(artifact, tmp_path / "a")), tmp_path / "b")
    assert FeatureStats(moved).content_hash == h
    # same size, other content: the cheap check passes, verify() and a rewrite see the change
    path = moved / "contexts.jsonl"
    text = path.read_text()
    path.write_text(text.replace('"feature":0,', '"feature":9,', 1))
    with pytest.raises(MonoscopeError, match="content differs"):
        FeatureStats(moved).verify()
    old = FeatureStats(moved)
    rewritten = FeatureStats.write(tmp_path / "c", {k: v for k, v in old.sidecar.items()
                                                   if k not in ("files", "content_hash")},
                                   old.arrays, path.read_text().splitlines(keepends=True))
    assert rewritten.content_hash != h


def test_cli_stats_with_an_sae_folder(tmp_path, capsys):
    """``monoscope stats --store S --sae DIR --out O``: the SAE folder is loaded, not taken for an SAE."""
    random_store(tmp_path / "store", HOOK, d=16, ctx_len=10, n_contexts=20)
    save_sae(tiny_sae(), tmp_path / "sae")
    rc = main(["stats", "--store", str(tmp_path / "store"), "--sae", str(tmp_path / "sae"),
               "--out", str(tmp_path / "out"), "--top-k", "3", "--batch-size", "64"])
    assert rc == 0, capsys.readouterr().err
    stats = FeatureStats(tmp_path / "out")
    assert stats.n_features == 12 and stats.kind == "sae_latents" and stats.record(0)["feature"] == 0
    assert "feature statistics for 12 features" in capsys.readouterr().out
