"""Datasets kept where users keep them: WebDataset tar shards, Parquet files with image bytes, Hugging Face datasets
saved to disk, and any of these -- or a folder, or a CSV manifest -- at an fsspec URL (``s3://``, ``gs://``,
``memory://``, ``file://``).

A container's rows are named ``<container>#<member>`` relative to the dataset's root, which is what the store keeps
in ``paths``:

    WebDataset   shards/{000000..000099}.tar  -> 000003.tar#000123.jpg        (the sample's image member)
    Parquet      data/*.parquet               -> train-0.parquet#row=17       (row of the file)
    HF dataset   saved/ (save_to_disk)        -> train/data-00000-of-00001.arrow#row=17

Every row of a container carries the container's fingerprint (size and mtime locally, the ETag of an object), so
an incremental run re-embeds a replaced shard and nothing else. Work is cut into ``Unit`` s -- a tar shard, a Parquet
row group, an Arrow file, or one file of a folder at a URL -- each read start to end by one decode worker
(``UnitReader``): a tar is streamed once, never seeked member by member, and memory holds one batch per worker
whatever the number of shards.

Listings: planning needs each container's samples (tar member names and labels, an Arrow file's row count and
labels), which for a tar or Arrow file at a URL means streaming the whole object. Each such listing is kept in
``<cache dir>/listings/<sha1 of the URL>.json`` with the container's fingerprint, so a re-run reads no container
whose fingerprint is unchanged (``cached_listing``). Local containers are listed from disk each run (a tar's
headers are seeked over), and Parquet files anywhere (their footer and label column are small reads). The
fingerprints cost one request per container a pattern names and none per file a folder listing gives (its size
and ETag come with the listing).

Labels: a WebDataset sample's ``cls`` member (an integer or a name) or the ``label`` key of its ``json`` member; a
Parquet / Hugging Face ``label`` column (ClassLabel indices become their names); the column names are options.
Splits: a Hugging Face DatasetDict's split names; a Parquet ``split`` column.

Pictures: ``Pictures`` reads one row's image by its stored path (a tar member by its offset, a Parquet row from its
row group's image column, an Arrow row) for the pages and the served thumbnail, which show files the same way.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import pickle
import re
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import (
    IMG_EXTENSIONS,
    MAX_PIXELS,
    Dataset,
    ImageDecodeError,
    _build,
    _canonical_split,
    _folder_rows,
    _from_csv,
    _visible_files,
    checked_split,
    decode_bytes,
    fingerprint,
    load_image,
)
from .errors import DatasetError, ProbeError
from .fs import write_bytes_atomic

log = logging.getLogger(__name__)

SEP = "#"  # between a container and its member in a row's path
CONTAINER_LAYOUTS = ("webdataset", "parquet", "hf")
IMAGE_EXTS = {e[1:] for e in IMG_EXTENSIONS}  # WebDataset member extensions that hold the sample's image
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
HF_MARKERS = ("dataset_dict.json", "state.json")
_BRACE = re.compile(r"\{[^{}]*\}|[*?\[]")


def need(module: str, extra: str) -> Any:
    """Import an optional dependency, or a ProbeError saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ProbeError(f"reading this dataset needs the {module.split('.')[0]} package: pip install "
                         f"'probe[{extra}]'") from None


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Unit:
    """What one worker reads start to end: a tar shard, a Parquet row group, an Arrow file, or one plain file."""

    container: str  # relative to the dataset's root: the rows' path prefix (the path itself for a plain file)
    url: str  # the path fsspec opens on the source's filesystem
    kind: str  # tar | parquet | arrow | file
    fingerprint: str
    part: int = 0  # the Parquet row group
    start: int = 0  # the file's row index of the unit's first row (a Parquet row group)


@dataclass
class Source:
    """How a dataset's rows are read: the units, and where each row lies in its unit. Pickled into workers."""

    fs: Any  # fsspec filesystem
    units: list[Unit]
    unit: np.ndarray  # (N,) int64: row -> index into units
    member: list[str]  # (N,) tar member name, or the row index in its container (as text); "" for a plain file
    image_column: str | None = None  # Parquet / Arrow: the column holding the image

    def fingerprints(self) -> list[str]:
        return [self.units[u].fingerprint for u in self.unit]

    def container(self, i: int) -> str:
        return self.units[self.unit[i]].container

    def subset(self, keep: Sequence[int]) -> Source:
        return Source(self.fs, self.units, self.unit[list(keep)], [self.member[k] for k in keep], self.image_column)

    def group(self, rows: Sequence[int]) -> list[list[int]]:
        """``rows`` grouped by unit (in order of first appearance), each in its given order: batches never straddle
        two units, so one worker reads one shard."""
        groups: dict[int, list[int]] = {}
        for i in rows:
            groups.setdefault(int(self.unit[i]), []).append(i)
        return list(groups.values())


# ------------------------------------------------------------------------------------------ discovery
def is_url(data: str | os.PathLike) -> bool:
    return isinstance(data, str) and "://" in data


def is_source(data: str | os.PathLike, layout: str) -> bool:
    """Whether DATA is for this module: a URL, a container layout, or (auto) something that looks like one."""
    if is_url(data) or layout in CONTAINER_LAYOUTS:
        return True
    if layout != "auto":
        return False
    text, p = str(data), Path(data)
    containers = (*TAR_SUFFIXES, ".parquet")
    if p.is_file():
        return text.lower().endswith(containers)
    if p.is_dir():  # a saved HF dataset, or a folder of nothing but shards / Parquet files
        if any((p / m).is_file() for m in HF_MARKERS):
            return True
        names = [f.name.lower() for f in p.iterdir() if not f.name.startswith(".")]
        return bool(names) and all(n.endswith(containers) for n in names)
    return bool(_BRACE.search(text)) or text.lower().endswith(containers)  # a pattern, or a missing shard


