"""Tests for monoscope.train: learning, exact resume after SIGKILL, DDP under torchrun, refusals."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from monoscope.errors import MonoscopeError
from monoscope.store import StoreWriter
from monoscope.train import TrainConfig, lr_at, sparsity_scale_at, train_sae

HOOK = "layers.0.resid_post"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def synthetic_store(folder, rows=4096, d=16, n_feat=48, active=3, seed=0, bad_row=None, shard_rows=1024):
    """Rows that are sparse sums of random unit directions (what an SAE should recover), plus an offset."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_feat, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    mags = rng.uniform(0.5, 2.0, (rows, n_feat)) * (rng.random((rows, n_feat)) < active / n_feat)
    x = (mags @ dirs + 0.5 + 0.01 * rng.standard_normal((rows, d))).astype(np.float32)
    if bad_row is not None:
        x[bad_row, 2] = np.nan
    w = StoreWriter.open(folder, model="synthetic", model_fingerprint="synthetic", hooks={HOOK: d},
                         shard_rows=shard_rows, meta={"input_hash": f"synthetic-{seed}", "config": {"keep_bos": False}})
    ctx = np.arange(rows) // 32
    w.append({HOOK: torch.from_numpy(x)}, token_ids=rng.integers(3, 200, rows), doc_ids=ctx,
             positions=np.arange(rows) % 32, context_ids=ctx)
    w.finish()
    return Path(folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store") / "s")


def small(**kw) -> TrainConfig:
    base = dict(d_sae=64, k=4, batch_size=128, steps=60, log_every=20, checkpoint_every=0, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "sae_weights.safetensors"))


def test_schedules():
    assert lr_at(0, 100, 1.0, 10, 0.2) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, 0.2) == 1.0
    assert lr_at(90, 100, 1.0, 10, 0.2) == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 0, 0.2) == pytest.approx(0.05)
    assert sparsity_scale_at(0, 100, 0.1) == pytest.approx(0.1)
    assert sparsity_scale_at(50, 100, 0.1) == 1.0


def test_training_improves_fvu_and_writes_artifacts(store, tmp_path):
    from monoscope.evaluate import evaluate_sae
    from monoscope.sae import SAEConfig, build_sae

    out = train_sae(small(steps=120), store, tmp_path / "sae")
    info = json.loads((out / "train.json").read_text())
    assert info["total_steps"] == 120 and info["d_sae"] == 64 and info["store"]["identity"]
    assert "torch" in info["library_versions"] and info["timings"]["tokens_per_s"] > 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [20, 40, 60, 80, 100, 120]
    assert {"loss", "l0", "fvu", "dead_fraction", "lr"} <= set(rows[0])
    assert not (out / "checkpoint").exists()

    torch.manual_seed(0)
    untrained = build_sae(SAEConfig("topk", d_in=16, d_sae=64, k=4, hook_name=HOOK, model_name="synthetic"))
    from monoscope.store import ActivationStore
    untrained.init_from_data(ActivationStore(store).rows(np.arange(2048)))
    before = evaluate_sae(untrained, store, lm_contexts=0)["fvu"]
    after = evaluate_sae(out, store, lm_contexts=0)
    assert after["fvu"] < 0.5 * before, (before, after["fvu"])
    assert after["l0"] == pytest.approx(4.0)
    assert (out / "eval.json").exists()
    # a finished run with the same settings is reused untouched
    stamp = (out / "sae_weights.safetensors").stat().st_mtime_ns
    train_sae(small(steps=120), store, out)
    assert (out / "sae_weights.safetensors").stat().st_mtime_ns == stamp


def test_input_scale_is_folded_into_saved_weights(store, tmp_path):
    """The saved SAE works on raw activations: same reconstruction as the trained one on s·x, divided by s."""
    from monoscope.sae.io import load_sae
    from monoscope.store import ActivationStore

    out = train_sae(small(steps=20, normalize=True), store, tmp_path / "n")
    scale = json.loads((out / "train.json").read_text())["input_scale"]
    assert scale != pytest.approx(1.0)
    x = ActivationStore(store).rows(np.arange(256))
    sae = load_sae(out)
    rel = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert rel < 1.0  # a wrongly scaled SAE reconstructs raw x terribly


KILLABLE = """
    import sys, time, torch
    torch.set_num_threads(1)
    from monoscope.train import TrainConfig, train_sae
    cfg = TrainConfig(d_sae=64, k=4, batch_size=128, steps=60, log_every=10, checkpoint_every=10, lr=3e-3,
                      dead_window_tokens=2000)
    slow = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    train_sae(cfg, sys.argv[1], sys.argv[2], callback=lambda step, info: time.sleep(slow))
"""


def _run_script(args, timeout=120):
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLABLE), *map(str, args)],
                       env={**os.environ, "PYTHONPATH": SRC, "MONOSCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]


def test_resume_after_sigkill_is_bit_identical(store, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": SRC, "MONOSCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLABLE), str(store), str(killed), "0.03"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                if json.loads(ckpt.read_text())["step"] >= 20:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.05)  # land somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train.json").exists() and ckpt.exists()

    _run_script([store, killed])  # resumes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses
    try:  # uninterrupted reference, same settings
        train_sae(TrainConfig(d_sae=64, k=4, batch_size=128, steps=60, log_every=10, checkpoint_every=10, lr=3e-3,
                              dead_window_tokens=2000), store, whole)
    finally:
        torch.set_num_threads(threads)
    a, b = weights(killed), weights(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] >= 20
    steps = [int(r["step"]) for r in csv.DictReader(open(killed / "metrics.csv"))]
    assert steps == list(range(10, 61, 10))  # rows after the checkpoint were redone, not duplicated


