"""The context windows of every example: decoded tokens with the feature's activation on each.

Produces the lines of the artifact's ``contexts.jsonl`` (format in ``monoscope.interpret.feature_stats``);
the artifact class writes them. Lookups are vectorised; the Python loops only join ready-made strings.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from monoscope.interpret.stats import StatsConfig


def load_tokenizer(model_name: str):
    """The tokenizer of a store's model without loading the model (None when it cannot be had offline)."""
    from monoscope import models

    if model_name.startswith(models.TINY_PREFIX):
        return models.byte_tokenizer()
    try:
        from transformers import AutoTokenizer

        path = models.cache_dir() / "models" / model_name if model_name == models.DEFAULT_MODEL else model_name
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure just means ids are shown instead of strings
        return None


def _lookup_codes(codes_dir: Path, q: np.ndarray) -> np.ndarray:
    """f[row, feat] for many keys row·m + feat from the sorted sparse-code file written during the pass
    (queries in roughly ascending order search fastest)."""
    keys = np.fromfile(codes_dir / "keys.i64", dtype=np.int64)
    vals = np.fromfile(codes_dir / "vals.f32", dtype=np.float32)
    out = np.zeros(len(q), np.float32)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        hit = keys[at] == q
        out[hit] = vals[at[hit]]
    return out


