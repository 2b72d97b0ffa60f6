"""`probe map`: a 2-D map of a store's features (UMAP or PCA) as one self-contained, interactive HTML page.

Projection: the rows are L2-normalised (the geometry cosine search and the heads see), then UMAP (umap-learn,
``metric="cosine"``, seeded) after a PCA to 50 dimensions when D > 50 -- neighbour search in 1280-d is slow and
the first 50 components keep the neighbourhoods -- or PCA to 2 dimensions. ``method="auto"`` is UMAP when umap-learn
is installed (``pip install 'probe[map]'``), else PCA with a warning. UMAP's first call in a process JIT-compiles
(numba): 10-25 s on a 2-core CPU before the first map; later calls take 0.5-2 s for 400 rows, ~70 s for 50k.

Colours: ``label`` (class names; multi-label stores: a row's first positive class, "(none)" for none -- the
tooltip lists them all), ``split``, ``prediction`` (the linear head's out-of-fold prediction,
``probe.doctor.out_of_fold_proba``, on labelled rows; wrong ones are outlined) or ``issue`` (what
``probe.doctor`` flags: "label issue", "near-duplicate", "outlier" -- the top 1% by distance to the class mean --
else "ok").

The page: points on a <canvas> (wheel zooms, drag pans, the legend toggles categories), a tooltip with the
thumbnail, path, label, split and prediction of the point under the mouse (a grid index finds it). Data and code
are inline: no CDN, no request. At most ``thumbs`` rows (default 2000, a seeded sample when there are more) carry
an embedded 64 px JPEG thumbnail (~2-3 KB each); the other rows' tooltips load ``file://<absolute path>``, which
shows only on the machine holding the images -- embedding all of 50k rows would make a ~100 MB page.

Large stores: at most ``max_points`` rows (default 100,000) are read, projected and drawn -- UMAP of 1M rows takes
most of an hour here and its page would be ~100+ MB. Above it the map shows a seeded sample stratified by the
colour's categories (``sample_rows``: every category keeps ``min(its rows, 5)`` points, the rest is shared in
proportion), read a block of store rows at a time keeping only the sampled ones; ``color="prediction"`` / ``"issue"``
stratify by label and compute the out-of-fold predictions or probe.doctor's analysis on the sampled rows only (so
near-duplicates are pairs among them). The page and ``notes`` say "100,000 of 1,000,000 rows shown".

Example:
    >>> m = probe.embedding_map("cache/demo.h5", color="prediction", out="map.html")
    >>> m.coords.shape, m.method, m.counts      # (400, 2), 'umap', {'Ankle_boot': 41, ...}
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._callable import make_module_callable
from .errors import ProbeError
from .fs import human, write_bytes_atomic
from .store import FeatureStore

log = logging.getLogger(__name__)

COLORS = ("label", "split", "prediction", "issue")
METHODS = ("auto", "umap", "pca")
UMAP_PCA_DIM = 50  # UMAP runs on at most this many PCA components of the normalised features
THUMBS = 2000  # embedded thumbnails at most: 2000 x ~2.5 KB = ~5 MB; 50k would be ~100 MB
THUMB_PX = 64  # longest side of an embedded thumbnail
OUTLIER_SHARE = 0.01  # issue colour: the top 1% of rows by distance to their class mean are "outlier"
FOLDS = 5  # prediction colour: folds of the out-of-fold prediction (fewer when a class has fewer rows)
MAX_POINTS = 100_000  # rows drawn at most (0: all): UMAP of 100k took 3.5 min on 2 cores, its page 3.2 MB + thumbnails
Q = 100_000  # coordinates travel to the page as integers 0..Q of the unit square (1e-5 of the map's extent)

NO_UMAP = "method='umap' needs umap-learn, which is not installed: pip install 'probe[map]' (or use method='pca')"
UNLABELLED, NONE, NO_SPLIT = "(unlabelled)", "(none)", "(no split)"
ISSUES = ("label issue", "near-duplicate", "outlier", "ok")  # legend order; a row gets the first that applies
_FIXED = {UNLABELLED: "#b0b0b0", NONE: "#b0b0b0", NO_SPLIT: "#9e9e9e", "label issue": "#d62728",
          "near-duplicate": "#ff7f0e", "outlier": "#9467bd", "ok": "#c7c7c7",
          "train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
_TAB20 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
          "#dbdb8d", "#9edae5")  # matplotlib's tab10 then the light halves of tab20


@dataclass
class EmbeddingMap:
    """A 2-D map of a store: what ``embedding_map`` returns; ``to_dict()`` is the --json output."""
    store: str
    coords: np.ndarray  # (N, 2) float32, the projection as computed (the page rescales it to its unit square)
    method: str  # "umap" or "pca": the one used
    color: str  # label / split / prediction / issue
    legend: list[str]  # the colour categories, in legend order
    codes: np.ndarray  # (N,) int32, index into legend per row
    paths: list[str]  # (N,) as stored (relative to the store's root)
    seed: int
    seconds: float = 0.0
    projection_seconds: float = 0.0  # of which the projection (UMAP's first call includes its JIT compile)
    wrong: np.ndarray | None = None  # (N,) bool, prediction colour only: labelled rows predicted wrong
    accuracy: float | None = None  # prediction colour only: out-of-fold accuracy on the labelled rows
    thumbnails: int = 0  # rows with an embedded thumbnail in the page
    rows: np.ndarray | None = None  # (N,) int64 store row of each point; None when every row is drawn
    total: int = 0  # rows in the store (N above when every row is drawn)
    out: Path | None = None  # the page written, None when not asked
    bytes: int = 0  # its size
    notes: list[str] = field(default_factory=list)

    @property
    def categories(self) -> np.ndarray:
        """(N,) the colour category of each row, as strings."""
        return np.asarray(self.legend, dtype=object)[self.codes]

    @property
    def counts(self) -> dict[str, int]:
        """Rows per colour category, in legend order."""
        n = np.bincount(self.codes, minlength=len(self.legend))
        return {c: int(k) for c, k in zip(self.legend, n)}

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """A JSON-able summary; the (N, 2) coordinates, categories and paths only with ``arrays=True``."""
        lo, hi = (self.coords.min(0).tolist(), self.coords.max(0).tolist()) if len(self.coords) else ([], [])
        d: dict[str, Any] = {
            "store": self.store, "rows": len(self.codes), "store_rows": self.total, "method": self.method,
            "color": self.color, "seed": self.seed, "legend": self.counts, "seconds": self.seconds,
            "projection_seconds": self.projection_seconds,
            "coords": {"shape": list(self.coords.shape), "min": lo, "max": hi},
            "wrong": int(self.wrong.sum()) if self.wrong is not None else None, "accuracy": self.accuracy,
            "thumbnails": self.thumbnails, "out": str(self.out) if self.out else None, "bytes": self.bytes,
            "notes": self.notes}
        if arrays:
            d.update(coords=self.coords.tolist(), categories=self.categories.tolist(), paths=list(self.paths),
                     sampled_rows=None if self.rows is None else self.rows.tolist())
        return d


# ------------------------------------------------------------------------------------------------- projection
def _umap():
    try:
        import umap
    except ImportError:
        return None
    return umap


def project(X: np.ndarray, method: str = "auto", seed: int = 0, progress: bool = False) -> tuple[np.ndarray, str]:
    """(N, 2) float32 coordinates of the rows of X (N, D) and the method used ("umap" or "pca").

    The rows are L2-normalised first. UMAP: cosine metric, seeded, on the first 50 PCA components when D > 50.
    ``auto``: UMAP when umap-learn imports, else PCA (with a warning saying how to get UMAP). ``progress``: a bar
    on stderr over the stages (PCA, UMAP), each logged at debug level with its time -- UMAP itself reports no
    progress."""
    from sklearn.decomposition import PCA

    if method not in METHODS:
        raise ProbeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    x = np.asarray(X, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (N, D) unit rows
    n, d = x.shape
    umap = _umap() if method != "pca" else None
    if method == "umap" and umap is None:
        raise ProbeError(NO_UMAP)
    if umap is None and method == "auto":
        log.warning("umap-learn is not installed: the map uses PCA (pip install 'probe[map]' for UMAP)")
    reduce = umap is not None and d > UMAP_PCA_DIM and n > UMAP_PCA_DIM
    with tqdm(total=1 + reduce if umap else 1, unit="stage", desc=f"map: projecting {n} rows", disable=not progress,
              dynamic_ncols=True, bar_format="{desc}: {n}/{total} stages [{elapsed}{postfix}]") as bar:
        def stage(name: str, fn: Any) -> np.ndarray:  # fn() -> (N, k)
            bar.set_postfix_str(name)
            t = time.perf_counter()
            z = fn()
            log.debug("map: %s of %d rows in %.1fs", name, n, time.perf_counter() - t)  # the total: embedding_map
            bar.update()
            return z

        if umap is None:
            k = min(2, n, d)
            z = stage("PCA", lambda: PCA(n_components=k, random_state=seed).fit_transform(x)) if k else np.zeros((n, 0))
            return np.pad(z, ((0, 0), (0, 2 - k))).astype(np.float32), "pca"  # (N, 2); a 1-d store gets y = 0
        if reduce:
            x = stage(f"PCA to {UMAP_PCA_DIM}-d", lambda: PCA(n_components=UMAP_PCA_DIM, random_state=seed)
                      .fit_transform(x).astype(np.float32))  # (N, 50)
        reducer = umap.UMAP(n_components=2, random_state=seed, metric="cosine", n_jobs=1,  # a seed means 1 thread
                            n_neighbors=max(2, min(15, n - 1)),
                            init="spectral" if n > 10 else "random")  # spectral init needs more rows than 2 + 1
        return np.asarray(stage("UMAP", lambda: reducer.fit_transform(x)), np.float32), "umap"


# ------------------------------------------------------------------------------------------------- the sample
def sample_rows(groups: np.ndarray, k: int, seed: int = 0, floor: int = FOLDS) -> np.ndarray:
    """(k,) sorted indices of a seeded sample of the N rows of ``groups`` (N,), stratified by group: each group
    keeps min(its rows, ``floor``) rows, the other rows of k are shared in proportion to what each group has left
    (largest remainders). k must be below N and cover the floors.

    Example:
        >>> sample_rows(np.array(["a"] * 990 + ["b"] * 10), 100)     # 95 rows of "a", 5 of "b"
    """
    _, group, n = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    take = np.minimum(n, floor)
    if take.sum() > k:
        raise ProbeError(f"max_points={k} cannot keep every colour category: its {len(n)} categories need "
                         f"{take.sum()} points (min(rows, {floor}) each); raise max_points, or 0 draws every row")
    assert k < len(group), (k, len(group))
    share = (k - take.sum()) * (n - take) / (n - take).sum()  # (G,) what each group has left, in proportion
    take += np.floor(share).astype(np.int64)
    take[np.argsort(-(share - np.floor(share)), kind="stable")[:k - take.sum()]] += 1  # sum(fractions) rows left
    rng = np.random.default_rng(seed)
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(n)[:-1])  # rows of each group, ascending
    return np.sort(np.concatenate([rng.choice(m, t, replace=False) for m, t in zip(members, take)]))


class _Sample(FeatureStore):
    """The sorted rows ``rows`` of a store, as a store of their own: what the map and probe.doctor read of it
    (features, labels, paths, splits, fingerprints) is that of the sampled rows, the rest is the store's."""

    def __init__(self, store: FeatureStore, rows: np.ndarray, X: np.ndarray):
        self.__dict__.update(store.__dict__)
        self.rows, self.count, self._X = rows, len(rows), X  # X: (n, D) the sampled rows' features

    def features(self, split: str | None = None) -> np.ndarray:
        assert split is None
        return self._X

    @contextmanager
    def search_rows(self, metric: str | None = "cosine", chunk_rows: int | None = None) -> Iterator[Any]:
        from .search import IndexConfig, Rows

        yield Rows(self._X, metric, chunk_rows or IndexConfig().chunk_rows)  # the sampled rows, already in memory

    def labels(self, split: str | None = None) -> np.ndarray:
        assert split is None
        return super().labels()[self.rows]

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        assert split is None
        Y = super().label_matrix()  # single-label: the one-hot of self.labels(), already the sample's rows
        return Y[self.rows] if self.multilabel else Y

    def paths(self, split: str | None = None) -> np.ndarray:
        assert split is None
        return super().paths()[self.rows]

    def splits(self) -> np.ndarray:
        return super().splits()[self.rows]

    def fingerprints(self) -> np.ndarray:
        return super().fingerprints()[self.rows]


