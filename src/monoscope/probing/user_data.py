"""A user's labelled file wherever a probing-dataset name goes (`monoscope probe`, `specificity`, `run`).

**Name or file.** A dataset argument is a *file* when it ends in ``.csv``, ``.jsonl`` or ``.parquet``
(optionally followed by ``:CLASS``) or contains a path separator (``data/labels``); anything else is a
built-in name (``monoscope datasets``).

**One row, one example.** The columns are chosen by the fields of ``FileColumns``, which are flags of every
command that takes datasets: ``--text-column`` (default ``text``), ``--label-column`` (default ``label``),
``--group-column`` (rows sharing a value stay on one side of the train/test split; default: every row its
own group), ``--token-column`` (token-level: the token to read, 0 = first token after BOS) and
``--span-columns START END`` (token-level: a character span [start, end) of the text per row; ``max_span``
maxes over its tokens, ``--file-aggregation token`` reads its first token).

**Classes.** Two label values give one dataset named after the file, label 1 = the later value (1 over 0,
true over false, else the later in sort order). More values give one one-vs-rest dataset per class, named
``<stem>:<class>``. ``FILE:CLASS`` takes only that class as label 1 against every other row.

**Dropped vs refused.** Rows with an empty text, no label, or no token index / span / group value are
dropped and counted (``monoscope datasets --check FILE`` prints the counts). Everything else that does
not fit (a missing file, an unknown column, one class, an empty file, a malformed JSONL line, a span
outside its text, ...) is a MonoscopeError naming the file and the row.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from monoscope.corpus import jsonl_objects
from monoscope.errors import MonoscopeError
from monoscope.probing.datasets import AGGREGATIONS, MIN_PER_CLASS, ProbingDataset, balanced_subsample, \
    list_datasets, load_dataset

FILE_SUFFIXES = (".csv", ".jsonl", ".parquet")
DATASET_HELP = ("probing datasets: built-in names (see `monoscope datasets`) or labelled files; a name ending in "
                ".csv/.jsonl/.parquet (optionally FILE:CLASS for one class vs the rest) or containing '/' is a file")
MEANING = {"mean": "the mean over the text's tokens", "last": "the text's last token",
           "max_span": "the maximum over the tokens of the row's character span",
           "token": "one token per row (its token index, or the first token of its span)"}


@dataclass(kw_only=True)
class FileColumns:
    """How to read a labelled dataset file: the same fields (and flags) on probe, specificity, datasets and run."""

    text_column: str = field(default="text", metadata={"help": "dataset files: the column of the texts"})
    label_column: str = field(default="label", metadata={
        "help": "dataset files: the column of the labels; two values give one dataset, more give one per class "
                "(one-vs-rest); FILE:CLASS takes one class vs the rest"})
    group_column: str = field(default="", metadata={
        "help": "dataset files: rows with the same value here stay on one side of the train/test split "
                "(default: none, every row its own group)"})
    token_column: str = field(default="", metadata={
        "help": "dataset files, token-level labels: the column of the token index to read, 0 = first token after "
                "BOS (default: none)"})
    span_columns: tuple[str, ...] = field(default=(), metadata={
        "help": "dataset files, token-level labels: START END columns of a character span [start, end) per row "
                "(default: none)"})
    file_aggregation: str = field(default="", metadata={
        "help": f"dataset files: how one example becomes one vector, one of {', '.join(AGGREGATIONS)} (default: "
                "token with --token-column, max_span with --span-columns, else mean)"})

    @classmethod
    def of(cls, config) -> "FileColumns":
        """The column settings of any config dataclass that has these fields."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# ---------------------------------------------------------------------------------------------------
# Names and files
# ---------------------------------------------------------------------------------------------------

def parse_file_name(name: str) -> tuple[Path, str | None] | None:
    """(path, class or None) when ``name`` names a file (the rule in the module docstring), else None."""
    head, sep, only = name.rpartition(":")
    if sep and head.lower().endswith(FILE_SUFFIXES):
        return Path(head), only
    if name.lower().endswith(FILE_SUFFIXES) or "/" in name or os.sep in name:
        return Path(name), None
    return None


