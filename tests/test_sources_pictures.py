"""Pictures of container rows (probe.sources.Pictures): tar members, Parquet rows and Arrow rows read by their
stored path (``000001.tar#Bag/x.png``, ``part-0.parquet#row=7``) wherever a page or the service shows a row's
image -- the doctor page, the search contact sheet, the map page, the served thumbnail -- with files unchanged.

Real shards (tarfile), Parquet (pyarrow) and save_to_disk (`datasets`) written from the demo images, the
random-weight tiny backbone, the real pages read back and their thumbnails decoded."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from probe.data import ImageDecodeError
from probe.doctor import doctor
from probe.embedding_map import embedding_map
from probe.extract import extract
from probe.report import THUMB, doctor_page
from probe.search.index import SearchIndex
from probe.serve.errors import NotFound
from probe.serve.service import ServeConfig, load_service
from probe.sources import SEP, Pictures, split_key
from probe.store import FeatureStore

from .conftest import DEMO, tiny_config
from .test_sources import CLASSES, parquet_tables, tar_bytes, wds_shards, write_hf, write_parquet, write_shards

runner = CliRunner()
PER_CLASS = 8  # 24 train rows (and 24 val rows in the Parquet files): the doctor needs 20 labelled rows
SHARDS = 3 * PER_CLASS // 6  # of 6 samples each


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Listings of remote containers (cache/listings) and engine exports go to this session's temporary cache,
    not the checkout's cache/."""
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "probe-cache"))


def original(path: str) -> bytes:
    """The demo image a container row was written from: a shard member ``<class>/<stem>.png`` (train), or a
    Parquet row (train rows then val rows, as ``parquet_tables`` lists them)."""
    container, member = path.split(SEP, 1)
    if container.endswith(".tar"):
        c, stem = split_key(member)[0].split("/")
        return (DEMO / "train" / c / f"{stem}.png").read_bytes()
    table = parquet_tables(PER_CLASS)[int(container.split("-")[1].split(".")[0])]
    return (DEMO / table.column("file")[int(member[4:])].as_py()).read_bytes()


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), np.float64)


def card_paths(page: str) -> list[tuple[np.ndarray, str]]:
    """(decoded thumbnail, the row path on its card) of every card with a thumbnail."""
    cards = re.findall(r'<div class="card[^"]*"><img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)".*?'
                       r"<span class='path'>(.*?)</span>", page)
    return [(rgb(base64.b64decode(u)), p) for u, p in cards]


