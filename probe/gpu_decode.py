"""JPEGs decoded on the GPU: nvjpeg in batches, then the weights' resize + centre crop on the device.

The reader ``extract`` picks on CUDA (``ExtractConfig.decode``: auto|cpu|gpu; auto = gpu when the device is CUDA,
the pixel path is uint8 and there are no augmented views). It yields the same ``Decoded`` batches as the CPU reader
-- (B, H, W, 3) uint8, here already on the device, which the Embedder normalises in place -- so the extract loop
does not know which reader ran:

    DataLoader workers (CPU, cheap)                    main process (GPU)
    read the file's bytes; check JPEG magic, EOI,      decode_jpeg(list of bytes, device="cuda")   (batched nvjpeg)
    header (PIL's lazy open: size, mode, max_pixels,   -> EXIF orientation (flips / rot90 on the device)
    EXIF orientation) -- no pixel is decoded           -> resize + centre crop (PixelTransform.steps), grouped
    anything else -> the CPU path in the worker           by decoded size, then stacked in batch order
    (load_image + PixelTransform: PNG, CMYK or grey     a JPEG nvjpeg refuses -> the CPU path for that file
    JPEG, truncated, empty, bomb ...)                   (same skip reasons as the CPU reader when it is bad)

Tolerance against the CPU reader (PIL/libjpeg-turbo decode + torch's uint8 CPU resize): the resize and crop are the
same torchvision v2 calls with the weights' size rule, interpolation and antialias, on a (B, 3, H, W) uint8 tensor.
On the CPU they run torch's native uint8 kernels: the same pixels as ``PixelTransform`` (tested, as is torchvision's
CPU JPEG decode: the same pixels as Pillow's). On CUDA torchvision resizes in float32 and rounds back to uint8: on
real photos that float path is a mean 0.15-0.2 grey levels from the uint8 kernel, at most 1 (bilinear) to 4
(bicubic overshoot). nvjpeg's IDCT and chroma upsampling (the A100/H100/H200 hardware decoder for baseline JPEGs,
CUDA for progressive ones) differ from libjpeg-turbo's by a few grey levels, more at colour edges, and a large JPEG
is decoded at full size where the CPU path may DCT-scale it (``draft``). Stated tolerance, measured on an H200
(2026-12-04, tests/test_cuda.py on real photos): pixels a mean 0.44 grey levels from the CPU reader's, 99th
percentile 4, max 38 at colour edges (the test asserts a mean under 2 and a 99th percentile of at most 12);
efficientnet_lite0 float32 embeddings with cosine >= 0.998 to the CPU reader's (min 0.9983; asserted >= 0.997).
That is a larger change than float16 autocast makes (0.99995), and well inside what separates two photos, so the
two readers stay interchangeable -- a JPEG nvjpeg refuses is read on the CPU inside a GPU-decoded batch.
A store does not record the decoder in its identity (as it does not record the device); ``extract_config.decode``
records what was asked.

Example:
    >>> reader = GpuReader(paths, emb.pixels, emb.device, MAX_PIXELS, emb.draft, batches, workers=8)
    >>> for batch in reader: emb(batch.images)
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image

from .data import FootprintFn, check_size
from .errors import BackboneError, ProbeError
from .transforms import apply_steps

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
JPEG_MAGIC = b"\xff\xd8\xff"  # SOI + the first marker
JPEG_EOI = b"\xff\xd9"
ORIENTATION = 0x0112  # EXIF tag

# ------------------------------------------------------------------------------------------ choosing


def check_decode(decode: str, device: str, pixels: str, views: int) -> None:
    """The cheap checks of ``ExtractConfig.decode`` (before any model loads); ProbeError naming the flag."""
    from .device import resolve_device

    if decode not in DECODE_MODES:
        raise ProbeError(f"unknown decode {decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode != "gpu":
        return
    if pixels != "uint8":
        raise ProbeError(f"--decode gpu resizes on uint8 tensors: it needs --pixels uint8, not --pixels {pixels}")
    if views:
        raise ProbeError(f"--decode gpu does not make augmented views (--views {views}): use --decode cpu or auto")
    if resolve_device(device).type != "cuda":
        raise ProbeError(f"--decode gpu needs a CUDA device, not {device!r}: use --decode cpu or auto")


@functools.cache
def nvjpeg_available(device: str) -> bool:
    """Whether torchvision decodes JPEGs on ``device`` (built with nvjpeg, and a version taking a list): one tiny
    JPEG decoded there, once per device."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        return tuple(out[0].shape) == (3, 16, 16)
    except Exception as e:  # noqa: BLE001 - any failure means: decode on the CPU
        log.info("no GPU JPEG decode on %s: %s: %s", device, type(e).__name__, e)
        return False