def resolve_datasets(names, columns: FileColumns | None = None, max_examples: int = 4000,
                     seed: int = 0) -> list[ProbingDataset]:
    """Every dataset the names give, balanced-subsampled to at most ``max_examples`` each: built-in names
    through ``load_dataset``, files through ``read_labelled_file`` (a file of many classes gives one each)."""
    if max_examples < 2 * MIN_PER_CLASS:
        raise MonoscopeError(f"max_examples must be at least {2 * MIN_PER_CLASS}, got {max_examples}")
    out: dict[str, ProbingDataset] = {}
    for name in dict.fromkeys(names):
        parsed = parse_file_name(name)
        if parsed is None:
            found = [load_dataset(name, max_examples, seed)]
        else:
            found = [balanced_subsample(ds, max_examples, seed)
                     for ds in read_labelled_file(parsed[0], columns).datasets(parsed[1])]
        for ds in found:
            if ds.name in out and out[ds.name].fingerprint() != ds.fingerprint():
                raise MonoscopeError(f"two different datasets are both named {ds.name!r} (from {name!r} and an "
                                     "earlier name); rename one of the files")
            out[ds.name] = ds
    return list(out.values())


def check_dataset_names(names, columns: FileColumns | None = None) -> None:
    """Fail now, before any model work, on an unknown built-in name or a file that does not read."""
    known: set[str] | None = None
    for name in names:
        parsed = parse_file_name(name)
        if parsed is not None:
            read_labelled_file(parsed[0], columns).datasets(parsed[1])
            continue
        known = known if known is not None else set(list_datasets(available_only=False))
        if name not in known:
            raise MonoscopeError(f"unknown probing dataset {name!r}; see `monoscope datasets` for valid names, or "
                                 f"give a labelled file ({', '.join(FILE_SUFFIXES)})")


def dataset_files(names) -> dict[str, Path]:
    """The files among ``names`` (name -> path), for content keys of the stages that read them."""
    return {name: parsed[0] for name in names if (parsed := parse_file_name(name)) is not None}


# ---------------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------------

@dataclass
class LabelledFile:
    """The usable rows of one file (labels as text, in the file's order) and the rows dropped, by reason."""

    path: Path
    unit: str                        # "line" (JSONL) or "row" (CSV / Parquet: 1 = first row after the header)
    rows: list[int]                  # each kept example's line / row number
    texts: list[str]
    labels: np.ndarray               # label values as text
    aggregation: str
    columns: dict[str, str]          # role -> column used
    spans: list[tuple[int, int]] | None = None
    token_index: list[int] | None = None
    groups: np.ndarray | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    n_read: int = 0

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()), key=_label_order)

    def datasets(self, only: str | None = None) -> list[ProbingDataset]:
        """Two classes: one dataset (label 1 = the later class); more: one per class; ``only``: that class."""
        classes = self.classes
        if only is not None:
            if _label_text(only) not in classes:
                raise MonoscopeError(f"{str(self.path)!r} has no class {only!r} in column "
                                     f"{self.columns['label']!r}; its classes are {classes}")
            targets = [_label_text(only)]
        else:
            targets = classes[1:] if len(classes) == 2 else classes
        base = dict(category="user", texts=self.texts, aggregation=self.aggregation, spans=self.spans,
                    token_index=self.token_index, groups=self.groups)
        out = []
        for c in targets:
            binary = len(classes) == 2 and c == classes[1]
            rest = "" if len(classes) == 2 else f" vs. the other {len(classes) - 1} classes"
            out.append(ProbingDataset(self.stem if binary else f"{self.stem}:{c}", labels=self.labels == c,
                                      positive=c, description=f"{self.columns['label']} == {c!r}{rest} "
                                      f"({self.path.name})", **base))
        return out

    def summary(self, only: str | None = None) -> str:
        """What probing reads from this file: rows kept and dropped, columns, aggregation, classes, examples."""
        datasets = self.datasets(only)
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items())
        counts = {c: int((self.labels == c).sum()) for c in self.classes}
        lines = [f"{self.path}: {self.n_read} {self.unit}s read, {len(self.texts)} examples kept, "
                 f"{sum(self.dropped.values())} dropped" + (f" ({dropped})" if dropped else ""),
                 "columns: " + ", ".join(f"{role} {col!r}" for role, col in self.columns.items()),
                 f"aggregation: {self.aggregation} ({MEANING[self.aggregation]})",
                 "classes: " + ", ".join(f"{c!r} {n}" for c, n in counts.items())]
        for ds in datasets:
            pos = int(ds.labels.sum())
            lines.append(f"dataset {ds.name}: label 1 = {ds.positive!r}, {pos} positive / {len(ds) - pos} negative "
                         f"(a probe keeps {min(pos, len(ds) - pos)} of each class, at most --max-examples in all)")
        lines.append("example rows:")
        firsts = {}
        for i, label in enumerate(self.labels.tolist()):
            firsts.setdefault(label, i)
        for i in sorted(firsts.values())[:2]:
            lines.append(f"  {self.unit} {self.rows[i]}: label {self.labels[i]!r}, {self._target(i)}text "
                         f"{_shorten(self.texts[i])!r}")
        return "\n".join(lines)

    def _target(self, i: int) -> str:
        if self.token_index is not None:
            return f"token {self.token_index[i]}, "
        if self.spans is not None:
            s, e = self.spans[i]
            return f"span ({s}, {e}) = {self.texts[i][s:e]!r}, "
        return ""


