"""Heads as estimators: contract, agreement with scikit-learn, normalisations, save/load, few-shot episodes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probe.heads import HEADS, KNNHead, LinearHead, MLPHead, PrototypeHead, load_head, make_head, save_head
from probe.heads.features import apply_norm, fit_norm, k_per_class, stratified_holdout
from probe.heads.fewshot import episode_accuracy, linear_episode_accuracy, sample_episodes

FAST = {"linear": {"n_Cs": 6, "C_range": (1e-3, 1e2)}, "mlp": {"epochs": 30, "hidden": (32,)}, "prototype": {},
        "knn": {"k": 5}}


def blobs(n_per: int = 60, classes: int = 3, dim: int = 16, spread: float = 1.0, seed: int = 0):
    """Gaussian class clusters: (N, dim) float32, (N,) int labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    X = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(classes), n_per)


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("kind", list(HEADS))
def test_estimator_contract(kind):
    X, y = blobs()
    head = make_head(kind, **FAST[kind])
    with pytest.raises(NotFittedError):
        head.predict(X)
    assert not [a for a in vars(head) if a.endswith("_")]  # __init__ stores hyperparameters only
    assert head.fit(X, y) is head
    learned = [a for a in vars(head) if a not in head.get_params()]
    assert learned and all(a.endswith("_") for a in learned), learned
    P = head.predict_proba(X)
    assert P.shape == (len(X), 3) and np.allclose(P.sum(1), 1, atol=1e-5)
    assert head.score(X, y) > 0.9  # ClassifierMixin; well-separated blobs
    assert clone(head).get_params() == head.get_params()
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        head.predict(X[:, :5])


def test_bad_training_input_names_the_value():
    X, y = blobs()
    with pytest.raises(ValueError, match="got 1 class"):
        LinearHead(C=1.0).fit(X[:10], y[:10])
    with pytest.raises(ValueError, match="unknown normalisation 'zca'"):
        PrototypeHead(norm="zca").fit(X, y)
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        make_head("svm")
    with pytest.raises(ValueError, match="has no parameter 'depth'"):
        make_head("knn", depth=3)
    with pytest.raises(ValueError, match="C must be > 0.*got -1"):
        LinearHead(C=-1).fit(X, y)


# ------------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_linear_agrees_with_sklearn_at_fixed_C(C):
    X, y = blobs(n_per=700, classes=5, dim=32, spread=8.0, seed=1)  # overlapping classes (~75% accuracy)
    tr, te = stratified_holdout(y, 0.5, seed=0)
    ours = LinearHead(C=C, device="cpu").fit(X[tr], y[tr])
    sc = StandardScaler().fit(X[tr])
    ref = LogisticRegression(C=C, max_iter=5000).fit(sc.transform(X[tr]), y[tr])
    acc_ours = (ours.predict(X[te]) == y[te]).mean()
    acc_ref = (ref.predict(sc.transform(X[te])) == y[te]).mean()
    assert 0.5 < acc_ref < 0.95  # a hard problem: disagreements would show
    assert abs(acc_ours - acc_ref) <= 0.005
    assert (ours.predict(X[te]) == ref.predict(sc.transform(X[te]))).mean() > 0.99


def test_linear_sweep_picks_on_validation_and_refits():
    X, y = blobs(n_per=100, classes=4, dim=16, spread=3.0)
    tr, va = stratified_holdout(y, 0.3, seed=0)
    head = LinearHead(device="cpu").fit(X[tr], y[tr], eval_set=(X[va], y[va]))
    assert len(head.sweep_) == 25 >= 20
    Cs = [r["C"] for r in head.sweep_]
    assert Cs == sorted(Cs) and Cs[0] == pytest.approx(1e-6) and Cs[-1] == pytest.approx(1e6)
    best = max(r["val_accuracy"] for r in head.sweep_)
    assert head.val_accuracy_ == best and head.C_ in Cs
    # without eval_set: a seeded stratified holdout of train, the same every time
    a, b = LinearHead(n_Cs=5).fit(X, y), LinearHead(n_Cs=5).fit(X, y)
    assert a.sweep_ == b.sweep_ and np.allclose(a.coef_, b.coef_, atol=1e-5)


