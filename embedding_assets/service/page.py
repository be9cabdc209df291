"""The search page: server-rendered HTML, a plain GET form, no JavaScript.

Every value that comes from a request or a document goes through ``html.escape``; the page has no script
and its Content-Security-Policy forbids any (see ``app``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

SNIPPET_CHARS = 320

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:860px;margin:0 auto;padding:28px 20px 60px}
h1{font-size:1.35rem;margin:0 0 16px}
form{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:10px}
input[type=search]{flex:1 1 360px;font-size:1.05rem;padding:9px 12px;border:1px solid #b9c0cc;border-radius:6px}
select,button{font-size:1rem;padding:8px 12px;border-radius:6px;border:1px solid #b9c0cc;background:#fff}
button{background:#2456c7;color:#fff;border-color:#2456c7;cursor:pointer}
.meta{color:#5b6475;font-size:.85rem;margin:6px 0 18px}
ol{list-style:none;padding:0;margin:0}
li{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 16px;margin-bottom:12px}
.path{font-family:ui-monospace,Menlo,monospace;font-size:.92rem;color:#1d3f91;font-weight:600}
.score{float:right;font-family:ui-monospace,Menlo,monospace;font-size:.85rem;color:#3a7a3a}
.heading{color:#5b6475;font-size:.88rem;margin:3px 0 7px}
.snippet{margin:0;line-height:1.45}
.error{background:#fdecec;border:1px solid #e9a3a3;border-radius:8px;padding:12px 14px}
"""


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """The text on one line, cut at a word boundary near ``limit`` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0]
    return cut + " …"


_SCORE_TITLES = {"vector": "cosine similarity", "lexical": "BM25 score", "hybrid": "reciprocal-rank fusion score"}


def render_page(*, query: str = "", k: int = 5, hits: Sequence[dict] = (), error: str | None = None,
                index_version: str | None = None, searched: bool = False, k_choices: Sequence[int] = (5, 10, 20),
                mode: str = "vector", modes: Sequence[str] = ("vector", "lexical", "hybrid")) -> str:
    """The whole page: the form (keeping the query), then the hits or an error."""
    e = html.escape
    options = "".join(f'<option value="{n}"{" selected" if n == k else ""}>{n} hits</option>'
                      for n in sorted({*k_choices, k}))
    mode_options = "".join(f'<option value="{e(m)}"{" selected" if m == mode else ""}>{e(m)}</option>' for m in modes)
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>{e(query) + ' · ' if query else ''}Search</title><style>{_STYLE}</style></head><body><main>",
        "<h1>Search the index</h1>",
        '<form method="get" action="/" role="search">',
        f'<input type="search" name="q" value="{e(query)}" placeholder="Ask a question…" aria-label="Query" autofocus>',
        f'<select name="k" aria-label="Hits">{options}</select>'
        f'<select name="mode" aria-label="Mode">{mode_options}</select><button type="submit">Search</button></form>',
    ]
    if index_version:
        parts.append(f'<p class="meta">index version {e(index_version)}</p>')
    if error:
        parts.append(f'<p class="error" role="alert">{e(error)}</p>')
    elif searched:
        parts.append(f'<p class="meta">{len(hits)} hit{"" if len(hits) == 1 else "s"} for “{e(query)}”</p>')
        parts.append('<ol class="hits">')
        score_title = e(_SCORE_TITLES.get(mode, "score"))
        for hit in hits:
            heading = " › ".join(hit.get("heading_path") or []) or (hit.get("title") or "")
            page = f" · page {e(str(hit['page']))}" if hit.get("page") is not None else ""
            parts.append(
                f'<li class="hit"><span class="score" title="{score_title}">{hit["score"]:.3f}</span>'
                f'<div class="path">{e(hit["source"])}/{e(hit["doc_path"])}{page}</div>'
                f'<div class="heading">{e(heading)}</div><p class="snippet">{e(snippet(hit["text"]))}</p></li>'
            )
        parts.append("</ol>")
    parts.append("</main></body></html>")
    return "".join(parts)
