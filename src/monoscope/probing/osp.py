"""Optimal sparse probing: the provably best k features of a pool for a hinge-loss + ridge SVM.

For a support s (a 0/1 vector over the pool) the inner problem is the SVM restricted to those columns,

    c(s) = min_{w, b}  sum_i h_i * max(0, 1 - y_i (x_i . w + b)) + |w|^2 / (2 gamma),   w_j = 0 off s,

with labels y_i = +-1, per-row weights h_i (balanced class weights by default) and an unpenalised
intercept.  Its dual is, with v_j(alpha) = sum_i alpha_i y_i x_ij,

    c(s) = max_alpha  sum_i alpha_i - (gamma/2) * sum_j s_j v_j(alpha)^2
           over 0 <= alpha_i <= h_i,  sum_i alpha_i y_i = 0,

and the primal weights are w_j = gamma * v_j(alpha*).  The feasible set does not depend on s, so c is a
maximum of functions *linear* in s, hence convex, and for ANY feasible alpha

    c(s) >= sum_i alpha_i - (gamma/2) * sum_j s_j v_j(alpha)^2         (the cut)

with equality at s = s_bar when alpha = alpha*(s_bar).  This is exactly the outer-approximation cut
t >= c(s_bar) + grad c(s_bar).(s - s_bar) with d c / d s_j = -(gamma/2) v_j(alpha*)^2; writing it in the
form above shows it stays valid (a true lower bound) even when the inner solve is slightly inexact.

Two ways to close the gap, both certified by the same bounds:

- enumeration (k-subsets of the pool few enough, e.g. k <= 4 of 50 features): every subset is solved by a
  compiled smoothed-Newton SVM (svm_kernel.py) only until its own dual bound clears the incumbent, so the
  smallest bound over all subsets is a proof; most subsets need one or two Newton steps;
- outer approximation (larger k): the master MILP  min t  s.t.  sum_j s_j = k,  s binary,  t >= every cut
  so far, solved by HiGHS, gives a lower bound and a candidate s_bar; solving the inner SVM at s_bar gives
  a new cut and an upper bound (the primal objective of an actual (w, b)).  Repeat until the bounds meet.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from monoscope.errors import MonoscopeError
from monoscope.probing.adaptive import adaptive_thresholding, mean_diff_score, order_by_score
from monoscope.probing.probe import (
    _check_k,
    balanced_weights,
    check_labels,
    check_X,
    fit_standardizer,
    standardize,
)

__all__ = ["OSPResult", "SVMCut", "solve_inner_svm", "optimal_sparse_probe", "optimal_sparse_probe_path"]


@dataclass
class OSPResult:
    """Outcome of one optimal-sparse-probing solve; ``features`` are column indices of the full X."""

    k: int
    features: np.ndarray
    objective: float  # upper bound: SVM objective of the best support found
    lower_bound: float  # proven: no k-subset of the pool does better
    gap: float  # (objective - lower_bound) / objective
    certified: bool  # gap <= the requested tolerance: the support is optimal over the pool
    time_s: float
    n_cuts: int
    status: str  # "optimal", "time_limit" or "stalled" (inner solves too inexact to close the gap)
    pool: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    history: list = field(default_factory=list)  # (lower_bound, upper_bound) after each master solve


@dataclass
class SVMCut:
    """One inner solve: a valid cut  t >= const + coef . s  and the primal value at its support."""

    support: tuple
    value: float  # primal objective of the fitted (w, b): an upper bound on c(support)
    const: float
    coef: np.ndarray  # -(gamma/2) v_j^2 for every pool column j

    def lower(self, support) -> float:
        return self.const + float(self.coef[list(support)].sum())


def solve_inner_svm(
    Z: np.ndarray, y_pm: np.ndarray, h: np.ndarray, gamma: float, support, rel_tol: float = 1e-7
) -> SVMCut:
    """Solve the SVM on ``support`` to a certified duality gap and turn its dual point into a cut.

    The compiled smoothed-Newton solve (svm_kernel.py) usually closes the gap on its own; when it stalls
    we guess the exact active set from its solution, and as a last resort ask libsvm.  The hinge objective
    at (w, b) is an upper bound on c(s), the exact dual objective at alpha a lower bound; the best pair is
    kept, so the cut is valid however the solve went.
    """
    from monoscope.probing.svm_kernel import SOLVED, solve_support

    support = tuple(sorted(int(j) for j in support))
    ZS = Z[:, support]
    X1 = np.hstack([ZS * y_pm[:, None], y_pm[:, None]])  # rows y_i [z_i, 1]: margin = X1 @ theta
    reg = np.r_[np.full(len(support), 1.0 / gamma), 0.0]

    def bounds(theta, alpha):
        upper = float(h @ np.maximum(0.0, 1.0 - X1 @ theta) + 0.5 * theta @ (reg * theta))
        v_S = ZS.T @ (alpha * y_pm)
        return upper, float(alpha.sum() - 0.5 * gamma * v_S @ v_S), alpha

    lower, upper, status, theta, alpha = solve_support(
        np.ascontiguousarray(X1[:, :-1]), y_pm, h, gamma, np.arange(len(support), dtype=np.int64), rel_tol
    )
    best = (upper, lower, alpha)  # the kernel's own certified pair for this alpha
    closed = lambda b: b[0] - b[1] <= rel_tol * max(abs(b[0]), 1.0)  # noqa: E731
    if status != SOLVED and not closed(best):
        r = 1.0 - X1 @ theta
        tries = [_exact_finish(X1, h, reg, r, mu) for mu in (1e-2, 1e-3, 1e-4)]
        tries = [bounds(*t) for t in tries if t is not None]
        if not any(closed(t) for t in tries):
            # the active-set guess never settled: libsvm's SMO (slower, always accurate)
            tries.append(bounds(*_libsvm(ZS, y_pm, h, gamma)))
        best = min([best, *tries], key=lambda b: b[0] - b[1])
    upper, _, alpha = best
    v = Z.T @ (alpha * y_pm)
    return SVMCut(support, upper, float(alpha.sum()), -0.5 * gamma * v**2)


def _libsvm(ZS, y_pm, h, gamma):
    """scikit-learn's SVC solves |w|^2/2 + C sum h_i hinge_i, i.e. gamma times our objective for C = gamma.

    Its dual variables are gamma * alpha (reported as y_i * gamma * alpha_i for the support vectors).
    """
    from sklearn.svm import SVC

    pos = y_pm > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svm = SVC(kernel="linear", C=gamma, class_weight={1.0: float(h[pos][0]), -1.0: float(h[~pos][0])},
                  tol=1e-6, max_iter=10**6, cache_size=500).fit(ZS, y_pm)
    alpha = np.zeros(len(y_pm))
    alpha[svm.support_] = np.abs(svm.dual_coef_[0]) / gamma
    alpha = _balance(np.minimum(alpha, h), y_pm)  # exact box and balance, whatever the rounding
    return np.r_[svm.coef_[0], svm.intercept_[0]], alpha


def _exact_finish(X1, h, reg, r, mu, rounds: int = 4):
    """Guess which points sit exactly on the margin from the smoothed solution and solve the KKT system.

    Points with slack r_i >= mu are taken as margin violators (alpha_i = h_i), r_i <= 0 as clear
    (alpha_i = 0), the rest as on the margin (X1_i theta = 1, alpha_i free).  Stationarity then is a linear
    system in (theta, alpha_margin).  A few rounds move points whose side disagrees with the new theta;
    the result is used only if alpha stays in its box (it is then dual feasible, so the bound is valid).
    """
    d = X1.shape[1]
    on = (r > 0) & (r < mu)
    viol = r >= mu
    result = None
    for _ in range(rounds):
        m = int(on.sum())
        if m > 4 * d + 10:  # smoothing zone still wide: the guess would be poor and the system large
            return result
        Xm = X1[on]
        K = np.zeros((d + m, d + m))
        K[:d, :d] = np.diag(reg)
        K[:d, d:] = -Xm.T
        K[d:, :d] = Xm
        rhs = np.r_[X1[viol].T @ h[viol], np.ones(m)]
        sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
        theta, a_on = sol[:d], sol[d:]
        if not np.all(np.isfinite(theta)) or np.any(a_on < -1e-12) or np.any(a_on > h[on] + 1e-12):
            return result
        alpha = np.where(viol, h, 0.0)
        alpha[on] = np.clip(a_on, 0.0, h[on])
        result = (theta, _balance(alpha, np.sign(X1[:, -1])))
        slack = 1.0 - X1 @ theta
        tol = 1e-9 * max(1.0, np.abs(slack).max())
        wrong_viol = viol & (slack < -tol)  # assumed violators that the new theta classifies clearly
        wrong_clear = ~viol & ~on & (slack > tol)
        if not wrong_viol.any() and not wrong_clear.any():
            return result
        on = on | wrong_viol | wrong_clear
        viol = viol & ~wrong_viol
    return result


def _balance(alpha: np.ndarray, y_pm: np.ndarray) -> np.ndarray:
    """Scale down one class's alphas so sum alpha_i y_i = 0 exactly (stays inside the box)."""
    pos = y_pm > 0
    sp, sn = alpha[pos].sum(), alpha[~pos].sum()
    alpha = alpha.copy()
    if sp > sn and sp > 0:
        alpha[pos] *= sn / sp
    elif sn > sp and sn > 0:
        alpha[~pos] *= sp / sn
    return alpha


