"""Calibration and unknown rejection on real features: temperature scaling's effect on ECE/NLL/Brier, and how well
each rejection score flags classes a head never saw.

    python benchmarks/bench_openset.py                       # -> benchmarks/results/openset.json
    python benchmarks/bench_openset.py --store cache/demo.h5 --splits 10

Features: the packaged Fashion-MNIST demo (400 images, 10 classes) through the packaged efficientnet_lite0,
extracted in this run unless ``--store`` names a store. Every split is seeded.

* **Calibration** (all 10 classes): 5-fold cross-fitting, repeated with 3 seeds. For each fold, the other four
  are split 3:1 (stratified) into fit rows and calibration rows; the head is fit (the linear head's C and the MLP's
  early stop chosen on the calibration rows, no refit), its temperature fit on the calibration rows, and the held-out
  fold scored before and after. The 400 held-out predictions are pooled per seed: ECE (15 equal-width bins), NLL,
  Brier.
* **Open set**: ``--splits`` seeded draws of 3 of the 10 classes held out as unknown. The 7 known classes' images
  are split 2:1:1 (stratified) into fit, val (C, early stop, temperature, threshold) and test rows. Each rejection
  score is measured by AUROC (known test images against every unknown image), and the automatic threshold (set on
  val to reject 5% of the known images; also 10% and 20%) by the rates it gives on the known test images (wrongly
  rejected) and on the unknown images (rightly rejected). Scores: the cosine distance to the nearest class mean
  of the fit rows (CL2N), which probe uses and which no head changes (reported once), and one minus the maximum
  calibrated probability of each head.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import timer, write_result  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "probe" / "demo" / "fashion-mnist"
HEADS = ("linear", "mlp", "prototype", "knn")


def make(kind: str):
    from probe.heads import make_head

    return make_head(kind, **({"refit": False, "device": "cpu"} if kind == "linear" else
                              {"device": "cpu"} if kind == "mlp" else {}))


def fit(head, X, y, fit_rows, val_rows):
    kw = {"eval_set": (X[val_rows], y[val_rows])} if head.kind in ("linear", "mlp") else {}
    return head.fit(X[fit_rows], y[fit_rows], **kw)


def mean_sd(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4), "min": round(float(v.min()), 4),
            "max": round(float(v.max()), 4)}


def bench_calibration(X: np.ndarray, y: np.ndarray, seeds: int) -> dict:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from probe.heads.calibration import calibration_metrics

    out = {}
    for kind in HEADS:
        runs = []
        for seed in range(seeds):
            P0, P1, Y, Ts = [], [], [], []
            for rest, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(X, y):
                f, c = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=seed)
                head = fit(make(kind), X, y, f, c)
                P0.append(head.predict_proba(X[held]))
                P1.append(head.calibrate(X[c], y[c]).predict_proba(X[held]))
                Y.append(y[held])
                Ts.append(head.temperature_)
            P0, P1, Y = map(np.concatenate, (P0, P1, Y))
            runs.append({"seed": seed, "n": len(Y), "temperatures": [round(t, 3) for t in Ts],
                         "before": {k: round(v, 4) for k, v in calibration_metrics(P0, Y).items()},
                         "after": {k: round(v, 4) for k, v in calibration_metrics(P1, Y).items()}})
        out[kind] = {"runs": runs, **{f"{m}_{w}": round(float(np.mean([r[w][m] for r in runs])), 4)
                                      for m in ("ece", "nll", "brier") for w in ("before", "after")}}
        print(kind, {k: v for k, v in out[kind].items() if k != "runs"}, flush=True)
    return out


def rates(known_val: np.ndarray, known_test: np.ndarray, unknown: np.ndarray, targets: list[float]) -> dict:
    """AUROC of one score (higher: more likely unknown), and at each target the rates its val threshold gives."""
    from probe.heads.calibration import auroc, rejection_threshold

    out = {"auroc": auroc(known_test, unknown)}
    for target in targets:
        thr = rejection_threshold(known_val, target)  # what reject=auto does, for this score
        out[f"at_{target:g}.known_rejected"] = float((known_test > thr).mean())
        out[f"at_{target:g}.unknown_rejected"] = float((unknown > thr).mean())
    return out


def bench_openset(X: np.ndarray, y: np.ndarray, splits: int, n_unknown: int, targets: list[float]) -> dict:
    from sklearn.model_selection import train_test_split

    runs: dict[str, list[dict]] = {}
    held_out = []
    for seed in range(splits):
        unknown = np.sort(np.random.default_rng(seed).choice(np.unique(y), n_unknown, replace=False))
        held_out.append(unknown.tolist())
        known_rows, unk = np.flatnonzero(~np.isin(y, unknown)), np.flatnonzero(np.isin(y, unknown))
        f, rest = train_test_split(known_rows, test_size=0.5, stratify=y[known_rows], random_state=seed)
        v, t = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
        for kind in HEADS:
            head = fit(make(kind), X, y, f, v).calibrate(X[v], y[v]).fit_rejection(X[f], y[f], X[v], y[v])
            if kind == HEADS[0]:  # the distance is the same whatever the head: measured once
                d = head.rejection_distance
                runs.setdefault("prototype_distance", []).append(rates(d(X[v]), d(X[t]), d(X[unk]), targets))
            msp = lambda A, h=head: 1.0 - h.predict_proba(A).max(1)  # noqa: E731
            r = rates(msp(X[v]), msp(X[t]), msp(X[unk]), targets)
            r["known_test_accuracy"] = float((head.predict(X[t]) == y[t]).mean())
            runs.setdefault(f"one_minus_max_probability.{kind}", []).append(r)
    out = {"splits": splits, "unknown_classes_per_split": n_unknown, "held_out": held_out,
           "targets_known_rejected": targets,
           "rows": {"fit": len(f), "val": len(v), "test_known": len(t), "unknown": len(unk)}}
    for name, rs in runs.items():
        out[name] = {k: mean_sd([r[k] for r in rs]) for k in rs[0]}
        print(name, {k: m["mean"] for k, m in out[name].items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, help="a store of the demo images (default: extract one in this run)")
    ap.add_argument("--splits", type=int, default=20, help="seeded draws of held-out classes")
    ap.add_argument("--unknown", type=int, default=3, help="classes held out as unknown per draw")
    ap.add_argument("--seeds", type=int, default=3, help="cross-fitting repetitions for the calibration figures")
    ap.add_argument("--targets", default="0.05,0.1,0.2", help="rates of known images wrongly rejected, set on val "
                                                               "(0.05 is probe's default)")
    a = ap.parse_args()
    from probe.store import FeatureStore

    with tempfile.TemporaryDirectory() as tmp, timer() as total:
        store = a.store
        if store is None:
            from probe.extract import ExtractConfig, extract

            store = extract(DEMO, Path(tmp) / "demo.h5", ExtractConfig(workers=2)).store
        st = FeatureStore(store)
        X, y = st.features(), st.labels()
        res = {"store": {"images": len(y), "classes": len(np.unique(y)), "dim": int(X.shape[1]),
                         "backbone": st.identity.backbone, "dtype": st.identity.dtype,
                         "source": str(a.store) if a.store else "extracted in this run"},
               "ece_bins": 15}
        with timer() as t:
            res["calibration"] = bench_calibration(X, y, a.seeds)
        res["calibration"]["seconds"] = round(t["s"], 1)
        with timer() as t:
            res["openset"] = bench_openset(X, y, a.splits, a.unknown, [float(t) for t in a.targets.split(",")])
        res["openset"]["seconds"] = round(t["s"], 1)
    res["seconds"] = round(total["s"], 1)
    write_result("openset", res)


if __name__ == "__main__":
    main()