def test_linear_balanced_weights_help_minority_class():
    X, y = blobs(n_per=200, classes=2, dim=8, spread=2.5, seed=3)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:15]])  # 200 vs 15
    plain = LinearHead(C=0.01).fit(X[keep], y[keep])
    bal = LinearHead(C=0.01, balanced=True).fit(X[keep], y[keep])
    minority = y == 1
    assert (bal.predict(X[minority]) == 1).mean() > (plain.predict(X[minority]) == 1).mean()


# ------------------------------------------------------------------------------------------ prototype / knn
def test_prototype_normalisations_known_answer():
    X = np.array([[10.0, 0.0], [0.0, 1.0]], np.float32)  # class a is long, class b short
    y = np.array(["a", "b"])
    q = np.array([[1.0, 0.5]], np.float32)
    # raw euclidean: (1, .5) is closest to (0, 1); after L2 it points nearer (1, 0);
    # CL2N centres on the mean (5, .5): the query becomes (-4, 0), on b's side
    assert PrototypeHead(metric="euclidean", norm="none").fit(X, y).predict(q)[0] == "b"
    assert PrototypeHead(metric="euclidean", norm="l2").fit(X, y).predict(q)[0] == "a"
    assert PrototypeHead(metric="euclidean", norm="cl2n").fit(X, y).predict(q)[0] == "b"
    head = PrototypeHead(norm="cl2n").fit(X, y)
    np.testing.assert_allclose(head.norm_["mean"], [5.0, 0.5])
    np.testing.assert_allclose(np.linalg.norm(head.prototypes_, axis=1), 1, rtol=1e-6)


def test_norms():
    X, _ = blobs()
    for norm in ("l2", "cl2n"):
        Z = apply_norm(X, fit_norm(X, norm))
        np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1, rtol=1e-5)
    Z = apply_norm(X, fit_norm(X, "standardize"))
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z.std(0), 1, rtol=1e-4)


def test_knn_matches_cosine_nearest_neighbour_and_votes():
    from sklearn.neighbors import KNeighborsClassifier

    X, y = blobs(spread=2.5, seed=2)
    Xq, _ = blobs(spread=2.5, seed=5)
    ours = KNNHead(k=1).fit(X, y).predict(Xq)
    ref = KNeighborsClassifier(1, metric="cosine").fit(X, y).predict(Xq)
    np.testing.assert_array_equal(ours, ref)
    # two neighbours of class 0 at similarity ~1 outvote nothing else: probability 1 for class 0
    Xt = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
    P = KNNHead(k=2, temperature=0.07).fit(Xt, [0, 0, 1]).predict_proba([[1, 0.001]])
    np.testing.assert_allclose(P, [[1.0, 0.0]], atol=1e-6)


# ------------------------------------------------------------------------------------------ mlp
def test_mlp_learns_separable_data_and_stops_early():
    X, y = blobs(n_per=80, classes=3, dim=64, spread=2.0)
    tr, te = stratified_holdout(y, 0.25, seed=1)
    head = MLPHead(hidden=(64,), epochs=100).fit(X[tr], y[tr])
    assert (head.predict(X[te]) == y[te]).mean() > 0.9  # chance is 1/3
    X, y = blobs(n_per=60, classes=5, dim=8, spread=4.0)  # overlapping: the validation loss turns up
    tr, te = stratified_holdout(y, 0.25, seed=1)
    head = MLPHead(hidden=(64,), epochs=1000, patience=5).fit(X[tr], y[tr])
    assert (head.predict(X[te]) == y[te]).mean() > 0.4  # chance is 1/5
    assert head.epochs_run_ < 1000 and head.epochs_run_ == head.best_epoch_ + 5


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kind", list(HEADS))
def test_save_load_round_trip(tmp_path, kind):
    X, y = blobs()
    y = np.array(["cat", "dog", "fox"])[y] if kind == "prototype" else y  # string labels travel too
    head = make_head(kind, **FAST[kind]).fit(X, y)
    path = save_head(head, tmp_path / f"{kind}.safetensors", {"class_names": ["cat", "dog", "fox"]})
    loaded, meta = load_head(path)
    assert type(loaded) is type(head) and meta["head"] == kind and meta["class_names"] == ["cat", "dog", "fox"]
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    assert b"pickle" not in path.read_bytes()[:200] and path.read_bytes()[8:9] == b"{"  # a safetensors header


