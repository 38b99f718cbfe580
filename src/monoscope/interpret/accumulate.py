"""The one pass over a store: bounded running state per feature, folded from each batch's non-zero entries.

How each statistic is kept (top-k buffers, power-of-two interval grids with partition samples, sparse
correlation samples) is described in ``monoscope.interpret.stats``; this module holds the accumulators,
the pass itself and the finishing steps that turn the running state into the artifact's arrays.

Threads: only the SAE's encoder runs on all of torch's threads; the bookkeeping (many short ops) runs on
one, where thread hand-offs on a busy machine would cost more than they save (see ``torch_threads``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from monoscope.progress import progress_bar

if TYPE_CHECKING:
    from monoscope.interpret.stats import StatsConfig

HIST_DECADES = (-4, 4)  # log10 range of the fixed histogram bins
HIST_PER_DECADE = 10
INF = float("inf")


def hist_edges() -> np.ndarray:
    """0, then log-spaced edges 10^lo .. 10^hi; bin b holds values in [edges[b], edges[b+1])."""
    lo, hi = HIST_DECADES
    return np.concatenate([[0.0], np.logspace(lo, hi, (hi - lo) * HIST_PER_DECADE + 1)])



# ---------------------------------------------------------------------------------------------- helpers

class _TopK:
    """Per group, the k largest values seen so far with their rows (ties: the earlier row first).

    ``add`` only keeps entries above their group's current k-th value (``floor``, 0 while the group has
    fewer than k) and buffers them; ``flush`` (when the buffer holds about as many entries as the table,
    and at the end) merges buffer and table with one stable sort of an int64 key: group in the high bits,
    the value's float bits (monotone for positive floats) reversed in the low bits. The floor is only
    raised at a flush, so between flushes it is merely lower than it could be: nothing is lost.
    """

    def __init__(self, n_groups: int, k: int):
        self.k = k
        self.row = torch.full((n_groups, k), -1, dtype=torch.int64)
        self.val = torch.zeros((n_groups, k))
        self.floor = torch.zeros(n_groups)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._n_buf = 0

    def add(self, groups: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """Entries in stream order (rows ascending); values must be > 0."""
        keep = vals > self.floor[groups]
        g = groups[keep]
        if len(g):
            self._buf.append((g, rows[keep], vals[keep]))
            self._n_buf += len(g)
            if self._n_buf >= self.row.numel():
                self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        have = self.row >= 0
        groups = torch.arange(len(self.row))[:, None].expand_as(self.row)
        # the table first, then the buffer in stream order: a stable sort puts earlier rows first on ties
        g = torch.cat([groups[have]] + [b[0] for b in self._buf])
        r = torch.cat([self.row[have]] + [b[1] for b in self._buf])
        v = torch.cat([self.val[have]] + [b[2] for b in self._buf]).contiguous()
        self._buf, self._n_buf = [], 0
        key = (g << 31) | ((1 << 31) - 1 - v.view(torch.int32).long())
        order = torch.sort(key, stable=True).indices
        g, r, v = g[order], r[order], v[order]
        counts = torch.bincount(g, minlength=len(self.row))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(g)) - starts[g]
        keep = rank < self.k
        self.row.fill_(-1)
        self.val.zero_()
        self.row[g[keep], rank[keep]] = r[keep]
        self.val[g[keep], rank[keep]] = v[keep]
        self.floor = torch.where(self.row[:, -1] >= 0, self.val[:, -1], 0.0)


class _SlotSample:
    """Per group, k slots each holding the smallest-random-key entry routed to it (a partition sample).

    Sampling is one scatter-min per batch; tables are flat [n_groups * k] and viewed as [n_groups, k].
    """

    def __init__(self, n_groups: int, k: int):
        self.k = k
        self.key = torch.full((n_groups * k,), INF, dtype=torch.float64)
        self.row = torch.full((n_groups * k,), -1, dtype=torch.int64)
        self.val = torch.zeros(n_groups * k)

    def add(self, groups: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, gen: torch.Generator) -> None:
        if groups.numel() == 0:
            return
        slot = groups * self.k + torch.randint(self.k, groups.shape, generator=gen)
        keys = torch.rand(groups.shape, generator=gen, dtype=torch.float64)
        self.key.scatter_reduce_(0, slot, keys, "amin")
        win = keys == self.key[slot]
        self.row[slot[win]] = rows[win]
        self.val[slot[win]] = vals[win]


def _smallest_per_group(groups: torch.Tensor, keys: torch.Tensor, k: int, n_groups: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot index into the inputs or -1 [n_groups, k]) of the k smallest keys per group, ascending."""
    out = torch.full((n_groups, k), -1, dtype=torch.int64)
    if groups.numel() == 0:
        return out, out >= 0
    order = torch.argsort(groups.double() + keys.double())  # keys lie in [0, 1)
    g = groups[order]
    uniq, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(g)) - torch.repeat_interleave(starts, counts)
    keep = rank < k
    out[g[keep], rank[keep]] = order[keep]
    return out, out >= 0


