"""A backbone on a device, in a dtype, with its TTA: images in, float32 embeddings out.

The one object that turns pixels into vectors, for the extraction loop, for query images (predict, search, the
service) and in a notebook. ``embedder_for`` rebuilds the exact embedder a store or head recorded.

Example:
    >>> emb = Embedder(create_backbone("efficientnet_lite0"))
    >>> X, paths = emb.embed_folder("photos/")  # (N, 1280) float32, and the files they came from
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone, create_backbone
from .data import MAX_PIXELS, ImageDecodeError, ResizeTooLarge, images_in, load_image, to_rgb
from .device import query_dtype, resolve_device, resolve_dtype
from .engine import create_engine, input_hw
from .errors import ProbeError
from .identity import FeatureIdentity, Side
from .transforms import Footprint, PixelTransform

log = logging.getLogger(__name__)

TTA_MODES = ("none", "hflip")
PIXEL_PATHS = ("uint8", "pil")


class Embedder:
    """A backbone on a device with a dtype and TTA: images in, float32 embeddings out.

    Example:
        >>> emb = Embedder(create_backbone("efficientnet_lite0"))
        >>> emb.embed_images([Image.open("cat.jpg")]).shape
        (1, 1280)
    """

    def __init__(self, backbone: Backbone, device: str = "auto", dtype: str = "auto", tta: str = "none",
                 channels_last: bool = True, pixels: str = "uint8", engine: str = "auto"):
        if tta not in TTA_MODES:
            raise ProbeError(f"unknown TTA {tta!r}: expected one of {', '.join(TTA_MODES)}")
        if pixels not in PIXEL_PATHS:
            raise ProbeError(f"unknown pixel path {pixels!r}: expected one of {', '.join(PIXEL_PATHS)}")
        self.backbone = backbone
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tta = tta
        # uint8: resize + crop on uint8 tensors, normalised per batch on the device; pil: the weights' own PIL
        # transform per image (also where a transform has no uint8 form)
        self.pixels = backbone.pixels if pixels == "uint8" else None
        # what runs the backbone: torch, or ONNX Runtime (float32 on the CPU, exported once per identity and input
        # size under cache/engines). Engines that give interchangeable features (cosine >= 0.9999 to torch float32)
        # are not part of the identity: a store records which one ran (provenance), its key does not change.
        self.engine = create_engine(engine, backbone.model, replace(self.identity, tta="none").key,
                                    input_hw(backbone.preprocess), self.device, self.dtype, channels_last)
        self._buffer: torch.Tensor | None = None  # reused (B, H, W, 3) float32 input on the CPU
        self._lock = threading.Lock()  # the buffer is shared: one batch at a time (the CPU runs one anyway)

    @property
    def identity(self) -> FeatureIdentity:
        """Everything that changes the numbers: the store's cache key is a hash of this."""
        ident = self.backbone.identity()
        if self.pixels is not None:  # recorded only when used: stores made by the PIL path keep their key
            ident["preprocess"] = {**ident["preprocess"], "pixels": "uint8"}
            if any(kw.get("offset", "round") != "round" for _, kw in self.pixels.steps):
                # transformers' crop rule: the uint8 path once rounded here (one pixel off); the key differs from
                # such stores', so their rows are never mixed with these
                ident["preprocess"]["crop_offset"] = "floor"
        return FeatureIdentity(**ident, pooling=self.backbone.pooling, tta=self.tta, dtype=self.dtype)

    @property
    def config(self) -> dict[str, Any]:
        """``identity`` as recorded in files."""
        return self.identity.to_dict()

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def draft(self) -> int | None:
        """JPEGs may be decoded down to this many pixels a side (the uint8 path; see probe.data.decode)."""
        return self.pixels.draft if self.pixels is not None else None

    @cached_property
    def footprint(self) -> Footprint:
        """(w, h) of a source -> (W, H) of the largest image ``preprocess`` allocates for it: what the pixel limit
        is checked against, with the source's own size, before a file is decoded (``probe.data.check_size``)."""
        return Footprint.of(self.preprocess)

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """One RGB image -> what ``__call__`` takes stacked: (H, W, 3) uint8, or (3, H, W) float on the PIL path.
        A small picklable object (no model): DataLoader workers get it."""
        return self.pixels if self.pixels is not None else self.backbone.transform

    # ---- the forward pass
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 channels-last on the device."""
        if self.device.type != "cpu":
            return self.pixels.normalise(x.to(self.device, non_blocking=True))  # 1/4 of the bytes cross the bus
        if self._buffer is None or self._buffer.shape[1:] != x.shape[1:] or self._buffer.shape[0] < x.shape[0]:
            self._buffer = torch.empty(x.shape, dtype=torch.float32)  # fresh pages cost more than the arithmetic
        return self.pixels.normalise(x, self._buffer[: x.shape[0]])

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, tta: bool = True) -> np.ndarray:
        """A batch from ``preprocess``: (B, H, W, 3) uint8 or (B, 3, H, W) float -> (B, D) float32 embeddings.
        ``tta=False``: the plain forward even when the embedder has TTA (augmented views are embedded so)."""
        with self._lock:
            x = self._normalise(x) if x.dtype == torch.uint8 else x  # (B, 3, H, W) float32
            if not (tta and self.tta == "hflip"):
                return self.engine(x)
            b = x.shape[0]
            f = self.engine(torch.cat([x, x.flip(3)]))  # (2B, D): one forward for both views
            return (f[:b] + f[b:]) / 2

    # ---- notebook conveniences
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """PIL images (any mode) -> (N, D) float32. ProbeError for an image whose resize would need more than
        ``MAX_PIXELS`` pixels (an extreme aspect ratio: see ``footprint``)."""
        for i, im in enumerate(images):
            rw, rh = self.footprint(*im.size)
            if rw * rh > MAX_PIXELS:
                raise ProbeError(f"image {i}: {ResizeTooLarge(*im.size, (rw, rh), MAX_PIXELS)}")
        out = [self(torch.stack([self.preprocess(to_rgb(im)) for im in images[s: s + batch_size]]))
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_files(self, paths: Sequence[str], batch_size: int = 64, progress: bool = False
                    ) -> tuple[np.ndarray, list[int], list[dict]]:
        """Decode and embed files a batch at a time: (features of the decodable ones, their indices, [{path,
        reason}] skipped). Memory holds one batch of images, however many files. ``progress``: a bar on stderr."""
        from tqdm.auto import tqdm

        feats, ok, bad = [], [], []
        with tqdm(total=len(paths), unit="img", disable=not progress, desc=f"embed {self.backbone.name}",
                  dynamic_ncols=True) as bar:
            for s in range(0, len(paths), batch_size):
                images = []
                for i in range(s, min(s + batch_size, len(paths))):
                    try:
                        images.append(load_image(str(paths[i]), draft=self.draft, footprint=self.footprint))
                        ok.append(i)
                    except ImageDecodeError as e:
                        bad.append({"path": str(paths[i]), "reason": str(e)})
                if images:
                    feats.append(self.embed_images(images, batch_size))
                bar.update(min(batch_size, len(paths) - s))
        return (np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)), ok, bad

    def embed_folder(self, folder: str | os.PathLike, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
        """Every image file under ``folder`` (recursively, sorted) -> ((N, D) float32, the N paths). Files that do
        not decode are logged and left out. For a cached, resumable store of a dataset use ``probe.extract``.

        Example:
            >>> X, paths = emb.embed_folder("photos/")
        """
        paths = images_in(folder)
        feats, ok, bad = self.embed_files(paths, batch_size)
        for x in bad:
            log.warning("skipped %s: %s", x["path"], x["reason"])
        return feats, [paths[i] for i in ok]


def embed_views(emb: Embedder, views: torch.Tensor, batch_size: int) -> np.ndarray:
    """(B, K, H, W, 3) uint8 views -> (B, K, D) float32, forwarded ``batch_size`` at a time and without TTA (TTA
    averages a mirror into the centre features; a view already is an augmentation)."""
    b, k = views.shape[:2]
    flat = views.flatten(0, 1)  # (B*K, H, W, 3)
    out = [emb(flat[s: s + batch_size], tta=False) for s in range(0, len(flat), batch_size)]
    return np.concatenate(out).reshape(b, k, -1) if out else np.zeros((b, k, emb.dim), np.float32)


# ------------------------------------------------------------------------------------------- recorded
def weights_arg(identity: str) -> str | None:
    """Turn a recorded weights identity back into the `weights` argument that reproduces it."""
    if identity == "random":
        return "random"
    if identity.startswith("file:"):
        return identity[5:]
    if identity.startswith("torchvision:"):
        return identity.rsplit(".", 1)[-1]
    return None


def embedder_for(attrs: dict[str, Any], device: str = "auto", engine: str = "auto") -> Embedder:
    """Rebuild the embedder recorded in a store's or head's attributes, refusing any difference in backbone,
    weights, preprocessing or layer: it embeds query images for predict, search and serve.

    The one allowed difference is precision: half-precision features are queried in float32 on a device that
    does not compute that half precision natively (``probe.device.query_dtype``): a GPU store (float16) on a
    CPU-only machine runs at CPU float32 speed, with ONNX Runtime under ``engine="auto"``."""
    recorded = FeatureIdentity.from_config(attrs)
    dtype = query_dtype(recorded.dtype, resolve_device(device))
    if dtype != recorded.dtype:
        log.info("features recorded in %s; queries on %s run in %s (cosine >= 0.995 to the recorded precision)",
                 recorded.dtype, resolve_device(device), dtype)
    bb = create_backbone(attrs["backbone"], weights_arg(attrs["weights"]), layer=recorded.layer)
    emb = Embedder(bb, device=device, dtype=dtype, tta=recorded.tta, engine=engine,
                   pixels=recorded.preprocess.get("pixels", "pil"))
    if emb.pixels is not None and "crop_offset" not in recorded.preprocess:  # a store of a probe whose uint8 path
        # rounded every crop's offset (torchvision's rule, one pixel off transformers' floor): its queries crop alike
        steps = [(k, {n: v for n, v in kw.items() if n != "offset"}) for k, kw in emb.pixels.steps]
        emb.pixels = PixelTransform(steps, emb.pixels.mean, emb.pixels.std)
    replace(recorded, dtype=dtype).check(
        emb.identity, mine=Side("recorded", verb=""), theirs=f"the backbone {attrs['backbone']} available now",
        features_only=True, ignore_versions=True, fix="The backbone available now differs from the one recorded: "
        "restore those weights or extract the features again with the weights you have.")
    return emb
