"""`probe fit-head`, `predict`, `eval`, `fewshot`: heads on cached features."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from .app import app, emit, handles_errors, refuse_overwriting_inputs, show_progress


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return f"{'-':>6}" if x is None else f"{x:6.3f}"


def _ci(m: dict, name: str) -> str:
    """" [76.1, 83.9]": the bootstrap interval of metric ``name`` in points, when the report has one."""
    lo_hi = m.get("ci95", {}).get(name)
    return f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]" if lo_hi else ""


def _metrics_line(name: str, m: dict) -> str:
    boot = m.get("bootstrap")
    return (f"{name:5} accuracy {_pct(m['accuracy'])}{_ci(m, 'accuracy')}  top-{m['top5_k']} {_pct(m['top5'])}  "
            f"balanced {_pct(m['balanced_accuracy'])}{_ci(m, 'balanced_accuracy')}  (n={m['n']}"
            + (f"; 95% bootstrap intervals, {boot['resamples']} resamples, seed {boot['seed']})" if boot else ")"))


def _multilabel_line(name: str, m: dict) -> str:
    boot = m.get("bootstrap")
    return (f"{name:5} mAP {_pct(m['mAP'])}{_ci(m, 'map')}  mAP VOC07 {_pct(m['mAP_voc07'])}  micro-F1 "
            f"{_pct(m['micro_f1'])}  macro-F1 {_pct(m['macro_f1'])}  (n={m['images']}"
            + (f"; 95% bootstrap interval, {boot['resamples']} resamples, seed {boot['seed']})" if boot else ")"))


# ---------------------------------------------------------------------------------------------- fit-head
def _fit_text(s: dict) -> str:
    lines = [f"{s['head']} head on {s['store']}: {s['n_train']} train images, {len(s['classes'])} classes, "
             f"{s['dim']}-d {s['backbone']} features, norm {s['norm']}"
             + (f", {s['shots']} shots/class (seed {s['seed']})" if s["shots"] else "")]
    if s.get("multilabel"):
        lines[0] += " (multi-label: one-vs-rest, sigmoid per class)"
    if s["head"] == "linear":
        if s["sweep"]:
            from probe.heads.scoring import key

            sel, grid = s["select"], f", {s['grid']} grid" if s["grid"] != "default" else ""
            also = f", accuracy {_pct(s['val_accuracy'])}" if sel != "accuracy" and s["val_accuracy"] is not None \
                else ""
            lines.append(f"L2 sweep{grid} (C: val {sel}): " + "  ".join(
                f"{r['C']:.0e}:{100 * r[key(sel)]:.1f}" for r in s["sweep"]))
            lines.append(f"chose C={s['C']:.3g} (val {sel} {_pct(s['val_score'])}{also} on {s['n_val']} images), "
                         f"refit on {s['refit_on']}")
            if s["sweep_rows"] < s["n_train"]:
                lines.append(f"C chosen on {s['sweep_rows']:,} of {s['n_train']:,} training rows (--sweep-rows); "
                             "the final fit used all of them")
        else:
            lines.append(f"C={s['C']:.3g}" + (f", val accuracy {_pct(s['val_accuracy'])}" if s["val_accuracy"]
                                                is not None else ""))
    if s["head"] == "mlp":
        watched = "val loss" if s["select"] == "loss" else f"val {s['select']} {_pct(s['val_score'])}"
        lines.append(f"early stopping on {watched}: best epoch {s['best_epoch']} of {s['epochs_run']}"
                     + (f"; trained on centre crops + {s['views']} augmented views per image" if s["views"] else ""))
    if s.get("multilabel"):
        t = s["thresholds"]
        lines.append(f"train mAP {_pct(s['train_map'])}")
        lines.append(f"thresholds (F1-optimal per class) fit on {t['fit_on'] or '- (no val rows: 0.5)'}: "
                     + "  ".join(f"{n}:{v:.3f}" for n, v in list(t["values"].items())[:20])
                     + ("  …" if len(t["values"]) > 20 else ""))
        if s.get("calibration"):
            c = s["calibration"]
            lines.append(f"per-class Platt scaling fit on {c['fit_on']} ({c['n']} images): mean per-class ECE "
                         f"{c['val_before']['ece']:.3f} -> {c['val_after']['ece']:.3f}, NLL "
                         f"{c['val_before']['nll']:.3f} -> {c['val_after']['nll']:.3f}, Brier "
                         f"{c['val_before']['brier']:.3f} -> {c['val_after']['brier']:.3f}")
        lines.append(s["calibration_note"] + "; no unknown rejection")
        for name in ("val", "test"):
            if s.get(name):
                lines.append(_multilabel_line(name, s[name]))
        lines.append(f"saved {s['out']} in {s['fit_seconds']:.2f}s")
        return "\n".join(lines)
    lines.append(f"train accuracy {_pct(s['train_accuracy'])}")
    if s.get("calibration"):
        c, r = s["calibration"], s["rejection"]
        lines.append(f"temperature {c['temperature']:.3g} fit on {c['fit_on']} ({c['n']} images): ECE "
                     f"{c['val_before']['ece']:.3f} -> {c['val_after']['ece']:.3f}, NLL {c['val_before']['nll']:.3f} "
                     f"-> {c['val_after']['nll']:.3f}")
        lines.append(f"unknown above distance {r['threshold']:.3f} to the nearest class mean (rejects "
                     f"{_pct(r['val_known_rejected'])} of val, target {_pct(r['target_known_rejected'])})")
    if s.get("val"):
        lines.append(_metrics_line("val", s["val"]))
    if s.get("test"):
        lines.append(_metrics_line("test", s["test"]))
    lines.append(f"saved {s['out']} in {s['fit_seconds']:.2f}s")
    return "\n".join(lines)


@app.command("fit-head")
@handles_errors
def fit_head(
    store: Path = typer.Argument(..., help="Feature store (.h5) made by `probe extract`."),
    head: str = typer.Option("linear", "--head", help="linear, mlp, prototype or knn."),
    out: Path = typer.Option(..., "--out", "-o", help="Head file to write (.safetensors)."),
    norm: str | None = typer.Option(None, "--norm", help="none, l2, cl2n, standardize or l2+standardize "
                                                          "(default: the head's own)."),
    l2: bool = typer.Option(False, "--l2", help="Shortcut for --norm l2."),
    standardize: bool = typer.Option(False, "--standardize", help="Shortcut for --norm standardize "
                                                                  "(with --l2: l2+standardize)."),
    shots: int | None = typer.Option(None, "--shots", help="Keep K training images per class (seeded)."),
    balanced: bool = typer.Option(False, "--balanced", help="Class-balanced loss weights (linear, mlp)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the k-shot draw, holdout and MLP init."),
    C: float | None = typer.Option(None, "--C", help="linear: fixed inverse L2 strength (default: sweep)."),
    n_Cs: int | None = typer.Option(None, "--n-Cs", help="linear: strengths in the default grid (25 on 1e-6..1e6)."),
    grid: str | None = typer.Option(None, "--grid", help="linear: default (--n-Cs strengths on 1e-6..1e6) or "
                                                         "kornblith (45 on 1e-6..1e5, Kornblith et al. 2019)."),
    sweep_rows: int = typer.Option(100_000, "--sweep-rows", help="linear: choose C on a seeded stratified "
                                                                 "subsample of this many training rows, then fit "
                                                                 "on all of them (0: sweep on all rows)."),
    select: str | None = typer.Option(None, "--select", help="Val metric that picks C (linear) or the early stop "
                                                             "(mlp): accuracy, mean-per-class, macro-f1, map "
                                                             "(multi-label stores); default: accuracy (linear; "
                                                             "map on a multi-label store), loss (mlp)."),
    hidden: str = typer.Option("512", "--hidden", help="mlp: hidden widths, comma-separated."),
    dropout: float = typer.Option(0.5, "--dropout", help="mlp: dropout."),
    epochs: int = typer.Option(200, "--epochs", help="mlp: at most this many epochs (early stopping)."),
    views: bool | None = typer.Option(None, "--views/--no-views",
                                      help="mlp: train on the store's augmented views (probe extract --views K); "
                                           "default: when the store has them. Other heads ignore them."),
    k: int = typer.Option(20, "--k", help="knn: neighbours."),
    metric: str = typer.Option("cosine", "--metric", help="prototype: cosine or euclidean."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    reject_target: float = typer.Option(0.05, "--reject-target", help="Rate of known val images the rejection "
                                                                      "threshold rejects (predict --reject auto)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train a head on cached features, calibrate it on val, report validation/test metrics and save it."""
    from probe.errors import ProbeError
    from probe.heads import make_head
    from probe.heads.fit import fit_head as run

    if l2 or standardize:
        if norm:
            raise ProbeError(f"give either --norm {norm} or --l2/--standardize, not both")
        norm = "l2+standardize" if l2 and standardize else "l2" if l2 else "standardize"
    try:
        widths = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise ProbeError(f"--hidden must be comma-separated integers like 512 or 1024,256, got {hidden!r}") from None
    params = {"linear": dict(C=C, balanced=balanced, seed=seed, device=device,  # the flags of each head
                             sweep_rows=sweep_rows or None),
              "mlp": dict(hidden=widths, dropout=dropout, epochs=epochs, balanced=balanced, seed=seed, device=device),
              "knn": dict(k=k), "prototype": dict(metric=metric)}.get(head, {})
    given = {k: v for k, v in {"norm": norm, "n_Cs": n_Cs, "grid": grid, "select": select}.items() if v is not None}
    built = make_head(head, **params, **given)  # --grid/--select on a head without them: an error naming the head
    refuse_overwriting_inputs([out], [store])
    emit(run(store, built, out, shots=shots, seed=seed, views=views, reject_target=reject_target,
             progress=show_progress(as_json)).to_dict(), as_json, _fit_text)


