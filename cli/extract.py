"""`probe backbones`, `probe extract`, `probe info`, `probe merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .app import app, emit, handles_errors, show_progress


# ---------------------------------------------------------------------------------------------- backbones
@app.command()
@handles_errors
def backbones(
    timm: str | None = typer.Option(None, "--timm", help="Also list timm models matching this pattern, "
                                                             "e.g. 'convnext*' ('*' lists all ~1,300)."),
    offline: bool = typer.Option(False, "--offline", help="Only backbones whose weights are available now."),
    layers: str | None = typer.Option(None, "--layers", help="List the intermediate layers of this backbone that "
                                                             "`probe extract --layer` takes: index, name, channels."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List backbone names with embedding dim, input size and whether their weights are available offline."""
    from probe.backbones import describe_layers, list_backbones

    if layers:
        emit(describe_layers(layers), as_json, lambda rows: "\n".join(
            [f"{'index':>5} {'name':34} {'channels':>8}"]
            + [f"{r['index']:>5} {r['name']:34} {r['channels']:>8}" for r in rows]
            + [f"extract one with `probe extract DATA --backbone {layers} --layer NAME|INDEX` (-1 = deepest; "
               "A+B concatenates); without --layer: the backbone's embedding"]))
        return
    rows = [r for r in list_backbones(timm) if r["offline"] or not offline]

    def text(rows):
        lines = [f"{'name':34} {'family':11} {'dim':>5} {'input':>5}  offline"]
        lines += [f"{r['name']:34} {r['family']:11} {r['dim'] or '?':>5} {r['input_size'] or '?':>5}  "
                  f"{'yes' if r['offline'] else 'no (needs download)'}" for r in rows]
        if not timm:
            lines.append("… and every timm model as timm/<name>: list them with --timm PATTERN")
        return "\n".join(lines)

    emit(rows, as_json, text)


# ------------------------------------------------------------------------------------------------ extract
def _extract_text(s: dict) -> str:  # ExtractSummary.to_dict()
    lines = [f"skipped {x['path']}: {x['reason']}" for x in s["skipped"]]
    rate = f", {s['images_per_s']} img/s" if s["images_per_s"] else ""
    views = f" + {s['views']} augmented views each" if s["views"] else ""
    at = f" at {s['layer']}" if s.get("layer") else ""
    lines.append(
        f"{s['store']}: {s['count']} images x {s['dim']}{views} ({s['backbone']}{at}, {s['dtype']} on {s['device']}, "
        f"{s['engine']}); "
        f"embedded {s['embedded']} new, reused {s['reused']}, skipped {len(s['skipped'])}"
        + (f", {s['stale']} stale kept" if s["stale"] else "") + f" in {s['seconds']:.1f}s{rate}"
    )
    return "\n".join(lines)


