"""Sparse-probing speed and optimality, printed side by side.

(a) The adaptive-thresholding k sweep (select + L2 refit + score, every k of the paper's grid) against a
    straightforward scikit-learn re-implementation of the paper's per-k procedure: time ratio, max |dF1|.
(b) Optimal sparse probing for k = 1..8 over a 50-feature pool: time, gap and certification per k.

    python benchmarks/probe.py                 # synthetic: 2,048 features x 4,000 examples
    python benchmarks/probe.py --real          # Gemma 3 270M layers.6.mlp_neurons on is_python_code (3,848)
    python benchmarks/probe.py --osp-real      # (b) only, on the sae-probes code-language datasets
    python benchmarks/probe.py --npz acts.npz  # real activations: arrays X (n x d) and y (n,), optional groups

The scikit-learn baseline runs twice: converged (saga tol 1e-10, up to 10^5 epochs, L2 refit to tol 1e-10;
every fit is checked for n_iter_ < max_iter and ConvergenceWarnings), so |dF1| compares like with like, and
at scikit-learn's default tol (1e-4) for context.  Real activations are cached under
monoscope.models.cache_dir()/probe-activations (the first run is minutes of forward passes on a CPU).
"""
from __future__ import annotations

import argparse
import platform
import sys
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


HOOK = "layers.6.mlp_neurons"
CODE_DATASETS = ("sae-probes:158_code_C", "sae-probes:159_code_Python", "sae-probes:160_code_HTML")


def gemma_activations(name: str, n: int, hook: str = HOOK):
    """Gemma 3 270M activations at ``hook`` for ``n`` examples of a probing dataset (cached on disk)."""
    import monoscope.models
    from monoscope.probing.activations import probe_activations
    from monoscope.probing.datasets import load_dataset

    lm = monoscope.models.load_model("gemma-3-270m")
    ds = load_dataset(name, n)
    cache = monoscope.models.cache_dir() / "probe-activations"
    X = probe_activations(lm, ds, [hook], max_length=64, cache_dir=cache)[hook]
    return X.astype(np.float64), np.asarray(ds.labels).astype(int), ds.groups


