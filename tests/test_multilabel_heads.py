"""Multi-label heads (issue 14 part 2): one-vs-rest linear and MLP heads on a multi-label store, end to end through
the CLI (extract -> fit-head -> eval -> predict), against scikit-learn, and the refusals; the per-class AP chart and
the iteratively stratified cross-validation folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from cli.main import app
from probe.errors import ProbeError
from probe.heads import LinearHead, MLPHead, PrototypeHead, load_head, save_head
from probe.heads.evaluate import evaluate
from probe.heads.fit import fit_head
from probe.heads.multilabel import mean_ap, multilabel_folds, multilabel_holdout
from probe.store import FeatureStore, store_from_arrays

from .conftest import TINY

runner = CliRunner()


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def one_line_error(r, match: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and match in r.output and r.output.count("\n") == 1, r.output


def synthetic(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (n, 8) and three labels, each a half-space of its own feature (linearly separable with a margin)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, :3] += np.sign(X[:, :3])  # a gap of 2 around each boundary
    return X, (X[:, :3] > 0).astype(np.uint8)


# ------------------------------------------------------------------------------ the done-when round trip
def colour_image(path: Path, red: bool, blue: bool, seed: int) -> None:
    """A 40x40 image whose red and blue channels encode two independent labels."""
    rng = np.random.default_rng(seed)
    base = np.array([220 if red else 30, 110, 220 if blue else 30])
    arr = np.clip(base + rng.integers(-25, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def colour_manifest(root: Path, splits: tuple[tuple[str, int], ...]) -> Path:
    """``root/imgs/{k}.png``: ``per`` images of each label set (none, blue, red, both) per (split, per), listed in
    ``root/m.csv`` (path,labels,split) in that order; the csv's path."""
    lines, k = ["path,labels,split"], 0
    for split, per in splits:
        for red in (False, True):
            for blue in (False, True):
                for _ in range(per):
                    colour_image(root / "imgs" / f"{k}.png", red, blue, seed=k)
                    labels = "|".join(n for n, on in (("red", red), ("blue", blue)) if on)
                    lines.append(f"imgs/{k}.png,{labels},{split}")
                    k += 1
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml")
    colour_manifest(root, (("train", 6), ("val", 4), ("test", 4)))
    return root


@pytest.fixture(scope="module")
def fitted(manifest) -> tuple[Path, Path, dict]:
    """`probe extract` of the manifest, then `probe fit-head --head linear`: (store, head file, fit summary)."""
    store, head = manifest / "s.h5", manifest / "lin.safetensors"
    r = run("extract", manifest / "m.csv", "--backbone", TINY, "--weights", "random", "--out", store)
    assert r.exit_code == 0, r.output
    return store, head, ok_json("fit-head", store, "--head", "linear", "--n-Cs", "8", "--out", head)


