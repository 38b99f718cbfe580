"""The on-disk activation store: sharded safetensors plus a JSON manifest.

A store folder holds the activations of one or more hook points captured in one pass, so every hook has
the same rows, and the row-aligned columns ``token_ids``, ``doc_ids``, ``positions`` and ``context_ids``.

    folder/
      manifest.json              what is committed: shards, rows, contexts_done, finished, model, meta
      shard_00000.safetensors    one tensor per hook [rows, d] + the four int columns [rows]
      shard_00001.safetensors    ...

Commit protocol (why ``kill -9`` is harmless): a shard is written under a temporary name, fsynced and
renamed; only then is the manifest rewritten (also atomically) to list it. A shard file that the manifest
does not list is an orphan of a crash and is deleted when the writer resumes. Shards always end on a
context boundary, so ``contexts_done`` in the manifest tells the extractor exactly where to resume: no row
is lost and none is written twice.

Reading never loads a whole shard: the safetensors header is parsed here and the tensors are opened with
``np.memmap``, so random access and streaming touch only the pages they need.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from monoscope.artifacts import atomic_path, library_versions, now_iso, read_json, sha256_file, write_json
from monoscope.errors import MonoscopeError

try:  # advisory lock so two extraction jobs cannot write one store; not available on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "monoscope.activation_store"
VERSION = 1
MANIFEST = "manifest.json"
COLUMNS = {"token_ids": "int32", "doc_ids": "int64", "positions": "int32", "context_ids": "int64"}
DTYPES = ("float32", "float16", "bfloat16")

# store dtype -> (safetensors code, numpy dtype of the raw bytes). bf16 has no numpy dtype: kept as uint16.
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64"}
_RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
        "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _disk_error(path: Path, err: OSError) -> MonoscopeError:
    reason = err.strerror or str(err)
    return MonoscopeError(
        f"could not write {path}: {reason}. The disk is probably full or the folder is not writable; "
        f"free some space or choose another folder. Nothing committed was damaged: rerunning resumes "
        f"from the last committed shard.")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw stored values -> float32 (bf16 is the top half of a float32, so a shift is exact)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def _is_finite(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # exponent bits all ones = inf or nan
        return (raw & 0x7F80) != 0x7F80
    return np.isfinite(raw)


def _tensor_to_raw(x: Any, dtype: str) -> np.ndarray:
    """Any tensor/array -> a private numpy copy holding the store dtype's raw bytes."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=_TORCH[dtype])
    if dtype == "bfloat16":
        return t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
    return t.contiguous().numpy().copy()


