"""Markdown report -> one self-contained HTML page, for every report the lab writes.

    html = render_html(markdown_text, folder_with_the_pngs, "Model lab report: cifar10-airbench:...")
    md_lines.append(command_line(["python", "bench/report.py", "--no-load"]))   # under a section heading

The page opens from disk with nothing else beside it (each image the Markdown names, relative to `folder`,
is inlined as a data URI) and reads on a laptop screen: a table of contents built from the ## and ###
headings (a sticky side column on wide windows, a box at the top on narrow ones), wide tables scroll
sideways inside the page, images never exceed the text width. A paragraph that starts with "Command:"
(what `command_line` writes) is shown as the command that produced its section.

Used by bench/report.py (the combined report); training/ reports use it too, so it lives here in lab/
(training never imports bench/). Needs markdown-it-py only (in requirements.in).
"""
from __future__ import annotations

import base64
import html
import re
import shlex
from pathlib import Path

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
TOC_LEVELS = ("h2", "h3")
# a table cell that reads as a figure ("12.3", "98.5%", "4.1 ms", "1,024", "n/a", "2.1e-07") is right-aligned
NUMERIC = re.compile(r"^\s*(n/a|[-+−~]?[\d.,]+(e[-+]?\d+)?\s*(%|x|ms|s|MB|KB|GB|B|k|M|G|req/s|images/s)?"
                     r"(\s*\(.*\))?)?\s*$", re.I)
COMMAND_PREFIX = "Command:"

STYLE = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d5dae3;--head:#f1f3f7;--accent:#2b5fab;--code:#f3f4f7}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:#fff}
.layout{max-width:1400px;margin:0 auto;padding:0 1.2em}
main{min-width:0;padding-bottom:3em}
nav.toc{font-size:.9em;border:1px solid var(--line);border-radius:6px;padding:.6em 1em;margin:1em 0;background:#fafbfc}
nav.toc strong{display:block;margin-bottom:.3em}
nav.toc ol{margin:0;padding-left:1.2em}
nav.toc ol ol{padding-left:1em;font-size:.95em}
nav.toc a{color:var(--accent);text-decoration:none}
nav.toc a:hover{text-decoration:underline}
@media (min-width:1100px){
 .layout{display:grid;grid-template-columns:250px minmax(0,1fr);gap:2em}
 nav.toc{position:sticky;top:0;max-height:100vh;overflow:auto;margin:0;border:0;border-right:1px solid var(--line);border-radius:0;padding:1.2em 1em 1.2em 0;background:none}
}
h1{font-size:1.6em;margin:.8em 0 .3em;line-height:1.25}
h2{font-size:1.3em;margin:1.8em 0 .4em;padding-top:.4em;border-top:1px solid var(--line)}
h3{font-size:1.1em;margin:1.4em 0 .3em}
h1,h2,h3{scroll-margin-top:.5em}
a.anchor{color:var(--line);text-decoration:none;margin-left:.3em;font-weight:normal}
h2:hover a.anchor,h3:hover a.anchor{color:var(--muted)}
p.cmd{margin:.2em 0 .8em;color:var(--muted);font-size:.92em}
p.cmd code{color:var(--fg);white-space:pre-wrap;word-break:break-word}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--code);padding:0 3px;border-radius:3px}
pre{background:var(--code);padding:.6em .8em;overflow:auto;border-radius:4px}
pre code{padding:0;background:none}
.table-wrap{overflow-x:auto;margin:.8em 0;max-width:100%}
table{border-collapse:collapse;font-size:.92em;font-variant-numeric:tabular-nums}
td,th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right}
td.num{white-space:nowrap}
th{background:var(--head)}
tbody tr:nth-child(even){background:#fafbfc}
img{max-width:100%;height:auto;display:block;margin:.6em 0;border:1px solid var(--line)}
blockquote{margin:.8em 0;padding:.1em 1em;border-left:3px solid var(--line);color:var(--muted)}
@media print{nav.toc{display:none}.layout{display:block}}
"""


def command_line(cmd: str | list[str]) -> str:
    """The Markdown paragraph naming the command that produced a section (one line, under its heading)."""
    text = cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)
    return f"{COMMAND_PREFIX} `{text}`"


def slugify(text: str, seen: dict[str, int]) -> str:
    slug = re.sub(r"[^\w\- ]+", "", text.lower()).strip().replace(" ", "-")
    slug = re.sub(r"-{2,}", "-", slug) or "section"
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n + 1}"


def _plain(inline) -> str:
    """The text of an inline token (code spans and emphasis reduced to their text)."""
    if not inline.children:
        return inline.content
    return "".join(c.content for c in inline.children if c.type in ("text", "code_inline", "softbreak"))


def _data_uri(folder: Path | None, src: str) -> str | None:
    if folder is None or re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I) or src.startswith(("/", "#")):
        return None  # only files beside the report: never a URL or an absolute path
    path = (folder / src).resolve()
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file() or folder.resolve() not in path.parents:
        return None
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def render_html(md: str, folder: Path | str | None, title: str) -> str:
    """Markdown -> one HTML page with a table of contents and every local image inlined."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark").enable("table")
    env: dict = {}
    tokens = parser.parse(md, env)
    folder = Path(folder) if folder is not None else None
    seen: dict[str, int] = {}
    toc: list[tuple[str, str, str]] = []  # (tag, id, text)
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            text = _plain(tokens[i + 1])
            slug = slugify(text, seen)
            tok.attrSet("id", slug)
            if tok.tag in TOC_LEVELS:
                toc.append((tok.tag, slug, text))
        elif tok.type == "paragraph_open" and i + 1 < len(tokens) and \
                tokens[i + 1].content.startswith(COMMAND_PREFIX):
            tok.attrSet("class", "cmd")
        elif tok.type == "table_open":
            _align_numeric_columns(tokens, i)
        elif tok.type == "inline":
            for child in tok.children or []:
                if child.type == "image":
                    uri = _data_uri(folder, child.attrGet("src") or "")
                    if uri:
                        child.attrSet("src", uri)

    def table_open(renderer, tokens, idx, options, env):
        return '<div class="table-wrap"><table>\n'

    def table_close(renderer, tokens, idx, options, env):
        return "</table></div>\n"

    def heading_close(renderer, tokens, idx, options, env):
        slug = tokens[idx - 2].attrGet("id") if idx >= 2 else None
        anchor = f'<a class="anchor" href="#{slug}" aria-label="link to this section">#</a>' \
            if slug and tokens[idx].tag in TOC_LEVELS else ""
        return anchor + renderer.renderToken(tokens, idx, options, env)

    parser.add_render_rule("table_open", table_open)
    parser.add_render_rule("table_close", table_close)
    parser.add_render_rule("heading_close", heading_close)
    body = parser.renderer.render(tokens, parser.options, env)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body><div class=\"layout\">"
            f"{_toc_html(toc)}<main>\n{body}</main></div></body></html>\n")


