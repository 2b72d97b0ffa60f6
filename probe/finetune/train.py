"""The fine-tuning loop: strategies as parameter groups, warm-up + cosine, checkpoints every epoch, resume.

RUN_DIR after a run:
    last.pt        everything to continue (model, optimizer, scaler, step, history, best, config)
    best.pt        the best epoch by val accuracy, as a probe checkpoint: a valid ``--weights`` for `probe extract`
    metrics.jsonl  one line per epoch: epoch, train/val loss and accuracy, lr per group, trainable params, seconds
    curves.png     loss and accuracy per epoch

Every epoch reseeds torch, numpy and the shuffling from (seed, epoch), so a resumed run repeats the remaining
epochs exactly as an uninterrupted one would, with or without DataLoader workers.

Under `torchrun --nproc-per-node N` the loop is data-parallel (see dist.py): DistributedDataParallel, each rank
a 1/N shard of every epoch (DistributedSampler, same seed) at --batch-size per rank, validation sharded without
padding and summed, so every rank sees the exact val accuracy; rank 0 alone writes RUN_DIR. The checkpoints hold
the unwrapped model, so a run resumes under any world size (the sampler re-shards; the lr schedule continues at
the same epoch); a run is reproducible per (seed, world size).

Example:
    >>> s = finetune("probe/demo/fashion-mnist", "runs/lite0-diff", FinetuneConfig(strategy="differential"))
    >>> s["best_val_acc"], s["best"]
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..backbones import create_backbone
from ..data import DatasetError, discover
from ..errors import ProbeError
from ..extract import default_workers
from .config import RESUME_FREE, FinetuneConfig
from .data import Images, collate, eval_transform, train_transform, train_val_indices
from .dist import DistContext, distributed
from .groups import (
    backbone_group_params,
    frozen_norms,
    layer_groups,
    lr_ladder,
    param_groups,
    set_trainable,
    thawed_count,
)
from .model import FinetuneModel, adapt_first_conv

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of every group's peak lr at optimizer ``step``: linear warm-up, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    s = seed * 100_003 + epoch + rank * 10_000_019  # each rank its own augmentation stream; rank 0 = one process
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def make_optimizer(groups: list[dict[str, Any]], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None  # CPU trains in float32: bfloat16 autocast there is slower on most CPUs and less exact
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_resume(saved: dict[str, Any], cfg: FinetuneConfig, run_dir: Path) -> None:
    now = cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
    if diff:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ProbeError(f"--resume: {run_dir} was started with other settings ({detail}); resume with the same "
                         f"options or choose another --out")


def train_mode(model: FinetuneModel, groups: list, strategy: str, thawed: int) -> None:
    """requires_grad and train/eval per module for one epoch: frozen parts keep their BatchNorm statistics."""
    set_trainable(model, groups, thawed)
    model.train()
    if strategy == "feature-extract":
        model.backbone.eval()  # frozen: dropout off, BatchNorm statistics untouched
    else:
        for m in frozen_norms(model, groups, thawed):
            m.eval()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor,
               y: torch.Tensor, factor: float, scaler: torch.amp.GradScaler, amp: torch.dtype | None,
               grad_clip: float, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch x (B, C, H, W), y (B,): every group at ``factor`` x its peak lr, mixed
    precision where ``amp``, global-norm clipping. Returns (loss, logits (B, K)), detached."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x).float()  # (B, K)
    loss = criterion(logits, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), logits.detach()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None,
             memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``loader``, in eval mode."""
    loss, correct, n = eval_sums(model, loader, device, amp, memory_format)
    return loss / max(n, 1), correct / max(n, 1)


