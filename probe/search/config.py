"""IndexConfig: what kind of FAISS index to build over a store, how to tune it, and how to read the store.

Every module of the build reads its fields from here (factory strings, tuning, sharding, row chunks); the saved
index records it as ``meta["config"]`` and ``SearchIndex.config`` gives it back.

Example:
    >>> IndexConfig(type="ivf", target_recall=0.98, shards=4)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import ProbeError

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "ivfsq8")
METRICS = ("cosine", "l2")


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexConfig:
        """From a sidecar's ``config`` (``asdict`` of one): fields it lacks (an older file) take their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def resolve_type(self, n: int) -> str:
        """The concrete type for n vectors: ``auto`` is exact (flat) below ``exact_below``, else ``approximate``."""
        return self.type if self.type != "auto" else ("flat" if n < self.exact_below else self.approximate)
