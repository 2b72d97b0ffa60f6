"""Checksums of what an artefact holds, recorded when probe writes it and compared when probe reads it back, and the
one error for a mismatch (``IntegrityError``: the file, what differs, how to remake it).

Heads hash their tensors and JSON header (``arrays_sha256``), fine-tune checkpoints every value they hold
(``tree_sha256``), search indexes each FAISS file's bytes (``probe.fs.sha256_file``) and their sidecar's JSON
(``json_sha256``). A file written before checksums existed has none and loads unchecked.

Example:
    >>> digest = arrays_sha256({"coef_": W, "intercept_": b}, header)
    >>> check_digest("heads/demo.safetensors", recorded, digest, "its tensors", "refit it: probe fit-head …")
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import IntegrityError


def _update_array(h: Any, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    if a.dtype.kind == "O":  # object arrays have no bytes of their own
        h.update(repr(a.tolist()).encode())
    elif a.size:
        h.update(a.reshape(-1).view(np.uint8))  # the raw bytes, no copy


def arrays_sha256(arrays: Mapping[str, np.ndarray], header: str | bytes = b"") -> str:
    """Hex SHA-256 of ``header`` and then each array's name, dtype, shape and bytes, in name order.

    Example:
        >>> arrays_sha256({"w": np.zeros(3, np.float32)}) == arrays_sha256({"w": np.zeros(3, np.float32)})
        True
    """
    h = hashlib.sha256(header.encode() if isinstance(header, str) else header)
    for name in sorted(arrays):
        h.update(f"\0{name}\0".encode())
        _update_array(h, np.asarray(arrays[name]))
    return h.hexdigest()


def _update_tree(h: Any, obj: Any) -> None:
    """Feed ``obj`` to ``h``: dicts in key order, lists and tuples in order, tensors and arrays as dtype, shape and
    bytes, anything else as its type and repr (what torch.save / json keep of it)."""
    if isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            h.update(repr(key).encode() + b":")
            _update_tree(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _update_tree(h, v)
        h.update(b"]")
    elif hasattr(obj, "detach") and hasattr(obj, "dtype"):  # a torch tensor (torch is imported only by its users)
        import torch

        t = obj.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        _update_array(h, obj)
    else:
        h.update(f"{type(obj).__name__}({obj!r})".encode())


def tree_sha256(obj: Any) -> str:
    """Hex SHA-256 of a nested dict / list of tensors, arrays and plain values (a checkpoint): equal for an object
    and what ``torch.load`` gives back of it.

    Example:
        >>> ckpt["sha256"] = tree_sha256({k: v for k, v in ckpt.items() if k != "sha256"})
    """
    h = hashlib.sha256()
    _update_tree(h, obj)
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces): the same after a JSON round trip."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def check_digest(path: str | os.PathLike, recorded: str | None, actual: str, what: str, fix: str) -> None:
    """Raise IntegrityError naming ``path`` when ``actual`` differs from the ``recorded`` checksum (None: a file
    written before checksums, not checked). ``what``: the part that differs; ``fix``: how to remake the file."""
    if recorded is not None and recorded != actual:
        raise IntegrityError(f"{str(path)!r} is damaged: {what} no longer match the checksum recorded when it was "
                             f"written (sha256 {str(recorded)[:12]}…, now {actual[:12]}…); {fix}")
