"""`probe index`, `probe search`, `probe dedup` through typer's CliRunner: exit codes, text and --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from probe.store import store_from_arrays

from .conftest import DEMO
from .test_search import clustered

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    from cli.main import app

    return app


def invoke(app, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_index_search_dedup_json(app, tmp_path):
    x = clustered(400, dim=16, seed=5)
    x[7] = x[3]  # an exact duplicate for dedup
    store = tmp_path / "s.h5"
    store_from_arrays(store, x, np.arange(400) % 2, classes=["even", "odd"])
    r = invoke(app, "index", store, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["index"] == str(tmp_path / "s.faiss") and s["type"] == "flat" and s["count"] == 400
    r = invoke(app, "index", store, "--type", "hnsw", "--metric", "l2", "--out", tmp_path / "h.faiss")
    assert r.exit_code == 0 and "built hnsw index" in r.output and "recall@10" in r.output
    r = invoke(app, "search", "12", "row00000020", "--index", tmp_path / "s.faiss", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [q["hits"][0]["id"] for q in out["results"]] == [12, 20] and len(out["results"][0]["hits"]) == 3
    r = invoke(app, "search", "12", "--index", tmp_path / "s.faiss", "-k", "2")
    assert r.exit_code == 0 and "row00000012" in r.output.splitlines()[2] and "even" in r.output
    r = invoke(app, "dedup", store, "--threshold", "0.999", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["groups"][0]["paths"] == ["row00000003", "row00000007"]
    r = invoke(app, "index", store, "--update")
    assert r.exit_code == 0 and "updated flat index" in r.output and "added 0" in r.output


def test_user_errors_exit_1(app, tmp_path):
    store = tmp_path / "s.h5"
    store_from_arrays(store, clustered(50, dim=8))
    assert invoke(app, "index", store).exit_code == 0
    r = invoke(app, "search", "1", "--index", tmp_path / "s.faiss", "-k", "51")
    assert r.exit_code == 1 and "error: k=51 is larger than the gallery (50 images)" in r.output
    r = invoke(app, "search", "1", "--index", tmp_path / "none.faiss")
    assert r.exit_code == 1 and "error: no search index" in r.output
    r = invoke(app, "index", tmp_path / "missing.h5")
    assert r.exit_code == 1 and "does not exist" in r.output
    store_from_arrays(tmp_path / "e.h5", np.zeros((0, 8), np.float32))
    r = invoke(app, "index", tmp_path / "e.h5")
    assert r.exit_code == 1 and "has no rows" in r.output
    r = invoke(app, "index", store, "--type", "annoy")
    assert r.exit_code == 1 and "unknown index type 'annoy'" in r.output
    store_from_arrays(tmp_path / "o.h5", clustered(60, dim=8), config={"backbone": "resnet50"})
    r = invoke(app, "index", tmp_path / "o.h5", "--update", "--out", tmp_path / "s.faiss")
    assert r.exit_code == 1 and "another backbone configuration" in r.output


def test_search_image_with_html(app, demo_store, tmp_path):
    assert invoke(app, "index", demo_store, "--out", tmp_path / "d.faiss").exit_code == 0
    png = DEMO / "val" / "Sandal"
    first = sorted(png.glob("*.png"))[0]
    r = invoke(app, "search", first, "--index", tmp_path / "d.faiss", "-k", "5", "--html", tmp_path / "s.html")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"query {first}") and f"val/Sandal/{first.name}" in lines[2]
    assert lines[-1] == f"contact sheet: {tmp_path / 's.html'}"
    assert (tmp_path / "s.html").read_text().count("<img ") == 6


@pytest.mark.parametrize("damage, says", [
    (lambda meta: b"{not json", "is not valid JSON"),
    (lambda meta: json.dumps({**meta, "format": "other"}).encode(), "is not the metadata of a probe search index"),
    (lambda meta: json.dumps({**meta, "root": "/elsewhere"}).encode(), "is damaged: its contents no longer match"),
], ids=["not-json", "foreign", "edited"])
def test_contact_sheet_reads_the_sidecar_as_loading_the_index_does(tmp_path, damage, says):
    """`probe search --html` of rows that are no files here (an arrays store) reads the index's sidecar for where
    its images are: a sidecar damaged after the search is the one-line error of SearchIndex.load, naming it."""
    from probe.errors import ProbeError
    from probe.report import contact_sheet
    from probe.search import SearchIndex, search_index, sidecar

    store = tmp_path / "s.h5"
    store_from_arrays(store, clustered(20, dim=8))
    SearchIndex.build(store).save(tmp_path / "s.faiss")
    result = search_index(tmp_path / "s.faiss", ["3"], k=2)
    page = contact_sheet(result, tmp_path / "ok.html").read_text(encoding="utf-8")
    assert page.count("image not found") == 3  # the query and its 2 hits: rows of arrays have no image
    side = sidecar(tmp_path / "s.faiss")
    side.write_bytes(damage(json.loads(side.read_bytes())))
    with pytest.raises(ProbeError, match=says) as e:
        contact_sheet(result, tmp_path / "bad.html")
    assert str(e.value).startswith(f"{str(side)!r}") and "\n" not in str(e.value)
    with pytest.raises(ProbeError, match=says):  # the same words as loading the index
        SearchIndex.load(tmp_path / "s.faiss")
    assert not (tmp_path / "bad.html").exists()
