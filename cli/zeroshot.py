"""`probe zeroshot`: a head from a CLIP store's text tower (class prompts), saved like any fitted head."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, emit, handles_errors, refuse_overwriting_inputs
from .heads import _pct


def _text(r: dict) -> str:
    lines = [f"zero-shot head on {r['store']}: {len(r['classes'])} classes x {r['n_templates']} templates "
             f"({r['templates']}) = {r['n_prompts']} prompts through the {r['backbone']} text tower, temperature "
             f"{r['temperature']:.4g} (1 / logit scale {r['logit_scale']:.4g})",
             "prompts like: " + " | ".join(r["example_prompts"])]
    if r["accuracy"]:
        lines.append("accuracy  " + "  ".join(f"{s} {_pct(m['accuracy'])} (top-{m['top5_k']} {_pct(m['top5'])}, "
                                              f"n={m['n']})" for s, m in r["accuracy"].items()))
    elif r["accuracy_note"]:
        lines.append(f"no accuracy: {r['accuracy_note']}")
    lin = r["linear"]
    if lin:
        a, C = lin["accuracy"], lin["C"]
        lines.append(f"on {lin['scored_on']} ({lin['n_scored']} images; probes on {lin['n_train']} train images, "
                     f"C by {lin['C_chosen_on']}): zero-shot {_pct(a['zeroshot'])}  linear probe {_pct(a['linear'])} "
                     f"(C={C['linear']:.3g})  zero-shot-anchored probe {_pct(a['anchored'])} (C={C['anchored']:.3g})")
        if lin["out"]:
            lines.append(f"wrote the anchored linear head to {lin['out']}")
    if r["out"]:
        lines.append(f"wrote {r['out']}")
    return "\n".join(lines)


@app.command()
@handles_errors
def zeroshot(
    store: Path = typer.Argument(..., help="Feature store (.h5) extracted with a clip/<model>:<pretrained> backbone."),
    classes_from_store: bool = typer.Option(False, "--classes-from-store",
                                            help="The store's class names (underscores become spaces in prompts)."),
    classes: str | None = typer.Option(None, "--classes", help="Comma-separated class names, used as written."),
    classes_file: Path | None = typer.Option(None, "--classes-file", help="Class names, one per line."),
    templates: str = typer.Option("imagenet", "--templates", help="imagenet (CLIP's 80 prompts), simple (7), or a "
                                                                  "file with one template per line holding {}."),
    out: Path = typer.Option(..., "--out", "-o", help="Head file to write (.safetensors)."),
    linear: bool = typer.Option(False, "--linear", help="Also compare the plain linear probe and the probe anchored "
                                                        "at the zero-shot weights on the store's labels."),
    linear_out: Path | None = typer.Option(None, "--linear-out", help="Write the anchored linear head here "
                                                                      "(implies --linear)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the holdout and the probes' cross-validation."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """A zero-shot head from a CLIP store's text tower: class-name prompts, saved like any fitted head.

    Text prototypes of the class names through CLIP's prompt templates, saved as a prototype head that predict,
    eval and serve use like any other; with --linear, zero-shot vs linear probe vs zero-shot-anchored probe."""
    from probe.errors import ProbeError
    from probe.zeroshot import zeroshot as run

    given = [f for f, v in (("--classes-from-store", classes_from_store), ("--classes", classes),
                            ("--classes-file", classes_file)) if v]
    if len(given) != 1:
        raise ProbeError("give the class names one way: --classes-from-store, --classes a,b,c or --classes-file F"
                         + (f" (got {' and '.join(given)})" if given else ""))
    refuse_overwriting_inputs([out, linear_out], [store, classes_file, templates])
    names = None if classes_from_store else classes_file if classes_file else classes.split(",")
    emit(run(store, names, templates, out, device=device, linear=linear, linear_out=linear_out,
             seed=seed).to_dict(), as_json, _text)
