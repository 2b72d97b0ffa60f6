"""``probe index``: build an index of a store and save it beside the store, or add the rows the store gained
since (``update``). The one library function the CLI calls; the parts are SearchIndex's build / load / add / save.

Example:
    >>> index_store("cache/demo.h5")                          # -> cache/demo.faiss + .json; returns the summary
    >>> index_store("cache/demo.h5", update=True)["added"]    # rows extracted since
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ProbeError
from .config import IndexConfig
from .index import SearchIndex

log = logging.getLogger(__name__)


def default_index_path(store_path: str | os.PathLike) -> Path:
    """cache/x.h5 -> cache/x.faiss: next to the store."""
    return Path(store_path).with_suffix(".faiss")


def _check_update(idx: SearchIndex, out: Path, cfg: IndexConfig, metric: str | None) -> None:
    """An update keeps the index's type and metric: refuse options that ask for others."""
    if cfg.type != "auto" and cfg.type != idx.kind:
        raise ProbeError(f"--update keeps the index type: {str(out)!r} is {idx.kind!r}, --type says "
                         f"{cfg.type!r} (drop --update to rebuild as {cfg.type!r})")
    if metric and metric != idx.metric:
        raise ProbeError(f"--update keeps the metric: {str(out)!r} uses {idx.metric!r}, --metric says "
                         f"{metric!r} (drop --update to rebuild)")


def index_store(store: str | os.PathLike, out: str | os.PathLike | None = None, config: IndexConfig | None = None,
                update: bool = False, metric: str | None = None, progress: bool = False) -> dict[str, Any]:
    """`probe index`: build an index of ``store`` and save it (default: beside the store), or with ``update``
    add the rows the store gained since. ``metric``: what the user asked for (None: not asked; an update keeps
    the index's); ``progress``: a bar on stderr over the rows added. Returns the index summary plus ``index``,
    ``added`` and ``action``."""
    cfg = config or IndexConfig(metric=metric or "cosine")
    out = Path(out) if out else default_index_path(store)
    if update and out.is_file():
        idx = SearchIndex.load(out)
        _check_update(idx, out, cfg, metric)
        added, action = idx.add(store, progress=progress), "updated"
    else:
        if update:
            log.info("no index at %s yet: building it", out)
        idx = SearchIndex.build(store, cfg, progress)
        added, action = idx.count, "built"
    idx.save(out)
    return {"index": str(out), "action": action, "added": added, **idx.summary()}
