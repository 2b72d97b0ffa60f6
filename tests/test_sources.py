"""Datasets where users keep them (issue 18): WebDataset tar shards, Parquet files, Hugging Face datasets saved to
disk, and fsspec URLs (memory://, file://, an S3 server run by moto on 127.0.0.1). Each format is written from the
demo images and must extract to the store of the same images in a folder: same rows, labels, splits, features.

Real files throughout (tar shards by tarfile, Parquet by pyarrow, save_to_disk by `datasets`), the random-weight
tiny backbone."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from probe.data import discover
from probe.errors import DatasetError, ProbeError
from probe.extract import extract
from probe.shard import merge, shard_of
from probe.sources import SEP, need, split_key
from probe.store import FeatureStore

from .conftest import DEMO, TINY, kill_9_at, tiny_config

runner = CliRunner()
CLASSES = ("Bag", "Coat", "Sandal")


# ------------------------------------------------------------------------------------------- builders


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Listings of remote containers (cache/listings) and engine exports go to this session's temporary cache,
    not the checkout's cache/."""
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "probe-cache"))


def demo_images(split: str = "train", per_class: int = 4) -> list[tuple[str, str, bytes]]:
    """(class, file name, PNG bytes) of the first demo images of each class, sorted."""
    out = []
    for c in CLASSES:
        for f in sorted((DEMO / split / c).iterdir())[:per_class]:
            out.append((c, f.name, f.read_bytes()))
    return out


def make_folder(root: Path, splits: tuple[str, ...] | None = None, per_class: int = 4) -> Path:
    """The images as an ImageFolder (or a split root with ``splits``)."""
    for s in splits or [None]:
        for c, name, data in demo_images(s or "train", per_class):
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
    return root