class _Master:
    """The master MILP in HiGHS: variables s_0..s_{p-1} (binary) and t; cuts are added as rows."""

    def __init__(self, p: int, k: int):
        import highspy

        self.highspy = highspy
        self.p = p
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", 1e-6)
        inf = highspy.kHighsInf
        h.addVars(p + 1, np.r_[np.zeros(p), 0.0], np.r_[np.ones(p), inf])  # t >= 0: c(s) >= 0
        h.changeColsCost(p + 1, np.arange(p + 1, dtype=np.int32), np.r_[np.zeros(p), 1.0])
        h.changeColsIntegrality(p, np.arange(p, dtype=np.int32), np.full(p, highspy.HighsVarType.kInteger))
        h.addRow(k, k, p, np.arange(p, dtype=np.int32), np.ones(p))
        self.h = h

    def add_cut(self, cut: SVMCut) -> None:
        # t - coef.s >= const
        idx = np.arange(self.p + 1, dtype=np.int32)
        self.h.addRow(cut.const, self.highspy.kHighsInf, self.p + 1, idx, np.r_[-cut.coef, 1.0])

    def solve(self, time_limit: float):
        h = self.h
        h.setOptionValue("time_limit", max(time_limit, 0.01))
        h.run()
        info = h.getInfo()
        status = h.getModelStatus()
        x = np.asarray(h.getSolution().col_value)
        if len(x) != self.p + 1 or info.primal_solution_status == 0:
            return None, -math.inf, False
        support = tuple(int(j) for j in np.flatnonzero(x[: self.p] > 0.5))
        optimal = status == self.highspy.HighsModelStatus.kOptimal
        lower = float(info.mip_dual_bound)
        return support, lower if math.isfinite(lower) else -math.inf, optimal


