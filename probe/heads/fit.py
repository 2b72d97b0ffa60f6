"""Fit a head on a feature store and save it: what `probe fit-head` runs.

Rows: the store's ``train`` split fits the head, ``val`` selects (the linear head's L2 strength, the MLP's early
stop), ``test`` is reported. A store without splits gets a seeded stratified 20% holdout as ``val`` (and no
test). ``shots`` keeps that many training images per class, drawn with ``seed`` (more than the smallest class
has is refused: a K-shot head sees K images of every class). The MLP also trains on the store's augmented views
(``probe extract --views K``) when it has them, unless ``views=False``.

A multi-label store (several labels per image: ``store.label_matrix()``) fits the linear or MLP head one-vs-rest
on the (N, C) label matrix; every row of a split is a row (an image without labels is a negative for every
class); C / the early stop are chosen by mAP (linear default) or val loss (MLP default); each class's sigmoid is
then Platt-scaled on val (``calibration.fit_platt``), and each class's threshold set on the calibrated val
probabilities (F1-optimal); there is no unknown rejection.

Example:
    >>> fit = fit_head("cache/demo.h5", LinearHead(), out="heads/demo-linear.safetensors")
    >>> fit.test or fit.val_accuracy
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
from sklearn.base import clone

from ..errors import ProbeError
from ..identity import FeatureIdentity
from ..store import FeatureStore
from . import calibration as cal
from . import multilabel as ml
from .base import Head
from .evaluate import metrics
from .features import k_per_class, stratified_holdout
from .io import make_head, save_head
from .scoring import refuse_map

NOT_CALIBRATED = cal.MULTILABEL_NOT_CALIBRATED
HOLDOUT = 0.2  # share of the rows (of each class, single-label) held out as val where the data has no split for it
BLOCK = 16_384  # train rows per prediction of the train accuracy

log = logging.getLogger(__name__)


def labelled_splits(store: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices {"train", "val", "test"} of a store's labelled rows (empty arrays where absent).

    Raises ValueError for a store without labels or with fewer than two classes in train."""
    if getattr(store, "multilabel", False):
        return multilabel_splits(store, seed)
    y = store.labels()
    sp = store.splits()
    lab = y >= 0
    if not lab.any():
        raise ProbeError(f"store {store.path} has no labelled images (all {len(y)} rows have no class): a head "
                         "needs a labelled store (class folders, a split root or a CSV with labels)")
    rows = {s: np.flatnonzero(lab & (sp == s)) for s in ("train", "val", "test")}
    if len(rows["train"]) == 0:
        rows = _without_train(rows, np.flatnonzero(lab), sp, y, seed)
    present = np.unique(y[rows["train"]])
    if len(present) < 2:
        where = "the train split" if (sp == "train").any() else "its labelled rows"
        name = store.classes[present[0]] if len(present) else "none"
        raise ProbeError(f"store {store.path} has {len(present)} class ({name!r}) in {where}: a classifier needs "
                         "at least 2 classes")
    return rows


