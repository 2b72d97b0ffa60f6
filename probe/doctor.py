"""`probe doctor`: what is wrong with a labelled store -- likely label errors, cross-split leakage, outliers, balance.

Label errors: out-of-fold probabilities of the linear head (seeded stratified K-fold; C chosen once by the head's
batched sweep on all labelled rows, then every fold refits at that fixed C -- one sweep instead of K; or, with
``sweep="per-fold"``, nested cross-validation: a full sweep inside each fold, its inner folds the other outer folds)
passed to cleanlab: every row ranked by
``cleanlab.rank.get_label_quality_scores`` (self-confidence), the list cut at ``cleanlab.count.num_label_issues``
(the calibrated confident-joint estimate of how many labels are wrong). Duplicates: cosine similarity of
L2-normalised features, exact range search up to the search index's flat size (``IndexConfig.exact_below``), above
it the k nearest neighbours from an IVF index probing enough lists for recall@10 >= 0.95 and for the pairs at the
threshold (``probe.search.dedup.near_pairs``, plus a range search for rows whose k are all duplicates). Outliers:
CL2N cosine distance to the row's own class mean, and the mean distance to its k nearest neighbours.

Example:
    >>> report = probe.doctor("cache/photos.h5")
    >>> report.label_issues[0]        # {"row": 17, "path": ..., "given": "cat", "suggested": "dog", ...}
    >>> report.leakage["val"]         # share of val rows with a near-duplicate in train
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._callable import make_module_callable
from .errors import ProbeError
from .store import FeatureStore

log = logging.getLogger(__name__)

DUP_THRESHOLD = 0.94  # cosine (lite0): JPEG q70 / 0.8x / flipped copies of a 112 px demo image score >= 0.949;
# distinct demo images of one class reach 0.95 (2 pairs of 400 images at >= 0.95, 20 at >= 0.9)
EXACT = 0.9999  # cosine at or above which two rows are the same image (or identical file fingerprints)
SWEEPS = ("once", "per-fold")  # how out-of-fold probabilities choose C
MIN_ROWS = 20  # fewer labelled rows give fold probabilities too noisy to rank


@dataclass
class DoctorReport:
    """What `probe doctor` found; ``to_dict()`` is the --json output."""
    store: str
    n: int  # labelled rows examined
    classes: list[str]
    folds: int
    seed: int
    C: float | None  # the linear head's strength, chosen once by its sweep on all labelled rows (None: per fold)
    oof_accuracy: float  # accuracy of the out-of-fold predictions
    label_issues: list[dict[str, Any]]  # most likely error first
    duplicates: dict[str, Any]  # threshold, pairs (cross-split first), exact count, index
    leakage: dict[str, float]  # split -> share of its rows with a train near-duplicate
    outliers: list[dict[str, Any]]  # farthest from its class mean first
    balance: dict[str, Any]  # counts per class per split, imbalance ratio
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    sweep: str = "once"  # "once": C chosen on all rows, each fold refit at it; "per-fold": nested
    html: str | None = None  # the report page, when asked for

    def write_html(self, out: str | os.PathLike, top: int = 50) -> str:
        """Write the report as a self-contained HTML page with thumbnails; returns its path."""
        from .report import doctor_page

        self.html = str(doctor_page(self, out, top=top))
        return self.html

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _cleanlab():
    try:
        from cleanlab.count import num_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ProbeError("probe doctor needs cleanlab: pip install 'probe[doctor]'") from None
    return num_label_issues, get_label_quality_scores


def _check(store: FeatureStore, y: np.ndarray, folds: int) -> None:
    where = f"store {str(store.path)!r}"
    if store.multilabel:
        raise ProbeError(f"{where} is multi-label; probe doctor checks single-label stores")
    if not (y >= 0).any():
        raise ProbeError(f"{where} has no labelled rows: probe doctor needs labels (extract from class folders)")
    if folds < 2:
        raise ProbeError(f"folds must be >= 2 for out-of-fold probabilities, got {folds}")
    present = np.unique(y[y >= 0])
    if len(present) < 2:
        raise ProbeError(f"{where} has one class ({store.classes[present[0]]!r}): label errors need at least 2")
    n = int((y >= 0).sum())
    if n < MIN_ROWS:
        raise ProbeError(f"{where} has {n} labelled rows: probe doctor needs at least {MIN_ROWS}")
    counts = np.bincount(y[y >= 0], minlength=len(store.classes))
    small = [c for c in present if counts[c] < folds]
    if small:
        c = small[0]
        raise ProbeError(f"class {store.classes[c]!r} has {counts[c]} rows, fewer than folds={folds}: add images "
                         f"of it, lower folds, or drop the class")


def labelled_classes(y_all: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n,) indices of the labelled rows of y_all (N,) (-1: no label), (C',) the classes present among them, and
    (n,) each labelled row's class as an index 0..C'-1 into those: the y ``out_of_fold_proba`` takes.

    Example:
        >>> labelled_classes(np.array([3, -1, 5, 3]))      # (array([0, 2, 3]), array([3, 5]), array([0, 1, 0]))
    """
    lab = np.flatnonzero(y_all >= 0)
    present, y = np.unique(y_all[lab], return_inverse=True)
    return lab, present, y


