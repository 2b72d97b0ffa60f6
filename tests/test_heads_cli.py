"""`probe fit-head / predict / eval / fewshot` end to end through typer's CliRunner, and the real-accuracy check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from probe.heads import load_head, save_head
from probe.store import FeatureStore, store_from_arrays

from .conftest import DEMO

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args: str) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def fails(*args: str, match: str) -> str:
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and match in r.output, r.output
    return r.output


@pytest.fixture(scope="module")
def tiny_heads(tiny_store, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("heads")
    heads = {}
    for kind, extra in [("linear", ["--n-Cs", "8"]), ("mlp", ["--epochs", "20", "--hidden", "32"]),
                        ("prototype", []), ("knn", ["--k", "3"])]:
        s = ok_json("fit-head", tiny_store, "--head", kind, "--out", out / f"{kind}.safetensors", *extra)
        assert s["head"] == kind and s["n_train"] == 18 and s["classes"] == ["cat", "dog", "fox"]
        assert s["test"]["n"] == 18 and 0 <= s["test"]["accuracy"] <= 1
        heads[kind] = Path(s["out"])
    return heads


def test_fit_head_saves_every_head(tiny_heads):
    for kind, path in tiny_heads.items():
        head, meta = load_head(path)
        assert meta["head"] == kind and meta["config"]["backbone"] == "timm/test_vit"
        assert meta["class_names"] == ["cat", "dog", "fox"] and len(meta["config_key"]) == 64
    s = json.loads(json.dumps(load_head(tiny_heads["linear"])[1]["fit"]))
    assert s["refit_on"] == "train+val" and s["n_val"] == 18


def test_fit_head_text_output_and_options(tiny_store, tmp_path):
    r = run("fit-head", tiny_store, "--head", "linear", "--out", tmp_path / "h.safetensors", "--shots", "2",
            "--n-Cs", "4", "--balanced", "--l2")
    assert r.exit_code == 0, r.output
    assert "2 shots/class (seed 0)" in r.output and "L2 sweep" in r.output and "saved" in r.output
    assert load_head(tmp_path / "h.safetensors")[1]["fit"]["n_train"] == 6


def test_eval_reports_metrics_and_png(tiny_store, tiny_heads, tmp_path):
    r = ok_json("eval", tiny_store, "--head", tiny_heads["prototype"], "--split", "test", "--png", tmp_path / "cm.png")
    assert r["n"] == 18 and {"accuracy", "top5", "balanced_accuracy", "per_class", "confusion"} <= set(r)
    assert [c["class"] for c in r["per_class"]] == ["cat", "dog", "fox"] and np.sum(r["confusion"]) == 18
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    text = run("eval", tiny_store, "--head", tiny_heads["knn"])
    assert text.exit_code == 0 and "precision" in text.output and ".test.confusion.png" in text.output


def test_predict_images_and_folder(tiny_store, tiny_heads, tmp_path):
    root = FeatureStore(tiny_store).root
    folder = root / "test" / "dog"
    (folder / "broken.png").write_bytes(b"not a png")  # reported, not fatal
    try:
        r = ok_json("predict", folder, root / "test" / "cat" / "img_0.png", "--head", tiny_heads["linear"],
                    "--top-k", "2", "--csv", tmp_path / "p.csv")
    finally:
        (folder / "broken.png").unlink()
    assert len(r["predictions"]) == 7 and [s["path"] for s in r["skipped"]] == [str(folder / "broken.png")]
    top = r["predictions"][0]["top"]
    assert len(top) == 2 and {t["class"] for t in top} <= {"cat", "dog", "fox"}
    assert top[0]["probability"] >= top[1]["probability"]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,rank,class,probability" and len(rows) == 1 + 7 * 2


def test_fewshot_cli(tiny_store):
    r = ok_json("fewshot", tiny_store, "--way", "3", "--shot", "1,2", "--query", "4", "--episodes", "300",
                "--seed", "3")
    assert [x["shot"] for x in r["results"]] == [1, 2] and r["n_images"] == 54
    for x in r["results"]:
        assert 0 <= x["accuracy"] <= 1 and x["ci95"] > 0 and x["episodes"] == 300
    assert r == {**r, "results": r["results"]}  # JSON round-trips
    again = ok_json("fewshot", tiny_store, "--way", "3", "--shot", "1,2", "--query", "4", "--episodes", "300",
                    "--seed", "3")
    assert [x["accuracy"] for x in again["results"]] == [x["accuracy"] for x in r["results"]]  # seeded


def test_fewshot_both_heads_on_the_same_episodes(tiny_store):
    args = ("fewshot", tiny_store, "--way", "3", "--shot", "1,2", "--query", "4", "--episodes", "200")
    r = ok_json(*args, "--head", "both", "--C", "10")
    assert r["head"] == "both" and r["C"] == 10
    assert [(x["head"], x["shot"]) for x in r["results"]] == [("prototype", 1), ("linear", 1), ("prototype", 2),
                                                                ("linear", 2)]
    for x in r["results"]:
        assert {"accuracy", "ci95", "episodes", "episodes_per_s"} <= set(x) and x["episodes"] == 200
    proto = ok_json(*args)  # default head: the prototype rows alone, unchanged
    assert [x["accuracy"] for x in proto["results"]] == [x["accuracy"] for x in r["results"][::2]]
    text = run(*args, "--head", "linear")
    assert text.exit_code == 0 and "linear head (C=1)" in text.output and "3-way 2-shot" in text.output


def test_fewshot_bad_head_and_C(tiny_store):
    fails("fewshot", tiny_store, "--head", "svm", match="unknown few-shot head 'svm': expected one of prototype, "
                                                        "linear, both")
    fails("fewshot", tiny_store, "--head", "linear", "--C", "-1", match="--C must be a positive number")
    fails("fewshot", tiny_store, "--metric", "manhattan", match="unknown metric 'manhattan'")


# ------------------------------------------------------------------------------------------ bad input
def test_unlabelled_and_single_class_stores(tmp_path):
    X = np.random.default_rng(0).normal(size=(12, 8))
    store_from_arrays(tmp_path / "u.h5", X)
    fails("fit-head", tmp_path / "u.h5", "--out", tmp_path / "h.safetensors", match="has no labelled images")
    fails("fewshot", tmp_path / "u.h5", match="has no labelled images")
    store_from_arrays(tmp_path / "one.h5", X, np.zeros(12), classes=["cat"])
    fails("fit-head", tmp_path / "one.h5", "--out", tmp_path / "h.safetensors",
          match="has 1 class ('cat') in its labelled rows: a classifier needs at least 2 classes")


def test_fewshot_too_few_images_and_too_many_ways(tiny_store):
    fails("fewshot", tiny_store, "--shot", "5", "--query", "15", "--way", "3",
          match="class 'cat' has 18 images, fewer than --shot 5 + --query 15 = 20")
    fails("fewshot", tiny_store, "--way", "5", "--shot", "1", "--query", "1", match="--way 5 needs at least 5 classes")


def test_head_for_another_backbone_is_refused(tiny_store, tiny_heads, tmp_path):
    other = store_from_arrays(tmp_path / "o.h5", np.zeros((6, 64)), np.arange(6) % 3, classes=["cat", "dog", "fox"],
                              splits=["test"] * 6)
    fails("eval", other.path, "--head", tiny_heads["linear"], match="another backbone configuration")
    head, meta = load_head(tiny_heads["linear"])  # same head, recorded weights checksum altered
    meta["config"]["weights_sha256"] = "0" * 64
    save_head(head, tmp_path / "forged.safetensors", {k: v for k, v in meta.items() if k not in ("format", "head",
                                                                                                  "params")})
    img = FeatureStore(tiny_store).abspath(FeatureStore(tiny_store).paths()[0])
    fails("predict", img, "--head", tmp_path / "forged.safetensors", match="weights_sha256: recorded '0000")


def test_missing_files_are_named(tiny_store, tiny_heads, tmp_path):
    fails("predict", tmp_path / "nope.jpg", "--head", tiny_heads["knn"], match=f"no such image or folder: "
                                                                              f"'{tmp_path / 'nope.jpg'}'")
    fails("predict", tmp_path, "--head", tmp_path / "h.safetensors", match="contains no image files")
    fails("eval", tiny_store, "--head", tmp_path / "h.safetensors", match="h.safetensors' does not exist")
    fails("fit-head", tmp_path / "s.h5", "--out", tmp_path / "h.safetensors", match="s.h5' does not exist")
    fails("eval", tiny_store, "--head", tiny_heads["knn"], "--split", "holdout", match="no 'holdout' split")
    fails("fit-head", tiny_store, "--head", "svm", "--out", tmp_path / "h.safetensors", match="unknown head 'svm'")


# ------------------------------------------------------------------------------------------ real features
@pytest.mark.slow
def test_demo_linear_accuracy_and_predict(demo_store, tmp_path):
    """Packaged lite0 on 400 real Fashion-MNIST images: sklearn on standardised features gets ~0.79 on val."""
    from probe.heads import LinearHead

    store = FeatureStore(demo_store)
    honest = LinearHead().fit(store.features("train"), store.labels("train"))  # C chosen on a holdout of train
    assert (honest.predict(store.features("val")) == store.labels("val")).mean() >= 0.72
    s = ok_json("fit-head", demo_store, "--out", tmp_path / "demo.safetensors")
    assert s["val_accuracy"] >= 0.72 and len(s["sweep"]) >= 20 and s["dim"] == 1280
    imgs = [DEMO / "val" / "Bag" / "08987.png", DEMO / "val" / "Trouser" / sorted(
        p.name for p in (DEMO / "val" / "Trouser").iterdir())[0]]
    r = ok_json("predict", *imgs, "--head", tmp_path / "demo.safetensors", "--top-k", "3")
    assert [p["top"][0]["class"] for p in r["predictions"]] == ["Bag", "Trouser"]
    assert r["backbone"] == "efficientnet_lite0" and not r["skipped"]