def choose_decode(decode: str, device: torch.device, pixels: Any, views: int) -> str:
    """'gpu' or 'cpu': the reader a run uses. ``pixels`` is the embedder's PixelTransform (None on the PIL path).

    auto -> gpu when the device is CUDA, the transform has a uint8 form, there are no views and torchvision can
    decode there; an explicit gpu that cannot run raises instead of quietly running on the CPU."""
    if decode == "cpu" or (decode == "auto" and (device.type != "cuda" or pixels is None or views)):
        return "cpu"
    if decode == "gpu" and pixels is None:
        raise BackboneError("--decode gpu resizes on uint8 tensors, and this backbone's transform has no uint8 form: "
                            "use --decode cpu")
    if not nvjpeg_available(str(device)):
        if decode == "gpu":
            raise ProbeError(f"--decode gpu: torchvision cannot decode JPEGs on {device} (built without nvjpeg?): "
                             "use --decode cpu")
        return "cpu"
    return "gpu"


# --------------------------------------------------------------------------------- workers: bytes only
def read_jpeg(path: str, max_pixels: int, footprint: FootprintFn | None = None) -> tuple[bytes, int] | None:
    """(the file's bytes, its EXIF orientation) when nvjpeg should decode it; None when the CPU path must: not a
    JPEG, not a 3-channel one (CMYK, grey), no end marker (truncated, or trailing data), over ``max_pixels`` or
    resized by the transform's ``footprint`` to more (``probe.data.check_size``), a header Pillow cannot read, or a
    file that cannot be read (the CPU path words every reason, and refuses those sizes). Decodes no pixel."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\x00").endswith(JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the markers, not the scan
                w, h = img.size
                if img.format != "JPEG" or img.mode != "RGB" or w < 1 or h < 1:
                    return None
                check_size(w, h, max_pixels, footprint)  # raises: the CPU path refuses it, with the reason
                orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - any doubt: the CPU path decides, and words the reason
        return None
    return data, orientation if isinstance(orientation, int) else 1


class Encoded(NamedTuple):
    """A batch as the workers hand it over (a NamedTuple: pin_memory keeps its type). ``order`` is the batch's
    dataset indices, which the decoded rows follow."""

    data: torch.Tensor | None  # the JPEGs' bytes, concatenated (uint8, 1-D)
    sizes: list[int]  # byte length of each JPEG in ``data``
    orientation: list[int]  # EXIF orientation of each (1 = upright)
    jpeg_indices: list[int]  # dataset index of each
    pixels: torch.Tensor | None  # (n, H, W, 3) uint8: files the workers decoded on the CPU
    pixel_indices: list[int]
    failed: list[tuple[int, str]]  # (dataset index, reason) of files that do not decode
    order: list[int]


class _JpegFiles(torch.utils.data.Dataset):
    """An item: ("jpeg", (bytes, orientation), i, "") for nvjpeg, else the CPU path's own item for file i --
    ("pixels", (H, W, 3) uint8, i, "") or ("bad", None, i, reason)."""

    def __init__(self, paths: Sequence[str], transform, max_pixels: int, draft: int | None = None):
        from .extract import _Files

        self.paths, self.max_pixels = paths, max_pixels
        self.cpu = _Files(list(paths), transform, max_pixels, draft=draft)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        got = read_jpeg(self.paths[i], self.max_pixels, self.cpu.footprint)
        if got is not None:
            return "jpeg", got, i, ""
        x, i, reason = self.cpu[i]
        return ("pixels" if x is not None else "bad"), x, i, reason


def _collate_encoded(items) -> Encoded:
    jpegs = [(x, i) for kind, x, i, _ in items if kind == "jpeg"]
    pixels = [(x, i) for kind, x, i, _ in items if kind == "pixels"]
    chunks = [data for (data, _), _ in jpegs]
    return Encoded(
        data=torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else None,
        sizes=[len(c) for c in chunks], orientation=[o for (_, o), _ in jpegs], jpeg_indices=[i for _, i in jpegs],
        pixels=torch.stack([x for x, _ in pixels]) if pixels else None, pixel_indices=[i for _, i in pixels],
        failed=[(i, reason) for kind, _, i, reason in items if kind == "bad"], order=[i for _, _, i, _ in items])


# ------------------------------------------------------------------------------ main process: the GPU
def decode_jpegs(jpegs: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """1-D uint8 CPU tensors of JPEG bytes -> (3, H, W) uint8 on ``device`` (nvjpeg, batched, on CUDA; libjpeg on
    the CPU), None for each one that does not decode there. One bad file fails a batched call (no partial
    results): then each is decoded alone to find it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
        try:
            return list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device))
        except Exception as e:  # noqa: BLE001 - a corrupt stream: find it below
            if len(jpegs) == 1:
                log.debug("GPU JPEG decode failed: %s", e)
                return [None]
        out: list[torch.Tensor | None] = []
        for x in jpegs:
            try:
                out.append(decode_jpeg([x], mode=ImageReadMode.RGB, device=device)[0])
            except Exception:  # noqa: BLE001 - the CPU path decides what is wrong with it
                out.append(None)
        return out


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) as EXIF ``orientation`` says to display it, as ``PIL.ImageOps.exif_transpose`` turns it (1 and
    unknown values: unchanged)."""
    hw = (-2, -1)
    if orientation == 2:
        return x.flip(-1)  # mirror
    if orientation == 3:
        return x.flip(hw)  # 180
    if orientation == 4:
        return x.flip(-2)  # upside down mirror
    if orientation == 5:
        return x.transpose(-2, -1)  # transpose
    if orientation == 6:
        return torch.rot90(x, -1, hw)  # 90 clockwise
    if orientation == 7:
        return x.transpose(-2, -1).flip(hw)  # transverse
    if orientation == 8:
        return torch.rot90(x, 1, hw)  # 90 counter-clockwise
    return x


def resize_crop(images: Sequence[torch.Tensor], steps: Sequence[tuple[str, dict[str, Any]]]) -> torch.Tensor:
    """(3, H, W) uint8 images of any sizes, on one device -> (B, h, w, 3) uint8 there, in their order: resized and
    cropped in groups of one decoded size (one call per size: a photo dataset has few), then stacked."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(k)
    if len(groups) == 1:  # one decoded size (a resized dataset): no scatter
        return apply_steps(torch.stack(list(images)), steps).permute(0, 2, 3, 1).contiguous()
    out: torch.Tensor | None = None
    for pos, ys in ((pos, apply_steps(torch.stack([images[k] for k in pos]), steps)) for pos in groups.values()):
        if out is None:
            out = torch.empty((len(images), *ys.shape[2:], ys.shape[1]), dtype=ys.dtype, device=ys.device)
        if len(pos) == 1:
            out[pos[0]] = ys[0].permute(1, 2, 0)  # no index tensor to copy over for a size of its own
        else:
            out[torch.tensor(pos, device=ys.device)] = ys.permute(0, 2, 3, 1)
    if out is None:
        raise ValueError("resize_crop needs at least one image")
    return out


