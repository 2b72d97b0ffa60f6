"""Turn what a user types as queries into vectors and run them against a saved index: `probe search`.

A query is an image file (embedded with exactly the index's backbone and preprocessing), a folder (every image in
it, recursively), or something already in the gallery: an integer id or a stored path (relative, or absolute under
the store's root), whose stored vector is used without loading the backbone. An index of a clip/ store also takes
text (``search_text``: encoded by the CLIP's text tower, `probe search --text`).

Example:
    >>> out = search_index("cache/demo.faiss", ["photo.jpg", "17", "train/Bag/00754.png"], k=5)
    >>> out["results"][0]["hits"][0]          # {"rank": 1, "id": …, "score": 0.93, "path": …, "label": "Bag"}
    >>> search_text("cache/photos.faiss", ["a photo of a bee"], k=5)["results"][0]["hits"]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import images_in
from ..errors import MissingFileError, ProbeError
from .index import SearchIndex, check_k

log = logging.getLogger(__name__)


@dataclass
class Query:
    text: str  # what the user typed, or the file found in a folder they typed
    kind: str  # "image", "id" or "path"
    gallery_id: int | None  # the query's own row when it is in the gallery: it must come back first


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(p))


def _gallery_lookup(idx: SearchIndex) -> dict[str, int]:
    """stored path (relative as stored, and absolute) -> id."""
    table = {p: i for i, p in enumerate(idx.paths)}
    table.update({_norm(idx.abspath(i)): i for i in range(idx.count)})
    return table


def resolve(idx: SearchIndex, inputs: Sequence[str | os.PathLike]) -> list[Query]:
    """Classify every input; folders expand to their image files. Raises FileNotFoundError / ValueError naming
    an input that is none of image file, folder, gallery id or stored path."""
    if not inputs:
        raise ProbeError("no queries given: pass image files, folders, gallery ids or stored paths")
    table = _gallery_lookup(idx)
    out: list[Query] = []
    for raw in map(str, inputs):
        p = Path(raw)
        if p.is_dir():
            out += [Query(f, "image", table.get(_norm(f))) for f in images_in(p)]
        elif p.is_file():
            out.append(Query(raw, "image", table.get(_norm(raw))))
        elif raw.lstrip("-").isdigit():
            i = int(raw)
            if not 0 <= i < idx.count:
                raise ProbeError(f"query id {i} is not in the gallery: ids run from 0 to {idx.count - 1}")
            out.append(Query(raw, "id", i))
        elif raw in table or _norm(raw) in table:
            out.append(Query(raw, "path", table.get(raw, table.get(_norm(raw)))))
        else:
            raise MissingFileError(
                f"query {raw!r} is not an image file, a folder, a gallery id (0..{idx.count - 1}) or a path stored "
                f"in the index (e.g. {idx.paths[0]!r})")
    return out


def embed_queries(idx: SearchIndex, queries: list[Query], device: str = "auto", engine: str = "auto",
                  batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Vectors for the queries: (n_ok, D), the indices into ``queries`` they belong to, and [{path, reason}] for
    images that could not be decoded. Image queries load the index's backbone (refused if it differs).
    ``progress``: a bar on stderr over the query images embedded, when they are more than one batch."""
    vecs: dict[int, np.ndarray] = {}
    stored = [j for j, q in enumerate(queries) if q.kind != "image"]
    if stored:
        for j, v in zip(stored, idx.vectors([queries[j].gallery_id for j in stored])):
            vecs[j] = v
    images = [j for j, q in enumerate(queries) if q.kind == "image"]
    bad: list[dict[str, str]] = []
    if images:
        emb = idx.embedder(device, engine)  # ProbeError: no backbone made the vectors; BackboneError: it differs now
        feats, ok, bad = emb.embed_files([queries[j].text for j in images], batch_size,  # (n_ok, D)
                                         progress and len(images) > batch_size)
        for row, i in enumerate(ok):
            vecs[images[i]] = feats[row]
    order = sorted(vecs)
    x = np.stack([vecs[j] for j in order]) if order else np.zeros((0, idx.dim), np.float32)
    return x, order, bad