def _fits_bar(fits: int, folds: int, progress: bool) -> tqdm:
    """A bar on stderr over the ``fits`` of a ``folds``-fold cross-validation: its sweeps, then a refit per fold."""
    return tqdm(total=fits, unit="fit", disable=not progress, desc=f"doctor {folds}-fold fits", mininterval=0.5,
                dynamic_ncols=True)


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, folds: int, seed: int, sweep: str = "once",
                      progress: bool = False) -> tuple[np.ndarray, float | None]:
    """(N, C) out-of-fold class probabilities of the linear head, and the C they used. y holds class indices
    0..C-1, every class present.

    ``sweep="once"`` (default): one batched sweep (the head's own k-fold CV on all rows) picks C, then each fold
    refits at that C -- one sweep instead of ``folds``. ``sweep="per-fold"``: nested cross-validation, each fold
    choosing its own C by a full sweep on its own training rows (``_nested``); the C returned is then None.
    ``progress``: a bar on stderr over the fits (``_fits_bar``)."""
    from sklearn.model_selection import StratifiedKFold

    from .heads import LinearHead

    if sweep not in SWEEPS:
        raise ProbeError(f"sweep must be one of {', '.join(SWEEPS)}, got {sweep!r}")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y))
    if sweep == "per-fold":
        return _nested(X, y, splits, seed, progress), None
    with _fits_bar(1 + folds, folds, progress) as bar:
        C = LinearHead(seed=seed).choose_C(X, y).C_  # the sweep alone: no all-rows fit, no normalised copy
        bar.update()
        K = int(y.max()) + 1
        proba = np.zeros((len(y), K), np.float64)
        rows = np.empty((max(len(tr) for tr, _ in splits), X.shape[1]), np.float32)  # each fold's rows, in turn
        for tr, te in splits:
            Xtr = np.take(X, tr, axis=0, out=rows[: len(tr)], mode="clip")  # "clip": unbuffered, tr is in range
            head = LinearHead(C=C, seed=seed, copy=False).fit(Xtr, y[tr])  # normalised in place: no second copy
            proba[np.ix_(te, head.classes_.astype(int))] = head.predict_proba(X[te])
            bar.update()
        del rows
    return proba, float(C)


