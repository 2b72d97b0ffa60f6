"""`probe finetune` and `probe compare` through typer's CliRunner: exit codes, --json, files written."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app as probe_app

from .conftest import make_imagefolder

TINY = ["--backbone", "timm/test_resnet", "--weights", "random", "--epochs", "1", "--batch-size", "4",
        "--workers", "0", "--lr", "0.01"]


def app():
    return probe_app  # the real `probe` app


def test_finetune_cli_json_and_resume_message(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "val"))
    run = tmp_path / "run"
    r = CliRunner().invoke(app(), ["finetune", str(data), "--out", str(run), "--strategy", "gradual", *TINY,
                                   "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["strategy"] == "gradual" and s["epochs_run"] == 1 and (run / "best.pt").exists()
    assert (run / "curves.png").stat().st_size > 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    r = CliRunner().invoke(app(), ["finetune", str(data), "--out", str(run), *TINY])
    assert r.exit_code == 1 and "pass --resume" in r.output
    r = CliRunner().invoke(app(), ["finetune", str(data), "--out", str(run), "--strategy", "gradual", *TINY,
                                   "--resume"])
    assert r.exit_code == 0 and "best val accuracy" in r.output and "--weights" in r.output
    r = CliRunner().invoke(app(), ["finetune", str(data), "--out", str(tmp_path / "x"), "--strategy", "slow"])
    assert r.exit_code == 1 and "unknown strategy 'slow'" in r.output


def test_compare_cli_writes_table_json_plot(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "val"))
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app(), ["compare", str(data), "--out", str(out), "--strategies",
                                   "feature-extract,differential", *TINY, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    rows = {row["strategy"]: row for row in res["rows"]}
    assert list(rows) == ["linear-probe", "feature-extract", "differential"]
    assert rows["feature-extract"]["trainable_params"] < rows["differential"]["trainable_params"]
    assert rows["linear-probe"]["trainable_params"] == 3 * 96 + 3 and rows["linear-probe"]["best_epoch"] is None
    assert all(0 <= row["best_val_acc"] <= 1 and row["seconds"] > 0 for row in res["rows"])
    assert "| linear-probe |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0
    assert (out / "feature-extract" / "best.pt").exists() and (out / "linear-probe" / "features.h5").exists()
