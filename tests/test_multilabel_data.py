"""Multi-label data (issue 14.2): manifests with several labels per image, the store's /label_matrix through
extract, resume, extend and merge, and the metric functions against scikit-learn and a hand-computed VOC example."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score
from typer.testing import CliRunner

from cli.main import app
from probe.data import discover
from probe.errors import ProbeError, StoreError
from probe.extract import extract
from probe.heads.multilabel import average_precision, f1_scores, fit_thresholds, mean_ap, multilabel_metrics, voc07_ap
from probe.shard import merge
from probe.store import FeatureStore, store_from_arrays

from .conftest import make_image, tiny_config

runner = CliRunner()


def _images(root: Path, n: int) -> None:
    for k in range(n):
        make_image(root / "imgs" / f"{k}.png", seed=k)


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ manifests
def test_labels_column_extract_resume_and_a_new_class(tmp_path):
    _images(tmp_path, 6)
    rows = ["path,labels,split", "imgs/0.png,cat|dog,train", "imgs/1.png,dog,train", "imgs/2.png,,val",
            "imgs/3.png, dog | cat ,val"]
    m = _csv(tmp_path / "m.csv", rows)
    ds = discover(m)
    assert ds.multilabel and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [-1] * 4
    out = tmp_path / "s.h5"
    first = extract(m, out, tiny_config())
    s = FeatureStore(out)
    assert s.multilabel and s.classes == ["cat", "dog"] and first["embedded"] == 4
    assert s.label_matrix().tolist() == [[1, 1], [0, 1], [0, 0], [1, 1]]
    assert s.label_matrix("val").tolist() == [[0, 0], [1, 1]] and s.labels().tolist() == [-1] * 4
    with h5py.File(out) as f:  # checksummed like /labels; the attribute old readers can test
        assert f["label_matrix"].dtype == np.uint8 and f["label_matrix"].fletcher32 and f.attrs["multilabel"]
    info = s.info()
    assert info["multilabel"] and info["labels_per_image"] == 1.25 and info["class_counts"] == {"cat": 2, "dog": 3}
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "multi-label, 2 classes, mean 1.25 labels/image" in r.stdout

    # resume after adding rows: only the new files are embedded, the stored rows keep their vectors
    feats = s.features()
    _csv(m, rows + ["imgs/4.png,cat,test"])
    again = extract(m, out, tiny_config())
    s = FeatureStore(out)
    assert again["embedded"] == 1 and again["reused"] == 4 and np.array_equal(s.features()[:4], feats)
    assert s.label_matrix().tolist() == [[1, 1], [0, 1], [0, 0], [1, 1], [1, 0]]

    # a class added later widens the matrix; the stored rows' columns move to the merged class order
    _csv(m, rows + ["imgs/4.png,cat,test", "imgs/5.png,ant|dog,test"])
    extract(m, out, tiny_config())
    s = FeatureStore(out)
    assert s.classes == ["ant", "cat", "dog"] and s.label_matrix().shape == (6, 3)
    assert s.label_matrix().tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1]]

    # labels edited in the manifest, no file changed: the store follows the manifest
    _csv(m, ["path,labels,split", "imgs/0.png,ant,train"] + rows[2:] + ["imgs/4.png,cat,test",
                                                                          "imgs/5.png,ant|dog,test"])
    done = extract(m, out, tiny_config())
    assert done["embedded"] == 0 and FeatureStore(out).label_matrix()[0].tolist() == [1, 0, 0]


def test_wide_manifest_columns_are_classes(tmp_path):
    _images(tmp_path, 3)
    m = _csv(tmp_path / "w.csv", ["path,split,dog,cat", "imgs/0.png,train,1,1", "imgs/1.png,train,0,1",
                                  "imgs/2.png,val, 0 ,0"])
    s = FeatureStore(extract(m, tmp_path / "w.h5", tiny_config())["store"])
    assert s.multilabel and s.classes == ["cat", "dog"]  # sorted, as for every store; columns follow
    assert s.label_matrix().tolist() == [[1, 1], [1, 0], [0, 0]] and s.splits().tolist() == ["train", "train", "val"]


def test_single_label_manifest_unchanged(tmp_path):
    _images(tmp_path, 2)
    ds = discover(_csv(tmp_path / "m.csv", ["path,label,notes", "imgs/0.png,a,x", "imgs/1.png,,y"]))
    assert not ds.multilabel and ds.classes == ["a"] and ds.labels.tolist() == [0, -1]
    ds = discover(_csv(tmp_path / "u.csv", ["path,split", "imgs/0.png,train"]))  # no label column: unlabelled
    assert not ds.multilabel and ds.labels.tolist() == [-1]


@pytest.mark.parametrize("lines, line, says", [
    (["path,dog,cat", "a.png,1,0", "b.png,2,0"], 3, "column 'dog' is '2'"),
    (["path,dog,cat", "a.png,1,"], 2, "column 'cat' is ''"),
    (["path,dog,cat", "a.png,1,0,1"], 2, "4 cells, the header has 3"),
    (["path,label,labels", "a.png,x,y"], None, "both 'label' and 'labels'"),
    (["path,label", "a.png,x", "b.png,cat|dog"], 3, "'cat|dog' contains '|'"),
    (["path,labels", "a.png,x", "", "b.png,cat||dog"], 4, "empty name"),
    (["path,labels", "a.png,", "b.png,"], None, "names no class"),
    (["path,cat,cat", "a.png,1,0"], None, "'cat' appears twice"),
])
def test_bad_manifest_is_one_line_naming_file_and_line(tmp_path, lines, line, says):
    m = _csv(tmp_path / "bad.csv", lines)
    r = runner.invoke(app, ["extract", str(m), "--backbone", "timm/test_vit", "--weights", "random",
                            "--out", str(tmp_path / "s.h5")])
    err = r.stderr.strip()
    assert r.exit_code == 1 and len(err.splitlines()) == 1, r.output
    assert says in err and f"{m}{f':{line}:' if line else ':'}" in err, err
    assert not (tmp_path / "s.h5").exists()


# ------------------------------------------------------------------------------------------ the store
def test_single_label_store_reads_as_one_hot(tmp_path):
    s = store_from_arrays(tmp_path / "s.h5", np.zeros((4, 2)), [0, 2, -1, 1], classes=["a", "b", "c"])
    with h5py.File(s.path) as f:  # an old-style store: nothing new written into it
        assert "label_matrix" not in f and "multilabel" not in f.attrs
    assert not s.multilabel and s.info()["labels_per_image"] is None and s.info()["unlabelled"] == 1
    assert s.label_matrix().tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert s.label_matrix().dtype == np.uint8


def test_store_from_arrays_takes_a_matrix_and_refuses_bad_ones(tmp_path):
    Y = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    s = store_from_arrays(tmp_path / "m.h5", np.zeros((3, 2)), Y, classes=["a", "b", "c"], splits=["train"] * 3)
    assert s.multilabel and np.array_equal(s.label_matrix("train"), Y) and s.label_matrix("val").shape == (0, 3)
    assert s.labels().tolist() == [-1, -1, -1] and s.checksummed
    with pytest.raises(StoreError, match="0/1"):
        store_from_arrays(tmp_path / "x.h5", np.zeros((2, 2)), [[0, 2], [1, 0]])
    with pytest.raises(StoreError, match="2 classes for a label matrix of 3"):
        store_from_arrays(tmp_path / "x.h5", np.zeros((3, 2)), Y, classes=["a", "b"])


def test_merge_keeps_and_widens_the_matrix(tmp_path):
    a = store_from_arrays(tmp_path / "a.h5", np.ones((2, 2)), [[1, 1], [0, 1]], classes=["cat", "dog"],
                          paths=["x/1.png", "x/3.png"])
    b = store_from_arrays(tmp_path / "b.h5", np.zeros((2, 2)), [[1, 0], [1, 1]], classes=["ant", "dog"],
                          paths=["x/2.png", "x/0.png"])
    c = store_from_arrays(tmp_path / "c.h5", np.zeros((1, 2)), [1], classes=["bee", "cat"], paths=["x/4.png"])
    res = merge([a.path, b.path, c.path], tmp_path / "m.h5")
    s = FeatureStore(res["store"])
    assert s.multilabel and s.classes == ["ant", "bee", "cat", "dog"]
    assert s.paths().tolist() == [f"x/{k}.png" for k in range(5)]  # merged stores are sorted by path
    assert s.label_matrix().tolist() == [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


def test_sharded_extract_merges_to_the_unsharded_matrix(tmp_path):
    _images(tmp_path, 5)
    m = _csv(tmp_path / "m.csv", ["path,labels"] + [f"imgs/{k}.png,{'a|b' if k % 2 else 'b'}" for k in range(5)])
    whole = FeatureStore(extract(m, tmp_path / "whole.h5", tiny_config())["store"])
    shards = [extract(m, tmp_path / "big.h5", tiny_config(shard=f"{i}/2"))["store"] for i in range(2)]
    assert all(FeatureStore(p).multilabel for p in shards)
    s = FeatureStore(merge(shards, tmp_path / "big.h5")["store"])
    order = np.argsort(whole.paths())  # merged: by path
    assert s.paths().tolist() == whole.paths()[order].tolist()
    assert np.array_equal(s.label_matrix(), whole.label_matrix()[order]) and s.classes == ["a", "b"]


# ------------------------------------------------------------------------------------------ metrics
def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    Y = (rng.random((80, 6)) < 0.3).astype(np.uint8)
    Y[:, 5] = 0  # a class without positives: no AP, left out of mAP
    S = np.round(rng.random((80, 6)), 1)  # many tied scores
    ap = average_precision(Y, S)
    want = [average_precision_score(Y[:, c], S[:, c]) for c in range(5)]
    np.testing.assert_allclose(ap[:5], want, rtol=1e-12)
    assert np.isnan(ap[5]) and mean_ap(Y, S) == pytest.approx(np.mean(want))
    # the same with rows shuffled: tied scores give one number whatever their order
    p = rng.permutation(80)
    np.testing.assert_allclose(average_precision(Y[p], S[p])[:5], want, rtol=1e-12)


def test_voc07_hand_computed():
    # ranks TP FP TP FP TP: (P, R) = (1, 1/3) (1/2, 1/3) (2/3, 2/3) (1/2, 2/3) (3/5, 1)
    # t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7, .8, .9, 1 -> 3/5
    Y = np.array([[1], [0], [1], [0], [1]])
    S = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    assert voc07_ap(Y, S)[0] == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    assert average_precision(Y, S)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a perfect ranking is 1 both ways; a class ranked last reaches precision 2/4 at full recall
    assert voc07_ap([[1], [1], [0]], [[0.9], [0.8], [0.1]])[0] == pytest.approx(1.0)
    assert voc07_ap([[0], [0], [1], [1]], [[0.9], [0.8], [0.2], [0.1]])[0] == pytest.approx(0.5)
    assert mean_ap(Y, S, voc07=True) == pytest.approx(8.4 / 11)


def test_f1_matches_sklearn_and_thresholds_maximise_f1():
    rng = np.random.default_rng(1)
    Y = (rng.random((50, 4)) < 0.4).astype(int)
    P = np.clip(Y * 0.3 + rng.random((50, 4)) * 0.7, 0, 1)
    thr = fit_thresholds(Y, P)
    pred = (P >= thr).astype(int)
    f = f1_scores(Y, P, thr)
    assert f["micro_f1"] == pytest.approx(f1_score(Y, pred, average="micro", zero_division=0))
    assert f["macro_f1"] == pytest.approx(f1_score(Y, pred, average="macro", zero_division=0))
    np.testing.assert_allclose(f["precision"], precision_score(Y, pred, average=None, zero_division=0))
    np.testing.assert_allclose(f["recall"], recall_score(Y, pred, average=None, zero_division=0))
    for c in range(4):  # no other threshold on val beats the chosen one
        best = max(f1_score(Y[:, c], P[:, c] >= t, zero_division=0) for t in np.unique(P[:, c]))
        assert f["f1"][c] == pytest.approx(best)


def test_threshold_rules():
    # best F1 at score 0.6 -> midpoint to the next lower score 0.4
    assert fit_thresholds([[1], [1], [0], [0]], [[0.9], [0.6], [0.4], [0.1]]).tolist() == [0.5]
    # F1 ties (2/3 at >= 0.9 and at >= 0.4): the lower threshold wins, midpoint to 0.2 (the higher: 0.85)
    y, p = [[1], [0], [0], [1], [0]], [[0.9], [0.8], [0.6], [0.4], [0.2]]
    assert fit_thresholds(y, p)[0] == pytest.approx(0.3)
    # no positives on val: 0.5; all positive: the lowest score
    assert fit_thresholds([[0, 1], [0, 1]], [[0.9, 0.7], [0.1, 0.2]]).tolist() == [0.5, 0.2]


def test_multilabel_metrics_report():
    Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    P = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.7, 0.6, 0.4], [0.2, 0.1, 0.3]])
    m = multilabel_metrics(Y, P, [0.5, 0.5, 0.5], ["cat", "dog", "eel"])
    json.dumps(m)  # JSON-ready: no NaN, no numpy types
    assert m["mAP"] == 1.0 and m["mAP_voc07"] == 1.0 and m["classes_without_positives"] == ["eel"]
    assert m["micro_f1"] == 1.0 and m["macro_f1"] == pytest.approx(2 / 3)  # eel counts as F1 0 in the macro mean
    assert m["per_class"]["eel"]["ap"] is None and m["per_class"]["dog"]["support"] == 2
    assert m["labels_per_image"] == 1.0
    with pytest.raises(ProbeError, match="0/1"):
        average_precision([[2]], [[0.5]])
    with pytest.raises(ProbeError, match="2 class names for 3"):
        multilabel_metrics(Y, P, 0.5, ["a", "b"])


def test_fit_head_names_a_multilabel_store_it_cannot_fit(tmp_path):
    """A head that takes one class per row refuses a multi-label store by name, not as 'no labelled images' (the
    linear and MLP heads fit it one-vs-rest: tests/test_multilabel_heads.py)."""
    from probe.heads.fit import fit_head
    from probe.store import store_from_arrays

    rng = np.random.default_rng(0)
    path = store_from_arrays(tmp_path / "ml.h5", rng.normal(size=(20, 8)).astype(np.float32),
                             (rng.random((20, 3)) > 0.5).astype(np.uint8), classes=["a", "b", "c"])
    with pytest.raises(ProbeError, match=r"is multi-label \(3 classes, several per image\): the prototype head"):
        fit_head(path, "prototype")
