"""The linear head at scale: loss passes in bounded row chunks, normalisation without full-size temporaries, the C
sweep on a stratified subsample of ``sweep_rows`` training rows, fit-head's packed rows and its progress bars."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from typer.testing import CliRunner

from cli.main import app
from probe.errors import ProbeError
from probe.heads import LinearHead
from probe.heads import features as feats
from probe.heads import fit as fitmod
from probe.heads import linear as lin
from probe.heads.features import apply_norm, fit_norm, stratified_subsample
from probe.heads.fit import fit_head
from probe.store import FeatureStore, store_from_arrays

GRID = {"n_Cs": 5, "C_range": (1e-3, 1e1), "device": "cpu"}


def blobs(n: int, k: int = 4, d: int = 12, seed: int = 0, spread: float = 1.2):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * spread
    y = rng.integers(0, k, n)
    return (rng.standard_normal((n, d)) + centres[y]).astype(np.float32), y


# ------------------------------------------------------------------------------------------ chunked loss pass
@pytest.mark.parametrize("ovr", [False, True])
def test_chunked_loss_and_gradient_equal_the_unchunked_pass(ovr):
    rng = np.random.default_rng(0)
    N, D, K, s = 97, 9, 5, 3
    Z = torch.from_numpy(rng.standard_normal((N, D)).astype(np.float32))
    y = torch.from_numpy((rng.random((N, K)) < 0.3).astype(np.float32)) if ovr else torch.from_numpy(
        rng.integers(0, K, N))
    ww, lam = lin._objective(y, torch.from_numpy(rng.random(N).astype(np.float32) + 0.5), np.array([0.1, 1, 10]))
    theta = torch.from_numpy(rng.standard_normal((s, D * K + K)).astype(np.float32))
    A = torch.from_numpy(rng.standard_normal((D, K)).astype(np.float32))
    whole = lin._loss_grad(Z, y, ww[:, None, None], theta, lam, A, chunk=1 << 30)
    for chunk in (1, s * K, 7 * s * K):  # one row, one row, 7 rows per chunk (97 = 13 x 7 + 6)
        f, g = lin._loss_grad(Z, y, ww[:, None, None], theta, lam, A, chunk=chunk)
        torch.testing.assert_close(f, whole[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, whole[1], rtol=1e-4, atol=1e-6)
    # and the single-strength solver's pass, which one L-BFGS iteration reads
    W0, b0 = torch.zeros(D, K), torch.zeros(K)
    w = torch.ones(N)
    one = lin._solve(Z, y, w, 1.0, W0, b0, 1, 1e-4, chunk=1 << 30)
    tiny = lin._solve(Z, y, w, 1.0, W0, b0, 1, 1e-4, chunk=2 * K)
    torch.testing.assert_close(tiny[0], one[0], rtol=1e-4, atol=1e-5)


def test_chunk_sums_bound_the_rows_per_part():
    seen = []

    def part(r: slice):
        seen.append(r.stop - r.start)
        return (torch.tensor(float(r.stop - r.start)),)

    assert lin._chunk_sums(10, 3, part, chunk=7)[0] == 10  # 7 // 3 = 2 rows a part
    assert seen == [2] * 5
    seen.clear()
    lin._chunk_sums(10, 3, part, chunk=1 << 20)
    assert seen == [10]  # everything in one part when it fits: the unchunked computation itself


def test_a_head_fit_with_a_tiny_chunk_bound_is_the_same_head(monkeypatch):
    X, y = blobs(400)
    Xv, yv = blobs(120, seed=1)
    ref = LinearHead(**GRID).fit(X, y, eval_set=(Xv, yv))
    monkeypatch.setattr(lin, "CHUNK", 64)  # 64 // (5 strengths x 4 classes) = 3 rows a chunk
    small = LinearHead(**GRID).fit(X, y, eval_set=(Xv, yv))
    assert small.C_ == ref.C_ and [r["val_accuracy"] for r in small.sweep_] == [r["val_accuracy"] for r in ref.sweep_]
    np.testing.assert_allclose(small.coef_, ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())
    np.testing.assert_array_equal(small.predict(Xv), ref.predict(Xv))


# ------------------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("norm", ["none", "l2", "cl2n", "standardize", "l2+standardize"])
@pytest.mark.parametrize("weighted", [False, True])
def test_blockwise_norm_equals_the_whole_array_computation(monkeypatch, norm, weighted):
    X, _ = blobs(50, d=6)
    X *= np.linspace(0.1, 30, 6, dtype=np.float32)
    sw = np.linspace(0.2, 3, 50) if weighted else None
    whole = fit_norm(X, norm, sw)
    Z = apply_norm(X, whole)
    monkeypatch.setattr(feats, "BLOCK", 7)  # 50 rows: 8 blocks
    blocks = fit_norm(X, norm, sw)
    for k in ("mean", "scale"):
        np.testing.assert_allclose(blocks[k], whole[k], rtol=2e-6)
    out = np.full((60, 6), np.nan, np.float32)
    assert apply_norm(X, whole, out=out[:50]) is not None and np.isnan(out[50:]).all()
    np.testing.assert_array_equal(out[:50], Z)  # written in place, row for row the same numbers


def test_linear_fit_holds_about_one_normalised_copy_of_the_features():
    """numpy's allocations (tracemalloc sees them): the normalised train + val rows once, in one buffer the refit
    solves on. Before, normalisation made three train-size arrays and the refit concatenated train and val."""
    X, y = blobs(32_000, k=3, d=256)
    Xv, yv = blobs(8_000, k=3, d=256, seed=1)
    size = X.nbytes + Xv.nbytes
    tracemalloc.start()
    try:
        head = LinearHead(n_Cs=2, C_range=(1e-2, 1.0), max_iter=3, max_iter_final=3, device="cpu",
                          sweep_rows=None).fit(X, y, eval_set=(Xv, yv))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert head.refit and head.sweep_rows_ == 32_000
    assert peak < 1.6 * size, (peak / size)


def test_copy_false_normalises_the_training_rows_in_place(monkeypatch):
    """copy=False (scikit-learn's StandardScaler(copy=False)): X becomes the normalised rows and no array its size
    is allocated; the fit is the copy's, number for number. A read-only X, and a fit with eval_set (which needs
    room for the validation rows), are copied and left as they were."""
    X, y = blobs(20_000, k=3, d=256)
    monkeypatch.setattr(feats, "BLOCK", 1024)  # the statistics' temporaries: 1,024 rows (8,192 would be 40% of X)
    ref = LinearHead(C=0.1, max_iter_final=5, device="cpu").fit(X, y)
    mine = X.copy()
    tracemalloc.start()
    try:
        head = LinearHead(C=0.1, max_iter_final=5, device="cpu", copy=False).fit(mine, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.3 * X.nbytes, peak / X.nbytes  # the copy=True fit allocates at least X.nbytes
    np.testing.assert_array_equal(head.coef_, ref.coef_)
    np.testing.assert_array_equal(mine, feats.apply_norm(X, ref.norm_))  # X is now the normalised rows
    np.testing.assert_array_equal(head.predict_proba(X), ref.predict_proba(X))
    frozen = X.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(LinearHead(C=0.1, max_iter_final=5, device="cpu", copy=False).fit(frozen, y).coef_,
                                  ref.coef_)
    mine = X.copy()
    LinearHead(C=0.1, max_iter_final=5, device="cpu", copy=False).fit(mine[:15_000], y[:15_000],
                                                                     eval_set=(mine[15_000:], y[15_000:]))
    np.testing.assert_array_equal(mine, X)


def test_choose_C_is_the_fits_sweep_without_the_fit_or_a_normalised_copy(monkeypatch):
    """choose_C: the strength, sweep and scores fit would give (subsample and cross-validation, weights, eval_set,
    multi-label), without the final fit -- no weights, so the head refuses to predict -- and, beside X, numpy holds
    the subsample's rows, not a normalised copy of every row (which fit makes)."""
    from sklearn.exceptions import NotFittedError

    X, y = blobs(20_000, k=3, d=256)
    monkeypatch.setattr(feats, "BLOCK", 1024)  # the statistics' temporaries: 1,024 rows
    kw = {**GRID, "sweep_rows": 2_000, "seed": 3}
    LinearHead(**kw).choose_C(X[:3_000], y[:3_000])  # first calls' imports and caches out of the count
    tracemalloc.start()
    try:
        head = LinearHead(**kw).choose_C(X, y)
        chose = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ref = LinearHead(**kw).fit(X, y)
        fitted = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chose < 0.4 * X.nbytes <= X.nbytes <= fitted, (chose / X.nbytes, fitted / X.nbytes)
    assert (head.C_, head.sweep_, head.val_score_, head.sweep_rows_) == (ref.C_, ref.sweep_, ref.val_score_, 2_000)
    assert not hasattr(head, "coef_")
    with pytest.raises(NotFittedError):
        head.predict(X)
    np.testing.assert_array_equal(head.set_params(C=head.C_).fit(X, y).coef_,
                                  LinearHead(**{**kw, "C": ref.C_}).fit(X, y).coef_)  # fit at C_ makes it whole
    head.set_params(C=None).choose_C(X[:5_000], y[:5_000])  # a new choice drops the previous fit's weights
    assert not hasattr(head, "coef_")
    w = np.random.default_rng(0).uniform(0.2, 3, 5_000)
    Xv, yv = blobs(1_000, k=3, d=256, seed=1)
    Y = np.stack([y[:5_000] == 0, y[:5_000] != 2], 1).astype(np.float32)
    X5, y5 = X[:5_000], y[:5_000]
    for opts, args, more in [({"balanced": True}, (X5, y5), {"sample_weight": w}),
                             ({}, (X5, y5), {"eval_set": (Xv, yv)}), ({}, (X5, Y), {})]:
        a, b = LinearHead(**kw, **opts).choose_C(*args, **more), LinearHead(**kw, **opts).fit(*args, **more)
        assert (a.C_, a.sweep_, a.val_score_) == (b.C_, b.sweep_, b.val_score_), (opts, more)
    with pytest.raises(ProbeError, match="fixed at 0.1"):
        LinearHead(C=0.1).choose_C(X, y)