# ------------------------------------------------------------------------------------------------- colours
def _codes(values: list[str], order: list[str]) -> tuple[list[str], np.ndarray]:
    """Legend (the names of ``order`` that occur, then any others in first-seen order) and (N,) codes."""
    seen = set(values)
    legend = [c for c in order if c in seen]
    legend += [c for c in dict.fromkeys(values) if c not in set(legend)]
    at = {c: i for i, c in enumerate(legend)}
    return legend, np.fromiter((at[v] for v in values), np.int32, len(values))


def _label_text(store: FeatureStore) -> tuple[list[str], list[str]]:
    """Per row: the colour name of its label and the tooltip's text (all labels of a multi-label row)."""
    if store.multilabel:
        Y = store.label_matrix()  # (N, C)
        names = [[store.classes[c] for c in np.flatnonzero(r)] for r in Y]
        return [r[0] if r else NONE for r in names], [", ".join(r) if r else NONE for r in names]
    y = store.labels()
    text = [store.classes[c] if c >= 0 else UNLABELLED for c in y]
    return text, text


def _labelled(store: FeatureStore, color: str) -> np.ndarray:
    """(N,) int64 labels of a single-label store with labelled rows of at least 2 classes, else ProbeError."""
    where = f"store {str(store.path)!r}"
    if store.multilabel:
        raise ProbeError(f"{where} is multi-label: color={color!r} needs a single-label store "
                         "(use color='label' or 'split')")
    y = store.labels()
    present = np.unique(y[y >= 0])
    if not len(present):
        raise ProbeError(f"{where} has no labelled rows: color={color!r} needs labels (extract from class "
                         "folders), use color='label' or 'split'")
    if len(present) < 2:
        raise ProbeError(f"{where} has one class ({store.classes[present[0]]!r}): color={color!r} needs at least 2")
    return y


