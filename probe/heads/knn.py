"""Weighted k-nearest-neighbour vote, the DINO evaluation (Caron et al. 2021, ``eval_knn.py``).

Features are L2-normalised, the k most cosine-similar training rows vote for their class with weight
``exp(similarity / T)``; the normalised votes are the probabilities.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ProbeError
from .base import Head


class KNNHead(Head):
    """Cosine kNN with temperature-weighted votes (DINO: k=20, T=0.07).

    Example:
        >>> KNNHead(k=20).fit(X, y).predict_proba(X_new)   # (N, C)
    """

    kind = "knn"
    _state_attrs = ("bank_", "bank_labels_")

    def __init__(self, k: int = 20, temperature: float = 0.07, norm: str = "l2", batch_size: int = 1024):
        self.k = k
        self.temperature = temperature
        self.norm = norm
        self.batch_size = batch_size

    def fit(self, X, y, sample_weight=None) -> KNNHead:
        if int(self.k) < 1:
            raise ProbeError(f"k must be >= 1 neighbours, got {self.k}")
        if not self.temperature > 0:
            raise ProbeError(f"temperature must be > 0, got {self.temperature}")
        Z, yi = self._start_fit(X, y)
        self.bank_ = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)  # (N, D) unit rows
        self.bank_labels_ = yi
        return self

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
