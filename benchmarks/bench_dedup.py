"""`probe dedup` benchmark: the approximate search (an IVF index of the rows, each row's 10 nearest neighbours by
FAISS's big-batch search probing enough lists for 99% of the pairs at the threshold, a range search where all of
them are duplicates) against the exact all-pairs search, in the same run.

    python benchmarks/bench_dedup.py                                   # 100k rows -> benchmarks/results/dedup.json
    python benchmarks/bench_dedup.py --n 20000 --big /tmp/scale/s1000000.h5   # also a large store, approximate only
    python benchmarks/bench_dedup.py --big-n 1000000                   # also a planted 1M store, approximate only

* **Approximate vs exact.** A synthetic store of ``--n`` x 1280 float32 rows (100 Gaussian classes, the generator of
  the scale audit's stores) with planted near-duplicates: 1% of the rows are copies of other rows plus Gaussian
  noise of a per-copy scale drawn in [0.05, 0.3] (cosine ~0.999 down to ~0.96, some near the 0.95 threshold), 100
  exact copies, and 5 rows copied 30 times each (more copies than the 10 neighbours: the range search's case).
  `probe dedup --json` runs twice, by default (approximate above 50,000 rows) and with ``--exact``, each in its own
  process under ``/usr/bin/time -v`` (wall time and peak RSS). Reported: time ratio, the fraction of the exact
  search's pairs the approximate one found (its pairs are a subset: IVF,Flat keeps exact similarities), the share
  of the planted pairs each found, and whether the groups are identical.
* **Large store** (``--big``, or ``--big-n`` rows planted the same way): approximate only, the exact search being
  N²·D flops (hours at 1M x 1280 on 2 cores); for a planted one, the share of its planted pairs found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_v, write_result  # noqa: E402

DIM, CLASSES, THRESHOLD = 1280, 100, 0.95


def planted_store(path: Path, n: int, seed: int = 0) -> tuple[dict[str, int], np.ndarray]:
    """Write the synthetic store (module docstring) to path; returns how many copies of each kind were planted and
    the planted pairs (m, 2) as (original, copy) rows."""
    from probe.store import store_from_arrays

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32) * 0.35
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, DIM), dtype=np.float32) + centres[y]  # (n, D)
    noisy, exact, many, times = n // 100, 100, 5, 30
    dst = rng.permutation(n)[: noisy + exact + many * times]  # rows overwritten by copies
    src = rng.choice(np.setdiff1d(np.arange(n), dst), noisy + exact + many, replace=False)  # originals
    scale = rng.uniform(0.05, 0.3, noisy)[:, None].astype(np.float32)
    x[dst[:noisy]] = x[src[:noisy]] + scale * rng.standard_normal((noisy, DIM), dtype=np.float32)
    x[dst[noisy: noisy + exact]] = x[src[noisy: noisy + exact]]
    x[dst[noisy + exact:]] = np.repeat(x[src[noisy + exact:]], times, axis=0)
    y[dst] = y[np.r_[src[: noisy + exact], np.repeat(src[noisy + exact:], times)]]
    store_from_arrays(path, x, y, classes=[f"class{i:03d}" for i in range(CLASSES)])
    pairs = np.stack([np.r_[src[: noisy + exact], np.repeat(src[noisy + exact:], times)], dst], 1)
    return {"noisy_copies": noisy, "exact_copies": exact, "rows_copied_30_times": many}, pairs


def planted_found(out: dict[str, Any], pairs: np.ndarray) -> float:
    """The share of the planted (original, copy) pairs that dedup put in one group."""
    group = {i: g for g, grp in enumerate(out["groups"]) for i in grp["ids"]}
    return round(float(np.mean([group.get(int(a), -1) == group.get(int(b), -2) for a, b in pairs])), 4)


def timed_dedup(store: Path, *flags: str) -> dict[str, Any]:
    """`probe dedup STORE --json FLAGS` in its own process under /usr/bin/time -v: its JSON, wall s, peak RSS MiB."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "probe", "dedup", str(store), "--threshold", str(THRESHOLD),
           "--json", *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds, rss = time_v(run.stderr)
    return {"command": " ".join(["probe", *cmd[5:]]), "wall_s": round(seconds, 2), "peak_rss_mb": round(rss, 1),
            "out": json.loads(run.stdout)}


def summary(m: dict[str, Any]) -> dict[str, Any]:
    out = m["out"]
    return {"command": m["command"], "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"], "rows": out["count"],
            "search": out["search"], "pairs": out["pairs"], "groups": len(out["groups"]),
            "duplicates": out["duplicates"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="rows of the synthetic store (>= 50,000: approximate)")
    ap.add_argument("--big", default=None, help="also a large store (.h5), approximate only")
    ap.add_argument("--big-n", type=int, default=0, help="also a planted store of this many rows, approximate only "
                                                         "(the share of planted pairs found is its recall)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    result: dict[str, Any] = {"threshold": THRESHOLD}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / f"planted{args.n}.h5"
        planted, pairs = planted_store(store, args.n)
        a, e = timed_dedup(store), timed_dedup(store, "--exact")
        store.unlink()
        if args.big_n:
            big = Path(tmp) / f"planted{args.big_n}.h5"
            big_planted, big_pairs = planted_store(big, args.big_n)
            b = timed_dedup(big)
            result["large_planted"] = {"n": args.big_n, "planted": big_planted, **summary(b),
                                       "planted_pairs_found_fraction": planted_found(b["out"], big_pairs)}
    same = [g["ids"] for g in a["out"]["groups"]] == [g["ids"] for g in e["out"]["groups"]]
    approx, exact = summary(a), summary(e)
    result["synthetic"] = {"n": args.n, "dim": DIM, "planted": planted, "approximate": approx, "exact": exact,
                           "time_ratio_exact_over_approximate": round(exact["wall_s"] / approx["wall_s"], 2),
                           "pairs_found_fraction": round(approx["pairs"] / max(exact["pairs"], 1), 4),
                           "planted_pairs_found_fraction": planted_found(a["out"], pairs),
                           "groups_identical": same}
    if args.big:
        result["large"] = summary(timed_dedup(Path(args.big)))
    result["command"] = "benchmarks/bench_dedup.py " + " ".join(sys.argv[1:])
    write_result("dedup", result, args.out)


if __name__ == "__main__":
    main()