def _predictions(store: FeatureStore, X: np.ndarray, seed: int, progress: bool = False
                 ) -> tuple[np.ndarray, float, int]:
    """(N,) out-of-fold predicted class index per row (-1 unlabelled), the accuracy and the folds used
    (``progress``: a bar over the fold fits)."""
    from .doctor import labelled_classes, out_of_fold_proba

    y_all = _labelled(store, "prediction")
    lab, present, y = labelled_classes(y_all)  # y: (n,) 0..C'-1 over the classes present
    smallest = int(np.bincount(y).min())
    folds = min(FOLDS, smallest)
    if folds < 2:
        c = store.classes[present[int(np.bincount(y).argmin())]]
        raise ProbeError(f"class {c!r} of store {str(store.path)!r} has 1 labelled row: out-of-fold predictions "
                         "need at least 2 per class (use color='label')")
    proba, _ = out_of_fold_proba(X[lab], y, folds, seed, progress=progress)  # (n, C')
    pred = np.full(len(y_all), -1, np.int64)
    pred[lab] = present[proba.argmax(1)]
    return pred, float((pred[lab] == y_all[lab]).mean()), folds


def _issues(store: FeatureStore, seed: int, progress: bool = False) -> tuple[list[str], dict[int, str], str]:
    """Per row: "label issue", "near-duplicate", "outlier", "ok" (first that applies) from probe.doctor (with its
    ``progress`` bar); what it found about each flagged row (for the tooltip); a note."""
    from .doctor import doctor

    y = _labelled(store, "issue")
    report = doctor(store, seed=seed, progress=progress)
    outliers = report.outliers[:max(1, math.ceil(OUTLIER_SHARE * len(report.outliers)))]
    detail: dict[int, list[str]] = {}
    for i in report.label_issues:
        detail.setdefault(i["row"], []).append(f"suggested {i['suggested']} (self-confidence "
                                               f"{i['self_confidence']:.2f})")
    for p in report.duplicates["pairs"]:
        for me, other in ((0, 1), (1, 0)):
            detail.setdefault(p["rows"][me], []).append(f"near-duplicate of {p['paths'][other]} (cosine "
                                                        f"{p['similarity']:.3f})")
    for o in outliers:
        detail.setdefault(o["row"], []).append(f"outlier: cosine distance {o['class_distance']:.3f} to its class mean")
    flagged = {"label issue": {i["row"] for i in report.label_issues},
               "near-duplicate": {r for p in report.duplicates["pairs"] for r in p["rows"]},
               "outlier": {o["row"] for o in outliers}}
    out = []
    for i in range(store.count):
        hit = next((name for name in ISSUES[:3] if i in flagged[name]), None)
        out.append(hit or ("ok" if y[i] >= 0 else UNLABELLED))
    note = (f"doctor: {len(flagged['label issue'])} label issues, {len(report.duplicates['pairs'])} near-duplicate "
            f"pairs, top {OUTLIER_SHARE:.0%} by class distance as outliers")
    return out, {i: "; ".join(d) for i, d in detail.items()}, note


