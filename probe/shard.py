"""Sharded extraction: a pure map over files, one store per shard, merged into one store at the end.

A file's shard is a hash of its relative path modulo N (a container dataset's row: of its container -- a tar
shard, a Parquet or Arrow file -- so that each rank reads whole shard files), so the same file goes to the same shard
whatever order each rank lists the folder in. Under ``torchrun`` every rank takes its shard from
``RANK``/``WORLD_SIZE``. Each shard is an ordinary resumable store (``STORE.shard-I-of-N.h5``, with ``shard`` and
``complete`` attributes): a lost rank is re-run alone and resumes from its journal; a finished shard has nothing left
to do.

Example:
    torchrun --nproc-per-node 2 -m probe extract DATA --out cache/big.h5      # cache/big.shard-{0,1}-of-2.h5
    probe merge cache/big.shard-*-of-2.h5 --out cache/big.h5
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .errors import ProbeError
from .identity import Side
from .store import ClassMerge, FeatureStore, Row, Skip, StoreError, StoreRows, write_store

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N) -> (I, N); None -> the torchrun rank when WORLD_SIZE > 1, else None."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    m = _SHARD_RE.match(text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ProbeError(f"shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_of(path: str, n: int) -> int:
    """Stable shard of a relative path: the first 8 bytes of its sha1, modulo n."""
    return int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") % n


def take_shard(ds: Dataset, shard: tuple[int, int]) -> Dataset:
    """The files of shard I of N (of a container dataset: the rows of its containers of shard I); the class list
    stays the whole dataset's, so labels agree across shards."""
    i, n = shard
    return ds.subset([k for k in range(len(ds)) if shard_of(ds.shard_key(k), n) == i])


def shard_path(out: Path, shard: tuple[int, int]) -> Path:
    return out.with_name(f"{out.stem}.shard-{shard[0]}-of-{shard[1]}{out.suffix or '.h5'}")


def merge(shards: Sequence[str | os.PathLike], out: str | os.PathLike, allow_missing: bool = False,
          chunk: int = 8192) -> dict[str, Any]:
    """Merge shard stores into one store at ``out``: every row exactly once, features (and augmented views, where
    the extraction made them) streamed chunk by chunk.

    Refuses shards of different configurations, missing or duplicated shard indices (unless ``allow_missing``),
    and a path present in two shards."""
    stores = [FeatureStore(p) for p in shards]
    _check_shards(stores, allow_missing)
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out} exists: merge writes a new store (delete it or choose another out path)")
    sources = [StoreRows.read(s) for s in stores]
    classes = ClassMerge(*(src.classes for src in sources))  # labels remapped as extraction's reconcile does
    rows: dict[str, Row] = {}
    skipped: dict[str, Skip] = {}
    for s, src in zip(stores, sources):
        for p, row in src.relabelled(classes):
            if p in rows:
                raise StoreError(f"{p!r} is in more than one shard (second: {s.path})")
            rows[p] = row
        skipped.update(src.skipped)
    rows = dict(sorted(rows.items()))  # canonical order: by path, whatever the shard count
    attrs = {k: v for k, v in stores[0].attrs.items() if k not in ("shard", "complete", "created", "updated")}
    attrs.update(classes=classes.classes, merged_from=[str(s.path) for s in stores])
    if stores[0].identity.key != attrs["config_key"]:
        raise RuntimeError(f"internal: the attributes of {stores[0].path} do not reproduce its config_key")
    write_store(out, attrs, rows, _vectors(stores, chunk), skipped, stores[0].dim, views=stores[0].n_views,
                what="the shard stores are unchanged")
    merged = FeatureStore(out)
    return {"store": str(out), "count": merged.count, "dim": merged.dim, "views": merged.n_views,
            "shards": len(stores), "classes": classes.classes, "skipped": len(skipped)}


def _check_shards(stores: list[FeatureStore], allow_missing: bool) -> None:
    """The shards of one extraction: one configuration, one dataset, each index of I/N once, none missing."""
    if not stores:
        raise StoreError("no shard stores given to merge")
    for s in stores[1:]:
        stores[0].identity.check(s.identity, mine=Side("shard", str(stores[0].path)), theirs=Side("shard", str(s.path)),
                                 fix="Merge only the shards of one extraction (the same backbone and options).")
    roots = {s.attrs.get("root") for s in stores}
    if len(roots) != 1:
        raise StoreError(f"shards come from different datasets: {sorted(roots)}")
    marks = [s.attrs.get("shard") for s in stores]
    if not all(marks):
        return
    counts = {int(m.split("/")[1]) for m in marks}
    if len(counts) != 1:
        raise StoreError(f"shards of different counts: {sorted(marks)}")
    n = counts.pop()
    seen = [int(m.split("/")[0]) for m in marks]
    dup = sorted({i for i in seen if seen.count(i) > 1})
    if dup:
        raise StoreError(f"shard {dup[0]}/{n} is given twice")
    missing = sorted(set(range(n)) - set(seen))
    if missing and not allow_missing:
        raise StoreError(f"shards {', '.join(f'{i}/{n}' for i in missing)} are missing: extract them first, or "
                         "merge with allow_missing")


def _vectors(stores: list[FeatureStore], chunk: int) -> Iterator[tuple[list[str], list[str], np.ndarray, Any]]:
    """(paths, fingerprints, (B, D) features, (B, K, D) views or None) of every shard, ``chunk`` rows at a time."""
    for s in stores:
        paths, fps = s.paths().tolist(), s.fingerprints().tolist()
        with s.open() as f:  # each chunk checksum-verified: a damaged shard is an error naming it
            step = max(1, chunk // max(1, s.n_views))  # the same memory per read with views
            for a in range(0, s.count, step):
                views = f["views"][a: a + step] if "views" in f else None  # (B, K, D)
                yield paths[a: a + step], fps[a: a + step], f["features"][a: a + step], views
