"""Protocol options of the linear probe and the MLP (issue 14): the Kornblith grid, the metric that selects C or the
early stop, and bootstrap intervals in `probe eval`. Synthetic Gaussian features keep every test fast and exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from typer.testing import CliRunner

from cli.main import app
from probe.errors import ProbeError
from probe.heads import LinearHead, MLPHead, PrototypeHead
from probe.heads.evaluate import bootstrap_intervals, classification_stats, evaluate
from probe.heads.scoring import score
from probe.store import store_from_arrays

runner = CliRunner()
GRID = {"n_Cs": 12, "C_range": (1e-4, 1e2), "device": "cpu"}


def imbalanced(seed: int = 2, n: tuple[int, int] = (150, 15), dim: int = 20, shift: float = 2.0):
    """Two Gaussian classes, 10:1, the minority shifted by ``shift`` along one axis: the C with the best accuracy
    leans on the majority, the best mean-per-class C is weaker regularisation. (X, y), (X_val, y_val)."""
    rng = np.random.default_rng(seed)

    def draw():
        X = rng.normal(size=(sum(n), dim)).astype(np.float32)
        X[n[0]:, 0] += shift
        return X, np.r_[np.zeros(n[0], np.int64), np.ones(n[1], np.int64)]

    return draw(), draw()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An imbalanced single-label store with train/val/test splits (3 classes, 60/12/12 rows per split)."""
    rng = np.random.default_rng(0)
    per_split = np.r_[np.zeros(60), np.ones(12), np.full(12, 2)].astype(np.int64)
    y = np.tile(per_split, 3)
    X = rng.normal(size=(len(y), 16)).astype(np.float32) + 1.5 * np.eye(16, dtype=np.float32)[y]
    splits = [s for s in ("train", "val", "test") for _ in per_split]
    path = tmp_path_factory.mktemp("protocol") / "imbalanced.h5"
    store_from_arrays(path, X, y, splits=splits, classes=["common", "rare", "scarce"])
    return path


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails(*args, match: tuple[str, ...]) -> str:
    r = cli(*args)
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output  # one line
    for m in match:
        assert m in r.output, r.output
    return r.output


# ------------------------------------------------------------------------------------------------ the grid
def test_kornblith_grid_is_45_log_spaced_strengths_on_1e6_to_1e5():
    Cs = LinearHead(grid="kornblith").Cs()
    assert len(Cs) == 45 and Cs[0] == pytest.approx(1e-6, rel=1e-12) and Cs[-1] == pytest.approx(1e5, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.log10(Cs)), 11 / 44, rtol=1e-9)  # evenly spaced in log10
    default = LinearHead().Cs()
    assert len(default) == 25 and default[-1] == pytest.approx(1e6)  # today's default is unchanged
    (X, y), val = imbalanced()
    head = LinearHead(grid="kornblith", device="cpu").fit(X, y, eval_set=val)
    np.testing.assert_array_equal([r["C"] for r in head.sweep_], Cs)  # the sweep runs that grid


def test_kornblith_grid_refuses_what_would_change_it():
    (X, y), _ = imbalanced()
    with pytest.raises(ProbeError, match=r"grid 'kornblith' is fixed at 45 strengths .*got n_Cs=10"):
        LinearHead(grid="kornblith", n_Cs=10).fit(X, y)
    with pytest.raises(ProbeError, match=r"grid 'kornblith' is a sweep, but C=1 is fixed"):
        LinearHead(grid="kornblith", C=1.0).fit(X, y)
    with pytest.raises(ProbeError, match=r"unknown grid 'dinov2': grid must be one of default, kornblith"):
        LinearHead(grid="dinov2").fit(X, y)


# ---------------------------------------------------------------------------------------------- selection
def test_mean_per_class_picks_another_C_than_accuracy_on_imbalanced_data():
    (X, y), val = imbalanced()
    acc = LinearHead(**GRID).fit(X, y, eval_set=val)
    mpc = LinearHead(**GRID, select="mean-per-class").fit(X, y, eval_set=val)
    Cs = acc.Cs()
    assert acc.C_ == Cs[np.argmax([r["val_accuracy"] for r in acc.sweep_])]
    assert mpc.C_ == Cs[np.argmax([r["val_mean_per_class"] for r in mpc.sweep_])]
    assert mpc.C_ != acc.C_  # the point of the option
    # the same solves underneath: the mean-per-class sweep also records accuracy, whose best is accuracy's C
    assert Cs[np.argmax([r["val_accuracy"] for r in mpc.sweep_])] == acc.C_
    at_acc_C = mpc.sweep_[int(np.flatnonzero(Cs == acc.C_)[0])]
    assert mpc.val_score_ > at_acc_C["val_mean_per_class"] and mpc.val_accuracy_ < acc.val_accuracy_


