"""Search by text over an index of a clip/ store, offline: a tiny random open_clip model saved as a folder
(``clip/local-dir:FOLDER``, so the server's child process loads it too), a 12-image gallery, its cosine index.

The library (SearchIndex.search_text, search_text) against an independent numpy ranking with open_clip's own text
encoder, its refusals, `probe search --text`, the /indexes/{name}/search/text endpoint of the real server and the
search page's text box in a real headless chromium."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

open_clip = pytest.importorskip("open_clip")

from cli.main import app  # noqa: E402
from probe.backbones import BackboneError  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.extract import ExtractConfig, extract  # noqa: E402
from probe.search import IndexConfig, SearchIndex, search_text  # noqa: E402
from probe.serve.process import ServerProcess  # noqa: E402
from probe.serve.service import ServeConfig, load_service  # noqa: E402
from probe.store import FeatureStore  # noqa: E402

from .conftest import chromium, make_imagefolder, make_open_clip_dir, tiny_config  # noqa: E402
from .test_serve_security import TOKEN  # noqa: E402

runner = CliRunner()
BEE, CAR = "a photo of a bee", "a red sports car"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 12-image gallery (3 classes x 4), its clip/ store, a cosine index and an l2 index of it, a timm store."""
    root = tmp_path_factory.mktemp("textsearch")
    model = make_open_clip_dir(root / "tiny-clip")
    gallery = make_imagefolder(root / "gallery")
    cache = root / "cache"  # engines exported for this run's model stay out of the repository's cache/
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROBE_CACHE_DIR", str(cache))
        extract(gallery, root / "clip.h5", ExtractConfig(backbone=f"clip/local-dir:{model}", batch_size=4,
                                                         workers=0, dtype="float32"))
        extract(gallery, root / "timm.h5", tiny_config())
    SearchIndex.build(root / "clip.h5").save(root / "clip.faiss")
    SearchIndex.build(root / "clip.h5", IndexConfig(metric="l2")).save(root / "clip-l2.faiss")
    SearchIndex.build(root / "timm.h5").save(root / "timm.faiss")
    return {"model": model, "gallery": gallery, "cache": cache, "store": root / "clip.h5",
            "index": root / "clip.faiss", "l2": root / "clip-l2.faiss", "timm": root / "timm.faiss",
            "state": root / "state"}


def numpy_ranking(files, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids best first, cosines): open_clip's own model and tokenizer for the text, numpy for the rest."""
    name = f"local-dir:{files['model']}"
    model = open_clip.create_model(name).eval()
    with torch.inference_mode():
        t = model.encode_text(open_clip.get_tokenizer(name)([text]))[0].double().numpy()  # (D,)
    X = FeatureStore(files["store"]).features().astype(np.float64)  # (N, D), encode_image output as stored
    cos = X @ t / (np.linalg.norm(X, axis=1) * np.linalg.norm(t))  # (N,)
    order = np.argsort(-cos, kind="stable")
    return order, cos[order]


# ------------------------------------------------------------------------------------------------ library
def test_text_hits_are_the_images_nearest_the_clip_text_embedding(files):
    idx = SearchIndex.load(files["index"])
    assert idx.text_search_problem is None
    scores, ids = idx.search_text([BEE, CAR], k=12, device="cpu")  # (2, 12): the whole gallery, ranked
    assert scores.shape == ids.shape == (2, 12)
    for row, text in enumerate((BEE, CAR)):
        order, cos = numpy_ranking(files, text)
        assert ids[row].tolist() == order.tolist()
        assert np.allclose(scores[row], cos, atol=1e-5)
    assert ids[0].tolist() != ids[1].tolist()  # the text decides the ranking
    tower = idx.text_tower("cpu")
    assert idx.text_tower("cpu") is tower  # built once per index: the next queries reuse it
    s1, i1 = idx.search_text(BEE, k=3, device="cpu")  # one string is one query
    assert i1.tolist() == [ids[0, :3].tolist()] and np.allclose(s1, scores[:1, :3], atol=1e-6)

    out = search_text(idx, [BEE], k=4, device="cpu")
    assert out["backbone"] == f"clip/local-dir:{files['model']}" and out["metric"] == "cosine" and out["k"] == 4
    r = out["results"][0]
    assert r["query"] == BEE and r["kind"] == "text" and r["gallery_id"] is None
    assert [h["id"] for h in r["hits"]] == ids[0, :4].tolist() and [h["rank"] for h in r["hits"]] == [1, 2, 3, 4]
    top = r["hits"][0]
    assert top["path"] == idx.paths[top["id"]] and Path(top["abspath"]).is_file()
    assert top["label"] == top["path"].split("/")[0]