def test_csv_manifest_extract_fit_eval_predict_round_trip(manifest, fitted):
    store, head, fit = fitted
    s = FeatureStore(store)
    assert s.multilabel and s.classes == ["blue", "red"]
    assert fit["multilabel"] and fit["select"] == "map" and fit["n_train"] == 24 and fit["n_test"] == 16
    c = fit["calibration"]
    assert fit["calibration_note"] == "calibrated: per-class Platt scaling on val" and c["method"] == "platt"
    assert set(c["platt"]) == {"blue", "red"} and c["n"] == 16 and c["fit_on"].startswith("val")
    assert set(c["val_before"]) == set(c["test_after"]) == {"ece", "nll", "brier"}
    assert set(fit["thresholds"]["values"]) == {"blue", "red"} and fit["test"]["mAP"] > 0.9
    text = run("fit-head", store, "--head", "linear", "--n-Cs", "8", "--out", manifest / "t.safetensors")
    assert text.exit_code == 0 and "L2 sweep (C: val map)" in text.output and "test  mAP" in text.output, text.output

    ev = ok_json("eval", store, "--head", head, "--split", "test", "--bootstrap", "200")
    h, meta = load_head(head)
    P, Y = h.predict_proba(s.features("test")), s.label_matrix("test")[:, [s.classes.index(c)
                                                                           for c in meta["class_names"]]]
    sk = np.mean([average_precision_score(Y[:, c], P[:, c]) for c in range(Y.shape[1])])
    assert ev["multilabel"] and ev["mAP"] == pytest.approx(sk, abs=1e-9) and ev["n"] == 16
    assert ev["per_class"]["red"]["ap"] == pytest.approx(average_precision_score(Y[:, 1], P[:, 1]), abs=1e-9)
    assert ev["confusion"] is None and 0 <= ev["ci95"]["map"][0] <= ev["mAP"] <= ev["ci95"]["map"][1] <= 1
    assert {"mAP_voc07", "micro_f1", "macro_f1"} <= set(ev)
    cb = ev["calibration"]
    assert cb["calibrated"] and cb["method"] == "platt" and cb["note"] == "calibrated: per-class Platt scaling on val"
    assert set(cb["before"]) == set(cb["after"]) == {"ece", "nll", "brier"} and cb["ece_bins"] == 15
    assert Path(cb["reliability_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(h.platt_, [meta["fit"]["calibration"]["platt"][n] for n in meta["class_names"]],
                               atol=1e-6)
    text = run("eval", store, "--head", head).output
    assert "(multi-label)" in text and "Platt-scaled: ECE" in text and "reliability diagram (all classes pooled)" \
        in text, text
    ap_png = Path(f"{head.with_suffix('')}.test.ap.png")  # the per-class AP chart, beside the head by default
    assert ev["ap_png"] == str(ap_png) and f"per-class AP chart: {ap_png}" in text, text
    with Image.open(ap_png) as im:
        assert im.format == "PNG" and im.size == (715, 275)  # 6.5 x 2.5 inches at 110 dpi: two bars

    test_files = [str(manifest / "imgs" / f"{k}.png") for k in range(40, 56)]
    out = ok_json("predict", *test_files, "--head", head, "--top-k", "2")
    X_test = s.features("test")
    for p, x in zip(out["predictions"], X_test):  # the test rows, in manifest order
        proba = dict(zip(meta["class_names"], h.predict_proba(x[None])[0]))
        want = sorted((c for c in proba if proba[c] >= h.thresholds_[meta["class_names"].index(c)]),
                      key=lambda c: -proba[c])
        assert [lab["class"] for lab in p["labels"]] == want and len(p["top"]) == 2
        assert all(lab["probability"] >= lab["threshold"] for lab in p["labels"])
    assert out["multilabel"] and out["calibrated"] is True and out["method"] == "platt"
    hits = sum(set(lab["class"] for lab in p["labels"]) == {n for n, on in zip(s.classes, y) if on}
               for p, y in zip(out["predictions"], s.label_matrix("test")))
    assert hits >= 12, out  # the label sets are mostly right (16 images)
    one_line_error(run("predict", test_files[0], "--head", head, "--reject", "auto"),
                   "is multi-label (independent sigmoid per class")


# ------------------------------------------------------------------------------ the heads on arrays
def test_linear_ovr_matches_sklearn_per_class_and_ranks_perfectly():
    X, Y = synthetic()
    head = LinearHead(C=0.3, norm="none", tol=1e-6, device="cpu").fit(X, Y)
    assert head.multilabel_ and head.classes_.tolist() == [0, 1, 2] and head.predict_proba(X).shape == (300, 3)
    for c in range(3):
        sk = LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000).fit(X, Y[:, c])
        np.testing.assert_allclose(head.coef_[c], sk.coef_[0], atol=1e-3)
        assert head.intercept_[c] == pytest.approx(sk.intercept_[0], abs=1e-3)
    Xt, Yt = synthetic(200, seed=1)
    P = head.predict_proba(Xt)
    assert all(average_precision_score(Yt[:, c], P[:, c]) > 0.99 for c in range(3))
    assert np.array_equal(head.predict(Xt), (P >= 0.5).astype(int)) and head.decision_function(Xt).shape == (200, 3)
    swept = LinearHead(n_Cs=6, device="cpu").fit(X[:200], Y[:200], eval_set=(X[200:], Y[200:]))
    assert swept.select_ == "map" and [set(r) for r in swept.sweep_][0] == {"C", "val_map", "val_loss"}
    assert swept.val_score_ == pytest.approx(max(r["val_map"] for r in swept.sweep_))
    cv = LinearHead(n_Cs=4, select="macro-f1", folds=3, device="cpu").fit(X, Y)  # no eval_set: k-fold
    assert cv.select_ == "macro-f1" and cv.val_score_ > 0.9


