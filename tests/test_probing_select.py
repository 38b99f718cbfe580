"""Sparse probing core: rankers against hand computations, the split, the solver, metrics, errors."""
import warnings

import numpy as np
import pytest
from scipy.stats import f_oneway
from sklearn.feature_selection import f_classif
from sklearn.linear_model import LogisticRegression
from sklearn import metrics as skm

from monoscope.errors import MonoscopeError
from monoscope.probing import (
    DEFAULT_KS,
    RANKERS,
    adaptive_l1_ratio,
    adaptive_thresholding,
    binary_metrics,
    evaluate,
    fit_probe,
    random_rotation,
    rank_features,
    shuffle_labels,
    split_by_sequence,
    sweep,
)
from monoscope.probing.probe import balanced_weights, fit_logistic
from monoscope.probing.select import _f_score


def planted(n=300, p=30, seed=0):
    """Features 3 and 7 carry the label; the rest share a correlated nuisance factor."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    X = rng.standard_normal((n, p)) + 0.5 * rng.standard_normal((n, 1))
    X[:, 3] += 1.5 * y
    X[:, 7] -= 1.0 * y
    return X, y


# ---------------------------------------------------------------- rankers

def test_mean_diff_by_hand():
    X = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0], [4.0, 3.0, 5.0], [6.0, 3.0, 5.0]])
    y = np.array([0, 0, 1, 1])
    # standardised mean differences: col0 4/sqrt(5), col1 2/1 = 2, col2 constant -> 0
    assert 4 / np.sqrt(5) < 2
    assert RANKERS["mean_diff"](X, y).tolist() == [1, 0, 2]


def test_f_stat_matches_scipy_and_sklearn():
    X, y = planted()
    F = _f_score(X, y)
    np.testing.assert_allclose(F, f_oneway(X[y == 0], X[y == 1]).statistic, rtol=1e-10)
    np.testing.assert_allclose(F, f_classif(X, y)[0], rtol=1e-10)
    assert RANKERS["f_stat"](X, y).tolist() == np.argsort(-f_classif(X, y)[0], kind="stable").tolist()


@pytest.mark.parametrize("method", sorted(RANKERS))
def test_every_ranker_returns_a_permutation(method):
    X, y = planted()
    order = rank_features(method, X, y)
    assert sorted(order.tolist()) == list(range(X.shape[1]))
    if method != "random":
        assert set(order[:2].tolist()) == {3, 7}


def test_random_ranker_is_seeded():
    X, y = planted()
    assert (RANKERS["random"](X, y, seed=1) == RANKERS["random"](X, y, seed=1)).all()
    assert (RANKERS["random"](X, y, seed=1) != RANKERS["random"](X, y, seed=2)).any()


def test_l1_logreg_falls_back_to_mean_diff_for_zero_coefficients():
    X, y = planted(p=12)
    order = RANKERS["l1_logreg"](X, y)
    assert sorted(order.tolist()) == list(range(12))
    assert set(order[:2].tolist()) == {3, 7}


# ---------------------------------------------------------------- solver and adaptive thresholding

@pytest.mark.parametrize("C,l1_ratio", [(1.0, 0.0), (0.8, 0.45), (0.2, 0.9)])
def test_fit_logistic_matches_sklearn(C, l1_ratio):
    X, y = planted()
    Z = (X - X.mean(0)) / X.std(0)
    w, b = fit_logistic(Z, y, C=C, l1_ratio=l1_ratio, sample_weight=balanced_weights(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(
            C=C, l1_ratio=l1_ratio, solver="saga" if l1_ratio else "lbfgs", class_weight="balanced",
            tol=1e-12, max_iter=100000,
        ).fit(Z, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=2e-5)
    assert abs(b - ref.intercept_[0]) < 2e-5
    assert ((w == 0) == (ref.coef_[0] == 0)).all()


def test_adaptive_l1_ratio_schedule():
    assert adaptive_l1_ratio(1) == pytest.approx(0.9)
    assert adaptive_l1_ratio(10) == pytest.approx(np.exp(-0.5))
    assert adaptive_l1_ratio(256) == pytest.approx(0.1)


def reference_adaptive(X, y, ks):
    """The paper's procedure written plainly with scikit-learn (converged saga)."""
    Z = (X - X.mean(0)) / X.std(0)
    diff = np.abs(Z[y == 1].mean(0) - Z[y == 0].mean(0))
    current = np.argsort(-diff, kind="stable")[: max(ks)]
    out = {}
    for k in sorted(ks, reverse=True):
        current = current[:k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            en = LogisticRegression(
                C=k / 20, l1_ratio=adaptive_l1_ratio(k), solver="saga", class_weight="balanced",
                tol=1e-12, max_iter=100000,
            ).fit(Z[:, current], y)
        current = current[np.argsort(-np.abs(en.coef_[0]), kind="stable")]
        out[k] = current.copy()
    return out


def test_adaptive_thresholding_matches_plain_sklearn_and_nests():
    X, y = planted(p=40)
    ks = (1, 2, 3, 5, 8, 16, 32)
    ours = adaptive_thresholding(X, y, ks)
    ref = reference_adaptive(X, y, ks)
    assert sorted(ours) == list(ks)
    for k in ks:
        feats, coef = ours[k]
        assert len(feats) == len(coef) == k
        assert set(feats.tolist()) == set(ref[k].tolist()), k
    for small, big in zip(ks, ks[1:]):
        assert set(ours[small][0].tolist()) <= set(ours[big][0].tolist())


# ---------------------------------------------------------------- split

def test_split_never_puts_a_group_on_both_sides_and_is_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), rng.integers(1, 6, size=200))
    group_label = (rng.random(200) < 0.25).astype(int)
    y = group_label[groups]
    train, test = split_by_sequence(groups, y, test_fraction=0.3, seed=3)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    assert not set(groups[train]) & set(groups[test])
    for c in (0, 1):
        n_groups = (group_label == c).sum()
        n_test = len(set(groups[test][y[test] == c]))
        assert abs(n_test - 0.3 * n_groups) <= 1
    again = split_by_sequence(groups, y, test_fraction=0.3, seed=3)
    assert all((a == b).all() for a, b in zip((train, test), again))


