"""Layer groups (input -> output) of a stripped backbone, and the optimizer's parameter groups per strategy.

A *layer group* is a contiguous slice of the network that gets one learning rate and thaws as one: the
seeds' conv1/layer1…layer4 ladder for ResNets, the equivalent stages for the other torchvision families, and
timm's own ``group_matcher(coarse=True)`` for timm models (the grouping timm's layer-wise lr decay uses).

Example:
    >>> groups = layer_groups(bb.model, "resnet18")
    >>> [g.name for g in groups]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    >>> [round(g["lr"], 6) for g in param_groups(model, groups, "differential", lr=1e-3, lr_mult=10)][::2]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

log = logging.getLogger(__name__)

GENERIC_GROUPS = 5  # groups for a family without a known layout: fastai's body split, about as coarse as a ResNet's
NO_DECAY_SUFFIXES = ("cls_token", "class_token", "pos_embed", "pos_embedding", "dist_token", "reg_token")


@dataclass
class LayerGroup:
    """One rung of the ladder: parameter and buffer names relative to the backbone."""

    name: str
    params: list[str]
    buffers: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- layouts
def _chunks(items: list[str], n: int) -> list[list[str]]:
    """``items`` in at most ``n`` contiguous, nearly equal chunks (no empty ones)."""
    return [list(c) for c in np.array_split(np.array(items, dtype=object), min(n, len(items))) if len(c)]


def _label(prefixes: list[str]) -> str:
    return prefixes[0] if len(prefixes) == 1 else f"{prefixes[0]}…{prefixes[-1].rsplit('.', 1)[-1]}"


def _children(module: nn.Module, prefix: str = "") -> list[str]:
    """Dotted names of the direct children of ``module`` that hold parameters, in registration order."""
    return [f"{prefix}{n}" for n, c in module.named_children() if any(True for _ in c.parameters())]


def _torchvision_layout(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    """(group name, module/parameter prefixes) per group for the torchvision families we know, else None."""
    kind = type(model).__name__
    if kind == "ResNet":  # the seeds' ladder (ResNet, ResNeXt, Wide ResNet)
        return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
    if kind in ("EfficientNet", "MobileNetV2", "MobileNetV3", "MNASNet"):  # stem conv, then blocks in 4 chunks
        seq = "layers" if kind == "MNASNet" else "features"
        blocks = _children(getattr(model, seq), f"{seq}.")
        return [("stem", blocks[:1])] + [(_label(c), c) for c in _chunks(blocks[1:], GENERIC_GROUPS - 1)]
    if kind == "VGG":  # one group per conv block, each ending at a MaxPool
        out, cur = [], []
        for n, m in model.features.named_children():
            cur.append(f"features.{n}")
            if isinstance(m, nn.MaxPool2d):
                out.append((f"block{len(out) + 1}", cur))
                cur = []
        return out + ([(f"block{len(out) + 1}", cur)] if cur else [])
    if kind in ("ConvNeXt", "SwinTransformer"):  # features: stem, stage1, (downsample, stage) x 3
        f = [f"features.{n}" for n, _ in model.features.named_children()]
        return [("stem", f[:1]), ("stage1", f[1:2])] + [(f"stage{i // 2 + 1}", f[i:i + 2]) for i in range(2, len(f), 2)]
    if kind == "VisionTransformer":  # patch embedding + tokens, encoder layers in 4 chunks (final ln: "top")
        layers = _children(model.encoder.layers, "encoder.layers.")
        return [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])] + [
            (f"encoder{c[0].rsplit('_', 1)[-1]}-{c[-1].rsplit('_', 1)[-1]}", c) for c in _chunks(layers, 4)]
    return None


def _generic_layout(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Top-level children (the largest expanded until there are enough) in GENERIC_GROUPS contiguous groups."""
    items = _children(model)
    while len(items) < GENERIC_GROUPS:
        sizes = [sum(p.numel() for p in model.get_submodule(n).parameters()) for n in items]
        order = [i for i in np.argsort(sizes)[::-1] if len(_children(model.get_submodule(items[i])))]
        if not order:
            break
        i = order[0]
        items[i:i + 1] = _children(model.get_submodule(items[i]), f"{items[i]}.")
    return [(_label(c), c) for c in _chunks(items, GENERIC_GROUPS)]


def _assign(model: nn.Module, layout: list[tuple[str, list[str]]]) -> list[LayerGroup]:
    """Each parameter/buffer goes to the first group with a matching prefix; the rest (a final norm, a
    pre-logits MLP the classifier strip left behind) forms a last group "top"."""
    groups = [LayerGroup(name, []) for name, _ in layout] + [LayerGroup("top", [])]

    def index(tensor_name: str) -> int:
        for i, (_, prefixes) in enumerate(layout):
            if any(tensor_name == p or tensor_name.startswith(p + ".") for p in prefixes):
                return i
        return len(layout)

    for n, _ in model.named_parameters():
        groups[index(n)].params.append(n)
    for n, _ in model.named_buffers():
        groups[index(n)].buffers.append(n)
    return _drop_empty(groups)


def _drop_empty(groups: list[LayerGroup]) -> list[LayerGroup]:
    """Groups without parameters cannot train: their buffers join the next group (the last: the previous)."""
    kept: list[LayerGroup] = []
    pending: list[str] = []
    for g in groups:
        if g.params:
            g.buffers = pending + g.buffers
            pending = []
            kept.append(g)
        else:
            pending += g.buffers
    if pending and kept:
        kept[-1].buffers += pending
    return kept


