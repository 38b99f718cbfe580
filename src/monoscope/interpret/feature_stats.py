"""The feature-statistics artifact and its one owning class, ``FeatureStats`` (writes, reads, validates, hashes).

    stats = FeatureStats("runs/stats")
    stats.n_features, stats.hook, stats.content_hash
    stats.arrays["density"]          # torch tensors, loaded on first use
    stats.record(12)                 # feature 12's line of contexts.jsonl (random access)
    stats.examples(12)               # its examples for automated interpretability
    stats.top_features(50)           # the 50 densest live features

Folder layout (F = number of features)::

    stats.json            sidecar: format, version, created, input_hash, n_features, kind ("sae_latents" or
                          "hook_units"), hook, config (the StatsConfig), store / sae / model identity,
                          library_versions, hist, timings, files ({name: {"bytes", "sha256"}} of the two
                          files below) and content_hash (sha256 over those files' names and hashes).
                          No absolute paths: the folder can be moved or copied.
    features.safetensors  dense arrays:
        count [F] int64, density [F], mean [F] (over all rows), mean_nonzero [F], max [F],
        hist [F, B] int64, hist_edges [B+1],
        top_rows / top_values [F, top_k]           (row -1 and value 0 where a feature fired less),
        interval_rows / interval_values [F, n_intervals, per_interval]   (-1 / 0 where empty),
        interval_edges [F, n_intervals+1],
        corr_features / corr_features_r [F, n_correlated], corr_neurons / corr_neurons_r (if asked),
        neighbours / neighbours_cos [F, n_correlated]  (with an SAE),
        logits_pos / logits_pos_values / logits_neg / logits_neg_values [F, n_logits] (with a model)
    contexts.jsonl        one JSON object per feature, line i = feature i:
        {"feature": i, "density": float, "max": float,
         "top": [EXAMPLE, ...],                                  (highest first)
         "intervals": [{"lo": float, "hi": float, "examples": [EXAMPLE, ...]}, ...],   (low to high)
         "logits": {"pos": [[token, value], ...], "neg": [[token, value], ...]}        (with a model)}
        EXAMPLE = {"row": int, "act": float, "context": int, "tokens": [str, ...],
                   "acts": [float | null, ...], "focus": int}
        ``tokens``/``acts`` cover the window (context_window tokens before and after the row, inside its
        context); ``focus`` is the index of the example's own token; a BOS that the store did not keep
        is shown as the tokenizer's BOS string with act null.

Index -1 / r NaN mark empty slots throughout. The sidecar is written last and removed first, so a folder
with a sidecar is a finished artifact; opening one checks the sidecar, the arrays' names and lengths and
the files' sizes (cheap), and ``verify()`` re-hashes the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from monoscope.artifacts import atomic_path, read_json, sha256_file, write_json
from monoscope.errors import MonoscopeError

if TYPE_CHECKING:
    import torch

    from monoscope.interpret.autointerp import FeatureExamples

FORMAT = "monoscope.feature_stats"
VERSION = 2
SIDECAR, ARRAYS, CONTEXTS = "stats.json", "features.safetensors", "contexts.jsonl"
FILES = (ARRAYS, CONTEXTS)
PER_FEATURE = ("count", "density", "mean", "mean_nonzero", "max", "hist", "top_rows", "top_values",
               "interval_rows", "interval_values", "interval_edges")
FIX = "rerun `monoscope stats` (with --force) to rebuild it"


def _damaged(path: Path, problem: str) -> MonoscopeError:
    return MonoscopeError(f"{path}: {problem}; {FIX}")


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _content_hash(files: dict[str, dict]) -> str:
    """sha256 over the data files' names and hashes (the sidecar itself is not part of the content)."""
    return hashlib.sha256(json.dumps({n: files[n]["sha256"] for n in FILES}, sort_keys=True).encode()).hexdigest()