# ---------------------------------------------------------------------------------------------- sweep_rows
def test_stratified_subsample_keeps_class_shares_and_is_seeded():
    y = np.repeat([0, 1, 2, 3], [600, 300, 99, 1])
    idx = stratified_subsample(y, 100, seed=3)
    assert len(idx) == 101 and np.all(np.diff(idx) > 0)  # 60 + 30 + 10 + the lone row of class 3
    np.testing.assert_array_equal(np.bincount(y[idx]), [60, 30, 10, 1])
    np.testing.assert_array_equal(idx, stratified_subsample(y, 100, seed=3))
    assert not np.array_equal(idx, stratified_subsample(y, 100, seed=4))
    np.testing.assert_array_equal(np.bincount(y[stratified_subsample(y, 10)]), [6, 3, 2, 1])  # >= 2 a class


def on_rows(head: LinearHead, X: np.ndarray, y: np.ndarray, rows: np.ndarray, eval_set=None, **kw) -> LinearHead:
    """The sweep of ``head`` run by hand on ``rows`` of X, normalised with the head's statistics (of every row)."""
    params = {**GRID, "sweep_rows": None, "norm": "none", **kw}
    return LinearHead(**params).fit(apply_norm(X[rows], head.norm_), y[rows], eval_set=eval_set)