def discover_source(data: str, layout: str = "auto", image_column: str | None = None,
                    label_column: str | None = None) -> Dataset:
    """A Dataset of DATA read through fsspec: shards, Parquet, a saved HF dataset, or a folder / manifest at a URL.
    The storage's own failures (no credentials, no network, access denied) are one DatasetError naming DATA."""
    fsspec = need("fsspec", "data")
    try:
        return _discover(fsspec, data, layout, image_column, label_column)
    except ProbeError:
        raise
    except Exception as e:
        err = storage_error(data, e)
        if err is e:  # not the storage's: a bug, its traceback as it is
            raise
        raise err from e


STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "aiohttp", "fsspec", "requests", "urllib3",
                   "adlfs", "azure", "huggingface_hub")  # whose exceptions are the storage's, not probe's


def storage_error(data: str, e: Exception) -> Exception:
    """A DatasetError for what the storage behind DATA raised (OSError or an exception of ``STORAGE_MODULES``), with
    a hint where one helps; any other exception is returned as it is (a bug: its traceback is wanted)."""
    if not (isinstance(e, OSError) or type(e).__module__.split(".")[0] in STORAGE_MODULES):
        return e
    name = type(e).__name__
    hint = ("; set the storage's credentials (as boto3, google-auth or the filesystem's docs say)" if "Credential" in
            name else "; is the network up and the endpoint right?" if "Connect" in name or "DNS" in name else "")
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return DatasetError(f"cannot read {data!r}: {name}{': ' + text if text else ''}{hint}")


def _discover(fsspec: Any, data: str, layout: str, image_column: str | None, label_column: str | None) -> Dataset:
    fs, path = fsspec.core.url_to_fs(data)
    path = path.rstrip("/") or "/"
    base = _base(path)
    local = _is_local(fs)
    named = _BRACE.search(path) or path.lower().endswith((*TAR_SUFFIXES, ".parquet", ".csv"))
    # a folder of containers (or a saved HF dataset) is listed once, for the layout, its markers and its files
    folder = _entries(fs, path) if layout in ("auto", *CONTAINER_LAYOUTS) and not named else None
    if layout == "auto":
        layout = _guess(path, folder)
    if layout == "webdataset":
        ds = _webdataset(fs, base, _expand(fs, path, folder, TAR_SUFFIXES, "tar shards"), label_column or "label")
    elif layout == "parquet":
        found = _expand(fs, path, folder, (".parquet",), "Parquet files")
        ds = _parquet(fs, base, found, image_column, label_column or "label")
    elif layout == "hf":
        ds = _hf(fs, path, folder, image_column, label_column or "label")
    elif layout in ("imagefolder", "splits", "flat", "csv", "folder"):
        if local:  # file:// of a plain folder or manifest: the local reader, as without the scheme
            from .data import discover

            return discover(path, "auto" if layout == "folder" else layout)
        ds = _remote_files(fs, path, layout)
    else:
        raise DatasetError(f"unknown layout {layout!r} for {data!r}")
    if local:
        ds.root = Path(ds.root)
    ds.source = data if not local else (Path(path) if not _BRACE.search(path) else path)
    return ds


def _is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _base(path: str) -> str:
    """The folder the rows are named from: DATA's folder before any brace or glob, or DATA if it is a folder."""
    m = _BRACE.search(path)
    head = path[: m.start()] if m else path
    return head.rsplit("/", 1)[0] if "/" in head and (m or head.lower().endswith((*TAR_SUFFIXES, ".parquet"))) \
        else head


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _entries(fs: Any, path: str) -> dict[str, dict[str, Any]] | None:
    """{url: info} of what the folder PATH holds, from one listing, hidden names (.DS_Store) left out as
    ``is_source`` leaves them out; None when nothing is there."""
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return None
    return {e["name"]: e for e in found if not _name(e["name"]).startswith(".")}


def _guess(path: str, folder: dict[str, dict[str, Any]] | None) -> str:
    """The layout of PATH by its name, else by what its ``folder`` listing holds."""
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "webdataset"
    if low.endswith(".parquet"):
        return "parquet"
    if _BRACE.search(path):
        raise DatasetError(f"{path!r}: a shard pattern should end in .tar or .parquet (or pass --layout)")
    if low.endswith(".csv"):
        return "csv"
    if folder is None:
        raise DatasetError(f"{path!r} does not exist: expected an image folder, a CSV manifest, tar shards, "
                           "Parquet files or a saved Hugging Face dataset")
    names = [_name(u) for u in folder]
    if any(m in names for m in HF_MARKERS):
        return "hf"
    names = [n.lower() for n in names]
    if names and all(n.endswith(TAR_SUFFIXES) for n in names):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names):
        return "parquet"
    return "folder"


def _expand(fs: Any, path: str, folder: dict[str, dict[str, Any]] | None, suffixes: tuple[str, ...],
            what: str) -> dict[str, dict[str, Any]]:
    """{url: info} of the shards of a brace pattern (``{000000..000099}``), a glob, a ``folder`` (its listing), or
    one file (or folder): one request per shard named, none per shard listed; in the pattern's order, each glob or
    folder sorted."""
    if folder is not None:
        found = {u: folder[u] for u in sorted(folder) if u.lower().endswith(suffixes)}
    else:
        found = {}
        for p in need("braceexpand", "data").braceexpand(path):
            if re.search(r"[*?\[]", p):
                found.update(sorted(fs.glob(p, detail=True).items()))
                continue
            try:
                info = fs.info(p)
            except FileNotFoundError:
                raise DatasetError(f"{p!r} does not exist (listed by {path!r}): expected {what}") from None
            if info.get("type") == "directory":  # a folder named as one (Spark writes data.parquet/part-*.parquet)
                found.update((u, i) for u, i in sorted((_entries(fs, p) or {}).items()) if u.lower().endswith(suffixes))
            else:
                found[p] = info
    if not found:
        raise DatasetError(f"no {what} ({', '.join(suffixes)}) found at {path!r}")
    return found


