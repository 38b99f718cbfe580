"""Compiled solves of the small hinge + ridge SVMs that optimal sparse probing needs by the hundred thousand.

For a support s of k columns (each multiplied by the labels, plus the labels themselves for the
unpenalised intercept, so the margin of example i is X[:, i] . theta) the SVM is

    c(s) = min_theta  sum_i h_i max(0, 1 - X[:, i] . theta) + sum_a reg_a theta_a^2 / 2,   reg = 1/gamma, 0 (b).

We minimise a Huber-smoothed hinge (quadratic within mu of the hinge point) by damped Newton in k+1
dimensions, shrinking mu stage by stage.  Each stage hands us two certified numbers: the hinge objective
at theta (an upper bound on c(s)) and the exact dual objective at alpha_i = h_i clip((1 - margin_i)/mu, 0, 1),
rebalanced so sum alpha_i y_i = 0 and scaled by the best lam in [0, 1] (a lower bound, weak duality:
see osp.py).  A subset is done when its lower bound clears the threshold (it cannot beat the incumbent)
or the two bounds meet.  Plain loops compiled by numba: a few microseconds per Newton step, where numpy's
call overhead alone costs milliseconds per solve.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

PRUNED, SOLVED, INEXACT = 0, 1, 2  # status of one subset
MU_COLD, MU_WARM, MU_SHRINK, MAX_STAGES, MAX_NEWTON = 2.0, 0.3, 0.3, 14, 40


@njit(cache=True, fastmath=True)
def _slacks(X, theta, r):
    """r = 1 - margin, with X stored feature-major (d, n) so the inner loop runs over contiguous rows."""
    d, n = X.shape
    r[:] = 1.0
    for a in range(d):
        t = theta[a]
        for i in range(n):
            r[i] -= X[a, i] * t


@njit(cache=True, fastmath=True)
def _smoothed_value(X, h, reg, mu, theta, r):
    """Smoothed objective at theta; fills r with the slacks 1 - margin."""
    d, n = X.shape
    _slacks(X, theta, r)
    f = 0.0
    for i in range(n):
        ri = r[i]
        if ri >= mu:
            f += h[i] * (ri - 0.5 * mu)
        elif ri > 0.0:
            f += h[i] * 0.5 * ri * ri / mu
    for a in range(d):
        f += 0.5 * reg[a] * theta[a] * theta[a]
    return f


@njit(cache=True, fastmath=True)
def _newton_step(X, h, reg, mu, theta, F, r, r_try, H, grad, step, trial, coef, quad):
    """One damped Newton step from theta (slacks r, value F); returns the new value (theta, r updated)."""
    d, n = X.shape
    q = 0
    for i in range(n):
        ri = r[i]
        if ri <= 0.0:
            coef[i] = 0.0
        elif ri >= mu:
            coef[i] = h[i]
        else:
            coef[i] = h[i] * ri / mu
            quad[q] = i
            q += 1
    for a in range(d):
        g = reg[a] * theta[a]
        for i in range(n):
            g -= coef[i] * X[a, i]
        grad[a] = g
        for b in range(a + 1):
            s = 0.0
            for t in range(q):
                i = quad[t]
                s += h[i] * X[a, i] * X[b, i]
            H[a, b] = s / mu
        H[a, a] += reg[a] + 1e-9
    # Cholesky factor in place (lower triangle), then two triangular solves: H step = -grad
    for a in range(d):
        for b in range(a + 1):
            s = H[a, b]
            for c2 in range(b):
                s -= H[a, c2] * H[b, c2]
            H[a, b] = math.sqrt(max(s, 1e-300)) if a == b else s / H[b, b]
    for a in range(d):
        s = -grad[a]
        for c2 in range(a):
            s -= H[a, c2] * step[c2]
        step[a] = s / H[a, a]
    for a in range(d - 1, -1, -1):
        s = step[a]
        for c2 in range(a + 1, d):
            s -= H[c2, a] * step[c2]
        step[a] = s / H[a, a]
    slope = 0.0
    for a in range(d):
        slope += grad[a] * step[a]
    if -slope <= 1e-13 * max(1.0, abs(F)):
        return F
    t = 1.0
    while t > 1e-10:
        for a in range(d):
            trial[a] = theta[a] + t * step[a]
        F_new = _smoothed_value(X, h, reg, mu, trial, r_try)
        if F_new <= F + 1e-4 * t * slope:
            for a in range(d):
                theta[a] = trial[a]
            for i in range(n):
                r[i] = r_try[i]
            return F_new
        t *= 0.5
    return F


@njit(cache=True)
def _bounds(X, h, gamma, reg, theta, mu, k, alpha, r):
    """(upper, lower, lam) at theta with slacks r: the hinge objective; the dual objective at the clipped,
    balanced lam * alpha."""
    d, n = X.shape
    upper, pos_sum, neg_sum = 0.0, 0.0, 0.0
    for i in range(n):
        ri = r[i]
        if ri > 0.0:
            upper += h[i] * ri
        alpha[i] = h[i] * min(1.0, max(0.0, ri / mu))
        if X[k, i] > 0:  # the last row is the label
            pos_sum += alpha[i]
        else:
            neg_sum += alpha[i]
    for a in range(d):
        upper += 0.5 * reg[a] * theta[a] * theta[a]
    pos_scale = neg_sum / pos_sum if pos_sum > neg_sum else 1.0
    neg_scale = pos_sum / neg_sum if neg_sum > pos_sum else 1.0
    A = 0.0
    for i in range(n):
        alpha[i] *= pos_scale if X[k, i] > 0 else neg_scale
        A += alpha[i]
    B = 0.0
    for a in range(k):
        v = 0.0
        for i in range(n):
            v += alpha[i] * X[a, i]
        B += v * v
    B *= 0.5 * gamma
    if B <= 0.5 * A:  # max over lam in [0, 1] of lam A - lam^2 B
        return upper, A - B, 1.0
    return upper, A * A / (4.0 * B), A / (2.0 * B)


@njit(cache=True)
def _solve(X, h, gamma, reg, k, theta, mu, threshold, rel_tol, r, r_try, alpha, best_theta, best_alpha, work):
    """Smoothing stages until the lower bound clears threshold (PRUNED) or meets the upper (SOLVED)."""
    H, grad, step, trial, coef, quad = work
    lower, upper = -np.inf, np.inf
    for stage in range(MAX_STAGES):
        F = _smoothed_value(X, h, reg, mu, theta, r)
        for it in range(MAX_NEWTON + 1):
            up, low, lam = _bounds(X, h, gamma, reg, theta, mu, k, alpha, r)
            if up < upper:
                upper = up
                best_theta[:] = theta
            if low > lower:
                lower = low
                best_alpha[:] = lam * alpha
            if lower >= threshold:
                return lower, upper, PRUNED
            if upper - lower <= rel_tol * abs(upper):
                return lower, upper, SOLVED
            if it == MAX_NEWTON:
                break
            F_new = _newton_step(X, h, reg, mu, theta, F, r, r_try, H, grad, step, trial, coef, quad)
            if F - F_new <= 1e-13 * max(1.0, abs(F_new)):
                break  # converged for this mu: bounds checked above already
            F = F_new
        mu *= MU_SHRINK
    return lower, upper, INEXACT


@njit(cache=True)
def _fill(X, Yt, y_pm, cols):
    for a in range(len(cols)):
        X[a, :] = Yt[cols[a], :]
    X[len(cols), :] = y_pm


@njit(cache=True)
def _buffers(d, n, gamma, k):
    reg = np.zeros(d)
    reg[:k] = 1.0 / gamma
    work = (np.empty((d, d)), np.empty(d), np.empty(d), np.empty(d), np.empty(n), np.empty(n, dtype=np.int64))
    return reg, work


@njit(cache=True)
def solve_support(Y, y_pm, h, gamma, cols, rel_tol):
    """One support from a cold start: (lower, upper, status, theta, alpha) with theta = (w, b)."""
    n, k = Y.shape[0], len(cols)
    d = k + 1
    X = np.empty((d, n))
    _fill(X, np.ascontiguousarray(Y.T), y_pm, cols)
    reg, work = _buffers(d, n, gamma, k)
    theta, best_theta, alpha, best_alpha = np.zeros(d), np.zeros(d), np.empty(n), np.zeros(n)
    lower, upper, status = _solve(X, h, gamma, reg, k, theta, MU_COLD, np.inf, rel_tol, np.empty(n),
                                  np.empty(n), alpha, best_theta, best_alpha, work)
    return lower, upper, status, best_theta, best_alpha


@njit(cache=True, parallel=True)
def screen_subsets(Y, y_pm, h, gamma, combos, threshold, rel_gap, rel_tol, n_chunks):
    """Bound every row of ``combos`` (k-subsets of Y's columns); returns lower, upper and status arrays.

    A subset is solved only as far as needed: PRUNED once its lower bound reaches the threshold (it
    cannot beat the incumbent), else SOLVED to ``rel_tol`` (its upper bound may become the incumbent).
    Chunks of consecutive subsets run in parallel; inside a chunk each solve starts from the previous
    subset's theta (lexicographic neighbours share most columns), and the chunk's own best solved
    subset lowers its threshold to (1 - rel_gap) times its value.
    """
    B, k = combos.shape
    n, d = Y.shape[0], combos.shape[1] + 1
    lower, upper = np.empty(B), np.empty(B)
    status = np.empty(B, dtype=np.int8)
    per = (B + n_chunks - 1) // n_chunks
    Yt = np.ascontiguousarray(Y.T)
    for c in prange(n_chunks):
        X = np.empty((d, n))
        reg, work = _buffers(d, n, gamma, k)
        theta, best_theta, alpha, best_alpha = np.zeros(d), np.zeros(d), np.empty(n), np.zeros(n)
        r, r_try = np.empty(n), np.empty(n)
        local = threshold
        mu = MU_COLD
        for b in range(c * per, min(B, (c + 1) * per)):
            _fill(X, Yt, y_pm, combos[b])
            lower[b], upper[b], status[b] = _solve(X, h, gamma, reg, k, theta, mu, local, rel_tol, r, r_try,
                                                   alpha, best_theta, best_alpha, work)
            if status[b] == SOLVED:
                local = min(local, (1.0 - rel_gap) * upper[b])
            mu = MU_WARM
    return lower, upper, status