def _prepare_pool(X, y01, pool, weights):
    mean, scale = fit_standardizer(X)
    if np.ndim(pool) == 0:
        size = int(pool)
        if size < 1:
            raise MonoscopeError(f"pool must be a positive size or a list of feature indices, got {pool}.")
        pool_idx = order_by_score(mean_diff_score((X - mean) / scale, y01))[: min(size, X.shape[1])]
    else:
        pool_idx = np.asarray(pool, dtype=np.intp)
        if pool_idx.ndim != 1 or len(pool_idx) == 0:
            raise MonoscopeError("pool must be a positive size or a non-empty 1-D list of feature indices.")
        if pool_idx.min() < 0 or pool_idx.max() >= X.shape[1] or len(set(pool_idx.tolist())) != len(pool_idx):
            raise MonoscopeError(f"pool indices must be distinct and in [0, {X.shape[1] - 1}].")
    Z = np.ascontiguousarray(standardize(X[:, pool_idx], mean[pool_idx], scale[pool_idx]))
    y_pm = 2.0 * y01 - 1.0
    if weights == "balanced":
        h = balanced_weights(y01)
    elif weights is None:
        h = np.ones(len(y01))
    else:
        raise MonoscopeError(f"class_weight must be 'balanced' or None, got {weights!r}.")
    return pool_idx, Z, y_pm, h


