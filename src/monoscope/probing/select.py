"""Choosing which k features a sparse probe may use, and the k sweep.

Every ranker sees the TRAIN split only and returns all feature indices ordered best first, so one ranking
serves every k (top-k is a prefix).  ``adaptive_thresholding`` (defined in ``adaptive.py`` and
re-exported here) is the paper's main procedure: it returns its own nested supports because each k's
choice depends on the fit at the larger k before it.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from monoscope.errors import MonoscopeError
from monoscope.probing.adaptive import (
    DEFAULT_KS,
    adaptive_l1_ratio,
    adaptive_supports,
    adaptive_thresholding,
    mean_diff_score,
    order_by_score,
    prepare_train,
    usable_ks,
)
from monoscope.probing.osp import optimal_sparse_probe_path
from monoscope.probing.probe import _fit_probe, binary_metrics, check_labels, check_X, fit_standardizer, standardize

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

# ----------------------------------------------------------------------------------------------------
# rankers
# ----------------------------------------------------------------------------------------------------

def mean_diff(X_train, y_train, seed: int = 0) -> np.ndarray:
    """|mean(class 1) - mean(class 0)| of activations standardised by the train std."""
    X, y01 = prepare_train(X_train, y_train)
    _, scale = fit_standardizer(X)
    return order_by_score(mean_diff_score(X / scale, y01))


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
    X, y01 = prepare_train(X_train, y_train)
    return order_by_score(_f_score(X, y01), mean_diff(X, y01))


def mutual_info(X_train, y_train, seed: int = 0) -> np.ndarray:
    """scikit-learn's k-NN estimate of mutual information with the label (slowest ranker)."""
    from sklearn.feature_selection import mutual_info_classif

    X, y01 = prepare_train(X_train, y_train)
    _, scale = fit_standardizer(X)
    mi = mutual_info_classif(X / scale, y01, random_state=seed)
    return order_by_score(mi, mean_diff(X, y01))


def l1_logreg(X_train, y_train, seed: int = 0, n_nonzero: int = 256) -> np.ndarray:
    """|coef| of a balanced L1 logistic regression, with C raised until >= n_nonzero features are used.

    C starts at the smallest value with any non-zero coefficient and doubles (scikit-learn's liblinear
    solver) until enough features are non-zero; features still at zero, and ties, follow mean difference.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import l1_min_c

    X, y01 = prepare_train(X_train, y_train)
    mean, scale = fit_standardizer(X)
    Z = standardize(X, mean, scale)
    fallback = order_by_score(mean_diff_score(Z, y01))
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
    return order_by_score(np.abs(coef), fallback)


def random_rank(X_train, y_train, seed: int = 0) -> np.ndarray:
    """A seeded random order: the baseline any real ranking must beat."""
    X, _ = prepare_train(X_train, y_train)
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
    known = set(RANKERS) | {"adaptive", "osp", "dense"}
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
    if method == "dense":  # the ceiling: one L2 probe on every column (its row's k is the column count)
        chosen = {X_train.shape[1]: np.arange(X_train.shape[1])}
    elif method == "adaptive":
        chosen = {k: f for k, (f, _) in adaptive_supports(X_train, y01, ks).items()}
    elif method == "osp":
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
