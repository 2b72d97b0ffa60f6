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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..backbones import Backbone, create_backbone
from ..data import Dataset, DatasetError, discover
from ..digest import check_digest, tree_sha256
from ..errors import IntegrityError, ProbeError
from ..extract import default_workers
from ..fs import atomic_paths, make_dirs
from .config import RESUME_FREE, FinetuneConfig
from .data import Images, collate, eval_transform, train_transform, train_val_indices
from .dist import DistContext, distributed
from .groups import (
    LayerGroup,
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


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with ``sha256``: the checksum of everything else in it, checked when it is loaded."""
    return {**checkpoint, "sha256": tree_sha256(checkpoint)}


def unseal(checkpoint: dict[str, Any], path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """``checkpoint`` without its ``sha256``, after checking it (IntegrityError naming ``path``); a checkpoint
    written before checksums has none and passes unchecked."""
    recorded = checkpoint.pop("sha256", None)
    if recorded is not None:
        check_digest(path, recorded, tree_sha256(checkpoint), "its weights and state", fix)
    return checkpoint


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict / list (what torch.save will write, give or take its framing)."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if torch.is_tensor(obj) else 0


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

    ``progress``: a bar of each epoch's training batches on stderr (rank 0). ``on_epoch(record)`` is called after
    each epoch's checkpoints are written (tests interrupt from it). Under torchrun every rank calls this and gets
    the same summary; only rank 0 writes RUN_DIR."""
    cfg = config or FinetuneConfig()
    with distributed(cfg.device) as ctx:
        return _finetune(data, Path(run_dir), cfg, ctx, on_epoch, progress)


def _load_last(run_dir: Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """RUN_DIR/last.pt to resume from, None for a fresh run; ProbeError when it may not be resumed."""
    last_path = run_dir / "last.pt"
    if not last_path.exists():
        if cfg.resume:
            log.info("--resume: no last.pt in %s yet, starting from scratch", run_dir)
        return None
    if not cfg.resume:
        raise ProbeError(f"{run_dir} already holds a run (last.pt): pass --resume to continue it, "
                         f"or choose another --out")
    fix = f"it cannot be resumed: start the run again without --resume in a new --out (or delete {last_path})"
    try:
        saved = torch.load(last_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or damaged zip, or not a checkpoint at all
        raise IntegrityError(f"{str(last_path)!r} cannot be read ({str(e).splitlines()[0][:160]}): it is damaged; "
                             f"{fix}") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise IntegrityError(f"{str(last_path)!r} is not a probe fine-tuning state (last.pt); {fix}")
    saved = unseal(saved, last_path, fix)
    _check_resume(saved["config"], cfg, run_dir)
    return saved


# ------------------------------------------------------------------------------------ the run's parts
@dataclass(frozen=True)
class _Net:
    """The network and how it runs: the backbone it came from, its layer groups, precision and memory layout."""

    bb: Backbone
    model: FinetuneModel
    groups: list[LayerGroup]
    memory_format: torch.memory_format
    amp: torch.dtype | None  # autocast dtype; None: float32
    scaler: torch.amp.GradScaler  # loss scaling, enabled for float16 only


@dataclass(frozen=True)
class _Data:
    """The images of both splits and how this rank batches them (under DDP: its shard of each)."""

    classes: list[str]
    train_set: Images
    val_set: Images
    val_source: str
    val_loader: DataLoader
    sampler: DistributedSampler | None  # DDP: this rank's 1/N of every epoch
    loader_kw: dict[str, Any]  # what the train and val DataLoaders share
    drop_last: bool
    steps_per_epoch: int

    def train_loader(self, epoch: int, generator: torch.Generator) -> DataLoader:
        """The epoch's shuffled batches: the permutation from (seed, epoch), the same on every rank."""
        if self.sampler:
            self.sampler.set_epoch(epoch)
        order = dict(sampler=self.sampler) if self.sampler else dict(shuffle=True)
        return DataLoader(self.train_set, generator=generator, drop_last=self.drop_last, **order, **self.loader_kw)


@dataclass(frozen=True)
class _Optim:
    """What steps the weights: the optimizer over the trainable groups, the loss and the lr schedule."""

    opt: torch.optim.Optimizer
    criterion: nn.Module
    ladder: list[float]  # peak lr per backbone group: the lr a group joins with when it thaws later
    total: int  # optimizer steps in the whole run
    warmup: int  # of them, linear warm-up


def _no_best() -> dict[str, Any]:
    return {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0}


@dataclass
class _Progress:
    """Where the run stands after ``epoch`` epochs: what last.pt keeps and a resume starts from."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken: the lr schedule's position
    thawed: int = 0  # backbone groups trainable, counted from the top
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch (metrics.jsonl)
    best: dict[str, Any] = field(default_factory=_no_best)  # val_acc, val_loss, epoch of the best epoch
    stopped_early: bool = False

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> _Progress:
        return cls(saved["epoch"], saved["step"], saved["thawed"], saved["history"], saved["best"],
                   saved["stopped_early"])

    def record(self, rec: dict[str, Any], patience: int, epochs: int) -> bool:
        """Add the epoch's ``rec``; True when it is the best yet (val accuracy, ties to the lower val loss).
        Stops early after ``patience`` epochs without a better one (0: never), unless this was the last."""
        self.history.append(rec)
        self.epoch = rec["epoch"]
        acc, loss = rec["val_acc"], rec["val_loss"]
        improved = acc > self.best["val_acc"] or (acc == self.best["val_acc"] and loss < self.best["val_loss"])
        if improved:
            self.best = {"val_acc": acc, "val_loss": loss, "epoch": self.epoch}
        self.stopped_early = bool(patience) and self.epoch - self.best["epoch"] >= patience and self.epoch < epochs
        return improved


@dataclass
class _Run:
    """One fine-tuning run: its settings, process, RUN_DIR and parts, built once before the first epoch."""

    cfg: FinetuneConfig
    ctx: DistContext
    run_dir: Path
    net: _Net
    data: _Data
    optim: _Optim
    skipped: set[str] = field(default_factory=set)  # train images that failed to decode, each warned about once
    ddp: nn.Module | None = None  # DDP: the wrapper of the current trainable set
    wrapped_for: int | None = None  # the thawed count ``ddp`` was made for
    bar: bool = False  # a progress bar of each epoch's training batches on stderr (rank 0 only)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def trainee(self, thawed: int) -> nn.Module:
        """The module to train this epoch: the model, or under DDP a wrapper of exactly its trainable set."""
        if not self.ctx.enabled:
            return self.net.model
        if self.wrapped_for != thawed:  # DDP registers the trainable set once: wrap anew (dist.py)
            self.ddp = None  # free the old wrapper first: its reducer removes its gradient hooks as it goes
            gc.collect()
            self.ddp, self.wrapped_for = self.ctx.wrap(self.net.model), thawed
        return self.ddp

    def note_skipped(self, bad: list[tuple[int, str]]) -> None:
        for i, why in bad:
            path = self.data.train_set.paths[i]
            if path not in self.skipped:
                self.skipped.add(path)
                log.warning("skipped %s: %s", path, why)


# ------------------------------------------------------------------------------------ the run, top-down
def _finetune(data: str | os.PathLike, run_dir: Path, cfg: FinetuneConfig, ctx: DistContext,
              on_epoch: Callable[[dict[str, Any]], None] | None, bar: bool = False) -> dict[str, Any]:
    saved = _open_run_dir(run_dir, cfg, ctx)
    ds = discover(data, cfg.layout)
    ds.require_files("probe finetune")
    split = train_val_indices(ds, cfg.val_fraction, cfg.seed)  # bad labels fail before any model loads
    net = _build_net(cfg, ctx.device, len(ds.classes))
    loaders = _build_data(ds, split, net.bb, cfg, ctx)
    progress = _Progress.from_checkpoint(saved) if saved is not None else _Progress(
        thawed=thawed_count(cfg.strategy, len(net.groups), 0, cfg.unfreeze_every))
    run = _Run(cfg, ctx, run_dir, net, loaders, _build_optim(net, progress.thawed, cfg, loaders.steps_per_epoch),
               bar=bar)
    if saved is not None:
        _resume(run, saved, progress)
    log.info("%s on %s: %d train / %d val images (%s), %d layer groups %s, %d steps/epoch, device %s%s",
             cfg.strategy, net.bb.name, len(loaders.train_set), len(loaders.val_set), loaders.val_source,
             len(net.groups), [g.name for g in net.groups], loaders.steps_per_epoch, ctx.device,
             f", {ctx.world_size} processes x batch {cfg.batch_size}" if ctx.enabled else "")
    while progress.epoch < cfg.epochs and not progress.stopped_early:
        rec = _run_epoch(run, progress)
        if on_epoch:
            on_epoch(rec)
    return _summary(run, progress)


def _open_run_dir(run_dir: Path, cfg: FinetuneConfig, ctx: DistContext) -> dict[str, Any] | None:
    """last.pt to resume from (None: a fresh run) and RUN_DIR created. Rank 0 reads RUN_DIR and hands the
    verdict to all, so other nodes need no shared filesystem and every rank raises the same error."""
    try:
        found = (None, _load_last(run_dir, cfg) if ctx.is_main else None)
    except ValueError as e:
        found = (str(e), None)
    error, saved = ctx.from_main(found)
    if error:
        raise ProbeError(error)
    if ctx.is_main:
        make_dirs(run_dir)
    return saved


def _build_net(cfg: FinetuneConfig, device: torch.device, n_classes: int) -> _Net:
    """The backbone with a new ``n_classes`` head (seeded), its layer groups, on ``device``."""
    bb = create_backbone(cfg.backbone, cfg.weights)
    torch.manual_seed(cfg.seed)  # head initialisation
    model = FinetuneModel(adapt_first_conv(bb.model, cfg.in_chans), bb.dim, n_classes)
    groups = layer_groups(model.backbone, bb.name)
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    amp = _amp_dtype(device, cfg.amp)
    return _Net(bb, model, groups, memory_format, amp, torch.amp.GradScaler(device.type, enabled=amp == torch.float16))


def _build_data(ds: Dataset, split: tuple[np.ndarray, np.ndarray, str], bb: Backbone, cfg: FinetuneConfig,
                ctx: DistContext) -> _Data:
    """Train and val images with the backbone's preprocessing (train: augmented), and this rank's batching."""
    train_idx, val_idx, val_source = split
    eval_tf = bb.transform if cfg.in_chans == 3 else eval_transform(bb.preprocess, cfg.in_chans)
    train_set = Images([ds.abspath(i) for i in train_idx], ds.labels[train_idx],
                       train_transform(cfg.augment, bb.preprocess, eval_tf, cfg.in_chans), cfg.in_chans)
    val_set = Images([ds.abspath(i) for i in val_idx], ds.labels[val_idx], eval_tf, cfg.in_chans)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    common = dict(batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate,
                  pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    world, rank = ctx.world_size, ctx.rank
    # DDP: every rank steps equally often, so DistributedSampler pads the shards to ceil(N / world) images
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if ctx.enabled else None
    per_rank = len(sampler) if sampler else len(train_set)
    drop_last = per_rank > cfg.batch_size  # a last batch of 1 would break BatchNorm in train mode
    steps_per_epoch = per_rank // cfg.batch_size if drop_last else 1
    # validation shards interleave without padding (DistributedSampler would repeat images): the sums are exact
    val_shard = Subset(val_set, range(rank, len(val_set), world)) if ctx.enabled else val_set
    return _Data(ds.classes, train_set, val_set, val_source, DataLoader(val_shard, shuffle=False, **common),
                 sampler, common, drop_last, steps_per_epoch)


def _build_optim(net: _Net, thawed: int, cfg: FinetuneConfig, steps_per_epoch: int) -> _Optim:
    """The strategy's parameter groups with ``thawed`` backbone groups trainable, the loss and the schedule."""
    n = len(net.groups)
    set_trainable(net.model, net.groups, thawed)
    opt = make_optimizer(param_groups(net.model, net.groups, cfg.strategy, cfg.lr, cfg.lr_mult, cfg.weight_decay,
                                      thawed=thawed), cfg)
    ladder = [cfg.lr] * n if cfg.strategy == "full" else lr_ladder(n, cfg.lr, cfg.lr_mult)
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total // 5)
    return _Optim(opt, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), ladder, total, warmup)


def _resume(run: _Run, saved: dict[str, Any], progress: _Progress) -> None:
    """last.pt's weights, optimizer and loss-scaler state back in place. Under another world size the shards
    and steps per epoch differ: the lr schedule continues at the saved epoch."""
    run.net.model.load_state_dict(saved["model"])
    run.optim.opt.load_state_dict(saved["optimizer"])
    run.net.scaler.load_state_dict(saved["scaler"])
    saved_world, world = saved.get("world_size", 1), run.ctx.world_size
    if saved_world != world:
        progress.step = progress.epoch * run.data.steps_per_epoch
        log.info("resuming a %d-process run in %d: the lr schedule continues at epoch %d (step %d)",
                 saved_world, world, progress.epoch, progress.step)
    log.info("resumed %s after epoch %d of %d", run.run_dir, progress.epoch, run.cfg.epochs)


# ------------------------------------------------------------------------------------ one epoch
def _run_epoch(run: _Run, progress: _Progress) -> dict[str, Any]:
    """Epoch ``progress.epoch + 1``: thaw, train, validate, keep the best, decide early stopping, write RUN_DIR.
    Returns the epoch's metrics record (a line of metrics.jsonl)."""
    cfg, ctx, epoch, groups = run.cfg, run.ctx, progress.epoch, run.net.groups
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(_seed_epoch(cfg.seed, epoch, ctx.rank))
    _thaw(run, progress, epoch)
    net = run.trainee(progress.thawed)
    loss_sum, correct, seen = _train_one_epoch(run, net, run.data.train_loader(epoch, gen), progress)
    train_s = time.perf_counter() - t0
    val_loss, val_acc = _validate(run)
    rec = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": {g["name"]: g["lr"] for g in run.optim.opt.param_groups},
        "thawed_groups": [groups[i].name for i in range(len(groups) - progress.thawed, len(groups))],
        "trainable_params": count_trainable(run.net.model),
        "train_images_per_s": seen / train_s if train_s > 0 else None,
        "seconds": time.perf_counter() - t0,
    }
    improved = progress.record(rec, cfg.patience, cfg.epochs)
    progress.stopped_early = ctx.from_main(progress.stopped_early)  # the same metrics everywhere; rank 0 decides
    if ctx.is_main:
        _save_epoch(run, progress, rec, improved)
    ctx.barrier()  # no rank runs ahead (or exits) before the epoch is on disk
    log.info("epoch %d/%d: train loss %.4f acc %.3f, val loss %.4f acc %.3f, %.1fs", epoch + 1, cfg.epochs,
             rec["train_loss"], rec["train_acc"], val_loss, val_acc, rec["seconds"])
    if progress.stopped_early:
        log.info("early stop: no better val accuracy for %d epochs (best %.3f at epoch %d)", cfg.patience,
                 progress.best["val_acc"], progress.best["epoch"])
    return rec


def _thaw(run: _Run, progress: _Progress, epoch: int) -> None:
    """The groups the strategy thaws by ``epoch`` join the optimizer (gradual: from the top, one group at a
    time, each at its ladder lr); then requires_grad and train/eval modes for the epoch."""
    cfg, model, groups, n = run.cfg, run.net.model, run.net.groups, len(run.net.groups)
    want = thawed_count(cfg.strategy, n, epoch, cfg.unfreeze_every)
    for i in range(n - 1 - progress.thawed, n - 1 - want, -1):
        for g in backbone_group_params(model, groups, i, run.optim.ladder[i], cfg.weight_decay):
            run.optim.opt.add_param_group(g)
        log.info("epoch %d: thawed %s", epoch + 1, groups[i].name)
    progress.thawed = want
    train_mode(model, groups, cfg.strategy, want)


def _train_one_epoch(run: _Run, net: nn.Module, loader: DataLoader, progress: _Progress) -> list[float]:
    """One pass of ``net`` over ``loader``, the lr following the schedule at ``progress.step`` (advanced per
    batch). Returns [summed loss, correct, images] over all ranks (DDP padding repeats included)."""
    ctx, device, memory_format = run.ctx, run.ctx.device, run.net.memory_format
    opt, total, warmup = run.optim.opt, run.optim.total, run.optim.warmup
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y, bad in tqdm(loader, unit="batch", desc=f"epoch {progress.epoch + 1}/{run.cfg.epochs}",
                          disable=not (run.bar and ctx.is_main), mininterval=0.5, dynamic_ncols=True):
        run.note_skipped(bad)
        if x is None:
            if ctx.enabled:  # skipping would leave the other ranks waiting in this step's all-reduce
                raise DatasetError(f"rank {ctx.rank}: a whole batch of images failed to decode ({bad[0][1]}); "
                                   f"remove the broken files or train in one process")
            continue
        x = x.to(device, non_blocking=True, memory_format=memory_format)  # (B, C, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        loss, logits = train_step(net, opt, run.optim.criterion, x, y, lr_factor(progress.step, total, warmup),
                                  run.net.scaler, run.net.amp, run.cfg.grad_clip, params)
        progress.step += 1
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return ctx.sum([loss_sum, correct, seen])