def _rel(url: str, base: str) -> str:
    url, base = url.lstrip("/"), base.strip("/")
    return url[len(base) + 1:] if base and url.startswith(base + "/") else url


def _fingerprint(fs: Any, url: str, info: dict[str, Any] | None = None) -> str:
    """size:mtime_ns locally (``fs`` None or a local filesystem, as ``probe.data.fingerprint``); an object's ETag
    (or generation, or mtime) remotely, from its ``info`` when a listing gave it (else one request)."""
    if fs is None or _is_local(fs):
        return fingerprint(url)
    if not info:  # find() gives {} for a path that is itself a file
        try:
            info = fs.info(url)
        except FileNotFoundError:  # a manifest row naming no object: reported and skipped when read, as locally
            return "missing"
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash") or \
        info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if hasattr(tag, "timestamp"):  # a datetime where a listing gives seconds (memory://'s info and ls)
        tag = tag.timestamp()
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _label_name(value: Any, names: list[str] | None) -> str | None:
    """A label cell -> its class name; None/-1/"" = unlabelled; ClassLabel indices through ``names``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        if value < 0:
            return None
        return names[value] if names and value < len(names) else str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------------------------------- WebDataset
def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the member's path up to the first dot of its file name, extension = the rest,
    lowercased (``a/b.seg.png`` -> ``a/b``, ``seg.png``)."""
    folder, _, file = name.rpartition("/")
    stem, dot, ext = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _tar_mode(fs: Any, url: str) -> str:
    """Seek past members' data locally; stream (one sequential read, any compression) remotely."""
    return "r:" if _is_local(fs) and url.lower().endswith(".tar") else "r|*"


def _webdataset(fs: Any, base: str, shards: dict[str, dict[str, Any]], label_key: str) -> Dataset:
    """One row per sample with an image member of ``shards`` ({url: info}); its label from ``cls`` or
    ``json[label_key]``."""
    units, unit, member, labels, ignored = [], [], [], [], []
    for url, info in shards.items():
        rel, fp = _rel(url, base), _fingerprint(fs, url, info)
        units.append(Unit(rel, url, "tar", fp))
        listing = cached_listing(fs, url, fp, {"kind": "tar", "label_key": label_key},
                                 partial(_list_tar, fs, url, label_key), _tar_listing_ok)
        if listing["damage"]:
            log.warning("%s: %s (its samples before the damage are kept)", url, listing["damage"])
        ignored += [f"{rel}{SEP}{name}" for name in listing["ignored"]]
        for name, label in listing["rows"]:
            unit.append(len(units) - 1)
            member.append(name)
            labels.append(label)
        if not listing["rows"]:
            log.warning("%s: no sample with an image member (%s)", url, ", ".join(sorted(IMAGE_EXTS)))
    if not unit:
        raise DatasetError(f"no sample with an image member ({', '.join(sorted(IMAGE_EXTS))}) in {len(shards)} "
                           f"tar shards under {base!r}")
    paths = [f"{units[u].container}{SEP}{m}" for u, m in zip(unit, member)]
    return _read_through(_build(Path(base), "webdataset", paths, labels, [""] * len(paths), ignored), base,
                         Source(fs, units, np.asarray(unit, np.int64), member))


def _read_through(ds: Dataset, base: str, source: Source) -> Dataset:
    """``ds`` with its rows read by ``source`` and named from ``base``, the path on the source's filesystem (kept
    as it is, not resolved on this machine's disk)."""
    ds.root, ds.reader = base, source
    return ds


def _list_tar(fs: Any, url: str, label_key: str) -> dict[str, Any]:
    """A shard's listing: ``rows`` [image member, label] per sample with an image, ``ignored`` (a member of each
    sample without one), ``damage`` (why the read stopped early, or None)."""
    samples: dict[str, dict[str, Any]] = {}
    damage = None
    try:
        with fs.open(url, "rb") as f, tarfile.open(fileobj=f, mode=_tar_mode(fs, url)) as tar:
            for m in tar:
                if not m.isfile() or m.name.rsplit("/", 1)[-1].startswith(("__", ".")):
                    continue
                key, ext = split_key(m.name)
                s = samples.setdefault(key, {})
                if ext in IMAGE_EXTS:
                    s.setdefault("image", m.name)
                elif ext in ("cls", "json"):
                    s[ext] = tar.extractfile(m).read()
                else:
                    s.setdefault("other", m.name)
    except (tarfile.TarError, EOFError) as e:
        damage = f"{type(e).__name__}: {e}"
    rows = [[s["image"], _wds_label(url, key, s, label_key)] for key, s in samples.items() if "image" in s]
    ignored = [s.get("other", key) for key, s in samples.items() if "image" not in s]
    return {"rows": rows, "ignored": ignored, "damage": damage}


def _tar_listing_ok(listing: Any) -> bool:
    return isinstance(listing, dict) and isinstance(listing.get("rows"), list) and \
        isinstance(listing.get("ignored"), list) and all(isinstance(n, str) for n in listing["ignored"]) and \
        isinstance(listing.get("damage"), (str, type(None))) and \
        all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], (str, type(None)))
            for r in listing["rows"])


def _wds_label(url: str, key: str, s: dict[str, Any], label_key: str) -> str | None:
    if "cls" in s:
        return _label_name(s["cls"].decode("utf-8", "replace").strip(), None)
    if "json" in s:
        try:
            meta = json.loads(s["json"])
        except ValueError as e:
            raise DatasetError(f"{url}{SEP}{key}.json: not JSON ({e})") from None
        value = meta.get(label_key) if isinstance(meta, dict) else None
        return _label_name(value, None)
    return None


