"""`probe map`: a 2-D map (UMAP or PCA) of a store's features as one self-contained, interactive HTML page."""

from __future__ import annotations

from pathlib import Path

import typer

from probe.fs import human

from .app import app, emit, handles_errors, refuse_overwriting_inputs, show_progress


def _text(r: dict) -> str:
    title = "prediction (out-of-fold)" if r["color"] == "prediction" else r["color"]
    shown = f"{r['rows']}" if r["rows"] == r["store_rows"] else f"{r['rows']} of {r['store_rows']}"
    lines = [f"map      {shown} rows of {r['store']}: {r['method']} (seed {r['seed']}), {r['seconds']:.1f}s "
             f"({r['projection_seconds']:.1f}s projecting)",
             f"colour   {title}: " + ", ".join(f"{c} {n}" for c, n in r["legend"].items())]
    if r["accuracy"] is not None:
        lines.append(f"         out-of-fold accuracy {100 * r['accuracy']:.1f}%, {r['wrong']} wrong (outlined)")
    lines += [f"         {n}" for n in r["notes"]]
    lines.append(f"wrote    {r['out']} ({human(r['bytes'])}, {r['thumbnails']} thumbnails embedded): "
                 "open it in a browser")
    return "\n".join(lines)


@app.command("map")
@handles_errors
def map_(
    store: Path = typer.Argument(..., help="Feature store (.h5) made by `probe extract`."),
    out: Path = typer.Option(Path("map.html"), "--out", "-o", help="The HTML page to write."),
    color: str = typer.Option("label", "--color", help="Colour by: label, split, prediction (out-of-fold linear "
                              "head) or issue (what `probe doctor` flags)."),
    method: str = typer.Option("auto", "--method", help="auto (UMAP when umap-learn is installed, else PCA), "
                               "umap or pca."),
    seed: int = typer.Option(0, "--seed", help="Seed of the projection, the folds and the thumbnail sample."),
    thumbs: int = typer.Option(2000, "--thumbs", help="Embed thumbnails of at most this many rows (a seeded sample); "
                               "the others' tooltips load the image file."),
    max_points: int = typer.Option(100_000, "--max-points", help="Draw at most this many rows: above it a seeded "
                                   "sample stratified by the colour (0: every row; UMAP of 1M rows takes an hour)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write an interactive 2-D map of a store: zoom, pan, hover for the image, click the legend to filter."""
    from probe.embedding_map import embedding_map
    from probe.store import FeatureStore

    opened = FeatureStore(store)  # read once: the check and the map
    refuse_overwriting_inputs([out], [store, opened.attrs.get("root")], text=True)  # it embeds the store's images
    result = embedding_map(opened, color=color, method=method, seed=seed, out=out, thumbs=thumbs,
                           max_points=max_points, progress=show_progress(as_json)).to_dict()
    emit(result, as_json, _text)
