"""Images/s of one fine-tuning training step per strategy against a plain loop written the seeds' way
(model.train(), Adam, loss.backward(), step), same model, batch and input, in one run.

    python benchmarks/bench_finetune.py                      # resnet18, random weights, 224 px, batch 16, CPU
    python benchmarks/bench_finetune.py --backbone efficientnet_lite0 --steps 5
    -> benchmarks/results/finetune.json

probe's step adds what the seeds' loop lacks: per-group learning rates from the schedule, global-norm
clipping, frozen parts in eval mode (feature-extract and the first gradual epochs skip the backbone's backward).
gradual is measured with 2 of its groups thawed (epoch 2 at --unfreeze-every 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timer, write_result  # noqa: E402

from probe.backbones import create_backbone  # noqa: E402
from probe.finetune import STRATEGIES, FinetuneModel, layer_groups, param_groups, thawed_count  # noqa: E402
from probe.finetune.config import FinetuneConfig  # noqa: E402
from probe.finetune.train import make_optimizer, train_mode, train_step  # noqa: E402


def fresh(backbone: str, classes: int) -> tuple[FinetuneModel, object]:
    bb = create_backbone(backbone, "random")  # seeded: every strategy starts from the same weights
    torch.manual_seed(0)
    return FinetuneModel(bb.model, bb.dim, classes), bb


def images_per_s(step, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    with timer() as t:
        for _ in range(steps):
            step()
    return batch * steps / t["s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    classes = 10
    x = torch.randn(a.batch, 3, a.size, a.size)  # (B, 3, H, W)
    y = torch.randint(0, classes, (a.batch,))

    # the seeds' loop: everything trainable, one Adam, no schedule, no clipping
    model, _ = fresh(a.backbone, classes)
    model.requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    crit = nn.CrossEntropyLoss()

    def seeds_step():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()

    baseline = images_per_s(seeds_step, a.batch, a.steps, a.warmup)
    rows = {"seeds-loop": {"images_per_s": round(baseline, 2), "trainable_params": sum(
        p.numel() for p in model.parameters())}}
    for strategy in STRATEGIES:
        cfg = FinetuneConfig(backbone=a.backbone, strategy=strategy)
        model, bb = fresh(a.backbone, classes)
        groups = layer_groups(model.backbone, bb.name)
        thawed = thawed_count(strategy, len(groups), epoch=2, unfreeze_every=1)
        train_mode(model, groups, strategy, thawed)
        opt = make_optimizer(param_groups(model, groups, strategy, cfg.lr, cfg.lr_mult, cfg.weight_decay,
                                          thawed=thawed), cfg)
        params = [p for g in opt.param_groups for p in g["params"]]
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        args = (model, opt, crit, x, y, 1.0, scaler, None, cfg.grad_clip, params)
        ips = images_per_s(lambda args=args: train_step(*args), a.batch, a.steps, a.warmup)
        rows[strategy] = {"images_per_s": round(ips, 2), "vs_seeds_loop": round(ips / baseline, 3),
                          "trainable_params": sum(p.numel() for p in params), "thawed_groups": thawed,
                          "layer_groups": len(groups)}
        print(f"{strategy:16} {ips:8.2f} img/s  ({ips / baseline:.2f}x the seeds' loop)", file=sys.stderr)
    write_result("finetune", {"backbone": a.backbone, "weights": "random", "batch": a.batch, "size": a.size,
                              "steps": a.steps, "warmup_steps": a.warmup, "device": "cpu", "results": rows},
                 a.out)


if __name__ == "__main__":
    main()
