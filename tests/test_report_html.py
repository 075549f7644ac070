"""lab/report_html.py: the one Markdown -> HTML helper every report uses (no browser needed here; the
browser test opens a real report)."""
from __future__ import annotations

import re

from lab.report_html import command_line, render_html, write_html
from tests.images import encode, gradient

MD = """# Study `lr-sweep`

{cmd}

Intro with a [link](https://example.com).

## Results: accuracy

{cmd2}

| trial | lr | accuracy | note |
|---|---|---|---|
| 0 | 0.1 | 91.2% | best |
| 1 | 0.01 | 88.0% | slow |

![curve](curve.png) ![missing](nope.png) ![outside](../x.png)

### Per class

text

## Results: accuracy

again
"""


def test_toc_ids_commands_images_and_tables(tmp_path):
    (tmp_path / "curve.png").write_bytes(encode(gradient(16, 8), "PNG"))
    md = MD.format(cmd=command_line(["python", "training/study.py", "--trials", "20", "--name", "a b"]),
                   cmd2=command_line("python bench/report.py --no-load"))
    assert "Command: `python training/study.py --trials 20 --name 'a b'`" in md
    html = render_html(md, tmp_path, "Study <lr> & co")
    assert "<title>Study &lt;lr&gt; &amp; co</title>" in html
    toc = re.search(r'<nav class="toc".*?</nav>', html).group(0)
    hrefs = re.findall(r'href="#([^"]+)"', toc)
    assert hrefs == ["results-accuracy", "per-class", "results-accuracy-2"]  # h2, its h3, a repeated h2
    for h in hrefs:
        assert f'id="{h}"' in html
    assert html.count('<p class="cmd">') == 2
    assert 'src="data:image/png;base64,' in html  # the PNG beside the report is inlined
    assert 'src="nope.png"' in html and 'src="../x.png"' in html  # missing or outside: left alone
    assert '<div class="table-wrap"><table>' in html
    assert '<td class="num">91.2%</td>' in html and "<td>best</td>" in html  # figures right, words left
    assert "https://example.com" in html and "<script" not in html


def test_write_html_beside_the_markdown(tmp_path):
    md = tmp_path / "report.md"
    md.write_text("# Report `x:1`\n\n## A\n\nbody\n")
    out = write_html(md)
    assert out == tmp_path / "report.html"
    assert "<title>Report x:1</title>" in out.read_text()