# ------------------------------------------------------------------------------------------- Parquet
def _image_column(schema: Any, wanted: str | None, where: str) -> str:
    """The column holding image bytes: ``wanted``, else ``image``, else the one binary (or {bytes, path}) column."""
    pa = need("pyarrow", "data")
    names = list(schema.names)

    def holds_image(t: Any) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and any(t.field(k).name == "bytes" for k in range(t.num_fields)))

    if wanted is not None:
        if wanted not in names:
            raise DatasetError(f"{where}: no column {wanted!r} (image_column); columns: {', '.join(names)}")
        return wanted
    if "image" in names:
        return "image"
    found = [n for n in names if holds_image(schema.field(n).type)]
    if len(found) != 1:
        raise DatasetError(f"{where}: cannot tell which column holds the images ({', '.join(names)}): pass "
                           "--image-column NAME")
    return found[0]


def _class_names(meta: dict | None, column: str) -> list[str] | None:
    """ClassLabel names of ``column`` in Hugging Face features metadata, if it is one."""
    feature = ((meta or {}).get("features") or {}).get(column) or {}
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


def _hf_meta(schema: Any) -> dict | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    return (json.loads(raw).get("info") or json.loads(raw)) if raw else None


def _parquet(fs: Any, base: str, files: dict[str, dict[str, Any]], image_column: str | None,
             label_column: str) -> Dataset:
    """One row per row of ``files`` ({url: info}), one unit per row group; labels and splits from the label and
    ``split`` columns."""
    pq = need("pyarrow.parquet", "data")
    units, unit, member, labels, splits = [], [], [], [], []
    column = None
    first = next(iter(files))
    for url, info in files.items():
        rel, fp = _rel(url, base), _fingerprint(fs, url, info)
        with fs.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            column = _image_column(schema, image_column, url) if column is None else column
            if column not in schema.names:
                raise DatasetError(f"{url}: no column {column!r} (the images of {first})")
            names = _class_names(_hf_meta(schema), label_column)
            cols = [c for c in (label_column, "split") if c in schema.names]
            table = pf.read(columns=cols) if cols else None
        lab = table.column(label_column).to_pylist() if table is not None and label_column in cols else None
        spl = table.column("split").to_pylist() if table is not None and "split" in cols else None
        start = 0
        for g in range(pf.metadata.num_row_groups):
            count = pf.metadata.row_group(g).num_rows
            units.append(Unit(rel, url, "parquet", fp, part=g, start=start))
            unit += [len(units) - 1] * count
            member += [str(r) for r in range(start, start + count)]
            start += count
        labels += [_label_name(v, names) for v in lab] if lab is not None else [None] * start
        splits += [checked_split(str(v or ""), url) for v in spl] if spl is not None else [""] * start
    if not unit:
        raise DatasetError(f"no rows in {len(files)} Parquet files under {base!r}")
    return _rows_dataset("parquet", fs, base, units, unit, member, labels, splits, column)


def _rows_dataset(layout: str, fs: Any, base: str, units: list[Unit], unit: list[int], member: list[str],
                  labels: list[str | None], splits: list[str], column: str | None) -> Dataset:
    paths = [f"{units[u].container}{SEP}row={m}" for u, m in zip(unit, member)]
    return _read_through(_build(Path(base), layout, paths, labels, splits, []), base,
                         Source(fs, units, np.asarray(unit, np.int64), member, column))


# --------------------------------------------------------------------------------- Hugging Face datasets
def _hf(fs: Any, path: str, folder: dict[str, dict[str, Any]] | None, image_column: str | None,
        label_column: str) -> Dataset:
    """A ``save_to_disk`` folder (a Dataset, or a DatasetDict of splits) whose listing is ``folder``: its Arrow
    files, read with pyarrow.

    The files are read directly, not through ``datasets.load_from_disk``: that copies a remote dataset to a local
    folder before reading it, where this streams one Arrow file per worker, at a URL as on a disk."""
    markers = {_name(u) for u in folder or {}}
    if "dataset_dict.json" in markers:
        with fs.open(f"{path}/dataset_dict.json", "rb") as f:
            parts = [(s, f"{path}/{s}") for s in json.load(f)["splits"]]
    elif "state.json" in markers:
        parts = [(None, path)]
    else:
        raise DatasetError(f"{path!r} is not a dataset saved by save_to_disk: no dataset_dict.json or state.json")
    units, unit, member, labels, splits = [], [], [], [], []
    column = image_column
    for split, sub in parts:
        with fs.open(f"{sub}/state.json", "rb") as f:
            state = json.load(f)
        with fs.open(f"{sub}/dataset_info.json", "rb") as f:
            info = json.load(f)
        features = info.get("features") or {}
        images = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"]
        if column is None:
            if len(images) != 1:
                raise DatasetError(f"{sub}: {len(images)} Image features ({', '.join(images) or 'none'}) among "
                                   f"{', '.join(features)}: pass --image-column NAME")
            column = images[0]
        if column not in features:
            raise DatasetError(f"{sub}: no feature {column!r} (image_column); features: {', '.join(features)}")
        names = _class_names(info, label_column)
        name = checked_split(split, path) if split is not None else _canonical_split(state.get("_split") or "")
        files = folder if split is None else _entries(fs, sub) or {}  # the Arrow files' infos: one listing
        for entry in state["_data_files"]:
            url = f"{sub}/{entry['filename']}"
            rel = _rel(url, path)
            fp = _fingerprint(fs, url, files.get(url))
            listing = cached_listing(fs, url, fp, {"kind": "arrow", "label_column": label_column},
                                     partial(_list_arrow, fs, url, label_column), _arrow_listing_ok)
            count, lab = listing["count"], listing["labels"]
            units.append(Unit(rel, url, "arrow", fp))
            unit += [len(units) - 1] * count
            member += [str(r) for r in range(count)]
            labels += [_label_name(v, names) for v in lab] if lab else [None] * count
            splits += [name] * count
    if not unit:
        raise DatasetError(f"no rows in the dataset saved at {path!r}")
    return _rows_dataset("hf", fs, path, units, unit, member, labels, splits, column)


