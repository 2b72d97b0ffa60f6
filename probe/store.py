"""The feature store: one HDF5 file per (dataset, backbone configuration), readable with plain h5py.

Layout (schema version 1)::

    /features              (N, D) float32   penultimate-layer embeddings, one row per image
    /labels                (N,)   int64     index into attrs["classes"], -1 when unlabelled
    /paths                 (N,)   utf-8     relative to attrs["root"] (absolute where a manifest said so)
    /split                 (N,)   utf-8     "train" / "val" / "test" / "" (no split)
    /fingerprints          (N,)   utf-8     "size:mtime_ns" of the file when it was embedded
    /views                 (N, K, D) float32  optional: K augmented views per image (``probe extract --views K``)
    /skipped/{paths,reasons,fingerprints}   files that could not be decoded, and why
    attrs: schema_version, classes, backbone, weights, weights_sha256, preprocess (JSON), tta, dtype,
           pooling, config_key, root, layout, versions (JSON), created, updated, device;
           views (JSON: {"count": K, "augment": recipe}) only in stores with /views

``config_key`` hashes everything that changes the numbers (backbone, weights checksum, preprocessing, pooling,
TTA, dtype, and the augmented views where there are any): rows made under another key are never mixed in. Writes
are atomic (a new file renamed over the old one), so a crash leaves either the old store or the new one; work in
progress lives in a journal beside it.

Example:
    >>> store = FeatureStore("cache/demo.h5")
    >>> X, y = store.features(split="train"), store.labels(split="train")
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from .errors import StoreError
from .identity import ARRAYS_IDENTITY, FeatureIdentity, IdentityMismatchError

StoreMismatchError = IdentityMismatchError  # the name this error had when only stores were compared

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _strings(ds: h5py.Dataset, sel: Any = slice(None)) -> np.ndarray:
    return ds.asstr()[sel] if len(ds) else np.array([], dtype=object)


class FeatureStore:
    """Read access to a store. Arrays are loaded on demand; ``split=None`` means all rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"feature store {str(self.path)!r} does not exist (make one with `probe extract`)")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
                self.count, self.dim = f["features"].shape
                self.n_views = f["views"].shape[1] if "views" in f else 0  # augmented views per row
        except (OSError, KeyError) as e:
            raise StoreError(f"{str(self.path)!r} is not a probe feature store: {e}") from e
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this probe reads {SCHEMA_VERSION}")
        for k in ("preprocess", "versions", "views", "engine"):
            if isinstance(self.attrs.get(k), str):
                self.attrs[k] = json.loads(self.attrs[k])
        self.classes: list[str] = list(self.attrs.get("classes", []))

    # ---- identity
    @property
    def identity(self) -> FeatureIdentity:
        """What made these features (backbone, weights, preprocessing, pooling, TTA, dtype, views)."""
        return FeatureIdentity.from_config(self.attrs)

    @property
    def feature_key(self) -> str:
        return self.identity.feature_key

    @property
    def backbone(self) -> str:
        return self.attrs["backbone"]

    @property
    def root(self) -> Path:
        return Path(self.attrs["root"])

    # ---- rows
    def _mask(self, f: h5py.File, split: str | None) -> Any:
        if split is None:
            return slice(None)
        sp = _strings(f["split"])
        return np.flatnonzero(sp == split)

    def features(self, split: str | None = None) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            m = self._mask(f, split)
            return f["features"][m] if isinstance(m, slice) else f["features"][np.sort(m)] if len(m) else \
                np.zeros((0, self.dim), np.float32)

    def views(self, split: str | None = None, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The augmented views (n, K, D) float32 of ``split`` (or of the row indices ``rows``, in their order);
        None when the store has none. Read in chunks of rows, so asking for a subset holds only the subset."""
        if not self.n_views:
            return None
        with h5py.File(self.path, "r") as f:
            ds = f["views"]
            if rows is None:
                m = self._mask(f, split)
                if isinstance(m, slice):
                    return ds[:]
                rows = m
            rows = np.asarray(rows, np.int64)
            out = np.empty((len(rows), self.n_views, self.dim), np.float32)  # (n, K, D)
            order = np.argsort(rows, kind="stable")
            srt = rows[order]
            step = max(1, (64 << 20) // (4 * self.n_views * self.dim))  # ~64 MB of rows per read
            for a in range(0, self.count, step):
                lo, hi = np.searchsorted(srt, [a, a + step])
                if hi > lo:
                    out[order[lo:hi]] = ds[a: a + step][srt[lo:hi] - a]
            return out

    def labels(self, split: str | None = None) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            m = self._mask(f, split)
            return f["labels"][m] if isinstance(m, slice) or len(m) else np.zeros(0, np.int64)

    def paths(self, split: str | None = None) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return _strings(f["paths"], self._mask(f, split))

    def splits(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return _strings(f["split"])

    def fingerprints(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return _strings(f["fingerprints"])

    def skipped(self) -> list[dict[str, str]]:
        with h5py.File(self.path, "r") as f:
            g = f["skipped"]
            return [{"path": p, "reason": r} for p, r in zip(_strings(g["paths"]), _strings(g["reasons"]))]

    def skipped_fingerprints(self) -> dict[str, str]:
        with h5py.File(self.path, "r") as f:
            g = f["skipped"]
            return dict(zip(_strings(g["paths"]), _strings(g["fingerprints"])))

    def abspath(self, rel: str) -> str:
        return os.path.join(self.attrs["root"], rel)

    def info(self) -> dict[str, Any]:
        """Summary for `probe info`: counts, identity, classes, per-split counts, skipped files."""
        sp = self.splits()
        labels = self.labels()
        return {
            "path": str(self.path),
            "count": int(self.count),
            "dim": int(self.dim),
            "views": int(self.n_views),  # augmented views per image (0: none)
            "views_augment": (self.attrs.get("views") or {}).get("augment"),
            "backbone": self.backbone,
            "weights": self.attrs.get("weights"),
            "weights_sha256": self.attrs.get("weights_sha256"),
            "preprocess": self.attrs.get("preprocess"),
            "tta": self.attrs.get("tta"),
            "dtype": self.attrs.get("dtype"),
            "pooling": self.attrs.get("pooling"),
            "config_key": self.attrs.get("config_key"),
            "root": self.attrs.get("root"),
            "layout": self.attrs.get("layout"),
            "classes": self.classes,
            "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(self.classes)},
            "unlabelled": int((labels < 0).sum()),
            "splits": {s or "(none)": int((sp == s).sum()) for s in sorted(set(sp.tolist()))},
            "skipped": self.skipped(),
            "versions": self.attrs.get("versions"),
            "engine": self.attrs.get("engine"),  # what ran the backbone (absent in stores from before engines)
            "created": self.attrs.get("created"),
            "updated": self.attrs.get("updated"),
            "schema_version": self.attrs.get("schema_version"),
        }

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, count={self.count}, dim={self.dim}, backbone={self.backbone!r})"


# ------------------------------------------------------------------------------------------ locking
@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """One writer per store: a second `probe extract` on the same store fails at once."""
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:  # a POSIX record lock: owned by this process only, so forked decode workers never hold it
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"another process is writing {path} (lock {lock_path} is held)") from None
        yield
        os.unlink(lock_path)  # while still holding it: the next writer creates a fresh one
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ journal
_MAGIC = b"PRJ1"
_HEAD = struct.Struct("<4sQI")  # magic, payload length, crc32


class Journal:
    """Append-only log of finished batches beside a store (``STORE.journal``).

    Each record is framed with its length and CRC32 and fsync'd, so after ``kill -9`` every complete record is
    intact and a torn tail is ignored (and cut off on the next append). Only the in-flight batch is lost."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _records(self, skip: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, Any] | dict[str, np.ndarray]]]:
        """(end offset, record) for every intact record, one at a time: memory stays one batch deep.
        The first record is the JSON header; arrays named in ``skip`` are not loaded."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            first = True
            while True:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    return
                magic, n, crc = _HEAD.unpack(head)
                payload = f.read(n) if magic == _MAGIC else b""
                if magic != _MAGIC or len(payload) != n or zlib.crc32(payload) != crc:
                    return
                if first:
                    yield f.tell(), json.loads(payload)
                    first = False
                else:
                    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                        yield f.tell(), {k: z[k] for k in z.files if k not in skip}

    def read(self) -> tuple[dict[str, Any] | None, list[dict[str, np.ndarray]]]:
        """(header, batch records without their features and views) of every intact record; cuts off a torn
        tail."""
        header, records, good = None, [], 0
        for end, rec in self._records(skip=("features", "views")):
            good = end
            if header is None:
                header = rec
            else:
                records.append(rec)
        if self.path.exists() and good < self.path.stat().st_size:
            log.warning("%s: ignoring a torn record at byte %d (interrupted write)", self.path, good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return header, records

    def features(self) -> Iterator[tuple[list[str], list[str], np.ndarray, np.ndarray | None]]:
        """(paths, fingerprints, (B, D) features, (B, K, D) views or None) of each batch record, in the order they
        were written."""
        records = self._records()
        next(records, None)  # header
        for _, r in records:
            yield r["paths"].tolist(), r["fingerprints"].tolist(), r["features"], r.get("views")

    def _append(self, payload: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(_HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload)
            f.flush()
            os.fsync(f.fileno())

    def start(self, header: dict[str, Any]) -> None:
        self.path.unlink(missing_ok=True)
        self._append(json.dumps(header).encode())

    def append(self, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._append(buf.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- rows
class Row(NamedTuple):
    """A store row without its vectors: what ``write_store``'s ``rows`` maps each path to."""

    fingerprint: str  # of the file when it was embedded (probe.data.fingerprint)
    label: int  # index into the store's classes; -1: unlabelled
    split: str  # "train" / "val" / "test" / "" (no split)


class Skip(NamedTuple):
    """A file that could not be embedded: its fingerprint then, and why."""

    fingerprint: str
    reason: str


class ClassMerge:
    """Labels of several sources, each an index into its own class list (an earlier store's, a dataset's, each
    shard's), as indices into the sorted union of those lists: the class list of the store they are written to.

    Example:
        >>> m = ClassMerge(["cat", "dog"], ["bee", "dog"])
        >>> m.classes, m.label(1, ["cat", "dog"]), m.label(-1, ["cat", "dog"])
        (['bee', 'cat', 'dog'], 2, -1)
    """

    def __init__(self, *class_lists: Sequence[str]):
        self.classes: list[str] = sorted(set().union(*class_lists))
        self._index = {c: i for i, c in enumerate(self.classes)}

    def label(self, y: int, classes: Sequence[str]) -> int:
        """``y`` (an index into ``classes``; -1 unlabelled) as an index into the merged ``self.classes``."""
        return self._index[classes[y]] if y >= 0 else -1


@dataclass
class StoreRows:
    """What a store holds besides its vectors: its rows in store order, its class list and its skipped files.
    Read from the store an extraction extends and from each shard a merge joins, and reconciled into the rows
    ``write_store`` writes."""

    classes: list[str] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)  # path -> Row, in store order
    skipped: dict[str, Skip] = field(default_factory=dict)  # path -> Skip

    @classmethod
    def read(cls, store: FeatureStore) -> StoreRows:
        fps = store.skipped_fingerprints()
        return cls(store.classes,
                   {p: Row(fp, y, sp) for p, fp, y, sp in zip(store.paths(), store.fingerprints(),
                                                                 store.labels().tolist(), store.splits().tolist())},
                   {x["path"]: Skip(fps[x["path"]], x["reason"]) for x in store.skipped()})

    def relabelled(self, merge: ClassMerge) -> Iterator[tuple[str, Row]]:
        """(path, row) with the label an index into ``merge.classes``, in store order."""
        for p, row in self.rows.items():
            yield p, row._replace(label=merge.label(row.label, self.classes))

    def has(self, path: str, fingerprint: str) -> bool:
        """Whether the file at ``path``, as it is now (its ``fingerprint``), is already stored or recorded as
        skipped: nothing to embed."""
        row, skip = self.rows.get(path), self.skipped.get(path)
        return (row is not None and row.fingerprint == fingerprint) or \
            (skip is not None and skip.fingerprint == fingerprint)


