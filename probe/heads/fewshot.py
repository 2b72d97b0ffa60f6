"""Episodic few-shot evaluation of the prototype head (SimpleShot) and a linear head, vectorised over episodes.

An episode: ``way`` classes, ``shot`` support and ``query`` query images per class, drawn without overlap.
``sample_episodes`` is a seeded function returning indices, so every number can be reproduced from the seed.
Classification is nearest class mean; with few rows (<= 8192) all similarities come from one Gram matrix, so an
episode costs gathers and means over a few hundred numbers instead of copying its feature vectors.

The linear head is multinomial logistic regression fitted on each episode's support rows, scikit-learn's objective
``0.5 * ||W||^2 + C * sum_i logloss_i`` (unpenalised intercept). Its default ``C=1`` is the one of Tian et al. 2020
("Rethinking few-shot image classification", ``LogisticRegression(C=1.0)`` on normalised features), the usual
few-shot linear probe. Every episode is solved exactly and all at once: see ``linear_episode_accuracy``.

``compare``: saved heads (a zero-shot head from `probe zeroshot`, a head fit on another store) scored on the same
episodes' queries, each choosing among its episode's ``way`` classes with no support at all -- CLIP's "zero-shot
matches k-shot" comparison on identical queries.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ProbeError
from .features import apply_norm, check_norm, fit_norm
from .linear import threads_for
from .prototype import METRICS

log = logging.getLogger(__name__)
HEADS = ("prototype", "linear", "both")
C_LINEAR = 1.0  # Tian et al. 2020's few-shot logistic regression; on unit-norm rows it stays close to prototypes
GRAM_MAX_ROWS = 8192  # (n, n) float32 Gram <= 256 MiB
CHUNK = 2_000_000  # elements of the biggest per-chunk array: bounds memory whatever the episode count
MAX_EPISODE_ROWS = 100_000_000  # row indices of all episodes of a shot count: 800 MB of int64


def _check(head: str = HEADS[0], C: float = C_LINEAR, metric: str = METRICS[0]) -> None:
    """ValueError naming a bad --head, --C or --metric and what was expected."""
    if head not in HEADS:
        raise ProbeError(f"unknown few-shot head {head!r}: expected one of {', '.join(HEADS)}")
    if not (np.isfinite(C) and C > 0):
        raise ProbeError(f"--C must be a positive number (inverse L2 strength of the linear head), got {C}")
    if metric not in METRICS:
        raise ProbeError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")


def _check_episodes(way: int, shot: int, query: int, episodes: int) -> None:
    """ProbeError naming a bad --way, --shot, --query or --episodes, or episodes whose row indices (E, way,
    shot + query) would be more than MAX_EPISODE_ROWS."""
    if way < 2:
        raise ProbeError(f"--way must be >= 2 classes per episode, got {way}")
    if shot < 1 or query < 1:
        raise ProbeError(f"--shot and --query must be >= 1, got shot={shot}, query={query}")
    if episodes < 1:
        raise ProbeError(f"--episodes must be >= 1, got {episodes}")
    per = way * (shot + query)  # row indices of one episode
    if episodes * per > MAX_EPISODE_ROWS:
        raise ProbeError(f"--episodes {episodes} is too many for --way {way}, --shot {shot}, --query {query}: at "
                         f"most {MAX_EPISODE_ROWS // per:,} (their images' row indices are held in memory)")


def sample_episodes(y: np.ndarray, way: int, shot: int, query: int, episodes: int, seed: int = 0,
                    class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded episodes as row indices into y: support (E, way, shot) and query (E, way, query).

    Class ``w`` of an episode is support[:, w] / query[:, w] (a random class per episode). Every class must have
    ``shot + query`` rows and there must be at least ``way`` classes, else ValueError names the class
    (``class_names[label]`` when given)."""
    y = np.asarray(y)
    _check_episodes(way, shot, query, episodes)
    classes, counts = np.unique(y, return_counts=True)
    if way > len(classes):
        raise ProbeError(f"--way {way} needs at least {way} classes, the data has {len(classes)}")
    need = shot + query
    small = counts < need
    if small.any():
        c = int(np.flatnonzero(small)[0])
        name = class_names[classes[c]] if class_names is not None else classes[c].item()
        raise ProbeError(f"class {name!r} has {counts[c]} images, fewer than --shot {shot} + --query {query} "
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
    _check(metric=metric)
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


def linear_episode_accuracy(Z: np.ndarray, support: np.ndarray, query: np.ndarray, C: float = C_LINEAR,
                            gram: np.ndarray | None = None, max_iter: int = 50, tol: float = 1e-6) -> np.ndarray:
    """Logistic-regression accuracy per episode, (E,): fitted on the support rows of each episode, scored on its
    queries. Arguments as ``episode_accuracy``; ``C`` inverse L2 strength, ``tol`` the largest gradient entry of
    the objective divided by C * way * shot at convergence.

    The optimal weights lie in the span of the episode's n = way * shot support rows (the penalty only grows
    outside it), so each episode is solved exactly in that span: with the support Gram matrix G = U S U^T, the
    support rows become U S^1/2 and the queries (Z_q Z_s^T) U S^-1/2 -- an n-dimensional problem whatever the
    feature width -- and every episode of a chunk is solved at once by Newton-CG (``_newton_cg``).

    Example:
        >>> sup, qry = sample_episodes(y, 5, 5, 15, 1000)
        >>> linear_episode_accuracy(Z, sup, qry, C=1.0, gram=Z @ Z.T).mean()
    """
    _check(C=C)
    E, W, K = support.shape
    Q, n = query.shape[2], W * K
    onehot = torch.eye(W, dtype=torch.float64).repeat_interleave(K, 0)  # (n, W) support rows are ordered by class
    truth = torch.arange(W).repeat_interleave(Q)  # (W*Q,)
    per = max(1, CHUNK // (W * Q * n + n * n))
    out = []
    for s in range(0, E, per):
        sup, q = support[s: s + per].reshape(-1, n), query[s: s + per].reshape(-1, W * Q)  # (e, n), (e, WQ)
        Gss, Gqs = _episode_grams(Z, sup, q, gram)  # (e, n, n), (e, WQ, n)
        ev, U = torch.linalg.eigh(Gss)  # (e, n), (e, n, n)
        keep = ev > 1e-6 * ev[:, -1:].clamp_min(1e-30)  # directions the float32 features resolve
        root = torch.where(keep, ev.clamp_min(0).sqrt(), torch.zeros_like(ev))
        inv = torch.where(keep, 1 / root.clamp_min(1e-30), torch.zeros_like(ev))
        Xs = torch.cat([U * root[:, None], Gss.new_ones(len(sup), n, 1)], 2)  # (e, n, n+1) in their span, + bias
        Xq = torch.cat([Gqs @ U * inv[:, None], Gss.new_ones(len(sup), W * Q, 1)], 2)  # (e, WQ, n+1)
        with threads_for(Xs.numel() * W, torch.device("cpu")):  # thousands of tiny ops: one thread is faster
            theta = _newton_cg(Xs, onehot, C, max_iter, tol)  # (e, n+1, W)
        out.append(((Xq @ theta).argmax(2) == truth).double().mean(1).numpy())
    return np.concatenate(out)


def _episode_grams(Z: np.ndarray, sup: np.ndarray, q: np.ndarray,
                   gram: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Support-support (e, n, n) and query-support (e, WQ, n) dot products, float64, from sup (e, n) and q (e, WQ)
    row indices: indexed from ``gram`` when given, else from gathered features a few episodes at a time."""
    if gram is not None:
        return (torch.from_numpy(gram[sup[:, :, None], sup[:, None]]).double(),
                torch.from_numpy(gram[q[:, :, None], sup[:, None]]).double())
    per = max(1, CHUNK // ((sup.shape[1] + q.shape[1]) * Z.shape[1]))  # bounds the gathered (e, n + WQ, D)
    Gss, Gqs = [], []
    for s in range(0, len(sup), per):
        Zs = torch.from_numpy(Z[sup[s: s + per]])  # (e, n, D)
        Gss.append(Zs @ Zs.transpose(1, 2))
        Gqs.append(torch.from_numpy(Z[q[s: s + per]]) @ Zs.transpose(1, 2))
    return torch.cat(Gss).double(), torch.cat(Gqs).double()


def _newton_cg(X: torch.Tensor, Y: torch.Tensor, C: float, max_iter: int, tol: float,
               cg_iter: int = 50) -> torch.Tensor:
    """Batched L2 multinomial logistic regression by truncated Newton (scikit-learn's newton-cg, many problems at
    once): minimises (1/n) sum_i logloss_i + ||w||^2 / (2 C n), the objective scaled by 1/(C n), whose last row
    of parameters is the unpenalised intercept.

    X (e, n, p) features with a last column of ones, Y (n, W) one-hot labels shared by every problem.
    Returns theta (e, p, W). Each Newton step solves H d = -g by conjugate gradients to a relative residual of
    min(0.5, sqrt(max |g|)) (superlinear near the optimum), then backtracks until the objective decreases."""
    e, n, p = X.shape
    lam = 1.0 / (2.0 * C * n)
    Xt = X.transpose(1, 2)  # (e, p, n)

    def reg(v):  # penalty's gradient at / Hessian times v, (e, p, W)
        out = 2 * lam * v
        # the intercept is free; softmax ignores its mean, so pinning the mean changes no prediction and makes
        # the problem strictly convex
        out[:, -1] = lam * v[:, -1].sum(-1, keepdim=True)
        return out

    def objective(theta):
        L = X @ theta  # (e, n, W)
        return (torch.logsumexp(L, -1) - (L * Y).sum(-1)).mean(1) + 0.5 * (theta * reg(theta)).sum((1, 2))

    theta = torch.zeros(e, p, Y.shape[1], dtype=X.dtype)
    for it in range(max_iter + 1):
        P = torch.softmax(X @ theta, -1)  # (e, n, W)
        g = Xt @ ((P - Y) / n) + reg(theta)  # (e, p, W)
        gmax = g.abs().amax((1, 2))
        active = gmax > tol
        if not active.any():
            break
        if it == max_iter:
            log.warning("linear few-shot head: %d of %d episodes not converged after %d Newton steps "
                        "(max |g| %.2g)", int(active.sum()), e, max_iter, float(gmax.max()))
            break

        def hvp(v, P=P):  # Hessian-vector product: softmax Jacobian (diag P - P P^T) per row, back to parameters
            dL = X @ v
            return Xt @ (P * (dL - (P * dL).sum(-1, keepdim=True)) / n) + reg(v)

        d = _cg(hvp, -g, active, gmax.sqrt().clamp(max=0.5), cg_iter)
        gd, f0, t = (g * d).sum((1, 2)), objective(theta), torch.ones(e, dtype=X.dtype)
        for _ in range(30):  # Armijo backtracking, per problem
            ok = objective(theta + t[:, None, None] * d) <= f0 + 1e-4 * t * gd
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        theta = theta + t[:, None, None] * d
    return theta


def _cg(hvp, b: torch.Tensor, live: torch.Tensor, eta: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Conjugate gradients for H x = b, batched over the first axis; a problem stops at ||r|| <= eta ||b||
    (or when not ``live``)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum((1, 2))
    stop = eta**2 * rr
    live = live & (rr > stop)
    for _ in range(max_iter):
        if not live.any():
            break
        Hp = hvp(p)
        alpha = torch.where(live, rr / (p * Hp).sum((1, 2)).clamp_min(1e-300), torch.zeros_like(rr))
        x += alpha[:, None, None] * p
        r -= alpha[:, None, None] * Hp
        rr_new = (r * r).sum((1, 2))
        live = live & (rr_new > stop)
        p = r + torch.where(live, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr))[:, None, None] * p
        rr = rr_new
    return x


def head_episode_accuracy(proba: np.ndarray, cols: np.ndarray, support: np.ndarray, query: np.ndarray
                          ) -> np.ndarray:
    """A fixed head's accuracy per episode, (E,): each query goes to the episode class the head scores highest.
    proba (N, C) the head's probabilities of every row (a softmax: its argmax over any subset of classes is the
    logits'), cols (N,) each row's head column; support (E, W, K) names each episode's classes, query (E, W, Q)."""
    E, W, _ = support.shape
    Q = query.shape[2]
    truth = np.repeat(np.arange(W), Q)  # (W*Q,)
    per = max(1, CHUNK // (W * Q * W))
    out = []
    for s in range(0, E, per):
        hc = cols[support[s: s + per, :, 0]]  # (e, W) the head's column of each episode class
        q = query[s: s + per].reshape(-1, W * Q)  # (e, WQ)
        score = proba[q[:, :, None], hc[:, None, :]]  # (e, WQ, W)
        out.append((score.argmax(2) == truth).mean(1))
    return np.concatenate(out)


def _compare_heads(store: Any, paths: Sequence[str | os.PathLike], X: np.ndarray, y: np.ndarray
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, probabilities (n, C), head column per row (n,)) of each saved head, checked against the store."""
    from .evaluate import check_head_matches_store, head_columns_for
    from .io import load_head

    out = []
    for path in paths:
        fitted, meta = load_head(path)
        check_head_matches_store(meta, store)
        if getattr(fitted, "multilabel_", False):
            raise ProbeError(f"head {path} is multi-label: few-shot episodes compare single-label heads")
        cols = head_columns_for(store.classes, y, meta["class_names"], f"store {store.path}")
        out.append((Path(path).name, fitted.predict_proba(X), cols))
    return out


def _result(head: str, shot: int, support: bool, acc: np.ndarray, seconds: float) -> dict[str, Any]:
    """One row of ``fewshot``'s results: a head's accuracy over the episodes (E,), mean and 95% interval."""
    return {"head": head, "shot": int(shot), "support": support, "accuracy": float(acc.mean()),
            "ci95": float(1.96 * acc.std() / np.sqrt(len(acc))), "episodes": int(len(acc)),
            "seconds": round(seconds, 3), "episodes_per_s": round(len(acc) / seconds, 1) if seconds > 0 else None}


def fewshot(store_path: str | os.PathLike, way: int = 5, shots: tuple[int, ...] = (1, 5), query: int = 15,
            episodes: int = 10_000, seed: int = 0, norm: str = "cl2n", metric: str = "cosine",
            split: str | None = None, head: str = "prototype", C: float = C_LINEAR,
            compare: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Mean accuracy and 95% confidence interval over seeded episodes, per head and shot count.

    ``head``: prototype, linear or both (the same episodes go to both); ``C``: the linear head's inverse L2
    strength; ``split``: draw episodes from that split's labelled rows (None: every labelled row); ``compare``:
    saved head files scored on the same queries without support (rows with ``"support": false``).
    ``results`` has one row per (head, shot); ``seconds`` includes drawing the episodes."""
    from probe.store import FeatureStore

    _check(head=head, C=C, metric=metric)
    for shot in shots:  # before the store is read
        _check_episodes(way, shot, query, episodes)
    check_norm(norm)
    store = FeatureStore(store_path)
    y_all = store.labels()
    sp = store.splits()
    if not (y_all >= 0).any():
        raise ProbeError(f"store {store.path} has no labelled images: few-shot episodes need classes")
    if split is not None and not (sp == split).any():
        have = sorted(set(sp.tolist()) - {""})
        raise ProbeError(f"store {store.path} has no {split!r} split (it has: {', '.join(have) or 'none'})")
    rows = np.flatnonzero((y_all >= 0) & ((sp == split) if split else True))
    X = store.features()
    base = np.flatnonzero((y_all >= 0) & (sp == "train")) if (sp == "train").any() else np.flatnonzero(y_all >= 0)
    params = fit_norm(X if len(base) == len(X) else X[base], norm)
    X = X if len(rows) == len(X) else X[rows]  # (n, D): one array the size of the store at a time
    y = y_all[rows]
    fixed = _compare_heads(store, compare, X, y) if compare else []
    Z = apply_norm(X, params, out=X)  # in place: the raw features are not needed any more
    gram = Z @ Z.T if len(Z) <= GRAM_MAX_ROWS else None  # (n, n)
    heads = ("prototype", "linear") if head == "both" else (head,)
    results = []
    for shot in shots:
        t = time.perf_counter()
        sup, qry = sample_episodes(y, way, shot, query, episodes, seed, store.classes)
        t_sample = time.perf_counter() - t
        for h in heads:
            t = time.perf_counter()
            acc = (episode_accuracy(Z, sup, qry, metric, gram) if h == "prototype"
                   else linear_episode_accuracy(Z, sup, qry, C, gram))
            s = time.perf_counter() - t + t_sample
            results.append(_result(h, shot, True, acc, s))
            log.info("%s head, %d-way %d-shot: %.4f +- %.4f over %d episodes (%.2fs)", h, way, shot, acc.mean(),
                     results[-1]["ci95"], len(acc), s)
        for name, proba, cols in fixed:  # the same queries, no support
            t = time.perf_counter()
            acc = head_episode_accuracy(proba, cols, sup, qry)
            results.append(_result(name, shot, False, acc, time.perf_counter() - t))
    return {"store": str(store.path), "head": head, "way": way, "query": query, "episodes": episodes, "seed": seed,
            "norm": norm, "metric": metric, "C": C, "split": split or "all", "n_images": int(len(rows)),
            "n_classes": int(len(np.unique(y))), "compare": [str(c) for c in compare], "results": results}
