"""Zero-shot heads from a CLIP store's text tower: what `probe zeroshot` runs.

Each class name goes into every prompt template ("a photo of a {}."); the class prototype is the mean of the
prompts' unit text embeddings, re-normalised -- CLIP's prompt ensembling, computed by open_clip's own
``build_zero_shot_classifier`` with its shipped template lists (``imagenet``: the 80 OpenAI ImageNet templates,
``simple``: the short set of 7; or a file, one template per line holding ``{}``). The head is an ordinary
``PrototypeHead`` (cosine on L2-normalised features, temperature 1 / the model's logit scale, so its
probabilities are CLIP's softmax), saved with the store's identity: `probe predict`, `probe eval` and
`probe serve --head` use it unchanged.

Class names come from the store (``classes=None``; underscores become spaces in the prompts, ``golden_retriever``
-> "a photo of a golden retriever.", while the head keeps the store's names as its columns) or are given (a list,
or a file with one name per line; used as written).

``linear=True`` also compares linear probes on the store's labels, one protocol for all: L2-normalised features,
the L2 sweep choosing C on val when the store has a test split to report on, else by cross-validation on train
(reported on val, or on a seeded 20% holdout of train when there is neither): the plain probe, and the probe whose
penalty pulls towards the zero-shot weights (``LinearHead.fit(anchor=...)``, L2-SP): a strong regularisation
keeps the zero-shot head, a weak one gives the plain probe, and the sweep chooses between them (the WiSE-FT /
LP++ observation that zero-shot weights are a good prior for few labels).

Example:
    >>> res = zeroshot("cache/pets.h5", templates="imagenet", out="heads/pets-zeroshot.safetensors")
    >>> res.accuracy["test"]["accuracy"], res.head.predict(X)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._callable import make_module_callable
from .clip import import_open_clip, is_clip, text_tower_for
from .errors import MissingFileError, ProbeError
from .heads.evaluate import head_columns_for, metrics
from .heads.features import stratified_holdout
from .heads.fit import HOLDOUT, _training_rows
from .heads.io import save_head
from .heads.linear import LinearHead
from .heads.prototype import PrototypeHead
from .store import FeatureStore

log = logging.getLogger(__name__)

TEMPLATE_SETS = ("imagenet", "simple")  # open_clip.zero_shot_metadata: OPENAI_IMAGENET_ / SIMPLE_IMAGENET_TEMPLATES
SLOT = "{}"  # where a template file's line takes the class name


@dataclass
class ZeroShotResult:
    """What ``zeroshot`` returns: the head, how it was made and its scores. ``to_dict()`` (and ``res["key"]``) give
    the summary the CLI prints and ``--json`` writes."""

    head: PrototypeHead
    class_names: list[str]  # the head's columns
    prompt_names: list[str]  # what filled the templates' {} (underscores as spaces for store classes)
    templates: str  # imagenet, simple, or the template file
    n_templates: int
    n_prompts: int  # classes x templates, each embedded once
    logit_scale: float  # the CLIP's learned scale; the head's temperature is its inverse
    store: str
    backbone: str
    example_prompts: list[str]  # the first class through the first templates, to show what was embedded
    accuracy: dict[str, dict[str, Any]]  # per labelled split: n, accuracy, top5, top5_k, balanced_accuracy
    accuracy_note: str | None = None  # why there is no accuracy, when there is none
    linear: dict[str, Any] | None = None  # linear=True: zero-shot vs plain vs zero-shot-anchored linear probe
    out: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "backbone": self.backbone, "out": self.out, "classes": self.class_names,
                "prompt_names": self.prompt_names, "templates": self.templates, "n_templates": self.n_templates,
                "n_prompts": self.n_prompts, "example_prompts": self.example_prompts,
                "logit_scale": self.logit_scale, "temperature": self.head.temperature, "dim": self.head.n_features_in_,
                "accuracy": self.accuracy, "accuracy_note": self.accuracy_note, "linear": self.linear,
                "seconds": self.seconds}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


# ------------------------------------------------------------------------------------------ inputs
def load_templates(templates: str | os.PathLike | Sequence[str]) -> tuple[list[str | Callable[[str], str]], str]:
    """(templates, their name): ``imagenet`` / ``simple`` (open_clip's lists, callables), a file with one template
    per line holding ``{}`` (blank lines and ``#`` comments skipped), or a list of such strings."""
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        import_open_clip()  # a missing open_clip_torch is one line saying how to install it
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        chosen = OPENAI_IMAGENET_TEMPLATES if templates == "imagenet" else SIMPLE_IMAGENET_TEMPLATES
        return list(chosen), templates
    if isinstance(templates, (str, os.PathLike)):
        path = Path(templates)
        if not path.is_file():
            raise MissingFileError(f"template file {str(path)!r} does not exist: templates are imagenet, simple or a "
                                   f"file with one template per line holding {SLOT} (e.g. 'a photo of a {SLOT}.')")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ProbeError(f"template file {str(path)!r} cannot be read as utf-8 text ({e})") from None
        found = []
        for n, line in enumerate(lines, 1):
            t = line.strip()
            if not t or t.startswith("#"):
                continue
            if SLOT not in t:
                raise ProbeError(f"template file {str(path)!r} line {n}: {t!r} has no {SLOT} where the class name "
                                 f"goes (expected one template per line, e.g. 'a photo of a {SLOT}.')")
            found.append(t)
        if not found:
            raise ProbeError(f"template file {str(path)!r} has no templates: expected one per line holding {SLOT}")
        return _fill(found), str(path)
    found = [str(t) for t in templates]
    bad = [t for t in found if SLOT not in t]
    if not found or bad:
        raise ProbeError(f"templates must be strings holding {SLOT} for the class name, got "
                         f"{bad[0] if bad else 'none'!r}")
    return _fill(found), "custom"


def _fill(templates: list[str]) -> list[Callable[[str], str]]:
    """Templates as callables that put the name at every ``{}`` (never ``str.format``: other braces stay text)."""
    return [lambda name, t=t: t.replace(SLOT, name) for t in templates]


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names from a file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"class file {str(path)!r} does not exist: expected one class name per line")
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def _class_names(store: FeatureStore, classes: Sequence[str] | str | os.PathLike | None
                 ) -> tuple[list[str], list[str]]:
    """(the head's class names, the names that fill the templates)."""
    if classes is None:
        if not store.classes:
            raise ProbeError(f"store {store.path} has no classes (its images are unlabelled): classes from the store "
                             "need a labelled store; give the class names instead (--classes a,b,c or --classes-file)")
        return list(store.classes), [c.replace("_", " ") for c in store.classes]
    names = read_classes(classes) if isinstance(classes, (str, os.PathLike)) else [str(c).strip() for c in classes]
    names = [n for n in names if n]
    where = f" in {str(classes)!r}" if isinstance(classes, (str, os.PathLike)) else ""
    if not names:
        raise ProbeError(f"empty class list{where}: zero-shot needs at least one class name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ProbeError(f"class names{where} repeat: {', '.join(map(repr, dup[:5]))}; each class once")
    return names, names


def _store_columns(store: FeatureStore, names: list[str]) -> tuple[np.ndarray | None, str | None]:
    """(each store row's head column, -1 when unlabelled; or None) and why there is none."""
    if store.multilabel:
        return None, "the store is multi-label (several classes per image): no single-label accuracy"
    y = store.labels()
    labelled = y >= 0
    if not labelled.any():
        return None, "the store has no labelled images"
    missing = sorted({store.classes[i] for i in np.unique(y[labelled])} - set(names))
    if missing:  # a note, not head_columns_for's error: the head is still made, only its accuracy is left out
        return None, (f"the store's classes {', '.join(map(repr, missing[:5]))} are not among the head's classes "
                      "(accuracy needs every labelled class named as in the store)")
    cols = np.full(len(y), -1, np.int64)
    cols[labelled] = head_columns_for(store.classes, y[labelled], names, f"store {store.path}")
    return cols, None


# ---------------------------------------------------------------------------------------- zero-shot
def zeroshot(store: FeatureStore | str | os.PathLike, classes: Sequence[str] | str | os.PathLike | None = None,
             templates: str | os.PathLike | Sequence[str] = "imagenet", out: str | os.PathLike | None = None,
             device: str = "auto", linear: bool = False, linear_out: str | os.PathLike | None = None,
             seed: int = 0) -> ZeroShotResult:
    """The zero-shot head of a CLIP store: text prototypes of ``classes`` (None: the store's) through ``templates``
    (imagenet | simple | a template file | a list), scored on the store's labelled splits; written to ``out`` when
    given. ``linear`` (implied by ``linear_out``) adds the plain / zero-shot-anchored linear-probe comparison and
    writes the anchored probe to ``linear_out`` when given.

    Example:
        >>> res = zeroshot("cache/pets.h5", out="heads/pets-zs.safetensors", linear=True)
        >>> res.linear["accuracy"]       # {"zeroshot": ..., "linear": ..., "anchored": ...}
    """
    t0 = time.perf_counter()
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if not is_clip(store.attrs):
        raise ProbeError(f"store {store.path} was made by backbone {store.attrs.get('backbone', '(none recorded)')}, "
                         "which has no text tower: zero-shot needs a store extracted with clip/<model>:<pretrained> "
                         "(e.g. probe extract DATA --backbone clip/ViT-B-32:openai)")
    names, prompt_names = _class_names(store, classes)
    tmpl, tmpl_name = load_templates(templates)
    tower = text_tower_for(store.attrs, device=device)  # refuses weights other than the store's
    oc = import_open_clip()
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    T = build_zero_shot_classifier(tower.model, tower.tokenizer, prompt_names, tmpl, num_classes_per_batch=10,
                                   device=tower.device)  # (D, C): each class's template mean, re-normalised
    T = T.T.float().cpu().numpy()  # (C, D)
    scale = getattr(tower.model, "logit_scale", None)
    logit_scale = float(scale.exp()) if scale is not None else 100.0  # CLIP's trained 100 when a model has none
    head = PrototypeHead.from_prototypes(T, metric="cosine", norm="l2", temperature=1.0 / logit_scale)
    log.info("zero-shot prototypes: %d classes x %d templates through %s (open_clip %s)", len(names), len(tmpl),
             tower.identity["backbone"], oc.__version__)
    X = store.features()  # (N, D)
    cols, note = _store_columns(store, names)
    res = ZeroShotResult(head, names, prompt_names, tmpl_name, len(tmpl), len(tmpl) * len(names), logit_scale,
                         str(store.path), store.backbone, [t(prompt_names[0]) for t in tmpl[:3]],
                         _split_accuracy(head, X, cols, store.splits(), names) if cols is not None else {}, note)
    if linear or linear_out is not None:
        if cols is None:
            raise ProbeError(f"the linear-probe comparison needs the store's labels: {note}")
        res.linear = _linear_comparison(store, X, cols, head, names, seed, device, linear_out, res)
    if out is not None:
        save_head(head, out, {"store": str(store.path), "zeroshot": _provenance(res)}, identity=store.identity,
                  class_names=names)
        log.info("saved the zero-shot head to %s", out)
        res.out = str(Path(out))
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


def _provenance(res: ZeroShotResult) -> dict[str, Any]:
    """What the head file records about how its prototypes were made."""
    return {"templates": res.templates, "n_templates": res.n_templates, "prompt_names": res.prompt_names,
            "logit_scale": res.logit_scale, "example_prompts": res.example_prompts}


def _split_accuracy(head: PrototypeHead, X: np.ndarray, cols: np.ndarray, splits: np.ndarray, names: list[str]
                    ) -> dict[str, dict[str, Any]]:
    """{split: n, accuracy, top5, top5_k, balanced_accuracy} for each split with labelled rows ("all" for rows of
    a store without splits)."""
    present = set(splits[cols >= 0].tolist())
    out = {}
    for s in [s for s in ("train", "val", "test") if s in present] + sorted(present - {"train", "val", "test"}):
        rows = np.flatnonzero((cols >= 0) & (splits == s))
        m = metrics(cols[rows], head.predict_proba(X[rows]), names)
        out[s or "all"] = {k: m[k] for k in ("n", "accuracy", "top5", "top5_k", "balanced_accuracy")}
    return out


def _linear_comparison(store: FeatureStore, X: np.ndarray, cols: np.ndarray, zs: PrototypeHead, names: list[str],
                       seed: int, device: str, linear_out: str | os.PathLike | None, res: ZeroShotResult
                       ) -> dict[str, Any]:
    """Zero-shot, plain linear probe and zero-shot-anchored linear probe on the same rows (see the module's
    docstring for the protocol); writes the anchored probe to ``linear_out`` when given."""
    # fit-head's rows: val and test keep the classes train has (the head columns map the store's classes one to one)
    train, val, test, _ = _training_rows(store, store.labels(), None, seed)
    eval_set = None
    if len(test):  # C on val (when there is one), scored on test
        scored, on = test, "test"
        eval_set = (X[val], cols[val]) if len(val) else None
    elif len(val):  # C by cross-validation of train, scored on val
        scored, on = val, "val"
    else:
        tr, ho = stratified_holdout(cols[train], HOLDOUT, seed)
        train, scored, on = train[tr], train[ho], f"a seeded {HOLDOUT:.0%} holdout of train (seed {seed})"
    known = np.unique(cols[train])  # every class of scored: _training_rows and the holdout keep them in train
    if not len(scored):
        raise ProbeError(f"store {store.path}: no labelled rows of the training classes to score the probes on")
    plain = LinearHead(norm="l2", seed=seed, device=device).fit(X[train], cols[train], eval_set=eval_set)
    # zero-shot logits are x_hat @ T.T / temperature: the anchor, in the probe's l2-normalised feature space
    anchor = (zs.prototypes_[known] / zs.temperature, np.zeros(len(known), np.float32))
    anchored = LinearHead(norm="l2", seed=seed, device=device).fit(X[train], cols[train], eval_set=eval_set,
                                                                   anchor=anchor)
    acc = {name: float((h.predict(X[scored]) == cols[scored]).mean())
           for name, h in (("zeroshot", zs), ("linear", plain), ("anchored", anchored))}
    summary = {"scored_on": on, "n_train": int(len(train)), "n_scored": int(len(scored)),
               "C_chosen_on": "val" if eval_set is not None else "cross-validation of train",
               "accuracy": acc, "C": {"linear": plain.C_, "anchored": anchored.C_}, "out": None}
    if linear_out is not None:
        fit = {"head": "linear", "norm": "l2", "C": anchored.C_, "anchor": "zero-shot prototypes / temperature",
               "n_train": int(len(train)), "comparison": {k: v for k, v in summary.items() if k != "out"}}
        save_head(anchored, linear_out, {"store": str(store.path), "fit": fit, "zeroshot": _provenance(res)},
                  identity=store.identity, class_names=[names[c] for c in anchored.classes_])
        summary["out"] = str(Path(linear_out))
    return summary


make_module_callable(__name__, zeroshot)  # `probe.zeroshot(...)` whether Python bound the module or the function