@pytest.mark.parametrize("select, sklearn_metric", [
    ("mean-per-class", balanced_accuracy_score),
    ("macro-f1", lambda y, p: f1_score(y, p, average="macro")),
])
def test_select_scores_agree_with_sklearn(select, sklearn_metric):
    (X, y), (Xv, yv) = imbalanced()
    head = LinearHead(**GRID, select=select, refit=False).fit(X, y, eval_set=(Xv, yv))  # coef_: the sweep's
    key = "val_" + select.replace("-", "_")
    assert head.val_score_ == max(r[key] for r in head.sweep_)
    assert head.val_score_ == pytest.approx(sklearn_metric(yv, head.predict(Xv)), abs=1e-12)


def test_select_by_cross_validation_without_a_validation_set():
    (X, y), _ = imbalanced()
    head = LinearHead(**GRID, select="macro-f1", folds=3).fit(X, y)
    scores = [r["val_macro_f1"] for r in head.sweep_]
    assert head.C_ == head.Cs()[np.argmax(scores)] and head.val_score_ == max(scores)


def test_score_matches_sklearn_with_weights():
    rng = np.random.default_rng(1)
    y, p, w = rng.integers(0, 4, 50), rng.integers(0, 4, 50), rng.integers(0, 3, 50).astype(float)
    assert score("mean-per-class", y, p, 4, w) == pytest.approx(balanced_accuracy_score(y, p, sample_weight=w))
    assert score("macro-f1", y, p, 4, w) == pytest.approx(f1_score(y, p, average="macro", sample_weight=w))
    assert score("accuracy", y, p, 4, w) == pytest.approx(np.average(y == p, weights=w))


def test_select_map_and_unknown_metrics_are_refused():
    (X, y), val = imbalanced()
    for head in (LinearHead(**GRID, select="map"), MLPHead(select="map", epochs=2, device="cpu")):
        with pytest.raises(ProbeError, match=r"select 'map' .* needs a multi-label store; this .* head takes one "
                                             r"class per row: use accuracy, mean-per-class or macro-f1"):
            head.fit(X, y, eval_set=val)
    with pytest.raises(ProbeError, match=r"unknown select 'f1': select must be one of accuracy, macro-f1, map, "
                                         r"mean-per-class"):
        LinearHead(select="f1").fit(X, y)
    with pytest.raises(ProbeError, match=r"select must be one of accuracy, loss, macro-f1, map, mean-per-class"):
        MLPHead(select="top5").fit(X, y)


def test_mlp_early_stop_follows_the_select_metric():
    (X, y), val = imbalanced()
    kw = dict(hidden=(32,), epochs=100, patience=100, dropout=0.0, lr=1e-2, device="cpu")
    by_loss = MLPHead(**kw).fit(X, y, eval_set=val)
    losses = [r["val_loss"] for r in by_loss.history_]
    assert by_loss.select == "loss" and by_loss.best_epoch_ == 1 + int(np.argmin(losses))
    by_mpc = MLPHead(**kw, select="mean-per-class").fit(X, y, eval_set=val)
    mpc, losses = [r["val_mean_per_class"] for r in by_mpc.history_], [r["val_loss"] for r in by_mpc.history_]
    best = max(range(len(mpc)), key=lambda i: (mpc[i], -losses[i]))  # the best metric, ties to the lower loss
    assert by_mpc.best_epoch_ == 1 + best and by_mpc.val_score_ == max(mpc)
    assert by_mpc.best_epoch_ != 1 + int(np.argmin(losses))  # not the loss's choice
    assert by_mpc.val_accuracy_ == pytest.approx(
        np.mean(by_mpc.predict(val[0]) == val[1]))  # the kept weights are the best epoch's


