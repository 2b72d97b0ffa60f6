"""What the service does, without HTTP: load one backbone with its heads, indexes and few-shot sets, then embed,
classify, search and few-shot-classify uploaded images. The FastAPI app (app.py) calls one method per endpoint.

One backbone per process: every store, head and index given must have been made with the same backbone
configuration (``config_key``); otherwise the server refuses to start and names the file that differs.

Example:
    >>> svc = load_service(ServeConfig(stores=("cache/demo.h5",), heads=("lin=heads/demo.safetensors",)))
    >>> await svc.start()
    >>> await svc.classify("lin", open("shoe.png", "rb").read(), top_k=3)
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import DEFAULT_BACKBONE, BackboneError, create_backbone
from ..data import ImageDecodeError
from ..embedder import Embedder, embedder_for
from ..errors import ProbeError
from ..heads import calibration as cal
from ..heads.base import Head
from ..heads.io import load_head
from ..identity import FeatureIdentity, Side
from ..search.index import IndexConfig, SearchIndex, check_k
from ..search.query import hits, search_index
from ..sources import Pictures
from ..store import FeatureStore
from .batching import MicroBatcher
from .errors import NotFound, TooLarge, available
from .fewshot_sets import FewShotSets
from .images import decode_upload
from .security import check_exposure, check_token

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 1000  # CLIP's tokenizer keeps 77 tokens (~300 characters); longer texts are not queries


@dataclass
class ServeConfig:
    stores: tuple[str, ...] = ()  # "NAME=PATH" or PATH: each store is served as an exact search index NAME
    heads: tuple[str, ...] = ()  # "NAME=PATH" or PATH (name: the file's stem): classifiers from probe fit-head
    indexes: tuple[str, ...] = ()  # "NAME=PATH" or PATH: indexes from probe index
    backbone: str | None = None  # only needed when no store/head/index names one; default efficientnet_lite0
    weights: str | None = None  # with --backbone: a weights tag, 'random' or a checkpoint path
    dtype: str = "auto"  # with --backbone; otherwise the dtype the store/head/index recorded
    device: str = "auto"  # cuda when present
    engine: str = "auto"  # auto: ONNX Runtime for float32 on the CPU, else torch
    state_dir: str = "cache/serve"  # few-shot sets live in STATE_DIR/fewshot/*.npz (made with the first)
    max_batch: int = 32  # images per forward pass; 1 disables micro-batching
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company: the latency price
    max_upload_mb: float = 20.0  # larger uploads get 413 before they are read
    max_pixels: int = 40_000_000  # 40 Mpx decodes to 120 MB of RGB; larger images get 413 before decoding
    max_k: int = 100  # hits per search and classes per classification, at most
    body_timeout: float = 30.0  # seconds a request body may stall before 408: uvicorn itself would wait forever
    host: str = "127.0.0.1"  # the bound address: a Host name served; beyond loopback it needs a token
    token: str | None = field(default=None, repr=False)  # all requests but GET /health carry it; kept out of repr
    insecure: bool = False  # bind beyond loopback without a token: anyone who reaches the address may use it
    allow_hosts: tuple[str, ...] = ()  # Host names served besides loopback, IP addresses and host ("*.x.org", "*")

    def __post_init__(self) -> None:
        self.token = self.token or None  # an empty PROBE_TOKEN means none
        check_token(self.token)
        check_exposure(self.host, self.token, self.insecure)
        if self.body_timeout <= 0:
            raise ProbeError(f"--body-timeout must be > 0 seconds, got {self.body_timeout}")
        if self.max_batch < 1:
            raise ProbeError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ProbeError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_upload_mb <= 0 or self.max_pixels <= 0:
            raise ProbeError("--max-upload-mb and --max-pixels must be > 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def parse_named(specs: tuple[str, ...] | list[str], kind: str) -> dict[str, Path]:
    """["lin=heads/a.safetensors", "cache/b.faiss"] -> {"lin": Path(...), "b": Path(...)}; names are unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name = name.strip()
        if not name or not path:
            raise ProbeError(f"--{kind} {spec!r}: expected NAME=PATH or PATH")
        if name in out:
            raise ProbeError(f"two {kind}s are named {name!r} ({out[name]} and {path}): name them with "
                             f"--{kind} NAME=PATH")
        out[name] = Path(path)
    return out


