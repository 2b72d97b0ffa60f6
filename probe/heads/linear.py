"""Multinomial logistic regression with an L2 sweep: the linear probe of Kornblith et al. 2019 and CLIP.

The objective is scikit-learn's (``LogisticRegression(C=C)``, lbfgs, multinomial)::

    0.5 * ||W||^2 + C * sum_i w_i * logloss_i        (no penalty on the intercept)

solved full-batch with L-BFGS in torch (on the GPU when present). With ``C=None`` the head sweeps ``n_Cs``
strengths on a log grid from the strongest regularisation to the weakest, each warm-started from the previous
solution, picks the strength with the best accuracy on a validation set (``eval_set``, else a seeded stratified
holdout of the training rows), and refits on train + validation at that strength.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .base import Head
from .features import apply_norm, balanced_weights, check_X, stratified_holdout

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    from probe.extract import resolve_device as _resolve

    return _resolve(device)


def _solve(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, C: float, W: torch.Tensor, b: torch.Tensor,
           max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise sklearn's objective, scaled by 1/(C * sum w) so that float32 stays well-conditioned.

    Z (N, D), y (N,) int64, w (N,) sample weights, W (D, K), b (K,) warm start. Returns (W, b, evaluations)."""
    W = W.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    wsum = w.sum()
    lam = 1.0 / (2.0 * C * wsum)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad()
        logits = Z @ W + b  # (N, K)
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() / wsum
        loss = loss + lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), evals


