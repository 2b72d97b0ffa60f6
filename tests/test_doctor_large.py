"""`probe doctor` above the flat-index size: near-duplicates from the search module's tuned approximate index.

A synthetic labelled store of IndexConfig.exact_below + 2000 rows (64-d, 4 well-separated classes of 5 clusters each,
train/val/test) with planted train rows copied into val and test: 30 with a little noise, 10 exact, and 5 exact copies
within train. Unplanted rows never reach cosine 0.9 (checked once with the exact range search, 14 s: no pair), so the
planted pairs are all the pairs there are. ~20 s on 2 cores, most of it the 5-fold linear head on 52k rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from probe.doctor import DUP_THRESHOLD, EXACT, _pairs, doctor
from probe.search import IndexConfig
from probe.store import store_from_arrays

pytestmark = pytest.mark.slow

N = IndexConfig().exact_below + 2000  # just above the flat-index size: the approximate path
TRAIN, VAL = 40_000, 6_000  # rows [0, TRAIN) train, then val, then test


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(report, planted {(train row, copy row): exact}, split sizes, features (N, D))."""
    rng = np.random.default_rng(0)
    D, K, M = 64, 4, 5
    classes = rng.normal(size=(K, D))
    classes *= 2 / np.linalg.norm(classes, axis=1, keepdims=True)  # (K, D) class centres, norm 2
    sub = rng.normal(size=(K, M, D))
    sub *= 0.5 / np.linalg.norm(sub, axis=2, keepdims=True)  # (K, M, D) cluster offsets within a class
    y = rng.integers(0, K, N)
    X = (classes[y] + sub[y, rng.integers(0, M, N)] + 0.25 * rng.normal(size=(N, D))).astype(np.float32)  # (N, D)
    splits = np.array(["train"] * TRAIN + ["val"] * VAL + ["test"] * (N - TRAIN - VAL))

    src = rng.choice(TRAIN, 45, replace=False)  # train rows that get copied
    val = TRAIN + rng.choice(VAL, 25, replace=False)
    test = TRAIN + VAL + rng.choice(N - TRAIN - VAL, 15, replace=False)
    same = rng.choice(np.setdiff1d(np.arange(TRAIN), src), 5, replace=False)  # exact copies inside train
    dst = np.r_[val, test, same]  # (45,): 15 noisy into val, 10 exact into val, 15 noisy into test, 5 exact in train
    exact = np.r_[np.zeros(15, bool), np.ones(10, bool), np.zeros(15, bool), np.ones(5, bool)]
    X[dst] = X[src] + np.where(exact[:, None], 0, 0.02 * rng.normal(size=(45, D)))  # noisy: cosine ~0.9985
    y[dst] = y[src]
    store = store_from_arrays(tmp_path_factory.mktemp("doctor_large") / "big.h5", X, y,
                              splits=splits.tolist(), classes=list("abcd"))
    planted = {(int(min(a, b)), int(max(a, b))): bool(e) for a, b, e in zip(src, dst, exact)}
    return doctor(store, folds=2), planted, {"val": VAL, "test": N - TRAIN - VAL}, X  # 2 folds: the head is not
    # what this tests


def test_large_store_uses_the_approximate_index(planted):
    report, _, _, _ = planted
    assert report.n == N and report.duplicates["index"] != "flat"


def test_every_planted_pair_is_found(planted):
    report, want, _, _ = planted
    got = {tuple(p["rows"]): p for p in report.duplicates["pairs"]}
    assert set(got) == set(want)  # all planted, nothing else (no unplanted pair reaches 0.9)
    for rows, exact in want.items():
        p = got[rows]
        assert p["cross_split"] == (rows[0] >= TRAIN or rows[1] >= TRAIN), p
        assert p["exact"] == exact and (p["similarity"] >= EXACT) == exact, p
        assert p["similarity"] >= report.duplicates["threshold"]
    assert report.duplicates["cross_split"] == 40 and report.duplicates["exact"] == 15
    cross = [p["cross_split"] for p in report.duplicates["pairs"]]
    assert cross == sorted(cross, reverse=True)  # cross-split pairs first


def test_leakage_is_the_planted_share(planted):
    report, _, sizes, _ = planted
    assert report.leakage == {"val": round(25 / sizes["val"], 6), "test": round(15 / sizes["test"], 6)}


def test_knn_distance_matches_exact_search(planted):
    report, _, _, X = planted
    rows = np.random.default_rng(1).choice(N, 300, replace=False)
    xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = xn[rows] @ xn.T  # (300, N) exact cosine
    sims[np.arange(len(rows)), rows] = -np.inf  # not the row itself
    exact = 1 - np.sort(np.partition(sims, -10, axis=1)[:, -10:], axis=1).mean(1)  # (300,) mean distance to 10 nearest
    knn = {o["row"]: o["knn_distance"] for o in report.outliers}
    got = np.array([knn[r] for r in rows])
    assert np.abs(got - exact).max() < 0.01, np.abs(got - exact).max()  # the index is tuned to recall@10 >= 0.95


def test_a_row_with_more_copies_than_k_keeps_all_its_pairs(planted, tmp_path):
    *_, X = planted
    X = X.copy()
    copies = TRAIN + np.arange(30)
    X[copies] = X[N - 1]  # 30 exact copies of the last row (an image pasted many times: a placeholder, a logo)
    pairs, *_ = _pairs(store_from_arrays(tmp_path / "copies.h5", X), DUP_THRESHOLD, 10)
    assert {int(a) for a, b in pairs if b == N - 1} == set(copies.tolist())  # k-NN alone: 11 of 30
