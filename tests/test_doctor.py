"""`probe doctor`: planted label noise and planted cross-split duplicates in the real demo features, the HTML report,
bad input."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cli.main import app
from probe.doctor import doctor
from probe.extract import ExtractConfig, extract
from probe.report import THUMB, doctor_page
from probe.store import FeatureStore, store_from_arrays

from .conftest import DEMO, fill_disk, make_image

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
    (tmp / "demo").symlink_to(DEMO)  # one root for both image folders, so the HTML page finds every thumbnail
    store = store_from_arrays(tmp / "noisy.h5", np.concatenate([demo.features(), dups.features()]),
                              np.concatenate([y, dy]), root=str(tmp),
                              paths=[*(f"demo/{p}" for p in demo.paths()), *(f"dups/{p}" for p in dups.paths())],
                              splits=[*demo.splits(), *dups.splits()], classes=demo.classes)
    return doctor(store), set(flip.tolist()), store


def test_planted_label_noise_is_ranked_first(planted):
    report, flipped, _ = planted
    flagged = {i["row"] for i in report.label_issues}
    top = {i["row"] for i in report.label_issues[:FLIPS]}
    recall, precision_top = len(flagged & flipped) / FLIPS, len(top & flipped) / FLIPS
    # measured (seed 0): the 20 highest-ranked rows are 80% planted flips (the issue's target: precision >= 0.8 at
    # recall >= 0.6 at the number of flips); cleanlab's estimated count cuts the list at ~90 rows, all 20 flips in
    # it (the rest: Fashion-MNIST's shirts / tops / coats really are confused, some really mislabelled)
    assert recall >= 0.8 and precision_top >= 0.7, (recall, precision_top)
    quality = [i["self_confidence"] for i in report.label_issues]
    assert quality == sorted(quality)  # ranked, least self-confident first
    i = report.label_issues[0]
    assert i["given"] != i["suggested"] and 0 <= i["self_confidence"] < 0.5


def _planted_pairs(store: FeatureStore) -> list[tuple[str, str]]:
    """(test copy, train original) paths of the 18 planted copies."""
    copies = [p for p in store.paths() if p.startswith("dups/test/")]
    assert len(copies) == 18
    return [(c, c.replace("test/", "train/")[:-len(Path(c).name)] + "o" + Path(c).stem[1:] + ".png") for c in copies]


def test_planted_cross_split_duplicates_are_all_found(planted):
    report, _, store = planted
    found = {tuple(sorted(p["paths"])) for p in report.duplicates["pairs"] if p["cross_split"]}
    for c, original in _planted_pairs(store):
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


# ---------------------------------------------------------------------------------------------- HTML report
def _section(page: str, name: str) -> str:
    return page.split(f"<section id='{name}'>", 1)[1].split("</section>", 1)[0]


def _cards(section: str) -> dict[str, str]:
    """Row path (as shown) -> the HTML of its card."""
    cards = section.split('<div class="card">')[1:]
    return {html.unescape(re.search(r"<span class='path'>(.*?)</span>", c).group(1)): c for c in cards}


@pytest.fixture(scope="module")
def page(planted, tmp_path_factory) -> str:
    out = doctor_page(planted[0], tmp_path_factory.mktemp("page") / "doctor.html")
    return out.read_text(encoding="utf-8")


def test_page_shows_the_flipped_rows_as_label_errors(planted, page):
    report, flipped, _ = planted
    cards = _cards(_section(page, "label-errors"))
    assert list(cards) == [i["path"] for i in report.label_issues[:50]]  # the top 50, in rank order
    shown = [i for i in report.label_issues[:50] if i["row"] in flipped]
    assert len(shown) >= 12  # measured: 17 of the 20 flips are flagged, most of them near the top
    for i in shown:
        card = cards[i["path"]]
        assert f"{html.escape(i['given'])} &rarr; {html.escape(i['suggested'])}" in card
        assert f"{i['self_confidence']:.3f}" in card and 'src="data:image/jpeg;base64,' in card
    assert f"{len(report.label_issues) - 50} more in --json" in _section(page, "label-errors")


def test_page_thumbnails_are_jpeg_data_uris(planted, page):
    report, _, _ = planted
    uris = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 50 + 2 * min(50, len(report.duplicates["pairs"])) + 50
    for uri in uris[::10]:
        im = Image.open(io.BytesIO(base64.b64decode(uri)))
        im.load()
        assert im.format == "JPEG" and max(im.size) == THUMB
    assert "image not found" not in page  # every path resolved through the store's root


def test_page_shows_the_planted_duplicate_pairs(planted, page):
    report, _, store = planted
    section = _section(page, "duplicates")
    pairs = section.split("<div class='pair")[1:]
    assert [p.startswith(" cross'") for p in pairs] == sorted((p.startswith(" cross'") for p in pairs), reverse=True)
    for c, original in _planted_pairs(store):
        assert any(p.startswith(" cross'") and f">{c}</span>" in p and f">{original}</span>" in p for p in pairs), c
    assert "100.0% of test rows have a train near-duplicate" in section


def test_page_balance_table_counts(planted, page):
    report, _, store = planted
    rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r) for r in
            re.findall(r"<tr>(.*?)</tr>", _section(page, "balance"))]
    assert rows[0] == ["split", *map(html.escape, store.classes), "total"]
    y, sp = store.labels(), store.splits()
    want = {s: [int(((sp == s) & (y == c)).sum()) for c in range(len(store.classes))] for s in np.unique(sp)}
    want["total"] = np.bincount(y, minlength=len(store.classes)).tolist()
    got = {r[0]: [int(n) for n in r[1:]] for r in rows[1:]}
    assert got == {s: [*n, sum(n)] for s, n in want.items()}
    assert got["total"][-1] == 424


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, object]:
    """A tiny labelled store whose class names and a path hold HTML ('<b>&', '<i>'), with real images under its
    root: (root, report)."""
    root = tmp_path_factory.mktemp("odd")
    paths = [f"imgs/x{i}.png" for i in range(39)] + ["imgs/a<i>&.png"]
    for i, p in enumerate(paths):
        make_image(root / p, seed=i)
    y = np.arange(40) % 2
    X = np.random.default_rng(0).normal(size=(40, 8)) + 2 * y[:, None]
    store = store_from_arrays(root / "odd.h5", X, y, paths=paths, splits=["train", "val"] * 20,
                              classes=["<b>&", "ok"], root=str(root))
    return root, doctor(store, folds=3)


def test_page_escapes_class_names_and_paths(odd, tmp_path):
    _, report = odd
    text = doctor_page(report, tmp_path / "p.html", title="doctor <script>").read_text(encoding="utf-8")
    for raw in ("<b>&", "<i>", "<script>"):
        assert raw not in text, raw
    assert "<th>&lt;b&gt;&amp;</th>" in text and "a&lt;i&gt;&amp;.png" in text and "doctor &lt;script&gt;" in text
    assert "&lt;b&gt;&amp; [" in text  # an outlier card's label
    assert text.count('src="data:image/jpeg;base64,') == len(report.label_issues[:50]) + 2 * len(
        report.duplicates["pairs"][:50]) + 40


def test_page_of_a_moved_store_uses_the_paths_as_given(odd, tmp_path, monkeypatch):
    root, report = odd
    gone = {**report.to_dict(), "store": str(tmp_path / "moved.h5")}
    monkeypatch.chdir(root)  # store-relative paths still resolve from here
    assert "image not found" not in doctor_page(gone, tmp_path / "a.html").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # ... and from here they do not: cards say so, the page is still written
    text = doctor_page(gone, tmp_path / "b.html", top=5).read_text(encoding="utf-8")
    assert text.count("image not found") == text.count('<div class="card">') > 0
    assert "data:image" not in text


def test_cli_out_writes_the_page(odd, tmp_path):
    root, _ = odd
    res = runner.invoke(app, ["doctor", str(root / "odd.h5"), "--folds", "3", "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert res.stdout.rstrip().splitlines()[-1] == f"report: {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").read_text(encoding="utf-8").count("<img ") > 40
    res = runner.invoke(app, ["doctor", str(root / "odd.h5"), "--folds", "3", "--json", "-o", str(tmp_path / "j.html")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["html"] == str(tmp_path / "j.html") and (tmp_path / "j.html").is_file()


@pytest.mark.parametrize("where", ["not a folder", "full disk"])
def test_cli_out_unwritable_is_one_line(odd, tmp_path, small_disk, where):
    root, _ = odd
    if where == "not a folder":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "r.html"
    else:
        disk = small_disk("1m")
        fill_disk(disk, leave=16_384)  # the page (40+ thumbnails) needs more
        out = disk / "r.html"
    res = runner.invoke(app, ["doctor", str(root / "odd.h5"), "--folds", "3", "--out", str(out)])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and str(out) in err, err
    assert not out.exists() and not list(out.parent.glob("*.tmp*"))


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
    assert "more ..." not in res.stdout  # 3 classes: every count
    from cli.doctor import _text

    many = dict(out, balance={**out["balance"], "counts": {"train": {f"c{i}": 10 - i for i in range(7)}}})
    assert "  train  c6:4  c5:5  ... 3 more ...  c1:9  c0:10" in _text(many, 4).splitlines()  # ends by count
    assert "  train  c6:4  ... 5 more ...  c0:10" in _text(many, 1).splitlines()
    assert "c3:7" in _text(many, 7)  # every count when they fit


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


def test_fold_refits_are_the_heads_own_fits_of_the_fold():
    """out_of_fold_proba gathers each fold's rows into one reused buffer and normalises them there (copy=False): its
    probabilities are, number for number, those of LinearHead(C).fit(X[train]).predict_proba(X[held out]), and X is
    unchanged."""
    from sklearn.model_selection import StratifiedKFold

    from probe.doctor import out_of_fold_proba
    from probe.heads import LinearHead

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 60)
    X = (rng.normal(0, 0.8, (3, 16))[y] + rng.normal(size=(180, 16)) * np.linspace(0.5, 9, 16)).astype(np.float32)
    before = X.copy()
    P, C = out_of_fold_proba(X, y, 4, 0)
    np.testing.assert_array_equal(X, before)
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=0).split(X, y):
        np.testing.assert_array_equal(P[te], LinearHead(C=C, seed=0).fit(X[tr], y[tr]).predict_proba(X[te]))


def test_sweep_per_fold_is_nested_and_agrees_with_once():
    """sweep="per-fold": fold i's probabilities never see fold i's labels (changing them changes nothing there, and
    does change the other folds'); its out-of-fold accuracy is that of the single sweep; folds < 3 is refused."""
    from sklearn.model_selection import StratifiedKFold

    from probe.doctor import _nested, out_of_fold_proba
    from probe.errors import ProbeError

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.7, (4, 12))
    y = np.repeat(np.arange(4), 50)
    X = (centres[y] + rng.normal(size=(200, 12))).astype(np.float32)
    splits = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    parts = [te for _, te in splits]
    P = _nested(X, y, splits, seed=0)
    assert P.shape == (200, 4) and np.allclose(P.sum(1), 1, atol=1e-5)
    y2 = y.copy()
    y2[parts[0]] = (y2[parts[0]] + 1) % 4  # every label of fold 0 wrong
    P2 = _nested(X, y2, splits, seed=0)
    np.testing.assert_array_equal(P2[parts[0]], P[parts[0]])
    assert np.abs(P2[parts[1]] - P[parts[1]]).max() > 1e-3
    nested, C = out_of_fold_proba(X, y, 5, 0, "per-fold")
    once, C1 = out_of_fold_proba(X, y, 5, 0, "once")
    assert C is None and C1 is not None
    acc = (nested.argmax(1) == y).mean(), (once.argmax(1) == y).mean()
    assert 0.7 < acc[1] < 0.97 and abs(acc[0] - acc[1]) <= 0.04, acc
    with pytest.raises(ProbeError, match="folds >= 3"):
        out_of_fold_proba(X, y, 2, 0, "per-fold")


def test_duplicates_are_the_dedup_search(planted):
    """doctor and `probe dedup` share one search (probe.search.dedup.near_pairs): exact on a small store, the same
    pairs at the same threshold."""
    from probe.search import find_duplicates

    report, _, store = planted
    r = find_duplicates(store, report.duplicates["threshold"])
    assert report.duplicates["index"] == "flat" and r["search"] == {"method": "exact"}
    assert r["pairs"] == len(report.duplicates["pairs"]) >= 18
    assert {i for g in r["groups"] for i in g["ids"]} == {i for p in report.duplicates["pairs"] for i in p["rows"]}
