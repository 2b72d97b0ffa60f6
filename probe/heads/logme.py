"""LogME: how well frozen features fit the labels, without training a head.

You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021
(and the fixed-point form of their "Ranking and Tuning Pre-trained Models", arXiv 2110.10545). Each class c gets a
Bayesian linear regression of its one-hot column y_c (N,) on the features X (N, D): weights w ~ N(0, 1/alpha I),
noise ~ N(0, 1/beta). alpha and beta are set by the fixed point that maximises the evidence p(y_c | X, alpha, beta)
(MacKay's updates), and the score is the mean over classes of the log evidence divided by N. Higher is better;
the scale is per dataset, so compare backbones on the same images only.

One eigendecomposition of the smaller Gram matrix (X^T X (D, D) or X X^T (N, N)) serves every class and every
iteration: 50k x 1280 features take a few seconds on the CPU, most of it forming the Gram matrix.

Reference implementation: github.com/thuml/LogME, ``LogME.py`` (``LogME._fit_fixed_point``). Differences, all
deliberate: the D - k zero eigenvalues of X^T X (k = rank <= N) count in log|A| (the reference drops them when N < D,
thuml/LogME issue #23); the reference's 1e-5 guard is kept on the residual ||y - X m||^2 only -- there it caps beta
when the features interpolate the labels (N <= D), where the evidence keeps rising as the noise vanishes -- and not
on ||m||^2, where it would make the score depend on the scale of the features (m scales as 1/scale); the iteration
runs to a relative change of 1e-6 rather than 1e-3, and the evidence is evaluated at the final (alpha, beta).

Example:
    >>> logme(store.features("train"), store.labels("train"))
    -0.82
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ProbeError

EPS = 1e-5  # added to ||y - X m||^2 in the beta update, as the reference does: beta stays finite when X fits y exactly
TOL = 1e-6  # relative change of alpha / beta at which a class has converged (the reference stops at 1e-3)
MAX_ITER = 100  # the reference stops at 11; classes converge in 3-30, the cap only bounds pathological inputs
BLOCK = 8192  # rows per block of the Gram matrix: each block's product in the features' own float32 (half the time
# of float64, 2e-7 relative difference at 50k x 1280), the blocks summed in float64


@dataclass
class LogMEFit:
    """The score and what it was made of: per class evidence / N, and the alpha, beta it converged to."""

    score: float  # mean over classes of evidence / N
    evidence: np.ndarray  # (C,) log evidence / N of each class's one-hot column
    alpha: np.ndarray  # (C,) prior precision of the weights
    beta: np.ndarray  # (C,) noise precision
    classes: np.ndarray  # (C,) the label values, in the order of the arrays above
    iterations: int


def _spectrum(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma (k,), x (k, C)): the nonzero eigenvalues of X^T X and the targets Y (N, C) in its eigenbasis,
    x = U^T Y with X = U S V^T. From whichever Gram matrix is smaller; X is never copied whole to float64."""
    N, D = X.shape
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    if N > D:
        G = np.zeros((D, D))
        XtY = np.zeros((D, Y.shape[1]))
        for s in range(0, N, BLOCK):
            b = X[s: s + BLOCK].astype(dtype, copy=False)  # (B, D)
            G += b.T @ b
            XtY += b.T @ Y[s: s + BLOCK]
        sigma, V = np.linalg.eigh(G)  # ascending
        keep = sigma > sigma[-1] * max(N, D) * np.finfo(np.float64).eps if sigma[-1] > 0 else sigma > 0
        sigma, V = sigma[keep], V[:, keep]
        return sigma, (V.T @ XtY) / np.sqrt(sigma)[:, None]  # U^T Y = S^-1 V^T X^T Y
    X64 = X.astype(np.float64)
    sigma, U = np.linalg.eigh(X64 @ X64.T)  # (N, N)
    keep = sigma > sigma[-1] * max(N, D) * np.finfo(np.float64).eps if sigma[-1] > 0 else sigma > 0
    return sigma[keep], U[:, keep].T @ Y


def _evidence(t: np.ndarray, alpha: np.ndarray, beta: np.ndarray, sigma: np.ndarray, x2: np.ndarray,
              rest: np.ndarray, N: int, D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(log evidence / N, gamma, ||m||^2, ||y - X m||^2), each (C,), at the posterior mean m for lambda = t.

    sigma (k, 1), x2 (k, C) squared projections of the targets, rest (C,) the part of ||y||^2 outside range(X)."""
    gamma = (sigma / (sigma + t)).sum(0)  # effective number of parameters
    m2 = (sigma * x2 / (t + sigma) ** 2).sum(0)
    res2 = (x2 / (1 + sigma / t) ** 2).sum(0) + rest
    k = sigma.shape[0]
    logdet = np.log(alpha + beta * sigma).sum(0) + (D - k) * np.log(alpha)  # log|alpha I + beta X^T X|, all D
    ev = (D / 2 * np.log(alpha) + N / 2 * np.log(beta) - logdet / 2 - beta / 2 * res2 - alpha / 2 * m2
          - N / 2 * np.log(2 * np.pi))
    return ev / N, gamma, m2, res2


def logme_fit(X: np.ndarray, y: np.ndarray, *, tol: float = TOL, max_iter: int = MAX_ITER) -> LogMEFit:
    """LogME of features X (N, D) for labels y (N,), with the per-class evidence and hyperparameters.

    Example:
        >>> fit = logme_fit(X, y)
        >>> fit.score, fit.alpha / fit.beta     # the ridge strength each class settled on
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ProbeError(f"LogME needs features (N, D) and labels (N,), got {X.shape} and {y.shape}")
    classes, yi = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"LogME needs at least 2 classes, got {len(classes)}")
    if not np.isfinite(X).all():
        raise ProbeError("LogME: the features hold NaN or inf values")
    N, D = X.shape
    C = len(classes)
    Y = np.zeros((N, C))
    Y[np.arange(N), yi] = 1.0  # (N, C) one-hot targets
    sigma, x = _spectrum(X, Y)  # (k,), (k, C)
    sigma = sigma[:, None]  # (k, 1)
    x2 = x ** 2
    rest = np.maximum(Y.sum(0) - x2.sum(0), 0.0)  # ||y||^2 = count of the class, minus its part in range(X)
    alpha, beta = np.ones(C), np.ones(C)
    active = np.ones(C, bool)
    iterations = 0
    while active.any() and iterations < max_iter:  # MacKay's fixed point, every unconverged class at once
        iterations += 1
        t = alpha / beta
        _, gamma, m2, res2 = _evidence(t, alpha, beta, sigma, x2, rest, N, D)
        new_alpha = gamma / np.maximum(m2, np.finfo(np.float64).tiny)  # m = 0 only for X^T y = 0
        new_beta = (N - gamma) / (res2 + EPS)
        done = np.abs(new_alpha / new_beta - t) / t <= tol
        alpha = np.where(active, new_alpha, alpha)
        beta = np.where(active, new_beta, beta)
        active &= ~done
    evidence = _evidence(alpha / beta, alpha, beta, sigma, x2, rest, N, D)[0]
    return LogMEFit(float(evidence.mean()), evidence, alpha, beta, classes, iterations)


def logme(X: np.ndarray, y: np.ndarray) -> float:
    """LogME score of features X (N, D) for class labels y (N,): the mean over classes of the maximised log
    evidence of a Bayesian linear model with one-hot targets, divided by N. Higher: the features fit the labels
    better (You et al. 2021; see the module docstring).

    Example:
        >>> logme(store.features("train"), store.labels("train"))
    """
    return logme_fit(X, y).score