# ----------------------------------------------------------------------------------------------- predict
@app.command()
@handles_errors
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    head: Path = typer.Option(..., "--head", help="Head file from `probe fit-head`."),
    top_k: int = typer.Option(5, "--top-k", help="Classes to show per image."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Also write path,rank,class,probability rows here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    engine: str = typer.Option("auto", "--engine", help="auto, torch or onnxruntime."),
    reject: str = typer.Option("none", "--reject", help="none (default), auto (the threshold fit-head set on val: "
                                                        "5% of known images rejected), or a distance in [0, 2]: "
                                                        "images farther from every class mean are 'unknown'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classify images with a saved head, embedding them with exactly the backbone recorded in the head."""
    from probe.fs import write_bytes_atomic
    from probe.predict import predict as run

    refuse_overwriting_inputs([csv_out], [*inputs, head], text=True)
    res = run(inputs, head, top_k=top_k, device=device, engine=engine, reject=reject, progress=show_progress(as_json))
    if csv_out:
        rows = io.StringIO(newline="")
        w = csv.writer(rows)
        w.writerow(["path", "rank", "class", "probability"])
        for p in res["predictions"]:
            for r, t in enumerate(p["top"], 1):
                w.writerow([p["path"], r, t["class"], t["probability"]])
        write_bytes_atomic(csv_out, rows.getvalue().encode(), what="any previous CSV there is unchanged")
        res["csv"] = str(csv_out)

    def text(res):
        def labels(p):  # multi-label head: the classes above their thresholds, then the top k
            return ["labels: " + (", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["labels"]) or "none")
                    + " |"] if "labels" in p else []

        lines = ["  ".join([p["path"]] + ([f"unknown (distance {p['distance']:.3f})"] if p["rejected"] else [])
                           + labels(p) + [f"{t['class']} {t['probability']:.3f}" for t in p["top"]])
                 for p in res["predictions"]]
        lines += [f"skipped {b['path']}: {b['reason']}" for b in res["skipped"]]
        if res.get("csv"):
            lines.append(f"wrote {res['csv']}")
        return "\n".join(lines)

    emit(res, as_json, text)


# -------------------------------------------------------------------------------------------------- eval
@app.command("eval")
@handles_errors
def eval_(
    store: Path = typer.Argument(..., help="Feature store (.h5) with labels."),
    head: Path = typer.Option(..., "--head", help="Head file from `probe fit-head`."),
    split: str = typer.Option("test", "--split", help="train, val, test, or all."),
    png: Path | None = typer.Option(None, "--png", help="Confusion-matrix PNG, or per-class AP chart for a "
                                                        "multi-label head (default: beside the head)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Resamples of the rows for 95% intervals of accuracy "
                                                            "and balanced accuracy, or of mAP for a multi-label "
                                                            "head (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Score a head on a store: accuracy with a 95% interval, per-class metrics and a confusion-matrix PNG.

    Accuracy (with a bootstrap 95% interval), top-5, balanced accuracy, per-class precision/recall/F1 and a
    confusion-matrix PNG; for a multi-label head mAP (area under PR, with its interval) and VOC07 11-point mAP,
    per-class AP (and its bar chart) and micro/macro F1 at the head's thresholds, mean per-class ECE/NLL/Brier before
    and after its Platt scaling and a reliability PNG pooling every (image, class) probability (no confusion
    matrix)."""
    from probe.heads.evaluate import evaluate_store

    stem = f"{head.with_suffix('')}.{split}"  # defaults beside the head; --png: the one chart a head has goes there
    confusion, ap = png or Path(f"{stem}.confusion.png"), png or Path(f"{stem}.ap.png")
    reliability = confusion.with_name(confusion.name.removesuffix(".png").removesuffix(".confusion")
                                      + ".reliability.png")
    refuse_overwriting_inputs([confusion, ap, reliability], [store, head])
    r = evaluate_store(store, head, None if split == "all" else split, confusion, bootstrap=bootstrap, seed=seed,
                       reliability_png=reliability, ap_png=ap).to_dict()

    def multilabel_text(r):
        lines = [f"{r['head_type']} head {r['head']} on {r['store']} [{r['split']}] (multi-label)",
                 _multilabel_line("", r).strip(),
                 f"{'class':24} {'AP':>6} {'AP07':>6} {'thresh':>6} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>6}"]
        lines += [f"{n[:24]:24} {_num(c['ap'])} {_num(c['ap_voc07'])} {c['threshold']:6.3f} {c['precision']:6.3f} "
                  f"{c['recall']:6.3f} {c['f1']:6.3f} {c['support']:6d}" for n, c in r["per_class"].items()]
        c = r["calibration"]
        m = [f"ECE {c[w]['ece']:.3f}  NLL {c[w]['nll']:.3f}  Brier {c[w]['brier']:.3f}" for w in ("before", "after")
             if c[w]]
        lines.append(f"calibration (mean per class, {c['ece_bins']} bins): uncalibrated {m[0]}"
                     + (f"; Platt-scaled: {m[1]}" if c["calibrated"] else ""))
        lines.append(f"{c['note']}; {r['confusion_note']}")
        lines.append(f"per-class AP chart: {r['ap_png']}")
        if c.get("reliability_png"):
            lines.append(f"reliability diagram (all classes pooled): {c['reliability_png']}")
        return "\n".join(lines)

    def text(r):
        if r.get("multilabel"):
            return multilabel_text(r)
        lines = [f"{r['head_type']} head {r['head']} on {r['store']} [{r['split']}]", _metrics_line("", r).strip(),
                 f"{'class':24} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>6}"]
        lines += [f"{c['class'][:24]:24} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:6d}"
                  for c in r["per_class"]]
        c = r["calibration"]
        m = [f"ECE {c[w]['ece']:.3f}  NLL {c[w]['nll']:.3f}  Brier {c[w]['brier']:.3f}" for w in ("before", "after")
             if c[w]]
        lines.append(f"calibration ({c['ece_bins']} bins): uncalibrated {m[0]}" + (
            f"; temperature {c['temperature']:.3g}: {m[1]}" if c["calibrated"] else "; the head has no temperature")
            + (f" ({c['note']})" if c.get("note") else ""))
        lines.append(f"confusion matrix: {r['png']}")
        lines.append(f"reliability diagram: {c['reliability_png']}")
        return "\n".join(lines)

    emit(r, as_json, text)


# ----------------------------------------------------------------------------------------------- fewshot
@app.command()
@handles_errors
def fewshot(
    store: Path = typer.Argument(..., help="Feature store (.h5) with labels."),
    way: int = typer.Option(5, "--way", help="Classes per episode."),
    shot: str = typer.Option("1,5", "--shot", help="Support images per class; comma-separated for several."),
    query: int = typer.Option(15, "--query", help="Query images per class."),
    episodes: int = typer.Option(10_000, "--episodes", help="Episodes per shot count."),
    seed: int = typer.Option(0, "--seed", help="Episode sampling seed."),
    head: str = typer.Option("prototype", "--head", help="prototype, linear (logistic regression fitted on each "
                                                         "support set) or both, on the same episodes."),
    norm: str = typer.Option("cl2n", "--norm", help="none, l2 or cl2n (SimpleShot; centred on the train mean)."),
    metric: str = typer.Option("cosine", "--metric", help="prototype: cosine or euclidean."),
    C: float = typer.Option(1.0, "--C", help="linear: inverse L2 strength (1.0 as in Tian et al. 2020)."),
    split: str | None = typer.Option(None, "--split", help="Draw episodes from this split only (default: all)."),
    compare: list[Path] = typer.Option([], "--compare", help="A saved head (e.g. from probe zeroshot) scored on the "
                                                              "same queries with no support; repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Episodic few-shot accuracy of the prototype and/or linear head, mean and 95% confidence interval."""
    from probe.errors import ProbeError
    from probe.heads.fewshot import fewshot as run

    try:
        shots = tuple(int(s) for s in shot.split(",") if s.strip())
    except ValueError:
        raise ProbeError(f"--shot must be comma-separated integers like 1,5, got {shot!r}") from None
    r = run(store, way=way, shots=shots, query=query, episodes=episodes, seed=seed, norm=norm, metric=metric,
            split=split, head=head, C=C, compare=compare)

    def text(r):
        heads = {"prototype": f"prototype head ({r['metric']})", "linear": f"linear head (C={r['C']:g})",
                 "both": f"prototype ({r['metric']}) and linear (C={r['C']:g}) heads"}[r["head"]]
        lines = [f"{r['store']}: {r['n_images']} images, {r['n_classes']} classes; {heads}, {r['norm']}, "
                 f"seed {r['seed']}"]
        lines += [f"{x['head']:9} {r['way']}-way {x['shot']}-shot ({r['query']} queries): {_pct(x['accuracy'])} "
                  f"± {100 * x['ci95']:.2f} (95% CI, {x['episodes']} episodes, {x['episodes_per_s']:.0f}/s)"
                  if x["support"] else
                  f"{x['head']:9} {r['way']}-way, no support (the {x['shot']}-shot episodes' queries): "
                  f"{_pct(x['accuracy'])} ± {100 * x['ci95']:.2f} (95% CI)" for x in r["results"]]
        return "\n".join(lines)

    emit(r, as_json, text)
