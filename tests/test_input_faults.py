"""Bad input from an audit -- manifests that are not UTF-8, a folder given as a CSV, a mistyped split, a dangling
link among predicted images, NaN/inf options, absurd widths and episode counts -- each one line, exit 1."""

from __future__ import annotations

import math
import resource
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from probe.data import discover, images_in
from probe.errors import DatasetError, ProbeError
from probe.finetune.config import FinetuneConfig
from probe.heads.fewshot import sample_episodes
from probe.heads.fit import fit_head
from probe.heads.mlp import MLPHead, build_mlp
from probe.predict import predict
from probe.store import FeatureStore

from .conftest import make_image, make_imagefolder

runner = CliRunner()


def fails(*args: object, match: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1 and r.output.startswith("error: ") and match in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    make_image(tmp_path / "a.png", 1)
    make_image(tmp_path / "b.png", 2)
    return tmp_path


def test_latin1_and_binary_manifests_are_one_line_errors(manifest_dir):
    m = manifest_dir / "latin1.csv"
    m.write_bytes(b"path,label\na.png,caf\xe9\nb.png,dog\n")
    fails("extract", m, "--out", manifest_dir / "c.h5", "--workers", "0",
          match=f"error: {m}: not UTF-8 text (byte 0xe9 at line 2, offset 20)")
    garbage = manifest_dir / "garbage.csv"
    garbage.write_bytes((manifest_dir / "a.png").read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"garbage.csv: not UTF-8 text \(byte 0x89 at line 1, offset 0\)"):
        discover(garbage)


def test_manifest_at_url_not_utf8_and_with_bom(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/faults/a.png", make_image(tmp_path / "a.png", 3).read_bytes())
    fs.pipe("/faults/bad.csv", b"path,label\na.png,caf\xe9\n")
    fs.pipe("/faults/bom.csv", b"\xef\xbb\xbfpath,label\na.png,cat\n")
    try:
        with pytest.raises(DatasetError, match=r"bad.csv: not UTF-8 text \(byte 0xe9 at line 2"):
            discover("memory://faults/bad.csv")
        ds = discover("memory://faults/bom.csv")
        assert ds.paths == ["a.png"] and ds.classes == ["cat"] and ds.labels.tolist() == [0]
    finally:
        fs.rm("/faults", recursive=True)


def test_manifest_cell_past_csv_limit(manifest_dir):
    m = manifest_dir / "big.csv"
    m.write_text("path,label\na.png,cat\nb.png," + "x" * 200_000 + "\n")
    with pytest.raises(DatasetError, match=r"big.csv:3: not a CSV manifest \(field larger than field limit"):
        discover(m)


def test_excel_bom_manifest_is_read(manifest_dir):
    m = manifest_dir / "bom.csv"
    m.write_bytes(b"\xef\xbb\xbfpath,label,split\r\na.png,cat,train\r\nb.png,dog,Validation\r\n")
    ds = discover(m)
    assert ds.paths == ["a.png", "b.png"] and ds.classes == ["cat", "dog"] and ds.splits == ["train", "val"]


def test_layout_csv_on_a_folder(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=1)
    with pytest.raises(DatasetError, match="is a folder: --layout csv expects a .csv manifest"):
        discover(root, "csv")
    fails("extract", root, "--out", tmp_path / "l.h5", "--workers", "0", "--layout", "csv",
          match=f"error: '{root}' is a folder: --layout csv expects a .csv manifest")
    import fsspec

    from probe.sources import discover_source

    fsspec.filesystem("memory").pipe("/layoutcsv/folder/cat/a.png", (root / "cat" / "img_0.png").read_bytes())
    with pytest.raises(DatasetError, match="'/layoutcsv/folder' is a folder: --layout csv expects"):
        discover_source("memory://layoutcsv/folder", layout="csv")  # the same at a URL, no extra request


@pytest.mark.parametrize("cell", ["tset", "training", "all", "dev"])
def test_manifest_split_typo_is_refused(manifest_dir, cell):
    m = manifest_dir / "typo.csv"
    m.write_text(f"path,label,split\na.png,cat,{cell}\nb.png,dog,train\n")
    with pytest.raises(DatasetError, match=rf"typo.csv:2: split '{cell}': expected train, val \(valid/validation\), "
                                           "test or empty"):
        discover(m)


def test_manifest_split_names_accepted(manifest_dir):
    m = manifest_dir / "ok.csv"
    m.write_text("path,labels,split\na.png,cat,VALID\nb.png,dog| cat, \n")
    assert discover(m).splits == ["val", ""]


def test_images_in_keeps_a_dangling_link(tmp_path):
    make_image(tmp_path / "a.png", 1)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert images_in(tmp_path) == [str(tmp_path / n) for n in ("a.png", "gone.png", "loop.png")]


def test_predict_reports_a_dangling_link(tiny_store, tmp_path):
    head = fit_head(FeatureStore(tiny_store), "prototype", tmp_path / "h.safetensors").out
    folder = tmp_path / "photos"
    make_image(folder / "a.png", 1)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    r = predict([folder], head, device="cpu")
    assert [p["path"] for p in r["predictions"]] == [str(folder / "a.png")]
    assert r["skipped"] == [{"path": str(folder / "gone.png"),
                             "reason": f"dangling symbolic link to {tmp_path / 'nowhere.png'}"}]


@pytest.mark.parametrize("field", ["lr", "lr_mult", "weight_decay", "warmup_epochs", "label_smoothing",
                                   "grad_clip", "val_fraction"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_finetune_config_refuses_non_finite(field, value):
    with pytest.raises(ProbeError, match=f"^--{field.replace('_', '-')} must be a finite number, got {value}$"):
        FinetuneConfig(**{field: value})


def test_finetune_cli_nan_warmup(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=1)
    fails("finetune", root, "--out", tmp_path / "ftn", "--warmup-epochs", "nan", "--backbone", "resnet18",
          "--weights", "random", "--epochs", "1", "--workers", "0",
          match="error: --warmup-epochs must be a finite number, got nan")
    fails("finetune", root, "--out", tmp_path / "ftn", "--layout", "csv", "--backbone", "resnet18",
          "--weights", "random", "--epochs", "1", "--workers", "0", match="is a folder: --layout csv expects")


def test_finetune_config_negative_names_the_flag():
    with pytest.raises(ProbeError, match="^--grad-clip must be >= 0, got -1.0$"):
        FinetuneConfig(grad_clip=-1.0)


def test_mlp_width_is_bounded():
    X, y = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32), np.arange(12) % 2
    with pytest.raises(ProbeError, match="hidden layer width 99999999999 on 8-d input is a 8 x 99999999999 weight"):
        MLPHead(hidden=(99999999999,), epochs=1).fit(X, y)
    with pytest.raises(ProbeError, match=r"width 100000000 on 16-d input .* limit of 268,435,456 weights"):
        MLPHead(hidden=(16, 100_000_000), epochs=1).fit(X, y)
    with pytest.raises(ProbeError, match=r"^cannot allocate an MLP with hidden widths \[99999999999\] on 512-d "):
        build_mlp(512, (99999999999,), 3, 0.5)


def test_fit_head_cli_huge_hidden(tiny_store, tmp_path):
    fails("fit-head", tiny_store, "--out", tmp_path / "x.safetensors", "--head", "mlp", "--hidden", "99999999999",
          "--epochs", "1", match="error: hidden layer width 99999999999 on 64-d input")


@contextmanager
def address_space_cap(extra: int):
    """At most ``extra`` more bytes of address space inside the block: a runaway allocation is a MemoryError there,
    not a machine out of memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_fewshot_episodes_are_bounded(tiny_store):
    y = np.arange(30) % 3
    with pytest.raises(ProbeError, match=r"^--episodes 100000000000 is too many for --way 3, --shot 1, --query 2: "
                                         r"at most 11,111,111 "), address_space_cap(1 << 30):
        sample_episodes(y, 3, 1, 2, 100_000_000_000)
    assert sample_episodes(y, 3, 1, 2, 7)[0].shape == (7, 3, 1)
    fails("fewshot", tiny_store, "--way", "3", "--shot", "1", "--query", "2", "--episodes", "100000000000",
          match="error: --episodes 100000000000 is too many")
