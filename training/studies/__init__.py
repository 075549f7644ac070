"""The studies: run_all.py stages that train grids of models over seeds and write the study report.

    python training/run_all.py --only architectures,kernels,depth,blocks     # issue 10's four stages
    python training/run_all.py --only kernels --study-storage postgresql+psycopg://postgres@127.0.0.1/test

Each stage writes <studies dir>/<stage>/section.md with its plots; `write_report` joins the sections
present into report.md and a self-contained report.html. The results of every cell live in one
database (SQLite file <studies dir>/results.db by default): a rerun skips finished cells.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from training.studies.common import StudyContext

# stage name -> function(ctx, command) -> Section; filled in below, in report order
STAGES: dict[str, Callable] = {}
# stages that run only when named (--only headline): not in the "studies" group, not in a default run
OPTIONAL_STAGES = ("headline",)


def _register() -> None:
    from training.studies import architectures

    STAGES["headline"] = architectures.headline  # first in the report: what the others lead up to
    STAGES.update(architectures.STAGES)
    try:  # stages that arrive with later work register themselves here
        from training.studies import optimizers
        STAGES.update(optimizers.STAGES)
    except ImportError:
        pass
    STAGES["tuning"] = _tuning
    try:
        from training.studies import scratch
        STAGES.update(scratch.STAGES)
    except ImportError:
        pass


def _tuning(ctx: StudyContext, command: str):
    """The Optuna stage (training/tuning.py), imported when it runs: training.tuning imports this package."""
    from training.tuning import tuning_stage

    return tuning_stage(ctx, command)


_register()


def write_report(ctx: StudyContext, title: str = "Model lab: studies") -> Path:
    """report.md (and report.html) from the sections written so far, in stage order."""
    parts = [f"# {title}", "",
             f"Preset **{ctx.preset.name}**: {ctx.preset.description}. Every figure is mean ± standard deviation "
             f"over seeds {', '.join(map(str, ctx.preset.seeds))} (initial weights and batch order differ; the data "
             f"split is fixed by data seed {ctx.data_seed}), with the command that reproduces its section. Every "
             "variant trains at its own learning rate, chosen on held-out training images; every comparison is a "
             "difference with a 95 % interval over seeds and test images and a Holm-corrected verdict "
             "(docs/studies.md, 'The protocol').", ""]
    for stage in STAGES:
        section = ctx.out_dir / stage / "section.md"
        if section.exists():
            parts += [section.read_text(), ""]
    md = ctx.out_dir / "report.md"
    md.write_text("\n".join(parts))
    from lab.report_html import write_html

    write_html(md, title)  # report.html beside it: self-contained, with a table of contents
    return md