def _nested(X: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], seed: int,
            progress: bool = False) -> np.ndarray:
    """Out-of-fold probabilities (N, C) with a full sweep in each fold: fold i's C is the best mean accuracy over
    the linear head's grid in an inner cross-validation whose folds are the other outer folds, then fold i is
    predicted by a refit on all rows but its own at that C. No label of fold i touches its C or weights.

    Inner folds aligned with the outer ones share their fits: the inner model of (outer i, inner j) trains on every
    fold but i and j, the same rows as that of (outer j, inner i), so K(K-1)/2 sweeps serve the K(K-1) inner
    problems -- each scored on fold j for outer i and on fold i for outer j. Features are standardised once with
    every row's mean and variance (label-free statistics); each refit starts from its inner solutions' mean.
    ``progress``: a bar over the K(K-1)/2 sweeps and K refits."""
    import torch

    from .device import resolve_device
    from .heads.features import apply_norm, fit_norm
    from .heads.linear import LinearHead, _solve, sweep_path, threads_for

    parts = [te for _, te in splits]  # each fold's rows
    k = len(parts)
    if k < 3:
        raise ProbeError(f"a sweep in each fold needs folds >= 3 (inner folds are the other outer folds), got {k}")
    head = LinearHead(seed=seed)  # the default head's grid, block, iteration caps and tolerance
    Cs, K, dev = head.Cs(), int(y.max()) + 1, resolve_device(head.device)
    Z = torch.from_numpy(np.ascontiguousarray(apply_norm(X, fit_norm(X, "standardize")), np.float32)).to(dev)
    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
    every = np.arange(len(y))
    Zf = [Z[torch.from_numpy(p).to(dev)] for p in parts]  # each fold's rows, scored k - 1 times
    acc = np.zeros((k, k, len(Cs)))  # acc[i, j]: fit without folds i and j, accuracy on fold j, per strength
    path = {}
    with threads_for(Z.shape[0] * Z.shape[1] * K, dev), _fits_bar(k * (k - 1) // 2 + k, k, progress) as bar:
        for i in range(k):
            for j in range(i + 1, k):
                tr = torch.from_numpy(np.setdiff1d(every, np.r_[parts[i], parts[j]])).to(dev)
                sols = sweep_path(Z[tr], yt[tr], torch.ones(len(tr), device=dev), Cs, K, head.block, head.max_iter,
                                  head.tol)
                for a, b in ((i, j), (j, i)):
                    acc[a, b] = [float(((Zf[b] @ W + c).argmax(1).cpu().numpy() == y[parts[b]]).mean())
                                 for W, c, _ in sols]
                path[i, j] = path[j, i] = sols
                bar.update()
        proba = np.zeros((len(y), K), np.float64)
        for i in range(k):
            others = [j for j in range(k) if j != i]
            inner = acc[i, others].mean(0)  # (S,) the inner cross-validation accuracy per strength
            best = int(np.argmax(inner))  # the first maximum: ties keep the stronger penalty
            W0, b0 = (torch.stack([path[i, j][best][n] for j in others]).mean(0) for n in (0, 1))
            tr = torch.from_numpy(splits[i][0]).to(dev)  # every row but fold i's
            W, b, _ = _solve(Z[tr], yt[tr], torch.ones(len(tr), device=dev), float(Cs[best]), W0, b0,
                             head.max_iter_final, head.tol)
            proba[parts[i]] = torch.softmax(Zf[i] @ W + b, 1).double().cpu().numpy()
            log.info("fold %d: C=%.3g (inner accuracy %.4f)", i, Cs[best], inner[best])
            bar.update()
    return proba


def _pairs(store: FeatureStore, threshold: float, k: int,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(pairs (m, 2), similarities (m,), (N,) mean cosine distance to k nearest neighbours, index kind) over every
    row of the store, read and L2-normalised a block at a time (``FeatureStore.search_rows``: the search never
    holds the features beside its index): ``near_pairs``, exact below the flat-index size, else approximate.
    ``progress``: a bar on stderr over the rows whose neighbours are searched (the long part on a large store)."""
    from .search.dedup import near_pairs

    with store.search_rows("cosine") as rows:
        found = near_pairs(rows, threshold, k, neighbours=True, progress=progress, desc="doctor neighbours")
    ids, sims = found.knn_ids, found.knn_sims  # (N, k+1), the row itself usually first
    own = ids == np.arange(len(ids))[:, None]
    nn = np.where(own | (ids < 0), np.nan, sims)  # (N, k+1): neighbours only
    knn = 1.0 - np.nanmean(nn, axis=1) if ids.shape[1] > 1 else np.zeros(len(ids))
    return found.pairs, found.sims, knn, found.search.get("type", "flat")


def doctor(store: FeatureStore | str | os.PathLike, *, folds: int = 5, seed: int = 0,
           dup_threshold: float = DUP_THRESHOLD, k: int = 10, sweep: str = "once",
           out: str | os.PathLike | None = None, progress: bool = False) -> DoctorReport:
    """Likely label errors, near-duplicates across splits, outliers and class balance of a labelled store.

    Example:
        >>> r = doctor("cache/photos.h5", folds=5, seed=0)
        >>> [(i["path"], i["given"], i["suggested"]) for i in r.label_issues[:5]]
        >>> doctor("cache/photos.h5", out="doctor.html").html   # also the HTML report with thumbnails

    ``progress``: bars on stderr over the cross-validated fits and the nearest-neighbour search of every row, the
    long parts on a large store.
    """
    t0 = time.perf_counter()
    num_label_issues, label_quality = _cleanlab()
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if sweep not in SWEEPS:
        raise ProbeError(f"sweep must be one of {', '.join(SWEEPS)}, got {sweep!r}")
    if not -1 <= dup_threshold <= 1:
        raise ProbeError(f"dup_threshold is a cosine similarity in [-1, 1], got {dup_threshold}")
    y_all = store.labels() if store.count else np.zeros(0, np.int64)
    _check(store, y_all, folds)
    X_all = store.features()  # (N, D)
    paths, splits, prints = store.paths(), store.splits(), store.fingerprints()
    lab, present, y = labelled_classes(y_all)  # y: (n,) indices 0..C'-1 over the classes present
    X = X_all if len(lab) == len(X_all) else X_all[lab]  # (n, D): no copy when every row is labelled
    names = [store.classes[c] for c in present]

    proba, C = out_of_fold_proba(X, y, folds, seed, sweep, progress)
    # cleanlab's recipe for a ranked list: every row scored by self-confidence, cut at the calibrated confident-joint
    # estimate of how many labels are wrong (find_label_issues' own filter drops some low-confidence rows whose
    # class pair its joint under-counts, so its list is not a prefix of the ranking)
    quality = label_quality(y, proba, method="self_confidence")
    count = num_label_issues(y, proba, estimation_method="off_diagonal_calibrated")
    ranked = np.argsort(quality, kind="stable")[:count]
    issues = [{"row": int(lab[i]), "path": str(paths[lab[i]]), "split": str(splits[lab[i]]), "given": names[y[i]],
               "suggested": names[int(proba[i].argmax())], "self_confidence": round(float(proba[i, y[i]]), 6)}
              for i in ranked]

    from .heads.calibration import MEAN_BLOCK, cl2n, class_means

    centre, means = class_means(X, y, np.arange(len(present)))
    d_class = np.empty(len(X), np.float32)  # (n,) cosine distance to own class mean, a block of rows at a time
    for a in range(0, len(X), MEAN_BLOCK):
        d_class[a: a + MEAN_BLOCK] = 1.0 - (cl2n(X[a: a + MEAN_BLOCK], centre) * means[y[a: a + MEAN_BLOCK]]).sum(1)
    del X, X_all  # the neighbour search reads the store again, a block at a time, beside its index
    pairs, psims, knn, kind = _pairs(store, dup_threshold, k, progress)
    same_print = [prints[a] != "" and prints[a] == prints[b] for a, b in pairs]
    found = []
    for (a, b), s, fp in zip(pairs, psims, same_print):
        found.append({"rows": [int(a), int(b)], "paths": [str(paths[a]), str(paths[b])],
                      "splits": [str(splits[a]), str(splits[b])], "similarity": round(float(s), 6),
                      "exact": bool(fp or s >= EXACT), "cross_split": bool(splits[a] != splits[b])})
    found.sort(key=lambda p: (not p["cross_split"], -p["similarity"]))
    train_dup: dict[str, set[int]] = {}
    for p in found:
        for me, other in ((0, 1), (1, 0)):
            if p["splits"][other] == "train" and p["splits"][me] != "train":
                train_dup.setdefault(p["splits"][me], set()).add(p["rows"][me])
    leakage = {str(s): round(len(train_dup.get(str(s), ())) / int((splits == s).sum()), 6)
               for s in np.unique(splits) if s != "train"}
    duplicates = {"threshold": dup_threshold, "index": kind, "pairs": found,
                  "cross_split": sum(p["cross_split"] for p in found), "exact": sum(p["exact"] for p in found)}

    order = np.argsort(-d_class, kind="stable")
    outliers = [{"row": int(lab[i]), "path": str(paths[lab[i]]), "split": str(splits[lab[i]]), "label": names[y[i]],
                 "class_distance": round(float(d_class[i]), 6), "knn_distance": round(float(knn[lab[i]]), 6)}
                for i in order]

    counts = {str(s): {names[c]: int(((splits[lab] == s) & (y == c)).sum()) for c in range(len(names))}
              for s in np.unique(splits[lab])}
    total = np.bincount(y, minlength=len(names))
    balance = {"counts": counts, "total": dict(zip(names, total.tolist())),
               "imbalance_ratio": round(float(total.max() / total.min()), 6)}
    notes = [f"{len(y_all) - len(lab)} unlabelled rows skipped"] if len(lab) < len(y_all) else []
    oof = float((proba.argmax(1) == y).mean())
    log.info("doctor: %d label issues, %d duplicate pairs, oof accuracy %.3f", len(issues), len(found), oof)
    report = DoctorReport(store=str(store.path), n=len(lab), classes=names, folds=folds, seed=seed, C=C,
                          oof_accuracy=round(oof, 6), label_issues=issues, duplicates=duplicates, leakage=leakage,
                          outliers=outliers, balance=balance, seconds=round(time.perf_counter() - t0, 3),
                          notes=notes, sweep=sweep)
    if out is not None:
        report.write_html(out)
    return report


make_module_callable(__name__, doctor)  # `probe.doctor(...)` whether Python bound the module or the function
