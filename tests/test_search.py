"""SearchIndex build/add/search/save/load, query resolution, HTML contact sheet and dedup: small and offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from probe.backbones import BackboneError
from probe.digest import json_sha256
from probe.extract import extract
from probe.report import contact_sheet
from probe.search import (
    IndexConfig,
    IndexMismatchError,
    SearchIndex,
    build_faiss,
    find_duplicates,
    index_store,
    recall_at,
    search_index,
    sidecar,
)
from probe.store import StoreError, store_from_arrays

from .conftest import DEMO, make_image, make_imagefolder, tiny_config


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """(n, dim) float32: cluster centres plus a low-rank spread and a little isotropic noise, like embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    basis = rng.normal(size=(8, dim)) / 3
    x = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, 8)) @ basis + 0.2 * rng.normal(size=(n, dim))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = clustered(3000)
    path = tmp_path_factory.mktemp("synth") / "synth.h5"
    store_from_arrays(path, x, np.arange(len(x)) % 4, classes=list("abcd"))
    return path, x


# --------------------------------------------------------------------------------------- build / save / load
def test_round_trip_and_self_first(synth, tmp_path):
    path, x = synth
    idx = SearchIndex.build(path)
    assert idx.kind == "flat" and idx.meta["recall"] == 1.0  # auto: small store -> exact
    scores, ids = idx.search(x[[5, 17]], k=4)  # (2, 4)
    assert ids[:, 0].tolist() == [5, 17] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    idx.save(tmp_path / "i.faiss")
    assert sidecar(tmp_path / "i.faiss").is_file()
    back = SearchIndex.load(tmp_path / "i.faiss")
    s2, i2 = back.search(x[[5, 17]], k=4)
    assert np.array_equal(i2, ids) and np.allclose(s2, scores)
    assert back.paths[5] == "row00000005" and back.label_name(5) == "b" and back.count == len(x)


def test_cosine_and_l2_agree_with_numpy(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32) * rng.uniform(0.1, 10, size=(200, 1)).astype(np.float32)
    store = store_from_arrays(tmp_path / "s.h5", x)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    cos = SearchIndex.build(store, IndexConfig(metric="cosine"))
    l2 = SearchIndex.build(store, IndexConfig(metric="l2"))
    sc, ic = cos.search(q, 5)
    sl, il = l2.search(q, 5)
    xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    assert np.array_equal(ic, np.argsort(-(qn @ xn.T), axis=1)[:, :5])
    dist = np.linalg.norm(q[:, None] - x[None], axis=2)  # (3, 200)
    assert np.array_equal(il, np.argsort(dist, axis=1)[:, :5])
    assert np.allclose(sl, np.sort(dist, axis=1)[:, :5], rtol=1e-4)  # Euclidean, not squared
    assert not np.array_equal(ic, il)  # the norms vary: the two metrics rank differently


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq", "ivfsq8"])
def test_approximate_types_reach_target_recall(synth, kind):
    path, x = synth
    idx = SearchIndex.build(path, IndexConfig(type=kind, tune_queries=400))
    assert idx.kind == kind and idx.meta["recall_queries"] == 200
    assert idx.meta["recall"] >= 0.95 and idx.meta["params"]
    _, ids = idx.search(x[:50], 11)
    _, truth = SearchIndex.build(path, IndexConfig(type="flat")).search(x[:50], 11)
    assert recall_at(ids, truth, np.arange(50)) >= 0.9  # independent check on other queries


def test_auto_switches_to_approximate_above_threshold(synth):
    path, _ = synth
    idx = SearchIndex.build(path, IndexConfig(exact_below=1000))
    assert idx.kind == "ivf" and idx.meta["factory"].startswith("IVF")
    assert idx.meta["recall"] >= 0.95 and idx.meta["recall_queries"] > 0
    assert idx.meta["trained_on"] <= 3000 - 600  # held-out queries excluded from training
    assert idx.summary()["recall_at_10"] == idx.meta["recall"]


def test_recall_ignores_the_query_itself():
    truth = np.array([[7, 1, 2]])
    assert recall_at(np.array([[7, 1, 3]]), truth, np.array([7]), k=2) == 0.5


