"""Classification metrics for a head on labelled features, and the confusion-matrix (or per-class AP) PNG.

A multi-label head (on a multi-label store) gets a ``MultiLabelReport`` instead: mAP (area under PR) and VOC07
11-point mAP, per-class AP (and its bar chart, ``ap_png``), micro/macro F1 at the head's thresholds, a bootstrap
interval of mAP; no confusion matrix (several labels per image have no single true/predicted cell); its calibration
block has the mean per-class ECE, NLL and Brier before and after the head's per-class Platt scaling
(``calibration.multilabel_calibration_metrics``), and its reliability diagram pools every (image, class)
probability.

Example:
    >>> report = evaluate(head, X_test, y_test)                     # arrays in, an EvalReport out
    >>> report = evaluate_store("cache/demo.h5", "heads/demo-linear.safetensors", split="val", png="cm.png")
    >>> report.accuracy, report.to_dict()
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProbeError
from ..fs import figure_format, save_figure
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


BOOTSTRAP = 1000  # resamples: 0.15 s for 10k rows (1.2 s for 50k); the ends vary ~0.1 point by seed at 1k rows
MAX_BOOTSTRAP = 1_000_000  # 8 MB of values per statistic, minutes for 10k rows; the ends settle long before
LEVEL = 0.95


def check_resamples(resamples: Any, allow_none: bool = True) -> None:
    """A bootstrap count: 100 .. ``MAX_BOOTSTRAP`` resamples (or 0, none, where ``allow_none``); else one line."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 0 or \
            (resamples < 100 and not (allow_none and resamples == 0)):
        raise ProbeError(f"bootstrap must be a number of resamples >= 100 (or 0 for no intervals), got {resamples!r}")
    if resamples > MAX_BOOTSTRAP:  # the values kept grow with them: 1e11 would need 800 GB
        raise ProbeError(f"bootstrap must be at most {MAX_BOOTSTRAP:,} resamples (the interval ends settle long "
                         f"before), got {resamples}")


