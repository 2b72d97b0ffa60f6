"""Run a frozen backbone over a dataset once and cache the embeddings in a feature store.

A runner of four named steps, each taking and returning typed records:

    make_plan   old store + journal + folder -> Plan        which files to embed, in which batches
    run_plan    Plan -> RunStats                             reader (DataLoader) -> Embedder -> journal
    reconcile   Plan + journal -> Reconciled                 the new store's rows, labels and skipped files
    write_result                                             attributes + write_store, then the journal goes

Resumable by construction: finished batches go to an fsync'd journal beside the store, the store itself is
replaced atomically at the end. After ``kill -9`` the same call picks up at the first unfinished batch, with the
same batch boundaries, so the features equal those of an uninterrupted run.

With ``views=K`` every image also gets K augmented views (seeded RandomResizedCrop + flip, ``ViewTransform``),
embedded into the store's ``views`` (N, K, D) beside its centre-crop ``features``: training data for heads that
augment (the MLP), still one decode and one pass of the backbone per run.

DATA may also be WebDataset tar shards, Parquet files, a saved Hugging Face dataset, or anything at an fsspec URL
(``probe.sources``): rows are then ``<container>#<member>``, batches never straddle two containers, and each decode
worker streams whole containers, so a kill loses at most one batch and a finished shard is never read again.

Example:
    >>> summary = extract("probe/demo/fashion-mnist", config=ExtractConfig(backbone="efficientnet_lite0"))
    >>> summary.count, summary.store
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from ._callable import make_module_callable
from .backbones import DEFAULT_BACKBONE, LAYER_SEP, Backbone, BackboneError, at_layer, create_backbone, resolve_layers
from .data import MAX_PIXELS, Dataset, ImageDecodeError, discover, load_image
from .device import DTYPES, cpu_has_native_bf16, resolve_device, resolve_dtype
from .embedder import PIXEL_PATHS, TTA_MODES, Embedder, embed_views, embedder_for, weights_arg
from .engine import ENGINES, engine_info
from .errors import DatasetError, DiskFullError, ProbeError, StoreError
from .fs import check_space, disk_full_error, new_folders
from .identity import FeatureIdentity, Side
from .shard import parse_shard, shard_path, take_shard
from .store import ClassMerge, FeatureStore, Journal, Row, Skip, StoreRows, locked, store_bytes, write_store
from .transforms import VIEW_FLIP, VIEW_RATIO, VIEW_SCALE, Footprint, PixelTransform, ViewTransform

__all__ = [  # the names moved to device / embedder / transforms stay importable from here
    "DTYPES", "PIXEL_PATHS", "TTA_MODES", "VIEW_FLIP", "VIEW_RATIO", "VIEW_SCALE", "Embedder", "ExtractConfig",
    "ExtractSummary", "PixelTransform", "ViewTransform", "cache_dir", "cpu_has_native_bf16", "default_store_path",
    "default_workers", "embed_views", "embedder_for", "extract", "resolve_device", "resolve_dtype", "weights_arg",
]

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    backbone: str | None = DEFAULT_BACKBONE  # None: the one a probe checkpoint in `weights` names
    weights: str | None = None  # None: the name's default pretrained weights; 'random'; or a checkpoint path
    batch_size: int = 64  # large enough for efficient GEMMs on CPU, small enough for any GPU
    workers: int = -1  # decode/resize processes; -1: one per core, at most 8
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on the CPU (ONNX Runtime: faster than torch's bf16 there)
    tta: str = "none"  # "hflip": mean of the image and its mirror
    pixels: str = "uint8"  # resize/crop on uint8 tensors (fast), or "pil": the weights' own PIL transform
    layout: str = "auto"  # see probe.data.discover: also webdataset | parquet | hf (probe.sources)
    image_column: str | None = None  # Parquet / HF dataset: the image column (None: 'image' or the only one)
    label_column: str | None = None  # Parquet / HF dataset: the label column; WebDataset: the json key (None: label)
    max_pixels: int = MAX_PIXELS  # larger images are refused as decompression bombs
    channels_last: bool = True  # NHWC: faster convolutions on CPU (oneDNN) and GPU (tensor cores)
    prune: bool = False  # drop stored rows whose files have disappeared from DATA
    shard: str | None = None  # "I/N": embed only shard I of N (None: from torchrun's RANK/WORLD_SIZE, if any)
    views: int = 0  # K augmented views per image in /views (N, K, D), training data for the MLP head; 0: none
    decode: str = "auto"  # JPEG decode + resize/crop: auto (gpu on CUDA with uint8 pixels and no views) | cpu | gpu
    # (nvjpeg + resize on the device, probe.gpu_decode; other files take the CPU path per file)
    engine: str = "auto"  # what runs the backbone: auto (ONNX Runtime for float32 on the CPU, else torch) | torch |
    # onnxruntime. Not part of the identity: float32 engines give the same features (cosine >= 0.9999)
    layer: str | None = None  # None: the pre-logits embedding; else intermediate layers, each average-pooled: names
    # or indices of probe.backbones.list_layers ("-1" deepest), "+"-joined to concatenate ("layer3+layer4"), lastN

    def __post_init__(self) -> None:  # cheap checks first: a bad option fails before any model loads
        if self.tta not in TTA_MODES:
            raise ProbeError(f"unknown TTA {self.tta!r}: expected one of {', '.join(TTA_MODES)}")
        if self.pixels not in PIXEL_PATHS:
            raise ProbeError(f"unknown pixel path {self.pixels!r}: expected one of {', '.join(PIXEL_PATHS)}")
        if self.dtype not in DTYPES:
            raise ProbeError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise ProbeError(f"unknown engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.batch_size < 1:
            raise ProbeError(f"batch_size must be >= 1, got {self.batch_size}")
        # these two keep the flags in their wording: tests/test_views.py matches "--views must be >= 0" and
        # "--pixels uint8" (cli/app.py leaves a name that already is a flag alone)
        if self.views < 0:
            raise ProbeError(f"--views must be >= 0 augmented views per image, got {self.views}")
        if self.views and self.pixels == "pil":
            raise ProbeError(f"--views {self.views} makes its views on uint8 tensors: it needs --pixels uint8, "
                             "not --pixels pil")
        if self.layer is not None and not all(t.strip() for t in str(self.layer).split(LAYER_SEP)):
            raise ProbeError(f"--layer {self.layer!r}: expected layer names or indices joined by '{LAYER_SEP}' "
                             "(probe backbones --layers NAME lists them)")
        resolve_device(self.device)
        parse_shard(self.shard)
        from .gpu_decode import check_decode  # imported here: probe.gpu_decode uses _Files and Decoded below

        check_decode(self.decode, self.device, self.pixels, self.views)


@dataclass
class ExtractSummary:
    """What ``extract`` did. ``to_dict()`` is the summary as JSON prints it; ``summary["count"]`` reads it too."""

    store: str
    shard: str | None  # "I/N" for a shard store
    count: int  # rows in the store
    dim: int
    views: int  # augmented views per image in /views (TTA applies to `features` only)
    backbone: str
    classes: list[str]
    embedded: int  # by this process; `resumed` more came from an interrupted run's journal
    reused: int  # rows whose vectors were already stored
    resumed: int
    skipped: list[dict[str, str]]  # [{path, reason}] of files that could not be embedded
    stale: int  # stored rows whose files are gone, kept
    pruned: int  # stored rows whose files are gone, dropped (prune)
    ignored: int  # files without an image extension
    device: str
    dtype: str
    engine: str  # what ran the backbone: torch or onnxruntime
    decode: str  # where JPEGs were decoded: cpu, or gpu (nvjpeg)
    seconds: float
    images_per_s: float | None  # of the embedding loop; None when it had nothing to do
    layer: str | None = None  # the intermediate layers the features pool ("layer3+layer4"); None: pre-logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


# -------------------------------------------------------------------------------------------- records
@dataclass
class Job:
    """One extraction, resolved from its config: the files, the embedder, the features' identity, the store."""

    ds: Dataset
    emb: Embedder
    identity: FeatureIdentity  # with the augmented views, when there are any: the store's config_key
    out: Path
    cfg: ExtractConfig
    shard: tuple[int, int] | None = None
    views: ViewTransform | None = None
    decode: str = "cpu"  # where JPEGs are decoded: cpu, or gpu (nvjpeg; probe.gpu_decode.choose_decode)


