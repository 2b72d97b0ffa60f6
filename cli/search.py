"""`probe index`, `probe search`, `probe dedup`: FAISS similarity search over a store."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, emit, handles_errors, refuse_overwriting_inputs, show_progress


# -------------------------------------------------------------------------------------------------- index
def _index_text(s: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in s["params"].items())
    recall = (f"recall@10 {s['recall_at_10']:.3f} on {s['recall_queries']} held-out queries "
              f"(target {s['target_recall']})" if s["recall_queries"] else
              "exact search (recall 1)" if s["type"] == "flat" else "recall not measured (too few rows)")
    shards = f" in {s['shards']} shards" if s.get("shards", 1) > 1 else ""
    return (f"{s['index']}: {s['action']} {s['type']} index ({s['factory']}{', ' + params if params else ''}), "
            f"{s['metric']}, {s['count']} x {s['dim']} from {s['backbone']}{shards}; added {s['added']}; {recall}; "
            f"{s['bytes'] / 2**20:.1f} MiB, built in {s['build_seconds']:.1f}s")


@app.command()
@handles_errors
def index(
    store: Path = typer.Argument(..., help="Feature store (.h5) made by probe extract."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Index file (default: the store's path with "
                                                              ".faiss); metadata goes to OUT.json."),
    type_: str = typer.Option("auto", "--type", help="auto (exact below --exact-below vectors, else tuned ivf), "
                                                     "flat, hnsw, ivf, ivfpq or ivfsq8."),
    metric: str | None = typer.Option(None, "--metric", help="cosine (default) or l2."),
    update: bool = typer.Option(False, "--update", help="Add the rows the store gained since the index was built "
                                                        "(no rebuild)."),
    target_recall: float = typer.Option(0.95, "--target-recall", help="recall@10 vs exact that approximate "
                                                                      "indexes are tuned to reach."),
    exact_below: int = typer.Option(50_000, "--exact-below", help="auto: exact (flat) search below this many "
                                                                  "vectors."),
    chunk_rows: int = typer.Option(16_384, "--chunk-rows", help="Store rows read at a time (approximate types "
                                                                "train on a sample): memory = one chunk + index."),
    nlist: int | None = typer.Option(None, "--nlist", help="IVF lists (default 4·sqrt(N)); fewer trains faster "
                                                           "on a large store."),
    shards: int = typer.Option(1, "--shards", help="Split the rows into K contiguous sub-indexes (OUT.shard-k), "
                                                   "searched together and merged."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build a FAISS index of a store (or --update it) for `probe search`."""
    from probe.search import IndexConfig, default_index_path, index_store, sidecar

    target = out or default_index_path(store)
    refuse_overwriting_inputs([target, sidecar(target)], [store])
    cfg = IndexConfig(type=type_, metric=metric or "cosine", target_recall=target_recall, exact_below=exact_below,
                      chunk_rows=chunk_rows, shards=shards, nlist=nlist)
    progress = show_progress(as_json)
    emit(index_store(store, out, cfg, update=update, metric=metric, progress=progress), as_json, _index_text)


# ------------------------------------------------------------------------------------------------- search
def _search_text(r: dict) -> str:
    name = "cosine" if r["metric"] == "cosine" else "distance"
    lines = [f"skipped {s['path']}: {s['reason']}" for s in r["skipped"]]
    for q in r["results"]:
        lines.append(f"query {q['query']} ({q['kind']})")
        lines.append(f"  {'rank':>4}  {name:>8}  {'label':14} path")
        lines += [f"  {h['rank']:>4}  {h['score']:>8.4f}  {str(h['label'] or '-'):14} {h['path']}" for h in q["hits"]]
    return "\n".join(lines)


