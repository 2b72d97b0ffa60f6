"""``build_faiss``: a trained, filled and tuned FAISS index over N vectors read a block at a time — the
computation behind ``SearchIndex.build`` (which adds the metadata) and ``benchmarks/bench_search.py``.

Steps: pick the type (``auto``: exact below ``exact_below`` rows), hold out seeded query rows, make the index from
its factory string, train it on a seeded sample of the other rows, add those rows shard by shard, tune the search
parameters on the held-out queries against exact search, then add the queries too. Only the training sample
(ntrain, D) and the queries (nq, D) are ever held besides one block and the index.

Example:
    >>> index, kind, tuned, ntrain = build_faiss(prepare(x, "cosine"), IndexConfig(type="ivf"))
    >>> tuned["factory"], tuned["params"], tuned["recall"]                # "IVF126,Flat", {"nprobe": 4}, 0.97
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from .config import IndexConfig
from .factory import factory_string, faiss_metric, set_params, set_threads
from .rows import Rows
from .sharding import add_rows, combine, shard_bounds
from .tuning import held_out_rows, knn_ground_truth, tune

log = logging.getLogger(__name__)


def build_faiss(x: np.ndarray | Rows, cfg: IndexConfig, progress: bool = False,
                fill: bool = True) -> tuple[faiss.Index, str, dict[str, Any], int]:
    """Build, train and tune a FAISS index over x: an (N, D) array already ``prepare``d for cfg.metric (not
    copied), or Rows reading a store chunk by chunk. Returns (index with tuned parameters set, type, tuning result
    incl. "factory", "bounds" (the shards' row ranges) and, when sharded, "template" (the trained empty index every
    shard was cloned from), rows trained on). With cfg.shards > 1 the index is a faiss.IndexShards of IndexIDMap2
    sub-indexes, one per contiguous row range. Ids are row numbers of x. ``progress``: a bar on stderr over the
    rows added (it waits at 0 while the index trains). ``fill=False``: the trained index, empty and untuned, for a
    caller that adds the rows its own way (one shard, no tuning queries: dedup adds each row to the list its search
    probes first, ``dedup.add_assigned``)."""
    if not fill and (cfg.shards != 1 or cfg.tune_queries):
        raise ValueError("an unfilled index is one shard with no tuning queries")
    set_threads()
    t0 = time.perf_counter()
    rows = x if isinstance(x, Rows) else Rows(x, None, cfg.chunk_rows)
    n, dim = rows.n, rows.dim
    kind = cfg.resolve_type(n)
    nq = min(cfg.tune_queries, n // 5) if kind != "flat" else 0  # keep >= 80% of rows for training
    query_ids, rest = held_out_rows(n, nq, cfg.seed)
    factory, ntrain = factory_string(kind, n, dim, cfg, trainable=len(rest))
    empty = faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss_metric(cfg.metric)))  # ids = store rows
    with tqdm(total=n, unit="row", disable=not (progress and fill), desc=f"index {factory}", mininterval=0.5,
              dynamic_ncols=True) as bar:
        if ntrain:
            log.info("training %s on %d of %d rows", factory, ntrain, n)
            empty.train(rows.take(np.sort(rest[:ntrain])))  # (ntrain, D): a sample, read by row index
            faiss.extract_index_ivf(empty).make_direct_map()  # reconstruct(id): query by id/path without the store
        if not fill:
            return empty, kind, {"params": {}, "recall": None, "queries": 0, "tried": [], "factory": factory,
                                 "bounds": [0, n]}, ntrain
        bounds = shard_bounds(n, cfg.shards)
        subs = [empty] if cfg.shards == 1 else [faiss.clone_index(empty) for _ in range(cfg.shards)]
        del rest
        add_rows(subs, bounds, rows, np.setdiff1d(np.arange(n), query_ids) if nq else None, bar)
        index = combine(subs)
        log.info("added %d x %d to %s (%d shards) in %.1fs", n - nq, dim, factory, len(subs),
                 time.perf_counter() - t0)
        q = rows.take(query_ids)  # (nq, D)
        tuned = tune(kind, index, q, knn_ground_truth(q, rows, cfg.metric, exclude=query_ids), cfg.target_recall)
        add_rows(subs, bounds, rows, query_ids, bar)
    if len(subs) > 1:
        index.syncWithSubIndexes()  # rows were added to the shards directly: refresh the total
    set_params(index, tuned["params"])
    extra = {"template": empty} if len(subs) > 1 else {}  # the trained empty index every shard was cloned from
    return index, kind, {**tuned, "factory": factory, "bounds": bounds.tolist(), **extra}, ntrain
