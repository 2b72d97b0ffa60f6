"""`probe extract` end to end vs (a) the backbone's pure forward on pre-decoded tensors and (b) the seeds' plain
loop (torchvision ImageFolder + DataLoader + fp32 model), on a folder of real photos, in one run.

    python benchmarks/bench_extract.py [--images 2048] [--backbone efficientnet_lite0]

Every engine a user can choose runs side by side (on the CPU: torch in the auto dtype, torch float32, ONNX Runtime
float32), each against its own pure forward and the fastest one. Targets (issues 2 and 12): probe >= 0.8x the
fastest engine's (a) and >= 2x (b); peak memory flat in the number of images (measured at a quarter
of --images and at --images). End to end includes fixed costs -- model creation, listing, the first and slower
forward (oneDNN builds its kernels), writing the store -- which weigh less the larger the folder; `startup_s` is the
part outside the loop.
The photos are skimage.data's real pictures, cropped/scaled/flipped into a few hundred 500x375 JPEGs.
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
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timer, write_result  # noqa: E402

from probe.backbones import create_backbone  # noqa: E402
from probe.engine import auto_engine, input_hw  # noqa: E402
from probe.extract import Embedder, ExtractConfig, default_workers, extract  # noqa: E402


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs (500x375, like typical photo datasets) cut from skimage's real photos, 4 classes."""
    import skimage.data

    sources = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket(),
               "astronaut": skimage.data.astronaut()}
    rng = np.random.default_rng(seed)
    for k in range(n):
        name = list(sources)[k % len(sources)]
        img = Image.fromarray(sources[name])
        w, h = img.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        (root / name).mkdir(parents=True, exist_ok=True)
        img.save(root / name / f"{k:05d}.jpg", quality=90)
    return root


SEED_WORKERS = 2  # the seeds' DataLoader(num_workers=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # all three on the same device: GPU figures where there is one


