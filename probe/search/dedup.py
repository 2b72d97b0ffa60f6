"""Near-duplicate groups in a store: every pair with cosine similarity >= a threshold, joined into groups.

``near_pairs`` is the one search behind `probe dedup` and `probe doctor`: exact (FAISS range search on normalised
vectors, in blocks of queries; N²·D flops, seconds for tens of thousands of images on a CPU) while the store is
within the flat-index size (``IndexConfig.exact_below``), above it the search module's tuned approximate index
(``build_faiss``): each row's k nearest neighbours above the threshold, plus a range search for the rows whose k
are all duplicates. The approximate index's recall@10, measured on held-out rows while it is tuned, is reported
with the result; the recall of pairs is not measured (benchmarks/results/dedup.json has it on synthetic data).

Example:
    >>> out = find_duplicates("cache/photos.h5", threshold=0.95)
    >>> out["groups"][0]["paths"]          # ["a.jpg", "copy of a.jpg"]
    >>> out["search"]                      # {"method": "exact"} or {"method": "approximate", "index": ...}
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..errors import ProbeError
from ..store import FeatureStore, StoreError
from .config import IndexConfig
from .factory import set_threads
from .faiss_index import build_faiss
from .rows import Rows, prepare

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95  # cosine: re-encodes, resizes and small crops of one photo; distinct shots score lower
NEIGHBOURS = 10  # approximate search: nearest neighbours per row; a row whose k are all duplicates gets a range search


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def _below(threshold: float) -> float:
    """The float32 just under ``threshold``: FAISS's range search keeps similarities strictly above its radius."""
    return float(np.nextafter(np.float32(threshold), -1))