def test_mlp_learns_multilabel_and_stops_on_map():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10)).astype(np.float32)
    Y = np.stack([X[:, 0] > 0, X[:, 1] * X[:, 2] > 0, X[:, 3] > 0.7], 1).astype(np.uint8)  # one label is an XOR
    val = (X[300:], Y[300:])
    head = MLPHead(hidden=(64,), lr=1e-2, epochs=60, device="cpu").fit(X[:300], Y[:300], eval_set=val)
    chance = Y[300:].mean(0).mean()  # mAP of random scores is about the positive rate
    assert head.multilabel_ and head.predict(val[0]).shape == (100, 3)
    assert mean_ap(val[1], head.predict_proba(val[0])) > max(0.8, chance + 0.3)
    by_map = MLPHead(hidden=(64,), lr=1e-2, epochs=30, patience=5, select="map", device="cpu").fit(X[:300], Y[:300],
                                                                                          eval_set=val)
    assert by_map.val_score_ == pytest.approx(max(r["val_map"] for r in by_map.history_))


def test_refusals_are_one_line(tmp_path):
    X, Y = synthetic(120)
    store = store_from_arrays(tmp_path / "ml.h5", X, Y, classes=["a", "b", "c"],
                              splits=["train"] * 80 + ["val"] * 40).path
    for kind in ("prototype", "knn"):
        one_line_error(run("fit-head", store, "--head", kind, "--out", tmp_path / "h.safetensors"),
                       f"is multi-label (3 classes, several per image): the {kind} head takes one class per row")
    with pytest.raises(ProbeError, match="the prototype head takes one class per row"):
        PrototypeHead().fit(X, Y)
    # accuracy / mean-per-class score one class per row: refused on multi-label targets (map is the default)
    one_line_error(run("fit-head", store, "--select", "accuracy", "--out", tmp_path / "h.safetensors"),
                   "select 'accuracy' scores one class per row")
    with pytest.raises(ProbeError, match="select 'mean-per-class' scores one class per row"):
        MLPHead(select="mean-per-class", epochs=1).fit(X, Y)
    one_line_error(run("fit-head", store, "--balanced", "--out", tmp_path / "h.safetensors"),
                   "does not take them")
    head = LinearHead(C=1.0, device="cpu").fit(X, Y)
    with pytest.raises(ProbeError, match="is multi-label .* no unknown rejection"):
        head.fit_rejection(X, Y, X, Y)
    with pytest.raises(ProbeError, match="calibrate: Y must be a \\(120, 3\\) 0/1 matrix"):
        head.calibrate(X, Y[:, 0])
    from probe.heads import calibration as cal

    for reject in ("auto", "0.5"):
        with pytest.raises(ProbeError, match="is multi-label .* pass `reject` none"):
            cal.resolve_threshold(head, reject)
    assert cal.resolve_threshold(head, "none") is None


def test_save_load_round_trip_keeps_thresholds(tmp_path):
    X, Y = synthetic(200)
    for head in (LinearHead(C=1.0, device="cpu"), MLPHead(hidden=(16,), epochs=5, device="cpu")):
        head.fit(X[:150], Y[:150]).fit_thresholds(X[150:], Y[150:])
        assert not np.allclose(head.thresholds_, 0.5)
        path = save_head(head, tmp_path / f"{head.kind}.safetensors", class_names=["a", "b", "c"])
        back, meta = load_head(path)
        assert back.multilabel_ and np.array_equal(back.thresholds_, head.thresholds_)
        np.testing.assert_allclose(back.predict_proba(X), head.predict_proba(X), atol=1e-6)
        assert np.array_equal(back.predict(X), head.predict(X)) and meta["class_names"] == ["a", "b", "c"]
    single, _ = load_head(save_head(LinearHead(C=1.0, device="cpu").fit(X, Y[:, 0]), tmp_path / "s.safetensors"))
    assert single.multilabel_ is False and not hasattr(single, "thresholds_")


