"""Small helpers every artifact folder uses: atomic writes and the JSON sidecar.

Every write goes to a temporary name in the same folder, is fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as pretty JSON."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(target: str | os.PathLike, columns, rows: list[dict]) -> None:
    """Atomically write ``rows`` as CSV with ``columns`` (keys outside them are left out)."""
    import csv

    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def safe_filename(name: str, max_len: int = 80) -> str:
    """``name`` (e.g. a dataset name like ``lang:fr``) made safe for a file name: other characters become ``_``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:max_len]


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, recorded in every sidecar."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("monoscope", "torch", "transformers", "numpy", "scikit-learn", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
