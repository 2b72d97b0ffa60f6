"""Classify new images with a saved head: embed them with exactly the backbone and preprocessing recorded in the
head, then the head's probabilities (temperature-scaled when the head was calibrated) and, with ``reject``, "unknown"
for images far from every class the head knows. The feature store is not needed.

Example:
    >>> out = predict(["photo.jpg", "more_photos/"], "heads/demo-linear.safetensors", top_k=3)
    >>> out["predictions"][0]["top"][0]        # {"class": "Sneaker", "probability": 0.93}
    >>> out["predictions"][0]["class"], out["calibrated"]     # "Sneaker" (or "unknown"), True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._callable import make_module_callable
from .data import images_in
from .errors import MissingFileError, ProbeError
from .heads import calibration as cal
from .heads.io import load_head

log = logging.getLogger(__name__)


def list_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders expanded to their image files (recursively, sorted). A missing path raises
    FileNotFoundError naming it; a folder without images raises ValueError."""
    files: list[str] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += images_in(p)
        elif p.exists():
            files.append(str(p))
        else:
            raise MissingFileError(f"no such image or folder: {str(p)!r}")
    if not files:
        raise ProbeError("no images given: pass image files or folders")
    return files


def predict(inputs: Sequence[str | os.PathLike], head_path: str | os.PathLike, top_k: int = 5,
            device: str = "auto", batch_size: int = 64, engine: str = "auto", reject: str | float = "none",
            progress: bool = False) -> dict[str, Any]:
    """Top-k classes with probabilities for every decodable image; undecodable files are listed in ``skipped``.

    ``reject``: "none" (default: every image gets its top class), "auto" (the threshold fit-head set on val), or
    a distance threshold in [0, 2]; an image whose cosine distance to the nearest training class mean is above
    it gets ``class`` "unknown" (its ``top`` classes are still listed). Every prediction has ``class``,
    ``rejected`` and ``distance``. ``progress``: a bar of images embedded on stderr.

    Raises ProbeError when no image could be embedded (naming each file and why), BackboneError when the backbone
    available now differs from the one recorded in the head."""
    from .embedder import embedder_for

    if top_k < 1:
        raise ProbeError(f"--top-k must be >= 1, got {top_k}")
    cal.parse_reject(reject)  # a bad value fails before any file is read
    files = list_images(inputs)
    head, meta = load_head(head_path)
    threshold = cal.resolve_threshold(head, reject, f"head {head_path}")
    names = meta["class_names"]
    emb = embedder_for(meta["config"], device=device, engine=engine)
    feats, ok, bad = emb.embed_files(files, batch_size, progress)  # (n_ok, D)
    if feats.shape[1] != head.n_features_in_:
        raise ProbeError(f"the backbone gives {feats.shape[1]}-d features, the head expects {head.n_features_in_}")
    if not ok:  # nothing to predict is an error (one line naming each file), never an empty success
        shown = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:5])
        more = f"; … and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ProbeError(f"none of the {len(files)} images could be embedded: {shown}{more}")
    for b in bad:
        log.warning("skipped %s: %s", b["path"], b["reason"])
    proba = head.predict_proba(feats)  # (n_ok, C)
    k = min(top_k, len(names))
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    decided = cal.decisions(head, feats, proba, names, threshold)
    preds = [{"path": files[i], **decided[j],
              "top": [{"class": names[c], "probability": round(float(proba[j, c]), 6)} for c in top[j]]}
             for j, i in enumerate(ok)]
    return {"head": str(head_path), "backbone": meta["config"]["backbone"], **cal.describe(head, reject, threshold),
            "predictions": preds, "skipped": bad}


make_module_callable(__name__, predict)  # `probe.predict(...)` whether Python bound the module or the function