def class_names(head: Head, meta: dict[str, Any]) -> list[str]:
    """Names of the head's probability columns: fit-head stores class indices and the names in its metadata."""
    names = meta.get("class_names")
    return [names[int(c)] if names is not None and np.asarray(c).dtype.kind in "iu" else str(c)
            for c in head.classes_]


def _top(proba: np.ndarray, names: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-proba, kind="stable")[:k]  # (k,)
    return [{"class": names[c], "probability": round(float(proba[c]), 6)} for c in order]


def _served(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``probe.search.query.hits`` as the API answers them: without ``abspath`` (the server's own folders)."""
    return [{key: h[key] for key in ("rank", "id", "score", "path", "label")} for h in found]


class Service:
    """A loaded backbone (behind a micro-batcher), heads, indexes and few-shot sets. Build with ``load_service``;
    call ``start()`` on the event loop before the first request and ``stop()`` at shutdown."""

    def __init__(self, config: ServeConfig, embedder: Embedder, key: str,
                 heads: dict[str, tuple[Head, list[str], Path]], indexes: dict[str, SearchIndex],
                 sources: dict[str, str]):
        self.config = config
        self.embedder = embedder
        self.key = key
        self.heads = heads
        self.indexes = indexes
        self.sources = sources  # index name -> the file it came from (store or index)
        self.sets = FewShotSets(config.state_dir, key, embedder.backbone.name, embedder.backbone.dim,
                                embedder.identity.features_only())
        self.batcher: MicroBatcher[torch.Tensor, np.ndarray] = MicroBatcher(
            self._forward, config.max_batch, config.max_wait_ms)
        self.started = time.time()
        self._pictures: dict[str, tuple[SearchIndex, Pictures]] = {}  # index name -> how its rows' images are read

    # ---- lifecycle
    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def _forward(self, xs: list[torch.Tensor]) -> np.ndarray:
        return self.embedder(torch.stack(xs))  # (B, ...) -> (B, D); runs in the batcher's thread

    # ---- lookups (404s name what exists)
    def _head(self, name: str) -> tuple[Head, list[str], Path]:
        if name not in self.heads:
            raise NotFound(f"no head named {name!r} ({available('heads', self.heads)})")
        return self.heads[name]

    def _index(self, name: str) -> SearchIndex:
        if name not in self.indexes:
            raise NotFound(f"no index named {name!r} ({available('indexes', self.indexes)})")
        return self.indexes[name]

    def _check_k(self, k: int, limit: int | None = None) -> None:
        if not 1 <= k <= self.config.max_k:
            raise ProbeError(f"k must be between 1 and {self.config.max_k}, got {k}")
        if limit is not None:
            check_k(k, limit)

    # ---- embedding: bytes -> (D,) through the micro-batcher
    def _preprocess(self, data: bytes) -> torch.Tensor:
        if len(data) > self.config.max_upload_bytes:
            raise TooLarge(f"the upload is {len(data) / 2**20:.1f} MB; this server accepts at most "
                           f"{self.config.max_upload_mb:g} MB (--max-upload-mb)")
        img = decode_upload(data, self.config.max_pixels, self.embedder.draft, self.embedder.footprint)
        return self.embedder.preprocess(img)  # (H, W, 3) uint8, or (3, H, W) float on the PIL path

    async def embed_vector(self, data: bytes) -> np.ndarray:
        """Uploaded image bytes -> (D,) float32. Decoding runs in a worker thread, the forward in a shared batch."""
        x = await asyncio.to_thread(self._preprocess, data)
        return await self.batcher.submit(x)

    async def embed(self, data: bytes) -> dict[str, Any]:
        v = await self.embed_vector(data)
        return {"backbone": self.embedder.backbone.name, "config_key": self.key, "dim": int(v.shape[0]),
                "embedding": [round(float(a), 7) for a in v]}

    # ---- heads
    async def classify(self, head_name: str, data: bytes, top_k: int = 5, reject: str | float = "none"
                       ) -> dict[str, Any]:
        """Top-k classes (calibrated probabilities when the head was calibrated) and the decision: ``class`` is
        "unknown" when the image is farther than the ``reject`` threshold from every class mean (``probe predict``).
        A multi-label head gives ``labels`` (every class at or above its threshold) instead of ``class``, and
        refuses a ``reject`` other than none."""
        head, names, _ = self._head(head_name)  # 404 before any decoding
        self._check_k(top_k)
        threshold = cal.resolve_threshold(head, reject, f"head {head_name!r}")  # ProbeError: 422 naming the value
        v = await self.embed_vector(data)
        proba = (await asyncio.to_thread(head.predict_proba, v[None]))  # (1, C), in the order of head.classes_
        decided = cal.decisions(head, v[None], proba, names, threshold)[0]
        return {"head": head_name, "kind": head.kind, **decided, **cal.describe(head, reject, threshold),
                "top": _top(proba[0], names, top_k)}

    # ---- search
    async def search(self, index_name: str, data: bytes, k: int = 10) -> dict[str, Any]:
        idx = self._index(index_name)
        self._check_k(k, idx.count)
        v = await self.embed_vector(data)
        scores, ids = await asyncio.to_thread(idx.search, v[None], k)  # (1, k)
        return {"index": index_name, "metric": idx.metric, "k": k, "hits": _served(hits(idx, scores[0], ids[0]))}

    def search_id(self, index_name: str, gallery_id: int, k: int = 10) -> dict[str, Any]:
        """Neighbours of an image already in the gallery (its stored vector; no forward pass)."""
        idx = self._index(index_name)
        self._check_k(k, idx.count)
        if not 0 <= gallery_id < idx.count:
            raise NotFound(f"id {gallery_id} is not in index {index_name!r}: ids run from 0 to {idx.count - 1}")
        r = search_index(idx, [str(gallery_id)], k=k)["results"][0]
        return {"index": index_name, "metric": idx.metric, "k": k, "query_id": gallery_id, "hits": _served(r["hits"])}

    async def search_text(self, index_name: str, text: str, k: int = 10) -> dict[str, Any]:
        """Nearest gallery images to a text, for an index of a clip/ store: the text encoded by its CLIP text
        tower (loaded on the first text query, then kept), compared by cosine with the stored image features."""
        idx = self._index(index_name)
        self._check_k(k, idx.count)
        if len(text) > MAX_TEXT_CHARS:
            raise TooLarge(f"the text is {len(text)} characters; this server takes at most {MAX_TEXT_CHARS} "
                           "(CLIP reads the first 77 tokens)")
        scores, ids = await asyncio.to_thread(idx.search_text, [text], k, self.config.device)  # (1, k)
        return {"index": index_name, "metric": idx.metric, "k": k, "text": text,
                "hits": _served(hits(idx, scores[0], ids[0]))}

    def thumbnail(self, index_name: str, gallery_id: int, size: int = 256) -> bytes:
        """A PNG of gallery image ``gallery_id`` at most ``size`` px on a side. Only files of a loaded index's
        gallery can be served: the path comes from the index, never from the request."""
        idx = self._index(index_name)
        if not 0 <= gallery_id < idx.count:
            raise NotFound(f"id {gallery_id} is not in index {index_name!r}: ids run from 0 to {idx.count - 1}")
        if not 16 <= size <= 1024:
            raise ProbeError(f"size must be between 16 and 1024 pixels, got {size}")
        if self._pictures.get(index_name, (None,))[0] is not idx:  # its store's record, read once per index
            self._pictures[index_name] = (idx, Pictures.of_index(idx.meta))
        try:
            img = self._pictures[index_name][1].load(idx.paths[gallery_id], self.config.max_pixels)
        except ImageDecodeError as e:
            raise NotFound(f"gallery image {gallery_id} ({idx.paths[gallery_id]}) cannot be shown: {e}") from None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    # ---- few-shot
    async def fewshot_add(self, set_name: str, label: str, data: bytes, source: str = "") -> dict[str, Any]:
        self.sets.get(set_name)  # 404/409 before any decoding
        v = await self.embed_vector(data)
        return await asyncio.to_thread(self.sets.add, set_name, label, v, source)

    async def fewshot_classify(self, set_name: str, data: bytes, top_k: int = 5) -> dict[str, Any]:
        self.sets.get(set_name)
        self._check_k(top_k)
        v = await self.embed_vector(data)
        return self.sets.classify(set_name, v, top_k)

    # ---- status
    def health(self) -> dict[str, Any]:
        ready = self.batcher.running
        return {"status": "ok" if ready else "unavailable", "ready": ready,
                "uptime_s": round(time.time() - self.started, 1), "backbone": self.embedder.backbone.name,
                "batching": self.metrics()}

    def metrics(self) -> dict[str, Any]:
        return {"max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms,
                "queued": self.batcher.pending, **self.batcher.stats.as_dict()}

    def catalog(self) -> dict[str, Any]:
        """Everything loaded: the backbone, heads, indexes, few-shot sets and the limits."""
        bb = self.embedder.backbone
        return {
            "backbone": {"name": bb.name, "weights": self.embedder.config["weights"], "dim": bb.dim,
                         "input_size": bb.preprocess.get("crop"), "dtype": self.embedder.dtype,
                         "device": str(self.embedder.device), "tta": self.embedder.tta, "config_key": self.key,
                         "engine": self.embedder.engine.name},
            "heads": [{"name": n, "kind": h.kind, "classes": names, "path": str(p),
                       "multilabel": bool(getattr(h, "multilabel_", False)),
                       "calibrated": hasattr(h, "temperature_") or hasattr(h, "platt_"),
                       "reject_threshold": getattr(h, "reject_threshold_", None)}
                      for n, (h, names, p) in sorted(self.heads.items())],
            "indexes": [{"name": n, "type": i.kind, "metric": i.metric, "count": i.count, "classes": list(i.classes),
                         "source": self.sources[n], "text_search": i.text_search_problem is None}
                        for n, i in sorted(self.indexes.items())],
            "fewshot_sets": self.sets.list(),
            "limits": {"max_upload_mb": self.config.max_upload_mb, "max_pixels": self.config.max_pixels,
                       "max_k": self.config.max_k},
        }


def load_service(config: ServeConfig) -> Service:
    """Load everything ``config`` names, check it all shares one backbone configuration, build the embedder.

    Raises StoreError / HeadError / BackboneError / ValueError / FileNotFoundError naming the file at fault."""
    stores = parse_named(config.stores, "store")
    head_files = parse_named(config.heads, "head")
    index_files = parse_named(config.indexes, "index")
    clash = set(stores) & set(index_files)
    if clash:
        raise ProbeError(f"a store and an index are both named {sorted(clash)[0]!r}: name one of them with NAME=PATH")

    identities: list[tuple[Side, FeatureIdentity]] = []
    indexes: dict[str, SearchIndex] = {}
    sources: dict[str, str] = {}
    opened = {name: FeatureStore(path) for name, path in stores.items()}  # attributes only: cheap
    for name, st in opened.items():
        identities.append((Side("store", str(stores[name])), st.identity))
    for name, path in index_files.items():
        idx = SearchIndex.load(path)
        identities.append((Side("index", str(path)), idx.identity))
        indexes[name], sources[name] = idx, str(path)
    heads: dict[str, tuple[Head, list[str], Path]] = {}
    for name, path in head_files.items():
        head, meta = load_head(path)
        identities.append((Side("head", str(path)), FeatureIdentity.from_config(meta["config"])))
        heads[name] = (head, class_names(head, meta), path)

    if identities:
        what0, first = identities[0]
        for what, other in identities[1:]:
            first.check(other, mine=what0, theirs=what, features_only=True, fix="one server serves one backbone, "
                        "so every store, head and index must come from the same extraction configuration.")
        attrs = first.to_dict()
        if config.backbone and config.backbone != attrs.get("backbone"):
            raise BackboneError(f"--backbone {config.backbone} differs from {attrs.get('backbone')}, the backbone of "
                                f"{what0}: drop --backbone (it is taken from the files)")
        if attrs.get("backbone") == "arrays":
            raise BackboneError(f"{what0} holds vectors that no backbone made (store_from_arrays): a server cannot "
                                "embed uploads for it")
        emb = embedder_for(attrs, device=config.device, engine=config.engine)
    else:
        emb = Embedder(create_backbone(config.backbone or DEFAULT_BACKBONE, config.weights), config.device,
                       config.dtype, engine=config.engine)
    key = emb.identity.feature_key
    for name, st in opened.items():  # only now that the configurations agree: indexing reads every vector
        log.info("indexing store %s (%d x %d) as %r", stores[name], st.count, st.dim, name)
        indexes[name], sources[name] = SearchIndex.build(st, IndexConfig()), str(stores[name])
    for head, _, path in heads.values():
        if head.n_features_in_ != emb.backbone.dim:
            raise ProbeError(f"head {path} expects {head.n_features_in_}-d features; {emb.backbone.name} gives "
                             f"{emb.backbone.dim}")
    log.info("serving %s (%s, %s on %s): %d heads, %d indexes", emb.backbone.name, emb.config["weights"], emb.dtype,
             emb.device, len(heads), len(indexes))
    return Service(config, emb, key, heads, indexes, sources)
