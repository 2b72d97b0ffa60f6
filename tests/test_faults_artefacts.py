"""Faults in the artefacts probe writes besides stores (issue 13): heads, search indexes (and their shards and
sidecars), fine-tune checkpoints and few-shot sets. Damaged files give one line naming the file, never a wrong
answer; a full disk gives one line naming the file and the space, keeps the previous output byte for byte and
leaves no temp files. Real files throughout; the full disk is a real tmpfs (``small_disk``, root only)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from probe.errors import DiskFullError, IntegrityError, ProbeError
from probe.heads import load_head
from probe.heads.fit import fit_head
from probe.search import SearchIndex
from probe.store import store_from_arrays

from .conftest import fill_disk, make_image, make_imagefolder

runner = CliRunner()


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, *names: str) -> str:
    """The output of a command that failed as a user error: exit 1, one line 'error: …' naming ``names``."""
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and all(n in lines[0] for n in names), r.output
    return lines[0]


def flip(path: Path, at: int | None = None, n: int = 100) -> None:
    """Invert ``n`` bytes of ``path`` centred on ``at`` (default: the middle of the file)."""
    b = bytearray(path.read_bytes())
    at, n = len(b) // 2 if at is None else at, min(n, len(b) // 2)  # a sharded index's template is ~100 bytes
    for i in range(at - n // 2, at + n // 2):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "filler"}


def no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.tmp")], list(folder.rglob("*"))


# ------------------------------------------------------------------------------------------------- heads
@pytest.fixture(scope="module")
def head_file(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "knn.safetensors"  # knn keeps its training rows: tensors dominate
    fit_head(tiny_store, "knn", out)
    return out


def test_damaged_head_is_refused_by_load_and_predict(head_file, tmp_path):
    head = tmp_path / "h.safetensors"
    shutil.copy(head_file, head)
    start = 8 + struct.unpack("<Q", head.read_bytes()[:8])[0]  # safetensors: header length, header, tensor data
    flip(head, at=(start + head.stat().st_size) // 2)  # the middle of the tensor data
    with pytest.raises(IntegrityError, match=r"h\.safetensors.* is damaged: its tensors .*probe fit-head"):
        load_head(head)
    img = make_image(tmp_path / "x.png", seed=1)
    one_line_error(run("predict", img, "--head", head), "h.safetensors", "damaged")
    shutil.copy(head_file, head)  # the same file undamaged predicts
    assert run("predict", img, "--head", head).exit_code == 0
    flip(head, at=200, n=40)  # inside the JSON header
    one_line_error(run("predict", img, "--head", head), "h.safetensors", "fit it again")


def test_fit_head_shots_beyond_the_smallest_class(tiny_store, tmp_path):
    # tiny_store: 6 train images per class; asking for more must not report "1000 shots/class" and use 6
    line = one_line_error(run("fit-head", tiny_store, "--out", tmp_path / "h.safetensors", "--shots", "1000"),
                          "--shots=1000", "'cat'", "6 images", "--shots <= 6")
    assert "train split" in line and not (tmp_path / "h.safetensors").exists()
    assert fit_head(tiny_store, "prototype", shots=6).n_train == 18


def test_fit_head_on_a_full_disk_keeps_the_old_head(tiny_store, small_disk):
    disk = small_disk("3m")
    out = disk / "h.safetensors"
    assert run("fit-head", tiny_store, "--head", "knn", "--out", out).exit_code == 0
    before = snapshot(disk)
    fill_disk(disk, leave=2048)
    line = one_line_error(run("fit-head", tiny_store, "--head", "knn", "--k", "5", "--out", out),
                          "no space left", "h.safetensors", "free")
    assert "needs about" in line
    one_line_error(run("eval", tiny_store, "--head", out, "--png", disk / "cm.png"), "no space left", "cm.png")
    assert snapshot(disk) == before
    no_temp_files(disk)


# ----------------------------------------------------------------------------------------------- indexes
@pytest.fixture(scope="module")
def vectors_store(tmp_path_factory) -> Path:
    x = np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32)
    return store_from_arrays(tmp_path_factory.mktemp("vec") / "v.h5", x, np.arange(600) % 3,
                             classes=["a", "b", "c"]).path


@pytest.mark.parametrize("damaged", ["i.faiss", "i.faiss.shard-1"])
def test_damaged_index_file_is_refused(vectors_store, tmp_path, damaged):
    index = tmp_path / "i.faiss"
    assert run("index", vectors_store, "--out", index, "--shards", "3").exit_code == 0
    assert run("search", "0", "--index", index, "-k", "3").exit_code == 0
    flip(tmp_path / damaged)
    with pytest.raises(IntegrityError, match=rf"{damaged}' is damaged: its bytes .*probe index"):
        SearchIndex.load(index)
    one_line_error(run("search", "0", "--index", index, "-k", "3"), damaged, "damaged", "rebuild the index")


def test_damaged_single_index(vectors_store, tmp_path):
    index = tmp_path / "one.faiss"
    assert run("index", vectors_store, "--out", index).exit_code == 0
    flip(index)
    one_line_error(run("search", "0", "--index", index), "one.faiss'", "damaged")


@pytest.mark.parametrize("garbage", [os.urandom(300), b'{"format": "probe-search-index", ', b"[1, 2]"],
                         ids=["binary", "truncated", "not-an-object"])
def test_garbage_sidecar_names_it(vectors_store, tmp_path, garbage):
    index = tmp_path / "i.faiss"
    assert run("index", vectors_store, "--out", index).exit_code == 0
    (tmp_path / "i.faiss.json").write_bytes(garbage)
    one_line_error(run("search", "0", "--index", index), "i.faiss.json", "rebuild the index")


def test_edited_sidecar_is_refused(vectors_store, tmp_path):
    index = tmp_path / "i.faiss"
    assert run("index", vectors_store, "--out", index).exit_code == 0
    side = tmp_path / "i.faiss.json"
    meta = json.loads(side.read_text())
    meta["labels"][0] = 2  # valid JSON, wrong content: hits would be mislabelled
    side.write_text(json.dumps(meta))
    one_line_error(run("search", "0", "--index", index), "i.faiss.json", "its contents", "damaged")


def test_interrupted_save_leaves_the_old_index_and_no_temp_files(vectors_store, tmp_path, monkeypatch):
    import probe.search.index as index_module

    out = tmp_path / "i.faiss"
    assert run("index", vectors_store, "--out", out, "--shards", "2").exit_code == 0
    before = snapshot(tmp_path)
    idx = SearchIndex.load(out)

    def interrupt(meta):  # Ctrl-C after the FAISS files are written, before the sidecar
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "json_sha256", interrupt)
    with pytest.raises(KeyboardInterrupt):
        idx.save(out)
    assert snapshot(tmp_path) == before
    no_temp_files(tmp_path)


def test_renamed_index_still_loads(vectors_store, tmp_path):
    assert run("index", vectors_store, "--out", tmp_path / "i.faiss", "--shards", "2").exit_code == 0
    (tmp_path / "i.faiss").rename(tmp_path / "j.faiss")
    (tmp_path / "i.faiss.json").rename(tmp_path / "j.faiss.json")
    assert SearchIndex.load(tmp_path / "j.faiss").count == 600  # checksums are by role, not file name


def test_index_on_a_full_disk_keeps_the_old_index(vectors_store, small_disk):
    disk = small_disk("3m")
    out = disk / "i.faiss"
    assert run("index", vectors_store, "--out", out, "--shards", "2").exit_code == 0
    before = snapshot(disk)
    assert set(before) == {"i.faiss", "i.faiss.json", "i.faiss.shard-0", "i.faiss.shard-1"}
    fill_disk(disk, leave=16 * 1024)  # less than one shard (600 x 16 floats / 2 = 19 KiB)
    line = one_line_error(run("index", vectors_store, "--out", out, "--shards", "2"), "no space left", "i.faiss")
    assert "needs about" in line and "unchanged" in line
    assert snapshot(disk) == before
    no_temp_files(disk)
    assert SearchIndex.load(out).count == 600


# --------------------------------------------------------------------------------------------- finetune
TINY_FT = ["--backbone", "timm/test_resnet", "--weights", "random", "--batch-size", "4", "--workers", "0",
           "--lr", "0.01", "--strategy", "feature-extract"]


def _config(**kw):
    from probe.finetune import FinetuneConfig

    return FinetuneConfig(backbone="timm/test_resnet", weights="random", batch_size=4, workers=0, lr=0.01,
                          strategy="feature-extract", **kw)


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("ft") / "data", per_class=3, splits=("train", "val"))


@pytest.fixture(scope="module")
def ft_run(ft_data) -> Path:
    from probe.finetune import finetune

    run_dir = ft_data.parent / "run"
    finetune(ft_data, run_dir, _config(epochs=1))
    return run_dir


def test_damaged_checkpoints_are_refused(ft_run, ft_data, tmp_path):
    from probe.backbones import load_checkpoint

    best = tmp_path / "best.pt"
    shutil.copy(ft_run / "best.pt", best)
    load_checkpoint(best)  # undamaged: loads
    flip(best)
    with pytest.raises(ProbeError, match=r"best\.pt.*(damaged|cannot read)"):
        load_checkpoint(best)
    one_line_error(run("extract", ft_data, "--weights", best, "--out", tmp_path / "s.h5"), "best.pt")
    assert not (tmp_path / "s.h5").exists()

    run_dir = tmp_path / "run"
    shutil.copytree(ft_run, run_dir)
    flip(run_dir / "last.pt")
    one_line_error(run("finetune", ft_data, "--out", run_dir, "--epochs", "1", "--resume", *TINY_FT),
                   "last.pt", "damaged")


def test_finetune_on_a_full_disk_keeps_the_last_epoch(ft_data, small_disk):
    from probe.finetune import finetune

    disk = small_disk("16m")
    run_dir = disk / "run"

    class Stop(Exception):
        pass

    def stop(rec):
        raise Stop

    with pytest.raises(Stop):  # epoch 1 of 2 saved, then interrupted
        finetune(ft_data, run_dir, _config(epochs=2), on_epoch=stop)
    before = snapshot(run_dir)
    assert {"best.pt", "last.pt", "metrics.jsonl", "curves.png"} <= set(before)
    fill_disk(disk, leave=256 * 1024)
    line = one_line_error(run("finetune", ft_data, "--out", run_dir, "--epochs", "2", "--resume", *TINY_FT),
                          "no space left", "needs about", "--resume")
    assert "epoch 1" in line
    assert snapshot(run_dir) == before
    no_temp_files(disk)


# ---------------------------------------------------------------------------------------- few-shot sets
def test_damaged_fewshot_set_is_listed_and_refused(tmp_path):
    from probe.serve.errors import Conflict
    from probe.serve.fewshot_sets import FewShotSets

    sets = FewShotSets(tmp_path, config_key="k", backbone="bb", dim=64)
    sets.create("pets")
    rng = np.random.default_rng(0)
    for label in ["cat", "dog"] * 4:
        sets.add("pets", label, rng.normal(size=64))
    path = tmp_path / "fewshot" / "pets.npz"
    data = path.read_bytes()
    at = data.index(b"\x93NUMPY") + 200  # inside the features array (8 x 64 float32)
    flip(path, at=at, n=40)
    again = FewShotSets(tmp_path, config_key="k", backbone="bb", dim=64)  # a restarted server
    (listed,) = again.list()
    assert listed["name"] == "pets" and not listed["usable"] and "pets.npz" in listed["error"]
    with pytest.raises(Conflict, match=r"pets\.npz.*damaged"):
        again.classify("pets", rng.normal(size=64))
    with pytest.raises(Conflict, match="damaged"):
        again.create("pets")
    assert again.delete("pets")["deleted"] and not path.exists() and again.list() == []


def test_fewshot_add_on_a_full_disk_changes_nothing(small_disk):
    from probe.serve.fewshot_sets import FewShotSets

    disk = small_disk("3m")
    sets = FewShotSets(disk, config_key="k", backbone="bb", dim=64)
    sets.create("pets")
    sets.add("pets", "cat", np.ones(64))
    before = snapshot(disk / "fewshot")
    fill_disk(disk, leave=512)
    with pytest.raises(DiskFullError, match=r"pets\.npz"):
        sets.add("pets", "dog", np.zeros(64))
    assert sets.get("pets").labels == ["cat"] and snapshot(disk / "fewshot") == before
    no_temp_files(disk)


def test_served_fewshot_add_on_a_full_disk_is_507_and_changes_nothing(small_disk):
    """The real server with its state on a full disk: 507 Insufficient Storage with one line naming the set file
    (the server's disk, not the request, is at fault), the set as it was, no temp file; it keeps serving."""
    import io

    import httpx
    from PIL import Image

    from probe.serve.process import ServerProcess

    from .conftest import TINY

    disk = small_disk("3m")

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), seed * 40 % 256, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    srv = ServerProcess(["--backbone", TINY, "--weights", "random", "--engine", "torch", "--log-level", "warning",
                         "--state-dir", str(disk)])
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/fewshot/pets").status_code == 201
            r = c.post("/fewshot/pets/examples", files={"file": ("a.png", png(1), "image/png")}, data={"label": "cat"})
            assert r.status_code == 200, r.text
            before = snapshot(disk / "fewshot")
            fill_disk(disk, leave=512)
            r = c.post("/fewshot/pets/examples", files={"file": ("b.png", png(2), "image/png")}, data={"label": "dog"})
            assert r.status_code == 507, r.text
            detail = r.json()["detail"]
            assert "pets.npz" in detail and "no space left" in detail and "\n" not in detail, detail
            assert c.get("/fewshot/pets").json()["classes"] == {"cat": 1}
            assert snapshot(disk / "fewshot") == before
            no_temp_files(disk)
            assert c.get("/health").status_code == 200
        assert "Traceback" not in srv.output()
    finally:
        srv.close()
