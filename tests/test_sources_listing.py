"""The listing cache of containers at URLs (probe.sources.cached_listing): a re-run of a dataset at a memory:// URL
plans without reading any tar shard or Arrow file whose fingerprint is unchanged; a replaced shard alone is listed
again and re-embedded; a corrupt cache entry is rebuilt, never an error; a damaged shard's listing keeps its damage.

Reads are counted on fsspec's memory filesystem (its ``_open`` and ``cat_file``), per object; probe runs unpatched
with the random-weight tiny backbone and no decode workers, so every read happens in this process."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from probe.data import discover
from probe.extract import extract
from probe.sources import listing_file

from .conftest import tiny_config
from .test_sources import CLASSES, assert_same_images, demo_images, tar_bytes, wds_shards, write_hf, write_shards

fsspec = pytest.importorskip("fsspec")
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

SPEC = "memory://{bucket}/shards/{{000000..000002}}.tar"


@pytest.fixture
def reads(tmp_path, monkeypatch) -> Counter:
    """Opens and whole-file reads of memory:// objects, by path (``/bucket/...``), from now on; the cache dir in
    tmp_path."""
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path / "cache"))
    counts: Counter = Counter()
    opened, cat = MemoryFileSystem._open, MemoryFileSystem.cat_file

    def _open(self, path, *args, **kwargs):
        counts[self._strip_protocol(path)] += 1
        return opened(self, path, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        counts[self._strip_protocol(path)] += 1
        return cat(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", _open)
    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    return counts


@pytest.fixture
def mem(request):
    """The memory filesystem and a bucket of this test's own, removed afterwards."""
    fs = fsspec.filesystem("memory")
    bucket = f"listing-{request.node.name}".replace("[", "-").replace("]", "")
    yield fs, bucket
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def shard_reads(reads: Counter) -> dict[str, int]:
    return {p: n for p, n in reads.items() if p.endswith((".tar", ".arrow"))}


def new_shard() -> bytes:
    """Shard 1's replacement: the val images of each class (key ``val/<class>/<stem>``), labels in ``cls``."""
    members = []
    for c, name, data in demo_images("val", per_class=2):
        key = f"val/{c}/{Path(name).stem}"
        members += [(key + ".png", data), (key + ".cls", c.encode())]
    return tar_bytes(members)


def test_rerun_reads_no_shard_and_a_replaced_shard_alone(tmp_path, mem, reads):
    fs, bucket = mem
    shards = wds_shards()  # 3 shards of 4 samples: json labels in shards 0 and 2, cls in shard 1
    for k, data in enumerate(shards):
        fs.pipe(f"/{bucket}/shards/{k:06d}.tar", data)
    spec = SPEC.format(bucket=bucket)
    reads.clear()  # writing them opened each
    first = extract(spec, tmp_path / "m.h5", tiny_config())
    assert first["count"] == 12 and first["embedded"] == 12
    # planning streamed each shard once, extraction read each once more
    assert shard_reads(reads) == {f"/{bucket}/shards/{k:06d}.tar": 2 for k in range(3)}
    for k in range(3):
        path = f"/{bucket}/shards/{k:06d}.tar"
        entry = json.loads(listing_file(fs, path).read_text())
        assert entry["url"] == f"memory://{path}" and len(entry["listing"]["rows"]) == 4  # memory:///<bucket>/...
    want = extract(write_shards(tmp_path / "local", shards), tmp_path / "local.h5", tiny_config())["store"]

    reads.clear()
    again = extract(spec, tmp_path / "m.h5", tiny_config())
    assert shard_reads(reads) == {}  # planning read no shard: every listing came from the cache
    assert again["embedded"] == 0 and again["reused"] == 12 and again["count"] == 12
    assert_same_images(again["store"], want, lambda p: p)

    # shard 1 gets new bytes (a new fingerprint): it alone is listed again and re-embedded
    fs.pipe(f"/{bucket}/shards/000001.tar", new_shard())
    reads.clear()
    again = extract(spec, tmp_path / "m.h5", tiny_config(prune=True))
    assert shard_reads(reads) == {f"/{bucket}/shards/000001.tar": 2}  # listed once, embedded once
    assert again["embedded"] == 6 and again["reused"] == 8 and again["pruned"] == 4 and again["count"] == 14
    assert again["classes"] == list(CLASSES)
    want = extract(write_shards(tmp_path / "local2", [shards[0], new_shard(), shards[2]]), tmp_path / "local2.h5",
                   tiny_config())["store"]
    assert_same_images(again["store"], want, lambda p: p)  # the val images under 000001.tar#val/..., labels from cls
    entry = json.loads(listing_file(fs, f"/{bucket}/shards/000001.tar").read_text())
    assert [r[1] for r in entry["listing"]["rows"]] == [c for c in CLASSES for _ in range(2)]

    reads.clear()
    assert extract(spec, tmp_path / "m.h5", tiny_config())["embedded"] == 0 and shard_reads(reads) == {}


