"""Self-contained HTML contact sheets: thumbnails embedded as base64 data URIs, so the file opens anywhere.

Example:
    >>> contact_sheet(search_index("cache/demo.faiss", ["photo.jpg"]), "hits.html")
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from .data import ImageDecodeError, load_image
from .fs import write_bytes_atomic

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
.path { color: #666; word-break: break-all; } .score { font-weight: 600; }
""".replace("CARD", str(THUMB + 10))


def thumbnail_uri(path: str, size: int = THUMB) -> str | None:
    """A data: URI of a JPEG thumbnail of ``path``, or None when it cannot be read (moved, undecodable)."""
    try:
        img = load_image(path)
    except (ImageDecodeError, OSError) as e:
        log.warning("no thumbnail for %s: %s", path, e)
        return None
    up = size / max(img.size)  # small images (28 px Fashion-MNIST) are enlarged, crisply, to be seen at all
    img = img.resize((max(1, round(img.width * up)), max(1, round(img.height * up))),
                     Image.Resampling.NEAREST if up >= 2 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _card(path: str, caption: list[str], css: str = "card") -> str:
    uri = thumbnail_uri(path)
    img = f'<img src="{uri}" alt="{html.escape(os.path.basename(path))}">' if uri else \
        '<div class="missing">image not found</div>'
    return f'<div class="{css}">{img}' + "".join(f"<div>{c}</div>" for c in caption) + "</div>"


def contact_sheet(result: dict[str, Any], out: str | os.PathLike, title: str = "probe search") -> Path:
    """Write the output of ``search_index`` as an HTML page: per query, the query image then its hits with
    rank, score, label and path. Returns the path written."""
    e = html.escape
    score_name = "cosine" if result.get("metric") == "cosine" else "distance"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}: {e(str(result.get('index', '')))} — {result.get('count')} images, "
             f"{e(str(result.get('backbone')))}, {e(score_name)}, top {result.get('k')}</h1>"]
    for r in result["results"]:
        parts.append(f"<h2>query: {e(r['query'])} ({e(r['kind'])})</h2><div class='row'>")
        where = r["query"] if r["kind"] == "image" else f"{r['query']}: {r['query_path']}"
        parts.append(_card(r["query_path"], ["<b>query</b>", f"<span class='path'>{e(where)}</span>"], "card query"))
        for h in r["hits"]:
            parts.append(_card(h["abspath"], [
                f"#{h['rank']} <span class='score'>{h['score']:.4f}</span> {e(str(h['label'] or ''))}",
                f"<span class='path'>{e(h['path'])}</span>"]))
        parts.append("</div>")
    if result.get("skipped"):
        parts.append("<h2>skipped queries</h2><ul>" + "".join(
            f"<li>{e(s['path'])}: {e(s['reason'])}</li>" for s in result["skipped"]) + "</ul>")
    parts.append("</body></html>")
    return write_bytes_atomic(out, "\n".join(parts).encode("utf-8"), what="any previous page there is unchanged")
