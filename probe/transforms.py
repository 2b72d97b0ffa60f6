"""Pixels on uint8 tensors: a weights' centre crop (``PixelTransform``) and seeded augmented views of it
(``ViewTransform``). Both are small picklable objects without a model, run in DataLoader workers; the Embedder
normalises their (H, W, 3) uint8 output per batch on its device.

Example:
    >>> pt = PixelTransform.from_transform(create_backbone("efficientnet_lite0").transform)
    >>> vt = ViewTransform(pt, count=4)
    >>> pt(img).shape, vt(img, "cats/cat.jpg").shape
    (torch.Size([224, 224, 3]), torch.Size([4, 224, 224, 3]))
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import BackboneError, ProbeError


class PixelTransform:
    """The geometric half of a weights' eval transform, run on uint8 tensors: PIL RGB -> (H, W, 3) uint8.

    Resize (same size rule, interpolation and antialiasing) and centre crop go through torch's vectorised uint8
    kernels, about 3x faster than the float path and within a grey level or two of Pillow's; the batch is normalised
    later in one pass (``normalise``), on the device. Large JPEGs are decoded at a reduced scale (``draft``). A batch
    of uint8 images is a quarter of the bytes of floats through the DataLoader's shared memory and the host-to-GPU
    copy.

    Example:
        >>> pt = PixelTransform.from_transform(create_backbone("efficientnet_lite0").transform)
        >>> pt(Image.open("cat.jpg").convert("RGB")).shape
        torch.Size([224, 224, 3])
    """

    def __init__(self, steps: list[tuple[str, dict[str, Any]]], mean: list[float], std: list[float]):
        self.steps, self.mean, self.std = steps, [float(v) for v in mean], [float(v) for v in std]

    @classmethod
    def from_transform(cls, tf: Callable) -> PixelTransform | None:
        """Read a torchvision ``ImageClassification`` preset or a Compose of Resize / CenterCrop / ToTensor /
        Normalize (what timm's eval transform is); None for anything else (the caller keeps the PIL path)."""
        from torchvision import transforms as T
        from torchvision.transforms._presets import ImageClassification

        tf = getattr(tf, "tf", tf)  # _PilToTensor
        if isinstance(tf, ImageClassification):
            return cls([("resize", {"size": list(tf.resize_size), "interpolation": tf.interpolation,
                                    "antialias": tf.antialias}),
                        ("crop", {"size": list(tf.crop_size)})], tf.mean, tf.std)
        if not isinstance(tf, T.Compose):
            return None
        steps: list[tuple[str, dict[str, Any]]] = []
        mean = std = None
        tensor = False  # after ToTensor only Normalize may follow
        for t in tf.transforms:
            if isinstance(t, T.Resize) and not tensor:
                steps.append(("resize", {"size": t.size, "interpolation": t.interpolation, "max_size": t.max_size,
                                         "antialias": t.antialias}))
            elif isinstance(t, T.CenterCrop) and not tensor:
                steps.append(("crop", {"size": list(t.size)}))
            elif type(t).__name__ in ("ToTensor", "MaybeToTensor", "PILToTensor") and not tensor:
                tensor = True
            elif isinstance(t, T.Normalize) and tensor and mean is None:
                mean, std = [float(v) for v in t.mean], [float(v) for v in t.std]
            else:
                return None
        if mean is None:
            return None
        return cls(steps, mean, std)

    @property
    def draft(self) -> int | None:
        """Smallest side a JPEG may be decoded at (DCT scaling, ``probe.data.decode``): twice the resize target, so
        the antialiased resize still averages >= 2x2 decoded pixels per output pixel."""
        for kind, kw in self.steps:
            if kind == "resize":
                size = kw["size"]
                return 2 * (size if isinstance(size, int) else max(size))
        return None

    @staticmethod
    def chw(img) -> torch.Tensor:
        """PIL RGB -> (3, H, W) uint8, a view of HWC memory (the layout torch's uint8 resize kernels prefer)."""
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def __call__(self, img) -> torch.Tensor:  # PIL RGB -> (H, W, 3) uint8
        from torchvision.transforms.v2 import functional as F  # v2: native uint8 kernels (v1 casts to float)

        x = self.chw(img)
        for kind, kw in self.steps:
            x = F.resize(x, **kw) if kind == "resize" else F.center_crop(x, kw["size"])
        return x.permute(1, 2, 0).contiguous()

    def normalise(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 channels-last, ``(x / 255 - mean) / std``; into ``out``
        (a reused (B, H, W, 3) float32 buffer) when given: no fresh allocation per batch."""
        scale = torch.tensor([1 / (255 * s) for s in self.std], device=x.device)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=x.device)
        y = out.copy_(x) if out is not None else x.float()
        return y.mul_(scale).add_(shift).permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels-last

    def __repr__(self) -> str:
        return f"PixelTransform({self.steps}, mean={self.mean}, std={self.std})"


# ---------------------------------------------------------------------------------------- augmented views
VIEW_SCALE = (0.25, 1.0)  # area fraction of a view's crop: wider than 0.08 (ImageNet training), since a frozen
VIEW_RATIO = (3 / 4, 4 / 3)  # backbone is evaluated on whole objects, and tiny crops would mostly teach noise
VIEW_FLIP = 0.5  # probability of a horizontal flip


class ViewTransform:
    """K seeded augmented views of an RGB image on uint8 tensors: RandomResizedCrop to the weights' crop size
    (their interpolation, antialiased) + horizontal flip; PIL RGB -> (K, H, W, 3) uint8, normalised later by the
    Embedder like ``PixelTransform``'s centre crops.

    The crop and flip of view k of the file at relative path p are drawn from sha1(p, k): a file gets the same views
    in every run — resumed, sharded or re-run on a grown folder — whatever else the folder holds.

    Example:
        >>> vt = ViewTransform(create_backbone("efficientnet_lite0").pixels, count=4)
        >>> vt(Image.open("cat.jpg").convert("RGB"), "cats/cat.jpg").shape
        torch.Size([4, 224, 224, 3])
    """

    def __init__(self, pixels: PixelTransform, count: int, scale: tuple[float, float] = VIEW_SCALE,
                 ratio: tuple[float, float] = VIEW_RATIO, flip: float = VIEW_FLIP):
        from torchvision.transforms import InterpolationMode

        if count < 1:
            raise ProbeError(f"views per image must be >= 1, got {count}")
        self.count, self.scale, self.ratio, self.flip = count, scale, ratio, flip
        resize = next((kw for kind, kw in pixels.steps if kind == "resize"), {})
        size = next((kw["size"] for kind, kw in reversed(pixels.steps) if kind == "crop"), None)
        if size is None and isinstance(resize.get("size"), (list, tuple)) and len(resize["size"]) == 2:
            size = resize["size"]  # resize to a fixed (H, W) without a crop
        if size is None:
            raise BackboneError(f"augmented views need a fixed input size, and {pixels!r} has none")
        size = [size, size] if isinstance(size, int) else list(size)
        self.size = [int(size[0]), int(size[-1])]  # (H, W) of the model's input
        self.interpolation = resize.get("interpolation", InterpolationMode.BILINEAR)

    @property
    def recipe(self) -> str:
        """What the store records (and its config key hashes): change the augmentation, change this string."""
        interp = getattr(self.interpolation, "value", self.interpolation)
        return (f"RandomResizedCrop({self.size[0]}x{self.size[1]}, scale=({self.scale[0]:g}, {self.scale[1]:g}), "
                f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}), interpolation={interp}, antialias) "
                f"+ HorizontalFlip(p={self.flip:g}); uint8; seed=sha1(path, view)")

    def params(self, key: str, view: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) of view ``view`` of the file ``key`` in a height x width image: torchvision's
        RandomResizedCrop.get_params (10 tries, then a centre crop of the nearest allowed ratio), seeded."""
        seed = int.from_bytes(hashlib.sha1(f"{key}\0{view}".encode()).digest()[:8], "big")
        rng = random.Random(seed)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            area = height * width * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                box = (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
                break
        if box is None:
            in_ratio = width / height
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        return (*box, rng.random() < self.flip)

    def __call__(self, img, key: str) -> torch.Tensor:  # PIL RGB -> (K, H, W, 3) uint8
        from torchvision.transforms.v2 import functional as F  # v2: native uint8 kernels (v1 casts to float)

        x = PixelTransform.chw(img)  # (3, H, W)
        views = []
        for k in range(self.count):
            top, left, h, w, flip = self.params(key, k, x.shape[1], x.shape[2])
            v = F.resized_crop(x, top, left, h, w, self.size, interpolation=self.interpolation, antialias=True)
            views.append(F.horizontal_flip(v) if flip else v)  # (3, H, W)
        return torch.stack(views).permute(0, 2, 3, 1).contiguous()  # (K, H, W, 3)