def test_corrupt_listing_is_rebuilt(tmp_path, mem, reads, caplog):
    fs, bucket = mem
    shards = wds_shards()
    for k, data in enumerate(shards):
        fs.pipe(f"/{bucket}/shards/{k:06d}.tar", data)
    spec = SPEC.format(bucket=bucket)
    extract(spec, tmp_path / "m.h5", tiny_config())
    want = extract(write_shards(tmp_path / "local", shards), tmp_path / "local.h5", tiny_config())["store"]
    broken = {0: b"{\"url\": \"memory://", 1: json.dumps({"url": "x", "fingerprint": 3}).encode()}
    file0, file1 = listing_file(fs, f"/{bucket}/shards/000000.tar"), listing_file(fs, f"/{bucket}/shards/000001.tar")
    file0.write_bytes(broken[0])  # cut short: not JSON
    entry = json.loads(file1.read_text())
    entry["listing"]["rows"] = [["Bag/x.png"]]  # this shard's fingerprint, a listing of the wrong shape
    file1.write_text(json.dumps(entry))
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="probe.sources"):
        again = extract(spec, tmp_path / "m.h5", tiny_config())
    assert shard_reads(reads) == {f"/{bucket}/shards/000000.tar": 1, f"/{bucket}/shards/000001.tar": 1}
    assert again["embedded"] == 0 and again["reused"] == 12 and again["count"] == 12
    assert_same_images(again["store"], want, lambda p: p)
    assert "unreadable listing" in caplog.text and "malformed listing" in caplog.text
    for f in (file0, file1):
        assert len(json.loads(f.read_text())["listing"]["rows"]) == 4  # rebuilt
    reads.clear()
    extract(spec, tmp_path / "m.h5", tiny_config())
    assert shard_reads(reads) == {}


def test_hf_dataset_at_a_url_lists_its_arrow_files_once(tmp_path, mem, reads):
    fs, bucket = mem
    local = write_hf(tmp_path / "hf")  # train: 2 Arrow files, validation: 1
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe(f"/{bucket}/hf/{f.relative_to(local).as_posix()}", f.read_bytes())
    want = extract(str(local), tmp_path / "local.h5", tiny_config())["store"]
    reads.clear()
    url = f"memory://{bucket}/hf"
    s = extract(url, tmp_path / "m.h5", tiny_config())
    arrows = {p for p in shard_reads(reads)}
    assert len(arrows) == 3 and all(n == 2 for n in shard_reads(reads).values())  # listed, then embedded
    assert s["count"] == 24 and s["classes"] == list(CLASSES)
    reads.clear()
    again = extract(url, tmp_path / "m.h5", tiny_config())
    assert shard_reads(reads) == {}  # rows and ClassLabel labels from the cached listings
    assert again["embedded"] == 0 and again["reused"] == 24
    assert_same_images(again["store"], want, lambda p: p)


def test_damaged_shard_listing_is_cached_with_its_damage(tmp_path, mem, reads, caplog):
    fs, bucket = mem
    data = wds_shards()[0]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[4]  # the third sample's image (each sample: png, json)
    fs.pipe(f"/{bucket}/cut.tar", data[: third.offset_data + 10])  # cut inside it
    url = f"memory://{bucket}/cut.tar"
    reads.clear()
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="probe.sources"):
            ds = discover(url)
        assert len(ds.paths) == 3 and ds.classes == ["Bag"]  # the third's header was read, its json lost
        assert ds.labels.tolist() == [0, 0, -1]
        assert "its samples before the damage are kept" in caplog.text  # said again from the cache
        assert shard_reads(reads) == {f"/{bucket}/cut.tar": 1}  # read by the first run only