def _timm_groups(model: nn.Module) -> list[LayerGroup]:
    from timm.models._manipulate import group_with_matcher

    matcher = model.group_matcher(coarse=True)
    params = {n for n, _ in model.named_parameters()}
    named = [(n, n) for n, _ in model.named_parameters()] + [(n, n) for n, _ in model.named_buffers()]
    by_id = group_with_matcher(named, matcher)  # {group ordinal: [tensor names]}, input side first
    groups = []
    for lid in sorted(by_id):
        names = by_id[lid]
        p = [n for n in names if n in params]
        groups.append(LayerGroup(_timm_label([n for n in (p or names)]), p, [n for n in names if n not in params]))
    return _drop_empty(groups)


def _timm_label(names: list[str]) -> str:
    heads = list(dict.fromkeys(".".join(n.split(".")[:2]) if n.split(".")[1:2] and n.split(".")[1].isdigit()
                               else n.split(".")[0] for n in names))
    return "+".join(heads) if len(heads) <= 3 else f"{heads[0]}…{heads[-1]}"


def layer_groups(model: nn.Module, name: str) -> list[LayerGroup]:
    """Layer groups of the stripped backbone ``model`` (registry ``name``), from input to output."""
    if hasattr(model, "group_matcher") and not type(model).__module__.startswith("torchvision"):
        groups = _timm_groups(model)
    else:
        layout = _torchvision_layout(model)
        if layout is None:
            layout = _generic_layout(model)
            log.info("%s (%s) has no known layer layout: split its top-level children into %d groups: %s",
                     name, type(model).__name__, len(layout), [g for g, _ in layout])
        groups = _assign(model, layout)
    covered = sum(len(g.params) for g in groups)
    assert covered == sum(1 for _ in model.parameters()), "every parameter belongs to exactly one group"
    return groups


# --------------------------------------------------------------------------------- optimizer groups
def lr_ladder(n: int, lr: float, lr_mult: float) -> list[float]:
    """Geometric learning rates for ``n`` groups, input side first: lr / lr_mult ... lr.

    Example:
        >>> lr_ladder(3, 1e-3, 100)
        [1e-05, 0.0001, 0.001]
    """
    if n == 1:
        return [lr]
    return [lr / lr_mult ** ((n - 1 - i) / (n - 1)) for i in range(n)]


def thawed_count(strategy: str, n_groups: int, epoch: int = 0, unfreeze_every: int = 1) -> int:
    """How many backbone groups (counted from the top) train in ``epoch`` (0-based)."""
    if strategy == "feature-extract":
        return 0
    if strategy == "gradual":
        return min(epoch // unfreeze_every, n_groups)
    return n_groups


def _no_decay(name: str, p: nn.Parameter, skip: set[str]) -> bool:
    """Norm weights, biases, class tokens and position embeddings: decaying them only hurts (timm, BiT)."""
    return p.ndim <= 1 or name in skip or name.endswith(NO_DECAY_SUFFIXES)


def _split_decay(label: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 skip: set[str]) -> list[dict[str, Any]]:
    decay = [p for n, p in named if not _no_decay(n, p, skip)]
    rest = [p for n, p in named if _no_decay(n, p, skip)]
    out = []
    if decay:
        out.append({"name": label, "params": decay, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
    if rest:
        out.append({"name": f"{label} (no decay)", "params": rest, "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    return out


def backbone_group_params(model: nn.Module, groups: list[LayerGroup], i: int, lr: float, weight_decay: float
                          ) -> list[dict[str, Any]]:
    """The optimizer groups (decay, no decay) of backbone layer group ``i`` of ``model`` (a FinetuneModel)."""
    params = dict(model.backbone.named_parameters())
    skip = set(getattr(model.backbone, "no_weight_decay", lambda: set())())
    return _split_decay(groups[i].name, [(n, params[n]) for n in groups[i].params], lr, weight_decay, skip)


def param_groups(model: nn.Module, groups: list[LayerGroup], strategy: str, lr: float, lr_mult: float = 10.0,
                 weight_decay: float = 0.05, thawed: int | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for ``strategy``: the head first, then the thawed backbone groups
    from the top down (the order `gradual` adds them in). Pure: requires_grad is not touched.

    Each group has ``name``, ``params``, ``lr`` (= ``base_lr``, the peak the schedule scales) and
    ``weight_decay`` (0 for 1-D parameters). ``thawed`` overrides how many backbone groups train.

    Learning rates: feature-extract: head only; full: ``lr`` everywhere; differential and gradual: the
    geometric ladder lr / lr_mult (first group) … lr (last group), the head at lr.
    """
    n = len(groups)
    k = thawed_count(strategy, n) if thawed is None else thawed
    ladder = [lr] * n if strategy == "full" else lr_ladder(n, lr, lr_mult)
    out = _split_decay("head", list(model.head.named_parameters()), lr, weight_decay, set())
    for i in range(n - 1, n - 1 - k, -1):
        out += backbone_group_params(model, groups, i, ladder[i], weight_decay)
    return out


def set_trainable(model: nn.Module, groups: list[LayerGroup], thawed: int) -> None:
    """requires_grad on for the head and the top ``thawed`` backbone groups, off elsewhere."""
    params = dict(model.backbone.named_parameters())
    model.head.requires_grad_(True)
    for i, g in enumerate(groups):
        for n in g.params:
            params[n].requires_grad_(i >= len(groups) - thawed)


def frozen_norms(model: nn.Module, groups: list[LayerGroup], thawed: int) -> list[nn.Module]:
    """BatchNorm layers of the frozen groups: kept in eval mode so their running statistics stay as loaded."""
    owner = {n: i for i, g in enumerate(groups) for n in g.params + g.buffers}
    frozen = len(groups) - thawed
    out = []
    for name, m in model.backbone.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            i = owner.get(f"{name}.weight", owner.get(f"{name}.running_mean", math.inf))
            if i < frozen:
                out.append(m)
    return out