class LinearHead(Head):
    """L2-regularised multinomial logistic regression, scikit-learn compatible.

    Parameters: ``C`` a fixed inverse strength, or None to sweep ``n_Cs`` values in ``C_range`` (log grid);
    ``norm`` feature normalisation (default standardize); ``balanced`` class weights; ``max_iter`` L-BFGS
    iterations per strength (``max_iter_final`` for a fixed C and the refit); ``holdout``/``seed`` the validation
    split used when ``fit`` gets no ``eval_set``; ``device`` auto | cpu | cuda.

    Fitted: ``coef_`` (K, D) and ``intercept_`` (K,) on normalised features, ``C_``, ``sweep_`` (list of
    {"C", "val_accuracy"}; empty for a fixed C), ``val_accuracy_``.

    Example:
        >>> head = LinearHead().fit(X_train, y_train, eval_set=(X_val, y_val))
        >>> head.C_, head.predict(X_test)
    """

    kind = "linear"
    _state_attrs = ("coef_", "intercept_")

    def __init__(self, C: float | None = None, n_Cs: int = 25, C_range: tuple[float, float] = (1e-6, 1e6),
                 norm: str = "standardize", balanced: bool = False, max_iter: int = 100,
                 max_iter_final: int = 1000, tol: float = 1e-6, holdout: float = 0.2, seed: int = 0,
                 refit: bool = True, device: str = "auto"):
        self.C = C
        self.n_Cs = n_Cs
        self.C_range = C_range
        self.norm = norm
        self.balanced = balanced
        self.max_iter = max_iter
        self.max_iter_final = max_iter_final
        self.tol = tol
        self.holdout = holdout
        self.seed = seed
        self.refit = refit
        self.device = device

    def Cs(self) -> np.ndarray:
        """The sweep grid, strongest regularisation first."""
        lo, hi = self.C_range
        if not (0 < lo <= hi):
            raise ValueError(f"C_range must be two positive numbers low <= high, got {self.C_range}")
        if int(self.n_Cs) < 1:
            raise ValueError(f"n_Cs must be >= 1, got {self.n_Cs}")
        return np.logspace(np.log10(lo), np.log10(hi), int(self.n_Cs))

    def fit(self, X, y, sample_weight=None, eval_set=None) -> LinearHead:
        if self.C is not None and not self.C > 0:
            raise ValueError(f"C must be > 0 (inverse regularisation strength), got {self.C}")
        t0 = time.perf_counter()
        if self.C is None and eval_set is None:  # hold out part of train for the sweep, then refit on all of it
            y_arr = np.asarray(y)
            tr, ho = stratified_holdout(y_arr, self.holdout, self.seed)
            X_arr = np.asarray(X, np.float32)
            if sample_weight is not None:
                sample_weight = np.asarray(sample_weight, np.float32)[tr]
            Z, yi = self._start_fit(X_arr[tr], y_arr[tr])
            yi_all = np.searchsorted(self.classes_, y_arr)
            Zv, yv = apply_norm(X_arr[ho], self.norm_), yi_all[ho]
            if len(np.unique(y_arr)) != len(self.classes_):
                raise ValueError("the holdout took every row of a class: give the class more images or an eval_set")
        else:
            Z, yi = self._start_fit(X, y)
            Zv = yv = None
            if eval_set is not None:
                Xv, yv_raw = eval_set
                Zv = apply_norm(check_X(Xv, self.n_features_in_), self.norm_)
                yv_raw = np.asarray(yv_raw)
                unknown = np.setdiff1d(yv_raw, self.classes_)
                if len(unknown):
                    raise ValueError(f"validation labels {unknown[:5].tolist()} do not occur in the training labels")
                yv = np.searchsorted(self.classes_, yv_raw)
        K = len(self.classes_)
        dev = resolve_device(self.device)

        def weights(yi_: np.ndarray, sw: np.ndarray | None) -> torch.Tensor:
            """(N,) per-row weights: balanced class weights times the caller's sample weights."""
            w = balanced_weights(yi_, K) if self.balanced else np.ones(len(yi_), np.float32)
            if sw is not None:
                w = w * sw
            return torch.from_numpy(w).to(dev)

        sw = None if sample_weight is None else np.asarray(sample_weight, np.float32)
        if sw is not None and sw.shape != yi.shape:
            raise ValueError(f"expected {len(yi)} sample weights (one per row), got shape {sw.shape}")
        Zt, yt = torch.from_numpy(Z).to(dev), torch.from_numpy(yi).to(dev)
        wt = weights(yi, sw)
        W = torch.zeros(Z.shape[1], K, device=dev)
        b = torch.zeros(K, device=dev)
        self.sweep_ = []
        if self.C is not None:
            W, b, _ = _solve(Zt, yt, wt, float(self.C), W, b, self.max_iter_final, self.tol)
            self.C_ = float(self.C)
            self.val_accuracy_ = None
            if Zv is not None:
                self.val_accuracy_ = float(((torch.from_numpy(Zv).to(dev) @ W + b).argmax(1).cpu().numpy()
                                            == yv).mean())
        else:
            Zvt = torch.from_numpy(Zv).to(dev)
            best = (-1.0, None, None, None)
            for C in self.Cs():
                W, b, n_eval = _solve(Zt, yt, wt, float(C), W, b, self.max_iter, self.tol)
                acc = float(((Zvt @ W + b).argmax(1).cpu().numpy() == yv).mean())
                self.sweep_.append({"C": float(C), "val_accuracy": acc})
                log.info("C=%.3g  val accuracy %.4f  (%d evaluations)", C, acc, n_eval)
                if acc > best[0]:  # ties keep the stronger regularisation
                    best = (acc, float(C), W, b)
            self.val_accuracy_, self.C_, W, b = best
            if self.refit:  # Kornblith et al.: refit on train + validation at the chosen strength
                Zall = torch.cat([Zt, Zvt])
                yall = torch.cat([yt, torch.from_numpy(yv).to(dev)])
                sw_all = None if sw is None else np.concatenate([sw, np.ones(len(yv), np.float32)])
                W, b, _ = _solve(Zall, yall, weights(yall.cpu().numpy(), sw_all), self.C_, W, b,
                                 self.max_iter_final, self.tol)
            log.info("chose C=%.3g (val accuracy %.4f)", self.C_, self.val_accuracy_)
        self.coef_ = W.T.contiguous().cpu().numpy()  # (K, D)
        self.intercept_ = b.cpu().numpy()  # (K,)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def decision_function(self, X) -> np.ndarray:
        """(N, D) -> (N, K) logits."""
        return self.transform_features(X) @ self.coef_.T + self.intercept_

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        from .prototype import softmax

        return softmax(Z @ self.coef_.T + self.intercept_)
