"""What made a set of features: one frozen type, one key, one comparison, one error.

Every artefact probe writes records the identity of the features it holds or was fit on: a store (its HDF5
attributes), a head (its metadata), an index (its sidecar), a served few-shot set. Two artefacts may be used
together only when their identities are equal; ``FeatureIdentity.check`` is the one place that decides it and the
one place that words the refusal.

Example:
    >>> a = FeatureIdentity.from_config(store.attrs)
    >>> a.key[:8], a.feature_key[:8]
    >>> a.check(FeatureIdentity.from_config(head_meta["config"]), mine=Side("store", "x.h5"),
    ...         theirs=Side("head", "h.safetensors"), fix="Fit a new head on this store.", features_only=True)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import BackboneError, IndexMismatchError, ProbeError, StoreError

KEY_FIELDS = ("backbone", "weights", "weights_sha256", "preprocess", "pooling", "tta", "dtype", "views", "layer")
OPTIONAL_KEY_FIELDS = ("views", "layer")  # hashed only when set: stores without augmented views or made of the
# pre-logits embedding (no layer) keep their original key
# fields of `preprocess` that record a library version, not a change in the pixels
VERSION_ONLY = ("timm", "transformers", "open_clip")


class IdentityMismatchError(StoreError, IndexMismatchError, BackboneError):
    """Two artefacts hold features made differently (another backbone, weights, preprocessing, pooling, TTA,
    dtype, views or layer): mixing them would give wrong numbers silently, so probe refuses.

    The one mismatch error, with one message: which artefacts, their backbones, every differing field with both
    values, and what to do. It is also the error each of these checks raised before it was one (a StoreError for
    stores, IndexMismatchError for indexes, BackboneError for a rebuilt backbone), so code that caught those still
    catches it."""

    def __init__(self, mine: Side, theirs: Side, a: FeatureIdentity, b: FeatureIdentity,
                 diffs: list[tuple[str, Any, Any]], fix: str = ""):
        self.mine, self.theirs, self.diffs, self.fix = mine, theirs, diffs, fix
        la, lb = (mine.label, theirs.label) if mine.label != theirs.label else (mine.short, theirs.short)
        la = f"{la} {mine.verb}".rstrip()
        lines = [f"{k}: {la} {x!r}, {lb} {y!r}" for k, x, y in diffs] or ["configuration keys differ"]
        super().__init__(
            f"{theirs} was made with backbone {b.backbone}{_at(b)} ({b.weights}, {b.dtype}, key {b.key[:12]}), {mine} "
            f"with {a.backbone}{_at(a)} ({a.weights}, {a.dtype}, key {a.key[:12]}): another backbone configuration, "
            f"so their features must not be mixed (different configurations: "
            f"{', '.join(k for k, _, _ in diffs) or 'key'})"
            "\n  " + "\n  ".join(lines) + (f"\n  {fix}" if fix else ""))


@dataclass(frozen=True)
class Side:
    """One artefact in a comparison: what it is ("store", "head", "this run") and, if it is a file, which."""

    label: str
    file: str = ""
    verb: str = "has"  # "store has 'none'"; "" where the label reads alone ("recorded 'none'")

    @property
    def short(self) -> str:
        return os.path.basename(self.file) or self.label

    def __str__(self) -> str:
        return f"{self.label} {self.file}" if self.file else self.label


def _at(ident: FeatureIdentity) -> str:
    return f" at layer {ident.layer}" if ident.layer else ""


def _canonical(v: Any) -> Any:
    """JSON round trip: tuples become lists, so an identity read back from a file equals the one written."""
    return json.loads(json.dumps(v, sort_keys=True, default=str)) if v is not None else None


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything that changes the numbers of an embedding. ``key`` hashes it (the store's ``config_key``);
    ``feature_key`` hashes it without the augmented views, which add a dataset and leave ``features`` as they are.
    """

    backbone: str
    weights: str
    weights_sha256: str
    preprocess: dict[str, Any] = field(hash=False)  # resize, crop, interpolation, mean, std, pixels path
    pooling: str = "penultimate"
    tta: str = "none"
    dtype: str = "float32"
    views: dict[str, Any] | None = field(default=None, hash=False)  # {"count": K, "augment": recipe}, or None
    layer: str | None = None  # intermediate layers, "layer3+layer4" (pooling "avg"); None: the pre-logits embedding

    def __post_init__(self) -> None:
        object.__setattr__(self, "preprocess", _canonical(self.preprocess) or {})
        object.__setattr__(self, "views", _canonical(self.views) or None)

    # ---- construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FeatureIdentity:
        """From a store's attributes, a head's or index's recorded ``config``, or ``to_dict()`` (extra keys are
        ignored). ``preprocess``/``views`` may be JSON strings, as HDF5 attributes hold them."""
        missing = [k for k in KEY_FIELDS if k not in OPTIONAL_KEY_FIELDS and k not in config]
        if missing:
            raise ProbeError(f"a feature identity needs {', '.join(missing)}; got fields {', '.join(sorted(config))}")
        values = {k: config.get(k) for k in KEY_FIELDS}
        for k in ("preprocess", "views"):
            if isinstance(values[k], str):
                values[k] = json.loads(values[k])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as recorded in files (``views`` and ``layer`` only when set, so stores without them keep their
        key)."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k not in OPTIONAL_KEY_FIELDS or v}

    def features_only(self) -> FeatureIdentity:
        """The identity of ``features`` alone: what heads and indexes record (they serve a store with or without
        views of the same data)."""
        return replace(self, views=None)

    # ---- keys
    @property
    def key(self) -> str:
        """sha256 of the canonical JSON of every field (an optional field only when set): the store's config_key."""
        return _hash(self.to_dict())

    @property
    def feature_key(self) -> str:
        return self.features_only().key

    # ---- comparison
    def diff(self, other: FeatureIdentity, ignore_versions: bool = False) -> list[tuple[str, Any, Any]]:
        """(field, mine, theirs) for every field that differs. ``ignore_versions``: a library version recorded
        inside ``preprocess`` (timm's) is not a difference."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if ignore_versions and f.name == "preprocess":
                a, b = ({k: v for k, v in x.items() if k not in VERSION_ONLY} for x in (a, b))
            if a != b:
                out.append((f.name, a, b))
        return out

    def check(self, other: FeatureIdentity, *, mine: Side | str, theirs: Side | str, fix: str = "",
              features_only: bool = False, ignore_versions: bool = False) -> None:
        """The one compatibility check: raise IdentityMismatchError naming every differing field unless the two
        identities are equal. ``mine``/``theirs`` say which artefact is which (``Side("store", path)``, or a
        label such as "this run"), ``fix`` what to do. ``features_only``: compare the identities of ``features``
        (augmented views ignored), as heads and indexes do. ``ignore_versions``: see ``diff``."""
        a, b = (self.features_only(), other.features_only()) if features_only else (self, other)
        diffs = a.diff(b, ignore_versions)
        if diffs:
            side = lambda s: s if isinstance(s, Side) else Side(s)  # noqa: E731
            raise IdentityMismatchError(side(mine), side(theirs), a, b, diffs, fix)

    def short(self) -> str:
        """One line for logs: backbone (and layer), dtype, TTA and the first 12 hex digits of the key."""
        return f"{self.backbone}{_at(self)} ({self.weights}, {self.dtype}, tta {self.tta}, key {self.key[:12]})"


def config_key(config: Mapping[str, Any]) -> str:
    """The key of the identity recorded in ``config`` (a store's attributes, an identity's ``to_dict()``)."""
    return FeatureIdentity.from_config(config).key


ARRAYS_IDENTITY = FeatureIdentity(backbone="arrays", weights="none", weights_sha256="", preprocess={},
                                  pooling="none", tta="none", dtype="float32")
"""Vectors that no backbone made (``store_from_arrays``, ``SearchIndex.from_arrays``, a head fit on arrays):
they can be searched and classified, but no query image can be embedded for them."""
