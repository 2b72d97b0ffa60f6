"""Calibrated probabilities and unknown rejection for single-label heads: the math, with no head in it.

* **Temperature scaling** (Guo et al. 2017): one scalar T > 0 divides a head's logits before the softmax, chosen
  to minimise the negative log-likelihood of held-out (validation) labels. One parameter cannot change which class
  is largest, so accuracy is untouched; only the confidence moves. A head's "logits" are its log-probabilities
  (equal to the linear/MLP logits up to a per-row constant, which the softmax ignores; the prototype head's are its
  similarities over its own ``temperature``; the kNN head's are the log of its vote shares, so T acts as a power on
  them).
* **Metrics**: ECE with 15 equal-width confidence bins (0, 1/15], …, (14/15, 1] on the top-1 probability
  (``sum_b n_b/N * |accuracy_b - mean confidence_b|``), NLL (mean ``-log p[true]``, probabilities floored at 1e-12)
  and the multi-class Brier score (mean over rows of ``sum_c (p_c - [c == true])^2``, in [0, 2]).
* **Unknown rejection**: the score is the cosine distance from an image's features (CL2N: centred on the mean of
  the training features, L2-normalised) to the nearest class mean of the training features, for every kind of
  head. On the demo set it separates held-out classes better than the maximum calibrated probability
  (benchmarks/bench_openset.py: AUROC 0.80 against 0.63-0.72). The threshold is the quantile of the validation
  images' distances that rejects ``target`` of them (5% by default).
* **Multi-label heads: per-class Platt scaling** (Platt 1999). Each class c keeps its own sigmoid over the head's
  logit z_c: ``p_c = sigmoid(a_c * z_c + b_c)``, (a_c, b_c) minimising that class's binary log-loss on val
  against Platt's smoothed targets ((n+ + 1)/(n+ + 2) for a positive, 1/(n- + 2) for a negative, so a class that
  val separates perfectly keeps a finite slope), all classes at once with L-BFGS-B, a_c in [1e-3, 1e3]: a_c > 0
  keeps each class's ranking, so AP / mAP are unchanged. A class with no positive or no negative on val keeps
  (1, 0). Metrics (``multilabel_calibration_metrics``): per class, ECE over 15 equal-width bins of that class's
  positive probability (``sum_b n_b/N * |fraction positive_b - mean probability_b|``), its binary log-loss
  (probabilities clipped to [1e-12, 1 - 1e-12]) and Brier score (mean ``(p - y)^2``), each averaged over the C
  classes. The reliability diagram pools every (row, class) probability into one set of 15 bins.

Example:
    >>> T = fit_temperature(val_logits, y_val)                     # (N, C) logits, (N,) column indices
    >>> calibration_metrics(softmax_t(val_logits, T), y_val)       # {"ece": …, "nll": …, "brier": …}
    >>> t = rejection_threshold(distances_of_known_val_images, 0.05)
    >>> ab = fit_platt(val_logits, Y_val)                          # multi-label: (N, C) logits, (N, C) 0/1 -> (C, 2)
    >>> multilabel_calibration_metrics(platt_proba(val_logits, ab), Y_val)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProbeError
from .features import l2

ECE_BINS = 15  # equal-width bins of the top-1 probability, as in Guo et al. 2017
T_BOUNDS = (0.01, 100.0)  # searched in log T; a validation set with no error drives T to the lower bound
REJECT_TARGET = 0.05  # default rate of known images wrongly rejected, set on val
PROBA_FLOOR = 1e-30  # log-probabilities of a head with exact zeros (kNN votes) stay finite


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float32 probabilities of ``softmax(logits / T)``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def log_proba(proba: np.ndarray) -> np.ndarray:
    """(N, C) probabilities -> (N, C) float64 logits (their logs; zeros floored at 1e-30)."""
    return np.log(np.maximum(np.asarray(proba, np.float64), PROBA_FLOOR))


def _nll_at(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1))
    return float((lse - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.01, 100] minimising the NLL of ``softmax(logits / T)`` on held-out rows: logits (N, C), y (N,)
    column indices. A one-dimensional, bounded search in log T (the NLL is smooth in it)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        raise ProbeError("a temperature needs held-out rows to fit on, got 0")
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    res = minimize_scalar(lambda lt: _nll_at(logits, y, math.exp(lt)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    best = min((float(res.x), lo, hi, 0.0), key=lambda lt: _nll_at(logits, y, math.exp(lt)))  # ends, or T = 1
    return float(math.exp(best))


def ece(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 probability: equal-width bins (0, 1/bins], …; proba (N, C), y (N,)."""
    conf, correct = np.asarray(proba, np.float64).max(1), np.asarray(proba).argmax(1) == np.asarray(y)
    return _binned_ece(conf, correct, bins)


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities floored at 1e-12)."""
    p = np.asarray(proba, np.float64)[np.arange(len(y)), np.asarray(y, np.int64)]
    return float(-np.log(np.maximum(p, 1e-12)).mean())


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label, in [0, 2]."""
    p = np.asarray(proba, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), np.asarray(y, np.int64)] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def calibration_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"ece", "nll", "brier"} of probabilities (N, C) against column indices y (N,)."""
    return {"ece": ece(proba, y), "nll": nll(proba, y), "brier": brier(proba, y)}


def _bin_of(conf: np.ndarray, bins: int) -> np.ndarray:
    """(N,) bin index of each probability among equal-width bins (0, 1/bins], … (0 falls in the first)."""
    return np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="left") - 1, 0, bins - 1)


def _binned_ece(conf: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """``sum_b n_b/N * |mean outcome_b - mean conf_b|`` over equal-width bins (``_bin_of``)."""
    b = _bin_of(conf, bins)
    gap = np.abs(np.bincount(b, outcome.astype(np.float64), bins) - np.bincount(b, conf, bins))
    return float(gap.sum() / len(conf)) if len(conf) else 0.0


def _conf_outcome(proba: np.ndarray, y: np.ndarray, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a reliability diagram bins: (top-1 probability, top-1 correct), or for a multi-label (N, C) matrix
    every (row, class) positive probability and its 0/1 label, pooled."""
    if multilabel:
        return np.asarray(proba, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    return np.asarray(proba, np.float64).max(1), np.asarray(proba).argmax(1) == np.asarray(y)


def reliability_bins(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS, multilabel: bool = False
                     ) -> dict[str, np.ndarray]:
    """Per bin: count, mean confidence and accuracy (NaN where empty), and the bin edges. ``multilabel``: y is the
    (N, C) 0/1 matrix and every (row, class) probability is binned, "accuracy" being the fraction positive."""
    conf, correct = _conf_outcome(proba, y, multilabel)
    edges = np.linspace(0, 1, bins + 1)
    b = _bin_of(conf, bins)
    n = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "count": n, "confidence": np.bincount(b, conf, bins) / n,
                "accuracy": np.bincount(b, correct.astype(np.float64), bins) / n}


