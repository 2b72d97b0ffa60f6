"""Heads on cached features: estimators (linear, mlp, prototype, knn), fitting on a store, evaluation, few-shot.

    features.py   normalisations + seeded k-shot / holdout samplers
    base.py       the estimator contract every head follows
    linear.py     logistic regression with the L2 sweep     mlp.py   MLP with early stopping
    prototype.py  nearest class mean (SimpleShot)           knn.py   DINO's weighted kNN
    io.py         safetensors save/load                     fit.py   `probe fit-head`
    evaluate.py   metrics + confusion PNG (`probe eval`)    fewshot.py  episodes (`probe fewshot`)
    calibration.py  temperature scaling, ECE/NLL/Brier, reliability PNG, unknown rejection (distance threshold)
    scoring.py    the validation metric that picks C / the early stop (``select=``)
    multilabel.py  AP / mAP (area under PR, VOC07), micro/macro F1, per-class thresholds: multi-label heads
"""

from .base import Head
from .features import NORMS, k_per_class, stratified_holdout
from .io import HEADS, HeadError, load_head, make_head, save_head
from .knn import KNNHead
from .linear import LinearHead
from .mlp import MLPHead
from .prototype import PrototypeHead

__all__ = ["HEADS", "NORMS", "Head", "HeadError", "KNNHead", "LinearHead", "MLPHead", "PrototypeHead",
           "k_per_class", "load_head", "make_head", "save_head", "stratified_holdout"]
