"""`probe doctor`: planted label noise and planted cross-split duplicates in the real demo features, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cli.main import app
from probe.doctor import doctor
from probe.extract import ExtractConfig, extract
from probe.store import FeatureStore, store_from_arrays

from .conftest import DEMO

runner = CliRunner()
FLIPS = 20  # 5% of the 400 demo images


def _plant_copies(root: Path, n: int = 6) -> int:
    """n demo images upscaled to 112 px into train/, and a JPEG q70, a 0.8x and a mirrored copy of each into test/."""
    for i, p in enumerate(sorted((DEMO / "train").rglob("*.png"))[::40][:n]):
        im = Image.open(p).convert("RGB").resize((112, 112), Image.BICUBIC)
        for split in ("train", "test"):
            (root / split / p.parent.name).mkdir(parents=True, exist_ok=True)
        im.save(root / "train" / p.parent.name / f"o{i}.png")
        im.save(root / "test" / p.parent.name / f"j{i}.jpg", quality=70)
        im.resize((90, 90)).save(root / "test" / p.parent.name / f"r{i}.png")
        ImageOps.mirror(im).save(root / "test" / p.parent.name / f"f{i}.png")
    return n


@pytest.fixture(scope="module")
def planted(demo_store, tmp_path_factory):
    """The demo features with 5% of labels flipped (seeded), plus planted duplicates: (report, flipped rows, store)."""
    tmp = tmp_path_factory.mktemp("doctor")
    demo = FeatureStore(demo_store)
    _plant_copies(tmp / "dups")
    extract(tmp / "dups", tmp / "dups.h5", ExtractConfig(batch_size=64, workers=0))
    dups = FeatureStore(tmp / "dups.h5")
    y = demo.labels()
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), FLIPS, replace=False)
    y[flip] = (y[flip] + rng.integers(1, len(demo.classes), FLIPS)) % len(demo.classes)
    dy = np.array([demo.classes.index(dups.classes[c]) for c in dups.labels()])
    store = store_from_arrays(tmp / "noisy.h5", np.concatenate([demo.features(), dups.features()]),
                              np.concatenate([y, dy]), paths=[*demo.paths(), *(f"dups/{p}" for p in dups.paths())],
                              splits=[*demo.splits(), *dups.splits()], classes=demo.classes)
    return doctor(store), set(flip.tolist()), store


def test_planted_label_noise_is_ranked_first(planted):
    report, flipped, _ = planted
    flagged = {i["row"] for i in report.label_issues}
    top = {i["row"] for i in report.label_issues[:FLIPS]}
    recall, precision_top = len(flagged & flipped) / FLIPS, len(top & flipped) / FLIPS
    # measured (seed 0): cleanlab flags 73 rows, recall 0.85 (precision 0.23: Fashion-MNIST shirts / tops / coats
    # really are confused); the 20 highest-ranked rows are 75% planted flips
    assert recall >= 0.6 and precision_top >= 0.5, (recall, precision_top)
    i = report.label_issues[0]
    assert i["given"] != i["suggested"] and 0 <= i["self_confidence"] < 0.5


def test_planted_cross_split_duplicates_are_all_found(planted):
    report, _, _ = planted
    found = {tuple(sorted(p["paths"])) for p in report.duplicates["pairs"] if p["cross_split"]}
    copies = [p for p in FeatureStore(report.store).paths() if p.startswith("dups/test/")]
    assert len(copies) == 18
    for c in copies:
        original = c.replace("test/", "train/")[:-len(Path(c).name)] + "o" + Path(c).stem[1:] + ".png"
        assert tuple(sorted((c, original))) in found, c
    assert report.leakage["test"] == 1.0  # every test row is a planted copy of a train image


def test_outliers_and_balance(planted):
    report, _, _ = planted
    d = [o["class_distance"] for o in report.outliers]
    assert d == sorted(d, reverse=True) and len(d) == report.n == 424
    assert all(o["knn_distance"] > 0 for o in report.outliers[:10])
    b = report.balance
    assert sum(b["total"].values()) == 424 and b["imbalance_ratio"] >= 1
    assert set(b["counts"]) == {"train", "val", "test"}


def test_cli_json(demo_store, tmp_path):
    demo = FeatureStore(demo_store)
    keep = np.flatnonzero(demo.labels() < 3)[:60]  # 3 classes x 20: a quick run
    small = store_from_arrays(tmp_path / "s.h5", demo.features()[keep], demo.labels()[keep],
                              paths=list(demo.paths()[keep]), splits=list(demo.splits()[keep]),
                              classes=demo.classes)
    res = runner.invoke(app, ["doctor", str(small.path), "--folds", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"label_issues", "duplicates", "leakage", "outliers", "balance", "C", "oof_accuracy"} <= set(out)
    res = runner.invoke(app, ["doctor", str(small.path), "--folds", "3", "--top", "3"])
    assert res.exit_code == 0 and "likely label errors" in res.stdout and "class balance" in res.stdout


@pytest.mark.parametrize("labels, n, needle", [
    (None, 40, "no labelled rows"),
    ("one", 40, "one class"),
    ("two", 10, "at least 20"),
    ("tiny", 40, "fewer than folds"),
])
def test_bad_input_is_one_line(tmp_path, labels, n, needle):
    X = np.random.default_rng(0).normal(size=(n, 8))
    y = {None: None, "one": np.zeros(n, int), "two": np.arange(n) % 2,
         "tiny": np.r_[np.zeros(n - 2, int), [1, 1]]}[labels]
    store_from_arrays(tmp_path / "b.h5", X, y, classes=["a", "b"] if labels else None)
    res = runner.invoke(app, ["doctor", str(tmp_path / "b.h5")])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and needle in err, err
