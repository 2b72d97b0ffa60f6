"""`probe finetune` and `probe compare`: full-network transfer learning strategies."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from .app import app, emit, handles_errors, show_progress

_DATA_HELP = "ImageFolder, split root (train/ val/ test/) or CSV manifest (path,label[,split]); val/ validates."


def _options():
    """The options `finetune` and `compare` share, one per FinetuneConfig field."""
    return dict(
        backbone=typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone name (probe backbones)."),
        weights=typer.Option(None, "--weights", "-w", help="Start weights: tag, 'random' or a checkpoint path "
                                                           "(default: the backbone's pretrained weights)."),
        epochs=typer.Option(10, "--epochs", min=1, help="Epochs at most (early stopping may end sooner)."),
        batch_size=typer.Option(32, "--batch-size", min=1),
        lr=typer.Option(1e-3, "--lr", help="Peak lr of the head and the top backbone group."),
        lr_mult=typer.Option(10.0, "--lr-mult", help="differential/gradual: first group trains at lr / lr-mult."),
        unfreeze_every=typer.Option(1, "--unfreeze-every", min=1, help="gradual: thaw one group every N epochs."),
        optimizer=typer.Option("adamw", "--optimizer", help="adamw or sgd."),
        weight_decay=typer.Option(0.05, "--weight-decay", help="Not applied to norms, biases and tokens."),
        warmup_epochs=typer.Option(1.0, "--warmup-epochs", help="Linear warm-up, then cosine."),
        label_smoothing=typer.Option(0.1, "--label-smoothing"),
        augment=typer.Option("seeds", "--augment", help="seeds (RandomResizedCrop+flip+ColorJitter), "
                                                        "randaugment or none."),
        grad_clip=typer.Option(1.0, "--grad-clip", help="Max gradient norm; 0 turns clipping off."),
        patience=typer.Option(5, "--patience", help="Early stop after N epochs without a better val accuracy; "
                                                    "0: never."),
        val_fraction=typer.Option(0.2, "--val-fraction", help="Holdout of train when DATA has no val split."),
        in_chans=typer.Option(3, "--in-chans", min=1, help="Input channels (.tif/.npy arrays when not 3); the "
                                                           "first convolution is adapted from its RGB weights."),
        amp=typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
        channels_last=typer.Option(True, "--channels-last/--no-channels-last", help="NHWC on CUDA."),
        device=typer.Option("auto", "--device", help="auto, cpu or cuda."),
        workers=typer.Option(-1, "--workers", help="Decode processes (-1: one per core, at most 8)."),
        seed=typer.Option(0, "--seed"),
        resume=typer.Option(False, "--resume", help="Continue RUN_DIR/last.pt after a crash or Ctrl-C."),
        layout=typer.Option("auto", "--layout", help="auto, imagefolder, splits or csv."),
    )


def config_options(fn):
    """Give ``fn(…, **config)`` one typer option per shared FinetuneConfig field (written once, above); typer reads
    the signature, the values arrive in ``config``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD and p.name != "as_json"]
    shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=opt, annotation=_TYPES[name])
              for name, opt in _options().items()]
    fn.__signature__ = sig.replace(parameters=own + shared + [sig.parameters["as_json"]])
    return fn


_TYPES = {"backbone": str, "weights": Optional[str], "epochs": int, "batch_size": int, "lr": float,  # noqa: UP045
          "lr_mult": float, "unfreeze_every": int, "optimizer": str, "weight_decay": float, "warmup_epochs": float,
          "label_smoothing": float, "augment": str, "grad_clip": float, "patience": int, "val_fraction": float,
          "in_chans": int, "amp": bool, "channels_last": bool, "device": str, "workers": int, "seed": int,
          "resume": bool, "layout": str}


def _config(**kw):
    from probe.finetune import FinetuneConfig

    return FinetuneConfig(**kw)


def _finetune_text(s: dict) -> str:
    lines = [f"skipped {p}" for p in s["skipped"]]
    lines += [
        f"{s['strategy']} fine-tuning of {s['backbone']} on {s['train_images']} images ({s['val_images']} val, "
        f"{s['val_source']}), layer groups: {', '.join(s['layer_groups'])}",
        f"best val accuracy {s['best_val_acc']:.4f} at epoch {s['best_epoch']} of {s['epochs_run']}"
        + (" (stopped early)" if s["stopped_early"] else "")
        + f"; {s['trainable_params']:,} of {s['total_params']:,} parameters trainable; {s['seconds']:.1f}s on "
        f"{s['device']}" + (f" x {s['world_size']} processes" if s.get("world_size", 1) > 1 else "")
        + (f", {s['train_images_per_s']} img/s" if s["train_images_per_s"] else ""),
        f"best checkpoint {s['best']}  (probe extract DATA --weights {s['best']})",
        f"metrics {s['metrics']}, curves {s['curves']}",
    ]
    return "\n".join(lines)


@app.command()
@handles_errors
@config_options
def finetune(
    data: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="RUN_DIR: last.pt, best.pt, metrics.jsonl, curves.png."),
    strategy: str = typer.Option("differential", "--strategy", "-s",
                                 help="feature-extract, full, differential or gradual."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    **config,
) -> None:
    """Fine-tune a backbone with a new head; the best checkpoint is a --weights for probe extract.

    Data-parallel on N GPUs (or CPU processes): torchrun --nproc-per-node N -m probe finetune DATA --out RUN …"""
    from probe.finetune import finetune as run
    from probe.finetune.dist import is_main_process

    summary = run(data, out, _config(strategy=strategy, **config), progress=show_progress(as_json))
    if is_main_process():  # under torchrun: one summary, not one per rank
        emit(summary, as_json, _finetune_text)


@app.command()
@handles_errors
@config_options
def compare(
    data: Path = typer.Argument(..., help=_DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="RUN_DIR: one folder per strategy, compare.json/.md/.png."),
    strategies: str = typer.Option("all", "--strategies", help="Comma-separated: feature-extract, full, "
                                                               "differential, gradual; or all."),
    linear_probe: bool = typer.Option(True, "--linear-probe/--no-linear-probe",
                                      help="Add the cached-feature linear probe (extract + logistic regression)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    **config,
) -> None:
    """Run fine-tuning strategies under one budget next to the linear probe: a table and one accuracy plot."""
    from probe.finetune import compare as run
    from probe.finetune.compare import parse_strategies, table

    names = parse_strategies(strategies)  # a typo fails before anything trains
    result = run(data, out, names, _config(**config), with_linear_probe=linear_probe,
                 progress=show_progress(as_json))
    emit(result, as_json, lambda r: table(r) + f"\n\nwrote {r['json']}, {r['table']}, {r['plot']}")