def _validate(run: _Run) -> tuple[float, float]:
    """(val loss, val accuracy) of the model, exact over all ranks' shards and the same on every rank."""
    ctx, net = run.ctx, run.net
    ctx.sync_buffers(net.model)  # rank 0's BatchNorm statistics: every rank evaluates the model rank 0 saves
    loss, correct, n = ctx.sum(eval_sums(net.model, run.data.val_loader, ctx.device, net.amp, net.memory_format))
    return loss / max(n, 1), correct / max(n, 1)


def _save_epoch(run: _Run, progress: _Progress, rec: dict[str, Any], improved: bool) -> None:
    """Rank 0, after each epoch: best.pt when it improved, metrics.jsonl, curves.png and last.pt, each written
    beside the old one and all renamed over them together (last.pt last): a full disk or a crash keeps the previous
    epoch's files whole, so the run resumes from them. Checkpoints carry the sha256 of what they hold."""
    cfg, net = run.cfg, run.net
    best = seal(_probe_checkpoint(net.model, net.bb, run.data.classes, cfg, rec)) if improved else None
    last = seal({"epoch": progress.epoch, "step": progress.step, "thawed": progress.thawed,
                 "history": progress.history, "best": progress.best, "stopped_early": progress.stopped_early,
                 "config": cfg.to_dict(), "model": net.model.state_dict(), "optimizer": run.optim.opt.state_dict(),
                 "scaler": net.scaler.state_dict(), "world_size": run.ctx.world_size})
    files = [run.best_path] * improved + [run.run_dir / "metrics.jsonl", run.run_dir / "curves.png", run.last_path]
    need = tensor_bytes(last) + tensor_bytes(best) + 2**20  # + framing, the metrics and the plot
    what = (f"the files of epoch {progress.epoch - 1} in {run.run_dir} are unchanged: continue with --resume"
            if progress.epoch > 1 else "nothing of this run was saved")
    from .plots import plot_curves  # matplotlib: imported only when there is a plot to draw

    with atomic_paths(files, need=need, what=what) as tmps:
        if best is not None:
            torch.save(best, tmps[0])
        tmps[-3].write_text("".join(json.dumps(r) + "\n" for r in progress.history))
        plot_curves(progress.history, tmps[-2], title=f"{net.bb.name} {cfg.strategy}")
        torch.save(last, tmps[-1])


def _summary(run: _Run, progress: _Progress) -> dict[str, Any]:
    """What `finetune` returns: the data, the groups, the best epoch and where RUN_DIR's files are."""
    history, best, model = progress.history, progress.best, run.net.model
    speeds = [r["train_images_per_s"] for r in history if r["train_images_per_s"]]
    return {
        "run_dir": str(run.run_dir),
        "backbone": run.net.bb.name,
        "strategy": run.cfg.strategy,
        "classes": run.data.classes,
        "train_images": len(run.data.train_set),
        "val_images": len(run.data.val_set),
        "val_source": run.data.val_source,
        "layer_groups": [g.name for g in run.net.groups],
        "epochs_run": len(history),
        "stopped_early": progress.stopped_early,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "val_acc": [r["val_acc"] for r in history],
        "trainable_params": history[-1]["trainable_params"] if history else count_trainable(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "seconds": round(sum(r["seconds"] for r in history), 3),
        "train_images_per_s": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "skipped": sorted(run.skipped),
        "device": str(run.ctx.device),
        "world_size": run.ctx.world_size,
        "best": str(run.best_path),
        "last": str(run.last_path),
        "metrics": str(run.run_dir / "metrics.jsonl"),
        "curves": str(run.run_dir / "curves.png"),
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