def bootstrap_intervals(stats: dict[str, Callable[[np.ndarray], np.ndarray]], n: int, resamples: int = BOOTSTRAP,
                        seed: int = 0, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile bootstrap intervals: every statistic is computed on the same ``resamples`` draws of ``n`` rows
    with replacement (seeded), and the central ``level`` of its values is returned as [low, high].

    ``stats``: name -> f(idx (B, n) row indices) -> (B,) the statistic on each resample (vectorised).

    Example:
        >>> bootstrap_intervals(classification_stats(y, pred, K), len(y), 1000, seed=0)["accuracy"]
        [0.761, 0.839]
    """
    check_resamples(resamples, allow_none=False)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbeError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    block = max(1, 2 ** 23 // n)  # resamples per draw: ~8M indices (32 MB of int32) at a time
    values: dict[str, list[np.ndarray]] = {k: [] for k in stats}
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n), dtype=np.int32)  # (B, n)
        for name, f in stats.items():
            values[name].append(f(idx))
    q = [50 * (1 - level), 50 * (1 + level)]
    return {k: [float(x) for x in np.percentile(np.concatenate(v), q)] for k, v in values.items()}


def classification_stats(y_true: np.ndarray, pred: np.ndarray, n_classes: int
                         ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Vectorised accuracy and balanced accuracy (the mean recall of the classes present in each resample, as
    ``metrics``) of predictions ``pred`` (N,) against ``y_true`` (N,), for ``bootstrap_intervals``. A multi-label
    report would add "map" here (average precision per class over the resampled rows)."""
    y_true, correct = np.asarray(y_true, np.int64), np.asarray(pred) == np.asarray(y_true)  # (N,), (N,)
    K = n_classes

    def accuracy(idx: np.ndarray) -> np.ndarray:
        return correct[idx].mean(1)  # (B,)

    def balanced_accuracy(idx: np.ndarray) -> np.ndarray:
        B = len(idx)
        cell = (np.arange(B)[:, None] * K + y_true[idx]).ravel()  # (B * n,) resample b, true class c -> b*K + c
        total = np.bincount(cell, minlength=B * K).reshape(B, K)
        hits = np.bincount(cell, weights=correct[idx].ravel(), minlength=B * K).reshape(B, K)
        present = total > 0
        return np.where(present, hits / np.maximum(total, 1), 0).sum(1) / present.sum(1)

    return {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy}


def multilabel_stats(Y: np.ndarray, P: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Vectorised mAP (area under PR, ``multilabel.mean_ap``) of scores P (N, C) against the 0/1 matrix Y (N, C)
    for ``bootstrap_intervals``: a resample is a count per row, so each class's rows are sorted once and the
    precision-recall points of every resample are cumulative sums of counts in that order (ties enter together).
    A class without positives in a resample is left out of that resample's mean."""
    Y, P = np.asarray(Y, bool), np.asarray(P, np.float64)
    n, C = Y.shape
    per_class = []  # (order (n,), group ends, y in that order) of each class
    for c in range(C):
        order = np.argsort(-P[:, c], kind="stable")
        s = P[order, c]
        per_class.append((order, np.r_[np.flatnonzero(np.diff(s)), n - 1], Y[order, c].astype(np.float64)))

    def map_(idx: np.ndarray) -> np.ndarray:
        B = len(idx)
        counts = np.zeros((B, n))
        np.add.at(counts, (np.repeat(np.arange(B), idx.shape[1]), idx.ravel()), 1)  # (B, n) draws of each row
        aps = np.full((B, C), np.nan)
        for c, (order, last, y) in enumerate(per_class):
            cnt = counts[:, order]  # (B, n) in score order
            tp = np.cumsum(cnt * y, 1)[:, last]  # (B, G) at each group of tied scores
            drawn = np.cumsum(cnt, 1)[:, last]
            pos = tp[:, -1]
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(drawn > 0, tp / np.maximum(drawn, 1), 0.0)
                recall = tp / pos[:, None]
                ap = (np.diff(recall, prepend=0.0, axis=1) * precision).sum(1)
            aps[:, c] = np.where(pos > 0, ap, np.nan)
        have = ~np.isnan(aps)
        return np.nansum(aps, 1) / np.maximum(have.sum(1), 1)  # (B,); 0 for a resample without any positive

    return {"map": map_}


def _add_intervals(report: EvalReport, y_true: np.ndarray, proba: np.ndarray, resamples: int, seed: int) -> None:
    """Bootstrap intervals of ``report`` (``ci95`` and how they were drawn, ``bootstrap``); none for 0 resamples."""
    if resamples == 0:
        return
    t0 = time.perf_counter()
    report.ci95 = bootstrap_intervals(classification_stats(y_true, proba.argmax(1), proba.shape[1]), len(y_true),
                                      resamples, seed)
    report.bootstrap = {"resamples": int(resamples), "seed": int(seed), "level": LEVEL}
    log.info("bootstrap intervals: %d resamples of %d rows in %.3fs", resamples, len(y_true), time.perf_counter() - t0)


def _add_calibration(report: EvalReport, head: Any, X: np.ndarray, y_true: np.ndarray, proba: np.ndarray,
                     png: str | os.PathLike | None = None, title: str = "") -> None:
    """``report.calibration``: ECE (15 equal-width bins), NLL and Brier of the head's probabilities without
    (``before``) and with (``after``; None for a head never calibrated) its temperature, and the reliability diagram
    written to ``png`` when given."""
    from .calibration import ECE_BINS, calibration_metrics, reliability_png

    T = getattr(head, "temperature_", None)
    before = proba if T is None else head.uncalibrated_proba(X)
    after = None if T is None else proba
    report.calibration = {"calibrated": T is not None, "temperature": T, "ece_bins": ECE_BINS,
                          "before": calibration_metrics(before, y_true),
                          "after": None if after is None else calibration_metrics(after, y_true)}
    if png is not None:
        report.calibration["reliability_png"] = str(reliability_png(before, y_true, png, after, title))


NAMED_CLASSES = 40  # the most classes confusion_png names (and sizes the picture for)


def confusion_png(confusion: list[list[int]], class_names: list[str], path: str | os.PathLike,
                  title: str = "") -> Path:
    """Write a row-normalised confusion matrix with counts in each cell as a PNG. Up to ``NAMED_CLASSES`` classes
    each row and column is named; above, the picture keeps a fixed size (a cell per class, an ImageNet-sized matrix
    would otherwise be a gigapixel image) and every k-th class index is marked, in the head's class order."""
    figure_format(path)  # before drawing: a bad suffix costs nothing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # recall per true class
    n = len(class_names)
    size = min(max(4.0, 0.55 * n + 2.5), 0.55 * NAMED_CLASSES + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=110)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= NAMED_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
    else:
        step = int(np.ceil(n / 20))
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
        title = (f"{title}: " if title else "") + f"{n} classes, by index in the head's order"
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
    return save_figure(fig, path)


AP_BARS = 60  # the most bars ap_png draws: the best and worst half of that many above it


def ap_png(ap: list[float | None], class_names: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Write each class's average precision ``ap`` (C,) (None: no positives, left out) as horizontal bars, highest
    on top, with their mean (the mAP) as a dashed line and in the title, as a PNG. Above ``AP_BARS`` classes, the
    best and the worst AP_BARS / 2 are drawn (the mAP is over all), so the picture stays readable and quick."""
    figure_format(path)  # before drawing: a bad suffix costs nothing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = sorted((a, n) for a, n in zip(ap, class_names) if a is not None)  # ascending: barh draws bottom-up
    mAP = float(np.mean([a for a, _ in scored])) if scored else float("nan")
    between = max(0, len(scored) - AP_BARS)
    shown = scored[:AP_BARS // 2] + scored[-(AP_BARS // 2):] if between else scored
    values = np.array([a for a, _ in shown])
    n = len(shown)
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * n + 1.3)), dpi=110)
    ax.barh(range(n), values, color="tab:blue")
    ax.set_yticks(range(n), [name for _, name in shown], fontsize=8)
    for i, a in enumerate(values):
        ax.text(a + 0.01, i, f"{a:.3f}", va="center", fontsize=7)
    if n:
        ax.axvline(mAP, ls="--", color="grey", lw=1, zorder=0)  # behind the bars
    ax.set(xlim=(0, 1.08), ylim=(-0.6, n - 0.4))
    left_out = len(ap) - len(scored)
    if between:
        ax.axhline(AP_BARS // 2 - 0.5, color="black", lw=0.8)
    ax.set_xlabel("average precision (area under PR)"
                  + (f"; {between} classes between the worst and best {AP_BARS // 2} not drawn" if between else "")
                  + (f"; {left_out} class{'es' * (left_out > 1)} without positives not shown" if left_out else ""))
    ax.set_title((f"{title}: " if title else "") + f"mAP {mAP:.3f} over {len(scored)} classes", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def head_columns_for(store_classes: list[str], store_labels: np.ndarray, head_classes: list[str],
                     where: str) -> np.ndarray:
    """Map a store's label indices (N,) to the head's probability columns (N,), refusing classes the head lacks."""
    col = {c: i for i, c in enumerate(head_classes)}
    present = np.asarray(store_classes, dtype=object)[np.unique(store_labels)].tolist()
    unknown = sorted({n for n in present if n not in col})
    if unknown:
        raise ProbeError(f"{where} has classes the head was not trained on: {', '.join(map(repr, unknown[:10]))} "
                         f"(the head knows {', '.join(head_classes)})")
    lut = np.array([col.get(c, -1) for c in store_classes], np.int64)  # store class -> head column
    return lut[store_labels]


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
    ci95: dict[str, list[float]] = field(default_factory=dict)  # bootstrap [low, high]: accuracy, balanced_accuracy
    bootstrap: dict[str, Any] = field(default_factory=dict)  # how ci95 was drawn: resamples, seed, level
    calibration: dict[str, Any] = field(default_factory=dict)  # ECE/NLL/Brier before and after the temperature

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("n", "accuracy", "top5", "top5_k", "balanced_accuracy", "per_class",
                                           "confusion")}
        if self.ci95:
            d.update(ci95=self.ci95, bootstrap=self.bootstrap)
        if self.calibration:
            d["calibration"] = self.calibration
        return {**{k: v for k, v in self.context.items() if k != "png"}, **d,
                **({"png": self.context["png"]} if "png" in self.context else {})}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def confusion_png(self, path: str | os.PathLike, title: str = "") -> Path:
        return confusion_png(self.confusion, self.class_names, path, title or f"accuracy {self.accuracy:.3f}")


@dataclass
class MultiLabelReport:
    """Metrics of a multi-label head: ``metrics`` is ``multilabel.multilabel_metrics`` (mAP, mAP_voc07, micro/macro
    F1, per class AP / VOC07 AP / precision / recall / F1 / support / threshold). ``to_dict()`` (and
    ``report["mAP"]``) give the JSON of `probe eval --json`; ``ap_png(path)`` draws the per-class AP bars."""

    metrics: dict[str, Any]
    class_names: list[str]
    context: dict[str, Any] = field(default_factory=dict)  # store, head, head_type, split, ap_png when written
    ci95: dict[str, list[float]] = field(default_factory=dict)  # bootstrap [low, high]: map
    bootstrap: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # mean per-class ECE/NLL/Brier before/after Platt

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {**self.context, "multilabel": True, "n": self.metrics["images"], **self.metrics,
                             "confusion": None, "confusion_note": "no confusion matrix for multi-label heads",
                             "calibration": self.calibration}
        if self.ci95:
            d.update(ci95=self.ci95, bootstrap=self.bootstrap)
        return d

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    @property
    def mAP(self) -> float | None:
        return self.metrics["mAP"]

    def ap_png(self, path: str | os.PathLike, title: str = "") -> Path:
        return ap_png([c["ap"] for c in self.metrics["per_class"].values()], self.class_names, path, title)


def evaluate_multilabel(head: Any, X: np.ndarray, Y: np.ndarray, *, class_names: list[str] | None = None,
                        bootstrap: int = BOOTSTRAP, seed: int = 0, context: dict[str, Any] | None = None,
                        reliability_png: str | os.PathLike | None = None, title: str = "",
                        ap_png: str | os.PathLike | None = None) -> MultiLabelReport:
    """``MultiLabelReport`` of a multi-label ``head`` on X (N, D) and its (N, C) 0/1 label matrix Y (columns in the
    head's order), with a bootstrap 95% interval of mAP (``bootstrap`` resamples; 0: none) and the calibration
    block (mean per-class ECE/NLL/Brier without and with ``platt_``); the per-class AP chart only when ``ap_png``
    (its path in ``report["ap_png"]``), the pooled reliability diagram only when ``reliability_png``. ``title``
    heads both charts."""
    from . import calibration as cal
    from .multilabel import multilabel_metrics

    if not getattr(head, "multilabel_", False):
        raise ProbeError(f"this {head.kind} head takes one class per row; a (N, C) label matrix needs a multi-label "
                         "head (fit-head on a multi-label store)")
    Y = np.asarray(Y)
    if Y.ndim != 2 or Y.shape[1] != len(head.classes_):
        raise ProbeError(f"labels must be a ({len(Y)}, {len(head.classes_)}) 0/1 matrix for this multi-label head, "
                         f"got shape {Y.shape}")
    if len(Y) == 0:
        raise ProbeError("no images to evaluate: got 0 rows")
    names = class_names if class_names is not None else [str(c) for c in head.classes_.tolist()]
    P = head.predict_proba(X)
    report = MultiLabelReport(multilabel_metrics(Y, P, head.thresholds_, names), names, dict(context or {}))
    if ap_png is not None:
        report.context["ap_png"] = str(report.ap_png(ap_png, title))
        log.info("per-class AP chart written to %s", ap_png)
    platt = hasattr(head, "platt_")
    before = head.uncalibrated_proba(X) if platt else P
    report.calibration = {"calibrated": platt, "method": "platt" if platt else None,
                          "note": cal.MULTILABEL_CALIBRATED if platt else cal.MULTILABEL_NOT_CALIBRATED,
                          "ece_bins": cal.ECE_BINS, "ece": "mean over classes of each class's ECE on its probability",
                          "before": cal.multilabel_calibration_metrics(before, Y),
                          "after": cal.multilabel_calibration_metrics(P, Y) if platt else None}
    if reliability_png is not None:
        pooled = title and f"{title}: reliability, {Y.size} (image, class) pairs pooled"
        report.calibration["reliability_png"] = str(cal.reliability_png(
            before, Y, reliability_png, P if platt else None, pooled, multilabel=True))
        report.calibration["reliability_pooled"] = "every (image, class) probability in one diagram"
    if bootstrap:
        t0 = time.perf_counter()
        report.ci95 = bootstrap_intervals(multilabel_stats(Y, P), len(Y), bootstrap, seed)
        report.bootstrap = {"resamples": int(bootstrap), "seed": int(seed), "level": LEVEL}
        log.info("bootstrap interval of mAP: %d resamples of %d rows in %.3fs", bootstrap, len(Y),
                 time.perf_counter() - t0)
    return report


def evaluate(head: Any, X: np.ndarray, y: np.ndarray, *, class_names: list[str] | None = None,
             png: str | os.PathLike | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0,
             reliability_png: str | os.PathLike | None = None,
             ap_png: str | os.PathLike | None = None) -> EvalReport | MultiLabelReport:
    """Metrics of a fitted ``head`` on features X (N, D) with labels y (N,) in the head's label space (the values
    of ``head.classes_``). A confusion-matrix PNG is written only when ``png`` is given. ``bootstrap``: resamples
    of the rows (seeded by ``seed``) for the 95% intervals in ``ci95``; 0 for none. ``calibration`` has ECE, NLL
    and Brier before and after the head's temperature; the reliability diagram only when ``reliability_png``.
    A multi-label head with y (N, C) 0/1 gives ``evaluate_multilabel``'s report (its chart: ``ap_png``).

    Example:
        >>> report = evaluate(head, store.features("test"), store.labels("test"))
        >>> report.accuracy, report.per_class[0]
    """
    y = np.asarray(y)
    if getattr(head, "multilabel_", False) or y.ndim == 2:
        return evaluate_multilabel(head, X, y, class_names=class_names, bootstrap=bootstrap, seed=seed,
                                   reliability_png=reliability_png, ap_png=ap_png)
    known = np.isin(y, head.classes_)
    if not known.all():
        raise ProbeError(f"y has labels the head was not trained on: {sorted(set(y[~known].tolist()))[:10]} "
                         f"(the head knows {head.classes_.tolist()})")
    names = class_names if class_names is not None else [str(c) for c in head.classes_.tolist()]
    cols, proba = np.searchsorted(head.classes_, y), head.predict_proba(X)
    report = EvalReport(**metrics(cols, proba, names), class_names=names)
    _add_intervals(report, cols, proba, bootstrap, seed)
    if png is not None:
        report.context["png"] = str(report.confusion_png(png))
    _add_calibration(report, head, X, cols, proba, reliability_png)  # its PNG after the confusion matrix
    return report


def evaluate_store(store: Any, head: str | os.PathLike, split: str | None = "test",
                   png: str | os.PathLike | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0,
                   reliability_png: str | os.PathLike | None = None,
                   ap_png: str | os.PathLike | None = None) -> EvalReport | MultiLabelReport:
    """Metrics of the head file ``head`` on the labelled rows of ``split`` (None: all rows) of a store (a path or
    FeatureStore), after checking the head was fit on features made the same way. The confusion-matrix PNG only
    when ``png`` is given (a multi-label head has none: its per-class AP chart goes to ``ap_png`` when given);
    ``bootstrap`` resamples (seeded by ``seed``; 0: none) give the 95% intervals in ``ci95``. ``calibration``:
    ECE/NLL/Brier before and after the head's temperature (fit on the store's val split by fit-head, so its
    ``after`` on val is optimistic), and the reliability diagram when ``reliability_png`` is given.

    Example:
        >>> evaluate_store("cache/demo.h5", "heads/demo-linear.safetensors", split="val").accuracy
    """
    from probe.store import FeatureStore

    from .io import load_head

    for figure in (png, reliability_png, ap_png):  # refused before anything is computed or written
        if figure is not None:
            figure_format(figure)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    fitted, meta = load_head(head)
    check_head_matches_store(meta, store)
    if split is not None:
        have = sorted(set(store.splits().tolist()) - {""})
        if split not in have:
            raise ProbeError(f"store {store.path} has no {split!r} split (it has: {', '.join(have) or 'none'}; "
                             "pass split=None (--split all) to evaluate every labelled row)")
    if getattr(fitted, "multilabel_", False) or getattr(store, "multilabel", False):
        return _evaluate_store_multilabel(store, fitted, meta, head, split, bootstrap, seed, reliability_png, ap_png)
    X, y = store.features(split), store.labels(split)
    keep = y >= 0
    if not keep.any():
        raise ProbeError(f"no labelled images in split {split or 'all'!r} of {store.path}")
    class_names = meta["class_names"]
    cols = head_columns_for(store.classes, y[keep], class_names, f"split {split or 'all'!r} of {store.path}")
    proba = fitted.predict_proba(X[keep])
    report = EvalReport(**metrics(cols, proba, class_names), class_names=class_names,
                        context={"store": str(store.path), "head": str(head), "head_type": meta["head"],
                                 "split": split or "all"})
    _add_intervals(report, cols, proba, bootstrap, seed)
    if png is not None:
        report.context["png"] = str(report.confusion_png(
            png, f"{Path(head).name} on {store.path.name} [{split or 'all'}]: accuracy {report.accuracy:.3f}"))
        log.info("confusion matrix written to %s", png)
    _add_calibration(report, fitted, X[keep], cols, proba, reliability_png,
                     f"{Path(head).name} on {store.path.name} [{split or 'all'}]: reliability, {len(cols)} images")
    fit_on = ((meta.get("fit") or {}).get("calibration") or {}).get("fit_on", "")
    if report.calibration["calibrated"] and split in (None, "val") and fit_on.startswith("val"):
        report.calibration["note"] = "the temperature was fit on val: 'after' on these rows is optimistic"
    return report


def _evaluate_store_multilabel(store: Any, fitted: Any, meta: dict[str, Any], head: str | os.PathLike,
                               split: str | None, bootstrap: int, seed: int,
                               reliability_png: str | os.PathLike | None = None,
                               ap_png: str | os.PathLike | None = None) -> MultiLabelReport:
    """``evaluate_store`` for a multi-label head on a multi-label store: every row of ``split`` (an image without
    labels is a negative for every class), store columns matched to the head's classes by name."""
    if not getattr(store, "multilabel", False):
        raise ProbeError(f"head {head} is multi-label but store {store.path} has one label per image: evaluate it on "
                         "a multi-label store (a CSV manifest with a labels column)")
    if not getattr(fitted, "multilabel_", False):
        raise ProbeError(f"store {store.path} is multi-label but head {head} ({meta['head']}) takes one class per "
                         "row: fit a head on this store (probe fit-head STORE --head linear)")
    names = meta["class_names"]
    col = {c: i for i, c in enumerate(store.classes)}
    missing = [n for n in names if n not in col]
    if missing:
        raise ProbeError(f"store {store.path} has no label column for the head's classes {missing[:10]} (it has "
                         f"{', '.join(store.classes)})")
    Y_store = store.label_matrix(split)
    extra = [c for c in store.classes if c not in set(names) and Y_store[:, col[c]].any()]
    if extra:
        raise ProbeError(f"split {split or 'all'!r} of {store.path} has classes the head was not trained on: "
                         f"{', '.join(map(repr, extra[:10]))} (the head knows {', '.join(names)})")
    Y = Y_store[:, [col[n] for n in names]]
    if not len(Y):
        raise ProbeError(f"no images in split {split or 'all'!r} of {store.path}")
    report = evaluate_multilabel(
        fitted, store.features(split), Y, class_names=names, bootstrap=bootstrap, seed=seed,
        context={"store": str(store.path), "head": str(head), "head_type": meta["head"], "split": split or "all"},
        reliability_png=reliability_png, ap_png=ap_png, title=f"{Path(head).name} on {store.path.name} "
                                                              f"[{split or 'all'}]")
    fit_on = ((meta.get("fit") or {}).get("calibration") or {}).get("fit_on") or ""
    if report.calibration["calibrated"] and split in (None, "val") and fit_on.startswith("val"):
        report.calibration["note"] += " ('after' on val rows is optimistic)"
    return report