# -------------------------------------------------------------------------------------------------- CLI
def test_fit_head_cli_reports_grid_and_select(store, tmp_path):
    r = cli("fit-head", store, "--out", tmp_path / "h.safetensors", "--grid", "kornblith", "--select",
            "mean-per-class", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["grid"] == "kornblith" and s["select"] == "mean-per-class" and len(s["sweep"]) == 45
    best = max(s["sweep"], key=lambda row: row["val_mean_per_class"])
    assert s["C"] == best["C"] and s["val_score"] == best["val_mean_per_class"] and s["refit_on"] == "train+val"
    text = cli("fit-head", store, "--out", tmp_path / "h.safetensors", "--grid", "kornblith", "--select",
               "mean-per-class")
    assert "L2 sweep, kornblith grid (C: val mean-per-class)" in text.output
    assert f"chose C={s['C']:.3g} (val mean-per-class " in text.output
    mlp = cli("fit-head", store, "--head", "mlp", "--out", tmp_path / "m.safetensors", "--epochs", "5",
              "--hidden", "8", "--select", "macro-f1", "--json")
    assert mlp.exit_code == 0 and json.loads(mlp.stdout)["select"] == "macro-f1", mlp.output


def test_fit_head_cli_errors(store, tmp_path):
    out = tmp_path / "h.safetensors"
    fails("fit-head", store, "--out", out, "--select", "map",
          match=("--select 'map' (mean average precision) needs a multi-label store", "has one label per image",
                 "use accuracy, mean-per-class or macro-f1"))
    fails("fit-head", store, "--out", out, "--select", "top1", match=("'top1'", "accuracy, macro-f1, map, mean-per"))
    fails("fit-head", store, "--out", out, "--grid", "dense", match=("'dense'", "default, kornblith"))
    fails("fit-head", store, "--out", out, "--grid", "kornblith", "--n-Cs", "8", match=("--grid 'kornblith'",
                                                                                       "--n-Cs=8"))
    fails("fit-head", store, "--head", "knn", "--out", out, "--select", "accuracy",
          match=("head 'knn' has no parameter '--select'",))
    assert not out.exists()


# ------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_contains_the_estimate_and_narrows_with_rows():
    rng = np.random.default_rng(0)

    def interval(n, seed):
        y = rng.integers(0, 5, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 5, n))
        stats = classification_stats(y, p, 5)
        return bootstrap_intervals(stats, n, 500, seed), y, p

    ci, y, p = interval(300, seed=3)
    again = bootstrap_intervals(classification_stats(y, p, 5), 300, 500, seed=3)
    other = bootstrap_intervals(classification_stats(y, p, 5), 300, 500, seed=4)
    assert again == ci and other != ci
    acc, bal = float(np.mean(y == p)), balanced_accuracy_score(y, p)
    assert ci["accuracy"][0] < acc < ci["accuracy"][1] and ci["balanced_accuracy"][0] < bal < ci["balanced_accuracy"][1]
    big, _, _ = interval(30_000, seed=3)
    width = {k: v[1] - v[0] for k, v in ci.items()}
    assert all(big[k][1] - big[k][0] < width[k] / 5 for k in width)  # ~1/sqrt(100): 10x narrower


def test_bootstrap_statistics_match_sklearn_on_each_resample():
    rng = np.random.default_rng(5)
    y, p = rng.integers(0, 6, 40), rng.integers(0, 6, 40)
    idx = rng.integers(0, 40, (7, 40))
    stats = classification_stats(y, p, 6)
    np.testing.assert_allclose(stats["accuracy"](idx), [np.mean(y[i] == p[i]) for i in idx])
    np.testing.assert_allclose(stats["balanced_accuracy"](idx), [balanced_accuracy_score(y[i], p[i]) for i in idx])


def test_evaluate_reports_intervals_and_refuses_bad_counts():
    (X, y), (Xv, yv) = imbalanced()
    head = PrototypeHead().fit(X, y)
    r = evaluate(head, Xv, yv, bootstrap=200, seed=1).to_dict()
    assert r["bootstrap"] == {"resamples": 200, "seed": 1, "level": 0.95}
    assert set(r["ci95"]) == {"accuracy", "balanced_accuracy"}
    assert r["ci95"]["accuracy"][0] <= r["accuracy"] <= r["ci95"]["accuracy"][1]
    assert "ci95" not in evaluate(head, Xv, yv, bootstrap=0).to_dict()
    for bad in (-1, 10, 2.5):
        with pytest.raises(ProbeError, match=rf"bootstrap must be a number of resamples >= 100 \(or 0 for no "
                                             rf"intervals\), got {bad}"):
            evaluate(head, Xv, yv, bootstrap=bad)


def test_eval_cli_prints_and_writes_intervals(store, tmp_path):
    head = tmp_path / "h.safetensors"
    assert cli("fit-head", store, "--out", head, "--n-Cs", "4").exit_code == 0
    r = cli("eval", store, "--head", head, "--json", "--seed", "7")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["bootstrap"] == {"resamples": 1000, "seed": 7, "level": 0.95}
    lo, hi = d["ci95"]["accuracy"]
    assert lo <= d["accuracy"] <= hi and lo < hi
    text = cli("eval", store, "--head", head, "--seed", "7").output
    assert f"accuracy {100 * d['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "95% bootstrap intervals, 1000 resamples, seed 7" in text
    off = json.loads(cli("eval", store, "--head", head, "--json", "--bootstrap", "0").stdout)
    assert "ci95" not in off
    fails("eval", store, "--head", head, "--bootstrap", "20", match=("bootstrap must be a number of resamples >= 100",
                                                                     "got 20"))
