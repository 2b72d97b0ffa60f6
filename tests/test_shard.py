"""Sharded extraction (--shard I/N and torchrun ranks) and `probe merge`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from probe.data import discover
from probe.extract import extract
from probe.shard import merge, parse_shard, shard_of, take_shard
from probe.store import FeatureStore, StoreError

from .conftest import TINY, kill_9_at, make_imagefolder, tiny_config


def by_path(store) -> dict[str, np.ndarray]:
    s = FeatureStore(store)
    return dict(zip(s.paths(), s.features()))


def assert_same_store(a, b):
    fa, fb = by_path(a), by_path(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_allclose(fa[p], fb[p], atol=1e-5, err_msg=p)
    sa, sb = FeatureStore(a), FeatureStore(b)
    assert sa.classes == sb.classes
    assert dict(zip(sa.paths(), sa.labels())) == dict(zip(sb.paths(), sb.labels()))
    assert dict(zip(sa.paths(), sa.splits())) == dict(zip(sb.paths(), sb.splits()))


def test_shards_partition_the_files_deterministically(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=7)
    ds = discover(root)
    parts = [take_shard(ds, (i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part.paths) == sorted(ds.paths)  # each file exactly once
    assert all(part.classes == ds.classes for part in parts)  # labels agree across shards
    from dataclasses import replace

    rev = replace(ds, paths=ds.paths[::-1], labels=ds.labels[::-1], splits=ds.splits[::-1])
    assert set(take_shard(rev, (1, 3)).paths) == set(parts[1].paths)  # listing order does not matter
    assert [shard_of("cat/img_0.png", 4), shard_of("dog/img_3.png", 4)] == [0, 3]  # sha1-based: fixed forever
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)


def test_parse_shard_reads_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert parse_shard(None) == (2, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) is None


def test_shards_merge_into_the_unsharded_store(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=5, splits=("train", "val"))
    full = extract(root, tmp_path / "full.h5", tiny_config())["store"]
    shards = [extract(root, tmp_path / "s.h5", tiny_config(shard=f"{i}/2"))["store"] for i in range(2)]
    assert [Path(s).name for s in shards] == ["s.shard-0-of-2.h5", "s.shard-1-of-2.h5"]
    assert FeatureStore(shards[0]).attrs["shard"] == "0/2" and FeatureStore(shards[0]).attrs["complete"]
    assert sum(FeatureStore(s).count for s in shards) == 30
    summary = merge(shards, tmp_path / "merged.h5")
    assert summary["count"] == 30 and summary["shards"] == 2
    assert_same_store(tmp_path / "merged.h5", full)
    assert FeatureStore(tmp_path / "merged.h5").attrs["config_key"] == FeatureStore(full).attrs["config_key"]


def test_merge_refuses_missing_duplicate_or_mixed_shards(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    s0 = extract(root, tmp_path / "s.h5", tiny_config(shard="0/2"))["store"]
    with pytest.raises(StoreError, match="1/2 are missing"):
        merge([s0], tmp_path / "m.h5")
    assert merge([s0], tmp_path / "m.h5", allow_missing=True)["count"] == FeatureStore(s0).count
    with pytest.raises(StoreError, match="given twice"):
        merge([s0, s0], tmp_path / "m2.h5")
    other = extract(root, tmp_path / "t.h5", tiny_config(shard="1/2", tta="hflip"))["store"]
    with pytest.raises(StoreError, match="different configurations"):
        merge([s0, other], tmp_path / "m3.h5")


def _torchrun(root: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "-m", "probe", "extract", str(root), "--out", str(out), "--backbone", TINY, "--weights", "random",
           "--workers", "0", "--batch-size", "4", "--dtype", "float32"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_two_ranks_each_take_their_shard(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=6)
    r = _torchrun(root, tmp_path / "big.h5")
    assert r.returncode == 0, r.stderr[-2000:]
    shards = sorted(tmp_path.glob("big.shard-*-of-2.h5"))
    assert [s.name for s in shards] == ["big.shard-0-of-2.h5", "big.shard-1-of-2.h5"]
    mtimes = [s.stat().st_mtime_ns for s in shards]
    r = _torchrun(root, tmp_path / "big.h5")  # finished shards are never redone
    assert r.returncode == 0 and [s.stat().st_mtime_ns for s in shards] == mtimes
    merge(shards, tmp_path / "big.h5")
    assert_same_store(tmp_path / "big.h5", extract(root, tmp_path / "full.h5", tiny_config())["store"])


@pytest.mark.slow
def test_a_lost_rank_is_rerun_alone(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=[f"c{i}" for i in range(4)], per_class=16)
    out = tmp_path / "s.h5"

    def cmd(i):
        return [sys.executable, "-m", "probe", "extract", str(root), "--out", str(out), "--shard", f"{i}/2",
                "--backbone", "resnet18", "--weights", "random", "--batch-size", "4", "--workers", "0",
                "--dtype", "float32"]

    r = CliRunner().invoke(app, cmd(0)[3:])  # rank 0 finishes: the same command, in this process
    assert r.exit_code == 0, r.output
    done0 = tmp_path / "s.shard-0-of-2.h5"
    mtime0 = done0.stat().st_mtime_ns
    journal = Path(f"{tmp_path / 's.shard-1-of-2.h5'}.journal")
    kill_9_at({tmp_path / "s.shard-1-of-2.h5": (cmd(1), 30_000)})  # rank 1 dies mid-way
    assert journal.exists() and not (tmp_path / "s.shard-1-of-2.h5").exists()
    r = CliRunner().invoke(app, cmd(1)[3:])  # only the lost rank is re-run (in this process: no second cold start)
    assert r.exit_code == 0, r.output
    assert done0.stat().st_mtime_ns == mtime0
    merged = merge([done0, tmp_path / "s.shard-1-of-2.h5"], tmp_path / "merged.h5")
    assert merged["count"] == 64 and len(set(FeatureStore(tmp_path / "merged.h5").paths())) == 64
