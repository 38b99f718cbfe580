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
from typing import Any, ClassVar, Iterator

from monoscope.errors import MonoscopeError


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


class JsonResult:
    """Base of a dataclass result kept as one JSON file in its folder: ``save`` writes it atomically, ``load``
    reads it back or fails with one line naming the file and the fix. A subclass names ``FILE``, ``WHAT`` and
    ``FIX`` and may extend ``to_dict`` (derived fields written for readers are ignored on ``load``)."""

    FILE: ClassVar[str]
    WHAT: ClassVar[str]
    FIX: ClassVar[str]

    def to_dict(self) -> dict:
        import dataclasses

        return json.loads(json.dumps(dataclasses.asdict(self), default=jsonable))

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / self.FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike):
        import dataclasses

        path = Path(folder) / cls.FILE
        if not path.exists():
            raise MonoscopeError(f"{path} does not exist; {cls.FIX}")
        try:
            data = read_json(path)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError) as exc:
            raise MonoscopeError(f"{path} is not a readable {cls.WHAT} ({exc}); {cls.FIX}") from None


def jsonable(obj: Any) -> Any:
    """JSON form of numpy values (and anything else: its text)."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)