def sklearn_adaptive_sweep(X_train, y_train, X_test, y_test, ks, tol=1e-4, max_iter=1000, refit_tol=1e-4):
    """The straightforward version: scikit-learn everywhere, one saga elastic-net fit per k, L2 refit.

    Returns ({k: F1}, notes): notes counts fits that hit max_iter and ConvergenceWarnings raised.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_train)
    Z_train, Z_test = scaler.transform(X_train), scaler.transform(X_test)
    current = None
    f1 = {}
    notes = {"hit_max_iter": 0, "convergence_warnings": 0, "max_epochs": 0}
    for k in sorted(ks, reverse=True):
        if current is None:  # rank by |mean difference| of standardised activations
            diff = np.abs(Z_train[y_train == 1].mean(0) - Z_train[y_train == 0].mean(0))
            current = np.argsort(-diff, kind="stable")[:k]
        current = current[:k]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            en = LogisticRegression(
                C=k / 20, l1_ratio=adaptive_l1_ratio(k), solver="saga", class_weight="balanced",
                max_iter=max_iter, tol=tol,
            ).fit(Z_train[:, current], y_train)
            current = current[np.argsort(-np.abs(en.coef_[0]), kind="stable")]
            probe = LogisticRegression(class_weight="balanced", max_iter=max(max_iter, 1000), tol=refit_tol).fit(
                Z_train[:, current], y_train
            )
        notes["convergence_warnings"] += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        notes["hit_max_iter"] += int(en.n_iter_[0] >= max_iter) + int(probe.n_iter_[0] >= max(max_iter, 1000))
        notes["max_epochs"] = max(notes["max_epochs"], int(en.n_iter_[0]))
        f1[k] = f1_score(y_test, probe.predict(Z_test[:, current]))
    return f1, notes


BASELINES = {  # name: options of sklearn_adaptive_sweep
    "converged": dict(tol=1e-10, max_iter=100_000, refit_tol=1e-10),
    "default tol": dict(tol=1e-4, max_iter=1000, refit_tol=1e-4),
}


def run_sweep(X, y, groups, seed: int, repeats: int) -> dict:
    """(a): ours vs both baselines, alternated ``repeats`` times in one process; medians of the times."""
    train, test = split_by_sequence(len(y) if groups is None else groups, y, seed=seed)
    X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]
    ks = [k for k in DEFAULT_KS if k <= X.shape[1]]
    print(f"data: {X.shape[0]} examples x {X.shape[1]} features, {len(train)} train / {len(test)} test, "
          f"{y.mean():.2f} positive")
    times = {"monoscope": [], **{name: [] for name in BASELINES}}
    refs = {}
    # all sides single-threaded BLAS: fair on a shared machine, and small solves gain nothing from threads
    with threadpool_limits(1):
        for _ in range(repeats):
            t = time.perf_counter()
            rows = sweep(X_train, y_train, X_test, y_test, ks=ks, methods=["adaptive"])
            times["monoscope"].append(time.perf_counter() - t)
            for name, options in BASELINES.items():
                t = time.perf_counter()
                refs[name] = sklearn_adaptive_sweep(X_train, y_train, X_test, y_test, ks, **options)
                times[name].append(time.perf_counter() - t)
    ours = {r["k"]: r["f1"] for r in rows}
    print("\n(a) adaptive thresholding, full k sweep (select + refit + score)")
    print(f"{'k':>5} {'F1 ours':>8} " + " ".join(f"{'sklearn ' + n:>20}" for n in BASELINES))
    for k in ks:
        print(f"{k:>5} {ours[k]:>8.4f} " + " ".join(f"{refs[n][0][k]:>20.4f}" for n in BASELINES))
    ours_s = float(np.median(times["monoscope"]))
    print(f"monoscope: median {ours_s:.2f} s of {repeats}")
    summary = {"ours_s": ours_s, "n": X.shape[0], "d": X.shape[1]}
    for name, options in BASELINES.items():
        f1, notes = refs[name]
        ref_s = float(np.median(times[name]))
        worst = max(abs(ours[k] - f1[k]) for k in ks)
        print(f"sklearn {name} (saga tol={options['tol']:g}, max_iter={options['max_iter']}): median {ref_s:.2f} s | "
              f"speed-up {ref_s / ours_s:.1f}x | max |dF1| {worst:.4f} | fits at max_iter {notes['hit_max_iter']}, "
              f"ConvergenceWarnings {notes['convergence_warnings']}, most saga epochs {notes['max_epochs']}")
        summary[name] = (ref_s, ref_s / ours_s, worst, notes)
    return summary


def load_compiled_kernels() -> float:
    """Compile (first run after install, ~10 s) or load from numba's disk cache the OSP kernels: seconds."""
    t = time.perf_counter()
    X, y, _ = synthetic(n=80, d=12)
    optimal_sparse_probe_path(X, y, [1, 2], pool=6)
    return time.perf_counter() - t


def run_osp(X, y, groups, seed: int, pool: int, max_k: int, time_limit: float, label: str = "") -> list:
    """(b): optimal sparse probing for k = 1..max_k on the train split; prints and returns the results."""
    train, _ = split_by_sequence(len(y) if groups is None else groups, y, seed=seed)
    print(f"\n(b) optimal sparse probing {label}over the top {pool} features by mean difference "
          f"({len(train)} train examples, {time_limit:g} s limit per k)")
    t = time.perf_counter()
    results = optimal_sparse_probe_path(X[train], y[train], list(range(1, max_k + 1)), pool=pool, time_limit=time_limit)
    print(f"{'k':>3} {'time s':>7} {'objective':>10} {'lower':>10} {'gap':>8} {'certified':>9} {'cuts':>5}  features")
    for r in results:
        print(f"{r.k:>3} {r.time_s:>7.2f} {r.objective:>10.3f} {r.lower_bound:>10.3f} {r.gap:>8.2%} "
              f"{str(r.certified):>9} {r.n_cuts:>5}  {list(map(int, r.features))}")
    print(f"OSP total {time.perf_counter() - t:.1f} s")
    return results