def test_sweep_on_a_subsample_then_the_final_fit_on_every_row():
    X, y = blobs(600)
    Xv, yv = blobs(200, seed=1)
    head = LinearHead(**GRID, sweep_rows=150, seed=2).fit(X, y, eval_set=(Xv, yv))
    sub = stratified_subsample(y, 150, 2)
    assert head.sweep_rows_ == len(sub) == 150
    on_sub = on_rows(head, X, y, sub, eval_set=(apply_norm(Xv, head.norm_), yv))
    # the sweep is the subsample's (same scores, same C) ...
    assert head.sweep_ == on_sub.sweep_ and head.C_ == on_sub.C_
    # ... but the statistics and the final fit are every row's: train + val (refit) at the chosen C
    fixed = LinearHead(C=head.C_, norm="none", device="cpu").fit(apply_norm(np.concatenate([X, Xv]), head.norm_),
                                                                 np.concatenate([y, yv]))
    np.testing.assert_allclose(head.norm_["mean"], X.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.coef_, fixed.coef_, atol=2e-3)
    assert np.abs(head.decision_function(X) - on_sub.decision_function(apply_norm(X, head.norm_))).max() > 0.1
    no_refit = LinearHead(**GRID, sweep_rows=150, seed=2, refit=False).fit(X, y, eval_set=(Xv, yv))
    train_only = LinearHead(C=head.C_, device="cpu").fit(X, y)
    np.testing.assert_allclose(no_refit.decision_function(X), train_only.decision_function(X), atol=2e-2)


