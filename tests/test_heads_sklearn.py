"""The scikit-learn estimator contract, checked by scikit-learn: every head through ``parametrize_with_checks``,
the multi-label heads through scikit-learn's multi-label checks, plus what those checks cannot hold a float32 solver
to (sample weights as repeated rows, at solver precision)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils import shuffle
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import (
    check_classifier_multioutput,
    check_classifiers_multilabel_output_format_decision_function,
    check_classifiers_multilabel_output_format_predict,
    check_classifiers_multilabel_output_format_predict_proba,
    check_classifiers_multilabel_representation_invariance,
    parametrize_with_checks,
)
from sklearn.utils.validation import has_fit_parameter

from probe.errors import ProbeError
from probe.heads import KNNHead, LinearHead, MLPHead, PrototypeHead

# Small where a default would be slow: a 3-strength sweep; 20 MLP epochs, with a learning rate that makes 20 enough
# for the training accuracy check_classifiers_train asks of a classifier. On the CPU: the same numbers everywhere.
SWEEP = {"n_Cs": 3, "C_range": (1e-2, 1e2), "device": "cpu"}
MLP = {"hidden": (16,), "epochs": 20, "lr": 1e-2, "device": "cpu"}
HEADS = [
    LinearHead(**SWEEP),  # C chosen by stratified k-fold cross-validation
    LinearHead(C=1.0, balanced=True, device="cpu"),  # one strength, balanced class weights
    LinearHead(**SWEEP, select="macro-f1"),  # C chosen on weighted macro-F1 of the folds
    MLPHead(**MLP),
    MLPHead(**MLP, select="mean-per-class"),  # early stop on the holdout's mean per-class accuracy
    PrototypeHead(),
    PrototypeHead(metric="euclidean", norm="standardize"),
    KNNHead(),
]


def expected_failed_checks(head) -> dict[str, str]:
    """Checks a head fails for a known reason (scikit-learn's own mechanism: its SGDClassifier fails the same one).
    Strict: a check listed here that passes fails the test, so the list cannot go stale."""
    if isinstance(head, LinearHead):
        return {"check_sample_weight_equivalence_on_dense_data":
                "float32 L-BFGS: a weighted fit and a fit on repeated rows agree to solver precision (1e-5 to 1e-7, "
                "test_sample_weight_is_repeating_rows), not to the check's rtol=1e-7; and with C=None the "
                "cross-validation folds split repeated rows, which no weight can reproduce"}
    if isinstance(head, MLPHead):
        return {"check_sample_weight_equivalence_on_dense_data":
                "minibatches, dropout masks and the early-stopping holdout are drawn per row, so a repeated row is "
                "not a weighted row; a full-batch fit without dropout is: test_sample_weight_is_repeating_rows"}
    return {}


@parametrize_with_checks(HEADS, expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ------------------------------------------------------------------------------------------ multi-label
# parametrize_with_checks yields scikit-learn's multi-label checks only for an estimator tagged
# classifier_tags.multi_label (target_tags.multi_output for check_classifier_multioutput); the heads carry no such
# tag (one is multi-label by what it is fit on), and every other check feeds one label per row. So the checks that
# fit an (N, C) indicator matrix run here on the heads that take one (``multilabel_ok``): predict (N, C) in y's
# dtype, predict_proba (N, C) in (0, 1), decision_function (N, C) floats (the MLP head has none: skipped), y as an
# array, list of lists or list of arrays predicting alike, and predict == (decision > 0) == round(predict_proba).
MULTILABEL_HEADS = [
    LinearHead(**SWEEP),  # C chosen by k-fold cross-validation on the label matrix, by mAP
    LinearHead(C=1.0, device="cpu"),
    LinearHead(**SWEEP, select="macro-f1"),
    MLPHead(**MLP),
    MLPHead(**MLP, select="map"),  # early stop on the holdout's mAP
]
MULTILABEL_CHECKS = [
    check_classifiers_multilabel_representation_invariance,
    check_classifiers_multilabel_output_format_predict,
    check_classifiers_multilabel_output_format_predict_proba,
    check_classifiers_multilabel_output_format_decision_function,
    check_classifier_multioutput,
]


@pytest.mark.parametrize("head, check", [
    (h, c) for h in MULTILABEL_HEADS for c in MULTILABEL_CHECKS
    if hasattr(h, "decision_function") or c is not check_classifiers_multilabel_output_format_decision_function
], ids=lambda v: getattr(v, "__name__", str(v)))  # a check by its name, a head by its repr
def test_sklearn_multilabel_checks(head, check):
    assert head.multilabel_ok
    check(type(head).__name__, head)


# ------------------------------------------------------------------------------------------ sample_weight
def weighted_and_repeated():
    """The data of sklearn's equivalence check: 15 rows, 30 features, 3 classes, integer weights 0-4 (zeros too).
    Returns (X, y, w) shuffled and (X repeated w times, y likewise), and X to predict on."""
    rng = np.random.RandomState(42)
    X, y, w = rng.rand(15, 30), rng.randint(0, 3, size=15), rng.randint(0, 5, size=15)
    return shuffle(X, y, w, random_state=0), (X.repeat(w, axis=0), y.repeat(w)), X


@pytest.mark.parametrize("head, with_eval_set, atol", [
    (LinearHead(C=1.0, device="cpu"), False, 1e-5),
    (LinearHead(C=0.1, balanced=True, norm="l2+standardize", device="cpu"), False, 1e-5),
    (LinearHead(**SWEEP), True, 1e-4),  # C chosen on eval_set, then a refit warm-started from the sweep's solution
    (MLPHead(**MLP | {"dropout": 0.0, "batch_size": 1024}), True, 1e-6),  # full batch, nothing drawn per row
], ids=["linear", "linear-balanced", "linear-sweep", "mlp-full-batch"])
def test_sample_weight_is_repeating_rows(head, with_eval_set, atol):
    (Xw, yw, w), (Xr, yr), X = weighted_and_repeated()
    kw = {"eval_set": (X[:9], np.arange(9) % 3)} if with_eval_set else {}
    weighted = head.fit(Xw, yw, sample_weight=w, **kw).predict_proba(X)
    repeated = head.fit(Xr, yr, **kw).predict_proba(X)
    np.testing.assert_allclose(weighted, repeated, atol=atol)
    unweighted = head.fit(Xw, yw, **kw).predict_proba(X)
    assert np.abs(unweighted - repeated).max() > 100 * atol  # the weights mattered


def test_knn_takes_no_sample_weight():
    """A repeated row takes two of the k neighbour slots, a weight cannot: the kNN head refuses weights."""
    assert not has_fit_parameter(KNNHead(), "sample_weight")
    (Xw, yw, w), _, _ = weighted_and_repeated()
    with pytest.raises(TypeError, match="sample_weight"):
        KNNHead().fit(Xw, yw, sample_weight=w)


def test_prototype_class_without_weight_is_refused():
    (Xw, yw, w), _, _ = weighted_and_repeated()
    w = np.where(yw == 2, 0, w)
    with pytest.raises(ProbeError, match=r"classes \[2\] have a total sample_weight of 0"):
        PrototypeHead().fit(Xw, yw, sample_weight=w)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("head, match", [
    (LinearHead(C=0), r"C must be > 0 or None, got 0"),
    (LinearHead(n_Cs=2.5), r"n_Cs must be an integer >= 1, got 2.5"),
    (LinearHead(C_range=(1.0, 0.1)), r"C_range must be two positive numbers low <= high"),
    (MLPHead(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (MLPHead(hidden=(16, 0)), r"hidden layer widths must be >= 1, got \[16, 0\]"),
    (PrototypeHead(metric="manhattan"), r"unknown metric 'manhattan': metric must be one of cosine, euclidean"),
    (KNNHead(norm="zca"), r"unknown normalisation 'zca': norm must be one of cl2n, l2, "),
    (KNNHead(k=0), r"k must be an integer >= 1, got 0"),
])
def test_bad_hyperparameters_name_parameter_and_value(head, match):
    (X, y, _), _, _ = weighted_and_repeated()
    with pytest.raises(ProbeError, match=match) as e:
        head.fit(X, y)
    if "C_range" not in match and "hidden" not in match:  # declared constraints: sklearn's error type too
        assert isinstance(e.value, InvalidParameterError)


def test_bad_data_is_a_probe_error():
    """sklearn's validation messages, raised as ProbeError: the CLI prints them as one line, not as a bug."""
    (X, y, _), _, _ = weighted_and_repeated()
    head = PrototypeHead()
    with pytest.raises(ProbeError, match="Input X contains NaN"):
        head.fit(np.where(np.eye(15, 30) > 0, np.nan, X), y)
    with pytest.raises(ProbeError, match="inconsistent numbers of samples"):
        head.fit(X, y[:-1])
    with pytest.raises(ProbeError, match="Unknown label type: continuous"):
        head.fit(X, y + 0.5)
    head.fit(X, y)
    with pytest.raises(ProbeError, match=r"X has 5 features, but PrototypeHead is expecting 30 .* shape \(n, 30\)"):
        head.predict(X[:, :5])
