"""Datasets as probe sees them: a list of image files with labels and splits, and a decoder that turns any
file a user may have into an RGB image or a reason why it cannot.

Layouts (``discover``):
    * ImageFolder: ``root/<class>/**/<image>``
    * split root: ``root/{train,val,test}/<class>/**/<image>`` (the split is recorded per row)
    * flat folder: ``root/**/<image>`` with no labels (search galleries)
    * CSV manifest with a header row, paths relative to the CSV's folder, in one of three forms:
      ``path,label[,split]`` (one label per image; empty = unlabelled), ``path,labels[,split]`` (several labels
      per image, ``cat|dog``; empty = none of the classes), or ``path[,split],<class>,<class>,…`` (one 0/1 column
      per class: a header without ``label``/``labels`` whose other columns are all classes). The last two make a
      multi-label dataset (``Dataset.label_matrix``).

Container datasets -- WebDataset tar shards, Parquet files, Hugging Face datasets saved to disk -- and any layout
at an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``) are read by ``probe.sources``: their rows are
named ``<container>#<member>`` and carry a ``Dataset.reader``.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ProbeError

if TYPE_CHECKING:
    from .sources import Source

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
LAYOUTS = ("auto", "imagefolder", "splits", "flat", "csv", "webdataset", "parquet", "hf")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (0.25 GiB of 24-bit pixels)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is reported and skipped, never half-decoded


@dataclass
class Dataset:
    """Files to embed. ``paths`` are relative to ``root`` (absolute where a manifest gave them so). A container
    dataset (``probe.sources``) has a ``reader`` and a URL or Path ``root``; its paths are ``<container>#<member>``."""

    root: Path | str
    layout: str
    paths: list[str]
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    splits: list[str]  # (N,) "" when the layout has none
    classes: list[str]
    ignored: list[str] = field(default_factory=list)  # files skipped by extension, relative paths
    source: Path | None = None  # what DATA named: the folder (= root) or the CSV manifest
    label_matrix: np.ndarray | None = None  # (N, C) uint8 0/1 of a multi-label manifest (``labels`` all -1)
    reader: Source | None = None  # rows inside containers or at a URL (probe.sources); None: local files

    def __post_init__(self) -> None:
        self.source = self.source or self.root

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multilabel(self) -> bool:
        return self.label_matrix is not None

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def fingerprints(self) -> list[str]:
        """(N,) what changes when a row's file (or container) is replaced: size and mtime, or an object's ETag."""
        if self.reader is not None:
            return self.reader.fingerprints()
        return [fingerprint(self.abspath(i)) for i in range(len(self))]

    def shard_key(self, i: int) -> str:
        """What ``probe.shard`` hashes to place row i: its path, or its container (a shard file stays whole)."""
        return self.reader.container(i) if self.reader is not None else self.paths[i]

    def require_files(self, command: str) -> None:
        """Refuse a dataset in containers or at a URL where ``command`` opens image files by path."""
        if self.reader is not None:
            raise DatasetError(f"{command} reads image files from a folder or a CSV manifest on this machine; "
                               f"{self.source} is read from containers or a URL, which only probe extract reads: "
                               "unpack the images to a folder (or extract features and work on the store)")

    def subset(self, keep: list[int]) -> Dataset:
        """The rows ``keep``, in that order; classes (and so label indices) unchanged."""
        return Dataset(self.root, self.layout, [self.paths[k] for k in keep], self.labels[keep],
                       [self.splits[k] for k in keep], self.classes, self.ignored, self.source,
                       None if self.label_matrix is None else self.label_matrix[keep],
                       None if self.reader is None else self.reader.subset(keep))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not _is_hidden(name)


def images_in(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively, by extension, sorted), read as a dataset folder is (``_files``:
    links to folders followed, hidden folders left out, a dangling link kept for the decoder to report);
    ProbeError naming the folder if none."""
    found = sorted(os.path.join(folder, f) for f in _files(Path(folder)) if _is_image_name(f.rsplit("/", 1)[-1]))
    if not found:
        raise ProbeError(f"folder {str(folder)!r} contains no image files ({', '.join(IMG_EXTENSIONS)})")
    return found


def _files(root: Path) -> list[str]:
    """Every file under ``root`` (following links to folders; hidden folders are not walked), relative to it and
    '/'-separated. A dangling link keeps its name: the decoder reports it instead of it vanishing silently."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel = Path(dirpath).relative_to(root).as_posix()
        out += [f if rel == "." else f"{rel}/{f}" for f in filenames]
    return out