def test_cross_validation_on_a_subsample_then_the_final_fit_on_every_row():
    X, y = blobs(600)
    head = LinearHead(**GRID, folds=3, sweep_rows=200).fit(X, y)
    on_sub = on_rows(head, X, y, stratified_subsample(y, 200, 0), folds=3)
    assert head.sweep_rows_ == 200 and head.C_ == on_sub.C_ and head.sweep_ == on_sub.sweep_
    fixed = LinearHead(C=head.C_, device="cpu").fit(X, y)
    np.testing.assert_allclose(head.decision_function(X), fixed.decision_function(X), atol=2e-2)


@pytest.mark.parametrize("eval_set", [True, False])
def test_no_more_rows_than_sweep_rows_is_the_same_fit_bit_for_bit(eval_set):
    X, y = blobs(300)
    kw = {"eval_set": blobs(100, seed=1)} if eval_set else {}
    a = LinearHead(**GRID, folds=3, sweep_rows=300).fit(X, y, **kw)
    b = LinearHead(**GRID, folds=3, sweep_rows=None).fit(X, y, **kw)
    assert a.sweep_rows_ == b.sweep_rows_ == 300 and a.sweep_ == b.sweep_
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)


def test_multilabel_sweep_on_a_subsample():
    X, y = blobs(500)
    Y = np.eye(4, dtype=np.float32)[y]
    Y[:, 0] = np.maximum(Y[:, 0], X[:, 0] > 1)
    head = LinearHead(**GRID, sweep_rows=120).fit(X, Y, eval_set=(X[:100], Y[:100]))
    assert head.multilabel_ and 100 <= head.sweep_rows_ <= 140  # about 120: iteratively stratified
    assert head.coef_.shape == (4, 12)


# ------------------------------------------------------------------------------------------------ fit-head
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    X, y = blobs(700, k=3)
    splits = np.array(["train"] * 500 + ["val"] * 100 + ["test"] * 100)
    rng = np.random.default_rng(5)
    order = rng.permutation(700)  # splits interleaved in the store, as in a real one
    path = tmp_path_factory.mktemp("scale") / "s.h5"
    store_from_arrays(path, X[order], y[order], splits=splits[order].tolist(), classes=["a", "b", "c"])
    return path


