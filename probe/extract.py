"""Run a frozen backbone over a dataset once and cache the embeddings in a feature store.

Resumable by construction: finished batches go to an fsync'd journal beside the store, the store itself is
replaced atomically at the end. After ``kill -9`` the same call picks up at the first unfinished batch, with the
same batch boundaries, so the features equal those of an uninterrupted run.

With ``views=K`` every image also gets K augmented views (seeded RandomResizedCrop + flip, ``ViewTransform``),
embedded into the store's ``views`` (N, K, D) beside its centre-crop ``features``: training data for heads that
augment (the MLP), still one decode and one pass of the backbone per run.

Example:
    >>> summary = extract("probe/demo/fashion-mnist", config=ExtractConfig(backbone="efficientnet_lite0"))
    >>> summary["count"], summary["store"]
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from .backbones import DEFAULT_BACKBONE, Backbone, BackboneError, PixelTransform, create_backbone
from .data import MAX_PIXELS, Dataset, ImageDecodeError, discover, fingerprint, load_image, to_rgb
from .errors import ProbeError
from .identity import FeatureIdentity, Side
from .shard import parse_shard, shard_path, take_shard
from .store import FeatureStore, Journal, locked, write_store

log = logging.getLogger(__name__)

TTA_MODES = ("none", "hflip")
PIXEL_PATHS = ("uint8", "pil")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExtractConfig:
    backbone: str | None = DEFAULT_BACKBONE  # None: the one a probe checkpoint in `weights` names
    weights: str | None = None  # None: the name's default pretrained weights; 'random'; or a checkpoint path
    batch_size: int = 64  # large enough for efficient GEMMs on CPU, small enough for any GPU
    workers: int = -1  # decode/resize processes; -1: one per core, at most 8
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: float16 on CUDA, bfloat16 on CPUs with native bf16 (4x faster there), else float32
    tta: str = "none"  # "hflip": mean of the image and its mirror
    pixels: str = "uint8"  # resize/crop on uint8 tensors (fast), or "pil": the weights' own PIL transform
    layout: str = "auto"  # see probe.data.discover
    max_pixels: int = MAX_PIXELS  # larger images are refused as decompression bombs
    channels_last: bool = True  # NHWC: faster convolutions on CPU (oneDNN) and GPU (tensor cores)
    prune: bool = False  # drop stored rows whose files have disappeared from DATA
    shard: str | None = None  # "I/N": embed only shard I of N (None: from torchrun's RANK/WORLD_SIZE, if any)
    views: int = 0  # K augmented views per image in /views (N, K, D), training data for the MLP head; 0: none

    def __post_init__(self) -> None:  # cheap checks first: a bad option fails before any model loads
        if self.tta not in TTA_MODES:
            raise ProbeError(f"unknown TTA {self.tta!r}: expected one of {', '.join(TTA_MODES)}")
        if self.pixels not in PIXEL_PATHS:
            raise ProbeError(f"unknown pixel path {self.pixels!r}: expected one of {', '.join(PIXEL_PATHS)}")
        if self.dtype not in DTYPES:
            raise ProbeError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ProbeError(f"batch size must be >= 1, got {self.batch_size}")
        if self.views < 0:
            raise ProbeError(f"--views must be >= 0 augmented views per image, got {self.views}")
        if self.views and self.pixels == "pil":
            raise ProbeError(f"--views {self.views} makes its views on uint8 tensors: it needs --pixels uint8, "
                             "not --pixels pil")
        resolve_device(self.device)
        parse_shard(self.shard)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeError(f"--device {device}: no CUDA device is available on this machine (use cpu or auto)")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ProbeError(f"unknown device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype not in DTYPES:
        raise ProbeError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


class Embedder:
    """A backbone on a device with a dtype and TTA: images in, float32 embeddings out.

    Example:
        >>> emb = Embedder(create_backbone("efficientnet_lite0"))
        >>> emb.embed_images([Image.open("cat.jpg")]).shape
        (1, 1280)
    """

    def __init__(self, backbone: Backbone, device: str = "auto", dtype: str = "auto", tta: str = "none",
                 channels_last: bool = True, pixels: str = "uint8"):
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
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = backbone.model.to(self.device, memory_format=self.memory_format).eval()
        self._buffer: torch.Tensor | None = None  # reused (B, H, W, 3) float32 input on the CPU
        self._lock = threading.Lock()  # the buffer is shared: one batch at a time (the CPU runs one anyway)

    @property
    def identity(self) -> FeatureIdentity:
        """Everything that changes the numbers: the store's cache key is a hash of this."""
        ident = self.backbone.identity()
        if self.pixels is not None:  # recorded only when used: stores made by the PIL path keep their key
            ident["preprocess"] = {**ident["preprocess"], "pixels": "uint8"}
        return FeatureIdentity(**ident, pooling="penultimate", tta=self.tta, dtype=self.dtype)

    @property
    def config(self) -> dict[str, Any]:
        """``identity`` as recorded in files."""
        return self.identity.to_dict()

    @property
    def draft(self) -> int | None:
        """JPEGs may be decoded down to this many pixels a side (the uint8 path; see probe.data.decode)."""
        return self.pixels.draft if self.pixels is not None else None

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """One RGB image -> what ``__call__`` takes stacked: (H, W, 3) uint8, or (3, H, W) float on the PIL path.
        A small picklable object (no model): DataLoader workers get it."""
        return self.pixels if self.pixels is not None else self.backbone.transform

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
            return self._forward(x, tta and self.tta == "hflip")

    def _forward(self, x: torch.Tensor, hflip: bool) -> np.ndarray:
        if x.dtype == torch.uint8:
            x = self._normalise(x)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        b = x.shape[0]
        if hflip:
            x = torch.cat([x, x.flip(3)])  # (2B, 3, H, W): one forward for both views
        with torch.autocast(self.device.type, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32"):
            f = self.model(x)
        f = f.float().flatten(1)
        if hflip:
            f = (f[:b] + f[b:]) / 2
        return f.cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """PIL images (any mode) -> (N, D) float32."""
        out = [self(torch.stack([self.preprocess(to_rgb(im)) for im in images[s: s + batch_size]]))
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.backbone.dim), np.float32)

    def embed_files(self, paths: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, list[int], list[dict]]:
        """Decode and embed files a batch at a time: (features of the decodable ones, their indices, [{path,
        reason}] skipped). Memory holds one batch of images, however many files."""
        feats, ok, bad = [], [], []
        for s in range(0, len(paths), batch_size):
            images = []
            for i in range(s, min(s + batch_size, len(paths))):
                try:
                    images.append(load_image(str(paths[i]), draft=self.draft))
                    ok.append(i)
                except ImageDecodeError as e:
                    bad.append({"path": str(paths[i]), "reason": str(e)})
            if images:
                feats.append(self.embed_images(images, batch_size))
        return (np.concatenate(feats) if feats else np.zeros((0, self.backbone.dim), np.float32)), ok, bad


