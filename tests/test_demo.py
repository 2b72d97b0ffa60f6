"""The README's first command: `probe demo` runs extract + linear head + search offline with real accuracy."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app


@pytest.mark.slow
def test_probe_demo_end_to_end(tmp_path):
    from probe.demo import DEMO_DATA
    from probe.extract import ExtractConfig, extract

    # a demo store left by an earlier probe (the weights' PIL transform): the demo extracts again, no error
    old = extract(DEMO_DATA, tmp_path / "demo.efficientnet_lite0.h5", ExtractConfig(pixels="pil"))
    r = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["extract"]["store"] == old["store"] and out["extract"]["embedded"] == 400
    assert out["extract"]["count"] == 400 and out["extract"]["skipped"] == []
    assert out["head"]["val_accuracy"] >= 0.72  # real pretrained features on real images (79% measured)
    assert out["search"]["precision_at_5"] >= 0.55  # 67.0% measured; chance is 10%
    assert out["search"]["example"]["hits"] and out["index"]["count"] == 400
    again = json.loads(CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path), "--json"]).stdout)
    assert again["extract"]["embedded"] == 0 and again["extract"]["reused"] == 400  # extract once
    text = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path)]).stdout
    assert "validation accuracy" in text and "precision@5" in text
