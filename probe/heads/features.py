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
BLOCK = 8192  # rows per float64 block when accumulating weighted statistics


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ProbeError(f"unknown normalisation {norm!r}: expected one of {', '.join(NORMS)}")
    return norm


def l2(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero.  (N, D) -> (N, D)"""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), EPS)


def fit_norm(X: np.ndarray, norm: str, sample_weight: np.ndarray | None = None) -> dict[str, Any]:
    """Learn the statistics of ``norm`` on training features X (N, D), rows weighted by ``sample_weight`` (N,):
    {"norm", "mean" (D,), "scale" (D,)}. Sums run in float64, so a row of weight 2 and a repeated row give the
    same float32 statistics; they run over blocks of BLOCK rows, so no temporary is the size of X."""
    check_norm(norm)
    X = np.asarray(X, np.float32)
    d = X.shape[1]
    mean, scale = np.zeros(d, np.float32), np.ones(d, np.float32)
    if norm in ("none", "l2"):
        return {"norm": norm, "mean": mean, "scale": scale}
    total = len(X) if sample_weight is None else float(np.sum(sample_weight))
    w = None if sample_weight is None else np.asarray(sample_weight)
    if norm == "l2+standardize":  # statistics of the L2-normalised rows
        rows, mean = l2, _blockwise_sum(X, l2, w)
    else:
        rows, mean = (lambda A: A), weighted_sum(X, w)
    mean = (mean / total).astype(np.float32)
    if norm in ("standardize", "l2+standardize"):
        std = np.sqrt(_blockwise_sum(X, lambda A: (rows(A) - mean) ** 2, w) / total)
        scale = np.where(std > EPS, std, 1.0).astype(np.float32)  # constant dims pass through centred
    return {"norm": norm, "mean": mean, "scale": scale}


def _blockwise_sum(X: np.ndarray, f: Any, sample_weight: np.ndarray | None) -> np.ndarray:
    """sum_i w_i f(X)_i over the rows of X (N, D) -> (D,) float64, f applied to BLOCK rows at a time (one block,
    the whole of X, below BLOCK rows)."""
    out = np.zeros(X.shape[1])
    for s in range(0, len(X), BLOCK):
        out += weighted_sum(f(X[s: s + BLOCK]), None if sample_weight is None else sample_weight[s: s + BLOCK])
    return out


def weighted_sum(A: np.ndarray, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i a_i over the rows of A (N, D) -> (D,) float64: accumulated in float64 without a float64 copy of A
    (blocks of rows when weighted)."""
    if sample_weight is None:
        return A.sum(0, dtype=np.float64)
    w = np.asarray(sample_weight, np.float64)
    out = np.zeros(A.shape[1])
    for s in range(0, len(A), BLOCK):
        out += w[s: s + BLOCK] @ A[s: s + BLOCK].astype(np.float64)
    return out


def apply_norm(X: np.ndarray, params: dict[str, Any], out: np.ndarray | None = None) -> np.ndarray:
    """Apply fitted statistics to X (N, D) -> (N, D) float32, written into ``out`` (N, D) float32 when given (else
    a new array; X itself for norm "none"); ``out`` may be X (in place). Runs over blocks of BLOCK rows: the result
    is the only array the size of X."""
    X = np.asarray(X, np.float32)
    norm = params["norm"]
    if X.ndim != 2 or X.shape[1] != len(params["mean"]):
        raise ProbeError(f"expected features of shape (n, {len(params['mean'])}), got {X.shape}")
    if norm == "none" and (out is None or out is X):
        return X
    out = np.empty_like(X) if out is None else out
    for s in range(0, len(X), BLOCK):
        out[s: s + BLOCK] = _norm_rows(X[s: s + BLOCK], params)
    return out


def _norm_rows(X: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``apply_norm`` of one block of rows (n, D) float32."""
    norm = params["norm"]
    if norm == "none":
        return X
    if norm == "l2":
        return l2(X)
    if norm == "cl2n":
        return l2(X - params["mean"])
    Z = l2(X) if norm == "l2+standardize" else X
    return (Z - params["mean"]) / params["scale"]


def balanced_weights(y_idx: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Per-sample class weights n / (k * n_c), scikit-learn's class_weight='balanced', with n and n_c the (weighted)
    counts of rows, as ``compute_class_weight(..., sample_weight=)``.  (N,) int -> (N,) float32"""
    counts = np.bincount(y_idx, weights=sample_weight, minlength=n_classes).astype(np.float64)
    w = counts.sum() / (n_classes * np.where(counts > 0, counts, 1.0))  # an absent class weighs nothing anyway
    return w[y_idx].astype(np.float32)


# ------------------------------------------------------------------------------------------ sampling
def k_per_class(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` rows per class of y, drawn at random with ``seed`` (all rows of a smaller class).

    Example:
        >>> k_per_class(np.array([0, 0, 0, 1, 1]), 2, seed=0)   # two of class 0, both of class 1
    """
    if k < 1:
        raise ProbeError(f"shots must be >= 1 images per class, got {k}")
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


def stratified_subsample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of about ``n`` rows of y (N,), each class's share of them as in y (largest remainders), at
    least two rows of every class that has them (so a k-fold split of the subsample still sees every class),
    drawn at random with ``seed``.

    Example:
        >>> stratified_subsample(np.repeat([0, 1], [800, 200]), 100, seed=0)   # 80 of class 0, 20 of class 1
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * min(n, len(y)) / len(y)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: min(n, len(y)) - take.sum()]] += 1  # the largest remainders
    take = np.maximum(take, np.minimum(counts, 2))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))