def weights_arg(identity: str) -> str | None:
    """Turn a recorded weights identity back into the `weights` argument that reproduces it."""
    if identity == "random":
        return "random"
    if identity.startswith("file:"):
        return identity[5:]
    if identity.startswith("torchvision:"):
        return identity.rsplit(".", 1)[-1]
    return None


def embedder_for(attrs: dict[str, Any], device: str = "auto") -> Embedder:
    """Rebuild the exact embedder recorded in a store's or head's attributes, refusing any difference.

    Used to embed query images for predict and search with the same backbone, weights and preprocessing."""
    bb = create_backbone(attrs["backbone"], weights_arg(attrs["weights"]))
    emb = Embedder(bb, device=device, dtype=attrs.get("dtype", "float32"), tta=attrs.get("tta", "none"),
                   pixels=(attrs.get("preprocess") or {}).get("pixels", "pil"))
    FeatureIdentity.from_config(attrs).check(
        emb.identity, mine=Side("recorded", verb=""), theirs=f"the backbone {attrs['backbone']} available now", features_only=True,
        ignore_versions=True, fix="The backbone available now differs from the one recorded: restore those weights "
        "or extract the features again with the weights you have.")
    return emb


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


def embed_views(emb: Embedder, views: torch.Tensor, batch_size: int) -> np.ndarray:
    """(B, K, H, W, 3) uint8 views -> (B, K, D) float32, forwarded ``batch_size`` at a time and without TTA (TTA
    averages a mirror into the centre features; a view already is an augmentation)."""
    b, k = views.shape[:2]
    flat = views.flatten(0, 1)  # (B*K, H, W, 3)
    out = [emb(flat[s: s + batch_size], tta=False) for s in range(0, len(flat), batch_size)]
    return np.concatenate(out).reshape(b, k, -1) if out else np.zeros((b, k, emb.backbone.dim), np.float32)


