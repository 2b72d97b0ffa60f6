"""`probe doctor`: likely label errors, cross-split duplicates, outliers and class balance of a labelled store."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, emit, handles_errors, refuse_overwriting_inputs, show_progress


def _text(r: dict, top: int) -> str:
    d, b = r["duplicates"], r["balance"]
    c = f"{r['C']:.3g}" if r["C"] is not None else "swept per fold"
    lines = [f"{r['store']}: {r['n']} labelled rows, {len(r['classes'])} classes; linear head C={c}, "
             f"{r['folds']}-fold out-of-fold accuracy {100 * r['oof_accuracy']:.1f}% (seed {r['seed']})",
             f"likely label errors: {len(r['label_issues'])} (cleanlab: ranked by self-confidence, cut at its "
             "estimated count)"]
    lines += [f"  {i['self_confidence']:.3f}  {i['path']} [{i['split']}]  given {i['given']!r}, "
              f"suggested {i['suggested']!r}" for i in r["label_issues"][:top]]
    lines.append(f"near-duplicates (cosine >= {d['threshold']}, {d['index']} index): {len(d['pairs'])} pairs, "
                 f"{d['cross_split']} across splits, {d['exact']} exact")
    lines += [f"  {p['similarity']:.4f}{' exact' if p['exact'] else ''}  {p['paths'][0]} [{p['splits'][0]}]  "
              f"{p['paths'][1]} [{p['splits'][1]}]" for p in d["pairs"][:top]]
    for split, share in r["leakage"].items():
        lines.append(f"leakage: {100 * share:.1f}% of {split or '(no split)'} rows have a train near-duplicate")
    lines.append("outliers (cosine distance to own class mean; mean distance to 10 nearest):")
    lines += [f"  {o['class_distance']:.3f}  {o['knn_distance']:.3f}  {o['path']} [{o['split']}] {o['label']!r}"
              for o in r["outliers"][:top]]
    lines.append(f"class balance: imbalance ratio {b['imbalance_ratio']:.2f} (largest / smallest class)")
    for split, counts in b["counts"].items():
        items = list(counts.items())
        if len(items) > max(top, 2):  # 100 classes are a wall of text: the smallest and largest, the rest in --json
            lo, hi = max(1, (top + 1) // 2), max(1, top // 2)
            items = sorted(items, key=lambda kv: kv[1])
            shown = ("  ".join(f"{c}:{n}" for c, n in items[:lo]) + f"  ... {len(items) - lo - hi} more ...  "
                     + "  ".join(f"{c}:{n}" for c, n in items[-hi:]))
        else:
            shown = "  ".join(f"{c}:{n}" for c, n in items)
        lines.append(f"  {split or '(no split)':6} {shown}")
    lines += r["notes"]
    return "\n".join(lines)


@app.command("doctor")
@handles_errors
def doctor(
    store: Path = typer.Argument(..., help="Labelled feature store (.h5) made by `probe extract`."),
    folds: int = typer.Option(5, "--folds", help="Folds of the out-of-fold probabilities."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold split and the head."),
    top: int = typer.Option(20, "--top", help="Rows of each list to print (--json has them all; --out shows 50)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write an HTML report with thumbnails."),
    sweep: str = typer.Option("once", "--sweep", help="once: C chosen by one sweep on all rows, each fold refit "
                              "at it; per-fold: nested CV, each fold sweeps on its own rows (slower)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Likely label errors, train/val/test leakage, outliers and class balance of a labelled store."""
    from probe.doctor import doctor as run
    from probe.store import FeatureStore

    opened = FeatureStore(store)  # read once: the check and the report
    if out:
        refuse_overwriting_inputs([out], [store, opened.attrs.get("root")], text=True)  # it embeds the store's images
    report = run(opened, folds=folds, seed=seed, sweep=sweep, out=out, progress=show_progress(as_json)).to_dict()
    emit(report, as_json, lambda r: _text(r, top) + (f"\nreport: {r['html']}" if out else ""))