def test_fit_head_on_store_without_splits_and_the_mlp(tmp_path):
    X, Y = synthetic(150)
    store = store_from_arrays(tmp_path / "nosplit.h5", X, Y, classes=["a", "b", "c"])
    fit = fit_head(store, MLPHead(hidden=(32,), lr=1e-2, epochs=40, device="cpu"))
    assert fit.n_train == 120 and fit.n_val == 30 and fit.val["mAP"] > 0.9 and fit["select"] == "loss"
    assert fit["thresholds"]["fit_on"] == "val" and fit.test is None


def test_service_classify_lists_labels_above_thresholds(manifest, fitted, tmp_path):
    """Through the Service object (no HTTP server): a multi-label head's classify gives ``labels``."""
    import asyncio

    from probe.serve.service import ServeConfig, load_service

    head = fitted[1]
    svc = load_service(ServeConfig(heads=(f"ml={head}",), state_dir=str(tmp_path / "state"), device="cpu"))
    data = (manifest / "imgs" / "55.png").read_bytes()  # red and blue

    async def go():
        await svc.start()
        try:
            return await svc.classify("ml", data, top_k=2), svc.catalog()
        finally:
            await svc.stop()

    out, catalog = asyncio.run(go())
    assert out["multilabel"] and {lab["class"] for lab in out["labels"]} == {"red", "blue"} and len(out["top"]) == 2
    assert catalog["heads"][0]["multilabel"] is True
    with pytest.raises(ProbeError, match="pass `reject` none"):
        asyncio.run(svc.classify("ml", data, reject="auto"))


def test_bootstrap_map_equals_map_of_each_resample():
    from probe.heads.evaluate import multilabel_stats

    rng = np.random.default_rng(3)
    Y = (rng.random((40, 4)) < 0.3).astype(np.uint8)
    P = np.round(rng.random((40, 4)) * 0.5 + 0.4 * Y, 1)  # rounded: tied scores
    idx = rng.integers(0, 40, size=(25, 40))
    got = multilabel_stats(Y, P)["map"](idx)
    want = [mean_ap(Y[i], P[i]) for i in idx]
    np.testing.assert_allclose(got, np.nan_to_num(want), atol=1e-12)


def test_map_ties_go_to_the_lowest_val_loss_so_thresholds_carry_over():
    """Separable data: mAP is 1 from C=1e-6 on (it only ranks), where every probability sits near its base rate;
    the tie goes to the lowest val cross-entropy, so the refit head's probabilities are confident and the
    thresholds fit on val classify held-out rows (with the first maximum, macro-F1 was 0 on such data)."""
    from probe.heads.multilabel import f1_scores

    rng = np.random.default_rng(3)
    Y = rng.integers(0, 2, size=(120, 2))
    X = (Y * 6.0 - 3.0) @ np.eye(2, 8) + rng.normal(scale=0.3, size=(120, 8))
    X = X.astype(np.float32)
    head = LinearHead(n_Cs=9, device="cpu").fit(X[:60], Y[:60], eval_set=(X[60:90], Y[60:90]))
    maps = [r["val_map"] for r in head.sweep_]
    assert maps[0] == maps[-1] == 1.0  # the tie this is about
    assert head.C_ > head.Cs()[0]
    losses = [r["val_loss"] for r in head.sweep_]
    assert losses[list(head.Cs()).index(head.C_)] == min(losses)
    head.fit_thresholds(X[60:90], Y[60:90])
    assert f1_scores(Y[90:], head.predict_proba(X[90:]), head.thresholds_)["macro_f1"] == 1.0


# ------------------------------------------------------------------------------ calibration (issue 14 part 3)
def noisy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (n, 30) and four labels drawn from a logistic model on weak directions: noisy labels, so a head with
    little regularisation fit on few rows is over-confident."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 30)).astype(np.float32)
    W = np.random.default_rng(99).normal(size=(30, 4)) * 0.4
    return X, (rng.random((n, 4)) < 1 / (1 + np.exp(-(X @ W)))).astype(np.uint8)