def multilabel_splits(store: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """``labelled_splits`` of a multi-label store: every row counts (no label = negative for every class); a store
    without a train split gets a seeded 20% of its rows, stratified by label (``multilabel_holdout``), as val.
    Refuses a train split without any label."""
    Y, sp = store.label_matrix(), store.splits()
    rows = {s: np.flatnonzero(sp == s) for s in ("train", "val", "test")}
    if len(rows["train"]) == 0:
        rows = _without_train(rows, np.arange(len(Y)), sp, Y, seed)
    if not Y[rows["train"]].any():
        raise ProbeError(f"store {store.path} is multi-label but its {len(rows['train'])} training rows have no "
                         "label: a head needs labelled images")
    return rows


def _without_train(rows: dict[str, np.ndarray], labelled: np.ndarray, sp: np.ndarray, labels: np.ndarray,
                   seed: int) -> dict[str, np.ndarray]:
    """The rows of data without a train split: the ``labelled`` rows outside its val and test splits train, val
    is its val split or else a seeded 20% of them stratified by ``labels`` (N,), or by the (N, C) label matrix of a
    multi-label store, test stays. Data of only val and test
    splits: every labelled row is train or held-out val, and none is left to test (logged)."""
    pool = labelled[~np.isin(sp[labelled], ["val", "test"])]
    if not len(pool):
        pool, rows = labelled, {"val": rows["val"][:0], "test": rows["test"][:0]}
        log.warning("the data has only val/test splits: its %d labelled rows are split into train and a held-out val "
                    "(seed %d); nothing is left to test", len(pool), seed)
    if len(rows["val"]):
        return {"train": pool, "val": rows["val"], "test": rows["test"]}
    if labels.ndim == 1:
        tr, ho = stratified_holdout(labels[pool], HOLDOUT, seed)
    elif len(pool) > 1:
        tr, ho = ml.multilabel_holdout(labels[pool], HOLDOUT, seed)
    else:  # one row: nothing to hold out
        tr, ho = np.arange(len(pool)), np.zeros(0, np.int64)
    log.info("the data has no train split: holding out %d of %d labelled rows (seed %d) for validation", len(ho),
             len(pool), seed)
    return {"train": pool[tr], "val": pool[ho], "test": rows["test"]}


@dataclass
class HeadFit:
    """What ``fit_head`` returns: the fitted head, what it was fit on, and its scores. ``to_dict()`` (and
    ``fit["key"]``) give the summary the CLI prints and ``--json`` writes."""

    head: Head
    class_names: list[str]  # the head's columns
    identity: FeatureIdentity  # of the features it was fit on (``features_only``)
    store: str
    n_train: int
    n_val: int
    n_test: int
    val_accuracy: float | None  # linear: at the chosen C, before the refit on train + val; None for multi-label
    val: dict[str, Any] | None  # metrics (evaluate.metrics; multilabel.multilabel_metrics for a multi-label head);
    # single-label linear heads report val_accuracy only
    test: dict[str, Any] | None
    fit_seconds: float
    out: str | None = None  # the head file, when one was written
    details: dict[str, Any] = field(default_factory=dict)  # per head: the sweep and C, MLP epochs, views …

    def to_dict(self) -> dict[str, Any]:
        h = self.head
        return {"store": self.store, "head": h.kind, "out": self.out, "backbone": self.identity.backbone,
                "dim": int(h.n_features_in_), "classes": self.class_names, "norm": h.norm, "n_train": self.n_train,
                "n_val": self.n_val, "n_test": self.n_test, **self.details, "val": self.val, "test": self.test,
                "val_accuracy": self.val_accuracy, "fit_seconds": self.fit_seconds}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def _training_rows(store: FeatureStore, y: np.ndarray, shots: int | None, seed: int, hold_out_val: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(train, val, test, test rows dropped) indices: the store's splits, ``shots`` per class kept in train, and
    val/test limited to the classes train has (a row of a class the head never saw cannot be scored).

    ``hold_out_val``: a store with a train split but no val split also gets a seeded stratified 20% of train as val
    (probe sweep: every row of its table has a val accuracy). Without it (fit-head) val stays empty there: the
    linear head chooses C by k-fold cross-validation of train, and the head is not calibrated."""
    rows = labelled_splits(store, seed)
    train, val, test = rows["train"], rows["val"], rows["test"]
    if hold_out_val and not len(val):
        tr, ho = stratified_holdout(y[train], HOLDOUT, seed)
        train, val = train[tr], train[ho]
    if shots:
        _check_shots(store, y[train], shots)
        train = train[k_per_class(y[train], shots, seed)]
    known = np.unique(y[train])
    val = val[np.isin(y[val], known)]
    dropped = int((~np.isin(y[test], known)).sum())
    return train, val, test[np.isin(y[test], known)], dropped


def _check_shots(store: FeatureStore, y_train: np.ndarray, shots: int) -> None:
    """Refuse ``shots`` above what the smallest class has in train: a K-shot head sees K images of every class,
    so a class with fewer would make the reported K untrue (and the classes unbalanced)."""
    classes, counts = np.unique(y_train, return_counts=True)
    c = int(np.argmin(counts))
    if shots > counts[c]:
        where = "the train split" if (store.splits() == "train").any() else "the training rows (after the val holdout)"
        raise ProbeError(f"shots={shots} is more than class {store.classes[classes[c]]!r} has in {where}: "
                         f"{counts[c]} images, the fewest of its {len(classes)} classes; pass shots <= {counts[c]}, "
                         "or leave shots out to train on every image")


def _head_details(head: Head, cfg: dict[str, Any], n_val: int) -> dict[str, Any]:
    """The summary fields that belong to one kind of head."""
    d: dict[str, Any] = {"shots": cfg["shots"], "seed": cfg["seed"],
                         "views": int(getattr(head, "n_views_", 0))}  # augmented views per image it trained on
    if head.kind == "linear":
        d.update(C=head.C_, sweep=head.sweep_, grid=head.grid, select=head.select_, val_score=head.val_score_,
                 refit_on="train+val" if head.sweep_ and head.refit and n_val else "train",
                 sweep_rows=head.sweep_rows_)  # training rows C was chosen on (None: fixed C)
    if head.kind == "mlp":  # select: what early stopping watched; val_score: its value at the best epoch
        d.update(best_epoch=head.best_epoch_, epochs_run=head.epochs_run_, select=head.select,
                 val_score=head.val_score_)
    return d


def _views_kw(store: FeatureStore, head: Head, train: np.ndarray, views: bool | None) -> dict[str, Any]:
    """``{"views": (n_train, K, D)}`` for an MLP on a store with augmented views (unless ``views`` is False), else
    {}; ``views=True`` on a store without them is an error."""
    if views and not store.n_views:
        raise ProbeError(f"views: store {store.path} has no augmented views (make a store with them: "
                         "probe extract DATA --views K)")
    if not store.n_views or views is False:
        return {}
    if head.kind != "mlp":
        log.info("the %s head ignores the store's %d augmented views per image (the mlp head trains on them)",
                 head.kind, store.n_views)
        return {}
    return {"views": store.views(rows=train)}


def _packed(store: FeatureStore, rows: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, dict[str, np.ndarray], Callable[[], np.ndarray]]:
    """(X (n, D) for the features of the train, val and test rows, one split after the other, {split: its rows of
    X}, ``read_test()``): every split is a contiguous run of X, so ``_take`` gives it as a view. The train and val
    rows are read now; the test rows by ``read_test()``, after the fit -- until then their part of X is allocated
    but never written, so it holds no memory."""
    order = np.concatenate([rows["train"], rows["val"], rows["test"]])
    ends = np.cumsum([0, len(rows["train"]), len(rows["val"]), len(rows["test"])])
    X = np.empty((len(order), store.dim), np.float32)
    store.features_at(order[: ends[2]], X[: ends[2]])
    return X, {s: np.arange(ends[i], ends[i + 1]) for i, s in enumerate(("train", "val", "test"))}, \
        lambda: store.features_at(order[ends[2]:], X[ends[2]:])


def _take(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """X[idx] -- as a view, no copy, when idx is a run of consecutive rows (``_packed``'s splits)."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (np.diff(idx) == 1).all():
        return X[idx[0]: idx[-1] + 1]
    return X[idx]


def _fit_rows(head: Head, X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, progress: bool = False,
              **kw: Any) -> Head:
    """``head.fit`` on the train rows of X (N, D), y (N,) -- or the (N, C) label matrix --, with the val rows (when
    there are any) as the linear head's ``eval_set`` (it chooses C on them) or the MLP's (its early stop); the other
    heads do not look at val. ``progress``: the linear head's bars (sweep, final fit) on stderr."""
    if head.kind in ("linear", "mlp") and len(val):
        kw["eval_set"] = (_take(X, val), y[val])
    if head.kind == "linear" and progress:
        kw["progress"] = True
    return head.fit(_take(X, train), y[train], **kw)


def _held_out_scorer(head: Head, X: np.ndarray, y: np.ndarray, train: np.ndarray, progress: bool = False
                     ) -> tuple[Head, str]:
    """(a head that never saw val, what it is) to score val with when calibrating: ``head`` itself, or -- for a
    linear head refit on train + val -- a copy fit on train alone at the chosen C (its fit is carried over to the
    refit head: more data at the same C changes its scale a little), its solve started at the refit head's weights
    (same classes, same normalisation: both fit on train) rather than at zeros -- the same optimum, to the solver's
    tolerance, with fewer passes over the training rows. ``y``: labels or the multi-label matrix."""
    if head.kind == "linear" and head.sweep_ and head.refit:
        params = {"C": head.C_, **({"grid": "default"} if "grid" in head.get_params() else {})}
        log.info("fitting the linear head on train alone at C=%.3g to calibrate on val", head.C_)
        return (clone(head).set_params(**params).fit(_take(X, train), y[train], init=(head.coef_, head.intercept_),
                                                     progress=progress),
                f"val, scored by the head fit on train alone at C={head.C_:.3g}")
    return head, "val"


def _calibrate(head: Head, X: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray], target: float,
               progress: bool = False) -> dict[str, Any]:
    """Fit the head's temperature and rejection threshold on val; the summary's "calibration" and "rejection".

    Both need scores of images the head did not train on. A linear head refit on train + val has seen val, so
    the temperature is fit on a copy fit on train alone at the chosen C and carried over to the refit head
    (more data at the same C changes its scale a little). The rejection threshold needs no copy: its distance is
    to the class means of the train rows, whatever the head."""
    train, val, test = rows["train"], rows["val"], rows["test"]
    if not len(val):
        log.warning("no validation rows: the %s head is not calibrated and has no rejection threshold", head.kind)
        return {"calibration": None, "rejection": None}
    held, fit_on = _held_out_scorer(head, X, y, train, progress)
    Xtr, Xv, Xte = _take(X, train), _take(X, val), _take(X, test)  # views of a packed X (fit_head)
    before = held.predict_proba(Xv)
    test_before = head.predict_proba(Xte) if len(test) else None  # (N_test, C) uncalibrated
    head.temperature_ = held.calibrate(Xv, y[val]).temperature_
    cols = np.searchsorted(head.classes_, y[val])
    calib: dict[str, Any] = {"temperature": round(head.temperature_, 6), "fit_on": fit_on, "n": int(len(val)),
                             "ece_bins": cal.ECE_BINS,
                             "val_before": cal.calibration_metrics(before, cols),
                             "val_after": cal.calibration_metrics(held.predict_proba(Xv), cols)}
    head.fit_rejection(Xtr, y[train], Xv, y[val], target)
    rejection: dict[str, Any] = {"score": "prototype_distance", "threshold": round(head.reject_threshold_, 6),
                                 "target_known_rejected": target,
                                 "val_known_rejected": float((head.rejection_distance(Xv)
                                                              > head.reject_threshold_).mean())}
    if len(test):
        tcols = np.searchsorted(head.classes_, y[test])
        calib["test_before"] = cal.calibration_metrics(test_before, tcols)
        calib["test_after"] = cal.calibration_metrics(head.predict_proba(Xte), tcols)
        rejection["test_known_rejected"] = float((head.rejection_distance(Xte) > head.reject_threshold_).mean())
    return {"calibration": calib, "rejection": rejection}


def fit_head(store: FeatureStore | str | os.PathLike, head: Head | str = "linear",
             out: str | os.PathLike | None = None, *, shots: int | None = None, seed: int = 0,
             views: bool | None = None, reject_target: float = cal.REJECT_TARGET, progress: bool = False) -> HeadFit:
    """Fit ``head`` (an unfitted head object, or a kind: "linear", "mlp", "prototype", "knn") on a store's
    train split, choosing on val (the linear head's L2 strength, the MLP's early stop, by the head's ``select``
    metric: ``scoring.py``) and scoring val and test.

    ``shots`` keeps that many training images per class (drawn with ``seed``); ``views``: the MLP trains on the
    store's augmented views (None: when the store has them). The head file is written only when ``out`` is given.
    After the fit, val also sets the temperature of ``predict_proba`` and the distance threshold that rejects
    ``reject_target`` of the known val images as unknown (``_calibrate``). ``progress``: bars on stderr over the
    linear head's sweep and fits (minutes on a million rows).

    Memory: the store's train, val and test rows are read into one array, a split after the other (``_packed``),
    and the heads get views of it: one copy of the features the fit uses, plus the head's normalised copy.

    Example:
        >>> fit = fit_head("cache/demo.h5", LinearHead(n_Cs=25), out="heads/demo.safetensors")
        >>> fit.val_accuracy, fit.head.predict(X)
    """
    if shots is not None and shots < 1:
        raise ProbeError(f"shots must be >= 1 images per class, got {shots}")
    cal.check_target(reject_target)
    head = make_head(head) if isinstance(head, str) else clone(head)
    t0 = time.perf_counter()
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if getattr(store, "multilabel", False):
        return _fit_multilabel(store, head, out, shots=shots, seed=seed, views=views, t0=t0)
    refuse_map(getattr(head, "select", ""), f"store {store.path} has one label per image")
    y = store.labels()  # (N,)
    train, val, test, test_dropped = _training_rows(store, y, shots, seed)
    kw = _views_kw(store, head, train, views)
    y = y[np.concatenate([train, val, test])]
    X, rows, read_test = _packed(store, {"train": train, "val": val, "test": test})  # (n, D): train, val, test rows
    train, val, test = rows["train"], rows["val"], rows["test"]
    _fit_rows(head, X, y, train, val, progress, **kw)
    fit_s = time.perf_counter() - t0
    read_test()
    class_names = [store.classes[i] for i in head.classes_]
    calibrated = _calibrate(head, X, y, rows, reject_target, progress)

    def report(idx: np.ndarray) -> dict[str, Any] | None:
        return metrics(np.searchsorted(head.classes_, y[idx]), head.predict_proba(_take(X, idx)), class_names) \
            if len(idx) else None

    val_report = None if head.kind == "linear" else report(val)
    details = _head_details(head, {"shots": shots, "seed": seed}, len(val))
    Xtr = _take(X, train)  # predicted a block at a time: a head's normalised copy of every train row would be GBs
    right = sum(int((head.predict(Xtr[s: s + BLOCK]) == y[train[s: s + BLOCK]]).sum())
                for s in range(0, len(Xtr), BLOCK))
    details["train_accuracy"] = right / len(Xtr)
    if test_dropped:
        details["test_dropped_unknown_class"] = test_dropped
    details.update(calibrated)
    fit = HeadFit(head, class_names, store.identity.features_only(), str(store.path), int(len(train)),
                  int(len(val)), int(len(test)),
                  head.val_accuracy_ if head.kind == "linear" else (val_report or {}).get("accuracy"),
                  val_report, report(test), round(fit_s, 3), details=details)
    return _save(fit, store, out, {"shots": shots, "seed": seed, "views": views})


def _save(fit: HeadFit, store: FeatureStore, out: str | os.PathLike | None, config: dict[str, Any]) -> HeadFit:
    """Write the head file (when ``out`` is given) with the fit summary in its metadata."""
    if out is not None:
        head = fit.head
        summary = fit.to_dict()
        save_head(head, out, {"store": str(store.path),
                              "fit": {k: v for k, v in summary.items() if k not in ("sweep",)}
                              | {"config": {"head": head.kind, **config}}},
                  identity=fit.identity, class_names=fit.class_names)
        log.info("saved %s head to %s", head.kind, out)
        fit.out = str(Path(out))
    return fit


def _fit_multilabel(store: FeatureStore, head: Head, out: str | os.PathLike | None, *, shots: int | None, seed: int,
                    views: bool | None, t0: float) -> HeadFit:
    """``fit_head`` on a multi-label store: one-vs-rest on ``store.label_matrix()``, then per-class Platt scaling
    and the thresholds fit on val (thresholds after Platt: they are calibrated probabilities)."""
    if not head.multilabel_ok:
        raise ProbeError(f"store {store.path} is multi-label ({len(store.classes)} classes, several per image): the "
                         f"{head.kind} head takes one class per row; use --head linear or --head mlp (one-vs-rest)")
    if len(store.classes) < 2:
        raise ProbeError(f"store {store.path} is multi-label with {len(store.classes)} class: a one-vs-rest head needs "
                         "at least 2 label columns (for one class, give each image a `label` of yes/no instead)")
    if shots:
        raise ProbeError(f"shots={shots} draws K images per class, which a multi-label store (several labels per "
                         f"image) cannot do: leave shots out for {store.path}")
    rows = labelled_splits(store, seed)
    kw = _views_kw(store, head, rows["train"], views)
    Y = store.label_matrix()[np.concatenate([rows["train"], rows["val"], rows["test"]])]  # (n, C)
    X, rows, read_test = _packed(store, rows)  # (n, D): train, val, test rows
    train, val, test = rows["train"], rows["val"], rows["test"]
    _fit_rows(head, X, Y, train, val, **kw)
    read_test()
    fit_s = time.perf_counter() - t0
    class_names = list(store.classes)
    thresholds: dict[str, Any] = {"fit_on": None, "rule": "F1-optimal per class on val, on the Platt-scaled "
                                  "probabilities (0.5 for a class without val positives)"}
    calib: dict[str, Any] | None = None
    if len(val):  # Platt and thresholds from scores of rows the head did not train on
        held, thresholds["fit_on"] = _held_out_scorer(head, X, Y, train)
        before = held.uncalibrated_proba(_take(X, val))
        head.platt_ = held.calibrate(_take(X, val), Y[val]).platt_  # first: thresholds are calibrated probabilities
        head.thresholds_ = held.fit_thresholds(_take(X, val), Y[val]).thresholds_
        calib = {"method": "platt", "fit_on": thresholds["fit_on"], "n": int(len(val)), "ece_bins": cal.ECE_BINS,
                 "platt": {n: [round(float(a), 6), round(float(b), 6)] for n, (a, b) in zip(class_names, head.platt_)},
                 "val_before": cal.multilabel_calibration_metrics(before, Y[val]),
                 "val_after": cal.multilabel_calibration_metrics(held.predict_proba(_take(X, val)), Y[val])}
        if len(test):
            calib["test_before"] = cal.multilabel_calibration_metrics(head.uncalibrated_proba(_take(X, test)), Y[test])
            calib["test_after"] = cal.multilabel_calibration_metrics(head.predict_proba(_take(X, test)), Y[test])
    else:
        log.warning("no validation rows: the multi-label %s head is not calibrated and keeps threshold 0.5 for every "
                    "class", head.kind)
    thresholds["values"] = {n: round(float(t), 6) for n, t in zip(class_names, head.thresholds_)}

    def report(idx: np.ndarray) -> dict[str, Any] | None:
        return ml.multilabel_metrics(Y[idx], head.predict_proba(_take(X, idx)), head.thresholds_, class_names) \
            if len(idx) else None

    details = _head_details(head, {"shots": None, "seed": seed}, len(val))
    train_map = ml.mean_ap(Y[train], head.predict_proba(_take(X, train)))
    details.update(multilabel=True, train_map=None if np.isnan(train_map) else train_map, thresholds=thresholds,
                   calibration=calib, calibration_note=cal.MULTILABEL_CALIBRATED if calib else NOT_CALIBRATED,
                   rejection=None)
    fit = HeadFit(head, class_names, store.identity.features_only(), str(store.path), int(len(train)),
                  int(len(val)), int(len(test)), None, None if head.kind == "linear" else report(val), report(test),
                  round(fit_s, 3), details=details)
    return _save(fit, store, out, {"shots": None, "seed": seed, "views": views})