# ------------------------------------------------------------------------------------------ writing
def _replace_strings(f: h5py.File, name: str, values: list[str] | np.ndarray) -> None:
    if name in f:
        del f[name]
    f.create_dataset(name, data=np.asarray(list(values), dtype=object), dtype=STR)


def _row_chunks(dim: int, views: int = 0) -> tuple[int, ...]:
    """HDF5 chunk of about 1 MB of rows: (rows, D) for features, (rows, K, D) for views."""
    per_row = dim * max(1, views)
    return (max(1, min(1024, (1 << 20) // (4 * per_row))),) + ((views,) if views else ()) + (dim,)


def _compact(f: h5py.File, name: str, keep: list[int]) -> h5py.Dataset:
    """Replace dataset ``name`` by its rows ``keep`` (sorted), copied 4096 at a time."""
    old = f[name]
    fresh = f.create_dataset(f"{name}_compact", shape=(len(keep),) + old.shape[1:], maxshape=old.maxshape,
                             dtype="f4", chunks=old.chunks)
    for s in range(0, len(keep), 4096):
        fresh[s: s + 4096] = old[keep[s: s + 4096]]
    del f[name]
    f.move(f"{name}_compact", name)
    return f[name]


def write_store(
    path: str | os.PathLike,
    attrs: dict[str, Any],
    rows: dict[str, tuple[str, int, str]],
    batches: Iterable[tuple[list[str], list[str], np.ndarray] | tuple[list[str], list[str], np.ndarray, Any]],
    skipped: dict[str, tuple[str, str]],
    dim: int,
    new: set[str] | None = None,
    views: int = 0,
) -> None:
    """Write the store at ``path`` atomically.

    ``rows``: every row the store should hold, path -> (fingerprint, label, split), in order; stored rows keep
    their position and features (and views) unless a batch brings vectors for them. ``batches``: (paths,
    fingerprints, (B, D) features[, (B, K, D) views]) — vectors are taken when their fingerprint is the row's
    (later batches win), so the journal can be streamed in without holding all features in memory. ``new``: paths
    not yet stored that the batches will fill (default: rows not in the old store). ``skipped``: path ->
    (fingerprint, reason). ``views``: K augmented views per row in ``/views`` (N, K, D); 0: none.
    The old store is copied, updated and renamed over, so a crash at any point leaves a valid store."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    old_index: dict[str, int] = {}
    if path.exists():
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r") as f:
            old_index = {p: i for i, p in enumerate(_strings(f["paths"]))}
    else:
        tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "a") as f:
        arrays = _vector_datasets(f, path, dim, views, now, extending=bool(old_index))
        old_index = _drop_rows(f, arrays, old_index, rows)
        appended = [p for p in rows if p not in old_index]
        order = sorted(old_index, key=old_index.get) + appended  # stored rows keep their position
        for name in arrays:
            f[name].resize(len(order), axis=0)
        filled = _fill_vectors([f[name] for name in arrays], order, rows, batches, views)
        missing = set(appended if new is None else new) - filled
        if missing:
            raise RuntimeError(f"internal: no features for {len(missing)} new rows, e.g. {next(iter(missing))!r}")
        _write_rows(f, order, rows, skipped)
        _write_attrs(f, attrs, now)
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _vector_datasets(f: h5py.File, path: Path, dim: int, views: int, now: str, extending: bool) -> list[str]:
    """Create ``features`` (and ``views``) in a new store, check an old store's; returns the names of both."""
    if "features" not in f:
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype="f4", chunks=_row_chunks(dim))
        f.attrs["created"] = now
    if views and "views" not in f:
        if extending:  # the config key includes the views: a store without them is never extended with them
            raise RuntimeError(f"internal: {path} has no views to extend with {views} views per row")
        f.create_dataset("views", shape=(0, views, dim), maxshape=(None, views, dim), dtype="f4",
                         chunks=_row_chunks(dim, views))
    if "views" in f and f["views"].shape[1:] != (views, dim):
        raise RuntimeError(f"internal: {path} holds views of shape {f['views'].shape[1:]}, not {(views, dim)}")
    return ["features"] + (["views"] if views else [])


def _drop_rows(f: h5py.File, arrays: list[str], old_index: dict[str, int], rows: dict) -> dict[str, int]:
    """Compaction: stored rows not in ``rows`` go, the kept ones keep their order (copied into fresh datasets).
    Returns path -> row of what is kept."""
    if all(p in rows for p in old_index):
        return old_index
    keep = sorted(old_index[p] for p in old_index if p in rows)
    for name in arrays:
        _compact(f, name, keep)
    kept_paths = sorted((p for p in old_index if p in rows), key=old_index.get)
    return {p: i for i, p in enumerate(kept_paths)}


def _fill_vectors(targets: list[h5py.Dataset], order: list[str], rows: dict, batches: Iterable, views: int) -> set[str]:
    """Write each batch's vectors into the rows whose fingerprint they were made from (later batches win);
    returns the paths filled. ``targets``: features, then views if any."""
    row_of = {p: i for i, p in enumerate(order)}
    filled = set()
    for paths, fps, *vecs in batches:  # vecs: [features (B, D)] or [features, views (B, K, D) or None]
        hit = [(row_of[p], j) for j, (p, fp) in enumerate(zip(paths, fps)) if p in row_of and rows[p][0] == fp]
        if not hit:
            continue
        if views and (len(vecs) < 2 or vecs[1] is None):
            raise RuntimeError(f"internal: a batch without views for a store with {views} views per row")
        r, j = map(list, zip(*hit))
        for ds, v in zip(targets, vecs):
            if r == list(range(r[0], r[0] + len(r))):  # the usual case: a batch of appended rows, contiguous
                ds[r[0]: r[0] + len(r)] = v[j]
            else:
                for ri, ji in hit:
                    ds[ri] = v[ji]
        filled.update(order[ri] for ri in r)
    return filled


def _write_rows(f: h5py.File, order: list[str], rows: dict, skipped: dict[str, tuple[str, str]]) -> None:
    """paths, fingerprints, split, labels in ``order``; the skipped files."""
    fps, labels, splits = zip(*(rows[p] for p in order)) if order else ((), (), ())
    _replace_strings(f, "paths", order)
    _replace_strings(f, "fingerprints", fps)
    _replace_strings(f, "split", splits)
    if "labels" in f:
        del f["labels"]
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    if "skipped" in f:
        del f["skipped"]
    g = f.create_group("skipped")
    sk = sorted(skipped)
    _replace_strings(g, "paths", sk)
    _replace_strings(g, "fingerprints", [skipped[p][0] for p in sk])
    _replace_strings(g, "reasons", [skipped[p][1] for p in sk])


def _write_attrs(f: h5py.File, attrs: dict[str, Any], now: str) -> None:
    """Dicts as JSON, lists as string arrays; plus the schema version and the update time."""
    for k, v in attrs.items():
        if isinstance(v, dict):
            v = json.dumps(v, sort_keys=True)
        elif isinstance(v, (list, tuple)):
            v = np.asarray(list(v), dtype=object) if v else np.asarray([], dtype=STR)
        if isinstance(v, np.ndarray) and v.dtype == object:
            f.attrs.create(k, v, dtype=STR)
        else:
            f.attrs[k] = v
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["updated"] = now


def store_from_arrays(
    path: str | os.PathLike,
    features: np.ndarray,
    labels: np.ndarray | None = None,
    paths: list[str] | None = None,
    splits: list[str] | None = None,
    classes: list[str] | None = None,
    config: dict[str, Any] | FeatureIdentity | None = None,
    root: str = "",
    views: np.ndarray | None = None,
) -> FeatureStore:
    """Write a store from in-memory arrays (tests, benchmarks, merges). ``config`` holds the identity's fields
    (or is a FeatureIdentity); missing ones get placeholder values marking the features as not made by a
    backbone. ``views``: optional (N, K, D) augmented views of the rows.

    Example:
        >>> store_from_arrays("cache/x.h5", np.random.rand(10, 4), np.arange(10) % 2, classes=["a", "b"])
    """
    features = np.asarray(features, dtype=np.float32)
    n, dim = features.shape
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    paths = paths if paths is not None else [f"row{i:08d}" for i in range(n)]
    splits = splits if splits is not None else [""] * n
    cfg = {**ARRAYS_IDENTITY.to_dict(),
           **(config.to_dict() if isinstance(config, FeatureIdentity) else config or {})}
    k = 0
    if views is not None:
        views = np.asarray(views, dtype=np.float32)
        if views.ndim != 3 or views.shape[0] != n or views.shape[2] != dim:
            raise StoreError(f"views must have shape ({n}, K, {dim}) like the features, got {views.shape}")
        k = views.shape[1]
        cfg.setdefault("views", {"count": k, "augment": "arrays"})
    if not cfg.get("views"):
        cfg.pop("views", None)  # no views: the key and attributes of a store that never had them
    classes = classes if classes is not None else [str(c) for c in range(int(labels.max()) + 1 if n else 0)]
    attrs = {**cfg, "config_key": FeatureIdentity.from_config(cfg).key, "classes": classes, "root": root,
             "layout": "arrays", "versions": {}, "device": "none"}
    rows = {p: ("", int(y), s) for p, y, s in zip(paths, labels, splits)}
    if len(rows) != n:
        raise StoreError("paths must be unique")
    Path(path).unlink(missing_ok=True)
    write_store(path, attrs, rows, [(list(paths), [""] * n, features, views)], {}, dim, views=k)
    return FeatureStore(path)