def test_text_search_refusals_name_the_index_and_what_to_do(files):
    with pytest.raises(ProbeError, match=r"backbone timm/test_vit, which has no text tower: text search needs an "
                                         r"index of a clip/<model>:<pretrained> store"):
        SearchIndex.load(files["timm"]).search_text(BEE)
    with pytest.raises(ProbeError, match="no backbone made: text search needs .*clip/<model>:<pretrained>"):
        SearchIndex.from_arrays(np.eye(4, dtype=np.float32)).search_text(BEE)
    l2 = SearchIndex.load(files["l2"])
    assert "metric l2" in l2.text_search_problem
    with pytest.raises(ProbeError, match=rf"clip-l2.faiss' uses metric l2; CLIP compares a text with images by cosine"
                                         rf".*rebuild it with probe index {files['store']} --metric cosine"):
        l2.search_text(BEE)
    idx = SearchIndex.load(files["index"])
    for bad, words in (("", "text query 1 is ''"), ([BEE, "   "], "text query 2 is '   '"), ([], "no text queries")):
        with pytest.raises(ProbeError, match=words):
            idx.search_text(bad)
    with pytest.raises(ProbeError, match="k=13 is larger than the gallery"):
        idx.search_text(BEE, k=13)
    x = idx.vectors(range(idx.count))
    layer = SearchIndex.from_arrays(x, identity=replace(idx.identity, layer="blocks.0"))
    with pytest.raises(ProbeError, match="holds layer blocks.0 of clip/local-dir:.*extract without --layer"):
        layer.search_text(BEE)
    other = SearchIndex.from_arrays(x, identity=replace(idx.identity, weights_sha256="0" * 64))
    with pytest.raises(BackboneError, match="are not the ones these features were made with"):
        other.search_text(BEE, device="cpu")  # never a text tower of other weights against these features


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_search_text(files, tmp_path):
    base = ["search", "--index", str(files["index"]), "--device", "cpu"]
    r = runner.invoke(app, [*base, "--text", BEE, "--text", CAR, "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    expected = {t: numpy_ranking(files, t)[0][:3].tolist() for t in (BEE, CAR)}
    assert [q["query"] for q in out["results"]] == [BEE, CAR]
    assert {q["query"]: [h["id"] for h in q["hits"]] for q in out["results"]} == expected
    assert out["skipped"] == [] and out["count"] == 12

    r = runner.invoke(app, [*base, "-t", BEE, "-k", "2", "--html", str(tmp_path / "hits.html")])
    assert r.exit_code == 0, r.output
    first = FeatureStore(files["store"]).paths()[expected[BEE][0]]
    assert f"query {BEE} (text)" in r.stdout and "cosine" in r.stdout and first in r.stdout
    assert f"contact sheet: {tmp_path / 'hits.html'}" in r.stdout
    page = (tmp_path / "hits.html").read_text()
    assert f"<div class='words'>{BEE}</div>" in page  # the text stands where a query image would
    assert page.count("data:image/jpeg;base64,") == 2  # the two hits' thumbnails

    cases = [([*base, "--text", BEE, "cat/img_0.png"], "not both"), (base, "got neither"),
             (["search", "--index", str(files["timm"]), "--text", BEE], "has no text tower"),
             ([*base, "--text", " "], "text query 1 is ' '")]
    for args, words in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and words in r.stderr, (args, r.output)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- serve: API and page
@pytest.fixture(scope="module")
def server(files):
    """The real server, with a token, serving the cosine index and the l2 index of the same clip/ store."""
    srv = ServerProcess(["--index", f"clip={files['index']}", "--index", f"l2={files['l2']}", "--device", "cpu",
                         "--state-dir", str(files["state"]), "--log-level", "warning"],
                        env={"PROBE_TOKEN": TOKEN, "PROBE_CACHE_DIR": str(files["cache"])})
    srv.start()
    yield srv
    srv.close()


@pytest.mark.slow  # the real server in a child process
def test_serve_text_search_endpoint(server, files):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        models = c.get("/models").json()
        assert {i["name"]: i["text_search"] for i in models["indexes"]} == {"clip": True, "l2": False}
        assert "/indexes/{name}/search/text" in c.get("/openapi.json").json()["paths"]
        r = c.get("/indexes/clip/search/text", params={"text": BEE, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        order, cos = numpy_ranking(files, BEE)
        assert body["index"] == "clip" and body["text"] == BEE and body["metric"] == "cosine" and body["k"] == 5
        assert [h["id"] for h in body["hits"]] == order[:5].tolist()
        assert np.allclose([h["score"] for h in body["hits"]], cos[:5], atol=1e-5)
        assert set(body["hits"][0]) == {"rank", "id", "score", "path", "label"}  # as image search's hits
        again = c.get("/indexes/clip/search/text", params={"text": BEE, "k": 5}).json()
        assert again == body
        cases = [(c.get("/indexes/l2/search/text", params={"text": BEE}), 422, "rebuild it with probe index"),
                 (c.get("/indexes/clip/search/text", params={"text": "  "}), 422, "text query 1 is '  '"),
                 (c.get("/indexes/clip/search/text"), 422, "text"),
                 (c.get("/indexes/clip/search/text", params={"text": "x" * 1001}), 413, "at most 1000"),
                 (c.get("/indexes/clip/search/text", params={"text": BEE, "k": 13}), 422, "larger than the gallery"),
                 (c.get("/indexes/nope/search/text", params={"text": BEE}), 404, "available indexes: clip, l2")]
        for r, status, words in cases:
            assert r.status_code == status and words in r.json()["detail"], (r.request.url, r.text)
    assert httpx.get(f"{server.url}/indexes/clip/search/text", params={"text": BEE}).status_code == 401


def test_service_refuses_text_for_an_index_without_a_text_tower(files):
    svc = load_service(ServeConfig(indexes=(f"timm={files['timm']}",), state_dir=str(files["state"]), device="cpu"))
    assert svc.catalog()["indexes"][0]["text_search"] is False
    with pytest.raises(ProbeError, match="backbone timm/test_vit, which has no text tower"):
        asyncio.run(svc.search_text("timm", BEE, 3))


@pytest.mark.slow  # the real server and a headless chromium
def test_page_text_box_shows_the_nearest_images(server, files, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    order = numpy_ranking(files, BEE)[0]
    paths = FeatureStore(files["store"]).paths()
    with chromium(tmp_path / "chromium-profile", window="1200,1000", page_load_timeout=60) as browser:
        browser.get(f"{server.url}/?token={TOKEN}")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) == 2)
        box = browser.find_element(By.ID, "text")
        wait.until(lambda d: box.is_displayed())  # the selected index (clip) takes text
        Select(browser.find_element(By.ID, "index")).select_by_value("l2")
        assert not box.is_displayed()  # metric l2: no text box
        Select(browser.find_element(By.ID, "index")).select_by_value("clip")
        assert box.is_displayed()
        box.send_keys(BEE)
        browser.find_element(By.CSS_SELECTOR, "#text-form button").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        status = browser.find_element(By.ID, "status").text
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status
        assert status == f'results for "{BEE}"'
        cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert [c.get_attribute("data-path") for c in cards] == [paths[i] for i in order[:12]]
        assert paths[order[0]] in cards[0].text and "cosine" in cards[0].text
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
        shot = Path(os.environ.get("PROBE_SCREENSHOT_TEXT", tmp_path / "text.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