# ------------------------------------------------------------------------------------------- loading
class _Files(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; a bad file becomes (None, i, reason), never an exception.
    With ``views`` an item is (centre, views) of one decode, the views seeded by ``keys[i]`` (relative path)."""

    def __init__(self, paths: list[str], transform, max_pixels: int, views: ViewTransform | None = None,
                 keys: Sequence[str] = (), draft: int | None = None):
        self.paths, self.transform, self.max_pixels, self.draft = paths, transform, max_pixels, draft
        self.views, self.keys = views, keys

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i], self.max_pixels, self.draft)
            x = self.transform(img)
            return (x if self.views is None else (x, self.views(img, self.keys[i]))), i, ""
        except ImageDecodeError as e:
            return None, i, str(e)
        except Exception as e:  # noqa: BLE001 - a transform failing on an odd image must not stop the run
            return None, i, f"preprocessing failed: {type(e).__name__}: {e}"


def _collate(items):
    ok = [(x, i) for x, i, _ in items if x is not None]
    bad = [(i, r) for x, i, r in items if x is None]
    xs = [t for t, _ in ok]
    x = None  # (B, H, W, 3) or (B, 3, H, W); with views ((B, H, W, 3), (B, K, H, W, 3))
    if xs:
        x = tuple(torch.stack(p) for p in zip(*xs)) if isinstance(xs[0], tuple) else torch.stack(xs)
    return x, [i for _, i in ok], bad


def default_workers() -> int:
    """Decode processes: one per core, at most 8. With the uint8 pixel path decoding is ~1/10 of a CPU forward
    pass, so on the CPU 0, 1 or 2 workers end within noise of each other (benchmarks/bench_extract.py runs each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8)


def cache_dir() -> Path:
    return Path(os.environ.get("PROBE_CACHE_DIR", "cache"))


def default_store_path(ds: Dataset, backbone: str, key: str) -> Path:
    """cache/<dataset>-<hash of its path>.<backbone>.<config key>.h5: a new configuration gets a new file.
    The dataset is what DATA named: a folder, or a CSV manifest (two manifests in one folder get two stores)."""
    src = ds.source
    name = src.stem if src != ds.root else src.name
    slug = (name or "data") + "-" + hashlib.sha1(str(src).encode()).hexdigest()[:6]
    return cache_dir() / f"{slug}.{backbone.replace('/', '_')}.{key[:8]}.h5"


def _versions() -> dict[str, str]:
    import h5py
    import timm
    import torchvision

    return {"probe": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def extract(data: str | os.PathLike, out: str | os.PathLike | None = None, config: ExtractConfig | None = None,
            progress: bool = False, backbone: Backbone | None = None) -> dict[str, Any]:
    """Embed every image of DATA not already in the store; returns a summary dict.

    Raises DatasetError / BackboneError / StoreError when the run cannot start; bad images never raise."""
    cfg = config or ExtractConfig()
    ds = discover(data, cfg.layout)
    shard = parse_shard(cfg.shard)
    device = cfg.device
    if shard and device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun rank
    emb = Embedder(backbone or create_backbone(cfg.backbone, cfg.weights), device, cfg.dtype, cfg.tta,
                   cfg.channels_last, cfg.pixels)
    views = None
    identity = emb.identity
    if cfg.views:
        if emb.pixels is None:
            raise BackboneError(f"--views {cfg.views}: augmented views are made on uint8 tensors, and the "
                                f"transform of {emb.backbone.name} has no uint8 form ({emb.backbone.transform!r})")
        views = ViewTransform(emb.pixels, cfg.views)
        identity = replace(identity, views={"count": cfg.views, "augment": views.recipe})  # a key of its own
    key = identity.key
    out = Path(out) if out else default_store_path(ds, emb.backbone.name, key)
    if shard:
        ds, out = take_shard(ds, shard), shard_path(out, shard)
        log.info("shard %d/%d: %d files -> %s", *shard, len(ds), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):
        return _extract_locked(ds, emb, identity, out, cfg, progress, shard, views)


def _extract_locked(ds, emb, identity: FeatureIdentity, out: Path, cfg: ExtractConfig, progress: bool,
                    shard: tuple[int, int] | None = None, views: ViewTransform | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    stored: dict[str, str] = {}
    stored_meta: dict[str, tuple[int, str]] = {}
    old_skipped: dict[str, tuple[str, str]] = {}  # path -> (fingerprint, reason) recorded by earlier runs
    old_classes: list[str] = []
    created = None
    key = identity.key
    if out.exists():
        old = FeatureStore(out)
        old.identity.check(identity, mine=Side("store", str(out)), theirs="this run", fix="Use another --out "
                           "(the default path is keyed by configuration) or delete the old store.")
        old_paths = old.paths()
        stored = dict(zip(old_paths, old.fingerprints()))
        stored_meta = dict(zip(old_paths, zip(old.labels().tolist(), old.splits().tolist())))
        skip_fps = old.skipped_fingerprints()
        old_skipped = {x["path"]: (skip_fps[x["path"]], x["reason"]) for x in old.skipped()}
        old_classes, created = old.classes, old.attrs.get("created")
    fps = [fingerprint(ds.abspath(i)) for i in range(len(ds))]
    todo = [i for i, p in enumerate(ds.paths)
            if stored.get(p) != fps[i] and old_skipped.get(p, ("",))[0] != fps[i]]

    journal = Journal(f"{out}.journal")
    header, records = journal.read()
    if header is not None and header.get("config_key") != key:
        log.warning("%s belongs to another configuration: discarding it", journal.path)
        header, records = None, []
    if header is None:
        journal.start({"config_key": key, "store": str(out)})
    done: dict[str, str] = {}  # path -> fingerprint of every image embedded in the journal (features stay on disk)
    bad: dict[str, tuple[str, str]] = {}  # path -> (fingerprint, reason)
    for r in records:
        done.update(zip(r["paths"].tolist(), r["fingerprints"].tolist()))
        for p, fp, why in zip(r["bad_paths"].tolist(), r["bad_fingerprints"].tolist(), r["bad_reasons"].tolist()):
            bad[p] = (fp, why)

    def finished(i: int) -> bool:
        p = ds.paths[i]
        return done.get(p) == fps[i] or (p in bad and bad[p][0] == fps[i])

    # Batches are cut from the to-do list before the journal is consulted: a resumed run sees the same batch
    # boundaries as an uninterrupted one, so every image goes through the same forward pass.
    batches = [todo[s: s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    batches = [b for b in ([i for i in b if not finished(i)] for b in batches) if b]
    n_resumed = sum(finished(i) for i in todo)
    if n_resumed:
        log.info("resuming %s: %d images already done in the journal", out, n_resumed)
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    loader = DataLoader(
        _Files([ds.abspath(i) for i in range(len(ds))], emb.preprocess, cfg.max_pixels, views, ds.paths, emb.draft),
        batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=emb.device.type == "cuda", prefetch_factor=4 if workers else None,
    )
    n_new = sum(len(b) for b in batches)
    t_run = time.perf_counter()
    n_embedded = 0
    with tqdm(total=n_new, unit="img", disable=not progress, desc=f"extract {emb.backbone.name}",
              mininterval=0.5, dynamic_ncols=True) as bar:
        for x, idx, failed in loader:
            x, v = x if isinstance(x, tuple) else (x, None)  # centre crops, and (B, K, H, W, 3) views if any
            feats = emb(x) if x is not None else np.zeros((0, emb.backbone.dim), np.float32)  # (B, D)
            for i, reason in failed:
                log.warning("skipped %s: %s", ds.abspath(i), reason)
            extra = {}
            if views is not None:
                extra["views"] = embed_views(emb, v, cfg.batch_size) if v is not None else \
                    np.zeros((0, views.count, emb.backbone.dim), np.float32)  # (B, K, D)
            journal.append(
                features=feats.astype(np.float32),
                paths=np.array([ds.paths[i] for i in idx], dtype=str),
                fingerprints=np.array([fps[i] for i in idx], dtype=str),
                bad_paths=np.array([ds.paths[i] for i, _ in failed], dtype=str),
                bad_fingerprints=np.array([fps[i] for i, _ in failed], dtype=str),
                bad_reasons=np.array([r for _, r in failed], dtype=str),
                **extra,
            )
            n_embedded += len(idx)
            done.update((ds.paths[i], fps[i]) for i in idx)
            for i, r in failed:
                bad[ds.paths[i]] = (fps[i], r)
            bar.update(len(idx) + len(failed))
    run_seconds = time.perf_counter() - t_run

    # ---- merge: the store mirrors DATA; rows of vanished files stay unless prune
    classes = sorted(set(ds.classes) | set(old_classes))
    cindex = {c: i for i, c in enumerate(classes)}
    in_ds = {p: i for i, p in enumerate(ds.paths)}
    rows: dict[str, tuple[str, int, str]] = {}
    new: set[str] = set()  # paths whose vectors come from the journal
    stale = [p for p in stored if p not in in_ds]
    for p in stored:  # stored rows first, in stored order
        if p in in_ds:
            i = in_ds[p]
            if p in bad and bad[p][0] == fps[i]:
                continue  # the file changed and no longer decodes: its old row would be wrong
            y = ds.labels[i]
            rows[p] = (done.get(p, stored[p]),
                       cindex[ds.classes[y]] if y >= 0 else -1, ds.splits[i])
        elif not cfg.prune:
            y, sp = stored_meta[p]
            rows[p] = (stored[p], cindex[old_classes[y]] if y >= 0 else -1, sp)
    for i, p in enumerate(ds.paths):
        if done.get(p) == fps[i]:
            new.add(p)
            if p not in rows:
                y = ds.labels[i]
                rows[p] = (fps[i], cindex[ds.classes[y]] if y >= 0 else -1, ds.splits[i])
    skipped = {p: bad[p] for p in ds.paths if p in bad and bad[p][0] == fps[in_ds[p]]}
    skipped.update({p: (fp, old_reason) for p, (fp, old_reason) in old_skipped.items()
                    if p in in_ds and fp == fps[in_ds[p]] and p not in skipped and p not in new})
    attrs = {
        **identity.to_dict(),
        "config_key": key,
        "classes": classes,
        "root": str(ds.root),
        "layout": ds.layout,
        "device": str(emb.device),
        "versions": _versions(),
        "extract_config": {k: v for k, v in asdict(cfg).items() if k not in ("prune",)},
    }
    if shard:  # the completion marker: the store file only ever appears whole (atomic rename)
        attrs.update(shard=f"{shard[0]}/{shard[1]}", complete=True)
    if created:
        attrs["created"] = created
    changed = bool(new) or set(rows) != set(stored) or not out.exists() or \
        skipped.keys() != old_skipped.keys() or classes != old_classes
    if changed:
        write_store(out, attrs, rows, journal.features(), skipped, emb.backbone.dim,
                    new={p for p in new if p not in stored}, views=cfg.views)
    journal.remove()
    if stale:
        log.warning("%d stored images are no longer under %s (e.g. %s): %s", len(stale), ds.root, stale[0],
                    "dropped (--prune)" if cfg.prune else "kept; pass --prune to drop them")
    elapsed = time.perf_counter() - t0
    return {
        "store": str(out),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "count": len(rows),
        "dim": emb.backbone.dim,
        "views": cfg.views,  # augmented views per image in /views (TTA applies to `features` only)
        "backbone": emb.backbone.name,
        "classes": classes,
        "embedded": n_embedded,  # by this process; `resumed` more came from an interrupted run's journal
        "reused": len(rows) - len(new),
        "resumed": n_resumed,
        "skipped": [{"path": p, "reason": r} for p, (_, r) in sorted(skipped.items())],
        "stale": 0 if cfg.prune else len(stale),
        "pruned": len(stale) if cfg.prune else 0,
        "ignored": len(ds.ignored),
        "device": str(emb.device),
        "dtype": emb.dtype,
        "seconds": round(elapsed, 3),
        "images_per_s": round(n_new / run_seconds, 2) if n_new and run_seconds > 0 else None,
    }