def _list_arrow(fs: Any, url: str, label_column: str) -> dict[str, Any]:
    """An Arrow file's listing: its ``count`` of rows and their ``labels`` (the column's cells; empty without one)."""
    pa = need("pyarrow", "data")
    count, lab = 0, []
    with fs.open(url, "rb") as f, pa.ipc.open_stream(f) as reader:
        for batch in reader:
            count += batch.num_rows
            if label_column in batch.schema.names:
                lab += batch.column(label_column).to_pylist()
    return {"count": count, "labels": lab}


def _arrow_listing_ok(listing: Any) -> bool:
    return isinstance(listing, dict) and isinstance(listing.get("count"), int) and \
        isinstance(listing.get("labels"), list) and len(listing["labels"]) in (0, listing["count"])


# ------------------------------------------------------------------------------------------ listing cache
def listing_file(fs: Any, url: str) -> Path:
    """Where the listing of the container at URL (on filesystem FS) is kept: ``<cache dir>/listings/<sha1>.json``."""
    from .extract import cache_dir  # imported here: probe.extract imports this module's readers

    key = hashlib.sha1(fs.unstrip_protocol(url).encode()).hexdigest()
    return cache_dir() / "listings" / f"{key}.json"


def cached_listing(fs: Any, url: str, fp: str, params: dict[str, str], build: Callable[[], dict[str, Any]],
                   valid: Callable[[Any], bool]) -> dict[str, Any]:
    """The listing of a container at a URL: the cached one if it was made from the same fingerprint FP and PARAMS
    (the kind of container, the label key), else ``build()`` -- which reads the container -- stored for next time.
    A missing, unreadable or malformed entry is rebuilt (logged); a failed write only logged. Local containers, and
    objects whose store gives no ETag, generation or time (size alone would not tell a replacement), are always
    built."""
    if _is_local(fs) or fp.endswith(":None"):
        return build()
    path, name = listing_file(fs, url), fs.unstrip_protocol(url)
    try:
        entry = json.loads(path.read_bytes())
        if isinstance(entry, dict) and entry.get("url") == name and entry.get("fingerprint") == fp and \
                entry.get("params") == params:
            if valid(entry.get("listing")):
                return entry["listing"]
            log.warning("%s: malformed listing of %s; listing it again", path, name)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable listing of %s (%s: %s); listing it again", path, name, type(e).__name__, e)
    listing = build()
    try:
        data = json.dumps({"url": name, "fingerprint": fp, "params": params, "listing": listing}).encode()
        write_bytes_atomic(path, data, "a container listing")
    except (TypeError, ValueError, OSError) as e:  # a label cell JSON cannot hold; a full or read-only disk
        log.warning("%s: listing of %s not cached (%s: %s)", path, name, type(e).__name__, e)
    return listing


# ------------------------------------------------------------------------------ folders and manifests at URLs
def _remote_files(fs: Any, path: str, layout: str) -> Dataset:
    """A folder (ImageFolder, split root or flat, told apart as ``probe.data.discover`` tells a folder on disk) or
    a CSV manifest (any of its forms) at a URL: each file its own unit, read whole by a worker."""
    if layout == "csv" or path.lower().endswith(".csv"):
        base, infos = path.rsplit("/", 1)[0], {}
        try:
            with fs.open(path, "rb") as f:
                ds = _from_csv(Path(path), f)
        except (FileNotFoundError, IsADirectoryError):  # an object store's "folder" is no object either
            if fs.isdir(path):
                raise DatasetError(f"{path!r} is a folder: --layout csv expects a .csv manifest") from None
            raise DatasetError(f"{path!r} does not exist: expected a CSV manifest") from None
    else:  # one listing gives every file's size and ETag
        base = path
        infos = {_rel(u, base): info for u, info in fs.find(base, detail=True).items()}
        layout, *rows = _folder_rows(path, "auto" if layout == "folder" else layout, *_visible_files(infos))
        ds = _build(Path(base), layout, *rows)
    units = [Unit(r, f"{base}/{r}", "file", _fingerprint(fs, f"{base}/{r}", infos.get(r))) for r in ds.paths]
    return _read_through(ds, base, Source(fs, units, np.arange(len(units), dtype=np.int64), [""] * len(units)))


# ------------------------------------------------------------------------------------------- reading
def _tar_members(f: Any, names: Iterable[str]) -> Iterator[tuple[str, bytes | str]]:
    """(name, bytes) of the members ``names`` of the tar in file object ``f``, streamed once from the start (any
    compression, no seek) and left as soon as all are found; (name, reason) for one that is no regular file.
    A damaged tar raises tarfile.TarError or EOFError."""
    left = set(names)
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.name in left:
                left.remove(m.name)
                yield m.name, tar.extractfile(m).read() if m.isfile() else "not a regular file in the tar"
                if not left:
                    return


