"""Which C carries over from a sweep on a subsample to the fit on every row, on real features: the same C (what
`probe fit-head --sweep-rows` does) or the same penalty per row (C x sweep rows / final rows)?

    python benchmarks/bench_heads_sweep_rows.py --fashion-mnist DIR    # writes + extracts the store first (~9 min)
    python benchmarks/bench_heads_sweep_rows.py STORE.h5 [--sweep-rows 3000 10000] [--seeds 0 1 2]
                                                                       # -> benchmarks/results/heads_sweep_rows.json

``--fashion-mnist DIR``: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) as a split root
under DIR -- 30,000 train and 5,000 val images from its train set, 5,000 test from t10k, seed 0 -- extracted with
the default backbone (efficientnet_lite0, ImageNet weights) to DIR/fashion.h5. The store needs train, val and test.

For every sweep size and seed: LinearHead(sweep_rows=s) chooses C on a seeded stratified subsample of s training
rows (scored on val) and refits on train + val at that C (the shipped rule); the same head refit on train + val at
C x s / (train + val rows) is the per-row rule. Both are scored on test, against the sweep on every training row
(``sweep_rows=None``). On a synthetic Gaussian store (benchmarks/bench_heads_scale.py --synthetic) the per-row rule
matched the full sweep's C; this asks real features."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tools"))
from common import write_result  # noqa: E402

from probe.heads.linear import LinearHead  # noqa: E402
from probe.store import FeatureStore  # noqa: E402


def fashion_store(out: Path) -> Path:
    """Fashion-MNIST as train/val/test class folders under out/data, extracted to out/fashion.h5."""
    from make_demo_data import CLASSES, read_idx
    from PIL import Image

    from probe.extract import extract

    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.exists():
        sys.exit(f"{src} is missing: apt-get install dataset-fashion-mnist")
    tx, ty = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    vx, vy = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    p, q = rng.permutation(len(tx)), rng.permutation(len(vx))
    for split, x, y, rows in [("train", tx, ty, p[:30000]), ("val", tx, ty, p[30000:35000]),
                              ("test", vx, vy, q[:5000])]:
        for i in rows:
            d = out / "data" / split / CLASSES[y[i]]
            d.mkdir(parents=True, exist_ok=True)
            if not (d / f"{i:05d}.png").exists():
                Image.fromarray(x[i], mode="L").save(d / f"{i:05d}.png")
    extract(out / "data", out / "fashion.h5", progress=True)
    return out / "fashion.h5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, nargs="?")
    ap.add_argument("--fashion-mnist", type=Path, help="make the Fashion-MNIST store in this folder first")
    ap.add_argument("--sweep-rows", type=int, nargs="+", default=[3000, 10000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if (a.store is None) == (a.fashion_mnist is None):
        ap.error("give a STORE or --fashion-mnist DIR, one of them")
    store = FeatureStore(a.store or fashion_store(a.fashion_mnist))
    X = {s: store.features(s) for s in ("train", "val", "test")}
    y = {s: np.asarray(store.labels(s)) for s in ("train", "val", "test")}
    x_all, y_all = np.concatenate([X["train"], X["val"]]), np.concatenate([y["train"], y["val"]])

    def test_accuracy(head: LinearHead) -> float:
        return round(head.score(X["test"], y["test"]), 4)  # ClassifierMixin: accuracy of predict

    t = time.perf_counter()
    full = LinearHead(sweep_rows=None).fit(X["train"], y["train"], eval_set=(X["val"], y["val"]))
    base = {"C": full.C_, "test_accuracy": test_accuracy(full), "seconds": round(time.perf_counter() - t, 1)}
    print("every training row:", base, flush=True)
    runs = []
    for s in a.sweep_rows:
        for seed in a.seeds:
            head = LinearHead(sweep_rows=s, seed=seed).fit(X["train"], y["train"], eval_set=(X["val"], y["val"]))
            c_row = head.C_ * s / len(y_all)
            per_row = LinearHead(C=c_row).fit(x_all, y_all)  # the refit on train + val, at the per-row C
            r = {"sweep_rows": s, "seed": seed, "C": head.C_, "same_C_test_accuracy": test_accuracy(head),
                 "per_row_C": c_row, "per_row_test_accuracy": test_accuracy(per_row)}
            runs.append(r)
            print(r, flush=True)
    mean = {k: round(float(np.mean([r[k] for r in runs])), 4)
            for k in ("same_C_test_accuracy", "per_row_test_accuracy")}
    write_result("heads_sweep_rows", {
        "store": str(store.path), "backbone": store.backbone,
        "rows": {k: len(v) for k, v in y.items()}, "dim": store.dim, "classes": len(store.classes),
        "every_training_row": base, "runs": runs, "mean": mean,
        "mean_minus_every_row": {k: round(v - base["test_accuracy"], 4) for k, v in mean.items()}}, a.out)


if __name__ == "__main__":
    main()