def _palette(legend: list[str], color: str) -> list[str]:
    """A colour per legend entry: the fixed ones of this colour mode (grey for unlabelled, red for label issues,
    ...), the others tab20 without those already taken, or golden-angle hues past 20."""
    special = {"label": (UNLABELLED, NONE), "prediction": (UNLABELLED,), "issue": (*ISSUES, UNLABELLED),
               "split": ("train", "val", "test", NO_SPLIT)}[color]
    fixed = {c: _FIXED[c] for c in legend if c in special}
    free = [c for c in legend if c not in fixed]
    tab = [t for t in _TAB20 if t not in fixed.values()]
    spread = {c: tab[i] if len(free) <= len(tab) else
              f"hsl({(i * 137.508) % 360:.1f},{60 + 25 * (i % 2)}%,{45 + 12 * (i % 3)}%)"
              for i, c in enumerate(free)}
    return [fixed.get(c) or spread[c] for c in legend]


# ------------------------------------------------------------------------------------------------- the page
def _thumbnails(store: FeatureStore, paths: list[str], rows: np.ndarray, size: int,
                progress: bool = False) -> dict[int, str]:
    """{row: data URI} for the rows whose image can be read: files, or members of the store's containers (decoded
    in threads: PIL releases the GIL). ``progress``: a bar on stderr over the thumbnails made."""
    from .report import thumbnail_uri
    from .sources import Pictures

    pictures = Pictures.of_store(store.attrs)
    there = [int(i) for i in rows if pictures.exists(paths[i])]  # missing files: one note, not a warning each
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        uris = list(tqdm(pool.map(lambda i: thumbnail_uri(paths[i], size, pictures), there), total=len(there),
                         unit="img", disable=not progress, desc="thumbnails", mininterval=0.5, dynamic_ncols=True))
        return {i: u for i, u in zip(there, uris) if u}


def _vocab(values: list[str]) -> tuple[list[str], list[int]]:
    at: dict[str, int] = {}
    codes = [at.setdefault(v, len(at)) for v in values]
    return list(at), codes


def _page(m: EmbeddingMap, store: FeatureStore, label_text: list[str], split: list[str],
          pred: list[str] | None, details: dict[int, str], thumbs: dict[int, str], title: str) -> bytes:
    c = m.coords.astype(np.float64)
    lo, hi = c.min(0), c.max(0)
    scale = float(max(hi - lo)) or 1.0
    u = (c - (lo + hi) / 2) / scale * 0.98 + 0.5  # (N, 2) in the unit square, aspect kept, centred
    u[:, 1] = 1.0 - u[:, 1]  # screen y grows downwards; the map's y grows upwards
    xy = np.clip(np.rint(u * Q), 0, Q).astype(np.int64).ravel().tolist()
    labels, label_codes = _vocab(label_text)
    splits, split_codes = _vocab(split)
    data: dict[str, Any] = {
        "title": title, "n": len(m.codes), "q": Q, "xy": xy, "color": m.color,
        "legendTitle": "prediction (out-of-fold)" if m.color == "prediction" else m.color,
        "legend": m.legend, "colors": _palette(m.legend, m.color), "code": m.codes.tolist(),
        "labels": labels, "label": label_codes, "splits": splits, "split": split_codes,
        "paths": list(m.paths), "root": str(store.root.absolute()),
        "thumbs": {str(i): uri for i, uri in thumbs.items()}, "details": {str(i): t for i, t in details.items()},
        "method": m.method}
    if pred is not None:
        preds, pred_codes = _vocab(pred)
        data.update(preds=preds, pred=pred_codes, wrong=np.flatnonzero(m.wrong).tolist())
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")  # no </script>
    shown = m.notes[0] if m.rows is not None else f"{len(m.codes)} rows"  # the sample's note comes first
    head = (f"{shown}, {m.method}, coloured by {data['legendTitle']}"
            + (f", accuracy {100 * m.accuracy:.1f}%" if m.accuracy is not None else ""))
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head>"
            f"<body><header><b>{html.escape(title)}</b> <span id='summary'>{html.escape(head)}</span>"
            "<span class='hint'>wheel: zoom · drag: pan · legend: show/hide · double-click: reset</span></header>"
            "<main><div id='plot'><canvas id='map' data-points='0'></canvas><canvas id='overlay'></canvas></div>"
            "<aside id='legend'></aside></main><div id='tooltip' role='tooltip'></div>"
            f"<script type='application/json' id='map-data'>{payload}</script>"
            f"<script>{_JS}</script></body></html>").encode()


