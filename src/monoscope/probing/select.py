"""Choosing which k features a sparse probe may use, and the k sweep.

Every ranker sees the TRAIN split only and returns all feature indices ordered best first, so one ranking
serves every k (top-k is a prefix).  ``adaptive_thresholding`` is the paper's main procedure: it returns
its own nested supports because each k's choice depends on the fit at the larger k before it.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Iterable

import numpy as np

from monoscope.errors import MonoscopeError
from threadpoolctl import threadpool_limits

from monoscope.probing.probe import (
    _fit_probe,
    balanced_weights,
    binary_metrics,
    check_labels,
    check_X,
    fit_logistic,
    fit_standardizer,
    standardize,
)

__all__ = [
    "DEFAULT_KS",
    "RANKERS",
    "rank_features",
    "mean_diff",
    "f_stat",
    "mutual_info",
    "l1_logreg",
    "random_rank",
    "adaptive_thresholding",
    "adaptive_l1_ratio",
    "usable_ks",
    "sweep",
]

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256)


def _prepare(X, y):
    X = check_X(X, "X_train")
    y01, _ = check_labels(y, X.shape[0], "y_train")
    return X, y01


def _order(score: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices by descending score; equal scores keep ``tiebreak`` order (or index order)."""
    base = np.arange(len(score)) if tiebreak is None else np.asarray(tiebreak)
    return base[np.argsort(-score[base], kind="stable")]


# ----------------------------------------------------------------------------------------------------
# rankers
# ----------------------------------------------------------------------------------------------------

def _mean_diff_score(Z: np.ndarray, y01: np.ndarray) -> np.ndarray:
    return np.abs(Z[y01 == 1].mean(axis=0) - Z[y01 == 0].mean(axis=0))


def mean_diff(X_train, y_train, seed: int = 0) -> np.ndarray:
    """|mean(class 1) - mean(class 0)| of activations standardised by the train std."""
    X, y01 = _prepare(X_train, y_train)
    _, scale = fit_standardizer(X)
    return _order(_mean_diff_score(X / scale, y01))


