"""The feature store: one HDF5 file per (dataset, backbone configuration), readable with plain h5py.

Layout (schema version 1)::

    /features              (N, D) float32   penultimate-layer embeddings, one row per image
    /labels                (N,)   int64     index into attrs["classes"], -1 when unlabelled (every row of a
                                            multi-label store: its labels are in /label_matrix)
    /label_matrix          (N, C) uint8     only in multi-label stores: 1 where the row has class c (C = len(classes))
    /paths                 (N,)   utf-8     relative to attrs["root"] (absolute where a manifest said so)
    /split                 (N,)   utf-8     "train" / "val" / "test" / "" (no split)
    /fingerprints          (N,)   utf-8     "size:mtime_ns" of the file when it was embedded
    /views                 (N, K, D) float32  optional: K augmented views per image (``probe extract --views K``)
    /skipped/{paths,reasons,fingerprints}   files that could not be decoded, and why
    attrs: schema_version, classes, backbone, weights, weights_sha256, preprocess (JSON), tta, dtype,
           pooling, config_key, root, layout, versions (JSON), created, updated, device;
           views (JSON: {"count": K, "augment": recipe}) only in stores with /views;
           multilabel (True) only in stores with /label_matrix;
           source (the dataset's URL, e.g. s3://bucket/shards/{000..099}.tar) only for a dataset at a URL;
           checksums (JSON: crc32 of the other attributes and of each string array)

``config_key`` hashes everything that changes the numbers (backbone, weights checksum, preprocessing, pooling,
TTA, dtype, and the augmented views where there are any): rows made under another key are never mixed in. Writes
are atomic (a new file renamed over the old one), so a crash or a full disk leaves either the old store or the new
one; work in progress lives in a journal beside it.

Every byte is checked on read: ``/features``, ``/views``, ``/labels`` and ``/label_matrix`` carry HDF5's
Fletcher-32 checksum per chunk (verified by HDF5 itself), the string arrays and attributes a crc32, and the file is
in HDF5 1.10's format, whose structure (superblock, object headers, B-trees) is checksummed too. A damaged store raises
``DamagedStoreError``, one line naming the file; stores written before checksums still load, unverified.

Example:
    >>> store = FeatureStore("cache/demo.h5")
    >>> X, y = store.features(split="train"), store.labels(split="train")
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from .data import pixel_limit
from .errors import IntegrityError, ProbeError, StoreError
from .fs import atomic_path, disk_full_error, is_disk_full, write_error
from .identity import ARRAYS_IDENTITY, FeatureIdentity, IdentityMismatchError

StoreMismatchError = IdentityMismatchError  # the name this error had when only stores were compared

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
READ_ROWS = 16_384  # store rows per read of FeatureStore.features_at (~80 MB at D = 1280): a bounded temporary


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


# ------------------------------------------------------------------------------------------ checksums
CHECKSUMS = "checksums"  # the attribute holding the crc32 of the other attributes and of the string arrays
LIBVER = ("v110", "v110")  # HDF5 1.10's format: superblock, object headers, B-trees and chunk indexes carry
# checksums; readable by any HDF5 >= 1.10 (h5py >= 2.8)


class DamagedStoreError(IntegrityError, StoreError):
    """A store whose bytes are no longer those probe wrote: a chunk, a string array or an attribute fails its
    checksum, or its HDF5 structure cannot be read."""


def _crc_strings(values: Sequence[str]) -> int:
    """crc32 of a string array: its length, then its strings NUL-separated (no path holds a NUL)."""
    return zlib.crc32("\0".join(values).encode("utf-8", "surrogatepass"), zlib.crc32(f"{len(values)}:".encode()))


def _crc_attrs(attrs: dict[str, Any]) -> int:
    """crc32 of the attributes as read back (decoded by ``_attr``), the checksums attribute aside."""
    text = json.dumps({k: v for k, v in attrs.items() if k != CHECKSUMS}, sort_keys=True, default=str)
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def _damaged(path: Path, what: str, why: BaseException | str) -> DamagedStoreError:
    """The one-line error for a store whose bytes changed since probe wrote it."""
    why = " ".join(str(why).split())  # HDF5's messages can span lines
    return DamagedStoreError(f"feature store {str(path)!r} is damaged: {what} ({why}); delete it and extract it "
                             "again with `probe extract`")


class FeatureStore:
    """Read access to a store. Arrays are loaded on demand; ``split=None`` means all rows.

    Reads are verified: HDF5 checks the Fletcher-32 checksum of every chunk of ``features``, ``views`` and
    ``labels`` it reads, probe the crc32 of the string arrays and of the attributes. A store whose bytes changed
    raises ``DamagedStoreError`` (one line naming the file and saying to re-extract it), never NaN rows. Stores
    written before checksums (``checksummed`` False) are read unverified; extending one rewrites it with them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"feature store {str(self.path)!r} is a folder, expected a file (an .h5 from "
                             "`probe extract`)")
        if not self.path.is_file():
            raise StoreError(f"feature store {str(self.path)!r} does not exist (make one with `probe extract`)")
        try:
            with h5py.File(self.path, "r") as f:
                if "features" not in f:
                    raise StoreError(f"{str(self.path)!r} is not a probe feature store: it has no /features")
                self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
                self.count, self.dim = f["features"].shape
                self.n_views = f["views"].shape[1] if "views" in f else 0  # augmented views per row
                fletcher = all(f[n].fletcher32 for n in ("features", "labels", "views", "label_matrix") if n in f)
                matrix = f["label_matrix"].shape if "label_matrix" in f else None  # (N, C) of a multi-label store
        except ProbeError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            if "signature" in str(e):
                raise StoreError(f"{str(self.path)!r} is not a probe feature store (not an HDF5 file)") from None
            raise _damaged(self.path, "its HDF5 structure cannot be read", e) from None
        sums = self.attrs.pop(CHECKSUMS, None)
        self._sums: dict[str, Any] = {}
        if sums is not None:
            try:
                self._sums = json.loads(sums)
                ok = self._sums["attrs"] == _crc_attrs(self.attrs)
            except (TypeError, ValueError, KeyError):
                ok = False
            if not ok:
                raise _damaged(self.path, "its attributes do not match their checksum", "crc32")
        self.checksummed = bool(self._sums) and fletcher  # False: written before probe checksummed its stores
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this probe reads {SCHEMA_VERSION}")
        for k in ("preprocess", "versions", "views", "engine", "extract_config"):
            if isinstance(self.attrs.get(k), str):
                try:
                    self.attrs[k] = json.loads(self.attrs[k])
                except ValueError as e:
                    raise _damaged(self.path, f"attribute {k!r} is not JSON", e) from None
        self.classes: list[str] = list(self.attrs.get("classes", []))
        self.multilabel = bool(self.attrs.get("multilabel", False))  # several labels per row, in /label_matrix
        if self.multilabel and matrix != (self.count, len(self.classes)):
            raise _damaged(self.path, f"/label_matrix is {matrix}, not ({self.count}, {len(self.classes)})",
                           "a multi-label store without its label matrix")

    @contextmanager
    def open(self) -> Iterator[h5py.File]:
        """The store as an open, read-only ``h5py.File`` whose read failures (a chunk failing its checksum, a damaged
        structure) become a one-line ``DamagedStoreError`` naming the file.

        Example:
            >>> with store.open() as f:
            ...     block = f["features"][:4096]   # (4096, D), each chunk checksum-verified by HDF5
        """
        try:
            with h5py.File(self.path, "r") as f:
                yield f
        except ProbeError:
            raise
        except KeyError as e:
            if "nable to" not in str(e):  # not h5py's "Unable to open object": a bug in the caller's block
                raise
            raise _damaged(self.path, "reading it failed", e) from None
        except OSError as e:
            raise _damaged(self.path, "reading it failed", e) from None

    @contextmanager
    def search_rows(self, metric: str | None = "cosine", chunk_rows: int | None = None) -> Iterator[Any]:
        """The features as search ``Rows`` (probe.search.rows), read ``chunk_rows`` rows at a time (None: the
        search's ``IndexConfig.chunk_rows``) from the open store and prepared for ``metric`` on each read: what the
        neighbour searches take without holding the whole store in memory. Valid while the context is open.

        Example:
            >>> with store.search_rows("cosine") as rows:
            ...     found = near_pairs(rows, 0.95)
        """
        from .search import IndexConfig, Rows

        with self.open() as f:
            yield Rows(f["features"], metric, chunk_rows or IndexConfig().chunk_rows, n=self.count)

    def _strings(self, f: h5py.File, name: str, sel: Any = slice(None)) -> np.ndarray:
        """The string array ``name``, checked against its crc32 (read whole: the checksum is of the whole)."""
        try:
            values = _strings(f[name])
        except UnicodeDecodeError as e:
            raise _damaged(self.path, f"/{name} is not utf-8", e) from None
        want = self._sums.get("strings", {}).get(name)
        if want is not None and _crc_strings(values.tolist()) != want:
            raise _damaged(self.path, f"/{name} does not match its checksum", "crc32")
        return values[sel]

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
        return np.flatnonzero(self._strings(f, "split") == split)

    def features(self, split: str | None = None) -> np.ndarray:
        with self.open() as f:
            m = self._mask(f, split)
            return f["features"][m] if isinstance(m, slice) else f["features"][np.sort(m)] if len(m) else \
                np.zeros((0, self.dim), np.float32)

    def features_at(self, rows: np.ndarray | None = None, out: np.ndarray | None = None, progress: bool = False,
                    desc: str = "reading features") -> np.ndarray:
        """The features (n, D) float32 of the row indices ``rows`` (n,), in their order (None: every row), read
        READ_ROWS store rows at a time, into ``out`` (n, D) when given: the result is the only array of their size
        (``features()[rows]`` would hold the whole store as well). ``progress``: a bar on stderr over the rows."""
        from tqdm.auto import tqdm

        rows = np.arange(self.count) if rows is None else np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32) if out is None else out
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        with self.open() as f, tqdm(total=len(rows), unit="row", disable=not progress, desc=desc, mininterval=0.5,
                                    dynamic_ncols=True) as bar:
            ds = f["features"]
            for a in range(0, self.count, READ_ROWS):
                lo, hi = np.searchsorted(srt, [a, a + READ_ROWS])
                if hi > lo:
                    out[order[lo:hi]] = ds[a: a + READ_ROWS][srt[lo:hi] - a]
                    bar.update(hi - lo)
        return out

    def views(self, split: str | None = None, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The augmented views (n, K, D) float32 of ``split`` (or of the row indices ``rows``, in their order);
        None when the store has none. Read in chunks of rows, so asking for a subset holds only the subset."""
        if not self.n_views:
            return None
        with self.open() as f:
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
        with self.open() as f:
            m = self._mask(f, split)
            return f["labels"][m] if isinstance(m, slice) or len(m) else np.zeros(0, np.int64)

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        """(n, C) uint8, 1 where a row has class c: a multi-label store's ``/label_matrix``; for a single-label store
        the one-hot of its labels (an unlabelled row is all zeros), so metrics treat both alike.

        Example:
            >>> Y = store.label_matrix("val")          # (n_val, len(store.classes))
        """
        if not self.multilabel:
            y = self.labels(split)
            out = np.zeros((len(y), len(self.classes)), np.uint8)
            out[np.flatnonzero(y >= 0), y[y >= 0]] = 1
            return out
        with self.open() as f:
            m = self._mask(f, split)
            return f["label_matrix"][m] if isinstance(m, slice) or len(m) else \
                np.zeros((0, len(self.classes)), np.uint8)

    def paths(self, split: str | None = None) -> np.ndarray:
        with self.open() as f:
            return self._strings(f, "paths", self._mask(f, split))

    def splits(self) -> np.ndarray:
        with self.open() as f:
            return self._strings(f, "split")

    def fingerprints(self) -> np.ndarray:
        with self.open() as f:
            return self._strings(f, "fingerprints")

    def skipped(self) -> list[dict[str, str]]:
        with self.open() as f:
            return [{"path": p, "reason": r} for p, r in zip(self._strings(f, "skipped/paths"),
                                                             self._strings(f, "skipped/reasons"))]

    def skipped_fingerprints(self) -> dict[str, str]:
        with self.open() as f:
            return dict(zip(self._strings(f, "skipped/paths"), self._strings(f, "skipped/fingerprints")))

    def abspath(self, rel: str) -> str:
        return os.path.join(self.attrs["root"], rel)

    def info(self) -> dict[str, Any]:
        """Summary for `probe info`: counts, identity, classes, per-split counts, skipped files."""
        sp = self.splits()
        labels = self.labels()
        Y = self.label_matrix() if self.multilabel else None  # (N, C)
        counts = Y.sum(0).tolist() if Y is not None else [int((labels == i).sum()) for i in range(len(self.classes))]
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
            "layer": self.attrs.get("layer"),  # intermediate layer(s), "+"-joined; None: the pre-logits embedding
            "config_key": self.attrs.get("config_key"),
            "root": self.attrs.get("root"),
            "layout": self.attrs.get("layout"),
            "classes": self.classes,
            "multilabel": self.multilabel,  # several labels per image (/label_matrix)
            "labels_per_image": round(float(Y.sum(1).mean()), 3) if Y is not None and len(Y) else None,
            "class_counts": {c: int(n) for c, n in zip(self.classes, counts)},  # images with the class
            "unlabelled": 0 if Y is not None else int((labels < 0).sum()),  # multi-label: an empty row is a
            # negative for every class, not unlabelled
            "splits": {s or "(none)": int((sp == s).sum()) for s in sorted(set(sp.tolist()))},
            "skipped": self.skipped(),
            "device": self.attrs.get("device"),
            "extract_config": self.attrs.get("extract_config"),  # the settings of the last extract that wrote it
            "versions": self.attrs.get("versions"),
            "engine": self.attrs.get("engine"),  # what ran the backbone (absent in stores from before engines)
            "created": self.attrs.get("created"),
            "updated": self.attrs.get("updated"),
            "schema_version": self.attrs.get("schema_version"),
            "checksummed": self.checksummed,  # False: written before probe checksummed stores (read unverified)
        }

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, count={self.count}, dim={self.dim}, backbone={self.backbone!r})"


# ------------------------------------------------------------------------------------------ locking
@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """One writer per store: a second `probe extract` on the same store fails at once."""
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise write_error(lock_path, e) from None
    try:
        try:  # a POSIX record lock: owned by this process only, so forked decode workers never hold it
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"another process is writing {path} (lock {lock_path} is held)") from None
        try:
            yield
        finally:  # after success or a failure, while still holding it: the next writer creates a fresh one
            os.unlink(lock_path)
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
        """Append one framed record, fsync'd. A full disk cuts the partial record off again (the records before
        it stay) and raises DiskFullError naming the journal."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                data = memoryview(_HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload)
                while data:  # unbuffered: a failed write leaves nothing queued to be flushed later
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError as e:
                if not is_disk_full(e, self.path):
                    raise
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    pass  # a torn tail is ignored, and cut off, on the next read anyway
                raise disk_full_error(self.path, _HEAD.size + len(payload)) from None
        finally:
            os.close(fd)

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
    positives: tuple[int, ...] | None = None  # a multi-label row's classes (label is then -1); None: single-label


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

    def positives(self, ys: tuple[int, ...] | None, classes: Sequence[str]) -> tuple[int, ...] | None:
        """A multi-label row's class indices into ``classes`` as sorted indices into ``self.classes`` (None stays)."""
        return None if ys is None else tuple(sorted(self._index[classes[j]] for j in ys))


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
        sets: Iterable[tuple[int, ...] | None] = _row_sets(store.label_matrix()) if store.multilabel else \
            [None] * store.count
        return cls(store.classes,
                   {p: Row(fp, y, sp, ys) for p, fp, y, sp, ys in zip(store.paths(), store.fingerprints(),
                                                                       store.labels().tolist(),
                                                                       store.splits().tolist(), sets)},
                   {x["path"]: Skip(fps[x["path"]], x["reason"]) for x in store.skipped()})

    def relabelled(self, merge: ClassMerge) -> Iterator[tuple[str, Row]]:
        """(path, row) with the label (and a multi-label row's classes) indices into ``merge.classes``, in store
        order."""
        for p, row in self.rows.items():
            yield p, row._replace(label=merge.label(row.label, self.classes),
                                  positives=merge.positives(row.positives, self.classes))

    def has(self, path: str, fingerprint: str, max_pixels: int | None = None) -> bool:
        """Whether the file at ``path``, as it is now (its ``fingerprint``), is already stored or recorded as
        skipped: nothing to embed. A file skipped under a pixel limit below ``max_pixels`` is to be tried again."""
        row, skip = self.rows.get(path), self.skipped.get(path)
        if row is not None and row.fingerprint == fingerprint:
            return True
        if skip is None or skip.fingerprint != fingerprint:
            return False
        limit = pixel_limit(skip.reason)
        return max_pixels is None or limit is None or limit >= max_pixels


