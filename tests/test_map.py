"""`probe map` / ``probe.embedding_map``: the 2-D projection (PCA; UMAP in the slow tests), the colour modes, the
self-contained HTML page (its data, thumbnails and escaping), the errors and the CLI. The page in a real browser is
tests/test_map_browser.py."""

from __future__ import annotations

import base64
import io
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import probe
from cli.main import app
from probe.embedding_map import ISSUES, embedding_map
from probe.errors import ProbeError
from probe.store import FeatureStore, store_from_arrays


def knn_agreement(coords: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Share of each row's k nearest 2-D neighbours with its class (chance: 0.1 for 10 balanced classes)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords, return_distance=False)[:, 1:]
    return float((y[idx] == y[:, None]).mean())


def page_data(path) -> tuple[str, dict]:
    text = path.read_text("utf-8")
    m = re.search(r"<script type='application/json' id='map-data'>(.*?)</script>", text, re.S)
    return text, json.loads(m.group(1))


def clusters(path, n=60, classes=3, dim=16, labels=None, seed=0, **kw) -> FeatureStore:
    """A synthetic store of ``classes`` Gaussian clusters (rows i % classes), paths that do not exist."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(classes, dim))[y] * 3 + rng.normal(size=(n, dim))
    return store_from_arrays(path, X, y if labels is None else labels, classes=[f"c{i}" for i in range(classes)],
                             **kw)


def test_pca_map_of_demo_store_separates_classes_and_is_deterministic(demo_store):
    store = FeatureStore(demo_store)
    m = embedding_map(store, method="pca", seed=0)
    assert m.method == "pca" and m.coords.shape == (400, 2) and m.coords.dtype == np.float32
    assert np.isfinite(m.coords).all() and m.out is None and m.bytes == 0  # no page unless asked
    np.testing.assert_array_equal(embedding_map(store, method="pca", seed=0).coords, m.coords)
    assert knn_agreement(m.coords, store.labels()) > 0.33  # measured 0.42; chance 0.10
    assert m.counts == {c: 40 for c in store.classes} and m.paths == store.paths().tolist()
    assert list(m.categories[:1]) == [store.classes[store.labels()[0]]]


@pytest.mark.slow
def test_umap_map_of_demo_store_separates_classes_and_is_deterministic(demo_store):
    store = FeatureStore(demo_store)
    m = probe.embedding_map(demo_store, method="umap", seed=0)  # the module is callable too
    assert m.method == "umap" and m.coords.shape == (400, 2) and np.isfinite(m.coords).all()
    np.testing.assert_array_equal(embedding_map(store, method="umap", seed=0).coords, m.coords)
    assert knn_agreement(m.coords, store.labels()) > 0.5  # measured 0.63; PCA 0.42, chance 0.10


def test_page_is_self_contained_with_every_point_and_decodable_thumbnails(demo_store, tmp_path):
    out = tmp_path / "sub" / "map.html"
    m = embedding_map(demo_store, method="pca", out=out)
    assert m.out == out and out.stat().st_size == m.bytes and m.thumbnails == 400
    text, data = page_data(out)
    assert "http://" not in text and "https://" not in text  # no CDN, no external script or image
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=[^>]*>", text.split("id='map-data'")[0])
    assert all(v.startswith("${") for v in re.findall(r"(?:src|href)=[\"']([^\"']*)", text))  # JS templates only
    assert "data-points=" in text and data["n"] == 400 and len(data["xy"]) == 800 and len(data["code"]) == 400
    assert all(0 <= v <= data["q"] for v in data["xy"])
    assert data["legend"] == FeatureStore(demo_store).classes and len(data["colors"]) == 10
    assert sorted(map(int, data["thumbs"])) == list(range(400))
    for uri in list(data["thumbs"].values())[:20]:
        assert uri.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        img.load()
        assert img.format == "JPEG" and max(img.size) == 64


def test_thumbnails_are_a_seeded_sample_and_the_rest_point_at_files(demo_store, tmp_path):
    a = embedding_map(demo_store, method="pca", out=tmp_path / "a.html", thumbs=50, seed=3)
    b = embedding_map(demo_store, method="pca", out=tmp_path / "b.html", thumbs=50, seed=3)
    assert a.thumbnails == 50
    (_, da), (_, db) = page_data(a.out), page_data(b.out)
    assert da["thumbs"].keys() == db["thumbs"].keys()
    assert any("file://" in n for n in a.notes)  # the other 350 tooltips load the image file
    assert da["root"] == str(FeatureStore(demo_store).root.absolute())


def test_a_path_cannot_break_out_of_the_data_script(tmp_path):
    evil = ["</script><script>alert(1)</script>.png", "<!--<script>.png", "ok &amp; \u2028.png"]
    store = store_from_arrays(tmp_path / "e.h5", np.eye(3, 4), [0, 1, 0], paths=evil, classes=["</b>", "b"])
    out = embedding_map(store, method="pca", out=tmp_path / "e.html").out
    text, data = page_data(out)
    assert text.count("</script") == 2 and text.count("<script") == 2  # only the page's own two scripts
    assert data["paths"] == evil and data["legend"] == ["</b>", "b"]


@pytest.mark.parametrize("color", ["label", "split", "prediction", "issue"])
def test_colour_modes_on_demo_store(demo_store, tmp_path, color):
    m = embedding_map(demo_store, color=color, method="pca", out=tmp_path / "m.html", thumbs=0)
    counts = m.counts
    assert sum(counts.values()) == 400 and len(m.codes) == 400
    _, data = page_data(m.out)
    assert data["legend"] == list(counts) and data["code"] == m.codes.tolist()
    assert data["legendTitle"] == ("prediction (out-of-fold)" if color == "prediction" else color)
    if color == "label":
        assert counts == {c: 40 for c in FeatureStore(demo_store).classes}
    elif color == "split":
        assert counts == {"train": 300, "val": 100}
    elif color == "prediction":
        assert set(counts) <= set(FeatureStore(demo_store).classes)
        assert 0.65 < m.accuracy < 0.9  # measured 0.78 (5-fold linear head)
        assert int(m.wrong.sum()) == round((1 - m.accuracy) * 400) == m.to_dict()["wrong"]
        assert data["wrong"] == np.flatnonzero(m.wrong).tolist() and len(data["pred"]) == 400  # outlined rows
    else:
        assert list(counts) == [c for c in ISSUES if c in counts] and counts["ok"] > 200
        assert counts["label issue"] > 0 and counts.get("outlier", 0) <= 4  # top 1% of 400
        flagged = np.flatnonzero(m.codes != m.legend.index("ok"))
        assert {int(k) for k in data["details"]} == set(flagged.tolist())  # the tooltip says what doctor found
        issue = int(np.flatnonzero(m.codes == 0)[0])
        assert data["details"][str(issue)].startswith("suggested ")
    assert "pred" not in data or color == "prediction"


def test_unlabelled_and_multilabel_rows(tmp_path):
    labels = np.where(np.arange(30) < 24, np.arange(30) % 3, -1)
    m = embedding_map(clusters(tmp_path / "u.h5", n=30, labels=labels), method="pca")
    assert m.counts == {"c0": 8, "c1": 8, "c2": 8, "(unlabelled)": 6}
    assert embedding_map(clusters(tmp_path / "u.h5", n=30, labels=labels), color="split", method="pca").counts == \
        {"(no split)": 30}
    Y = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]] * 5)
    multi = store_from_arrays(tmp_path / "m.h5", np.random.default_rng(0).normal(size=(20, 8)), Y,
                              classes=["a", "b", "c"])
    m = embedding_map(multi, method="pca", out=tmp_path / "m.html")
    assert m.counts == {"a": 5, "b": 5, "c": 5, "(none)": 5}  # the first positive class of each row
    _, data = page_data(m.out)
    assert data["labels"][data["label"][0]] == "b, c"  # the tooltip lists them all


def test_prediction_on_unlabelled_rows_of_a_partly_labelled_store(tmp_path):
    labels = np.where(np.arange(60) < 45, np.arange(60) % 3, -1)
    m = embedding_map(clusters(tmp_path / "p.h5", labels=labels), color="prediction", method="pca")
    assert m.counts["(unlabelled)"] == 15 and m.accuracy == 1.0 and not m.wrong.any()


@pytest.mark.parametrize("case, needle", [
    ("empty", "has 0 rows: a 2-D map needs at least 3"),
    ("two rows", "has 2 rows: a 2-D map needs at least 3"),
    ("colour", "color must be one of label, split, prediction, issue, got 'size'"),
    ("method", "method must be one of auto, umap, pca, got 'tsne'"),
    ("prediction unlabelled", "has no labelled rows: color='prediction' needs labels"),
    ("issue unlabelled", "has no labelled rows: color='issue' needs labels"),
    ("prediction multilabel", "is multi-label: color='prediction' needs a single-label store"),
    ("one row of a class", "class 'c2' of store"),
    ("thumbs", "thumbs must be >= 0"),
])
def test_errors_name_the_store_or_value(tmp_path, case, needle):
    path = tmp_path / "s.h5"
    kw: dict = {"method": "pca"}
    if case == "empty":
        store = store_from_arrays(path, np.zeros((0, 4)), classes=["a"])
    elif case == "two rows":
        store = store_from_arrays(path, np.eye(2, 4), [0, 1], classes=["a", "b"])
    elif case in ("prediction unlabelled", "issue unlabelled"):
        store = clusters(path, labels=np.full(60, -1))
        kw["color"] = case.split()[0]
    elif case == "prediction multilabel":
        store = store_from_arrays(path, np.eye(4), np.eye(4, 2, dtype=int), classes=["a", "b"])
        kw["color"] = "prediction"
    elif case == "one row of a class":
        store = clusters(path, n=7, labels=[0, 1, 0, 1, 0, 1, 2])
        kw["color"] = "prediction"
    else:
        store = clusters(path)
        kw.update({"colour": {"color": "size"}, "method": {"method": "tsne"}, "thumbs": {"thumbs": -1}}[case])
    with pytest.raises(ProbeError, match=re.escape(needle)) as e:
        embedding_map(store, **kw)
    if case not in ("colour", "method", "thumbs"):
        assert str(path) in str(e.value)


def test_without_umap_learn_auto_falls_back_to_pca_and_umap_says_how_to_install(tmp_path, monkeypatch, caplog):
    import probe.embedding_map as em

    monkeypatch.setattr(em, "_umap", lambda: None)
    store = clusters(tmp_path / "s.h5")
    with caplog.at_level(logging.WARNING, logger="probe.embedding_map"):
        assert embedding_map(store, method="auto").method == "pca"
    assert "pip install 'probe[map]'" in caplog.text
    with pytest.raises(ProbeError, match=re.escape("needs umap-learn, which is not installed: pip install "
                                                   "'probe[map]'")):
        embedding_map(store, method="umap")


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 12])
def test_auto_is_umap_and_works_on_a_few_rows(tmp_path, n):  # umap-learn is in the test extra
    m = embedding_map(clusters(tmp_path / "s.h5", n=n, dim=64), method="auto")
    assert m.method == "umap" and m.coords.shape == (n, 2) and np.isfinite(m.coords).all()


def test_cli_json_and_text(demo_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["map", str(demo_store), "--method", "pca", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["rows"] == 400 and d["method"] == "pca" and d["out"] == "map.html"  # the default, in the cwd
    assert (tmp_path / "map.html").stat().st_size == d["bytes"] and d["thumbnails"] == 400
    assert d["coords"]["shape"] == [400, 2] and "paths" not in d  # no big arrays in --json
    r = CliRunner().invoke(app, ["map", str(demo_store), "--method", "pca", "--color", "split",
                                 "--out", str(tmp_path / "x" / "s.html")])
    assert r.exit_code == 0, r.output
    assert "split: train 300, val 100" in r.stdout and f"wrote    {tmp_path / 'x' / 's.html'}" in r.stdout
    r = CliRunner().invoke(app, ["map", str(demo_store), "--color", "size"])
    assert r.exit_code == 1 and "error: color must be one of label, split, prediction, issue" in r.stderr


def rare_class_store(path) -> FeatureStore:
    """400 rows: classes c0-c2 with 132 rows each, c3 with 4 (a uniform sample of 40 would often miss it)."""
    return clusters(path, n=400, classes=4, labels=np.r_[np.arange(396) % 3, [3] * 4])


def test_sample_rows_is_stratified_seeded_and_of_the_cap_size():
    from probe.embedding_map import sample_rows

    groups = np.array(["a"] * 900 + ["b"] * 97 + ["c"] * 3)
    rows = sample_rows(groups, 100, seed=0)
    assert len(rows) == 100 and len(set(rows)) == 100 and (np.diff(rows) > 0).all()
    assert dict(zip(*np.unique(groups[rows], return_counts=True))) == {"a": 84, "b": 13, "c": 3}  # 5, 5, 3 + 87 shared
    np.testing.assert_array_equal(sample_rows(groups, 100, seed=0), rows)
    assert not np.array_equal(sample_rows(groups, 100, seed=1), rows)
    with pytest.raises(ProbeError, match=re.escape("max_points=12 cannot keep every colour category: its 3 "
                                                   "categories need 13 points")):
        sample_rows(groups, 12)


def test_max_points_maps_a_stratified_seeded_sample_read_from_the_store(tmp_path):
    from probe.embedding_map import project

    store = rare_class_store(tmp_path / "r.h5")
    m = embedding_map(store, method="pca", max_points=40, seed=1, out=tmp_path / "m.html", thumbs=0)
    assert m.coords.shape == (40, 2) and len(m.rows) == 40 and m.total == 400
    assert m.counts == {"c0": 12, "c1": 12, "c2": 12, "c3": 4}  # every class; floors of 5 (all 4 of c3)
    np.testing.assert_array_equal(m.coords, project(store.features()[m.rows], "pca", seed=1)[0])  # those rows
    assert m.paths == store.paths()[m.rows].tolist()
    assert m.categories.tolist() == [store.classes[c] for c in store.labels()[m.rows]]
    note = "40 of 400 rows shown (seeded sample stratified by label; --max-points)"
    assert m.notes[0] == note and m.to_dict()["rows"] == 40 and m.to_dict()["store_rows"] == 400
    text, data = page_data(m.out)
    assert data["n"] == 40 and len(data["paths"]) == 40 and f"<span id='summary'>{note}, pca" in text
    again = embedding_map(store, method="pca", max_points=40, seed=1)
    np.testing.assert_array_equal(again.rows, m.rows)
    assert not np.array_equal(embedding_map(store, method="pca", max_points=40, seed=2).rows, m.rows)
    split = embedding_map(store, color="split", method="pca", max_points=40)
    assert "stratified by split" in split.notes[0] and split.counts == {"(no split)": 40}


def test_max_points_zero_or_above_the_rows_maps_every_row_as_before(tmp_path):
    store = rare_class_store(tmp_path / "r.h5")
    every = embedding_map(store, method="pca", max_points=0)
    assert every.rows is None and every.coords.shape == (400, 2) and every.total == 400 and not every.notes
    for cap in (400, 100_000):
        np.testing.assert_array_equal(embedding_map(store, method="pca", max_points=cap).coords, every.coords)
    with pytest.raises(ProbeError, match=re.escape("max_points must be 0 (every row) or at least 3, got 2")):
        embedding_map(store, max_points=2)
    with pytest.raises(ProbeError, match=re.escape("max_points=10 cannot keep every colour category: its 4 "
                                                   "categories need 19 points")):
        embedding_map(store, max_points=10)


def test_prediction_and_issue_colours_are_computed_on_the_sample(tmp_path):
    store = clusters(tmp_path / "c.h5", n=300, classes=3)
    m = embedding_map(store, color="prediction", method="pca", max_points=60)
    assert len(m.codes) == 60 == len(m.wrong) and m.accuracy == 1.0  # separable clusters
    assert m.counts == {"c0": 20, "c1": 20, "c2": 20}
    assert m.notes[1] == ("prediction: the linear head's out-of-fold prediction (5 folds, seed 0) of 60 labelled "
                          "rows of the sample, trained on it")
    m = embedding_map(store, color="issue", method="pca", max_points=60)
    assert len(m.codes) == 60 and sum(m.counts.values()) == 60 and m.counts.get("outlier") == 1  # 1% of 60, >= 1
    assert "(on the sampled rows only: near-duplicates are pairs among them)" in m.notes[1]


def test_cli_max_points_and_a_bar_over_the_rows_read(tmp_path, capsys):
    rare_class_store(tmp_path / "r.h5")
    r = CliRunner().invoke(app, ["map", str(tmp_path / "r.h5"), "--method", "pca", "--max-points", "40",
                                 "--out", str(tmp_path / "m.html")])
    assert r.exit_code == 0, r.output
    assert "map      40 of 400 rows of" in r.stdout and "40 of 400 rows shown (seeded sample" in r.stdout
    embedding_map(tmp_path / "r.h5", method="pca", max_points=40, progress=True)
    err = capsys.readouterr().err
    assert "map: reading features" in err and "40/40" in err and "map: projecting 40 rows" in err, err


def test_max_points_on_a_multilabel_store_samples_by_first_label(tmp_path):
    Y = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]] * 10)
    multi = store_from_arrays(tmp_path / "m.h5", np.random.default_rng(0).normal(size=(40, 8)), Y,
                              classes=["a", "b", "c"])
    m = embedding_map(multi, method="pca", max_points=20, out=tmp_path / "m.html")
    assert m.counts == {"a": 5, "b": 5, "c": 5, "(none)": 5}
    _, data = page_data(m.out)
    want = [", ".join("abc"[c] for c in np.flatnonzero(r)) or "(none)" for r in Y[m.rows]]
    assert [data["labels"][k] for k in data["label"]] == want  # each drawn row's own labels in its tooltip
