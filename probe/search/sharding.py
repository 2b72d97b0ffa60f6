"""Shards: a store's rows split into K contiguous ranges, each its own sub-index (all cloned from one trained,
empty index, so they share the coarse centroids), searched together through ``faiss.IndexShards``, which queries
every shard and merges their top-k. Ids are store rows in every shard.

Example:
    >>> bounds = shard_bounds(4000, 3)                     # [0, 1333, 2666, 4000]
    >>> subs = [faiss.clone_index(empty) for _ in range(3)]
    >>> add_rows(subs, bounds, rows); index = combine(subs)
"""

from __future__ import annotations

import faiss
import numpy as np
from tqdm.auto import tqdm

from .rows import Rows


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


def shard_of(bounds: np.ndarray, ids: np.ndarray, shards: int) -> np.ndarray:
    """(n,) the shard holding each row id; rows past the last bound belong to the last shard (it grows)."""
    return np.minimum(np.searchsorted(bounds, ids, side="right") - 1, shards - 1)


def add_rows(subs: list[faiss.Index], bounds: np.ndarray, rows: Rows, which: np.ndarray | None = None,
             bar: tqdm | None = None) -> None:
    """Add the sorted rows ``which`` (default all) of ``rows``, a block at a time, each to the sub-index whose
    range in ``bounds`` holds it, with ids = store rows; ``bar`` counts the rows added."""
    for ids, x in rows.blocks(which):
        shard = shard_of(bounds, ids, len(subs))  # (b,) blocks are sorted: shards are runs
        for k in np.unique(shard):
            m = shard == k
            subs[k].add_with_ids(x[m], ids[m])
        if bar is not None:
            bar.update(len(ids))
