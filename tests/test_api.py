"""The Python API a notebook user guesses: `import probe`, objects in, objects out, no file unless asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import DEMO


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_import_probe_is_cheap_and_lists_the_objects():
    code = "import sys, probe; print('torch' in sys.modules, len(probe.__all__)); probe.LinearHead"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and int(out[1]) >= 20  # torch is imported only when a backbone is needed
    import probe

    for name in ("create_backbone", "Embedder", "FeatureStore", "LinearHead", "save_head", "SearchIndex",
                 "evaluate", "extract", "fit_head", "FeatureIdentity", "ProbeError"):
        assert getattr(probe, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe.nope  # noqa: B018


@pytest.mark.slow
def test_notebook_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python example, line for line, on real images with the packaged ImageNet weights."""
    import probe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROBE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"  # 3 classes x (12 train + 4 val + 4 test) real Fashion-MNIST images
    for cls in ("Bag", "Sandal", "Trouser"):
        files = sorted((DEMO / "train" / cls).glob("*.png"))[:12] + sorted((DEMO / "val" / cls).glob("*.png"))[:8]
        for split, chunk in (("train", files[:12]), ("val", files[12:16]), ("test", files[16:])):
            (data / split / cls).mkdir(parents=True)
            for f in chunk:
                (data / split / cls / f.name).write_bytes(f.read_bytes())
    query = data / "test" / "Bag" / sorted(os.listdir(data / "test" / "Bag"))[0]
    probe.extract(data, "cache/x.h5", probe.ExtractConfig(workers=0))
    before = _files(tmp_path)

    # ---- as in the README
    bb = probe.create_backbone("efficientnet_lite0")
    emb = probe.Embedder(bb)                                # images / files / folders -> (N, D) float32
    store = probe.FeatureStore("cache/x.h5")
    X, y = store.features("train"), store.labels("train")
    head = probe.LinearHead().fit(X, y, eval_set=(store.features("val"), store.labels("val")))
    idx = probe.SearchIndex.from_arrays(X, paths=store.paths("train"), labels=y)
    scores, ids = idx.search(emb.embed_files([str(query)])[0], k=5)
    report = probe.evaluate(head, store.features("test"), store.labels("test"))
    report.accuracy, report.per_class  # noqa: B018 - the README's last line, but its PNG (below: after the head)
    # ----

    assert _files(tmp_path) == before  # nothing written that was not asked for
    assert X.shape == (36, 1280) and X.dtype == np.float32
    assert report.accuracy >= 0.8 and report.n == 12 and report["accuracy"] == report.accuracy
    assert ids.shape == (1, 5)
    assert store.classes[y[ids[0, 0]]] == "Bag"  # a real bag's nearest training image is a bag
    # the query embedded in the notebook equals the one stored by extract (same backbone, same preprocessing)
    q = emb.embed_files([str(query)])[0][0]
    stored = store.features("test")[list(store.paths("test")).index(str(query.relative_to(data)))]
    assert float(q @ stored / np.linalg.norm(q) / np.linalg.norm(stored)) > 0.999

    probe.save_head(head, "h.safetensors", identity=store.identity)   # optional: now a file, and only that one
    assert _files(tmp_path) == before | {"h.safetensors"}
    loaded, meta = probe.load_head("h.safetensors")
    assert meta["config_key"] == store.feature_key and meta["class_names"] == ["0", "1", "2"]
    probe.save_head(head, "h.safetensors", identity=store.identity, classes=store.classes)  # named columns
    assert probe.load_head("h.safetensors")[1]["class_names"] == ["Bag", "Sandal", "Trouser"]
    report.confusion_png("cm.png")
    assert _files(tmp_path) == before | {"h.safetensors", "cm.png"}
    assert probe.evaluate_store(store, "h.safetensors", split="test").accuracy == report.accuracy
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-5, atol=1e-6)