def machine_note() -> str:
    import os

    return f"{os.cpu_count()} CPU cores (shared), {platform.machine()}, Python {platform.python_version()}, 1 BLAS thread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", help="file with arrays X, y (and optionally groups) instead of synthetic data")
    parser.add_argument("--real", action="store_true",
                        help=f"Gemma 3 270M {HOOK} on is_python_code (~4,000 examples) instead of synthetic data")
    parser.add_argument("--osp-real", action="store_true",
                        help="only (b), on Gemma activations of the sae-probes code-language datasets")
    parser.add_argument("--osp-examples", type=int, default=1000, help="examples per dataset for --osp-real")
    parser.add_argument("--osp-pool", type=int, default=50)
    parser.add_argument("--osp-max-k", type=int, default=8)
    parser.add_argument("--osp-time-limit", type=float, default=10.0, help="seconds per k")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for (a); medians are reported")
    parser.add_argument("--skip-osp", action="store_true", help="only (a)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    command = "python benchmarks/probe.py " + " ".join(sys.argv[1:])

    if not args.skip_osp:
        import numba

        print(f"OSP kernels compiled or loaded in {load_compiled_kernels():.1f} s (once per process, not timed below); "
              f"{numba.get_num_threads()} numba threads")
    if args.osp_real:
        all_results = {}
        for name in CODE_DATASETS:
            X, y, groups = gemma_activations(name, args.osp_examples)
            all_results[name] = run_osp(X, y, groups, args.seed, args.osp_pool, args.osp_max_k, args.osp_time_limit,
                                        label=f"on {name} ({HOOK}) ")
        print(f"\n## summary\n`{command}` ({machine_note()}; Gemma 3 270M {HOOK}, last token, max_length 64)\n")
        print("| dataset | " + " | ".join(f"k={k}" for k in range(1, args.osp_max_k + 1)) + " |")
        print("|---|" + "---|" * args.osp_max_k)
        for name, results in all_results.items():
            cells = [f"{r.time_s:.1f} s, {'certified' if r.certified else f'gap {r.gap:.1%}'}" for r in results]
            print(f"| {name.split(':', 1)[1]} | " + " | ".join(cells) + " |")
        return

    if args.npz:
        data = np.load(args.npz)
        X, y = data["X"], data["y"]
        groups = data["groups"] if "groups" in data else None
        source = args.npz
    elif args.real:
        X, y, groups = gemma_activations("is_python_code", 4000)
        source = f"Gemma 3 270M {HOOK} on is_python_code"
    else:
        X, y, groups = synthetic(seed=args.seed)
        source = "synthetic (planted 8-feature signal)"
    summary = run_sweep(X, y, groups, args.seed, args.repeats)
    results = [] if args.skip_osp else run_osp(X, y, groups, args.seed, args.osp_pool, args.osp_max_k,
                                               args.osp_time_limit)
    print(f"\n## summary\n`{command}` ({machine_note()}; {source}, {summary['n']} x {summary['d']})\n")
    print(f"- adaptive thresholding, full k sweep: monoscope {summary['ours_s']:.2f} s (median of {args.repeats})")
    for name in BASELINES:
        ref_s, ratio, worst, notes = summary[name]
        print(f"  - vs scikit-learn {name}: {ref_s:.2f} s, {ratio:.1f}x faster, max |dF1| {worst:.4f} "
              f"({notes['hit_max_iter']} fits at max_iter, {notes['convergence_warnings']} ConvergenceWarnings)")
    if results:
        cells = ", ".join(f"k={r.k} {r.time_s:.1f} s {'certified' if r.certified else f'gap {r.gap:.1%}'}"
                          for r in results)
        print(f"- OSP (pool {args.osp_pool}, {args.osp_time_limit:g} s limit): {cells}")


if __name__ == "__main__":
    main()
