"""`probe doctor` benchmark: how well it finds planted label noise on real photos, and how fast its out-of-fold
probabilities are against scikit-learn's ``cross_val_predict(LogisticRegressionCV(...))``.

    python benchmarks/bench_doctor.py                          # both parts -> benchmarks/results/doctor.json
    python benchmarks/bench_doctor.py --part noise             # label noise only (minutes: extracts 3,000 images)
    python benchmarks/bench_doctor.py --part speed --n 20000   # speed only, smaller
    python benchmarks/bench_doctor.py --part memory --rows 500000   # wall time and peak RSS of `probe doctor`

* **Label noise.** Real photos through the default backbone (efficientnet_lite0): the packaged demo (400
  Fashion-MNIST images) and, when Debian's ``dataset-fashion-mnist`` is installed, ``--per-class`` images per class
  from the end of its training set (3,000 by default; extracted once into ``--cache``). For each of ``--repeats``
  seeds, 5% of the labels are flipped to another class (uniformly) and ``probe.doctor`` runs on the noisy store
  exactly as a user would. Reported: precision and recall of the ``F`` highest-ranked label issues, F the number
  of flips (there precision equals recall), and of cleanlab's whole flagged set.
* **Speed.** Synthetic 50k x 1280 float32 features, 10 classes (benchmarks/bench_heads.py's generator: class means
  in a 64-d subspace plus anisotropic noise). Out-of-fold probabilities over the same 5 seeded stratified folds:
  probe with a full sweep in each fold (``sweep="per-fold"``: nested CV, each outer fold choosing C over 25
  strengths by an inner CV whose 4 folds are the other outer folds, then a refit) and with its default (one sweep
  on all rows, each fold refit at that C); the baseline is ``cross_val_predict(make_pipeline(StandardScaler(),
  LogisticRegressionCV(Cs=<the same 25>, cv=<4 seeded stratified folds>, max_iter=100)), method="predict_proba")``
  -- the same grid, the same number and size of inner folds (3/5 of the rows each), iteration cap and tolerance
  (lbfgs, warm-started along the path, as scikit-learn does). probe's inner folds being the outer ones lets each
  pair of outer folds share one sweep (10 sweeps for the 20 inner problems); scikit-learn's API cannot.
* **Memory** (``--part memory``, not part of ``all``: minutes). ``probe doctor`` on bench_dedup.py's planted
  synthetic store of ``--rows`` x 1280 (100 classes, 1% noisy copies, exact copies, rows copied 30 times; made
  once under ``--cache``), in its own process under ``/usr/bin/time -v``: wall time, peak RSS, and the peak over
  the size of the features (N x D x 4 bytes), and its phases from its log (the C sweep, the fits at the chosen C,
  then the rest: class-mean distances and the neighbour search). ``--probe-root DIR`` (repeatable) runs those
  checkouts' probe on the same store, taking turns ``--runs`` times: a before/after of one change with the
  machine's drift falling on both alike.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_heads import synthetic  # noqa: E402
from benchmarks.common import time_v, timer, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "probe" / "demo" / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def debian_folder(out: Path, per_class: int) -> Path | None:
    """per_class images of each class from the END of Debian's Fashion-MNIST training set as PNG class folders."""
    from PIL import Image

    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        return None
    if out.exists() and sum(1 for _ in out.rglob("*.png")) == 10 * per_class:
        return out
    X = np.frombuffer(gzip.open(DEBIAN / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    X = X.reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(DEBIAN / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    for c, name in enumerate(NAMES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == c)[-per_class:]:
            Image.fromarray(X[i]).save(out / name / f"{i:05d}.png")
    return out


def noise_part(cache: Path, per_class: int, repeats: int, rate: float) -> dict:
    from probe.doctor import doctor
    from probe.extract import ExtractConfig, extract
    from probe.store import FeatureStore, store_from_arrays

    sets = {"demo (400 Fashion-MNIST images)": (DEMO, cache / "doctor-demo.h5")}
    folder = debian_folder(cache / f"fashion-mnist-{per_class}", per_class)
    if folder is not None:
        sets[f"Debian Fashion-MNIST ({10 * per_class} images)"] = (folder, cache / f"doctor-fm{10 * per_class}.h5")
    out = {}
    for name, (data, path) in sets.items():
        with timer() as t:
            extract(data, path, ExtractConfig(batch_size=64))
        store = FeatureStore(path)
        X, y0, K = store.features(), store.labels(), len(store.classes)
        flips = round(rate * len(y0))
        runs = []
        for seed in range(repeats):
            rng = np.random.default_rng(seed)
            y = y0.copy()
            flip = rng.choice(len(y), flips, replace=False)
            y[flip] = (y[flip] + rng.integers(1, K, flips)) % K
            noisy = store_from_arrays(cache / "doctor-noisy.h5", X, y, paths=store.paths(), splits=store.splits(),
                                      classes=store.classes, root=str(store.root))
            r = doctor(noisy)
            flipped = set(flip.tolist())
            ranked = [i["row"] for i in r.label_issues]
            top = len(set(ranked[:flips]) & flipped)
            hit = len(set(ranked) & flipped)
            runs.append({"seed": seed, "flips": flips, "oof_accuracy": r.oof_accuracy,
                         "precision_at_flips": round(top / flips, 4), "recall_at_flips": round(top / flips, 4),
                         "flagged": len(ranked), "flagged_precision": round(hit / max(1, len(ranked)), 4),
                         "flagged_recall": round(hit / flips, 4), "doctor_seconds": r.seconds})
            print(f"{name} seed {seed}: {runs[-1]}", file=sys.stderr)
        p = [r["precision_at_flips"] for r in runs]
        out[name] = {"rows": len(y0), "classes": K, "flip_rate": rate, "extract_seconds": round(t["s"], 1),
                     "runs": runs, "precision_at_flips_mean": round(float(np.mean(p)), 4),
                     "precision_at_flips_min": round(float(np.min(p)), 4),
                     "target_met_every_seed": bool(min(p) >= 0.8)}  # at F, recall = precision >= 0.8 >= 0.6
    return out


def speed_part(n: int, dim: int, classes: int, folds: int) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from probe.doctor import out_of_fold_proba
    from probe.heads import LinearHead

    X, y = synthetic(n, dim, classes)
    res = {"data": {"n": n, "dim": dim, "classes": classes, "folds": folds, "kind": "synthetic float32"}}
    for mode in ("per-fold", "once"):
        with timer() as t:
            P, C = out_of_fold_proba(X, y, folds, 0, sweep=mode)
        res[f"probe_{mode}"] = {"seconds": round(t["s"], 2), "oof_accuracy": round(float((P.argmax(1) == y).mean()), 4),
                                "C": C, "load_average_1m_after": round(os.getloadavg()[0], 2)}
        print(f"probe {mode}: {res[f'probe_{mode}']}", file=sys.stderr)
    Cs = LinearHead().Cs()
    inner = StratifiedKFold(folds - 1, shuffle=True, random_state=0)  # probe's inner folds: the other outer folds
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=Cs, cv=inner, max_iter=100))
    with timer() as t:
        P = cross_val_predict(model, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                              method="predict_proba")
    res["sklearn_cross_val_predict"] = {"seconds": round(t["s"], 2),
                                        "oof_accuracy": round(float((P.argmax(1) == y).mean()), 4),
                                        "model": f"StandardScaler + LogisticRegressionCV(Cs={len(Cs)} on "
                                                 f"{Cs[0]:g}..{Cs[-1]:g}, cv={folds - 1} stratified, "
                                                 "max_iter=100, lbfgs)",
                                        "load_average_1m_after": round(os.getloadavg()[0], 2)}
    print(f"sklearn: {res['sklearn_cross_val_predict']}", file=sys.stderr)
    base = res["sklearn_cross_val_predict"]["seconds"]
    res["speedup_per_fold_sweep"] = round(base / res["probe_per-fold"]["seconds"], 2)
    res["speedup_default"] = round(base / res["probe_once"]["seconds"], 2)
    res["target_speedup"] = 5
    return res


def memory_part(cache: Path, rows: int, probe_roots: list[Path], runs: int = 1) -> dict:
    """`probe doctor -v` on the planted store of ``rows`` rows (made once), ``runs`` times for each checkout in
    ``probe_roots``, the checkouts taking turns (a drift of the machine falls on each alike): per run the wall s,
    peak RSS and its ratio to the features, and the phases from its log -- the C sweep, the fits at the chosen C
    (the sweep's fit on every row, if the checkout makes one, and a refit per fold) and what follows them (the
    distances to the class means and the neighbour search, to the report)."""
    import re
    import subprocess
    import tempfile
    import time

    from benchmarks.bench_dedup import DIM, planted_store

    store = cache / f"planted{rows}.h5"
    if not store.exists():
        planted_store(store, rows)
    features = rows * DIM * 4 / 2**20
    out: dict = {"rows": rows, "dim": DIM, "features_mb": round(features), "runs": runs, "by_checkout": {}}
    for i in range(runs):
        for root in probe_roots:
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "probe", "-v", "doctor", str(store), "--top", "3"]
            t0, stamped = time.perf_counter(), []
            with tempfile.TemporaryFile("w+") as stdout, subprocess.Popen(
                    cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=root,
                    env={**os.environ, "PYTHONPATH": str(root)}) as proc:
                for line in proc.stderr:  # stamped as they come: where the neighbour search starts
                    stamped.append((time.perf_counter() - t0, line))
                proc.wait()
                stdout.seek(0)
                report = stdout.read()
            err = "".join(line for _, line in stamped)
            if proc.returncode:
                raise SystemExit(f"probe doctor in {root} failed ({proc.returncode}): {err[-2000:]}")
            seconds, peak = time_v(err)
            sweep = [float(m) for m in re.findall(r"chose C=\S+ \(.*?, ([\d.]+) s\)", err)]
            fit_at = [(t, float(m[1])) for t, line in stamped  # (when logged, its seconds) per fit at C
                      if (m := re.search(r"fit C=\S+ on \d+ rows: \d+ L-BFGS iterations, ([\d.]+) s", line))]
            fits = [fit_s for _, fit_s in fit_at]
            report_at = next((t for t, line in stamped if "probe.doctor" in line and "doctor:" in line), None)
            run = {"wall_s": round(seconds, 1), "peak_rss_mb": round(peak),
                   "peak_over_features": round(peak / features, 2), "sweep_s": round(sum(sweep), 1),
                   "fits_at_C_s": [round(f, 1) for f in fits],
                   "after_fits_s": None if not fit_at or report_at is None else round(report_at - fit_at[-1][0], 1),
                   "summary": [line for line in report.splitlines() if line and not line.startswith(" ")][:8]}
            print(f"run {i + 1}/{runs} {root}: {run['wall_s']} s, {run['peak_rss_mb']} MB, sweep {run['sweep_s']} s, "
                  f"fits {sum(fits):.1f} s, then {run['after_fits_s']} s", file=sys.stderr)
            out["by_checkout"].setdefault(str(root), []).append(run)
    for root, rs in out["by_checkout"].items():
        out.setdefault("median_wall_s", {})[root] = float(np.median([r["wall_s"] for r in rs]))
        out.setdefault("max_peak_rss_mb", {})[root] = max(r["peak_rss_mb"] for r in rs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "noise", "speed", "memory"), default="all")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache" / "bench")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=500_000, help="--part memory: rows of the planted store")
    ap.add_argument("--probe-root", type=Path, action="append", default=None,
                    help="--part memory: a checkout whose probe runs (repeat it to compare; default this one)")
    ap.add_argument("--runs", type=int, default=1, help="--part memory: runs of each checkout, taking turns")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    result = {}
    if a.part in ("all", "noise"):
        result["label_noise"] = noise_part(a.cache, a.per_class, a.repeats, a.rate)
    if a.part in ("all", "speed"):
        result["speed"] = speed_part(a.n, a.dim, a.classes, a.folds)
    if a.part == "memory":
        result["memory"] = memory_part(a.cache, a.rows, [r.resolve() for r in a.probe_root or [ROOT]], a.runs)
    name = "doctor" if a.part == "all" else f"doctor_{a.part}"
    write_result(name, result, a.out)


if __name__ == "__main__":
    main()