def test_platt_lowers_per_class_ece_and_nll_on_held_out_rows_and_keeps_the_ranking():
    from probe.heads import calibration as cal

    X, Y = noisy(900)
    tr, va, te = slice(0, 150), slice(150, 450), slice(450, 900)
    head = LinearHead(C=100.0, device="cpu").fit(X[tr], Y[tr])
    raw = head.predict_proba(X[te])
    before = cal.multilabel_calibration_metrics(raw, Y[te])
    head.calibrate(X[va], Y[va])
    assert head.platt_.shape == (4, 2) and (head.platt_[:, 0] < 1).all()  # over-confident: every slope shrinks
    P = head.predict_proba(X[te])
    after = cal.multilabel_calibration_metrics(P, Y[te])
    assert after["ece"] < 0.7 * before["ece"] and after["nll"] < before["nll"] - 0.05
    assert after["brier"] < before["brier"]
    np.testing.assert_allclose(head.uncalibrated_proba(X[te]), raw)
    assert mean_ap(Y[te], P) == pytest.approx(mean_ap(Y[te], raw), abs=1e-12)  # a > 0: rankings unchanged
    # the metric, by hand for one class: 15 equal-width bins of its probability, |fraction positive - mean p|
    b = np.clip(np.ceil(P[:, 1].astype(np.float64) * 15).astype(int) - 1, 0, 14)
    ece1 = sum(abs(Y[te][b == k, 1].mean() - P[b == k, 1].astype(np.float64).mean()) * (b == k).sum()
               for k in range(15) if (b == k).any()) / len(P)
    per_class = [cal.multilabel_calibration_metrics(P[:, [c]], Y[te][:, [c]])["ece"] for c in range(4)]
    assert per_class[1] == pytest.approx(ece1, abs=1e-9) and after["ece"] == pytest.approx(np.mean(per_class))


def test_platt_matches_sklearn_logistic_regression_on_the_logit():
    from probe.heads.calibration import fit_platt

    rng = np.random.default_rng(1)
    Z = rng.normal(scale=4, size=(400, 2))
    Y = (rng.random((400, 2)) < 1 / (1 + np.exp(-(0.5 * Z + [0.3, -0.7])))).astype(np.uint8)
    ab = fit_platt(Z, Y)
    for c in range(2):  # Platt's smoothed targets as sample-weighted 0/1 rows, no penalty
        n1 = Y[:, c].sum()
        t = np.where(Y[:, c] == 1, (n1 + 1) / (n1 + 2), 1 / (400 - n1 + 2))
        lr = LogisticRegression(C=1e10, tol=1e-12, max_iter=10000).fit(
            np.r_[Z[:, [c]], Z[:, [c]]], np.r_[np.ones(400), np.zeros(400)], sample_weight=np.r_[t, 1 - t])
        np.testing.assert_allclose(ab[c], [lr.coef_[0, 0], lr.intercept_[0]], atol=1e-4)


def test_platt_round_trips_and_a_class_without_val_positives_keeps_identity(tmp_path):
    X, Y = noisy(600, seed=2)
    Yv = Y[200:400].copy()
    Yv[:, 2] = 0  # no positives on val for class 2
    for head in (LinearHead(C=100.0, device="cpu"), MLPHead(hidden=(16,), epochs=5, device="cpu")):
        head.fit(X[:200], Y[:200]).calibrate(X[200:400], Yv).fit_thresholds(X[200:400], Yv)
        assert head.platt_[2].tolist() == [1.0, 0.0] and not np.allclose(head.platt_[[0, 1, 3]], [1.0, 0.0])
        np.testing.assert_allclose(head.predict_proba(X)[:, 2], head.uncalibrated_proba(X)[:, 2], atol=1e-6)
        path = save_head(head, tmp_path / f"{head.kind}.safetensors", class_names=["a", "b", "c", "d"])
        back, _ = load_head(path)
        assert back.platt_.shape == (4, 2) and np.array_equal(back.platt_, head.platt_)
        np.testing.assert_allclose(back.predict_proba(X), head.predict_proba(X), atol=1e-6)
        assert np.array_equal(back.predict(X), head.predict(X))
        assert np.array_equal(head.predict(X), (head.predict_proba(X) >= head.thresholds_).astype(np.int64))
        head.fit(X[:200], Y[:200])  # a new fit forgets the calibration
        assert not hasattr(head, "platt_")


