"""Self-contained HTML pages: search contact sheets and `probe doctor` reports, thumbnails embedded as base64 data
URIs, so the file opens anywhere.

Example:
    >>> contact_sheet(search_index("cache/demo.faiss", ["photo.jpg"]), "hits.html")
    >>> doctor_page(probe.doctor("cache/photos.h5"), "doctor.html")
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .data import ImageDecodeError, load_image
from .errors import ProbeError
from .fs import write_bytes_atomic
from .sources import Pictures
from .store import FeatureStore

if TYPE_CHECKING:
    from .doctor import DoctorReport

log = logging.getLogger(__name__)

THUMB = 160  # px, longest side: 10 hits per row fit a laptop screen

_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 18px; } h2 { font-size: 15px; margin: 18px 0 6px; word-break: break-all; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.card { width: CARDpx; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 11px; }
.card.query { border: 2px solid #1a73e8; }
.card img { display: block; max-width: 100%; margin: 0 auto 4px; }
.missing { height: 80px; display: flex; align-items: center; justify-content: center; color: #999; background: #eee; }
.words { min-height: 80px; display: flex; align-items: center; justify-content: center; text-align: center;
         font-size: 13px; background: #eef3ff; }
.path { color: #666; word-break: break-all; } .score { font-weight: 600; }
.pair { display: flex; gap: 4px; padding: 4px; border: 1px solid #ccc; border-radius: 4px; background: #f0f0f0; }
.pair.cross { border-color: #d93025; } .more { color: #666; font-size: 12px; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
td { text-align: right; } .summary td { text-align: left; } .summary th { font-weight: normal; color: #666; }
""".replace("CARD", str(THUMB + 10))


def thumbnail_uri(path: str, size: int = THUMB, pictures: Pictures | None = None) -> str | None:
    """A data: URI of a JPEG thumbnail of the file ``path`` -- or, with ``pictures``, of the stored row ``path``
    (a file or a container's member) -- or None when it cannot be read (moved, undecodable)."""
    try:
        img = load_image(path) if pictures is None else pictures.load(path)
    except (ImageDecodeError, OSError) as e:
        log.warning("no thumbnail for %s: %s", path, e)
        return None
    up = size / max(img.size)  # small images (28 px Fashion-MNIST) are enlarged, crisply, to be seen at all
    img = img.resize((max(1, round(img.width * up)), max(1, round(img.height * up))),
                     Image.Resampling.NEAREST if up >= 2 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _card(path: str, pictures: Pictures | None, caption: list[str], css: str = "card") -> str:
    uri = thumbnail_uri(path, pictures=pictures)
    img = f'<img src="{uri}" alt="{html.escape(os.path.basename(path))}">' if uri else \
        '<div class="missing">image not found</div>'
    return f'<div class="{css}">{img}' + "".join(f"<div>{c}</div>" for c in caption) + "</div>"


def contact_sheet(result: dict[str, Any], out: str | os.PathLike, title: str = "probe search",
                  meta: dict[str, Any] | None = None) -> Path:
    """Write the output of ``search_index`` (or ``search_text``) as an HTML page: per query, the query image (or
    text) then its hits with rank, score, label and path. ``meta``: the index's metadata when the caller has it
    loaded (``SearchIndex.meta``), else its sidecar is read if a hit needs it. Returns the path written."""
    e = html.escape
    score_name = "cosine" if result.get("metric") == "cosine" else "distance"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}: {e(str(result.get('index', '')))} — {result.get('count')} images, "
             f"{e(str(result.get('backbone')))}, {e(score_name)}, top {result.get('k')}</h1>"]
    pictures = _sheet_pictures(result, meta)
    for r in result["results"]:
        parts.append(f"<h2>query: {e(r['query'])} ({e(r['kind'])})</h2><div class='row'>")
        if r["kind"] == "text":  # search_text (CLIP): the words stand where the query image would
            parts.append(f"<div class='card query'><div class='words'>{e(r['query'])}</div><div><b>query</b> "
                         "(text)</div></div>")
        else:
            where = r["query"] if r["kind"] == "image" else f"{r['query']}: {r['query_path']}"
            parts.append(_card(*pictures(r["query_path"]), ["<b>query</b>", f"<span class='path'>{e(where)}</span>"],
                               "card query"))
        for h in r["hits"]:
            parts.append(_card(*pictures(h["abspath"]), [
                f"#{h['rank']} <span class='score'>{h['score']:.4f}</span> {e(str(h['label'] or ''))}",
                f"<span class='path'>{e(h['path'])}</span>"]))
        parts.append("</div>")
    if result.get("skipped"):
        parts.append("<h2>skipped queries</h2><ul>" + "".join(
            f"<li>{e(s['path'])}: {e(s['reason'])}</li>" for s in result["skipped"]) + "</ul>")
    parts.append("</body></html>")
    return _write(out, parts)


def _sheet_pictures(result: dict[str, Any],
                    meta: dict[str, Any] | None = None) -> Callable[[str], tuple[str, Pictures | None]]:
    """A search result's absolute path -> (path, Pictures) for ``thumbnail_uri``: a file as it is; any other row
    (a container's member, a file at a URL) as its index's row, through the record of the index's store -- read
    once, when the first such row comes (from ``meta``, the index's metadata, when given)."""
    found: list[tuple[Pictures, str]] = []

    def where(path: str) -> tuple[str, Pictures | None]:
        if os.path.isfile(path) or not result.get("index"):
            return path, None
        if not found:
            found.append(_index_pictures(result["index"], meta))
        pictures, root = found[0]
        head = os.path.join(root, "") if root else ""
        return (path[len(head):] if head and path.startswith(head) else path), pictures

    return where


