"""Zero-shot heads (`probe zeroshot`) offline: a tiny random open_clip model saved as a clip/local-dir: backbone,
its store, and the head's prototypes, file, predict / eval / serve, refusals and the zero-shot-anchored probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

open_clip = pytest.importorskip("open_clip")

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES  # noqa: E402

from cli.main import app  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.extract import ExtractConfig, extract  # noqa: E402
from probe.heads import LinearHead, PrototypeHead, load_head  # noqa: E402
from probe.store import FeatureStore  # noqa: E402
from probe.zeroshot import zeroshot  # noqa: E402

from .conftest import make_image, make_imagefolder, make_open_clip_dir  # noqa: E402

runner = CliRunner()
CLASSES = ("tabby_cat", "dog", "red_fox")  # underscores: prompts say "tabby cat", the head keeps "tabby_cat"


def _extract(data: Path, out: Path, backbone: str) -> Path:
    extract(data, out, ExtractConfig(backbone=backbone, batch_size=8, workers=0, dtype="float32", engine="torch"))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path | str]:
    """The tiny CLIP folder, its backbone name, a labelled train/val/test store and a zero-shot head file."""
    root = tmp_path_factory.mktemp("zs")
    model = make_open_clip_dir(root / "tinyclip", seed=3)
    backbone = f"clip/local-dir:{model}"
    data = make_imagefolder(root / "data", classes=CLASSES, per_class=4, splits=("train", "val", "test"))
    store = _extract(data, root / "clip.h5", backbone)
    head = root / "zs.safetensors"
    zeroshot(store, out=head, device="cpu")
    return {"model": model, "backbone": backbone, "data": data, "store": store, "head": head, "root": root}


def _reference(model_dir: Path, names: list[str], templates) -> tuple[np.ndarray, float]:
    """CLIP's prompt ensemble computed directly with open_clip: (C, D) prototypes and the logit scale."""
    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    rows = []
    with torch.inference_mode():
        for n in names:
            prompts = [t(n) if callable(t) else t.replace("{}", n) for t in templates]
            e = model.encode_text(tok(prompts)).double()  # (n_templates, D)
            m = (e / e.norm(dim=1, keepdim=True)).mean(0)
            rows.append((m / m.norm()).numpy())
    return np.stack(rows), float(model.logit_scale.detach().exp())


