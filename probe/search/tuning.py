"""Recall tuning: exact ground truth for held-out queries (brute force, a block of rows at a time), recall@k, and
the walk up a search-parameter ladder until recall@10 reaches the target.

The held-out queries are store rows that are not in the index while it is tuned, so the recall measured is that of
new images, not of gallery images finding themselves. Half of them choose the parameters, the other half measure
the recall that is reported.

Example:
    >>> q = rows.take(query_ids)                                          # (nq, D) prepared
    >>> truth = knn_ground_truth(q, rows, "cosine", exclude=query_ids)    # (nq, 10) exact neighbours
    >>> tune("ivf", index, q, truth, target=0.95)["params"]               # {"nprobe": 4}
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from .factory import faiss_metric, param_ladders, set_params
from .rows import Rows

log = logging.getLogger(__name__)

RECALL_K = 10  # recall@10 is what the build promises and reports


def held_out_rows(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted held-out query rows, the other rows in random order), seeded: reproducible tuning."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_queries]), perm[n_queries:]


def knn_ground_truth(q: np.ndarray, x: np.ndarray | Rows, metric: str, k: int = RECALL_K,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids (nq, k) of prepared queries q among the rows of x (a prepared array or Rows), rows in
    ``exclude`` left out (they are not in the index being tuned), -1 where fewer exist. Brute force a block at a
    time, the blocks' top-k merged with faiss.ResultHeap: memory stays one block deep whatever the store's size
    (faiss contrib.exhaustive_search.knn_ground_truth, with store rows as ids)."""
    rows = x if isinstance(x, Rows) else Rows(x, None)
    heap = faiss.ResultHeap(len(q), k, keep_max=metric == "cosine")
    for ids, block in rows.blocks():
        if exclude is not None:
            keep = ~np.isin(ids, exclude)
            ids, block = ids[keep], block[keep]
        kk = min(k, len(ids))
        if not kk or not len(q):
            continue
        d, i = faiss.knn(q, block, kk, metric=faiss_metric(metric))  # (nq, kk): positions in the block
        heap.add_result(d, ids[i])
    heap.finalize()
    return heap.I


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


def tune(kind: str, index: faiss.Index, q: np.ndarray, truth: np.ndarray, target: float,
         k: int = RECALL_K) -> dict[str, Any]:
    """Choose the fastest search parameters whose recall@k reaches ``target`` on half the held-out queries, then
    measure recall on the other half (raising the parameter while it falls short). Leaves ``index`` set to them.

    q: (nq, D) prepared queries that are not in ``index``; truth: (nq, k) their exact neighbours in it.
    Returns {"params", "recall" (None: not measured), "queries" (how many measured it), "tried"}."""
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