def pure_forward(backbone: str, n: int, batch: int, dtype: str, engine: str = "auto") -> float:
    """(a) images/s of the model alone on tensors already decoded and preprocessed, probe's device settings."""
    emb = Embedder(create_backbone(backbone), device=DEVICE, dtype=dtype, engine=engine)
    h, w = input_hw(emb.backbone.preprocess)
    x = torch.randn(batch, 3, h, w, device=emb.device)
    x = x.contiguous(memory_format=torch.channels_last) if emb.engine.name == "torch" else x  # each its own layout
    emb(x)  # warm-up; already on the device, in its layout
    with timer() as t:
        for _ in range(max(1, min(n, 512) // batch)):
            emb(x)  # returns host numpy: synchronises like extract does
    return max(1, min(n, 512) // batch) * batch / t["s"]


def seeds_loop(data: Path, backbone: str, batch: int, workers: int) -> float:
    """(b) the loop the seed documents write: ImageFolder + DataLoader + fp32 model, collecting features."""
    from torchvision import datasets

    bb = create_backbone(backbone)
    ds = datasets.ImageFolder(str(data), transform=bb.transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    model = bb.model.eval().to(DEVICE)
    feats = []
    with timer() as t, torch.no_grad():
        for x, _ in loader:
            feats.append(model(x.to(DEVICE)).cpu().numpy())
    return len(ds) / t["s"]


def probe_extract(data: Path, out: Path, backbone: str, batch: int, workers: int, pixels: str = "uint8",
                  engine: str = "auto", dtype: str = "auto") -> dict:
    """End to end, as `probe extract` runs: model creation, listing, decoding, forward, journal and store."""
    cfg = ExtractConfig(backbone=backbone, batch_size=batch, workers=workers, pixels=pixels, device=DEVICE,
                        engine=engine, dtype=dtype)
    out.unlink(missing_ok=True)
    with timer() as t:
        s = extract(data, out, cfg)
    n = len_images(data)
    return {"images_per_s": round(n / t["s"], 2), "loop_images_per_s": s.images_per_s,
            "startup_s": round(t["s"] - n / s.images_per_s, 2),
            "dtype": s.dtype, "engine": s.engine, "workers": workers, "pixels": pixels, "wall_s": round(t["s"], 2)}


def len_images(data: Path) -> int:
    return sum(1 for _ in data.rglob("*.jpg"))


PEAK = """
import json, resource, sys
from probe.extract import ExtractConfig, extract
extract(sys.argv[1], sys.argv[2], ExtractConfig(backbone=sys.argv[3], workers=int(sys.argv[4])))
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(kids, 1)}))
"""


def peak_memory(data: Path, out: Path, backbone: str, workers: int) -> dict:
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", PEAK, str(data), str(out), backbone, str(workers)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed-batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if DEVICE == "cuda":  # the GPU has its own benchmark (GPU decode, the decode+forward limit, issue 12's targets)
        from bench_extract_gpu import main as gpu_main

        return gpu_main(["--backbones", args.backbone, *(["--out", args.out] if args.out else [])])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_photos(tmp / "photos", args.images)
        small = make_photos(tmp / "photos-quarter", args.images // 4, seed=1)
        from probe.device import cpu_has_native_bf16, resolve_device, resolve_dtype

        dtype = resolve_dtype("auto", resolve_device(DEVICE))  # what `--dtype auto` runs here
        # every engine x dtype a user can choose on this device: (engine, dtype)
        engines = [("torch", dtype)] + ([("torch", "float32"), ("onnxruntime", "float32")] if DEVICE == "cpu" else [])
        if DEVICE == "cpu" and cpu_has_native_bf16():
            engines.append(("torch", "bfloat16"))  # the choice `--dtype bfloat16` offers on this CPU
        engines = list(dict.fromkeys(engines))
        forward_before = {f"{e},{d}": pure_forward(args.backbone, args.images, args.batch_size, d, e)
                          for e, d in engines}
        seeds = seeds_loop(data, args.backbone, args.seed_batch_size, workers=SEED_WORKERS)
        auto = default_workers()
        runs = [probe_extract(data, tmp / "s.h5", args.backbone, args.batch_size, auto, engine=e, dtype=d)
                for e, d in engines]
        runs += [probe_extract(data, tmp / "s.h5", args.backbone, args.batch_size, w, engine=e, dtype=d)
                 for e, d in engines if e != "torch" or d == dtype  # decode workers vs the engine's threads
                 for w in sorted({0, 1, os.cpu_count() or 1} - {auto})]
        runs.append(probe_extract(data, tmp / "s.h5", args.backbone, args.batch_size, auto, pixels="pil"))
        forward_after = {f"{e},{d}": pure_forward(args.backbone, args.images, args.batch_size, d, e)
                         for e, d in engines}
        mem_small = peak_memory(small, tmp / "m1.h5", args.backbone, auto)
        mem_big = peak_memory(data, tmp / "m4.h5", args.backbone, auto)
    # the machine's speed drifts: each pure forward brackets the extract runs (mean of before and after)
    forward = {k: (forward_before[k] + forward_after[k]) / 2 for k in forward_before}
    fastest = max(forward, key=forward.get)
    by_engine = {}
    for e, d in engines:
        r = next(r for r in runs if (r["engine"], r["dtype"], r["workers"], r["pixels"]) == (e, d, auto, "uint8"))
        by_engine[f"{e},{d}"] = {**r, "pure_forward_images_per_s": round(forward[f"{e},{d}"], 2),
                                 "ratio_vs_own_forward": round(r["images_per_s"] / forward[f"{e},{d}"], 3),
                                 "ratio_vs_fastest_forward": round(r["images_per_s"] / forward[fastest], 3),
                                 "ratio_vs_seeds_loop": round(r["images_per_s"] / seeds, 3)}
    default = by_engine[f"{auto_engine(DEVICE, dtype)},{dtype}"]  # what `--engine auto --dtype auto` runs
    best = max(by_engine.values(), key=lambda r: r["images_per_s"])
    write_result("extract" if DEVICE == "cpu" else "extract_gpu", {
        "device": DEVICE,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "backbone": args.backbone,
        "images": args.images,
        "image_size": "500x375 JPEG",
        "batch_size": args.batch_size,
        "probe": {"default": default, "by_engine": by_engine, "runs": runs},
        "baseline_forward_pre_decoded": {
            "images_per_s": {k: round(v, 2) for k, v in forward.items()}, "fastest": fastest,
            "before_and_after": {k: [round(forward_before[k], 2), round(forward_after[k], 2)] for k in forward}},
        "baseline_seeds_loop": {"images_per_s": round(seeds, 2), "batch_size": args.seed_batch_size,
                                "workers": SEED_WORKERS, "dtype": "float32"},
        "ratio_default_vs_fastest_forward": round(default["images_per_s"] / forward[fastest], 3),
        "ratio_default_vs_seeds_loop": round(default["images_per_s"] / seeds, 3),
        "ratio_best_vs_fastest_forward": round(best["images_per_s"] / forward[fastest], 3),
        "ratio_float32_onnxruntime_vs_seeds_loop": by_engine.get("onnxruntime,float32", {}).get("ratio_vs_seeds_loop"),
        "ratio_by_run_vs_fastest_forward": {f"{r['engine']},{r['dtype']},workers={r['workers']},{r['pixels']}":
                                            round(r["images_per_s"] / forward[fastest], 3) for r in runs},
        "targets": {"vs_fastest_forward": 0.8, "vs_seeds_loop": 2.0},
        "peak_memory": {f"{args.images // 4}_images": mem_small, f"{args.images}_images": mem_big},
    }, args.out)


if __name__ == "__main__":
    main()
