"""Every command line of the README's CLI tour, run as written on the real Gemma 3 270M at small sizes.

The tour is read from README.md itself, so a new line without a way to shrink it here fails this test. Each
line runs in a scratch folder, in order (later lines read what earlier ones wrote), with the flags of SHRINK
appended: argparse keeps the last value of a flag, so they only make the line smaller, never different.
``monoscope serve`` is started as a process on a free port and asked for a page and a live search.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from test_pipeline import TINY

from monoscope.cli import main

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"

SHRINK = {  # subcommand -> flags that make it small enough for CI
    "hookpoints": [], "info": [], "datasets": [], "browser": [], "run": [],
    "extract": ["--tokens", "3072", "--context-length", "64"],
    "train": ["--d-sae", "256", "--batch-size", "256", "--steps", "8"],
    "evaluate": ["--max-tokens", "1024", "--lm-contexts", "2"],
    "sweep": ["--k-values", "16", "--target-l0-values", "16", "--l1-values", "5", "--d-sae", "128", "--steps", "4",
              "--batch-size", "256", "--eval-tokens", "512", "--lm-contexts", "2"],
    "synth": ["--model", "tiny", "--d-sae", "128", "--batch-size", "256", "--tokens", "2048", "--eval-samples", "2000"],
    "probe": ["--max-examples", "40", "--max-length", "32", "--ks", "1", "4", "--methods", "mean_diff",
              "--osp-max-k", "1", "--osp-time-limit", "5"],
    "stats": ["--corr-rows", "512"],
    "explain": ["--top-n", "2", "--n-explain", "4", "--n-score", "4", "--max-tokens", "12", "--scores", "detection"],
    "steer": ["--max-new-tokens", "4"],
    "specificity": ["--max-examples", "40", "--max-length", "32"],
}
RESEARCH = ["--seeds", "2", "--extra-d-sae", "256", "--explain-features", "1", "--explain-neurons", "1",
            "--explain-score-examples", "2", "--steer-samples", "4"]  # the research line: its sizes, smaller


def tour() -> list[list[str]]:
    """The README's CLI tour: one argv per command (``a && b`` gives two), comments dropped."""
    block = README.read_text().split("## CLI tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            argv = shlex.split(part)
            assert argv[0] == "monoscope", part
            commands.append(argv[1:])
    return commands


def test_the_tour_is_covered():
    names = {argv[0] for argv in tour()} - {"serve"}
    assert names <= set(SHRINK), f"README commands with no way to shrink them here: {names - set(SHRINK)}"
    assert len(tour()) >= 15


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(TINY)
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # the tour's own labelled file
    for argv in tour():
        if argv[0] == "serve":
            _serve(argv)
            continue
        code = main(argv + SHRINK[argv[0]] + (RESEARCH if "--profile" in argv else []))
        out, err = capsys.readouterr()
        assert code == 0, f"monoscope {' '.join(argv)} exited {code}: {err[-2000:]}"
        assert "Traceback" not in err and "Warning" not in err, err[-2000:]
    assert (tmp_path / "sae/topk/cfg.json").exists() and (tmp_path / "sae/topk/eval.json").exists()
    assert (tmp_path / "browser/index.html").exists() and (tmp_path / "spec/specificity.json").exists()
    assert (tmp_path / "runs/mine/report.html").exists()
    assert "| e | Features of the main SAE split" in (tmp_path / "runs/research/findings.md").read_text()
    assert any(json.loads(line).get("explanation") for line in (tmp_path / "stats/explanations.jsonl").open())


def _serve(argv):
    """``monoscope serve`` as the user starts it, on a free port; a page and a live search answer."""
    cmd = [sys.executable, "-c", "import sys; from monoscope.cli import main; sys.exit(main(sys.argv[1:]))",
           *argv, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(README.parent / "src")})
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+/", line).group(0)
        assert "live search" in line, line
        assert b"<html" in urllib.request.urlopen(url + "index.html", timeout=30).read().lower()
        req = urllib.request.Request(url + "api/activations", data=json.dumps({"text": "The weather today"}).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert answer and "tokens" in json.dumps(answer)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in proc.stderr.read()
