"""LogME (probe.heads.logme): the evidence it reports is the closed-form evidence at its alpha/beta, at a maximum;
it agrees with the ICML 2021 algorithm; it ranks informative features above noise; its invariances hold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from probe.errors import ProbeError
from probe.heads.logme import logme, logme_fit


def blobs(N: int, D: int, C: int = 3, signal: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features whose class means differ by ``signal`` (0: pure noise), labels (N,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    means = rng.normal(size=(C, D))
    return rng.normal(size=(N, D)) + signal * means[y], y


def closed_form(X: np.ndarray, yc: np.ndarray, alpha: float, beta: float) -> float:
    """log p(yc | X, alpha, beta) / N of the Bayesian linear model, directly: yc ~ N(0, I/beta + X X^T / alpha)."""
    N = len(yc)
    cov = np.eye(N) / beta + X @ X.T / alpha
    return float(multivariate_normal(np.zeros(N), cov).logpdf(yc)) / N


def icml_logme(X: np.ndarray, y: np.ndarray) -> float:
    """The ICML 2021 form of the algorithm (dense D x D SVD, the updates of the paper's Algorithm 1, the reference
    code's 1e-5 guard on the residual), written independently here as the oracle."""
    X = X.astype(np.float64)
    N, D = X.shape
    _, s, vt = np.linalg.svd(X.T @ X)  # s: all D eigenvalues of X^T X, zeros included
    out = []
    for c in np.unique(y):
        yc = (y == c).astype(np.float64)
        proj = vt @ (X.T @ yc)
        alpha = beta = 1.0
        for _ in range(100):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = vt.T @ (beta * proj / (alpha + beta * s))
            a_new = gamma / (m @ m)
            b_new = (N - gamma) / (((yc - X @ m) ** 2).sum() + 1e-5)  # the reference's guard: finite when N <= D
            done = abs(a_new / b_new - alpha / beta) / (alpha / beta) < 1e-8
            alpha, beta = a_new, b_new
            if done:
                break
        m = vt.T @ (beta * proj / (alpha + beta * s))
        ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
              - beta / 2 * ((yc - X @ m) ** 2).sum() - alpha / 2 * (m @ m) - N / 2 * np.log(2 * np.pi))
        out.append(ev / N)
    return float(np.mean(out))


@pytest.mark.parametrize("N, D", [(80, 12), (25, 60)])  # the X^T X path and the X X^T path (N < D: rank N)
def test_evidence_is_the_closed_form_at_its_alpha_beta(N, D):
    X, y = blobs(N, D)
    fit = logme_fit(X, y)
    for c in range(3):
        direct = closed_form(X, (y == c).astype(float), fit.alpha[c], fit.beta[c])
        assert fit.evidence[c] == pytest.approx(direct, rel=1e-7)
    assert fit.score == pytest.approx(fit.evidence.mean())


@pytest.mark.parametrize("N, D", [(80, 12), (25, 60)])
def test_alpha_beta_maximise_the_evidence(N, D):
    """alpha and beta are where the evidence peaks. With N < D the features can fit the labels exactly and the
    evidence may rise as the noise vanishes (beta -> inf): the guard stops beta there (as the reference does), so
    only alpha, optimal for that beta, is checked."""
    X, y = blobs(N, D, seed=1)
    fit = logme_fit(X, y)
    steps = [(1.3, 1), (1 / 1.3, 1)] + ([(1, 1.3), (1, 1 / 1.3), (1.3, 1.3)] if N > D else [])
    for c in range(3):
        yc = (y == c).astype(float)
        best = closed_form(X, yc, fit.alpha[c], fit.beta[c])
        for fa, fb in steps:
            assert closed_form(X, yc, fit.alpha[c] * fa, fit.beta[c] * fb) < best


@pytest.mark.parametrize("N, D", [(80, 12), (25, 60)])
def test_agrees_with_the_icml_algorithm(N, D):
    X, y = blobs(N, D, seed=2)
    assert logme(X, y) == pytest.approx(icml_logme(X, y), abs=1e-3)


def test_informative_features_rank_above_noise():
    X_good, y = blobs(300, 64, C=5, signal=1.5, seed=3)
    X_weak = X_good + np.random.default_rng(4).normal(scale=3.0, size=X_good.shape)  # the same, blurred
    X_noise = np.random.default_rng(5).normal(size=X_good.shape)
    good, weak, noise = logme(X_good, y), logme(X_weak, y), logme(X_noise, y)
    assert good > weak > noise


def test_invariances():
    X, y = blobs(120, 20, C=4, seed=6)
    base = logme(X, y)
    Q = np.linalg.qr(np.random.default_rng(7).normal(size=(20, 20)))[0]  # a rotation of the feature space
    assert logme(X @ Q, y) == pytest.approx(base, abs=1e-9)
    assert logme(X * 10.0, y) == pytest.approx(base, abs=1e-4)  # the prior's alpha absorbs a scale
    perm = np.random.default_rng(8).permutation(len(y))
    assert logme(X[perm], y[perm]) == pytest.approx(base, abs=1e-9)  # row order
    names = np.array(["d", "a", "c", "b"])[y]  # renamed classes
    assert logme(X, names) == pytest.approx(base, abs=1e-12)
    assert logme(X.astype(np.float32), y) == pytest.approx(base, abs=1e-4)


def test_large_features_run_in_one_pass():
    """Not timed: a 20k x 512 float32 problem goes through the blocked Gram path and converges for every class."""
    X, y = blobs(20_000, 512, C=10, signal=0.5, seed=9)
    fit = logme_fit(X.astype(np.float32), y)
    assert np.isfinite(fit.evidence).all() and fit.evidence.shape == (10,)
    assert fit.iterations < 100 and (fit.alpha > 0).all() and (fit.beta > 0).all()


def test_bad_input_is_refused():
    X, y = blobs(30, 5)
    with pytest.raises(ProbeError, match="at least 2 classes"):
        logme(X, np.zeros(30, int))
    with pytest.raises(ProbeError, match=r"features \(N, D\) and labels \(N,\)"):
        logme(X, y[:-1])
    X[0, 0] = np.nan
    with pytest.raises(ProbeError, match="NaN"):
        logme(X, y)