def _write_safetensors(path: Path, arrays: dict[str, tuple[str, np.ndarray]]) -> tuple[str, int]:
    """Write ``{name: (code, array)}`` as a safetensors file; return (sha256, size), hashed while writing.

    Tensors are laid out widest item first and the header is padded to 8 bytes, so every tensor is
    aligned for memory mapping.
    """
    names = sorted(arrays, key=lambda k: (-arrays[k][1].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
    offset = 0
    for name in names:
        code, arr = arrays[name]
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as fh:
        for part in [struct.pack("<Q", len(blob)), blob] + [np.ascontiguousarray(arrays[n][1]).data for n in names]:
            fh.write(part)
            digest.update(part)
            size += part.nbytes if isinstance(part, memoryview) else len(part)
    return digest.hexdigest(), size


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header: (header dict, byte offset where the data starts)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            blob = fh.read(n)
            if len(blob) < n:
                raise ValueError("header cut short")
        return json.loads(blob), 8 + n
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise MonoscopeError(f"shard {path} is not a readable safetensors file ({err}); the store is corrupt: "
                             f"delete the folder and extract again") from err


class _Lock:
    """Exclusive advisory lock on ``folder/.lock``; released by the OS if the process dies."""

    def __init__(self, folder: Path):
        self.fh = None
        if fcntl is None:
            return
        self.fh = open(folder / ".lock", "a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise MonoscopeError(f"another process is writing the activation store {folder}; wait for it to "
                                 f"finish or stop it, or write to another folder") from None

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# ----------------------------------------------------------------------------------------------- writer

class _ManifestState:
    """Progress facts read from the manifest, shared by the writer and the reader."""

    manifest: dict

    @property
    def finished(self) -> bool:
        return bool(self.manifest["finished"])

    @property
    def contexts_done(self) -> int:
        return int(self.manifest["contexts_done"])


class StoreWriter(_ManifestState):
    """Append activations context by context; shards are committed atomically; reopening resumes.

    Typical use (the extractor)::

        w = StoreWriter.open(folder, model=..., model_fingerprint=..., hooks={"layers.6.resid_post": 640})
        for c in range(w.contexts_done, n_contexts):   # resume exactly where the last run stopped
            w.append(acts, token_ids, doc_ids, positions, context_ids)
        w.finish()

    ``context_ids`` are global context indices, ascending across calls; a context's rows must all come in
    one call. ``contexts_done`` counts committed contexts (buffered rows are lost in a crash and redone).
    """

    def __init__(self, folder, *, model: str, model_fingerprint: str, hooks: dict[str, int],
                 dtype: str = "float32", shard_rows: int = 65536, meta: dict | None = None):
        self.folder = Path(folder)
        _check_hooks(hooks)
        if dtype not in DTYPES:
            raise MonoscopeError(f"store dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if int(shard_rows) < 1:
            raise MonoscopeError(f"shard_rows must be a positive number of rows, got {shard_rows}")
        self.shard_rows = int(shard_rows)
        self.dtype = dtype
        self.hooks = {str(k): int(v) for k, v in hooks.items()}
        if self.folder.exists() and not self.folder.is_dir():
            raise MonoscopeError(f"{self.folder} is a file; an activation store needs a folder path")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _disk_error(self.folder, err) from err
        if not (self.folder / MANIFEST).exists():  # refuse before leaving a lock file in a stranger's folder
            strays = [p.name for p in self.folder.iterdir() if not _is_store_file(p.name)]
            if strays:
                raise MonoscopeError(f"{self.folder} is not empty and holds no activation store "
                                     f"(found {', '.join(sorted(strays)[:5])}); choose a new or empty folder")
        self._lock = _Lock(self.folder)
        try:
            self._open(model, model_fingerprint, meta)
        except BaseException:
            self._lock.release()
            raise
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in (*self.hooks, *COLUMNS)}
        self._buf_rows = 0
        self._next_context = self.contexts_done  # contexts appended so far (committed or buffered)

    @classmethod
    def open(cls, folder, *, model: str, model_fingerprint: str, hooks: dict[str, int], dtype: str = "float32",
             shard_rows: int = 65536, meta: dict | None = None) -> "StoreWriter":
        """Create the store in ``folder``, or resume the unfinished store already there.

        Resuming requires the same model, fingerprint, hooks and dtype (else MonoscopeError). ``meta`` is
        recorded at creation only; on resume the stored ``writer.meta`` is kept, so a caller whose other
        settings (corpus, context length...) must match compares them itself. ``shard_rows`` may change.
        """
        return cls(folder, model=model, model_fingerprint=model_fingerprint, hooks=hooks, dtype=dtype,
                   shard_rows=shard_rows, meta=meta)

    def _open(self, model: str, fingerprint: str, meta: dict | None) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            m = _load_manifest(self.folder)
            wanted = {"model": model, "model_fingerprint": fingerprint, "hooks": self.hooks, "dtype": self.dtype}
            diffs = [f"{k}: store has {m.get(k)!r}, asked for {v!r}" for k, v in wanted.items() if m.get(k) != v]
            if diffs:
                raise MonoscopeError(
                    f"the activation store in {self.folder} was written with different settings and cannot be "
                    f"extended ({'; '.join(diffs)}). Use a new folder, or delete this one to start over.")
            for entry in m["shards"]:
                _check_shard_file(self.folder, entry)
            self.manifest = m
        else:
            now = now_iso()
            self.manifest = {
                "format": FORMAT, "version": VERSION, "model": model, "model_fingerprint": fingerprint,
                "hooks": self.hooks, "dtype": self.dtype, "num_rows": 0, "contexts_done": 0, "finished": False,
                "created": now, "updated": now, "library_versions": library_versions(),
                "meta": dict(meta or {}), "shards": [],
            }
            self._write_manifest(self.manifest)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete shard files the manifest does not list and temp files: leftovers of a crash."""
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in self.folder.iterdir():
            orphan_shard = p.name.startswith("shard_") and p.name.endswith(".safetensors") and p.name not in listed
            if orphan_shard or (p.name.startswith(".") and p.name.endswith(".tmp")):
                try:
                    p.unlink()
                except OSError as err:
                    raise _disk_error(p, err) from err

    # -- state

    @property
    def rows_done(self) -> int:
        """Rows committed to disk (buffered rows not included; see ``rows_buffered``)."""
        return int(self.manifest["num_rows"])

    @property
    def rows_buffered(self) -> int:
        return self._buf_rows

    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    # -- writing
    def append(self, acts: dict[str, Any], token_ids, doc_ids, positions, context_ids,
               *, contexts_end: int | None = None) -> None:
        """Buffer the rows of whole contexts; commit a shard whenever ``shard_rows`` rows are buffered.

        ``contexts_end`` (default ``max(context_ids) + 1``) is the index after the last context this call
        covers; pass it when trailing contexts produced no rows, so that resume skips them too.
        """
        if self.finished:
            raise MonoscopeError(f"the activation store in {self.folder} is finished; it cannot take more rows "
                                 f"(use a new folder to extract more)")
        missing, extra = set(self.hooks) - set(acts), set(acts) - set(self.hooks)
        if missing or extra:
            raise MonoscopeError(f"append() needs exactly the store's hooks {sorted(self.hooks)}; "
                                 f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        raw = {h: _tensor_to_raw(acts[h], self.dtype) for h in self.hooks}
        n = None
        for h, a in raw.items():
            if a.ndim != 2 or a.shape[1] != self.hooks[h]:
                raise MonoscopeError(f"activations for hook {h!r} have shape {tuple(a.shape)}; "
                                     f"expected [rows, {self.hooks[h]}]")
            if n is not None and a.shape[0] != n:
                raise MonoscopeError(f"hooks have different row counts ({n} vs {a.shape[0]} for {h!r}); "
                                     f"every hook must get the same rows")
            n = a.shape[0]
        cols = {}
        for name, value in zip(COLUMNS, (token_ids, doc_ids, positions, context_ids)):
            v = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value)
            if v.shape != (n,):
                raise MonoscopeError(f"{name} has shape {tuple(v.shape)}; expected [{n}] (one per row)")
            cols[name] = v.astype(COLUMNS[name])
        ctx = cols["context_ids"]
        if n and (np.any(np.diff(ctx) < 0) or ctx[0] < self._next_context):
            raise MonoscopeError(
                f"context_ids must ascend across append() calls and start at or after {self._next_context} "
                f"(contexts already appended); got {int(ctx.min())}..{int(ctx.max())}. Resume extraction at "
                f"writer.contexts_done and append each context once, whole.")
        end = int(ctx[-1]) + 1 if n else self._next_context
        if contexts_end is not None:
            if int(contexts_end) < end:
                raise MonoscopeError(f"contexts_end={contexts_end} is before the last appended context ({end - 1})")
            end = int(contexts_end)
        for k, a in {**raw, **cols}.items():
            self._buf[k].append(a)
        self._buf_rows += n
        self._next_context = end
        self._flush(final=False)

    def finish(self, extra_meta: dict | None = None) -> None:
        """Commit the last partial shard and mark the store finished (``extra_meta`` is merged into meta)."""
        if self.finished:
            self.close()
            return
        self._flush(final=True)
        m = dict(self.manifest)
        m["meta"] = {**m["meta"], **(extra_meta or {})}
        m["contexts_done"] = self._next_context
        m["finished"] = True
        m["updated"] = now_iso()
        self._write_manifest(m)
        self.manifest = m
        self.close()

    def close(self) -> None:
        """Release the lock without finishing (buffered rows are dropped; committed shards stay)."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self, final: bool) -> None:
        while self._buf_rows >= self.shard_rows or (final and self._buf_rows > 0):
            data = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in self._buf.items()}
            n = self._buf_rows
            cut = n if n <= self.shard_rows else _context_cut(data["context_ids"], self.shard_rows)
            ctx_end = self._next_context if cut == n else int(data["context_ids"][cut])
            self._commit_shard({k: a[:cut] for k, a in data.items()}, ctx_end)
            # state changes only after the commit succeeded, so a failed write can simply be retried
            self._buf = {k: [a[cut:]] if cut < n else [] for k, a in data.items()}
            self._buf_rows = n - cut

    def _commit_shard(self, data: dict[str, np.ndarray], ctx_end: int) -> None:
        m = dict(self.manifest)
        name = f"shard_{len(m['shards']):05d}.safetensors"
        path = self.folder / name
        arrays = {k: (_CODES[self.dtype if k in self.hooks else COLUMNS[k]], a) for k, a in data.items()}
        try:
            with atomic_path(path) as tmp:
                sha, size = _write_safetensors(tmp, arrays)
        except OSError as err:
            raise _disk_error(path, err) from err
        rows = len(data["context_ids"])
        entry = {"file": name, "rows": rows, "contexts": [int(data["context_ids"][0]), ctx_end],
                 "sha256": sha, "bytes": size}
        m["shards"] = [*m["shards"], entry]
        m["num_rows"] = m["num_rows"] + rows
        m["contexts_done"] = ctx_end
        m["updated"] = now_iso()
        self._write_manifest(m)
        self.manifest = m

    def _write_manifest(self, m: dict) -> None:
        try:
            write_json(self.folder / MANIFEST, m)
        except OSError as err:
            raise _disk_error(self.folder / MANIFEST, err) from err


def _context_cut(ctx: np.ndarray, limit: int) -> int:
    """The largest context boundary <= limit (or the first one after it if one context is larger)."""
    bounds = np.append(np.flatnonzero(ctx[1:] != ctx[:-1]) + 1, len(ctx))
    below = bounds[bounds <= limit]
    return int(below[-1]) if len(below) else int(bounds[0])


def _check_hooks(hooks: dict[str, int]) -> None:
    if not isinstance(hooks, dict) or not hooks:
        raise MonoscopeError("hooks must be a non-empty dict {hook name: width d}, e.g. {'layers.6.resid_post': 640}")
    for name, d in hooks.items():
        if name in COLUMNS or name == "__metadata__":
            raise MonoscopeError(f"{name!r} is reserved for a store column; name hooks like 'layers.6.resid_post'")
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
            raise MonoscopeError(f"hook {name!r} has width {d!r}; widths must be positive integers")


def _is_store_file(name: str) -> bool:
    return name in (MANIFEST, ".lock") or name.startswith("shard_") or (name.startswith(".") and name.endswith(".tmp"))


def _load_manifest(folder: Path) -> dict:
    """Read and validate ``folder/manifest.json``; every defect is one MonoscopeError line with its fix."""
    path = folder / MANIFEST
    if not path.exists():
        raise MonoscopeError(f"{folder} holds no activation store (no {MANIFEST}); extract one first with "
                             f"`monoscope extract`, or check the path")
    try:
        m = read_json(path)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MonoscopeError(f"{path} is not readable JSON ({err}); the store is corrupt: "
                             f"{_REEXTRACT.format(folder=folder)}") from None
    found = m.get("format") if isinstance(m, dict) else None
    if found != FORMAT:
        raise MonoscopeError(f"{path} is not an activation store manifest (format {found!r}, expected {FORMAT!r}); "
                             f"point at a folder written by `monoscope extract`")
    version = m.get("version", 0)
    if not _is_count(version):
        raise MonoscopeError(f"{path}: field 'version' is {version!r}, expected an integer; "
                             f"{_REEXTRACT.format(folder=folder)}")
    if version > VERSION:
        raise MonoscopeError(f"{path} has store format version {version}; this monoscope reads up to "
                             f"version {VERSION}: upgrade monoscope")
    problem = _manifest_problem(m)
    if problem:
        raise MonoscopeError(f"{path}: {problem}; the manifest was hand-edited or cut short: "
                             f"{_REEXTRACT.format(folder=folder)}")
    m.setdefault("meta", {})
    return m


_REEXTRACT = "re-extract the store (delete {folder} and run `monoscope extract` again)"

# manifest field -> (check, what a valid value looks like)
_FIELDS = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "model_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "hooks": (lambda v: isinstance(v, dict) and bool(v), "a non-empty object {hook name: width}"),
    "num_rows": (lambda v: _is_count(v), "a non-negative integer"),
    "contexts_done": (lambda v: _is_count(v), "a non-negative integer"),
    "finished": (lambda v: isinstance(v, bool), "true or false"),
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "shards": (lambda v: isinstance(v, list), "a list of shard entries"),
}
_OPTIONAL = {"meta"}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with a parsed manifest (types and row totals), or None when it is well formed."""
    for key, (ok, want) in _FIELDS.items():
        if key not in m:
            if key in _OPTIONAL:
                continue
            return f"field {key!r} is missing"
        if not ok(m[key]):
            return f"field {key!r} is {_short(m[key])}, expected {want}"
    try:
        _check_hooks(m["hooks"])
    except MonoscopeError as err:
        return f"field 'hooks' is invalid ({err})"
    seen: set[str] = set()
    for i, entry in enumerate(m["shards"]):
        problem = _shard_entry_problem(entry)
        if problem is None and entry["file"] in seen:
            problem = "repeats a file listed before it"
        if problem:
            return f"shard entry {i} {problem}"
        seen.add(entry["file"])
    total = sum(e["rows"] for e in m["shards"])
    if total != m["num_rows"]:
        return f"'num_rows' is {m['num_rows']} but the shards hold {total} rows"
    return None


def _shard_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is {_short(entry)}, expected an object with file, rows, bytes and sha256"
    name = entry.get("file")
    if not (isinstance(name, str) and name.startswith("shard_") and name.endswith(".safetensors")
            and Path(name).name == name):
        return f"has file {_short(name)}, expected a shard file name inside the store such as 'shard_00000.safetensors'"
    for key in ("rows", "bytes"):
        if not _is_count(entry.get(key)) or entry[key] == 0:
            return f"({name}) has {key} {_short(entry.get(key))}, expected a positive integer"
    if not isinstance(entry.get("sha256"), str):
        return f"({name}) has sha256 {_short(entry.get('sha256'))}, expected a hex string"
    return None


def _short(v: Any) -> str:
    text = "absent" if v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_shard_file(folder: Path, entry: dict) -> Path:
    """Stat one committed shard: raise one line if it is missing or not the size the manifest records."""
    f = folder / entry["file"]
    if not f.is_file():
        raise MonoscopeError(f"shard {f} listed in the manifest is missing; the store is incomplete: "
                             f"restore the file or extract the store again")
    size = f.stat().st_size
    if size != entry["bytes"]:
        raise MonoscopeError(f"shard {f} is {size} bytes but the manifest says {entry['bytes']}: "
                             f"truncated or replaced; extract the store again")
    return f


# ----------------------------------------------------------------------------------------------- reader

class ActivationStore(_ManifestState):
    """Read a store: random access by row, a shuffled bounded-memory stream, in-order iteration."""

    def __init__(self, folder, *, allow_unfinished: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MonoscopeError(f"activation store folder {self.folder} does not exist")
        self.manifest = _load_manifest(self.folder)
        if not self.manifest["finished"] and not allow_unfinished:
            raise MonoscopeError(f"the activation store in {self.folder} is unfinished "
                                 f"({self.manifest['num_rows']} rows so far); rerun the extraction to complete it, "
                                 f"or pass allow_unfinished=True to read what is committed")
        self.hooks: dict[str, int] = dict(self.manifest["hooks"])
        self.dtype: str = self.manifest["dtype"]
        self.model: str = self.manifest["model"]
        self.shards: list[dict] = self.manifest["shards"]
        rows = [s["rows"] for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)  # shard starts
        self.num_rows = int(self.offsets[-1])
        self._maps: dict[int, dict[str, np.memmap]] = {}
        self._stream_stats: dict[str, int] = {}
        for entry in self.shards:  # cheap check (stat only); verify() does the deep one
            _check_shard_file(self.folder, entry)

    # -- metadata
    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def size_bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}, rows={self.num_rows}, hooks={self.hooks}, dtype={self.dtype})"

    def hook(self, hook: str | None = None) -> str:
        """Resolve a hook name; it may be omitted when the store holds exactly one hook."""
        if hook is None:
            if len(self.hooks) == 1:
                return next(iter(self.hooks))
            raise MonoscopeError(f"this store holds several hooks ({', '.join(self.hooks)}); say which one")
        if hook not in self.hooks:
            raise MonoscopeError(f"this store has no hook {hook!r}; it holds: {', '.join(self.hooks)}")
        return hook

    def d(self, hook: str | None = None) -> int:
        return self.hooks[self.hook(hook)]

    # -- low level
    def _map(self, s: int, name: str) -> np.memmap:
        """Memory map tensor ``name`` of shard ``s`` (headers parsed once, maps cached)."""
        if s not in self._maps:
            path = self.folder / self.shards[s]["file"]
            header, start = _read_header(path)
            size = path.stat().st_size
            maps = {}
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dt = _RAW.get(info.get("dtype"))
                b, e = info.get("data_offsets", (0, -1))
                shape = tuple(info.get("shape", ()))
                bad = dt is None or not shape or shape[0] == 0 or start + e > size
                if bad or e - b != int(np.prod(shape)) * dt.itemsize:
                    raise MonoscopeError(f"shard {path}: tensor {key!r} has an invalid header entry {info}; "
                                         f"the store is corrupt: extract again")
                want = self._shape_of(key, self.shards[s]["rows"])
                if want is not None and shape != want:
                    raise MonoscopeError(f"shard {path}: tensor {key!r} has shape {list(shape)} but the manifest "
                                         f"implies {list(want)}; the manifest was hand-edited or the shard "
                                         f"replaced: extract the store again")
                maps[key] = np.memmap(path, dtype=dt, mode="r", offset=start + b, shape=shape)
            self._maps[s] = maps
        maps = self._maps[s]
        if name not in maps:
            raise MonoscopeError(f"shard {self.folder / self.shards[s]['file']} lacks tensor {name!r}; corrupt store")
        return maps[name]

    def _shape_of(self, name: str, rows: int) -> tuple | None:
        """The shape the manifest implies for tensor ``name`` of a shard with ``rows`` rows (None: unknown)."""
        if name in self.hooks:
            return (rows, self.hooks[name])
        return (rows,) if name in COLUMNS else None

    def _dtype_of(self, name: str) -> str:
        return self.dtype if name in self.hooks else COLUMNS[name]

    def _read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Raw values of rows [start, stop) of tensor ``name``, across shard boundaries (a fresh array)."""
        width = () if name in COLUMNS else (self.hooks[name],)
        out = np.empty((stop - start, *width), dtype=_RAW[_CODES[self._dtype_of(name)]])
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            a, b = pos - self.offsets[s], min(stop, self.offsets[s + 1]) - self.offsets[s]
            out[pos - start: pos - start + (b - a)] = self._map(s, name)[a:b]
            pos += b - a
            s += 1
        return out

    def _gather(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Raw values of arbitrary global rows, shard by shard with sorted local indices (sequential pages)."""
        out = np.empty((len(idx), self.hooks[name]), dtype=_RAW[_CODES[self.dtype]])
        if len(idx) == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        shard = np.searchsorted(self.offsets, sidx, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard)) + 1
        for grp in np.split(np.arange(len(idx)), cuts):
            s = int(shard[grp[0]])
            out[order[grp]] = self._map(s, name)[sidx[grp] - self.offsets[s]]
        return out

    # -- columns and random access
    def _column(self, name: str) -> np.ndarray:
        return self._read_range(name, 0, self.num_rows)

    def token_ids(self) -> np.ndarray:
        return self._column("token_ids")

    def doc_ids(self) -> np.ndarray:
        return self._column("doc_ids")

    def positions(self) -> np.ndarray:
        return self._column("positions")

    def context_ids(self) -> np.ndarray:
        return self._column("context_ids")

    def rows(self, indices, hook: str | None = None) -> torch.Tensor:
        """Rows at global indices (any order, repeats allowed) as float32 [len(indices), d]."""
        name = self.hook(hook)
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise MonoscopeError(f"row indices must lie in [0, {self.num_rows}); "
                                 f"got {int(idx.min())}..{int(idx.max())}")
        return torch.from_numpy(_to_float32(self._gather(name, idx), self.dtype))

    def iter_rows(self, hook: str | None = None, batch_size: int = 4096, *, start: int = 0,
                  stop: int | None = None, device="cpu") -> Iterator[torch.Tensor]:
        """Rows [start, stop) in store order as float32 batches (the last may be smaller)."""
        name = self.hook(hook)
        stop = self.num_rows if stop is None else min(int(stop), self.num_rows)
        if batch_size < 1:
            raise MonoscopeError(f"batch_size must be positive, got {batch_size}")
        for a in range(int(start), stop, batch_size):
            raw = self._read_range(name, a, min(a + batch_size, stop))
            yield torch.from_numpy(_to_float32(raw, self.dtype)).to(device)

    # -- shuffled stream
    def batches(self, hook: str | None = None, batch_size: int = 4096, *, shuffle: bool = True, seed: int = 0,
                epoch: int = 0, buffer_rows: int = 262144, rank: int = 0, world_size: int = 1,
                drop_last: bool = False, start_batch: int = 0, device="cpu",
                with_indices: bool = False) -> Iterator[torch.Tensor]:
        """Float32 batches [B, d] covering this rank's share of the epoch exactly once.

        How it shuffles with bounded memory: every shard is cut into chunks of at most
        ``min(4096, buffer_rows // 8)`` rows; the chunk order is permuted by (seed, epoch); chunks are read
        (one contiguous memmap slice each) into a buffer of ``buffer_rows`` rows, and each batch is drawn
        at random from the buffer, which is refilled as it drains. Memory is the buffer plus one batch,
        independent of the store's size. The same (seed, epoch) gives the same batches.

        Ranks: the permuted chunk sequence is one virtual list of all rows; rank r reads rows
        [r*N/W, (r+1)*N/W) of it, so the ranks are disjoint and together cover the epoch. With
        ``drop_last=True`` every rank gets exactly N // W rows (up to W-1 rows skipped per epoch) and
        only full batches, so all ranks yield the same number of batches, as DDP needs.

        ``start_batch`` skips the first n batches without reading their data (only row indices are
        simulated), so resumed training sees exactly the batches it would have seen.
        ``with_indices`` yields (batch, global row indices) pairs instead.
        """
        name = self.hook(hook)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0 or seed < 0 or epoch < 0:
            raise MonoscopeError(f"bad stream settings: need batch_size >= 1, 0 <= rank < world_size, and "
                                 f"non-negative seed/epoch/start_batch (got batch_size={batch_size}, rank={rank}, "
                                 f"world_size={world_size}, seed={seed}, epoch={epoch}, start_batch={start_batch})")
        if shuffle and buffer_rows < batch_size:
            raise MonoscopeError(f"buffer_rows ({buffer_rows}) must be at least batch_size ({batch_size}), "
                                 f"ideally many times larger for a good shuffle")
        chunk = max(1, min(4096, buffer_rows // 8, buffer_rows - batch_size)) if shuffle else 1 << 62
        pieces = [(s, a, min(a + chunk, sh["rows"])) for s, sh in enumerate(self.shards)
                  for a in range(0, sh["rows"], chunk)]
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        n = self.num_rows
        lo, hi = (rank * (n // world_size), (rank + 1) * (n // world_size)) if drop_last else \
                 (rank * n // world_size, (rank + 1) * n // world_size)
        mine, pos = [], 0  # this rank's slice of the virtual row sequence
        for s, a, b in pieces:
            x, y = max(a, a + lo - pos), min(b, a + hi - pos)
            if x < y:
                mine.append((s, x, y))
            pos += b - a
        if shuffle:
            gen = self._shuffled(name, mine, batch_size, buffer_rows, np.random.default_rng([seed, epoch, rank, 1]),
                                 drop_last, start_batch, chunk)
        else:
            gen = self._ordered(name, mine, batch_size, drop_last, start_batch)
        return self._finalize(gen, device, with_indices)

    def _finalize(self, gen, device, with_indices):
        for raw, ids in gen:
            x = torch.from_numpy(_to_float32(raw, self.dtype))
            if str(device) != "cpu":
                x = x.to(device)
            yield (x, torch.from_numpy(ids)) if with_indices else x

    def _ordered(self, name, pieces, batch_size, drop_last, start_batch):
        """Unshuffled: the rank's rows in store order (one contiguous range)."""
        if not pieces:
            return
        lo = self.offsets[pieces[0][0]] + pieces[0][1]
        hi = self.offsets[pieces[-1][0]] + pieces[-1][2]
        for a in range(int(lo) + start_batch * batch_size, int(hi), batch_size):
            b = min(a + batch_size, int(hi))
            if b - a < batch_size and drop_last:
                return
            yield self._read_range(name, a, b), np.arange(a, b, dtype=np.int64)

    def _shuffled(self, name, pieces, batch_size, cap, rng, drop_last, start_batch, chunk):
        ids = np.empty(cap, dtype=np.int64)  # global row index of each buffered row
        data = None  # raw rows, allocated once skipping (start_batch) is over
        count, produced, k = 0, 0, 0
        self._stream_stats = {"buffer_rows": cap, "chunk_rows": chunk, "peak_rows": 0}
        while True:
            if data is None and produced >= start_batch:
                data = np.empty((cap, self.hooks[name]), dtype=_RAW[_CODES[self.dtype]])
                data[:count] = self._gather(name, ids[:count])
            while k < len(pieces) and count + (pieces[k][2] - pieces[k][1]) <= cap:
                s, a, b = pieces[k]
                ids[count:count + b - a] = self.offsets[s] + np.arange(a, b)
                if data is not None:
                    data[count:count + b - a] = self._map(s, name)[a:b]
                count += b - a
                k += 1
            self._stream_stats["peak_rows"] = max(self._stream_stats["peak_rows"], count)
            if count == 0 or (k == len(pieces) and count < batch_size and drop_last):
                return
            b = min(batch_size, count)  # smaller only for the last batch of the epoch
            sel = rng.choice(count, b, replace=False)
            out_ids = ids[sel]
            out = data[sel] if data is not None else None
            # remove the drawn rows: move the undrawn rows of the tail into the holes
            tail = count - b
            in_tail = sel >= tail
            keep = np.ones(b, dtype=bool)
            keep[sel[in_tail] - tail] = False
            holes, movers = sel[~in_tail], tail + np.flatnonzero(keep)
            ids[holes] = ids[movers]
            if data is not None:
                data[holes] = data[movers]
            count = tail
            produced += 1
            if out is not None:
                yield out, out_ids

    # -- checks and summary
    def verify(self) -> None:
        """Recompute every shard's sha256 and check its tensors' shapes; raise naming the first bad shard."""
        for s, sh in enumerate(self.shards):
            f = _check_shard_file(self.folder, sh)
            if sha256_file(f) != sh["sha256"]:
                raise MonoscopeError(f"shard {f} is corrupt (sha256 differs from the manifest); "
                                     f"extract the store again")
            self._maps.pop(s, None)
            for name in (*self.hooks, *COLUMNS):
                shape = self._map(s, name).shape
                want = (sh["rows"], self.hooks[name]) if name in self.hooks else (sh["rows"],)
                code = _RAW[_CODES[self._dtype_of(name)]]
                if shape != want or self._map(s, name).dtype != code:
                    raise MonoscopeError(f"shard {f}: tensor {name!r} is {self._map(s, name).dtype}{list(shape)}, "
                                         f"expected {code}{list(want)}; extract the store again")

    def check_finite(self, hook: str | None = None, chunk_rows: int = 65536) -> None:
        """Stream the stored values and raise at the first NaN/inf, naming hook, shard and row.

        ``hook=None`` checks every hook.
        """
        names = [self.hook(hook)] if hook is not None else list(self.hooks)
        for name in names:
            for s, sh in enumerate(self.shards):
                mm = self._map(s, name)
                for a in range(0, sh["rows"], chunk_rows):
                    bad = ~_is_finite(np.asarray(mm[a:a + chunk_rows]), self.dtype).all(axis=1)
                    if bad.any():
                        r = a + int(np.argmax(bad))
                        cause = (f"the model overflowed in {self.dtype}; extract again in float32 (model and store)"
                                 if self.dtype != "float32" else "the model itself produced them (or the file was "
                                 "altered); check the model's weights and the text of that context")
                        raise MonoscopeError(
                            f"hook {name!r} has NaN/inf activations: first in shard {self.folder / sh['file']} "
                            f"at row {r} (global row {int(self.offsets[s]) + r}); {cause}, or skip these contexts")

    def sample_rows(self, hook: str, n: int, seed: int) -> torch.Tensor:
        """A fixed random sample of n rows (the same for a seed on every process), read in order."""
        n = min(n, self.num_rows)
        idx = np.sort(np.random.default_rng([seed, 7]).choice(self.num_rows, n, replace=False))
        return self.rows(idx, hook)

    def provenance(self, relative_to: Path) -> dict:
        """What an SAE trained on this store records about it (the folder relative to the SAE's)."""
        import os

        return {"folder": os.path.relpath(self.folder.resolve(), Path(relative_to).resolve()),
                "input_hash": self.meta.get("input_hash"), "model": self.model,
                "model_fingerprint": self.model_fingerprint, "rows": self.num_rows}

    def content_hash(self) -> str:
        """The store's content identity: its extraction input hash, its hooks and the checksums of its shards
        (what an SAE trained on it, or an evaluation made on it, records)."""
        from monoscope.config import config_hash

        return config_hash(self.meta.get("input_hash"), sorted(self.hooks), [s.get("sha256") for s in self.shards])

    def describe(self) -> str:
        """Human summary for `monoscope info DIR`."""
        m = self.manifest
        lines = [
            f"activation store  {self.folder}",
            f"model             {m['model']}  (fingerprint {str(m['model_fingerprint'])[:16]})",
            "hooks             " + ", ".join(f"{h} (d={d})" for h, d in self.hooks.items()),
            f"dtype             {self.dtype}",
            f"rows              {self.num_rows:,} in {self.num_shards} shard(s), "
            f"{_human_bytes(self.size_bytes)} on disk",
            f"contexts          {self.contexts_done:,}",
            f"finished          {'yes' if self.finished else 'no (extraction can resume)'}",
            f"created/updated   {m.get('created')} / {m.get('updated')}",
        ]
        for k, v in self.meta.items():
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            lines.append(f"meta.{k:<12} {text[:200]}")
        return "\n".join(lines)
