"""`probe fit-head --head linear` at scale: peak memory against the size of the features it fits on, and the C sweep
on a subsample (``--sweep-rows``, default 100,000) against the sweep on every training row (``--sweep-rows 0``, the
old behaviour) on the same store, in the same run.

    python benchmarks/bench_heads_scale.py STORE.h5 [--sweep-rows 100000 0] [--timeout 3600] [-- EXTRA FIT-HEAD ARGS]
    python benchmarks/bench_heads_scale.py --synthetic 400000      # a store where C matters, made first (2 GB)

``--synthetic N`` writes N x 1280 rows of 100 Gaussian classes whose centres are close (``--centre-scale`` 0.1 per
dimension: nearest-centre accuracy ~84%), 80/10/10 splits, seed 0, to a temporary store and benchmarks that: the
scale audit's 1M store is too easy (every C scores 100%) to show what the subsample costs.

Each configuration runs `probe -v fit-head` in a child under ``/usr/bin/time -v`` (peak RSS, wall time); a run past
``--timeout`` is recorded with what it had logged (``log_tail``: the sweep's and the fits' timings). Figures:
``peak_rss_over_features`` (peak RSS / bytes of the train + val features; target below 2.5), and per
``--sweep-rows`` value its wall time, C and accuracies against the first configuration's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import time_v, write_result  # noqa: E402
from probe.store import FeatureStore  # noqa: E402


def run_fit_head(store: Path, sweep_rows: int, extra: list[str], timeout: float, tmp: Path) -> dict[str, Any]:
    """One `probe -v fit-head` under /usr/bin/time -v: its summary (when it finished), wall time and peak RSS."""
    out = tmp / f"lin_{sweep_rows}.safetensors"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "probe", "-v", "fit-head", str(store), "--head", "linear",
           "--out", str(out), "--sweep-rows", str(sweep_rows), "--json", *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, finished = p.stdout, p.stderr, p.returncode == 0
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        finished = False
    r: dict[str, Any] = {"sweep_rows_flag": sweep_rows, "finished": finished,
                         "log_tail": [ln for ln in stderr.splitlines() if " probe." in ln][-12:]}
    wall, rss = time_v(stderr)
    if rss is not None:
        r["peak_rss_gb"] = round(rss / 1024, 2)
    if wall is not None:
        r["wall_s"] = round(wall, 1)
    if finished:
        s = json.loads(stdout)
        r.update(C=s["C"], sweep_rows=s["sweep_rows"], n_train=s["n_train"], val_accuracy=s["val_accuracy"],
                 test_accuracy=(s["test"] or {}).get("accuracy"), fit_seconds=s["fit_seconds"])
    return r


def synthetic_store(path: Path, n: int, scale: float, dim: int = 1280, classes: int = 100) -> Path:
    """Write the ``--synthetic`` store (module docstring) to path."""
    from probe.store import store_from_arrays

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * scale
    y = rng.integers(0, classes, n)
    x = np.empty((n, dim), np.float32)  # (n, D), filled 100k rows at a time
    for s in range(0, n, 100_000):
        x[s:s + 100_000] = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32) + centres[y[s:s + 100_000]]
    u = rng.random(n)
    splits = np.where(u < 0.8, "train", np.where(u < 0.9, "val", "test")).tolist()
    store_from_arrays(path, x, y, splits=splits, classes=[f"class{i:03d}" for i in range(classes)])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, nargs="?", help="a store; or --synthetic N")
    ap.add_argument("--synthetic", type=int, default=0, help="benchmark a synthetic store of N rows, made first")
    ap.add_argument("--centre-scale", type=float, default=0.1, help="--synthetic: class centres' scale per dimension")
    ap.add_argument("--sweep-rows", type=int, nargs="+", default=[100_000, 0])
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/heads_scale.json)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more fit-head arguments, after --
    a = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if (a.store is None) == (not a.synthetic):
        ap.error("give a STORE or --synthetic N, one of them")
    made = tempfile.TemporaryDirectory()
    if a.synthetic:
        a.store = synthetic_store(Path(made.name) / f"hard{a.synthetic}.h5", a.synthetic, a.centre_scale)
    fs = FeatureStore(a.store)
    sp = fs.splits()
    trainval = int(np.isin(sp, ["train", "val"]).sum())
    gb = trainval * fs.dim * 4 / 2**30
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sweep_rows:
            r = run_fit_head(a.store, n, extra, a.timeout, Path(tmp))
            if "peak_rss_gb" in r:
                r["peak_rss_over_features"] = round(r["peak_rss_gb"] / gb, 2)
            runs.append(r)
    base = runs[0]
    for r in runs[1:]:
        if r.get("wall_s") and base.get("wall_s"):
            r["wall_over_first"] = round(r["wall_s"] / base["wall_s"], 2)
        if r.get("finished") and base.get("finished"):
            r["test_accuracy_minus_first"] = round(r["test_accuracy"] - base["test_accuracy"], 4)
    made.cleanup()
    synthetic = {"rows": a.synthetic, "centre_scale": a.centre_scale, "seed": 0} if a.synthetic else None
    write_result("heads_scale", {"store": str(a.store), "synthetic": synthetic, "rows": fs.count, "dim": fs.dim,
                                 "classes": len(fs.classes), "train_val_rows": trainval,
                                 "train_val_features_gb": round(gb, 2), "extra_args": extra, "runs": runs}, a.out)

if __name__ == "__main__":
    main()
