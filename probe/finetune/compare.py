"""`probe compare`: fine-tuning strategies under one budget, next to the cached-feature linear probe.

RUN_DIR/<strategy>/ holds each run; RUN_DIR/linear-probe/features.h5 the cached features;
compare.json, compare.md (table) and compare.png (val accuracy per epoch) sit in RUN_DIR.

Example:
    >>> r = compare("probe/demo/fashion-mnist", "runs/cmp", ["feature-extract", "differential"],
    ...             FinetuneConfig(epochs=5))
    >>> [(row["strategy"], row["best_val_acc"]) for row in r["rows"]]
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import discover
from ..errors import ProbeError
from ..fs import atomic_paths, make_dirs, write_bytes_atomic
from .config import STRATEGIES, FinetuneConfig
from .data import train_val_indices
from .plots import plot_compare
from .train import finetune

log = logging.getLogger(__name__)

LINEAR_PROBE = "linear-probe"


def parse_strategies(text: str | list[str]) -> list[str]:
    """'feature-extract,differential' -> the list, checked; 'all' -> every strategy."""
    items = text if isinstance(text, list) else [s.strip() for s in text.split(",") if s.strip()]
    if items == ["all"]:
        return list(STRATEGIES)
    bad = [s for s in items if s not in STRATEGIES]
    if bad or not items:
        raise ProbeError(f"unknown strategies {bad or text!r}: expected a comma-separated list of "
                         f"{', '.join(STRATEGIES)}, or 'all'")
    return list(dict.fromkeys(items))


def linear_probe(data: str | os.PathLike, run_dir: str | os.PathLike, cfg: FinetuneConfig) -> dict[str, Any]:
    """What probe adds: extract once with the frozen backbone, then logistic regression on the cached features,
    scored on the same validation images as the fine-tuning runs."""
    from ..extract import ExtractConfig, extract
    from ..store import FeatureStore

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    summary = extract(data, run_dir / "features.h5", ExtractConfig(
        backbone=cfg.backbone, weights=cfg.weights, workers=cfg.workers, device=cfg.device, dtype="float32",
        layout=cfg.layout))
    store = FeatureStore(summary["store"])
    ds = discover(data, cfg.layout)
    ds.require_files("probe compare")
    train_idx, val_idx, source = train_val_indices(ds, cfg.val_fraction, cfg.seed)
    row_of = {p: i for i, p in enumerate(store.paths().tolist())}  # skipped images have no row
    tr = np.array([row_of[ds.paths[i]] for i in train_idx if ds.paths[i] in row_of], dtype=np.int64)
    va = np.array([row_of[ds.paths[i]] for i in val_idx if ds.paths[i] in row_of], dtype=np.int64)
    X, y = store.features(), store.labels()
    try:
        from ..heads import LinearHead  # probe's own, as `probe fit-head` runs it: val picks the L2 strength

        # refit=False: trained on train only, like the fine-tuned heads (its default refits on train + val)
        head = LinearHead(seed=cfg.seed, device=cfg.device, refit=False).fit(X[tr], y[tr], eval_set=(X[va], y[va]))
        how = "probe.heads.LinearHead (L2 strength chosen on val, as the runs' best epoch is)"
    except ImportError:  # pragma: no cover - heads not installed alongside
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[tr], y[tr])  # default C
        how = "sklearn LogisticRegression on standardised features"
    acc = float((head.predict(X[va]) == y[va]).mean())
    seconds = time.perf_counter() - t0
    k = len(np.unique(y[tr]))
    out = {"strategy": LINEAR_PROBE, "best_val_acc": acc, "seconds": round(seconds, 3),
           "trainable_params": summary["dim"] * k + k, "val_acc_per_epoch": [], "best_epoch": None,
           "run_dir": str(run_dir), "method": how, "val_source": source, "extract_seconds": summary["seconds"]}
    write_bytes_atomic(run_dir / "result.json", json.dumps(out, indent=2).encode())
    return out


def compare(data: str | os.PathLike, run_dir: str | os.PathLike, strategies: str | list[str],
            config: FinetuneConfig | None = None, with_linear_probe: bool = True, progress: bool = False
            ) -> dict[str, Any]:
    """Run every strategy with the same epochs, batch size, lr and seed, plus (``with_linear_probe``) the
    cached-feature linear probe as the first row; write compare.json/.md/.png."""
    cfg = config or FinetuneConfig()
    names = ([LINEAR_PROBE] if with_linear_probe else []) + parse_strategies(strategies)
    run_dir = Path(run_dir)
    make_dirs(run_dir)
    rows = []
    for name in names:
        log.info("compare: %s", name)
        if name == LINEAR_PROBE:
            if cfg.in_chans != 3:
                log.warning("linear probe skipped: probe extract reads RGB images, --in-chans is %d", cfg.in_chans)
                continue
            rows.append(linear_probe(data, run_dir / LINEAR_PROBE, cfg))
            continue
        s = finetune(data, run_dir / name, replace(cfg, strategy=name), progress=progress)
        rows.append({"strategy": name, "best_val_acc": s["best_val_acc"], "seconds": s["seconds"],
                     "trainable_params": s["trainable_params"], "val_acc_per_epoch": s["val_acc"],
                     "best_epoch": s["best_epoch"], "run_dir": s["run_dir"], "best": s["best"],
                     "val_source": s["val_source"]})
    result = {"data": str(data), "backbone": cfg.backbone, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "lr": cfg.lr, "lr_mult": cfg.lr_mult, "seed": cfg.seed, "rows": rows,
              "json": str(run_dir / "compare.json"), "table": str(run_dir / "compare.md"),
              "plot": str(run_dir / "compare.png")}
    out = [run_dir / "compare.json", run_dir / "compare.md", run_dir / "compare.png"]
    with atomic_paths(out, what="the runs' own folders are kept; any previous comparison is unchanged") as tmps:
        tmps[0].write_text(json.dumps(result, indent=2))
        tmps[1].write_text(table(result) + "\n")
        plot_compare(rows, tmps[2], title=f"{cfg.backbone}, {cfg.epochs} epochs")
    return result


def table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    lines = [f"{result['backbone']}, {result['epochs']} epochs, batch {result['batch_size']}, lr {result['lr']}",
             "", "| strategy | best val acc | best epoch | wall s | trainable params |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {r['best_val_acc']:.3f} | {r['best_epoch'] or '-'} | {r['seconds']:.1f} "
                     f"| {r['trainable_params']:,} |")
    return "\n".join(lines)