def assert_thumbnail_of(thumb: np.ndarray, want: bytes) -> None:
    """A report thumbnail is the image enlarged (nearest) to THUMB px, as JPEG: same shape, close pixels."""
    img = Image.open(io.BytesIO(want)).convert("RGB")
    up = THUMB / max(img.size)
    big = np.asarray(img.resize((round(img.width * up), round(img.height * up)), Image.Resampling.NEAREST),
                     np.float64)
    assert thumb.shape == big.shape and max(thumb.shape[:2]) == THUMB
    assert abs(thumb.mean() - big.mean()) < 2.0 and np.abs(thumb - big).mean() < 6.0


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=["webdataset", "parquet"])
def store(request, tmp_path_factory) -> Path:
    """A labelled tiny-backbone store of container rows: SHARDS tar shards of 6 samples, or 2 Parquet files."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "webdataset":
        data = write_shards(root / "shards", wds_shards(per_shard=6, per_class=PER_CLASS))
        cfg = tiny_config()
    else:
        data = str(write_parquet(root / "pq", parquet_tables(PER_CLASS)))
        cfg = tiny_config(image_column="img", label_column="cls")
    out = root / "store.h5"
    extract(data, out, cfg)
    return out


# --------------------------------------------------------------------------------------------------- tests
def test_members_read_back_byte_for_byte(store):
    s = FeatureStore(store)
    pics = Pictures.of_store(s.attrs)
    paths = s.paths().tolist()
    assert all(pics.member(p) is not None for p in paths)
    for p in paths:
        assert pics.read(p) == original(p), p
    assert pics.load(paths[0]).size == Image.open(io.BytesIO(original(paths[0]))).size
    # the same rows with the layout unknown (an index whose store is gone): told apart by what exists
    loose = Pictures(s.attrs["root"])
    assert [loose.read(p) for p in paths[:3]] == [original(p) for p in paths[:3]]


def test_doctor_page_thumbnails_are_the_rows_images(store, tmp_path):
    report = doctor(store, folds=3)
    page = doctor_page(report, tmp_path / "doctor.html").read_text(encoding="utf-8")
    cards = card_paths(page)
    assert "image not found" not in page
    assert len(cards) == len(report.label_issues[:50]) + 2 * len(report.duplicates["pairs"][:50]) + \
        len(report.outliers[:50]) > 0
    for thumb, path in cards:
        assert_thumbnail_of(thumb, original(path))


def test_search_html_contact_sheet_shows_the_hits(store, tmp_path):
    index = tmp_path / "g.faiss"
    SearchIndex.build(FeatureStore(store)).save(index)
    first = FeatureStore(store).paths()[0]
    r = runner.invoke(app, ["search", first, "3", "--index", str(index), "-k", "4", "--html",
                            str(tmp_path / "hits.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "hits.html").read_text(encoding="utf-8")
    cards = card_paths(page)
    assert "image not found" not in page and len(cards) == 2 * (1 + 4)  # each query's card, then its 4 hits
    stored = set(FeatureStore(store).paths().tolist())
    hits = [(thumb, path) for thumb, path in cards if path in stored]  # a query's card shows what was typed
    assert len(hits) == 2 * 4
    for thumb, path in hits:
        assert_thumbnail_of(thumb, original(path))
    assert cards[1][1] == first  # the query's own row is its first hit


def test_map_page_embeds_every_rows_thumbnail(store, tmp_path):
    m = embedding_map(store, method="pca", out=tmp_path / "map.html")
    assert m.thumbnails == FeatureStore(store).count
    assert not any("could not be read" in n for n in m.notes)
    few = embedding_map(store, method="pca", out=tmp_path / "few.html", thumbs=5)
    assert few.thumbnails == 5 and any("inside containers" in n for n in few.notes)  # no file:// to fall back on


def test_served_thumbnail_is_the_member_as_png(store, tmp_path):
    svc = load_service(ServeConfig(stores=(f"g={store}",), state_dir=str(tmp_path / "state")))
    paths = FeatureStore(store).paths().tolist()
    for i in (0, len(paths) - 1):
        png = svc.thumbnail("g", i, 64)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG"
            got = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(got, rgb(original(paths[i])))  # 28 px, smaller than 64: lossless, as is


def test_member_that_cannot_be_read_is_not_shown(tmp_path):
    """A shard replaced after extraction (one member gone, another damaged): the service's 404 names the row,
    the doctor's cards say "image not found", the map counts it among the unreadable; the rest are shown."""
    data = write_shards(tmp_path / "shards", wds_shards(per_shard=6, per_class=PER_CLASS))
    store = tmp_path / "s.h5"
    extract(data, store, tiny_config())
    paths = FeatureStore(store).paths().tolist()
    shard0 = [p for p in paths if p.startswith("000000.tar#")]
    gone, bad = shard0[0], shard0[1]
    kept = [(m, original(f"000000.tar{SEP}{m}")) for m in (p.split(SEP, 1)[1] for p in shard0[2:])]
    (tmp_path / "shards" / "000000.tar").write_bytes(tar_bytes([*kept, (bad.split(SEP, 1)[1], b"not a png")]))
    svc = load_service(ServeConfig(stores=(f"g={store}",), state_dir=str(tmp_path / "state")))
    for p, why in ((gone, "not found in"), (bad, "not an image")):
        with pytest.raises(NotFound, match="cannot be shown") as e:
            svc.thumbnail("g", paths.index(p), 64)
        assert p in str(e.value) and why in str(e.value)
    assert svc.thumbnail("g", paths.index(shard0[2]), 64)[:4] == b"\x89PNG"
    m = embedding_map(store, method="pca", out=tmp_path / "map.html")
    assert m.thumbnails == len(paths) - 2
    assert f"2 of {len(paths)} sampled images could not be read: no thumbnail" in m.notes
    # a shard deleted: every one of its rows, one reason, nothing raised
    (tmp_path / "shards" / "000001.tar").unlink()
    with pytest.raises(ImageDecodeError, match="container not found"):
        Pictures.of_store(FeatureStore(store).attrs).read(next(p for p in paths if p.startswith("000001.tar#")))


def test_saved_hf_dataset_rows(tmp_path):
    write_hf(tmp_path / "hf", per_class=PER_CLASS)
    extract(str(tmp_path / "hf"), tmp_path / "hf.h5", tiny_config())
    s = FeatureStore(tmp_path / "hf.h5")
    pics = Pictures.of_store(s.attrs)
    by_split = {"train": [], "val": []}
    for c in CLASSES:
        for split in by_split:
            by_split[split] += [f.read_bytes() for f in sorted((DEMO / split / c).iterdir())[:PER_CLASS]]
    got = {}
    for p, split in zip(s.paths().tolist(), s.splits().tolist()):
        assert re.fullmatch(r"(train|validation)/data-0000\d-of-0000\d\.arrow#row=\d+", p), p
        got.setdefault(split, []).append(pics.read(p))
    assert sorted(got["train"]) == sorted(by_split["train"]) and sorted(got["val"]) == sorted(by_split["val"])