def test_fit_head_fits_platt_before_the_thresholds(tmp_path):
    X, Y = noisy(600, seed=3)
    store = store_from_arrays(tmp_path / "noisy.h5", X, Y, classes=["a", "b", "c", "d"],
                              splits=["train"] * 150 + ["val"] * 200 + ["test"] * 250).path
    fit = fit_head(store, LinearHead(C=100.0, device="cpu"))
    c, h = fit["calibration"], fit.head
    assert c["method"] == "platt" and c["fit_on"] == "val" and c["n"] == 200
    assert c["test_after"]["ece"] < c["test_before"]["ece"] and c["test_after"]["nll"] < c["test_before"]["nll"]
    s = FeatureStore(store)
    want = h.fit_thresholds(s.features("val"), s.label_matrix("val")).thresholds_  # on calibrated val proba
    np.testing.assert_allclose(fit["thresholds"]["values"]["b"], want[1], atol=1e-6)


# ------------------------------------------------------------------------------ per-class AP chart
def test_ap_chart_is_a_png_listed_in_the_report_and_grows_with_the_classes(tmp_path, fitted):
    X, Y = synthetic(200)
    Y = np.c_[Y, np.zeros((200, 1), np.uint8)]  # a fourth class without positives: no AP, left out of the chart
    head = LinearHead(C=1.0, device="cpu").fit(X[:100], Y[:100])
    report = evaluate(head, X[100:], Y[100:], bootstrap=0, ap_png=tmp_path / "ap.png",
                      reliability_png=tmp_path / "rel.png")  # arrays in: both charts reach the multi-label report
    assert report["ap_png"] == str(tmp_path / "ap.png") and report["per_class"]["3"]["ap"] is None
    assert report.calibration["reliability_png"] == str(tmp_path / "rel.png")
    with Image.open(tmp_path / "ap.png") as im:
        assert im.format == "PNG" and im.size == (715, 275)
    many = np.random.default_rng(0).integers(0, 2, size=(60, 40))
    wide = LinearHead(C=1.0, device="cpu").fit(np.random.default_rng(1).normal(size=(60, 5)), many)
    path = evaluate(wide, np.zeros((60, 5)), many, bootstrap=0).ap_png(tmp_path / "many.png", "40 classes")
    assert path == tmp_path / "many.png"  # the report's method returns the path, as confusion_png does
    with Image.open(path) as im:
        assert im.size == (715, round(110 * (0.22 * 40 + 1.3)))  # a 0.22-inch row per class
    from probe.heads.evaluate import AP_BARS, ap_png

    ap = list(np.linspace(0, 1, 500)) + [None]  # 500 classes: the worst and best 30 drawn, the mAP over all 500
    with Image.open(ap_png(ap, [f"c{i}" for i in range(501)], tmp_path / "500.png")) as im:
        assert im.size == (715, round(110 * (0.22 * AP_BARS + 1.3)))

    store, head_file, _ = fitted  # `probe eval --png PATH`: the chart there, the reliability diagram beside it
    ev = ok_json("eval", store, "--head", head_file, "--png", tmp_path / "mine.png", "--bootstrap", "0")
    assert ev["ap_png"] == str(tmp_path / "mine.png") and Path(ev["ap_png"]).read_bytes()[:4] == b"\x89PNG"
    assert ev["calibration"]["reliability_png"] == str(tmp_path / "mine.reliability.png")


