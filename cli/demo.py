"""`probe demo`: the whole pipeline on the packaged demo set, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, emit, handles_errors, show_progress


def _text(r: dict) -> str:
    ex, head, idx, se = r["extract"], r["head"], r["index"], r["search"]
    lines = [
        f"extract  {ex['count']} real Fashion-MNIST images -> {ex['store']} ({ex['backbone']}, {ex['dim']}-d, "
        f"{ex['dtype']} on {ex['device']}; {ex['embedded']} embedded, {ex['reused']} reused, {ex['seconds']:.1f}s)",
        f"head     linear probe: 25 L2 strengths fit on {head['n_train']} train images, "
        f"C={head['C']:.3g} chosen on val, refit on train+val, {head['fit_seconds']:.2f}s -> {head['path']}",
        f"         validation accuracy {head['val_accuracy']:.1%} on {head['n_val']} held-out images (10 classes)",
        f"search   {idx['type']} index of {idx['count']} images -> {idx['index']}",
        f"         precision@{se['k']} {se['precision_at_5']:.1%}: share of each val image's {se['k']} nearest "
        f"neighbours with its class ({se['queries']} queries)",
        f"         e.g. {se['example']['query']} ({se['example']['label']}) -> "
        + ", ".join(h["label"] for h in se["example"]["hits"]),
    ]
    return "\n".join(lines)


@app.command()
@handles_errors
def demo(
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone to extract with."),
    out_dir: Path | None = typer.Option(None, "--out-dir", help="Where the store, head and index go (cache/)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Extract + fit a linear head + search on 400 real Fashion-MNIST images shipped with probe, offline."""
    from probe.demo import run_demo

    emit(run_demo(backbone, out_dir, progress=show_progress(as_json)), as_json, _text)