def test_split_by_count_treats_rows_as_sequences():
    y = np.array([0] * 10 + [1] * 10)
    train, test = split_by_sequence(20, y, test_fraction=0.3)
    assert len(test) == 6 and y[test].sum() == 3


def test_split_errors():
    with pytest.raises(MonoscopeError, match="single class"):
        split_by_sequence(5, [1, 1, 1, 1, 1])
    with pytest.raises(MonoscopeError, match="at least 2 per class"):
        split_by_sequence(5, [0, 0, 0, 0, 1])
    with pytest.raises(MonoscopeError, match="one group id per row"):
        split_by_sequence([0, 1], [0, 1, 0])


# ---------------------------------------------------------------- probe, metrics, controls

def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    score = np.round(rng.standard_normal(500) + y, 1)  # rounding creates tied scores
    ours = binary_metrics(y, score)
    pred = score > 0
    assert ours["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert ours["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert ours["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert ours["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert ours["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))


def test_binary_metrics_degenerate_cases():
    none_predicted = binary_metrics(np.array([0, 1, 1]), np.array([-1.0, -2.0, -3.0]))
    assert none_predicted["precision"] == 0 and none_predicted["f1"] == 0 and none_predicted["mcc"] == 0
    one_class = binary_metrics(np.array([1, 1, 1]), np.array([1.0, -1.0, 2.0]))
    assert np.isnan(one_class["roc_auc"]) and one_class["recall"] == pytest.approx(2 / 3)


def test_fit_probe_and_evaluate_keep_label_values():
    X, y = planted()
    labels = np.where(y == 1, "french", "english")
    train, test = split_by_sequence(len(y), labels)
    probe = fit_probe(X[train], labels[train], [3, 7])
    assert set(probe.predict(X[test])) <= {"english", "french"}
    scores = evaluate(probe, X[test], labels[test])
    assert scores["f1"] > 0.7 and scores["roc_auc"] > 0.85


def test_input_errors_name_the_problem():
    X, y = planted()
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(MonoscopeError, match=r"rows \[5\].*columns \[2\]"):
        fit_probe(bad, y, [0])
    with pytest.raises(MonoscopeError, match="k=31 is larger than the number of features"):
        fit_probe(X, y, list(range(31)))
    with pytest.raises(MonoscopeError, match="single class"):
        fit_probe(X, np.zeros(len(y)), [0])
    with pytest.raises(MonoscopeError, match="unknown ranking method"):
        rank_features("best", X, y)
    with pytest.raises(MonoscopeError, match="every k"):
        adaptive_thresholding(X, y, ks=[64, 128])


def test_controls():
    X, y = planted()
    for kind in ("gaussian", "orthogonal"):
        R = random_rotation(X, seed=0, kind=kind)
        assert R.shape == X.shape
    R = random_rotation(X, seed=0, kind="orthogonal")
    np.testing.assert_allclose(np.linalg.norm(R, axis=1), np.linalg.norm(X, axis=1))
    s = shuffle_labels(y, seed=0)
    assert sorted(s) == sorted(y) and (s != y).any()


def test_sweep_rows_and_dropped_ks():
    X, y = planted(p=20)
    train, test = split_by_sequence(len(y), y)
    with pytest.warns(UserWarning, match="dropping k"):
        rows = sweep(X[train], y[train], X[test], y[test], ks=DEFAULT_KS, methods=["adaptive", "mean_diff"])
    ks = [k for k in DEFAULT_KS if k <= 20]
    assert [(r["method"], r["k"]) for r in rows] == [(m, k) for m in ("adaptive", "mean_diff") for k in ks]
    for r in rows:
        assert len(r["features"]) == r["k"]
        assert {"f1", "mcc", "precision", "recall", "accuracy", "roc_auc", "fit_s"} <= set(r)
    best = max(r["f1"] for r in rows if r["k"] == 2)
    assert best > 0.7
    with pytest.raises(MonoscopeError, match="unknown sweep method"):
        sweep(X[train], y[train], X[test], y[test], methods=["magic"])


def test_dense_probe_is_the_same_objective_and_reports_an_interval():
    """Above NEWTON_MAX_K columns the probe is fitted by scikit-learn's L-BFGS: same weights as our Newton."""
    from monoscope.probing import probe as P

    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 40))
    y = (X[:, 0] - X[:, 1] + rng.standard_normal(300) > 0).astype(int)
    cols = np.arange(40)
    newton = P._fit_probe(X, y, np.array([0, 1]), cols, 1.0)
    old, P.NEWTON_MAX_K = P.NEWTON_MAX_K, 10
    try:
        lbfgs = P._fit_probe(X, y, np.array([0, 1]), cols, 1.0)
    finally:
        P.NEWTON_MAX_K = old
    np.testing.assert_allclose(lbfgs.coef, newton.coef, atol=1e-4)
    [row] = sweep(X[:200], y[:200], X[200:], y[200:], ks=(1,), methods=("dense",))
    assert row["method"] == "dense" and row["k"] == 40 and row["features"] == list(range(40))
    assert row["f1_low"] <= row["f1"] <= row["f1_high"] and row["f1_high"] - row["f1_low"] > 0.02


def test_intervals_are_percentile_bootstraps():
    from monoscope.probing.probe import bootstrap_intervals

    y = np.array([1] * 50 + [0] * 50, bool)
    assert all(v == 1.0 for v in bootstrap_intervals(y, y).values())
    pred = y.copy()
    pred[:10] = False  # recall 0.8, precision 1: F1 0.889
    b = bootstrap_intervals(y, pred)
    assert 0.80 < b["f1_low"] < 0.889 < b["f1_high"] < 0.96
    assert b["precision_low"] == b["precision_high"] == 1.0
    assert 0.65 < b["recall_low"] < 0.8 < b["recall_high"] < 0.92
