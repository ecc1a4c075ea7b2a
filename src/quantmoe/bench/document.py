"""A tiny document model rendered both as Markdown and as self-contained HTML.

The report is built once as a list of blocks (headings, paragraphs, bullet lists, tables,
images) and rendered twice, so the two files never disagree and no Markdown parser is
needed. Inline text may hold ``code`` spans; everything else is escaped.

>>> doc = [Heading(1, "Results"), Table(("run", "bits"), (("uniform 2-bit", "2.000"),))]
>>> print(to_markdown(doc))
# Results
<BLANKLINE>
| run | bits |
|---|---|
| uniform 2-bit | 2.000 |
<BLANKLINE>
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report's folder
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(c) for c in b.head) + " |", "|" + "---|" * len(b.head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        else:
            raise TypeError(f"not a document block: {b!r}")
    return "\n\n".join(out) + "\n"


_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
    """Escape for HTML, then turn `code` spans into <code> and [text](href) into links."""
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))
    return _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', out)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 88rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.4rem; text-align: left; }
td { white-space: nowrap; }
th { background: #f3f3f3; vertical-align: bottom; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: Sequence[Block], title: str, folder: Path | None = None,
            embed: Callable[[Path], str] = _data_uri) -> str:
    """One HTML file; images are embedded as data URIs when ``folder`` holds them, else linked."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in b.head)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif isinstance(b, Image):
            local = folder / b.path if folder is not None else None
            src = embed(local) if local is not None and local.is_file() else html.escape(b.path)
            out.append(f'<p><img src="{src}" alt="{html.escape(b.alt)}"></p>')
        else:
            raise TypeError(f"not a document block: {b!r}")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