def _index_pictures(index: str, meta: dict[str, Any] | None = None) -> tuple[Pictures, str]:
    """The Pictures of a saved index's rows and the root its absolute paths start with, from its metadata ``meta``
    or else its sidecar, checked as ``SearchIndex.load`` checks it (a damaged or foreign one is the same one-line
    ProbeError)."""
    from .search.index import read_sidecar

    meta = read_sidecar(index) if meta is None else meta
    return Pictures.of_index(meta), str(meta.get("root") or "")


def _write(out: str | os.PathLike, parts: list[str]) -> Path:
    """The page, atomically; a full disk is DiskFullError, an unwritable path UnwritableError naming the file."""
    return write_bytes_atomic(out, "\n".join(parts).encode("utf-8"), what="any previous page there is unchanged")


def _resolver(store: str) -> Pictures:
    """The images of a store's rows (files under its root, or members of its containers), from the store's record
    (read once); the paths as stored when the store cannot be opened (moved, deleted), so those cards say "image
    not found" unless the path still resolves."""
    try:
        return Pictures.of_store(FeatureStore(store).attrs)
    except ProbeError as e:
        log.warning("thumbnails from the paths as stored: %s", e)
        return Pictures("")


def _more(shown: int, total: int) -> str:
    return f"<p class='more'>{total - shown} more in --json</p>" if total > shown else ""


def doctor_page(report: DoctorReport | dict[str, Any], out: str | os.PathLike, *, top: int = 50,
                title: str = "probe doctor") -> Path:
    """Write a ``DoctorReport`` (or its ``to_dict()``) as one HTML page: a summary, then the ``top`` likely label
    errors, near-duplicate pairs (cross-split first) and outliers as thumbnails, and the class balance as a table.
    Returns the path written.

    Example:
        >>> doctor_page(probe.doctor("cache/photos.h5"), "doctor.html", top=20)
    """
    r = report.to_dict() if hasattr(report, "to_dict") else report
    e = html.escape
    where = _resolver(r["store"])
    d, b = r["duplicates"], r["balance"]
    issues, pairs, outliers = r["label_issues"], d["pairs"], r["outliers"]
    C = "swept per fold" if r.get("C") is None else format(r["C"], ".3g")
    summary = [("store", r["store"]), ("labelled rows", r["n"]),
               ("classes", f"{len(r['classes'])}: {', '.join(r['classes'])}"),
               ("linear head", f"C={C}, {r['folds']}-fold out-of-fold accuracy "
                               f"{100 * r['oof_accuracy']:.1f}% (seed {r['seed']})"),
               ("seconds", r["seconds"]), *(("note", n) for n in r["notes"])]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}: {e(r['store'])}</h1><table class='summary'>"
             + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary)
             + "</table>"]

    parts.append(f"<section id='label-errors'><h2>likely label errors: {len(issues)} (cleanlab, ranked by "
                 "self-confidence)</h2><div class='row'>")
    parts += [_card(i["path"], where, [
        f"<span class='score'>{i['self_confidence']:.3f}</span> [{e(i['split'])}]",
        f"{e(i['given'])} &rarr; {e(i['suggested'])}", f"<span class='path'>{e(i['path'])}</span>"])
        for i in issues[:top]]
    parts.append("</div>" + _more(top, len(issues)) + "</section>")

    parts.append(f"<section id='duplicates'><h2>near-duplicates (cosine &ge; {d['threshold']}, {e(d['index'])} "
                 f"index): {len(pairs)} pairs, {d['cross_split']} across splits, {d['exact']} exact</h2>")
    parts += [f"<p>leakage: {100 * share:.1f}% of {e(split or '(no split)')} rows have a train near-duplicate</p>"
              for split, share in r["leakage"].items()]
    parts.append("<div class='row'>")
    for p in sorted(pairs, key=lambda p: (not p["cross_split"], -p["similarity"]))[:top]:
        head = f"<span class='score'>{p['similarity']:.4f}</span>{' exact' if p['exact'] else ''}"
        parts.append(f"<div class='pair{' cross' if p['cross_split'] else ''}'>" + "".join(
            _card(path, where, [head, f"[{e(split)}] <span class='path'>{e(path)}</span>"])
            for path, split in zip(p["paths"], p["splits"])) + "</div>")
    parts.append("</div>" + _more(top, len(pairs)) + "</section>")

    parts.append("<section id='outliers'><h2>outliers (cosine distance to own class mean / mean distance to the "
                 "nearest neighbours)</h2><div class='row'>")
    parts += [_card(o["path"], where, [
        f"<span class='score'>{o['class_distance']:.3f}</span> / {o['knn_distance']:.3f}",
        f"{e(o['label'])} [{e(o['split'])}]", f"<span class='path'>{e(o['path'])}</span>"]) for o in outliers[:top]]
    parts.append("</div>" + _more(top, len(outliers)) + "</section>")

    names = list(b["total"])
    parts.append(f"<section id='balance'><h2>class balance: imbalance ratio {b['imbalance_ratio']:.2f} (largest / "
                 "smallest class)</h2><table><tr><th>split</th>" + "".join(f"<th>{e(c)}</th>" for c in names)
                 + "<th>total</th></tr>")
    for split, counts in [*b["counts"].items(), ("total", b["total"])]:
        cells = [counts.get(c, 0) for c in names]
        parts.append(f"<tr><th>{e(split or '(no split)')}</th>" + "".join(f"<td>{n}</td>" for n in cells)
                     + f"<td>{sum(cells)}</td></tr>")
    parts.append("</table></section></body></html>")
    return _write(out, parts)