@dataclass
class Journaled:
    """The journal beside the store and what it holds: every path embedded (-> its fingerprint then) and every
    path that failed (-> Skip). ``append`` writes a batch (fsync'd) and records it; the vectors stay on disk. A new
    journal is written with its first batch: a run refused before (no space, a bad option) leaves no file behind."""

    journal: Journal
    header: dict[str, Any]  # what a new journal starts with: the run's identity, key and store
    started: bool  # the file holds ``header`` (an interrupted run's, or this run's first batch is in)
    done: dict[str, str] = field(default_factory=dict)
    bad: dict[str, Skip] = field(default_factory=dict)

    @classmethod
    def recover(cls, out: Path, identity: FeatureIdentity) -> Journaled:
        """The journal of ``out``: an interrupted run's, if it was made under ``identity``; else a new one (not yet
        on disk). An interrupted run of another configuration is refused, its journal kept: IdentityMismatchError
        (StoreError where its journal predates recording the identity). A journal without an intact header is not
        a run's: it is ignored (``Journal.read`` warns) and replaced."""
        journal = Journal(f"{out}.journal")
        header, records = journal.read()
        if header is not None and header.get("config_key") != identity.key:
            _refuse_journal(journal, header, identity)
        state = cls(journal, {"config_key": identity.key, "identity": identity.to_dict(), "store": str(out)},
                    started=header is not None)
        for r in records:
            state._record(r["paths"].tolist(), r["fingerprints"].tolist(), zip(
                r["bad_paths"].tolist(), r["bad_fingerprints"].tolist(), r["bad_reasons"].tolist()))
        return state

    def _record(self, paths: Sequence[str], fps: Sequence[str], bad: Iterable[tuple[str, str, str]]) -> None:
        self.done.update(zip(paths, fps))
        self.bad.update((p, Skip(fp, why)) for p, fp, why in bad)

    def failed(self, path: str, fp: str) -> bool:
        """Whether the file, as it is now (``fp``), failed to decode in this run or the interrupted one."""
        return path in self.bad and self.bad[path].fingerprint == fp

    def finished(self, path: str, fp: str) -> bool:
        return self.done.get(path) == fp or self.failed(path, fp)

    def append(self, batch: Embedded, paths: Sequence[str], fps: Sequence[str]) -> None:
        """Journal one embedded batch; ``paths``/``fps`` are the dataset's, indexed by ``batch``'s indices."""
        ok_paths, ok_fps = [paths[i] for i in batch.indices], [fps[i] for i in batch.indices]
        bad = [(paths[i], fps[i], why) for i, why in batch.failed]
        bad_paths, bad_fps, reasons = (list(c) for c in zip(*bad)) if bad else ([], [], [])
        if not self.started:
            try:
                self.journal.start(self.header)
            except BaseException:
                self.journal.remove()  # a header cut short by a full disk is nobody's journal
                raise
            self.started = True
        self.journal.append(
            features=batch.features, paths=np.array(ok_paths, dtype=str), fingerprints=np.array(ok_fps, dtype=str),
            bad_paths=np.array(bad_paths, dtype=str), bad_fingerprints=np.array(bad_fps, dtype=str),
            bad_reasons=np.array(reasons, dtype=str), **({"views": batch.views} if batch.views is not None else {}))
        self._record(ok_paths, ok_fps, bad)

    def vectors(self) -> Iterable[tuple[list[str], list[str], np.ndarray, np.ndarray | None]]:
        """(paths, fingerprints, (B, D) features, (B, K, D) views or None) of every journalled batch, streamed."""
        return self.journal.features()

    def remove(self) -> None:
        self.journal.remove()


