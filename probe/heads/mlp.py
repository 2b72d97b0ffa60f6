"""A small MLP on cached features: Linear -> ReLU -> Dropout -> ... -> Linear, AdamW, early stopping.

The seeds' few-shot head, trained on features instead of images: an epoch over 50k cached rows is a few
milliseconds of matrix products, not a pass of the backbone. Training stops when the validation loss has not
improved for ``patience`` epochs and the best epoch's weights are kept.

Augmented views (``fit(X, y, views=V)``, V (N, K, D) from ``probe extract --views K``): every epoch each training
row is drawn uniformly among its centre vector and its K views, so the head sees K + 1 crops of each image over
its epochs at the cost of cached features; validation and early stopping use the centre vectors only.

``select`` chooses what early stopping watches: ``loss`` (the default: validation cross-entropy, lower is better)
or a metric of ``scoring.py`` (accuracy, mean-per-class, macro-f1; higher is better, ties go to the lower loss).

Multi-label (``fit(X, Y)``, Y an (N, C) 0/1 matrix): one sigmoid output per class, ``BCEWithLogitsLoss`` (mean over
rows and classes); early stopping on the val loss (default) or map / macro-f1; no balanced weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from probe.device import resolve_device

from ..errors import ProbeError
from .base import Head
from .features import apply_norm, stratified_holdout
from .linear import multilabel_score, threads_for
from .multilabel import multilabel_holdout
from .scoring import SELECT, key, refuse_map, refuse_single, score

log = logging.getLogger(__name__)
MAX_LAYER_WEIGHTS = 1 << 28  # 1 GiB of float32 per layer, 4 GiB with its gradient and AdamW's two moments


def pick_rows(Z: torch.Tensor, V: torch.Tensor, idx: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the centre vectors Z (N, D), each replaced by its view ``choice - 1`` of V (N, K, D) where
    ``choice`` > 0 (0 keeps the centre).  -> (B, D)"""
    x = Z[idx]  # a copy: advanced indexing
    m = choice > 0
    x[m] = V[idx[m], choice[m] - 1]
    return x


def check_widths(dim: int, hidden: tuple[int, ...]) -> None:
    """Refuse a hidden width below 1, or one whose layer on ``dim``-d input (or on the layer before) would hold
    more than MAX_LAYER_WEIGHTS weights -- before anything is allocated."""
    if any(h < 1 for h in hidden):
        raise ProbeError(f"hidden layer widths must be >= 1, got {list(hidden)}")
    for h in hidden:
        if dim * h > MAX_LAYER_WEIGHTS:
            raise ProbeError(f"hidden layer width {h} on {dim}-d input is a {dim} x {h} weight matrix, more than "
                             f"the limit of {MAX_LAYER_WEIGHTS:,} weights per layer (1 GiB of float32): use narrower "
                             "layers")
        dim = h


def build_mlp(dim: int, hidden: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout per hidden width, then Linear to ``n_classes``: (B, dim) -> (B, n_classes).
    A ProbeError when the memory for its weights cannot be had."""
    layers: list[nn.Module] = []
    d = dim
    try:
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, n_classes))
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises a RuntimeError
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ProbeError(f"cannot allocate an MLP with hidden widths {list(hidden)} on {dim}-d input: {reason}"
                         ) from None
    return nn.Sequential(*layers)


def multilabel_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of logits (B, C) against 0/1 targets y (B, C), the mean over classes, then over rows
    weighted by w (B,) when given -- torch's ``BCEWithLogitsLoss()`` when w is None."""
    rows = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)  # (B,)
    return rows.mean() if w is None else (rows * w).sum() / w.sum().clamp_min(1e-12)


