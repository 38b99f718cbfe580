"""Fitting and scoring one k-sparse probe on numpy arrays.

Everything here works on a plain activation matrix ``X`` (examples x features) and binary labels ``y``.
The protocol follows Gurnee et al. (2023) with their token-level leak fixed: the train/test split is made
by sequence (group), activations are standardised with train statistics, and the probe is an L2
logistic regression with balanced class weights.

The logistic solver is our own (proximal) Newton method rather than scikit-learn: probes here are small
and dense (k <= a few hundred columns, a few thousand rows), where forming the k x k Hessian is cheap and
Newton converges in a handful of steps, while scikit-learn's per-call overhead and first-order solvers
dominate a k sweep.  It solves the same objective as scikit-learn's ``LogisticRegression``:

    C * sum_i s_i * logloss(y_i, x_i.w + b) + l1_ratio * |w|_1 + (1 - l1_ratio)/2 * |w|^2

with s_i the balanced class weights and the intercept b unpenalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

from monoscope.errors import MonoscopeError

__all__ = [
    "Probe",
    "check_X",
    "check_labels",
    "split_by_sequence",
    "fit_standardizer",
    "standardize",
    "balanced_weights",
    "fit_logistic",
    "fit_probe",
    "evaluate",
    "binary_metrics",
    "random_rotation",
    "shuffle_labels",
]


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def check_X(X, name: str = "X") -> np.ndarray:
    """Return X as a 2-D float array; refuse NaN/inf, naming where they are so the user can find them."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise MonoscopeError(f"{name} must be a 2-D array (examples x features), got shape {X.shape}.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise MonoscopeError(f"{name} is empty (shape {X.shape}); pass at least one example and one feature.")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        cols = np.flatnonzero(bad.any(axis=0))
        raise MonoscopeError(
            f"{name} has {int(bad.sum())} NaN/inf values in rows {_few(rows)} and columns {_few(cols)}; "
            "drop or impute those examples/features (e.g. np.nan_to_num) before probing."
        )
    return X


def _few(idx: np.ndarray, n: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:n])
    return f"[{shown}{', ...' if len(idx) > n else ''}] ({len(idx)} in all)"


