"""Rendering the report's blocks (:mod:`moecpt.study.blocks`) as Markdown and as one self-contained HTML page; every
table cell goes through :func:`~moecpt.study.numbers.fmt`, so the two documents cannot diverge."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from moecpt.study.numbers import fmt

__all__ = ["render_markdown", "render_html"]


def _cell_text(x: Any) -> list[str]:
    """A table cell as its lines: a list value is one line per item, anything else one :func:`fmt` line."""
    return [fmt(v) for v in x] if isinstance(x, list) else [fmt(x)]


def _md_cell(x: Any) -> str:
    return "<br>".join(s.replace("|", "\\|").replace("\n", " ") for s in _cell_text(x))


def render_markdown(blocks: list[dict]) -> str:
    """Markdown (GitHub tables); images referenced by their path relative to the report."""
    out: list[str] = []
    for b in blocks:
        t = b["type"]
        if t == "heading":
            out.append("#" * b["level"] + " " + b["text"])
        elif t == "paragraph":
            out.append(b["text"])
        elif t == "list":
            out.append("\n".join(f"- {item}" for item in b["items"]))
        elif t == "table":
            lines = ["| " + " | ".join(_md_cell(c) for c in b["columns"]) + " |",
                     "|" + "|".join("---" for _ in b["columns"]) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b["rows"]]
            out.append("\n".join(lines))
        elif t == "image":
            out.append(f"![{b['alt']}]({b['rel']})\n\n*{b['caption']}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
h3 { margin-top: 1.2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.yes, td.reproduced { background: #dff3df !important; } td.no, td.not-reproduced { background: #f8dede !important; }
td.inconclusive { background: #fbf3d5 !important; }
td.untested { background: #eee !important; color: #666; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; margin-top: .3em; }
"""

_VERDICT_CLASSES = ("yes", "no", "untested", "reproduced", "not reproduced", "inconclusive")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """HTML of a text: escaped, with ``**bold**`` as ``<strong>``."""
    return _BOLD.sub(r"<strong>\1</strong>", html.escape(text))


def render_html(blocks: list[dict], title: str = "moecpt study") -> str:
    """A self-contained HTML page: inline CSS, images embedded as base64 PNG data URIs, no external assets."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        t = b["type"]
        if t == "heading":
            body.append(f"<h{b['level']}>{e(b['text'])}</h{b['level']}>")
        elif t == "paragraph":
            body.append(f"<p>{_inline(b['text'])}</p>")
        elif t == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b["items"]) + "</ul>")
        elif t == "table":
            cap = f"<caption>{e(b['caption'])}</caption>" if b.get("caption") else ""
            head = "<tr>" + "".join(f"<th>{e(fmt(c))}</th>" for c in b["columns"]) + "</tr>"
            rows = []
            for row in b["rows"]:
                cells = []
                for c in row:
                    lines = _cell_text(c)
                    s = lines[0] if len(lines) == 1 else ""
                    cls = (f' class="{s.replace(" ", "-")}"' if s in _VERDICT_CLASSES and isinstance(c, str) else "")
                    cells.append(f"<td{cls}>{'<br>'.join(e(x) for x in lines)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append(f"<table>{cap}<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")
        elif t == "image":
            data = base64.b64encode(Path(b["path"]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{e(b["alt"])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b['caption'])}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
