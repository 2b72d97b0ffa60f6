"""Beyond one machine, measured on this one in one run: `probe extract` images/s as 1 process vs 2 torchrun ranks,
the cost of `probe merge`, and the out-of-core index build (peak memory vs the store's size).

    python benchmarks/bench_distributed.py [--images 256] [--ooc-rows 200000 --ooc-dim 1280 --nlist 512]
    # -> benchmarks/results/distributed.json

Extraction: real photos (bench_extract's make_photos), the packaged default backbone. The 1-process run uses
--workers 1 and 2 torch threads; each of the 2 ranks --workers 0 and OMP_NUM_THREADS=1, so both use the same
cores. Throughput is images / wall time of the whole command (start-up included, as a user sees it) plus the
extraction loop's own images/s that each process reports. The index builds run `probe index` (ivf, then ivfsq8
in shards) on a synthetic store written chunk by chunk, each in a subprocess whose peak RSS (VmHWM) is compared
with the store's size and with reading the store whole (what the build did before it streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_extract import make_photos  # noqa: E402
from common import peak_rss_mb, timer, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV_RANK = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV_ONE = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def extract_cmd(data: Path, out: Path, backbone: str, batch: int, workers: int) -> list[str]:
    return ["-m", "probe", "extract", str(data), "--out", str(out), "--backbone", backbone, "--batch-size",
            str(batch), "--workers", str(workers), "--json"]


def one_process(data: Path, out: Path, n: int, args) -> dict:
    with timer() as t:
        r = run([sys.executable, *extract_cmd(data, out, args.backbone, args.batch_size, 1)], ENV_ONE)
    s = json.loads(r.stdout)
    return {"processes": 1, "workers": 1, "torch_threads": 2, "wall_s": round(t["s"], 2),
            "images_per_s": round(n / t["s"], 2), "loop_images_per_s": s["images_per_s"], "dtype": s["dtype"]}


def two_ranks(data: Path, out: Path, n: int, logs: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "--redirects", "1", *extract_cmd(data, out, args.backbone, args.batch_size, 0)]
    with timer() as t:
        run(cmd, ENV_RANK)
    ranks = [json.loads(p.read_text()) for p in sorted(logs.rglob("stdout.log"))]
    assert len(ranks) == 2, f"expected 2 rank logs under {logs}, found {len(ranks)}"
    return {"processes": 2, "workers_per_rank": 0, "torch_threads_per_rank": 1, "wall_s": round(t["s"], 2),
            "images_per_s": round(n / t["s"], 2), "rank_images": [r["count"] for r in ranks],
            "rank_loop_images_per_s": [r["images_per_s"] for r in ranks], "command": "python -m torch.distributed.run "
            "--standalone --nproc-per-node 2 -m probe extract DATA --out S.h5 --workers 0"}


def merge_cost(shards: list[Path], out: Path) -> dict:
    with timer() as t:
        r = run([sys.executable, "-m", "probe", "merge", *map(str, shards), "--out", str(out), "--json"])
    from probe.shard import merge

    out2 = out.with_name(out.stem + ".again.h5")
    with timer() as t2:
        merge(shards, out2)
    return {"rows": json.loads(r.stdout)["count"], "cli_wall_s": round(t["s"], 2), "library_s": round(t2["s"], 3)}


def synthetic_store(path: Path, n: int, dim: int, prefix: str = "row", chunk: int = 16_384) -> int:
    """An n x dim store of clustered vectors written chunk by chunk (never all in memory); returns its bytes."""
    from probe.store import config_key, write_store

    rng = np.random.default_rng(n)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    basis = (rng.normal(size=(32, dim)) / np.sqrt(32)).astype(np.float32)

    def batches():
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            x = centres[rng.integers(0, 1000, m)] + 0.8 * rng.normal(size=(m, 32)).astype(np.float32) @ basis
            yield [f"{prefix}{i:08d}" for i in range(s, s + m)], [""] * m, x + 0.3 * rng.normal(
                size=(m, dim)).astype(np.float32)

    cfg = {"backbone": "arrays", "weights": "none", "weights_sha256": "", "preprocess": {}, "pooling": "none",
           "tta": "none", "dtype": "float32"}
    attrs = {**cfg, "config_key": config_key(cfg), "classes": [], "root": "", "layout": "arrays", "versions": {},
             "device": "none"}
    rows = {f"{prefix}{i:08d}": ("", -1, "") for i in range(n)}
    write_store(path, attrs, rows, batches(), {}, dim)
    return n * dim * 4


HWM = """
import json, re, sys
def hwm():  # this process's peak RSS in MiB (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
from cli.main import app
from probe.search import prepare
from probe.store import FeatureStore
base = hwm()  # after the imports: what follows is the work's own memory
if sys.argv[1] == "whole":  # what the build did before streaming: the store read whole, then normalised
    x = prepare(FeatureStore(sys.argv[2]).features(), "cosine")
