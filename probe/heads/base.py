"""What every head shares: the scikit-learn estimator contract, normalisation, and a tensor state for saving.

A head's ``__init__`` only stores keyword hyperparameters; ``fit(X, y)`` validates (the hyperparameters against the
class's ``_parameter_constraints``, the data with sklearn's ``validate_data``), learns attributes ending in ``_``
(``classes_``, ``n_features_in_``, ``norm_`` and the head's own) and returns ``self``; ``predict`` /
``predict_proba`` refuse an unfitted head with sklearn's ``NotFittedError`` (a ValueError) and check the features
against ``n_features_in_``. ``sklearn.utils.estimator_checks`` holds every head to this (tests/test_heads_sklearn.py).

Calibration and unknown rejection come after ``fit``, from held-out rows (``probe.heads.calibration`` has the math):
``calibrate(X_val, y_val)`` learns ``temperature_`` (absent, meaning 1, until then), which ``predict_proba``
divides the logits by (``predict`` is unchanged: T > 0 keeps the argmax); ``fit_rejection(X_train, y_train,
X_val, y_val)`` learns the class means and the distance threshold that ``rejection_distance`` and
``probe predict --reject`` use. A new ``fit`` forgets both.

Multi-label (scikit-learn's indicator convention; the linear and MLP heads, ``multilabel_ok``): ``fit(X, Y)`` with Y
an (N, C) 0/1 matrix makes the head multi-label (``multilabel_`` True, ``classes_`` = arange(C)); ``predict_proba``
gives (N, C) independent sigmoid probabilities, ``predict`` (N, C) 0/1 at ``thresholds_`` (0.5 until
``fit_thresholds(X_val, Y_val)`` sets each class's F1-optimal threshold). For such a head ``calibrate(X_val,
Y_val)`` learns per-class Platt scaling instead of a temperature: ``platt_`` (C, 2), ``predict_proba`` giving
``sigmoid(a_c * z_c + b_c)`` of each class's logit z_c (fit thresholds after it: they are probabilities). It has
no unknown rejection: ``fit_rejection`` refuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions, make_constraint
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ..errors import ProbeError
from . import calibration as cal
from . import multilabel as ml
from .features import NORMS, apply_norm, fit_norm

CALIBRATION_ATTRS = ("temperature_", "platt_", "reject_center_", "reject_means_", "reject_threshold_", "reject_target_")
NOUNS = {"norm": "normalisation"}  # what a parameter's value is, for "unknown normalisation 'zca'"


class ParameterError(ProbeError, InvalidParameterError):
    """A hyperparameter outside its declared constraints: a ProbeError for the CLI, and the InvalidParameterError
    scikit-learn's tools expect."""


def _describe(constraint: Any) -> str:
    """A constraint in words: ``> 0``, ``an integer >= 1``, ``in [0, 1)``, ``one of a, b``; else sklearn's own."""
    if isinstance(constraint, StrOptions):
        return "one of " + ", ".join(sorted(constraint.options))
    if isinstance(constraint, Interval):
        lo_in, hi_in = constraint.closed in ("left", "both"), constraint.closed in ("right", "both")
        if constraint.left is not None and constraint.right is not None:
            text = f"in {'[' if lo_in else '('}{constraint.left:g}, {constraint.right:g}{']' if hi_in else ')'}"
        elif constraint.left is not None:
            text = f"{'>=' if lo_in else '>'} {constraint.left:g}"
        else:
            text = f"{'<=' if hi_in else '<'} {constraint.right:g}"
        return f"an integer {text}" if constraint.type is Integral else text
    return str(constraint)