# ------------------------------------------------------------------------------ stratified cross-validation folds
def test_multilabel_folds_keep_label_shares_closer_than_kfold():
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(0)
    Y = (rng.random((600, 6)) < [0.5, 0.2, 0.08, 0.03, 0.015, 0.01]).astype(np.uint8)
    assert Y.sum(0).tolist() == [308, 114, 49, 29, 11, 5]

    def deviation(folds) -> float:  # mean over folds and labels of |share in the fold - share overall|
        return float(np.mean([np.abs(Y[test].mean(0) - Y.mean(0)).mean() for _, test in folds]))

    folds = multilabel_folds(Y, 5, seed=0)
    ours = deviation(folds)
    kfold = min(deviation(KFold(5, shuffle=True, random_state=s).split(Y)) for s in range(5))
    assert ours == pytest.approx(0.00244, abs=1e-5) and ours < 0.25 * kfold, (ours, kfold)  # kfold: 0.0124
    counts = np.array([Y[test].sum(0) for _, test in folds])  # (5 folds, 6 labels) positives per fold
    p = Y.sum(0).astype(np.int64)  # (6,) positives per label
    assert ((counts == p // 5) | (counts == -(-p // 5))).all()  # floor or ceil of p / 5, for every label
    assert counts[:, 5].tolist() == [1] * 5  # the rarest label's 5 positives: one in each fold
    assert [len(test) for _, test in folds] == [120] * 5
    for train, test in folds:  # sklearn's (train, test) pairs: complements, sorted
        assert np.array_equal(np.sort(np.r_[train, test]), np.arange(600)) and np.all(np.diff(test) > 0)
    assert np.array_equal(np.sort(np.concatenate([t for _, t in folds])), np.arange(600))


def test_multilabel_holdout_keeps_each_label_share_and_refuses_tiny_input():
    rng = np.random.default_rng(0)
    Y = (rng.random((600, 6)) < [0.5, 0.2, 0.08, 0.03, 0.015, 0.01]).astype(np.uint8)
    train, held = multilabel_holdout(Y, 0.2, seed=0)
    assert len(held) == 120 and np.array_equal(np.sort(np.r_[train, held]), np.arange(600))
    p = Y.sum(0)
    assert (np.abs(Y[held].sum(0) - 0.2 * p) <= 1).all(), (Y[held].sum(0), p)  # each label's 20%, within one row
    a, b = multilabel_holdout(np.array([[1, 0], [1, 0]]), 0.2, seed=0)  # two rows: one each, never an empty part
    assert len(a) == len(b) == 1
    for bad, fraction in ((np.ones((1, 2)), 0.2), (np.ones((4, 2)), 1.0), (np.ones(4), 0.2)):
        with pytest.raises(ProbeError):
            multilabel_holdout(bad, fraction)
    with pytest.raises(ProbeError):  # a multi-label MLP on one row: no holdout to early-stop on (it trained on none)
        MLPHead(epochs=2).fit(np.ones((1, 4), np.float32), np.array([[1, 0]]))


def test_multilabel_folds_spread_a_rare_label_and_are_seeded():
    Y = np.zeros((40, 3), np.uint8)
    Y[:, 0] = 1  # every row: no information
    Y[[3, 9, 14, 22, 31], 1] = 1  # 5 positives, 5 folds: one each
    Y[[0, 5, 6, 7, 8, 20, 33], 2] = 1  # 7 positives: 1 or 2 per fold
    folds = multilabel_folds(Y, 5, seed=0)
    assert sorted(int(Y[test, 1].sum()) for _, test in folds) == [1, 1, 1, 1, 1]
    assert sorted(int(Y[test, 2].sum()) for _, test in folds) == [1, 1, 1, 2, 2]
    again = multilabel_folds(Y, 5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, multilabel_folds(Y, 5, seed=1)))
    assert all(len(test) for _, test in multilabel_folds(np.zeros((3, 2)), 3))  # no labels at all: one row each
    with pytest.raises(ProbeError, match=r"n_splits must be an integer in \[2, 40\] \(the number of rows\), got 41"):
        multilabel_folds(Y, 41)
    with pytest.raises(ProbeError, match=r"Y must be an \(N, C\) 0/1 label matrix, got shape \(40,\)"):
        multilabel_folds(Y[:, 0] * 2, 5)
