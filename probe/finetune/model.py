"""The network a fine-tuning run trains: the stripped backbone plus a new linear head, and first-conv surgery
for inputs with other than 3 channels."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ProbeError

log = logging.getLogger(__name__)


class FinetuneModel(nn.Module):
    """``backbone`` (B, C, H, W) -> (B, dim) penultimate features, ``head`` (B, dim) -> (B, classes) logits."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))  # (B, dim) -> (B, K)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """(dotted name, module) of the convolution that sees the image: timm's pretrained_cfg names it; for
    torchvision models it is the first registered Conv2d with 3 input channels."""
    cfg_name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(cfg_name, str):
        m = model.get_submodule(cfg_name)
        if isinstance(m, nn.Conv2d):
            return cfg_name, m
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return name, m
    raise ProbeError(f"{type(model).__name__} has no 3-channel Conv2d to adapt for --in-chans")


def adapt_rgb_kernel(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, 3, k, k) RGB kernel -> (O, in_chans, k, k).

    1 channel: the sum of the RGB kernels (a grey image then gives exactly the response of its RGB copy);
    2 channels: the mean kernel x 1.5 each (same property); more than 3: RGB kept, every extra channel gets the
    mean RGB kernel, as the seeds do for 5-channel input.
    """
    if in_chans == 1:
        return w.sum(1, keepdim=True)
    if in_chans == 2:
        return w.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    extra = w.mean(1, keepdim=True).repeat(1, in_chans - 3, 1, 1)  # (O, N - 3, k, k)
    return torch.cat([w, extra], 1)


def adapt_first_conv(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace the image convolution of ``model`` by one taking ``in_chans`` channels, its weights derived
    from the pretrained RGB ones (``adapt_rgb_kernel``). In place; returns ``model``."""
    if in_chans == 3:
        return model
    name, conv = first_conv(model)
    if conv.groups != 1:
        raise ProbeError(f"cannot adapt {name} of {type(model).__name__} to {in_chans} channels: grouped convolution")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_rgb_kernel(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    log.info("adapted %s to %d input channels from its RGB weights", name, in_chans)
    return model


def channel_stats(values: list[float], in_chans: int) -> list[float]:
    """Per-channel mean or std for ``in_chans`` channels from the RGB ones (extras: their mean)."""
    avg = sum(values) / len(values)
    if in_chans < 3:
        return [avg] * in_chans
    return list(values) + [avg] * (in_chans - 3)
