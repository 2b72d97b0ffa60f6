"""Faults around the journal of `probe extract` and the folders probe writes into: a run refused for space or cut
short at its first batch leaves no journal, an interrupted run of another configuration is refused with its journal
kept (not discarded), a store path under a file is one line, and `probe serve` makes its state folder only when a
few-shot set is first saved."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

import probe.extract
from probe.data import fingerprint
from probe.errors import DiskFullError, StoreError
from probe.extract import Embedded, Journaled, extract
from probe.identity import IdentityMismatchError
from probe.store import FeatureStore, Journal

from .conftest import TINY, fill_disk, make_imagefolder, tiny_config
from .test_faults_store import TINY_ARGS, cli, one_line_error


@pytest.fixture
def data_ref(tmp_path) -> tuple[Path, Path]:
    """6 images (3 classes x 2) and their store from an uninterrupted run (batches of 4: [0-3], [4-5])."""
    data = make_imagefolder(tmp_path / "data", per_class=2)
    ref = tmp_path / "ref.h5"
    extract(data, ref, tiny_config(engine="torch"))
    return data, ref


def interrupted(data: Path, ref: Path, out: Path) -> Path:
    """The journal a run made like ``ref`` leaves when killed after its first batch (the first 4 of ref's rows)."""
    store = FeatureStore(ref)
    paths = store.paths()[:4]
    journal = Journaled.recover(out, store.identity)
    journal.append(Embedded(list(range(4)), [], store.features()[:4], None), paths,
                   [fingerprint(str(data / p)) for p in paths])
    return journal.journal.path


def rows(store: Path) -> dict[str, np.ndarray]:
    s = FeatureStore(store)
    return dict(zip(s.paths(), s.features()))


# ------------------------------------------------------------------------------------ a refused run, a full disk
def test_a_run_refused_for_space_leaves_the_folder_as_it_found_it(data_ref, small_disk):
    data, ref = data_ref
    disk = small_disk("64k")  # less than the store's first chunk of features (256 KiB)
    out = disk / "s.h5"
    one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), str(out), "checked before embedding 6 images",
                   f"{out} is unchanged")
    assert os.listdir(disk) == []  # no journal, lock or temp file

    journal = interrupted(data, ref, out)  # an interrupted run's journal is kept as it is
    before = journal.read_bytes()
    one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), "checked before embedding 2 images")
    assert os.listdir(disk) == [journal.name] and journal.read_bytes() == before


def test_a_disk_full_at_the_first_batch_leaves_no_journal(data_ref, small_disk, monkeypatch):
    data, _ = data_ref
    disk = small_disk("3m")
    real_run = probe.extract.run_plan

    def fill_then_run(*a, **k):  # another program fills the disk after the check for space
        fill_disk(disk)
        return real_run(*a, **k)

    monkeypatch.setattr(probe.extract, "run_plan", fill_then_run)
    with pytest.raises(DiskFullError, match=r"s\.h5\.journal") as e:
        extract(data, disk / "s.h5", tiny_config(engine="torch"))
    assert "s.h5 is unchanged" in str(e.value)
    assert os.listdir(disk) == ["filler"]  # not even the journal's header


# ------------------------------------------------------------------------- an interrupted run of another config
def test_a_journal_of_another_configuration_is_refused_and_kept(data_ref, tmp_path):
    data, ref = data_ref
    out = tmp_path / "kj.h5"
    journal = interrupted(data, ref, out)
    before = journal.read_bytes()
    with pytest.raises(IdentityMismatchError, match="tta") as e:
        extract(data, out, tiny_config(engine="torch", tta="hflip"))
    msg = str(e.value)
    assert str(journal) in msg and "tta: journal has 'none', this run 'hflip'" in msg
    assert "Re-run the interrupted command to finish it" in msg and f"delete {journal}" in msg
    r = cli("extract", data, "--out", out, *TINY_ARGS, "--tta", "hflip")
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.output, r.output
    assert journal.read_bytes() == before and not out.exists()

    s = extract(data, out, tiny_config(engine="torch"))  # the interrupted command finishes its work
    assert s["resumed"] == 4 and s["embedded"] == 2 and s["count"] == 6 and not journal.exists()
    want, got = rows(ref), rows(out)
    assert want.keys() == got.keys() and all(np.array_equal(want[p], got[p]) for p in want)


def test_an_older_journal_of_another_configuration_is_refused_in_one_line(data_ref, tmp_path):
    data, _ = data_ref
    out = tmp_path / "kj.h5"
    journal = Journal(f"{out}.journal")
    journal.start({"config_key": "0" * 64, "store": str(out)})  # written before journals recorded the identity
    before = journal.path.read_bytes()
    line = one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), str(journal.path),
                          "another configuration", "key 000000000000", "Re-run the interrupted command")
    assert "delete" in line and journal.path.read_bytes() == before
    with pytest.raises(StoreError):
        extract(data, out, tiny_config(engine="torch"))


def test_a_damaged_journal_is_ignored_with_a_warning(data_ref, tmp_path, caplog):
    data, ref = data_ref
    out = tmp_path / "s.h5"
    Path(f"{out}.journal").write_bytes(b"not a journal at all")
    with caplog.at_level(logging.WARNING, logger="probe.store"):
        s = extract(data, out, tiny_config(engine="torch"))
    assert "ignoring a torn record at byte 0" in caplog.text
    assert s["resumed"] == 0 and s["embedded"] == 6 and not Path(f"{out}.journal").exists()
    want, got = rows(ref), rows(out)
    assert want.keys() == got.keys() and all(np.array_equal(want[p], got[p]) for p in want)


# ------------------------------------------------------------------------------------- folders that cannot be
def test_a_store_under_a_file_is_one_line(data_ref, tmp_path):
    data, _ = data_ref
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile / "x.h5", afile / "sub" / "x.h5"):
        one_line_error(cli("extract", data, "--out", out, *TINY_ARGS), f"cannot write '{out}'",
                       f"'{afile}' is a file, not a folder")
    assert afile.read_text() == "x"


def test_serve_makes_its_state_folder_with_the_first_set(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from probe.serve import ServeConfig, create_app

    monkeypatch.chdir(tmp_path)
    config = dict(backbone=TINY, weights="random", engine="torch", allow_hosts=("testserver",))
    create_app(ServeConfig(**config))  # the default state dir, cache/serve
    assert os.listdir(tmp_path) == []

    state = tmp_path / "state"
    with TestClient(create_app(ServeConfig(**config, state_dir=str(state)))) as c:
        assert not state.exists()
        assert c.post("/fewshot/pets").status_code == 201
        assert (state / "fewshot" / "pets.npz").is_file()

    blocked = tmp_path / "later"  # a state dir that a file took the place of after start-up: 507, one line
    with TestClient(create_app(ServeConfig(**config, state_dir=str(blocked)))) as c:
        blocked.write_text("x")
        r = c.post("/fewshot/pets")
        assert r.status_code == 507, r.text
        detail = r.json()["detail"]
        assert detail.startswith(f"cannot write '{blocked}/") and f"'{blocked}' is a file, not a folder" in detail
        assert "\n" not in detail and c.get("/fewshot").json() == []

    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(cli("serve", "--state-dir", afile, "--backbone", TINY, "--weights", "random", "--engine",
                       "torch", "--port", "0"), f"cannot write few-shot sets to '{afile / 'fewshot'}'",
                   f"'{afile}' is a file, not a folder")
