"""Stages of a run folder, chained by content.

A stage is a folder of the run with a ``stage.json`` marker. Its **key** is a hash of its own settings and
the **content hashes** of the stages it reads; its content hash is a hash of every file it made. So a change
anywhere re-runs exactly the stages downstream of it: a new ``d_sae`` changes the SAEs' files, hence the
key of the feature statistics, hence the explanations', and so on; a probing setting re-runs only the
probes and the report.

``stage.json`` holds:
    key        the hash above
    status     "running" (started, maybe killed: a rerun with the same key resumes in the folder),
               "incomplete" (finished with units still to redo, e.g. failed explanations: a rerun with the
               same key runs it again in place), or "finished"
    data       what the stage returns to later stages; paths in it are relative to the run folder, so a
               run folder can be copied or moved
    files      every file the stage made (relative path → size, sha256): checked on every skip, so a stage
               whose files went missing or changed size runs again
    digest     the content hash later stages chain from; seconds, finished: bookkeeping

A stage whose key changed starts from an empty folder: nothing of an older input survives into its result.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from monoscope.artifacts import now_iso, read_json, sha256_file, write_json
from monoscope.config import config_hash
from monoscope.errors import MonoscopeError

MARKER = "stage.json"


@dataclass(frozen=True)
class Stage:
    """A finished stage: ``data`` (its paths absolute again), ``digest`` (content hash), ``seconds``."""

    name: str
    folder: Path
    data: dict
    digest: str
    seconds: float = 0.0
    complete: bool = True

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def view(self) -> dict:
        """``data`` with its paths as strings (for code that takes plain dicts)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.data.items()}


def file_table(root: Path, paths: Iterable[Path]) -> dict[str, list]:
    """{path relative to ``root``: [size, sha256]} of every file under ``paths`` (files or folders)."""
    table = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            if f.name == MARKER or f.name.startswith("."):
                continue
            table[f.relative_to(root).as_posix()] = [f.stat().st_size, sha256_file(f)]
    return table


def missing_files(root: Path, table: dict[str, list]) -> str | None:
    """The first file of ``table`` that is missing or has another size under ``root`` (None: all there)."""
    for rel, (size, _) in table.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} changed size"
    return None


class Run:
    """A run folder whose stages are skipped only when a finished stage with the same key is there."""

    def __init__(self, out: str | Path, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.log = log
        self.stages: dict[str, Stage] = {}

    def stage(self, name: str, settings: Any, inputs: Iterable[Stage], body: Callable[[Path], dict]) -> Stage:
        """Return stage ``name``: the finished one if its key and files match, else ``body(folder)``'s run.

        ``body`` returns a JSON-ready dict; its ``Path`` values must lie inside the run folder. A body may set
        ``"incomplete": True`` to leave the stage unfinished (it is run again, in place, next time).
        """
        folder = self.out / name
        inputs = list(inputs)
        key = config_hash(name, settings, {s.name: s.digest for s in inputs})
        done = self._read_marker(folder)
        if done.get("key") == key and done.get("status") == "finished":
            problem = missing_files(self.out, done.get("files", {}))
            if problem is None:
                self.log(f"{name}: done before, skipped")
                return self._remember(name, folder, done)
            self.log(f"{name}: {problem} since it finished; running it again")
        if folder.exists() and (done.get("key") != key or done.get("status") == "finished"):
            shutil.rmtree(folder)  # another key, or broken files: start clean
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MARKER, {"key": key, "status": "running", "started": now_iso()})
        self.log(f"{name}: running")
        started = time.perf_counter()
        data = body(folder)
        seconds = round(time.perf_counter() - started, 1)
        record = self._record(key, folder, data, seconds)
        write_json(folder / MARKER, record)
        self.log(f"{name}: {'finished' if record['status'] == 'finished' else 'stopped unfinished'} "
                 f"in {seconds:.0f} s")
        return self._remember(name, folder, record)

    def finished(self, name: str) -> Stage:
        """Stage ``name`` as an earlier run left it (for tools that read a run folder); it must be finished."""
        done = self._read_marker(self.out / name)
        if done.get("status") != "finished":
            raise MonoscopeError(f"{self.out} has no finished {name!r} stage; run `monoscope run --out {self.out}` "
                                 f"first")
        problem = missing_files(self.out, done.get("files", {}))
        if problem:
            raise MonoscopeError(f"stage {name!r} of {self.out} is damaged ({problem}); rerun `monoscope run`")
        return self._remember(name, self.out / name, done)

    def _record(self, key: str, folder: Path, data: dict, seconds: float) -> dict:
        root, own = self.out.resolve(), folder.resolve()
        stored, paths = {}, [own]
        for k, v in data.items():
            if isinstance(v, Path):
                v = v.resolve()
                stored[k] = {"path": v.relative_to(root).as_posix()}  # raises if a stage writes outside the run
                if not v.is_relative_to(own):
                    paths.append(v)
            else:
                stored[k] = v
        files = file_table(root, paths)
        status = "incomplete" if data.get("incomplete") else "finished"
        return {"key": key, "status": status, "data": stored, "files": files,
                "digest": config_hash(stored, {k: v[1] for k, v in files.items()}),
                "seconds": seconds, "finished": now_iso()}

    def _remember(self, name: str, folder: Path, record: dict) -> Stage:
        data = {k: self.out / v["path"] if isinstance(v, dict) and set(v) == {"path"} else v
                for k, v in record["data"].items()}
        stage = Stage(name, folder, data, record["digest"], record.get("seconds", 0.0),
                      record["status"] == "finished")
        self.stages[name] = stage
        return stage

    def _read_marker(self, folder: Path) -> dict:
        path = folder / MARKER
        if not path.exists():
            return {}
        try:
            done = read_json(path)
            if not isinstance(done, dict):
                raise ValueError("not a JSON object")
            return done
        except (OSError, ValueError) as exc:
            self.log(f"{folder.name}: {MARKER} is unreadable ({exc}); running the stage again")
            return {"key": None}

    @property
    def timings(self) -> dict[str, float]:
        return {name: s.seconds for name, s in self.stages.items()}