def _visible_files(files: Iterable[str]) -> tuple[list[str], list[str]]:
    """The files of a folder that probe reads and its subfolders, from ``files`` (every file under it, relative and
    '/'-separated, as a walk of a disk or a listing at a URL gives them): a file inside a hidden folder
    (``.git/``, ``Coat/.thumbs/``) is left out, a hidden file is kept (``_folder_rows`` ignores it: no image is named
    ``.x``), and the subfolders are the top folders of the files kept -- so an empty folder, which an object store
    cannot hold, is none on disk either. The one rule for a folder on disk and one at a URL.

    Example:
        >>> _visible_files(["Bag/a.png", "Bag/.thumbs/t.png", ".git/HEAD", "Coat/.DS_Store", "x.png"])
        (['Bag/a.png', 'Coat/.DS_Store', 'x.png'], ['Bag', 'Coat'])
    """
    kept = [f for f in files if not any(_is_hidden(d) for d in f.split("/")[:-1])]
    return kept, sorted({f.split("/", 1)[0] for f in kept if "/" in f})


def discover(data: str | os.PathLike, layout: str = "auto", image_column: str | None = None,
             label_column: str | None = None) -> Dataset:
    """Read DATA (a folder, a CSV manifest, WebDataset shards, Parquet files, a saved Hugging Face dataset, or any
    of these at an fsspec URL) into a Dataset. ``layout='auto'`` picks by shape. ``image_column``/``label_column``:
    the Parquet / Hugging Face columns (the WebDataset ``json`` key of the label) when not the defaults."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    from . import sources  # imported here: it builds Datasets

    if sources.is_source(data, layout):
        return sources.discover_source(str(data), layout, image_column, label_column)
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"{str(root)!r} does not exist: expected an image folder or a CSV manifest")
    if root.is_file():
        if layout not in ("auto", "csv") or root.suffix.lower() != ".csv":
            raise DatasetError(f"{str(root)!r} is a file: expected a folder of images or a .csv manifest")
        return _from_csv(root)
    if layout == "csv":  # before the folder is walked
        raise DatasetError(f"{str(root)!r} is a folder: --layout csv expects a .csv manifest")
    layout, *rows = _folder_rows(str(root), layout, *_visible_files(_files(root)))
    return _build(root, layout, *rows)


def _folder_rows(where: str, layout: str, files: list[str], subdirs: list[str]) -> tuple[
        str, list[str], list[str | None], list[str], list[str]]:
    """A folder's rows by its layout -- ``imagefolder``, ``splits`` or ``flat``; ``auto`` picks by shape -- from
    ``files`` and ``subdirs`` (``_visible_files``): (layout, paths, labels, splits, ignored). The one rule for a folder
    on disk and one at a URL.

    ImageFolder rows are labelled by their top folder (images beside the folders are ignored), split-root rows by
    the folder under their split's; a file without an image extension inside a class folder is ignored."""
    top_images = sorted(f for f in files if "/" not in f and _is_image_name(f))
    if layout == "auto":
        if subdirs and all(d.lower() in SPLIT_NAMES for d in subdirs):
            layout = "splits"
        elif subdirs and not top_images:
            layout = "imagefolder"
        elif top_images and not subdirs:
            layout = "flat"
        elif top_images:
            raise DatasetError(
                f"{where!r} has both image files ({top_images[0]}, …) and subfolders ({subdirs[0]}, …): "
                "pass --layout imagefolder (subfolders are classes, top-level files ignored) "
                "or --layout flat (every image, unlabelled)"
            )
        else:
            raise DatasetError(f"{where!r} contains no images and no subfolders")
    if layout == "splits":
        for d in subdirs:
            if d.lower() not in SPLIT_NAMES:
                raise DatasetError(f"{os.path.join(where, d)!r} is not a split folder: expected one of "
                                   f"{', '.join(SPLIT_NAMES)}")
    depth = {"flat": 0, "imagefolder": 1, "splits": 2}[layout]  # folders above an image that name it
    ignored = list(top_images) if layout == "imagefolder" else []
    rows = []  # (its folders, path): a class folder's images together, in order, as the classes sort
    for f in files:
        parts = f.split("/")
        if len(parts) <= depth:  # beside the class folders, not in one
            continue
        if _is_image_name(parts[-1]):
            rows.append((parts[:depth], f))
        else:
            ignored.append(f)
    rows.sort()
    paths = [f for _, f in rows]
    if not paths:
        raise DatasetError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {where!r}")
    labels = [d[-1] if d else None for d, _ in rows]
    splits = [_canonical_split(d[0]) if layout == "splits" else "" for d, _ in rows]
    return layout, paths, labels, splits, sorted(ignored)


