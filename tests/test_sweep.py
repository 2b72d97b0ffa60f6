"""`probe sweep`: three packaged backbones over real photos (table, plot, reuse), the split rules, the subsample's
own stores, a layer sweep, the errors that come before any extraction, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from probe.errors import BackboneError, ProbeError
from probe.heads.fit import fit_head
from probe.sweep import sweep

from .conftest import DEMO, TINY, make_imagefolder

runner = CliRunner()
PACKAGED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def numbers(result) -> list:
    """Everything a sweep measured except timings: identical between a run and its re-run."""
    return [(r.backbone, r.layer, r.dim, r.params, r.logme, r.n_train, r.n_val, r.n_test,
             {k: (h.val, h.val_ci95, h.test, h.test_ci95, h.C) for k, h in r.heads.items()}) for r in result.rows]


def check_interval(acc, ci) -> None:
    assert 0.0 <= ci[0] <= acc <= ci[1] <= 1.0, (acc, ci)


def test_three_packaged_backbones_table_plot_and_reuse(tmp_path):
    """The demo's real photos, 3 per class per split, through lite0/1/2: rows, intervals, files; a second run
    embeds nothing and gives the same numbers; rank_only gives the same LogME without heads."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    first = sweep(DEMO, PACKAGED, max_images=3, cache_dir=cache, out_dir=out, workers=0)

    assert [r.backbone for r in first.rows] == PACKAGED and first.heads == ["linear", "knn"]
    for r in first.rows:
        assert r.layer is None and r.dim == 1280 and r.params > 1_000_000
        assert (r.n_train, r.n_val, r.n_test) == (30, 30, 0)  # 10 classes x 3; the demo has no test split
        assert r.embedded == 60 and r.throughput == "measured" and r.img_per_s > 0
        assert math.isfinite(r.logme)
        assert Path(r.store).is_file() and Path(r.store).name.endswith(f"-max3s0-{r.backbone}.h5")
        for h in ("linear", "knn"):
            s = r.heads[h]
            check_interval(s.val, s.val_ci95)
            assert s.test is None and s.test_ci95 is None
        assert r.heads["linear"].C > 0
    assert [r.params for r in first.rows] == sorted(r.params for r in first.rows)  # lite0 < lite1 < lite2
    assert first.splits["test"].startswith("none") and first.splits["val"] == "the val split"
    assert first.spearman["n"] == 3 and first.spearman["accuracy"] == "val" and -1 <= first.spearman["rho"] <= 1

    files = {k: Path(v) for k, v in first.files.items()}
    assert files == {"json": out / "sweep.json", "md": out / "sweep.md", "png": out / "sweep.png"}
    assert json.loads(files["json"].read_text()) == json.loads(json.dumps(first.to_dict()))
    md = files["md"].read_text()
    table = [line for line in md.splitlines() if line.startswith("| efficientnet_lite")]
    assert [line.split("|")[1].strip() for line in table] == PACKAGED
    assert "| backbone | layer | dim | params | img/s | LogME | linear val | linear test | knn val | knn test |" in md
    assert "Spearman" in md and "max_images=3" in md
    with Image.open(files["png"]) as im:
        im.verify()
    with Image.open(files["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300

    mtimes = [Path(r.store).stat().st_mtime_ns for r in first.rows]
    again = sweep(DEMO, PACKAGED, max_images=3, cache_dir=cache, out_dir=out, workers=0)
    assert [r.embedded for r in again.rows] == [0, 0, 0]
    assert [Path(r.store).stat().st_mtime_ns for r in again.rows] == mtimes  # the stores were not rewritten
    assert [(r.throughput, r.img_per_s) for r in again.rows] == [("reused", r.img_per_s) for r in first.rows]
    assert numbers(again) == numbers(first) and again.spearman == first.spearman
    assert "(reused)" in Path(again.files["md"]).read_text()

    ranked = sweep(DEMO, PACKAGED, max_images=3, cache_dir=cache, rank_only=True, workers=0)
    assert ranked.heads == [] and all(r.heads == {} and r.embedded == 0 for r in ranked.rows)
    assert [r.logme for r in ranked.rows] == [r.logme for r in first.rows]
    assert ranked.spearman is None and ranked.files == {}


def test_split_rules(tmp_path):
    """No val split: a seeded stratified 20% of train is held out (and said so); no train split: every labelled row
    trains; test is scored where the data has it."""
    no_val = make_imagefolder(tmp_path / "a", per_class=6, splits=("train", "test"))
    r = sweep(no_val, [TINY], weights="random", cache_dir=tmp_path / "cache", workers=0)
    row = r.rows[0]
    assert (row.n_train, row.n_val, row.n_test) == (15, 3, 18)  # 1 of 6 per class held out (20%, at least one)
    assert "held out" in r.splits["val"] and r.splits["test"] == "the test split"
    fit = fit_head(row.store, "knn")
    assert (fit.n_train, fit.n_val, fit.n_test) == (18, 0, 18)  # the one difference: fit-head holds out no val here
    for h in row.heads.values():
        check_interval(h.val, h.val_ci95)
        check_interval(h.test, h.test_ci95)
    assert r.spearman is None and any("no rank correlation" in n for n in r.notes)

    folder = make_imagefolder(tmp_path / "b", per_class=5)  # class folders, no splits
    r = sweep(folder, [TINY], weights="random", cache_dir=tmp_path / "cache", heads=["knn"], workers=0)
    row = r.rows[0]
    assert (row.n_train, row.n_val, row.n_test) == (12, 3, 0) and list(row.heads) == ["knn"]
    assert "no train split" in r.splits["train"] and row.heads["knn"].test is None


def test_rows_are_fit_heads_without_a_train_split(tmp_path):
    """val/ and test/ without train/: fit-head's rule (the sweep takes its rows from fit-head's function) pools every
    labelled row into train and a seeded 20% val; the sweep's own copy refused it (no training rows)."""
    data = make_imagefolder(tmp_path / "data", per_class=5, splits=("val", "test"))
    r = sweep(data, [TINY], weights="random", cache_dir=tmp_path / "cache", heads=["knn"], workers=0)
    row, fit = r.rows[0], fit_head(r.rows[0].store, "knn")
    assert (row.n_train, row.n_val, row.n_test) == (fit.n_train, fit.n_val, fit.n_test) == (24, 6, 0)
    assert r.splits["train"] == "every labelled row (the data has no train split)"
    assert r.splits["val"].startswith("a stratified 20% of train held out") and r.splits["test"] == "none (val only)"


def test_max_images_subsamples_per_class_into_stores_of_its_own(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=6, splits=("train", "val", "test"))
    cache = tmp_path / "cache"
    small = sweep(data, [TINY], weights="random", max_images=2, cache_dir=cache, heads=["knn"], workers=0)
    full = sweep(data, [TINY], weights="random", cache_dir=cache, heads=["knn"], workers=0)
    s, f = small.rows[0], full.rows[0]
    assert (s.n_train, s.n_val, s.n_test) == (6, 6, 6) and (f.n_train, f.n_val, f.n_test) == (18, 18, 18)
    assert s.store != f.store and "-max2s0-" in s.store and s.embedded == 18 and f.embedded == 54
    manifest = next((cache / "sweep").glob("*-max2s0.csv")).read_text().splitlines()
    assert manifest[0] == "path,label,split" and len(manifest) == 1 + 18
    other = sweep(data, [TINY], weights="random", max_images=2, seed=1, cache_dir=cache, heads=["knn"], workers=0)
    assert "-max2s1-" in other.rows[0].store and other.rows[0].store != s.store


def test_layers_all_sweeps_one_backbone_by_depth(tmp_path):
    r = sweep(make_imagefolder(tmp_path / "data", per_class=4, splits=("train", "val")), [TINY], weights="random",
              layers="all", cache_dir=tmp_path / "cache", out_dir=tmp_path / "out", heads=["knn"], workers=0)
    assert [row.layer for row in r.rows] == [f"blocks.{i}" for i in range(6)]
    assert len({row.store for row in r.rows}) == 6 and all(row.dim == 64 for row in r.rows)
    with Image.open(r.files["png"]) as im:
        assert im.size[0] > 1.8 * im.size[1]  # the second panel: accuracy by depth
    assert "| timm/test_vit | blocks.0 |" in Path(r.files["md"]).read_text()


def test_errors_come_before_any_extraction(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(BackboneError, match=r"unknown backbone 'efficientnet_lite9'.*close matches"):
        sweep(DEMO, ["efficientnet_lite0", "efficientnet_lite9"], cache_dir=cache)  # lite0, first, is not extracted
    with pytest.raises(ProbeError, match="no backbones to sweep"):
        sweep(DEMO, [], cache_dir=cache)
    with pytest.raises(ProbeError, match="no backbones to sweep"):
        sweep(DEMO, " , ", cache_dir=cache)
    with pytest.raises(ProbeError, match="every layer of one backbone, got 2 backbones"):
        sweep(DEMO, ["efficientnet_lite0", "efficientnet_lite1"], layers="all", cache_dir=cache)
    with pytest.raises(BackboneError, match=r"unknown layer 'blocks.9'.*blocks.5"):
        sweep(DEMO, [TINY], weights="random", layers=["blocks.1", "blocks.9"], cache_dir=cache)
    with pytest.raises(ProbeError, match="unknown head 'svm'"):
        sweep(DEMO, ["efficientnet_lite0"], heads=["linear", "svm"], cache_dir=cache)
    with pytest.raises(ProbeError, match="bootstrap must be a number of resamples >= 100"):
        sweep(DEMO, ["efficientnet_lite0"], bootstrap=10, cache_dir=cache)
    with pytest.raises(ProbeError, match="bootstrap must be at most 1,000,000"):  # before any extraction
        sweep(DEMO, ["efficientnet_lite0"], bootstrap=2_000_000, cache_dir=cache)
    with pytest.raises(ProbeError, match="listed twice"):
        sweep(DEMO, ["efficientnet_lite0", "efficientnet_lite0"], cache_dir=cache)
    assert not cache.exists()


def test_cli_json_text_and_errors(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=4, splits=("train", "val"))
    args = ["sweep", str(data), "--backbones", TINY, "--weights", "random", "--cache-dir", str(tmp_path / "cache"),
            "--workers", "0", "--heads", "knn,linear"]
    res = runner.invoke(app, [*args, "--json", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [r["backbone"] for r in d["rows"]] == [TINY] and d["heads"] == ["knn", "linear"]
    assert d["rows"][0]["heads"]["linear"]["val"] is not None and all(Path(p).is_file() for p in d["files"].values())

    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| backbone | layer |" in res.stdout and "(reused)" in res.stdout

    res = runner.invoke(app, ["sweep", str(DEMO), "--backbones", "efficientnet_lite0,efficientnet_lite1",
                              "--layers", "all", "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 1 and "every layer of one backbone" in res.stderr
    res = runner.invoke(app, ["sweep", str(DEMO), "--backbones", "resnet5O", "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code == 1 and "unknown backbone 'resnet5O'" in res.stderr
    assert not (tmp_path / "c2").exists()
