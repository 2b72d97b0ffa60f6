"""Near-duplicate groups in a store: every pair with cosine similarity >= a threshold, joined into groups.

``near_pairs`` is the one search behind `probe dedup` and `probe doctor`: exact (FAISS range search on normalised
vectors, in blocks of queries; N²·D flops, seconds for tens of thousands of images on a CPU) while the store is
within the flat-index size (``IndexConfig.exact_below``), above it an IVF index of the rows searched with every row
as a query: each row's k nearest neighbours above the threshold, plus a range search for the rows whose k are all
duplicates. The lists each row probes are chosen for the pairs, not for nearest neighbours: enough that a pair at
exactly the threshold is found with estimated probability ``PAIR_RECALL`` (``pair_probes``, on synthetic pairs made
from the store), which at cosine 0.95 is a few lists where recall@10 would take dozens. The search is FAISS's
big-batch search (queries bucketed by list, one BLAS product per list), not one search per row: 1M × 1280 rows in
minutes, not hours.

Example:
    >>> out = find_duplicates("cache/photos.h5", threshold=0.95)
    >>> out["groups"][0]["paths"]          # ["a.jpg", "copy of a.jpg"]
    >>> out["search"]                      # {"method": "exact"} or {"method": "approximate", "index": ...}
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..errors import ProbeError
from ..store import FeatureStore, StoreError
from .config import IndexConfig
from .factory import nprobe_ladder, set_threads
from .faiss_index import build_faiss
from .rows import Rows, prepare

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95  # cosine: re-encodes, resizes and small crops of one photo; distinct shots score lower
NEIGHBOURS = 10  # approximate search: nearest neighbours per row; a row whose k are all duplicates gets a range search
PAIR_RECALL = 0.99  # approximate search: the share of pairs at exactly the threshold it should find (estimated)
SYNTHETIC_PAIRS = 2000  # pairs the estimate is made on: +-0.5% at 0.99
SEARCH_ROWS = 131_072  # queries per pass of the big-batch search over the lists: 640 MiB at D=1280


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def _below(threshold: float) -> float:
    """The float32 just under ``threshold``: FAISS's range search keeps similarities strictly above its radius."""
    return float(np.nextafter(np.float32(threshold), -1))


def duplicate_pairs(x: np.ndarray | Rows, threshold: float, block: int = 4096, progress: bool = False,
                    index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (m, 2) with i < j, their cosine similarities (m,)) among rows of x with cosine >= threshold, by exact
    search over all pairs. x: an (N, D) array (normalised here, a copy) or Rows reading normalised blocks of a store.
    ``progress``: a bar on stderr over the rows searched. ``index``: an exact inner-product index already holding
    x's rows with their row numbers as ids (``near_pairs`` has one for the neighbours), searched instead of a new
    one."""
    rows = Rows(prepare(x, "cosine"), None, block) if isinstance(x, np.ndarray) else x
    if index is None:
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
    (``{"method": "exact"}``, or the approximate index's type, factory, nprobe, estimated pair recall and, when
    tuned for neighbours, measured recall@10); the k+1 nearest neighbours of every row, (N, k+1) similarities and
    ids (the row itself usually first, -1 where the index found fewer), when asked for or searched."""

    pairs: np.ndarray
    sims: np.ndarray
    search: dict[str, Any]
    knn_sims: np.ndarray | None = None
    knn_ids: np.ndarray | None = None


def self_join_lists(n: int) -> int:
    """IVF lists for a search of every row against all rows: 2·sqrt(N). Training costs nlist² and each row's search
    nprobe·N/nlist, so fewer lists than an index for outside queries (4·sqrt(N)): in a prototype of this search at
    1M × 1280 (2 cores), 2,000 lists found the planted pairs in 107 s of k-means, assignment and per-list products
    where 4,000 lists took 172 s."""
    return max(1, int(2 * math.sqrt(n)))