def _canonical_split(name: str) -> str:
    name = name.strip().lower()
    return "val" if name in ("valid", "validation") else name


MANIFEST_SPLITS = ("", *dict.fromkeys(map(_canonical_split, SPLIT_NAMES)))  # a manifest's split cell, canonical


def checked_split(name: str, where: str) -> str:
    """A split named by the data (a manifest's or Parquet file's cell, a DatasetDict's split), canonical
    (valid/validation -> val); DatasetError naming ``where`` and the name when it is none of MANIFEST_SPLITS."""
    split = _canonical_split(name)
    if split not in MANIFEST_SPLITS:
        raise DatasetError(f"{where}: split {name.strip()!r}: expected train, val (valid/validation), test or empty")
    return split


LABEL_SEP = "|"  # between the names of a multi-label manifest's ``labels`` cell: ``cat|dog``


def _from_csv(path: Path, f: BinaryIO | None = None) -> Dataset:
    """A CSV manifest in one of its three forms (see the module docstring), UTF-8 with or without a BOM, every
    bad cell a DatasetError naming the file, the line and the value; rows' paths relative to ``path``'s folder.
    ``f``: the manifest's bytes, opened by the caller (a manifest at a URL: ``path`` is then its path there, and the
    caller sets the root); else the file at ``path`` is read."""
    if f is None:
        with open(path, "rb") as f:
            return _from_csv(path, f)
    reader = csv.DictReader(io.StringIO(_manifest_text(path, f.read()), newline=""))
    try:
        header = reader.fieldnames
        if header is None or "path" not in header:
            raise DatasetError(f"{path}: expected a header row with a 'path' column (and 'label' or 'labels', or one "
                               f"0/1 column per class; optional 'split'), got {header}")
        rows = [(reader.line_num, r) for r in reader]  # line_num: the file's line (blank lines are skipped)
    except csv.Error as e:  # a cell past csv's size limit (131072 characters)
        raise DatasetError(f"{path}:{reader.reader.line_num}: not a CSV manifest ({e})") from None
    header = [h.strip() for h in header]
    form = _manifest_form(path, header)
    if not rows:
        raise DatasetError(f"{path}: manifest has no rows")
    paths, labels, sets, splits = [], [], [], []
    for n, r in rows:
        if form != "label" and r.get(None):  # DictReader files surplus cells under None
            raise DatasetError(f"{path}:{n}: {len(header) + len(r[None])} cells, the header has {len(header)} "
                               "columns")
        r = {k.strip(): v for k, v in r.items() if k is not None}
        if not (r.get("path") or "").strip():
            raise DatasetError(f"{path}:{n}: empty 'path'")
        paths.append(r["path"].strip())
        splits.append(checked_split(r.get("split") or "", f"{path}:{n}"))
        if form == "label":
            lab = (r.get("label") or "").strip() or None
            if lab is not None and LABEL_SEP in lab:
                raise DatasetError(f"{path}:{n}: label {lab!r} contains {LABEL_SEP!r}: for several labels per "
                                   f"image name the column 'labels' (e.g. 'cat{LABEL_SEP}dog'), not 'label'")
            labels.append(lab)
        elif form == "labels":
            sets.append(_label_set(path, n, r.get("labels") or ""))
        else:
            sets.append(_wide_row(path, n, r, header))
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise DatasetError(f"{path}: path {dup!r} is listed more than once")
    if form == "label":
        ds = _build(path.parent, "csv", paths, labels, splits, [])
    else:
        classes = sorted(c for c in header if c not in ("path", "split")) if form == "wide" else \
            sorted(set().union(*sets))
        if not classes:
            raise DatasetError(f"{path}: the 'labels' column names no class in any row: a multi-label manifest needs "
                               f"at least one label (e.g. 'cat{LABEL_SEP}dog')")
        ds = _build(path.parent, "csv", paths, [None] * len(paths), splits, [], multilabel=(classes, sets))
    ds.source = path.resolve()  # two manifests in one folder are two datasets
    return ds