PREFETCH = 2  # batches decoded ahead, in one thread, while the backbone runs (0: decode in the consumer's thread)
# True: that thread queues its kernels on a CUDA stream of its own. Measured on an H200 (2026-12-04, runs of
# benchmarks/bench_extract_gpu.py, 24,000-72,000 JPEGs; extract loop img/s, own stream against the consumer's):
# ResNet-50 mixed (8,329, 6,374 and 8,882 against 8,347, 7,769 and 7,892), efficientnet_lite0 slower (6,095 and
# 5,953 against 10,060 and 9,599). So the default is the consumer's stream.
SIDE_STREAM = False


def _record_stream(out: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator that ``stream`` uses the CUDA tensors in ``out`` (a tensor or a tuple holding
    some): memory made on the decode stream is then not handed out again while the consumer's kernels read it."""
    for x in out if isinstance(out, tuple) else (out,):
        if isinstance(x, torch.Tensor) and x.is_cuda:
            x.record_stream(stream)


def ahead(items: Iterable[Any], fn: Callable[[Any], Any], depth: int, device: torch.device) -> Iterator[Any]:
    """``fn(item)`` for each item, computed up to ``depth`` items ahead in one background thread, yielded in order;
    an exception there is raised here. On CUDA the thread runs on the consumer's device and, with ``SIDE_STREAM``,
    on a stream of its own: nvjpeg and the resize of the next batch may run on the GPU beside the backbone's
    kernels for this one instead of queued with them (measured no faster overall: see above). Each item's
    kernels end in an event the consumer's stream waits on before it is yielded, so the consumer's work on it is
    ordered after them; without ``SIDE_STREAM`` the thread uses the consumer's current stream, which orders the
    same work by queueing alone."""
    it = iter(items)  # the DataLoader's iterator is made in the consumer's thread (signal handlers)
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, end = threading.Event(), object()
    consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None
    stream = torch.cuda.Stream(device) if consumer is not None and SIDE_STREAM else consumer

    def work() -> None:
        try:
            with contextlib.ExitStack() as ctx:
                if stream is not None:
                    ctx.enter_context(torch.cuda.device(device))
                    ctx.enter_context(torch.cuda.stream(stream))
                for item in it:
                    if stop.is_set():
                        return
                    out, done = fn(item), None
                    if stream is not consumer:
                        done = torch.cuda.Event()
                        done.record(stream)
                    q.put((out, done, None))
            q.put((end, None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put((end, None, e))

    thread = threading.Thread(target=work, name="probe-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            out, done, err = q.get()
            if err is not None:
                raise err
            if out is end:
                return
            if done is not None:
                consumer.wait_event(done)
                _record_stream(out, consumer)
            yield out
    finally:  # also when the consumer stops early: let the thread see `stop`, unblocking its put
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class GpuReader:
    """Batches of dataset indices -> ``Decoded`` batches with (B, H, W, 3) uint8 images on ``device``: workers
    read bytes, nvjpeg decodes, torchvision resizes and crops on the device (see the module's docstring), ``prefetch``
    batches ahead in a thread (0: in the consumer's thread)."""

    def __init__(self, paths: Sequence[str], pixels, device: torch.device | str, max_pixels: int,
                 draft: int | None, batches: list[list[int]], workers: int, prefetch: int | None = None):
        from torch.utils.data import DataLoader

        self.pixels, self.device = pixels, torch.device(device)
        self.prefetch = PREFETCH if prefetch is None else prefetch
        self.files = _JpegFiles(paths, pixels, max_pixels, draft)
        self.loader = DataLoader(self.files, batch_sampler=batches, num_workers=workers,
                                 collate_fn=_collate_encoded, pin_memory=self.device.type == "cuda",
                                 prefetch_factor=4 if workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.prefetch > 0:
            yield from ahead(self.loader, self.decode, self.prefetch, self.device)
        else:
            for enc in self.loader:
                yield self.decode(enc)

    def decode(self, enc: Encoded):
        """One Encoded batch -> Decoded, rows in the batch's order. A JPEG nvjpeg refuses goes through the CPU
        path here (decoded, or skipped with that path's reason)."""
        from .extract import Decoded

        rows: dict[int, torch.Tensor] = {}  # dataset index -> (3, H, W) uint8 on the device, before resize
        failed = dict(enc.failed)
        cpu_rows: dict[int, torch.Tensor] = {}  # dataset index -> (h, w, 3) uint8, resized on the CPU
        if enc.data is not None:
            jpegs = list(torch.split(enc.data, enc.sizes))
            for i, o, x in zip(enc.jpeg_indices, enc.orientation, decode_jpegs(jpegs, self.device)):
                if x is not None:
                    rows[i] = orient(x, o)
                    continue
                y, _, reason = self.files.cpu[i]
                if y is None:
                    failed[i] = reason
                else:
                    log.debug("%s: nvjpeg refused it, decoded on the CPU", self.files.paths[i])
                    cpu_rows[i] = y
        if enc.pixels is not None:
            cpu_rows.update(zip(enc.pixel_indices, enc.pixels))
        order = [i for i in enc.order if i in rows or i in cpu_rows]
        images = None
        if order:
            images = self._assemble(order, rows, cpu_rows, enc.pixels, enc.pixel_indices)
        return Decoded(images, None, order, [(i, failed[i]) for i in enc.order if i in failed])

    def _assemble(self, order: list[int], rows: dict[int, torch.Tensor], cpu_rows: dict[int, torch.Tensor],
                  pixels: torch.Tensor | None, pixel_order: list[int]) -> torch.Tensor:
        """(B, h, w, 3) uint8 on the device in ``order``: nvjpeg's rows resized here, the CPU path's copied over."""
        gpu = [i for i in order if i in rows]
        done = resize_crop([rows[i] for i in gpu], self.pixels.steps) if gpu else None
        cpu = [i for i in order if i in cpu_rows]
        if done is not None and not cpu:
            return done  # the common case: every file decoded by nvjpeg, already in batch order
        host = pixels if cpu == pixel_order else torch.stack([cpu_rows[i] for i in cpu])  # pinned when unchanged
        host = host.to(self.device, non_blocking=True)
        if done is None:
            return host
        out = torch.empty((len(order), *done.shape[1:]), dtype=torch.uint8, device=self.device)
        where = {i: k for k, i in enumerate(order)}
        out[torch.tensor([where[i] for i in gpu], device=self.device)] = done
        out[torch.tensor([where[i] for i in cpu], device=self.device)] = host
        return out