def _align_numeric_columns(tokens, start: int) -> None:
    """Right-align the columns (header included) whose body cells all read as figures."""
    columns: dict[int, list] = {}
    col, body_ok = 0, {}
    for i in range(start + 1, len(tokens)):
        tok = tokens[i]
        if tok.type == "table_close":
            break
        if tok.type == "tr_open":
            col = 0
        elif tok.type in ("td_open", "th_open"):
            columns.setdefault(col, []).append(tok)
            text = tokens[i + 1].content.replace("*", "").strip()
            if tok.type == "td_open" and text:
                body_ok[col] = body_ok.get(col, True) and bool(NUMERIC.match(text))
            col += 1
    for c, cells in columns.items():
        if body_ok.get(c):
            for cell in cells:
                if not cell.attrGet("style"):
                    cell.attrSet("class", "num")


def _toc_html(toc: list[tuple[str, str, str]]) -> str:
    """<nav> with the ## headings, each with its ### headings nested under it."""
    if not toc:
        return ""
    items: list[tuple[str, str, list]] = []
    for tag, slug, text in toc:
        if tag == TOC_LEVELS[0] or not items:
            items.append((slug, text, []))
        else:
            items[-1][2].append((slug, text))

    def link(slug, text):
        return f'<a href="#{slug}">{html.escape(text)}</a>'

    out = ['<nav class="toc" aria-label="Contents"><strong>Contents</strong><ol>']
    for slug, text, children in items:
        sub = "".join(f"<li>{link(s, t)}</li>" for s, t in children)
        out.append(f"<li>{link(slug, text)}{f'<ol>{sub}</ol>' if sub else ''}</li>")
    out.append("</ol></nav>")
    return "".join(out)


def write_html(md_path: Path | str, title: str | None = None) -> Path:
    """report.md -> report.html beside it (images resolved from the same folder); returns the new path."""
    md_path = Path(md_path)
    md = md_path.read_text()
    if title is None:
        first = next((line[2:].strip() for line in md.splitlines() if line.startswith("# ")), md_path.stem)
        title = first.replace("`", "")
    out = md_path.with_suffix(".html")
    out.write_text(render_html(md, md_path.parent, title))
    return out
