"""Named few-shot class sets: labelled support embeddings that a prototype head (nearest class mean) classifies
against. Every change is written to disk before it is acknowledged, so a restarted server has every set.

On disk: ``STATE_DIR/fewshot/<name>.npz`` (numpy, no pickle) with ``features`` (N, D) float32, ``labels`` (N,) str,
``sources`` (N,) str (the uploaded file names) and ``meta`` (a JSON string: name, backbone, config_key, created,
updated), and ``sha256`` (``arrays_sha256`` of those four), checked on load: a damaged file is listed with its error
and refused (409) until it is deleted. Written to a temporary file, fsync'd and renamed over the old one: a crash
or a full disk leaves the old set or the new.

Example:
    >>> sets = FewShotSets("cache/serve", config_key=key, backbone="efficientnet_lite0", dim=1280)
    >>> sets.create("shoes"); sets.add("shoes", "boot", vec); sets.add("shoes", "sandal", vec2)
    >>> sets.classify("shoes", query_vec, top_k=2)   # [{"class": "boot", "probability": 0.9}, …]
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..digest import arrays_sha256, check_digest
from ..errors import IntegrityError, ProbeError
from ..fs import UnwritableError, atomic_path, file_in_the_way
from ..heads.prototype import PrototypeHead
from ..identity import FeatureIdentity, IdentityMismatchError, Side
from .errors import Conflict, NotFound, ServiceError, available

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # also a safe file name: no separators, no leading dot
MAX_LABEL = 200


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ServiceError(f"invalid set name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                           "letter or digit")
    return name


def check_label(label: str) -> str:
    label = (label or "").strip()
    if not label or len(label) > MAX_LABEL:
        raise ServiceError(f"invalid label {label[:40]!r}: expected a non-empty class name of at most {MAX_LABEL} "
                           "characters")
    return label


@dataclass
class FewShotSet:
    name: str
    meta: dict[str, Any]
    features: np.ndarray  # (N, D) float32 support embeddings
    labels: list[str]  # (N,)
    sources: list[str]  # (N,) uploaded file names, for people
    _head: PrototypeHead | None = field(default=None, repr=False)  # fitted lazily, dropped on every change

    def summary(self) -> dict[str, Any]:
        counts = Counter(self.labels)
        return {"name": self.name, "examples": len(self.labels), "classes": dict(sorted(counts.items())),
                "backbone": self.meta["backbone"], "config_key": self.meta["config_key"],
                "created": self.meta["created"], "updated": self.meta["updated"]}

    def head(self) -> PrototypeHead:
        if self._head is None:
            n_classes = len(set(self.labels))
            if n_classes < 2:
                have = f"one class ({self.labels[0]!r})" if self.labels else "no examples"
                raise ServiceError(f"few-shot set {self.name!r} has {have}: add labelled examples of at least two "
                                   f"classes (POST /fewshot/{self.name}/examples) before classifying")
            self._head = PrototypeHead().fit(self.features, np.asarray(self.labels))
        return self._head


class FewShotSets:
    """All sets under ``state_dir/fewshot``; thread-safe. Sets made with another backbone configuration stay on
    disk and are listed, but using them is refused (409): their embeddings are not comparable."""

    def __init__(self, state_dir: str | os.PathLike, config_key: str, backbone: str, dim: int,
                 identity: FeatureIdentity | None = None):
        self.root = Path(state_dir) / "fewshot"  # made when the first set is saved: no empty folders before
        blocked = file_in_the_way(self.root)
        if blocked is not None:  # no set could ever be saved: refused at start-up, not at the first save
            raise UnwritableError(f"cannot write few-shot sets to {str(self.root)!r}: {str(blocked)!r} is a file, "
                                  "not a folder; give the server another state dir")
        self.config_key, self.backbone, self.dim = config_key, backbone, dim
        self.identity = identity  # the server's; recorded in new sets so a refusal can name the differing fields
        self._lock = threading.Lock()
        self._sets: dict[str, FewShotSet] = {}
        self._broken: dict[str, str] = {}  # name -> why its file cannot be used (listed; refused until deleted)
        for p in sorted(self.root.glob("*.npz")):
            try:
                s = self._read(p)
            except ProbeError as e:  # one damaged file must not stop the server
                log.warning("%s", e)
                self._broken[p.stem] = str(e)
                continue
            self._sets[s.name] = s
        log.info("loaded %d few-shot sets from %s", len(self._sets), self.root)

    # ---- disk
    def _path(self, name: str) -> Path:
        return self.root / f"{name}.npz"

    def _read(self, path: Path) -> FewShotSet:
        """The set in ``path``, its arrays and metadata checked against the checksum stored with them."""
        fix = f"delete it (DELETE /fewshot/{path.stem}) and add its examples again"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("features", "labels", "sources", "meta")}
                recorded = str(z["sha256"]) if "sha256" in z.files else None  # absent: written before checksums
            meta = json.loads(str(arrays["meta"]))
            check_digest(path, recorded, arrays_sha256(arrays), "its examples", fix)
            return FewShotSet(meta["name"], meta, arrays["features"].astype(np.float32), arrays["labels"].tolist(),
                              arrays["sources"].tolist())
        except ProbeError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged zip (bad CRC, truncated), JSON or missing field
            raise IntegrityError(f"few-shot set file {str(path)!r} cannot be read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''}): it is damaged; {fix}") from None

    def _write(self, s: FewShotSet) -> None:
        """Persist ``s`` (with the checksum of its arrays) atomically, making ``root`` if needed: a full disk
        (DiskFullError) or a folder that cannot be written (UnwritableError) leaves the old file."""
        arrays = {"features": np.asarray(s.features, np.float32), "labels": np.array(s.labels, dtype=str),
                  "sources": np.array(s.sources, dtype=str), "meta": np.array(json.dumps(s.meta))}
        need = sum(a.nbytes for a in arrays.values()) + 4096
        with atomic_path(self._path(s.name), need=need, what="the set is unchanged") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, sha256=np.array(arrays_sha256(arrays)))

    # ---- access
    def names(self) -> list[str]:
        return sorted(self._sets)

    def list(self) -> list[dict[str, Any]]:
        """Every set's summary and whether this server can use it; damaged files as {name, usable, error}."""
        sets = {n: s.summary() | {"usable": s.meta["config_key"] == self.config_key} for n, s in self._sets.items()}
        sets |= {n: {"name": n, "usable": False, "error": why} for n, why in self._broken.items()}
        return [sets[n] for n in sorted(sets)]

    def get(self, name: str) -> FewShotSet:
        if name in self._broken:
            raise Conflict(self._broken[name])
        s = self._sets.get(name)
        if s is None:
            raise NotFound(f"no few-shot set named {name!r} ({available('sets', self._sets)}); create it with "
                           f"POST /fewshot/{name}")
        if s.meta["config_key"] != self.config_key:
            fix = "its embeddings are not comparable; delete it or serve that backbone"
            if self.identity is not None and "identity" in s.meta:  # sets made by this probe name the fields
                try:
                    self.identity.check(FeatureIdentity.from_config(s.meta["identity"]), mine="this server",
                                        theirs=Side("few-shot set", name), fix=fix)
                except IdentityMismatchError as e:
                    raise Conflict(str(e)) from None
            raise Conflict(f"few-shot set {name!r} was made with backbone {s.meta['backbone']} (config "
                           f"{s.meta['config_key'][:12]}), this server runs {self.backbone} (config "
                           f"{self.config_key[:12]}): {fix}")
        return s

    # ---- changes (each persisted before it returns)
    def create(self, name: str) -> dict[str, Any]:
        check_name(name)
        with self._lock:
            if name in self._broken:
                raise Conflict(self._broken[name])
            if name in self._sets:
                raise Conflict(f"few-shot set {name!r} exists already ({len(self._sets[name].labels)} examples): add "
                               f"examples with POST /fewshot/{name}/examples, or DELETE /fewshot/{name} first")
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            meta = {"name": name, "backbone": self.backbone, "config_key": self.config_key, "created": now,
                    "updated": now}
            if self.identity is not None:
                meta["identity"] = self.identity.to_dict()
            s = FewShotSet(name, meta,
                           np.zeros((0, self.dim), np.float32), [], [])
            self._write(s)
            self._sets[name] = s
            return s.summary()

    def add(self, name: str, label: str, feature: np.ndarray, source: str = "") -> dict[str, Any]:
        """Append one labelled support embedding (D,) and persist the set."""
        label = check_label(label)
        with self._lock:
            old = self.get(name)
            s = FewShotSet(name, old.meta | {"updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                           np.concatenate([old.features, np.asarray(feature, np.float32).reshape(1, self.dim)]),
                           [*old.labels, label], [*old.sources, source])
            self._write(s)  # on disk first: a failed write (a full disk) leaves the set as it was
            self._sets[name] = s
            return s.summary()

    def delete(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name in self._broken:  # a damaged file: deleting it is how the name is freed
                self._path(name).unlink(missing_ok=True)
                return {"name": name, "deleted": True, "error": self._broken.pop(name)}
            if name not in self._sets:
                raise NotFound(f"no few-shot set named {name!r} ({available('sets', self._sets)})")
            s = self._sets.pop(name)
            self._path(name).unlink(missing_ok=True)
            return s.summary() | {"deleted": True}

    def classify(self, name: str, feature: np.ndarray, top_k: int = 5) -> dict[str, Any]:
        """Top-k classes of the set's prototype head for one embedding (D,)."""
        with self._lock:
            s = self.get(name)
            head = s.head()
        proba = head.predict_proba(np.asarray(feature, np.float32).reshape(1, -1))[0]  # (C,)
        order = np.argsort(-proba, kind="stable")[:top_k]
        return {"set": name, "examples": len(s.labels),
                "top": [{"class": str(head.classes_[c]), "probability": round(float(proba[c]), 6)} for c in order]}