def check_params(params: dict[str, Any], constraints: dict[str, list]) -> None:
    """scikit-learn's declared validation (``_parameter_constraints``) with messages that name the parameter, the
    bad value and what was expected: ``C must be > 0 or None, got -1``, ``unknown normalisation 'zca': ...``."""
    for name, allowed in constraints.items():
        value = params[name]
        cs = [make_constraint(c) for c in allowed]
        if any(c.is_satisfied_by(value) for c in cs):
            continue
        named = [c for c, a in zip(cs, allowed) if a is not None]  # None (a default meaning "auto") aside
        if all(isinstance(c, StrOptions) for c in named) and isinstance(value, str):
            raise ParameterError(f"unknown {NOUNS.get(name, name)} {value!r}: {name} must be "
                                 f"{' or '.join(_describe(c) for c in cs)}")
        raise ParameterError(f"{name} must be {' or '.join(_describe(c) for c in cs)}, got {value!r}")


@contextmanager
def user_errors(hint: str = "") -> Iterator[None]:
    """scikit-learn's validation ValueErrors re-raised as ProbeError (same message, plus ``hint``), so the CLI and
    the service report them as bad input rather than as a bug. TypeErrors (sparse input) pass unchanged."""
    try:
        yield
    except ProbeError:
        raise
    except ValueError as e:
        raise ProbeError(f"{e}{hint}") from e


