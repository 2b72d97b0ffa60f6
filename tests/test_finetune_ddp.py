"""`probe finetune` under real `torchrun --nproc-per-node 2` on CPU (gloo): rank-0 files, exact sharded
validation, identical replicas after `gradual` thaws a group, and resume across world sizes (1 -> 2 -> 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from probe.backbones import create_backbone
from probe.data import discover
from probe.finetune import FinetuneConfig, finetune, load_finetuned
from probe.finetune.data import Images, collate, train_val_indices
from probe.finetune.train import evaluate

from .conftest import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
CNN = "timm/test_resnet"
TINY = ["--backbone", CNN, "--weights", "random", "--batch-size", "4", "--workers", "0", "--lr", "0.01"]

# Run by each rank: fine-tune, stop after epoch STOP (as Ctrl-C would), save this rank's replica as rank<R>.pt.
WORKER = """
import os, sys, torch
from probe.finetune import FinetuneConfig, finetune
from probe.finetune import train as train_mod

models = []
class Keep(train_mod.FinetuneModel):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        models.append(self)
train_mod.FinetuneModel = Keep

data, run, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
def on_epoch(rec):
    if rec["epoch"] == stop:
        raise KeyboardInterrupt
cfg = FinetuneConfig(backbone="timm/test_resnet", weights="random", strategy="gradual", epochs=4, batch_size=4,
                     workers=0, lr=0.01, patience=0, resume=True)
try:
    finetune(data, run, cfg, on_epoch=on_epoch)
except KeyboardInterrupt:
    pass
torch.save(models[0].state_dict(), os.path.join(run, f"rank{os.environ['RANK']}.pt"))
"""


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two CPU processes on a free port (--standalone: a local c10d rendezvous), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PROBE_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("ddp") / "data", per_class=3, splits=("train", "val"))


def test_torchrun_cli_one_epoch(data, tmp_path):
    run = tmp_path / "run"
    r = torchrun("-m", "probe", "-v", "finetune", str(data), "--out", str(run), "--strategy", "full",
                 "--epochs", "1", *TINY, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)  # one summary: rank 1 prints nothing
    assert s["world_size"] == 2 and s["epochs_run"] == 1 and s["val_images"] == 9
    assert r.stderr.count("epoch 1/1: train loss") == 1  # rank 1 logs warnings only
    assert {p.name for p in run.iterdir()} == {"best.pt", "last.pt", "metrics.jsonl", "curves.png"}
    (rec,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last, best = (torch.load(run / f, weights_only=True) for f in ("last.pt", "best.pt"))
    assert last["world_size"] == 2 and list(last["model"])[0].startswith("backbone.")  # unwrapped: no "module."
    assert not any(k.startswith("module.") for k in best["state_dict"])  # still a --weights for probe extract
    # the 2 ranks validated 5 + 4 images (no padding) and summed: exactly best.pt's accuracy on all 9
    model, _ = load_finetuned(run / "best.pt")
    ds = discover(data)
    _, val_idx, _ = train_val_indices(ds)
    val = Images([ds.abspath(i) for i in val_idx], ds.labels[val_idx], create_backbone(CNN, "random").transform)
    loss, acc = evaluate(model, DataLoader(val, batch_size=4, collate_fn=collate), torch.device("cpu"), None)
    assert acc == rec["val_acc"] == s["best_val_acc"] and loss == pytest.approx(rec["val_loss"], abs=1e-5)


def test_gradual_resumes_across_world_sizes(data, tmp_path):
    run = tmp_path / "run"
    cfg = dict(backbone=CNN, weights="random", strategy="gradual", epochs=4, batch_size=4, workers=0, lr=0.01,
               patience=0)

    def stop_after_first(rec):
        if rec["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # epoch 1 in this process (head only)
        finetune(data, run, FinetuneConfig(**cfg), on_epoch=stop_after_first)
    first = torch.load(run / "last.pt", weights_only=True)["model"]

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # epochs 2 and 3 on 2 ranks: DDP wraps head + layer4, then wraps again when layer3 thaws
    r = torchrun(str(script), str(data), str(run), "3")
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (torch.load(run / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    third = torch.load(run / "last.pt", weights_only=True)
    assert third["epoch"] == 3 and third["world_size"] == 2
    for k in rank0:  # one model: the late-thawed group's gradients were all-reduced too; buffers synced
        assert torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], third["model"][k]), k
    conv = "backbone.layer{}.0.conv1.weight"
    assert not torch.equal(first[conv.format(3)], third["model"][conv.format(3)])  # layer3 trained in epoch 3
    assert torch.equal(first[conv.format(2)], third["model"][conv.format(2)])  # layer2 still frozen

    s = finetune(data, run, FinetuneConfig(**cfg, resume=True))  # epoch 4 back in one process
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and s["epochs_run"] == 4 and s["world_size"] == 1
    assert [r["thawed_groups"] for r in rows] == [[], ["layer4.0"], ["layer3.0", "layer4.0"],
                                                  ["layer2.0", "layer3.0", "layer4.0"]]