def _manifest_text(path: Path, raw: bytes) -> str:
    """A manifest's bytes as text: UTF-8, without the BOM Excel's "CSV UTF-8" writes first; else a DatasetError
    naming the first byte that is not UTF-8, its line and its offset."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}): "
                           "save the manifest as UTF-8 (Excel: CSV UTF-8)") from None


def _manifest_form(path: Path, header: list[str]) -> str:
    """'label' (one label per image, or none), 'labels' (``a|b`` per image) or 'wide' (one 0/1 column per class)."""
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DatasetError(f"{path}: column {dup[0]!r} appears twice in the header")
    if "label" in header and "labels" in header:
        raise DatasetError(f"{path}: the header has both 'label' and 'labels': use 'label' for one label per image "
                           f"or 'labels' for several ('cat{LABEL_SEP}dog'), not both")
    if "labels" in header:
        return "labels"
    extra = [h for h in header if h not in ("path", "split")]
    if "label" in header or not extra:
        return "label"  # single-label, or unlabelled (a header of path[,split] only); other columns ignored
    if "" in extra:
        raise DatasetError(f"{path}: a column without a name in the header ({header}): a manifest without 'label' "
                           "or 'labels' gives one 0/1 column per class, each named by its class")
    return "wide"


def _label_set(path: Path, n: int, cell: str) -> set[str]:
    """The names of a ``labels`` cell: ``cat|dog`` -> {cat, dog}; empty -> none."""
    if not cell.strip():
        return set()
    names = [x.strip() for x in cell.split(LABEL_SEP)]
    if not all(names):
        raise DatasetError(f"{path}:{n}: labels {cell!r} has an empty name: expected names separated by "
                           f"{LABEL_SEP!r}, e.g. 'cat{LABEL_SEP}dog' (an empty cell means no label)")
    return set(names)


def _wide_row(path: Path, n: int, r: dict[str, str | None], header: list[str]) -> set[str]:
    """The classes whose column holds 1 in a wide manifest's row."""
    out = set()
    for c in header:
        if c in ("path", "split"):
            continue
        v = (r.get(c) or "").strip()
        if v not in ("0", "1"):
            raise DatasetError(f"{path}:{n}: column {c!r} is {v!r}: a manifest without 'label' or 'labels' gives one "
                               "column per class, each 0 or 1 (use 'label' or 'labels' columns for class names)")
        if v == "1":
            out.add(c)
    return out


def _build(root, layout, paths, labels, splits, ignored,
           multilabel: tuple[list[str], list[set[str]]] | None = None) -> Dataset:
    """``multilabel``: (classes, the set of class names of each row) instead of ``labels``."""
    matrix = None
    if multilabel is not None:
        classes, sets = multilabel
        index = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(paths), len(classes)), np.uint8)  # (N, C)
        for i, names in enumerate(sets):
            matrix[i, [index[c] for c in names]] = 1
        y = np.full(len(paths), -1, np.int64)
    else:
        classes = sorted({lab for lab in labels if lab is not None})
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[lab] if lab is not None else -1 for lab in labels], dtype=np.int64)
    if ignored:
        log.warning("ignored %d files without an image extension under %s (e.g. %s)", len(ignored), root, ignored[0])
    return Dataset(root.resolve(), layout, list(paths), y, list(splits), classes, ignored, label_matrix=matrix)


def fingerprint(path: str) -> str:
    """Size and modification time: what changes when a file is replaced (as make and rsync use)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


# -------------------------------------------------------------------------------------------- decoding
class ImageDecodeError(Exception):
    """A file that cannot become an RGB image; the message is the reason recorded in the store."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with alpha composited over white and 16-bit scaled (not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif img.mode != "F" and a.size and a.max() > 255:
            a = a / 257.0  # 16-bit range onto 8-bit
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


class TooManyPixels(ImageDecodeError):
    """An image above the pixel limit, refused before its pixels are decoded (decompression bombs)."""

    def __init__(self, width: int, height: int, limit: int):
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"decompression bomb: {width}x{height} = {width * height} pixels > limit {limit}")


