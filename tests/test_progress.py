"""Progress bars of the long library calls: a tqdm bar on stderr when ``progress=True``, counting the work to its
total, and nothing on stderr when ``progress=False`` (the default: notebooks and tests stay quiet)."""

from __future__ import annotations

import numpy as np
import pytest

from probe.doctor import doctor
from probe.embedding_map import embedding_map
from probe.search import IndexConfig, find_duplicates, index_store, search_index
from probe.store import FeatureStore, store_from_arrays

from .test_search import clustered


def _store(path, n: int, dim: int = 16):
    x = clustered(n, dim)
    return store_from_arrays(path, x, np.arange(n) % 3, classes=list("abc"), paths=[f"r{i}.png" for i in range(n)])


@pytest.mark.parametrize("progress", [True, False])
def test_index_build_shards_and_update_count_every_row_added(tmp_path, capsys, progress):
    _store(tmp_path / "s.h5", 600)
    cfg = IndexConfig(type="ivf", nlist=8, shards=2, chunk_rows=128)
    index_store(tmp_path / "s.h5", tmp_path / "s.faiss", cfg, progress=progress)
    built = capsys.readouterr().err
    _store(tmp_path / "s.h5", 700)  # the store grew by 100 rows (the first 600 are the same)
    out = index_store(tmp_path / "s.h5", tmp_path / "s.faiss", cfg, update=True, progress=progress)
    added = capsys.readouterr().err
    assert out["added"] == 100 and out["count"] == 700
    if progress:  # held-out tuning queries are added after tuning: the bar still ends at every row
        assert "index IVF8,Flat" in built and "600/600" in built
        assert "index add ivf" in added and "100/100" in added
    else:
        assert built == added == ""


@pytest.mark.parametrize("progress", [True, False])
def test_dedup_counts_the_rows_searched(tmp_path, capsys, progress):
    _store(tmp_path / "s.h5", 300)
    find_duplicates(tmp_path / "s.h5", 0.99, progress=progress)
    err = capsys.readouterr().err
    assert ("near-duplicates" in err and "300/300" in err) if progress else err == ""


@pytest.mark.parametrize("progress", [True, False])
def test_doctor_bar_over_the_neighbour_search_of_every_row(tmp_path, capsys, progress):
    _store(tmp_path / "s.h5", 90)
    report = doctor(tmp_path / "s.h5", folds=3, progress=progress)
    err = capsys.readouterr().err
    assert report.n == 90
    assert ("doctor neighbours" in err and "90/90" in err) if progress else err == "", err


@pytest.fixture(scope="module")
def tiny_index(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "tiny.faiss"
    index_store(tiny_store, out)
    return out


@pytest.mark.parametrize(("batch_size", "progress", "bar"), [(4, True, True), (4, False, False),
                                                             (64, True, False)])
def test_search_bar_over_query_images_only_beyond_one_batch(tiny_store, tiny_index, capsys, batch_size, progress,
                                                            bar):
    folder = FeatureStore(tiny_store).attrs["root"] + "/val/cat"  # 6 images: 2 batches of 4, or one of 64
    capsys.readouterr()
    r = search_index(tiny_index, [folder], k=2, batch_size=batch_size, progress=progress)
    err = capsys.readouterr().err
    assert len(r["results"]) == 6
    assert ("embed " in err and "6/6" in err) == bar
    if not bar:
        assert err == ""


@pytest.mark.parametrize("progress", [True, False])
def test_map_bar_over_thumbnails(tiny_store, tmp_path, capsys, progress):
    m = embedding_map(tiny_store, method="pca", out=tmp_path / "m.html", progress=progress)
    err = capsys.readouterr().err
    assert m.thumbnails == 54
    assert ("thumbnails" in err and "54/54" in err) if progress else err == "", err


@pytest.mark.parametrize(("sweep", "fits"), [("once", "4/4"), ("per-fold", "6/6")])
def test_doctor_bar_over_the_cross_validated_fits(tmp_path, capsys, sweep, fits):
    """3 folds: one sweep then a refit per fold, or (nested) a sweep per pair of folds then a refit per fold."""
    _store(tmp_path / "s.h5", 90)
    doctor(tmp_path / "s.h5", folds=3, sweep=sweep, progress=True)
    err = capsys.readouterr().err
    assert "doctor 3-fold fits" in err and fits in err and "doctor neighbours" in err, err
