"""`probe map` benchmark on large stores: wall time, peak memory and page size of the default map (UMAP, label
colour, at most ``--max-points`` rows drawn) against the store's size.

    python benchmarks/bench_map.py --store /tmp/scale/s1000000.h5 --store /tmp/scale/s100000.h5
    python benchmarks/bench_map.py --n 200000          # a synthetic store of 200k x 1280 rows, made here

Each store is mapped by `probe map STORE --json` in its own process under ``/usr/bin/time -v`` (wall time and peak
RSS), once per ``--max-points`` value (default 100,000; 0 draws every row). The synthetic store is the scale audit's
generator: 100 Gaussian classes in 1280-d, an 80/10/10 train/val/test split. Its paths name no file, so the page
holds no thumbnails: a real store's page adds ~2.5 KB for each of its (default 2000) embedded ones.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result  # noqa: E402

DIM, CLASSES = 1280, 100


def synthetic_store(path: Path, n: int, seed: int = 0) -> None:
    """The scale audit's store: ``n`` rows of 100 Gaussian classes in 1280-d, 80/10/10 splits."""
    from probe.store import store_from_arrays

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32) * 0.35
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, DIM), dtype=np.float32) + centres[y]  # (n, D)
    u = rng.random(n)
    splits = np.where(u < 0.8, "train", np.where(u < 0.9, "val", "test")).tolist()
    store_from_arrays(path, x, y, splits=splits, classes=[f"class{i:03d}" for i in range(CLASSES)])


def timed_map(store: Path, out: Path, max_points: int) -> dict[str, Any]:
    """`probe map STORE --json --max-points K` under /usr/bin/time -v: wall s, peak RSS MiB, page bytes, rows."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "probe", "map", str(store), "--out", str(out), "--json",
           "--max-points", str(max_points)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr).group(1)
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) / 1024
    r = json.loads(run.stdout)
    return {"command": " ".join(["probe", *cmd[5:]]), "store_rows": r["store_rows"], "rows_drawn": r["rows"],
            "store_mb": round(store.stat().st_size / 2**20, 1), "wall_s": round(seconds, 1),
            "projection_s": round(r["projection_seconds"], 1), "peak_rss_mb": round(rss, 1),
            "page_mb": round(r["bytes"] / 2**20, 2), "method": r["method"], "notes": r["notes"][:1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", action="append", default=[], help="a store (.h5) to map; repeat for several")
    ap.add_argument("--n", type=int, default=None, help="also a synthetic store of this many rows, made here")
    ap.add_argument("--max-points", type=int, action="append", default=None, help="default: 100000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = [Path(s) for s in args.store]
        if args.n:
            stores.append(Path(tmp) / f"s{args.n}.h5")
            synthetic_store(stores[-1], args.n)
        for store in stores:
            for k in args.max_points or [100_000]:
                runs.append(timed_map(store, Path(tmp) / "map.html", k))
                print(json.dumps(runs[-1]), file=sys.stderr)
    write_result("map", {"runs": runs, "command": "benchmarks/bench_map.py " + " ".join(sys.argv[1:])}, args.out)


if __name__ == "__main__":
    main()
