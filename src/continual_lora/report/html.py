"""HTML pieces of the report page: escaping, embedded images, tables, the page shell (its style,
and a script that marks figures that failed to load). No network is needed to open the page."""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def image(path: Path | None, page_dir: Path, alt: str) -> str:
    """An <img> with the PNG embedded; `data-file` names the PNG beside the page."""
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    rel = Path(path).resolve().relative_to(page_dir.resolve()) \
        if Path(path).resolve().is_relative_to(page_dir.resolve()) else Path(path).name
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}" '
            f'data-file="{esc(rel)}"><figcaption>{esc(alt)} '
            f'<span class="file">({esc(rel)})</span></figcaption></figure>')


def table(header: list[str], rows: list[list], table_id: str = "", numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"num" if k >= numeric_from else ""}">{esc(c)}</td>'
                        for k, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def markdown_tables(text: str) -> str:
    """The pipe tables of a Markdown text as HTML tables; other lines as paragraphs."""
    out, block = [], []

    def flush():
        if block:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block
                    if not set(line.replace("|", "").strip()) <= set("-: ")]
            out.append(table(rows[0], rows[1:]))
            block.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            block.append(line)
            continue
        flush()
        if line.strip() and not line.startswith("!["):
            out.append(f"<p>{esc(line.strip())}</p>")
    flush()
    return "\n".join(out)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2733;
background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{margin-top:36px;border-bottom:2px solid #d9dee5;
padding-bottom:4px} h3{margin-top:22px}
.meta{color:#5a6675;font-size:.9em}
section.card{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:12px 18px;
margin:18px 0}
table{border-collapse:collapse;margin:10px 0;font-size:.88em;background:#fff}
th,td{border:1px solid #d9dee5;padding:4px 8px;text-align:left} th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-table;margin:8px 12px 8px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #e1e5ea;background:#fff}
figcaption{display:table-caption;caption-side:bottom;font-size:.8em;color:#5a6675}
.file{color:#8a94a3}
pre.defs{background:#fff;border:1px solid #e1e5ea;padding:10px;font-size:.82em;
white-space:pre-wrap}
p.broken{color:#b00020;font-weight:600}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px;align-items:start}
.pair figure{display:block;margin:8px 0} .pair figcaption{display:block}
nav a{margin-right:12px}
"""

# Marks images that did not load (a PNG beside the page moved away, a corrupt file) visibly, and
# records the counts on <body> (data-images-total / data-images-loaded) for anyone checking the
# page, people or tests.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.length - broken.length;
  broken.forEach(function (i) {
    var note = document.createElement('p');
    note.className = 'broken';
    note.textContent = 'figure did not load: ' + (i.dataset.file || i.alt);
    i.parentNode.insertBefore(note, i.nextSibling);
  });
});
"""


def page(title: str, subtitle: str, body: list[str]) -> str:
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n"
            f'<body><main><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)} · report made '
            f"{made} by continual-lora from the folder's files</p>\n" + "\n".join(body)
            + f"\n</main><script>{SCRIPT}</script></body></html>\n")
