"""dedup's approximate search with one coarse search per row against two: the index built the usual way
(``build_faiss`` assigns each row to its nearest list while adding it) and then searched with ``batch_knn``
(which searches the centroids again for the nprobe lists of every row), against ``add_assigned`` (one centroid
search per row gives both the list it is added to and the lists it probes). Same IVF, same nprobe, in one run,
alternated twice; the share of rows with identical neighbours is reported (a row equally near two centroids may
land in the other list: FAISS's add searches the centroids in its own blocks, with its own rounding).

    python benchmarks/bench_dedup_assign.py [--n 500000]      # -> benchmarks/results/dedup_assign.json

Rows: bench_search.py's ``clustered`` (N x 1280 like image embeddings: 1,000 centres, a low-rank spread, noise),
L2-normalised, in memory (the store's reading is the same for both and left out)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import faiss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_search import clustered  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from probe.search.config import IndexConfig  # noqa: E402
from probe.search.dedup import DEFAULT_THRESHOLD, NEIGHBOURS, add_assigned, batch_knn, pair_probes, self_join_lists  # noqa: E402
from probe.search.faiss_index import build_faiss  # noqa: E402
from probe.search.rows import Rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    x = clustered(a.n, a.dim)  # (N, D), made in chunks
    faiss.normalize_L2(x)
    rows = Rows(x, None)
    cfg = IndexConfig(metric="cosine")
    cfg = replace(cfg, type=cfg.approximate, nlist=self_join_lists(a.n), tune_queries=0)  # what near_pairs builds
    runs: dict[str, list[dict]] = {"two_searches": [], "one_search": []}
    ids = {}
    for way in ("two_searches", "one_search") * 2:
        t0 = time.perf_counter()
        wrapped = build_faiss(rows, cfg, fill=way == "two_searches")[0]
        ivf = faiss.extract_index_ivf(wrapped)
        nprobe = pair_probes(ivf.quantizer, rows, DEFAULT_THRESHOLD)[0]
        if way == "two_searches":
            _, i = batch_knn(wrapped, rows, NEIGHBOURS + 1, nprobe)
        else:
            _, i = batch_knn(ivf, rows, NEIGHBOURS + 1, nprobe, assign=add_assigned(ivf, rows, nprobe))
        runs[way].append({"seconds": round(time.perf_counter() - t0, 1), "nprobe": nprobe})
        ids[way] = i
        print(way, runs[way][-1], flush=True)
        del wrapped, ivf, i
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    write_result("dedup_assign", {
        "rows": a.n, "dim": a.dim, "index": f"IVF{cfg.nlist},Flat", "runs": runs, "best_s": best,
        "one_over_two": round(best["one_search"] / best["two_searches"], 3),
        "rows_with_identical_neighbours": float((ids["two_searches"] == ids["one_search"]).all(1).mean()),
        "note": "index build (k-means, add) + pair_probes + big-batch search of every row; best of two each"}, a.out)


if __name__ == "__main__":
    main()
