"""Few-shot episodes: probe's prototype and linear heads against easyfsl's SimpleShot and scikit-learn, same episodes.

    pip install -e ".[bench]"                        # easyfsl
    python benchmarks/bench_fewshot.py               # -> benchmarks/results/fewshot.json
    python benchmarks/bench_fewshot.py --store cache/demo.h5 --episodes 1000

Real features: the packaged Fashion-MNIST demo (400 images, 10 classes) through the packaged efficientnet_lite0,
extracted in this run unless ``--store`` names a store. Episodes come from ``sample_episodes`` (seeded) and go
unchanged to every method:

* prototype head (``episode_accuracy``) against easyfsl's ``SimpleShot`` (backbone ``nn.Identity`` on the raw
  features, ``feature_centering`` = the train mean, ``feature_normalization=2``: CL2N computed by easyfsl itself),
  one ``process_support_set`` + ``forward`` per episode, as easyfsl is used;
* linear head (``linear_episode_accuracy``) against scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, as in
  Tian et al. 2020) fitted per episode on the first ``--sk-episodes`` episodes.

Accuracies are compared episode by episode. A synthetic 12,000 x 1280 store adds the rate of both heads on the
gather path (stores above 8,192 rows, no Gram matrix).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import timer, write_result  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "probe" / "demo" / "fashion-mnist"


def rate(episodes: int, seconds: float) -> float:
    return round(episodes / seconds, 1)


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Episode-by-episode comparison of two (E,) accuracy arrays."""
    return {"episodes_compared": len(theirs), "same_accuracy_fraction": float((ours == theirs).mean()),
            "mean_diff_points": round(100 * float(ours.mean() - theirs.mean()), 3),
            "max_episode_diff_points": round(100 * float(np.abs(ours - theirs).max()), 3)}


def easyfsl_simpleshot(X: np.ndarray, mean: np.ndarray, sup: np.ndarray, qry: np.ndarray) -> np.ndarray:
    """easyfsl's SimpleShot on raw features X (N, D), one episode at a time: accuracy per episode (E,)."""
    from easyfsl.methods import SimpleShot

    model = SimpleShot(backbone=torch.nn.Identity(), feature_centering=torch.from_numpy(mean),
                       feature_normalization=2).eval()
    E, W, K = sup.shape
    Q = qry.shape[2]
    Xt = torch.from_numpy(X)
    labels, truth = torch.arange(W).repeat_interleave(K), torch.arange(W).repeat_interleave(Q)
    out = np.empty(E)
    with torch.inference_mode():
        for e in range(E):
            model.process_support_set(Xt[sup[e].ravel()], labels)
            out[e] = (model(Xt[qry[e].ravel()]).argmax(1) == truth).double().mean().item()
    return out