# ------------------------------------------------------------------------------------------------- update
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_update_adds_grown_rows_without_rebuild(tmp_path, kind):
    x = clustered(2500, seed=3)
    path = tmp_path / "s.h5"
    store_from_arrays(path, x[:2000])
    first = index_store(path, tmp_path / "i.faiss", IndexConfig(type=kind))
    assert first["action"] == "built" and first["count"] == 2000
    centroids = SearchIndex.load(tmp_path / "i.faiss").index
    store_from_arrays(path, x)  # the store grew: same rows first, 500 appended
    out = index_store(path, tmp_path / "i.faiss", IndexConfig(type="auto"), update=True)
    assert out["action"] == "updated" and out["added"] == 500 and out["count"] == 2500
    idx = SearchIndex.load(tmp_path / "i.faiss")
    assert idx.paths[2400] == "row00002400"
    _, ids = idx.search(x[2400], 1)
    assert ids[0, 0] == 2400
    if kind == "ivf":  # not retrained: the same coarse centroids
        import faiss

        a = faiss.extract_index_ivf(centroids).quantizer.reconstruct_n(0, 4)
        assert np.array_equal(a, faiss.extract_index_ivf(idx.index).quantizer.reconstruct_n(0, 4))
        assert idx.meta["recall"] >= 0.95
    again = index_store(path, tmp_path / "i.faiss", update=True)
    assert again["added"] == 0


def test_update_refuses_other_backbone_and_pruned_store(tmp_path):
    x = clustered(300, seed=4)
    store_from_arrays(tmp_path / "s.h5", x)
    idx = SearchIndex.build(tmp_path / "s.h5")
    other = store_from_arrays(tmp_path / "o.h5", x, config={"backbone": "resnet50"})
    with pytest.raises(IndexMismatchError, match="backbone: index has 'arrays', store 'resnet50'"):
        idx.add(other)
    pruned = store_from_arrays(tmp_path / "p.h5", x[10:], paths=[f"row{i:08d}" for i in range(10, 300)])
    with pytest.raises(IndexMismatchError, match="rows were removed or reordered"):
        idx.add(pruned)
    with pytest.raises(ValueError, match="--update keeps the index type"):
        idx.save(tmp_path / "i.faiss")
        index_store(tmp_path / "s.h5", tmp_path / "i.faiss", IndexConfig(type="hnsw"), update=True)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors(synth, tmp_path):
    path, x = synth
    idx = SearchIndex.build(path)
    with pytest.raises(ValueError, match=r"k=3001 is larger than the gallery \(3000 images\)"):
        idx.search(x[:1], 3001)
    with pytest.raises(ValueError, match="k must be >= 1"):
        idx.search(x[:1], 0)
    with pytest.raises(IndexMismatchError, match="shape \\(1, 5\\); this index holds 32-d"):
        idx.search(np.zeros((1, 5)), 3)
    with pytest.raises(StoreError, match="has no rows"):
        SearchIndex.build(store_from_arrays(tmp_path / "e.h5", np.zeros((0, 8), np.float32)))
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        IndexConfig(type="annoy")
    with pytest.raises(FileNotFoundError, match="no search index"):
        SearchIndex.load(tmp_path / "missing.faiss")
    with pytest.raises(FileNotFoundError, match="is not an image file, a folder, a gallery id"):
        search_index(idx, ["nothing-like-this"], k=3)
    with pytest.raises(ValueError, match="query id 3000 is not in the gallery"):
        search_index(idx, ["3000"], k=3)
    with pytest.raises(ValueError, match="no backbone made"):
        search_index(idx, [str(make_image(tmp_path / "q.png", 1))], k=3)