class _Solver:
    """Caches inner solves (and their cuts) across the ks of one path: a cut is valid for every k."""

    _compiled = False  # the numba kernels are compiled once per process

    def __init__(self, Z, y_pm, h, gamma, inner_tol):
        self.Z, self.y_pm, self.h, self.gamma, self.inner_tol = Z, y_pm, h, gamma, inner_tol
        self.cuts: dict[tuple, SVMCut] = {}

    def _compile_kernels(self) -> None:
        """The first solve in a process compiles the numba kernels (seconds, longer in a fresh install with no
        on-disk cache): done once here, on this problem's own arrays, so it never counts against a time limit."""
        if _Solver._compiled:
            return
        from monoscope.probing.svm_kernel import screen_subsets

        solve_inner_svm(self.Z, self.y_pm, self.h, self.gamma, (0,), self.inner_tol)
        Y = np.ascontiguousarray(self.Z * self.y_pm[:, None])
        screen_subsets(Y, self.y_pm, self.h, self.gamma, np.zeros((1, 1), dtype=np.int64), math.inf, 1e-4,
                       self.inner_tol, 1)
        _Solver._compiled = True

    def evaluate(self, support) -> SVMCut:
        key = tuple(sorted(int(j) for j in support))
        if key not in self.cuts:
            self.cuts[key] = solve_inner_svm(self.Z, self.y_pm, self.h, self.gamma, key, self.inner_tol)
        return self.cuts[key]

    def best(self, k):
        found = [c for c in self.cuts.values() if len(c.support) == k]
        return min(found, key=lambda c: c.value) if found else None

    def relaxation_cuts(self, k: int, deadline: float, iterations: int = 40) -> tuple[list[SVMCut], np.ndarray]:
        """Cuts from the Boolean relaxation  min c(s) over 0 <= s <= 1, sum s = k  (projected gradient),
        and the last fractional s.

        At a fractional s the SVM is the one on columns scaled by sqrt(s_j); its dual point is feasible for
        every support, so each iterate's cut is valid, and together they lift the master's bound towards the
        relaxation's value (the cuts of integer supports alone leave gaps of 75-98 % at k >= 5 on real data).
        """
        from monoscope.probing.svm_kernel import solve_support

        p = self.Z.shape[1]
        s = np.full(p, k / p)
        cuts = []
        for it in range(iterations):
            if time.perf_counter() > deadline:
                break
            Y = np.ascontiguousarray(self.Z * np.sqrt(s) * self.y_pm[:, None])
            alpha = solve_support(Y, self.y_pm, self.h, self.gamma, np.arange(p, dtype=np.int64), 1e-6)[4]
            v = self.Z.T @ (alpha * self.y_pm)
            cut = SVMCut((), math.nan, float(alpha.sum()), -0.5 * self.gamma * v**2)
            cuts.append(cut)
            step = k / (np.abs(cut.coef).max() * (it + 2))  # diminishing steps, scaled to the gradient
            s = _capped_simplex(s - step * cut.coef, k)
        return cuts, s

    def solve(self, k: int, warm: list, time_limit: float, rel_gap: float, enumerate_limit: int) -> tuple:
        self._compile_kernels()
        start = time.perf_counter()
        for support in warm:
            if len(support) == k:
                self.evaluate(support)
        # greedy additions to the previous k's best support, ordered by the first-order gain of its cut
        prev = self.best(k - 1)
        if prev is not None:
            gain = np.array(prev.coef)
            gain[list(prev.support)] = np.inf
            for j in np.argsort(gain)[:3]:
                self.evaluate(prev.support + (int(j),))
        p = self.Z.shape[1]
        if math.comb(p, k) <= enumerate_limit:
            return self._enumerate(k, start, time_limit, rel_gap)
        master = _Master(p, k)
        cuts, s = self.relaxation_cuts(k, start + 0.25 * time_limit)
        for cut in cuts:
            master.add_cut(cut)
        self.evaluate(np.argsort(-s)[:k])  # the relaxation rounded: often a good incumbent
        # every cached cut is valid for this k; best supports first, and at most half the time limit spent
        # loading them
        for cut in sorted(self.cuts.values(), key=lambda c: c.value):
            if time.perf_counter() - start > 0.5 * time_limit:
                break
            master.add_cut(cut)
        history = []
        status, lower = "time_limit", -math.inf
        while True:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                break
            support, lower_now, optimal = master.solve(left)
            lower = max(lower, lower_now)
            best = self.best(k)
            history.append((lower, best.value))
            if support is None or not optimal:
                break  # master ran out of time
            if best.value - lower <= rel_gap * max(abs(best.value), 1e-12):
                status = "optimal"
                break
            if support in self.cuts:
                status = "stalled"  # the master's pick is already cut off as well as the inner solves allow
                break
            master.add_cut(self.evaluate(support))
        return self.best(k), lower, status, history, time.perf_counter() - start

    def _enumerate(self, k: int, start: float, time_limit: float, rel_gap: float) -> tuple:
        """Bound every k-subset of the pool directly, batch by batch (svm_kernel.screen_subsets).

        Each subset is solved only until its own dual bound clears the incumbent; the ones that do not
        (a better subset, a near-tie, a stalled solve) are then solved exactly.  The certificate is the
        smallest lower bound over all subsets.  Subsets not reached in time keep the cached cuts' bound.
        """
        import numba

        from monoscope.probing.svm_kernel import SOLVED, screen_subsets

        combos = np.array(list(itertools.combinations(range(self.Z.shape[1]), k)), dtype=np.int64).reshape(-1, k)
        lower = np.full(len(combos), -np.inf)
        Y = np.ascontiguousarray(self.Z * self.y_pm[:, None])
        chunks = 4 * numba.get_num_threads()
        done = 0
        while done < len(combos) and time.perf_counter() - start < time_limit:
            batch = slice(done, min(len(combos), done + _SCREEN_BATCH))
            incumbent = self.best(k).value
            low, up, status = screen_subsets(Y, self.y_pm, self.h, self.gamma, combos[batch],
                                             (1 - rel_gap) * incumbent, rel_gap, self.inner_tol, chunks)
            lower[batch] = low
            better = np.flatnonzero((status == SOLVED) & (up < incumbent))
            if len(better):  # confirm the batch's best with an exact solve: it becomes the incumbent
                self.evaluate(combos[done + better[np.argmin(up[better])]])
            done = batch.stop
        # what still sits below the final threshold (near-ties, stalled solves) is solved exactly
        for i in np.argsort(lower[:done]):
            best = self.best(k)
            if lower[i] >= (1 - rel_gap) * best.value or time.perf_counter() - start > time_limit:
                break
            cut = self.evaluate(combos[i])
            lower[i] = max(lower[i], cut.lower(cut.support))
        if done < len(combos):
            lower[done:] = _cut_envelope(list(self.cuts.values()), combos[done:])
        best = self.best(k)
        bound = min(float(lower.min()), best.value)
        status = "optimal" if best.value - bound <= rel_gap * max(abs(best.value), 1e-12) else "time_limit"
        return best, bound, status, [(bound, best.value)], time.perf_counter() - start


