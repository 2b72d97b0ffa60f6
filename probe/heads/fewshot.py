"""Episodic few-shot evaluation of the prototype head (SimpleShot), vectorised over episodes.

An episode: ``way`` classes, ``shot`` support and ``query`` query images per class, drawn without overlap.
``sample_episodes`` is a seeded function returning indices, so every number can be reproduced from the seed.
Classification is nearest class mean; with few rows (<= 8192) all similarities come from one Gram matrix, so an
episode costs gathers and means over a few hundred numbers instead of copying its feature vectors.

Normalisation: ``cl2n`` centres with the mean of the store's ``train`` split (all labelled rows when the store
has no splits) -- SimpleShot uses the base-class mean; here it is one label-free statistic shared by every
episode -- then L2-normalises.

Example:
    >>> r = fewshot("cache/demo.h5", way=5, shots=(1, 5), query=15, episodes=10_000, seed=0)
    >>> r["results"][0]["accuracy"], r["results"][0]["ci95"]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from .features import apply_norm, check_norm, fit_norm

log = logging.getLogger(__name__)
GRAM_MAX_ROWS = 8192  # (n, n) float32 Gram <= 256 MiB
CHUNK = 2_000_000  # elements of the biggest per-chunk array: bounds memory whatever the episode count


def sample_episodes(y: np.ndarray, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                    class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded episodes as row indices into y: support (E, way, shot) and query (E, way, query).

    Class ``w`` of an episode is support[:, w] / query[:, w] (a random class per episode). Every class must have
    ``shot + query`` rows and there must be at least ``way`` classes, else ValueError names the class
    (``class_names[label]`` when given)."""
    y = np.asarray(y)
    if way < 2:
        raise ValueError(f"--way must be >= 2 classes per episode, got {way}")
    if shot < 1 or query < 1:
        raise ValueError(f"--shot and --query must be >= 1, got shot={shot}, query={query}")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    classes, counts = np.unique(y, return_counts=True)
    if way > len(classes):
        raise ValueError(f"--way {way} needs at least {way} classes, the data has {len(classes)}")
    need = shot + query
    small = counts < need
    if small.any():
        c = int(np.flatnonzero(small)[0])
        name = class_names[classes[c]] if class_names is not None else classes[c].item()
        raise ValueError(f"class {name!r} has {counts[c]} images, fewer than --shot {shot} + --query {query} "
                         f"= {need} ({int(small.sum())} classes are that small)")
    n_cls, m = len(classes), int(counts.max())
    order = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pools = np.full((n_cls, m), -1, np.int64)  # (C, M) row indices of each class, -1 padding
    for c in range(n_cls):
        pools[c, : counts[c]] = order[starts[c]: starts[c] + counts[c]]
    rng = np.random.default_rng(seed)
    per = max(1, CHUNK // (way * m))  # episodes per chunk
    sup, qry = [], []
    for s in range(0, episodes, per):
        e = min(per, episodes - s)
        cls = np.argsort(rng.random((e, n_cls)), axis=1)[:, :way]  # (e, way) distinct random classes
        keys = rng.random((e, way, m))
        keys[np.arange(m) >= counts[cls][..., None]] = 2.0  # padding never wins
        pos = np.argpartition(keys, need - 1, axis=2)[..., :need]  # (e, way, need) a random subset of each class
        rows = pools[cls[..., None], pos]
        sup.append(rows[..., :shot])
        qry.append(rows[..., shot:])
    return np.concatenate(sup), np.concatenate(qry)


def episode_accuracy(Z: np.ndarray, support: np.ndarray, query: np.ndarray, metric: str = "cosine",
                     gram: np.ndarray | None = None) -> np.ndarray:
    """Nearest-prototype accuracy per episode, (E,). Z (N, D) normalised features; support (E, W, K), query
    (E, W, Q) row indices; ``gram`` = Z @ Z.T (N, N) when precomputed."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}: expected cosine or euclidean")
    E, W, K = support.shape
    Q = query.shape[2]
    truth = np.repeat(np.arange(W), Q)  # (W*Q,) queries are ordered by class
    per = max(1, CHUNK // (W * Q * W * K + W * Q * Z.shape[1] * (gram is None)))
    out = []
    for s in range(0, E, per):
        sup, q = support[s: s + per], query[s: s + per].reshape(-1, W * Q)  # (e, W, K), (e, WQ)
        if gram is not None:
            qp = gram[q[:, :, None, None], sup[:, None]].mean(3)  # (e, WQ, W) query . prototype
            pp = gram[sup[..., :, None], sup[..., None, :]].mean((2, 3))  # (e, W) ||prototype||^2
        else:
            P = Z[sup].mean(2)  # (e, W, D)
            qp = np.einsum("eqd,ewd->eqw", Z[q], P)
            pp = (P * P).sum(-1)
        # argmax over prototypes: ||q|| is the same for every class, so it drops out of both metrics
        score = qp / np.sqrt(np.maximum(pp, 1e-12))[:, None] if metric == "cosine" else 2 * qp - pp[:, None]
        out.append((score.argmax(2) == truth).mean(1))
    return np.concatenate(out)


def fewshot(store_path: str | os.PathLike, way: int = 5, shots: tuple[int, ...] = (1, 5), query: int = 15,
            episodes: int = 10_000, seed: int = 0, norm: str = "cl2n", metric: str = "cosine",
            split: str | None = None) -> dict[str, Any]:
    """Mean accuracy and 95% confidence interval of the prototype head over seeded episodes, per shot count.

    ``split``: draw episodes from that split's labelled rows (None: every labelled row)."""
    from probe.store import FeatureStore

    check_norm(norm)
    store = FeatureStore(store_path)
    y_all = store.labels()
    sp = store.splits()
    if not (y_all >= 0).any():
        raise ValueError(f"store {store.path} has no labelled images: few-shot episodes need classes")
    if split is not None and not (sp == split).any():
        have = sorted(set(sp.tolist()) - {""})
        raise ValueError(f"store {store.path} has no {split!r} split (it has: {', '.join(have) or 'none'})")
    rows = np.flatnonzero((y_all >= 0) & ((sp == split) if split else True))
    X = store.features()
    base = np.flatnonzero((y_all >= 0) & (sp == "train")) if (sp == "train").any() else np.flatnonzero(y_all >= 0)
    Z = apply_norm(X[rows], fit_norm(X[base], norm))  # (n, D)
    y = y_all[rows]
    gram = Z @ Z.T if len(Z) <= GRAM_MAX_ROWS else None  # (n, n)
    results = []
    for shot in shots:
        t = time.perf_counter()
        sup, qry = sample_episodes(y, way, shot, query, episodes, seed, store.classes)
        acc = episode_accuracy(Z, sup, qry, metric, gram)
        s = time.perf_counter() - t
        results.append({"shot": int(shot), "accuracy": float(acc.mean()),
                        "ci95": float(1.96 * acc.std() / np.sqrt(len(acc))), "episodes": int(len(acc)),
                        "seconds": round(s, 3), "episodes_per_s": round(len(acc) / s, 1) if s > 0 else None})
        log.info("%d-way %d-shot: %.4f +- %.4f over %d episodes (%.2fs)", way, shot, acc.mean(),
                 results[-1]["ci95"], len(acc), s)
    return {"store": str(store.path), "way": way, "query": query, "episodes": episodes, "seed": seed, "norm": norm,
            "metric": metric, "split": split or "all", "n_images": int(len(rows)),
            "n_classes": int(len(np.unique(y))), "results": results}
