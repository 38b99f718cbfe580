"""Run a model over a corpus and write the activations at one or more hook points into a store.

All requested hooks are captured in a single forward pass that stops right after the deepest one.
BOS rows are dropped by default (Gemma's BOS has a norm hundreds of times larger than other tokens)
and padding never enters the store because contexts are packed to a fixed length. A killed extraction
started again with the same arguments resumes at the first context that was not committed.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from monoscope import corpus as corpus_lib
from monoscope.artifacts import read_json
from monoscope.config import config_hash, to_dict
from monoscope.errors import MonoscopeError
from monoscope.hookpoints import resolve, run_with_capture
from monoscope.models import DEFAULT_MODEL, LoadedModel, load_model
from monoscope.progress import progress_bar
from monoscope.store import ActivationStore, StoreWriter

SPLITS = ("train", "validation", "all")


@dataclass
class ExtractConfig:
    """Where to read activations from, on what text, and how many."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "built-in name, local folder or cached HF id"})
    hook: tuple[str, ...] = field(default=("layers.6.resid_post",),
                                  metadata={"help": "one or more hook points, captured in one pass"})
    corpus: str = field(default="default", metadata={
        "help": "built-in corpus name, a txt/jsonl/csv/parquet/arrow file, a folder (of .txt files, or written by "
                "datasets' save_to_disk) or hf:OWNER/NAME[:SPLIT] from the local Hugging Face cache"})
    text_column: str = field(default="", metadata={
        "help": "corpus files: the column of the texts (default: 'text', else 'prompt')"})
    tokens: int = field(default=200_000, metadata={"help": "number of activation rows to store"})
    context_length: int = field(default=128, metadata={"help": "tokens per context, BOS included"})
    batch_size: int = field(default=32, metadata={"help": "contexts per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "storage dtype: float32, float16 or bfloat16"})
    split: str = field(default="train", metadata={"help": "documents to read: train, validation or all"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of documents held out for validation"})
    seed: int = field(default=0, metadata={"help": "seed of the document split"})
    keep_bos: bool = field(default=False, metadata={"help": "also store the BOS token's activations"})
    shard_rows: int = field(default=65536, metadata={"help": "rows per shard file"})
    device: str = field(default="cpu", metadata={"help": "torch device for the model"})


def _batched(iterable, n: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _discard(writer: StoreWriter, out: Path, existed: bool) -> None:
    """Nothing was extracted: remove the store this call created, so it cannot block the corrected rerun."""
    writer.close()
    if not existed and writer.contexts_done == 0:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _append_batches(writer: StoreWriter, contexts, lm: LoadedModel, names: list[str], cfg: ExtractConfig,
                    bar) -> int:
    """Run the model over ``contexts`` batch by batch and append the kept rows; return the next context index."""
    pad_id = lm.tokenizer.pad_token_id
    context_index = writer.contexts_done
    for batch in _batched(contexts, cfg.batch_size):
        ids = torch.tensor([c.token_ids for c in batch], dtype=torch.long)
        acts = run_with_capture(lm.model, names, ids.to(lm.device))
        keep = torch.ones_like(ids, dtype=torch.bool)
        if not cfg.keep_bos and lm.bos_token_id is not None:
            keep[:, 0] = ids[:, 0] != lm.bos_token_id
        if pad_id is not None:
            keep &= ids != pad_id
        doc_ids = torch.tensor([c.doc_index for c in batch], dtype=torch.long)
        positions = torch.tensor([c.positions for c in batch], dtype=torch.long)
        context_ids = torch.arange(context_index, context_index + len(batch)).unsqueeze(1).expand_as(ids)
        writer.append({n: a[keep.to(a.device)].to("cpu", torch.float32) for n, a in acts.items()},
                      token_ids=ids[keep], doc_ids=doc_ids[keep], positions=positions[keep],
                      context_ids=context_ids[keep])
        context_index += len(batch)
        bar.update(int(keep.sum()))
    return context_index


def extract(cfg: ExtractConfig, out: str | Path, lm: LoadedModel | None = None,
            show_progress: bool | None = None) -> ActivationStore:
    """Extract activations into the store at ``out`` (resuming it if unfinished) and return a reader."""
    out = Path(out)
    if cfg.split not in SPLITS:
        raise MonoscopeError(f"unknown split {cfg.split!r}; use one of {', '.join(SPLITS)}")
    if cfg.tokens <= 0 or cfg.context_length < 2 or cfg.batch_size <= 0:
        raise MonoscopeError("tokens and batch_size must be positive and context_length at least 2")
    lm = lm or load_model(cfg.model, device=cfg.device)
    points = [resolve(lm.model, h) for h in cfg.hook]  # bad hook names fail before any work

    side = corpus_lib.split_side(corpus_lib.load_corpus(cfg.corpus, text_field=cfg.text_column or None),
                                 cfg.split, cfg.val_fraction, cfg.seed)
    first = next(side, None)
    if first is None:
        raise MonoscopeError(f"the {cfg.split} split of corpus {cfg.corpus!r} is empty; "
                             f"use a larger corpus or another --split / --val-fraction")
    docs = itertools.chain([first], side)

    settings = to_dict(cfg)
    if not settings["text_column"]:
        del settings["text_column"]  # the default leaves stores written before this setting existed valid
    input_hash = config_hash(settings, lm.fingerprint, corpus_lib.corpus_fingerprint(
        cfg.corpus, text_field=cfg.text_column or None))
    manifest = out / "manifest.json"
    if manifest.exists():
        previous = read_json(manifest).get("meta", {}).get("input_hash")
        if previous is not None and previous != input_hash:
            raise MonoscopeError(f"{out} holds a store written with other settings (model, hooks, corpus, "
                                 f"tokens or context length differ); choose a new --out or delete it")
    existed = out.exists()
    writer = StoreWriter.open(out, model=lm.name, model_fingerprint=lm.fingerprint,
                              hooks={p.name: p.width for p in points}, dtype=cfg.dtype,
                              shard_rows=cfg.shard_rows,
                              meta={"config": settings, "input_hash": input_hash, "kind": "activations"})
    if writer.finished:
        return ActivationStore(out)

    rows_per_context = cfg.context_length - (0 if cfg.keep_bos else 1)
    n_contexts = math.ceil(cfg.tokens / rows_per_context)
    contexts = corpus_lib.pack_contexts(docs, lm.tokenizer, cfg.context_length,
                                        max_tokens=n_contexts * cfg.context_length)
    contexts = itertools.islice(contexts, writer.contexts_done, None)
    names = [p.name for p in points]
    bar = progress_bar(total=n_contexts * rows_per_context, initial=writer.rows_done, unit="tok",
                       desc=f"extract {', '.join(names)}", enable=show_progress)
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            context_index = _append_batches(writer, contexts, lm, names, cfg, bar)
        if context_index == 0:
            raise MonoscopeError(f"corpus {cfg.corpus!r} ({cfg.split} split) is too small for one context of "
                                 f"{cfg.context_length} tokens; lower --context-length or use more text")
    except MonoscopeError:  # e.g. packing found too few tokens: leave no empty store behind
        _discard(writer, out, existed)
        raise
    finally:
        bar.close()
    writer.finish({"seconds": round(time.perf_counter() - started, 2)})
    return ActivationStore(out)