class ResizeTooLarge(ImageDecodeError):
    """An image the preprocessing would resize to more than the pixel limit -- an extreme aspect ratio, resized
    shortest-side-first -- refused before its pixels are decoded."""

    def __init__(self, width: int, height: int, resized: tuple[int, int], limit: int):
        self.width, self.height, self.resized, self.limit = width, height, resized, limit
        self.ratio = max(width, height) / max(min(width, height), 1)
        rw, rh = resized
        super().__init__(f"{width}x{height} pixels would be resized to {rw}x{rh} = {rw * rh} pixels on the way to "
                         f"the backbone's input, more than the limit of {limit}: an aspect ratio of "
                         f"{self.ratio:.0f}:1 is too extreme to embed")


def pixel_limit(reason: str) -> int | None:
    """The pixel limit a skip reason was given under (``TooManyPixels``, ``ResizeTooLarge``); None for any other
    reason. A later run with a higher limit retries such files."""
    m = re.search(r"(?:> limit|more than the limit of) (\d+)", reason)
    return int(m[1]) if m else None


FootprintFn = Callable[[int, int], tuple[int, int]]  # (w, h) -> (W, H): a probe.transforms.Footprint


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS, footprint: FootprintFn | None = None) -> None:
    """Refuse an image by its size alone, before its pixels are decoded: more than ``max_pixels`` pixels
    (TooManyPixels), or a preprocessing whose ``footprint`` -- the largest image it allocates on the way to the
    model's input -- is (ResizeTooLarge). One limit bounds every image the pipeline holds."""
    if width * height > max_pixels:
        raise TooManyPixels(width, height, max_pixels)
    if footprint is not None:
        rw, rh = footprint(width, height)
        if rw * rh > max_pixels:
            raise ResizeTooLarge(width, height, (rw, rh), max_pixels)


def decode(source: str | os.PathLike | BinaryIO, max_pixels: int = MAX_PIXELS, draft: int | None = None,
           footprint: FootprintFn | None = None) -> Image.Image:
    """Open a file or file object as an upright 8-bit RGB image: EXIF orientation applied, first frame of an
    animation, 16-bit scaled, alpha over white. Raises TooManyPixels before decoding a too-large image,
    ResizeTooLarge before decoding one whose preprocessing ``footprint`` (``probe.transforms.Footprint``) is too
    large, and Pillow's own errors (UnidentifiedImageError, OSError, …) for the rest: callers word those for
    their users.

    ``draft``: a JPEG at least twice this size on both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling), never below ``draft`` pixels a side -- a 12-megapixel photo decodes ~4x faster when it is headed
    for a 256-pixel resize anyway."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            check_size(*img.size, max_pixels, footprint)  # from the header: no pixel is decoded yet
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: first frame
            if draft and img.format == "JPEG":
                img.draft(None, (draft, draft))  # keeps both sides >= draft; no-op when the image is smaller
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))


def decode_bytes(data: bytes, max_pixels: int = MAX_PIXELS, draft: int | None = None,
                 footprint: FootprintFn | None = None) -> Image.Image:
    """Decode an image held in memory (a tar member, a Parquet cell; see ``decode``), or raise ImageDecodeError
    with the reason recorded for it."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        return decode(io.BytesIO(data), max_pixels, draft, footprint)
    except Exception as e:  # noqa: BLE001 - worded by _reason
        raise ImageDecodeError(_reason(e)) from None


def _reason(e: Exception) -> str:
    """The reason recorded for an image that did not decode, from the decoder's exception."""
    if isinstance(e, ImageDecodeError):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "not an image (Pillow cannot identify the format)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {e}"
    if isinstance(e, OSError):  # truncated data, broken streams
        return f"corrupt or truncated image: {e}"
    return f"cannot decode: {type(e).__name__}: {e}"


def load_image(path: str, max_pixels: int = MAX_PIXELS, draft: int | None = None,
               footprint: FootprintFn | None = None) -> Image.Image:
    """Decode the file at ``path`` (see ``decode``), or raise ImageDecodeError with the reason recorded for it."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageDecodeError("unreadable: symbolic link loop") from None
        if os.path.islink(path):
            raise ImageDecodeError(f"dangling symbolic link to {os.readlink(path)}") from None
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        return decode(path, max_pixels, draft, footprint)
    except ImageDecodeError:
        raise  # its subclass kept (TooManyPixels, ResizeTooLarge)
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not a file") from None
    except PermissionError as e:
        raise ImageDecodeError(f"unreadable: {e.strerror}") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found (deleted or moved during the run)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types; a bad file must never stop a run
        raise ImageDecodeError(_reason(e)) from None
