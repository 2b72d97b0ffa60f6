"""A folder or a CSV manifest at a URL reads as it does on disk (one layout rule, one manifest parser: multi-label
manifests too); planning asks the filesystem once per folder and once per shard it names, never once per file
listed; a compressed shard's member reads back through Pictures.

memory:// (fsspec's in-memory filesystem) stands for a bucket; its requests are counted on its class."""

from __future__ import annotations

import gzip
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from probe import sources
from probe.data import ImageDecodeError, discover
from probe.errors import DatasetError
from probe.extract import extract
from probe.sources import Pictures
from probe.store import FeatureStore

from .conftest import make_image, tiny_config
from .test_sources import demo_images, tar_bytes, wds_shards, write_hf

fsspec = pytest.importorskip("fsspec")
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def mem(request):
    """The memory filesystem and a bucket path of this test's own (``/debt-<test>``), removed afterwards."""
    fs = fsspec.filesystem("memory")
    bucket = "/debt-" + "".join(c if c.isalnum() else "-" for c in request.node.name)
    yield fs, bucket
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, str]]:
    """(method, path) of every exists / isdir / info / ls / find call on memory:// from now on (calls fsspec makes
    inside another, as exists -> info, included)."""
    out: list[tuple[str, str]] = []
    for name in ("exists", "isdir", "info", "ls", "find"):
        def counted(self, path, *args, _name=name, _orig=getattr(MemoryFileSystem, name), **kwargs):
            out.append((_name, self._strip_protocol(path)))
            return _orig(self, path, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, name, counted)
    return out


def mirror(fs, local: Path, bucket: str) -> str:
    """Every file under ``local`` copied to ``bucket`` (hidden ones too); the bucket's memory:// URL."""
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe(f"{bucket}/{f.relative_to(local).as_posix()}", f.read_bytes())
    return f"memory:/{bucket}"


def seen(ds) -> dict:
    """What a Dataset says of its rows, as comparable values."""
    return {"layout": ds.layout, "paths": ds.paths, "labels": [ds.classes[y] if y >= 0 else None for y in ds.labels],
            "splits": ds.splits, "classes": ds.classes, "ignored": sorted(ds.ignored),
            "matrix": None if ds.label_matrix is None else ds.label_matrix.tolist()}


# --------------------------------------------------------------------------------------------- manifests
MANIFESTS = {
    "labels": ["path,labels,split", "imgs/0.png,cat|dog,train", "imgs/1.png,dog,train", "imgs/2.png,,val",
               "imgs/3.png, dog | cat ,val"],
    "wide": ["path,cat,dog,split", "imgs/0.png,1,1,train", "imgs/1.png,0,1,train", "imgs/2.png,0,0,val",
             "imgs/3.png,1,0,val"],
    "label": ["path,label,split", "imgs/0.png,cat,train", "imgs/1.png,,train", "imgs/2.png,dog,validation",
              "imgs/3.png,cat,test"],
}


