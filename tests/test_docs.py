"""The README and the manual under docs/: every relative link and image points to a file that exists,
every #anchor names a heading of its target (GitHub's slugs), and the README stays a front page."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), an optional "title" after the target; text may hold one level of [...]
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            fence = m.group(1) if fence is None else (None if m.group(1) == fence else fence)
        elif fence is None:
            out.append((n, line))
    return out


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans blanked out (code is not a link)."""
    return [(n, INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line)) for n, line in outside_fences(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links reduced to their text, code and HTML marks
    dropped), lowercased, punctuation other than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in outside_fences(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and link reference definition."""
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        found += [(n, m.group(2)) for m in LINK.finditer(line)]
        m = REFERENCE.match(line)
        if m:
            found.append((n, m.group(1)))
    return found


def broken_links(files: list[Path]) -> list[str]:
    """One line per relative link whose file is missing or whose #anchor is no heading of its target."""
    problems = []
    for path in files:
        for n, target in links(path):
            where = f"{path.name}:{n}: ({target})"
            if not target:
                problems.append(f"{where} empty link target")
                continue
            if SCHEME.match(target) or target.startswith("//"):
                continue  # http:, https:, mailto: ...: not checked here (no network)
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
            if not dest.exists():
                problems.append(f"{where} no such file: {dest}")
                continue
            if anchor:
                if dest.suffix.lower() != ".md" or not dest.is_file():
                    problems.append(f"{where} an #anchor into a file that is not Markdown")
                elif unquote(anchor).lower() not in anchors(dest):
                    problems.append(f"{where} no heading with the anchor #{anchor} in {dest.name}")
            elif dest.suffix.lower() == ".svg":
                try:
                    ET.parse(dest)
                except ET.ParseError as e:
                    problems.append(f"{where} not well-formed SVG: {e}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    files = doc_files()
    assert len(files) > 1, "docs/*.md are missing"
    assert sum(len(links(f)) for f in files) > 0
    problems = broken_links(files)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/")


def test_each_docs_page_links_back_to_the_readme():
    for page in sorted((REPO / "docs").glob("*.md")):
        first = page.read_text(encoding="utf-8").splitlines()[0]
        assert "](../README.md)" in first, f"{page.name}: the first line should link back to ../README.md"


def test_the_checker_catches_broken_links(tmp_path):
    """The link check above can fail: a missing file, a missing anchor, an anchor into a non-Markdown
    file and a malformed SVG are each reported; good links, code and external URLs are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Page A\n\n## The pipeline: `python training/run_all.py`\n\n## Notes\n\n## Notes\n", encoding="utf-8")
    (tmp_path / "good.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>', encoding="utf-8")
    (tmp_path / "bad.svg").write_text("<svg", encoding="utf-8")
    (tmp_path / "x.txt").write_text("x", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "# Top",
        "[ok](docs/a.md) [ok](docs/a.md#the-pipeline-python-trainingrun_allpy) [ok](docs/a.md#notes-1)",
        "![ok](good.svg) [ok](#top) [ok](https://example.com/missing) `[code](missing.md)`",
        "```", "[fenced](missing.md)", "```",
        "[bad file](docs/missing.md)",
        "[bad anchor](docs/a.md#no-such-heading)",
        "[bad self anchor](#nowhere)",
        "[anchor into text](x.txt#line)",
        "![bad svg](bad.svg)",
    ]) + "\n", encoding="utf-8")
    problems = broken_links([readme, tmp_path / "docs" / "a.md"])
    assert len(problems) == 5, problems
    for target in ("docs/missing.md", "docs/a.md#no-such-heading", "#nowhere", "x.txt#line", "bad.svg"):
        assert any(f"({target})" in p for p in problems), (target, problems)


def test_slugs_follow_github():
    assert slug("Measured on this machine (2 AMD EPYC cores, no GPU)") == "measured-on-this-machine-2-amd-epyc-cores-no-gpu"
    assert slug("Limits: what one request, one client and one worker can cost") == (
        "limits-what-one-request-one-client-and-one-worker-can-cost")
    assert slug("Benchmarks and reports (`bench/`)") == "benchmarks-and-reports-bench"
    assert slug("On a GPU, and across processes") == "on-a-gpu-and-across-processes"
