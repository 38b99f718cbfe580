"""Where the local Hugging Face caches hold a repository, read fresh from the environment on every call.

Nothing here downloads. The hub cache keeps one folder per repository,
``{models|datasets}--OWNER--NAME/snapshots/REVISION/``, with ``refs/main`` naming the revision last fetched;
``datasets.load_dataset`` also writes its prepared Arrow files under the datasets cache,
``OWNER___NAME/CONFIG/VERSION/HASH/NAME-SPLIT[-00000-of-00002].arrow``. Both locations follow the same
environment variables as huggingface_hub (HF_HUB_CACHE, HF_DATASETS_CACHE, HF_HOME, XDG_CACHE_HOME).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from monoscope.errors import MonoscopeError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface"


def hub_cache() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(explicit).expanduser() if explicit else hf_home() / "hub"


def datasets_cache() -> Path:
    explicit = os.environ.get("HF_DATASETS_CACHE")
    return Path(explicit).expanduser() if explicit else hf_home() / "datasets"


def snapshot(repo_id: str, kind: str = "model") -> Path | None:
    """The cached snapshot folder of ``repo_id`` (the revision ``refs/main`` names, else the only or newest
    one), or None when the hub cache does not hold it. ``kind``: "model" or "dataset"."""
    if not REPO_ID.match(repo_id):
        return None
    repo = hub_cache() / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text().strip()
        if named.is_dir():
            return named
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def prepared_dataset(repo_id: str) -> Path | None:
    """The ``datasets`` library's prepared folder of ``repo_id`` (OWNER___NAME), or None."""
    if not REPO_ID.match(repo_id):
        return None
    folder = datasets_cache() / repo_id.replace("/", "___")
    return folder if folder.is_dir() else None


def require_snapshot(repo_id: str, kind: str = "model") -> Path:
    found = snapshot(repo_id, kind)
    if found is None:
        flag = " --repo-type dataset" if kind == "dataset" else ""
        raise MonoscopeError(f"{kind} {repo_id!r} is not in the local Hugging Face cache ({hub_cache()}); "
                             f"nothing is downloaded at run time: fetch it once with "
                             f"'hf download {repo_id}{flag}' (or set HF_HUB_CACHE / HF_HOME to the cache holding it)")
    return found


# ------------------------------------------------------------------------------------------------- datasets
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def dataset_files(spec: str) -> list[tuple[str, Path]]:
    """(label, file) of one split of a cached hub dataset, ``REPO[:SPLIT]`` with SPLIT ``train`` by default
    or ``CONFIG/SPLIT`` where the dataset has several configurations; the hub snapshot wins over the
    ``datasets`` library's prepared Arrow files."""
    repo, _, split = spec.partition(":")
    config, _, split = split.rpartition("/") if "/" in split else ("", "", split or "train")
    snap = snapshot(repo, "dataset")
    if snap is not None:
        base, files = snap, [p for p in sorted(snap.rglob("*")) if p.is_file() and p.suffix in DATA_SUFFIXES
                             and not p.name.startswith(".") and p.name != "dataset_infos.json"]
    elif (prepared := prepared_dataset(repo)) is not None:
        base, files = prepared, _newest_prepared(prepared)
    else:
        raise MonoscopeError(f"dataset {repo!r} is in neither local Hugging Face cache ({hub_cache()}, "
                             f"{datasets_cache()}); nothing is downloaded at run time: fetch it once with "
                             f"'hf download {repo} --repo-type dataset', or save it with "
                             f"Dataset.save_to_disk(FOLDER) and pass the folder")
    chosen = [p for p in files if _in_split(p.relative_to(base), split)]
    configs = sorted({p.relative_to(base).parts[0] for p in chosen if len(p.relative_to(base).parts) > 1} - {"data"})
    if config:
        chosen = [p for p in chosen if p.relative_to(base).parts[0] == config]
    elif len(configs) > 1:
        raise MonoscopeError(f"dataset {repo!r} has several configurations ({', '.join(configs)}); "
                             f"pick one: hf:{repo}:{configs[0]}/{split}")
    if not chosen:
        names = sorted({p.relative_to(base).as_posix() for p in files})[:8]
        raise MonoscopeError(f"dataset {repo!r} has no {'/'.join(filter(None, (config, split)))!r} data files "
                             f"in the cache (found: {names or 'none'}); name another split: hf:{repo}:SPLIT")
    return [(f"{repo}/{p.relative_to(base).as_posix()}", p) for p in chosen]


def _in_split(relative: Path, split: str) -> bool:
    """A file belongs to ``split`` when a folder is named after it or its name has it as a dash/dot-separated
    word (train-00000-of-00002.parquet, imdb-train.arrow, train.jsonl)."""
    boundary = re.compile(rf"(^|[-_.]){re.escape(split)}($|[-_.])")
    return split in relative.parts[:-1] or bool(boundary.search(relative.name.rsplit(".", 1)[0]))


def _newest_prepared(folder: Path) -> list[Path]:
    """The Arrow files of each configuration's newest prepared version (CONFIG/VERSION/HASH/*.arrow)."""
    out = []
    for config in sorted(p for p in folder.iterdir() if p.is_dir()):
        builds = sorted({a.parent for a in config.glob("*/*/*.arrow")}, key=lambda p: p.stat().st_mtime)
        if builds:
            out += sorted(builds[-1].glob("*.arrow"))
    return out


def saved_dataset_files(folder: Path) -> list[tuple[str, Path]] | None:
    """(label, file) of a folder written by ``Dataset.save_to_disk`` (state.json + Arrow files), or of the
    ``train`` split of a ``DatasetDict`` saved so; None when ``folder`` is neither."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        if "train" not in splits:
            raise MonoscopeError(f"{folder} is a saved DatasetDict without a 'train' split; pass one split's "
                                 f"folder, e.g. {folder / (splits[0] if splits else 'SPLIT')}")
        folder = folder / "train"
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        listed = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise MonoscopeError(f"{state} is not a readable datasets state file; save the dataset again with "
                             "save_to_disk") from None
    files = [folder / name for name in listed] or sorted(folder.glob("*.arrow"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise MonoscopeError(f"{folder} is a saved dataset whose data files are missing ({missing[:3] or 'none listed'}); "
                             "save the dataset again with save_to_disk")
    return [(f"{folder.name}/{f.name}", f) for f in files]