def embedding_map(store: FeatureStore | str | os.PathLike, *, color: str = "label", method: str = "auto",
                  seed: int = 0, out: str | os.PathLike | None = None, thumbs: int = THUMBS,
                  thumb_size: int = THUMB_PX, title: str | None = None, max_points: int = MAX_POINTS,
                  progress: bool = False) -> EmbeddingMap:
    """A 2-D map of the rows of ``store``, coloured by ``color``; with ``out``, also the interactive HTML page.

    ``method``: "umap" (umap-learn, cosine, after a 50-d PCA when D > 50), "pca", or "auto" (UMAP when installed).
    ``max_points``: above it, a seeded sample of that many rows stratified by the colour (by label for prediction
    and issue, which are then computed on the sample) is read and drawn; 0 draws every row. ``thumbs``: rows with
    an embedded ``thumb_size`` px thumbnail (a seeded sample when there are more rows); the others' tooltips point
    at ``file://`` paths. Deterministic for a seed. ``progress``: bars on stderr over the features read, the
    projection's stages, the thumbnails (and ``color="issue"``: probe.doctor's fits and neighbour search).

    Example:
        >>> m = embedding_map("cache/demo.h5", color="issue", method="pca", out="map.html")
        >>> m.counts                      # {"label issue": 70, "near-duplicate": 4, "outlier": 2, "ok": 324}
    """
    t0 = time.perf_counter()
    if color not in COLORS:
        raise ProbeError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
    if method not in METHODS:
        raise ProbeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if thumbs < 0 or thumb_size < 8:
        raise ProbeError(f"thumbs must be >= 0 and thumb_size >= 8 px, got {thumbs} and {thumb_size}")
    if max_points < 0 or 0 < max_points < 3:
        raise ProbeError(f"max_points must be 0 (every row) or at least 3, got {max_points}")
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    total = store.count
    if total < 3:
        raise ProbeError(f"store {str(store.path)!r} has {total} rows: a 2-D map needs at least 3")
    if method == "umap" and _umap() is None:  # before the colours' minutes of work, not after
        raise ProbeError(NO_UMAP)

    notes: list[str] = []
    sample = None  # (max_points,) the store rows drawn, when there are more
    if max_points and total > max_points:
        if color == "split":
            groups = np.asarray([s or NO_SPLIT for s in store.splits().tolist()])
        elif color == "label":
            groups = np.asarray(_label_text(store)[0])
        else:  # prediction, issue: by label (their categories come from the sample), the whole store checked first
            groups = _labelled(store, color)
        sample = sample_rows(groups, max_points, seed)
        by = "split" if color == "split" else "label"
        notes.append(f"{max_points:,} of {total:,} rows shown (seeded sample stratified by {by}; --max-points)")
    X = store.features_at(sample, progress=progress, desc="map: reading features")  # (N, D): max_points if sampled
    sampled = sample is not None
    if sampled:
        store = _Sample(store, sample, X)
    paths, splits = store.paths().tolist(), store.splits().tolist()
    label_color, label_text = _label_text(store)
    pred_text = wrong = accuracy = None
    details: dict[int, str] = {}  # row -> what probe.doctor found about it (issue colour)
    if color == "label":
        order = list(store.classes) + [NONE, UNLABELLED]
        legend, codes = _codes(label_color, order)
    elif color == "split":
        values = [s or NO_SPLIT for s in splits]
        legend, codes = _codes(values, ["train", "val", "test", NO_SPLIT])
    elif color == "prediction":
        pred, accuracy, folds = _predictions(store, X, seed, progress)
        y = store.labels()
        pred_text = [store.classes[p] if p >= 0 else UNLABELLED for p in pred]
        wrong = (y >= 0) & (pred != y)
        legend, codes = _codes(pred_text, list(store.classes) + [UNLABELLED])
        notes.append(f"prediction: the linear head's out-of-fold prediction ({folds} folds, seed {seed}) of "
                     f"{int((y >= 0).sum())} labelled rows" + (" of the sample, trained on it" if sampled else ""))
    else:
        values, details, note = _issues(store, seed, progress)
        legend, codes = _codes(values, list(ISSUES) + [UNLABELLED])
        notes.append(note + (" (on the sampled rows only: near-duplicates are pairs among them)" if sampled else ""))

    t1 = time.perf_counter()
    coords, used = project(X, method, seed, progress)
    t_proj = time.perf_counter() - t1
    log.info("map: %d rows projected with %s in %.2fs", len(X), used, t_proj)
    m = EmbeddingMap(store=str(store.path), coords=coords, method=used, color=color, legend=legend, codes=codes,
                     paths=paths, seed=seed, projection_seconds=round(t_proj, 3), wrong=wrong,
                     accuracy=None if accuracy is None else round(accuracy, 6), rows=sample, total=total, notes=notes)
    if out is not None:
        n = store.count
        rows = np.arange(n) if n <= thumbs else np.sort(np.random.default_rng(seed).choice(n, thumbs, replace=False))
        uris = _thumbnails(store, paths, rows, thumb_size, progress)
        if len(uris) < len(rows):
            notes.append(f"{len(rows) - len(uris)} of {len(rows)} sampled images could not be read: no thumbnail")
        from .sources import CONTAINER_LAYOUTS

        if n > len(uris) and store.attrs.get("layout") in CONTAINER_LAYOUTS:  # no file:// URL reaches a member
            notes.append(f"{n - len(uris)} rows without an embedded thumbnail: their images are inside containers, "
                         "their tooltips show none (raise thumbs to embed more)")
        elif n > len(uris):
            notes.append(f"{n - len(uris)} rows without an embedded thumbnail: their tooltips load file:// paths, "
                         "shown only on the machine holding the images")
        page = _page(m, store, label_text, [s or NO_SPLIT for s in splits], pred_text, details, uris,
                     title or f"probe map: {store.path.name}")
        m.out = write_bytes_atomic(out, page, what="any previous map there is unchanged")
        m.bytes, m.thumbnails = len(page), len(uris)
        log.info("map: wrote %s (%s, %d thumbnails)", m.out, human(len(page)), len(uris))
    m.seconds = round(time.perf_counter() - t0, 3)
    return m


