"""Index building for stores larger than memory: rows streamed from HDF5 in chunks, a sampled training set, and
sharded indexes (faiss.IndexShards) that search like one. Small and offline; the memory test runs ~10 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from probe.search import IndexConfig, Rows, SearchIndex, index_store, prepare, recall_at, sidecar
from probe.store import store_from_arrays

from .test_search import clustered, planted_duplicates

N = 4000


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A store of N clustered rows, and 200 fresh queries from the same distribution."""
    x = clustered(N + 200, seed=7)
    path = tmp_path_factory.mktemp("large") / "big.h5"
    store_from_arrays(path, x[:N], np.arange(N) % 3, classes=list("abc"))
    return path, x[:N], x[N:]


@pytest.fixture(scope="module")
def exact(big) -> tuple[np.ndarray, np.ndarray]:
    path, _, q = big
    return SearchIndex.build(path, IndexConfig(type="flat")).search(q, 10)


def test_rows_reads_any_subset_like_numpy(big):
    path, x, _ = big
    rng = np.random.default_rng(0)
    with h5py.File(path) as f:
        for chunk in (7, 500, 65_536):
            rows = Rows(f["features"], "cosine", chunk)
            for pick in (np.sort(rng.choice(N, 3, replace=False)), np.sort(rng.choice(N, 3000, replace=False)),
                         np.arange(N)):  # sparse rows are read one by one, dense ones by block
                np.testing.assert_allclose(rows.take(pick), prepare(x[pick], "cosine"), rtol=1e-6)
            ids = np.concatenate([i for i, _ in rows.blocks()])
            assert np.array_equal(ids, np.arange(N)) and max(len(b) for _, b in rows.blocks()) <= chunk


def test_chunk_size_does_not_change_results(big, exact):
    path, _, q = big
    small = SearchIndex.build(path, IndexConfig(type="flat", chunk_rows=97))  # 42 chunks, the last one short
    scores, ids = small.search(q, 10)
    assert np.array_equal(ids, exact[1]) and np.array_equal(scores, exact[0])
    one = SearchIndex.build(path, IndexConfig(type="ivf", tune_queries=400))
    many = SearchIndex.build(path, IndexConfig(type="ivf", tune_queries=400, chunk_rows=97))
    assert one.meta["params"] == many.meta["params"] and one.meta["recall"] == many.meta["recall"]
    assert np.array_equal(one.search(q, 10)[1], many.search(q, 10)[1])


