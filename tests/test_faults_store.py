"""Faults around the feature store, with real files and a real full disk: flipped bytes, garbage and truncated
stores, a disk that fills during `probe extract` (journal) or at its end (store), `probe merge` on a full disk, and a
folder with no decodable images. Every one is a one-line error naming the file, exit code 1, earlier work intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import probe.fs
import probe.store
from cli.main import app
from probe.errors import DiskFullError, IntegrityError, StoreError
from probe.extract import extract
from probe.shard import merge
from probe.store import STR, FeatureStore, store_from_arrays

from .conftest import TINY, fill_disk, make_image, make_imagefolder, tiny_config

runner = CliRunner()
TINY_ARGS = ["--backbone", TINY, "--weights", "random", "--batch-size", "4", "--workers", "0", "--dtype", "float32",
             "--engine", "torch"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, *names: str) -> str:
    """The CLI failed as a user error: exit 1, one line ``error: …`` naming each of ``names``, no traceback."""
    err = r.stderr
    assert r.exit_code == 1, r.output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def flip(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(x ^ 0xA5 for x in b))


def features(store: Path) -> dict[str, np.ndarray]:
    s = FeatureStore(store)
    return dict(zip(s.paths(), s.features()))


# ------------------------------------------------------------------------------------------ flipped bytes
@pytest.fixture
def damaged(tiny_store, tmp_path) -> Path:
    """A copy of the tiny store with a few bytes flipped inside the first chunk of /features."""
    path = tmp_path / "damaged.h5"
    shutil.copy(tiny_store, path)
    with h5py.File(path, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    flip(path, chunk.byte_offset + 1000, 4)
    return path


def test_flipped_feature_bytes_are_an_error_not_nan_rows(damaged, tiny_store):
    assert FeatureStore(tiny_store).checksummed and np.isfinite(FeatureStore(tiny_store).features()).all()
    store = FeatureStore(damaged)  # the structure is intact: it opens
    with pytest.raises(IntegrityError, match="damaged") as e:
        store.features()
    assert str(damaged) in str(e.value) and "\n" not in str(e.value) and "probe extract" in str(e.value)
    with pytest.raises(IntegrityError):
        store.features("val")
    assert len(store.paths()) == store.count  # the other arrays still read


def test_flipped_feature_bytes_in_the_cli(damaged, tmp_path):
    one_line_error(cli("fit-head", damaged, "--out", tmp_path / "h.safetensors"), str(damaged), "damaged")
    assert not (tmp_path / "h.safetensors").exists()
    one_line_error(cli("fewshot", damaged, "--way", "2", "--shot", "1", "--query", "1", "--episodes", "5"),
                   str(damaged), "damaged")


def test_flipped_feature_bytes_in_probe_index(damaged, tmp_path):
    one_line_error(cli("index", damaged, "--out", tmp_path / "x.faiss"), str(damaged), "damaged")


@pytest.mark.parametrize("where", ["labels", "paths", "attrs"])
def test_flipped_bytes_elsewhere_are_caught(tiny_store, tmp_path, where):
    path = tmp_path / "s.h5"
    shutil.copy(tiny_store, path)
    raw = path.read_bytes()
    with h5py.File(path, "r") as f:
        if where == "labels":
            at = f["labels"].id.get_chunk_info(0).byte_offset + 8
        else:  # a path string or an attribute's value (both in HDF5's global heap): found by its bytes
            at = raw.index(b"dog/img_3.png" if where == "paths" else f.attrs["config_key"].encode()) + 2
    flip(path, at)
    with pytest.raises((IntegrityError, StoreError), match="damaged") as e:
        s = FeatureStore(path)
        s.labels(), s.paths(), s.info()
    assert str(path) in str(e.value)


def test_any_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip one byte at a time across a whole (small) store — superblock, object headers, B-trees, heaps, chunks:
    every read either returns exactly what was written or raises a one-line error naming the file."""
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    store_from_arrays(path, rng.random((40, 8)), np.arange(40) % 2, paths=[f"c{i % 2}/{i}.png" for i in range(40)],
                      splits=["train"] * 30 + ["val"] * 10, classes=["c0", "c1"])
    raw = path.read_bytes()

    def everything():
        s = FeatureStore(path)
        return (s.attrs, s.features().tobytes(), s.labels().tobytes(), s.paths().tolist(), s.splits().tolist(),
                s.fingerprints().tolist(), s.skipped(), s.views())

    with h5py.File(path, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)  # 32 KiB, mostly padding: a few flips there are enough
    lo, hi = chunk.byte_offset, chunk.byte_offset + chunk.size
    want, outcomes = everything(), {"same": 0, "error": 0}
    for at in [*range(0, lo, 53), *range(lo, hi, 3001), *range(hi, len(raw), 53)]:
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x5A]) + raw[at + 1:])
        try:
            assert everything() == want, f"byte {at}: a flip changed what the store reads, silently"
            outcomes["same"] += 1  # a byte HDF5 does not use (padding, free space)
        except StoreError as e:
            assert str(path) in str(e) and "\n" not in str(e), (at, str(e))
            outcomes["error"] += 1
    assert outcomes["error"] > outcomes["same"], outcomes