def _refuse_journal(journal: Journal, header: dict[str, Any], identity: FeatureIdentity) -> NoReturn:
    """Raise for the journal of an interrupted run made another way: resuming would mix features, discarding it
    would lose that run's work; the journal stays untouched."""
    fix = (f"Re-run the interrupted command to finish it, use another out path, or delete {journal.path} (its "
           "embeddings are then lost).")
    if "identity" in header:  # journals written since they record it: every differing field, as for a store
        FeatureIdentity.from_config(header["identity"]).check(identity, mine=Side("journal", str(journal.path)),
                                                              theirs="this run", fix=fix)
    raise StoreError(f"{journal.path} holds an interrupted run of another configuration (key "
                     f"{str(header.get('config_key'))[:12]}, this run {identity.key[:12]}): {fix}")


@dataclass
class Plan:
    """Step 1's answer: what this run embeds, decided before any image is decoded."""

    fingerprints: list[str]  # (N,) of every file of the dataset, as it is now
    todo: list[int]  # dataset indices neither stored nor recorded as skipped as they are now
    batches: list[list[int]]  # ``todo`` cut into batch_size, less what the journal already holds
    resumed: int  # files of ``todo`` the journal already holds (an interrupted run's)
    old: StoreRows  # the store before this run (empty when there is none)
    created: str | None  # the old store's creation time, kept
    journal: Journaled
    need: int  # bytes the run will still write beside the old store: the rest of the journal, then the new store

    @property
    def count(self) -> int:
        """Files this run decodes."""
        return sum(len(b) for b in self.batches)