def from_file(path: str | os.PathLike, text_col: str = "text", label_col: str = "label", *,
              token_col: str | None = None, span_cols: tuple[str, str] | None = None,
              group_col: str | None = None, aggregation: str | None = None,
              positive: str | None = None) -> list[ProbingDataset]:
    """Probing datasets from a user's .csv, .jsonl or .parquet file with one example per row (see the module
    docstring); ``positive`` takes that class as label 1 against all the other rows."""
    columns = FileColumns(text_column=text_col, label_column=label_col, group_column=group_col or "",
                          token_column=token_col or "", span_columns=tuple(span_cols or ()),
                          file_aggregation=aggregation or "")
    return read_labelled_file(path, columns).datasets(positive)


def read_labelled_file(path: str | os.PathLike, columns: FileColumns | None = None) -> LabelledFile:
    """Read ``path`` with ``columns``: usable rows kept, the others dropped and counted; bad input refused."""
    columns = columns or FileColumns()
    path = Path(path)
    frame, unit = _read_table(path)
    where = f"dataset file {str(path)!r}"
    roles = _roles(columns, where)
    missing = [c for c in roles.values() if c not in frame.columns]
    if missing:
        raise MonoscopeError(f"{where} has no column(s) {missing}; its columns are {list(frame.columns)}. Name the "
                             "right ones with --text-column/--label-column/--group-column/--token-column/"
                             "--span-columns")
    n_read = len(frame)
    if n_read == 0:
        raise MonoscopeError(f"{where} has a header but no rows; give one example per row")
    frame, dropped = _drop_unusable(frame, roles)
    if frame.empty:
        raise MonoscopeError(f"{where}: all {n_read} {unit}s were dropped ("
                             + ", ".join(f"{n} {why}" for why, n in dropped.items()) + "); fix the columns")
    texts = frame[roles["text"]].map(str).tolist()
    rows = [int(r) for r in frame.index]
    out = LabelledFile(path, unit, rows, texts, frame[roles["label"]].map(_label_text).to_numpy(),
                       _aggregation(columns, where), roles, dropped=dropped, n_read=n_read)
    if "token index" in roles:
        out.token_index = _int_column(frame, roles["token index"], where, unit)
        bad = next((i for i, t in enumerate(out.token_index) if t < 0), None)
        if bad is not None:
            raise MonoscopeError(f"{where} {unit} {rows[bad]}: token index {out.token_index[bad]} is negative; "
                                 "count tokens from 0 (the first token after BOS)")
    if "span start" in roles:
        out.spans = list(zip(_int_column(frame, roles["span start"], where, unit),
                             _int_column(frame, roles["span end"], where, unit)))
        for row, text, (s, e) in zip(rows, texts, out.spans):
            if not 0 <= s < e <= len(text):
                raise MonoscopeError(f"{where} {unit} {row}: span ({s}, {e}) lies outside its text of {len(text)} "
                                     "characters; spans are [start, end) with 0 <= start < end <= len(text)")
    if "group" in roles:
        out.groups = np.unique(frame[roles["group"]].map(str).to_numpy(), return_inverse=True)[1]
    if len(out.classes) < 2:
        raise MonoscopeError(f"{where} has a single class in column {roles['label']!r} (every label is "
                             f"{out.classes[0]!r}); a probe needs at least two label values")
    return out