def _self_first(idx: SearchIndex, q: np.ndarray, scores: np.ndarray, ids: np.ndarray, own: int,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """A query that is in the gallery comes back first: moved to the front if a tie (an exact duplicate) or the
    approximate search put it elsewhere, inserted with its exact score if it was missed."""
    keep = ids != own
    own_score = _exact_score(idx, q, idx.vectors([own])[0]) if keep.all() else scores[~keep][0]
    return np.concatenate([[own_score], scores[keep]])[:k], np.concatenate([[own], ids[keep]])[:k]


def _exact_score(idx: SearchIndex, q: np.ndarray, v: np.ndarray) -> float:
    q = q.astype(np.float64)
    if idx.metric == "cosine":
        return float(q @ v / max(np.linalg.norm(q), 1e-12))  # v is stored normalised
    return float(np.linalg.norm(q - v))


def search_index(index: str | os.PathLike | SearchIndex, inputs: Sequence[str | os.PathLike], k: int = 10,
                 device: str = "auto", batch_size: int = 64, engine: str = "auto",
                 progress: bool = False) -> dict[str, Any]:
    """Top-k gallery hits for every query; undecodable query images are listed in ``skipped``. ``progress``: a
    bar on stderr over the query images embedded, when they are more than one batch.

    Raises ValueError when k does not fit the gallery or no query could be used, BackboneError when the backbone
    available now differs from the index's."""
    idx = index if isinstance(index, SearchIndex) else SearchIndex.load(index)
    check_k(k, idx.count)  # before any backbone loads
    queries = resolve(idx, inputs)
    x, ok, bad = embed_queries(idx, queries, device, engine, batch_size, progress)
    if not ok:  # the error names each file: no warning before it
        raise ProbeError("no query could be used: " + "; ".join(f"{b['path']}: {b['reason']}" for b in bad))
    for b in bad:
        log.warning("skipped query %s: %s", b["path"], b["reason"])
    scores, ids = idx.search(x, k)  # (n, k)
    results = []
    for row, j in enumerate(ok):
        q = queries[j]
        s, i = scores[row], ids[row]
        if q.gallery_id is not None:
            s, i = _self_first(idx, x[row], s, i, q.gallery_id, k)
        results.append({"query": q.text, "kind": q.kind, "gallery_id": q.gallery_id,
                        "query_path": q.text if q.kind == "image" else idx.abspath(q.gallery_id),
                        "hits": hits(idx, s, i)})
    return _answer(idx, k, results, bad)


def search_text(index: str | os.PathLike | SearchIndex, texts: Sequence[str], k: int = 10,
                device: str = "auto") -> dict[str, Any]:
    """Top-k gallery hits for every text, by cosine to the text's CLIP embedding; the same answer as
    ``search_index`` (each result's ``kind`` is "text", with no ``gallery_id`` or ``query_path``).

    Raises ProbeError for an empty text, an index that cannot take text (not clip/, a layer, metric l2: see
    ``SearchIndex.text_search_problem``) or a k that does not fit the gallery.

    Example:
        >>> search_text("cache/photos.faiss", ["a photo of a bee"], k=5)["results"][0]["hits"][0]["path"]
    """
    idx = index if isinstance(index, SearchIndex) else SearchIndex.load(index)
    texts = [texts] if isinstance(texts, str) else list(texts)
    scores, ids = idx.search_text(texts, k, device)  # (n, k)
    results = [{"query": t, "kind": "text", "gallery_id": None, "query_path": None, "hits": hits(idx, s, i)}
               for t, s, i in zip(texts, scores, ids)]
    return _answer(idx, k, results, [])


def hits(idx: SearchIndex, scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
    """(k,) scores and ids -> the hit records, best first; ids of -1 (fewer than k found) dropped."""
    return [{"rank": r + 1, "id": int(g), "score": round(float(sc), 6), "path": idx.paths[g],
             "abspath": idx.abspath(int(g)), "label": idx.label_name(int(g))}
            for r, (sc, g) in enumerate(zip(scores, ids)) if g >= 0]


def _answer(idx: SearchIndex, k: int, results: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, Any]:
    return {"index": str(idx.path or ""), "type": idx.kind, "metric": idx.metric, "k": k,
            "count": idx.count, "backbone": idx.identity.backbone, "results": results, "skipped": skipped}
