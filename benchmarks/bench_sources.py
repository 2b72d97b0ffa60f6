"""`probe extract` from WebDataset tar shards and a Parquet file vs the same images in a folder, in one run.

    python benchmarks/bench_sources.py [--images 1024] [--per-shard 128] [--backbone efficientnet_lite0]

The same JPEGs (bench_extract's 500x375 photos) as a folder, as tar shards (``<class>/<stem>.jpg`` + ``.cls``) and as
one Parquet file (row groups of --per-shard rows). Each source is extracted end to end with the default backbone
(forward-bound on a CPU) and with the random-weight tiny test backbone (where reading and decoding dominate: the
readers' own speed), --repeats times in turn, best kept. `plan_s` is the part outside the embedding loop (model
creation, listing the folder or the shards, writing the store). Peak memory is measured over the shards and over 4x
as many (copies): a worker holds one batch whatever the number of shards, so it stays flat.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_extract import make_photos  # noqa: E402
from common import timer, write_result  # noqa: E402

from probe.extract import ExtractConfig, default_workers, extract  # noqa: E402

TINY = "timm/test_vit"  # random weights, 64-d, 160 px: milliseconds per batch
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pack_shards(photos: Path, out: Path, per_shard: int) -> list[Path]:
    """The folder's JPEGs as WebDataset shards: key ``<class>/<stem>``, members ``.jpg`` and ``.cls`` (the name)."""
    files = sorted(photos.rglob("*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, len(files), per_shard):
        path = out / f"{k // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for f in files[k: k + per_shard]:
                key = f"{f.parent.name}/{f.stem}"
                for name, data in ((f"{key}.jpg", f.read_bytes()), (f"{key}.cls", f.parent.name.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def pack_parquet(photos: Path, out: Path, per_group: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(photos.rglob("*.jpg"))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [f.parent.name for f in files]}),
                   out, row_group_size=per_group)
    return out


def copies(shards: list[Path], out: Path, times: int) -> list[Path]:
    """``times`` copies of every shard, numbered on: as many more rows, each shard read once."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for k in range(times * len(shards)):
        made.append(out / f"{k:06d}.tar")
        made[-1].write_bytes(shards[k % len(shards)].read_bytes())
    return made


def spec(shards: list[Path]) -> str:
    return str(shards[0].parent / f"{{000000..{len(shards) - 1:06d}}}.tar")


def run(data: str, out: Path, backbone: str, workers: int, n: int) -> dict:
    """End to end, as `probe extract` runs it."""
    weights = "random" if backbone == TINY else None
    cfg = ExtractConfig(backbone=backbone, weights=weights, workers=workers, device=DEVICE, decode="cpu")
    out.unlink(missing_ok=True)
    with timer() as t:
        s = extract(data, out, cfg)
    assert s.count == n and not s.skipped, (data, s.count, s.skipped)
    return {"images_per_s": round(n / t["s"], 2), "loop_images_per_s": s.images_per_s,
            "plan_s": round(t["s"] - n / s.images_per_s, 2), "wall_s": round(t["s"], 2)}


PEAK = """
import json, resource, sys
from probe.extract import ExtractConfig, extract
extract(sys.argv[1], sys.argv[2], ExtractConfig(backbone=sys.argv[3], weights="random", workers=int(sys.argv[4]),
                                                device="cpu"))
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(kids, 1)}))
"""


def peak_memory(data: str, out: Path, workers: int) -> dict:
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", PEAK, data, str(out), TINY, str(workers)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photos(tmp / "photos", args.images)
        shards = pack_shards(photos, tmp / "shards", args.per_shard)
        parquet = pack_parquet(photos, tmp / "pq" / "photos.parquet", args.per_shard)
        sources = {"folder": str(photos), "webdataset": spec(shards), "parquet": str(parquet)}
        results: dict[str, dict[str, dict]] = {}
        for backbone in dict.fromkeys([args.backbone, TINY]):
            runs: dict[str, list[dict]] = {k: [] for k in sources}
            run(sources["webdataset"], tmp / "warm.h5", backbone, workers, args.images)  # model files, page cache
            for _ in range(args.repeats):  # in turn: drift in the machine's speed hits every source alike
                for name, data in sources.items():
                    runs[name].append(run(data, tmp / f"{name}.h5", backbone, workers, args.images))
            results[backbone] = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
        many = copies(shards, tmp / "many", 4)  # the shards 4 times over: 4x the rows (distinct containers)
        mem = {f"{len(shards)}_shards_{args.images}_images": peak_memory(spec(shards), tmp / "m1.h5", workers),
               f"{len(many)}_shards_{4 * args.images}_images": peak_memory(spec(many), tmp / "m4.h5", workers)}
    ratios = {b: {k: round(r[k]["images_per_s"] / r["folder"]["images_per_s"], 3) for k in r if k != "folder"}
              for b, r in results.items()}
    write_result("sources", {
        "device": DEVICE, "images": args.images, "image_size": "500x375 JPEG", "per_shard": args.per_shard,
        "shards": len(shards), "workers": workers, "decode": "cpu", "repeats": args.repeats,
        "by_backbone": results, "ratio_vs_folder": ratios, "peak_memory_tiny_backbone": mem,
    }, args.out)


if __name__ == "__main__":
    main()
