"""Save and load heads as one safetensors file: tensors for every learned array, JSON metadata for the rest.

No pickle anywhere: loading a head runs no code. The metadata (``__metadata__["probe"]``) records the head type
and hyperparameters, the class names, the backbone identity of the store it was fit on (backbone, weights,
weights checksum, preprocessing, pooling, TTA, dtype and their ``config_key``) and the fit summary, so
``probe predict`` can rebuild the exact embedder without the store.

Example:
    >>> save_head(head, "heads/demo-linear.safetensors", identity=store.identity, class_names=[...])
    >>> head, meta = load_head("heads/demo-linear.safetensors")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ..digest import arrays_sha256, check_digest
from ..errors import ProbeError
from ..fs import atomic_path
from ..identity import ARRAYS_IDENTITY, FeatureIdentity
from .base import Head
from .knn import KNNHead
from .linear import LinearHead
from .mlp import MLPHead
from .prototype import PrototypeHead

FORMAT = "probe-head/1"
DIGEST = "probe_sha256"  # metadata key: sha256 of the header JSON and every tensor (arrays_sha256); absent before
HEADS: dict[str, type[Head]] = {"linear": LinearHead, "mlp": MLPHead, "prototype": PrototypeHead, "knn": KNNHead}


class HeadError(ProbeError):
    """A head file that cannot be read, or that does not fit the features it is used with."""


def make_head(kind: str, **params: Any) -> Head:
    """A head by name: ``make_head("linear", C=1.0)``. Unknown names, parameters and values outside a parameter's
    constraints raise ProbeError at once, before any data is read."""
    if kind not in HEADS:
        raise ProbeError(f"unknown head {kind!r}: expected one of {', '.join(HEADS)}")
    cls = HEADS[kind]
    allowed = cls().get_params()
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ProbeError(f"head {kind!r} has no parameter {bad[0]!r}: it takes {', '.join(allowed)}")
    head = cls(**params)
    head._validate_params()  # scikit-learn's declared constraints (ParameterError names the value)
    return head


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def save_head(head: Head, path: str | os.PathLike, meta: dict[str, Any] | None = None, *,
              identity: FeatureIdentity | None = None, class_names: list[str] | None = None,
              classes: list[str] | None = None) -> Path:
    """Write a fitted ``head`` to ``path`` (.safetensors). ``identity``: what made the features it was fit on
    (``store.identity``); without one (and without ``meta["config"]``) the head is recorded as fit on vectors no
    backbone made, and `probe predict` cannot embed images for it. ``class_names``: the names of its columns
    (default: its classes as strings); or ``classes``: the name of every label value, as a store's ``classes``
    (the head's columns are then ``classes[c]`` for c in ``head.classes_``). ``meta``: more JSON to record.

    Example:
        >>> save_head(LinearHead().fit(X, y), "h.safetensors", identity=store.identity, classes=store.classes)
    """
    from safetensors.numpy import save_file

    check_is_fitted(head)
    names = classes
    arrays = head.get_state()
    classes = arrays["classes_"]
    meta = dict(meta or {})
    if identity is None and "config" in meta:  # recorded by the caller, as load_head returns it
        identity = FeatureIdentity.from_config(meta["config"])
    identity = identity if identity is not None else ARRAYS_IDENTITY
    meta.update(config=identity.features_only().to_dict(), config_key=identity.feature_key)
    if class_names is None and names is not None:
        class_names = [names[int(c)] for c in classes.tolist()]
    meta.setdefault("class_names", class_names if class_names is not None else [str(c) for c in classes.tolist()])
    if classes.dtype.kind not in "iuf":  # string labels travel in the JSON, not as a tensor
        meta["classes_"] = classes.tolist()
        arrays = {k: v for k, v in arrays.items() if k != "classes_"}
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = {"format": FORMAT, "head": head.kind, "params": {k: _jsonable(v) for k, v in head.get_params().items()},
              **meta}
    text = json.dumps(header, default=str)
    need = sum(a.nbytes for a in arrays.values()) + 2 * len(text) + 4096  # tensors, header, safetensors' framing
    with atomic_path(path, need=need, what="any previous head file there is unchanged") as tmp:
        save_file(arrays, str(tmp), metadata={"probe": text, DIGEST: arrays_sha256(arrays, text)})
    return Path(path)


def _rebuild(path: str | os.PathLike) -> str:
    return f"fit it again (probe fit-head STORE --out {path})"


def _read_header(path: str | os.PathLike) -> tuple[dict[str, Any], str, str | None]:
    """(header, its JSON text as stored, the recorded checksum or None) of a head file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise HeadError(f"head file {str(path)!r} is a folder, expected a file (a .safetensors from `probe fit-head`)")
    if not path.is_file():
        raise HeadError(f"head file {str(path)!r} does not exist (make one with `probe fit-head STORE --out {path}`)")
    try:
        with safe_open(str(path), "numpy") as f:
            stored = f.metadata() or {}
        text = stored.get("probe", "null")
        header = json.loads(text)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a foreign or damaged file
        raise HeadError(f"{str(path)!r} is not a safetensors file ({str(e).splitlines()[0][:200]}); if probe "
                        f"wrote it, it is damaged: {_rebuild(path)}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HeadError(f"{str(path)!r} is a safetensors file but not a probe head (format {FORMAT} expected)")
    return header, text, stored.get(DIGEST)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a head file, without loading its tensors (``load_head`` checks them)."""
    return _read_header(path)[0]


def load_head(path: str | os.PathLike) -> tuple[Head, dict[str, Any]]:
    """(fitted head, metadata) from a file written by ``save_head``. Its tensors and header are checked against
    the checksum recorded when it was written: a damaged file raises IntegrityError naming it."""
    from safetensors.numpy import load_file

    meta, text, digest = _read_header(path)
    kind = meta.get("head")
    if kind not in HEADS:
        raise HeadError(f"{path}: unknown head type {kind!r} (this probe knows {', '.join(HEADS)})")
    try:
        arrays = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged tensor table or data offsets
        raise HeadError(f"{str(path)!r} has unreadable tensors ({str(e).splitlines()[0][:200]}): it is damaged; "
                        f"{_rebuild(path)}") from None
    check_digest(path, digest, arrays_sha256(arrays, text), "its tensors and metadata", _rebuild(path))
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    head = HEADS[kind](**params)
    if "classes_" in meta:
        arrays["classes_"] = np.asarray(meta["classes_"])
    head.set_state(arrays)
    return head, meta