else:
    sys.argv = ["probe", "index", *sys.argv[2:]]
    try:
        app()
    except SystemExit as e:
        assert not e.code, e.code
print(json.dumps({"after_imports_mb": round(base, 1), "peak_rss_mb": round(hwm(), 1),
                  "peak_above_imports_mb": round(hwm() - base, 1)}))
"""


def index_build(store: Path, out: Path, args, kind: str, shards: int) -> dict:
    cmd = [str(store), "--out", str(out), "--type", kind, "--nlist", str(args.nlist), "--chunk-rows",
           str(args.chunk_rows), "--shards", str(shards), "--json"]
    with timer() as t:
        r = run([sys.executable, "-c", HWM, "index", *cmd])
    lines = r.stdout.strip().splitlines()
    mem = json.loads(lines[-1])
    s = json.loads("\n".join(lines[:-1]))
    return {"command": "probe index STORE " + " ".join(cmd[1:]).replace(str(out), "OUT"), "wall_s": round(t["s"], 1),
            "build_s": s["build_seconds"], "recall_at_10": s["recall_at_10"], "params": s["params"],
            "index_mb": round(s["bytes"] / 2**20, 1), **mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ooc-rows", type=int, default=200_000)
    ap.add_argument("--ooc-dim", type=int, default=1280)
    ap.add_argument("--nlist", type=int, default=512)
    ap.add_argument("--chunk-rows", type=int, default=16_384)
    ap.add_argument("--shards", type=int, default=4, help="shards of the second (ivfsq8) build")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        data = make_photos(tmp / "photos", args.images)
        run([sys.executable, *extract_cmd(make_photos(tmp / "warm", 8), tmp / "warm.h5", args.backbone, 8, 0)])
        one = one_process(data, tmp / "one.h5", args.images, args)
        two = two_ranks(data, tmp / "s.h5", args.images, tmp / "logs", args)
        shards = sorted(tmp.glob("s.shard-*-of-2.h5"))
        merged = merge_cost(shards, tmp / "merged.h5")
        # merge at scale: two synthetic 1280-d shards of 50k rows (what 100k images of the default backbone make)
        big = [tmp / f"big.shard-{i}-of-2.h5" for i in range(2)]
        for i, p in enumerate(big):
            synthetic_store(p, 50_000, 1280, prefix=f"s{i}/")
        merged_big = merge_cost(big, tmp / "big.h5")
        merged_big["mb"] = round(100_000 * 1280 * 4 / 2**20)
        for p in [*big, tmp / "big.h5", tmp / "big.again.h5"]:
            p.unlink(missing_ok=True)

        store = tmp / "ooc.h5"
        with timer() as tw:
            size = synthetic_store(store, args.ooc_rows, args.ooc_dim)
        whole = json.loads(run([sys.executable, "-c", HWM, "whole", str(store)]).stdout.strip().splitlines()[-1])
        builds = [index_build(store, tmp / "ooc.faiss", args, "ivf", 1),
                  index_build(store, tmp / "ooc_sq8.faiss", args, "ivfsq8", args.shards)]
    write_result("distributed", {
        "command": " ".join(sys.argv),
        "gpu": None,
        "gpu_note": "no GPU on this machine: the per-GPU figures (torchrun --nproc-per-node = GPUs) are not measured",
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "load_note": "the machine's 2 cores are shared with other work: compare the figures within this run only",
        "extract": {
            "backbone": args.backbone, "images": args.images, "image_size": "500x375 JPEG",
            "batch_size": args.batch_size, "one_process": one, "two_ranks": two,
            "speedup_two_ranks": round(two["images_per_s"] / one["images_per_s"], 2),
        },
        "merge": {"photos": merged, "synthetic_100k_x_1280": merged_big},
        "index_out_of_core": {
            "store": {"rows": args.ooc_rows, "dim": args.ooc_dim, "mb": round(size / 2**20), "write_s": round(
                tw["s"], 1)},
            "read_whole_then_normalise": whole,
            "builds": builds,
            "note": "peak = the index (IVF,Flat holds every vector: the store's size; SQ8 a quarter) with the slack "
                    "of its growing inverted lists, plus one chunk; the store is never read whole",
        },
        "bench_peak_rss_mb": round(peak_rss_mb(), 1),
    }, args.out)


if __name__ == "__main__":
    main()