class Decoded(NamedTuple):
    """A batch from the reader, collated in a DataLoader worker (a NamedTuple: pin_memory keeps its type)."""

    images: torch.Tensor | None  # (B, H, W, 3) uint8 or (B, 3, H, W) float; None when no file decoded
    views: torch.Tensor | None  # (B, K, H, W, 3) uint8 when the run makes augmented views
    indices: list[int]  # dataset indices of the B decoded files
    failed: list[tuple[int, str]]  # (dataset index, reason) of the files that did not decode


@dataclass
class Embedded:
    """A batch through the embedder: what the journal records."""

    indices: list[int]
    failed: list[tuple[int, str]]
    features: np.ndarray  # (B, D) float32
    views: np.ndarray | None  # (B, K, D) float32 when the run makes augmented views


@dataclass
class RunStats:
    embedded: int  # files embedded by this process
    seconds: float  # wall time of the loop


@dataclass
class Reconciled:
    """Step 3's answer: the rows of the new store."""

    classes: list[str]  # the old store's and the dataset's, merged
    rows: dict[str, Row]  # stored rows first, in their order; then new files, in dataset order
    new: set[str]  # paths whose vectors come from the journal
    skipped: dict[str, Skip]
    stale: list[str]  # stored paths gone from the dataset (dropped when pruning)


# ------------------------------------------------------------------------------------------- the runner
def extract(data: str | os.PathLike, out: str | os.PathLike | None = None, config: ExtractConfig | None = None,
            progress: bool = False, backbone: Backbone | None = None) -> ExtractSummary:
    """Embed every image of DATA not already in the store; returns an ExtractSummary.

    Raises DatasetError / BackboneError / StoreError when the run cannot start, DatasetError when no file of DATA
    decodes (nothing is written), DiskFullError when the disk fills (the finished batches stay in the journal: the
    same call resumes once there is space); bad images never raise."""
    job = _job(data, out, config or ExtractConfig(), backbone)
    # a file in the way is one line naming the store; folders made for a refused run are removed again
    with new_folders(job.out.parent, job.out), locked(job.out):
        return _extract_locked(job, progress)


def _extract_locked(job: Job, progress: bool = False) -> ExtractSummary:
    """plan -> run -> reconcile -> write, under the store's lock."""
    t0 = time.perf_counter()
    plan = make_plan(job)
    if plan.count:  # a long run should not fail at its end for want of space
        check_space(job.out, plan.need, f"checked before embedding {plan.count} images; {job.out} is unchanged")
    stats = run_plan(job, plan, progress)
    result = reconcile(job.ds, plan, job.cfg.prune)
    if not result.rows and not plan.old.rows and len(job.ds) and not job.shard:
        plan.journal.remove()  # nothing to resume: the files are not images
        raise DatasetError(_no_images(job.ds, result.skipped))
    write_result(job, plan, result)
    return _summary(job, plan, stats, result, time.perf_counter() - t0)


def _job(data: str | os.PathLike, out: str | os.PathLike | None, cfg: ExtractConfig,
         backbone: Backbone | None) -> Job:
    """Resolve a config: list the files, build the embedder, key the features, choose the store (and shard)."""
    ds = discover(data, cfg.layout, cfg.image_column, cfg.label_column)
    shard = parse_shard(cfg.shard)
    device = cfg.device
    if shard and device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun rank
    emb = Embedder(_backbone(cfg, backbone), device, cfg.dtype, cfg.tta, cfg.channels_last, cfg.pixels, cfg.engine)
    views, identity = None, emb.identity
    if cfg.views:
        if emb.pixels is None:
            raise BackboneError(f"views={cfg.views}: augmented views are made on uint8 tensors, and the "
                                f"transform of {emb.backbone.name} has no uint8 form ({emb.backbone.transform!r})")
        views = ViewTransform(emb.pixels, cfg.views)
        identity = replace(identity, views={"count": cfg.views, "augment": views.recipe})  # a key of its own
    out = Path(out) if out else default_store_path(ds, emb.backbone.name, identity.key)
    if shard:
        ds, out = take_shard(ds, shard), shard_path(out, shard)
        log.info("shard %d/%d: %d files -> %s", *shard, len(ds), out)
    from . import gpu_decode  # here, not at the top: it imports this module

    if ds.reader is not None and cfg.decode == "gpu":
        raise ProbeError(f"--decode gpu reads image files by path; the rows of {ds.source} are read from containers "
                         "or a URL and decoded on the CPU: use --decode cpu (or auto)")
    decode = "cpu" if ds.reader is not None else gpu_decode.choose_decode(cfg.decode, emb.device, emb.pixels,
                                                                          cfg.views)
    return Job(ds, emb, identity, out, cfg, shard, views, decode)


