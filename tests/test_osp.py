"""Optimal sparse probing: the inner SVM, the cuts, and agreement with brute force."""
import itertools
import math

import numpy as np
import pytest
from sklearn.svm import SVC

from monoscope.errors import MonoscopeError
from monoscope.probing import optimal_sparse_probe, optimal_sparse_probe_path, split_by_sequence, sweep
from monoscope.probing.osp import _prepare_pool, _Solver, solve_inner_svm


def data(n=240, p=11, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    X[:, 1:] += 0.6 * X[:, [0]]
    y = (X[:, 2] - X[:, 5] + 0.5 * X[:, 7] + rng.standard_normal(n) > 0.3).astype(int)
    return X, y


def brute_force(X, y, k, class_weight="balanced"):
    pool, Z, y_pm, h = _prepare_pool(X, y, X.shape[1], class_weight)
    gamma = 1 / math.sqrt(len(y))
    cuts = {S: solve_inner_svm(Z, y_pm, h, gamma, S) for S in itertools.combinations(range(X.shape[1]), k)}
    best = min(cuts, key=lambda S: cuts[S].value)
    return pool[list(best)], cuts[best].value


def test_inner_svm_matches_libsvm_and_its_cut_is_tight():
    X, y = data()
    pool, Z, y_pm, h = _prepare_pool(X, y, X.shape[1], "balanced")
    gamma = 1 / math.sqrt(len(y))
    pos = y_pm > 0
    for S in [(2,), (2, 5), (0, 3, 9), (1, 2, 5, 7)]:
        cut = solve_inner_svm(Z, y_pm, h, gamma, S)
        svm = SVC(kernel="linear", C=gamma, tol=1e-8, class_weight={1.0: h[pos][0], -1.0: h[~pos][0]})
        svm.fit(Z[:, S], y_pm)
        w, b = svm.coef_[0], svm.intercept_[0]
        ref = h @ np.maximum(0, 1 - y_pm * (Z[:, S] @ w + b)) + w @ w / (2 * gamma)
        assert cut.value == pytest.approx(ref, rel=2e-5)
        assert cut.lower(S) <= cut.value + 1e-9
        assert cut.lower(S) == pytest.approx(cut.value, rel=1e-4)


def test_cuts_are_valid_lower_bounds_everywhere():
    X, y = data(p=8)
    pool, Z, y_pm, h = _prepare_pool(X, y, 8, "balanced")
    gamma = 1 / math.sqrt(len(y))
    cuts = [solve_inner_svm(Z, y_pm, h, gamma, S) for S in [(0,), (2, 5), (1, 3, 4)]]
    cuts += _Solver(Z, y_pm, h, gamma, 1e-7).relaxation_cuts(2, deadline=math.inf, iterations=5)[0]
    for k in (1, 2, 3):
        for S in itertools.combinations(range(8), k):
            truth = solve_inner_svm(Z, y_pm, h, gamma, S).value
            for cut in cuts:
                assert cut.lower(S) <= truth * (1 + 1e-9)


@pytest.mark.parametrize("class_weight", ["balanced", None])
@pytest.mark.parametrize("enumerate_limit", [300_000, 0])  # exact enumeration, and the HiGHS master
def test_osp_matches_brute_force(class_weight, enumerate_limit):
    X, y = data()
    results = optimal_sparse_probe_path(
        X, y, ks=[1, 2, 3], pool=X.shape[1], class_weight=class_weight, enumerate_limit=enumerate_limit
    )
    for r in results:
        features, value = brute_force(X, y, r.k, class_weight)
        assert r.certified and r.status == "optimal" and r.gap <= 1e-4
        assert r.objective == pytest.approx(value, rel=1e-4)
        assert sorted(r.features.tolist()) == sorted(features.tolist())
        # the bound is proven at every iteration: never above the true optimum
        for lower, upper in r.history:
            assert lower <= value * (1 + 1e-9)
            assert upper >= value * (1 - 1e-9)


def test_single_k_and_sweep_integration():
    X, y = data(n=300, p=12, seed=4)
    r = optimal_sparse_probe(X, y, 2, pool=8)
    assert r.k == 2 and len(r.features) == 2 and set(r.features.tolist()) <= set(r.pool.tolist())
    train, test = split_by_sequence(len(y), y)
    rows = sweep(X[train], y[train], X[test], y[test], ks=[1, 2, 3, 10], methods=["osp"],
                 osp_options={"max_k": 3, "pool": 10})
    assert [row["k"] for row in rows] == [1, 2, 3]
    assert all(row["certified"] and "f1" in row for row in rows)


def test_osp_errors():
    X, y = data()
    with pytest.raises(MonoscopeError, match="larger than the number of features"):
        optimal_sparse_probe(X, y, 6, pool=5)
    with pytest.raises(MonoscopeError, match="gamma must be positive"):
        optimal_sparse_probe(X, y, 1, gamma=-1.0)


def test_time_limit_is_honoured_when_loading_many_cached_cuts():
    # k=3 over a 30-feature pool is enumerated (4,060 subsets); a tiny limit must still return a valid bound
    X, y = data(n=200, p=30, seed=2)
    results = optimal_sparse_probe_path(X, y, ks=[1, 2, 3], pool=30, time_limit=0.05)
    for r in results:
        assert r.time_s < 2.0
        assert r.lower_bound <= r.objective * (1 + 1e-9)
        assert len(r.features) == r.k


def test_compiled_screen_brackets_every_subset():
    # every subset's bounds bracket its true SVM value; a pruned subset's bound clears the threshold
    from monoscope.probing.svm_kernel import PRUNED, SOLVED, screen_subsets

    X, y = data(p=9)
    pool, Z, y_pm, h = _prepare_pool(X, y, 9, "balanced")
    gamma = 1 / math.sqrt(len(y))
    Y = np.ascontiguousarray(Z * y_pm[:, None])
    combos = np.array(list(itertools.combinations(range(9), 3)), dtype=np.int64)
    truth = np.array([solve_inner_svm(Z, y_pm, h, gamma, S).value for S in combos])
    threshold = float(np.quantile(truth, 0.2))
    for thr in (np.inf, threshold):
        lower, upper, status = screen_subsets(Y, y_pm, h, gamma, combos, thr, 1e-4, 1e-7, 3)
        assert np.all(lower <= truth * (1 + 1e-6)) and np.all(upper >= truth * (1 - 1e-6))  # truth: to 1e-7
        # pruned against the threshold, or against the best subset its chunk had solved by then
        assert np.all(lower[status == PRUNED] >= min(thr, (1 - 1e-4) * truth.min() * (1 - 1e-6)))
        solved = status == SOLVED
        assert np.allclose(upper[solved], truth[solved], rtol=1e-6)
    assert (status == PRUNED).sum() > len(combos) // 2  # most subsets are far above the 20 % quantile


def test_kernels_are_compiled_before_the_clock_starts(monkeypatch):
    """The first solve of a process compiles the numba kernels (in a fresh install, longer than a short time
    limit); that happens once, before any k's clock starts, so k = 1 is still certified."""
    import monoscope.probing.osp as osp

    calls = []
    real = osp._Solver._compile_kernels
    monkeypatch.setattr(osp._Solver, "_compiled", False)
    monkeypatch.setattr(osp._Solver, "_compile_kernels", lambda self: (calls.append(1), real(self)))
    X, y = data()
    [r] = optimal_sparse_probe_path(X, y, ks=[1], pool=11, time_limit=2.0)
    assert calls and osp._Solver._compiled and r.status == "optimal"