@app.command()
@handles_errors
def extract(
    data: str = typer.Argument(..., help="ImageFolder, split root (train/ val/ test/), flat folder, CSV manifest "
                                         "(path,label[,split]), WebDataset shards ('shards/{000000..000099}.tar'), "
                                         "Parquet files, a saved Hugging Face dataset, or any of these at an fsspec "
                                         "URL (s3://, gs://, file://)."),
    backbone: str | None = typer.Option(
        None, "--backbone", "-b",
        help="Backbone name (probe backbones); default efficientnet_lite0, or the one a probe checkpoint names."),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Weights tag (IMAGENET1K_V1), 'random', "
                                                                         "or a local checkpoint path."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Store file (default: cache/<data>-<hash>."
                                                                  "<backbone>.<config>.h5)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(
        -1, "--workers", help="Decode processes (-1: one per core, at most 8)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on CUDA, float32 on the CPU), float32, "
                                                       "bfloat16 or float16."),
    tta: str = typer.Option("none", "--tta", help="none or hflip (mean of image and mirror)."),
    pixels: str = typer.Option("uint8", "--pixels", help="uint8: resize/crop on uint8 tensors (fast); pil: the "
                                                           "weights' own Pillow transform, exactly."),
    layout: str = typer.Option("auto", "--layout", help="auto, imagefolder, splits, flat, csv, webdataset, parquet "
                                                         "or hf."),
    image_column: str | None = typer.Option(None, "--image-column", help="Parquet / Hugging Face dataset: the "
                                                                         "column of image bytes (default: 'image' "
                                                                         "or the only one)."),
    label_column: str | None = typer.Option(None, "--label-column", help="Parquet / Hugging Face dataset: the label "
                                                                         "column; WebDataset: the key of the json "
                                                                         "member (default: label)."),
    prune: bool = typer.Option(False, "--prune", help="Drop stored rows whose files are gone from DATA."),
    shard: str | None = typer.Option(None, "--shard", help="I/N: embed only shard I of N into STORE.shard-I-of-N.h5 "
                                                           "(under torchrun: the rank's shard, automatically)."),
    views: int = typer.Option(0, "--views", min=0, help="Also embed K seeded augmented views per image "
                                                        "(RandomResizedCrop + flip) into /views, for `fit-head "
                                                        "--head mlp`; --tta applies to the centre features only."),
    decode: str = typer.Option("auto", "--decode", help="auto (gpu on CUDA with --pixels uint8 and no --views), cpu "
                                                          "or gpu: JPEGs decoded by nvjpeg and resized on the GPU, "
                                                          "other files on the CPU."),
    engine: str = typer.Option("auto", "--engine", help="auto (ONNX Runtime for float32 on the CPU, else torch), "
                                                         "torch or onnxruntime."),
    layer: str | None = typer.Option(None, "--layer", help="Intermediate layer(s) instead of the pre-logits "
                                                           "embedding, average-pooled: a name or index from `probe "
                                                           "backbones --layers NAME` (-1 = deepest), or several "
                                                           "joined by '+' (concatenated). Not for clip/ backbones."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", min=1, help="Skip an image whose file, or its "
                                                                            "resize, would hold more pixels "
                                                                            "(default: Pillow's bomb limit)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Embed every image of DATA once and cache the features in an HDF5 store (resumable, incremental)."""
    from probe.extract import ExtractConfig
    from probe.extract import extract as run

    cfg = ExtractConfig(backbone=backbone, weights=weights, batch_size=batch_size, workers=workers, device=device,
                        dtype=dtype, tta=tta, pixels=pixels, layout=layout, image_column=image_column,
                        label_column=label_column, prune=prune, shard=shard,
                        views=views, engine=engine, decode=decode, layer=layer,
                        max_pixels=max_pixels)
    summary = run(data, out, cfg, progress=show_progress(as_json))
    emit(summary.to_dict(), as_json, _extract_text)


@app.command()
@handles_errors
def info(
    store: Path = typer.Argument(..., help="Feature store (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe a feature store: size, backbone, preprocessing, classes, splits and skipped files."""
    from probe.store import FeatureStore

    fs = FeatureStore(store)
    s = {**fs.info(), "layer": fs.attrs.get("layer")}  # None: the pre-logits embedding

    def text(s):
        pre = s["preprocess"] or {}
        lines = [
            f"store      {s['path']}",
            f"images     {s['count']} x {s['dim']} float32 ({s['unlabelled']} unlabelled)",
            *([f"views      {s['views']} per image: {s['views_augment']}"] if s["views"] else []),
            f"backbone   {s['backbone']}  weights {s['weights']}  sha256 {str(s['weights_sha256'])[:16]}…",
            f"preprocess {pre.get('repr', pre)}",
            f"tta {s['tta']}  dtype {s['dtype']}  pooling {s['pooling']}"
            + (f" of {s['layer']}" if s["layer"] else "") + f"  key {str(s['config_key'])[:12]}",
            *([f"engine     {s['engine'].get('engine')} {s['engine'].get('version')}"] if s.get("engine") else []),
            f"root       {s['root']} ({s['layout']})",
            "splits     " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
            *([f"labels     multi-label, {len(s['classes'])} classes, mean {s['labels_per_image']} labels/image"]
              if s.get("multilabel") else []),
            f"classes    {len(s['classes'])}: " + ", ".join(f"{c} ({n})" for c, n in s["class_counts"].items()),
            *([f"device     {s['device']}"] if s.get("device") else []),
            *([f"made with  {_settings(s['extract_config'])}"] if s.get("extract_config") else []),
            *([f"versions   {_settings(s['versions'])}"] if s.get("versions") else []),
            f"created    {s['created']}  updated {s['updated']}  schema {s['schema_version']}",
            f"skipped    {len(s['skipped'])}",
            "checksums  " + ("verified on every read (Fletcher-32 per chunk, crc32 of strings and attributes)"
                             if s["checksummed"] else "none: written before probe checksummed stores (the next "
                             "extract into it adds them)"),
        ]
        lines += [f"  {x['path']}: {x['reason']}" for x in s["skipped"]]
        return "\n".join(lines)

    emit(s, as_json, text)


def _settings(d: dict[str, Any]) -> str:
    """A recorded dict -> ``k=v k=v`` on one line, unset (None) values left out."""
    return " ".join(f"{k}={v}" for k, v in d.items() if v is not None)


@app.command()
@handles_errors
def merge(
    shards: list[Path] = typer.Argument(..., help="Shard stores (STORE.shard-I-of-N.h5) of one extraction."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged store to write."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Merge even if some shard indices are absent."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Merge the shard stores of a sharded extraction into one store (every row exactly once)."""
    from probe.shard import merge as run

    s = run(shards, out, allow_missing)
    emit(s, as_json, lambda s: f"{s['store']}: {s['count']} images x {s['dim']} from {s['shards']} shards, "
                               f"{len(s['classes'])} classes, {s['skipped']} skipped files recorded")