def test_a_file_named_with_a_hash_in_a_plain_folder(tmp_path):
    """``Bag/a#b.png`` and ``Coat/c.tar#d.png`` are files of an ImageFolder: shown as files, even beside a real
    ``Coat/c.tar`` holding a ``d.png`` of its own, whether the layout is known or not."""
    bag, coat, other = (sorted((DEMO / "train" / c).iterdir())[0].read_bytes() for c in CLASSES)
    root = tmp_path / "data"
    for rel, data in (("Bag/a#b.png", bag), ("Coat/c.tar#d.png", coat), ("Bag/x.png", bag), ("Coat/y.png", coat)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "Coat" / "c.tar").write_bytes(tar_bytes([("d.png", other)]))
    extract(root, tmp_path / "s.h5", tiny_config())
    s = FeatureStore(tmp_path / "s.h5")
    paths = s.paths().tolist()
    assert s.attrs["layout"] == "imagefolder" and {"Bag/a#b.png", "Coat/c.tar#d.png"} <= set(paths)
    for pics in (Pictures.of_store(s.attrs), Pictures(s.attrs["root"])):
        assert pics.member("Coat/c.tar#d.png") is None and pics.read("Coat/c.tar#d.png") == coat
        assert pics.member("Bag/a#b.png") is None and pics.read("Bag/a#b.png") == bag
    svc = load_service(ServeConfig(stores=(f"g={tmp_path / 's.h5'}",), state_dir=str(tmp_path / "state")))
    png = svc.thumbnail("g", paths.index("Coat/c.tar#d.png"), 64)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), rgb(coat))
    assert embedding_map(s, method="pca", out=tmp_path / "map.html").thumbnails == len(paths)


def test_memory_url_shard_store(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    url = "memory://pictures/shards"
    try:
        for k, data in enumerate(wds_shards(per_shard=6, per_class=PER_CLASS)):
            mem.pipe(f"/pictures/shards/{k:06d}.tar", data)
        extract(f"{url}/{{000000..{SHARDS - 1:06d}}}.tar", tmp_path / "m.h5", tiny_config())
        s = FeatureStore(tmp_path / "m.h5")
        paths = s.paths().tolist()
        pics = Pictures(url, s.attrs["layout"])
        assert [pics.read(p) for p in paths] == [original(p) for p in paths]
        assert Pictures(url).read(paths[-1]) == original(paths[-1])  # layout unknown: the shard exists at the URL
        local = write_shards(tmp_path / "shards", wds_shards(per_shard=6, per_class=PER_CLASS))
        assert Pictures(f"file://{Path(local).parent}", "webdataset").read(paths[1]) == original(paths[1])
        # the store records its source URL beside the root, which is fsspec's path (/pictures/shards)
        assert s.attrs["root"] == "/pictures/shards"
        assert s.attrs["source"] == f"{url}/{{000000..{SHARDS - 1:06d}}}.tar"
        recorded = Pictures.of_store(s.attrs)
        assert recorded.load(paths[3]).size == (28, 28)
        assert [recorded.read(p) for p in paths] == [original(p) for p in paths]
        with pytest.raises(ImageDecodeError, match="not found in"):
            pics.read("000000.tar#Bag/nothing.png")
    finally:
        mem.rm("/pictures", recursive=True)


def test_tar_offsets_are_kept_once_per_shard(tmp_path):
    """Reading every row twice keeps one offset table per shard (made by one header scan each)."""
    from probe import sources

    data = write_shards(tmp_path / "shards", wds_shards(per_shard=6, per_class=PER_CLASS))
    store = tmp_path / "s.h5"
    extract(data, store, tiny_config())
    pics = Pictures.of_store(FeatureStore(store).attrs)
    paths = FeatureStore(store).paths().tolist()
    for _ in range(2):
        assert [pics.read(p) for p in paths] == [original(p) for p in paths]
    mine = {k: v for k, v in sources._OFFSETS.items() if k[0].startswith(str(tmp_path))}
    assert sorted(k[0] for k in mine) == [str(tmp_path / "shards" / f"{k:06d}.tar") for k in range(SHARDS)]
    assert all(len(v) == 12 for v in mine.values())  # 6 images and their 6 label members


def test_contact_sheet_shows_the_hits_from_the_index_as_loaded(store, tmp_path):
    """The sheet finds the hits' container rows through the metadata the caller loaded, not its sidecar again."""
    from probe.report import contact_sheet
    from probe.search import search_index, sidecar

    index = tmp_path / "g.faiss"
    SearchIndex.build(FeatureStore(store)).save(index)
    idx = SearchIndex.load(index)
    result = search_index(idx, [FeatureStore(store).paths()[0]], k=3)
    sidecar(index).write_text("{}")  # damaged after loading: read again, it would be refused
    page = contact_sheet(result, tmp_path / "hits.html", meta=idx.meta).read_text(encoding="utf-8")
    cards = card_paths(page)
    assert "image not found" not in page and len(cards) == 1 + 3
    for thumb, path in cards[1:]:
        assert_thumbnail_of(thumb, original(path))
