"""A small MLP on cached features: Linear -> ReLU -> Dropout -> ... -> Linear, AdamW, early stopping.

The seeds' few-shot head, trained on features instead of images: an epoch over 50k cached rows is a few
milliseconds of matrix products, not a pass of the backbone. Training stops when the validation loss has not
improved for ``patience`` epochs and the best epoch's weights are kept.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from probe.extract import resolve_device

from .base import Head
from .features import apply_norm, check_X, stratified_holdout

log = logging.getLogger(__name__)


def build_mlp(dim: int, hidden: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(dim, h), nn.ReLU(), nn.Dropout(dropout)]
        dim = h
    layers.append(nn.Linear(dim, n_classes))
    return nn.Sequential(*layers)


class MLPHead(Head):
    """MLP classifier with dropout, AdamW and early stopping on validation loss.

    Parameters: ``hidden`` layer widths; ``dropout``; ``lr``, ``weight_decay`` (AdamW); ``epochs`` at most;
    ``batch_size``; ``patience`` epochs without validation-loss improvement before stopping; ``norm``;
    ``balanced`` class weights in the loss; ``holdout``/``seed`` for the validation split when ``fit`` gets no
    ``eval_set``; ``device``.

    Fitted: ``weights_`` (parameter name -> array), ``best_epoch_``, ``val_loss_``, ``val_accuracy_``.

    Example:
        >>> MLPHead(hidden=(512,)).fit(X, y, eval_set=(X_val, y_val)).predict(X_test)
    """

    kind = "mlp"

    def __init__(self, hidden: tuple[int, ...] = (512,), dropout: float = 0.5, lr: float = 1e-3,
                 weight_decay: float = 1e-2, epochs: int = 200, batch_size: int = 256, patience: int = 10,
                 norm: str = "standardize", balanced: bool = False, holdout: float = 0.2, seed: int = 0,
                 device: str = "auto"):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.norm = norm
        self.balanced = balanced
        self.holdout = holdout
        self.seed = seed
        self.device = device

    def fit(self, X, y, sample_weight=None, eval_set=None) -> MLPHead:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        t0 = time.perf_counter()
        X, y = np.asarray(X, np.float32), np.asarray(y)
        if eval_set is None:
            tr, ho = stratified_holdout(y, self.holdout, self.seed)
            eval_set = (X[ho], y[ho])
            X, y = X[tr], y[tr]
        Z, yi = self._start_fit(X, y)
        Xv, yv_raw = eval_set
        Zv = apply_norm(check_X(Xv, self.n_features_in_), self.norm_)
        unknown = np.setdiff1d(np.asarray(yv_raw), self.classes_)
        if len(unknown):
            raise ValueError(f"validation labels {unknown[:5].tolist()} do not occur in the training labels")
        yv = np.searchsorted(self.classes_, np.asarray(yv_raw))
        K = len(self.classes_)
        dev = resolve_device(self.device)
        counts = np.bincount(yi, minlength=K)
        cw = len(yi) / (K * np.maximum(counts, 1)) if self.balanced else np.ones(K)  # (K,) class weights
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(cw, dtype=torch.float32, device=dev))
        Zt, yt = torch.from_numpy(Z).to(dev), torch.from_numpy(yi).to(dev)
        Zvt, yvt = torch.from_numpy(Zv).to(dev), torch.from_numpy(yv).to(dev)
        with torch.random.fork_rng(devices=[]):  # seeded init, shuffling and dropout without touching global state
            torch.manual_seed(self.seed)
            net = build_mlp(Z.shape[1], tuple(int(h) for h in self.hidden), K, self.dropout).to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
            for epoch in range(int(self.epochs)):
                net.train()
                order = torch.randperm(len(Zt), device=dev)
                for s in range(0, len(Zt), self.batch_size):
                    idx = order[s: s + self.batch_size]
                    opt.zero_grad()
                    loss_fn(net(Zt[idx]), yt[idx]).backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    val_loss = float(loss_fn(net(Zvt), yvt))
                if val_loss < best_loss - 1e-6:
                    best_loss, best_epoch, stale = val_loss, epoch + 1, 0
                    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        net.load_state_dict(best_state)
        self.weights_ = {k: v.numpy() for k, v in best_state.items()}
        self.best_epoch_, self.epochs_run_ = best_epoch, epoch + 1
        self.val_loss_ = best_loss
        self.val_accuracy_ = float((self._proba(Zv).argmax(1) == yv).mean())
        self.fit_seconds_ = time.perf_counter() - t0
        log.info("mlp: best epoch %d of %d, val loss %.4f, val accuracy %.4f", best_epoch, epoch + 1, best_loss,
                 self.val_accuracy_)
        return self

    def _net(self) -> nn.Sequential:
        K = len(self.classes_)
        net = build_mlp(self.n_features_in_, tuple(int(h) for h in self.hidden), K, self.dropout)
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.weights_.items()})
        return net.eval()

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self._net()(torch.from_numpy(Z)), 1).numpy()

    def get_state(self) -> dict[str, np.ndarray]:
        arrays = super().get_state()
        arrays.update({f"net.{k}": v for k, v in self.weights_.items()})
        return arrays

    def set_state(self, arrays: dict[str, np.ndarray]) -> MLPHead:
        super().set_state(arrays)
        self.weights_ = {k[4:]: v for k, v in arrays.items() if k.startswith("net.")}
        return self