def _row_sets(matrix: np.ndarray) -> list[tuple[int, ...]]:
    """(N, C) 0/1 -> each row's class indices, ascending."""
    rows, cols = np.nonzero(matrix)  # row-major: rows ascending, columns ascending within a row
    cuts = np.searchsorted(rows, np.arange(1, len(matrix)))
    return [tuple(c.tolist()) for c in np.split(cols, cuts)] if len(matrix) else []


# ------------------------------------------------------------------------------------------ writing
def _row_chunks(dim: int, views: int = 0) -> tuple[int, ...]:
    """HDF5 chunk of about 1 MB of rows: (rows, D) for features, (rows, K, D) for views."""
    per_row = dim * max(1, views)
    return (max(1, min(1024, (1 << 20) // (4 * per_row))),) + ((views,) if views else ()) + (dim,)


def store_bytes(rows: int, dim: int, views: int = 0, text: int = 0, strings: int | None = None,
                label_columns: int = 0) -> int:
    """About the bytes a store of ``rows`` rows takes on disk: whole chunks of vectors (HDF5 allocates a chunk at
    once), 8 per label (+ ``label_columns`` for a multi-label store's matrix), ``text`` bytes of strings in
    ``strings`` strings (default 3 per row: path, fingerprint, split) at ~40 bytes of HDF5 bookkeeping each, and
    64 KiB of metadata."""
    def chunked(chunk: tuple[int, ...]) -> int:
        per_chunk = int(np.prod(chunk)) * 4
        return -(-rows // chunk[0]) * per_chunk

    strings = 3 * rows if strings is None else strings
    return chunked(_row_chunks(dim)) + (chunked(_row_chunks(dim, views)) if views else 0) + \
        (8 + label_columns) * rows + text + 40 * strings + (64 << 10)


def write_store(
    path: str | os.PathLike,
    attrs: dict[str, Any],
    rows: dict[str, tuple[str, int, str]],
    batches: Iterable[tuple[list[str], list[str], np.ndarray] | tuple[list[str], list[str], np.ndarray, Any]],
    skipped: dict[str, tuple[str, str]],
    dim: int,
    new: set[str] | None = None,
    views: int = 0,
    what: str = "",
) -> None:
    """Write the store at ``path`` atomically, with checksums.

    ``rows``: every row the store should hold, path -> (fingerprint, label, split[, positives]) (a ``Row``), in
    order; stored rows keep
    their position and features (and views) unless a batch brings vectors for them. ``batches``: (paths,
    fingerprints, (B, D) features[, (B, K, D) views]) — vectors are taken when their fingerprint is the row's
    (later batches win), so the journal can be streamed in without holding all features in memory. ``new``: paths
    not yet stored that the batches will fill (default: rows not in the old store). ``skipped``: path ->
    (fingerprint, reason). ``views``: K augmented views per row in ``/views`` (N, K, D); 0: none. When any row
    has ``positives`` the store is multi-label: ``/label_matrix`` (N, C) over ``attrs["classes"]`` (a
    single-label row there is its one-hot) and ``/labels`` all -1.

    A new file ``path.tmp`` is written — the old store's kept rows copied over block by block, then the batches'
    vectors — and renamed over ``path``: a crash or a full disk at any point leaves the old store as it was, and
    the temp file is removed. The new file is compact (dropped rows take no space) and checksummed, also when the
    old store was written before checksums. A full disk raises DiskFullError naming ``path``, the space needed
    and the space free, followed by ``what`` (what is kept, how to resume)."""
    path = Path(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    old = FeatureStore(path) if path.exists() else None
    old_paths = old.paths().tolist() if old else []
    kept = [i for i, p in enumerate(old_paths) if p in rows]  # old rows, in their order
    kept_paths = {old_paths[i] for i in kept}
    order = [old_paths[i] for i in kept] + [p for p in rows if p not in kept_paths]  # stored rows keep their place
    appended = order[len(kept):]
    text = sum(len(p) + len(r[0]) + len(r[2]) for p, r in rows.items()) + \
        sum(len(p) + len(fp) + len(why) for p, (fp, why) in skipped.items())
    merged = {**(old.attrs if old is not None else {"created": now}), **attrs}
    merged.pop("multilabel", None)
    multilabel = any(len(r) > 3 and r[3] is not None for r in rows.values())
    n_classes = len(merged.get("classes", []))
    need = store_bytes(len(order), dim, views, text, 3 * (len(order) + len(skipped)),
                       n_classes if multilabel else 0)
    with atomic_path(path, need=need, what=what) as tmp, _DiskFile(tmp) as out:
        with h5py.File(out, "w", libver=LIBVER, rdcc_nbytes=64 << 20) as f:  # a chunk cache for scattered rows
            targets = _vector_datasets(f, old, path, len(order), dim, views)
            if old is not None:
                _copy_rows(old, targets, kept, out.check)
            filled = _fill_vectors(targets, order, rows, batches, views, out.check)
            missing = set(appended if new is None else new) - filled
            if missing:
                raise RuntimeError(f"internal: no features for {len(missing)} new rows, e.g. {next(iter(missing))!r}")
            crcs = _write_rows(f, order, rows, skipped, n_classes if multilabel else None)
            _write_attrs(f, {**merged, **({"multilabel": True} if multilabel else {})}, now)
            f.attrs[CHECKSUMS] = json.dumps({"attrs": _crc_attrs({k: _attr(v) for k, v in f.attrs.items()}),
                                             "strings": crcs}, sort_keys=True)
            # the vectors and labels carry HDF5's Fletcher-32 per chunk (``fletcher32=True``)
        out.check()  # closing flushed HDF5's caches: did they fit?


class _DiskFile:
    """The file HDF5 writes a store into (h5py's file-object driver), made safe for a full disk.

    HDF5 does not survive a failed write: the file cannot be closed, and the library crashes the process later
    (a segfault when the objects are collected or at exit). So a write that runs out of space does not fail here:
    it and every later write go to memory (reads see them), HDF5 finishes and closes normally, and ``check()`` —
    called between blocks, and after closing — raises the ENOSPC OSError, which ``atomic_path`` turns into
    DiskFullError after removing the temp file. Memory holds at most what HDF5 writes before the next check."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.full: OSError | None = None
        self.spill: list[tuple[int, bytes]] = []  # (offset, bytes) written after the disk filled, in order

    def __enter__(self) -> _DiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)

    def check(self) -> None:
        if self.full is not None:
            raise self.full

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self._size() + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _size(self) -> int:
        return max([os.fstat(self.fd).st_size] + [o + len(b) for o, b in self.spill])

    def write(self, data: Any) -> int:
        rest, at = memoryview(data).cast("B"), self.pos
        n = len(rest)
        while len(rest) and self.full is None:
            try:
                k = os.pwrite(self.fd, rest, at)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                k = 0
            if k == 0:
                self.full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            rest, at = rest[k:], at + k
        if len(rest):
            self.spill.append((at, bytes(rest)))
        self.pos += n
        return n

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        n = os.preadv(self.fd, [out], self.pos)
        out[n:] = bytes(len(out) - n)  # past the end: zeros, as HDF5's own driver reads
        for o, b in self.spill:
            lo, hi = max(o, self.pos), min(o + len(b), self.pos + len(out))
            if lo < hi:
                out[lo - self.pos: hi - self.pos] = b[lo - o: hi - o]
        self.pos += len(out)
        return len(out)

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(self._size() - self.pos if n < 0 else n)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.full is None:
            os.ftruncate(self.fd, size)
        return size

    def flush(self) -> None:
        pass


def _vector_datasets(f: h5py.File, old: FeatureStore | None, path: Path, n: int, dim: int,
                     views: int) -> list[h5py.Dataset]:
    """Create ``features`` (N, D) (and ``views`` (N, K, D)), chunked and Fletcher-32 checksummed; check the old
    store's shapes. Returns the datasets: features, then views if any."""
    if old is not None and old.dim != dim:
        raise RuntimeError(f"internal: {path} holds {old.dim}-d features, not {dim}-d")
    if old is not None and old.n_views != views:  # the config key includes the views: never mixed
        raise RuntimeError(f"internal: {path} holds {old.n_views} views per row, not {views}")
    out = [f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype="f4", chunks=_row_chunks(dim),
                            fletcher32=True)]
    if views:
        out.append(f.create_dataset("views", shape=(n, views, dim), maxshape=(None, views, dim), dtype="f4",
                                    chunks=_row_chunks(dim, views), fletcher32=True))
    return out


def _copy_rows(old: FeatureStore, targets: list[h5py.Dataset], kept: list[int], check: Callable[[], None],
               block: int = 64 << 20) -> None:
    """The old store's rows ``kept`` (sorted) into rows 0..len(kept)-1 of ``targets``, ~``block`` bytes a read:
    contiguous runs as slices (the usual case: nothing dropped), the rest by index. ``check()`` after each."""
    with old.open() as src:
        for ds in targets:
            sds = src[ds.name]
            step = max(1, block // (4 * int(np.prod(sds.shape[1:]))))
            for a in range(0, len(kept), step):
                idx = kept[a: a + step]
                contiguous = idx[-1] - idx[0] == len(idx) - 1
                ds[a: a + len(idx)] = sds[idx[0]: idx[-1] + 1] if contiguous else sds[idx]
                check()


def _fill_vectors(targets: list[h5py.Dataset], order: list[str], rows: dict, batches: Iterable, views: int,
                  check: Callable[[], None] = lambda: None) -> set[str]:
    """Write each batch's vectors into the rows whose fingerprint they were made from (later batches win);
    returns the paths filled. ``targets``: features, then views if any. ``check()`` after each batch."""
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
        check()
    return filled


def _put_strings(f: h5py.File | h5py.Group, name: str, values: Sequence[str]) -> int:
    """A utf-8 string array; returns its crc32 (HDF5 filters cannot checksum variable-length strings)."""
    values = list(values)
    f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=STR)
    return _crc_strings(values)


def _write_rows(f: h5py.File, order: list[str], rows: dict, skipped: dict[str, tuple[str, str]],
                n_classes: int | None = None) -> dict[str, int]:
    """paths, fingerprints, split, labels in ``order`` (and, with ``n_classes``, the multi-label matrix); the skipped
    files. Returns the string arrays' crc32s."""
    fps, labels, splits = (list(c) for c in zip(*(rows[p][:3] for p in order))) if order else ([], [], [])
    crcs = {"paths": _put_strings(f, "paths", order), "fingerprints": _put_strings(f, "fingerprints", fps),
            "split": _put_strings(f, "split", splits)}
    if n_classes is not None:  # multi-label: every row's classes in the matrix, a single-label row as its one-hot
        matrix = np.zeros((len(order), n_classes), np.uint8)  # (N, C)
        for i, p in enumerate(order):
            r = rows[p]
            ys = r[3] if len(r) > 3 and r[3] is not None else ((r[1],) if r[1] >= 0 else ())
            matrix[i, list(ys)] = 1
        f.create_dataset("label_matrix", data=matrix, maxshape=(None, n_classes), fletcher32=True,
                         chunks=(max(1, min(len(order), (1 << 20) // max(1, n_classes))), max(1, n_classes)))
        labels = [-1] * len(order)  # old readers see unlabelled rows, never a wrong single label
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64), maxshape=(None,),
                     chunks=(max(1, min(len(labels), 1 << 16)),), fletcher32=True)
    g = f.create_group("skipped")
    sk = sorted(skipped)
    crcs.update({"skipped/paths": _put_strings(g, "paths", sk),
                 "skipped/fingerprints": _put_strings(g, "fingerprints", [skipped[p][0] for p in sk]),
                 "skipped/reasons": _put_strings(g, "reasons", [skipped[p][1] for p in sk])})
    return crcs


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
    backbone. ``views``: optional (N, K, D) augmented views of the rows. ``labels``: (N,) class indices (-1
    unlabelled), or an (N, C) 0/1 matrix for a multi-label store.

    Example:
        >>> store_from_arrays("cache/x.h5", np.random.rand(10, 4), np.arange(10) % 2, classes=["a", "b"])
        >>> store_from_arrays("cache/m.h5", np.random.rand(3, 4), [[1, 1], [0, 1], [0, 0]], classes=["a", "b"])
    """
    features = np.asarray(features, dtype=np.float32)
    n, dim = features.shape
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels)
    sets: list[tuple[int, ...] | None] = [None] * n
    if labels.ndim == 2:  # (N, C) multi-label
        if labels.shape[0] != n or not labels.shape[1] or not np.isin(labels, (0, 1)).all():
            raise StoreError(f"a multi-label y must be an ({n}, C) matrix of 0/1 with C >= 1, got shape "
                             f"{labels.shape} with values {sorted(np.unique(labels).tolist())[:5]}")
        if classes is not None and len(classes) != labels.shape[1]:
            raise StoreError(f"{len(classes)} classes for a label matrix of {labels.shape[1]} columns")
        classes = classes if classes is not None else [str(c) for c in range(labels.shape[1])]
        sets = _row_sets(labels)
        labels = np.full(n, -1, np.int64)
    labels = labels.astype(np.int64)
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
    rows = {p: Row("", int(y), s, ys) for p, y, s, ys in zip(paths, labels, splits, sets)}
    if len(rows) != n:
        raise StoreError("paths must be unique")
    Path(path).unlink(missing_ok=True)
    write_store(path, attrs, rows, [(list(paths), [""] * n, features, views)], {}, dim, views=k)
    return FeatureStore(path)