_CSS = """
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; font: 13px system-ui, sans-serif; color: #222; background: #fff; }
body { display: flex; flex-direction: column; }
header { padding: 6px 10px; border-bottom: 1px solid #ddd; display: flex; gap: 12px; align-items: baseline; }
header .hint { color: #888; margin-left: auto; font-size: 12px; }
main { flex: 1; display: flex; min-height: 0; }
#plot { flex: 1; position: relative; min-width: 0; cursor: crosshair; }
#plot.dragging { cursor: grabbing; }
#plot canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
#overlay { pointer-events: none; }
#legend { width: 230px; overflow-y: auto; border-left: 1px solid #ddd; padding: 6px 8px; }
#legend h3 { font-size: 13px; margin: 2px 0 6px; }
#legend .item { display: flex; align-items: center; gap: 6px; padding: 2px 3px; cursor: pointer;
  user-select: none; border-radius: 3px; }
#legend .item:hover { background: #f0f0f0; }
#legend .item.off { opacity: 0.35; }
#legend .sw { width: 12px; height: 12px; border-radius: 2px; flex: none; }
#legend .sw.ring { background: #fff; border: 2px solid #000; }
#legend .name { flex: 1; word-break: break-all; } #legend .count { color: #777; font-variant-numeric: tabular-nums; }
#legend .buttons { display: flex; gap: 6px; margin: 8px 0 4px; }
#legend button { font: inherit; padding: 1px 8px; }
#tooltip { position: fixed; display: none; max-width: 280px; background: #fff; border: 1px solid #999;
  border-radius: 4px; box-shadow: 0 2px 8px rgba(0,0,0,.25); padding: 6px; pointer-events: none; z-index: 10;
  font-size: 12px; }
#tooltip img { display: block; max-width: 128px; max-height: 128px; min-width: 64px; image-rendering: pixelated;
  margin-bottom: 4px; background: #eee; }
#tooltip .path, #tooltip .detail { word-break: break-all; color: #444; margin-bottom: 2px; }
#tooltip .wrong { color: #c00; font-weight: 600; } #tooltip .missing { color: #999; font-style: italic; }
"""