def test_fit_head_takes_head_objects_and_writes_only_when_asked(tmp_path):
    import probe

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(3 * c, 1.0, (30, 8)) for c in range(3)]).astype(np.float32)
    y = np.repeat(np.arange(3), 30)
    store = probe.store_from_arrays(tmp_path / "s.h5", X, y, splits=(["train"] * 20 + ["val"] * 10) * 3,
                                    classes=["a", "b", "c"])
    before = _files(tmp_path)
    fit = probe.fit_head(store, probe.PrototypeHead(metric="euclidean"))
    assert _files(tmp_path) == before and fit.out is None
    assert fit.head.metric == "euclidean" and fit.class_names == ["a", "b", "c"] and fit.val["accuracy"] > 0.9
    fit = probe.fit_head(store, probe.LinearHead(n_Cs=5), out=tmp_path / "h.safetensors", shots=5)
    assert fit.n_train == 15 and fit.out and Path(fit.out).is_file() and fit["n_train"] == 15
    with pytest.raises(probe.ProbeError, match="shots must be >= 1"):
        probe.fit_head(store, "linear", shots=0)
    other = probe.store_from_arrays(tmp_path / "o.h5", X, y, classes=["a", "b", "c"],
                                    config={"backbone": "resnet50", "weights": "x", "weights_sha256": "y"})
    with pytest.raises(probe.IdentityMismatchError, match="backbone: head has 'arrays', store 'resnet50'"):
        probe.evaluate_store(other, tmp_path / "h.safetensors", split=None)


def test_cli_prints_user_errors_in_one_line_and_shows_bugs():
    import typer
    from typer.testing import CliRunner

    from cli.app import handles_errors
    from probe.errors import ProbeError

    app = typer.Typer()

    @app.command()
    @handles_errors
    def run(kind: str) -> None:
        if kind == "user":
            raise ProbeError("shots must be >= 1 images per class, got 0")
        raise KeyError("a bug")

    r = CliRunner().invoke(app, ["user"])
    assert r.exit_code == 1 and r.output == "error: --shots must be >= 1 images per class, got 0\n"
    r = CliRunner().invoke(app, ["bug"])
    assert r.exit_code == 2 and "Traceback" in r.output and "KeyError: 'a bug'" in r.output
    assert "this is a bug in probe" in r.output


def test_cli_bad_engine_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["extract", str(tmp_path), "--engine", "tensorrt"])
    assert r.exit_code == 1 and r.output.startswith("error: unknown engine 'tensorrt'") and r.output.count("\n") == 1


def test_help_lists_each_command_by_its_summary_and_joins_wrapped_lines():
    from typer.testing import CliRunner

    from cli.main import app

    for command in app.registered_commands:  # the first paragraph is the summary `probe --help` lists
        summary, *_ = command.help.split("\n\n")
        assert "\n" not in command.help.replace("\n\n", "") and len(summary) <= 110, command.callback.__name__
    out = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
    assert "per-class precision/recall/F1 and a confusion-matrix PNG; for a multi-label head" in out


def test_each_flag_a_message_is_mapped_to_is_an_option_a_user_can_type():
    import typer.main

    from cli.app import FLAGS, QUOTED_FLAGS, as_flags
    from cli.main import app

    group = typer.main.get_command(app)
    options = {o for c in group.commands.values() for p in c.params for o in p.opts}
    assert set(FLAGS.values()) | set(QUOTED_FLAGS.values()) <= options  # "--n-cs" was refused by fit-head
    assert as_flags("n_Cs must be >= 2") == "--n-Cs must be >= 2"
    assert as_flags("balanced accuracy; leave `balanced` off; pass `reject` none") == (
        "balanced accuracy; leave --balanced off; pass --reject none")


def test_predict_draws_a_progress_bar_only_when_asked(tmp_path, capsys):
    from probe.extract import extract
    from probe.heads.fit import fit_head
    from probe.predict import predict

    from .conftest import make_imagefolder, tiny_config

    data = make_imagefolder(tmp_path / "data", per_class=3)
    extract(data, tmp_path / "s.h5", tiny_config())
    fit_head(tmp_path / "s.h5", "prototype", tmp_path / "h.safetensors")
    capsys.readouterr()
    quiet = predict([data], tmp_path / "h.safetensors")
    assert capsys.readouterr().err == ""  # a notebook's default: no bar
    loud = predict([data], tmp_path / "h.safetensors", progress=True)
    err = capsys.readouterr().err
    assert "9/9" in err and "img" in err and loud["predictions"] == quiet["predictions"]