def test_sharded_flat_returns_the_exact_top10(big, exact, tmp_path):
    path, x, q = big
    idx = SearchIndex.build(path, IndexConfig(type="flat", shards=3, chunk_rows=500))
    assert idx.bounds == [0, 1333, 2666, N] and idx.count == N and "shards=3" in repr(idx)
    scores, ids = idx.search(q, 10)
    assert np.array_equal(ids, exact[1]) and np.allclose(scores, exact[0], atol=1e-6)
    assert (ids // 1333 != ids[:, :1] // 1333).any()  # the top-10 really merges hits from several shards
    np.testing.assert_allclose(idx.vectors([0, 1500, N - 1]), prepare(x[[0, 1500, N - 1]], "cosine"), rtol=1e-6)

    idx.save(tmp_path / "i.faiss")
    meta = json.loads(sidecar(tmp_path / "i.faiss").read_text())
    assert meta["shard_files"] == ["i.faiss.shard-0", "i.faiss.shard-1", "i.faiss.shard-2"]
    assert all((tmp_path / f).is_file() for f in meta["shard_files"])
    back = SearchIndex.load(tmp_path / "i.faiss")
    assert np.array_equal(back.search(q, 10)[1], exact[1]) and back.paths[N - 1] == f"row{N - 1:08d}"
    assert back.summary()["bytes"] == sum((tmp_path / f).stat().st_size for f in ["i.faiss", *meta["shard_files"]])

    SearchIndex.build(path, IndexConfig(type="flat")).save(tmp_path / "i.faiss")  # rebuilt unsharded: no leftovers
    assert not list(tmp_path.glob("i.faiss.shard-*"))
    idx.save(tmp_path / "j.faiss")
    (tmp_path / "j.faiss.shard-2").unlink()
    with pytest.raises(FileNotFoundError, match="lists shard .*j.faiss.shard-2.*which is missing"):
        SearchIndex.load(tmp_path / "j.faiss")


def test_sharded_ivf_keeps_recall(big, exact):
    path, _, q = big
    idx = SearchIndex.build(path, IndexConfig(type="ivf", shards=4, chunk_rows=300, tune_queries=400))
    assert idx.kind == "ivf" and idx.meta["recall"] >= 0.95 and idx.meta["recall_queries"] == 200
    _, ids = idx.search(q, 10)
    assert recall_at(ids, exact[1], np.full(len(q), -1)) >= 0.95  # fresh queries, against exact search
    import faiss

    subs = [faiss.downcast_index(idx.index.at(i)) for i in range(4)]
    centroids = [faiss.extract_index_ivf(s).quantizer.reconstruct_n(0, 8) for s in subs]
    assert all(np.array_equal(c, centroids[0]) for c in centroids)  # clones of one trained index
    assert [s.ntotal for s in subs] == [1000] * 4


def test_update_grows_the_last_shard(tmp_path):
    x = clustered(2500, seed=3)
    path = tmp_path / "s.h5"
    store_from_arrays(path, x[:2000])
    index_store(path, tmp_path / "i.faiss", IndexConfig(type="ivf", shards=2, chunk_rows=256))
    store_from_arrays(path, x)
    out = index_store(path, tmp_path / "i.faiss", update=True)
    assert out["added"] == 500 and out["count"] == 2500 and out["shards"] == 2
    idx = SearchIndex.load(tmp_path / "i.faiss")
    assert idx.bounds == [0, 1000, 2500] and idx.index.at(1).ntotal == 1500
    assert idx.search(x[2400], 1)[1][0, 0] == 2400 and idx.vectors([2400]).shape == (1, 32)


def test_cli_shards_and_chunk_rows(big, tmp_path):
    from cli.main import app

    path, _, _ = big
    r = CliRunner().invoke(app, ["index", str(path), "--out", str(tmp_path / "c.faiss"), "--type", "ivf",
                                 "--shards", "2", "--chunk-rows", "1000"])
    assert r.exit_code == 0, r.output
    assert "in 2 shards" in r.output and (tmp_path / "c.faiss.shard-1").is_file()
    r = CliRunner().invoke(app, ["index", str(path), "--shards", "0", "--out", str(tmp_path / "d.faiss")])
    assert r.exit_code == 1 and "shards must be >= 1, got 0" in r.output


PEAK = """
import re, sys
from probe.search import IndexConfig, SearchIndex
def hwm():  # this process's peak resident bytes (ru_maxrss would carry over the parent's across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = hwm()
SearchIndex.build(sys.argv[1], IndexConfig(type="ivfsq8", nlist=64, tune_queries=200, chunk_rows=int(sys.argv[2])))
print(hwm() - before)
"""


def test_peak_memory_follows_the_chunk_not_the_store(tmp_path):
    """A 100k x 512 store (195 MiB) indexed as ivfsq8 (codes: 1/4 of the store): with small chunks the build's
    peak stays below the store's size (reading it whole, as before, cost >= 2x: features + normalised copy)."""
    n, dim = 100_000, 512
    path = tmp_path / "w.h5"
    store_from_arrays(path, np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32))
    size = n * dim * 4

    def start(chunk: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", PEAK, str(path), str(chunk)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def peak(proc: subprocess.Popen) -> int:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        return int(out.strip().splitlines()[-1])

    running = [start(5_000), start(n)]  # side by side: VmHWM is each process's own peak
    chunked, whole = (peak(p) for p in running)
    assert chunked < 0.9 * size, f"peak grew {chunked / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB store"
    assert whole - chunked > 0.5 * size  # the difference is the chunk: memory follows chunk_rows


@pytest.mark.slow
def test_dedup_above_the_flat_size_is_approximate_unless_exact(tmp_path):
    """A store of exactly IndexConfig.exact_below rows: `probe dedup` takes the approximate index (and says so),
    `--exact` the all-pairs search; both find the planted pairs and nothing else (~30 s on 2 busy cores, 2/3 of it
    the exact search)."""
    from cli.main import app

    n = IndexConfig().exact_below
    x, want = planted_duplicates(n)
    path = tmp_path / "d.h5"
    store_from_arrays(path, x)
    runs = {}
    for flag in ([], ["--exact"]):
        r = CliRunner().invoke(app, ["dedup", str(path), "--threshold", "0.99", "--json", *flag])
        assert r.exit_code == 0, r.output
        runs[bool(flag)] = json.loads(r.output)
    approx, exact = runs[False], runs[True]
    assert approx["search"]["method"] == "approximate" and exact["search"] == {"method": "exact"}
    assert approx["pairs"] == exact["pairs"] == len(want)
    groups = [g["ids"] for g in exact["groups"]]
    assert [g["ids"] for g in approx["groups"]] == groups and groups[0] == [5, *range(n - 20, n)]
    assert {tuple(g) for g in groups[1:]} == {p for p in want if p[1] < n - 20}  # the 20 noisy copies
    r = CliRunner().invoke(app, ["dedup", str(path), "--threshold", "0.99"])
    assert r.exit_code == 0 and "approximate search (IVF" in r.output and "nprobe=" in r.output, r.output
    assert "found with estimated probability" in r.output and "(2,000 synthetic pairs)" in r.output
