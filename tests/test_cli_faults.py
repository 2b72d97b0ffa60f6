"""Bad input and faults at the CLI (audit): an output path that is one of the command's inputs, a non-integer --shot,
a port already in use, a figure suffix matplotlib cannot write, a --bootstrap too large to keep. Each gives one line
`error: ...` naming the path or value and exit 1, never a traceback, and leaves every input byte for byte."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from probe.errors import ProbeError
from probe.heads.evaluate import bootstrap_intervals, classification_stats, confusion_png
from probe.store import FeatureStore

from .test_faults_artefacts import one_line_error, run


@pytest.fixture(scope="module")
def artefacts(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny store, a prototype head and a flat index of it: inputs the tests may try to overwrite."""
    where = tmp_path_factory.mktemp("faults")
    store = Path(shutil.copy(tiny_store, where / "s.h5"))
    for args in (("fit-head", store, "--head", "prototype", "--out", where / "h.safetensors"),
                 ("index", store, "--out", where / "i.faiss")):
        assert run(*args).exit_code == 0
    return {"store": store, "head": where / "h.safetensors", "index": where / "i.faiss",
            "sidecar": where / "i.faiss.json"}


def test_outputs_that_are_inputs_are_refused(artefacts, tmp_path):
    store, head, index = artefacts["store"], artefacts["head"], artefacts["index"]
    image = FeatureStore(store).root / FeatureStore(store).paths()[0]  # read by map's, doctor's and search's pages
    query = Path(shutil.copytree(image.parent, tmp_path / "queries"))  # a folder of query images: its images are inputs
    link = tmp_path / "link.h5"
    link.symlink_to(store)  # another spelling of the same file
    before = {p: p.read_bytes() for p in (store, head, index, artefacts["sidecar"], image, query / image.name)}
    cases = [(("fit-head", store, "--out", store), store), (("fit-head", store, "--out", link), link),
             (("index", store, "--out", store), store), (("map", store, "--out", store, "--method", "pca"), store),
             (("map", store, "--out", image, "--method", "pca"), image),
             (("doctor", store, "--folds", "2", "--out", store), store), (("doctor", store, "--out", image), image),
             (("eval", store, "--head", head, "--png", head), head),
             (("zeroshot", store, "--classes", "a,b", "--out", store), store),
             (("predict", image, "--head", head, "--csv", head), head),
             (("predict", query, "--head", head, "--csv", query / image.name), query / image.name),
             (("search", "0", "--index", index, "-k", "2", "--html", index), index),
             (("search", "0", "--index", index, "-k", "2", "--html", artefacts["sidecar"]), artefacts["sidecar"]),
             (("search", "0", "--index", index, "-k", "2", "--html", image), image)]  # row 0's own hit
    for args, named in cases:
        line = one_line_error(run(*args), str(named))
        assert "is one of this command's inputs" in line, (args, line)
    assert {p: p.read_bytes() for p in before} == before
    r = run("predict", query, "--head", head, "--csv", query / "rows.csv")  # not an image: the folder's own CSV
    assert r.exit_code == 0 and (query / "rows.csv").read_text().startswith("path,rank,class,probability"), r.output


def test_fewshot_shot_that_is_not_a_number(artefacts):
    one_line_error(run("fewshot", artefacts["store"], "--way", "3", "--shot", "abc", "--episodes", "5"),
                   "--shot", "'abc'")


def test_serve_on_a_port_in_use(artefacts):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = one_line_error(run("serve", "--head", artefacts["head"], "--port", port), str(port))  # no URL printed
    assert line == f"error: port {port} on 127.0.0.1 is already in use: choose another --port"


def test_eval_figure_suffix_matplotlib_cannot_write(artefacts, tmp_path):
    for name in ("cm.txt", "x.h5", "cm.pgf"):  # pgf: matplotlib lists it, but it needs LaTeX to write
        line = one_line_error(run("eval", artefacts["store"], "--head", artefacts["head"], "--split", "val",
                                  "--bootstrap", "0", "--png", tmp_path / name), str(tmp_path / name))
        known = line.split("ending in")[1]
        assert ".png" in known and ".pdf" in known and ".svg" in known and ".pgf" not in known
    assert not list(tmp_path.iterdir())  # nothing written, no reliability diagram either
    with pytest.raises(ProbeError, match="matplotlib cannot write .csv"):
        confusion_png([[1, 0], [0, 1]], ["a", "b"], tmp_path / "cm.csv")
    r = run("eval", artefacts["store"], "--head", artefacts["head"], "--split", "val", "--bootstrap", "0",
            "--png", tmp_path / "cm.svg")
    assert r.exit_code == 0 and (tmp_path / "cm.svg").read_text().lstrip().startswith("<?xml"), r.output
    from probe.heads.calibration import reliability_png

    reliability_png(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), tmp_path / "r.svg")  # its suffix's format
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


def test_bootstrap_resamples_are_bounded(artefacts):
    from probe.heads.evaluate import MAX_BOOTSTRAP

    one_line_error(run("eval", artefacts["store"], "--head", artefacts["head"], "--split", "val",
                       "--bootstrap", "100000000000"), "--bootstrap", "100000000000", "1,000,000")
    y = np.array([0, 1, 1, 0, 1])
    stats = classification_stats(y, y, 2)
    with pytest.raises(ProbeError, match=f"got {MAX_BOOTSTRAP + 1}"):
        bootstrap_intervals(stats, len(y), MAX_BOOTSTRAP + 1)
    assert bootstrap_intervals(stats, len(y), 100)["accuracy"] == [1.0, 1.0]


def test_hidden_folders_are_no_input_for_outputs_or_queries(tmp_path):
    from cli.app import refuse_overwriting_inputs
    from probe.data import images_in

    for rel in ("data/.res/sweep.png", "data/cat/a.png", "data/cat/.thumbs/t.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    refuse_overwriting_inputs([tmp_path / "data/.res/sweep.png"], [tmp_path / "data"])  # no command reads .res/
    with pytest.raises(ProbeError, match="an image in"):
        refuse_overwriting_inputs([tmp_path / "data/cat/a.png"], [tmp_path / "data"])
    assert images_in(tmp_path / "data") == [str(tmp_path / "data/cat/a.png")]  # as extract reads the folder


def test_text_outputs_over_an_image_that_is_no_input_are_refused(artefacts, tmp_path):
    store, head, index = artefacts["store"], artefacts["head"], artefacts["index"]
    image = FeatureStore(store).root / FeatureStore(store).paths()[0]
    photo = Path(shutil.copy(image, tmp_path / "holiday.JPG"))  # a picture the command does not read
    before = photo.read_bytes()
    for args in (("predict", image, "--head", head, "--csv", photo), ("doctor", store, "--out", photo),
                 ("map", store, "--out", photo, "--method", "pca"),
                 ("search", "0", "--index", index, "-k", "2", "--html", photo)):
        line = one_line_error(run(*args), str(photo))
        assert "is an image (.JPG file): writing text there would destroy it" in line, (args, line)
    assert photo.read_bytes() == before and sorted(tmp_path.iterdir()) == [photo]
    chart = tmp_path / "cm.png"  # a chart over an old chart is what --png asks for
    for _ in range(2):
        r = run("eval", store, "--head", head, "--split", "val", "--bootstrap", "0", "--png", chart)
        assert r.exit_code == 0 and chart.read_bytes().startswith(b"\x89PNG"), r.output
