"""Training curves of one run and the validation-accuracy comparison of several (matplotlib, no display)."""

from __future__ import annotations

import os
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on servers without a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss (left) and accuracy (right) per epoch, train and val."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((a, "loss", "loss"), (b, "acc", "accuracy")):
        ax.plot(ep, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(ep, [r[f"val_{key}"] for r in history], "s-", label="val")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    b.set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format="png")  # PNG whatever its name (the caller may pass a temp file)
    finally:
        plt.close(fig)


def plot_compare(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Val accuracy per epoch for each strategy; rows without epochs (the linear probe) as a dashed line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.get("val_acc_per_epoch"):
            acc = r["val_acc_per_epoch"]
            ax.plot(range(1, len(acc) + 1), acc, "o-", label=f"{r['strategy']} ({r['best_val_acc']:.3f})")
        elif r.get("best_val_acc") is not None:
            ax.axhline(r["best_val_acc"], ls="--", color="k", label=f"{r['strategy']} ({r['best_val_acc']:.3f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)
