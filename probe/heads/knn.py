"""Weighted k-nearest-neighbour vote, the DINO evaluation (Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised, the k most cosine-similar training rows vote for their class with weight
``exp(similarity / T)``; the normalised votes are the probabilities.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from .base import Head


class KNNHead(Head):
    """Cosine kNN with temperature-weighted votes (DINO: k=20, T=0.07).

    Example:
        >>> KNNHead(k=20).fit(X, y).predict_proba(X_new)   # (N, C)
    """

    kind = "knn"
    _state_attrs = ("bank_", "bank_labels_")
    _parameter_constraints = {**Head._parameter_constraints, "k": [Interval(Integral, 1, None, closed="left")],
                              "temperature": [Interval(Real, 0, None, closed="neither")],
                              "batch_size": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, k: int = 20, temperature: float = 0.07, norm: str = "l2", batch_size: int = 1024):
        self.k = k
        self.temperature = temperature
        self.norm = norm
        self.batch_size = batch_size

    def fit(self, X, y) -> KNNHead:
        """Keep the normalised, unit-length rows of X (N, D) as the voting bank.

        No ``sample_weight``: scikit-learn's contract means a row of weight 2 acts as that row twice, and a repeated
        row takes two of the k neighbour slots, which a weight on one slot's vote does not reproduce."""
        Z, yi, _ = self._start_fit(X, y)
        self.bank_ = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)  # (N, D) unit rows
        self.bank_labels_ = yi
        return self

    def _logits(self, Z: np.ndarray) -> np.ndarray:
        """Log vote shares with a floor of 1e-3: a class without a vote among the k neighbours is unlikely, not
        impossible (with exact zeros one such validation image dominates the temperature's NLL; on the demo set
        the floor took the held-out ECE from 0.126 to 0.111, against 0.163 without it)."""
        return np.log(self._proba(Z).astype(np.float64) + 1e-3)

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        C = len(self.classes_)
        bank = torch.from_numpy(np.ascontiguousarray(self.bank_, np.float32))
        labels = torch.from_numpy(np.asarray(self.bank_labels_, np.int64))
        k = min(int(self.k), len(bank))
        out = []
        for s in range(0, len(Z), self.batch_size):
            q = torch.from_numpy(Z[s: s + self.batch_size])
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
            w = (sim / self.temperature).exp()
            votes = torch.zeros(len(q), C).scatter_add_(1, labels[idx], w)  # (B, C)
            out.append((votes / votes.sum(1, keepdim=True)).numpy())
        return np.concatenate(out) if out else np.zeros((0, C), np.float32)