def _zs_pred(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    """argmax of x_hat @ T.T: the zero-shot class of each row."""
    return (X / np.linalg.norm(X, axis=1, keepdims=True) @ T.T).argmax(1)


# ------------------------------------------------------------------------------------------ the head
def test_prototypes_are_clips_prompt_ensemble(clip):
    head, meta = load_head(clip["head"])
    assert isinstance(head, PrototypeHead) and (head.metric, head.norm) == ("cosine", "l2")
    assert meta["class_names"] == sorted(CLASSES)  # the store's names, as its columns
    T, scale = _reference(clip["model"], [c.replace("_", " ") for c in sorted(CLASSES)], OPENAI_IMAGENET_TEMPLATES)
    assert head.prototypes_.shape == (3, 16)
    assert np.abs(head.prototypes_ - T).max() < 1e-5
    assert head.temperature == pytest.approx(1 / scale) and scale == pytest.approx(1 / 0.07)  # open_clip's init
    z = meta["zeroshot"]
    assert z["templates"] == "imagenet" and z["n_templates"] == 80 and z["prompt_names"][2] == "tabby cat"
    assert z["example_prompts"][0] == "a bad photo of a dog."
    assert meta["config"]["backbone"] == clip["backbone"]  # the store's identity: predict can embed for it


def test_result_reports_accuracy_per_split_and_simple_templates(clip):
    import probe

    res = probe.zeroshot(clip["store"], templates="simple", device="cpu")  # the package's export
    assert isinstance(res, probe.ZeroShotResult)
    assert (res.n_templates, res.n_prompts) == (len(SIMPLE_IMAGENET_TEMPLATES), 3 * len(SIMPLE_IMAGENET_TEMPLATES))
    fs = FeatureStore(clip["store"])
    assert list(res.accuracy) == ["train", "val", "test"]
    for split, m in res.accuracy.items():
        y = fs.labels(split)
        assert m["n"] == len(y) == 12
        assert m["accuracy"] == pytest.approx(float((_zs_pred(fs.features(split), res.head.prototypes_) == y).mean()))
    assert res.out is None and res["classes"] == sorted(CLASSES)


def test_predict_and_eval_cli_use_the_head_unchanged(clip):
    fs = FeatureStore(clip["store"])
    head, meta = load_head(clip["head"])
    T, names = head.prototypes_, meta["class_names"]
    files = [str(fs.abspath(p)) for p in fs.paths("test")]
    r = runner.invoke(app, ["predict", *files, "--head", str(clip["head"]), "--engine", "torch", "--device", "cpu",
                            "--top-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    got = {p["path"]: p["top"][0]["class"] for p in json.loads(r.stdout)["predictions"]}
    want = dict(zip(files, (names[i] for i in _zs_pred(fs.features("test"), T))))
    assert got == want
    r = runner.invoke(app, ["eval", str(clip["store"]), "--head", str(clip["head"]), "--split", "test",
                            "--bootstrap", "0", "--png", str(clip["root"] / "cm.png"), "--json"])
    assert r.exit_code == 0, r.output
    acc = float((_zs_pred(fs.features("test"), T) == fs.labels("test")).mean())
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(acc)


def test_fewshot_compares_the_zeroshot_head_on_the_same_queries(clip, tmp_path):
    """`probe fewshot --compare zs.safetensors`: the zero-shot head answers each episode's queries among that
    episode's classes, with no support; checked against a loop over the same seeded episodes."""
    from probe.heads.fewshot import sample_episodes

    fs = FeatureStore(clip["store"])
    head, meta = load_head(clip["head"])
    r = runner.invoke(app, ["fewshot", str(clip["store"]), "--way", "2", "--shot", "1,2", "--query", "3",
                            "--episodes", "200", "--head", "both", "--compare", str(clip["head"]), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert [(x["head"], x["shot"], x["support"]) for x in res] == [
        ("prototype", 1, True), ("linear", 1, True), ("zs.safetensors", 1, False),
        ("prototype", 2, True), ("linear", 2, True), ("zs.safetensors", 2, False)]
    X, y = fs.features(), fs.labels()
    S = X / np.linalg.norm(X, axis=1, keepdims=True) @ head.prototypes_.T  # (N, C) cosine to each class prompt
    col = np.array([meta["class_names"].index(c) for c in fs.classes])[y]  # each row's head column
    for x in res[2::3]:
        sup, qry = sample_episodes(y, 2, x["shot"], 3, 200, seed=0)
        want = [np.mean([S[q, col[sup[e, :, 0]]].argmax() == w for w in range(2) for q in qry[e, w]])
                for e in range(200)]
        assert x["accuracy"] == pytest.approx(np.mean(want))
    assert 0 < res[2]["accuracy"] < 1  # random towers: neither trivially right nor wrong
    r = runner.invoke(app, ["fewshot", str(clip["store"]), "--way", "2", "--shot", "1", "--query", "3",
                            "--compare", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 1 and "missing.safetensors" in r.output and "does not exist" in r.output

@pytest.mark.slow  # a server in a child process
def test_serve_classifies_an_upload_with_the_zeroshot_head(clip):
    import httpx

    from probe.predict import predict
    from probe.serve.process import ServerProcess

    img = sorted((clip["data"] / "test" / "red_fox").glob("*.png"))[0]
    srv = ServerProcess(["--head", f"zs={clip['head']}", "--engine", "torch", "--device", "cpu",
                         "--state-dir", str(clip["root"] / "state"), "--log-level", "warning"])
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            models = c.get("/models").json()
            assert models["backbone"]["name"] == clip["backbone"]
            assert [(h["name"], h["classes"]) for h in models["heads"]] == [("zs", sorted(CLASSES))]
            r = c.post("/heads/zs/classify?k=3", files={"file": (img.name, img.read_bytes(), "image/png")})
    finally:
        srv.close()
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    expected = predict([img], clip["head"], top_k=3, device="cpu", engine="torch")["predictions"][0]["top"]
    assert [t["class"] for t in top] == [t["class"] for t in expected]
    assert np.allclose([t["probability"] for t in top], [t["probability"] for t in expected], atol=1e-4)


# ------------------------------------------------------------------------------------- class names / templates
def test_template_file_and_explicit_classes(clip, tmp_path):
    f = tmp_path / "templates.txt"
    f.write_text("# mine\na photo of a {}.\n\n{} {{in braces}}, a {}\n")
    res = zeroshot(clip["store"], ["dog", "tabby_cat", "red_fox"], templates=f, device="cpu")
    assert res.templates == str(f) and res.n_templates == 2 and res.prompt_names == ["dog", "tabby_cat", "red_fox"]
    assert res.example_prompts == ["a photo of a dog.", "dog {{in braces}}, a dog"]  # only {} is the slot
    T, _ = _reference(clip["model"], ["dog", "tabby_cat", "red_fox"], ["a photo of a {}.", "{} {{in braces}}, a {}"])
    assert np.abs(res.head.prototypes_ - T).max() < 1e-5
    assert set(res.accuracy) == {"train", "val", "test"}  # the given names cover the store's classes
    names = tmp_path / "classes.txt"
    names.write_text("dog\ncat\n\n")
    r = runner.invoke(app, ["zeroshot", str(clip["store"]), "--classes-file", str(names), "--templates", str(f),
                            "--out", str(tmp_path / "h.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "2 classes x 2 templates" in r.output and "no accuracy: the store's classes" in r.output
    assert load_head(tmp_path / "h.safetensors")[1]["class_names"] == ["dog", "cat"]


def test_refusals_are_one_clear_line(clip, tiny_store, tmp_path):
    with pytest.raises(ProbeError, match=r"backbone timm/test_vit, which has no text tower: zero-shot needs a store "
                                         r"extracted with clip/<model>:<pretrained>"):
        zeroshot(tiny_store)
    for classes in ([], [" ", ""]):
        with pytest.raises(ProbeError, match="empty class list"):
            zeroshot(clip["store"], classes)
    with pytest.raises(ProbeError, match="class names repeat: 'dog'"):
        zeroshot(clip["store"], ["dog", "dog"])
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}.\n\na photo without a slot\n")
    with pytest.raises(ProbeError, match=rf"template file '{bad}' line 3: 'a photo without a slot' has no {{}}"):
        zeroshot(clip["store"], templates=bad)
    with pytest.raises(ProbeError, match="template file 'nope.txt' does not exist: templates are imagenet, simple"):
        zeroshot(clip["store"], templates="nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ProbeError, match="has no templates"):
        zeroshot(clip["store"], templates=tmp_path / "empty.txt")
    unlabelled = tmp_path / "flat"
    for k in range(3):
        make_image(unlabelled / f"img_{k}.png", seed=k)
    flat = _extract(unlabelled, tmp_path / "flat.h5", clip["backbone"])
    with pytest.raises(ProbeError, match="has no classes \\(its images are unlabelled\\)"):
        zeroshot(flat)
    with pytest.raises(ProbeError, match="linear-probe comparison needs the store's labels: the store has no labelled"):
        zeroshot(flat, ["a", "b"], templates="simple", linear=True)
    out = str(tmp_path / "h.safetensors")
    for args, msg in (([], "give the class names one way"),
                      (["--classes-from-store", "--classes", "a,b"], "(got --classes-from-store and --classes)"),
                      (["--classes", ","], "empty class list")):
        r = runner.invoke(app, ["zeroshot", str(clip["store"]), *args, "--out", out])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["zeroshot", str(tiny_store), "--classes-from-store", "--out", out])
    assert r.exit_code == 1 and r.output.startswith("error: store ") and "clip/<model>:<pretrained>" in r.output
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------- the anchored probe
def test_anchor_small_C_keeps_the_zeroshot_head_large_C_gives_the_plain_probe():
    rng = np.random.default_rng(0)
    K, D, temperature = 3, 16, 0.07
    T = rng.normal(size=(K, D))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    zs = PrototypeHead.from_prototypes(T, metric="cosine", norm="l2", temperature=temperature)
    anchor = (T / temperature, np.zeros(K))
    y = np.repeat(np.arange(K), 60)
    X = (T[y] + 0.6 * rng.normal(size=(len(y), D))).astype(np.float32)  # overlapping classes: a finite MLE
    Xq = (T[np.arange(300) % K] + 0.6 * rng.normal(size=(300, D))).astype(np.float32)
    tiny = LinearHead(norm="l2", C=1e-8, device="cpu").fit(X, y, anchor=anchor)
    assert np.abs(tiny.coef_ - anchor[0]).max() < 1e-3 * np.abs(anchor[0]).max()  # the zero-shot weights kept
    assert (tiny.predict(Xq) == zs.predict(Xq)).all()
    plain = LinearHead(norm="l2", C=1e6, device="cpu").fit(X, y)
    huge = LinearHead(norm="l2", C=1e6, device="cpu").fit(X, y, anchor=anchor)
    assert (huge.predict(Xq) == plain.predict(Xq)).mean() >= 0.99

    def gap(W: np.ndarray) -> float:  # softmax weights are defined up to a row shared by all classes: centre them
        return float(np.linalg.norm((W - W.mean(0)) - (plain.coef_ - plain.coef_.mean(0)))
                     / np.linalg.norm(plain.coef_ - plain.coef_.mean(0)))

    assert gap(huge.coef_) < 0.05 and gap(anchor[0]) > 0.3  # the plain probe's weights, not the anchor's
    assert (zs.predict(Xq) != plain.predict(Xq)).mean() > 0.05  # so the two limits are different heads


def test_linear_comparison_cli_writes_the_anchored_head(clip, tmp_path):
    lin = tmp_path / "anchored.safetensors"
    r = runner.invoke(app, ["zeroshot", str(clip["store"]), "--classes-from-store", "--templates", "simple",
                            "--out", str(tmp_path / "zs.safetensors"), "--linear-out", str(lin), "--device", "cpu",
                            "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["linear"]
    assert (s["scored_on"], s["n_train"], s["n_scored"], s["C_chosen_on"]) == ("test", 12, 12, "val")
    fs = FeatureStore(clip["store"])
    zs, _ = load_head(tmp_path / "zs.safetensors")
    X, y = fs.features("test"), fs.labels("test")
    assert s["accuracy"]["zeroshot"] == pytest.approx(float((zs.predict(X) == y).mean()))
    head, meta = load_head(lin)
    assert head.kind == "linear" and head.norm == "l2" and meta["fit"]["C"] == s["C"]["anchored"]
    assert s["accuracy"]["anchored"] == pytest.approx(float((head.predict(X) == y).mean()))
    assert meta["class_names"] == sorted(CLASSES) and s["out"] == str(lin)
