"""Outputs that cannot be written (a folder where the file goes, a file where a folder goes, a read-only
filesystem, /proc): one line `error: cannot write 'X': why`, exit 1, never a traceback, nothing earlier changed
and no temp files left. Also: inputs that are folders, an engine cache that cannot be made, finetune's progress bar."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from torch import nn

from probe.engine import EngineUnavailable, TorchEngine, create_engine
from probe.errors import ProbeError
from probe.finetune import FinetuneConfig, finetune
from probe.fs import UnwritableError, atomic_paths, make_dirs, write_bytes_atomic
from probe.heads import load_head
from probe.heads.fit import fit_head
from probe.store import FeatureStore

from .conftest import TINY, make_imagefolder
from .test_faults_artefacts import one_line_error, run


@pytest.fixture
def blocked(tmp_path) -> tuple[Path, Path]:
    """(a folder with a file in it, a regular file): neither may change."""
    folder, afile = tmp_path / "adir.out", tmp_path / "afile"
    folder.mkdir()
    (folder / "keep").write_text("k")
    afile.write_text("x")
    return folder, afile


def unchanged(tmp_path: Path, folder: Path, afile: Path) -> None:
    assert afile.read_text() == "x" and [p.name for p in folder.iterdir()] == ["keep"]
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*"))


@pytest.fixture(scope="module")
def head(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "h.safetensors"
    fit_head(tiny_store, "knn", out)
    return out


# ------------------------------------------------------------------------------------------ files
def test_a_file_output_that_is_a_folder_or_under_a_file(tiny_store, head, tmp_path, blocked):
    folder, afile = blocked
    image = next(Path(FeatureStore(tiny_store).root).rglob("*.png"))
    cases = [
        (["fit-head", tiny_store, "--head", "knn", "--out", folder], folder, "it is a folder, expected a file"),
        (["fit-head", tiny_store, "--head", "knn", "--out", afile / "h.safetensors"], afile / "h.safetensors",
         f"'{afile}' is a file, not a folder"),
        (["index", tiny_store, "--out", afile / "i.faiss"], afile / "i.faiss", f"'{afile}' is a file, not a folder"),
        (["merge", tiny_store, "--out", afile / "m.h5"], afile / "m.h5", f"'{afile}' is a file, not a folder"),
        (["eval", tiny_store, "--head", head, "--split", "val", "--bootstrap", "0", "--png", afile / "cm.png"],
         afile / "cm.png", "is a file, not a folder"),
        (["map", tiny_store, "--out", folder, "--method", "pca"], folder, "it is a folder"),
        (["predict", image, "--head", head, "--csv", folder], folder, "it is a folder"),
    ]
    for args, named, why in cases:
        line = one_line_error(run(*args), f"cannot write '{named}'", why)
        assert "no space" not in line
        unchanged(tmp_path, folder, afile)


def test_a_folder_output_under_a_file(tmp_path, blocked):
    folder, afile = blocked
    data = make_imagefolder(tmp_path / "data", per_class=2, splits=("train", "val"))
    tiny = ["--backbone", TINY, "--weights", "random", "--epochs", "1", "--workers", "0"]
    for args in (["finetune", data, "--out", afile, *tiny], ["compare", data, "--out", afile, *tiny],
                 ["sweep", data, "--backbones", TINY, "--weights", "random", "--heads", "knn", "--workers", "0",
                  "--out", afile], ["demo", "--out-dir", afile]):
        one_line_error(run(*args), f"cannot write '{afile}': it is a file, not a folder")
        unchanged(tmp_path, folder, afile)
    one_line_error(run("finetune", data, "--out", afile / "run", *tiny), f"cannot write '{afile / 'run'}'",
                   f"'{afile}' is a file, not a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_a_pseudo_filesystem_is_not_a_full_disk(tiny_store):
    line = one_line_error(run("fit-head", tiny_store, "--head", "knn", "--out", "/proc/x.safetensors"),
                          "cannot write '/proc/x.safetensors'")
    assert "no space" not in line and "free" not in line


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A real read-only filesystem (a tmpfs mounted ro; root only) -- root ignores a folder's permission bits."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if got.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_filesystem(tiny_store, read_only):
    for out in (read_only / "h.safetensors", read_only / "sub" / "h.safetensors"):
        one_line_error(run("fit-head", tiny_store, "--head", "knn", "--out", out), f"cannot write '{out}'",
                       "Read-only file system")
    one_line_error(run("index", tiny_store, "--out", read_only / "i.faiss"), "Read-only file system")
    with pytest.raises(UnwritableError, match="Read-only") as e:
        make_dirs(read_only / "d")
    assert isinstance(e.value, ProbeError) and isinstance(e.value, OSError) and e.value.filename == str(
        read_only / "d")


def test_atomic_writes_check_every_path_before_the_body(tmp_path, blocked):
    folder, afile = blocked
    ran = []
    with pytest.raises(UnwritableError, match=f"cannot write '{afile / 'b'}'"):
        with atomic_paths([tmp_path / "a", afile / "b"]):
            ran.append(True)
    assert not ran and not (tmp_path / "a").exists()
    with pytest.raises(UnwritableError, match="it is a folder"):
        write_bytes_atomic(folder, b"page")
    unchanged(tmp_path, folder, afile)
    assert write_bytes_atomic(tmp_path / "new" / "x", b"ok").read_bytes() == b"ok"  # folders are still made


# ------------------------------------------------------------------------------------------ inputs
def test_inputs_that_are_folders(tiny_store, tmp_path, blocked):
    folder, _ = blocked
    one_line_error(run("info", folder), f"'{folder}' is a folder, expected a file")
    data = make_imagefolder(tmp_path / "data", per_class=1)
    one_line_error(run("extract", data, "--out", folder, "--backbone", TINY, "--weights", "random", "--workers", "0"),
                   f"'{folder}' is a folder, expected a file")
    with pytest.raises(ProbeError, match="is a folder, expected a file"):
        load_head(folder)


# ------------------------------------------------------------------------------------------ engine cache
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def test_an_engine_cache_that_cannot_be_made(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("PROBE_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    Path("cache").write_text("x")  # cache/engines cannot be made
    with pytest.raises(EngineUnavailable, match="'cache' is a file, not a folder") as e:
        create_engine("onnxruntime", Small().eval(), "f" * 64, (16, 16))
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="probe.engine"):
        assert isinstance(create_engine("auto", Small().eval(), "f" * 64, (16, 16)), TorchEngine)
    assert len(caplog.records) == 1 and "running the backbone in torch" in caplog.text
    assert Path("cache").read_text() == "x" and os.listdir(".") == ["cache"]


# ------------------------------------------------------------------------------------------ finetune progress
def test_finetune_draws_a_progress_bar_only_when_asked(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "val"))
    cfg = FinetuneConfig(backbone="timm/test_resnet", weights="random", epochs=1, batch_size=4, workers=0)
    finetune(data, tmp_path / "quiet", cfg)
    assert "epoch 1/1" not in capsys.readouterr().err
    finetune(data, tmp_path / "shown", cfg, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "2/2" in err and "batch" in err  # 9 train images, 2 full batches of 4


def test_two_writers_of_one_path_each_rename_their_own_complete_file(tmp_path):
    """Each write has its own temp file: two overlapping writers of one path both finish, the file is one of
    theirs whole (the last rename wins), never a mix, and no temp file is left."""
    import threading

    out, entered, release = tmp_path / "x.bin", threading.Barrier(2), threading.Event()

    def write(byte: bytes) -> None:
        with atomic_paths([out]) as (tmp,):
            tmp.write_bytes(byte * 500)
            entered.wait()  # both temp files half written at once
            release.wait()
            with open(tmp, "ab") as f:
                f.write(byte * 500)

    threads = [threading.Thread(target=write, args=(b,)) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert out.read_bytes() in (b"a" * 1000, b"b" * 1000) and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_an_extract_refused_for_space_leaves_no_new_folder(tmp_path, small_disk):
    """The folders `probe extract --out new/sub/s.h5` makes go again when the run is refused before writing."""
    data = make_imagefolder(tmp_path / "data", per_class=2)
    disk = small_disk("64k")  # less than the store's first chunk of features (256 KiB)
    (disk / "old").mkdir()
    tiny = ["--backbone", TINY, "--weights", "random", "--batch-size", "4", "--workers", "0", "--engine", "torch"]
    for out in (disk / "new/sub/s.h5", disk / "old/sub/s.h5"):
        one_line_error(run("extract", data, "--out", out, *tiny), str(out), "checked before embedding 6 images")
        assert sorted(os.listdir(disk)) == ["old"] and os.listdir(disk / "old") == []  # a folder it found stays


def test_new_folders_keep_what_was_written_into(tmp_path):
    from probe.fs import new_folders

    with pytest.raises(KeyboardInterrupt), new_folders(tmp_path / "a/b/c") as made:
        (made.parent / "journal").write_text("j")  # an interrupted run's work, to resume from
        raise KeyboardInterrupt
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["a", "a/b", "a/b/journal"]