def reliability_png(proba_before: np.ndarray, y: np.ndarray, path: str | os.PathLike,
                    proba_after: np.ndarray | None = None, title: str = "", multilabel: bool = False) -> Path:
    """Reliability diagram (accuracy against confidence in 15 bins, before and after calibration, with the
    diagonal of perfect calibration) over a histogram of how many images fall in each bin. ``multilabel``: y is
    the (N, C) 0/1 matrix; every (row, class) probability is pooled into the one diagram (fraction positive
    against predicted probability; the legend's ECE is of that pool, not the mean per-class ECE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fs import figure_format, save_figure

    figure_format(path)  # before drawing: a bad suffix costs nothing
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6.2), dpi=110, sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    runs = [("uncalibrated", proba_before, "tab:red")]
    if proba_after is not None:
        runs.append(("Platt-scaled per class" if multilabel else "temperature-scaled", proba_after, "tab:blue"))
    width = 1.0 / ECE_BINS
    for i, (name, p, colour) in enumerate(runs):
        r = reliability_bins(p, y, multilabel=multilabel)
        centres = r["edges"][:-1] + width / 2
        ok = r["count"] > 0
        e = _binned_ece(*_conf_outcome(p, y, multilabel))
        ax.plot(r["confidence"][ok], r["accuracy"][ok], marker="o", color=colour,
                label=f"{name}: {'pooled ' if multilabel else ''}ECE {e:.3f}")
        shift = (i - (len(runs) - 1) / 2) * width / len(runs)
        hx.bar(centres + shift, r["count"], width=width / len(runs), color=colour, alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="fraction positive" if multilabel else "accuracy")
    ax.legend(loc="upper left", fontsize=8)
    what = f"{np.size(y)} (image, class) pairs" if multilabel else f"{len(y)} images"
    ax.set_title(title or f"reliability ({what}, {ECE_BINS} bins)", fontsize=10)
    hx.set(xlabel="class probability (all classes pooled)" if multilabel else "top-1 probability (confidence)",
           ylabel="pairs" if multilabel else "images")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- multi-label
PLATT_A_BOUNDS = (1e-3, 1e3)  # a_c > 0 keeps each class's ranking (AP unchanged)
ML_PROBA_CLIP = 1e-12  # binary log-loss of probabilities clipped to [1e-12, 1 - 1e-12]


def platt_proba(logits: np.ndarray, platt: np.ndarray | None) -> np.ndarray:
    """(N, C) logits and (C, 2) per-class (a, b) -> (N, C) float32 ``sigmoid(a * z + b)`` (plain sigmoid for None)."""
    from scipy.special import expit

    z = np.asarray(logits, np.float64)
    if platt is not None:
        ab = np.asarray(platt, np.float64)
        z = z * ab[:, 0] + ab[:, 1]
    return expit(z).astype(np.float32)


def fit_platt(logits: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(C, 2) per-class (a, b) minimising each class's binary log-loss of ``sigmoid(a * z + b)`` on held-out
    logits (N, C) against Platt's smoothed targets of the 0/1 matrix Y (N, C); (1, 0) for a class with no positive
    or no negative there. All classes at once (their losses are independent) with L-BFGS-B, a in [1e-3, 1e3]."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    Z, Y = np.asarray(logits, np.float64), np.asarray(Y, np.float64)
    if Z.ndim != 2 or Z.shape != Y.shape:
        raise ProbeError(f"Platt scaling needs (N, C) logits and labels of one shape, got {Z.shape} and {Y.shape}")
    C = Z.shape[1]
    out = np.tile([1.0, 0.0], (C, 1))
    if len(Z) == 0:
        raise ProbeError("Platt scaling needs held-out rows to fit on, got 0")
    pos = Y.sum(0)
    fit = np.flatnonzero((pos > 0) & (pos < len(Y)))
    if not len(fit):
        return out
    Z, Y, pos = Z[:, fit], Y[:, fit], pos[fit]
    T = np.where(Y > 0, (pos + 1) / (pos + 2), 1 / (len(Y) - pos + 2))  # Platt's targets (N, k)
    n, k = Z.shape

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[:k], x[k:]
        u = Z * a + b
        f = -(T * log_expit(u) + (1 - T) * log_expit(-u)).sum() / n
        r = (expit(u) - T) / n  # d loss / d u
        return float(f), np.concatenate([(r * Z).sum(0), r.sum(0)])

    x0 = np.r_[np.ones(k), np.zeros(k)]
    res = minimize(loss, x0, jac=True, method="L-BFGS-B", bounds=[PLATT_A_BOUNDS] * k + [(None, None)] * k,
                   options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
    x = res.x if np.isfinite(res.x).all() and res.fun <= loss(x0)[0] else x0
    out[fit, 0], out[fit, 1] = x[:k], x[k:]
    return out


def multilabel_calibration_metrics(P: np.ndarray, Y: np.ndarray, bins: int = ECE_BINS) -> dict[str, float]:
    """{"ece", "nll", "brier"} of (N, C) positive-class probabilities against the (N, C) 0/1 matrix, each the mean
    over classes of that class's own: ECE over ``bins`` equal-width bins of its probability, binary log-loss
    (probabilities clipped to [1e-12, 1 - 1e-12]) and Brier score ``mean (p - y)^2``."""
    P, Y = np.asarray(P, np.float64), np.asarray(Y, np.float64)
    if P.ndim != 2 or P.shape != Y.shape or not len(P):
        raise ProbeError(f"calibration metrics need (N, C) probabilities and labels of one shape with N > 0, got "
                         f"{P.shape} and {Y.shape}")
    Pc = np.clip(P, ML_PROBA_CLIP, 1 - ML_PROBA_CLIP)
    nll_c = -(Y * np.log(Pc) + (1 - Y) * np.log1p(-Pc)).mean(0)
    ece_c = [_binned_ece(P[:, c], Y[:, c], bins) for c in range(P.shape[1])]
    return {"ece": float(np.mean(ece_c)), "nll": float(nll_c.mean()), "brier": float(((P - Y) ** 2).mean())}


# ---------------------------------------------------------------------------------------------- unknowns
MEAN_BLOCK = 16_384  # rows per block of class_means: a bounded CL2N temporary


def class_means(X: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre (D,), unit class means (C, D)) of training features X (N, D) under CL2N, one row per ``classes``."""
    X, classes = np.asarray(X, np.float32), np.asarray(classes)
    centre = X.mean(0)
    order = np.argsort(classes, kind="stable")
    pos = order[np.searchsorted(classes, y, sorter=order)]  # (N,) each row's index into classes
    sums = np.zeros((len(classes), X.shape[1]), np.float64)  # (C, D), summed in blocks: no CL2N copy of all of X
    for s in range(0, len(X), MEAN_BLOCK):
        p = pos[s: s + MEAN_BLOCK]
        by = np.argsort(p, kind="stable")
        present, starts = np.unique(p[by], return_index=True)
        sums[present] += np.add.reduceat(cl2n(X[s: s + MEAN_BLOCK], centre)[by], starts, axis=0, dtype=np.float64)
    means = sums / np.bincount(pos, minlength=len(classes))[:, None]  # (C, D)
    return centre, (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cl2n(X: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Rows of X (N, D) centred on ``centre`` (D,) then scaled to unit length: SimpleShot's CL2N."""
    return l2(np.asarray(X, np.float32) - centre)  # the heads' own CL2N (features.apply_norm "cl2n")


def prototype_distance(X: np.ndarray, centre: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(N,) cosine distance, in [0, 2], from each row of X (N, D) (CL2N) to its nearest class mean (C, D)."""
    return (1.0 - (cl2n(X, centre) @ means.T).max(1)).astype(np.float64)


def rejection_threshold(known_scores: np.ndarray, target: float = REJECT_TARGET) -> float:
    """The score above which ``target`` of these known (validation) images lie: their (1 - target) quantile."""
    check_target(target)
    s = np.asarray(known_scores, np.float64)
    if len(s) == 0:
        raise ProbeError("a rejection threshold needs validation images of the known classes, got 0")
    return float(np.quantile(s, 1.0 - target))


def check_target(target: float) -> None:
    if not (isinstance(target, int | float) and 0 < target < 1):
        raise ProbeError(f"reject target (the rate of known images wrongly rejected) must be in (0, 1), "
                         f"got {target!r}")


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Probability that an unknown image scores above a known one (ties count half): 1 separates perfectly."""
    from sklearn.metrics import roc_auc_score

    k, u = np.asarray(known_scores), np.asarray(unknown_scores)
    return float(roc_auc_score(np.r_[np.zeros(len(k)), np.ones(len(u))], np.r_[k, u]))


REJECT_HELP = ("auto (the head's threshold, set on val), none, or a distance threshold in [0, 2] (cosine distance "
               "to the nearest training class mean; above it an image is 'unknown')")


def parse_reject(value: Any) -> str | float:
    """``auto`` | ``none`` | a threshold in [0, 2]: the --reject option and the service's ``reject`` parameter."""
    given = value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "none"):
            return v
        try:
            value = float(v)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= 2):
        raise ProbeError(f"`reject` must be {REJECT_HELP}; got {given!r}")
    return float(value)


def resolve_threshold(head: Any, reject: Any, where: str = "head") -> float | None:
    """The distance threshold to apply for ``reject`` (see ``parse_reject``), or None for no rejection.

    ``auto`` on a head fit without a threshold (before rejection existed) is no rejection; a number on such a
    head is an error, as it has no class means to measure a distance to."""
    mode = parse_reject(reject)
    if mode == "none":
        return None
    if getattr(head, "multilabel_", False):
        raise ProbeError(f"reject {reject!r}: {where} is multi-label (independent sigmoid per class, labels above "
                         "per-class thresholds) and has no unknown rejection; pass `reject` none")
    if not hasattr(head, "reject_means_"):
        if mode == "auto":
            return None
        raise ProbeError(f"{where} has no class means to reject unknowns with (it was fit before probe stored "
                         "them): fit it again with probe fit-head, or pass `reject` none")
    return float(head.reject_threshold_) if mode == "auto" else float(mode)


def decisions(head: Any, X: np.ndarray, proba: np.ndarray, names: list[str], threshold: float | None
              ) -> list[dict[str, Any]]:
    """Per row of X (N, D): ``class`` (the top class, or "unknown" when its distance is above ``threshold``),
    ``rejected`` and ``distance`` (None for a head fit before rejection existed). A multi-label head instead gives
    ``labels``: every class with probability >= its threshold, highest first ({"class", "probability",
    "threshold"}), with ``rejected`` False and ``distance`` None."""
    if getattr(head, "multilabel_", False):
        thr = np.asarray(head.thresholds_)
        return [{"labels": [{"class": names[c], "probability": round(float(p[c]), 6),
                             "threshold": round(float(thr[c]), 6)}
                            for c in np.argsort(-p, kind="stable") if p[c] >= thr[c]],
                 "rejected": False, "distance": None} for p in np.asarray(proba)]
    dist = head.rejection_distance(X) if hasattr(head, "reject_means_") else None  # (N,)
    out = []
    for i, c in enumerate(np.asarray(proba).argmax(1)):
        rejected = dist is not None and threshold is not None and bool(dist[i] > threshold)
        out.append({"class": "unknown" if rejected else names[c], "rejected": rejected,
                    "distance": None if dist is None else round(float(dist[i]), 6)})
    return out


def describe(head: Any, reject: Any, threshold: float | None) -> dict[str, Any]:
    """What a prediction's probabilities and decisions mean: calibrated or not, and the rejection applied."""
    T = getattr(head, "temperature_", None)
    mode = parse_reject(reject)
    rej: dict[str, Any] = {"mode": "threshold" if isinstance(mode, float) else mode, "threshold": threshold,
                           "score": "prototype_distance"}
    if mode == "auto":
        rej["target_known_rejected"] = getattr(head, "reject_target_", None)
        if threshold is None:
            rej["note"] = "the head has no rejection threshold (fit before probe stored one): nothing is rejected"
    out = {"calibrated": T is not None, "method": None if T is None else "temperature",
           "temperature": None if T is None else round(float(T), 6), "reject": rej}
    if getattr(head, "multilabel_", False):
        platt = hasattr(head, "platt_")
        out.update(multilabel=True, calibrated=platt, method="platt" if platt else None,
                   calibration_note=MULTILABEL_CALIBRATED if platt else MULTILABEL_NOT_CALIBRATED)
    return out


MULTILABEL_CALIBRATED = "calibrated: per-class Platt scaling on val"
MULTILABEL_NOT_CALIBRATED = "not calibrated: independent sigmoid per class"
