"""`probe sweep`: which backbone (and layer) for this data -- extract each once, probe each the same way, rank."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, emit, handles_errors, refuse_overwriting_inputs, show_progress


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@app.command("sweep")
@handles_errors
def sweep(
    data: Path = typer.Argument(..., help="Labelled image folder (train/val/test or class folders) or CSV manifest."),
    backbones: str = typer.Option(..., "--backbones", "-b", help="Comma-separated backbone names, e.g. "
                                  "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2."),
    layers: str | None = typer.Option(None, "--layers", help="all: every layer of one backbone (accuracy by "
                                      "depth); or comma-separated layer names/indices (A+B concatenates). "
                                      "Default: the penultimate layer."),
    heads: str = typer.Option("linear,knn", "--heads", help="Comma-separated heads fit on every store."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write sweep.json, sweep.md and sweep.png here."),
    max_images: int | None = typer.Option(None, "--max-images", help="At most N images per class in each split "
                                          "(seeded): a quick first pass, in stores of its own."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsample, the holdout, the heads and the bootstrap."),
    rank_only: bool = typer.Option(False, "--rank-only", help="LogME only: skip the heads."),
    weights: str | None = typer.Option(None, "--weights", help="Weights for every backbone, e.g. random."),
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Stores go to CACHE_DIR/sweep/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(-1, "--workers", help="Decode processes (-1: one per core, at most 8)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Which backbone (or layer) for this data: extract each once, fit the same heads on each, rank them.

    Extract DATA with each backbone once (stores reused), fit the same heads on each, score LogME, and print
    the table: accuracy with 95% intervals, img/s, dim, parameters, LogME and its rank correlation with accuracy."""
    from probe.sweep import describe
    from probe.sweep import sweep as run

    if out:
        refuse_overwriting_inputs([out / f"sweep.{ext}" for ext in ("json", "md", "png")], [data])
    result = run(data, _split(backbones), layers=_split(layers) or None, heads=_split(heads), out_dir=out,
                 cache_dir=cache_dir, max_images=max_images, seed=seed, rank_only=rank_only, weights=weights,
                 device=device, batch_size=batch_size, workers=workers, progress=show_progress(as_json))
    emit(result.to_dict() if as_json else result, as_json,
         lambda r: describe(r).rstrip() + "".join(f"\n{k}: {v}" for k, v in r.files.items()))
