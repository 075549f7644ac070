"""docs/studies.md quotes study runs whose results are committed: each results block names one run folder
under docs/ (one run per block), and every figure in the block is in that run's own files.

A block in the Markdown:

    <!-- results: docs/results/studies-quick-2026-12-07 -->
    | question | result |
    ...
    <!-- /results -->

A figure is a number with a decimal point (accuracies, differences, interval ends, LRs, ratios); it is
found when the run's report, sections or log print it, or when a value in its results.json written at one
to three decimals, as a fraction or in points, gives it. Signs and thousands separators are ignored."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- results: (\S+) -->(.*?)<!-- /results -->", re.S)
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*\.\d+")
RAW_FILES = ("results.json", "results.csv", "report.md")


def _numbers(value) -> set[str]:
    """Every float of a JSON value at 1-3 decimals, as it is and times 100; every number in its strings."""
    out: set[str] = set()
    if isinstance(value, bool) or value is None:
        return out
    if isinstance(value, (int, float)):
        for x in (abs(value), abs(100 * value)):
            out.update(f"{x:.{d}f}" for d in (1, 2, 3))
    elif isinstance(value, str):
        out.update(m.replace(",", "") for m in FIGURE.findall(value))
    elif isinstance(value, dict):
        for k, v in value.items():
            out |= _numbers(k) | _numbers(v)
    elif isinstance(value, list):
        for v in value:
            out |= _numbers(v)
    return out


def run_figures(folder: Path) -> set[str]:
    """What a run's committed files say: the numbers of its report, sections and log, and its results' values."""
    figures = _numbers(json.loads((folder / "results.json").read_text()))
    for text in [*folder.glob("*.md"), *folder.glob("*/*.md"), *folder.glob("*.log")]:
        figures |= _numbers(text.read_text(encoding="utf-8"))
    return figures


def unfound(doc: str, repo: Path = REPO) -> list[str]:
    """'folder: figure' for each figure of a results block that its run's files do not hold."""
    missing = []
    for folder_name, body in BLOCK.findall(doc):
        folder = repo / folder_name
        figures = run_figures(folder)
        for fig in FIGURE.findall(re.sub(r"`[^`]*`", "", body)):  # commands in code spans are not figures
            if fig.replace(",", "") not in figures:
                missing.append(f"{folder_name}: {fig}")
    return missing


def test_every_figure_docs_studies_quotes_is_in_its_committed_run():
    doc = (REPO / "docs" / "studies.md").read_text(encoding="utf-8")
    blocks = BLOCK.findall(doc)
    assert blocks, "docs/studies.md quotes no committed run"
    for folder_name, body in blocks:
        folder = REPO / folder_name
        assert folder.is_dir() and folder.relative_to(REPO / "docs"), f"{folder_name} is not a folder under docs/"
        for name in RAW_FILES:
            assert (folder / name).is_file(), f"{folder_name}/{name} is not committed"
        assert FIGURE.search(body), f"the block of {folder_name} quotes no figure"
    assert unfound(doc) == []


def test_the_checker_catches_a_figure_the_run_did_not_produce(tmp_path):
    run = tmp_path / "docs" / "results" / "run"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"stages": [{"variants": {"cnn": {"test_acc": 0.5103}},
                                                              "comparisons": [{"diff": -0.0442, "lr": 0.4}]}]}))
    (run / "report.md").write_text("CNN 51.0 ± 1.1 %\n")
    good = ("<!-- results: docs/results/run -->\n| CNN | 51.0 ± 1.1 %, 51.03 %, −4.4 points at LR 0.4 "
            "(`--lr 9.99`) |\n<!-- /results -->")
    assert unfound(good, tmp_path) == []
    bad = good.replace("51.03", "51.30").replace("−4.4", "−4.5")
    assert unfound(bad, tmp_path) == ["docs/results/run: 51.30", "docs/results/run: 4.5"]
