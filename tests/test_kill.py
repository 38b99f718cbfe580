"""kill -9 of a whole `monoscope run` (tiny model) at several stages, then reruns: the artifacts come out
byte-identical to an uninterrupted run."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import TINY

pytestmark = pytest.mark.slow

CMD = [sys.executable, "-c", "import sys; from monoscope.cli import main; sys.exit(main(sys.argv[1:]))", "run"]
# the files that carry results (timings and logs differ between runs by nature)
RESULTS = ("*.safetensors", "contexts.jsonl", "steering.json", "results.csv", "sweep.csv", "top_features.json")
TIMING_COLUMNS = ("fit_s", "seconds", "train_tokens_per_s")


def _run(cfg: Path, out: Path, kill_at: str | None = None, delay: float = 0.0) -> int:
    """Run to the end, or until the log shows ``kill_at`` (then wait ``delay`` s and SIGKILL the process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(CMD + ["--config", str(cfg), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        if kill_at and kill_at in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9
        assert time.monotonic() < deadline, "the run took over 10 minutes"
    return proc.wait()


def _digests(run: Path) -> dict[str, str]:
    out = {}
    for pattern in RESULTS:
        for path in sorted(run.rglob(pattern)):
            data = path.read_bytes()
            if path.suffix == ".csv":
                import io

                import pandas as pd

                frame = pd.read_csv(io.BytesIO(data))
                data = frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame]).to_csv(index=False).encode()
            out[path.relative_to(run).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def test_kill_at_several_stages_resumes_to_identical_results(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TINY)
    assert _run(cfg, tmp_path / "whole") == 0
    killed = tmp_path / "killed"
    for stage, delay in (("extract: running", 1.0), ("saes: running", 0.3), ("stats: running", 0.0),
                         ("steer: running", 0.0)):
        assert _run(cfg, killed, kill_at=stage, delay=delay) == -9, f"the run ended before {stage!r}"
    assert _run(cfg, killed) == 0
    want, got = _digests(tmp_path / "whole"), _digests(killed)
    assert len(want) > 10 and got == want
    assert (killed / "report.html").exists()