def _capped_simplex(x: np.ndarray, k: float) -> np.ndarray:
    """Euclidean projection onto {0 <= s <= 1, sum s = k} (bisection on the shift)."""
    lo, hi = float(x.min()) - 1.0, float(x.max())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.clip(x - mid, 0.0, 1.0).sum() > k else (lo, mid)
    return np.clip(x - hi, 0.0, 1.0)


_SCREEN_BATCH = 8192  # subsets per compiled call: the time limit is checked between calls


def _cut_envelope(cuts: list, combos: np.ndarray) -> np.ndarray:
    """The best bound the cached cuts give each subset (row of ``combos``).

    Each cut may scale its dual point by lam in [0, 1] (lam * alpha stays feasible):
    max_lam lam*A - lam^2*B = A - B if B <= A/2 else A^2/(4B).
    """
    lower = np.full(len(combos), -np.inf)
    for cut in cuts:
        B = -cut.coef[combos].sum(axis=1)  # >= 0
        A = cut.const
        with np.errstate(divide="ignore", invalid="ignore"):
            np.maximum(lower, np.where(B <= 0.5 * A, A - B, A * A / (4.0 * B)), out=lower)
    return lower


def _osp_results(solver, pool_idx, ks, warm_by_k, time_limit, rel_gap, enumerate_limit) -> list[OSPResult]:
    out = []
    for k in ks:
        best, lower, status, history, spent = solver.solve(
            k, warm_by_k.get(k, []), time_limit, rel_gap, enumerate_limit
        )
        gap = max(best.value - lower, 0.0) / max(abs(best.value), 1e-12)
        certified = status == "optimal" or gap <= rel_gap
        out.append(
            OSPResult(
                k=k,
                features=pool_idx[list(best.support)],
                objective=best.value,
                lower_bound=lower,
                gap=gap,
                certified=certified,
                time_s=spent,
                n_cuts=len(solver.cuts),
                status="optimal" if certified else status,
                pool=pool_idx,
                history=history,
            )
        )
    return out