class Head(ClassifierMixin, BaseEstimator):
    """Base class: subclasses implement ``fit``, ``_proba(Z)`` and, for heads with scores other than their
    probabilities, ``_scores(Z)``; ``_state_attrs`` names the fitted arrays saved with the head."""

    kind = "head"
    multilabel_ok = False  # takes an (N, C) 0/1 label matrix (one-vs-rest); the linear and MLP heads do
    _state_attrs: tuple[str, ...] = ()  # fitted numpy attributes saved with the head
    _parameter_constraints: dict[str, list] = {"norm": [StrOptions(set(NORMS))]}

    def _validate_params(self) -> None:
        check_params(self.get_params(deep=False), self._parameter_constraints)

    def _validate_fit(self, X: Any, y: Any, sample_weight: Any = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Hyperparameters, then training data: (X (N, D) finite float32, y (N,), sample weights (N,) float64 or
        None). Sets ``n_features_in_`` (and ``feature_names_in_`` for a DataFrame)."""
        self._validate_params()
        shape = np.asarray(y).shape  # (np.ndim / np.shape would trip array-likes' dispatch)
        if len(shape) == 2 and shape[1] > 1:  # (N, C) 0/1 indicator matrix; (N, 1) is sklearn's column vector
            return self._validate_fit_multilabel(X, y, sample_weight)
        with user_errors():
            X, y = validate_data(self, X, y, dtype=np.float32)  # 2-d, dense, finite, non-empty, one label per row
            check_classification_targets(y)  # "Unknown label type: continuous"
            if sample_weight is not None:  # one per row, >= 0, not all zero
                sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        n_classes = len(np.unique(y))
        if n_classes < 2:
            raise ProbeError(f"a classifier needs at least 2 classes in the training labels, got {n_classes} class")
        return X, y, sample_weight

    def _validate_fit_multilabel(self, X: Any, Y: Any, sample_weight: Any = None
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``_validate_fit`` for an (N, C) 0/1 indicator matrix Y: (X (N, D) float32, Y (N, C) float32, weights)."""
        if not self.multilabel_ok:
            shape = ", ".join(map(str, np.asarray(Y).shape))
            raise ProbeError(f"the {self.kind} head takes one class per row, got a ({shape}) label matrix"
                             " (several labels per image): use the linear or mlp head for multi-label data")
        with user_errors():
            X, Y = validate_data(self, X, Y, dtype=np.float32, multi_output=True)
            if sample_weight is not None:
                sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if Y.shape[1] < 1 or not np.isin(Y, (0, 1)).all():
            raise ProbeError(f"a multi-label target must be an (N, C) matrix of 0/1 with C >= 1, got shape {Y.shape} "
                             f"with values {sorted(np.unique(Y).tolist())[:5]}")
        if not Y.any():
            raise ProbeError(f"the label matrix ({Y.shape[0]} rows, {Y.shape[1]} classes) has no positive label: a "
                             "multi-label head needs images with labels")
        return X, Y.astype(np.float32), sample_weight

    def _fit_classes_and_norm(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
                              spare_rows: int = 0, in_place: bool = False, normalise: bool = True
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Learn ``classes_`` and ``norm_`` (weighted statistics); returns (normalised X (N, D), class indices (N,),
        or for a label matrix y (N, C) the matrix itself, ``classes_`` = arange(C) and ``thresholds_`` at 0.5).
        With ``spare_rows`` M the features come in an (N + M, D) array whose last M rows are left for the caller
        (the linear head normalises its validation rows there, so its refit on both needs no copy). ``in_place``
        (without spare rows): X itself is normalised and returned; ``normalise`` False: X is returned as it is
        (the statistics are learnt; the caller normalises the rows it needs)."""
        for a in (*CALIBRATION_ATTRS, "thresholds_"):  # a new fit makes a previous calibration meaningless
            self.__dict__.pop(a, None)
        self.multilabel_ = y.ndim == 2
        self.norm_ = fit_norm(X, self.norm, sample_weight)
        if not normalise:
            Z = X
        elif spare_rows:
            Z = np.empty((len(X) + spare_rows, X.shape[1]), np.float32)  # (N + M, D)
            apply_norm(X, self.norm_, out=Z[: len(X)])
        else:
            Z = apply_norm(X, self.norm_, out=X if in_place else None)
        if self.multilabel_:
            self.classes_ = np.arange(y.shape[1])
            self.thresholds_ = np.full(y.shape[1], ml.DEFAULT_THRESHOLD)
            return Z, y
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        return Z, y_idx.astype(np.int64)

    def _start_fit(self, X: Any, y: Any, sample_weight: Any = None, spare_rows: int = 0, in_place: bool = False,
                   normalise: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Validate, learn ``classes_`` and ``norm_``: (normalised X (N, D) -- (N + spare_rows, D), the last rows
        unset --, class indices (N,), weights or None). ``in_place``: normalise the validated X itself (X when it
        is float32, C-contiguous and writeable) when there are no spare rows; ``normalise`` False: the validated X
        itself, not normalised."""
        X, y, sample_weight = self._validate_fit(X, y, sample_weight)
        in_place = in_place and X.flags.c_contiguous and X.flags.writeable
        Z, y_idx = self._fit_classes_and_norm(X, y, sample_weight, spare_rows, in_place, normalise)
        return Z, y_idx, sample_weight

    def transform_features(self, X: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Raw features (N, D) -> the normalised features the head works on (written into ``out`` when given)."""
        check_is_fitted(self)
        return self._transform(X, out)

    def _transform(self, X: Any, out: np.ndarray | None = None) -> np.ndarray:
        """``transform_features`` once ``norm_`` is learnt, before the head's weights are (a fit's validation rows)."""
        with user_errors(f" ({type(self).__name__} takes features of shape (n, {self.n_features_in_}), like the "
                         "training data)"):
            X = validate_data(self, X, reset=False, dtype=np.float32)  # also checks n_features_in_
        return apply_norm(X, self.norm_, out)

    def _scores(self, Z: np.ndarray) -> np.ndarray:
        """(N, D) normalised -> (N, C) scores whose argmax is the prediction; by default the probabilities."""
        return self._proba(Z)

    def _logits(self, Z: np.ndarray) -> np.ndarray:
        """(N, D) normalised -> (N, C) logits up to a per-row constant: by default the log-probabilities."""
        return cal.log_proba(self._proba(Z))

    def _ml_logits(self, Z: np.ndarray) -> np.ndarray:
        """Multi-label: (N, D) normalised -> (N, C) each class's logit (by default the logit of its probability)."""
        from scipy.special import logit

        return logit(np.clip(np.asarray(self._proba(Z), np.float64), 1e-12, 1 - 1e-12))

    def _ml_proba(self, Z: np.ndarray) -> np.ndarray:
        """Multi-label: (N, D) normalised -> (N, C) probabilities, Platt-scaled per class once ``platt_`` is set."""
        platt = getattr(self, "platt_", None)
        return self._proba(Z) if platt is None else cal.platt_proba(self._ml_logits(Z), platt)

    def predict_proba(self, X: Any) -> np.ndarray:
        """(N, D) -> (N, n_classes) class probabilities, columns in the order of ``classes_``; temperature-scaled
        once ``calibrate`` has run (``temperature_``), or for a multi-label head Platt-scaled per class
        (``platt_``)."""
        Z = self.transform_features(X)
        if getattr(self, "multilabel_", False):
            return self._ml_proba(Z)
        T = getattr(self, "temperature_", None)
        return self._proba(Z) if T is None else cal.softmax_t(self._logits(Z), T)

    def fit_thresholds(self, X: Any, Y: Any) -> Head:
        """Multi-label: learn ``thresholds_`` (C,), each class's F1-optimal threshold on held-out X (N, D), Y (N, C)
        (0.5 for a class without positives there: ``multilabel.fit_thresholds``), on ``predict_proba`` (so after
        ``calibrate`` when the head is to be calibrated). Returns self."""
        self._require_multilabel("fit_thresholds")
        Y = np.asarray(Y)
        if Y.ndim != 2 or Y.shape[1] != len(self.classes_):
            raise ProbeError(f"fit_thresholds: Y must be ({len(X)}, {len(self.classes_)}) 0/1, got {Y.shape}")
        self.thresholds_ = ml.fit_thresholds(Y, self.predict_proba(X))
        return self

    def _require_multilabel(self, what: str) -> None:
        check_is_fitted(self)
        if not getattr(self, "multilabel_", False):
            raise ProbeError(f"{what}: this {self.kind} head was fit with one class per row (thresholds are for "
                             "multi-label heads)")

    def _refuse_multilabel(self, what: str) -> None:
        if getattr(self, "multilabel_", False):
            raise ProbeError(f"{what}: this {self.kind} head is multi-label (an independent sigmoid per class); it has "
                             "no unknown rejection")

    def uncalibrated_proba(self, X: Any) -> np.ndarray:
        """(N, D) -> (N, n_classes) the head's own probabilities, without ``temperature_`` / ``platt_``."""
        return self._proba(self.transform_features(X))

    def _columns(self, y: Any, what: str) -> np.ndarray:
        """Labels (N,) -> column indices into ``classes_``, refusing labels the head was not fit on."""
        y = np.asarray(y)
        known = np.isin(y, self.classes_)
        if not known.all():
            raise ProbeError(f"{what} has labels the head was not fit on: {sorted(set(y[~known].tolist()))[:10]} "
                             f"(it knows {self.classes_.tolist()})")
        return np.searchsorted(self.classes_, y)

    def calibrate(self, X: Any, y: Any) -> Head:
        """Learn ``temperature_``: the T minimising the NLL of ``softmax(logits / T)`` on held-out X (N, D), y (N,)
        (never the training rows: there the head is overconfident by construction). Returns self.

        A multi-label head takes Y (N, C) 0/1 and learns ``platt_`` (C, 2) instead: per class, the (a, b) of
        ``sigmoid(a * logit + b)`` minimising its binary log-loss (``calibration.fit_platt``; (1, 0) for a class
        without a positive or a negative there).

        Example:
            >>> head.fit(X_train, y_train).calibrate(X_val, y_val).predict_proba(X_new)
        """
        Z = self.transform_features(X)
        if getattr(self, "multilabel_", False):
            Y = np.asarray(y)
            if Y.ndim != 2 or Y.shape != (len(Z), len(self.classes_)) or not np.isin(Y, (0, 1)).all():
                raise ProbeError(f"calibrate: Y must be a ({len(Z)}, {len(self.classes_)}) 0/1 matrix for this "
                                 f"multi-label head, got shape {Y.shape}")
            self.platt_ = cal.fit_platt(self._ml_logits(Z), Y)
            return self
        self.temperature_ = cal.fit_temperature(self._logits(Z), self._columns(y, "calibrate: y"))
        return self

    def fit_rejection(self, X_train: Any, y_train: Any, X_val: Any, y_val: Any,
                      target: float = cal.REJECT_TARGET) -> Head:
        """Learn the class means of the training features (CL2N) and the distance above which ``target`` of the
        held-out known images X_val lie: ``reject_threshold_``. Labels must be the head's classes. Returns self."""
        cal.check_target(target)
        check_is_fitted(self)
        self._refuse_multilabel("fit_rejection")
        with user_errors():
            X_train = validate_data(self, X_train, reset=False, dtype=np.float32)
        y_train = np.asarray(y_train)
        self._columns(y_train, "fit_rejection: y_train")
        self.reject_center_, self.reject_means_ = cal.class_means(X_train, y_train, self.classes_)
        self._columns(y_val, "fit_rejection: y_val")
        self.reject_threshold_ = cal.rejection_threshold(self.rejection_distance(X_val), target)
        self.reject_target_ = float(target)
        return self

    def rejection_distance(self, X: Any) -> np.ndarray:
        """(N, D) -> (N,) cosine distance to the nearest training class mean (CL2N); above ``reject_threshold_``
        an image is treated as a class the head never saw."""
        check_is_fitted(self, "reject_means_")
        with user_errors():
            X = validate_data(self, X, reset=False, dtype=np.float32)
        return cal.prototype_distance(X, self.reject_center_, self.reject_means_)

    def predict(self, X: Any) -> np.ndarray:
        Z = self.transform_features(X)  # checks the head is fitted
        if getattr(self, "multilabel_", False):  # (N, C) 0/1: every class at or above its threshold
            return (self._ml_proba(Z) >= self.thresholds_).astype(np.int64)
        return self.classes_[self._scores(Z).argmax(1)]

    def _decision(self, X: Any) -> np.ndarray:
        """sklearn's ``decision_function`` shape: (N, C) scores, or (N,) ``score[1] - score[0]`` for two classes
        (positive means ``classes_[1]``)."""
        scores = self._scores(self.transform_features(X))
        if getattr(self, "multilabel_", False):
            return scores  # (N, C): one score per class, as scikit-learn's one-vs-rest
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    # ---- persistence (probe.heads.io): plain arrays + JSON-able hyperparameters, no pickle
    def get_state(self) -> dict[str, np.ndarray]:
        check_is_fitted(self, ["norm_", *self._state_attrs])
        arrays = {"classes_": np.asarray(self.classes_), "norm.mean": self.norm_["mean"],
                  "norm.scale": self.norm_["scale"]}
        arrays.update({a: np.asarray(getattr(self, a)) for a in self._state_attrs})
        if getattr(self, "multilabel_", False):  # its presence marks a multi-label head (covered by the checksum)
            arrays["thresholds_"] = np.asarray(self.thresholds_, np.float64)
        arrays.update({f"calibration.{a}": np.atleast_1d(np.asarray(getattr(self, a)))
                       for a in CALIBRATION_ATTRS if hasattr(self, a)})  # absent until calibrate / fit_rejection
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> Head:
        self.classes_ = arrays["classes_"]
        self.norm_ = {"norm": self.norm, "mean": arrays["norm.mean"], "scale": arrays["norm.scale"]}
        self.n_features_in_ = len(self.norm_["mean"])
        for a in self._state_attrs:
            setattr(self, a, arrays[a])
        self.multilabel_ = "thresholds_" in arrays
        if self.multilabel_:
            self.thresholds_ = np.asarray(arrays["thresholds_"], np.float64)
        for a in CALIBRATION_ATTRS:  # heads saved before calibration existed have none
            if f"calibration.{a}" in arrays:
                v = arrays[f"calibration.{a}"]
                setattr(self, a, float(v[0]) if a in ("temperature_", "reject_threshold_", "reject_target_")
                        else np.asarray(v, np.float64) if a == "platt_" else v)
        return self
