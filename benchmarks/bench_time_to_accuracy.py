"""Time to accuracy: the seeds' frozen-backbone loop against `probe extract` once + a linear head.

    python benchmarks/bench_time_to_accuracy.py        # -> benchmarks/results/time_to_accuracy.json

Same real images (the packaged Fashion-MNIST demo: train 300 / val 100), same backbone (packaged
efficientnet_lite0) in the same run. The seeds' loop: a new fc on the frozen backbone, Adam, a DataLoader over the
images, the backbone re-run on every batch of every epoch, val accuracy after each epoch. probe: extract the
features once, then a LinearHead fit on train (C chosen on a holdout of train, so val stays unseen) scored on val.
Both run the backbone in float32 here; probe's default dtype (bf16 on CPUs that have it) is reported separately.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import timer, write_result  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "probe" / "demo" / "fashion-mnist"


def seeds_loop(epochs: int, batch_size: int = 32, lr: float = 1e-3) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from probe.backbones import create_backbone

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb = create_backbone("efficientnet_lite0")
    model, tf = bb.model.eval(), bb.transform
    train = DataLoader(ImageFolder(DEMO / "train", transform=tf), batch_size=batch_size, shuffle=True, num_workers=2)
    val = DataLoader(ImageFolder(DEMO / "val", transform=tf), batch_size=64, num_workers=2)
    fc = torch.nn.Linear(bb.dim, 10)
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    curve = []
    for epoch in range(epochs):
        fc.train()
        for x, y in train:
            with torch.no_grad():
                f = model(x)  # the frozen backbone, re-run every epoch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fc(f), y).backward()
            opt.step()
        fc.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((fc(model(x)).argmax(1) == y).sum())
        curve.append({"epoch": epoch + 1, "val_accuracy": correct / len(val.dataset),
                      "elapsed_s": round(time.perf_counter() - t0, 2)})
        print(f"seeds loop epoch {epoch + 1}: val {curve[-1]['val_accuracy']:.3f} at {curve[-1]['elapsed_s']}s",
              file=sys.stderr)
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "curve": curve,
            "final_val_accuracy": curve[-1]["val_accuracy"], "seconds": curve[-1]["elapsed_s"]}


def probe_run(dtype: str) -> dict:
    from probe.extract import ExtractConfig, extract
    from probe.heads import LinearHead
    from probe.store import FeatureStore

    with tempfile.TemporaryDirectory() as tmp, timer() as total:
        with timer() as t_ex:
            summary = extract(DEMO, Path(tmp) / "demo.h5", ExtractConfig(dtype=dtype, workers=2))
        store = FeatureStore(summary.store)
        with timer() as t_fit:
            head = LinearHead().fit(store.features("train"), store.labels("train"))
        acc = float((head.predict(store.features("val")) == store.labels("val")).mean())
    return {"dtype": summary.dtype, "extract_s": round(t_ex["s"], 2), "fit_head_s": round(t_fit["s"], 2),
            "seconds": round(total["s"], 2), "val_accuracy": acc, "chosen_C": head.C_}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    a = ap.parse_args()
    seeds = seeds_loop(a.epochs)
    fp32 = probe_run("float32")
    auto = probe_run("auto")
    target = seeds["final_val_accuracy"]
    # the seeds' loop reaches its final accuracy at the first epoch whose accuracy is >= it
    seeds_t = next(c["elapsed_s"] for c in seeds["curve"] if c["val_accuracy"] >= target)
    res = {"images": {"train": 300, "val": 100, "source": "probe/demo/fashion-mnist"},
           "backbone": "efficientnet_lite0 (packaged ImageNet weights)",
           "seeds_loop": seeds, "probe_float32": fp32, "probe_default_dtype": auto,
           "probe_reaches_seed_accuracy": fp32["val_accuracy"] >= target,
           "speedup_to_seed_final_accuracy_float32": round(seeds_t / fp32["seconds"], 2),
           "speedup_vs_full_seed_run_float32": round(seeds["seconds"] / fp32["seconds"], 2),
           "speedup_vs_full_seed_run_default_dtype": round(seeds["seconds"] / auto["seconds"], 2),
           "target": "probe >= seed accuracy, >= 10x sooner for a 10-epoch seed run"}
    write_result("time_to_accuracy", res)


if __name__ == "__main__":
    main()