def optimal_sparse_probe_path(
    X_train,
    y_train,
    ks=range(1, 9),
    pool=50,
    gamma: float | None = None,
    time_limit: float = 60.0,
    rel_gap: float = 1e-4,
    class_weight: str | None = "balanced",
    warm_starts: dict | None = None,
    inner_tol: float = 1e-7,
    enumerate_limit: int = 300_000,
) -> list[OSPResult]:
    """Optimal sparse probes for each k (ascending); each k is warm-started by the one before it.

    ``pool``: how many top features by mean difference to search over (the paper used 50), or explicit
    column indices.  ``gamma`` defaults to 1/sqrt(n_train).  ``time_limit`` is seconds per k; a solve that
    runs out reports its gap instead of ``certified``.  ``warm_starts`` maps k to extra candidate supports
    (column indices of X), e.g. another method's choices.  Warm starts always include the pool's top-k by
    mean difference and the adaptive-thresholding support on the pool.  When the pool has at most
    ``enumerate_limit`` k-subsets every one is bounded directly (fast for k <= 4 of 50); otherwise the
    outer-approximation master problem is solved by HiGHS.
    """
    X = check_X(X_train, "X_train")
    y01, _ = check_labels(y_train, X.shape[0], "y_train")
    pool_idx, Z, y_pm, h = _prepare_pool(X, y01, pool, class_weight)
    ks = sorted({int(k) for k in np.atleast_1d(ks)})
    for k in ks:
        _check_k(k, len(pool_idx))
    gamma = 1.0 / math.sqrt(len(y01)) if gamma is None else float(gamma)
    if not gamma > 0:
        raise MonoscopeError(f"gamma must be positive, got {gamma}.")

    position = {int(c): i for i, c in enumerate(pool_idx)}
    warm_by_k: dict[int, list] = {k: [tuple(range(k))] for k in ks}  # pool is mean-diff ordered when sized
    at = adaptive_thresholding(Z, y01, ks=ks)
    for k in ks:
        warm_by_k[k].append(tuple(int(j) for j in at[k][0]))
        for support in (warm_starts or {}).get(k, []):
            inside = [position[int(c)] for c in support if int(c) in position]
            if len(inside) == k:
                warm_by_k[k].append(tuple(inside))
    solver = _Solver(Z, y_pm, h, gamma, inner_tol)
    # every linear-algebra call here is tiny: extra BLAS threads only add contention
    with threadpool_limits(1):
        return _osp_results(solver, pool_idx, ks, warm_by_k, time_limit, rel_gap, enumerate_limit)


def optimal_sparse_probe(X_train, y_train, k: int, **options) -> OSPResult:
    """The best k-subset of the pool for the hinge + ridge SVM; options as in optimal_sparse_probe_path.

    Solving the path 1..k is usually faster than k alone (warm starts and shared cuts), but only k is
    asked for here, so only k is solved.
    """
    return optimal_sparse_probe_path(X_train, y_train, [k], **options)[0]
