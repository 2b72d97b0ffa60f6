"""SearchIndex: a FAISS index over a feature store, saved with its id -> (path, label) mapping and the backbone
identity, tuned so that approximate search keeps recall@10 >= a target against exact search.

Files: ``INDEX`` (faiss.write_index) and ``INDEX.json`` (type, factory string, search parameters, metric, the
store's configuration + config_key, paths, labels, measured recall). Ids are store rows: row i of the store is
id i of the index, and ``add`` appends the rows a grown store has beyond those indexed.

Out of core: the store's /features are never read whole. Approximate types train on a seeded sample of rows and
add the rest ``chunk_rows`` at a time straight from HDF5, so memory is one chunk + the training sample + the index.
With ``shards`` = K the rows are split into K contiguous ranges, each its own sub-index (cloned from one trained,
empty index, so all share the coarse centroids) saved as ``INDEX.shard-k``; ``INDEX`` then holds that trained empty
index, ``INDEX.json`` lists the shard files and their row ranges, and searches go through ``faiss.IndexShards``,
which queries every shard and merges their top-k.

Example:
    >>> idx = SearchIndex.build(FeatureStore("cache/demo.h5"))        # auto: exact below 50k vectors
    >>> scores, ids = idx.search(idx.vectors([0, 1]), k=5)              # (2, 5), (2, 5)
    >>> idx.save("cache/demo.faiss")
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np

from ..errors import IndexMismatchError, MissingFileError, ProbeError
from ..identity import FeatureIdentity, Side
from ..store import FeatureStore, StoreError

log = logging.getLogger(__name__)

FORMAT = "probe-search-index"
FORMAT_VERSION = 1
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "ivfsq8")
METRICS = ("cosine", "l2")
RECALL_K = 10  # recall@10 is what the build promises and reports


@dataclass
class IndexConfig:
    type: str = "auto"  # auto: flat below `exact_below` vectors, else `approximate`
    metric: str = "cosine"  # cosine = inner product on L2-normalised vectors; l2 = Euclidean distance
    exact_below: int = 50_000  # exact search costs N·D flops per query: ~1k queries/s at 50k x 1280 on 2 cores
    approximate: str = "ivf"  # what auto picks above exact_below (see benchmarks/results/search.json)
    target_recall: float = 0.95  # recall@10 against exact search that the tuned parameters must reach
    tune_queries: int = 1000  # held-out store rows: half tune the parameters, half measure the reported recall
    nlist: int | None = None  # IVF lists; None: 4·sqrt(N), at most (training rows) / 39
    hnsw_m: int = 32  # HNSW graph degree: 32 is FAISS's usual speed/recall/memory balance
    train_per_list: int = 40  # k-means training rows per IVF list (FAISS warns below 39)
    seed: int = 0
    chunk_rows: int = 16_384  # rows read from the store per step: 80 MiB at D=1280, whatever the store's size
    shards: int = 1  # sub-indexes over contiguous row ranges, searched together through faiss.IndexShards

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ProbeError(f"unknown index type {self.type!r}: expected one of {', '.join(INDEX_TYPES)}")
        if self.approximate not in INDEX_TYPES[2:]:
            raise ProbeError(f"approximate type {self.approximate!r}: expected one of {', '.join(INDEX_TYPES[2:])}")
        if self.metric not in METRICS:
            raise ProbeError(f"unknown metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        if not 0 < self.target_recall <= 1:
            raise ProbeError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.exact_below < 0:
            raise ProbeError(f"exact_below must be >= 0, got {self.exact_below}")
        if self.chunk_rows < 1:
            raise ProbeError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.nlist is not None and self.nlist < 1:
            raise ProbeError(f"nlist must be >= 1, got {self.nlist}")
        if self.shards < 1:
            raise ProbeError(f"shards must be >= 1, got {self.shards}")


def set_threads(n: int | None = None) -> int:
    """FAISS's OpenMP threads: the cores this process may run on (not the machine's), unless told."""
    n = n or int(os.environ.get("PROBE_FAISS_THREADS", 0)) or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    return n


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """(n, D) -> contiguous float32, L2-normalised for cosine (a copy: the caller's array is not touched)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "cosine" and len(x):
        faiss.normalize_L2(x)
    return x


def _pq_shape(dim: int, ntrain: int) -> tuple[int, int]:
    """(sub-quantizers m, bits): m divides D, about D/16 dims each; 8 bits unless too few training rows."""
    m = min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: abs(d - dim / 16))
    bits = max(1, min(8, int(math.log2(max(2, ntrain // 39)))))
    return m, bits


class Rows:
    """(N, D) vectors read ``chunk_rows`` store rows at a time and prepared for ``metric`` on each read: a store's
    HDF5 /features dataset (never read whole) or an in-memory array already prepared (``metric=None``, not copied).
    ``n`` limits reading to the first n rows.

    Example:
        >>> with h5py.File("cache/big.h5") as f:
        ...     for ids, x in Rows(f["features"], "cosine").blocks():   # (b,), (b, D) L2-normalised
        ...         index.add_with_ids(x, ids)
    """

    def __init__(self, data: np.ndarray | h5py.Dataset, metric: str | None, chunk_rows: int = 16_384,
                 n: int | None = None):
        self.data, self.metric, self.chunk = data, metric, chunk_rows
        self.n = data.shape[0] if n is None else n
        self.dim = int(data.shape[1])

    def _read(self, start: int, stop: int, sel: np.ndarray | None) -> np.ndarray:
        if sel is None:
            x = self.data[start:stop]
        elif isinstance(self.data, np.ndarray) or len(sel) * 64 < stop - start:
            x = self.data[sel]  # sparse rows: h5py reads just these (sorted) rows
        else:
            x = self.data[start:stop][sel - start]  # dense: one contiguous read beats ~0.1 ms per row
        if self.metric is None:
            return x
        if isinstance(self.data, h5py.Dataset):  # a fresh array from disk: normalise it in place
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.metric == "cosine" and len(x):
                faiss.normalize_L2(x)
            return x
        return prepare(x, self.metric)

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids (b,) int64, prepared vectors (b, D)) of every row, or of the sorted ``rows``, block by block."""
        for start in range(0, self.n, self.chunk):
            stop = min(self.n, start + self.chunk)
            if rows is None:
                yield np.arange(start, stop, dtype=np.int64), self._read(start, stop, None)
                continue
            sel = rows[np.searchsorted(rows, start): np.searchsorted(rows, stop)]
            if len(sel):
                yield sel.astype(np.int64), self._read(start, stop, sel)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Prepared vectors (len(rows), D) of the sorted ``rows``: a sample, read without loading the rest."""
        parts = [x for _, x in self.blocks(rows)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """(shards + 1,) row boundaries: shard k holds store rows bounds[k] <= row < bounds[k + 1]."""
    return np.linspace(0, n, shards + 1).astype(np.int64)


def sub_indexes(index: faiss.Index) -> list[faiss.Index]:
    """The per-shard indexes of a faiss.IndexShards, or [index] for a single index."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def combine(subs: list[faiss.Index]) -> faiss.Index:
    """One index searching all of ``subs`` and merging their top-k (ids are each sub-index's own: store rows)."""
    if len(subs) == 1:
        return subs[0]
    shards = faiss.IndexShards(subs[0].d, True, False)  # threaded, successive_ids=False: keep the store rows
    for sub in subs:
        shards.add_shard(sub)  # faiss's wrapper keeps a reference: subs live as long as shards
    return shards


def factory_string(kind: str, n: int, dim: int, cfg: IndexConfig, trainable: int | None = None) -> tuple[str, int]:
    """FAISS index_factory string for ``kind`` over n vectors, and how many of the ``trainable`` rows (default
    all n) it trains on."""
    trainable = n if trainable is None else trainable
    if kind == "flat":
        return "Flat", 0
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat", 0
    nlist = cfg.nlist or max(1, int(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, trainable // 39))  # k-means wants >= 39 points per centroid
    ntrain = min(trainable, nlist * cfg.train_per_list)
    if kind == "ivf":
        return f"IVF{nlist},Flat", ntrain
    if kind == "ivfsq8":
        return f"IVF{nlist},SQ8", ntrain
    if kind == "ivfpq":  # PQ codes scanned fast, the top k·k_factor re-ranked exactly (RFlat); np: no slow
        # polysemous training (only used for Hamming filtering, which we do not use)
        m, bits = _pq_shape(dim, ntrain)
        return f"IVF{nlist},PQ{m}x{bits}np,RFlat", max(ntrain, min(trainable, 39 * 2 ** bits))
    raise ProbeError(f"unknown index type {kind!r}: expected one of {', '.join(INDEX_TYPES)}")


def param_ladders(kind: str, index: faiss.Index) -> list[list[dict[str, int]]]:
    """Search parameters to try, each ladder from fastest to most exact: tuning walks a ladder until the target."""
    if kind == "hnsw":
        return [[{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)]]
    if kind in ("ivf", "ivfsq8", "ivfpq"):
        nlist = faiss.extract_index_ivf(sub_indexes(index)[0]).nlist
        probes = sorted({p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
                         if p < nlist} | {nlist})
        if kind != "ivfpq":
            return [[{"nprobe": p} for p in probes]]
        return [[{"nprobe": p, "k_factor_rf": f} for p in probes] for f in (2, 4, 8, 16)]
    return []


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def recall_at(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray, k: int = RECALL_K) -> float:
    """Mean |found ∩ truth| / k over queries, each query's own id removed from both lists first (it is in the
    gallery, and finding itself would flatter the index). found, truth: (n, k+1) ids."""
    hits, total = 0, 0
    for f, t, q in zip(found, truth, query_ids):
        t = [i for i in t if i != q and i >= 0][:k]
        f = [i for i in f if i != q and i >= 0][:k]
        hits += len(set(f) & set(t))
        total += len(t)
    return hits / total if total else 1.0


def _timed_search(index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    _, ids = index.search(q, k)
    return ids, time.perf_counter() - t


def held_out_truth(q: np.ndarray, x: np.ndarray | Rows, metric: str, exclude: np.ndarray | None = None,
                   k: int = RECALL_K) -> np.ndarray:
    """Exact top-k ids (nq, k) of queries q among the rows of x (an array or Rows), rows in ``exclude`` left out
    (they are not in the index being tuned), -1 where fewer exist. Brute force a block at a time, the blocks'
    top-k merged with faiss.ResultHeap: memory stays one block deep whatever the store's size."""
    rows = x if isinstance(x, Rows) else Rows(x, None)
    heap = faiss.ResultHeap(len(q), k, keep_max=metric == "cosine")
    for ids, block in rows.blocks():
        if exclude is not None:
            keep = ~np.isin(ids, exclude)
            ids, block = ids[keep], block[keep]
        kk = min(k, len(ids))
        if not kk or not len(q):
            continue
        d, i = faiss.knn(q, block, kk, metric=_faiss_metric(metric))  # (nq, kk): positions in the block
        heap.add_result(d, ids[i])
    heap.finalize()
    return heap.I


def tune(kind: str, index: faiss.Index, q: np.ndarray, truth: np.ndarray, target: float,
         k: int = RECALL_K) -> dict[str, Any]:
    """Choose the fastest search parameters whose recall@k reaches ``target`` on half the held-out queries, then
    measure recall on the other half (raising the parameter while it falls short).

    q: (nq, D) prepared queries that are not in ``index``; truth: (nq, k) their exact neighbours in it."""
    ladders = param_ladders(kind, index)
    if not ladders or len(q) < 2:
        return {"params": {}, "recall": 1.0 if kind == "flat" else None, "queries": 0, "tried": []}
    half = len(q) // 2
    none = np.full(len(q), -1)
    tune_q, report_q = slice(0, half), slice(half, None)
    tried, where, best = [], [], None  # best: (seconds, ladder, step)
    for li, ladder in enumerate(ladders):
        for si, params in enumerate(ladder):
            set_params(index, params)
            ids, s = _timed_search(index, q[tune_q], k)
            r = recall_at(ids, truth[tune_q], none[tune_q], k)
            tried.append({**params, "recall": round(r, 4), "qps": round(half / max(s, 1e-9), 1)})
            where.append((li, si))
            if r >= target:
                if best is None or s < best[0]:
                    best = (s, li, si)
                break
    if best is None:  # even the most exact setting fell short (e.g. PQ with too few re-ranked candidates)
        top = max(range(len(tried)), key=lambda i: tried[i]["recall"])
        log.warning("no setting reached recall@%d %.2f; using the best found (%.3f)", k, target, tried[top]["recall"])
        li, si = where[top]
    else:
        _, li, si = best
    while True:  # the reported recall comes from queries the choice above never saw
        set_params(index, ladders[li][si])
        ids, _ = _timed_search(index, q[report_q], k)
        r = recall_at(ids, truth[report_q], none[report_q], k)
        if r >= target or si == len(ladders[li]) - 1:
            break
        si += 1
    return {"params": ladders[li][si], "recall": round(r, 4), "queries": len(q) - half, "tried": tried}


def _split_rows(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out query rows, the other rows in random order), seeded: reproducible tuning."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_queries]), perm[n_queries:]


def _add_rows(subs: list[faiss.Index], bounds: np.ndarray, rows: Rows, which: np.ndarray | None = None) -> None:
    """Add the sorted rows ``which`` (default all) of ``rows``, a block at a time, each to the sub-index whose
    range in ``bounds`` holds it, with ids = store rows."""
    for ids, x in rows.blocks(which):
        shard = np.searchsorted(bounds, ids, side="right") - 1  # (b,) blocks are sorted: shards are runs
        for k in np.unique(shard):
            m = shard == k
            subs[k].add_with_ids(x[m], ids[m])


def build_faiss(x: np.ndarray | Rows, cfg: IndexConfig) -> tuple[faiss.Index, str, dict[str, Any], int]:
    """Build, train and tune a FAISS index over x: an (N, D) array already ``prepare``d for cfg.metric (not
    copied), or Rows reading a store chunk by chunk. Returns (index with tuned parameters set, type, tuning result
    incl. "factory" and "bounds" (the shards' row ranges), rows trained on). With cfg.shards > 1 the index is a
    faiss.IndexShards of IndexIDMap2 sub-indexes, one per contiguous row range.

    The held-out query rows are neither trained on nor in the index while it is tuned (they are added last), so
    the recall measured is that of new images, not of gallery images finding themselves. Only the training sample
    (ntrain, D) and the queries (nq, D) are ever held besides one block and the index."""
    set_threads()
    t0 = time.perf_counter()
    rows = x if isinstance(x, Rows) else Rows(x, None, cfg.chunk_rows)
    n, dim = rows.n, rows.dim
    kind = cfg.type if cfg.type != "auto" else ("flat" if n < cfg.exact_below else cfg.approximate)
    nq = min(cfg.tune_queries, n // 5) if kind != "flat" else 0  # keep >= 80% of rows for training
    query_ids, rest = _split_rows(n, nq, cfg.seed)
    factory, ntrain = factory_string(kind, n, dim, cfg, trainable=len(rest))
    empty = faiss.IndexIDMap2(faiss.index_factory(dim, factory, _faiss_metric(cfg.metric)))  # ids = store rows
    if ntrain:
        log.info("training %s on %d of %d rows", factory, ntrain, n)
        empty.train(rows.take(np.sort(rest[:ntrain])))  # (ntrain, D): a sample, read by row index
        faiss.extract_index_ivf(empty).make_direct_map()  # reconstruct(id): query by id/path without the store
    bounds = shard_bounds(n, cfg.shards)
    subs = [empty] if cfg.shards == 1 else [faiss.clone_index(empty) for _ in range(cfg.shards)]
    del rest
    _add_rows(subs, bounds, rows, np.setdiff1d(np.arange(n), query_ids) if nq else None)
    index = combine(subs)
    log.info("added %d x %d to %s (%d shards) in %.1fs", n - nq, dim, factory, len(subs), time.perf_counter() - t0)
    q = rows.take(query_ids)  # (nq, D)
    tuned = tune(kind, index, q, held_out_truth(q, rows, cfg.metric, exclude=query_ids), cfg.target_recall)
    _add_rows(subs, bounds, rows, query_ids)
    if len(subs) > 1:
        index.syncWithSubIndexes()  # rows were added to the shards directly: refresh the total
    set_params(index, tuned["params"])
    extra = {"template": empty} if len(subs) > 1 else {}  # the trained empty index every shard was cloned from
    return index, kind, {**tuned, "factory": factory, "bounds": bounds.tolist(), **extra}, ntrain


class SearchIndex:
    """A FAISS index whose ids are store rows, with the metadata that makes its hits readable and its queries
    safe (backbone identity). Build with ``SearchIndex.build(store)``, reopen with ``SearchIndex.load(path)``."""

    def __init__(self, index: faiss.Index, meta: dict[str, Any], template: faiss.Index | None = None):
        self.index = index
        self.meta = meta
        self.template = template  # sharded: the trained, empty index the shards were cloned from
        self.path: Path | None = None  # where it was saved or loaded from

    # ---- identity and mapping
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
        """Shard k holds store rows bounds[k] <= row < bounds[k + 1] (one shard: [0, count])."""
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

    @property
    def config(self) -> dict[str, Any]:
        """The store's backbone configuration: query images must be embedded with exactly this."""
        return self.meta["store_config"]

    @property
    def identity(self) -> FeatureIdentity:
        """What made the indexed vectors."""
        return FeatureIdentity.from_config(self.meta["store_config"])

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
        subs, bounds = sub_indexes(self.index), np.asarray(self.bounds)
        shard = np.minimum(np.searchsorted(bounds, ids, side="right") - 1, len(subs) - 1)  # the last one grows
        return np.stack([subs[k].reconstruct(i) for i, k in zip(ids, shard)])

    # ---- build / add
    @classmethod
    def build(cls, store: FeatureStore | str | os.PathLike, config: IndexConfig | None = None) -> SearchIndex:
        """Index every row of ``store``. ``auto`` picks exact search for small stores, else a tuned approximate
        index whose recall@10 on held-out queries is recorded in ``meta["recall"]``. The store is read
        ``config.chunk_rows`` rows at a time (a sample for training): it need not fit in memory."""
        cfg = config or IndexConfig()
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        if store.count == 0:
            raise StoreError(f"store {str(store.path)!r} has no rows: nothing to index (extract a folder with "
                             "images into it first)")
        if cfg.shards > store.count:
            raise ProbeError(f"shards={cfg.shards} is more than the store's {store.count} rows")
        t0 = time.perf_counter()
        with h5py.File(store.path, "r") as f:
            index, kind, tuned, ntrain = build_faiss(Rows(f["features"], cfg.metric, cfg.chunk_rows), cfg)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "type": kind, "requested_type": cfg.type,
            "factory": tuned["factory"], "params": tuned["params"], "metric": cfg.metric, "dim": store.dim,
            "count": store.count, "shards": cfg.shards, "shard_files": [], "bounds": tuned["bounds"],
            "recall": tuned["recall"], "recall_k": RECALL_K, "recall_queries": tuned["queries"],
            "target_recall": cfg.target_recall, "tuning": tuned["tried"], "trained_on": ntrain,
            "build_seconds": round(time.perf_counter() - t0, 3), "config": asdict(cfg),
            "store": str(Path(store.path).resolve()), "store_config": store.identity.to_dict(),
            "config_key": store.feature_key, "root": str(store.attrs.get("root", "")),
            "classes": list(store.classes), "paths": store.paths().tolist(), "labels": store.labels().tolist(),
            "created": now, "updated": now,
        }
        return cls(index, meta, tuned.get("template"))

    def check_store(self, store: FeatureStore) -> None:
        """Raise IndexMismatchError, naming the differing fields, when ``store`` has another backbone config."""
        self.identity.check(store.identity, mine="index", theirs=Side("store", str(store.path)), features_only=True,
                            fix="Build a new index for it: probe index STORE --out OTHER.faiss")

    def add(self, store: FeatureStore | str | os.PathLike, retune: bool = True) -> int:
        """Add the rows ``store`` has beyond those indexed (a grown store); returns how many. No retraining: IVF
        lists keep their centroids. Approximate types first re-tune their search parameters with (up to
        ``tune_queries``) new rows as held-out queries against the indexed gallery, then add them."""
        store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.check_store(store)
        old = self.count
        paths = store.paths()
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
        n = len(paths)
        new = np.arange(old, n)
        cfg = IndexConfig(**self.meta["config"])
        nq = min(cfg.tune_queries, len(new))
        subs = sub_indexes(self.index)
        bounds = np.asarray(self.bounds[:-1] + [n])  # the last shard takes the new rows
        with h5py.File(store.path, "r") as f:
            rows = Rows(f["features"], self.metric, cfg.chunk_rows)
            if retune and self.kind != "flat" and nq >= 20:  # new rows, before they are added, are held-out queries
                q = rows.take(np.sort(np.random.default_rng(cfg.seed).choice(new, nq, replace=False)))  # (nq, D)
                truth = held_out_truth(q, Rows(rows.data, self.metric, cfg.chunk_rows, n=old), self.metric)
                tuned = tune(self.kind, self.index, q, truth, cfg.target_recall)
                set_params(self.index, tuned["params"])
                self.meta.update(params=tuned["params"], recall=tuned["recall"], recall_queries=tuned["queries"],
                                 tuning=tuned["tried"])
            _add_rows(subs, bounds, rows, new)
        if len(subs) > 1:
            self.index.syncWithSubIndexes()
        log.info("added rows %d..%d to the %s index", old, n - 1, self.kind)
        self.meta.update(count=self.count, bounds=bounds.tolist(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
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
                                     f"({self.config.get('backbone')})")
        check_k(k, self.count)
        set_threads()
        scores, ids = self.index.search(prepare(q, self.metric), k)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))  # faiss gives squared distances
        return scores, ids

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (the FAISS index) and ``path.json`` (metadata), each atomically. Sharded: each
        sub-index to ``path.shard-k`` and the trained empty index they were cloned from to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        subs = sub_indexes(self.index)
        files = [path.with_name(f"{path.name}.shard-{k}") for k in range(len(subs))] if len(subs) > 1 else []
        if files and self.template is None:
            raise RuntimeError("internal: a sharded index without its trained template")
        for index, dest in zip([self.template, *subs] if files else subs, [path, *files]):
            tmp = dest.with_name(dest.name + ".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, dest)
        for stale in path.parent.glob(f"{path.name}.shard-*"):  # a previous build with more shards
            if stale not in files and stale.name.rpartition("-")[2].isdigit():
                stale.unlink()
        self.meta["shard_files"] = [f.name for f in files]
        side = sidecar(path)
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, side)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchIndex:
        path = Path(path)
        side = sidecar(path)
        if not path.is_file():
            raise MissingFileError(f"no search index at {str(path)!r} (build one with `probe index STORE --out "
                                    f"{path}`)")
        if not side.is_file():
            raise ProbeError(f"{str(path)!r} has no metadata file {str(side)!r}: it was not saved by probe "
                             "(rebuild with `probe index`)")
        meta = json.loads(side.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ProbeError(f"{str(side)!r} is not a probe search index of version {FORMAT_VERSION} "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        files = [path.with_name(name) for name in meta.get("shard_files") or []]
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"{str(side)!r} lists shard {str(f)!r}, which is missing (copy every "
                                        f"{path.name}.shard-* file with the index, or rebuild it)")
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
                "store": m["store"], "backbone": self.config.get("backbone"), "config_key": m["config_key"]}

    def __repr__(self) -> str:
        shards = f", shards={len(sub_indexes(self.index))}" if isinstance(self.index, faiss.IndexShards) else ""
        return (f"SearchIndex({self.meta['factory']!r}, count={self.count}, dim={self.dim}, "
                f"metric={self.metric!r}{shards})")


def check_k(k: int, gallery: int) -> None:
    if k < 1:
        raise ProbeError(f"k must be >= 1, got {k}")
    if k > gallery:
        raise ProbeError(f"k={k} is larger than the gallery ({gallery} images): pass -k {gallery} or less")


def sidecar(path: str | os.PathLike) -> Path:
    """INDEX -> INDEX.json, the metadata beside a FAISS index file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_index_path(store_path: str | os.PathLike) -> Path:
    """cache/x.h5 -> cache/x.faiss: next to the store."""
    return Path(store_path).with_suffix(".faiss")



def index_store(store: str | os.PathLike, out: str | os.PathLike | None = None, config: IndexConfig | None = None,
                update: bool = False, metric: str | None = None) -> dict[str, Any]:
    """`probe index`: build an index of ``store`` and save it (default: beside the store), or with ``update``
    add the rows the store gained since. Returns the index summary plus ``index``, ``added`` and ``action``."""
    cfg = config or IndexConfig(metric=metric or "cosine")
    out = Path(out) if out else default_index_path(store)
    if update and out.is_file():
        idx = SearchIndex.load(out)
        if cfg.type != "auto" and cfg.type != idx.kind:
            raise ProbeError(f"--update keeps the index type: {str(out)!r} is {idx.kind!r}, --type says "
                             f"{cfg.type!r} (drop --update to rebuild as {cfg.type!r})")
        if metric and metric != idx.metric:
            raise ProbeError(f"--update keeps the metric: {str(out)!r} uses {idx.metric!r}, --metric says "
                             f"{metric!r} (drop --update to rebuild)")
        added = idx.add(store)
        action = "updated"
    else:
        if update:
            log.info("no index at %s yet: building it", out)
        idx = SearchIndex.build(store, cfg)
        added, action = idx.count, "built"
    idx.save(out)
    return {"index": str(out), "action": action, "added": added, **idx.summary()}
