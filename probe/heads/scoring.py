"""The metric that chooses a head's hyperparameters on validation rows (``select=``): the linear head's L2 strength
and the MLP's early stop.

    accuracy        top-1 accuracy (the default; CLIP's and dinov2's linear probes)
    mean-per-class  the mean over classes of each class's recall, i.e. balanced accuracy (Kornblith et al. 2019 for
                    FGVC Aircraft, Caltech-101, Oxford Flowers and Oxford-IIIT Pets)
    macro-f1        the unweighted mean over classes of F1
    map             mean average precision over classes (area under each class's precision-recall curve): it
                    needs multi-label targets (every single-label fit refuses it) and is their default

Multi-label targets take map and macro-f1 (at each class's F1-optimal threshold on the validation rows,
``linear.multilabel_score``); accuracy and mean-per-class are single-label metrics and are refused there.

Row weights count as repeated rows, as in scikit-learn's ``sample_weight``: a row of weight 2 counts twice.

Example:
    >>> score("mean-per-class", y_true, pred, n_classes=10)     # y_true, pred (N,) class indices
"""

from __future__ import annotations

import numpy as np

from ..errors import ProbeError

SELECT = ("accuracy", "mean-per-class", "macro-f1", "map")
SINGLE_LABEL = ("accuracy", "mean-per-class", "macro-f1")
MULTILABEL = ("map", "macro-f1")


def refuse_single(select: str, where: str = "these labels are multi-label") -> None:
    """ProbeError for a single-label-only metric (accuracy, mean-per-class) on multi-label targets."""
    if select not in MULTILABEL:
        raise ProbeError(f"select {select!r} scores one class per row; {where} (several labels per image): use "
                         f"map (the default there) or macro-f1")


def refuse_map(select: str, where: str = "these labels have one class per row") -> None:
    """ProbeError for ``select="map"`` on single-label data: average precision ranks several positives per row."""
    if select == "map":
        raise ProbeError(f"select 'map' (mean average precision) needs a multi-label store; {where}: use "
                         f"{', '.join(SINGLE_LABEL[:-1])} or {SINGLE_LABEL[-1]}")


def key(select: str) -> str:
    """The sweep's record of a metric: ``val_accuracy``, ``val_mean_per_class``, ``val_macro_f1``."""
    return "val_" + select.replace("-", "_")


def score(select: str, y_true: np.ndarray, pred: np.ndarray, n_classes: int,
          weights: np.ndarray | None = None) -> float:
    """``select`` of predictions ``pred`` (N,) against ``y_true`` (N,), both class indices < ``n_classes``;
    ``weights`` (N,) per row (None, or all zero: every row counts once). Higher is better.

    mean-per-class averages over the classes that occur in ``y_true`` (scikit-learn's balanced_accuracy_score);
    macro-f1 over those in ``y_true`` or ``pred`` (scikit-learn's f1_score(average="macro"), a class never
    predicted correctly scoring 0)."""
    refuse_map(select)
    if select not in SINGLE_LABEL:
        raise ProbeError(f"unknown select {select!r}: expected one of {', '.join(SELECT)}")
    y_true, pred = np.asarray(y_true, np.int64), np.asarray(pred, np.int64)
    w = np.ones(len(y_true)) if weights is None or not np.sum(weights) > 0 else np.asarray(weights, np.float64)
    correct = (pred == y_true) * w  # (N,) weight of each correct row
    if select == "accuracy":
        return float(correct.sum() / w.sum())
    per_true = np.bincount(y_true, w, n_classes)  # (K,) weight of each true class
    hits = np.bincount(y_true, correct, n_classes)  # (K,) of which predicted right
    if select == "mean-per-class":
        present = per_true > 0
        return float((hits[present] / per_true[present]).mean())
    per_pred = np.bincount(pred, w, n_classes)  # (K,)
    labels = np.zeros(n_classes, bool)
    labels[y_true], labels[pred] = True, True
    denom = per_true + per_pred  # 2 tp + fp + fn
    f1 = np.divide(2 * hits, denom, out=np.zeros(n_classes), where=denom > 0)
    return float(f1[labels].mean())