def _backbone(cfg: ExtractConfig, given: Backbone | None) -> Backbone:
    """The backbone of the config (at ``cfg.layer``), or the one given, taken at ``cfg.layer`` if it is not already."""
    if given is None:
        return create_backbone(cfg.backbone, cfg.weights, layer=cfg.layer)
    if cfg.layer is None or given.layer is None:
        return at_layer(given, cfg.layer) if cfg.layer is not None else given
    if LAYER_SEP.join(resolve_layers(cfg.layer, given.model.offered, given.name)) != given.layer:
        raise BackboneError(f"layer {cfg.layer!r} asked for, but the backbone given gives layer {given.layer!r}")
    return given


# ------------------------------------------------------------------------------------------- 1. plan
def make_plan(job: Job) -> Plan:
    """What to embed: the files whose current fingerprint the old store neither holds nor recorded as skipped,
    cut into batches, less what an interrupted run's journal already holds."""
    old, created = _old_rows(job)
    paths = job.ds.paths
    fps = job.ds.fingerprints()
    todo = [i for i, p in enumerate(paths) if not old.has(p, fps[i], job.cfg.max_pixels)]
    journal = Journaled.recover(job.out, job.identity)
    finished = {i for i in todo if journal.finished(paths[i], fps[i])}
    # Batches are cut from the to-do list before the journal is consulted: a resumed run sees the same batch
    # boundaries as an uninterrupted one, so every image goes through the same forward pass. A container dataset's
    # batches stay within one container (a shard, a row group), which one worker reads.
    bs = job.cfg.batch_size
    groups = job.ds.reader.group(todo) if job.ds.reader is not None else [todo]
    cut = [g[s: s + bs] for g in groups for s in range(0, len(g), bs)]
    batches = [b for b in ([i for i in b if i not in finished] for b in cut) if b]
    if finished:
        log.info("resuming %s: %d images already done in the journal", job.out, len(finished))
    rest = [i for b in batches for i in b]
    return Plan(fps, todo, batches, len(finished), old, created, journal, _space(job, old, todo, rest))


