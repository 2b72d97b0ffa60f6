"""`probe serve` end to end: the real server in a child process on a free loopback port, driven over HTTP.

Gallery: 30 real Fashion-MNIST demo images (3 per class) through the random-weight tiny backbone (milliseconds per
image), served both as a store and as a saved index, with a prototype head fitted on it."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from probe.extract import embedder_for, extract
from probe.heads.fit import fit_head
from probe.predict import predict
from probe.search import SearchIndex, search_index
from probe.serve.process import ServerProcess
from probe.store import FeatureStore

from .conftest import DEMO, tiny_config

pytestmark = pytest.mark.slow


def make_served_files(root: Path, per_class: int = 3) -> dict[str, Path]:
    """root/gallery/<class>/*.png (real demo images), its tiny-backbone store, a prototype head and a saved index."""
    gallery = root / "gallery"
    for cls in sorted(p for p in (DEMO / "val").iterdir() if p.is_dir()):
        (gallery / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.glob("*.png"))[:per_class]:
            shutil.copy(f, gallery / cls.name / f.name)
    store = root / "gallery.h5"
    extract(gallery, store, tiny_config())
    head = root / "proto.safetensors"
    fit_head(store, "prototype", head)
    index = root / "gallery.faiss"
    SearchIndex.build(store).save(index)
    return {"gallery": gallery, "store": store, "head": head, "index": index, "state": root / "state"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_served_files(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    srv = ServerProcess(["--store", f"store={files['store']}", "--index", f"gallery={files['index']}",
                         "--head", f"proto={files['head']}", "--state-dir", str(files["state"]),
                         "--max-upload-mb", "1", "--max-pixels", "1000000", "--log-level", "warning"])
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def first_image(files, cls: str = "Sneaker", k: int = 0) -> Path:
    return sorted((files["gallery"] / cls).glob("*.png"))[k]


def test_health_models_and_openapi(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["ready"] and h["backbone"] == "timm/test_vit"
    m = client.get("/models").json()
    assert m["backbone"]["name"] == "timm/test_vit" and m["backbone"]["dim"] == 64
    assert [h["name"] for h in m["heads"]] == ["proto"] and len(m["heads"][0]["classes"]) == 10
    assert {i["name"]: i["count"] for i in m["indexes"]} == {"gallery": 30, "store": 30}
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/health", "/models", "/embed", "/heads/{name}/classify", "/indexes/{name}/search",
              "/fewshot/{name}/examples", "/fewshot/{name}/classify"):
        assert p in paths, p
    assert client.get("/").status_code == 200 and "probe" in client.get("/").text


def test_embed_matches_offline_embedder(client, files):
    img = first_image(files)
    r = client.post("/embed", files={"file": png(img)})
    assert r.status_code == 200, r.text
    served = np.array(r.json()["embedding"], np.float32)
    offline = embedder_for(FeatureStore(files["store"]).attrs).embed_files([str(img)])[0][0]
    assert served.shape == (64,)
    assert np.allclose(served, offline, atol=1e-4)


def test_classify_matches_probe_predict(client, files):
    img = first_image(files, "Bag")
    r = client.post("/heads/proto/classify?k=3", files={"file": png(img)})
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    expected = predict([img], files["head"], top_k=3)["predictions"][0]["top"]
    assert [t["class"] for t in top] == [t["class"] for t in expected]
    assert np.allclose([t["probability"] for t in top], [t["probability"] for t in expected], atol=1e-4)


def test_classify_rejects_unknowns(client, files):
    """reject=auto|none|<distance> on the real server: 'unknown' above the threshold, a 422 naming a bad value."""
    img = {"file": png(first_image(files, "Bag"))}
    default = client.post("/heads/proto/classify?k=2", files=img).json()  # opt-in: none by default
    assert default["reject"]["mode"] == "none" and not default["rejected"]
    auto = client.post("/heads/proto/classify?k=2&reject=auto", files=img).json()
    assert auto["calibrated"] is True and auto["reject"]["mode"] == "auto" and auto["distance"] >= 0
    zero = client.post("/heads/proto/classify?k=2&reject=0", files=img).json()
    assert zero["class"] == "unknown" and zero["rejected"] and zero["top"][0]["class"] == auto["top"][0]["class"]
    none = client.post("/heads/proto/classify?k=2&reject=none", files=img).json()
    assert not none["rejected"] and none["class"] == none["top"][0]["class"]
    bad = client.post("/heads/proto/classify?reject=often", files=img)
    assert bad.status_code == 422 and "`reject` must be auto" in bad.json()["detail"]
    assert "got 'often'" in bad.json()["detail"]


@pytest.mark.parametrize("index", ["gallery", "store"])
def test_search_by_upload_finds_the_image_itself(client, files, index):
    img = first_image(files, "Coat", 1)
    r = client.post(f"/indexes/{index}/search?k=5", files={"file": png(img)})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and hits[0]["path"] == f"Coat/{img.name}" and hits[0]["label"] == "Coat"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(set(h) == {"rank", "id", "score", "path", "label"} for h in hits)  # no abspath: the server's folders


def test_search_by_id_and_thumbnails(client, files):
    r = client.get("/indexes/gallery/search", params={"id": 7, "k": 4}).json()
    assert r["hits"][0]["id"] == 7 and len(r["hits"]) == 4
    expected = search_index(files["index"], ["7"], k=4)["results"][0]["hits"]  # `probe search`'s, less abspath
    assert r["hits"] == [{k: v for k, v in h.items() if k != "abspath"} for h in expected]
    t = client.get("/indexes/gallery/items/7/image?size=64")
    assert t.status_code == 200 and t.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(t.content)).size[0] <= 64
    # only gallery files: ids, never paths
    assert client.get("/indexes/gallery/items/30/image").status_code == 404
    assert client.get("/indexes/gallery/items/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/static/../service.py").status_code == 404


def test_fewshot_create_add_classify(client, files):
    assert client.post("/fewshot/shoes").status_code == 201
    assert client.post("/fewshot/shoes").status_code == 409  # exists
    for cls in ("Sneaker", "Bag"):
        for k in range(2):
            r = client.post("/fewshot/shoes/examples", files={"file": png(first_image(files, cls, k))},
                            data={"label": cls})
            assert r.status_code == 200, r.text
    assert client.get("/fewshot/shoes").json()["classes"] == {"Bag": 2, "Sneaker": 2}
    r = client.post("/fewshot/shoes/classify?k=2", files={"file": png(first_image(files, "Bag", 0))})
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert top[0]["class"] == "Bag" and sum(t["probability"] for t in top) == pytest.approx(1, abs=1e-4)
    assert (files["state"] / "fewshot" / "shoes.npz").is_file()


def _multipart(name: str, payload: bytes) -> tuple[str, bytes, str]:
    return (name, payload, "application/octet-stream")


def test_bad_input_is_a_clear_4xx_and_the_server_lives_on(client, files):
    img = first_image(files)
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), (200, 30, 30)).save(big, format="PNG")  # 1.2 Mpx in a few KB
    cases = [
        (client.post("/embed", files={"file": _multipart("notes.txt", b"just some text, not pixels")}), 415,
         "not an image"),
        (client.post("/embed", files={"file": _multipart("empty.png", b"")}), 422, "empty"),
        (client.post("/embed", files={"file": _multipart("cut.png", img.read_bytes()[:120])}), 422, "truncated"),
        (client.post("/embed", files={"file": ("big.png", big.getvalue(), "image/png")}), 413, "1200000 pixels"),
        (client.post("/embed", files={"file": _multipart("huge.bin", b"\0" * (2 * 2**20))}), 413, "at most 1 MB"),
        (client.post("/embed"), 422, "file"),
        (client.post("/embed", content=b"{not multipart", headers={"content-type": "application/json"}), 422, ""),
        (client.post("/heads/nope/classify", files={"file": png(img)}), 404, "available heads: proto"),
        (client.post("/indexes/nope/search", files={"file": png(img)}), 404, "available indexes: gallery, store"),
        (client.post("/fewshot/nope/classify", files={"file": png(img)}), 404, "no few-shot set named 'nope'"),
        (client.get("/indexes/gallery/search", params={"id": 99}), 404, "ids run from 0 to 29"),
        (client.get("/indexes/gallery/search", params={"id": "abc"}), 422, "id"),
        (client.post("/indexes/gallery/search?k=0", files={"file": png(img)}), 422, "greater than or equal to 1"),
        (client.post("/indexes/gallery/search?k=31", files={"file": png(img)}), 422, "larger than the gallery"),
        (client.post("/fewshot/bad name!"), 422, "invalid set name"),
        (client.post("/fewshot/shoes/examples", files={"file": png(img)}), 422, "label"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert words in r.json()["detail"], r.text

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    r = client.post("/embed", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413, r.text
    assert client.get("/health").json()["ready"]
    assert client.post("/embed", files={"file": png(img)}).status_code == 200


def test_concurrent_requests_share_forward_passes(server, files):
    payload = png(first_image(files))
    before = httpx.get(f"{server.url}/metrics").json()

    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/embed", files={"file": payload}) for _ in range(n)])
        return [r.status_code for r in rs]

    assert asyncio.run(burst(16)) == [200] * 16
    after = httpx.get(f"{server.url}/metrics").json()
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 16
    assert requests / batches > 1, after  # micro-batching happened
    assert after["max_batch_seen"] > 1


def test_restart_keeps_fewshot_sets(server, files):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.post("/fewshot/restart")
        for cls in ("Trouser", "Sandal"):
            c.post("/fewshot/restart/examples", files={"file": png(first_image(files, cls))}, data={"label": cls})
        before = c.post("/fewshot/restart/classify", files={"file": png(first_image(files, "Sandal"))}).json()
    assert server.stop() in (0, -15)  # graceful: uvicorn re-raises SIGTERM after shutdown; -9 would mean killed
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert {s["name"] for s in c.get("/fewshot").json()} >= {"restart", "shoes"}
        after = c.post("/fewshot/restart/classify", files={"file": png(first_image(files, "Sandal"))}).json()
    assert after == before and after["top"][0]["class"] == "Sandal"