def test_features_at_reads_rows_in_their_order(store, monkeypatch):
    import probe.store

    monkeypatch.setattr(probe.store, "READ_ROWS", 64)
    fs = FeatureStore(store)
    rows = np.random.default_rng(0).permutation(700)[:333]
    np.testing.assert_array_equal(fs.features_at(rows), fs.features()[rows])
    X = np.arange(20.0).reshape(10, 2)
    assert np.shares_memory(fitmod._take(X, np.arange(3, 7)), X)  # a run: a view
    np.testing.assert_array_equal(fitmod._take(X, np.array([1, 4])), X[[1, 4]])


def test_fit_head_reports_the_subsample_and_matches_a_fit_on_the_split_rows(store, capsys):
    fit = fit_head(store, LinearHead(**GRID, sweep_rows=200))
    s = fit.to_dict()
    assert s["sweep_rows"] == 200 and s["n_train"] == 500
    fs = FeatureStore(store)
    sp, X, y = fs.splits(), fs.features(), fs.labels()
    tr, va = sp == "train", sp == "val"
    by_hand = LinearHead(**GRID, sweep_rows=200).fit(X[tr], y[tr], eval_set=(X[va], y[va]))
    np.testing.assert_array_equal(fit.head.coef_, by_hand.coef_)
    assert capsys.readouterr().err == ""  # progress is off by default


def test_fit_head_progress_shows_the_sweep_and_the_fits(store, capsys):
    fit_head(store, LinearHead(**GRID, sweep_rows=200), progress=True)
    err = capsys.readouterr().err
    assert "linear C sweep (200 rows)" in err and "5/5" in err
    assert "linear fit C=" in err and "(600 rows)" in err  # the refit on train + val
    assert "(500 rows)" in err  # the copy fit on train alone, which calibrates on val


def test_cli_sweep_rows(store, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["fit-head", str(store), "--out", str(tmp_path / "h.safetensors"), "--n-Cs", "3",
                            "--sweep-rows", "200"])
    assert r.exit_code == 0, r.output
    assert "C chosen on 200 of 500 training rows (--sweep-rows); the final fit used all of them" in r.output
    r = runner.invoke(app, ["fit-head", str(store), "--out", str(tmp_path / "h2.safetensors"), "--n-Cs", "3",
                            "--sweep-rows", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert '"sweep_rows": 500' in r.stdout and "C chosen on" not in r.output


def test_the_calibration_copy_starts_at_the_refit_head_and_reaches_the_cold_solution():
    X, y = blobs(600)
    Xv, yv = blobs(200, seed=1)
    XX, yy = np.concatenate([X, Xv]), np.concatenate([y, yv])
    head = fitmod._fit_rows(LinearHead(**GRID), XX, yy, np.arange(600), np.arange(600, 800))
    held, fit_on = fitmod._held_out_scorer(head, XX, yy, np.arange(600))
    cold = LinearHead(C=head.C_, device="cpu").fit(X, y)
    assert "train alone" in fit_on and held.C_ == head.C_
    Z = held.transform_features(X)  # the same statistics (of train) as the cold fit's

    def objective(h: LinearHead) -> float:  # sklearn's, which both minimise
        L = Z @ h.coef_.T + h.intercept_
        return 0.5 * (h.coef_ ** 2).sum() + h.C_ * (logsumexp(L, 1) - L[np.arange(len(y)), y]).sum()

    assert objective(held) == pytest.approx(objective(cold), rel=1e-4)
    np.testing.assert_allclose(held.predict_proba(X), cold.predict_proba(X), atol=1e-2)
    assert held.n_iter_ <= cold.n_iter_
    with pytest.raises(ProbeError, match=r"init must be \(coef \(4, 12\), intercept \(4,\)\)"):
        LinearHead(C=1.0).fit(X, y, init=(np.zeros((3, 12)), np.zeros(3)))
    with pytest.raises(ProbeError, match="init starts the solve at a fixed C"):
        LinearHead().fit(X, y, init=(head.coef_, head.intercept_))
