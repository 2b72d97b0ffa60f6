"""Nearest class mean (SimpleShot, Wang et al. 2019): the few-shot head.

With ``norm="cl2n"`` (the default) features are centred with the mean of the training features and L2-normalised,
then a query goes to the closest class mean, by cosine similarity or euclidean distance.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from ..errors import ProbeError
from .base import Head
from .features import fit_norm, weighted_sum

METRICS = ("cosine", "euclidean")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


class PrototypeHead(Head):
    """Nearest class mean.

    Parameters: ``metric`` cosine | euclidean; ``norm`` none | l2 | cl2n | standardize | l2+standardize;
    ``temperature`` scales the scores before the softmax of ``predict_proba`` (it does not change ``predict``).

    Example:
        >>> PrototypeHead(metric="cosine", norm="cl2n").fit(X, y).predict(X_new)
    """

    kind = "prototype"
    _state_attrs = ("prototypes_",)
    _parameter_constraints = {**Head._parameter_constraints, "metric": [StrOptions(set(METRICS))],
                              "temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, metric: str = "cosine", norm: str = "cl2n", temperature: float = 0.1):
        self.metric = metric
        self.norm = norm
        self.temperature = temperature

    def fit(self, X, y, sample_weight=None) -> PrototypeHead:
        """Class means of the normalised rows of X (N, D), weighted by ``sample_weight`` (N,) when given (the norm's
        statistics too): a row of weight 2 counts as that row twice."""
        Z, yi, sw = self._start_fit(X, y, sample_weight)
        k = len(self.classes_)
        mass = np.bincount(yi, weights=sw, minlength=k)  # (C,) rows, or total weight, per class
        if not (mass > 0).all():
            empty = self.classes_[mass <= 0].tolist()
            raise ProbeError(f"classes {empty} have a total sample_weight of 0: their prototypes are undefined")
        sums = [weighted_sum(Z[yi == c], None if sw is None else sw[yi == c]) for c in range(k)]
        self.prototypes_ = (np.stack(sums) / mass[:, None]).astype(np.float32)  # (C, D)
        return self

    @classmethod
    def from_prototypes(cls, prototypes, classes=None, *, metric: str = "cosine", norm: str = "l2",
                        temperature: float = 0.1) -> PrototypeHead:
        """A fitted head whose class means are given rather than learned -- CLIP's zero-shot text prototypes
        (``probe.zeroshot``): ``prototypes`` (C, D), ``classes`` (C,) their labels (default ``arange(C)``; rows
        are reordered to sorted labels, as ``fit`` orders ``classes_``). ``norm`` none or l2: the normalisations
        that need no training statistics.

        Example:
            >>> PrototypeHead.from_prototypes(T, metric="cosine", norm="l2", temperature=0.01).predict(X)
        """
        head = cls(metric=metric, norm=norm, temperature=temperature)
        head._validate_params()
        if norm not in ("none", "l2"):
            raise ProbeError(f"norm {norm!r} learns statistics from training features: given prototypes take "
                             "norm 'none' or 'l2'")
        P = np.asarray(prototypes, np.float32)
        if P.ndim != 2 or not P.size or not np.isfinite(P).all():
            raise ProbeError(f"prototypes must be a finite (C, D) matrix with C, D >= 1, got shape {P.shape}")
        labels = np.arange(len(P)) if classes is None else np.asarray(classes)
        if labels.shape != (len(P),) or len(np.unique(labels)) != len(P):
            raise ProbeError(f"classes must be {len(P)} distinct labels, one per prototype, got {labels.tolist()[:10]}")
        order = np.argsort(labels, kind="stable")
        head.classes_, head.prototypes_ = labels[order], P[order]  # (C,), (C, D)
        head.norm_ = fit_norm(P, norm)  # none / l2: zero mean, unit scale, nothing taken from P
        head.n_features_in_, head.multilabel_ = P.shape[1], False
        return head

    def decision_function(self, X) -> np.ndarray:
        """(N, D) -> (N, C) scores: cosine similarity, or minus the squared euclidean distance; for two classes
        (N,) the score of ``classes_[1]`` minus that of ``classes_[0]`` (scikit-learn's convention)."""
        return self._decision(X)

    def _scores(self, Z: np.ndarray) -> np.ndarray:
        P = self.prototypes_
        if self.metric == "cosine":
            Pn = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
            Zn = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
            return Zn @ Pn.T  # (N, C)
        return -((Z * Z).sum(1, keepdims=True) - 2 * Z @ P.T + (P * P).sum(1))  # (N, C) = -||z - p||^2

    def _logits(self, Z: np.ndarray) -> np.ndarray:
        return self._scores(Z) / self.temperature  # (N, C); a calibration temperature_ divides these again

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        return softmax(self._logits(Z))
