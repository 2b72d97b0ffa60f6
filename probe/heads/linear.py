"""Multinomial logistic regression with an L2 sweep: the linear probe of Kornblith et al. 2019 and CLIP.

The objective is scikit-learn's (``LogisticRegression(C=C)``, lbfgs, multinomial)::

    0.5 * ||W||^2 + C * sum_i w_i * logloss_i        (no penalty on the intercept)

solved full-batch with L-BFGS in torch (on the GPU when present). With ``C=None`` the head sweeps ``n_Cs``
strengths on a log grid from the strongest regularisation to the weakest, ``block`` strengths at a time in one
batched L-BFGS (``_solve_many``), each block warm-started from the previous block's weakest solution, picks
the strength with the best ``select`` metric (accuracy, mean-per-class, macro-f1: ``scoring.py``) on a validation
set and refits on train + validation at that strength. Without a validation set the metric is averaged over a
seeded stratified k-fold split of train (a single small holdout picks a noisy strength) and the final fit uses all
training rows. ``grid="kornblith"`` sweeps Kornblith et al.'s 45 strengths on 1e-6..1e5 instead of ``n_Cs`` on
``C_range``.

Multi-label (``fit(X, Y)``, Y an (N, C) 0/1 matrix): one-vs-rest, the same solver on the sum over classes of
binary log-losses -- separable, so each class's (coef, intercept) is scikit-learn's binary ``LogisticRegression(C=C)``
on that column. C is chosen by ``select`` map (the default there) or macro-f1 (at each strength's F1-optimal val
thresholds); accuracy and mean-per-class are single-label metrics and are refused, as is ``balanced``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _num_samples
from tqdm.auto import tqdm

from probe.device import resolve_device

from ..errors import ProbeError
from .base import Head
from .features import apply_norm, balanced_weights, stratified_subsample
from .multilabel import f1_scores, fit_thresholds, mean_ap, multilabel_folds, multilabel_holdout
from .scoring import SELECT, key, refuse_map, refuse_single, score

log = logging.getLogger(__name__)
SMALL_WORK = 2e7  # multiply-adds per logits product below which one CPU thread is faster than several
GRIDS = ("default", "kornblith")  # default: n_Cs strengths on C_range; kornblith: Kornblith et al. 2019
KORNBLITH_CS = np.logspace(-6, 5, 45)  # "45 logarithmically spaced values between 10^-6 and 10^5"
DEFAULT_N_CS, DEFAULT_C_RANGE = 25, (1e-6, 1e6)
DEFAULT_SWEEP_ROWS = 100_000  # training rows the C sweep runs on: on 2 cores a 25-strength sweep of 800k rows is hours
CHUNK = 2 ** 24  # elements of the largest (rows, strengths x classes) temporary of a loss pass: 64 MB of float32


@contextmanager
def threads_for(work: float, device: torch.device) -> Iterator[None]:
    """One torch thread for small problems on CPU, restored afterwards.

    L-BFGS on a few hundred rows is thousands of tiny ops; each threaded op waits at a barrier for every thread,
    and on a shared CPU that wait dominates (300 x 1280 sweep: 11 s on 1 thread, 213 s on 2 under load)."""
    if device.type != "cpu" or work >= SMALL_WORK or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _ztg(Z: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Z.T @ G, (N, D) x (N, k) -> (D, k). For a narrow G, (G.T @ Z).T: MKL's transposed-A product with few
    columns is several times slower (32k x 1280, k = 10 on 2 cores: 308 ms against 63 ms)."""
    return (G.T @ Z).T if G.shape[1] <= 32 else Z.T @ G


