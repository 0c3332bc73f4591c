"""Render the report's sections to a self-contained HTML page and to Markdown.

The HTML page needs nothing but itself: the style sheet is inline and every figure is embedded
as a base64 ``data:image/png`` URI (no CDN, no script). Tables carry ``class="report-table"``
and ``data-key`` (their CSV's stem); figures ``class="report-figure"`` and ``data-file``.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tables import Table


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)
    items: list[Table | Figure] = field(default_factory=list)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #1d2330; line-height: 1.45; }
h1 { border-bottom: 2px solid #345; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccd; padding-bottom: .15em; }
h3 { margin-top: 1.6em; }
p.meta { color: #556; font-size: .9em; }
p.caption { color: #334; font-size: .88em; max-width: 1100px; }
ul.notes { color: #8a4b00; font-size: .88em; }
nav ul { columns: 2; font-size: .92em; }
.table-wrap { overflow-x: auto; margin: .6em 0 1.4em 0; }
table.report-table { border-collapse: collapse; font-size: .84em; }
table.report-table caption { text-align: left; font-weight: 600; padding: .3em 0; font-size: 1.05em; }
table.report-table th { background: #e9edf4; border: 1px solid #c4cad6; padding: .3em .55em; white-space: nowrap; }
table.report-table td { border: 1px solid #d4d9e3; padding: .25em .55em; font-variant-numeric: tabular-nums; }
table.report-table tbody tr:nth-child(even) { background: #f6f8fb; }
td.num { text-align: right; white-space: nowrap; }
td.bad { color: #a00; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { font-size: .85em; color: #445; }
"""

_NUM = r"[+\-−]?\d[\d.]*(?:e[+\-]?\d+)?"
_NUMERIC = re.compile(rf"^{_NUM}(?:×|%| ms)?(?: ± {_NUM})?(?: \([^)]*\))?$")


def _is_num(cell: str) -> bool:
    return bool(_NUMERIC.match(cell)) or cell == "—"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def table_html(t: Table) -> str:
    e = html.escape
    out = [
        f'<div class="table-wrap"><table class="report-table" data-key="{e(t.key)}">',
        f"<caption>{e(t.title)}</caption>",
        "<thead><tr>",
    ]
    out += [f"<th>{e(c)}</th>" for c in t.columns]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        cells = []
        for c in row:
            cls = []
            if _is_num(c):
                cls.append("num")
            if c in ("failed", "unreadable") or c.startswith(("loses", "hurts", "worse")):
                cls.append("bad")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    out.append(f'<p class="caption">{e(t.caption)} <em>CSV: {e(t.key)}.csv</em></p>')
    if t.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(out)


def figure_html(f: Figure) -> str:
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    e = html.escape
    return (
        f'<figure><img class="report-figure" data-file="{e(f.path.name)}" alt="{e(f.caption)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{e(f.caption)} ({e(f.path.name)})</figcaption></figure>'
    )


def render_html(title: str, meta: list[str], sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"] + [f'<p class="meta">{e(m)}</p>' for m in meta]
    toc = [f'<li><a href="#{_slug(s.title)}">{e(s.title)}</a></li>' for s in sections if s.level == 2]
    body.append("<nav><ul>" + "".join(toc) + "</ul></nav>")
    for s in sections:
        body.append(f'<h{s.level} id="{_slug(s.title)}">{e(s.title)}</h{s.level}>')
        body += [f"<p>{e(p)}</p>" for p in s.text]
        for item in s.items:
            body.append(table_html(item) if isinstance(item, Table) else figure_html(item))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    lines = [
        f"**{t.title}**",
        "",
        "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
        "|" + "|".join("---" for _ in t.columns) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    lines += ["", f"{t.caption} (CSV: `{t.key}.csv`)"]
    lines += [f"- note: {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def render_markdown(title: str, meta: list[str], sections: list[Section]) -> str:
    out = [f"# {title}", ""] + [f"{m}  " for m in meta] + [""]
    for s in sections:
        out += ["#" * s.level + " " + s.title, ""]
        for p in s.text:
            out += [p, ""]
        for item in s.items:
            if isinstance(item, Table):
                out += [table_markdown(item)]
            else:
                out += [f"![{item.caption}]({item.path.name})", "", f"*{item.caption}*", ""]
    return "\n".join(out) + "\n"


__all__ = ["Figure", "Section", "render_html", "render_markdown", "table_html", "table_markdown"]
