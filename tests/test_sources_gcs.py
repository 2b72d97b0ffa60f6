"""gs:// URLs through gcsfs, against a Google Cloud Storage emulator (gcp-storage-emulator, in memory) on 127.0.0.1:
WebDataset shards and Parquet files in a bucket extract to the store of the same files on disk, and a re-run embeds
only the objects that changed.

Real tar shards and Parquet files (the builders of tests/test_sources.py), the random-weight tiny backbone."""

from __future__ import annotations

import io
import socket
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from probe.extract import extract
from probe.store import FeatureStore

from .conftest import tiny_config
from .test_sources import CLASSES, assert_same_images, parquet_tables, wds_shards, write_parquet, write_shards


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Listings of remote containers (cache/listings) and engine exports go to this session's temporary cache,
    not the checkout's cache/."""
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "probe-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch):
    """A GCS emulator on 127.0.0.1 with a bucket ``bkt``, and gcsfs pointed at it: the gcsfs filesystem."""
    gcsfs = pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec
    from fsspec.registry import _registry

    # gcsfs's default class (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, read at import) asks the Storage Control gRPC API
    # for each bucket's layout before opening a file; the emulator speaks only the JSON API, so each open would wait
    # for the gRPC timeout. The plain JSON-API class reads the same objects.
    for proto in ("gs", "gcs"):
        monkeypatch.setitem(_registry, proto, gcsfs.core.GCSFileSystem)
    port = free_port()
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon"})
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    try:
        yield fsspec.filesystem("gs", skip_instance_cache=True)
    finally:
        server.stop()


def test_gcs_shards(tmp_path, gcs):
    shards = wds_shards(per_shard=3)  # 4 shards of 3 samples
    want = extract(write_shards(tmp_path / "shards", shards), tmp_path / "local.h5", tiny_config())["store"]
    for k, data in enumerate(shards):
        gcs.pipe(f"bkt/shards/{k:06d}.tar", data)
    spec = "gs://bkt/shards/{000000..000003}.tar"
    s = extract(spec, tmp_path / "gs.h5", replace(tiny_config(), workers=2))
    assert s["count"] == 12 and s["skipped"] == [] and s["classes"] == list(CLASSES)
    assert_same_images(s["store"], want, lambda p: p)  # same "000000.tar#Bag/<file>" rows, labels, features
    info = gcs.info("bkt/shards/000000.tar")
    assert FeatureStore(s["store"]).fingerprints()[0] == f"{len(shards[0])}:{info['etag']}"  # size:ETag

    again = extract(spec, tmp_path / "gs.h5", tiny_config())
    assert again["embedded"] == 0 and again["reused"] == 12
    gcs.pipe("bkt/shards/000001.tar", wds_shards(per_shard=3, mtime=1_800_000_000)[1])  # new bytes: new ETag
    again = extract(spec, tmp_path / "gs.h5", tiny_config())
    assert again["embedded"] == 3 and again["reused"] == 9 and again["stale"] == 0 and again["count"] == 12
    assert_same_images(again["store"], want, lambda p: p)  # shard 1 re-embedded from the same images

    tables = parquet_tables()
    want = extract(str(write_parquet(tmp_path / "pq", tables)), tmp_path / "pq.h5",
                   tiny_config(label_column="cls"))["store"]
    for k, t in enumerate(tables):
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=5)
        gcs.pipe(f"bkt/pq/part-{k}.parquet", buf.getvalue())
    s = extract("gs://bkt/pq", tmp_path / "gpq.h5", tiny_config(label_column="cls"))
    assert s["count"] == 24 and s["classes"] == list(CLASSES)
    assert_same_images(s["store"], want, lambda p: p)
    again = extract("gs://bkt/pq", tmp_path / "gpq.h5", tiny_config(label_column="cls"))
    assert again["embedded"] == 0 and again["reused"] == 24