def duplicate_pairs(x: np.ndarray | Rows, threshold: float, block: int = 4096,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (m, 2) with i < j, their cosine similarities (m,)) among rows of x with cosine >= threshold, by exact
    search over all pairs. x: an (N, D) array (normalised here, a copy) or Rows reading normalised blocks of a store.
    ``progress``: a bar on stderr over the rows searched."""
    rows = Rows(prepare(x, "cosine"), None, block) if isinstance(x, np.ndarray) else x
    index = faiss.IndexFlatIP(rows.dim)
    for _, b in rows.blocks():
        index.add(b)
    pairs, sims = [], []
    with tqdm(total=rows.n, unit="row", disable=not progress, desc="near-duplicates", mininterval=0.5,
              dynamic_ncols=True) as bar:
        for first, b in rows.blocks():
            for s in range(0, len(b), block):
                lims, d, j = index.range_search(b[s: s + block], _below(threshold))
                i = np.repeat(first[s: s + len(lims) - 1], np.diff(lims).astype(np.int64))  # query row per result
                keep = (i < j) & (d >= threshold)  # each pair once, never a row with itself
                pairs.append(np.stack([i[keep], j[keep]], 1))
                sims.append(d[keep])
                bar.update(len(lims) - 1)
    return np.concatenate(pairs), np.concatenate(sims)


@dataclass
class NearPairs:
    """What ``near_pairs`` found: pairs (m, 2) with i < j and their cosine similarities (m,); ``search``, how
    (``{"method": "exact"}``, or the approximate index's type, factory, parameters and measured recall@10); the k+1
    nearest neighbours of every row, (N, k+1) similarities and ids (the row itself usually first, -1 where the
    index found fewer), when asked for or searched."""

    pairs: np.ndarray
    sims: np.ndarray
    search: dict[str, Any]
    knn_sims: np.ndarray | None = None
    knn_ids: np.ndarray | None = None


def near_pairs(x: np.ndarray | Rows, threshold: float, k: int = NEIGHBOURS, exact: bool | None = None,
               neighbours: bool = False, progress: bool = False, desc: str = "near-duplicates") -> NearPairs:
    """Every pair of rows of x with cosine >= threshold: exact while x is within the flat-index size
    (``IndexConfig.exact_below``; ``exact=True``/``False`` forces one way), else from the tuned approximate index:
    the k nearest neighbours of each row above the threshold, plus a range search for rows whose k+1 neighbours
    are all above it. x: an (N, D) array already L2-normalised, or Rows reading normalised blocks of a store.
    ``neighbours``: also every row's k+1 nearest neighbours (the exact path then searches them in a flat index).
    ``progress``: bars on stderr over the rows added to an approximate index (it waits at 0 while the index
    trains) and the rows whose neighbours are searched (``desc``)."""
    cfg = IndexConfig(metric="cosine")
    rows = x if isinstance(x, Rows) else Rows(x, None, cfg.chunk_rows)
    exact = rows.n < cfg.exact_below if exact is None else exact
    if exact and not neighbours:
        pairs, sims = duplicate_pairs(x, threshold, progress=progress)
        return NearPairs(pairs, sims, {"method": "exact"})
    cfg = replace(cfg, type="flat" if exact else cfg.approximate)
    index, kind, tuned, _ = build_faiss(rows, cfg, progress and not exact)
    n, kk, step = rows.n, min(k + 1, rows.n), cfg.chunk_rows
    if not exact:
        log.info("%s %s: recall@10 %s on %d held-out rows; searching the %d nearest neighbours of %d rows",
                 tuned["factory"], tuned["params"], tuned["recall"], tuned["queries"], k, n)
    knn_sims, knn_ids = np.zeros((n, kk), np.float32), np.zeros((n, kk), np.int64)  # (N, k+1)
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] < step // 2:
        starts.pop()  # no short last block: every block takes faiss's BLAS path, as one search of all rows did
    with tqdm(total=n, unit="row", disable=not progress, desc=desc, mininterval=0.5, dynamic_ncols=True) as bar:
        for s, e in zip(starts, starts[1:] + [n]):
            knn_sims[s:e], knn_ids[s:e] = index.search(rows.take(np.arange(s, e)), kk)
            bar.update(e - s)
    if exact:
        pairs, sims = duplicate_pairs(x, threshold)
        return NearPairs(pairs, sims, {"method": "exact"}, knn_sims, knn_ids)
    i = np.repeat(np.arange(n), kk)
    j, s = knn_ids.ravel(), knn_sims.ravel()
    full = np.flatnonzero(knn_sims[:, -1] >= threshold)  # all k+1 neighbours are duplicates: there may be more
    if len(full):
        lims, rs, rj = index.range_search(rows.take(full), _below(threshold))
        i = np.r_[i, np.repeat(full, np.diff(lims).astype(np.int64))]
        j, s = np.r_[j, rj], np.r_[s, rs]
    keep = (j >= 0) & (i != j) & (s >= threshold)
    a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    pairs, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    search = {"method": "approximate", "type": kind, "index": tuned["factory"], "params": tuned["params"],
              "neighbours": k, "range_searched": len(full), "recall_at_10": tuned["recall"],
              "recall_queries": tuned["queries"]}
    return NearPairs(pairs, s[keep][first], search, knn_sims, knn_ids)


def find_duplicates(store: FeatureStore | str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
                    exact: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Groups (size >= 2) of rows whose vectors are within ``threshold`` cosine similarity, linked transitively;
    largest group first. Each group lists ids, paths, labels and its lowest linking similarity. The search is exact
    within the flat-index size, else approximate (``near_pairs``); ``exact``: True or False forces one way, None
    chooses by size; ``search`` in the result says which ran. The store is read a chunk of rows at a time.
    ``progress``: bars on stderr over the rows searched (and the rows added to an approximate index)."""
    if not -1 <= threshold <= 1:
        raise ProbeError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if store.count == 0:
        raise StoreError(f"store {str(store.path)!r} has no rows: nothing to deduplicate")
    set_threads()
    with store.open() as f:
        found = near_pairs(Rows(f["features"], "cosine", IndexConfig().chunk_rows, n=store.count), threshold,
                           exact=exact, progress=progress)
    pairs, sims = found.pairs, found.sims
    parent = np.arange(store.count)
    for a, b in pairs:
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(store.count)])
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        members.setdefault(int(r), []).append(i)
    low: dict[int, float] = {}
    for (a, _), s in zip(pairs, sims):
        r = int(roots[a])
        low[r] = min(low.get(r, 1.0), float(s))
    paths, labels, classes = store.paths(), store.labels(), store.classes
    groups = [{"ids": ids, "paths": [paths[i] for i in ids],
               "labels": [classes[labels[i]] if labels[i] >= 0 else None for i in ids],
               "min_similarity": round(low[r], 6)}
              for r, ids in members.items() if len(ids) > 1]
    groups.sort(key=lambda g: (-len(g["ids"]), g["ids"][0]))
    log.info("%d near-duplicate pairs in %d groups among %d rows", len(pairs), len(groups), store.count)
    return {"store": str(store.path), "threshold": threshold, "count": store.count, "search": found.search,
            "pairs": len(pairs), "duplicates": sum(len(g["ids"]) - 1 for g in groups),
            "root": str(store.attrs.get("root", "")), "groups": groups}