@torch.inference_mode()
def eval_sums(model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None,
              memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, int, int]:
    """(summed cross-entropy, correct, images) of ``model`` on ``loader``, in eval mode: sums add up over shards."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y, _ in loader:
        if x is None:
            continue
        x, y = x.to(device, memory_format=memory_format), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()  # (B, K)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return loss, correct, n


def finetune(data: str | os.PathLike, run_dir: str | os.PathLike, config: FinetuneConfig | None = None,
             progress: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``config.backbone`` on DATA with ``config.strategy``; returns a summary dict.

    ``on_epoch(record)`` is called after each epoch's checkpoints are written (tests interrupt from it).
    Under torchrun every rank calls this and gets the same summary; only rank 0 writes RUN_DIR."""
    cfg = config or FinetuneConfig()
    with distributed(cfg.device) as ctx:
        return _finetune(data, Path(run_dir), cfg, ctx, on_epoch)


def _load_last(run_dir: Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """RUN_DIR/last.pt to resume from, None for a fresh run; ValueError when it may not be resumed."""
    last_path = run_dir / "last.pt"
    if not last_path.exists():
        if cfg.resume:
            log.info("--resume: no last.pt in %s yet, starting from scratch", run_dir)
        return None
    if not cfg.resume:
        raise ProbeError(f"{run_dir} already holds a run (last.pt): pass --resume to continue it, "
                         f"or choose another --out")
    saved = torch.load(last_path, map_location="cpu", weights_only=True)
    _check_resume(saved["config"], cfg, run_dir)
    return saved


def _finetune(data: str | os.PathLike, run_dir: Path, cfg: FinetuneConfig, ctx: DistContext,
              on_epoch: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    try:  # rank 0 reads RUN_DIR and hands the verdict to all: other nodes need no shared filesystem
        found = (None, _load_last(run_dir, cfg) if ctx.is_main else None)
    except ValueError as e:
        found = (str(e), None)
    error, saved = ctx.from_main(found)
    if error:
        raise ProbeError(error)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    ds = discover(data, cfg.layout)
    train_idx, val_idx, val_source = train_val_indices(ds, cfg.val_fraction, cfg.seed)
    device = ctx.device
    bb = create_backbone(cfg.backbone, cfg.weights)
    torch.manual_seed(cfg.seed)  # head initialisation
    model = FinetuneModel(adapt_first_conv(bb.model, cfg.in_chans), bb.dim, len(ds.classes))
    groups = layer_groups(model.backbone, bb.name)
    n = len(groups)
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    amp = _amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    eval_tf = bb.transform if cfg.in_chans == 3 else eval_transform(bb.preprocess, cfg.in_chans)
    train_set = Images([ds.abspath(i) for i in train_idx], ds.labels[train_idx],
                       train_transform(cfg.augment, bb.preprocess, eval_tf, cfg.in_chans), cfg.in_chans)
    val_set = Images([ds.abspath(i) for i in val_idx], ds.labels[val_idx], eval_tf, cfg.in_chans)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    common = dict(batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate,
                  pin_memory=device.type == "cuda", persistent_workers=False)
    world, rank = ctx.world_size, ctx.rank
    # DDP: every rank steps equally often, so DistributedSampler pads the shards to ceil(N / world) images
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if ctx.enabled else None
    per_rank = len(sampler) if sampler else len(train_set)
    drop_last = per_rank > cfg.batch_size  # a last batch of 1 would break BatchNorm in train mode
    steps_per_epoch = per_rank // cfg.batch_size if drop_last else 1
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total // 5)
    # validation shards interleave without padding (DistributedSampler would repeat images): the sums are exact
    val_shard = Subset(val_set, range(rank, len(val_set), world)) if ctx.enabled else val_set
    val_loader = DataLoader(val_shard, shuffle=False, **common)

    start, step, history = 0, 0, []
    best: dict[str, Any] = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0}
    stopped_early = False
    thawed = thawed_count(cfg.strategy, n, 0, cfg.unfreeze_every)
    if saved is not None:
        start, step, history, best = saved["epoch"], saved["step"], saved["history"], saved["best"]
        stopped_early, thawed = saved["stopped_early"], saved["thawed"]
        model.load_state_dict(saved["model"])
        if saved.get("world_size", 1) != world:  # other shards, other steps per epoch: continue at the epoch
            step = start * steps_per_epoch
            log.info("resuming a %d-process run in %d: the lr schedule continues at epoch %d (step %d)",
                     saved.get("world_size", 1), world, start, step)
    set_trainable(model, groups, thawed)
    opt = make_optimizer(param_groups(model, groups, cfg.strategy, cfg.lr, cfg.lr_mult, cfg.weight_decay,
                                      thawed=thawed), cfg)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        log.info("resumed %s after epoch %d of %d", run_dir, start, cfg.epochs)
    ladder = [cfg.lr] * n if cfg.strategy == "full" else lr_ladder(n, cfg.lr, cfg.lr_mult)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bad_seen: set[str] = set()
    log.info("%s on %s: %d train / %d val images (%s), %d layer groups %s, %d steps/epoch, device %s%s",
             cfg.strategy, bb.name, len(train_set), len(val_set), val_source, n, [g.name for g in groups],
             steps_per_epoch, device, f", {world} processes x batch {cfg.batch_size}" if ctx.enabled else "")
    ddp, wrapped_for = None, None

    for epoch in range(start, cfg.epochs):
        if stopped_early:
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(_seed_epoch(cfg.seed, epoch, rank))
        want = thawed_count(cfg.strategy, n, epoch, cfg.unfreeze_every)
        for i in range(n - 1 - thawed, n - 1 - want, -1):  # gradual: thaw from the top, one group at a time
            for g in backbone_group_params(model, groups, i, ladder[i], cfg.weight_decay):
                opt.add_param_group(g)
            log.info("epoch %d: thawed %s", epoch + 1, groups[i].name)
        thawed = want
        train_mode(model, groups, cfg.strategy, thawed)
        if ctx.enabled and wrapped_for != thawed:  # DDP registers the trainable set once: wrap anew (dist.py)
            ddp = net = None  # free the old wrapper first: its reducer removes its gradient hooks as it goes
            gc.collect()
            ddp, wrapped_for = ctx.wrap(model), thawed
        net = ddp if ddp is not None else model
        if sampler:
            sampler.set_epoch(epoch)  # the epoch's permutation: from (seed, epoch), the same on every rank
        order = dict(sampler=sampler) if sampler else dict(shuffle=True)
        loader = DataLoader(train_set, generator=gen, drop_last=drop_last, **order, **common)
        params = [p for g in opt.param_groups for p in g["params"]]
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y, bad in loader:
            for i, why in bad:
                if train_set.paths[i] not in bad_seen:
                    bad_seen.add(train_set.paths[i])
                    log.warning("skipped %s: %s", train_set.paths[i], why)
            if x is None:
                if ctx.enabled:  # skipping would leave the other ranks waiting in this step's all-reduce
                    raise DatasetError(f"rank {rank}: a whole batch of images failed to decode ({bad[0][1]}); "
                                       f"remove the broken files or train in one process")
                continue
            x = x.to(device, non_blocking=True, memory_format=memory_format)  # (B, C, H, W)
            y = y.to(device, non_blocking=True)  # (B,)
            loss, logits = train_step(net, opt, criterion, x, y, lr_factor(step, total, warmup), scaler, amp,
                                      cfg.grad_clip, params)
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = ctx.sum([loss_sum, correct, seen])  # all ranks (padding repeats included)
        train_s = time.perf_counter() - t0
        ctx.sync_buffers(model)
        val_loss, val_correct, val_n = ctx.sum(eval_sums(model, val_loader, device, amp, memory_format))
        val_loss, val_acc = val_loss / max(val_n, 1), val_correct / max(val_n, 1)
        rec = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": {g["name"]: g["lr"] for g in opt.param_groups},
            "thawed_groups": [groups[i].name for i in range(n - thawed, n)],
            "trainable_params": count_trainable(model),
            "train_images_per_s": seen / train_s if train_s > 0 else None,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        improved = val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"])
        if improved:
            best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
        stopped_early = bool(cfg.patience) and epoch + 1 - best["epoch"] >= cfg.patience and epoch + 1 < cfg.epochs
        stopped_early = ctx.from_main(stopped_early)  # the same metrics everywhere; rank 0 decides regardless
        if ctx.is_main:
            if improved:
                _atomic_save(_probe_checkpoint(model, bb, ds.classes, cfg, rec), best_path)
            _atomic_save({"epoch": epoch + 1, "step": step, "thawed": thawed, "history": history, "best": best,
                          "stopped_early": stopped_early, "config": cfg.to_dict(), "model": model.state_dict(),
                          "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "world_size": world},
                         last_path)
            _write_metrics(history, run_dir / "metrics.jsonl")
            from .plots import plot_curves

            plot_curves(history, run_dir / "curves.png", title=f"{bb.name} {cfg.strategy}")
        ctx.barrier()  # no rank runs ahead (or exits) before the epoch is on disk
        log.info("epoch %d/%d: train loss %.4f acc %.3f, val loss %.4f acc %.3f, %.1fs", epoch + 1, cfg.epochs,
                 rec["train_loss"], rec["train_acc"], val_loss, val_acc, rec["seconds"])
        if stopped_early:
            log.info("early stop: no better val accuracy for %d epochs (best %.3f at epoch %d)", cfg.patience,
                     best["val_acc"], best["epoch"])
        if on_epoch:
            on_epoch(rec)

    speeds = [r["train_images_per_s"] for r in history if r["train_images_per_s"]]
    return {
        "run_dir": str(run_dir),
        "backbone": bb.name,
        "strategy": cfg.strategy,
        "classes": ds.classes,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "val_source": val_source,
        "layer_groups": [g.name for g in groups],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "val_acc": [r["val_acc"] for r in history],
        "trainable_params": history[-1]["trainable_params"] if history else count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "seconds": round(sum(r["seconds"] for r in history), 3),
        "train_images_per_s": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "skipped": sorted(bad_seen),
        "device": str(device),
        "world_size": world,
        "best": str(best_path),
        "last": str(last_path),
        "metrics": str(run_dir / "metrics.jsonl"),
        "curves": str(run_dir / "curves.png"),
    }


def _probe_checkpoint(model: FinetuneModel, bb: Any, classes: list[str], cfg: FinetuneConfig,
                      rec: dict[str, Any]) -> dict[str, Any]:
    """What `load_checkpoint` reads: the backbone's own state dict (its keys, no prefix) plus plain metadata;
    the classifier rides along under "head" so the fine-tuned model can be rebuilt whole."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    return {
        "probe_checkpoint": CHECKPOINT_VERSION,
        "backbone": bb.name,
        "state_dict": cpu,
        "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "classes": list(classes),
        "preprocess": bb.preprocess,
        "in_chans": cfg.in_chans,
        "strategy": cfg.strategy,
        "base_weights": bb.weights,
        "epoch": rec["epoch"],
        "metrics": {k: v for k, v in rec.items() if k not in ("lr", "thawed_groups")},
        "config": cfg.to_dict(),
    }


def load_finetuned(path: str | os.PathLike) -> tuple[FinetuneModel, dict[str, Any]]:
    """Rebuild the fine-tuned classifier (backbone + head) from a best.pt; returns (model in eval mode, metadata)."""
    from ..backbones import load_checkpoint

    state, meta = load_checkpoint(path)
    bb = create_backbone(meta["backbone"], "random")
    adapt_first_conv(bb.model, int(meta.get("in_chans", 3)))
    bb.model.load_state_dict({k: state[k] for k in bb.model.state_dict()})
    model = FinetuneModel(bb.model, bb.dim, len(meta["classes"]))
    model.head.load_state_dict(meta["head"])
    return model.eval(), meta