def pair_probes(quantizer: faiss.Index, rows: Rows, threshold: float, target: float = PAIR_RECALL,
                pairs: int = SYNTHETIC_PAIRS, seed: int = 0) -> tuple[int, float, int]:
    """(nprobe, estimated pair recall, pairs estimated on): the fewest IVF lists each row must probe for a pair at
    exactly ``threshold`` to be found from one of its ends with probability >= ``target``. Estimated with the
    coarse quantizer alone, on synthetic pairs from the store: sampled rows x, each with a partner y turned from
    x towards another sampled row until cos(x, y) = threshold. The pair is found when y's list is among x's nprobe
    nearest, or x's among y's. Pairs closer than the threshold fall in the same or nearer lists more often."""
    nlist, n = quantizer.ntotal, rows.n
    m = min(pairs, n // 2)
    if m < 1 or threshold >= 1:
        return 1, 1.0, 0
    rng = np.random.default_rng([seed, 1])  # not the stream build_faiss draws its k-means sample from: rows that
    pick = rng.permutation(n)[: 2 * m]  # trained the centroids sit nearer them, and would flatter the estimate
    x = rows.take(np.sort(pick[:m]))  # (m, D) normalised
    z = rows.take(np.sort(pick[m:]))[rng.permutation(m)]  # (m, D): random partners
    d = z - (z * x).sum(1, keepdims=True) * x  # (m, D) the part of z orthogonal to x
    norm = np.linalg.norm(d, axis=1)
    x, d = x[norm > 1e-6], d[norm > 1e-6] / norm[norm > 1e-6, None]  # parallel rows give no direction
    y = np.ascontiguousarray(threshold * x + math.sqrt(max(0.0, 1 - threshold ** 2)) * d, np.float32)
    ladder = nprobe_ladder(nlist)  # the same steps as the index's own tuning
    top = ladder[-2] if len(ladder) > 1 else 1  # the most lists short of all of them
    _, ax = quantizer.search(x, top)  # (m, top) each end's nearest lists, nearest first
    _, ay = quantizer.search(y, top)
    for p in ladder:
        found = ((ax[:, :p] == ay[:, :1]).any(1) | (ay[:, :p] == ax[:, :1]).any(1)).mean() if p < nlist else 1.0
        if found >= target:
            break
    return p, round(float(found), 4), len(x)


def add_assigned(ivf: faiss.Index, rows: Rows, nprobe: int, bar: tqdm | None = None) -> np.ndarray:
    """Add every row of ``rows`` to the trained, empty IVF index ``ivf`` (ids: store rows), each to its nearest
    list, and return (N, nprobe) int64: the lists each row probes, nearest first. One coarse search per row serves
    the add and ``batch_knn``, where adding the usual way would search the centroids again (index and search of
    500k x 1280 rows, 1,414 lists, 2 AVX2 cores: 47.3 s against 60.9 s, benchmarks/bench_dedup_assign.py).
    ``bar`` counts the rows added."""
    from faiss.contrib.ivf_tools import add_preassigned

    assert ivf.ntotal == 0, ivf.ntotal  # sequential ids are store rows
    assign = np.empty((rows.n, nprobe), np.int64)
    for ids, x in rows.blocks():
        _, assign[ids] = ivf.quantizer.search(x, nprobe)  # (b, nprobe)
        add_preassigned(ivf, x, np.ascontiguousarray(assign[ids, 0]))
        if bar is not None:
            bar.update(len(ids))
    return assign


def batch_knn(index: faiss.Index, rows: Rows, k: int, nprobe: int, bar: tqdm | None = None,
              step: int = SEARCH_ROWS, assign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every row of ``rows`` in an IVF-Flat ``index`` of those rows (ids: store rows,
    or IndexIDMap2-wrapped), probing nprobe lists: (N, k) similarities and ids (store rows, -1 where fewer were
    found). FAISS's big-batch search: a block of queries is bucketed by the lists it probes, and each list is
    matched against its queries in one BLAS product (faiss.contrib.big_batch_search), where a search per query
    would re-read the lists from memory for every row (about 10x slower at 1M rows). ``bar`` counts the rows
    searched; ``assign`` (N, nprobe): each row's lists when already known (``add_assigned``)."""
    from faiss.contrib.big_batch_search import BigBatchSearcher, BlockComputer

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFFlat: what the big-batch search takes
    wrapper = faiss.downcast_index(index)
    to_row = faiss.vector_to_array(wrapper.id_map) if isinstance(wrapper, faiss.IndexIDMap2) else np.arange(
        ivf.ntotal)  # the IVF's own ids -> store rows
    comp = BlockComputer(ivf, method="knn_function")
    sims, ids = np.zeros((rows.n, k), np.float32), np.full((rows.n, k), -1, np.int64)
    for s in range(0, rows.n, step):
        e = min(rows.n, s + step)
        xq = rows.span(s, e)  # (b, D) normalised queries
        lists = ivf.quantizer.search(xq, nprobe)[1] if assign is None else assign[s:e]  # (b, nprobe) probed lists
        bbs = BigBatchSearcher(ivf, xq, k)  # its loop without the per-list report it prints to stdout
        bbs.decode_func, bbs.by_residual = comp.decode_func, comp.by_residual
        bbs.q_assign = lists.astype(np.int32)
        bbs.reorder_assign()
        for lst in range(ivf.nlist):
            q, xq_l, list_ids, xb_l = bbs.prepare_bucket(lst)
            d, i = comp.block_search(xq_l, xb_l, list_ids, k)
            if i is not None:
                i = np.where(i >= 0, i, 0)  # faiss.knn pads a short list with -1, which would index from the end;
                # those slots keep -FLT_MAX and are dropped below
            bbs.add_results_to_heap(q, d, list_ids, i)
            if bar is not None:
                bar.update(s + (e - s) * (lst + 1) // ivf.nlist - bar.n)
        bbs.rh.finalize()
        got = bbs.rh.D > -2  # cosine >= -1: the rest are empty slots
        sims[s:e] = np.where(got, bbs.rh.D, 0)
        ids[s:e] = np.where(got, to_row[np.where(got, bbs.rh.I, 0)], -1)
    return sims, ids


def near_pairs(x: np.ndarray | Rows, threshold: float, k: int = NEIGHBOURS, exact: bool | None = None,
               neighbours: bool = False, progress: bool = False, desc: str = "near-duplicates",
               pair_recall: float = PAIR_RECALL) -> NearPairs:
    """Every pair of rows of x with cosine >= threshold: exact while x is within the flat-index size
    (``IndexConfig.exact_below``; ``exact=True``/``False`` forces one way), else approximate: an IVF index of the
    rows (``self_join_lists``), each row's k+1 nearest neighbours by FAISS's big-batch search (``batch_knn``) probing
    enough lists for ``pair_recall`` of the pairs at the threshold (``pair_probes``), plus a range search for rows
    whose k+1 neighbours are all above it. x: an (N, D) array already L2-normalised, or Rows reading normalised
    blocks of a store. ``neighbours``: also every row's k+1 nearest neighbours (the exact path then searches them in
    a flat index; the approximate one also probes enough lists for recall@10 >= 0.95, tuned on held-out rows).
    ``progress``: bars on stderr over the rows added to an approximate index (it waits at 0 while the index
    trains) and the rows whose neighbours are searched (``desc``)."""
    cfg = IndexConfig(metric="cosine")
    rows = x if isinstance(x, Rows) else Rows(x, None, cfg.chunk_rows)
    exact = rows.n < cfg.exact_below if exact is None else exact
    if exact and not neighbours:
        pairs, sims = duplicate_pairs(x, threshold, progress=progress)
        return NearPairs(pairs, sims, {"method": "exact"})
    n, kk = rows.n, min(k + 1, rows.n)
    if exact:
        index, _, _, _ = build_faiss(rows, replace(cfg, type="flat"))
        knn_sims, knn_ids = np.zeros((n, kk), np.float32), np.zeros((n, kk), np.int64)  # (N, k+1)
        step = cfg.chunk_rows
        starts = list(range(0, n, step))
        if len(starts) > 1 and n - starts[-1] < step // 2:
            starts.pop()  # no short last block: every block takes faiss's BLAS path, as one search of all rows did
        with tqdm(total=n, unit="row", disable=not progress, desc=desc, mininterval=0.5, dynamic_ncols=True) as bar:
            for s, e in zip(starts, starts[1:] + [n]):
                knn_sims[s:e], knn_ids[s:e] = index.search(rows.span(s, e), kk)
                bar.update(e - s)
        pairs, sims = duplicate_pairs(rows, threshold, index=index)  # the flat index of the neighbours
        return NearPairs(pairs, sims, {"method": "exact"}, knn_sims, knn_ids)
    cfg = replace(cfg, type=cfg.approximate, nlist=self_join_lists(n), tune_queries=cfg.tune_queries if neighbours
                  else 0)  # tuned recall@10 only matters for the neighbours themselves
    # doctor tunes recall@10 on the filled index; dedup fills it once it knows the lists each row probes
    wrapped, kind, tuned, _ = build_faiss(rows, cfg, progress, fill=neighbours)
    ivf = faiss.extract_index_ivf(wrapped)  # owned by ``wrapped``, which must outlive it
    nprobe, estimate, synthetic = pair_probes(ivf.quantizer, rows, threshold, pair_recall, seed=cfg.seed)
    nprobe = max(nprobe, tuned["params"].get("nprobe", 1))  # doctor: enough for the tuned recall@10 too
    log.info("%s, nprobe %d: pairs at cosine %.3f found with estimated probability %.4f (%d synthetic pairs); "
             "searching the %d nearest neighbours of %d rows", tuned["factory"], nprobe, threshold, estimate,
             synthetic, k, n)
    assign, index = None, wrapped
    if not neighbours:
        with tqdm(total=n, unit="row", disable=not progress, desc=f"index {tuned['factory']}", mininterval=0.5,
                  dynamic_ncols=True) as bar:
            assign, index = add_assigned(ivf, rows, nprobe, bar), ivf  # ids: store rows, no id map
    with tqdm(total=n, unit="row", disable=not progress, desc=desc, mininterval=0.5, dynamic_ncols=True) as bar:
        knn_sims, knn_ids = batch_knn(index, rows, kk, nprobe, bar, assign=assign)
    ivf.nprobe = nprobe
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
    search = {"method": "approximate", "type": kind, "index": tuned["factory"], "params": {"nprobe": nprobe},
              "neighbours": k, "range_searched": len(full), "pair_recall": estimate, "pair_recall_target": pair_recall,
              "synthetic_pairs": synthetic, "recall_at_10": tuned["recall"], "recall_queries": tuned["queries"]}
    return NearPairs(pairs.reshape(-1, 2), s[keep][first], search, knn_sims, knn_ids)


def find_duplicates(store: FeatureStore | str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
                    exact: bool | None = None, progress: bool = False,
                    pair_recall: float = PAIR_RECALL) -> dict[str, Any]:
    """Groups (size >= 2) of rows whose vectors are within ``threshold`` cosine similarity, linked transitively;
    largest group first. Each group lists ids, paths, labels and its lowest linking similarity. The search is exact
    within the flat-index size, else approximate (``near_pairs``); ``exact``: True or False forces one way, None
    chooses by size; ``search`` in the result says which ran. The store is read a chunk of rows at a time.
    ``progress``: bars on stderr over the rows searched (and the rows added to an approximate index).
    ``pair_recall``: the approximate search's estimated share of pairs at the threshold to find (more probes)."""
    if not -1 <= threshold <= 1:
        raise ProbeError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if not 0 < pair_recall <= 1:
        raise ProbeError(f"pair_recall is a share of pairs in (0, 1], got {pair_recall}")
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if store.count == 0:
        raise StoreError(f"store {str(store.path)!r} has no rows: nothing to deduplicate")
    set_threads()
    with store.search_rows("cosine") as rows:
        found = near_pairs(rows, threshold, exact=exact, progress=progress, pair_recall=pair_recall)
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
