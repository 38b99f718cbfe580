"""Adaptive thresholding, the sparse-probing paper's main selection, and the ranking primitives it shares.

Both ``select`` (rankers and the k sweep) and ``osp`` (optimal sparse probing, warm-started from
adaptive thresholding on its mean-difference pool) build on this module; it imports neither, so the
probing modules form a one-way chain: probe <- adaptive <- osp <- select.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from threadpoolctl import threadpool_limits

from monoscope.errors import MonoscopeError, warn
from monoscope.probing.probe import (
    balanced_weights,
    check_labels,
    check_X,
    fit_logistic,
    fit_standardizer,
)

__all__ = [
    "DEFAULT_KS",
    "prepare_train",
    "order_by_score",
    "mean_diff_score",
    "adaptive_l1_ratio",
    "usable_ks",
    "adaptive_thresholding",
    "adaptive_supports",
]

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256)


def prepare_train(X, y):
    """Checked float train matrix and 0/1 labels."""
    X = check_X(X, "X_train")
    y01, _ = check_labels(y, X.shape[0], "y_train")
    return X, y01


def order_by_score(score: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices by descending score; equal scores keep ``tiebreak`` order (or index order)."""
    base = np.arange(len(score)) if tiebreak is None else np.asarray(tiebreak)
    return base[np.argsort(-score[base], kind="stable")]


def mean_diff_score(Z: np.ndarray, y01: np.ndarray) -> np.ndarray:
    """|mean(class 1) - mean(class 0)| per column of an (already standardised) matrix."""
    return np.abs(Z[y01 == 1].mean(axis=0) - Z[y01 == 0].mean(axis=0))


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
        warn(f"{where}: dropping k={dropped} (only {p} features available)")
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
    X, y01 = prepare_train(X_train, y_train)
    ks = usable_ks(ks, X.shape[1], "adaptive_thresholding")
    with threadpool_limits(1):  # small dense solves: extra BLAS threads only contend
        return adaptive_supports(X, y01, ks)


def adaptive_supports(X: np.ndarray, y01: np.ndarray, ks: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``adaptive_thresholding`` on checked inputs and sorted usable ``ks`` (no thread limit of its own)."""
    mean, scale = fit_standardizer(X)
    ranking = order_by_score(mean_diff_score((X - mean) / scale, y01))
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