class _Encoder:
    """Batch of activations -> non-zero entries (local row, feature, value), via the cheapest SAE path.

    The SAE runs on ``threads`` threads; the rest of the pass runs on one (see ``torch_threads``).
    """

    def __init__(self, sae, threads: int):
        self.sae = sae
        self.threads = threads

    def __call__(self, x: torch.Tensor):
        sae = self.sae
        if sae is not None and getattr(sae, "has_sparse_encode", False):
            with torch_threads(self.threads):
                vals, idx = sae.encode_sparse(x)  # [B, k], ids sorted within a row: entries stay row-major
            rows = torch.arange(x.shape[0]).repeat_interleave(idx.shape[1])
            vals, idx = vals.reshape(-1).float(), idx.reshape(-1)
            keep = vals > 0
            if bool(keep.all()):
                return rows, idx, vals
            return rows[keep], idx[keep], vals[keep]
        if sae is not None:
            with torch_threads(self.threads):
                x = sae.encode(x)
        rows, feats = (x > 0).nonzero(as_tuple=True)
        return rows, feats, x[rows, feats].float()


@contextmanager
def torch_threads(n: int):
    """Run torch ops on ``n`` threads inside the block.

    The pass's bookkeeping is many short ops on ~10^5 entries: split over threads, each op waits for
    every thread to be scheduled, which on a busy machine costs a time slice per op (measured: ~25× slower
    on 2 shared cores than on one thread). Only the SAE's matmul is worth the hand-off.
    """
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sub_bins(n_intervals: int) -> int:
    """Sub-bins of [0, M) for the interval reservoirs: a power of two ≥ 6 per interval."""
    return 1 << math.ceil(math.log2(6 * n_intervals))