def test_load_head_errors(tmp_path):
    from probe.heads import HeadError

    with pytest.raises(HeadError, match="does not exist"):
        load_head(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a head")
    with pytest.raises(HeadError, match="not a safetensors file"):
        load_head(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------ sampling
def test_training_rows_hold_out_val_only_where_the_data_has_train_but_no_val(tmp_path):
    """fit-head's rows (``_training_rows``) and probe sweep's (``hold_out_val``): the one difference is a train split
    without val, where the sweep holds out a seeded stratified 20% of train and fit-head keeps it all."""
    from probe.heads.fit import _training_rows
    from probe.store import store_from_arrays

    X, y = blobs(n_per=10)
    splits = ["train"] * 5 + ["test"] * 5
    no_val = store_from_arrays(tmp_path / "a.h5", X, y, splits=splits * 3)
    tr, va, te, dropped = _training_rows(no_val, y, None, 0)
    assert len(va) == 0 and len(tr) == 15 and len(te) == 15 and dropped == 0
    tr2, va2, te2, _ = _training_rows(no_val, y, None, 3, hold_out_val=True)
    kept, held = stratified_holdout(y[tr], 0.2, seed=3)
    np.testing.assert_array_equal(tr2, tr[kept])
    np.testing.assert_array_equal(va2, tr[held])
    assert len(va2) == 3 and np.array_equal(te2, te)  # 1 of 5 per class

    for s in (["train"] * 4 + ["val"] * 3 + ["test"] * 3, [""] * 10):  # a val split, or no split at all: the same
        store = store_from_arrays(tmp_path / f"{len(set(s))}.h5", X, y, splits=s * 3)
        rows, held_out = _training_rows(store, y, None, 0), _training_rows(store, y, None, 0, hold_out_val=True)
        assert all(np.array_equal(a, b) for a, b in zip(rows, held_out)) and len(rows[1])


def test_data_without_a_train_split_keeps_its_test_split(tmp_path):
    """Unsplit rows beside a test split (a manifest marking only its test set): the unsplit rows train (20% held
    out as val, stratified) and the test split is kept for testing, never trained on; a val split is used as given.
    Only val and test splits and nothing else: every labelled row is train or val, none left to test."""
    from probe.heads.fit import labelled_splits
    from probe.store import store_from_arrays

    X, y = blobs(n_per=10)  # 3 classes x 10
    for s, want in (([""] * 8 + ["test"] * 2, (18, 6, 6)), ([""] * 6 + ["val"] * 2 + ["test"] * 2, (18, 6, 6)),
                    (["val"] * 5 + ["test"] * 5, (24, 6, 0))):
        sp = np.array(s * 3)
        rows = labelled_splits(store_from_arrays(tmp_path / f"{len(list(tmp_path.iterdir()))}.h5", X, y,
                                                 splits=list(sp)), seed=0)
        assert tuple(len(rows[k]) for k in ("train", "val", "test")) == want, s
        if want[2]:
            assert np.array_equal(rows["test"], np.flatnonzero(sp == "test"))  # untouched, and in no other part
            assert not np.isin(np.r_[rows["train"], rows["val"]], rows["test"]).any()
        if "val" in s and "" in s:  # beside unsplit rows, the val split is val
            assert np.array_equal(rows["val"], np.flatnonzero(sp == "val"))
        assert np.bincount(y[rows["val"]]).tolist() == [want[1] // 3] * 3  # stratified


def test_k_per_class_is_seeded():
    y = np.repeat(np.arange(4), [10, 3, 7, 5])
    a = k_per_class(y, 5, seed=1)
    assert np.array_equal(a, k_per_class(y, 5, seed=1)) and not np.array_equal(a, k_per_class(y, 5, seed=2))
    assert np.bincount(y[a]).tolist() == [5, 3, 5, 5]
    with pytest.raises(ValueError, match="got 0"):
        k_per_class(y, 0)


def test_episodes_are_seeded_disjoint_and_well_formed():
    y = np.repeat(np.arange(8), np.arange(20, 28))
    sup, qry = sample_episodes(y, way=5, shot=3, query=4, episodes=500, seed=7)
    assert sup.shape == (500, 5, 3) and qry.shape == (500, 5, 4)
    sup2, _ = sample_episodes(y, 5, 3, 4, 500, seed=7)
    assert np.array_equal(sup, sup2)
    both = np.concatenate([sup, qry], axis=2)  # (E, way, shot+query)
    assert (y[both] == y[both[..., :1]]).all()  # one class per row
    assert all(len(np.unique(e)) == 35 for e in both)  # no image twice in an episode
    assert all(len(np.unique(y[e[:, 0]])) == 5 for e in both)  # five distinct classes


def test_episode_accuracy_matches_prototype_head_loop():
    X, y = blobs(n_per=30, classes=6, dim=24, spread=4.0)
    Z = apply_norm(X, fit_norm(X, "cl2n"))
    sup, qry = sample_episodes(y, 5, 2, 6, 40, seed=0)
    for metric in ("cosine", "euclidean"):
        gram = episode_accuracy(Z, sup, qry, metric, Z @ Z.T)
        gather = episode_accuracy(Z, sup, qry, metric)
        loop = [(PrototypeHead(metric=metric, norm="none").fit(Z[s.ravel()], np.repeat(np.arange(5), 2))
                 .predict(Z[q.ravel()]) == np.repeat(np.arange(5), 6)).mean() for s, q in zip(sup, qry)]
        np.testing.assert_allclose(gram, loop, atol=1e-9)
        np.testing.assert_allclose(gather, loop, atol=1e-9)


@pytest.mark.parametrize("dim, C", [(24, 1.0), (24, 100.0), (8, 1.0)])  # dim 8 < 15 support rows: rank-deficient
def test_linear_episodes_agree_with_sklearn(dim, C):
    X, y = blobs(n_per=30, classes=6, dim=dim, spread=4.0)
    Z = apply_norm(X, fit_norm(X, "cl2n"))
    sup, qry = sample_episodes(y, 5, 3, 6, 30, seed=0)
    gram = linear_episode_accuracy(Z, sup, qry, C, Z @ Z.T)
    gather = linear_episode_accuracy(Z, sup, qry, C)
    loop = [(LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Z[s.ravel()].astype(np.float64),
                                                                      np.repeat(np.arange(5), 3))
             .predict(Z[q.ravel()]) == np.repeat(np.arange(5), 6)).mean() for s, q in zip(sup, qry)]
    np.testing.assert_allclose(gram, gather, atol=1e-9)
    assert abs(gram.mean() - np.mean(loop)) < 0.01  # the bar: within a point of mean accuracy
    assert (gram == loop).mean() >= 0.9  # and episode by episode, up to near-ties
    assert 0.3 < gram.mean() < 1.0  # a real task, not all-correct


def test_episode_errors_name_the_value():
    y = np.repeat(np.arange(4), [20, 20, 5, 20])
    with pytest.raises(ValueError, match=r"class 2 has 5 images, fewer than --shot 5 \+ --query 15"):
        sample_episodes(y, 3, 5, 15, 10)
    with pytest.raises(ValueError, match="--way 6 needs at least 6 classes, the data has 4"):
        sample_episodes(y, 6, 1, 1, 10)
    sup, qry = sample_episodes(y, 3, 1, 1, 2)
    with pytest.raises(ValueError, match=r"--C must be a positive number .* got 0.0"):
        linear_episode_accuracy(np.eye(len(y), 4, dtype=np.float32), sup, qry, C=0.0)


def test_confusion_png_names_few_classes_and_stays_bounded_for_many(tmp_path):
    """A cell per class pair: named rows and columns up to NAMED_CLASSES, then a fixed size (1000 classes made a
    60,000-pixel-square picture before)."""
    from PIL import Image

    from probe.heads.evaluate import NAMED_CLASSES, confusion_png

    sizes = {}
    for n in (10, NAMED_CLASSES, 1000):
        cm = np.eye(n, dtype=int) * 5
        with Image.open(confusion_png(cm.tolist(), [f"c{i}" for i in range(n)], tmp_path / f"{n}.png")) as im:
            sizes[n] = im.size
    assert sizes[10][0] < sizes[NAMED_CLASSES][0] and sizes[1000] == sizes[NAMED_CLASSES]
