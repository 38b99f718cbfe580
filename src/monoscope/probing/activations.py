"""One activation vector per example of a probing dataset, for many hooks in one forward pass per batch.

Texts are tokenised without special tokens, BOS is prepended when the tokenizer has one (as the activation
store does), and batches are right-padded with an attention mask. Per example, the ``aggregation`` of its
dataset picks the content tokens (BOS and padding never count) and reduces them:

    last      the last token (after truncation to ``max_length``)
    mean      mean over the tokens, skipping the first ``skip_first`` (all tokens if the text is shorter)
    max_span  max over the tokens whose character offsets overlap the example's span
    token     the token at ``token_index`` (BOS excluded), or the first token overlapping the span

``encode`` (e.g. an SAE's encoder) maps the selected tokens' activations [tokens, d] to features
[tokens, m] before the reduction, so latents can be probed like neurons. Results are cached on disk per
(model, tokenizer, dataset content, hook, settings) as .npz files read without pickle, so a sweep over
k and ranking methods never re-runs the model.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from monoscope.artifacts import atomic_path
from monoscope.config import config_hash
from monoscope.errors import MonoscopeError
from monoscope.hookpoints import resolve, run_with_capture
from monoscope.probing.datasets import ProbingDataset
from monoscope.progress import progress_bar

CACHE_VERSION = 1
Encoder = Callable[[torch.Tensor], torch.Tensor]


def probe_activations(lm, dataset: ProbingDataset, hooks: list[str], batch_size: int = 16, max_length: int = 128,
                      skip_first: int = 4, encode: Encoder | Mapping[str, Encoder] | None = None,
                      encode_key: str | None = None, cache_dir: str | Path | None = None,
                      progress: bool | None = None) -> dict[str, np.ndarray]:
    """{hook: float32 array [n_examples, width]} for ``dataset`` on the loaded model ``lm``.

    ``encode`` is one callable for every hook or a {hook: callable} dict (hooks not in it stay raw);
    with a ``cache_dir`` it needs an ``encode_key`` naming it (e.g. the SAE's content hash).
    """
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise MonoscopeError("probe_activations needs at least one hook, e.g. layers.3.mlp_neurons")
    for hook in hooks:
        resolve(lm.model, hook)  # unknown names raise with the valid ones
    if batch_size < 1 or max_length < 2 or skip_first < 0:
        raise MonoscopeError(f"need batch_size >= 1, max_length >= 2, skip_first >= 0; got {batch_size}, "
                             f"{max_length}, {skip_first}")
    encoders = _encoders(encode, hooks)
    if encoders and cache_dir is not None and not encode_key:
        raise MonoscopeError(f"dataset {dataset.name!r}: caching encoded activations needs encode_key= "
                             "(a name for the encoder, e.g. the SAE's content hash), or pass cache_dir=None")

    paths: dict[str, Path] = {}
    results: dict[str, np.ndarray] = {}
    if cache_dir is not None:
        settings = dict(version=CACHE_VERSION, model=lm.fingerprint, tokenizer=_tokenizer_fingerprint(lm.tokenizer),
                        dataset=dataset.fingerprint(), max_length=max_length, skip_first=skip_first)
        for hook in hooks:
            key = config_hash(settings, hook, encode_key if hook in encoders else None)
            paths[hook] = Path(cache_dir) / f"{_safe(dataset.name)}.{hook}.{key}.npz"
            cached = _load(paths[hook], len(dataset))
            if cached is not None:
                results[hook] = cached
    todo = [h for h in hooks if h not in results]
    if todo:
        computed = _compute(lm, dataset, todo, batch_size, max_length, skip_first, encoders, progress)
        for hook, arr in computed.items():
            if hook in paths:
                meta = dict(model=lm.name, dataset=dataset.name, hook=hook, max_length=max_length,
                            skip_first=skip_first, encode_key=encode_key if hook in encoders else None)
                _save(paths[hook], arr, meta)
        results.update(computed)
    return {h: results[h] for h in hooks}


def token_selections(lm_tokenizer, dataset: ProbingDataset, max_length: int, skip_first: int = 4
                     ) -> tuple[list[list[int]], list[list[int]], str]:
    """Token ids per text (no special tokens, truncated to fit BOS + ids in ``max_length``), the content
    token positions each example aggregates over (0 = first token after BOS), and the reduction."""
    tok = lm_tokenizer
    has_bos = tok.bos_token_id is not None
    needs_offsets = dataset.spans is not None and dataset.aggregation in ("max_span", "token") and (
        dataset.aggregation == "max_span" or dataset.token_index is None)
    if needs_offsets and not getattr(tok, "is_fast", False):
        raise MonoscopeError(f"dataset {dataset.name!r} reads character spans, which needs a fast tokenizer "
                             "with offset mappings; give token_index instead of spans, or use a fast tokenizer")
    enc = tok(dataset.texts, add_special_tokens=False, truncation=True, max_length=max_length - int(has_bos),
              return_offsets_mapping=needs_offsets, return_attention_mask=False, verbose=False)
    ids = [list(x) for x in enc["input_ids"]]
    selections = []
    for i, toks in enumerate(ids):
        n = len(toks)
        where = f"dataset {dataset.name!r} example {i}"
        if n == 0:
            raise MonoscopeError(f"{where} tokenises to nothing; drop empty or whitespace-only texts")
        agg = dataset.aggregation
        if agg == "last":
            sel = [n - 1]
        elif agg == "mean":
            sel = list(range(skip_first if n > skip_first else 0, n))
        elif agg == "token" and dataset.token_index is not None:
            t = dataset.token_index[i]
            if t >= n:
                raise MonoscopeError(f"{where}: token_index {t} is past its {n} tokens (after truncation to "
                                     f"max_length={max_length}); raise max_length or fix the index")
            sel = [t]
        else:
            s, e = dataset.spans[i]
            sel = [j for j, (a, b) in enumerate(enc["offset_mapping"][i]) if a < e and b > s]
            if not sel:
                raise MonoscopeError(f"{where}: no token overlaps the span ({s}, {e}) within the first "
                                     f"{max_length} tokens; raise max_length or move the span")
            if agg == "token":
                sel = sel[:1]
        selections.append(sel)
    return ids, selections, ("max" if dataset.aggregation == "max_span" else "mean")


def _compute(lm, dataset, hooks, batch_size, max_length, skip_first, encoders, progress) -> dict[str, np.ndarray]:
    tok = lm.tokenizer
    ids, selections, reduce = token_selections(tok, dataset, max_length, skip_first)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))
    order = np.argsort([-len(x) for x in ids], kind="stable")  # similar lengths together: little padding
    out: dict[str, np.ndarray] = {}
    device = lm.device
    bar = progress_bar(total=len(ids), enable=progress, desc=f"activations {dataset.name}", unit="ex")
    with torch.inference_mode(), bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = [bos + ids[i] for i in batch]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            acts = run_with_capture(lm.model, hooks, input_ids.to(device), attention_mask=mask.to(device), stop=True)
            for hook in hooks:
                vecs = _aggregate(acts[hook], [selections[i] for i in batch], len(bos), reduce, encoders.get(hook))
                if hook not in out:
                    out[hook] = np.zeros((len(ids), vecs.shape[1]), dtype=np.float32)
                out[hook][batch] = vecs
            bar.update(len(batch))
    return out


def _aggregate(acts: torch.Tensor, selections: list[list[int]], offset: int, reduce: str,
               encoder: Encoder | None) -> np.ndarray:
    """Gather each example's selected tokens, encode them (optional), reduce to one vector per example."""
    picked = torch.cat([acts[b, torch.tensor(sel, device=acts.device) + offset] for b, sel in enumerate(selections)])
    picked = picked.float()
    if encoder is not None:
        picked = encoder(picked).float()
        if picked.ndim != 2 or picked.shape[0] != sum(len(s) for s in selections):
            raise MonoscopeError(f"encode returned shape {tuple(picked.shape)}; it must map [tokens, d] to "
                                 "[tokens, m], one row per token")
    parts = torch.split(picked, [len(s) for s in selections])
    vecs = [p.amax(0) if reduce == "max" else p.mean(0) for p in parts]
    return torch.stack(vecs).cpu().numpy().astype(np.float32)


def _encoders(encode, hooks: list[str]) -> dict[str, Encoder]:
    if encode is None:
        return {}
    if callable(encode):
        return {h: encode for h in hooks}
    unknown = sorted(set(encode) - set(hooks))
    if unknown:
        raise MonoscopeError(f"encode has entries for hooks {unknown} that were not requested; hooks are {hooks}")
    return dict(encode)


def _tokenizer_fingerprint(tok) -> str:
    """Cheap identity of a tokenizer: its size, special ids and how it splits a fixed sample."""
    sample = "Hello world! Ça va? 東京 def f(x): return x**2  \n\t1234567"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    blob = json.dumps([type(tok).__name__, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, ids])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)[:80]


def _load(path: Path, n: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            acts = data["acts"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is recomputed and overwritten
    return acts if acts.ndim == 2 and acts.shape[0] == n else None


def _save(path: Path, acts: np.ndarray, meta: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, acts=acts, meta=np.array(json.dumps(meta)))
