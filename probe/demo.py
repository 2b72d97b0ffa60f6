"""The demo behind `probe demo`: extract + fit a linear head + search, offline, on 400 real Fashion-MNIST images
that ship inside the package (probe/demo/fashion-mnist: train/ 30 per class, val/ 10 per class; MIT licence,
taken from Debian's dataset-fashion-mnist by tools/make_demo_data.py).

Example:
    >>> r = run_demo()
    >>> r["head"]["val_accuracy"], r["search"]["precision_at_5"]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .extract import ExtractConfig, cache_dir, extract
from .fs import make_dirs
from .store import FeatureStore, StoreMismatchError

log = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "demo" / "fashion-mnist"


def run_demo(backbone: str = "efficientnet_lite0", out_dir: str | os.PathLike | None = None,
             progress: bool = False, k: int = 5) -> dict[str, Any]:
    """Extract the demo set, fit a linear head on train (strength picked on val), build a search index and query
    it with every val image. Returns the three summaries and the figures a person reads first."""
    from .heads.fit import fit_head
    from .search import IndexConfig, SearchIndex, index_store

    out_dir = Path(out_dir) if out_dir else cache_dir()
    make_dirs(out_dir)
    path = out_dir / f"demo.{backbone.replace('/', '_')}.h5"
    try:
        ex = extract(DEMO_DATA, path, ExtractConfig(backbone=backbone), progress=progress)
    except StoreMismatchError:  # made by another probe version's preprocessing: the demo's own, derived cache
        log.warning("%s was extracted with another configuration (an earlier probe?): extracting the demo again",
                    path)
        path.unlink()
        ex = extract(DEMO_DATA, path, ExtractConfig(backbone=backbone), progress=progress)
    store = ex.store
    fit = fit_head(store, "linear", Path(store).with_suffix(".linear.safetensors"))
    built = index_store(store, Path(store).with_suffix(".faiss"), IndexConfig())
    # Search quality: each val image queries the gallery; how many of its k nearest others share its class?
    idx = SearchIndex.load(built["index"])
    val = np.flatnonzero(FeatureStore(store).splits() == "val")  # index ids are store rows
    labels = np.asarray(idx.labels)
    _, hits = idx.search(idx.vectors(val), k=k + 1)  # (Q, k+1): the query itself comes back first
    hits = np.array([[h for h in row if h != q][:k] for q, row in zip(val, hits)])
    precision = float((labels[hits] == labels[val][:, None]).mean())
    example = {"query": idx.paths[val[0]], "label": idx.classes[labels[val[0]]],
               "hits": [{"path": idx.paths[h], "label": idx.classes[labels[h]]} for h in hits[0]]}
    return {
        "extract": ex.to_dict(),
        # val accuracy at the strength the sweep chose on val, before the refit on train + val
        "head": {"path": fit.out, "val_accuracy": fit.val_accuracy, "C": fit.get("C"),
                 "n_train": fit.n_train, "n_val": fit.n_val, "fit_seconds": fit.fit_seconds},
        "index": built,
        "search": {"queries": int(len(val)), "k": k, "precision_at_5": precision, "example": example},
    }