def sklearn_logreg(Z: np.ndarray, sup: np.ndarray, qry: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    E, W, K = sup.shape
    Q = qry.shape[2]
    labels, truth = np.repeat(np.arange(W), K), np.repeat(np.arange(W), Q)
    return np.array([(LogisticRegression(C=C, max_iter=1000).fit(Z[s.ravel()], labels).predict(Z[q.ravel()])
                      == truth).mean() for s, q in zip(sup, qry)])


def bench_demo(store: Path, way: int, shots: list[int], query: int, episodes: int, C: float,
               sk_episodes: int) -> dict:
    from probe.heads.features import apply_norm, fit_norm
    from probe.heads.fewshot import episode_accuracy, linear_episode_accuracy, sample_episodes
    from probe.store import FeatureStore

    st = FeatureStore(store)
    X, y_all, sp = st.features(), st.labels(), st.splits()
    rows = np.flatnonzero(y_all >= 0)  # as `probe fewshot` without --split
    base = (y_all >= 0) & (sp == "train") if (sp == "train").any() else y_all >= 0
    norm = fit_norm(X[base], "cl2n")
    Z, y, Xr = apply_norm(X[rows], norm), y_all[rows], np.ascontiguousarray(X[rows], np.float32)
    gram = Z @ Z.T
    out = {"store": {"images": len(rows), "classes": len(np.unique(y)), "dim": int(X.shape[1]),
                     "backbone": st.config.get("backbone"), "dtype": st.config.get("dtype")}, "shots": {}}
    for shot in shots:
        with timer() as t_sample:
            sup, qry = sample_episodes(y, way, shot, query, episodes, seed=0)
        methods = {"prototype": lambda s, q: episode_accuracy(Z, s, q, "cosine", gram),
                   "easyfsl_simpleshot": lambda s, q: easyfsl_simpleshot(Xr, norm["mean"], s, q),
                   "linear": lambda s, q: linear_episode_accuracy(Z, s, q, C, gram),
                   "sklearn_logreg": lambda s, q: sklearn_logreg(Z, s, q, C)}
        acc, sec = {}, {}
        for name, fn in methods.items():
            fn(sup[:10], qry[:10])  # warm-up: first-call costs (allocations, lazy imports) are not per-episode
            n = sk_episodes if name == "sklearn_logreg" else episodes
            with timer() as t:
                acc[name] = fn(sup[:n], qry[:n])
            sec[name] = t["s"] + t_sample["s"] * (name in ("prototype", "linear"))  # probe's rate counts drawing
        row = {name: {"accuracy": round(float(a.mean()), 4), "episodes": len(a),
                      "episodes_per_s": rate(len(a), sec[name])} for name, a in acc.items()}
        row["linear"]["C"] = row["sklearn_logreg"]["C"] = C
        row["easyfsl_simpleshot"]["vs_prototype"] = agreement(acc["prototype"], acc["easyfsl_simpleshot"])
        row["sklearn_logreg"]["vs_linear"] = agreement(acc["linear"][:sk_episodes], acc["sklearn_logreg"])
        row["prototype_speedup_vs_easyfsl"] = round(row["prototype"]["episodes_per_s"]
                                                    / row["easyfsl_simpleshot"]["episodes_per_s"], 1)
        row["linear_speedup_vs_sklearn"] = round(row["linear"]["episodes_per_s"]
                                                 / row["sklearn_logreg"]["episodes_per_s"], 1)
        out["shots"][f"{way}way_{shot}shot"] = row
        print(f"{way}-way {shot}-shot: {row}", file=sys.stderr)
    return out


def bench_gather(episodes: int, C: float) -> dict:
    """Both heads on 12,000 x 1280 synthetic rows: above GRAM_MAX_ROWS, so features are gathered per episode."""
    from benchmarks.bench_heads import synthetic
    from probe.heads.features import apply_norm, fit_norm
    from probe.heads.fewshot import GRAM_MAX_ROWS, episode_accuracy, linear_episode_accuracy, sample_episodes

    X, y = synthetic(12_000, 1280, 20, seed=1, noise=1.5)  # noise for a task between chance and solved
    assert len(X) > GRAM_MAX_ROWS
    Z = apply_norm(X, fit_norm(X, "cl2n"))
    out = {}
    for shot in (1, 5):
        with timer() as t_sample:
            sup, qry = sample_episodes(y, 5, shot, 15, episodes, seed=0)
        with timer() as t_proto:
            proto = episode_accuracy(Z, sup, qry, "cosine")
        with timer() as t_lin:
            lin = linear_episode_accuracy(Z, sup, qry, C)
        out[f"5way_{shot}shot"] = {"episodes": episodes,
                                   "prototype": {"accuracy": round(float(proto.mean()), 4),
                                                 "episodes_per_s": rate(episodes, t_sample["s"] + t_proto["s"])},
                                   "linear": {"accuracy": round(float(lin.mean()), 4),
                                              "episodes_per_s": rate(episodes, t_sample["s"] + t_lin["s"])}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, help="a store of the demo images (default: extract one in this run)")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=10_000)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--sk-episodes", type=int, default=500, help="episodes fitted one by one with scikit-learn")
    a = ap.parse_args()
    try:
        import easyfsl  # noqa: F401
    except ImportError:
        sys.exit("easyfsl is not installed: pip install -e '.[bench]'")
    shots = [int(s) for s in a.shots.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        store = a.store
        if store is None:
            from probe.extract import ExtractConfig, extract

            store = extract(DEMO, Path(tmp) / "demo.h5", ExtractConfig(workers=2)).store
        res = {"demo": bench_demo(Path(store), a.way, shots, a.query, a.episodes, a.C, a.sk_episodes)}
        res["demo"]["store"]["source"] = str(a.store) if a.store else "extracted in this run"
    res["gather_12000x1280"] = bench_gather(min(a.episodes, 2000), a.C)
    res["versions"] = {name: version(name) for name in ("easyfsl", "scikit-learn")}
    write_result("fewshot", res)


if __name__ == "__main__":
    main()
