"""SearchIndex: a FAISS index whose ids are rows (of a feature store, or of an array), saved with its
id -> (path, label) mapping, the identity of the features it holds and the IndexConfig it was built with.

State lives here; the computation is elsewhere: ``faiss_index.build_faiss`` (train, add, tune), ``rows`` (reading
a store a block at a time), ``sharding`` (sub-indexes searched as one), ``tuning`` (exact ground truth, recall).

Files: ``INDEX`` (faiss.write_index) and ``INDEX.json`` (type, factory string, search parameters, metric, the
IndexConfig as ``config``, the features' identity as ``store_config`` + ``config_key``, paths, labels, measured
recall). Sharded: each sub-index in ``INDEX.shard-k``, ``INDEX`` the trained empty index they were cloned from, and
``INDEX.json`` lists the shard files and their row ranges. Row i of the store is id i of the index, and ``add``
appends the rows a grown store has beyond those indexed. The sidecar records the sha256 of every FAISS file
(``sha256``) and of its own contents (``meta_sha256``); ``load`` checks them, so a damaged file is an error naming
it, never wrong hits. ``save`` writes every file beside the old ones and renames them over together, sidecar last.

Example:
    >>> idx = SearchIndex.build(FeatureStore("cache/demo.h5"))        # auto: exact below 50k vectors
    >>> scores, ids = idx.search(idx.vectors([0, 1]), k=5)              # (2, 5), (2, 5)
    >>> idx.save("cache/demo.faiss")
    >>> SearchIndex.from_arrays(np.random.rand(1000, 64)).search(np.random.rand(3, 64), k=5)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..digest import check_digest, json_sha256
from ..errors import DiskFullError, IndexMismatchError, IntegrityError, MissingFileError, ProbeError
from ..fs import atomic_paths, disk_full_error, sha256_file
from ..identity import ARRAYS_IDENTITY, FeatureIdentity, Side
from ..store import FeatureStore, StoreError
from .config import IndexConfig
from .factory import set_params, set_threads
from .faiss_index import build_faiss
from .rows import Rows, prepare
from .sharding import add_rows, combine, shard_of, sub_indexes
from .tuning import RECALL_K, knn_ground_truth, tune

if TYPE_CHECKING:  # extract and clip load torch: imported only where an image or text query needs them
    from ..clip import TextTower
    from ..extract import Embedder

log = logging.getLogger(__name__)

FORMAT = "probe-search-index"
FORMAT_VERSION = 1
# What made vectors that no backbone made: the placeholder identity probe.store.store_from_arrays records, so an
# index from arrays and a store from the same arrays agree (and `add` accepts one into the other).
NO_BACKBONE = ARRAYS_IDENTITY


def check_k(k: int, gallery: int) -> None:
    """Raise ProbeError unless 1 <= k <= gallery (the number of indexed vectors)."""
    if k < 1:
        raise ProbeError(f"k must be >= 1, got {k}")
    if k > gallery:
        raise ProbeError(f"k={k} is larger than the gallery ({gallery} images): pass -k {gallery} or less")


def sidecar(path: str | os.PathLike) -> Path:
    """INDEX -> INDEX.json, the metadata beside a FAISS index file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _rebuild(path: Path, store: str = "") -> str:
    return f"rebuild the index: probe index {store or 'STORE'} --out {path}"


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the index at ``path`` (its sidecar), checked: JSON of a probe index of this version whose
    checksum matches. Raises MissingFileError without a sidecar, ProbeError (IntegrityError) for a damaged or
    foreign one, each one line naming the file."""
    path = Path(path)
    side = sidecar(path)
    if not side.is_file():
        raise MissingFileError(f"{str(path)!r} has no metadata file {str(side)!r}: it was not saved by probe "
                               "(rebuild with `probe index`)")
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"{str(side)!r}, the metadata of search index {str(path)!r}, is not valid JSON "
                             f"({str(e)[:120]}): it is damaged; {_rebuild(path)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        got = meta if not isinstance(meta, dict) else {"format": meta.get("format"), "version": meta.get("version")}
        raise ProbeError(f"{str(side)!r} is not the metadata of a probe search index of version {FORMAT_VERSION} "
                         f"(found {str(got)[:80]}); {_rebuild(path)}")
    if "meta_sha256" in meta:
        rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
        check_digest(side, meta["meta_sha256"], json_sha256(rest), "its contents", _rebuild(path))
    return meta


def _serialized_size(index: faiss.Index) -> int:
    """Bytes ``faiss.write_index`` writes for ``index``, counted without keeping them."""
    n = 0

    def count(chunk: bytes) -> int:
        nonlocal n
        n += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return n


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SearchIndex:
    """A FAISS index whose ids are rows, with the metadata that makes its hits readable and its queries safe
    (the features' identity). Build with ``SearchIndex.build(store)`` or ``SearchIndex.from_arrays(X)``, reopen
    with ``SearchIndex.load(path)``."""

    def __init__(self, index: faiss.Index, meta: dict[str, Any], template: faiss.Index | None = None):
        self.index = index
        self.meta = meta
        self.template = template  # sharded: the trained, empty index the shards were cloned from
        self.path: Path | None = None  # where it was saved or loaded from
        self._text_towers: dict[str, TextTower] = {}  # device -> the CLIP text tower, built on the first text query
        self._text_lock = threading.Lock()  # concurrent first queries (the server's threads) build it once

    # ---- what it holds
    @property
    def config(self) -> IndexConfig:
        """How the index was built (type, metric, target recall, shards, ...): the sidecar's ``config``."""
        return IndexConfig.from_dict(self.meta["config"])

    @property
    def identity(self) -> FeatureIdentity:
        """What made the indexed vectors: query images must be embedded with exactly this."""
        return FeatureIdentity.from_config(self.meta["store_config"])

    @property
    def has_backbone(self) -> bool:
        """False for vectors no backbone made (``from_arrays`` without an identity, ``store_from_arrays``):
        such an index answers query vectors, gallery ids and stored paths, but cannot embed query images."""
        return self.identity.backbone != NO_BACKBONE.backbone

    @property
    def kind(self) -> str:
        return self.meta["type"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def bounds(self) -> list[int]:
        """Shard k holds rows bounds[k] <= row < bounds[k + 1] (one shard: [0, count])."""
        return self.meta.get("bounds") or [0, self.count]

    @property
    def paths(self) -> list[str]:
        return self.meta["paths"]

    @property
    def labels(self) -> list[int]:
        return self.meta["labels"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def label_name(self, i: int) -> str | None:
        y = self.labels[i]
        return self.classes[y] if 0 <= y < len(self.classes) else None

    def abspath(self, i: int) -> str:
        return os.path.join(self.meta["root"], self.paths[i])

    def vectors(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Stored (prepared) vectors of gallery ids: (n, D). Exact for every type (ivfpq keeps them for re-ranking)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.count:
                raise ProbeError(f"id {i} is not in the gallery: ids run from 0 to {self.count - 1}")
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        subs = sub_indexes(self.index)
        shard = shard_of(np.asarray(self.bounds), np.asarray(ids), len(subs))  # the last shard grows
        return np.stack([subs[k].reconstruct(i) for i, k in zip(ids, shard)])

    def embedder(self, device: str = "auto", engine: str = "auto") -> Embedder:
        """The embedder for query images: exactly the recorded backbone, weights and preprocessing. Raises
        ProbeError for vectors no backbone made, BackboneError when the backbone available now differs."""
        if not self.has_backbone:
            raise ProbeError("this index was built from vectors that no backbone made (from_arrays / "
                             "store_from_arrays): image queries cannot be embedded; query by vector, gallery id or "
                             "stored path instead")
        from ..extract import embedder_for

        return embedder_for(self.identity.to_dict(), device=device, engine=engine)

    # ---- text queries (CLIP)
    @property
    def text_search_problem(self) -> str | None:
        """Why this index cannot answer text queries (one line naming what to do), or None when it can: it holds
        the image embeddings of a clip/ backbone under the cosine metric."""
        from ..clip import is_clip

        name = f"index {str(self.path)!r}" if self.path else "this index"
        ident = self.identity
        if not self.has_backbone:
            return (f"{name} holds vectors that no backbone made: text search needs an index of a "
                    "clip/<model>:<pretrained> store (probe extract --backbone clip/ViT-B-32:openai, then probe index)")
        if not is_clip(ident.to_dict()):
            return (f"{name} holds features of backbone {ident.backbone}, which has no text tower: text search needs "
                    "an index of a clip/<model>:<pretrained> store (probe extract --backbone clip/ViT-B-32:openai)")
        if ident.layer:
            return (f"{name} holds layer {ident.layer} of {ident.backbone}, not its image embedding: text search "
                    "needs the final embedding (extract without --layer)")
        if self.metric != "cosine":
            # CLIP image features are stored unnormalised: their l2 distance to a unit text vector mixes the
            # image's norm into the ranking, so only the cosine (normalised) index ranks texts as CLIP does
            return (f"{name} uses metric {self.metric}; CLIP compares a text with images by cosine, over features "
                    f"stored unnormalised: rebuild it with probe index {self.meta.get('store') or 'STORE'} "
                    f"--metric cosine")
        return None

    def _require_text(self) -> None:
        problem = self.text_search_problem
        if problem:
            raise ProbeError(problem)

    def text_tower(self, device: str = "auto") -> TextTower:
        """The text tower of the index's CLIP (``probe.clip.text_tower_for`` its identity), built on first use and
        kept for the next queries. Raises ProbeError with ``text_search_problem`` for an index that cannot take
        text, BackboneError when the CLIP weights available now are not the ones the features were made with."""
        self._require_text()
        with self._text_lock:
            if device not in self._text_towers:
                from ..clip import text_tower_for

                t0 = time.perf_counter()
                self._text_towers[device] = text_tower_for(self.identity.to_dict(), device)
                log.info("text tower of %s loaded in %.1fs", self.identity.backbone, time.perf_counter() - t0)
            return self._text_towers[device]

    def search_text(self, texts: str | Sequence[str], k: int = 10, device: str = "auto",
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(n,) texts (one string: n = 1) -> (cosine similarities (n, k), ids (n, k)), best first: each text
        encoded by the index's CLIP text tower and compared with the stored (normalised) image features.

        Example:
            >>> scores, ids = SearchIndex.load("cache/photos.faiss").search_text("a photo of a bee", k=5)  # (1, 5)
        """
        self._require_text()  # what the index is comes first: no text or k would make it work
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ProbeError("no text queries given: pass at least one text, e.g. 'a photo of a bee'")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ProbeError(f"text query {i + 1} is {t!r}: expected words to search for, e.g. 'a photo of a bee'")
        check_k(k, self.count)  # before the tower loads
        return self.search(self.text_tower(device).encode(texts), k)  # (n, D) unit rows

    # ---- build / add
    @classmethod
    def build(cls, store: FeatureStore | str | os.PathLike, config: IndexConfig | None = None,
              progress: bool = False) -> SearchIndex:
        """Index every row of ``store``. ``auto`` picks exact search for small stores, else a tuned approximate
        index whose recall@10 on held-out queries is recorded in ``meta["recall"]``. The store is read
        ``config.chunk_rows`` rows at a time (a sample for training): it need not fit in memory. ``progress``:
        a bar on stderr over the rows added."""
        cfg = config or IndexConfig()
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        if store.count == 0:
            raise StoreError(f"store {str(store.path)!r} has no rows: nothing to index (extract a folder with "
                             "images into it first)")
        if cfg.shards > store.count:
            raise ProbeError(f"shards={cfg.shards} is more than the store's {store.count} rows")
        t0 = time.perf_counter()
        with store.open() as f:
            built = build_faiss(Rows(f["features"], cfg.metric, cfg.chunk_rows), cfg, progress)
        return cls._made(built, cfg, time.perf_counter() - t0, identity=store.identity,
                         store=str(Path(store.path).resolve()), root=str(store.attrs.get("root", "")),
                         classes=list(store.classes), paths=store.paths().tolist(), labels=store.labels().tolist())

    @classmethod
    def from_arrays(cls, x: np.ndarray, paths: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                    classes: Sequence[str] | None = None, identity: FeatureIdentity | None = None,
                    config: IndexConfig | None = None, root: str = "") -> SearchIndex:
        """Index an in-memory (N, D) array, no store needed. ``paths`` (default ``row00000000``…) and ``labels``
        (default -1: none) name the rows, ``classes`` the labels (default "0".."max label"). ``identity`` says
        what made the vectors; without one they are vectors no backbone made, and the index answers query
        vectors (``search``), ids and paths, but refuses query images.

        Example:
            >>> idx = SearchIndex.from_arrays(x, labels=y, classes=["cat", "dog"])   # x: (N, D), y: (N,)
            >>> scores, ids = idx.search(q, k=5)                                       # q: (n, D)
        """
        cfg = config or IndexConfig()
        x = np.asarray(x)
        if x.ndim != 2 or not len(x) or not x.shape[1]:
            raise ProbeError(f"from_arrays needs an (N, D) array with N, D >= 1, got shape {x.shape}")
        n = len(x)
        paths = [f"row{i:08d}" for i in range(n)] if paths is None else [str(p) for p in paths]
        labels = [-1] * n if labels is None else [int(y) for y in labels]
        for name, seq in (("paths", paths), ("labels", labels)):
            if len(seq) != n:
                raise ProbeError(f"{name} has {len(seq)} entries for {n} vectors: give one per row")
        if len(set(paths)) != n:
            raise ProbeError("paths must be unique: a query by path must name one row")
        classes = [str(c) for c in range(max(labels) + 1)] if classes is None else list(classes)
        if cfg.shards > n:
            raise ProbeError(f"shards={cfg.shards} is more than the {n} vectors")
        t0 = time.perf_counter()
        built = build_faiss(prepare(x, cfg.metric), cfg)  # (N, D) one normalised copy; the caller's is untouched
        return cls._made(built, cfg, time.perf_counter() - t0, identity=identity or NO_BACKBONE, store="",
                         root=root, classes=classes, paths=paths, labels=labels)

    @classmethod
    def _made(cls, built: tuple[faiss.Index, str, dict[str, Any], int], cfg: IndexConfig, seconds: float, *,
              identity: FeatureIdentity, store: str, root: str, classes: list[str], paths: list[str],
              labels: list[int]) -> SearchIndex:
        """A SearchIndex around what build_faiss returned, with the metadata the sidecar records."""
        index, kind, tuned, ntrain = built
        now = _now()
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "type": kind, "requested_type": cfg.type,
            "factory": tuned["factory"], "params": tuned["params"], "metric": cfg.metric, "dim": int(index.d),
            "count": int(index.ntotal), "shards": cfg.shards, "shard_files": [], "bounds": tuned["bounds"],
            "recall": tuned["recall"], "recall_k": RECALL_K, "recall_queries": tuned["queries"],
            "target_recall": cfg.target_recall, "tuning": tuned["tried"], "trained_on": ntrain,
            "build_seconds": round(seconds, 3), "config": asdict(cfg), "store": store,
            "store_config": identity.to_dict(), "config_key": identity.feature_key, "root": root,
            "classes": classes, "paths": paths, "labels": labels, "created": now, "updated": now,
        }
        return cls(index, meta, tuned.get("template"))

    def check_store(self, store: FeatureStore) -> None:
        """Raise IndexMismatchError, naming the differing fields, when ``store`` has another backbone config."""
        self.identity.check(store.identity, mine="index", theirs=Side("store", str(store.path)), features_only=True,
                            fix="Build a new index for it: probe index STORE --out OTHER.faiss")

    def add(self, store: FeatureStore | str | os.PathLike, retune: bool = True, progress: bool = False) -> int:
        """Add the rows ``store`` has beyond those indexed (a grown store); returns how many. No retraining: IVF
        lists keep their centroids. Approximate types first re-tune their search parameters with (up to
        ``tune_queries``) new rows as held-out queries against the indexed gallery, then add them. ``progress``:
        a bar on stderr over the rows added."""
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.check_store(store)
        old, paths = self.count, store.paths()
        if len(paths) < old or paths[:old].tolist() != self.paths:
            raise IndexMismatchError(
                f"the rows of store {str(store.path)!r} are not those indexed (rows were removed or reordered, "
                f"e.g. by extract --prune: the store has {len(paths)}, the index {old}); rebuild the index: "
                "probe index STORE")
        self.meta.update(classes=list(store.classes), labels=store.labels().tolist(), paths=paths.tolist(),
                         root=str(store.attrs.get("root", "")))
        if len(paths) == old:
            log.info("index is up to date: the store has no rows beyond the %d indexed", old)
            return 0
        set_threads()
        n, cfg = len(paths), self.config
        new = np.arange(old, n)
        nq = min(cfg.tune_queries, len(new))
        subs = sub_indexes(self.index)
        bounds = np.asarray(self.bounds[:-1] + [n])  # the last shard takes the new rows
        with store.open() as f, tqdm(total=len(new), unit="row", disable=not progress, desc=f"index add {self.kind}",
                                     mininterval=0.5, dynamic_ncols=True) as bar:
            rows = Rows(f["features"], self.metric, cfg.chunk_rows)
            if retune and self.kind != "flat" and nq >= 20:  # new rows, before they are added, are held-out queries
                q = rows.take(np.sort(np.random.default_rng(cfg.seed).choice(new, nq, replace=False)))  # (nq, D)
                truth = knn_ground_truth(q, Rows(rows.data, self.metric, cfg.chunk_rows, n=old), self.metric)
                tuned = tune(self.kind, self.index, q, truth, cfg.target_recall)
                set_params(self.index, tuned["params"])
                self.meta.update(params=tuned["params"], recall=tuned["recall"], recall_queries=tuned["queries"],
                                 tuning=tuned["tried"])
            add_rows(subs, bounds, rows, new, bar)
        if len(subs) > 1:
            self.index.syncWithSubIndexes()
        log.info("added rows %d..%d to the %s index", old, n - 1, self.kind)
        self.meta.update(count=self.count, bounds=bounds.tolist(), updated=_now())
        return n - old

    # ---- search
    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) raw query vectors -> (scores (n, k), ids (n, k)), best first. Scores are cosine similarities
        (higher is closer) or Euclidean distances (lower is closer). Ids of -1 mean fewer than k were found."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(f"query vectors have shape {q.shape}; this index holds {self.dim}-d vectors "
                                     f"({self.identity.backbone})")
        check_k(k, self.count)
        set_threads()
        scores, ids = self.index.search(prepare(q, self.metric), k)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))  # faiss gives squared distances
        return scores, ids

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (the FAISS index) and ``path.json`` (metadata with the sha256 of every FAISS file and of
        itself). Sharded: each sub-index to ``path.shard-k`` and the trained empty index they were cloned from to
        ``path``. All files are written beside the old ones first and renamed over them together, the sidecar
        last: a full disk or a crash leaves the previous index whole (and no temp files)."""
        path = Path(path)
        subs = sub_indexes(self.index)
        files = [path.with_name(f"{path.name}.shard-{k}") for k in range(len(subs))] if len(subs) > 1 else []
        if files and self.template is None:
            raise RuntimeError("internal: a sharded index without its trained template")
        indexes = [*subs, self.template] if files else subs
        dests = [*files, path]  # the shards, then the template (or the only index), then the sidecar
        side = sidecar(path)
        what = "any previous index there is unchanged"
        try:
            with atomic_paths([*dests, side], what=what) as tmps:
                digests = []
                for index, tmp in zip(indexes, tmps):
                    faiss.write_index(index, str(tmp))
                    digests.append(sha256_file(tmp))
                meta = {k: v for k, v in self.meta.items() if k != "meta_sha256"}
                meta.update(shard_files=[f.name for f in files],  # by role, not name: the index may be renamed
                            sha256={"index": digests[-1], "shards": digests[:-1]})
                meta["meta_sha256"] = json_sha256(meta)
                tmps[-1].write_text(json.dumps(meta))
        except DiskFullError as e:  # say how much the index takes (counted only now: it costs a serialisation)
            need = sum(_serialized_size(i) for i in indexes) + len(json.dumps(self.meta)) + 4096
            raise disk_full_error(e.filename, need, what) from None
        self.meta = meta
        for stale in path.parent.glob(f"{path.name}.shard-*"):  # a previous build with more shards
            if stale not in files and stale.name.rpartition("-")[2].isdigit():
                stale.unlink()
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchIndex:
        """Reopen an index saved by ``save`` (its sidecar and shard files beside it), search parameters set. Every
        file is checked against the checksums in the sidecar (reading it once more: about a second per GB); a
        damaged or mismatched one raises IntegrityError naming it."""
        path = Path(path)
        side = sidecar(path)
        if not path.is_file():
            raise MissingFileError(f"no search index at {str(path)!r} (build one with `probe index STORE --out "
                                    f"{path}`)")
        meta = read_sidecar(path)
        files = [path.with_name(name) for name in meta.get("shard_files") or []]
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"{str(side)!r} lists shard {str(f)!r}, which is missing (copy every "
                                        f"{path.name}.shard-* file with the index, or rebuild it)")
        if "sha256" in meta:  # indexes saved before checksums load unchecked
            recorded = meta["sha256"]
            for f, digest in zip([path, *files], [recorded["index"], *recorded["shards"]]):
                check_digest(f, digest, sha256_file(f), "its bytes", _rebuild(path, meta.get("store", "")))
        try:
            first = faiss.read_index(str(path))
            subs = [faiss.read_index(str(f)) for f in files] or [first]
        except RuntimeError as e:
            raise ProbeError(f"{str(path)!r} is not a readable FAISS index: {str(e).splitlines()[-1]}") from None
        index = combine(subs)
        if index.ntotal != len(meta["paths"]) or index.d != meta["dim"]:
            raise ProbeError(f"{str(path)!r} holds {index.ntotal} x {index.d} vectors but its metadata lists "
                             f"{len(meta['paths'])} x {meta['dim']}: the files are out of step; rebuild it")
        set_params(index, meta["params"])
        idx = cls(index, meta, first if files else None)
        idx.path = path
        return idx

    def nbytes(self) -> int:
        """Size of the index on disk (its files once saved; else serialised, which copies it)."""
        if self.path is not None:
            return sum(os.path.getsize(self.path.with_name(n)) for n in [self.path.name, *self.meta.get(
                "shard_files", [])])
        return sum(len(faiss.serialize_index(sub)) for sub in sub_indexes(self.index))

    def summary(self) -> dict[str, Any]:
        """What `probe index` reports."""
        m = self.meta
        return {"type": m["type"], "factory": m["factory"], "params": m["params"], "metric": m["metric"],
                "count": self.count, "dim": self.dim, "recall_at_10": m["recall"],
                "recall_queries": m["recall_queries"], "target_recall": m["target_recall"],
                "build_seconds": m["build_seconds"], "bytes": self.nbytes(), "shards": m.get("shards", 1),
                "store": m["store"], "backbone": self.identity.backbone, "config_key": m["config_key"]}

    def __repr__(self) -> str:
        shards = f", shards={len(sub_indexes(self.index))}" if isinstance(self.index, faiss.IndexShards) else ""
        return (f"SearchIndex({self.meta['factory']!r}, count={self.count}, dim={self.dim}, "
                f"metric={self.metric!r}{shards})")

