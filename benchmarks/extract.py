"""Extraction throughput vs its limit and vs the naive way, measured side by side in one run.

    python benchmarks/extract.py [--tokens 8192] [--repeats 3]

Model Gemma 3 270M, hook layers.6.resid_post, the same packed contexts for every contender:
  limit  - a bare forward of the model truncated after layer 6 (no final norm use, no unembedding)
  ours   - `monoscope extract` end to end (tokenising, forward with early stop, store writes)
  naive  - a full forward with output_hidden_states=True (all 18 layers and the logits)
The naive contender runs a quarter of the contexts (its rate is per token). Prints tokens/s medians and the ratios ours/limit (target >= 0.9) and ours/naive (target >= 2.5).
"""
import argparse
import itertools
import statistics
import tempfile
import time

import torch

from monoscope import corpus as corpus_lib
from monoscope.extract import ExtractConfig, extract
from monoscope.models import load_model

LAYER = 6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-length", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("gemma-3-270m")
    docs, _ = corpus_lib.split_documents(corpus_lib.load_corpus("default"), 0.1, 0)
    n_ctx = -(-args.tokens // (args.context_length - 1))
    contexts = list(itertools.islice(corpus_lib.pack_contexts(docs, lm.tokenizer, args.context_length,
                                                              max_tokens=n_ctx * args.context_length), n_ctx))
    ids = torch.tensor([c.token_ids for c in contexts])
    batches = ids.split(args.batch_size)
    rows = n_ctx * (args.context_length - 1)  # BOS rows are not stored
    inner = lm.model.model
    all_layers = inner.layers

    def limit():
        inner.layers = all_layers[: LAYER + 1]
        try:
            with torch.inference_mode():
                for b in batches:
                    inner(input_ids=b, use_cache=False)
        finally:
            inner.layers = all_layers

    def ours():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(hook=(f"layers.{LAYER}.resid_post",), tokens=rows, batch_size=args.batch_size,
                                context_length=args.context_length)
            extract(cfg, tmp, lm=lm, show_progress=False)

    naive_batches = batches[: max(1, len(batches) // 4)]  # 6x slower: a quarter of the data gives its rate

    def naive():
        with torch.inference_mode():
            for b in naive_batches:
                lm.model(input_ids=b, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]

    times = {"limit": [], "ours": [], "naive": []}
    for _ in range(args.repeats):  # interleaved so machine noise hits all three alike
        for name, fn in (("limit", limit), ("ours", ours), ("naive", naive)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    naive_rows = sum(b.shape[0] for b in naive_batches) * (args.context_length - 1)
    rate = {k: (naive_rows if k == "naive" else rows) / statistics.median(v) for k, v in times.items()}
    print(f"tokens per run: {rows}, repeats: {args.repeats}, threads: {torch.get_num_threads()}")
    for k in ("limit", "ours", "naive"):
        print(f"{k:6s} {rate[k]:8.0f} tokens/s (median of {args.repeats})")
    print(f"ours / limit = {rate['ours'] / rate['limit']:.2f}   (target >= 0.9)")
    print(f"ours / naive = {rate['ours'] / rate['naive']:.2f}   (target >= 2.5)")


if __name__ == "__main__":
    main()