def one_pass(store, hook, sae, m, cfg: StatsConfig, codes_dir: Path | None, show_progress,
              threads: int) -> dict:
    """Stream the store once; fold each batch's non-zero entries into bounded running state.

    Called on one thread; only the SAE runs on ``threads`` (see ``torch_threads``).
    """
    encode = _Encoder(sae, threads)
    edges = torch.from_numpy(hist_edges()).float()
    nb = len(edges) - 1
    S = _sub_bins(cfg.n_intervals)
    count = torch.zeros(m, dtype=torch.int64)
    total = torch.zeros(m, dtype=torch.float64)
    vmax = torch.zeros(m)
    hist = torch.zeros(m * nb, dtype=torch.int64)
    top = _TopK(m, cfg.top_k)
    inter = _SlotSample(m * S, cfg.per_interval)
    expo = torch.full((m,), -1000, dtype=torch.int64)  # grid max M = 2**expo (−1000: never fired)
    gen = torch.Generator().manual_seed(cfg.seed)
    p_sample = min(1.0, cfg.corr_rows / store.num_rows)
    sample_rows, sample_ent = [], []
    n_sampled = 0
    if codes_dir is not None:
        codes_dir.mkdir(parents=True)
        fk, fv = open(codes_dir / "keys.i64", "wb"), open(codes_dir / "vals.f32", "wb")
    bar = progress_bar(total=store.num_rows, unit="tok", desc="feature stats", enable=show_progress)
    start = 0
    try:
        for x in store.iter_rows(hook, batch_size=cfg.batch_size):
            B = x.shape[0]
            rows, feats, vals = encode(x)
            grow = rows + start
            if codes_dir is not None:
                fk.write((grow * m + feats).numpy().tobytes())
                fv.write(vals.numpy().tobytes())
            count += torch.bincount(feats, minlength=m)
            total += torch.bincount(feats, weights=vals.double(), minlength=m)
            bmax = torch.zeros(m).scatter_reduce_(0, feats, vals, "amax")
            torch.maximum(vmax, bmax, out=vmax)
            b = (torch.bucketize(vals, edges, right=True) - 1).clamp_(0, nb - 1)
            hist += torch.bincount(feats * nb + b, minlength=m * nb)
            top.add(feats, grow, vals)
            # interval reservoirs on the power-of-two grid
            _grow_grid(inter, expo, bmax, S)
            sub = torch.ldexp(vals, -expo[feats].float()).mul_(S).long().clamp_(0, S - 1)
            groups = feats * S + sub
            inter.add(groups, grow, vals, gen)
            # correlation sample: whole rows, kept sparse
            pick = torch.rand(B, generator=gen) < p_sample
            if pick.any():
                pos = torch.full((B,), -1, dtype=torch.int64)
                pos[pick] = torch.arange(n_sampled, n_sampled + int(pick.sum()))
                sel = pick[rows]
                sample_ent.append((pos[rows[sel]], feats[sel], vals[sel]))
                sample_rows.append(torch.nonzero(pick).reshape(-1) + start)
                n_sampled += int(pick.sum())
            start += B
            bar.update(B)
        top.flush()
    finally:
        bar.close()
        if codes_dir is not None:
            fk.close()
            fv.close()
    cat = (lambda i: torch.cat([e[i] for e in sample_ent]) if sample_ent else torch.zeros(0, dtype=torch.int64))
    return {"count": count, "total": total, "max": vmax, "hist": hist.reshape(m, nb), "top": top,
            "inter": inter, "S": S,
            "sample": {"rows": torch.cat(sample_rows) if sample_rows else torch.zeros(0, dtype=torch.int64),
                       "pos": cat(0), "feat": cat(1), "val": cat(2).float() if sample_ent else torch.zeros(0)}}


def _grow_grid(inter: _SlotSample, expo: torch.Tensor, bmax: torch.Tensor, S: int) -> None:
    """Raise each feature's grid max to the power of two above ``bmax``, merging sub-bins as it doubles."""
    fired = bmax > 0
    need = torch.full_like(expo, -1000)
    _, e = torch.frexp(bmax[fired])  # bmax = mant·2^e with mant in [0.5, 1): 2^e ≥ bmax
    need[fired] = e.long()
    up = need > expo
    if not up.any():
        return
    old = expo[up]
    feats = torch.nonzero(up).reshape(-1)
    shift = (need[up] - old)
    merge = old > -1000  # first firing: the table is still empty, nothing to merge
    k = inter.k
    log_s = int(math.log2(S))
    for t in torch.unique(shift[merge]).tolist():
        fs = feats[merge & (shift == t)]
        width = S >> min(t, log_s)  # sub-bins left after merging 2^t neighbours
        g = (fs[:, None] * S + torch.arange(S)).reshape(-1)
        key = inter.key.view(-1, k)[g].reshape(len(fs), width, -1, k)
        best = key.argmin(2, keepdim=True)
        fills = (INF, -1, 0.0)
        for tab, fill in zip((inter.key, inter.row, inter.val), fills):
            merged = tab.view(-1, k)[g].reshape(len(fs), width, -1, k).gather(2, best).squeeze(2)
            block = torch.full((len(fs), S, k), fill, dtype=tab.dtype)
            block[:, :width] = merged
            tab.view(-1, k)[g] = block.reshape(len(fs) * S, k)
    expo[up] = need[up]