@pytest.mark.parametrize("form", sorted(MANIFESTS))
def test_manifest_at_a_url_reads_as_on_disk(tmp_path, mem, form):
    fs, bucket = mem
    for k in range(4):
        make_image(tmp_path / "imgs" / f"{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("\n".join(MANIFESTS[form]) + "\n")
    url = mirror(fs, tmp_path, bucket) + "/m.csv"
    local, remote = discover(tmp_path / "m.csv"), discover(url)
    assert seen(remote) == seen(local) and remote.multilabel == (form != "label")
    size = fs.info(f"{bucket}/imgs/0.png")["size"]
    assert remote.reader is not None and remote.fingerprints()[0].startswith(f"{size}:")


def test_multilabel_manifest_at_a_url_extracts_its_matrix(tmp_path, mem):
    fs, bucket = mem
    for k in range(4):
        make_image(tmp_path / "imgs" / f"{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("\n".join(MANIFESTS["labels"]) + "\n")
    url = mirror(fs, tmp_path, bucket) + "/m.csv"
    s = FeatureStore(extract(url, tmp_path / "s.h5", tiny_config())["store"])
    want = FeatureStore(extract(tmp_path / "m.csv", tmp_path / "want.h5", tiny_config())["store"])
    assert s.multilabel and s.classes == ["cat", "dog"]
    assert s.label_matrix().tolist() == [[1, 1], [0, 1], [0, 0], [1, 1]] == want.label_matrix().tolist()
    np.testing.assert_allclose(s.features(), want.features(), atol=1e-5)


def test_missing_object_in_a_manifest_at_a_url_is_skipped_as_on_disk(tmp_path, mem):
    """A row naming no object is recorded as skipped with the local reason, the others extracted (it was a
    FileNotFoundError traceback from planning)."""
    fs, bucket = mem
    for k in range(3):
        make_image(tmp_path / "imgs" / f"{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("path,label\nimgs/0.png,cat\nimgs/9.png,dog\nimgs/1.png,dog\nimgs/2.png,cat\n")
    url = mirror(fs, tmp_path, bucket) + "/m.csv"
    s, w = (FeatureStore(extract(src, tmp_path / f"{k}.h5", tiny_config())["store"])
            for k, src in (("s", url), ("w", tmp_path / "m.csv")))
    assert len(s.features()) == len(w.features()) == 3
    (got,), (want,) = s.skipped(), w.skipped()
    assert got["path"].endswith("imgs/9.png") and got["reason"] == want["reason"] == "file not found (deleted or " \
        "moved during the run)"


def test_bad_manifest_at_a_url_names_its_line(tmp_path, mem):
    fs, bucket = mem
    fs.pipe(f"{bucket}/m.csv", b"path,labels\nimgs/0.png,cat||dog\n")
    with pytest.raises(DatasetError, match=r"m\.csv:2: labels 'cat\|\|dog' has an empty name"):
        discover(f"memory:/{bucket}/m.csv")
    with pytest.raises(DatasetError, match=r"gone\.csv' does not exist: expected a CSV manifest"):
        discover(f"memory:/{bucket}/gone.csv")  # a FileNotFoundError traceback before


# ----------------------------------------------------------------------------------------------- folders
def _shape(root: Path, shape: str) -> None:
    """Folder shapes: class folders (nested, a note, a hidden folder, a loose image), a split root (a loose image
    in a split), and classes beside loose images."""
    img = 0

    def put(rel: str) -> None:
        nonlocal img
        make_image(root / rel, seed=img)
        img += 1

    if shape in ("imagefolder", "mixed"):
        for rel in ("Bag/a.png", "Bag/deep/b.png", "Coat/c.png", "Coat/.thumbs/t.png", "Sandal/d.jpg"):
            put(rel)
        (root / "Coat" / "notes.txt").write_text("not an image")
        (root / "README.md").write_text("beside the classes")
        if shape == "mixed":
            put("loose.png")
    else:
        for rel in ("train/Bag/a.png", "train/Coat/b.png", "valid/Bag/c.png", "test/Coat/d.png", "train/loose.png"):
            put(rel)
        (root / "train" / "Bag" / ".DS_Store").write_bytes(b"\0")


@pytest.mark.parametrize("shape, layout", [("imagefolder", "auto"), ("splits", "auto"), ("mixed", "flat"),
                                           ("mixed", "imagefolder")])
def test_folder_at_a_url_reads_as_on_disk(tmp_path, mem, shape, layout):
    fs, bucket = mem
    _shape(tmp_path / "d", shape)
    url = mirror(fs, tmp_path / "d", bucket)
    local, remote = discover(tmp_path / "d", layout), discover(url, layout)
    assert seen(remote) == seen(local)
    assert remote.layout == (shape if layout == "auto" else layout) and len(remote) in (4, 5, 6)


def test_folder_at_a_url_with_loose_images_and_classes_asks_for_a_layout(tmp_path, mem):
    fs, bucket = mem
    _shape(tmp_path / "d", "mixed")
    url = mirror(fs, tmp_path / "d", bucket)
    for data in (tmp_path / "d", url):
        with pytest.raises(DatasetError, match="has both image files .* --layout imagefolder"):
            discover(data)


def test_hidden_folders_and_files_and_empty_folders_read_the_same_on_disk_and_at_a_url(tmp_path, mem):
    """One rule (``data._visible_files``) for both: a hidden folder's files are left out (at the top, in a class),
    a hidden file is kept and ignored as no image, and a folder holding no file -- which an object store cannot
    hold -- is no subfolder on disk either (an empty ``notes/`` made a split root an ImageFolder of the classes
    test/train/valid on disk, a split root at a URL)."""
    fs, bucket = mem
    _shape(tmp_path / "d", "splits")
    for rel in (".cache/x.png", "train/Bag/.thumbs/t.png", "train/Coat/.b.png"):
        make_image(tmp_path / "d" / rel, seed=9)
    (tmp_path / "d" / "train" / ".git").mkdir()
    (tmp_path / "d" / "train" / ".git" / "HEAD").write_text("ref")
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "d" / "notes").mkdir()
    url = mirror(fs, tmp_path / "d", bucket)
    fs.mkdir(f"{bucket}/notes")  # memory:// keeps an empty folder as a pseudo-folder: still no file, no subfolder
    local, remote = discover(tmp_path / "d"), discover(url)
    assert seen(remote) == seen(local)
    assert local.layout == "splits" and len(local) == 4 and local.classes == ["Bag", "Coat"]
    assert sorted(local.ignored) == ["train/Bag/.DS_Store", "train/Coat/.b.png"]


# ----------------------------------------------------------------------------------------------- requests
def test_folder_at_a_url_is_listed_not_asked_file_by_file(tmp_path, mem, calls):
    fs, bucket = mem
    _shape(tmp_path / "d", "imagefolder")
    url = mirror(fs, tmp_path / "d", bucket)
    calls.clear()
    ds = discover(url)
    assert len(ds) == 4
    per_file = [c for c in calls if c[0] in ("info", "exists", "isdir") and c[1].endswith((".png", ".jpg"))]
    assert per_file == []  # the sizes and times came with the listing
    assert Counter(m for m, _ in calls)["find"] == 1


def test_shards_are_planned_with_one_request_each(tmp_path, mem, calls):
    fs, bucket = mem
    for k, data in enumerate(wds_shards()):
        fs.pipe(f"{bucket}/shards/{k:06d}.tar", data)
    calls.clear()
    named = discover(f"memory:/{bucket}/shards/{{000000..000002}}.tar")
    shards = {f"{bucket}/shards/{k:06d}.tar" for k in range(3)}
    assert sorted(c for c in calls if c[1] in shards) == sorted(("info", s) for s in shards)
    calls.clear()
    listed = discover(f"memory:/{bucket}/shards")  # a folder of them: one listing, no request per shard
    assert calls == [("ls", f"{bucket}/shards")]
    assert listed.paths == named.paths and listed.fingerprints() == named.fingerprints()


def test_saved_hf_dataset_at_a_url_checks_no_marker_twice(tmp_path, mem, calls):
    fs, bucket = mem
    url = mirror(fs, write_hf(tmp_path / "hf"), f"{bucket}/hf")  # train: 2 Arrow files, validation: 1
    calls.clear()
    ds = discover(url)
    assert len(ds) == 24 and sorted(set(ds.splits)) == ["train", "val"]
    assert Counter(m for m, _ in calls) == {"ls": 3}  # the dataset's folder, then each split's
    assert sorted(p for _, p in calls) == [f"{bucket}/hf", f"{bucket}/hf/train", f"{bucket}/hf/validation"]


# ----------------------------------------------------------------------------------------------- pictures
def test_compressed_shard_members_read_back(tmp_path):
    (tmp_path / "000000.tar.gz").write_bytes(gzip.compress(wds_shards()[0]))
    pics = Pictures(tmp_path, "webdataset")
    c, name, data = demo_images()[1]
    assert pics.read(f"000000.tar.gz#{c}/{name}") == data
    assert pics.load(f"000000.tar.gz#{c}/{name}").size == (28, 28)
    with pytest.raises(ImageDecodeError, match="not found in"):
        pics.read("000000.tar.gz#Bag/missing.png")
    cut = gzip.compress(tar_bytes([("a.png", data), ("b.png", data)]))
    (tmp_path / "bad.tar.gz").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(ImageDecodeError, match="cannot read .*bad.tar.gz: ReadError"):
        pics.read("bad.tar.gz#b.png")


def test_pictures_at_a_url_ask_each_container_once_and_a_replaced_one_afresh(mem, calls, monkeypatch):
    """Thumbnails of shards at a URL cost one fingerprint request a shard per Pictures, not one a thumbnail (it
    was 8 a shard here); the next Pictures (the next page) reads a replaced shard's new members, never the old
    offsets, and so does a kept one (a service's) once FINGERPRINT_TTL has passed."""
    fs, bucket = mem
    for k, data in enumerate(wds_shards()):
        fs.pipe(f"{bucket}/shards/{k:06d}.tar", data)
    rows = {f"{k // 4:06d}.tar#{c}/{Path(n).stem}.png": data for k, (c, n, data) in enumerate(demo_images())}
    pics = Pictures(f"memory:/{bucket}/shards", "webdataset")
    monkeypatch.setattr(sources, "FINGERPRINT_TTL", 3600.0)  # a loaded machine may take seconds: no re-ask yet
    calls.clear()
    with ThreadPoolExecutor(4) as pool:  # as a page's thumbnails are made
        assert dict(zip(rows, pool.map(pics.read, rows), strict=True)) == rows
    assert {p: pics.read(p) for p in rows} == rows
    assert Counter(p for m, p in calls if m == "info") == {f"{bucket}/shards/{k:06d}.tar": 1 for k in range(3)}
    shard0 = [p for p in rows if p.startswith("000000.tar#")]
    swapped = {p: rows[q] for p, q in zip(shard0, shard0[::-1], strict=True)}  # each other's images, reversed
    fs.pipe(f"{bucket}/shards/000000.tar", tar_bytes([(p.split("#", 1)[1], d) for p, d in swapped.items()], mtime=1))
    assert {p: Pictures(f"memory:/{bucket}/shards", "webdataset").read(p) for p in shard0} == swapped
    monkeypatch.setattr(sources, "FINGERPRINT_TTL", 0.05)
    time.sleep(0.1)
    assert {p: pics.read(p) for p in shard0} == swapped


# ------------------------------------------------------------------------------------------ storage faults
def test_storage_failing_while_planning_is_one_line_naming_the_data(mem, monkeypatch):
    """The storage's own exceptions (here the network) while listing are a DatasetError naming DATA, not a
    traceback; an exception of probe's own code is left alone (a bug: its traceback is wanted)."""
    fs, bucket = mem
    fs.pipe(f"{bucket}/shards/000000.tar", wds_shards(per_class=1)[0])

    def down(self, path, *args, **kwargs):
        raise ConnectionError("Cannot connect to host")

    monkeypatch.setattr(MemoryFileSystem, "ls", down)
    with pytest.raises(DatasetError, match=r"^cannot read 'memory:/.*/shards': ConnectionError: Cannot connect to "
                                           r"host; is the network up and the endpoint right\?$"):
        discover(f"memory:/{bucket}/shards")
    monkeypatch.setattr(MemoryFileSystem, "ls", lambda self, path, *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        discover(f"memory:/{bucket}/shards")


@pytest.mark.parametrize("workers", [0, 1])
def test_storage_failing_mid_run_stops_in_one_line_and_a_rerun_resumes(tmp_path, mem, monkeypatch, workers):
    """A shard the storage cannot give mid-run (the network drops) stops the run with one line naming it -- also
    from a DataLoader worker, whose traceback torch puts in the message -- and keeps what was embedded; the re-run
    resumes and ends with the uninterrupted features. Its images are not recorded as skipped."""
    fs, bucket = mem
    for k, data in enumerate(wds_shards(per_class=2)):
        fs.pipe(f"{bucket}/shards/{k:06d}.tar", data)
    url = f"memory:/{bucket}/shards"
    cfg = replace(tiny_config(), workers=workers)
    want = FeatureStore(extract(url, tmp_path / "want.h5", cfg)["store"])  # lists the shards (cached)
    bad, orig = f"{bucket}/shards/000001.tar", MemoryFileSystem._open

    def dropping(self, path, *args, **kwargs):
        if self._strip_protocol(path) == bad:
            raise ConnectionError("Connection reset by peer")
        return orig(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", dropping)
    out = tmp_path / "s.h5"
    with pytest.raises(DatasetError) as e:
        extract(url, out, cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot read '{bad}': ConnectionError: Connection reset by peer")
    assert "the 4 images embedded so far are kept" in msg and "re-run the same command to resume" in msg
    assert not out.exists()
    monkeypatch.setattr(MemoryFileSystem, "_open", orig)
    s = FeatureStore(extract(url, out, cfg)["store"])
    assert list(s.paths()) == list(want.paths()) and not s.skipped()
    np.testing.assert_allclose(s.features(), want.features(), atol=1e-6)


def test_an_object_denied_is_skipped_as_an_unreadable_file(tmp_path, mem, monkeypatch):
    fs, bucket = mem
    _shape(tmp_path / "data", "imagefolder")
    url = mirror(fs, tmp_path / "data", bucket)
    ds = discover(url)
    denied, orig = f"{bucket}/{ds.paths[1]}", MemoryFileSystem._open

    def guarded(self, path, *args, **kwargs):
        if self._strip_protocol(path) == denied:
            raise PermissionError(13, "Access Denied")
        return orig(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", guarded)
    s = FeatureStore(extract(url, tmp_path / "s.h5", tiny_config())["store"])
    assert s.skipped() == [{"path": ds.paths[1], "reason": "unreadable: Access Denied"}]
    assert len(s.features()) == len(ds.paths) - 1
