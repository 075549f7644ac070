"""The studies: run_all.py stages that train grids of models over seeds and write the study report.

    python training/run_all.py --only architectures,kernels,depth,blocks     # issue 10's four stages
    python training/run_all.py --only kernels --study-storage postgresql+psycopg://postgres@127.0.0.1/test

Each stage writes <studies dir>/<stage>/section.md with its plots and its raw results (results.json,
results.csv); `write_report` corrects every comparison over the report's one family
(training/studies/family.py) and joins the sections present into report.md, a self-contained report.html,
and the whole report's results.json and results.csv. The results of every cell live in one
database (SQLite file <studies dir>/results.db by default): a rerun skips finished cells.
"""
from __future__ import annotations

import json
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
    """report.md (and report.html) from the sections written so far, in stage order, every comparison's
    verdict corrected over the report's one family (training/studies/family.py), and the raw results of
    every stage beside it: results.json and results.csv."""
    from training.studies.common import write_results_csv
    from training.studies.family import finalize, size

    results = finalize(ctx.out_dir, ctx.preset.name, list(STAGES))
    m = size(ctx.preset.name)
    parts = [f"# {title}", "",
             f"Preset **{ctx.preset.name}**: {ctx.preset.description}. Every figure is mean ± standard deviation "
             f"over seeds {', '.join(map(str, ctx.preset.seeds))} (initial weights and batch order differ; the data "
             f"split is fixed by data seed {ctx.data_seed}), with the command that reproduces its section. Every "
             "variant trains at its own learning rate, chosen on held-out training images; every comparison is a "
             "difference with a 95 % t-interval over seeds and test images (Welch-Satterthwaite degrees of "
             "freedom) and a verdict (docs/studies.md, 'The protocol').", "",
             f"**One family of comparisons.** The report declares its {m} comparisons before any cell runs "
             "(training/studies/family.py), and Holm's correction runs over all of them together, not stage by "
             "stage: a reader takes the verdicts together, and corrected per stage the chance of at least one "
             "false \"established\" somewhere in the report grew with the number of stages (to about 30 % over 7 "
             "stages); over one family it stays at 5 %. A declared comparison whose stage has not run counts as not "
             "established (p = 1). At 3 seeds this leaves only large differences established.", "",
             "The raw results are beside this report: `results.json` and `results.csv` (every cell's seed, LR and "
             "accuracies, every LR each sweep tried, every comparison's difference, interval, degrees of freedom, "
             "p-value and Holm-adjusted p-value), and the same per stage in its folder.", ""]
    (ctx.out_dir / "results.json").write_text(json.dumps({"preset": ctx.preset.name, "family_size": m,
                                                          "stages": results}, indent=1, default=float))
    write_results_csv(ctx.out_dir / "results.csv", results)
    for stage in STAGES:
        section = ctx.out_dir / stage / "section.md"
        if section.exists():
            parts += [section.read_text(), ""]
    md = ctx.out_dir / "report.md"
    md.write_text("\n".join(parts))
    from lab.report_html import write_html

    write_html(md, title)  # report.html beside it: self-contained, with a table of contents
    return md