def test_garbage_and_truncated_stores_are_one_line(tiny_store, tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(StoreError, match="not a probe feature store"):
        FeatureStore(garbage)
    one_line_error(cli("info", garbage), str(garbage), "not a probe feature store")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(Path(tiny_store).read_bytes()[: 20_000])
    one_line_error(cli("info", truncated), str(truncated), "damaged")
    one_line_error(cli("fit-head", truncated, "--out", tmp_path / "h.safetensors"), str(truncated))


def test_a_store_from_before_checksums_loads_and_extending_adds_them(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    new = tmp_path / "new.h5"
    extract(data, new, tiny_config(engine="torch"))
    old = tmp_path / "old.h5"
    _without_checksums(new, old)
    store = FeatureStore(old)
    assert not store.checksummed and store.info()["checksummed"] is False
    assert FeatureStore(new).info()["checksummed"] is True
    before = features(old)
    make_image(data / "cat" / "img_9.png", seed=99)
    s = extract(data, old, tiny_config(engine="torch"))
    assert s.embedded == 1 and s.reused == 6
    store = FeatureStore(old)
    assert store.checksummed  # rewritten with checksums
    after = features(old)
    for p, v in before.items():
        assert np.array_equal(after[p], v), p
    r = cli("info", old)
    assert r.exit_code == 0 and "checksums  verified" in r.stdout


def _without_checksums(src: Path, dst: Path) -> None:
    """``src`` as probe wrote stores before checksums: no Fletcher-32, no checksums attribute, HDF5's old format."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            if k != "checksums":
                g.attrs[k] = v
        g.create_dataset("features", data=f["features"][:], maxshape=(None, f["features"].shape[1]),
                         chunks=f["features"].chunks)
        g.create_dataset("labels", data=f["labels"][:])
        for name in ("paths", "fingerprints", "split", "skipped/paths", "skipped/fingerprints", "skipped/reasons"):
            g.create_dataset(name, data=np.asarray(f[name].asstr()[:].tolist(), dtype=object), dtype=STR)


# ------------------------------------------------------------------------------------------ a full disk
@pytest.fixture
def grown(tmp_path):
    """(data, earlier store made of 6 images on a 3 MB tmpfs, reference store of all 14 made without faults).
    Then DATA grows by 8 images (two batches of 4)."""
    data = make_imagefolder(tmp_path / "data", per_class=2)
    return data, tmp_path / "ref.h5"


def _grow(data: Path) -> None:
    for k in range(8):
        make_image(data / "fox" / f"new_{k}.png", seed=100 + k)


def _reference(data: Path, ref: Path) -> None:
    extract(data, ref, tiny_config(engine="torch"))


def _earlier_store(data: Path, disk: Path, ref: Path) -> tuple[Path, bytes]:
    out = disk / "s.h5"
    r = cli("extract", data, "--out", out, *TINY_ARGS)
    assert r.exit_code == 0, r.output
    shutil.copy(out, ref)  # the reference starts from the same earlier store
    return out, out.read_bytes()


def _resume(data: Path, out: Path, ref: Path) -> dict:
    r = cli("extract", data, "--out", out, *TINY_ARGS, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    _reference(data, ref)
    want, got = features(ref), features(out)
    assert want.keys() == got.keys() and len(got) == 14
    for p in want:
        assert np.array_equal(want[p], got[p]), p  # bit-identical to the run that never failed
    assert not Path(f"{out}.journal").exists() and not list(out.parent.glob("*.tmp"))
    assert FeatureStore(out).checksummed
    return summary


def test_disk_fills_during_the_journal(grown, small_disk, monkeypatch):
    data, ref = grown
    disk = small_disk("3m")
    out, before = _earlier_store(data, disk, ref)
    _grow(data)
    real_append = probe.store.Journal.append
    calls = []

    def append_then_fill(self, **arrays):  # another program fills the disk after the first batch
        real_append(self, **arrays)
        calls.append(1)
        if len(calls) == 1:
            fill_disk(disk)

    monkeypatch.setattr(probe.store.Journal, "append", append_then_fill)
    line = one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), f"{out}.journal", "needs about",
                          "re-run the same command")
    assert "the 4 images embedded so far are kept" in line
    assert out.read_bytes() == before and not list(disk.glob("*.tmp"))
    assert len(probe.store.Journal(f"{out}.journal").read()[1]) == 1  # the batch that fit, whole
    monkeypatch.undo()
    (disk / "filler").unlink()
    summary = _resume(data, out, ref)
    assert summary["resumed"] == 4 and summary["embedded"] == 4 and summary["reused"] == 6


def test_disk_fills_before_the_store_is_written(grown, small_disk, monkeypatch):
    data, ref = grown
    disk = small_disk("3m")
    out, before = _earlier_store(data, disk, ref)
    _grow(data)
    real_run = probe.extract.run_plan

    def run_then_fill(*a, **k):  # the disk fills while the last batch is embedded
        stats = real_run(*a, **k)
        fill_disk(disk, leave=100_000)
        return stats

    monkeypatch.setattr(probe.extract, "run_plan", run_then_fill)
    # first the check before writing, then (without it) the write itself running out of space
    line = one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), str(out), "needs about", "re-run")
    assert "8 images embedded so far are kept" in line
    monkeypatch.setattr(probe.fs, "check_space", lambda *a, **k: None)
    full = _spy_full(monkeypatch)
    (disk / "filler").unlink()
    line = one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), str(out), "needs about", "re-run")
    assert full  # HDF5 itself ran out of space
    assert out.read_bytes() == before and not list(disk.glob("*.tmp"))
    header, records = probe.store.Journal(f"{out}.journal").read()
    assert sum(len(r["paths"]) for r in records) == 8  # the journal is kept whole
    monkeypatch.undo()
    (disk / "filler").unlink()
    summary = _resume(data, out, ref)
    assert summary["resumed"] == 8 and summary["embedded"] == 0


def _spy_full(monkeypatch) -> list[bool]:
    """Records each time the store writer found the disk full (not only the check before writing)."""
    seen: list[bool] = []
    real = probe.store._DiskFile.check

    def check(self):
        if self.full is not None:
            seen.append(True)
        real(self)

    monkeypatch.setattr(probe.store._DiskFile, "check", check)
    return seen


def test_not_enough_space_is_refused_before_embedding(tmp_path, small_disk):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    disk = small_disk("3m")
    fill_disk(disk, leave=150_000)  # less than the store's first chunk of features (256 KiB)
    line = one_line_error(cli("extract", data, "--out", disk / "s.h5", *TINY_ARGS), str(disk / "s.h5"),
                          "needs about", "checked before embedding 6 images")
    assert "KiB are free" in line
    assert not (disk / "s.h5").exists() and not list(disk.glob("*.tmp"))


def test_merge_on_a_full_disk(tmp_path, small_disk, monkeypatch):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    shards = [extract(data, tmp_path / "big.h5", tiny_config(engine="torch", shard=f"{i}/2"))["store"]
              for i in range(2)]
    disk = small_disk("3m")
    out = disk / "m.h5"
    fill_disk(disk, leave=100_000)
    one_line_error(cli("merge", *shards, "--out", out), str(out), "needs about", "shard stores are unchanged")
    monkeypatch.setattr(probe.fs, "check_space", lambda *a, **k: None)  # the write itself runs out of space
    full = _spy_full(monkeypatch)
    with pytest.raises(DiskFullError, match="m.h5") as e:
        merge(shards, out)
    assert full
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(disk.glob("*.tmp"))
    (disk / "filler").unlink()
    assert merge(shards, out)["count"] == 6


def test_store_bytes_estimates_the_real_size(tmp_path):
    x = np.zeros((3000, 64), np.float32)
    paths = [f"some/folder/img_{i:05d}.png" for i in range(3000)]
    store = store_from_arrays(tmp_path / "s.h5", x, paths=paths)
    real = store.path.stat().st_size
    est = probe.store.store_bytes(3000, 64, text=sum(len(p) for p in paths))
    assert real <= est < 1.5 * real + 100_000, (real, est)


# ------------------------------------------------------------------------------------------ no images
def test_a_folder_without_images_is_an_error_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        (data / name).write_text("not an image")
    (data / "notes.txt").write_text("x")
    out = tmp_path / "s.h5"
    line = one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), str(data), "no images", "4 files",
                          "none decodable", "a.jpg: not an image", "notes.txt")
    assert "no store was written" in line
    assert not out.exists() and not Path(f"{out}.journal").exists() and not Path(f"{out}.lock").exists()
