"""Near-duplicate groups in a store: every pair with cosine similarity >= a threshold, joined into groups.

Exact (FAISS range search on normalised vectors, in blocks of queries): N²·D flops, so seconds for tens of
thousands of images on a CPU.

Example:
    >>> out = find_duplicates("cache/photos.h5", threshold=0.95)
    >>> out["groups"][0]["paths"]          # ["a.jpg", "copy of a.jpg"]
"""

from __future__ import annotations

import logging
import os
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..errors import ProbeError
from ..store import FeatureStore, StoreError
from .factory import set_threads
from .rows import prepare

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95  # cosine: re-encodes, resizes and small crops of one photo; distinct shots score lower


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


def duplicate_pairs(x: np.ndarray, threshold: float, block: int = 4096,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (m, 2) with i < j, their cosine similarities (m,)) among rows of x (N, D) with cosine >= threshold.
    ``progress``: a bar on stderr over the rows searched."""
    x = prepare(x, "cosine")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    pairs, sims = [], []
    with tqdm(total=len(x), unit="row", disable=not progress, desc="near-duplicates", mininterval=0.5,
              dynamic_ncols=True) as bar:
        for s in range(0, len(x), block):
            lims, d, j = index.range_search(x[s: s + block], float(np.nextafter(np.float32(threshold), -1)))
            i = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims).astype(np.int64))  # query row per result
            keep = (i < j) & (d >= threshold)  # each pair once, never a row with itself
            pairs.append(np.stack([i[keep], j[keep]], 1))
            sims.append(d[keep])
            bar.update(len(lims) - 1)
    return np.concatenate(pairs), np.concatenate(sims)


def find_duplicates(store: FeatureStore | str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
                    progress: bool = False) -> dict[str, Any]:
    """Groups (size >= 2) of rows whose vectors are within ``threshold`` cosine similarity, linked transitively;
    largest group first. Each group lists ids, paths, labels and its lowest linking similarity. ``progress``: a
    bar on stderr over the rows searched."""
    if not -1 <= threshold <= 1:
        raise ProbeError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if store.count == 0:
        raise StoreError(f"store {str(store.path)!r} has no rows: nothing to deduplicate")
    set_threads()
    pairs, sims = duplicate_pairs(store.features(), threshold, progress=progress)
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
    return {"store": str(store.path), "threshold": threshold, "count": store.count, "pairs": len(pairs),
            "duplicates": sum(len(g["ids"]) - 1 for g in groups), "root": str(store.attrs.get("root", "")),
            "groups": groups}
