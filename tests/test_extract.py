"""`probe extract` into the HDF5 store: layouts, incremental re-runs, configuration keys, bad files, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from probe.data import DatasetError, discover, load_image
from probe.extract import extract
from probe.store import FeatureStore, StoreError, StoreMismatchError, locked

from .conftest import TINY, kill_9_at, make_image, make_imagefolder, tiny_config

runner = CliRunner()


def rows(store: Path) -> dict[str, np.ndarray]:
    s = FeatureStore(store)
    return dict(zip(s.paths(), s.features()))


# ------------------------------------------------------------------------------------------------ layouts
def test_imagefolder_store_is_plain_hdf5(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    summary = extract(tiny_folder, out, tiny_config())
    assert summary["count"] == 12 and summary["embedded"] == 12 and summary["skipped"] == []
    with h5py.File(out, "r") as f:  # readable with nothing but h5py
        assert f["features"].shape == (12, 64) and f["features"].dtype == np.float32
        assert list(f.attrs["classes"]) == ["cat", "dog", "fox"]
        assert f["labels"][:].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert f["paths"].asstr()[0] == "cat/img_0.png"
        assert f.attrs["backbone"] == TINY and f.attrs["weights"] == "random"
        assert json.loads(f.attrs["preprocess"])["crop"] == 160
        assert f.attrs["tta"] == "none" and f.attrs["dtype"] == "float32" and f.attrs["schema_version"] == 1
        assert len(f.attrs["weights_sha256"]) == 64 and "torch" in json.loads(f.attrs["versions"])
    X = FeatureStore(out).features()
    assert np.isfinite(X).all() and len(np.unique(X.round(4), axis=0)) == 12  # distinct images, distinct rows


def test_split_root_records_split_per_row(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2, splits=("train", "val", "test"))
    s = FeatureStore(extract(root, tmp_path / "s.h5", tiny_config())["store"])
    assert s.info()["splits"] == {"test": 6, "train": 6, "val": 6}
    assert s.features("val").shape == (6, 64) and s.labels("test").tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.startswith("val/") for p in s.paths("val"))


def test_flat_folder_is_unlabelled(tmp_path):
    for k in range(5):
        make_image(tmp_path / "gallery" / f"{k}.jpg", seed=k)
    s = FeatureStore(extract(tmp_path / "gallery", tmp_path / "s.h5", tiny_config())["store"])
    assert s.count == 5 and s.labels().tolist() == [-1] * 5 and s.classes == []


def test_csv_manifest(tmp_path, monkeypatch):
    for k in range(4):
        make_image(tmp_path / "imgs" / f"{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/0.png,a,train\nimgs/1.png,b,train\n"
                                    "imgs/2.png,a,validation\nimgs/3.png,,test\n")
    s = FeatureStore(extract(tmp_path / "m.csv", tmp_path / "s.h5", tiny_config())["store"])
    assert s.classes == ["a", "b"] and s.labels().tolist() == [0, 1, 0, -1]
    assert s.splits().tolist() == ["train", "train", "val", "test"]
    # a second manifest in the same folder is another dataset: its own default store, no stale rows
    (tmp_path / "m2.csv").write_text("path,label\nimgs/1.png,b\n")
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path / "cache"))
    a, b = extract(tmp_path / "m.csv", config=tiny_config()), extract(tmp_path / "m2.csv", config=tiny_config())
    assert a["store"] != b["store"] and Path(b["store"]).name.startswith("m2-")
    assert b["count"] == 1 and b["stale"] == 0
    (tmp_path / "bad.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(DatasetError, match="'path' column"):
        discover(tmp_path / "bad.csv")


def test_layout_errors_name_the_problem(tmp_path):
    make_imagefolder(tmp_path / "mixed", per_class=1)
    make_image(tmp_path / "mixed" / "loose.png", seed=1)
    with pytest.raises(DatasetError, match="--layout"):
        discover(tmp_path / "mixed")
    assert len(discover(tmp_path / "mixed", layout="flat")) == 4
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        discover(tmp_path / "empty")


# ----------------------------------------------------------------------------------- incremental + keys
def test_rerun_grown_and_changed_folder_embeds_only_what_is_new(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(tiny_folder, out, tiny_config())
    before = rows(out)
    again = extract(tiny_folder, out, tiny_config())
    assert again["embedded"] == 0 and again["reused"] == 12
    make_image(tiny_folder / "dog" / "new.png", seed=77)  # grown
    make_image(tiny_folder / "bee" / "b0.png", seed=99)  # a new class sorts first
    time.sleep(0.01)
    make_image(tiny_folder / "cat" / "img_1.png", seed=55)  # changed in place
    s = extract(tiny_folder, out, tiny_config())
    assert s["embedded"] == 3 and s["count"] == 14
    after = rows(out)
    assert np.array_equal(after["cat/img_0.png"], before["cat/img_0.png"])  # untouched rows kept
    assert not np.allclose(after["cat/img_1.png"], before["cat/img_1.png"])  # changed row replaced
    store = FeatureStore(out)
    assert store.classes == ["bee", "cat", "dog", "fox"]
    labels = dict(zip(store.paths(), store.labels()))
    assert labels["bee/b0.png"] == 0 and labels["cat/img_0.png"] == 1 and labels["fox/img_3.png"] == 3
    # a fresh store of the same folder holds the same vectors
    fresh = rows(extract(tiny_folder, tmp_path / "fresh.h5", tiny_config())["store"])
    for p, v in fresh.items():
        np.testing.assert_allclose(after[p], v, rtol=1e-5, atol=1e-5)


def test_vanished_files_are_kept_unless_pruned(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(tiny_folder, out, tiny_config())
    (tiny_folder / "fox" / "img_0.png").unlink()
    s = extract(tiny_folder, out, tiny_config())
    assert s["stale"] == 1 and s["count"] == 12
    s = extract(tiny_folder, out, tiny_config(prune=True))
    assert s["pruned"] == 1 and s["count"] == 11 and "fox/img_0.png" not in rows(out)


def test_another_configuration_never_mixes(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path / "cache"))
    a = extract(tiny_folder, None, tiny_config())["store"]
    b = extract(tiny_folder, None, tiny_config(tta="hflip"))["store"]
    assert a != b and Path(a).parent == tmp_path / "cache"  # default path is keyed by configuration
    assert FeatureStore(b).attrs["tta"] == "hflip"
    with pytest.raises(StoreMismatchError, match="tta: store has 'none', this run 'hflip'"):
        extract(tiny_folder, a, tiny_config(tta="hflip"))
    assert FeatureStore(a).count == 12  # untouched


def test_one_writer_per_store(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from probe.store import locked\n"
                               f"with locked({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match="another process"):
            extract(tiny_folder, out, tiny_config())
    finally:
        holder.kill()
        holder.wait()
    with locked(out):  # released when its holder dies, even by SIGKILL
        pass


# ------------------------------------------------------------------------------------------- bad files
def make_bad_corpus(root: Path) -> dict[str, str]:
    """Every kind of awkward file; returns name -> 'ok' (must be converted) or a reason fragment (must skip)."""
    d = root / "things"
    d.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "plain.png")
    Image.fromarray(rgb).save(d / "truncated.jpg")
    (d / "truncated.jpg").write_bytes((d / "truncated.jpg").read_bytes()[:300])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image")
    os.symlink(d / "loop.png", d / "loop.png")  # unreadable (even for root): ELOOP
    os.symlink(d / "missing.png", d / "dangling.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / "sixteen.png")  # 16-bit grey
    Image.fromarray(rgb).convert("P").save(d / "palette.gif")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° CW to display
    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.dstack([xx * 4, yy * 6, np.full_like(xx, 90)]).astype(np.uint8)  # JPEG keeps a gradient intact
    Image.fromarray(smooth).save(d / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.fromarray(np.full((30, 30, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("L", (12000, 8000)).save(d / "bomb.png")  # 96 Mpx > Pillow's 89 Mpx limit
    return {"plain.png": "ok", "cmyk.jpg": "ok", "sixteen.png": "ok", "palette.gif": "ok", "alpha.png": "ok",
            "rotated.jpg": "ok", "animated.gif": "ok", "truncated.jpg": "truncated", "empty.png": "empty",
            "notes.jpg": "not an image", "loop.png": "unreadable", "dangling.png": "dangling",
            "bomb.png": "decompression bomb"}


def test_bad_files_are_converted_or_skipped_with_reasons(tmp_path):
    expect = make_bad_corpus(tmp_path / "data")
    (tmp_path / "data" / "things" / "README.txt").write_text("ignored: not an image extension")
    summary = extract(tmp_path / "data", tmp_path / "s.h5", tiny_config())
    skipped = {Path(x["path"]).name: x["reason"] for x in summary["skipped"]}
    stored = {Path(p).name for p in FeatureStore(summary["store"]).paths()}
    for name, want in expect.items():
        if want == "ok":
            assert name in stored, name
        else:
            assert name in skipped and want in skipped[name], (name, skipped.get(name))
    assert summary["ignored"] == 1
    assert {x["path"] for x in FeatureStore(summary["store"]).info()["skipped"]} == \
        {f"things/{n}" for n, w in expect.items() if w != "ok"}  # recorded in the store too
    # re-running does not retry unchanged bad files, and keeps their reasons
    again = extract(tmp_path / "data", tmp_path / "s.h5", tiny_config())
    assert again["embedded"] == 0 and len(again["skipped"]) == len(skipped)


def test_conversions_are_correct(tmp_path):
    expect = make_bad_corpus(tmp_path)
    assert expect
    d = tmp_path / "things"
    rgb = np.asarray(load_image(str(d / "plain.png")))
    rotated = np.asarray(load_image(str(d / "rotated.jpg")))
    assert rotated.shape == (60, 40, 3)  # EXIF orientation applied: upright is 60 tall
    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.dstack([xx * 4, yy * 6, np.full_like(xx, 90)])
    assert np.abs(rotated.astype(int) - np.rot90(smooth, k=-1)).mean() < 3  # clockwise; JPEG noise only
    sixteen = np.asarray(load_image(str(d / "sixteen.png")))
    assert np.array_equal(sixteen[..., 0], rgb[..., 0])  # 16-bit scaled to 8-bit, not clipped to white
    alpha = np.asarray(load_image(str(d / "alpha.png"))).astype(int)
    np.testing.assert_allclose(alpha, (rgb.astype(int) * 128 + 255 * 127) / 255, atol=1.01)  # over white
    assert load_image(str(d / "animated.gif")).getpixel((0, 0))[0] == 10  # first frame
    assert load_image(str(d / "cmyk.jpg")).mode == "RGB"


# ----------------------------------------------------------------------------------------------- resume
def _cli_extract(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "probe", "extract", str(data), "--out", str(out), "--backbone", "resnet18",
            "--weights", "random", "--batch-size", "4", "--workers", "1", "--dtype", "float32", "--json"]


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_with_identical_features(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=[f"c{i}" for i in range(6)], per_class=8)  # 48 images
    # two runs killed at once (their cold starts overlap): right at the start, and ~5 of 12 batches (~10 KB each) in
    kill_after = {tmp_path / "killed_at_start.h5": 1, tmp_path / "killed_midway.h5": 50_000}
    kill_9_at({out: (_cli_extract(data, out), nbytes) for out, nbytes in kill_after.items()})
    ref = tmp_path / "ref.h5"
    r = runner.invoke(app, _cli_extract(data, ref)[3:])  # the uninterrupted run: the same command, in this process
    assert r.exit_code == 0, r.output
    for out, kill_after_bytes in kill_after.items():
        journal = Path(f"{out}.journal")
        assert not out.exists() or FeatureStore(out).count < 48  # it really was interrupted
        done = runner.invoke(app, _cli_extract(data, out)[3:])  # the rerun: a new run of the command (in this process)
        assert done.exit_code == 0, done.output
        summary = json.loads(done.stdout)
        assert summary["count"] == 48
        if kill_after_bytes > 1:
            assert 0 < summary["resumed"] < 48 and summary["embedded"] == 48 - summary["resumed"]
        store = FeatureStore(out)
        assert len(set(store.paths())) == store.count == 48  # every image exactly once
        want, got = rows(ref), rows(out)
        assert want.keys() == got.keys()
        for p in want:
            assert np.array_equal(want[p], got[p]), p  # bit-identical to the uninterrupted run
        assert not journal.exists()


def test_torn_journal_tail_is_ignored(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    from probe.extract import _extract_locked  # noqa: F401  (the journal format is what matters here)
    from probe.store import Journal

    j = Journal(f"{out}.journal")
    extract(tiny_folder, out, tiny_config())
    shutil.copy(out, tmp_path / "ref.h5")
    out.unlink()
    # a journal holding one finished batch and a torn record after it
    from probe.identity import config_key

    cfg = FeatureStore(tmp_path / "ref.h5").identity.to_dict()
    j.start({"config_key": config_key(cfg), "store": str(out)})
    ref = FeatureStore(tmp_path / "ref.h5")
    from probe.data import fingerprint

    paths = ref.paths()[:4]
    j.append(features=ref.features()[:4], paths=np.array(paths, dtype=str),
             fingerprints=np.array([fingerprint(str(tiny_folder / p)) for p in paths], dtype=str),
             bad_paths=np.array([], dtype=str), bad_fingerprints=np.array([], dtype=str),
             bad_reasons=np.array([], dtype=str))
    with open(j.path, "ab") as f:
        f.write(b"PRJ1\x00\x10\x00")  # an interrupted write
    s = extract(tiny_folder, out, tiny_config())
    assert s["resumed"] == 4 and s["count"] == 12
    for p, v in rows(tmp_path / "ref.h5").items():
        np.testing.assert_array_equal(rows(out)[p], v)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_extract_and_info_json(tiny_folder, tmp_path):
    out = tmp_path / "s.h5"
    r = runner.invoke(app, ["extract", str(tiny_folder), "--backbone", TINY, "--weights", "random", "--out",
                            str(out), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["count"] == 12
    r = runner.invoke(app, ["info", str(out), "--json"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["count"] == 12 and info["dim"] == 64 and info["backbone"] == TINY
    assert info["classes"] == ["cat", "dog", "fox"] and info["skipped"] == []
    assert info["device"] == "cpu" and info["extract_config"]["workers"] == 0  # the provenance is all there
    assert info["versions"]["torch"] and info["schema_version"] == 1
    r = runner.invoke(app, ["info", str(out)])
    assert "12 x 64" in r.stdout and "cat (4)" in r.stdout
    assert "device     cpu" in r.stdout and "batch_size=64" in r.stdout and "workers=0" in r.stdout
    assert "torch=" in r.stdout and "schema 1" in r.stdout


def test_cli_errors_exit_1_with_a_message(tmp_path):
    r = runner.invoke(app, ["extract", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    make_imagefolder(tmp_path / "d", per_class=1)
    r = runner.invoke(app, ["extract", str(tmp_path / "d"), "--backbone", "resnet5O"])
    assert r.exit_code == 1 and "close matches" in r.stderr
    r = runner.invoke(app, ["extract", str(tmp_path / "d"), "--backbone", TINY, "--tta", "spin"])
    assert r.exit_code == 1 and "hflip" in r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "d" / "cat" / "img_0.png")])
    assert r.exit_code == 1 and "not a probe feature store" in r.stderr


def test_cli_backbones_lists_offline_availability():
    r = runner.invoke(app, ["backbones", "--json"])
    got = {x["name"]: x for x in json.loads(r.stdout)}
    assert got["efficientnet_lite0"]["offline"] is True and got["efficientnet_lite0"]["dim"] == 1280
    assert got["resnet50"]["dim"] == 2048 and got["resnet50"]["input_size"] == 224
    r = runner.invoke(app, ["backbones", "--timm", "test_vit*", "--json"])
    assert any(x["name"] == "timm/test_vit" and x["dim"] == 64 for x in json.loads(r.stdout))