def weighted_loss(class_weight: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``loss(logits (B, K), y (B,), w (B,) or None)``: cross-entropy averaged with row weights
    ``class_weight[y] * w`` -- torch's ``CrossEntropyLoss(weight=class_weight)`` when w is None."""
    def loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        if w is None:
            return nn.functional.cross_entropy(logits, y, weight=class_weight)
        ce = nn.functional.cross_entropy(logits, y, weight=class_weight, reduction="none")  # (B,) cw[y] * nll
        return (ce * w).sum() / (class_weight[y] * w).sum().clamp_min(1e-12)  # a batch of zero weights: 0
    return loss


class MLPHead(Head):
    """MLP classifier with dropout, AdamW and early stopping on validation loss (or the ``select`` metric).

    Parameters: ``hidden`` layer widths; ``dropout``; ``lr``, ``weight_decay`` (AdamW); ``epochs`` at most;
    ``batch_size``; ``patience`` epochs without improvement of ``select`` (loss, accuracy, mean-per-class,
    macro-f1) on the validation rows before stopping; ``norm``;
    ``balanced`` class weights in the loss; ``holdout``/``seed`` for the validation split when ``fit`` gets no
    ``eval_set``; ``device``.

    Fitted: ``weights_`` (parameter name -> array), ``best_epoch_``, ``val_loss_``, ``val_accuracy_``,
    ``val_score_`` (``select`` at the best epoch), ``history_`` (per epoch: {"epoch", "val_loss"} and the
    ``select`` metric, e.g. "val_accuracy"), ``n_views_`` (augmented views per row the fit drew from; 0: none).

    Example:
        >>> MLPHead(hidden=(512,)).fit(X, y, eval_set=(X_val, y_val)).predict(X_test)
        >>> MLPHead().fit(X, y, eval_set=(X_val, y_val), views=V)     # V (N, K, D): K augmented views per row
    """

    kind = "mlp"
    multilabel_ok = True
    _parameter_constraints = {
        **Head._parameter_constraints,
        "hidden": [tuple, list],  # widths >= 1: checked by fit
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "select": [StrOptions({"loss", *SELECT})],  # map: multi-label targets only
        "balanced": ["boolean"],
        "holdout": [Interval(Real, 0, 1, closed="neither")],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "device": [str],  # auto, cpu, cuda, cuda:1 ...: resolve_device checks
    }

    def __init__(self, hidden: tuple[int, ...] = (512,), dropout: float = 0.5, lr: float = 1e-3,
                 weight_decay: float = 1e-2, epochs: int = 200, batch_size: int = 256, patience: int = 10,
                 select: str = "loss", norm: str = "standardize", balanced: bool = False, holdout: float = 0.2,
                 seed: int = 0, device: str = "auto"):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.select = select
        self.norm = norm
        self.balanced = balanced
        self.holdout = holdout
        self.seed = seed
        self.device = device

    def fit(self, X, y, sample_weight=None, eval_set=None, views=None) -> MLPHead:
        """Train on X (N, D), y (N,); ``views`` (N, K, D): augmented views of X's rows, drawn from with the centre
        vectors (normalised with the centre statistics). Validation: ``eval_set``, else a seeded holdout.

        ``sample_weight`` (N,) scales each row's loss (and its share of the normalisation statistics, of the
        balanced class weights and, for holdout rows, of the validation loss)."""
        t0 = time.perf_counter()
        X, y, sw = self._validate_fit(X, y, sample_weight)
        check_widths(X.shape[1], tuple(int(h) for h in self.hidden))
        multilabel = y.ndim == 2
        if not multilabel:
            refuse_map(self.select, "this mlp head takes one class per row")
        elif self.select != "loss":
            refuse_single(self.select, "this mlp head was given a multi-label target")
        if multilabel and self.balanced:
            raise ProbeError("balanced class weights are for one class per row; a multi-label mlp head does not take "
                             "them: leave `balanced` off")
        V = None if views is None else self._check_views(views, X)  # (N, K, D) or None
        sw_val = None
        if eval_set is None:
            holdout = multilabel_holdout if multilabel else stratified_holdout
            tr, ho = holdout(y, self.holdout, self.seed)
            eval_set, sw_val = (X[ho], y[ho]), (None if sw is None else sw[ho])
            X, y, sw = X[tr], y[tr], (None if sw is None else sw[tr])
            V = V[tr] if V is not None else None
            if sw is not None and not sw.sum() > 0:
                raise ProbeError(f"every training row left after the {self.holdout:g} holdout has sample_weight 0")
        Z, yi = self._fit_classes_and_norm(X, y, sw)
        self.n_views_ = 0 if V is None else V.shape[1]
        if V is not None:  # normalised with the statistics of the centre vectors, like any input at predict time
            n, k, d = V.shape
            V = apply_norm(V.reshape(n * k, d), self.norm_).reshape(n, k, d)
        Xv, yv_raw = eval_set
        Zv = self.transform_features(Xv)
        if multilabel:
            yv = np.asarray(yv_raw, np.float32)
            if yv.shape != (len(Zv), len(self.classes_)):
                raise ProbeError(f"validation labels must be a ({len(Zv)}, {len(self.classes_)}) 0/1 matrix like the "
                                 f"training labels, got shape {yv.shape}")
        else:
            unknown = np.setdiff1d(np.asarray(yv_raw), self.classes_)
            if len(unknown):
                raise ProbeError(f"validation labels {unknown[:5].tolist()} do not occur in the training labels")
            yv = np.searchsorted(self.classes_, np.asarray(yv_raw))
        best_state, best_epoch, epochs_run = self._train(Z, yi, sw, V, Zv, yv, sw_val)
        self.weights_ = {k: v.numpy() for k, v in best_state.items()}
        self.best_epoch_, self.epochs_run_ = best_epoch, epochs_run
        best = self.history_[best_epoch - 1]
        self.val_loss_, self.val_score_ = best["val_loss"], best[key(self.select)]
        self.val_accuracy_ = None if multilabel else float((self._proba(Zv).argmax(1) == yv).mean())
        self.fit_seconds_ = time.perf_counter() - t0
        log.info("mlp: best epoch %d of %d, val loss %.4f%s", best_epoch, epochs_run, self.val_loss_,
                 f" ({self.n_views_} augmented views per row)" if self.n_views_ else "")
        return self

    def _train(self, Z: np.ndarray, yi: np.ndarray, sw: np.ndarray | None, V: np.ndarray | None, Zv: np.ndarray,
               yv: np.ndarray, sw_val: np.ndarray | None) -> tuple[dict[str, torch.Tensor], int, int]:
        """The training loop: Z (N, D), yi (N,), sample weights (N,) or None, views V (N, K, D) or None, validation
        Zv (M, D), yv (M,), weights (M,) or None. Returns (best state, best epoch, epochs run); sets ``history_``."""
        K = len(self.classes_)
        dev = resolve_device(self.device)
        if self.multilabel_:
            loss_fn = multilabel_loss
        else:
            counts = np.bincount(yi, weights=sw, minlength=K)
            cw = counts.sum() / (K * np.where(counts > 0, counts, 1)) if self.balanced else np.ones(K)  # (K,)
            loss_fn = weighted_loss(torch.tensor(cw, dtype=torch.float32, device=dev))
        Zt, yt = torch.from_numpy(Z).to(dev), torch.from_numpy(yi).to(dev)
        Zvt, yvt = torch.from_numpy(Zv).to(dev), torch.from_numpy(yv).to(dev)
        wt = None if sw is None else torch.from_numpy(sw.astype(np.float32)).to(dev)  # (N,)
        wvt = None if sw_val is None else torch.from_numpy(sw_val.astype(np.float32)).to(dev)  # (M,)
        Vt = torch.from_numpy(V).to(dev) if V is not None else None  # (N, K, D)
        work = min(len(Z), int(self.batch_size)) * Z.shape[1] * (int(self.hidden[0]) if len(self.hidden) else K)
        # seeded init, shuffling and dropout without touching global state; one thread for tiny batches (threads_for)
        with torch.random.fork_rng(devices=[]), threads_for(work, dev):
            torch.manual_seed(self.seed)
            net = build_mlp(Z.shape[1], tuple(int(h) for h in self.hidden), K, self.dropout).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            best, best_loss, best_state, best_epoch, stale = -float("inf"), float("inf"), None, 0, 0
            self.history_ = []
            for epoch in range(int(self.epochs)):
                net.train()
                order = torch.randperm(len(Zt), device=dev)
                if Vt is not None:  # this epoch's input per row: 0 its centre vector, k its view k - 1
                    choice = torch.randint(0, self.n_views_ + 1, (len(Zt),), device=dev)
                for s in range(0, len(Zt), self.batch_size):
                    idx = order[s: s + self.batch_size]
                    opt.zero_grad()
                    xb = Zt[idx] if Vt is None else pick_rows(Zt, Vt, idx, choice[idx])  # (B, D)
                    loss_fn(net(xb), yt[idx], None if wt is None else wt[idx]).backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    logits = net(Zvt)  # (M, K)
                    val_loss = float(loss_fn(logits, yvt, wvt))
                row = {"epoch": epoch + 1, "val_loss": val_loss}
                if self.select != "loss" and self.multilabel_:
                    row[key(self.select)] = multilabel_score(self.select, yv, torch.sigmoid(logits).cpu().numpy())
                elif self.select != "loss":
                    row[key(self.select)] = score(self.select, yv, logits.argmax(1).cpu().numpy(), K, sw_val)
                self.history_.append(row)
                # a metric's ties go to the lower loss: a step-valued metric's plateau is no stall while it falls
                now = 0.0 if self.select == "loss" else row[key(self.select)]  # higher is better
                if now > best or (now == best and val_loss < best_loss - 1e-6):
                    best, best_loss, best_epoch, stale = now, val_loss, epoch + 1, 0
                    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        return best_state, best_epoch, epoch + 1

    @staticmethod
    def _check_views(views, X: np.ndarray) -> np.ndarray | None:
        V = np.asarray(views, np.float32)
        d = X.shape[1] if X.ndim == 2 else "D"
        if V.ndim != 3 or len(V) != len(X) or (X.ndim == 2 and V.shape[2] != X.shape[1]):
            raise ProbeError(f"views must have shape ({len(X)}, K, {d}): K augmented views of each row of X, "
                             f"got {V.shape}")
        if not np.isfinite(V).all():
            raise ProbeError(f"views contain {int((~np.isfinite(V)).sum())} NaN/inf values")
        return V if V.shape[1] else None

    def _net(self) -> nn.Sequential:
        K = len(self.classes_)
        net = build_mlp(self.n_features_in_, tuple(int(h) for h in self.hidden), K, self.dropout)
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.weights_.items()})
        return net.eval()

    def _ml_logits(self, Z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._net()(torch.from_numpy(Z)).double().numpy()  # (N, K) each class's own logit

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self._net()(torch.from_numpy(Z))
            return (torch.sigmoid(logits) if self.multilabel_ else torch.softmax(logits, 1)).numpy()

    def get_state(self) -> dict[str, np.ndarray]:
        arrays = super().get_state()
        arrays.update({f"net.{k}": v for k, v in self.weights_.items()})
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> MLPHead:
        super().set_state(arrays)
        self.weights_ = {k[4:]: v for k, v in arrays.items() if k.startswith("net.")}
        return self