def _f_score(X: np.ndarray, y01: np.ndarray) -> np.ndarray:
    """One-way ANOVA F for two groups (same as scipy.stats.f_oneway / sklearn f_classif)."""
    n = len(y01)
    groups = [X[y01 == c] for c in (0, 1)]
    grand = X.mean(axis=0)
    between = sum(len(g) * (g.mean(axis=0) - grand) ** 2 for g in groups)  # 1 degree of freedom
    within = sum(((g - g.mean(axis=0)) ** 2).sum(axis=0) for g in groups) / (n - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        F = between / within
    # a constant feature carries nothing; a feature constant within each class separates perfectly
    return np.where(within > 0, F, np.where(between > 0, np.inf, 0.0))


def f_stat(X_train, y_train, seed: int = 0) -> np.ndarray:
    """ANOVA F statistic between the two classes, ties broken by mean difference."""
    X, y01 = _prepare(X_train, y_train)
    return _order(_f_score(X, y01), mean_diff(X, y01))


def mutual_info(X_train, y_train, seed: int = 0) -> np.ndarray:
    """scikit-learn's k-NN estimate of mutual information with the label (slowest ranker)."""
    from sklearn.feature_selection import mutual_info_classif

    X, y01 = _prepare(X_train, y_train)
    _, scale = fit_standardizer(X)
    mi = mutual_info_classif(X / scale, y01, random_state=seed)
    return _order(mi, mean_diff(X, y01))


def l1_logreg(X_train, y_train, seed: int = 0, n_nonzero: int = 256) -> np.ndarray:
    """|coef| of a balanced L1 logistic regression, with C raised until >= n_nonzero features are used.

    C starts at the smallest value with any non-zero coefficient and doubles (scikit-learn's liblinear
    solver) until enough features are non-zero; features still at zero, and ties, follow mean difference.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import l1_min_c

    X, y01 = _prepare(X_train, y_train)
    mean, scale = fit_standardizer(X)
    Z = standardize(X, mean, scale)
    fallback = _order(_mean_diff_score(Z, y01))
    target = min(n_nonzero, X.shape[1])
    C = l1_min_c(Z, y01, loss="log") * 2.0
    coef = np.zeros(X.shape[1])
    for _ in range(30):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(
                l1_ratio=1.0, C=C, solver="liblinear", class_weight="balanced", random_state=seed, max_iter=1000
            ).fit(Z, y01)
        coef = model.coef_[0]
        if np.count_nonzero(coef) >= target:
            break
        C *= 2.0
    return _order(np.abs(coef), fallback)


def random_rank(X_train, y_train, seed: int = 0) -> np.ndarray:
    """A seeded random order: the baseline any real ranking must beat."""
    X, _ = _prepare(X_train, y_train)
    return np.random.default_rng(seed).permutation(X.shape[1])


RANKERS: dict[str, Callable[..., np.ndarray]] = {
    "mean_diff": mean_diff,
    "f_stat": f_stat,
    "mutual_info": mutual_info,
    "l1_logreg": l1_logreg,
    "random": random_rank,
}


def rank_features(method: str, X_train, y_train, seed: int = 0) -> np.ndarray:
    """Rank with a method from RANKERS by name."""
    if method not in RANKERS:
        raise MonoscopeError(f"unknown ranking method {method!r}; choose one of {sorted(RANKERS)}.")
    return RANKERS[method](X_train, y_train, seed=seed)


# ----------------------------------------------------------------------------------------------------
# adaptive thresholding
# ----------------------------------------------------------------------------------------------------

def adaptive_l1_ratio(k: int) -> float:
    """The paper's schedule: more L1 as k shrinks, clip(exp(-k/20), 0.1, 0.9)."""
    return float(np.clip(math.exp(-k / 20.0), 0.1, 0.9))


def usable_ks(ks: Iterable[int], p: int, where: str = "sweep") -> list[int]:
    """Sorted distinct ks; those above the feature count are dropped with a warning (a grid, not a typo)."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise MonoscopeError(f"{where} needs at least one k.")
    if ks[0] < 1:
        raise MonoscopeError(f"k values must be >= 1, got {ks[0]}.")
    dropped = [k for k in ks if k > p]
    if dropped:
        warnings.warn(f"{where}: dropping k={dropped} (only {p} features available).", stacklevel=3)
    kept = [k for k in ks if k <= p]
    if not kept:
        raise MonoscopeError(f"{where}: every k in {ks} exceeds the {p} available features; use k <= {p}.")
    return kept


def adaptive_thresholding(X_train, y_train, ks=DEFAULT_KS) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The paper's telescoping selection; returns ``{k: (features best first, elastic-net coef)}``.

    Start from the top max(k) features by mean difference.  For each k from largest to smallest: fit a
    balanced elastic-net logistic regression on the current k features with C = k/20 and
    l1_ratio = clip(exp(-k/20), 0.1, 0.9) (sparser as k shrinks), order those features by |coef| (ties
    keep the previous order), and hand the first next-k of them to the next, smaller k.

    The supports are nested, so each fit is warm-started from the previous one's coefficients, and the
    ranking is computed once; the solver is the dense proximal Newton in ``probe.fit_logistic``.
    """
    X, y01 = _prepare(X_train, y_train)
    ks = usable_ks(ks, X.shape[1], "adaptive_thresholding")
    with threadpool_limits(1):  # small dense solves: extra BLAS threads only contend
        return _adaptive(X, y01, ks)


def _adaptive(X, y01, ks):
    mean, scale = fit_standardizer(X)
    ranking = _order(_mean_diff_score((X - mean) / scale, y01))
    current = ranking[: ks[-1]]
    Z_all = (X[:, current] - mean[current]) / scale[current]  # standardise only what can be used
    cols = np.arange(len(current))  # positions of `current` inside Z_all
    s = balanced_weights(y01)
    w, b = None, 0.0
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in reversed(ks):
        cols = cols[:k]
        w0 = None if w is None else w[:k]
        w, b = fit_logistic(
            np.ascontiguousarray(Z_all[:, cols]), y01, C=k / 20.0, l1_ratio=adaptive_l1_ratio(k),
            sample_weight=s, w0=w0, b0=b,
        )
        order = np.argsort(-np.abs(w), kind="stable")
        cols, w = cols[order], w[order]
        out[k] = (current[cols], w.copy())
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------

def sweep(
    X_train,
    y_train,
    X_test,
    y_test,
    ks=DEFAULT_KS,
    methods=("adaptive", "mean_diff", "f_stat", "l1_logreg", "random"),
    C: float = 1.0,
    seed: int = 0,
    osp_options: dict | None = None,
) -> list[dict]:
    """Fit and score a k-sparse L2 probe for every (method, k); returns tidy rows, one per probe.

    Methods: any name in RANKERS, "adaptive" (adaptive thresholding) and "osp" (optimal sparse probing,
    only for k <= osp_options.get("max_k", 8) since it is exponential in k).  Each row holds method, k,
    features, the held-out metrics and ``fit_s``: seconds spent selecting (shared ranking time is
    charged to the first k) plus fitting that probe; OSP rows add osp_objective, osp_gap, certified.
    """
    X_train = check_X(X_train, "X_train")
    X_test = check_X(X_test, "X_test")
    y01, classes = check_labels(y_train, X_train.shape[0], "y_train")
    if X_test.shape[1] != X_train.shape[1]:
        raise MonoscopeError(
            f"X_test has {X_test.shape[1]} features but X_train has {X_train.shape[1]}; use the same columns."
        )
    ks = usable_ks(ks, X_train.shape[1])
    known = set(RANKERS) | {"adaptive", "osp"}
    for m in methods:
        if m not in known:
            raise MonoscopeError(f"unknown sweep method {m!r}; choose from {sorted(known)}.")
    y_test01 = _test_labels(y_test, classes, X_test.shape[0])
    rows = []
    with threadpool_limits(1):
        for method in methods:
            rows.extend(_sweep_method(method, X_train, y01, classes, X_test, y_test01, ks, C, seed, osp_options))
    return rows


def _test_labels(y_test, classes, n_rows):
    y_test = np.asarray(y_test)
    if y_test.shape != (n_rows,):
        raise MonoscopeError(f"y_test has shape {y_test.shape} but X_test has {n_rows} rows; pass one label per row.")
    unknown = ~np.isin(y_test, classes)
    if unknown.any():
        raise MonoscopeError(
            f"y_test has labels {np.unique(y_test[unknown])[:5]!r} not seen in y_train ({classes!r})."
        )
    return (y_test == classes[1]).astype(np.int8)


def _sweep_method(method, X_train, y01, classes, X_test, y_test01, ks, C, seed, osp_options):
    t0 = time.perf_counter()
    extra: dict[int, dict] = {}
    if method == "adaptive":
        chosen = {k: f for k, (f, _) in _adaptive(X_train, y01, ks).items()}
    elif method == "osp":
        from monoscope.probing.osp import optimal_sparse_probe_path

        opts = dict(osp_options or {})
        max_k = opts.pop("max_k", 8)
        osp_ks = [k for k in ks if k <= max_k]
        if not osp_ks:
            return []
        results = optimal_sparse_probe_path(X_train, y01, osp_ks, **opts)
        chosen = {r.k: r.features for r in results}
        extra = {r.k: {"osp_objective": r.objective, "osp_gap": r.gap, "certified": r.certified} for r in results}
    else:
        ranking = rank_features(method, X_train, y01, seed=seed)
        chosen = {k: ranking[:k] for k in ks}
    overhead = time.perf_counter() - t0
    rows = []
    for k in sorted(chosen):
        t1 = time.perf_counter()
        probe = _fit_probe(X_train, y01, classes, np.asarray(chosen[k], dtype=np.intp), C)
        fit_s = time.perf_counter() - t1 + overhead
        overhead = 0.0
        row = {"method": method, "k": k, "features": [int(i) for i in chosen[k]]}
        row.update(binary_metrics(y_test01, probe.decision_function(X_test)))
        row["fit_s"] = fit_s
        row.update(extra.get(k, {}))
        rows.append(row)
    return rows
