"""Every comparison the study report makes, declared here before any cell runs: one family, corrected
together with Holm's step-down method (training/studies/stats.py).

Why one family for the whole report: a reader takes its "established" verdicts together, as the report's
findings. Corrected stage by stage (as the report did before), each stage kept its own chance of a false
"established" at 5 %, so the report as a whole had up to 1 - 0.95^7, about 30 %, over its 7 stages that
compare; one family over every declared comparison keeps it at 5 % for the whole report. The price is
power: at 3 seeds only large differences survive 30 comparisons, and the report says "not established"
for the rest (more seeds, `--preset full`, or a stage's single question asked alone with
`bench/study_pair.py`, whose family is that one comparison).

The family is fixed by the preset before anything runs: every stage's declared pairs (they live beside
the stage's variants: architectures.py, optimizers.py), the optimizers' stability measures against SGD
(two per optimizer on the seeds' CNN: declared_measures), the tuning stage's tuned-vs-baseline question,
and the hand-written ResNet-50's AdaMax vs Adam where the preset compares it (`full`; a demonstration
elsewhere). A declared comparison not measured (its stage has not run, the tuning stage's best trial is
the baseline itself) counts with p = 1. Holm's adjusted p-values never rise when a p-value falls, so a
verdict a stage writes before the others have run can only be conservative; `finalize`, called when the
report is assembled, corrects again with every stage's p-values and rewrites the verdicts.

Each stage keeps its comparisons' raw p-values in <studies dir>/<stage>/results.json (Section.write).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from training.studies.stats import Comparison, holm

NAME = "the report's one family of declared comparisons, training/studies/family.py"
TUNING = (("tuned", "untuned baseline", ""),)


def declared(preset: str) -> dict[str, tuple[tuple[str, str, str], ...]]:
    """stage -> its declared (a, b, note) comparisons, in report order."""
    from training.studies import architectures as A
    from training.studies import optimizers as O
    from training.studies import scratch as S

    out = {"headline": A.HEADLINE_COMPARISONS, "architectures": A.ARCHITECTURE_COMPARISONS,
           "kernels": A.KERNEL_COMPARISONS, "depth": A.DEPTH_COMPARISONS, "blocks": A.BLOCK_COMPARISONS,
           "optimizers": O.COMPARISONS, "tuning": TUNING}
    if S.compares_resnet50(preset):
        a, b = list(S.RESNET_OPTIMIZERS)
        out["scratch"] = ((a, b, ""),)
    return out


def declared_measures(preset: str) -> dict[str, tuple[tuple[str, str, str], ...]]:
    """stage -> its declared (a, b, measure) comparisons of a measure with one value per seed (the optimizers'
    stability: training/studies/optimizers.py), in report order."""
    from training.studies import optimizers as O

    return {"optimizers": tuple((a, b, m) for a, b in O.STABILITY_COMPARISONS for m in O.STABILITY_MEASURES)}


def key(stage: str, a: str, b: str, measure: str = "") -> str:
    """A comparison's name in the family. A name in the report may add a remark in parentheses to the
    declared one ("tuned (trial 21)" is "tuned"); a measure other than test accuracy follows in brackets."""
    return f"{stage}: {a.split(' (')[0]} − {b.split(' (')[0]}" + (f" [{measure}]" if measure else "")


def keys(preset: str) -> list[str]:
    return ([key(stage, a, b) for stage, pairs in declared(preset).items() for a, b, _ in pairs]
            + [key(stage, a, b, m) for stage, triples in declared_measures(preset).items() for a, b, m in triples])


def size(preset: str) -> int:
    return len(keys(preset))


def stored(out_dir: Path, stage: str) -> list[Comparison]:
    """The comparisons a stage wrote to its results.json (none when it has not run)."""
    path = Path(out_dir) / stage / "results.json"
    if not path.exists():
        return []
    return [Comparison.from_row(r) for r in json.loads(path.read_text()).get("comparisons", [])]


def correct(out_dir: Path, preset: str, measured: dict[str, list[Comparison]]) -> dict[str, list[Comparison]]:
    """The comparisons of the stages in `measured`, Holm-corrected over the whole family: the other
    stages' p-values as they stored them, p = 1 for the declared comparisons not measured."""
    family = keys(preset)
    p = {k: 1.0 for k in family}
    stages = set(declared(preset)) | set(declared_measures(preset)) | set(measured)
    for stage in stages:
        for c in measured.get(stage, stored(out_dir, stage) if stage not in measured else []):
            k = key(stage, c.a, c.b, c.measure)
            if k not in p:
                raise ValueError(f"the comparison {k!r} is not declared in training/studies/family.py "
                                 f"(declared: {', '.join(family)})")
            p[k] = c.p
    adjusted = dict(zip(family, holm([p[k] for k in family])))
    return {stage: [replace(c, p_holm=adjusted[key(stage, c.a, c.b, c.measure)], family=NAME, family_size=len(family))
                    for c in found] for stage, found in measured.items()}


def finalize(out_dir: Path, preset: str, stages: list[str]) -> list[dict]:
    """Correct every stored comparison of these stages over the family, rewrite each stage's verdicts
    (section.md, results.json, results.csv), and return the stages' results for the report's own files."""
    from training.studies.common import derived_text, write_results_csv

    results = {}
    for stage in stages:
        path = Path(out_dir) / stage / "results.json"
        if path.exists():
            results[stage] = json.loads(path.read_text())
    measured = {stage: [Comparison.from_row(r) for r in res.get("comparisons", [])] for stage, res in results.items()}
    fixed = correct(out_dir, preset, measured)
    for stage, res in results.items():
        section = Path(out_dir) / stage / "section.md"
        text = section.read_text() if section.exists() else ""
        rows = []
        for old, c in zip(res.get("comparisons", []), fixed[stage]):
            line = c.sentence(prefix=old.get("prefix", ""))
            text = text.replace(old["sentence"], line)
            rows.append({**c.row(), "prefix": old.get("prefix", ""), "sentence": str(line)})
        res["comparisons"] = rows
        for d in res.get("derived", []):  # text judged from the verdicts: written again from the corrected ones
            new = derived_text(d["fn"], fixed[stage], d["data"])
            text, d["text"] = text.replace(d["text"], new), new
        if section.exists():
            section.write_text(text)
        (Path(out_dir) / stage / "results.json").write_text(json.dumps(res, indent=1, default=float))
        write_results_csv(Path(out_dir) / stage / "results.csv", [res])
    return list(results.values())