class FeatureStats:
    """A finished feature-statistics folder, validated on opening (see the module docstring for the format)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.sidecar: dict = self._read_sidecar()
        self._check_files()
        self._check_arrays()

    # ------------------------------------------------------------------------------------- writing
    @classmethod
    def write(cls, folder: str | os.PathLike, sidecar: dict, arrays: dict[str, torch.Tensor],
              context_lines: Iterable[str]) -> FeatureStats:
        """Write an artifact (each file atomically, the sidecar last) and return it opened.

        ``sidecar`` gets format, version, n_features, files and content_hash added; ``context_lines`` are the
        lines of contexts.jsonl, newline-terminated, line i = feature i.
        """
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / SIDECAR).unlink(missing_ok=True)  # no sidecar while the data files are being replaced
        with atomic_path(out / ARRAYS) as tmp:
            save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp), metadata={"format": FORMAT})
        with atomic_path(out / CONTEXTS) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(context_lines)
        files = {name: _file_entry(out / name) for name in FILES}
        write_json(out / SIDECAR, {"format": FORMAT, "version": VERSION,
                                   "n_features": int(arrays["density"].shape[0]), **sidecar,
                                   "files": files, "content_hash": _content_hash(files)})
        return cls(out)

    # ------------------------------------------------------------------------------------- validation
    def _read_sidecar(self) -> dict:
        path = self.folder / SIDECAR
        if not path.exists():
            raise MonoscopeError(f"{self.folder} holds no feature statistics (no {SIDECAR}); "
                                 f"run `monoscope stats` first")
        try:
            side = read_json(path)
        except (OSError, ValueError) as exc:
            raise _damaged(path, f"not readable JSON ({exc})") from None
        if not isinstance(side, dict) or side.get("format") != FORMAT:
            raise _damaged(path, f"not a {FORMAT} sidecar")
        if side.get("version") != VERSION or not isinstance(side.get("files"), dict):
            raise _damaged(path, f"written by another monoscope version ({side.get('version')}, expected {VERSION})")
        if not isinstance(side.get("n_features"), int) or side["n_features"] < 0:
            raise _damaged(path, "n_features is missing or not a count")
        return side

    def _check_files(self) -> None:
        for name in FILES:
            path = self.folder / name
            if not path.exists():
                raise _damaged(path, "missing")
            want = (self.sidecar["files"].get(name) or {}).get("bytes")
            if path.stat().st_size != want:
                raise _damaged(path, f"{path.stat().st_size} bytes where the sidecar records {want} "
                                     f"(truncated or edited)")

    def _check_arrays(self) -> None:
        from safetensors import safe_open

        path = self.folder / ARRAYS
        try:
            with safe_open(str(path), "pt") as fh:
                shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - any failure to parse the header means a damaged file
            raise _damaged(path, f"not a readable safetensors file ({exc})") from None
        missing = [k for k in PER_FEATURE + ("hist_edges",) if k not in shapes]
        if missing:
            raise _damaged(path, f"lacks the arrays {', '.join(missing)}")
        wrong = [k for k, s in shapes.items() if k != "hist_edges" and (not s or s[0] != self.n_features)]
        if wrong:
            raise _damaged(path, f"arrays {', '.join(wrong)} do not have {self.n_features} rows")

    def verify(self) -> None:
        """Re-hash the data files and raise if they differ from what the sidecar records."""
        for name in FILES:
            if sha256_file(self.folder / name) != self.sidecar["files"][name].get("sha256"):
                raise _damaged(self.folder / name, "content differs from the hash in the sidecar (edited)")

    # ------------------------------------------------------------------------------------- metadata
    @property
    def n_features(self) -> int:
        return int(self.sidecar["n_features"])

    def __len__(self) -> int:
        return self.n_features

    @property
    def content_hash(self) -> str:
        return str(self.sidecar["content_hash"])

    @property
    def input_hash(self) -> str | None:
        return self.sidecar.get("input_hash")

    @property
    def kind(self) -> str:
        """``sae_latents`` or ``hook_units``."""
        return str(self.sidecar.get("kind") or "sae_latents")

    @property
    def model(self) -> str:
        store, model = self.sidecar.get("store") or {}, self.sidecar.get("model") or {}
        return str(store.get("model") or model.get("name") or "")

    @property
    def hook(self) -> str:
        return str(self.sidecar.get("hook") or "")

    @property
    def n_tokens(self) -> int | None:
        return (self.sidecar.get("store") or {}).get("num_rows")

    @property
    def config(self) -> dict:
        return dict(self.sidecar.get("config") or {})

    @property
    def neuron_hook(self) -> str:
        return str(self.config.get("correlate_with_neurons") or "")

    @cached_property
    def arrays(self) -> dict[str, torch.Tensor]:
        """The per-feature arrays of features.safetensors (torch tensors), loaded on first use."""
        from safetensors.torch import load_file

        return load_file(str(self.folder / ARRAYS))

    # ------------------------------------------------------------------------------------- records
    @cached_property
    def _offsets(self) -> list[int]:
        """Byte offset of every line of contexts.jsonl (one scan, then random access)."""
        offsets, pos = [], 0
        with open(self.folder / CONTEXTS, "rb") as fh:
            for line in fh:
                offsets.append(pos)
                pos += len(line)
        if len(offsets) != self.n_features:
            raise _damaged(self.folder / CONTEXTS, f"{len(offsets)} lines for {self.n_features} features")
        return offsets

    def _check_id(self, feature: int) -> int:
        if not 0 <= int(feature) < self.n_features:
            raise MonoscopeError(f"feature {feature} is out of range: {self.folder} has features "
                                 f"0..{self.n_features - 1}")
        return int(feature)

    def record(self, feature: int) -> dict:
        """Feature ``feature``'s line of contexts.jsonl."""
        return next(self.records([feature]))[1]

    def records(self, features: Iterable[int]) -> Iterator[tuple[int, dict]]:
        """(id, record) for each wanted feature in the order given, reading the file once."""
        ids = [self._check_id(f) for f in features]
        offsets = self._offsets
        with open(self.folder / CONTEXTS, "rb") as fh:
            for f in ids:
                fh.seek(offsets[f])
                try:
                    rec = json.loads(fh.readline())
                except ValueError:
                    raise _damaged(self.folder / CONTEXTS, f"line {f + 1} is not JSON") from None
                yield f, rec

    def top_features(self, n: int) -> list[int]:
        """The ``n`` live features that fire most often (highest density), densest first."""
        density = self.arrays["density"].float()
        return [int(i) for i in density.argsort(descending=True).tolist() if density[i] > 0][:n]

    def examples(self, feature: int, n_negatives: int = 20, seed: int = 0) -> FeatureExamples:
        """Top and interval examples of ``feature``, plus borrowed non-activating contexts.

        The artifact keeps no non-activating contexts, so ``negatives`` are top windows of other, randomly
        chosen features from contexts where this feature has no kept example, with activations assumed 0.
        For a sparse feature that is almost always right; for a dense one some may be activating.
        """
        from monoscope.interpret.autointerp import Example, FeatureExamples

        feature = self._check_id(feature)
        rec = self.record(feature)
        kept = rec.get("top", []) + [e for part in rec.get("intervals", []) for e in part.get("examples", [])]
        top = [_example(e) for e in rec.get("top", [])]
        intervals = [_example(e) for e in kept[len(top):]]
        own = {e.get("context") for e in kept}
        rng = random.Random(seed * 1_000_003 + feature)
        others = [f for f in range(self.n_features) if f != feature]
        rng.shuffle(others)
        negatives: list[Example] = []
        for _, other in self.records(others[: 4 * n_negatives]):
            if len(negatives) >= n_negatives:
                break
            candidates = [e for e in other.get("top", []) if e.get("context") not in own]
            if candidates:
                pick = rng.choice(candidates)
                own.add(pick.get("context"))
                negatives.append(Example(list(pick["tokens"]), [0.0] * len(pick["tokens"])))
        return FeatureExamples(feature, top, intervals, negatives)


def _example(e: dict):
    from monoscope.interpret.autointerp import Example

    return Example(list(e["tokens"]), [a if a is not None else 0.0 for a in e["acts"]])
