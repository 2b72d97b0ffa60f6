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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import BackboneError, ProbeError

Step = tuple[str, dict[str, Any]]  # ("resize" | "keep_ratio" | "crop", its arguments)


def resized_size(width: int, height: int, size: Any, max_size: int | None = None) -> tuple[int, int]:
    """(W, H) that torchvision's ``Resize(size, max_size=max_size)`` makes of a width x height image, by arithmetic
    alone: an int or [int] is the shorter side (the longer one scaled and truncated, then both capped so the longer
    is at most ``max_size``), [h, w] is the output itself, None puts the longer side at ``max_size``. The rule of
    ``torchvision.transforms.functional._compute_resized_output_size`` (tests/test_faults_images.py compares).

    Example:
        >>> resized_size(12000, 1, 256)   # a 12000x1 strip, shortest side to 256
        (3072000, 256)
    """
    short, long = sorted((width, height))
    if size is not None and not isinstance(size, int) and len(size) == 2:
        return int(size[1]), int(size[0])
    if size is None:
        new_short, new_long = int(max_size * short / long), max_size
    else:
        new_short = size if isinstance(size, int) else int(size[0])
        new_long = int(new_short * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


class Footprint:
    """The largest image a preprocessing allocates on the way to the model's input, from the source's size alone:
    ``footprint(w, h) -> (W, H)``, checked against the pixel limit before any pixel is decoded (``probe.data.decode``).

    A shortest-side resize keeps the aspect ratio, so a 12000x1 PNG (12,000 pixels: far under any source limit)
    becomes 3072000x256 before a 224x224 crop -- 786 Mpx, 2.4 GB of RGB. Each step counts what it holds: a resize
    its output and its one-axis intermediate (torch's and Pillow's separable kernels resize one axis, then the
    other: a source-height x output-width, or output-height x source-width, buffer), a crop its output (padded when
    larger than the image). Steps that do not change the size (to tensor, normalise) are not steps here.

    Example:
        >>> Footprint.of(create_backbone("efficientnet_lite0").pixels)(12000, 1)
        (3072000, 256)
    """

    def __init__(self, steps: list[Step]):
        self.steps = steps

    @classmethod
    def of(cls, transform: Callable) -> Footprint:
        """The resize and crop steps of any preprocessing probe runs: a ``PixelTransform``, a torchvision preset or a
        Compose (timm's ResizeKeepRatio and CenterCropOrPad included). No steps for a transform it cannot read: then
        only the source's own pixel count is bounded."""
        return cls(transform.steps if isinstance(transform, PixelTransform) else read_steps(transform)[0])

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) of the largest image the steps hold for a width x height source ((width, height) without steps)."""
        w, h = width, height
        held = [(w, h)]
        for kind, kw in self.steps:
            if kind == "resize":
                nw, nh = resized_size(w, h, kw["size"], kw.get("max_size"))
            elif kind == "keep_ratio":  # timm: scale by a ratio between the two sides' ratios, rounded
                th, tw = kw["size"]
                rh, rw = h / th, w / tw
                ratio = max(rh, rw) * kw["longest"] + min(rh, rw) * (1 - kw["longest"])
                nw, nh = round(w / ratio), round(h / ratio)
            else:  # crop
                size = kw["size"]
                nh, nw = (size, size) if isinstance(size, int) else (size[0], size[-1])
            if kind != "crop":
                held += [(nw, h), (w, nh)]  # the one-axis pass, whichever axis goes first
            w, h = nw, nh
            held.append((w, h))
        return max(held[1:] or held, key=lambda s: s[0] * s[1])

    def __repr__(self) -> str:
        return f"Footprint({self.steps})"


_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor")


def read_steps(tf: Callable) -> tuple[list[Step], tuple[list[float], list[float]] | None]:
    """The resize and crop steps of a torchvision ``ImageClassification`` preset or a Compose (timm's eval transform
    included), and its Normalize's (mean, std) when ``PixelTransform`` runs the whole of it: Resize and CenterCrop,
    then ToTensor, then one Normalize. (steps, None) where it does not (timm's ResizeKeepRatio and CenterCropOrPad, a
    Lambda, anything not a Compose, …): the steps still bound the pixels the transform allocates (``Footprint``).
    """
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    tf = getattr(tf, "tf", tf)  # _PilToTensor
    if isinstance(tf, ImageClassification):
        return [("resize", {"size": list(tf.resize_size), "interpolation": tf.interpolation,
                            "antialias": tf.antialias}),
                ("crop", {"size": list(tf.crop_size)})], (list(tf.mean), list(tf.std))
    steps: list[Step] = []
    norm = None
    runs, tensor = isinstance(tf, T.Compose), False  # after ToTensor only Normalize may follow
    for t in getattr(tf, "transforms", []):
        step = _step(t)
        if step is not None:
            steps.append(step)
            runs = runs and not tensor and isinstance(t, (T.Resize, T.CenterCrop))  # torch's uint8 kernels
        elif type(t).__name__ in _TO_TENSOR and not tensor:
            tensor = True
        elif isinstance(t, T.Normalize) and tensor and norm is None:
            norm = [float(v) for v in t.mean], [float(v) for v in t.std]
        else:  # a member of another kind, or out of order
            runs = False
    return steps, (norm if runs else None)


def _step(t: Any) -> Step | None:
    """A Compose member as a step; None for members that keep the size (ToTensor, Normalize, …). A crop's
    ``offset`` is its rule for an odd margin (``centre_crop``): recorded where it is not torchvision's "round"
    (``probe.hf.HFCenterCrop``'s "floor")."""
    from torchvision import transforms as T

    name = type(t).__name__
    if isinstance(t, T.Resize):
        return "resize", {"size": t.size, "interpolation": t.interpolation, "max_size": t.max_size,
                          "antialias": t.antialias}
    if name == "ResizeKeepRatio":  # timm
        size = t.size if isinstance(t.size, (list, tuple)) else (t.size, t.size)
        return "keep_ratio", {"size": tuple(size), "longest": float(t.longest)}
    if isinstance(t, T.CenterCrop) or name == "CenterCropOrPad":  # timm's pads with its own fill
        offset = getattr(t, "offset", "round")
        return "crop", {"size": list(t.size), **({"offset": offset} if offset != "round" else {})}
    return None


def centre_crop(img: Any, size: Sequence[int], offset: str = "round") -> Any:
    """A centred (h, w) crop of a PIL image or a (..., H, W) tensor, starting at (H - h) / 2 (and likewise across)
    rounded half to even with "round" (torchvision's rule: 43 cropped to 32 starts at 6) or rounded down with
    "floor" (transformers': at 5). Smaller than the crop: padded by torchvision's rule, whatever the offset rule."""
    from torchvision.transforms.v2 import functional as F

    h, w = F.get_size(img)
    if offset == "round" or size[0] > h or size[-1] > w:
        return F.center_crop(img, list(size))
    return F.crop(img, (h - size[0]) // 2, (w - size[-1]) // 2, size[0], size[-1])


def apply_steps(x: torch.Tensor, steps: list[Step]) -> torch.Tensor:
    """``PixelTransform.steps`` on a (..., 3, H, W) uint8 tensor (one image, or a batch of one size): each resize
    with its size rule, interpolation and antialias, each centre crop with its offset rule."""
    from torchvision.transforms.v2 import functional as F  # v2: native uint8 kernels (v1 casts to float)

    for kind, kw in steps:
        if kind == "resize":
            x = F.resize(x, **kw)
        else:
            x = centre_crop(x, kw["size"], kw.get("offset", "round"))
    return x


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

    def __init__(self, steps: list[Step], mean: list[float], std: list[float]):
        self.steps, self.mean, self.std = steps, [float(v) for v in mean], [float(v) for v in std]

    @classmethod
    def from_transform(cls, tf: Callable) -> PixelTransform | None:
        """Read a torchvision ``ImageClassification`` preset or a Compose of Resize / CenterCrop / ToTensor /
        Normalize (what timm's eval transform is); None for anything else (the caller keeps the PIL path)."""
        steps, norm = read_steps(tf)
        return cls(steps, *norm) if norm is not None else None

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
        return apply_steps(self.chw(img), self.steps).permute(1, 2, 0).contiguous()

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