def test_finished_folder_with_other_settings_is_refused(store, tmp_path):
    out = train_sae(small(steps=10), store, tmp_path / "o")
    with pytest.raises(MonoscopeError, match="other settings"):
        train_sae(small(steps=10, k=5), store, out)


def test_checkpoint_from_other_config_is_refused(store, tmp_path):
    out = tmp_path / "o"
    calls = []

    def stop(step, info):
        calls.append(step)
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(small(steps=40, checkpoint_every=10), store, out, callback=stop)
    assert (out / "checkpoint" / "checkpoint.json").exists()
    with pytest.raises(MonoscopeError, match="checkpoint of a run with other settings"):
        train_sae(small(steps=40, checkpoint_every=10, k=6), store, out)


DDP_SCRIPT = """
    import sys, torch
    from monoscope.train import TrainConfig, train_sae
    cfg = TrainConfig(d_sae=64, k=4, batch_size=128, steps=40, log_every=10, checkpoint_every=0, lr=3e-3)
    train_sae(cfg, sys.argv[1], sys.argv[2])
"""


def test_ddp_two_processes_match_single_process(store, tmp_path):
    from monoscope.evaluate import evaluate_sae

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": SRC, "MONOSCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # one retry, in a fresh folder: gloo's rendezvous and teardown can race under load
        out = tmp_path / f"ddp{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(store), str(out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        if p.returncode == 0:
            break
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    info = json.loads((out / "train.json").read_text())
    assert info["world_size"] == 2
    single = train_sae(TrainConfig(d_sae=64, k=4, batch_size=128, steps=40, log_every=10, checkpoint_every=0,
                                   lr=3e-3), store, tmp_path / "single")
    f_ddp = evaluate_sae(out, store, lm_contexts=0)["fvu"]
    f_one = evaluate_sae(single, store, lm_contexts=0)["fvu"]
    assert abs(f_ddp - f_one) < 0.05 + 0.1 * f_one, (f_ddp, f_one)
    # same initialisation and same data distribution: the weights are close, not just the metric
    a, b = weights(out), weights(single)
    cos = torch.nn.functional.cosine_similarity(a["W_dec"], b["W_dec"], dim=1).mean()
    assert cos > 0.8, cos


def test_errors(store, tmp_path):
    with pytest.raises(MonoscopeError, match="k=100"):
        train_sae(small(k=100), store, tmp_path / "a")
    with pytest.raises(MonoscopeError, match="unknown SAE architecture"):
        train_sae(small(architecture="banana"), store, tmp_path / "b")
    with pytest.raises(MonoscopeError, match="no hook"):
        train_sae(small(hook="layers.3.mlp_out"), store, tmp_path / "c")
    with pytest.raises(MonoscopeError, match="fewer than one batch"):
        train_sae(small(batch_size=10_000), store, tmp_path / "d")
    with pytest.raises(MonoscopeError, match="either --tokens or --steps"):
        train_sae(small(tokens=1000, steps=60), store, tmp_path / "e")
    bad = synthetic_store(tmp_path / "bad", rows=2048, bad_row=1500)
    with pytest.raises(MonoscopeError, match=r"shard_00001.*row 476"):
        train_sae(small(), bad, tmp_path / "f")
    assert not (tmp_path / "f" / "train.json").exists()


@pytest.mark.parametrize("arch, setting, match", [
    ("relu", dict(l1_coefficient=-1.0), "l1_coefficient must be a finite number ≥ 0"),
    ("gated", dict(l1_coefficient=-0.5), "l1_coefficient must be a finite number ≥ 0"),
    ("jumprelu", dict(target_l0=-3.0), "target_l0 must be > 0"),
    ("matryoshka", dict(matryoshka_widths=(16, 32)), "matryoshka_widths .* end at d_sae=64"),
])
def test_architecture_settings_are_checked_before_any_work(store, tmp_path, arch, setting, match):
    with pytest.raises(MonoscopeError, match=match):
        train_sae(small(architecture=arch, **setting), store, tmp_path / arch)
    assert not (tmp_path / arch).exists()


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu", "gated", "matryoshka"])
def test_every_architecture_trains(store, tmp_path, arch):
    out = train_sae(small(architecture=arch, steps=6, log_every=3, matryoshka_widths=(16, 64) if
                          arch == "matryoshka" else ()), store, tmp_path / arch)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((out / "cfg.json").read_text())["d_in"] == 16


def test_cli_train(store, tmp_path, capsys):
    import argparse

    from monoscope.train import setup_train

    p = argparse.ArgumentParser()
    run = setup_train(p)
    ns = p.parse_args(["--store", str(store), "--out", str(tmp_path / "cli"), "--d-sae", "32", "--k", "2",
                       "--batch-size", "128", "--steps", "10", "--normalize", "false"])
    run(ns)
    assert "SAE saved to" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "train.json").read_text())["input_scale"] == 1.0