def _space(job: Job, old: StoreRows, todo: Sequence[int], rest: Sequence[int]) -> int:
    """About the bytes still to write while the old store stays: the journal of the ``rest`` of ``todo`` (features,
    views, paths and fingerprints as UCS-4, a zip header per batch), then the new store."""
    paths, dim, k = job.ds.paths, job.emb.dim, job.cfg.views
    longest = max((len(paths[i]) for i in rest), default=0) + 32  # + the fingerprint, "size:mtime_ns"
    journal = len(rest) * (4 * dim * (1 + k) + 4 * longest) + 4096 * -(-len(rest) // job.cfg.batch_size)
    new = [i for i in todo if paths[i] not in old.rows]
    text = sum(len(p) + len(r.fingerprint) + len(r.split) for p, r in old.rows.items()) + \
        sum(len(paths[i]) + 32 for i in new)
    ds = job.ds
    return journal + store_bytes(len(old.rows) + len(new), dim, k, text,
                                 label_columns=len(set(ds.classes) | set(old.classes)) if ds.multilabel else 0)


def _old_rows(job: Job) -> tuple[StoreRows, str | None]:
    """The rows of the store this run extends (refused unless made the same way), and when it was created."""
    if not job.out.exists():
        return StoreRows(), None
    old = FeatureStore(job.out)
    old.identity.check(job.identity, mine=Side("store", str(job.out)), theirs="this run", fix="Use another out "
                       "path (the default one is keyed by configuration) or delete the old store.")
    return StoreRows.read(old), old.attrs.get("created")


# -------------------------------------------------------------------------------------------- 2. run
def run_plan(job: Job, plan: Plan, progress: bool = False) -> RunStats:
    """The planned batches through reader (decode + preprocess in DataLoader workers) -> embedder -> journal.
    A batch is in the fsync'd journal before the next one is embedded: a kill loses at most the one in flight."""
    loader = _reader(job, plan.batches)
    embedded, t0 = 0, time.perf_counter()
    with tqdm(total=plan.count, unit="img", disable=not progress, desc=f"extract {job.emb.backbone.name}",
              mininterval=0.5, dynamic_ncols=True) as bar:
        try:
            for batch in loader:
                for i, reason in batch.failed:
                    log.warning("skipped %s: %s", job.ds.abspath(i), reason)
                try:
                    plan.journal.append(_embed(job, batch), job.ds.paths, plan.fingerprints)
                except DiskFullError as e:  # the batches before this one stay in the journal: a re-run resumes
                    left = [i for b in plan.batches for i in b if not plan.journal.finished(job.ds.paths[i],
                                                                                              plan.fingerprints[i])]
                    raise disk_full_error(e.filename, _space(job, plan.old, plan.todo, left), _kept(job, plan)) \
                        from None
                embedded += len(batch.indices)
                bar.update(len(batch.indices) + len(batch.failed))
        except DatasetError as e:  # the storage failed mid-run (sources.UnitReader): what was embedded is kept
            raise DatasetError(f"{_worker_message(e)}; {_kept(job, plan)}") from None
    return RunStats(embedded, time.perf_counter() - t0)


def _worker_message(e: Exception) -> str:
    """An error's one line, also when a DataLoader worker raised it: torch re-raises it with the worker's traceback
    in the message, whose last line is ``module.Type: the message``."""
    text = str(e).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _embed(job: Job, batch: Decoded) -> Embedded:
    """The mapper: centre crops -> (B, D) features; augmented views (without TTA) -> (B, K, D)."""
    emb, k = job.emb, job.cfg.views
    feats = emb(batch.images) if batch.images is not None else np.zeros((0, emb.dim), np.float32)
    views = None
    if k:
        views = embed_views(emb, batch.views, job.cfg.batch_size) if batch.views is not None else \
            np.zeros((0, k, emb.dim), np.float32)
    return Embedded(batch.indices, batch.failed, feats.astype(np.float32), views)


class _Files(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; a bad file becomes (None, i, reason), never an exception.
    With ``views`` an item is (centre, views) of one decode, the views seeded by ``keys[i]`` (relative path).
    ``max_pixels`` bounds the source and every image ``transform`` makes of it (``footprint``), checked before
    decoding: a 12000x1 strip is skipped, not resized shortest-side-first into gigabytes."""

    def __init__(self, paths: list[str], transform, max_pixels: int, views: ViewTransform | None = None,
                 keys: Sequence[str] = (), draft: int | None = None):
        self.paths, self.transform, self.max_pixels, self.draft = paths, transform, max_pixels, draft
        self.views, self.keys = views, keys
        self.footprint = Footprint.of(transform)  # views crop first: the centre transform is the larger

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.item(i, partial(load_image, self.paths[i], self.max_pixels, self.draft, self.footprint))

    def item(self, i: int, load: Callable[[], Any]):
        """Row i's item from ``load()``, its decoded image (a file's, or a container member's:
        ``probe.sources.UnitReader``); (None, i, reason) when it raises ImageDecodeError or the transform fails."""
        try:
            return self.prepare(load(), i)
        except ImageDecodeError as e:
            return None, i, str(e)
        except Exception as e:  # noqa: BLE001 - a transform failing on an odd image must not stop the run
            return None, i, f"preprocessing failed: {type(e).__name__}: {e}"

    def prepare(self, img, i: int):
        """A decoded image -> (centre, or (centre, views)), i, ""."""
        x = self.transform(img)
        return (x if self.views is None else (x, self.views(img, self.keys[i]))), i, ""


def _collate(items) -> Decoded:
    ok = [(x, i) for x, i, _ in items if x is not None]
    xs = [x for x, _ in ok]
    images = views = None
    if xs and isinstance(xs[0], tuple):  # (centre, views) per file
        images, views = (torch.stack(p) for p in zip(*xs))
    elif xs:
        images = torch.stack(xs)
    return Decoded(images, views, [i for _, i in ok], [(i, r) for x, i, r in items if x is None])


def _reader(job: Job, batches: list[list[int]]) -> Iterable[Decoded]:
    """Batches of dataset indices -> ``Decoded`` batches, decoded in ``workers`` processes (or, with GPU decode,
    read there and decoded by nvjpeg on the device: ``probe.gpu_decode``)."""
    ds, emb, cfg = job.ds, job.emb, job.cfg
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    from . import gpu_decode  # imported here: it uses _Files and Decoded from this module

    if job.decode == "gpu":
        log.info("decoding JPEGs on %s (nvjpeg); other files on the CPU", emb.device)
        return gpu_decode.GpuReader([ds.abspath(i) for i in range(len(ds))], emb.pixels, emb.device,
                                    cfg.max_pixels, emb.draft, batches, workers)
    if ds.reader is not None:  # containers or a URL: each worker streams whole units (probe.sources)
        from .sources import UnitReader

        files = _Files([], emb.preprocess, cfg.max_pixels, job.views, ds.paths, emb.draft)
        units = UnitReader(ds.reader, batches, files.item, _collate, cfg.max_pixels, emb.draft, files.footprint)
        workers = min(workers, len(units.work))
        return DataLoader(units, batch_size=None, num_workers=workers, pin_memory=emb.device.type == "cuda",
                          prefetch_factor=2 if workers else None)
    files = _Files([ds.abspath(i) for i in range(len(ds))], emb.preprocess, cfg.max_pixels, job.views, ds.paths,
                   emb.draft)
    return DataLoader(files, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=emb.device.type == "cuda", prefetch_factor=4 if workers else None)


def default_workers() -> int:
    """Decode processes: one per core, at most 8. With the uint8 pixel path decoding is ~1/10 of a CPU forward
    pass, so on the CPU 0, 1 or 2 workers end within noise of each other (benchmarks/bench_extract.py runs each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8)


# -------------------------------------------------------------------------------------- 3. reconcile
def reconcile(ds: Dataset, plan: Plan, prune: bool = False) -> Reconciled:
    """The new store mirrors the dataset. Stored rows come first, in their order: one still in the dataset takes
    its label and split from it (and its fingerprint from the journal when re-embedded), one gone stays unless
    ``prune``, one that changed and no longer decodes goes. Then the newly embedded files, in dataset order.
    Labels index the merged class list (as a merge of shards does, ``probe.shard.merge``); a multi-label
    dataset's rows carry their classes as ``Row.positives``."""
    old, journal, fps = plan.old, plan.journal, plan.fingerprints
    classes = ClassMerge(ds.classes, old.classes)
    here = {p: i for i, p in enumerate(ds.paths)}

    def row(i: int, fp: str) -> Row:
        ys = None if ds.label_matrix is None else tuple(np.flatnonzero(ds.label_matrix[i]).tolist())
        return Row(fp, classes.label(int(ds.labels[i]), ds.classes), ds.splits[i], classes.positives(ys, ds.classes))

    rows: dict[str, Row] = {}
    for p, stored in old.relabelled(classes):
        i = here.get(p)
        if i is None:
            if not prune:
                rows[p] = stored
        elif not journal.failed(p, fps[i]):  # a file that changed and no longer decodes: its old row is wrong
            rows[p] = row(i, journal.done.get(p, stored.fingerprint))
    new = {p for i, p in enumerate(ds.paths) if journal.done.get(p) == fps[i]}
    rows.update((p, row(i, fps[i])) for i, p in enumerate(ds.paths) if p in new and p not in rows)
    skipped = {p: journal.bad[p] for p in ds.paths if journal.failed(p, fps[here[p]])}
    skipped.update((p, s) for p, s in old.skipped.items()
                   if p in here and s.fingerprint == fps[here[p]] and p not in skipped and p not in new)
    return Reconciled(classes.classes, rows, new, skipped, stale=[p for p in old.rows if p not in here])


# ------------------------------------------------------------------------------------------ 4. write
def write_result(job: Job, plan: Plan, result: Reconciled) -> None:
    """Write the store when anything changed (vectors streamed from the journal), then drop the journal."""
    old = plan.old
    changed = bool(result.new) or not job.out.exists() or _reasons(result.skipped) != _reasons(old.skipped) or \
        result.classes != old.classes or dict(old.relabelled(ClassMerge(result.classes))) != result.rows
    # (the last: rows added or dropped, or labels changed in the manifest)
    if changed:
        write_store(job.out, _attrs(job, result.classes, plan.created), result.rows, plan.journal.vectors(),
                    result.skipped, job.emb.dim, new={p for p in result.new if p not in old.rows},
                    views=job.cfg.views, what=_kept(job, plan))
    plan.journal.remove()
    if result.stale:
        log.warning("%d stored images are no longer under %s (e.g. %s): %s", len(result.stale), job.ds.root,
                    result.stale[0], "dropped (prune)" if job.cfg.prune else "kept; prune (--prune) drops them")


def _kept(job: Job, plan: Plan) -> str:
    """What a run stopped by a full disk keeps, and how to go on."""
    n = len(plan.journal.done)
    if not n:
        return f"{job.out} is unchanged"
    return (f"the {n} images embedded so far are kept in {plan.journal.journal.path} and {job.out} is unchanged: "
            "re-run the same command to resume")


def _reasons(skipped: dict[str, Skip]) -> dict[str, str]:
    return {p: s.reason for p, s in skipped.items()}


def _no_images(ds: Dataset, skipped: dict[str, Skip]) -> str:
    """Why a dataset gave no rows: every file it listed failed to decode (and the rest had no image extension)."""
    shown = sorted(skipped.items())[:3]
    why = "; ".join(f"{p}: {s.reason}" for p, s in shown) + ("; …" if len(skipped) > len(shown) else "")
    ignored = f"; {len(ds.ignored)} without an image extension, e.g. {ds.ignored[0]}" if ds.ignored else ""
    return (f"no images in {str(ds.source)!r}: {len(ds) + len(ds.ignored)} files, none decodable ({why}{ignored}); "
            "no store was written")


def _attrs(job: Job, classes: list[str], created: str | None) -> dict[str, Any]:
    attrs = {
        **job.identity.to_dict(),
        "config_key": job.identity.key,
        "classes": classes,
        "root": str(job.ds.root),
        "layout": job.ds.layout,
        "device": str(job.emb.device),
        "engine": {**engine_info(job.emb.engine), "decode": job.decode},  # provenance: what ran, which version
        "versions": _versions(),
        "extract_config": {k: v for k, v in asdict(job.cfg).items() if k not in ("prune",)},
    }
    from .sources import is_url

    if is_url(job.ds.source):  # a URL: root is fsspec's path, without scheme
        attrs["source"] = job.ds.source
    if job.shard:  # the completion marker: the store file only ever appears whole (atomic rename)
        attrs.update(shard=f"{job.shard[0]}/{job.shard[1]}", complete=True)
    if created:
        attrs["created"] = created
    return attrs


def _versions() -> dict[str, str]:
    import h5py
    import timm
    import torchvision

    return {"probe": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _summary(job: Job, plan: Plan, stats: RunStats, result: Reconciled, seconds: float) -> ExtractSummary:
    cfg, emb, pruning = job.cfg, job.emb, job.cfg.prune
    return ExtractSummary(
        store=str(job.out), shard=f"{job.shard[0]}/{job.shard[1]}" if job.shard else None, count=len(result.rows),
        dim=emb.dim, views=cfg.views, backbone=emb.backbone.name, classes=result.classes,
        embedded=stats.embedded, reused=len(result.rows) - len(result.new), resumed=plan.resumed,
        skipped=[{"path": p, "reason": s.reason} for p, s in sorted(result.skipped.items())],
        stale=0 if pruning else len(result.stale), pruned=len(result.stale) if pruning else 0,
        ignored=len(job.ds.ignored), device=str(emb.device), dtype=emb.dtype, engine=emb.engine.name,
        decode=job.decode, seconds=round(seconds, 3),
        images_per_s=round(plan.count / stats.seconds, 2) if plan.count and stats.seconds > 0 else None,
        layer=emb.backbone.layer,
    )


# ------------------------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    return Path(os.environ.get("PROBE_CACHE_DIR", "cache"))


def default_store_path(ds: Dataset, backbone: str, key: str) -> Path:
    """cache/<dataset>-<hash of its path>.<backbone>.<config key>.h5: a new configuration gets a new file.
    The dataset is what DATA named: a folder, or a CSV manifest (two manifests in one folder get two stores), or a
    shard pattern, Parquet file or URL (``probe.sources.store_name``)."""
    src = ds.source
    if ds.reader is not None:  # containers, or a URL: the name of the folder, file or pattern
        from .sources import store_name

        name = store_name(src)
    else:
        name = src.stem if src != ds.root else src.name
    slug = (name or "data") + "-" + hashlib.sha1(str(src).encode()).hexdigest()[:6]
    return cache_dir() / f"{slug}.{backbone.replace('/', '_')}.{key[:8]}.h5"


make_module_callable(__name__, extract)  # `probe.extract(...)` whether Python bound the module or the function
