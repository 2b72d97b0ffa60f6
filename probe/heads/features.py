"""Feature normalisation shared by every head, and the seeded samplers (k-shot subsets, stratified holdouts).

Normalisations (``norm=``), fitted on training features only:
    * ``none``            raw embeddings
    * ``l2``              each row scaled to unit length (cosine geometry)
    * ``cl2n``            centre with the *training* mean, then L2 (SimpleShot's CL2N)
    * ``standardize``     z-score each dimension with the training mean / std
    * ``l2+standardize``  L2 rows, then z-score

Example:
    >>> norm = fit_norm(X_train, "cl2n")
    >>> Z = apply_norm(X_test, norm)          # (N, D) float32
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ProbeError

NORMS = ("none", "l2", "cl2n", "standardize", "l2+standardize")
EPS = 1e-12


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ProbeError(f"unknown normalisation {norm!r}: expected one of {', '.join(NORMS)}")
    return norm


def l2(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero.  (N, D) -> (N, D)"""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), EPS)


def fit_norm(X: np.ndarray, norm: str) -> dict[str, Any]:
    """Learn the statistics of ``norm`` on training features X (N, D): {"norm", "mean" (D,), "scale" (D,)}."""
    check_norm(norm)
    X = np.asarray(X, np.float32)
    d = X.shape[1]
    mean, scale = np.zeros(d, np.float32), np.ones(d, np.float32)
    if norm == "cl2n":
        mean = X.mean(0)
    elif norm in ("standardize", "l2+standardize"):
        Z = l2(X) if norm == "l2+standardize" else X
        mean, std = Z.mean(0), Z.std(0)
        scale = np.where(std > EPS, std, 1.0).astype(np.float32)  # constant dims pass through centred
    return {"norm": norm, "mean": mean.astype(np.float32), "scale": scale.astype(np.float32)}


def apply_norm(X: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Apply fitted statistics to X (N, D) -> (N, D) float32."""
    X = np.asarray(X, np.float32)
    norm = params["norm"]
    if X.ndim != 2 or X.shape[1] != len(params["mean"]):
        raise ProbeError(f"expected features of shape (n, {len(params['mean'])}), got {X.shape}")
    if norm == "none":
        return X
    if norm == "l2":
        return l2(X)
    if norm == "cl2n":
        return l2(X - params["mean"])
    Z = l2(X) if norm == "l2+standardize" else X
    return ((Z - params["mean"]) / params["scale"]).astype(np.float32)


# ------------------------------------------------------------------------------------------ validation
def check_Xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labelled training data: (N, D) finite float32 and (N,) int labels with >= 2 classes."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ProbeError(f"expected 2-d features (n_samples, n_features), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ProbeError(f"expected {len(X)} labels (one per row of X), got shape {y.shape}")
    if len(X) == 0:
        raise ProbeError("no training samples: got 0 rows")
    if not np.isfinite(X).all():
        raise ProbeError(f"features contain {int((~np.isfinite(X)).sum())} NaN/inf values")
    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise ProbeError(f"a classifier needs at least 2 classes in the training labels, got {n_classes} class")
    return X, y


def check_X(X: Any, dim: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != dim:
        raise ProbeError(f"expected features of shape (n, {dim}) like the training data, got {X.shape}")
    return X


def balanced_weights(y_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights n / (k * n_c), scikit-learn's class_weight='balanced'.  (N,) int -> (N,) float32"""
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
    w = len(y_idx) / (n_classes * np.maximum(counts, 1))
    return w[y_idx].astype(np.float32)


# ------------------------------------------------------------------------------------------ sampling
def k_per_class(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` rows per class of y, drawn at random with ``seed`` (all rows of a smaller class).

    Example:
        >>> k_per_class(np.array([0, 0, 0, 1, 1]), 2, seed=0)   # two of class 0, both of class 1
    """
    if k < 1:
        raise ProbeError(f"--shots must be >= 1 images per class, got {k}")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def stratified_holdout(y: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, holdout indices): ``fraction`` of each class held out (at least one row of every class
    with >= 2 rows; a class with one row stays in train)."""
    if not 0 < fraction < 1:
        raise ProbeError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(fraction * len(idx)))
        held.append(idx[: max(1, n) if len(idx) > 1 else 0])
    held_idx = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(y)), held_idx), held_idx
