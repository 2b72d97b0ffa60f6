"""What a fine-tuning run needs to know: one dataclass, its fields one-to-one with `probe finetune`'s options."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ProbeError

STRATEGIES = ("feature-extract", "full", "differential", "gradual")
AUGMENTS = ("seeds", "randaugment", "none")
OPTIMIZERS = ("adamw", "sgd")
# fields that may change between a run and its --resume without changing the numbers
RESUME_FREE = ("resume", "workers", "device", "patience")


@dataclass
class FinetuneConfig:
    backbone: str = "efficientnet_lite0"  # registry name (probe backbones); its pretrained weights are the start
    weights: str | None = None  # None: the name's pretrained weights; 'random' (tests); or a checkpoint path
    strategy: str = "differential"  # feature-extract | full | differential | gradual
    epochs: int = 10  # at most; early stopping may end sooner
    batch_size: int = 32  # fits a ResNet-50 at 224 px in 8 GB with mixed precision
    lr: float = 1e-3  # peak lr of the head and of the top backbone group (after warm-up)
    lr_mult: float = 10.0  # differential/gradual: the first (input-side) group trains at lr / lr_mult
    unfreeze_every: int = 1  # gradual: thaw one more backbone group from the top every N epochs
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    weight_decay: float = 0.05  # AdamW's decoupled decay; never applied to norms, biases, tokens
    warmup_epochs: float = 1.0  # linear warm-up, then cosine to zero; capped at a fifth of the run
    label_smoothing: float = 0.1  # as in timm's and torchvision's ImageNet recipes
    augment: str = "seeds"  # seeds: RandomResizedCrop + flip + ColorJitter(0.2, 0.2, 0.2) | randaugment | none
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    patience: int = 5  # early stopping: epochs without a better val accuracy; 0 = never stop early
    val_fraction: float = 0.2  # held out of train (stratified, seeded) when DATA has no val split
    in_chans: int = 3  # input channels; != 3 adapts the first convolution's pretrained RGB kernels
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16 + loss scaling)
    channels_last: bool = True  # NHWC memory format on CUDA (tensor cores); ignored on CPU
    device: str = "auto"  # auto: cuda when present, else cpu
    workers: int = -1  # decode/augment processes; -1: one per core, at most 8
    seed: int = 0  # head init, holdout, shuffling, augmentation: a run is reproducible from it
    resume: bool = False  # continue RUN_DIR/last.pt after a crash or Ctrl-C
    layout: str = "auto"  # see probe.data.discover

    def __post_init__(self) -> None:  # cheap checks first: a bad option fails before any model loads
        def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ProbeError(f"unknown {name} {value!r}: expected one of {', '.join(allowed)}")

        one_of("strategy", self.strategy, STRATEGIES)
        one_of("augment", self.augment, AUGMENTS)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        for f in fields(self):  # NaN fails every comparison below, so it would pass them all: refused first
            value = getattr(self, f.name)
            if f.type == "float" and not math.isfinite(value):
                raise ProbeError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("unfreeze_every", 1), ("in_chans", 1)):
            if getattr(self, name) < low:
                raise ProbeError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ProbeError(f"--lr must be > 0, got {self.lr}")
        if not self.lr_mult >= 1:
            raise ProbeError(f"--lr-mult must be >= 1 (the first group trains at lr / lr_mult), got {self.lr_mult}")
        if not 0 < self.val_fraction < 1:
            raise ProbeError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise ProbeError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("weight_decay", "grad_clip", "warmup_epochs", "patience"):
            if not getattr(self, name) >= 0:
                raise ProbeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