@app.command()
@handles_errors
def search(
    queries: list[str] | None = typer.Argument(None, help="Image files, folders of images, gallery ids or stored "
                                                          "paths (or --text instead)."),
    text: list[str] | None = typer.Option(None, "--text", "-t", help="Search by text (an index of a clip/ store): "
                                                                     "'a photo of a bee'; repeat for more queries."),
    index_path: Path = typer.Option(..., "--index", "-i", help="Index made by probe index."),
    k: int = typer.Option(10, "-k", help="Hits per query."),
    html: Path | None = typer.Option(None, "--html", help="Also write a contact sheet (self-contained HTML)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for embedding query images or texts)."),
    engine: str = typer.Option("auto", "--engine", help="auto, torch or onnxruntime (for embedding query images)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The k gallery images most similar to each query image, or to each --text: rank, score, label and path."""
    from probe.errors import ProbeError
    from probe.search import SearchIndex, search_index, search_text

    if bool(queries) == bool(text):
        raise ProbeError("give query images (files, folders, gallery ids or stored paths) or --text 'a photo of "
                         "...', " + ("not both" if queries else "got neither"))
    idx = SearchIndex.load(index_path)  # read once: the search and the check below
    result = (search_text(idx, text, k=k, device=device) if text else
              search_index(idx, queries, k=k, device=device, engine=engine, progress=show_progress(as_json)))
    if html:
        from probe.report import contact_sheet
        from probe.search import sidecar

        gallery = idx.meta.get("root")  # the sheet shows the hits' images
        refuse_overwriting_inputs([html], [*(queries or []), index_path, sidecar(index_path), gallery,
                                           *index_path.parent.glob(f"{index_path.name}.shard-*")], text=True)
        result["html"] = str(contact_sheet(result, html, meta=idx.meta))  # the index as loaded: not read again
    emit(result, as_json, lambda r: _search_text(r) + (f"\ncontact sheet: {r['html']}" if html else ""))


# -------------------------------------------------------------------------------------------------- dedup
def _search_used(s: dict) -> str:
    if s["method"] == "exact":
        return "exact search over all pairs"
    params = ", ".join(f"{k}={v}" for k, v in s["params"].items())
    pairs = (f"pairs at the threshold found with estimated probability {s['pair_recall']:.3f} "
             f"({s['synthetic_pairs']:,} synthetic pairs)" if s["synthetic_pairs"] else "pair recall not estimated")
    return (f"approximate search ({s['index']}{', ' + params if params else ''}; {s['neighbours']} nearest "
            f"neighbours per row, a range search for the {s['range_searched']} rows whose neighbours were all "
            f"duplicates; {pairs}; --exact searches all pairs)")


def _dedup_text(r: dict) -> str:
    lines = [f"group {n + 1}: {len(g['paths'])} images, cosine >= {g['min_similarity']:.4f}\n  "
             + "\n  ".join(g["paths"]) for n, g in enumerate(r["groups"])]
    lines.append(f"{r['store']}: {len(r['groups'])} near-duplicate groups ({r['duplicates']} redundant images) "
                 f"among {r['count']} at cosine >= {r['threshold']}; {_search_used(r['search'])}")
    return "\n".join(lines)


@app.command()
@handles_errors
def dedup(
    store: Path = typer.Argument(..., help="Feature store (.h5)."),
    threshold: float = typer.Option(0.95, "--threshold", "-t", help="Cosine similarity at or above which two "
                                                                    "images are near-duplicates."),
    exact: bool = typer.Option(False, "--exact", help="Search all pairs exactly whatever the store's size "
                                                      "(default: exact below 50,000 rows, else approximate)."),
    recall: float = typer.Option(0.99, "--recall", help="Approximate search: the estimated share of pairs at the "
                                                         "threshold to find (higher probes more lists)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Groups of near-duplicate images in a store (exact up to 50,000 rows, then an approximate index)."""
    from probe.search import find_duplicates

    emit(find_duplicates(store, threshold, exact=exact or None, progress=show_progress(as_json), pair_recall=recall),
         as_json, _dedup_text)
