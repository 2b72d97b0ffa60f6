"""LinearHead.fit(..., anchor=(coef, intercept)): the L2-SP penalty 0.5 * ||W - coef||^2 (Li et al. 2018), the
linear probe that starts from and is pulled towards given weights (a zero-shot head's)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from probe.errors import ProbeError
from probe.heads import LinearHead
from probe.heads.features import stratified_holdout

from .test_heads import blobs


def _anchor(K: int, D: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1.0, (K, D)).astype(np.float32), rng.normal(0, 0.5, K).astype(np.float32)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_anchored_solution_is_the_l2sp_optimum(C):
    """At the solution, the gradient of 0.5 * ||W - A||^2 + C * sum_i logloss_i vanishes (checked in float64, to
    the float32 solver's precision -- the same as without an anchor), and that of the plain objective does not."""
    X, y = blobs(n_per=200, classes=4, dim=12, spread=4.0, seed=2)
    A, a0 = _anchor(4, 12)
    head = LinearHead(C=C, norm="none", device="cpu", tol=1e-7).fit(X, y, anchor=(A, a0))
    W, b = head.coef_.astype(np.float64), head.intercept_.astype(np.float64)
    P = softmax(X.astype(np.float64) @ W.T + b, axis=1)
    R = P - np.eye(4)[y]
    gW, gb = (W - A) + C * R.T @ X, C * R.sum(0)
    scale = np.abs(W - A).max() + np.abs(C * R.T @ X).max()
    assert np.abs(gW).max() < 1e-2 * scale
    assert np.abs(gb).max() < 1e-2 * (np.abs(C * R).sum(0).max() + 1)
    assert np.abs(W + C * R.T @ X).max() > 0.3 * scale  # the plain L2 objective is far from its optimum here


def test_strong_regularisation_keeps_the_anchor_weak_gives_the_plain_probe():
    X, y = blobs(n_per=150, classes=3, dim=10, spread=3.0, seed=4)
    A, a0 = _anchor(3, 10)
    tight = LinearHead(C=1e-7, norm="none", device="cpu").fit(X, y, anchor=(A, a0))
    np.testing.assert_allclose(tight.coef_, A, atol=1e-3)
    loose = LinearHead(C=1e3, norm="none", device="cpu").fit(X, y, anchor=(A, a0))
    plain = LinearHead(C=1e3, norm="none", device="cpu").fit(X, y)
    assert (loose.predict(X) == plain.predict(X)).mean() >= 0.99
    zero = LinearHead(C=0.1, norm="none", device="cpu").fit(X, y, anchor=(np.zeros((3, 10)), np.zeros(3)))
    ref = LinearHead(C=0.1, norm="none", device="cpu").fit(X, y)
    np.testing.assert_allclose(zero.coef_, ref.coef_, atol=1e-3)


def test_anchored_sweep_chooses_between_anchor_and_probe():
    """A good anchor (the weights of a probe fit on other rows of the same problem) and few training rows: the
    anchored sweep beats the plain one on held-out rows and keeps about the anchor's accuracy. (The intercept is not
    penalised, as in scikit-learn: the strongest strengths keep the anchor's coef and refit its intercept.)"""
    X, y = blobs(n_per=400, classes=5, dim=24, spread=7.0, seed=5)
    pool, rest = stratified_holdout(y, 0.5, seed=0)
    donor = LinearHead(C=1.0, norm="none", device="cpu").fit(X[pool], y[pool])
    rest = np.random.default_rng(0).permutation(rest)
    few, test = rest[:60], rest[60:]
    va = few[::3]
    tr = np.setdiff1d(few, va)
    anchor = (donor.coef_, donor.intercept_)
    ours = LinearHead(norm="none", device="cpu", n_Cs=9).fit(X[tr], y[tr], eval_set=(X[va], y[va]), anchor=anchor)
    plain = LinearHead(norm="none", device="cpu", n_Cs=9).fit(X[tr], y[tr], eval_set=(X[va], y[va]))
    acc = {h: (m.predict(X[test]) == y[test]).mean() for h, m in (("anchored", ours), ("plain", plain),
                                                                   ("anchor", donor))}
    assert acc["anchored"] > acc["plain"] + 0.03, acc
    assert acc["anchored"] >= acc["anchor"] - 0.03, acc


def test_anchor_through_cross_validation_and_bad_shapes():
    X, y = blobs(n_per=60, classes=3, dim=8, seed=6)
    A, a0 = _anchor(3, 8)
    head = LinearHead(norm="none", device="cpu", n_Cs=5).fit(X, y, anchor=(A, a0))  # k-fold CV path
    assert head.C_ in head.Cs() and head.coef_.shape == (3, 8)
    with pytest.raises(ProbeError, match=r"anchor must be \(coef \(3, 8\), intercept \(3,\)\).*coef \(8, 3\)"):
        LinearHead(C=1.0).fit(X, y, anchor=(A.T, a0))
    with pytest.raises(ProbeError, match="NaN or infinite"):
        LinearHead(C=1.0).fit(X, y, anchor=(np.full((3, 8), np.nan), a0))
    coef_only = LinearHead(C=1.0, norm="none", device="cpu").fit(X, y, anchor=A)  # intercept 0
    assert coef_only.coef_.shape == (3, 8)
