"""Classification metrics for a head on labelled features, and the confusion-matrix PNG.

Example:
    >>> report = evaluate(head, X_test, y_test)                     # arrays in, an EvalReport out
    >>> report = evaluate_store("cache/demo.h5", "heads/demo-linear.safetensors", split="val", png="cm.png")
    >>> report.accuracy, report.to_dict()
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProbeError
from ..fs import atomic_path
from ..identity import FeatureIdentity, Side

log = logging.getLogger(__name__)


def metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, balanced accuracy, per-class precision/recall/F1 and the confusion matrix.

    y_true (N,) column indices into proba (N, C); class_names (C,)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    C = len(class_names)
    y_true = np.asarray(y_true, np.int64)
    if len(y_true) == 0:
        raise ProbeError("no labelled images to evaluate: got 0 rows")
    pred = proba.argmax(1)
    k = min(5, C)
    topk = np.argpartition(-proba, k - 1, axis=1)[:, :k]  # (N, k) unordered top-k columns
    labels = np.arange(C)
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    present = np.isin(labels, y_true)
    return {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()),
        "top5": float((topk == y_true[:, None]).any(1).mean()),
        "top5_k": k,  # top-5 is top-C when there are fewer than 5 classes
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)) if present.any() else 0.0,
        "per_class": [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(s[i])} for i, c in enumerate(class_names)],
        "confusion": confusion_matrix(y_true, pred, labels=labels).tolist(),  # rows: true, columns: predicted
    }


def confusion_png(confusion: list[list[int]], class_names: list[str], path: str | os.PathLike,
                  title: str = "") -> Path:
    """Write a row-normalised confusion matrix with counts in each cell as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # recall per true class
    n = len(class_names)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=110)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # counts stay legible up to ~30 classes
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, what="any previous one is unchanged") as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


def head_columns_for(store_classes: list[str], store_labels: np.ndarray, head_classes: list[str],
                     where: str) -> np.ndarray:
    """Map a store's label indices (N,) to the head's probability columns (N,), refusing classes the head lacks."""
    col = {c: i for i, c in enumerate(head_classes)}
    names = np.asarray(store_classes, dtype=object)[store_labels]
    unknown = sorted({n for n in names.tolist() if n not in col})
    if unknown:
        raise ProbeError(f"{where} has classes the head was not trained on: {', '.join(map(repr, unknown[:10]))} "
                         f"(the head knows {', '.join(head_classes)})")
    return np.array([col[n] for n in names.tolist()], np.int64)


def check_head_matches_store(meta: dict[str, Any], store: Any) -> None:
    """Refuse a head fit on features of another backbone configuration than ``store``'s."""
    FeatureIdentity.from_config(meta["config"]).check(
        store.identity, mine="head", theirs=Side("store", str(store.path)), features_only=True,
        fix="Fit a head on this store (probe fit-head STORE) or evaluate on a store of the head's configuration.")


@dataclass
class EvalReport:
    """Metrics of a head on labelled features. ``to_dict()`` (and ``report["accuracy"]``) give the JSON of
    `probe eval --json`; ``confusion_png(path)`` draws the confusion matrix."""

    n: int
    accuracy: float
    top5: float
    top5_k: int  # top-5 is top-C when there are fewer than 5 classes
    balanced_accuracy: float
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    confusion: list[list[int]]  # rows: true, columns: predicted
    class_names: list[str]
    context: dict[str, Any] = field(default_factory=dict)  # store, head, head_type, split, png when from files

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("n", "accuracy", "top5", "top5_k", "balanced_accuracy", "per_class",
                                           "confusion")}
        return {**{k: v for k, v in self.context.items() if k != "png"}, **d,
                **({"png": self.context["png"]} if "png" in self.context else {})}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def confusion_png(self, path: str | os.PathLike, title: str = "") -> Path:
        return confusion_png(self.confusion, self.class_names, path, title or f"accuracy {self.accuracy:.3f}")


def evaluate(head: Any, X: np.ndarray, y: np.ndarray, *, class_names: list[str] | None = None,
             png: str | os.PathLike | None = None) -> EvalReport:
    """Metrics of a fitted ``head`` on features X (N, D) with labels y (N,) in the head's label space (the values
    of ``head.classes_``). A confusion-matrix PNG is written only when ``png`` is given.

    Example:
        >>> report = evaluate(head, store.features("test"), store.labels("test"))
        >>> report.accuracy, report.per_class[0]
    """
    y = np.asarray(y)
    known = np.isin(y, head.classes_)
    if not known.all():
        raise ProbeError(f"y has labels the head was not trained on: {sorted(set(y[~known].tolist()))[:10]} "
                         f"(the head knows {head.classes_.tolist()})")
    names = class_names if class_names is not None else [str(c) for c in head.classes_.tolist()]
    report = EvalReport(**metrics(np.searchsorted(head.classes_, y), head.predict_proba(X), names),
                        class_names=names)
    if png is not None:
        report.context["png"] = str(report.confusion_png(png))
    return report


def evaluate_store(store: Any, head: str | os.PathLike, split: str | None = "test",
                   png: str | os.PathLike | None = None) -> EvalReport:
    """Metrics of the head file ``head`` on the labelled rows of ``split`` (None: all rows) of a store (a path or
    FeatureStore), after checking the head was fit on features made the same way. PNG only when ``png`` is given.

    Example:
        >>> evaluate_store("cache/demo.h5", "heads/demo-linear.safetensors", split="val").accuracy
    """
    from probe.store import FeatureStore

    from .io import load_head

    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    fitted, meta = load_head(head)
    check_head_matches_store(meta, store)
    if split is not None:
        have = sorted(set(store.splits().tolist()) - {""})
        if split not in have:
            raise ProbeError(f"store {store.path} has no {split!r} split (it has: {', '.join(have) or 'none'}; "
                             "pass split=None (--split all) to evaluate every labelled row)")
    X, y = store.features(split), store.labels(split)
    keep = y >= 0
    if not keep.any():
        raise ProbeError(f"no labelled images in split {split or 'all'!r} of {store.path}")
    class_names = meta["class_names"]
    cols = head_columns_for(store.classes, y[keep], class_names, f"split {split or 'all'!r} of {store.path}")
    report = EvalReport(**metrics(cols, fitted.predict_proba(X[keep]), class_names), class_names=class_names,
                        context={"store": str(store.path), "head": str(head), "head_type": meta["head"],
                                 "split": split or "all"})
    if png is not None:
        report.context["png"] = str(report.confusion_png(
            png, f"{Path(head).name} on {store.path.name} [{split or 'all'}]: accuracy {report.accuracy:.3f}"))
        log.info("confusion matrix written to %s", png)
    return report