def finish_arrays(state: dict, cfg: StatsConfig, m: int, n_rows: int) -> dict[str, torch.Tensor]:
    count, vmax = state["count"], state["max"]
    top = state["top"]
    out = {
        "count": count, "density": count.double().div(n_rows).float(),
        "mean": (state["total"] / n_rows).float(),
        "mean_nonzero": torch.where(count > 0, state["total"] / count.clamp_min(1), 0.0).float(),
        "max": vmax, "hist": state["hist"], "hist_edges": torch.from_numpy(hist_edges()).float(),
        "top_rows": top.row.clone(), "top_values": torch.where(top.row >= 0, top.val, 0.0),
    }
    # final intervals from the reservoirs: candidates = every kept entry of the feature
    n, per, S = cfg.n_intervals, cfg.per_interval, state["S"]
    inter = state["inter"]
    key, row, val = inter.key.reshape(m, -1).float(), inter.row.reshape(m, -1), inter.val.reshape(m, -1)
    # the exact top-k join the candidates (with fresh random keys): the sparse top intervals then never
    # miss members that a partly covered sub-bin at their edge dropped
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    in_res = torch.zeros_like(top.row, dtype=torch.bool)
    for c in range(top.k):  # top-k rows already in the feature's reservoir would appear twice
        in_res[:, c] = (row == top.row[:, c:c + 1]).any(1)
    extra = (top.row >= 0) & ~in_res
    key = torch.cat([key, torch.rand(top.row.shape, generator=gen)], 1)
    row = torch.cat([row, torch.where(extra, top.row, -1)], 1)
    val = torch.cat([val, top.val], 1)
    ok = row >= 0
    feat = torch.arange(m)[:, None].expand_as(row)[ok]
    v, r, kk = val[ok], row[ok], key[ok]
    j = (v / vmax[feat] * n).long().clamp_(0, n - 1)
    slots, filled = _smallest_per_group(feat * n + j, kk, per, m * n)
    safe = slots.clamp_min(0)
    out["interval_rows"] = torch.where(filled, r[safe], -1).reshape(m, n, per)
    out["interval_values"] = torch.where(filled, v[safe], 0.0).reshape(m, n, per)
    out["interval_edges"] = vmax[:, None] * torch.arange(n + 1)[None, :] / n
    return out


# ---------------------------------------------------------------------------------------------- correlations

def _pearson_topk(gram_rows, mean, std, R: int, n: int, block: int = 1024):
    """Top-n Pearson partners (other than itself) of every feature; ``gram_rows(a, b)`` gives the dense
    rows [b-a, m] of the product Σ_rows f_i·f_j over the R sampled rows.

    r_ij = G_ij / (R σ_i σ_j) − (μ_i/σ_i)(μ_j/σ_j); a feature with σ = 0 has no partners and is no partner.
    """
    m = len(mean)
    ok = std > 0
    inv = torch.where(ok, 1.0 / std, 0.0)
    u = mean * inv
    best_r, best_i = [], []
    for a in range(0, m, block):
        b = min(a + block, m)
        r = gram_rows(a, b)
        r.mul_((inv[a:b] / R)[:, None]).mul_(inv[None, :])
        r.sub_(u[a:b, None] * u[None, :])
        r[:, ~ok] = -INF
        r[~ok[a:b]] = -INF
        r[torch.arange(b - a), torch.arange(a, b)] = -INF
        top = torch.topk(r, min(n, m), dim=1)
        best_r.append(top.values)
        best_i.append(top.indices)
    best_r, best_i = torch.cat(best_r), torch.cat(best_i)
    if best_r.shape[1] < n:  # fewer features than partners asked for
        pad = n - best_r.shape[1]
        best_r = torch.cat([best_r, torch.full((m, pad), -INF)], 1)
        best_i = torch.cat([best_i, torch.full((m, pad), -1, dtype=torch.int64)], 1)
    empty = ~torch.isfinite(best_r)
    return torch.where(empty, -1, best_i), torch.where(empty, float("nan"), best_r)