def tar_bytes(members: list[tuple[str, bytes]], mtime: int = 1_700_000_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wds_shards(per_shard: int = 4, per_class: int = 4, mtime: int = 1_700_000_000) -> list[bytes]:
    """WebDataset shards of the train images: key ``<class>/<stem>``, label in ``json`` (even shards) or ``cls``
    (odd shards, the class name)."""
    samples = demo_images("train", per_class)
    shards = []
    for k in range(0, len(samples), per_shard):
        members = []
        for c, name, data in samples[k: k + per_shard]:
            key = f"{c}/{Path(name).stem}"
            label = (key + ".json", json.dumps({"label": c}).encode()) if (k // per_shard) % 2 == 0 else \
                (key + ".cls", c.encode())
            members += [(key + ".png", data), label]
        shards.append(tar_bytes(members, mtime))
    return shards


def write_shards(folder: Path, shards: list[bytes]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(shards):
        (folder / f"{k:06d}.tar").write_bytes(data)
    return str(folder / f"{{000000..{len(shards) - 1:06d}}}.tar")


def parquet_tables(per_class: int = 4) -> list[pa.Table]:
    """Two Parquet tables: train images (binary ``img`` column, ``cls`` label, a ``file`` column) and val images."""
    out = []
    for s in ("train", "val"):
        rows = demo_images(s, per_class)
        out.append(pa.table({"img": [d for _, _, d in rows], "cls": [c for c, _, _ in rows],
                             "split": [s] * len(rows), "file": [f"{s}/{c}/{n}" for c, n, _ in rows]}))
    return out


def write_parquet(folder: Path, tables: list[pa.Table], row_group_size: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{k}.parquet", row_group_size=row_group_size)
    return folder


def write_hf(folder: Path, per_class: int = 4) -> Path:
    """A DatasetDict (train: 2 Arrow files, validation: 1) with an Image feature and a ClassLabel, by save_to_disk."""
    datasets = pytest.importorskip("datasets")
    parts = {}
    for s, name in (("train", "train"), ("val", "validation")):
        rows = demo_images(s, per_class)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
        parts[name] = datasets.Dataset.from_dict(
            {"image": [{"bytes": d, "path": n} for _, n, d in rows], "label": [CLASSES.index(c) for c, _, _ in rows]},
            features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder), num_shards={"train": 2, "validation": 1})
    return folder


def rows_of(store) -> dict[str, tuple[np.ndarray, str, str]]:
    """path -> (features, class name, split)."""
    s = FeatureStore(store)
    names = [s.classes[y] if y >= 0 else None for y in s.labels()]
    return {p: (f, n, sp) for p, f, n, sp in zip(s.paths(), s.features(), names, s.splits())}


def assert_same_images(got, want, rename) -> None:
    """Store ``got`` holds the rows of ``want``, each under ``rename(path)``: same features, labels, splits."""
    g, w = rows_of(got), rows_of(want)
    assert sorted(rename(p) for p in g) == sorted(w)
    for p, (f, label, split) in g.items():
        wf, wl, ws = w[rename(p)]
        np.testing.assert_allclose(f, wf, atol=1e-5, err_msg=p)
        assert (label, split) == (wl, ws), p


def member(p: str) -> str:
    return p.split(SEP, 1)[1]


# ------------------------------------------------------------------------------------------- formats
def test_webdataset_key_rule():
    assert split_key("a/b.seg.PNG") == ("a/b", "seg.png")
    assert split_key("000123.jpg") == ("000123", "jpg")
    assert split_key("dir.v2/x.cls") == ("dir.v2/x", "cls")


def test_webdataset_shards_equal_the_folder(tmp_path):
    folder = make_folder(tmp_path / "folder")
    want = extract(folder, tmp_path / "folder.h5", tiny_config())["store"]
    spec = write_shards(tmp_path / "shards", wds_shards())
    s = extract(spec, tmp_path / "wds.h5", tiny_config())
    assert s["count"] == 12 and s["skipped"] == [] and s["classes"] == list(CLASSES)
    store = FeatureStore(s["store"])
    assert store.paths()[0] == "000000.tar#Bag/" + sorted(os.listdir(folder / "Bag"))[0]
    assert store.attrs["layout"] == "webdataset" and store.attrs["root"] == str(tmp_path / "shards")
    assert_same_images(s["store"], want, member)
    # an integer cls is a class named by it; a sample without an image member is counted as ignored
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "a.tar").write_bytes(tar_bytes([("x.png", demo_images()[0][2]), ("x.cls", b"3"),
                                                         ("y.txt", b"no image")]))
    ds = discover(str(tmp_path / "more" / "a.tar"))
    assert ds.paths == ["a.tar#x.png"] and ds.classes == ["3"] and ds.ignored == ["a.tar#y.txt"]


def test_parquet_files_equal_the_folder(tmp_path):
    folder = make_folder(tmp_path / "folder", splits=("train", "val"))
    want = extract(folder, tmp_path / "folder.h5", tiny_config())["store"]
    tables = parquet_tables()
    pdir = write_parquet(tmp_path / "pq", tables)  # 12 rows a file in row groups of 5: 3 units each
    ds = discover(str(pdir))  # the one binary column holds the images; no 'label' column: unlabelled
    assert ds.reader.image_column == "img" and ds.classes == [] and len(ds) == 24
    assert [u.part for u in ds.reader.units] == [0, 1, 2, 0, 1, 2]  # one unit per row group
    with pytest.raises(DatasetError, match="no column 'photo' .*columns: img, cls, split, file"):
        discover(str(pdir), image_column="photo")
    s = extract(str(pdir), tmp_path / "pq.h5", tiny_config(image_column="img", label_column="cls"))
    files = {f"part-{k}.parquet{SEP}row={r}": f for k, t in enumerate(tables)
             for r, f in enumerate(t.column("file").to_pylist())}
    assert s["count"] == 24 and s["classes"] == list(CLASSES)
    assert_same_images(s["store"], want, files.__getitem__)


def test_saved_hf_dataset_equals_the_split_folder(tmp_path):
    folder = make_folder(tmp_path / "folder", splits=("train", "val"))
    want = extract(folder, tmp_path / "folder.h5", tiny_config())["store"]
    hf = write_hf(tmp_path / "hf")
    s = extract(str(hf), tmp_path / "hf.h5", tiny_config())
    assert s["count"] == 24 and s["classes"] == list(CLASSES)
    paths = FeatureStore(s["store"]).paths()
    assert {p.split(SEP)[0] for p in paths} == {"train/data-00000-of-00002.arrow", "train/data-00001-of-00002.arrow",
                                                "validation/data-00000-of-00001.arrow"}
    order = {"train": [f"train/{c}/{n}" for c, n, _ in demo_images("train")],
             "validation": [f"val/{c}/{n}" for c, n, _ in demo_images("val")]}

    def rename(p: str) -> str:  # the k-th row of a split is its k-th image (train: 6 rows per Arrow file)
        container, row = p.split(f"{SEP}row=")
        split = container.split("/")[0]
        return order[split][int(row) + (6 if "00001-of-00002" in container else 0)]

    assert_same_images(s["store"], want, rename)
    # one saved Dataset (not a dict), and the same split written by Dataset.to_parquet (Image structs + ClassLabel
    # names in the schema's metadata)
    datasets = pytest.importorskip("datasets")
    train = datasets.load_from_disk(str(hf))["train"]
    train.save_to_disk(str(tmp_path / "one"))
    one = discover(str(tmp_path / "one"))
    assert one.paths[0] == "data-00000-of-00001.arrow#row=0" and len(one) == 12 and one.classes == list(CLASSES)
    train.to_parquet(str(tmp_path / "hf.parquet"))
    s = extract(str(tmp_path / "hf.parquet"), tmp_path / "hfpq.h5", tiny_config())
    assert s["classes"] == list(CLASSES) and s["count"] == 12
    w = rows_of(want)
    for p, (f, label, split) in rows_of(s["store"]).items():  # the train rows; a Parquet file has no split here
        wf, wl, _ = w[order["train"][int(p.split("row=")[1])]]
        np.testing.assert_allclose(f, wf, atol=1e-5, err_msg=p)
        assert label == wl and split == "", p


# --------------------------------------------------------------------------------- bad members, damage
def test_bad_member_is_reported_by_name_and_the_rest_extracted(tmp_path):
    good = demo_images()[:3]
    members = [(f"s{k}.png", d) for k, (_, _, d) in enumerate(good)]
    members.insert(1, ("broken.png", good[0][2][:60]))  # truncated PNG inside the shard
    members.insert(2, ("notes.jpg", b"not an image"))
    members.append(("empty.png", b""))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000000.tar").write_bytes(tar_bytes(members))
    s = extract(str(tmp_path / "shards" / "000000.tar"), tmp_path / "s.h5", tiny_config())
    skipped = {x["path"]: x["reason"] for x in s["skipped"]}
    assert s["count"] == 3 and sorted(FeatureStore(s["store"]).paths()) == [f"000000.tar#s{k}.png" for k in range(3)]
    assert "corrupt or truncated" in skipped["000000.tar#broken.png"]
    assert "not an image" in skipped["000000.tar#notes.jpg"] and "empty" in skipped["000000.tar#empty.png"]
    again = extract(str(tmp_path / "shards" / "000000.tar"), tmp_path / "s.h5", tiny_config())
    assert again["embedded"] == 0 and len(again["skipped"]) == 3  # unchanged shard: not read again


def test_damaged_shard_keeps_what_precedes_the_damage(tmp_path):
    shards = wds_shards(per_shard=6)
    spec = write_shards(tmp_path / "shards", shards)
    whole = (tmp_path / "shards" / "000001.tar").read_bytes()
    (tmp_path / "shards" / "000001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut mid-member
    s = extract(spec, tmp_path / "s.h5", tiny_config())
    n = s["count"] + len(s["skipped"])
    assert 6 + 1 <= n < 12 and s["count"] >= 6  # shard 0 whole; shard 1 up to the cut, its last member reported
    assert all(x["path"].startswith("000001.tar#") for x in s["skipped"])


# -------------------------------------------------------------------------------- incremental, shards
def test_rerun_embeds_only_replaced_shards(tmp_path):
    shards = wds_shards()
    spec = write_shards(tmp_path / "shards", shards)
    out = tmp_path / "s.h5"
    first = extract(spec, out, tiny_config())
    before = rows_of(out)
    again = extract(spec, out, tiny_config())
    assert again["embedded"] == 0 and again["reused"] == 12
    time.sleep(0.01)
    (tmp_path / "shards" / "000002.tar").write_bytes(shards[0])  # shard 2 replaced: now shard 0's images
    s = extract(spec, out, tiny_config())
    assert s["embedded"] == 4 and s["stale"] == 4 and s["count"] == 16 and first["count"] == 12  # old members kept
    after = rows_of(out)
    for p, (f, label, _) in after.items():
        if p not in before:  # shard 2's new members
            np.testing.assert_allclose(f, before["000000.tar#" + member(p)][0], atol=1e-5)
        else:
            assert np.array_equal(f, before[p][0]) and label == before[p][1]
    pruned = extract(spec, out, tiny_config(prune=True))
    assert pruned["pruned"] == 4 and pruned["count"] == 12 and pruned["embedded"] == 0


def test_shards_split_by_container_and_merge_into_the_whole(tmp_path):
    spec = write_shards(tmp_path / "shards", wds_shards(per_shard=2))  # 6 tar files
    full = extract(spec, tmp_path / "full.h5", tiny_config())["store"]
    parts = [extract(spec, tmp_path / "s.h5", tiny_config(shard=f"{i}/2"))["store"] for i in range(2)]
    for i, part in enumerate(parts):
        containers = {p.split(SEP)[0] for p in FeatureStore(part).paths()}
        assert containers and all(shard_of(c, 2) == i for c in containers)  # every tar file wholly in one rank
    merged = tmp_path / "merged.h5"
    merge(parts, merged)
    assert_same_images(merged, full, lambda p: p)
    assert FeatureStore(merged).attrs["config_key"] == FeatureStore(full).attrs["config_key"]


def test_workers_read_shards_in_parallel(tmp_path):
    spec = write_shards(tmp_path / "shards", wds_shards(per_shard=3))
    one = extract(spec, tmp_path / "a.h5", tiny_config())["store"]
    two = extract(spec, tmp_path / "b.h5", replace(tiny_config(), workers=2))["store"]
    assert_same_images(two, one, lambda p: p)


# ------------------------------------------------------------------------------------------------ fsspec
def test_memory_and_file_urls(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    for k, data in enumerate(wds_shards()):
        mem.pipe(f"/bucket/shards/{k:06d}.tar", data)
    folder = make_folder(tmp_path / "folder")
    for c in CLASSES:
        for f in (folder / c).iterdir():
            mem.pipe(f"/bucket/folder/{c}/{f.name}", f.read_bytes())
    manifest = "path,label\n" + "".join(f"folder/{c}/{f.name},{c}\n" for c in CLASSES
                                        for f in sorted((folder / c).iterdir()))
    mem.pipe("/bucket/m.csv", manifest.encode())
    try:
        want = extract(folder, tmp_path / "folder.h5", tiny_config())["store"]
        s = extract("memory://bucket/shards/{000000..000002}.tar", tmp_path / "m.h5", tiny_config())
        assert FeatureStore(s["store"]).attrs["root"] == "/bucket/shards"
        assert_same_images(s["store"], want, member)
        s = extract("memory://bucket/folder", tmp_path / "mf.h5", tiny_config())
        assert s["count"] == 12 and FeatureStore(s["store"]).attrs["layout"] == "imagefolder"
        assert_same_images(s["store"], want, lambda p: p)
        s = extract("memory://bucket/m.csv", tmp_path / "mc.h5", tiny_config())
        assert_same_images(s["store"], want, lambda p: p.removeprefix("folder/"))
        spec = write_shards(tmp_path / "shards", wds_shards())
        s = extract("file://" + spec, tmp_path / "f.h5", tiny_config())
        assert_same_images(s["store"], want, member)
        assert extract("file://" + str(folder), tmp_path / "ff.h5", tiny_config())["count"] == 12
    finally:
        mem.rm("/bucket", recursive=True)


@pytest.fixture
def s3(monkeypatch):
    """An S3 server (moto) on 127.0.0.1 and s3fs pointed at it: the s3fs filesystem."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bkt")
    try:
        yield fs
    finally:
        server.stop()


def test_s3_shards_and_parquet(tmp_path, s3):
    folder = make_folder(tmp_path / "folder")
    want = extract(folder, tmp_path / "folder.h5", tiny_config())["store"]
    shards = wds_shards()
    for k, data in enumerate(shards):
        s3.pipe(f"bkt/shards/{k:06d}.tar", data)
    s = extract("s3://bkt/shards/{000000..000002}.tar", tmp_path / "s3.h5", replace(tiny_config(), workers=2))
    assert_same_images(s["store"], want, member)
    assert FeatureStore(s["store"]).fingerprints()[0].startswith(f"{len(shards[0])}:")  # size:ETag
    s3.pipe("bkt/shards/000000.tar", shards[0])  # uploaded again, same bytes: same ETag, nothing to do
    s3.pipe("bkt/shards/000001.tar", wds_shards(mtime=1_800_000_000)[1])  # new bytes: new ETag, re-embedded alone
    again = extract("s3://bkt/shards/{000000..000002}.tar", tmp_path / "s3.h5", tiny_config())
    assert again["embedded"] == 4 and again["reused"] == 8 and again["stale"] == 0
    buf = io.BytesIO()
    pq.write_table(parquet_tables()[0], buf, row_group_size=5)
    s3.pipe("bkt/pq/part-0.parquet", buf.getvalue())
    s = extract("s3://bkt/pq", tmp_path / "pq.h5", tiny_config(label_column="cls"))
    assert s["count"] == 12 and s["classes"] == list(CLASSES)


# ---------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(str(tmp_path / "shards" / "{000000..000003}.tar"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(DatasetError, match="not a dataset saved by save_to_disk"):
        discover(str(tmp_path / "hf"), layout="hf")
    with pytest.raises(ProbeError, match=r"pip install 'probe\[data\]'"):
        need("no_such_module_for_probe", "data")
    r = runner.invoke(app, ["extract", str(tmp_path / "nope" / "{0..3}.tar"), "--backbone", TINY])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    shards = write_shards(tmp_path / "wds", wds_shards())  # commands that open image files by path refuse them
    (tmp_path / "wds" / ".DS_Store").write_bytes(b"\0")  # a hidden file beside the shards: still a shard folder
    assert discover(str(tmp_path / "wds")).layout == "webdataset"
    for args in (["sweep", shards, "--backbones", TINY], ["finetune", shards, "--out", str(tmp_path / "run")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "read from containers or a URL, which only probe extract reads" in r.stderr, args


# ---------------------------------------------------------------------------------------------- resume
def _cli(data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "probe", "extract", data, "--out", str(out), "--backbone", "resnet18",
            "--weights", "random", "--batch-size", "2", "--workers", "1", "--dtype", "float32", "--json", *extra]


def _kill_and_resume(cmd: list[str], out: Path, count: int) -> dict:
    """Run ``cmd`` in a child, kill -9 it a few batches in, rerun the command (in this process: no second cold
    start) and return the rerun's summary."""
    journal = Path(f"{out}.journal")
    kill_9_at({out: (cmd, 30_000)})  # a few batches of 512-d features in
    assert not out.exists() and journal.exists()  # it really was interrupted
    rerun = runner.invoke(app, cmd[3:])
    assert rerun.exit_code == 0, rerun.output
    done = json.loads(rerun.stdout)
    assert done["count"] == count and 0 < done["resumed"] < count and done["embedded"] == count - done["resumed"]
    assert not journal.exists()
    return done


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "hf"])
def test_kill_9_then_rerun_finishes_with_the_uninterrupted_features(tmp_path, fmt):
    if fmt == "webdataset":
        data, extra = write_shards(tmp_path / "d", wds_shards(per_shard=4, per_class=8)), ()
    elif fmt == "parquet":
        tables = [pa.concat_tables(parquet_tables(per_class=4))]
        data, extra = str(write_parquet(tmp_path / "d", tables, row_group_size=6)), ("--label-column", "cls")
    else:
        data, extra = str(write_hf(tmp_path / "d", per_class=4)), ()
    count = 24
    ref, out = tmp_path / "ref.h5", tmp_path / "killed.h5"
    r = runner.invoke(app, _cli(data, ref, *extra)[3:])  # the uninterrupted run: the same command, in this process
    assert r.exit_code == 0, r.output
    _kill_and_resume(_cli(data, out, *extra), out, count)
    want, got = rows_of(ref), rows_of(out)
    assert want.keys() == got.keys() and len(got) == count
    for p in want:
        assert np.array_equal(want[p][0], got[p][0]) and want[p][1:] == got[p][1:], p  # bit-identical


# ------------------------------------------------------------------------------------------ split names
def test_unknown_split_names_are_refused_as_in_a_manifest(tmp_path):
    rows = demo_images("train", per_class=1)
    table = pa.table({"img": [d for _, _, d in rows], "cls": [c for c, _, _ in rows],
                      "split": ["Validation", None, "holdout"]})
    bad = write_parquet(tmp_path / "pq", [table]) / "part-0.parquet"
    with pytest.raises(DatasetError, match=rf"^{bad}: split 'holdout': expected train, val \(valid/validation\), "
                                           "test or empty$"):
        discover(str(bad), image_column="img", label_column="cls")
    pq.write_table(table.slice(0, 2), bad)  # the known names, canonical: 'Validation' is val, no cell no split
    assert discover(str(bad), image_column="img", label_column="cls").splits == ["val", ""]

    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    one = datasets.Dataset.from_dict({"image": [{"bytes": rows[0][2], "path": rows[0][1]}], "label": [0]},
                                     features=features)
    datasets.DatasetDict({"train": one, "extra": one}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'hf'}: split 'extra': expected train, val"):
        discover(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": one, "valid": one}).save_to_disk(str(tmp_path / "hf2"))
    assert sorted(discover(str(tmp_path / "hf2")).splits) == ["train", "val"]