class UnitReader(torch.utils.data.IterableDataset):
    """Planned batches of a container dataset -> collated batches, each worker reading whole units in turn.

    ``batches`` must each lie in one unit (``Source.group``). A member that does not decode is (None, row, reason);
    a damaged tar fails its remaining members with the reason; any other read error (a network failure) stops the
    run, whose finished batches stay in the journal."""

    def __init__(self, source: Source, batches: list[list[int]], item: Callable, collate: Callable,
                 max_pixels: int, draft: int | None, footprint: Any):
        """``item(i, load)``: row i's batch item from ``load()`` (its decoded image), or (None, i, reason) for an
        ImageDecodeError or a failed preprocessing (``probe.extract._Files.item``)."""
        self.source, self.fs, self.item, self.collate = source, source.fs, item, collate
        self.max_pixels, self.draft, self.footprint = max_pixels, draft, footprint
        by_unit: dict[int, list[list[int]]] = {}
        for b in batches:
            by_unit.setdefault(int(source.unit[b[0]]), []).append(b)
        self.work = list(by_unit.items())  # [(unit, its batches)] in plan order

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        mine = self.work if info is None else self.work[info.id:: info.num_workers]
        if info is not None:  # a forked worker: its own filesystem instance (async ones, s3fs, are not fork-safe)
            self.fs = pickle.loads(pickle.dumps(self.source.fs))
        for u, batches in mine:
            rows = [i for b in batches for i in b]
            done: dict[int, tuple[Any, int, str]] = {}
            pending = list(batches)
            for i, data in self._read(self.source.units[u], rows):
                # a str is the reason the unit could not give the member
                done[i] = (None, i, data) if isinstance(data, str) else self.item(i, partial(
                    decode_bytes, data, self.max_pixels, self.draft, self.footprint))
                while pending and all(j in done for j in pending[0]):
                    yield self.collate([done.pop(j) for j in pending.pop(0)])
            for b in pending:  # members the unit no longer holds
                yield self.collate([done.pop(j, None) or (None, j, "member not found in its container (changed "
                                                          "since the run was planned?)") for j in b])

    def _read(self, unit: Unit, rows: list[int]) -> Iterator[tuple[int, bytes | str]]:
        """(row, bytes) of ``rows`` in the order the unit holds them; (row, reason) for one it cannot give. The
        storage failing (no network, credentials expired) is a DatasetError naming the unit: the run stops there,
        and a re-run resumes, rather than recording its images as skipped for good."""
        try:
            yield from self._read_unit(unit, rows)
        except ProbeError:
            raise
        except Exception as e:
            err = storage_error(unit.url, e)
            if err is e:
                raise
            raise err from None

    def _read_unit(self, unit: Unit, rows: list[int]) -> Iterator[tuple[int, bytes | str]]:
        src = self.source
        if unit.kind == "file":
            try:
                with self.fs.open(unit.url, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = "file not found (deleted or moved during the run)"
            except PermissionError as e:  # access denied to this object, as an unreadable file on a disk
                data = f"unreadable: {e.strerror or e}"
            yield rows[0], data
        elif unit.kind == "tar":
            want = {src.member[i]: i for i in rows}
            try:
                with self.fs.open(unit.url, "rb") as f:
                    for name, data in _tar_members(f, want):
                        yield want.pop(name), data
            except (tarfile.TarError, EOFError) as e:
                for i in want.values():
                    yield i, f"damaged tar shard: {type(e).__name__}: {e}"
        else:
            yield from self._read_rows(unit, rows)

    def _read_rows(self, unit: Unit, rows: list[int]) -> Iterator[tuple[int, bytes | str]]:
        """Rows of a Parquet row group or an Arrow file, streamed record batch by record batch."""
        pa = need("pyarrow", "data")
        src, column = self.source, self.source.image_column
        want = {int(src.member[i]) - (unit.start if unit.kind == "parquet" else 0): i for i in rows}
        with self.fs.open(unit.url, "rb") as f:
            if unit.kind == "parquet":
                batches = need("pyarrow.parquet", "data").ParquetFile(f).iter_batches(
                    batch_size=256, row_groups=[unit.part], columns=[column])
            else:
                batches = iter(pa.ipc.open_stream(f))
            at = 0
            for batch in batches:
                for k, cell in enumerate(batch.column(column).to_pylist() if want else []):
                    i = want.pop(at + k, None)
                    if i is not None:
                        yield i, self._cell(cell)
                at += batch.num_rows
                if not want:
                    break

    @staticmethod
    def _cell(cell: Any) -> bytes | str:
        """Image bytes of a cell: raw bytes, or a Hugging Face Image {bytes, path} (read from path without bytes)."""
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                return cell["bytes"]
            if cell.get("path"):
                try:
                    with open(cell["path"], "rb") as f:
                        return f.read()
                except OSError as e:
                    return f"image file {cell['path']!r} of the row cannot be read: {e.strerror or e}"
            return "empty cell (no image bytes)"
        return cell if cell is not None else "empty cell (no image bytes)"


# ------------------------------------------------------------------------------------------ pictures
MEMBER_SUFFIXES = (*TAR_SUFFIXES, ".parquet", ".arrow")  # what a container row names before its SEP
TAR_CACHE = 256  # shards whose member offsets a process keeps (~100 bytes a member)
GROUP_CACHE = 4  # Parquet row groups / Arrow record batches whose image column a process keeps
FINGERPRINT_TTL = 5.0  # seconds a Pictures trusts a container's fingerprint at a URL: a page costs one request a
# container, and a service keeping its Pictures reads a replaced shard afresh within seconds
_LOCK = threading.Lock()  # the caches are shared by the threads that make a page's thumbnails
_OFFSETS: OrderedDict[tuple[str, str], dict[str, tuple[int, int]]] = OrderedDict()  # tar -> {member: (at, size)}
_STARTS: OrderedDict[tuple[str, str], tuple[list[int], str]] = OrderedDict()  # Parquet -> (group starts, column)
_CELLS: OrderedDict[tuple[str, str, int], tuple[int, Any]] = OrderedDict()  # (file, fp, first row) -> (rows, column)


def _cached(cache: OrderedDict, key: Any, make: Callable[[], Any], limit: int) -> Any:
    """``cache[key]``, made by ``make()`` (outside the lock) when absent; the least recently used beyond ``limit``
    go."""
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()
    with _LOCK:
        cache[key] = value
        while len(cache) > limit:
            cache.popitem(last=False)
    return value


class Pictures:
    """The image of a stored row, by the path the store keeps: a file under the dataset's root, or a member of a
    container (``000003.tar#Bag/00011.png``, ``part-0.parquet#row=17``, ``train/data-00000-of-00002.arrow#row=17``)
    read without unpacking it. The root may be a URL (read through fsspec).

    Which rows are members is decided by what the store recorded: every row of a ``webdataset``, ``parquet`` or
    ``hf`` store is one (``discover_source`` names them so), no row of another layout is (a folder may hold a file
    named ``a#b.png``). Where the layout is unknown (an index whose store is gone), a row is a member when its plain
    path is no file and the part before one of its ``#`` is an existing ``.tar``/``.parquet``/``.arrow`` file.

    A process keeps each tar shard's member offsets (``TAR_CACHE`` shards), each Parquet file's row-group bounds
    and the image column of the last ``GROUP_CACHE`` row groups or Arrow batches read: 2,000 thumbnails from a few
    shards read each header once. Those caches are keyed by the container's fingerprint: a stat of a local file at
    every read; at a URL one request, whose answer this object trusts for ``FINGERPRINT_TTL`` seconds. A contact
    sheet so costs one request a container, not one a thumbnail; the next page or command (a new Pictures) asks
    again, so it never reads a replaced shard with the old one's offsets, and a service that keeps its Pictures
    may for at most those seconds after the replacement.

    Example:
        >>> pics = Pictures.of_store(FeatureStore("cache/shards.h5").attrs)
        >>> pics.load("000003.tar#Bag/00011.png").size
        (28, 28)
    """

    def __init__(self, root: str | os.PathLike, layout: str | None = None, image_column: str | None = None):
        self.root, self.layout, self.image_column = str(root), layout, image_column
        self.fs, self.base = None, self.root  # fs None: the local disk, read with open()
        if is_url(self.root):
            fs, base = need("fsspec", "data").core.url_to_fs(self.root)
            self.fs, self.base = (None, base) if _is_local(fs) else (fs, base.rstrip("/"))
        self._fingerprints: dict[str, tuple[str, float]] = {}  # container URL -> (fingerprint, monotonic time asked)
        self._asking = threading.Lock()  # one request a container, also from a page's thumbnail threads

    @classmethod
    def of_store(cls, attrs: Any) -> Pictures:
        """From a store's attributes: its root, layout and image column (and the URL scheme its ``source``
        recorded, for a dataset at a URL)."""
        root, source = str(attrs.get("root") or ""), str(attrs.get("source") or "")
        if is_url(source) and not is_url(root):  # the root was kept as fsspec's path: bucket/shards
            root = f"{source.split('://', 1)[0]}://{root.lstrip('/')}"
        made = attrs.get("extract_config") or {}
        column = (json.loads(made) if isinstance(made, str) else made).get("image_column")
        return cls(root, attrs.get("layout"), column)

    @classmethod
    def of_index(cls, meta: dict[str, Any]) -> Pictures:
        """From a search index's metadata: its store's record while the store is there, else the root alone (rows
        told apart by what exists)."""
        store = meta.get("store") or ""
        if store and os.path.isfile(store):
            from .store import FeatureStore

            try:
                return cls.of_store({**FeatureStore(store).attrs, "root": meta.get("root", "")})
            except ProbeError as e:
                log.warning("pictures from the index's root alone: %s", e)
        return cls(str(meta.get("root") or ""))

    def _url(self, rel: str) -> str:
        return os.path.join(self.base, rel) if self.fs is None else f"{self.base}/{rel.lstrip('/')}"

    def _isfile(self, rel: str) -> bool:
        return os.path.isfile(self._url(rel)) if self.fs is None else self.fs.isfile(self._url(rel))

    def member(self, path: str) -> tuple[str, str] | None:
        """(container, member) of a container row, None for a file. ``x.tar#a#b.png``: the first ``#`` after a
        container name."""
        if self.layout is not None and self.layout not in CONTAINER_LAYOUTS:
            return None
        if self.layout is None and self._isfile(path):
            return None
        at = path.find(SEP)
        while at >= 0:
            container = path[:at]
            if container.lower().endswith(MEMBER_SUFFIXES) and (self.layout is not None or self._isfile(container)):
                return container, path[at + 1:]
            at = path.find(SEP, at + 1)
        return None

    def exists(self, path: str) -> bool:
        """Whether there is something to read for ``path`` (its file, or its member's container)."""
        parts = self.member(path)
        return self._isfile(parts[0] if parts else path)

    def load(self, path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """The RGB image of row ``path``, or ImageDecodeError with the reason (as ``probe.data.load_image``)."""
        parts = self.member(path)
        if self.fs is None and parts is None:
            return load_image(self._url(path), max_pixels)  # a local file: exactly as before containers
        return decode_bytes(self._read(path, parts), max_pixels)

    def read(self, path: str) -> bytes:
        """The bytes of row ``path``'s image, or ImageDecodeError saying why they cannot be read."""
        return self._read(path, self.member(path))

    def _read(self, path: str, parts: tuple[str, str] | None) -> bytes:
        """``read`` with ``member(path)`` already worked out."""
        url = self._url(parts[0] if parts else path)
        try:
            if parts is None:
                return self._read_file(url)
            low, member = parts[0].lower(), parts[1]
            if low.endswith(TAR_SUFFIXES):
                return self._tar_member(url, member)
            if not (member.startswith("row=") and member[4:].isdigit()):
                raise ImageDecodeError(f"{member!r} is not a row of {url} (expected row=N)")
            row = int(member[4:])
            return self._parquet_row(url, row) if low.endswith(".parquet") else self._arrow_row(url, row)
        except ImageDecodeError:
            raise
        except FileNotFoundError:
            raise ImageDecodeError(f"{'container' if parts else 'file'} not found: {url}") from None
        except Exception as e:  # noqa: BLE001 - a damaged container or a failed request: no picture, not a crash
            raise ImageDecodeError(f"cannot read {url}: {type(e).__name__}: {e}") from None

    def _container_key(self, url: str) -> str:
        """The fingerprint the caches key container ``url`` by: a local file's stat; at a URL the answer of a
        request made at most once in ``FINGERPRINT_TTL`` seconds."""
        if self.fs is None:
            return fingerprint(url)
        kept = self._fingerprints.get(url)
        if kept is not None and time.monotonic() - kept[1] < FINGERPRINT_TTL:  # fresh: no wait on another's request
            return kept[0]
        with self._asking:
            now, kept = time.monotonic(), self._fingerprints.get(url)
            if kept is None or now - kept[1] >= FINGERPRINT_TTL:
                kept = self._fingerprints[url] = (_fingerprint(self.fs, url), now)
        return kept[0]

    def _open(self, url: str) -> Any:
        return open(url, "rb") if self.fs is None else self.fs.open(url, "rb")

    def _read_file(self, url: str) -> bytes:
        with self._open(url) as f:
            return f.read()

    def _tar_member(self, url: str, name: str) -> bytes:
        if not url.lower().endswith(".tar"):  # compressed: no offsets to seek to, one streamed pass
            with self._open(url) as f:
                for _, data in _tar_members(f, {name}):
                    if isinstance(data, str):
                        raise ImageDecodeError(f"member {name!r} of {url}: {data}")
                    return data
            raise ImageDecodeError(f"member {name!r} not found in {url} (changed since extraction?)")
        offsets = _cached(_OFFSETS, (url, self._container_key(url)), lambda: self._tar_offsets(url), TAR_CACHE)
        if name not in offsets:
            raise ImageDecodeError(f"member {name!r} not found in {url} (changed since extraction?)")
        at, size = offsets[name]
        with self._open(url) as f:
            f.seek(at)
            data = f.read(size)
        if len(data) != size:
            raise ImageDecodeError(f"member {name!r} of {url} is truncated ({len(data)} of {size} bytes)")
        return data

    def _tar_offsets(self, url: str) -> dict[str, tuple[int, int]]:
        """{member: (offset of its data, size)} of an uncompressed tar: headers only, the data seeked past."""
        found: dict[str, tuple[int, int]] = {}
        try:
            with self._open(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if m.isfile():
                        found[m.name] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError) as e:
            log.warning("%s: %s: %s (its members before the damage can be shown)", url, type(e).__name__, e)
        return found

    def _parquet_row(self, url: str, row: int) -> bytes:
        """Row ``row`` of a Parquet file: the image column of its row group alone is read (and kept)."""
        fp = self._container_key(url)
        starts, column = _cached(_STARTS, (url, fp), lambda: self._parquet_groups(url), TAR_CACHE)
        g = bisect.bisect_right(starts, row) - 1
        if not 0 <= row < starts[-1]:
            raise ImageDecodeError(f"row {row} is not in {url} ({starts[-1]} rows)")

        def read() -> tuple[int, Any]:
            with self._open(url) as f:
                col = need("pyarrow.parquet", "data").ParquetFile(f).read_row_group(g, columns=[column]).column(0)
            return len(col), col

        _, col = _cached(_CELLS, (url, fp, starts[g]), read, GROUP_CACHE)
        return self._cell(col[row - starts[g]].as_py(), url, row)

    def _parquet_groups(self, url: str) -> tuple[list[int], str]:
        """Each row group's first row, then the row count; the image column."""
        with self._open(url) as f:
            pf = need("pyarrow.parquet", "data").ParquetFile(f)
            column = self.image_column or _image_column(pf.schema_arrow, None, url)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        return [int(v) for v in np.cumsum([0, *sizes])], column

    def _arrow_row(self, url: str, row: int) -> bytes:
        """Row ``row`` of an Arrow stream file (a saved Hugging Face dataset's): its record batches streamed (memory
        mapped locally, so the batches before it cost no copy) up to the one holding the row, whose image column is
        kept."""
        fp = self._container_key(url)
        with _LOCK:
            kept = [(k[2], v) for k, v in _CELLS.items() if k[:2] == (url, fp) and k[2] <= row < k[2] + v[0]]
        if kept:
            at, (_, col) = kept[0]
            return self._cell(col[row - at].as_py(), url, row)
        pa = need("pyarrow", "data")
        with (pa.memory_map(url) if self.fs is None else self._open(url)) as f, pa.ipc.open_stream(f) as reader:
            column = self.image_column or _image_column(reader.schema, None, url)
            at = 0
            for batch in reader:
                if row < at + batch.num_rows:
                    col = batch.column(column)
                    _cached(_CELLS, (url, fp, at), lambda n=batch.num_rows, c=col: (n, c), GROUP_CACHE)
                    return self._cell(col[row - at].as_py(), url, row)
                at += batch.num_rows
        raise ImageDecodeError(f"row {row} is not in {url} ({at} rows)")

    @staticmethod
    def _cell(cell: Any, url: str, row: int) -> bytes:
        data = UnitReader._cell(cell)
        if isinstance(data, str):
            raise ImageDecodeError(f"row {row} of {url}: {data}")
        return data


def store_name(source: str | os.PathLike) -> str:
    """A file-name-safe name for a dataset's default store: the last part of its folder, file or pattern."""
    name = PurePosixPath(str(source).rstrip("/")).name or "data"
    name = name.rsplit(".", 1)[0] if name.lower().endswith((".csv", ".tar", ".parquet")) else name
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "data"
