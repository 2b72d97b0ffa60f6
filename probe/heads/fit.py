"""Fit a head on a feature store and save it: what `probe fit-head` runs.

Rows: the store's ``train`` split fits the head, ``val`` selects (the linear head's L2 strength, the MLP's early
stop), ``test`` is reported. A store without splits gets a seeded stratified 20% holdout as ``val`` (and no
test). ``shots`` keeps that many training images per class, drawn with ``seed``. The MLP also trains on the
store's augmented views (``probe extract --views K``) when it has them, unless ``views=False``.

Example:
    >>> summary = fit_head("cache/demo.h5", "heads/demo-linear.safetensors", HeadConfig(head="linear"))
    >>> summary["test"] or summary["val"]
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProbeError
from .evaluate import metrics
from .features import k_per_class, stratified_holdout
from .io import HEADS, make_head, save_head

log = logging.getLogger(__name__)


@dataclass
class HeadConfig:
    head: str = "linear"  # linear | mlp | prototype | knn
    norm: str | None = None  # None: the head's default (standardize: linear, mlp; cl2n: prototype; l2: knn)
    shots: int | None = None  # keep K training images per class (few-shot linear probes)
    balanced: bool = False  # class weights n / (k * n_c) in the loss (linear, mlp)
    seed: int = 0  # k-shot draw, holdout, MLP init
    C: float | None = None  # linear: a fixed inverse L2 strength; None sweeps n_Cs values
    n_Cs: int = 25  # linear: sweep size on the log grid 1e-6..1e6 (Kornblith et al. use a similar range)
    hidden: tuple[int, ...] = (512,)  # mlp: hidden widths
    dropout: float = 0.5  # mlp
    epochs: int = 200  # mlp: at most; early stopping usually ends far sooner
    k: int = 20  # knn: neighbours (DINO's default)
    metric: str = "cosine"  # prototype: cosine | euclidean
    device: str = "auto"  # linear, mlp: cuda when present
    views: bool | None = None  # mlp: train on the store's augmented views; None: when it has them; other heads ignore

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ProbeError(f"unknown head {self.head!r}: expected one of {', '.join(HEADS)}")
        if self.shots is not None and self.shots < 1:
            raise ProbeError(f"--shots must be >= 1 images per class, got {self.shots}")

    def head_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"norm": self.norm} if self.norm else {}
        if self.head == "linear":
            p.update(C=self.C, n_Cs=self.n_Cs, balanced=self.balanced, seed=self.seed, device=self.device)
        elif self.head == "mlp":
            p.update(hidden=tuple(self.hidden), dropout=self.dropout, epochs=self.epochs, balanced=self.balanced,
                     seed=self.seed, device=self.device)
        elif self.head == "knn":
            p.update(k=self.k)
        else:
            p.update(metric=self.metric)
        return p


def labelled_splits(store: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices {"train", "val", "test"} of a store's labelled rows (empty arrays where absent).

    Raises ValueError for a store without labels or with fewer than two classes in train."""
    y = store.labels()
    sp = store.splits()
    lab = y >= 0
    if not lab.any():
        raise ProbeError(f"store {store.path} has no labelled images (all {len(y)} rows have no class): a head "
                         "needs a labelled store (class folders, a split root or a CSV with labels)")
    rows = {s: np.flatnonzero(lab & (sp == s)) for s in ("train", "val", "test")}
    if len(rows["train"]) == 0:  # no splits: seeded stratified holdout of every labelled row
        idx = np.flatnonzero(lab)
        tr, ho = stratified_holdout(y[idx], 0.2, seed)
        rows = {"train": idx[tr], "val": idx[ho], "test": np.zeros(0, np.int64)}
        log.info("store has no train split: holding out %d of %d labelled rows (seed %d) for validation",
                 len(ho), len(idx), seed)
    present = np.unique(y[rows["train"]])
    if len(present) < 2:
        where = "the train split" if (sp == "train").any() else "its labelled rows"
        name = store.classes[present[0]] if len(present) else "none"
        raise ProbeError(f"store {store.path} has {len(present)} class ({name!r}) in {where}: a classifier needs "
                         "at least 2 classes")
    return rows


