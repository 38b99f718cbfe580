"""One-pass feature statistics against brute-force dense computations on a small synthetic store."""
import json

import numpy as np
import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.interpret.accumulate import hist_edges
from monoscope.interpret.feature_stats import FeatureStats
from monoscope.interpret.stats import StatsConfig, compute_feature_stats
from monoscope.models import tiny_model
from monoscope.sae import SAEConfig, build_sae
from monoscope.store import ActivationStore, StoreWriter

HOOK, NEURONS = "layers.1.resid_post", "layers.1.mlp_neurons"
CTX = 15  # stored rows per context (BOS dropped)


def run_stats(store, out, *, sae=None, lm=None, hook=None, **cfg):
    """compute_feature_stats with the StatsConfig fields as keywords."""
    return compute_feature_stats(store, out, StatsConfig(**cfg), sae=sae, lm=lm, hook=hook)


def read_stats(out):
    """(sidecar, arrays) of a finished artifact."""
    stats = FeatureStats(out)
    return stats.sidecar, stats.arrays


def make_store(folder, n_contexts=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = StoreWriter.open(folder, model="tiny-llama", model_fingerprint="fp", hooks={HOOK: 32, NEURONS: 64},
                         shard_rows=500, meta={"config": {"keep_bos": False, "context_length": CTX + 1}})
    for c in range(0, n_contexts, 10):
        n = 10 * CTX
        acts = {HOOK: torch.randn(n, 32, generator=g) * 2, NEURONS: torch.randn(n, 64, generator=g)}
        toks = torch.randint(3, 259, (n,), generator=g)
        pos = torch.arange(1, CTX + 1).repeat(10)
        ctx = torch.arange(c, c + 10).repeat_interleave(CTX)
        w.append(acts, toks, ctx // 3, pos, ctx)
    w.finish()
    return ActivationStore(folder)


def make_sae(arch="topk", seed=0, **kw):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, d_in=32, d_sae=96, k=6, hook_name=HOOK, model_name="tiny-llama", **kw))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.2)
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    store = make_store(root / "store")
    sae = make_sae()
    lm = tiny_model("llama")
    out = run_stats(root / "store", root / "out", sae=sae, lm=lm, top_k=7, n_intervals=4,
                                per_interval=3, batch_size=256, n_correlated=3, correlate_with_neurons=NEURONS,
                                context_window=(5, 2))
    side, arrays = read_stats(out)
    with torch.no_grad():
        F = sae.encode(store.rows(np.arange(store.num_rows), hook=HOOK))
    return dict(root=root, store=store, sae=sae, lm=lm, out=out, side=side, a=arrays, F=F)


def test_density_mean_max_hist_exact(setup):
    F, a = setup["F"], setup["a"]
    N = F.shape[0]
    assert torch.equal(a["count"], (F > 0).sum(0))
    assert torch.allclose(a["density"], (F > 0).float().mean(0))
    assert torch.allclose(a["mean"], F.mean(0), atol=1e-6)
    assert torch.allclose(a["max"], F.max(0).values)
    edges = torch.from_numpy(hist_edges()).float()
    nb = len(edges) - 1
    brute = torch.zeros(F.shape[1], nb, dtype=torch.int64)
    for i in range(F.shape[1]):
        v = F[:, i][F[:, i] > 0]
        b = (torch.bucketize(v, edges, right=True) - 1).clamp(0, nb - 1)
        brute[i] = torch.bincount(b, minlength=nb)
    assert torch.equal(a["hist"], brute)
    assert a["hist"].sum() == (F > 0).sum()
    assert N == setup["store"].num_rows


def test_top_k_equals_brute_force(setup):
    F, a = setup["F"], setup["a"]
    k = a["top_rows"].shape[1]
    for i in range(F.shape[1]):
        col = F[:, i]
        n_pos = int((col > 0).sum())
        vals, rows = torch.sort(col, descending=True)
        want = min(k, n_pos)
        assert torch.equal(a["top_rows"][i, :want], rows[:want]), i
        assert torch.allclose(a["top_values"][i, :want], vals[:want])
        assert (a["top_rows"][i, want:] == -1).all()