def _roles(columns: FileColumns, where: str) -> dict[str, str]:
    """Role -> column name, for the columns this reading uses."""
    roles = {"text": columns.text_column, "label": columns.label_column}
    if columns.group_column:
        roles["group"] = columns.group_column
    if columns.token_column:
        roles["token index"] = columns.token_column
    if columns.span_columns:
        if len(columns.span_columns) != 2:
            raise MonoscopeError(f"{where}: span columns must be two names, START END; got "
                                 f"{list(columns.span_columns)}")
        roles["span start"], roles["span end"] = columns.span_columns
    return roles


def _aggregation(columns: FileColumns, where: str) -> str:
    """The aggregation asked for (or the default for the columns given), checked against those columns."""
    has_token, has_span = bool(columns.token_column), bool(columns.span_columns)
    agg = columns.file_aggregation or ("token" if has_token else "max_span" if has_span else "mean")
    if agg not in AGGREGATIONS:
        raise MonoscopeError(f"{where}: unknown aggregation {agg!r}; use one of {', '.join(AGGREGATIONS)}")
    if agg == "max_span" and not has_span:
        raise MonoscopeError(f"{where}: aggregation max_span needs a character span per row; give --span-columns "
                             "START END")
    if agg == "token" and not (has_token or has_span):
        raise MonoscopeError(f"{where}: aggregation token needs the token to read; give --token-column or "
                             "--span-columns START END")
    return agg


def _drop_unusable(frame, roles: dict[str, str]):
    """``frame`` without rows that lack a text, label, token index, span or group; and the counts by reason."""
    dropped: dict[str, int] = {}
    for role, column in roles.items():
        blank = frame[column].map(_missing).to_numpy(dtype=bool)
        if blank.any():
            reason = "empty text" if role == "text" else f"missing {role}"
            dropped[reason] = int(blank.sum())
            frame = frame[~blank]
    return frame, dropped


def _missing(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and not value.strip()


def _read_table(path: Path):
    """The file as a DataFrame indexed by line (JSONL) or row number (CSV / Parquet), and that unit's name."""
    import pandas as pd

    where = f"dataset file {str(path)!r}"
    if not path.is_file():
        raise MonoscopeError(f"{where} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                             + f"; give a {', '.join(FILE_SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise MonoscopeError(f"{where}: unsupported file type {suffix or '(none)'!r}; use {', '.join(FILE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MonoscopeError(f"{where} is empty; give a header row (CSV) or one JSON object per line (JSONL)")
    if suffix == ".jsonl":
        return _read_jsonl(path), "line"
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path, engine=_parquet_engine())
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise MonoscopeError(f"cannot read {where} ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             "give a UTF-8 CSV with a header row or a Parquet table") from None
    frame.index = range(1, len(frame) + 1)
    return frame, "row"


def _parquet_engine() -> str:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MonoscopeError("reading .parquet files needs the package pyarrow, which is not installed: "
                             "pip install pyarrow (or give a .csv or .jsonl file)") from None
    return "pyarrow"


def _read_jsonl(path: Path):
    import pandas as pd

    where = f"dataset file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MonoscopeError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    lines, records = [], []
    for number, record in jsonl_objects(text, where):
        lines.append(number)
        records.append(record)
    if not records:
        raise MonoscopeError(f"{where} holds no JSON objects; give one object per line")
    return pd.DataFrame.from_records(records, index=lines)


def _label_text(value) -> str:
    """Labels as strings, with 1/1.0/True and 0/0.0/False read alike."""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return {"true": "1", "false": "0"}.get(text.lower(), text)


def _label_order(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _int_column(frame, column: str, where: str, unit: str) -> list[int]:
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    bad = (values.isna() | (values % 1 != 0)).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MonoscopeError(f"{where} {unit} {frame.index[i]}: column {column!r} must hold whole numbers, "
                             f"found {frame[column].iloc[i]!r}")
    return values.astype(int).tolist()


def _shorten(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


__all__ = ["DATASET_HELP", "FILE_SUFFIXES", "FileColumns", "LabelledFile", "check_dataset_names", "dataset_files",
           "from_file", "parse_file_name", "read_labelled_file", "resolve_datasets"]