def fit_head(store_path: str | os.PathLike, out: str | os.PathLike, config: HeadConfig | None = None
             ) -> dict[str, Any]:
    """Fit the head of ``config`` on a store, report validation/test metrics, save it to ``out``; returns a summary."""
    from probe.store import FeatureStore

    cfg = config or HeadConfig()
    head = make_head(cfg.head, **cfg.head_params())  # bad hyperparameters fail before any data is read
    t0 = time.perf_counter()
    store = FeatureStore(store_path)
    rows = labelled_splits(store, cfg.seed)
    X, y = store.features(), store.labels()  # (N, D), (N,)
    train = rows["train"]
    if cfg.shots:
        train = train[k_per_class(y[train], cfg.shots, cfg.seed)]
    val, test = rows["val"], rows["test"]
    # a validation row whose class is missing from train cannot be scored: keep only the classes the head knows
    known = np.unique(y[train])
    val = val[np.isin(y[val], known)]
    test_dropped = int((~np.isin(y[test], known)).sum())
    test = test[np.isin(y[test], known)]
    fit_kw: dict[str, Any] = {}
    if cfg.head in ("linear", "mlp") and len(val):
        fit_kw["eval_set"] = (X[val], y[val])
    if cfg.views and not store.n_views:
        raise ProbeError(f"--views: store {store.path} has no augmented views (make a store with them: "
                         "probe extract DATA --views K)")
    if store.n_views and cfg.views is not False:
        if cfg.head == "mlp":
            fit_kw["views"] = store.views(rows=train)  # (n_train, K, D)
        else:
            log.info("the %s head ignores the store's %d augmented views per image (the mlp head trains on them)",
                     cfg.head, store.n_views)
    head.fit(X[train], y[train], **fit_kw)
    fit_s = time.perf_counter() - t0
    class_names = [store.classes[i] for i in head.classes_]

    def report(idx: np.ndarray) -> dict[str, Any] | None:
        if not len(idx):
            return None
        cols = np.searchsorted(head.classes_, y[idx])
        return metrics(cols, head.predict_proba(X[idx]), class_names)

    summary: dict[str, Any] = {
        "store": str(store.path),
        "head": cfg.head,
        "out": str(out),
        "backbone": store.backbone,
        "dim": int(store.dim),
        "classes": class_names,
        "norm": head.norm,
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "n_test": int(len(test)),
        "shots": cfg.shots,
        "views": int(getattr(head, "n_views_", 0)),  # augmented views per training image the head trained on
        "seed": cfg.seed,
        "train_accuracy": float((head.predict(X[train]) == y[train]).mean()),
        "val": None,
        "test": report(test),
        "fit_seconds": round(fit_s, 3),
    }
    if test_dropped:
        summary["test_dropped_unknown_class"] = test_dropped
    if cfg.head == "linear":
        summary["C"] = head.C_
        summary["sweep"] = head.sweep_
        summary["val_accuracy"] = head.val_accuracy_  # before the refit on train + val
        summary["refit_on"] = "train+val" if head.sweep_ and head.refit and len(val) else "train"
    else:
        summary["val"] = report(val)
        summary["val_accuracy"] = summary["val"]["accuracy"] if summary["val"] else None
    if cfg.head == "mlp":
        summary["best_epoch"] = head.best_epoch_
        summary["epochs_run"] = head.epochs_run_
    meta = {
        "class_names": class_names,
        "config": store.identity.features_only().to_dict(),
        "config_key": store.feature_key,
        "store": str(store.path),
        "fit": {k: v for k, v in summary.items() if k not in ("sweep",)} | {"config": asdict(cfg)},
    }
    save_head(head, out, meta)
    log.info("saved %s head to %s", cfg.head, out)
    summary["out"] = str(Path(out))
    return summary
