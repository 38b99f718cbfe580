"""Sparse-probing speed and optimality, printed side by side.

(a) The adaptive-thresholding k sweep (select + L2 refit + score, every k of the paper's grid) against a
    straightforward scikit-learn re-implementation of the paper's per-k procedure: time ratio, max |dF1|.
(b) Optimal sparse probing for k = 1..8 over a 50-feature pool: time, gap and certification per k.

    python benchmarks/probe.py                 # synthetic: 2,048 features x 4,000 examples
    python benchmarks/probe.py --npz acts.npz  # real activations: arrays X (n x d) and y (n,), optional groups
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from monoscope.probing import (
    DEFAULT_KS,
    adaptive_l1_ratio,
    optimal_sparse_probe_path,
    split_by_sequence,
    sweep,
)


def synthetic(n: int = 4000, d: int = 2048, seed: int = 0):
    """A planted sparse signal (8 features) buried in correlated noise (shared low-rank factors)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    factors = rng.standard_normal((n, 16))
    X = rng.standard_normal((n, d)) + factors @ rng.standard_normal((16, d)) * 0.5
    signal = rng.choice(d, 8, replace=False)
    X[:, signal] += np.outer(y, rng.uniform(0.8, 2.0, 8))
    X = np.maximum(X, 0) + 0.1 * X  # GELU-ish: skewed like MLP activations
    return X, y, None


def sklearn_adaptive_sweep(X_train, y_train, X_test, y_test, ks, tol=1e-4):
    """The straightforward version: scikit-learn everywhere, one saga elastic-net fit per k, L2 refit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_train)
    Z_train, Z_test = scaler.transform(X_train), scaler.transform(X_test)
    current = None
    f1 = {}
    for k in sorted(ks, reverse=True):
        if current is None:  # rank by |mean difference| of standardised activations
            diff = np.abs(Z_train[y_train == 1].mean(0) - Z_train[y_train == 0].mean(0))
            current = np.argsort(-diff, kind="stable")[:k]
        current = current[:k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # saga's ConvergenceWarning
            en = LogisticRegression(
                C=k / 20, l1_ratio=adaptive_l1_ratio(k), solver="saga", class_weight="balanced", max_iter=1000,
                tol=tol,
            ).fit(Z_train[:, current], y_train)
        current = current[np.argsort(-np.abs(en.coef_[0]), kind="stable")]
        probe = LogisticRegression(class_weight="balanced", max_iter=1000).fit(Z_train[:, current], y_train)
        f1[k] = f1_score(y_test, probe.predict(Z_test[:, current]))
    return f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", help="file with arrays X, y (and optionally groups) instead of synthetic data")
    parser.add_argument("--osp-pool", type=int, default=50)
    parser.add_argument("--osp-max-k", type=int, default=8)
    parser.add_argument("--osp-time-limit", type=float, default=10.0, help="seconds per k")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.npz:
        data = np.load(args.npz)
        X, y = data["X"], data["y"]
        groups = data["groups"] if "groups" in data else None
    else:
        X, y, groups = synthetic(seed=args.seed)
    train, test = split_by_sequence(len(y) if groups is None else groups, y, seed=args.seed)
    X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]
    ks = [k for k in DEFAULT_KS if k <= X.shape[1]]
    print(f"data: {X.shape[0]} examples x {X.shape[1]} features, {len(train)} train / {len(test)} test, "
          f"{y.mean():.2f} positive")

    # both sides single-threaded BLAS: fair on a shared machine, and small solves gain nothing from threads
    with threadpool_limits(1):
        t = time.perf_counter()
        rows = sweep(X_train, y_train, X_test, y_test, ks=ks, methods=["adaptive"])
        ours_s = time.perf_counter() - t
        refs = {}
        for tol in (1e-4, 1e-6):  # scikit-learn's default tol, and a tighter one closer to convergence
            t = time.perf_counter()
            f1 = sklearn_adaptive_sweep(X_train, y_train, X_test, y_test, ks, tol=tol)
            refs[tol] = (f1, time.perf_counter() - t)
    ours = {r["k"]: r["f1"] for r in rows}
    print("\n(a) adaptive thresholding, full k sweep (select + refit + score)")
    print(f"{'k':>5} {'F1 ours':>8} {'sklearn tol=1e-4':>17} {'sklearn tol=1e-6':>17}")
    for k in ks:
        print(f"{k:>5} {ours[k]:>8.4f} {refs[1e-4][0][k]:>17.4f} {refs[1e-6][0][k]:>17.4f}")
    print(f"monoscope: {ours_s:.2f} s")
    for tol, (f1, ref_s) in refs.items():
        worst = max(abs(ours[k] - f1[k]) for k in ks)
        print(f"sklearn saga tol={tol:g}: {ref_s:.2f} s | speed-up {ref_s / ours_s:.1f}x | max |dF1| {worst:.4f}")

    print(f"\n(b) optimal sparse probing over the top {args.osp_pool} features by mean difference")
    osp_ks = list(range(1, args.osp_max_k + 1))
    t = time.perf_counter()
    results = optimal_sparse_probe_path(
        X_train, y_train, osp_ks, pool=args.osp_pool, time_limit=args.osp_time_limit
    )
    print(f"{'k':>3} {'time s':>7} {'objective':>10} {'lower':>10} {'gap':>8} {'certified':>9} {'cuts':>5}  features")
    for r in results:
        print(f"{r.k:>3} {r.time_s:>7.2f} {r.objective:>10.3f} {r.lower_bound:>10.3f} {r.gap:>8.2%} "
              f"{str(r.certified):>9} {r.n_cuts:>5}  {list(map(int, r.features))}")
    print(f"OSP total {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