_JS = r"""
(() => {
"use strict";
const D = JSON.parse(document.getElementById("map-data").textContent);
const N = D.n, K = D.legend.length;
const X = new Float32Array(N), Y = new Float32Array(N), code = Int32Array.from(D.code);
for (let i = 0; i < N; i++) { X[i] = D.xy[2 * i] / D.q; Y[i] = D.xy[2 * i + 1] / D.q; }
const wrong = new Uint8Array(N); for (const i of D.wrong || []) wrong[i] = 1;
const plot = document.getElementById("plot"), canvas = document.getElementById("map"),
      overlay = document.getElementById("overlay"), tip = document.getElementById("tooltip");
const ctx = canvas.getContext("2d"), octx = overlay.getContext("2d");
const hidden = new Uint8Array(K);
let showWrong = true, hovered = -1, W = 0, H = 0, dpr = 1, base = 1;
const view = {scale: 1, tx: 0, ty: 0};

// rows of each category, drawn largest first so that small categories stay on top
const members = []; { const n = new Int32Array(K); for (let i = 0; i < N; i++) n[code[i]]++;
  for (let c = 0; c < K; c++) members.push(new Int32Array(n[c]));
  const at = new Int32Array(K); for (let i = 0; i < N; i++) members[code[i]][at[code[i]]++] = i; }
const drawOrder = [...Array(K).keys()].sort((a, b) => members[b].length - members[a].length);

// grid spatial index over the unit square: the rows of cell (gx, gy) are cellRows[cellStart[g] .. cellStart[g+1]]
const G = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(N / 4))));
const cellOf = i => Math.min(G - 1, Math.floor(X[i] * G)) + G * Math.min(G - 1, Math.floor(Y[i] * G));
const cellStart = new Int32Array(G * G + 1), cellRows = new Int32Array(N);
for (let i = 0; i < N; i++) cellStart[cellOf(i) + 1]++;
for (let g = 0; g < G * G; g++) cellStart[g + 1] += cellStart[g];
{ const at = cellStart.slice(0, G * G); for (let i = 0; i < N; i++) cellRows[at[cellOf(i)]++] = i; }

const pointSize = () => Math.min(12, (N > 20000 ? 2 : N > 2000 ? 3 : 5) * Math.max(1, Math.sqrt(view.scale / base)));
const sx = i => X[i] * view.scale + view.tx, sy = i => Y[i] * view.scale + view.ty;

function resize() {
  const r = plot.getBoundingClientRect(); dpr = window.devicePixelRatio || 1;
  const first = !W; W = Math.max(1, r.width); H = Math.max(1, r.height);
  for (const c of [canvas, overlay]) { c.width = Math.round(W * dpr); c.height = Math.round(H * dpr); }
  const old = base; base = Math.max(10, Math.min(W, H) - 24);
  if (first) reset(false); else { view.scale *= base / old; }
  draw();
}
function reset(redraw = true) {
  view.scale = base; view.tx = (W - base) / 2; view.ty = (H - base) / 2; if (redraw) draw();
}
let pending = false;
function draw() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; paint(); }); } }
function paint() {
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.clearRect(0, 0, W, H);
  const s = pointSize(), h = s / 2, circles = N <= 10000; let drawn = 0;
  for (const c of drawOrder) {
    if (hidden[c]) continue;
    ctx.fillStyle = D.colors[c]; ctx.beginPath();
    for (const i of members[c]) {
      const x = sx(i), y = sy(i);
      if (x < -s || y < -s || x > W + s || y > H + s) continue;
      drawn++;
      if (circles) { ctx.moveTo(x + h, y); ctx.arc(x, y, h, 0, 2 * Math.PI); } else ctx.rect(x - h, y - h, s, s);
    }
    ctx.fill();
  }
  if (showWrong && D.wrong && D.wrong.length) {
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.beginPath();
    for (const i of D.wrong) if (!hidden[code[i]]) ctx.rect(sx(i) - h - 1, sy(i) - h - 1, s + 2, s + 2);
    ctx.stroke();
  }
  canvas.dataset.drawn = drawn;
  paintHover();
}
function paintHover() {
  octx.setTransform(dpr, 0, 0, dpr, 0, 0); octx.clearRect(0, 0, W, H);
  if (hovered < 0) return;
  octx.strokeStyle = "#000"; octx.lineWidth = 2; octx.beginPath();
  octx.arc(sx(hovered), sy(hovered), pointSize() / 2 + 4, 0, 2 * Math.PI); octx.stroke();
}

// nearest visible row within r screen pixels of (mx, my), through the grid: -1 when none
function nearest(mx, my, r = Math.max(8, pointSize() + 4)) {
  const u = (mx - view.tx) / view.scale, v = (my - view.ty) / view.scale, ru = r / view.scale;
  const gx0 = Math.max(0, Math.floor((u - ru) * G)), gx1 = Math.min(G - 1, Math.floor((u + ru) * G));
  const gy0 = Math.max(0, Math.floor((v - ru) * G)), gy1 = Math.min(G - 1, Math.floor((v + ru) * G));
  let best = -1, bd = r * r;
  for (let gy = gy0; gy <= gy1; gy++) for (let gx = gx0; gx <= gx1; gx++) {
    const g = gx + G * gy;
    for (let k = cellStart[g]; k < cellStart[g + 1]; k++) {
      const i = cellRows[k]; if (hidden[code[i]]) continue;
      const dx = sx(i) - mx, dy = sy(i) - my, d = dx * dx + dy * dy;
      if (d <= bd) { bd = d; best = i; }
    }
  }
  return best;
}

const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
  "'": "&#39;"})[c]);
function fileUrl(i) {  // the image on this machine: root + relative path (a stored path may be absolute)
  const p = D.paths[i], abs = p.startsWith("/") || !D.root ? p : D.root.replace(/\/+$/, "") + "/" + p;
  return "file://" + abs.split("/").map(encodeURIComponent).join("/");
}
function show(i, mx, my) {
  hovered = i; paintHover();
  if (i < 0) { tip.style.display = "none"; tip.dataset.row = ""; return; }
  const thumb = D.thumbs[i], src = thumb || fileUrl(i);
  let h = `<img alt="" src="${esc(src)}"><div class="path">${esc(D.paths[i])}</div>` +
    `<div>label: <b>${esc(D.labels[D.label[i]])}</b></div><div>split: ${esc(D.splits[D.split[i]])}</div>`;
  if (D.pred) h += `<div>prediction (out-of-fold): <b>${esc(D.preds[D.pred[i]])}</b>` +
    (wrong[i] ? ` <span class="wrong">wrong</span>` : "") + `</div>`;
  if (D.color === "issue") h += `<div>issue: <b>${esc(D.legend[code[i]])}</b></div>`;
  if (D.details[i]) h += `<div class="detail">${esc(D.details[i])}</div>`;
  if (!thumb) h += `<div class="missing">thumbnail not embedded: loaded from the file</div>`;
  tip.innerHTML = h; tip.dataset.row = i; tip.dataset.thumb = thumb ? "embedded" : "file";
  tip.querySelector("img").onerror = e => { e.target.replaceWith(Object.assign(document.createElement("div"),
    {className: "missing", textContent: "image not available here"})); };
  const r = canvas.getBoundingClientRect();
  let x = r.left + (mx === undefined ? sx(i) : mx) + 14, y = r.top + (my === undefined ? sy(i) : my) + 14;
  tip.style.display = "block";
  if (x + tip.offsetWidth > innerWidth - 4) x -= tip.offsetWidth + 28;
  if (y + 160 > innerHeight) y = Math.max(4, innerHeight - 170);
  tip.style.left = x + "px"; tip.style.top = y + "px";
}

// mouse: hover, wheel zoom about the cursor, drag to pan, double-click to reset
let drag = null;
const local = e => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
plot.addEventListener("mousemove", e => {
  const [mx, my] = local(e);
  if (drag) {
    view.tx = drag.tx + mx - drag.x; view.ty = drag.ty + my - drag.y;
    if (Math.abs(mx - drag.x) + Math.abs(my - drag.y) > 2) { drag.moved = true; plot.classList.add("dragging"); }
    show(-1); draw(); return;
  }
  const i = nearest(mx, my); if (i !== hovered || i >= 0) show(i, mx, my);
});
plot.addEventListener("mouseleave", () => show(-1));
plot.addEventListener("mousedown", e => { if (e.button !== 0) return; const [x, y] = local(e);
  drag = {x, y, tx: view.tx, ty: view.ty, moved: false}; e.preventDefault(); });
window.addEventListener("mouseup", () => { drag = null; plot.classList.remove("dragging"); });
plot.addEventListener("wheel", e => {
  e.preventDefault();
  const [mx, my] = local(e), f = Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015));
  const s = Math.min(base * 1000, Math.max(base * 0.2, view.scale * f)), k = s / view.scale;
  view.tx = mx - (mx - view.tx) * k; view.ty = my - (my - view.ty) * k; view.scale = s;
  show(-1); draw();
}, {passive: false});
plot.addEventListener("dblclick", () => reset());

// legend: a row per category with its colour and count; click toggles it
const legend = document.getElementById("legend");
legend.innerHTML = `<h3>${esc(D.legendTitle)}</h3>` + D.legend.map((name, c) =>
  `<div class="item" data-cat="${c}" data-name="${esc(name)}" data-count="${members[c].length}" title="show/hide">` +
  `<span class="sw" style="background:${D.colors[c]}"></span><span class="name">${esc(name)}</span>` +
  `<span class="count">${members[c].length}</span></div>`).join("") +
  (D.wrong ? `<div class="item extra" id="wrong-toggle" data-count="${D.wrong.length}" title="outline on/off">` +
   `<span class="sw ring"></span><span class="name">wrong prediction (outlined)</span>` +
   `<span class="count">${D.wrong.length}</span></div>` : "") +
  `<div class="buttons"><button id="all">all</button><button id="none">none</button>` +
  `<button id="reset">reset view</button></div>`;
legend.addEventListener("click", e => {
  const item = e.target.closest(".item"), b = e.target.closest("button");
  if (item && item.id === "wrong-toggle") { showWrong = !showWrong; item.classList.toggle("off", !showWrong); }
  else if (item) toggle(+item.dataset.cat);
  else if (b && b.id === "reset") reset();
  else if (b) { hidden.fill(b.id === "none" ? 1 : 0);
    legend.querySelectorAll(".item[data-cat]").forEach(el => el.classList.toggle("off", b.id === "none")); }
  show(-1); draw();
});
function toggle(c) {
  hidden[c] ^= 1;
  legend.querySelector(`.item[data-cat="${c}"]`).classList.toggle("off", !!hidden[c]);
}

window.probeMap = {
  n: N, legend: D.legend, ready: false,
  screenXY: i => [sx(i), sy(i)],  // CSS pixels from the canvas's top-left corner
  view: () => ({...view}), hovered: () => hovered, nearest, hoverAt: i => show(i), toggle: c => { toggle(c); draw(); },
  reset: () => reset(), drawn: () => +canvas.dataset.drawn,
  paintMs: () => { const t = performance.now(); paint(); return performance.now() - t; },  // one full redraw
};
canvas.dataset.points = N;
new ResizeObserver(resize).observe(plot);
resize(); paint();
window.probeMap.ready = true; document.body.dataset.state = "ready";
})();
"""


make_module_callable(__name__, embedding_map)  # `probe.embedding_map(...)` whether Python bound the module or not
