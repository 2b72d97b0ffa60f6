"""Nearest class mean (SimpleShot, Wang et al. 2019): the few-shot head.

With ``norm="cl2n"`` (the default) features are centred with the mean of the training features and L2-normalised,
then a query goes to the closest class mean, by cosine similarity or euclidean distance.
"""

from __future__ import annotations

import numpy as np

from ..errors import ProbeError
from .base import Head

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

    def __init__(self, metric: str = "cosine", norm: str = "cl2n", temperature: float = 0.1):
        self.metric = metric
        self.norm = norm
        self.temperature = temperature

    def fit(self, X, y, sample_weight=None) -> PrototypeHead:
        if self.metric not in METRICS:
            raise ProbeError(f"unknown metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        if not self.temperature > 0:
            raise ProbeError(f"temperature must be > 0, got {self.temperature}")
        Z, yi = self._start_fit(X, y)
        k = len(self.classes_)
        self.prototypes_ = np.stack([Z[yi == c].mean(0) for c in range(k)]).astype(np.float32)  # (C, D)
        return self

    def decision_function(self, X) -> np.ndarray:
        """(N, D) -> (N, C) scores: cosine similarity, or minus the squared euclidean distance."""
        return self._scores(self.transform_features(X))

    def _scores(self, Z: np.ndarray) -> np.ndarray:
        P = self.prototypes_
        if self.metric == "cosine":
            Pn = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
            Zn = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
            return Zn @ Pn.T  # (N, C)
        return -((Z * Z).sum(1, keepdims=True) - 2 * Z @ P.T + (P * P).sum(1))  # (N, C) = -||z - p||^2

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        return softmax(self._scores(Z) / self.temperature)
