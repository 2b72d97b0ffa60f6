"""probe: cached-feature linear probes, few-shot heads and similarity search on pretrained vision backbones.

Each command of the CLI is one call here, returning an object and writing files only when asked::

    import probe
    bb = probe.create_backbone("efficientnet_lite0")
    emb = probe.Embedder(bb)                                  # images / files / folders -> (N, D) float32
    summary = probe.extract("photos/", "cache/photos.h5")     # or use a store made by `probe extract`
    store = probe.FeatureStore("cache/photos.h5")
    X, y = store.features("train"), store.labels("train")
    head = probe.LinearHead().fit(X, y, eval_set=(store.features("val"), store.labels("val")))
    probe.save_head(head, "h.safetensors", identity=store.identity)      # optional
    idx = probe.SearchIndex.from_arrays(X, paths=store.paths("train"), labels=y)
    hits = idx.search(emb.embed_files(["q.jpg"])[0], k=5)
    report = probe.evaluate(head, store.features("test"), store.labels("test"))

The names are imported on first use, so ``import probe`` stays cheap (no torch until a backbone is needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # backbones and embedding
    "create_backbone": "probe.backbones", "list_backbones": "probe.backbones", "Backbone": "probe.backbones",
    "list_layers": "probe.backbones",
    "Embedder": "probe.embedder", "embedder_for": "probe.embedder",
    # extraction and the feature store
    "extract": "probe.extract", "ExtractConfig": "probe.extract",
    "FeatureStore": "probe.store", "store_from_arrays": "probe.store",
    "FeatureIdentity": "probe.identity",
    # heads
    "LinearHead": "probe.heads", "MLPHead": "probe.heads", "PrototypeHead": "probe.heads", "KNNHead": "probe.heads",
    "make_head": "probe.heads", "save_head": "probe.heads", "load_head": "probe.heads",
    "fit_head": "probe.heads.fit", "HeadFit": "probe.heads.fit",
    "evaluate": "probe.heads.evaluate", "evaluate_store": "probe.heads.evaluate", "EvalReport": "probe.heads.evaluate",
    "predict": "probe.predict",
    # search
    "SearchIndex": "probe.search", "IndexConfig": "probe.search",
    # store diagnostics
    "doctor": "probe.doctor", "DoctorReport": "probe.doctor",
    "embedding_map": "probe.embedding_map", "EmbeddingMap": "probe.embedding_map",
    # model selection
    "sweep": "probe.sweep", "SweepResult": "probe.sweep",
    # CLIP: text tower and zero-shot heads
    "TextTower": "probe.clip", "text_tower": "probe.clip", "text_tower_for": "probe.clip",
    "zeroshot": "probe.zeroshot", "ZeroShotResult": "probe.zeroshot",
    # errors
    "ProbeError": "probe.errors", "IdentityMismatchError": "probe.identity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .backbones import Backbone, create_backbone, list_backbones, list_layers  # noqa: F401
    from .clip import TextTower, text_tower, text_tower_for  # noqa: F401
    from .doctor import DoctorReport, doctor  # noqa: F401
    from .embedder import Embedder, embedder_for  # noqa: F401
    from .embedding_map import EmbeddingMap, embedding_map  # noqa: F401
    from .errors import ProbeError  # noqa: F401
    from .extract import ExtractConfig, extract  # noqa: F401
    from .heads import KNNHead, LinearHead, MLPHead, PrototypeHead, load_head, make_head, save_head  # noqa: F401
    from .heads.evaluate import EvalReport, evaluate, evaluate_store  # noqa: F401
    from .heads.fit import HeadFit, fit_head  # noqa: F401
    from .identity import FeatureIdentity, IdentityMismatchError  # noqa: F401
    from .predict import predict  # noqa: F401
    from .search import IndexConfig, SearchIndex  # noqa: F401
    from .store import FeatureStore, store_from_arrays  # noqa: F401
    from .sweep import SweepResult, sweep  # noqa: F401
    from .zeroshot import ZeroShotResult, zeroshot  # noqa: F401