def _log_loss(logits: torch.Tensor, target: torch.Tensor, ovr: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss (...,) and d loss / d logits (..., K) of logits (..., K) against the 0/1 ``target``
    (broadcast to them): softmax cross-entropy, or with ``ovr`` the binary log-losses summed over classes."""
    if ovr:  # sum_k softplus(l_k) - y_k l_k; gradient sigmoid(l) - y
        return (torch.nn.functional.softplus(logits) - logits * target).sum(-1), torch.sigmoid(logits) - target
    lse = torch.logsumexp(logits, -1, keepdim=True)
    return lse[..., 0] - (logits * target).sum(-1), torch.exp(logits - lse) - target


def _objective(y: torch.Tensor, w: torch.Tensor, C: float | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of sklearn's objective scaled by 1/(C * sum w): each row's share w / sum w (N,) of the loss, and
    the penalty's weight 1/(2 C sum w), one per strength (C a float: (), C (S,): (S,))."""
    wsum = w.sum()
    return w / wsum, 1.0 / (2.0 * torch.as_tensor(C, dtype=w.dtype, device=w.device) * wsum)


def _target(y: torch.Tensor, K: int, dtype: torch.dtype, rows: slice) -> torch.Tensor:
    """The 0/1 target (n, K) of ``rows``: y itself for one-vs-rest, else y's one-hot, made a chunk at a time (at 1M
    rows x 1000 classes the whole one-hot is 4 GB)."""
    return y[rows].to(dtype) if y.dim() == 2 else torch.nn.functional.one_hot(y[rows], K).to(dtype)


def _chunk_sums(N: int, cols: int, part: Callable[[slice], tuple[torch.Tensor, ...]], chunk: int | None = None
                ) -> tuple[torch.Tensor, ...]:
    """The sum over row slices of ``part(rows)`` (a tuple of tensors), each slice at most ``chunk`` (default
    ``CHUNK``) // cols rows, so that a loss pass over N rows with ``cols`` logits per row holds no temporary larger
    than ``chunk`` elements; all N rows in one slice when they fit (the unchunked computation itself)."""
    step = max(1, (chunk or CHUNK) // max(1, cols))
    total: tuple[torch.Tensor, ...] | None = None
    for a in range(0, N, step):
        p = part(slice(a, min(a + step, N)))
        total = p if total is None else tuple(x + y for x, y in zip(total, p))
    assert total is not None, "a loss pass over no rows"
    return total


def _solve(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, C: float, W: torch.Tensor, b: torch.Tensor,
           max_iter: int, tol: float, anchor: torch.Tensor | None = None, chunk: int | None = None,
           tick: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise sklearn's objective, scaled by 1/(C * sum w) so that float32 stays well-conditioned.

    Z (N, D), y (N,) int64 -- or (N, K) 0/1 float for one-vs-rest (binary log-loss summed over classes) --, w (N,)
    sample weights, W (D, K), b (K,) warm start, anchor (D, K) the weights the penalty pulls towards (default 0);
    the loss runs over row chunks (``_chunk_sums``); ``tick()`` is called after each evaluation.
    Returns (W, b, L-BFGS iterations)."""
    N, K = Z.shape[0], W.shape[1]
    W0 = torch.zeros_like(W) if anchor is None else anchor
    W = W.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    ww, lam = _objective(y, w, C)
    ww = ww[:, None]  # (N, 1)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def part(r: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, G = _log_loss(Z[r] @ W + b, _target(y, K, Z.dtype, r), y.dim() == 2)  # (n,), (n, K)
        G = G * ww[r]
        return (rows * ww[r, 0]).sum(), _ztg(Z[r], G), G.sum(0)

    @torch.no_grad()
    def closure():  # the gradient by hand: autograd's Z.T @ dlogits is the slow narrow product (_ztg)
        f, gW, gb = _chunk_sums(N, K, part, chunk)
        W.grad = (gW + 2 * lam * (W - W0)).contiguous()
        b.grad = gb
        if tick is not None:
            tick()
        return f + lam * ((W - W0) ** 2).sum()

    opt.step(closure)
    return W.detach(), b.detach(), int(opt.state[W].get("n_iter", 0))


def _loss_grad(Z: torch.Tensor, y: torch.Tensor, ww: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor,
               A: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled objective (s,) and its gradient (s, P) of s parameter vectors theta (s, P = D*K + K) at once:
    one (n, D) @ (D, s*K) product per row chunk (``_chunk_sums``). Z (N, D), y (N,) class indices or (N, K) 0/1
    (one-vs-rest), ww (N, 1, 1) each row's share of the loss, lam (s,) the penalties' weights, A (D, K) their
    centre."""
    N, (D, K), s = Z.shape[0], A.shape, theta.shape[0]
    W, b = theta[:, : D * K].view(s, D, K), theta[:, D * K:]  # (s, D, K), (s, K)
    Wm = W.permute(1, 0, 2).reshape(D, s * K)

    def part(r: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = r.stop - r.start
        logits = (Z[r] @ Wm).view(n, s, K) + b  # (n, s, K)
        loss, G = _log_loss(logits, _target(y, K, Z.dtype, r)[:, None], y.dim() == 2)  # (n, s), (n, s, K)
        G = G * ww[r]
        return (loss * ww[r][..., 0]).sum(0), _ztg(Z[r], G.reshape(n, s * K)), G.sum(0)

    fl, gZ, gb = _chunk_sums(N, s * K, part, chunk)  # (s,), (D, s*K), (s, K)
    f = fl + lam * ((W - A) ** 2).sum((1, 2))
    gW = gZ.reshape(D, s, K).permute(1, 0, 2) + 2 * lam[:, None, None] * (W - A)
    return f, torch.cat([gW.reshape(s, D * K), gb], 1)  # (s,), (s, P)


# ~80 lines, kept whole: one L-BFGS iteration (two-loop recursion, batched Armijo search, history update) reads
# top to bottom in one place, and its per-strength state (S, ...) tensors would otherwise cross several calls.
def _solve_many(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, Cs: np.ndarray, K: int, max_iter: int,
                tol: float, history: int = 10, init: torch.Tensor | None = None, anchor: torch.Tensor | None = None,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every strength of a sweep at once: batched L-BFGS with backtracking (Armijo) line search.

    A sweep is memory-bound when run one strength at a time: each evaluation streams all of Z (N, D) for a skinny
    (D, K) product. Here S strengths share each pass — one (N, D) @ (D, S*K) product — so the sweep costs about
    as many passes over Z as its slowest strength needs. Same scaled objective as ``_solve``; a problem stops when
    its largest gradient entry is below ``tol`` or its line search cannot decrease the loss any further.

    Z (N, D), y (N,) class indices -- or (N, K) 0/1 for one-vs-rest, binary log-losses summed over classes --,
    w (N,) weights, Cs (S,), init (D*K + K,) a warm start shared by all S
    (default zeros); anchor (D, K) the weights the penalty pulls towards (default 0); the loss runs over row chunks
    of at most ``chunk`` (default ``CHUNK``) logits (``_chunk_sums``).
    Returns W (S, D, K), b (S, K), iterations (S,)."""
    N, D = Z.shape
    S, P = len(Cs), D * K + K
    ww, lam_all = _objective(y, w, Cs)  # (N,), (S,)
    ww = ww[:, None, None]  # (N, 1, 1)
    A = torch.zeros(D, K, dtype=Z.dtype, device=Z.device) if anchor is None else anchor  # (D, K)

    def f_and_g(theta: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _loss_grad(Z, y, ww, theta, lam, A, chunk)

    theta = torch.zeros(S, P, dtype=Z.dtype, device=Z.device) if init is None else init.expand(S, P).clone()
    f, g = f_and_g(theta, lam_all)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s_k, y_k, rho_k), each over all S
    active = g.abs().amax(1) > tol
    iters = torch.zeros(S, dtype=torch.int64, device=Z.device)
    for _ in range(max_iter):
        if not active.any():
            break
        iters += active
        q = g.clone()  # two-loop recursion, batched over strengths (rho = 0 masks unusable pairs)
        alphas = []
        for s_, y_, r_ in reversed(hist):
            a = r_ * (s_ * q).sum(1)
            q -= a[:, None] * y_
            alphas.append(a)
        if hist:
            s_, y_, r_ = hist[-1]
            gamma = torch.where(r_ > 0, (s_ * y_).sum(1) / (y_ * y_).sum(1).clamp_min(1e-30), torch.ones_like(r_))
        else:
            gamma = 1.0 / g.abs().sum(1).clamp_min(1.0)  # torch's LBFGS first step
        r = gamma[:, None] * q
        for (s_, y_, r_), a in zip(hist, reversed(alphas)):
            r += s_ * (a - r_ * (y_ * r).sum(1))[:, None]
        d = -r
        gd = (g * d).sum(1)
        uphill = gd >= 0
        d[uphill], gd[uphill] = -g[uphill], -(g[uphill] ** 2).sum(1)
        idx = torch.nonzero(active).flatten()  # only unfinished strengths are evaluated
        t = torch.ones(len(idx), dtype=Z.dtype, device=Z.device)
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        done = torch.zeros(len(idx), dtype=torch.bool, device=Z.device)
        for _ls in range(30):
            trial = theta[idx] + t[:, None] * d[idx]
            ft, gt = f_and_g(trial, lam_all[idx])
            ok = ~done & (ft <= f[idx] + 1e-4 * t * gd[idx])
            sel = idx[ok]
            new_theta[sel], new_f[sel], new_g[sel] = trial[ok], ft[ok], gt[ok]
            done |= ok
            if done.all():
                break
            t = torch.where(done, t, t * 0.5)
        stuck = torch.zeros_like(active)
        stuck[idx[~done]] = True  # no decrease left at float precision: as converged as it gets
        s_new, y_new = new_theta - theta, new_g - g
        sy = (s_new * y_new).sum(1)
        hist.append((s_new, y_new, torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))))
        hist = hist[-history:]
        theta, f, g = new_theta, new_f, new_g
        active = active & ~stuck & (g.abs().amax(1) > tol)
    return theta[:, : D * K].view(S, D, K), theta[:, D * K:], iters


def sweep_path(Z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, Cs: np.ndarray, K: int, block: int, max_iter: int,
               tol: float, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
               tick: Callable[[int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(W (D, K), b (K,), L-BFGS iterations) for every strength of ``Cs`` (strongest first) on Z (N, D), y, w.

    ``block`` strengths are solved together (``_solve_many``), each block warm-started from the previous block's
    weakest regularisation (the first from ``anchor`` (W, b), else zeros): batching keeps the products wide, the
    path keeps the iterations few. ``tick(n)`` is called after each block with its n strengths."""
    A, start = (None, None) if anchor is None else (anchor[0], torch.cat([anchor[0].reshape(-1), anchor[1]]))
    out = []
    for a in range(0, len(Cs), block):
        W, b, n = _solve_many(Z, y, w, Cs[a: a + block], K, max_iter, tol, init=start, anchor=A)
        out += [(W[i], b[i], int(n[i])) for i in range(len(n))]
        start = torch.cat([W[-1].reshape(-1), b[-1]])
        if tick is not None:
            tick(len(n))
    return out


class LinearHead(Head):
    """L2-regularised multinomial logistic regression, scikit-learn compatible.

    Parameters: ``C`` a fixed inverse strength, or None to sweep ``n_Cs`` values in ``C_range`` (log grid), or
    with ``grid="kornblith"`` the 45 strengths of Kornblith et al. 2019 on 1e-6..1e5; ``select`` the validation
    metric that picks C (accuracy, mean-per-class, macro-f1; map needs multi-label data; None: accuracy, or map
    for a multi-label Y -- the fitted ``select_``);
    ``norm`` feature normalisation (default standardize); ``balanced`` class weights; ``block`` strengths solved
    together in the sweep; ``max_iter`` L-BFGS
    iterations per strength (``max_iter_final`` for a fixed C and the refit); ``tol`` the largest gradient entry
    at convergence (scikit-learn's lbfgs default, on the same scaled objective); ``folds``/``seed`` the stratified
    k-fold cross-validation that chooses C when ``fit`` gets no ``eval_set``; ``sweep_rows`` the most training
    rows the sweep (and that cross-validation) runs on (None: all); ``device`` auto | cpu | cuda; ``copy`` False
    normalises X in place instead of into a copy (as scikit-learn's ``StandardScaler(copy=False)``: X is then the
    normalised features; only for a writeable float32 C-contiguous X and a fit without ``eval_set``, else a copy
    is made): one array the size of the training rows instead of two (probe.doctor's fold refits use it).

    With more training rows than ``sweep_rows``, C is chosen on a seeded stratified subsample of that many
    (``features.stratified_subsample``; the solve of a sweep costs rows x strengths, hours on 2 cores at 800k
    rows), and the final fit at the chosen C runs on every training row (+ validation, refit), warm-started from the
    subsample's solution at C. That is the refit Kornblith et al. already make on train + val: C multiplies the
    *summed* loss (0.5 ||W||^2 + C sum_i loss_i), so the same C on n times the rows is a relatively n times weaker
    penalty -- what more data warrants -- and the strength chosen on the subsample is the one that generalised
    best at its size (benchmarks/bench_heads_scale.py compares it with ``sweep_rows=None`` on one store).

    Fitted: ``coef_`` (K, D) and ``intercept_`` (K,) on normalised features, ``C_``, ``sweep_`` (list of
    {"C", "val_accuracy"} plus the ``select`` metric's ``val_mean_per_class`` / ``val_macro_f1``; empty for a fixed
    C), ``val_accuracy_`` and ``val_score_`` (the ``select`` metric) at ``C_``, ``n_iter_`` (L-BFGS iterations of
    the solve that gave ``coef_``), ``sweep_rows_`` (training rows C was chosen on; None for a fixed C).

    Example:
        >>> head = LinearHead().fit(X_train, y_train, eval_set=(X_val, y_val))
        >>> head.C_, head.predict(X_test)
    """

    kind = "linear"
    multilabel_ok = True
    _state_attrs = ("coef_", "intercept_")
    _parameter_constraints = {
        **Head._parameter_constraints,
        "C": [Interval(Real, 0, None, closed="neither"), None],
        "n_Cs": [Interval(Integral, 1, None, closed="left")],
        "C_range": [tuple, list],  # two positive numbers, low <= high: checked by Cs()
        "grid": [StrOptions(set(GRIDS))],
        "select": [StrOptions(set(SELECT)), None],  # None: accuracy, map for multi-label targets (select_)
        "balanced": ["boolean"],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "max_iter_final": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "refit": ["boolean"],
        "block": [Interval(Integral, 1, None, closed="left")],
        "sweep_rows": [Interval(Integral, 1, None, closed="left"), None],  # None: sweep on every training row
        "device": [str],  # auto, cpu, cuda, cuda:1 ...: resolve_device checks
        "copy": ["boolean"],
    }

    def __init__(self, C: float | None = None, n_Cs: int = DEFAULT_N_CS,
                 C_range: tuple[float, float] = DEFAULT_C_RANGE, grid: str = "default", select: str | None = None,
                 norm: str = "standardize", balanced: bool = False, max_iter: int = 100,
                 max_iter_final: int = 1000, tol: float = 1e-4, folds: int = 5, seed: int = 0,
                 refit: bool = True, block: int = 5, sweep_rows: int | None = DEFAULT_SWEEP_ROWS,
                 device: str = "auto", copy: bool = True):
        self.C = C
        self.n_Cs = n_Cs
        self.C_range = C_range
        self.grid = grid
        self.select = select
        self.norm = norm
        self.balanced = balanced
        self.max_iter = max_iter
        self.max_iter_final = max_iter_final
        self.tol = tol
        self.folds = folds
        self.seed = seed
        self.refit = refit
        self.block = block
        self.sweep_rows = sweep_rows
        self.device = device
        self.copy = copy

    def Cs(self) -> np.ndarray:
        """The sweep grid, strongest regularisation first."""
        if self.grid == "kornblith":
            if int(self.n_Cs) != DEFAULT_N_CS or tuple(self.C_range) != DEFAULT_C_RANGE:
                raise ProbeError(f"grid 'kornblith' is fixed at 45 strengths on 1e-6..1e5 (Kornblith et al. 2019); "
                                 f"n_Cs and C_range shape grid 'default' (got n_Cs={self.n_Cs}, "
                                 f"C_range={tuple(self.C_range)}): leave them out or use grid 'default'")
            return KORNBLITH_CS.copy()
        lo, hi = self.C_range
        if not (0 < lo <= hi):
            raise ProbeError(f"C_range must be two positive numbers low <= high, got {self.C_range}")
        return np.logspace(np.log10(lo), np.log10(hi), int(self.n_Cs))

    def fit(self, X, y, sample_weight=None, eval_set=None, anchor=None, init=None, progress: bool = False
            ) -> LinearHead:
        """Fit on X (N, D), y (N,); ``eval_set`` (X_val, y_val) chooses C in a sweep (else k-fold CV of X).

        ``sample_weight`` (N,) scales each row's loss -- and its share of the normalisation statistics, of the
        balanced class weights and of the cross-validation accuracy: a row of weight 2 counts as that row twice.

        ``anchor`` (coef (K, D), intercept (K,)) -- weights on the normalised features, classes in ``classes_``
        order, e.g. a zero-shot head's -- replaces the penalty 0.5 * ||W||^2 with 0.5 * ||W - coef||^2 (L2-SP,
        Li et al. 2018) and starts every solve there: a strong regularisation keeps the anchor, a weak one gives
        the plain probe, and the sweep chooses between them.

        ``init`` (coef (K, D), intercept (K,)) on the normalised features: where the solve at a fixed C starts
        (default: the anchor, else zeros) -- e.g. a head of the same C fit on more rows, which leaves the solver
        few iterations; the optimum is the same, to the solver's tolerance.

        ``progress``: bars on stderr over the sweep's strengths and the final fit's loss evaluations."""
        t0 = time.perf_counter()
        n_val = 0 if eval_set is None else _num_samples(eval_set[0])
        # (N + M, D): the normalised training rows, then room for the M validation rows (the refit uses both)
        Zall, yi, sw = self._start_fit(X, y, sample_weight, spare_rows=n_val, in_place=not self.copy)
        self._check_options()
        dev = resolve_device(self.device)
        anchor = None if anchor is None else self._anchor(anchor, Zall.shape[1], dev)
        if init is not None and self.C is None:
            raise ProbeError("init starts the solve at a fixed C; a sweep (C=None) starts from zeros or the anchor: "
                             "pass C, or leave init out")
        init = None if init is None else self._anchor(init, Zall.shape[1], dev, "init")
        yv = None if eval_set is None else self._eval_set(eval_set, out=Zall[len(yi):])
        with threads_for(len(yi) * Zall.shape[1] * len(self.classes_), dev):
            self._fit(Zall, yi, dev, None if sw is None else sw.astype(np.float32), yv, anchor, init, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def choose_C(self, X, y, sample_weight=None, eval_set=None, anchor=None, progress: bool = False
                 ) -> LinearHead:
        """Choose C as ``fit`` does -- the same sweep on the same rows (all of them, or the ``sweep_rows``
        subsample), the same ``C_``, ``sweep_``, ``sweep_rows_``, ``val_accuracy_`` and ``val_score_`` -- without
        the fit at ``C_`` that follows it: no ``coef_``, so the head does not predict until it is fit (e.g.
        ``set_params(C=head.C_).fit(...)``). For a caller that needs only the strength, as probe.doctor's
        out-of-fold fits at one C: only the sweep's rows are normalised (beside X it holds the subsample, not a
        normalised copy of every row), and the final solve on every row, whose cost grows with the rows while
        the sweep's does not past ``sweep_rows``, is not made. Arguments as ``fit``'s."""
        if self.C is not None:
            raise ProbeError(f"choose_C sweeps C, but this head's C is fixed at {self.C:g}: leave C out (None)")
        for a in ("coef_", "intercept_", "n_iter_", "fit_seconds_"):  # a previous fit's, on other statistics
            self.__dict__.pop(a, None)
        X, yi, sw = self._start_fit(X, y, sample_weight, normalise=False)  # classes_, norm_ on every row
        sw = None if sw is None else sw.astype(np.float32)
        self._check_options()
        dev = resolve_device(self.device)
        anchor = None if anchor is None else self._anchor(anchor, X.shape[1], dev)
        sub = self._sweep_subset(yi)
        if sub is None:  # every row: their normalised copy (X itself with copy=False, as fit)
            in_place = not self.copy and X.flags.c_contiguous and X.flags.writeable
            Zs, ys, sws = apply_norm(X, self.norm_, out=X if in_place else None), yi, sw
        else:  # the subsample's gathered rows, normalised where they lie
            Zs, ys, sws = X[sub], yi[sub], None if sw is None else sw[sub]
            apply_norm(Zs, self.norm_, out=Zs)
        yv, Zv = None, Zs[:0]
        if eval_set is not None:
            Zv = np.empty((_num_samples(eval_set[0]), X.shape[1]), np.float32)
            yv = self._eval_set(eval_set, out=Zv)
        with threads_for(len(ys) * X.shape[1] * len(self.classes_), dev):
            self._choose(Zs, ys, sws, Zv, yv, lambda a: torch.from_numpy(a).to(dev),
                         functools.partial(self._weights, dev=dev), anchor, progress, of_rows=len(yi))
        return self

    def _weights(self, yi: np.ndarray, sw: np.ndarray | None, dev: torch.device) -> torch.Tensor:
        """(N,) per-row weights on ``dev``: balanced class weights (never for multi-label) times the caller's sw."""
        w = balanced_weights(yi, len(self.classes_), sw) if self.balanced else np.ones(len(yi), np.float32)
        return torch.from_numpy(w if sw is None else w * sw).to(dev)

    def __sklearn_is_fitted__(self) -> bool:
        """Fitted once ``fit`` has made the weights (``choose_C`` alone leaves none)."""
        return hasattr(self, "coef_")

    def _check_options(self) -> None:
        """The options that depend on the training target (after ``_start_fit``): sets ``select_``."""
        if self.C is None:
            self.Cs()  # a bad C_range fails before any solve
        elif self.grid != "default":
            raise ProbeError(f"grid {self.grid!r} is a sweep, but C={self.C:g} is fixed: pass one or the other")
        self.select_ = self.select or ("map" if self.multilabel_ else "accuracy")
        if self.multilabel_:
            refuse_single(self.select_, "this linear head was given a multi-label target")
            if self.balanced:
                raise ProbeError("balanced class weights are for one class per row; a multi-label linear head "
                                 "(one-vs-rest) does not take them: leave `balanced` off")
        else:
            refuse_map(self.select_, "this linear head takes one class per row")

    def _anchor(self, anchor, D: int, dev: torch.device, what: str = "anchor") -> tuple[torch.Tensor, torch.Tensor]:
        """(coef (K, D), intercept (K,)) or coef alone -> (W (D, K), b (K,)) float32 tensors, shapes checked;
        ``what``: the argument's name in errors."""
        K = len(self.classes_)
        coef, intercept = anchor if isinstance(anchor, (tuple, list)) else (anchor, np.zeros(K))
        coef, intercept = np.asarray(coef, np.float32), np.asarray(intercept, np.float32)
        if coef.shape != (K, D) or intercept.shape != (K,):
            raise ProbeError(f"{what} must be (coef ({K}, {D}), intercept ({K},)) for {K} classes on {D}-d "
                             f"features, got coef {coef.shape} and intercept {intercept.shape}")
        if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise ProbeError(f"{what} holds NaN or infinite weights")
        return torch.from_numpy(coef.T.copy()).to(dev), torch.from_numpy(intercept).to(dev)

    def _fit(self, Zall: np.ndarray, yi: np.ndarray, dev: torch.device, sw: np.ndarray | None,
             yv: np.ndarray | None, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
             init: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False) -> None:
        """Zall (N + M, D): the N normalised training rows, then the M validation rows (yv None: no validation
        set); yi (N,) class indices or the (N, K) label matrix, sw (N,) weights or None; init (W, b) where a
        fixed C's solve starts."""
        K, N = len(self.classes_), len(yi)
        Z, Zv = Zall[:N], Zall[N:]  # views: the refit on train + val solves on Zall itself, no copy

        weights = functools.partial(self._weights, dev=dev)

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        def final(Zf: np.ndarray, yf: np.ndarray, swf: np.ndarray | None, C: float, W: torch.Tensor, b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
            """The solve at C on every row of Zf, warm-started at (W, b), logged with its time."""
            t1 = time.perf_counter()
            log.info("fitting C=%.3g on %d rows", C, len(yf))
            with tqdm(unit="eval", disable=not progress, desc=f"linear fit C={C:.3g} ({len(yf):,} rows)",
                      mininterval=0.5, dynamic_ncols=True) as bar:
                out = _solve(t(Zf), t(yf), weights(yf, swf), C, W, b, self.max_iter_final, self.tol, A,
                             tick=bar.update)
            log.info("fit C=%.3g on %d rows: %d L-BFGS iterations, %.1f s", C, len(yf), out[2],
                     time.perf_counter() - t1)
            return out

        W0, b0 = (torch.zeros(Z.shape[1], K, device=dev), torch.zeros(K, device=dev)) if anchor is None else anchor
        A = None if anchor is None else anchor[0]  # (D, K) the penalty's centre
        self.sweep_ = []
        self.val_accuracy_ = self.val_score_ = self.sweep_rows_ = None
        if self.C is not None:
            self.C_ = float(self.C)
            W, b, n_iter = final(Z, yi, sw, self.C_, *(init if init is not None else (W0, b0)))
            if yv is not None:
                self.val_accuracy_, self.val_score_ = self._val_scores(t(Zv) @ W + b, yv)
            self._finish(W, b, n_iter)
            return
        sub = self._sweep_subset(yi)  # None: the sweep runs on every training row
        Zs, ys, sws = (Z, yi, sw) if sub is None else (Z[sub], yi[sub], None if sw is None else sw[sub])
        W, b, n_iter = self._choose(Zs, ys, sws, Zv, yv, t, weights, anchor, progress, of_rows=N)
        del Zs  # the subsample's copy
        if yv is not None and self.refit:  # Kornblith et al.: refit on train + validation at the chosen strength
            yall = np.concatenate([yi, yv])
            sw_all = None if sw is None else np.concatenate([sw, np.ones(len(yv), np.float32)])
            W, b, n_iter = final(Zall, yall, sw_all, self.C_, W, b)
        elif yv is None or sub is not None:  # every training row at C_, from the folds' mean / the subsample's fit
            W, b, n_iter = final(Z, yi, sw, self.C_, W, b)
        self._finish(W, b, n_iter)

    def _choose(self, Zs: np.ndarray, ys: np.ndarray, sws: np.ndarray | None, Zv: np.ndarray, yv: np.ndarray | None,
                t, weights, anchor: tuple[torch.Tensor, torch.Tensor] | None, progress: bool, of_rows: int
                ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The sweep that chooses C on the normalised rows Zs (n, D) of the ``of_rows`` training rows (all of them,
        or the ``sweep_rows`` subsample): scored on the validation rows (Zv, yv), or by k-fold cross-validation of
        Zs when yv is None. Sets ``C_``, ``sweep_``, ``sweep_rows_``, ``val_accuracy_``, ``val_score_``; returns
        the warm start of the final fit at ``C_``: (W, b, iterations) of the sweep's solve there, or the folds'
        mean (W, b, None)."""
        self.sweep_rows_ = len(ys)
        if len(ys) < of_rows:
            log.info("choosing C on a stratified subsample of %d of %d training rows (sweep_rows, seed %d)",
                     len(ys), of_rows, self.seed)
        n_fits = len(self.Cs()) * (1 if yv is not None else self._n_folds(ys))
        t1 = time.perf_counter()
        n_iter = None
        with tqdm(total=n_fits, unit="C", disable=not progress, desc=f"linear C sweep ({len(ys):,} rows)",
                  mininterval=0.5, dynamic_ncols=True) as bar:
            if yv is not None:  # sweep on train, score on the given validation set
                scores, sols = self._sweep(t(Zs), t(ys), weights(ys, sws), t(Zv), yv, anchor=anchor, tick=bar.update)
                best = self._best(self.sweep_)
                self.C_, self.val_score_ = float(self.Cs()[best]), float(scores[best])
                self.val_accuracy_ = self.sweep_[best].get("val_accuracy")
                W, b, n_iter = sols[best]
            else:  # no validation set: choose on seeded stratified k-fold cross-validation of the (sweep's) rows
                W, b = self._cross_validate(Zs, ys, sws, t, weights, anchor, bar.update)  # the folds' mean at C_
        log.info("chose C=%.3g (validation %s %.4f; %d fits on %d rows, %.1f s)", self.C_, self.select_,
                 self.val_score_, n_fits, len(ys), time.perf_counter() - t1)
        return W, b, n_iter

    def _finish(self, W: torch.Tensor, b: torch.Tensor, n_iter: int) -> None:
        self.coef_ = W.T.contiguous().cpu().numpy()  # (K, D)
        self.intercept_ = b.cpu().numpy()  # (K,)
        self.n_iter_ = int(n_iter)

    def _sweep_subset(self, yi: np.ndarray) -> np.ndarray | None:
        """Sorted indices of the ``sweep_rows`` training rows the sweep runs on -- seeded, stratified by class (by
        label for a multi-label Y) -- or None when there are not more training rows than that."""
        if self.sweep_rows is None or len(yi) <= self.sweep_rows:
            return None
        if self.multilabel_:
            return multilabel_holdout(yi, self.sweep_rows / len(yi), self.seed)[1]
        return stratified_subsample(yi, int(self.sweep_rows), self.seed)

    def _n_folds(self, yi: np.ndarray) -> int:
        """The folds of the cross-validation that chooses C on rows of class indices (or label matrix) yi."""
        return min(int(self.folds), len(yi) if self.multilabel_ else int(np.bincount(yi).min()))

    def _cross_validate(self, Z: np.ndarray, yi: np.ndarray, sw: np.ndarray | None, t, weights,
                        anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                        tick: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sweep every C on each fold of a seeded stratified k-fold split; sets ``sweep_`` (mean fold accuracy and
        ``select`` metric per strength), ``C_``, ``val_accuracy_`` and ``val_score_``. Returns the folds' mean
        (W (D, K), b (K,)) at ``C_``, the final fit's warm start. (Not the folds' warm starts: a fold's solution has
        seen the next fold's validation rows, and a few L-BFGS iterations from it keep what it memorised -- measured,
        it moved the chosen C from 1e-4 to 10 on synthetic 40k x 1280.)"""
        from sklearn.model_selection import StratifiedKFold

        if self.multilabel_:  # iteratively stratified folds of the label matrix (multilabel_folds)
            if len(yi) < 2:
                raise ProbeError("choosing C by cross-validation needs >= 2 training rows; pass eval_set or a fixed C")
            folds = multilabel_folds(yi, self._n_folds(yi), self.seed)
        else:
            smallest = int(np.bincount(yi).min())
            if smallest < 2:
                raise ProbeError(f"class {self.classes_[np.bincount(yi).argmin()]!r} has {smallest} training row: "
                                 "choosing C by cross-validation needs >= 2 per class; pass eval_set or a fixed C")
            folds = StratifiedKFold(self._n_folds(yi), shuffle=True, random_state=self.seed).split(Z, yi)
        per_fold, fold_sols = [], []  # each fold's sweep_ ({"C", "val_accuracy", ...} per strength), solutions
        for tr, va in folds:  # (train, validation) row indices
            w_tr, w_va = (None, None) if sw is None else (sw[tr], sw[va])
            _, sols = self._sweep(t(Z[tr]), t(yi[tr]), weights(yi[tr], w_tr), t(Z[va]), yi[va], w_va, anchor, tick)
            per_fold.append(self.sweep_)
            fold_sols.append(sols)
        self.sweep_ = [{"C": r["C"], **{k: float(np.mean([f[i][k] for f in per_fold])) for k in r if k != "C"}}
                       for i, r in enumerate(per_fold[0])]
        best = self._best(self.sweep_)
        self.C_ = float(self.Cs()[best])
        self.val_accuracy_ = self.sweep_[best].get("val_accuracy")
        self.val_score_ = self.sweep_[best][key(self.select_)]
        return tuple(torch.stack([f[best][i] for f in fold_sols]).mean(0) for i in (0, 1))

    def _best(self, sweep: list[dict[str, float]]) -> int:
        """Index of the chosen strength: the best ``select_`` score; ties keep the stronger regularisation, except
        multi-label, where they go to the lowest val binary cross-entropy -- mAP only ranks, so on easy data it ties
        from C=1e-6 on, where every probability is near its class's base rate and no threshold carries over to the
        refit head."""
        scores = np.array([r[key(self.select_)] for r in sweep])
        if not self.multilabel_:
            return int(np.argmax(scores))  # the first maximum
        tied = np.flatnonzero(scores >= scores.max() - 1e-12)
        return int(tied[np.argmin([sweep[i]["val_loss"] for i in tied])])

    def _eval_set(self, eval_set, out: np.ndarray) -> np.ndarray:
        """The validation rows' class indices (M,) -- or the (M, C) label matrix --, their normalised features
        written into ``out`` (M, D)."""
        Xv, yv = eval_set
        Zv = self._transform(Xv, out=out)
        yv = np.asarray(yv)
        if self.multilabel_:
            if yv.ndim != 2 or yv.shape[1] != len(self.classes_):
                raise ProbeError(f"validation labels must be a ({len(Zv)}, {len(self.classes_)}) 0/1 matrix like the "
                                 f"training labels, got shape {yv.shape}")
            return yv.astype(np.float32)
        unknown = np.setdiff1d(yv, self.classes_)
        if len(unknown):
            raise ProbeError(f"validation labels {unknown[:5].tolist()} do not occur in the training labels")
        return np.searchsorted(self.classes_, yv)

    def _sweep(self, Z, y, w, Zv, yv, wv: np.ndarray | None = None,
               anchor: tuple[torch.Tensor, torch.Tensor] | None = None, tick: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor, int]]]:
        """Fit every C of the grid (``sweep_path``): (val ``select`` scores (S,), solutions (W, b, iterations)),
        rows weighted by ``wv`` (M,) when given. Records ``sweep_``: {"C", "val_accuracy"} per strength, and the
        ``select`` metric (``val_mean_per_class``, ``val_macro_f1``) when it is not accuracy; ``tick(n)`` after each
        block of n strengths."""
        path = sweep_path(Z, y, w, self.Cs(), len(self.classes_), self.block, self.max_iter, self.tol, anchor, tick)
        scores, sols = [], []
        self.sweep_ = []
        for C, (W, b, n) in zip(self.Cs(), path):
            acc, sel = self._val_scores(Zv @ W + b, yv, wv)
            row = {"C": float(C), **({} if acc is None else {"val_accuracy": acc}), key(self.select_): sel}
            if self.multilabel_:  # the tie-break of _best: mAP ranks, so it ties while probabilities still flatten
                row["val_loss"] = float(torch.nn.functional.binary_cross_entropy_with_logits(
                    Zv @ W + b, torch.as_tensor(yv, device=Zv.device)))
            self.sweep_.append(row)
            scores.append(sel)
            sols.append((W, b, n))
        return np.array(scores), sols

    def _val_scores(self, logits: torch.Tensor, yv: np.ndarray, wv: np.ndarray | None = None
                    ) -> tuple[float | None, float]:
        """(val accuracy, val ``select_``) of validation logits (M, K); multi-label: (None, map or macro-f1 at the
        F1-optimal val thresholds; the rows' weights are not used there). Weights wv count as repeated rows; a
        fold whose rows all weigh 0 counts them equally (``score``)."""
        K = len(self.classes_)
        if self.multilabel_:
            return None, multilabel_score(self.select_, yv, torch.sigmoid(logits).cpu().numpy())
        pred = logits.argmax(1).cpu().numpy()
        return score("accuracy", yv, pred, K, wv), score(self.select_, yv, pred, K, wv)

    def decision_function(self, X) -> np.ndarray:
        """(N, D) -> (N, K) logits; for two classes (N,) the log-odds of ``classes_[1]`` (scikit-learn's shape)."""
        return self._decision(X)

    def _scores(self, Z: np.ndarray) -> np.ndarray:
        return Z @ self.coef_.T + self.intercept_  # (N, K) logits

    def _ml_logits(self, Z: np.ndarray) -> np.ndarray:
        return np.asarray(self._scores(Z), np.float64)  # (N, K) each class's own logit

    def _proba(self, Z: np.ndarray) -> np.ndarray:
        from .prototype import softmax

        if self.multilabel_:
            from scipy.special import expit

            return expit(self._scores(Z))  # (N, K) independent sigmoids
        return softmax(self._scores(Z))


def multilabel_score(select: str, Y: np.ndarray, P: np.ndarray) -> float:
    """``select`` (map, macro-f1) of probabilities P (M, C) against the 0/1 matrix Y (M, C); higher is better.
    macro-f1 is at each class's F1-optimal threshold on these same rows; map is 0 when no class has a positive."""
    if select == "map":
        m = mean_ap(Y, P)
        return 0.0 if np.isnan(m) else m
    return f1_scores(Y, P, fit_thresholds(Y, P))["macro_f1"]