def check_labels(y, n_rows: int | None = None, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Map binary labels to 0/1 and return ``(y01, classes)``; classes[1] is the positive class.

    The positive class is the larger value (True, 1, "b" > "a"), so 0/1 and bool labels keep their meaning.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise MonoscopeError(f"{name} must be 1-D (one label per example), got shape {y.shape}.")
    if n_rows is not None and len(y) != n_rows:
        raise MonoscopeError(f"{name} has {len(y)} labels but X has {n_rows} rows; they must match one to one.")
    classes = np.unique(y)
    if len(classes) == 1:
        raise MonoscopeError(
            f"{name} has a single class ({classes[0]!r}); a probe needs examples of both classes. "
            "Check the dataset's labels or the filter that built it."
        )
    if len(classes) > 2:
        raise MonoscopeError(
            f"{name} has {len(classes)} classes ({_few(classes, 5)}); sparse probing here is binary. "
            "Make one-vs-rest labels, e.g. y == 'french'."
        )
    return (y == classes[1]).astype(np.int8), classes


def _check_k(k: int, p: int) -> int:
    k = int(k)
    if k < 1:
        raise MonoscopeError(f"k must be at least 1, got {k}.")
    if k > p:
        raise MonoscopeError(f"k={k} is larger than the number of features ({p}); choose k <= {p}.")
    return k


# ----------------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------------

def split_by_sequence(groups, labels, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test split that never puts one sequence on both sides.

    ``groups`` is either the number of rows (each row its own sequence) or one group id per row (the
    sequence each token came from).  Splitting by token leaks: neighbouring tokens of one text share
    context, so a probe can memorise the text.  Each group is stratified by its majority label.
    Returns sorted row indices ``(train_idx, test_idx)``.
    """
    y01, _ = check_labels(labels)
    n = len(y01)
    if np.ndim(groups) == 0:
        if int(groups) != n:
            raise MonoscopeError(f"split_by_sequence got n_sequences={groups} but {n} labels; they must match.")
        group_ids = np.arange(n)
    else:
        group_ids = np.asarray(groups)
        if group_ids.shape != (n,):
            raise MonoscopeError(
                f"groups has shape {group_ids.shape} but there are {n} labels; pass one group id per row."
            )
    if not 0.0 < test_fraction < 1.0:
        raise MonoscopeError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}.")

    uniq, inverse = np.unique(group_ids, return_inverse=True)
    pos_frac = np.bincount(inverse, weights=y01, minlength=len(uniq)) / np.bincount(inverse, minlength=len(uniq))
    group_label = (pos_frac >= 0.5).astype(int)
    rng = np.random.default_rng(seed)
    test_groups = []
    for c in (0, 1):
        members = np.flatnonzero(group_label == c)
        if len(members) < 2:
            raise MonoscopeError(
                f"class {c} has only {len(members)} sequence(s) (a sequence counts for the label of most of "
                "its rows, ties for 1); a train/test split needs at least 2 per class (one on each side). Collect "
                "more examples of that class."
            )
        n_test = min(max(1, int(round(test_fraction * len(members)))), len(members) - 1)
        test_groups.append(rng.permutation(members)[:n_test])
    is_test_group = np.zeros(len(uniq), dtype=bool)
    is_test_group[np.concatenate(test_groups)] = True
    is_test = is_test_group[inverse]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


# ----------------------------------------------------------------------------------------------------
# standardisation
# ----------------------------------------------------------------------------------------------------

def fit_standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the *train* rows; a constant feature gets scale 1 (it stays all zero)."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)
    return mean, scale


def standardize(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (X - mean) / scale


def balanced_weights(y01: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced' class weights, n / (2 * n_class), one per row."""
    counts = np.bincount(y01, minlength=2).astype(float)
    return (len(y01) / (2.0 * counts))[y01]


# ----------------------------------------------------------------------------------------------------
# logistic regression solver
# ----------------------------------------------------------------------------------------------------

def _objective(Z, y, s, C, l1_ratio, w, b):
    z = Z @ w + b
    loss = -np.dot(s, y * log_expit(z) + (1 - y) * log_expit(-z))
    return C * loss + l1_ratio * np.abs(w).sum() + 0.5 * (1 - l1_ratio) * np.dot(w, w)


def fit_logistic(
    Z: np.ndarray,
    y01: np.ndarray,
    C: float = 1.0,
    l1_ratio: float = 0.0,
    sample_weight: np.ndarray | None = None,
    w0: np.ndarray | None = None,
    b0: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[np.ndarray, float]:
    """Minimise the (elastic-net) logistic objective above by proximal Newton; returns ``(w, b)``.

    Each outer step forms the exact Hessian (cheap for k <= a few hundred) and solves the local quadratic
    model: directly for pure L2, by coordinate descent for an L1 part.  A backtracking
    line search on the true objective makes every step a descent step.  ``w0``/``b0`` warm-start it.
    """
    n, k = Z.shape
    y = y01.astype(float)
    s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    if C <= 0 or not math.isfinite(C):
        raise MonoscopeError(f"C must be a positive finite number, got {C}.")
    if not 0.0 <= l1_ratio <= 1.0:
        raise MonoscopeError(f"l1_ratio must be in [0, 1], got {l1_ratio}.")
    w = np.zeros(k) if w0 is None else np.array(w0, float)
    b = float(b0)
    if w0 is None:  # start from the weighted base rate: the best intercept-only model
        pw = np.dot(s, y) / s.sum()
        b = math.log(pw / (1 - pw)) if 0 < pw < 1 else 0.0
    ridge = 1.0 - l1_ratio
    F = _objective(Z, y, s, C, l1_ratio, w, b)
    for _ in range(max_iter):
        p = expit(Z @ w + b)
        r = C * s * (p - y)
        D = C * s * p * (1 - p)
        g = np.empty(k + 1)
        g[:k] = Z.T @ r + ridge * w
        g[k] = r.sum()
        H = np.empty((k + 1, k + 1))
        H[:k, :k] = _gram(Z, D)
        H[:k, k] = H[k, :k] = D @ Z
        H[k, k] = D.sum() + 1e-12
        H[np.arange(k), np.arange(k)] += ridge + 1e-12
        theta = np.append(w, b)
        if l1_ratio == 0.0:
            step = -_solve_spd(H, g)
            new = theta + step
        else:
            new = _prox_quadratic(H, g, theta, l1_ratio)
            step = new - theta
        # predicted decrease of the model (negative); used by Armijo and as the stopping test
        decrease = g @ step + l1_ratio * (np.abs(new[:k]).sum() - np.abs(w).sum())
        if decrease > -tol * max(1.0, abs(F)):
            break
        t = 1.0
        while True:
            cand = theta + t * step
            F_new = _objective(Z, y, s, C, l1_ratio, cand[:k], cand[k])
            if F_new <= F + 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        w, b = cand[:k], float(cand[k])
        done = F - F_new <= tol * max(1.0, abs(F))
        F = F_new
        if done:
            break
    return w, b


def _gram(Z: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Z' diag(D) Z, the costly part of the Hessian.

    For wide Z it is formed in float32 with a symmetric rank-k update (a quarter of the float64 GEMM
    cost).  Only the Newton *direction* sees this rounding; gradients and the line search stay float64,
    so the solution is still the exact optimum (an inexact Newton method converges to the same point).
    """
    if Z.shape[1] < 64:
        return Z.T @ (Z * D[:, None])
    from scipy.linalg.blas import ssyrk

    A = np.asarray(Z * np.sqrt(D)[:, None], dtype=np.float32, order="F")
    U = ssyrk(1.0, A, trans=1).astype(np.float64)  # upper triangle of A'A
    return np.triu(U) + np.triu(U, 1).T


def _solve_spd(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    try:
        L = np.linalg.cholesky(H)
        return np.linalg.solve(L.T, np.linalg.solve(L, g))
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H, g, rcond=None)[0]


def _prox_quadratic(H, g, theta, lam, max_sweeps: int = 500, tol: float = 1e-10):
    """argmin_v g.(v-theta) + 1/2 (v-theta)' H (v-theta) + lam*|v[:-1]|_1 (last entry is the intercept).

    Cyclic coordinate descent, glmnet style: sweep all coordinates, then iterate on the non-zero ones
    until they settle, then one more full sweep to check nothing new wants in.  Coordinate descent copes
    with the strongly correlated columns of real activations far better than (accelerated) gradient steps.
    """
    k = len(theta) - 1
    v = theta.copy()
    grad = g.copy()  # model gradient H (v - theta) + g, kept up to date
    diag = np.diag(H).copy()
    rows = list(H)  # H is symmetric: row j is column j, and rows are contiguous

    def sweep(idx):
        biggest = 0.0
        for j in idx:
            old = v[j]
            z = old - grad[j] / diag[j]
            if j < k:
                t = lam / diag[j]
                z = z - t if z > t else (z + t if z < -t else 0.0)
            delta = z - old
            if delta != 0.0:
                v[j] = z
                np.add(grad, delta * rows[j], out=grad)
                biggest = max(biggest, abs(delta) * math.sqrt(diag[j]))
        return biggest

    everything = range(k + 1)
    lin = g - H @ theta
    for _ in range(max_sweeps):
        if sweep(everything) <= tol:
            break
        active = [j for j in range(k) if v[j] != 0.0] + [k]
        for i in range(max_sweeps):
            if sweep(active) <= tol:
                break
            if i % 3 == 2:  # shortcut: once the signs are right the model is a linear system
                exact = _polish(H, lin, v, lam)
                if exact is not None:
                    return exact
    return v


def _polish(H, lin, v, lam, max_rounds: int = 8):
    """Active-set finish: guess the support and signs from v, solve the model there exactly, repair.

    With the signs fixed the L1 term is linear, so the model is one linear system.  Coordinates whose
    sign flips leave the support and zero coordinates that violate optimality join it, a few rounds at
    most; the answer is returned only if it passes the full optimality (KKT) test, else None.
    """
    k = len(v) - 1
    sgn = np.append(np.sign(v[:k]), 0.0)
    on = np.append(v[:k] != 0, True)
    for _ in range(max_rounds):
        act = np.flatnonzero(on)
        try:
            sol = np.linalg.solve(H[np.ix_(act, act)], -(lin[act] + lam * sgn[act]))
        except np.linalg.LinAlgError:
            return None
        flipped = act[:-1][np.sign(sol[:-1]) != sgn[act[:-1]]]
        if len(flipped):
            on[flipped] = False
            sgn[flipped] = 0.0
            continue
        cand = np.zeros_like(v)
        cand[act] = sol
        grad = H @ cand + lin
        viol = np.flatnonzero(~on & (np.abs(grad) > lam * (1 + 1e-9)))
        if not len(viol):
            return cand
        on[viol] = True
        sgn[viol] = -np.sign(grad[viol])
    return None


# ----------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """A fitted linear probe on a few feature columns; coef is in standardised units (comparable)."""

    features: np.ndarray
    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray
    C: float = 1.0

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X)[:, self.features] - self.mean) / self.scale
        return Z @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of the positive class (classes[1])."""
        return expit(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes[(self.decision_function(X) > 0).astype(int)]


def fit_probe(X_train, y_train, features, C: float = 1.0) -> Probe:
    """Balanced-class-weight L2 logistic regression on the chosen columns, standardised by train stats."""
    X_train = check_X(X_train, "X_train")
    y01, classes = check_labels(y_train, X_train.shape[0], "y_train")
    features = np.atleast_1d(np.asarray(features, dtype=np.intp))
    p = X_train.shape[1]
    _check_k(len(features), p)
    if features.min() < 0 or features.max() >= p:
        raise MonoscopeError(f"feature indices must be in [0, {p - 1}]; got {features.min()}..{features.max()}.")
    if len(set(features.tolist())) != len(features):
        raise MonoscopeError("feature indices must be distinct; the same column was chosen twice.")
    return _fit_probe(X_train, y01, classes, features, C)


def _fit_probe(X_train, y01, classes, features, C) -> Probe:
    """fit_probe without the input checks, for loops that already validated everything once."""
    Xs = X_train[:, features]
    mean, scale = fit_standardizer(Xs)
    Z, s = standardize(Xs, mean, scale), balanced_weights(y01)
    if len(features) <= NEWTON_MAX_K:
        w, b = fit_logistic(Z, y01, C=C, sample_weight=s)
    else:  # a dense probe: the k x k Hessian is too big; L-BFGS on the same objective
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(Z, y01, sample_weight=s)
        w, b = fit.coef_.ravel(), float(fit.intercept_[0])
    return Probe(features, w, b, mean, scale, classes, C)


NEWTON_MAX_K = 512  # wider probes (the dense baseline on every neuron or latent) go to scikit-learn's L-BFGS


def evaluate(probe: Probe, X_test, y_test) -> dict:
    """Held-out F1 (headline), MCC, precision, recall, accuracy and ROC-AUC of a probe."""
    X_test = check_X(X_test, "X_test")
    y_test = np.asarray(y_test)
    if len(y_test) != X_test.shape[0]:
        raise MonoscopeError(f"y_test has {len(y_test)} labels but X_test has {X_test.shape[0]} rows.")
    unknown = ~np.isin(y_test, probe.classes)
    if unknown.any():
        raise MonoscopeError(
            f"y_test has labels {np.unique(y_test[unknown])[:5]!r} that the probe never saw "
            f"(trained on {probe.classes!r})."
        )
    y01 = (y_test == probe.classes[1]).astype(np.int8)
    return binary_metrics(y01, probe.decision_function(X_test))


def binary_metrics(y01: np.ndarray, score: np.ndarray) -> dict:
    """Metrics from true 0/1 labels and a decision score (predict positive where score > 0).

    Degenerate cases follow scikit-learn's zero_division=0: no predicted positives gives precision 0,
    a zero MCC denominator gives MCC 0; ROC-AUC is NaN when y has one class only.
    """
    y01 = np.asarray(y01).astype(bool)
    pred = np.asarray(score) > 0
    tp = float(np.sum(pred & y01))
    fp = float(np.sum(pred & ~y01))
    fn = float(np.sum(~pred & y01))
    tn = float(np.sum(~pred & ~y01))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0
    n_pos, n_neg = int(y01.sum()), int((~y01).sum())
    if n_pos and n_neg:
        # Mann-Whitney form of ROC-AUC with tied scores sharing their average rank
        _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
        avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
        ranks = avg_rank[inverse]
        auc = (ranks[y01].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    else:
        auc = float("nan")
    return {
        "f1": f1,
        "mcc": mcc,
        "precision": precision,
        "recall": recall,
        **bootstrap_intervals(y01, pred),
        "accuracy": (tp + tn) / len(y01),
        "roc_auc": float(auc),
    }


def bootstrap_intervals(y01: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """95 % percentile-bootstrap intervals of F1, precision and recall over the test examples (resampled with
    replacement, the same resamples for all three): {"f1_low", "f1_high", "precision_low", ...}."""
    names = ("f1", "precision", "recall")
    n = len(y01)
    if n == 0:
        return {f"{m}_{end}": float("nan") for m in names for end in ("low", "high")}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    t, p = y01[idx], pred[idx]
    tp, fp, fn = (t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1)
    values = {"f1": np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0),
              "precision": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0),
              "recall": np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)}
    out = {}
    for name in names:
        low, high = np.percentile(values[name], [2.5, 97.5])
        out[f"{name}_low"], out[f"{name}_high"] = float(low), float(high)
    return out


# ----------------------------------------------------------------------------------------------------
# controls
# ----------------------------------------------------------------------------------------------------

def random_rotation(X, seed: int = 0, kind: str = "gaussian") -> np.ndarray:
    """Return X @ A for a random d x d matrix A: the "is this basis special?" control.

    ``kind="gaussian"`` (the paper's control) draws A with i.i.d. N(0, 1/d) entries: a random, generally
    non-orthogonal change of basis.  ``kind="orthogonal"`` uses a uniformly random rotation (QR of a
    Gaussian matrix with the sign fix), which keeps distances and norms.  Either way any sparse structure
    tied to the original neurons is smeared over all directions, so k-sparse probes should get worse.
    """
    X = check_X(X)
    d = X.shape[1]
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((d, d))
    if kind == "gaussian":
        A = G / math.sqrt(d)
    elif kind == "orthogonal":
        Q, R = np.linalg.qr(G)
        A = Q * np.sign(np.diag(R))
    else:
        raise MonoscopeError(f"unknown rotation kind {kind!r}; use 'gaussian' or 'orthogonal'.")
    return X @ A


def shuffle_labels(y, seed: int = 0) -> np.ndarray:
    """A seeded permutation of the labels: the control where no feature should predict anything."""
    return np.random.default_rng(seed).permutation(np.asarray(y))
