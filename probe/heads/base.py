"""What every head shares: the scikit-learn estimator contract, normalisation, and a tensor state for saving.

A head's ``__init__`` only stores keyword hyperparameters; ``fit(X, y)`` validates, learns attributes ending in
``_`` (``classes_``, ``norm_`` and the head's own) and returns ``self``; ``predict`` / ``predict_proba`` refuse an
unfitted head with sklearn's ``NotFittedError`` (a ValueError).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .features import apply_norm, check_norm, check_X, check_Xy, fit_norm


class Head(ClassifierMixin, BaseEstimator):
    """Base class: subclasses implement ``_fit(Z, y_idx, sample_weight)``, ``_proba(Z)`` and ``_arrays()``."""

    kind = "head"
    _state_attrs: tuple[str, ...] = ()  # fitted numpy attributes saved with the head

    def _start_fit(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate, learn ``classes_`` and ``norm_``; returns (normalised X (N, D), class indices (N,))."""
        X, y = check_Xy(X, y)
        check_norm(self.norm)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        self.norm_ = fit_norm(X, self.norm)
        return apply_norm(X, self.norm_), y_idx.astype(np.int64)

    def transform_features(self, X: Any) -> np.ndarray:
        """Raw features (N, D) -> the normalised features the head works on."""
        check_is_fitted(self, "norm_")
        return apply_norm(check_X(X, self.n_features_in_), self.norm_)

    def predict_proba(self, X: Any) -> np.ndarray:
        """(N, D) -> (N, n_classes) class probabilities, columns in the order of ``classes_``."""
        return self._proba(self.transform_features(X))

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # (N, C); checks the head is fitted
        return self.classes_[proba.argmax(1)]

    # ---- persistence (probe.heads.io): plain arrays + JSON-able hyperparameters, no pickle
    def get_state(self) -> dict[str, np.ndarray]:
        check_is_fitted(self, "norm_")
        arrays = {"classes_": np.asarray(self.classes_), "norm.mean": self.norm_["mean"],
                  "norm.scale": self.norm_["scale"]}
        arrays.update({a: np.asarray(getattr(self, a)) for a in self._state_attrs})
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> Head:
        self.classes_ = arrays["classes_"]
        self.norm_ = {"norm": self.norm, "mean": arrays["norm.mean"], "scale": arrays["norm.scale"]}
        self.n_features_in_ = len(self.norm_["mean"])
        for a in self._state_attrs:
            setattr(self, a, arrays[a])
        return self
