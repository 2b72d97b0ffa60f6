"""Multi-label metrics: average precision per class, mAP two ways, F1 at per-class thresholds, and the thresholds.

Pure numpy on a 0/1 label matrix ``Y`` (N, C) and scores ``S`` (N, C) (probabilities or any monotone score): the
heads that make the scores live elsewhere. A single-label store's ``FeatureStore.label_matrix()`` is its one-hot,
so both kinds of store go through the same functions.

Conventions, stated once:
    * A class with no positive row has no AP (NaN here, None in ``multilabel_metrics``); mAP averages the classes
      that have positives (as VOC and COCO do). Its F1, precision and recall count as 0 (scikit-learn's
      ``zero_division=0``) and it is still in macro F1.
    * Predicted positive means ``score >= threshold``.
    * Precision-recall points are taken at each distinct score (tied scores enter together), so every number is
      independent of the order of tied rows.

``multilabel_folds`` splits the rows of such a Y into cross-validation folds that keep each label's share.

Example:
    >>> thr = fit_thresholds(Y_val, P_val)                       # (C,) maximising each class's F1 on val
    >>> m = multilabel_metrics(Y_test, P_test, thr, store.classes)
    >>> m["mAP"], m["mAP_voc07"], m["micro_f1"], m["per_class"]["cat"]["ap"]
    >>> for train, test in multilabel_folds(Y, 5, seed=0): ...  # iterative stratification, sklearn-style pairs
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ProbeError

DEFAULT_THRESHOLD = 0.5  # a class without positives on val: no F1 to maximise, the midpoint of a probability
VOC07_RECALLS = np.linspace(0.0, 1.0, 11)  # VOC2007's 11 recall levels 0, 0.1, …, 1


def _check(Y: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Y, S = np.asarray(Y), np.asarray(S, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ProbeError(f"labels and scores must be (N, C) matrices of one shape, got {Y.shape} and {S.shape}")
    if not np.isin(Y, (0, 1)).all():
        raise ProbeError(f"labels must be 0/1, got values {sorted(np.unique(Y).tolist())[:5]}")
    if not np.isfinite(S).all():
        raise ProbeError("scores contain NaN or infinity")
    return Y.astype(bool), S


def pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's (precision, recall, threshold) at each distinct score, highest score first: predicting
    ``s >= threshold[k]`` gives ``precision[k]`` and ``recall[k]``. Recall is NaN when ``y`` has no positive.

    Example:
        >>> pr_curve(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7]))[0]    # precision
        array([1.        , 0.5       , 0.66666667])
    """
    y, s = np.asarray(y, bool), np.asarray(s, np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last row of each group of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / y.sum()
    return precision, recall, s[last]


def average_precision(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """(C,) area under each class's precision-recall curve, step-wise: sum over thresholds of (R_k - R_k-1) * P_k,
    scikit-learn's ``average_precision_score``. NaN for a class without positives.

    Example:
        >>> average_precision([[1, 0], [0, 1], [1, 1]], [[0.9, 0.2], [0.8, 0.7], [0.7, 0.1]])
        array([0.83333333, 0.83333333])
    """
    Y, S = _check(Y, S)
    out = np.full(Y.shape[1], np.nan)
    for c in np.flatnonzero(Y.any(0)):
        p, r, _ = pr_curve(Y[:, c], S[:, c])
        out[c] = float(np.sum(np.diff(r, prepend=0.0) * p))
    return out


def voc07_ap(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """(C,) VOC2007's 11-point interpolated AP: the mean over recall levels t = 0, 0.1, …, 1 of the highest
    precision at recall >= t (0 where no point reaches t). NaN for a class without positives.

    Example (hand-computed): ranks TP FP TP FP TP give (P, R) = (1, 1/3), (1/2, 1/3), (2/3, 2/3), (1/2, 2/3), (3/5, 1);
    t = 0…0.3 -> 1, t = 0.4…0.6 -> 2/3, t = 0.7…1 -> 3/5: (4 + 2 + 2.4) / 11
        >>> voc07_ap([[1], [0], [1], [0], [1]], [[0.9], [0.8], [0.7], [0.6], [0.5]])
        array([0.76363636])
    """
    Y, S = _check(Y, S)
    out = np.full(Y.shape[1], np.nan)
    for c in np.flatnonzero(Y.any(0)):
        p, r, _ = pr_curve(Y[:, c], S[:, c])
        out[c] = float(np.mean([p[r >= t].max() if (r >= t).any() else 0.0 for t in VOC07_RECALLS]))
    return out


def mean_ap(Y: np.ndarray, S: np.ndarray, voc07: bool = False) -> float:
    """mAP over the classes with positives (area under PR, or VOC2007 11-point with ``voc07``); NaN if none."""
    ap = voc07_ap(Y, S) if voc07 else average_precision(Y, S)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def _counts(Y: np.ndarray, S: np.ndarray, thresholds: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Per-class (tp, fp, fn) of predicting ``S >= thresholds``."""
    Y, S = _check(Y, S)
    pred = S >= np.broadcast_to(np.asarray(thresholds, np.float64), (Y.shape[1],))
    return (pred & Y).sum(0), (pred & ~Y).sum(0), (~pred & Y).sum(0)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (scikit-learn's zero_division=0)."""
    return np.divide(a, b, out=np.zeros(np.shape(a), np.float64), where=np.asarray(b) > 0)


def f1_scores(Y: np.ndarray, S: np.ndarray, thresholds: np.ndarray | float) -> dict[str, Any]:
    """Micro and macro F1 of predicting ``S >= thresholds`` (one per class, or one for all), with the per-class
    precision, recall and F1 (0 where undefined). Micro pools every (row, class) decision; macro is the plain mean
    of the C per-class F1 (scikit-learn's ``f1_score(average=...)``)."""
    tp, fp, fn = _counts(Y, S, thresholds)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"micro_f1": float(_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
            "macro_f1": float(f1.mean()) if len(f1) else float("nan"),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": f1}


def fit_thresholds(Y_val: np.ndarray, P_val: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(C,) per-class thresholds maximising each class's F1 on validation rows.

    The candidates are the distinct val scores (predict ``score >= candidate``); of equal F1 the lower threshold
    wins (more recall at the same F1). The threshold returned is the midpoint between the chosen score and the
    next lower val score (the chosen score itself when none is lower), so a test score a hair below the last
    positive val score still counts. A class without positives on val gets ``default`` (0.5).

    Example:
        >>> fit_thresholds([[1], [1], [0], [0]], [[0.9], [0.6], [0.4], [0.1]])
        array([0.5])
    """
    Y, P = _check(Y_val, P_val)
    out = np.full(Y.shape[1], float(default))
    for c in np.flatnonzero(Y.any(0)):
        p, r, thr = pr_curve(Y[:, c], P[:, c])
        f1 = _ratio(2 * p * r, p + r)
        k = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last (lowest-threshold) of the best
        out[c] = (thr[k] + thr[k + 1]) / 2 if k + 1 < len(thr) else thr[k]
    return out


def multilabel_metrics(Y: np.ndarray, P: np.ndarray, thresholds: np.ndarray | float,
                       class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything ``eval`` reports for a multi-label head, JSON-ready: mAP (area under PR) and mAP_voc07 over the
    classes with positives, micro and macro F1 at ``thresholds``, and per class its AP (None without positives),
    VOC07 AP, precision, recall, F1, support (positive rows) and threshold.

    Example:
        >>> m = multilabel_metrics(Y, P, thr, ["cat", "dog"])
        >>> m["mAP"], m["per_class"]["dog"]["f1"]
    """
    Y, P = _check(Y, P)
    C = Y.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(C)]
    if len(names) != C:
        raise ProbeError(f"{len(names)} class names for {C} label columns")
    thr = np.broadcast_to(np.asarray(thresholds, np.float64), (C,))
    ap, ap07, f = average_precision(Y, P), voc07_ap(Y, P), f1_scores(Y, P, thr)
    support = Y.sum(0)

    def num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "images": int(len(Y)),
        "classes": C,
        "labels_per_image": float(support.sum() / len(Y)) if len(Y) else 0.0,
        "mAP": num(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "mAP_voc07": num(np.nanmean(ap07)) if np.isfinite(ap07).any() else None,
        "micro_f1": f["micro_f1"],
        "macro_f1": f["macro_f1"],
        "classes_without_positives": [n for n, s in zip(names, support) if not s],
        "per_class": {n: {"ap": num(ap[c]), "ap_voc07": num(ap07[c]), "precision": float(f["precision"][c]),
                          "recall": float(f["recall"][c]), "f1": float(f["f1"][c]), "support": int(support[c]),
                          "threshold": float(thr[c])} for c, n in enumerate(names)},
    }


def multilabel_folds(Y: np.ndarray, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Iterative stratification of the rows of a 0/1 label matrix Y (N, C) into ``n_splits`` folds (Sechidis et
    al. 2011, "On the stratification of multi-label data", as scikit-multilearn's ``IterativeStratification``
    with order 1): ``[(train, test), ...]`` row indices, as scikit-learn's ``KFold(...).split`` gives them.

    Each fold wants N / k rows and D_c / k positives of each label c (D_c: its positives). Until every row is
    placed: take the label with the fewest positives still unplaced and place those rows one by one (in seeded
    random order), each in the fold that most wants that label, then the fold that wants most rows, then a seeded
    coin; a placed row lowers its fold's wants for all its labels. Rows without labels go last, by rows wanted.
    Rare labels thus spread first: a label with p >= k positives puts floor(p / k) or ceil(p / k) in every fold
    when it is the rarest. Seeded and deterministic; every fold is non-empty.

    Example:
        >>> [len(test) for _, test in multilabel_folds(np.eye(6, 3, dtype=int), 3, seed=0)]
        [2, 2, 2]
    """
    Y = np.asarray(Y)
    if Y.ndim != 2 or not np.isin(Y, (0, 1)).all():
        raise ProbeError(f"multilabel_folds: Y must be an (N, C) 0/1 label matrix, got shape {Y.shape}")
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or not 2 <= n_splits <= len(Y):
        raise ProbeError(f"n_splits must be an integer in [2, {len(Y)}] (the number of rows), got {n_splits!r}")
    k = int(n_splits)
    fold = _stratify(Y.astype(bool), np.full(k, 1 / k), np.random.default_rng(seed))
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def multilabel_holdout(Y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out) row indices of a 0/1 label matrix Y (N >= 2, C), about ``fraction`` of the rows held out,
    iteratively stratified as ``multilabel_folds`` does (two parts of shares 1 - fraction and fraction); neither is
    empty. The multi-label twin of ``features.stratified_holdout``."""
    Y = np.asarray(Y)
    if Y.ndim != 2 or len(Y) < 2 or not np.isin(Y, (0, 1)).all():
        raise ProbeError(f"a holdout needs an (N >= 2, C) 0/1 label matrix, got shape {Y.shape}")
    if not 0 < fraction < 1:
        raise ProbeError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    part = _stratify(Y.astype(bool), np.array([1 - fraction, fraction]), rng)
    for empty in (0, 1):  # a tiny matrix can leave a part empty: give it one row of the other
        if not (part == empty).any():
            part[rng.choice(len(part))] = empty
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def _stratify(Y: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sechidis et al.'s iterative stratification of the rows of a bool Y (N, C) into len(shares) parts of those
    shares of the rows and of each label's positives -> (N,) the part of each row."""
    k = len(shares)
    rows_wanted = len(Y) * shares  # (k,)
    wanted = np.outer(shares, Y.sum(0))  # (k, C) positives of each label each part still wants
    fold = np.full(len(Y), -1)  # (N,) the part each row is placed in; -1 while unplaced
    left = Y.sum(0)  # (C,) unplaced positives per label
    while (unplaced := fold < 0).any():
        if left.any():
            label = rng.choice(np.flatnonzero(left == left[left > 0].min()))  # the rarest; ties by the seed
            rows, want = np.flatnonzero(unplaced & Y[:, label]), wanted[:, label]  # a view: follows the updates
        else:
            rows, want = np.flatnonzero(unplaced), np.zeros(k)
        for i in rng.permutation(rows):
            f = np.lexsort((rng.random(k), rows_wanted, want))[-1]  # the last key sorts first: the most wanting
            fold[i] = f
            wanted[f] -= Y[i]
            left -= Y[i]
            rows_wanted[f] -= 1
    return fold