# ---------------------------------------------------------------------------------- queries on the real demo
@pytest.fixture(scope="module")
def demo_index(demo_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demoidx") / "demo.faiss"
    index_store(demo_store, out)
    return out


def test_image_file_in_gallery_comes_back_first(demo_index):
    png = DEMO / "val" / "Bag" / "00754.png"
    r = search_index(demo_index, [str(png)], k=5)
    hit = r["results"][0]["hits"][0]
    assert r["results"][0]["kind"] == "image" and hit["path"] == "val/Bag/00754.png"
    assert hit["score"] > 0.99 and hit["label"] == "Bag" and len(r["results"][0]["hits"]) == 5


def test_query_by_id_path_and_folder(demo_index):
    idx = SearchIndex.load(demo_index)
    rel = idx.paths[42]
    r = search_index(idx, ["42", rel, idx.abspath(42), str(DEMO / "val" / "Bag")], k=3)
    kinds = [q["kind"] for q in r["results"]]
    n_bag = len(list((DEMO / "val" / "Bag").glob("*.png")))
    assert kinds == ["id", "path", "image"] + ["image"] * n_bag  # an existing file is embedded, like any image
    for q in r["results"][:3]:
        assert q["hits"][0]["id"] == 42 and q["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    for q in r["results"][3:]:  # each folder image is in the gallery, so it is its own first hit
        assert q["hits"][0]["abspath"].endswith(q["query"].split("fashion-mnist/")[1])


def test_undecodable_query_and_other_backbone(demo_index, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="no query could be used: .*broken.png: not an image"):
        search_index(demo_index, [str(bad)], k=3)
    r = search_index(demo_index, [str(bad), "0"], k=3)  # one bad among good ones: skipped, listed
    assert r["skipped"][0]["path"] == str(bad) and len(r["results"]) == 1
    # an index whose recorded weights differ from the backbone available now: refused, not silently compared
    other = tmp_path / "other.faiss"
    shutil.copy(demo_index, other)
    meta = json.loads(sidecar(demo_index).read_text())
    meta["store_config"]["weights_sha256"] = "0" * 64
    meta["meta_sha256"] = json_sha256({k: v for k, v in meta.items() if k != "meta_sha256"})  # a consistent edit
    sidecar(other).write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="differs from the one recorded"):
        search_index(other, [str(DEMO / "val" / "Bag" / "00754.png")], k=3)


def test_contact_sheet_html(demo_index, tmp_path):
    r = search_index(demo_index, ["0", str(DEMO / "val" / "Coat")], k=4)
    out = contact_sheet(r, tmp_path / "sheet.html")
    page = out.read_text()
    assert page.count("<img ") == len(r["results"]) * (1 + 4)
    assert page.count('src="data:image/jpeg;base64,') == page.count("<img ")  # self-contained
    assert r["results"][0]["hits"][1]["path"] in page


# -------------------------------------------------------------------------------------------------- dedup
def test_dedup_finds_an_injected_copy(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3)
    shutil.copy(root / "cat" / "img_0.png", root / "cat" / "img_0_copy.png")
    extract(root, tmp_path / "s.h5", tiny_config())
    r = find_duplicates(tmp_path / "s.h5", threshold=0.99)  # random tiny backbone: distinct images reach ~0.96
    assert [g["paths"] for g in r["groups"]] == [["cat/img_0.png", "cat/img_0_copy.png"]]
    assert r["duplicates"] == 1 and r["groups"][0]["min_similarity"] > 0.999
    assert r["groups"][0]["labels"] == ["cat", "cat"]
    with pytest.raises(ValueError, match="threshold is a cosine similarity in \\[-1, 1\\], got 2"):
        find_duplicates(tmp_path / "s.h5", threshold=2)


def test_dedup_joins_chains_into_groups(tmp_path):
    x = np.eye(6, 8, dtype=np.float32)
    x[1] = x[0] + 0.1 * np.eye(8)[6]  # 0~1
    x[2] = x[1] + 0.1 * np.eye(8)[7]  # 1~2: one group {0, 1, 2} by transitivity
    r = find_duplicates(store_from_arrays(tmp_path / "s.h5", x), threshold=0.99)
    assert [g["ids"] for g in r["groups"]] == [[0, 1, 2]]


def planted_duplicates(n: int, dim: int = 32, seed: int = 3) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """(n, dim) clustered rows (no two reach cosine 0.99) with planted duplicates: 20 rows copied with a little
    noise (cosine ~0.9999) into the last 40, and 20 exact copies of row 5 (more than dedup's k neighbours) in the
    last 20; and the planted pairs (i < j)."""
    x = clustered(n, dim, seed=seed)
    rng = np.random.default_rng(seed)
    src = rng.choice(np.setdiff1d(np.arange(n - 40), [5]), 20, replace=False)
    dst = n - 40 + np.arange(20)
    x[dst] = x[src] + 0.01 * rng.normal(size=(20, dim))
    x[n - 20:] = x[5]
    group = [5, *range(n - 20, n)]
    pairs = {(int(a), int(b)) for a, b in zip(src, dst)} | {(a, b) for a in group for b in group if a < b}
    return x, pairs


def test_approximate_dedup_finds_the_pairs_exact_finds(tmp_path):
    from probe.search.dedup import near_pairs
    from probe.search.rows import prepare

    x, want = planted_duplicates(3000)
    path = store_from_arrays(tmp_path / "s.h5", x)
    exact = find_duplicates(path, 0.99)  # 3000 rows: within the flat-index size, so exact
    approx = find_duplicates(path, 0.99, exact=False)
    assert exact["search"] == {"method": "exact"} and exact["pairs"] == len(want) == 20 + 21 * 20 // 2
    s = approx["search"]
    assert s["method"] == "approximate" and s["index"].startswith("IVF") and s["params"]["nprobe"] >= 1
    assert s["range_searched"] == 21  # row 5 and its 20 copies: more duplicates than neighbours searched
    assert s["pair_recall"] >= s["pair_recall_target"] == 0.99 and s["synthetic_pairs"] == 1500  # n // 2 rows
    assert s["recall_at_10"] is None and s["recall_queries"] == 0  # no neighbour tuning for pairs alone
    assert approx["pairs"] == exact["pairs"]
    assert [g["ids"] for g in approx["groups"]] == [g["ids"] for g in exact["groups"]]
    assert [g["ids"] for g in exact["groups"]][0] == [5, *range(2980, 3000)] and len(exact["groups"]) == 21
    for a, b in zip(approx["groups"], exact["groups"]):
        assert abs(a["min_similarity"] - b["min_similarity"]) < 1e-5
    found = near_pairs(prepare(x, "cosine"), 0.99, exact=False)
    assert {(int(a), int(b)) for a, b in found.pairs} == want and (found.sims >= 0.99).all()
    assert near_pairs(prepare(x, "cosine"), 0.99, k=30, exact=False).search["range_searched"] == 0  # k > copies


def test_dedup_recall_sets_the_lists_probed(tmp_path):
    """`--recall` (pair_recall) trades speed for pairs: a higher target probes more lists; 0 is refused by name."""
    from typer.testing import CliRunner

    from cli.main import app

    x, _ = planted_duplicates(3000)
    path = store_from_arrays(tmp_path / "s.h5", x)
    probes = {r: find_duplicates(path, 0.95, exact=False, pair_recall=r)["search"] for r in (0.5, 1.0)}
    assert probes[0.5]["params"]["nprobe"] < probes[1.0]["params"]["nprobe"], probes
    assert probes[0.5]["pair_recall"] >= 0.5 and probes[1.0]["pair_recall"] == 1.0
    r = CliRunner().invoke(app, ["dedup", str(path), "--recall", "0"])
    assert r.exit_code == 1 and "--recall is a share of pairs in (0, 1], got 0.0" in r.output, r.output


def test_batch_knn_is_the_index_search_done_list_by_list():
    """FAISS's big-batch search returns what the same IVF index's own search returns, with store rows as ids."""
    from probe.search.dedup import batch_knn
    from probe.search.rows import Rows, prepare

    x = prepare(np.random.default_rng(0).normal(size=(3000, 32)), "cosine")
    cfg = IndexConfig(type="ivf", nlist=40, tune_queries=200)  # held-out rows are added last: ids != add order
    index, _, _, _ = build_faiss(x, cfg)
    faiss.extract_index_ivf(index).nprobe = 3
    want_s, want_i = index.search(x, 11)
    got_s, got_i = batch_knn(index, Rows(x, None, 500), 11, nprobe=3, step=700)  # blocks of queries
    assert np.allclose(got_s, want_s, atol=1e-5)
    assert (got_i == want_i).mean() > 0.999  # the rest are ties in similarity
    assert (got_i[:, 0] == np.arange(3000)).all()  # every row finds itself first
    small = faiss.IndexIDMap2(faiss.index_factory(32, "IVF5,Flat", faiss.METRIC_INNER_PRODUCT))
    small.train(np.tile(x[:16], (8, 1)))  # 5 lists of ~3 of the 16 rows, 1 probed: fewer neighbours than asked
    small.add_with_ids(x[:16], np.arange(16))
    s_, i_ = batch_knn(small, Rows(x[:16], None), 11, nprobe=1)
    assert ((i_ == -1) == (s_ == 0)).all() and (i_ == -1).any() and (i_[:, 0] == np.arange(16)).all()


def test_add_assigned_fills_the_lists_the_usual_add_fills():
    """dedup's add reuses one coarse search per row for the add and the big-batch search: every row lands in the
    list the index's own add puts it in, and the search with that assignment finds what the search finds alone."""
    from probe.search.dedup import add_assigned, batch_knn
    from probe.search.rows import Rows, prepare

    x = prepare(np.random.default_rng(1).normal(size=(3000, 32)), "cosine")
    cfg = IndexConfig(type="ivf", nlist=40, tune_queries=0)
    usual = faiss.extract_index_ivf(build_faiss(x, cfg)[0])
    wrapped = build_faiss(x, cfg, fill=False)[0]  # the same seeded training: the same centroids
    ivf = faiss.extract_index_ivf(wrapped)
    assert ivf.ntotal == 0
    assign = add_assigned(ivf, Rows(x, None, 700), nprobe=3)  # blocks of rows
    assert ivf.ntotal == 3000 and (assign == usual.quantizer.search(x, 3)[1]).all()

    def ids(index, lst):
        return faiss.rev_swig_ptr(index.invlists.get_ids(lst), index.invlists.list_size(lst)).tolist()

    assert all(ids(ivf, lst) == ids(usual, lst) for lst in range(40))  # the same rows, in the same order
    want = batch_knn(build_faiss(x, cfg)[0], Rows(x, None), 11, nprobe=3)
    got = batch_knn(ivf, Rows(x, None), 11, nprobe=3, assign=assign, step=1000)  # no id map: ids are rows
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    with pytest.raises(ValueError, match="one shard with no tuning queries"):
        build_faiss(x, IndexConfig(type="ivf", nlist=40), fill=False)  # tune_queries > 0 by default

def test_pair_probes_estimate_is_the_share_of_pairs_found():
    """The estimate made on synthetic pairs predicts the share of real pairs at the threshold the search finds, and
    the nprobe chosen is the fewest that reaches the target."""
    from probe.search.dedup import near_pairs, pair_probes, self_join_lists
    from probe.search.rows import Rows, prepare

    rng = np.random.default_rng(0)
    n, dim, m = 20_000, 64, 1000
    x = prepare(rng.normal(size=(20, dim))[rng.integers(0, 20, n)] * 0.3 + rng.normal(size=(n, dim)), "cosine")
    a, b = np.split(rng.permutation(n)[: 2 * m], 2)
    d = x[b] - (x[b] * x[a]).sum(1, keepdims=True) * x[a]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    x[b] = 0.95 * x[a] + np.sqrt(1 - 0.95 ** 2) * d  # m pairs at cosine 0.95 exactly
    found = near_pairs(x, 0.949, exact=False, pair_recall=0.9)
    s = found.search
    share = len({tuple(p) for p in found.pairs.tolist()} & {(min(i, j), max(i, j)) for i, j in zip(a, b)}) / m
    assert share >= s["pair_recall"] - 0.02 and share >= 0.88, (share, s)  # 0.947 found, 0.914 estimated: a
    # planted pair often trains its own centroid here (10% of rows), which the synthetic pairs do not
    index, _, _, _ = build_faiss(x, IndexConfig(type="ivf", nlist=self_join_lists(n), tune_queries=0))
    rows = Rows(x, None)
    q = faiss.extract_index_ivf(index).quantizer
    p, est, used = pair_probes(q, rows, 0.95, target=0.9)
    more, higher, _ = pair_probes(q, rows, 0.95, target=est + 1e-6)  # just above what p reaches
    assert est >= 0.9 and more > p and higher > est and used == 2000  # p: the fewest lists that reach it
    assert pair_probes(q, rows, 0.99, target=0.9)[0] <= p  # closer pairs need no more lists
    assert pair_probes(q, rows, 0.95, target=1.0)[1] == 1.0  # at worst every list


@pytest.mark.parametrize("progress", [True, False])
def test_approximate_dedup_bars_count_rows_added_and_searched(tmp_path, capsys, progress):
    x, _ = planted_duplicates(600)
    find_duplicates(store_from_arrays(tmp_path / "s.h5", x), 0.99, exact=False, progress=progress)
    err = capsys.readouterr().err
    if progress:  # the index build's bar (it waits at 0 while the index trains), then the neighbour search's
        assert "index IVF" in err and "near-duplicates" in err and err.count("600/600") >= 2, err
    else:
        assert err == ""


# ------------------------------------------------------------------------------------------- from arrays
def test_from_arrays_searches_like_a_store_index(synth, tmp_path):
    from probe.errors import ProbeError
    from probe.identity import FeatureIdentity

    path, x = synth
    idx = SearchIndex.from_arrays(x, labels=np.arange(len(x)) % 4, classes=list("abcd"))
    ref = SearchIndex.build(path)
    s, i = idx.search(x[[5, 17]], k=4)  # (2, 4)
    s_ref, i_ref = ref.search(x[[5, 17]], k=4)
    assert np.array_equal(i, i_ref) and np.allclose(s, s_ref)
    assert idx.identity == ref.identity and not idx.has_backbone  # the placeholder store_from_arrays records
    assert isinstance(idx.config, IndexConfig) and idx.config == IndexConfig()
    assert idx.paths[5] == "row00000005" and idx.label_name(5) == "b"
    r = search_index(idx, ["5"], k=2)  # gallery ids need no backbone
    assert r["results"][0]["hits"][0]["id"] == 5 and r["backbone"] == "arrays"
    with pytest.raises(ProbeError, match="no backbone made"):
        search_index(idx, [str(make_image(tmp_path / "q.png", 1))], k=3)

    idx.save(tmp_path / "a.faiss")  # optional, and loads like any other
    back = SearchIndex.load(tmp_path / "a.faiss")
    assert np.array_equal(back.search(x[[5, 17]], k=4)[1], i) and back.config == idx.config
    assert back.meta["store"] == "" and back.meta["config_key"] == ref.meta["config_key"]

    made = FeatureIdentity(backbone="resnet50", weights="DEFAULT", weights_sha256="ab" * 32,
                           preprocess={"resize": 232, "crop": 224}, pooling="penultimate")
    named = SearchIndex.from_arrays(x[:100], paths=[f"img/{i}.png" for i in range(100)], identity=made,
                                    config=IndexConfig(metric="l2"))
    assert named.identity == made and named.has_backbone and named.config.metric == "l2"
    assert named.classes == [] and named.label_name(0) is None and named.paths[3] == "img/3.png"
    with pytest.raises(IndexMismatchError, match="backbone: index has 'resnet50', store 'arrays'"):
        named.add(path)


def test_from_arrays_approximate_sharded_and_bad_input(synth, tmp_path):
    from probe.errors import ProbeError

    _, x = synth
    idx = SearchIndex.from_arrays(x, config=IndexConfig(type="ivf", shards=2, tune_queries=400))
    assert idx.kind == "ivf" and idx.meta["recall"] >= 0.95 and idx.bounds == [0, 1500, 3000]
    assert idx.config.shards == 2 and idx.search(x[2999], 1)[1][0, 0] == 2999
    idx.save(tmp_path / "s.faiss")
    assert SearchIndex.load(tmp_path / "s.faiss").search(x[10], 1)[1][0, 0] == 10
    with pytest.raises(ProbeError, match=r"needs an \(N, D\) array"):
        SearchIndex.from_arrays(x[0])
    with pytest.raises(ProbeError, match="labels has 2 entries for 3000 vectors"):
        SearchIndex.from_arrays(x, labels=[0, 1])
    with pytest.raises(ProbeError, match="paths must be unique"):
        SearchIndex.from_arrays(x[:2], paths=["a", "a"])
