"""Which FAISS index to make and how to search it: index_factory strings per index type, the search-parameter
ladders that tuning walks (``nprobe``, ``efSearch``, re-ranking factor), the metric, and FAISS's thread count.

Example:
    >>> factory_string("ivf", n=100_000, dim=1280, cfg=IndexConfig())     # ("IVF1264,Flat", 50560)
    >>> param_ladders("hnsw", index)[0][:2]                              # [{"efSearch": 16}, {"efSearch": 24}]
"""

from __future__ import annotations

import math
import os

import faiss

from ..errors import ProbeError
from .config import INDEX_TYPES, IndexConfig
from .sharding import sub_indexes


def set_threads(n: int | None = None) -> int:
    """FAISS's OpenMP threads: the cores this process may run on (not the machine's), unless told."""
    n = n or int(os.environ.get("PROBE_FAISS_THREADS", 0)) or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    return n


def faiss_metric(metric: str) -> int:
    """"cosine" (inner product on normalised vectors) or "l2" -> FAISS's metric constant."""
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def _pq_shape(dim: int, ntrain: int) -> tuple[int, int]:
    """(sub-quantizers m, bits): m divides D, about D/16 dims each; 8 bits unless too few training rows."""
    m = min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: abs(d - dim / 16))
    bits = max(1, min(8, int(math.log2(max(2, ntrain // 39)))))
    return m, bits


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


NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)  # IVF lists probed


def nprobe_ladder(nlist: int) -> list[int]:
    """The nprobe values worth trying on an IVF index of ``nlist`` lists, fewest first, the last every list."""
    return sorted({p for p in NPROBES if p < nlist} | {nlist})


def param_ladders(kind: str, index: faiss.Index) -> list[list[dict[str, int]]]:
    """Search parameters to try, each ladder from fastest to most exact: tuning walks a ladder until the target."""
    if kind == "hnsw":
        return [[{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)]]
    if kind in ("ivf", "ivfsq8", "ivfpq"):
        nlist = faiss.extract_index_ivf(sub_indexes(index)[0]).nlist
        probes = nprobe_ladder(nlist)
        if kind != "ivfpq":
            return [[{"nprobe": p} for p in probes]]
        return [[{"nprobe": p, "k_factor_rf": f} for p in probes] for f in (2, 4, 8, 16)]
    return []


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply search parameters (``{"nprobe": 8}``) to ``index``, through every shard of a faiss.IndexShards."""
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)