def correlations(state: dict, cfg: StatsConfig, m: int, store) -> dict[str, torch.Tensor]:
    n = cfg.n_correlated
    smp = state["sample"]
    R = len(smp["rows"])
    if n == 0 or R < 2:
        return {}
    pos, feat, val = smp["pos"], smp["feat"], smp["val"]
    s1 = torch.bincount(feat, weights=val.double(), minlength=m)
    s2 = torch.bincount(feat, weights=val.double() ** 2, minlength=m)
    mean = s1 / R
    std = (s2 / R - mean ** 2).clamp_min(0).sqrt()
    mean, std = mean.float(), std.float()
    order = torch.argsort(feat, stable=True)
    fs, ps, vs = feat[order], pos[order], val[order]  # entries by feature
    by_pos = torch.argsort(pos, stable=True)
    pp, ff, vv = pos[by_pos], feat[by_pos], val[by_pos]  # entries by sampled row
    per_row = torch.bincount(pos, minlength=R)
    row_start = torch.cumsum(per_row, 0) - per_row

    def gram_pairs(a, b):
        """Rows [a, b) of the Gram matrix from the pairs of entries that share a sampled row."""
        lo, hi = int(torch.searchsorted(fs, a)), int(torch.searchsorted(fs, b))
        f, p, v = fs[lo:hi] - a, ps[lo:hi], vs[lo:hi]
        rep = per_row[p]
        # partner j of the t-th pair of entry e: entry row_start[p_e] + t of its sampled row
        first = torch.repeat_interleave(row_start[p] - (torch.cumsum(rep, 0) - rep), rep)
        j = first + torch.arange(len(first))
        flat = torch.repeat_interleave(f * m, rep) + ff[j]
        g = torch.zeros((b - a) * m)
        g.index_add_(0, flat, torch.repeat_interleave(v, rep) * vv[j])
        return g.view(b - a, m)

    def gram_product(a, b):
        """Rows [a, b) of the Gram matrix as (F_t @ dense columns [a, b)).T, for dense-ish codes."""
        lo, hi = torch.searchsorted(fs, a), torch.searchsorted(fs, b)
        d = torch.zeros(R, b - a)
        d[ps[lo:hi], fs[lo:hi] - a] = vs[lo:hi]
        return (F_t @ d).T.contiguous()

    # sparse codes (TopK: R·k² pairs) are far cheaper as pairs than as a sparse × dense product
    if int((per_row * per_row).sum()) * 4 <= len(feat) * m:
        gram_rows = gram_pairs
    else:
        F_t = torch.sparse_coo_tensor(torch.stack([feat, pos]), val, (m, R)).coalesce().to_sparse_csr()
        gram_rows = gram_product
    out = {}
    idx, r = _pearson_topk(gram_rows, mean, std, R, n)
    out["corr_features"], out["corr_features_r"] = idx, r
    if cfg.correlate_with_neurons is not None:
        rows = smp["rows"].numpy()
        n_units = store.d(cfg.correlate_with_neurons)
        acc = torch.zeros(m, n_units)
        t1, t2 = torch.zeros(n_units, dtype=torch.float64), torch.zeros(n_units, dtype=torch.float64)
        for a in range(0, R, 4096):
            b = min(a + 4096, R)
            N = store.rows(rows[a:b], hook=cfg.correlate_with_neurons)
            lo, hi = torch.searchsorted(pp, a), torch.searchsorted(pp, b)
            Fc = torch.sparse_coo_tensor(torch.stack([ff[lo:hi], pp[lo:hi] - a]), vv[lo:hi], (m, b - a))
            acc += torch.sparse.mm(Fc.coalesce(), N)
            t1 += N.double().sum(0)
            t2 += N.double().pow(2).sum(0)
        mo = t1 / R
        so = (t2 / R - mo ** 2).clamp_min(0).sqrt()
        idx, r = _pearson_from_product(acc, mean, std, mo.float(), so.float(), R, n)
        out["corr_neurons"], out["corr_neurons_r"] = idx, r
    return out


def _pearson_from_product(prod, mean_f, std_f, mean_o, std_o, R, n):
    cov = prod / R - mean_f[:, None] * mean_o[None, :]
    r = torch.nan_to_num(cov / (std_f[:, None] * std_o[None, :]), nan=-INF, posinf=-INF, neginf=-INF)
    top = torch.topk(r, min(n, r.shape[1]), dim=1)
    empty = ~torch.isfinite(top.values)
    return torch.where(empty, -1, top.indices), torch.where(empty, float("nan"), top.values)