def test_interval_examples_lie_in_their_intervals(setup):
    F, a = setup["F"], setup["a"]
    rows, vals, edges = a["interval_rows"], a["interval_values"], a["interval_edges"]
    m, n, per = rows.shape
    filled = missed = populated = 0
    for i in range(m):
        col = F[:, i]
        for j in range(n):
            lo, hi = edges[i, j].item(), edges[i, j + 1].item()
            members = ((col > 0) & (col >= lo) & ((col < hi) if j < n - 1 else (col <= hi))).sum().item()
            got = rows[i, j][rows[i, j] >= 0]
            assert len(got) == len(set(got.tolist())) <= members
            for r, v in zip(got.tolist(), vals[i, j][: len(got)].tolist()):
                assert col[r].item() == pytest.approx(v)
                assert lo - 1e-6 <= v <= hi + 1e-6
            if members >= per:
                filled += len(got) == per
            if members == 0:
                assert len(got) == 0
            missed += members > 0 and len(got) == 0
            populated += members > 0
    assert filled > 0
    assert missed <= 0.02 * populated  # only partly covered sub-bins at an interval's edge can under-sample


def test_intervals_survive_many_grid_doublings(tmp_path):
    """Activations growing over the stream force the power-of-two grid to merge many times."""
    w = StoreWriter.open(tmp_path / "s", model="m", model_fingerprint="f", hooks={"h": 3}, shard_rows=1000)
    g = torch.Generator().manual_seed(1)
    n = 4000
    x = torch.rand(n, 3, generator=g) * torch.logspace(-3, 3, n)[:, None]
    x[:, 2] = -1.0  # never fires
    w.append({"h": x}, torch.zeros(n), torch.zeros(n), torch.arange(n), torch.arange(n) // 50)
    w.finish()
    out = run_stats(tmp_path / "s", tmp_path / "o", hook="h", batch_size=100, n_intervals=5,
                                per_interval=4, n_correlated=0)
    _, a = read_stats(out)
    for i in range(2):
        for j in range(5):
            lo, hi = a["interval_edges"][i, j].item(), a["interval_edges"][i, j + 1].item()
            got = a["interval_rows"][i, j]
            assert (got >= 0).sum() == 4  # every interval has plenty of members
            v = x[got, i]
            assert ((v >= lo - 1e-6) & (v <= hi + 1e-6)).all()
    assert a["count"][2] == 0 and (a["interval_rows"][2] == -1).all() and (a["top_rows"][2] == -1).all()


def test_decoder_neighbours_brute_force(setup):
    a, sae = setup["a"], setup["sae"]
    W = sae.W_dec.detach()
    Wn = W / W.norm(dim=1, keepdim=True)
    sim = Wn @ Wn.T
    sim.fill_diagonal_(-2)
    t = torch.topk(sim, 3, dim=1)
    assert torch.equal(a["neighbours"], t.indices)
    assert torch.allclose(a["neighbours_cos"], t.values, atol=1e-5)


def test_correlations_brute_force(setup):
    """corr_rows exceeds the store, so every row is in the sample and Pearson r is exact."""
    a, F, store = setup["a"], setup["F"], setup["store"]
    C = np.corrcoef(F.T.double().numpy())
    np.fill_diagonal(C, -np.inf)
    C = np.nan_to_num(C, nan=-np.inf)
    for i in range(F.shape[1]):
        if not np.isfinite(C[i]).any():
            continue
        want = np.sort(C[i])[::-1][:3]
        got = a["corr_features_r"][i].numpy()
        ok = np.isfinite(want)
        assert np.allclose(got[ok], want[ok], atol=1e-4)
        assert np.allclose(C[i, a["corr_features"][i].numpy()[ok]], want[ok], atol=1e-4)
    N = store.rows(np.arange(store.num_rows), hook=NEURONS).double().numpy()
    Fd = F.double().numpy()
    Fz = (Fd - Fd.mean(0)) / Fd.std(0)
    Nz = (N - N.mean(0)) / N.std(0)
    R = np.nan_to_num(Fz.T @ Nz / len(N), nan=-np.inf)
    i = int(torch.argmax(a["count"]))
    assert np.allclose(a["corr_neurons_r"][i].numpy(), np.sort(R[i])[::-1][:3], atol=1e-4)


def test_logit_effects_brute_force(setup):
    a, sae, lm = setup["a"], setup["sae"], setup["lm"]
    W_U = lm.model.get_output_embeddings().weight.detach()
    logits = (sae.W_dec.detach() * lm.model.model.norm.weight.detach()) @ W_U.T
    assert torch.equal(a["logits_pos"], torch.topk(logits, 10, dim=1).indices)
    assert torch.equal(a["logits_neg"], torch.topk(logits, 10, dim=1, largest=False).indices)


def test_contexts_jsonl(setup):
    F, store, out, lm = setup["F"], setup["store"], setup["out"], setup["lm"]
    lines = (out / "contexts.jsonl").read_text().splitlines()
    assert len(lines) == F.shape[1]
    toks, ctx = store.token_ids(), store.context_ids()
    saw_bos = False
    for i in (0, 5, int(torch.argmax(setup["a"]["count"]))):
        rec = json.loads(lines[i])
        assert rec["feature"] == i and len(rec["intervals"]) == 4 and len(rec["logits"]["pos"]) == 10
        for ex in rec["top"] + [e for iv in rec["intervals"] for e in iv["examples"]]:
            r = ex["row"]
            assert ex["acts"][ex["focus"]] == pytest.approx(F[r, i].item(), abs=1e-3)
            assert ex["act"] == pytest.approx(F[r, i].item(), abs=1e-4)
            assert ex["context"] == ctx[r]
            assert ex["tokens"][ex["focus"]] == lm.tokenizer.decode([int(toks[r])])
            start = int(np.searchsorted(ctx, ctx[r]))
            lo = max(start, r - 5)
            hi = min(r + 3, int(np.searchsorted(ctx, ctx[r], side="right")))
            body = ex["tokens"][len(ex["tokens"]) - (hi - lo):]
            assert body == [lm.tokenizer.decode([int(t)]) for t in toks[lo:hi]]
            assert ex["acts"][len(ex["acts"]) - (hi - lo):] == pytest.approx(F[lo:hi, i].tolist(), abs=1e-3)
            if r - 5 <= start:  # the window reaches the context start: the dropped BOS is shown
                assert ex["tokens"][0] == "<bos>" and ex["acts"][0] is None
                saw_bos = True
            else:
                assert len(ex["tokens"]) == hi - lo
    assert saw_bos
    side = setup["side"]
    assert side["format"] == "monoscope.feature_stats" and side["sae"]["d_sae"] == 96
    assert side["store"]["hook"] == HOOK and "pass_s" in side["timings"]
    assert not (out / ".codes.tmp").exists()


def test_relu_sae_and_raw_units(tmp_path, setup):
    root = setup["root"]
    sae = make_sae("relu", seed=3)
    out = run_stats(root / "store", tmp_path / "relu", sae=sae, top_k=5, batch_size=300,
                                n_correlated=2)
    _, a = read_stats(out)
    F = sae.encode(setup["store"].rows(np.arange(setup["store"].num_rows), hook=HOOK)).detach()
    assert torch.equal(a["count"], (F > 0).sum(0))
    i = int(torch.argmax(a["count"]))
    assert torch.equal(a["top_rows"][i], torch.sort(F[:, i], descending=True).indices[:5])
    # raw units of the neuron hook: no SAE, features are the stored values themselves
    out = run_stats(root / "store", tmp_path / "raw", hook=NEURONS, top_k=4, batch_size=500)
    _, a = read_stats(out)
    X = setup["store"].rows(np.arange(setup["store"].num_rows), hook=NEURONS)
    assert a["count"].shape == (64,) and torch.equal(a["count"], (X > 0).sum(0))
    assert torch.equal(a["top_rows"], torch.topk(X, 4, dim=0).indices.T)
    rec = json.loads((out / "contexts.jsonl").read_text().splitlines()[7])
    ex = rec["top"][0]
    assert ex["acts"][ex["focus"]] == pytest.approx(X[ex["row"], 7].item(), abs=1e-3)


def test_reuses_finished_artifact(setup):
    before = (setup["out"] / "stats.json").stat().st_mtime_ns
    run_stats(setup["root"] / "store", setup["out"], sae=setup["sae"], lm=setup["lm"], top_k=7,
                          n_intervals=4, per_interval=3, batch_size=256, n_correlated=3,
                          correlate_with_neurons=NEURONS, context_window=(5, 2))
    assert (setup["out"] / "stats.json").stat().st_mtime_ns == before


def test_errors(setup, tmp_path):
    root = setup["root"]
    other_hook = build_sae(SAEConfig("topk", d_in=32, d_sae=8, k=2, hook_name="layers.0.resid_post"))
    with pytest.raises(MonoscopeError, match="hook"):
        run_stats(root / "store", tmp_path / "x", sae=other_hook)
    other_model = build_sae(SAEConfig("topk", d_in=32, d_sae=8, k=2, hook_name=HOOK, model_name="gpt2"))
    with pytest.raises(MonoscopeError, match="model"):
        run_stats(root / "store", tmp_path / "x", sae=other_model)
    wide = build_sae(SAEConfig("topk", d_in=16, d_sae=8, k=2, hook_name=HOOK))
    with pytest.raises(MonoscopeError, match="d_in"):
        run_stats(root / "store", tmp_path / "x", sae=wide)
    with pytest.raises(MonoscopeError, match="top_k"):
        run_stats(root / "store", tmp_path / "x", sae=setup["sae"], top_k=0)
    with pytest.raises(MonoscopeError, match="no hook"):
        run_stats(root / "store", tmp_path / "x", sae=setup["sae"], correlate_with_neurons="nope")
    with pytest.raises(MonoscopeError, match="does not exist"):
        run_stats(tmp_path / "missing", tmp_path / "x", sae=setup["sae"])


def test_top_k_ties_and_dense_codes(tmp_path):
    """Raw units with many tied values: top-k keeps the earliest rows among equal values (a stable sort),
    across many flushes of the candidate buffer; dense-ish codes take the sparse × dense product path of
    the correlations; torch's thread count is restored."""
    g = torch.Generator().manual_seed(2)
    n, d = 1200, 12
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    w = StoreWriter.open(tmp_path / "s", model="m", model_fingerprint="f", hooks={"h": d}, shard_rows=500)
    w.append({"h": x}, torch.zeros(n), torch.zeros(n), torch.arange(n), torch.arange(n) // 40)
    w.finish()
    threads = torch.get_num_threads()
    out = run_stats(tmp_path / "s", tmp_path / "o", hook="h", top_k=9, batch_size=100, n_correlated=3)
    assert torch.get_num_threads() == threads
    _, a = read_stats(out)
    want = torch.sort(x, dim=0, descending=True, stable=True)
    assert torch.equal(a["top_rows"], want.indices[:9].T)
    assert torch.equal(a["top_values"], want.values[:9].T)
    # Pearson r of the positive parts (only those are kept), every row sampled
    C = np.corrcoef(x.clamp_min(0).double().numpy().T)
    np.fill_diagonal(C, -np.inf)
    for i in range(d):
        assert np.allclose(a["corr_features_r"][i].numpy(), np.sort(C[i])[::-1][:3], atol=1e-5)
        assert np.allclose(C[i, a["corr_features"][i].numpy()], np.sort(C[i])[::-1][:3], atol=1e-5)