def _lookup_store(store, hook: str, rows: np.ndarray, feats: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """f[row, unit] for raw hook units: read each needed row once, in chunks."""
    out = np.zeros(len(rows), np.float32)
    uniq, inv = np.unique(rows, return_inverse=True)
    for a in range(0, len(uniq), chunk):
        block = store.rows(uniq[a:a + chunk], hook=hook).numpy()
        sel = np.nonzero((inv >= a) & (inv < a + chunk))[0]
        out[sel] = block[inv[sel] - a, feats[sel]]
    return out


def context_lines(store, hook: str, sae, codes_dir: Path | None, arrays: dict, cfg: StatsConfig, tok) -> list[str]:
    """The lines of contexts.jsonl, line i = feature i: decoded windows with per-token activations for
    every example of every feature (``codes_dir``: the pass's sparse codes, None for raw hook units)."""
    m = arrays["top_rows"].shape[0]
    n_int = cfg.n_intervals
    (feat, slot), examples = _example_strings(store, hook, sae, codes_dir, arrays, cfg, tok)
    # examples of feature i, part p (0: top, 1 + j: interval j) are examples[bounds[g]:bounds[g+1]], g = i·(n+1)+p
    part = np.concatenate([np.zeros(cfg.top_k, np.int64), 1 + np.arange(n_int * cfg.per_interval) // cfg.per_interval])
    bounds = np.searchsorted(feat * (n_int + 1) + part[slot], np.arange(m * (n_int + 1) + 1)).tolist()
    groups = [",".join(examples[bounds[g]:bounds[g + 1]]) for g in range(m * (n_int + 1))]
    density, vmax = _nums(arrays["density"].numpy()), _nums(arrays["max"].numpy())
    edges = _nums(arrays["interval_edges"].numpy())
    logit_json = _logit_strings(arrays, tok) if "logits_pos" in arrays else [""] * m
    lines = []
    for i in range(m):
        g = i * (n_int + 1)
        ints = ",".join('{"lo":%s,"hi":%s,"examples":[%s]}' % (edges[g + j], edges[g + j + 1], groups[g + 1 + j])
                        for j in range(n_int))
        lines.append('{"feature":%d,"density":%s,"max":%s,"top":[%s],"intervals":[%s]%s}\n' % (
            i, density[i], vmax[i], groups[g], ints, logit_json[i]))
    return lines


def _example_strings(store, hook: str, sae, codes_dir: Path | None, arrays: dict, cfg: StatsConfig, tok
                     ) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """((feature, example slot) of every existing example, its JSON text), in (feature, slot) order."""
    m = arrays["top_rows"].shape[0]
    before, after = cfg.context_window
    W = before + after + 1
    ex_rows = torch.cat([arrays["top_rows"], arrays["interval_rows"].reshape(m, -1)], 1).numpy()  # [m, E]
    ex_vals = torch.cat([arrays["top_values"], arrays["interval_values"].reshape(m, -1)], 1).numpy()
    fi, ei = np.nonzero(ex_rows >= 0)
    r = ex_rows[fi, ei]
    ctx = store.context_ids()
    token_ids = store.token_ids()
    # context of each row: [start, end) in store order (contexts are contiguous and ascending)
    c = ctx[r]
    c_start = np.searchsorted(ctx, c, side="left")
    c_end = np.searchsorted(ctx, c, side="right")
    # the in-context part of every window is the slice [lo, hi) of its W slots
    lo = np.maximum(c_start - (r - before), 0)
    hi = np.minimum(c_end - (r - before), W)
    win = r[:, None] + np.arange(-before, after + 1)  # [X, W]
    in_ctx = (win >= c_start[:, None]) & (win < c_end[:, None])
    acts = _window_acts(store, hook, sae, codes_dir, m, fi, r, win, in_ctx)
    add_bos, bos_json = _missing_bos(store, tok, r, before, c_start, token_ids)
    # JSON text of every store row's token (only the tokens some window shows are decoded)
    used = np.unique(token_ids[win[in_ctx]])
    table = np.full(int(token_ids.max()) + 1 if len(token_ids) else 1, '"?"', dtype=object)
    for t, js in _token_strings(tok, used).items():
        table[t] = js
    row_tok = table[token_ids].tolist()
    # activations: "0.0" except at the few non-zero slots of each window
    nz_x, nz_w = np.nonzero(acts)
    nz_s = _nums(acts[nz_x, nz_w], 4)
    nz_at, nz_w = np.searchsorted(nz_x, np.arange(len(r) + 1)).tolist(), nz_w.tolist()
    zeros = ["0.0"] * W
    examples = []
    for x, (row, act, cid, a, b, bos) in enumerate(zip(
            r.tolist(), _nums(ex_vals[fi, ei]), c.tolist(), lo.tolist(), hi.tolist(), add_bos.tolist())):
        ac = zeros[a:b]
        for q in range(nz_at[x], nz_at[x + 1]):
            ac[nz_w[q] - a] = nz_s[q]
        tk = row_tok[row - before + a:row - before + b]
        if bos:
            tk.insert(0, bos_json)
            ac.insert(0, "null")
        examples.append('{"row":%d,"act":%s,"context":%d,"tokens":[%s],"acts":[%s],"focus":%d}'
                        % (row, act, cid, ",".join(tk), ",".join(ac), before - a + bos))
    return (fi, ei), examples


def _window_acts(store, hook, sae, codes_dir, m, fi, r, win, in_ctx) -> np.ndarray:
    """The feature's activation on every in-context slot of every window [X, W] (0 outside the context);
    looked up in row order, where the queries are nearly sorted."""
    by_row = np.argsort(r * m + fi)
    ok = in_ctx[by_row]
    q_rows, q_feat = win[by_row][ok], np.broadcast_to(fi[by_row, None], win.shape)[ok]
    acts_by_row = np.zeros(win.shape, np.float32)
    if sae is not None:
        acts_by_row[ok] = _lookup_codes(codes_dir, q_rows * m + q_feat)
    else:
        acts_by_row[ok] = _lookup_store(store, hook, q_rows, q_feat)
    acts = np.empty_like(acts_by_row)
    acts[by_row] = acts_by_row
    return acts


def _missing_bos(store, tok, r, before, c_start, token_ids) -> tuple[np.ndarray, str]:
    """(whether each window reaches the start of a context whose BOS the store dropped, the BOS's JSON)."""
    keep_bos = bool(store.meta.get("config", {}).get("keep_bos", False))
    bos_id = getattr(tok, "bos_token_id", None) if tok is not None else None
    if keep_bos or bos_id is None:
        add_bos = np.zeros(len(r), bool)
    else:
        add_bos = (r - before <= c_start) & (token_ids[c_start] != bos_id)
    bos_json = json.dumps(getattr(tok, "bos_token", None) or "<bos>") if tok is not None else '"<bos>"'
    return add_bos, bos_json


def _logit_strings(arrays: dict, tok) -> list[str]:
    """Per feature, the ``,"logits":{...}`` member of its line."""
    m, n_l = arrays["logits_pos"].shape
    ids_l = np.concatenate([arrays["logits_pos"].numpy(), arrays["logits_neg"].numpy()], 1)  # [m, 2n]
    ls = _token_strings(tok, np.unique(ids_l))
    vals_l = _nums(np.concatenate([arrays["logits_pos_values"].numpy(), arrays["logits_neg_values"].numpy()], 1))
    pairs = ["[%s,%s]" % (ls[t], v) for t, v in zip(ids_l.reshape(-1).tolist(), vals_l)]
    return [',"logits":{"pos":[%s],"neg":[%s]}' % (
        ",".join(pairs[2 * n_l * i:2 * n_l * i + n_l]), ",".join(pairs[2 * n_l * i + n_l:2 * n_l * (i + 1)]))
        for i in range(m)]


def _nums(a: np.ndarray, places: int = 5) -> list[str]:
    """JSON numbers of an array's values rounded to ``places`` (null for NaN / inf), flattened."""
    return [repr(round(v, places)) if math.isfinite(v) else "null"
            for v in np.asarray(a, dtype=np.float64).reshape(-1).tolist()]


def _token_strings(tok, ids: np.ndarray) -> dict[int, str]:
    """JSON-encoded display string of each token id (``<id>`` when no tokenizer is available)."""
    out = {}
    for t in ids.tolist():
        try:
            s = tok.decode([t]) if tok is not None else f"<{t}>"
        except Exception:  # noqa: BLE001
            s = f"<{t}>"
        out[t] = json.dumps(s)
    return out
