"""Each variant at its own learning rate: a sweep scored on held-out training images, bracketed.

    lrs = sweep_lrs(ctx, "kernels", "cifar10", {"3x3": 0.05, "5x5": 0.05}, run)  # variant -> starting LR
    lrs["3x3"].chosen                                                              # the LR the study uses

The sweep trains every variant at its starting LR times START on each of SWEEP_SEEDS (seeds no evaluation
cell uses) for as many epochs as the evaluation cells it chooses for, with their schedule, and scores the
mean held-out accuracy over those seeds (`train_cell(..., evaluate_on="val")`: the test images are never
read). Why the cells' length and more than one seed: an LR chosen after a quarter of the training, with
the schedule squeezed into it, is the best LR for a shorter run than the one reported, and one seed's
held-out accuracy separates nearly tied LRs by chance, while at a few epochs the choice moves a result by
points. (The smoke preset, for the tests, sweeps two LRs on one seed, with no extension.)

A winner at the edge of what was tried is not a choice: the grid is extended by one step beyond that
edge (x or / `factor`) and the new points are trained, until the best LR has a worse neighbour on both
sides or MAX_EXTENSIONS is spent (then the sweep says "unbracketed", and every comparison naming the
variant says "not established (LR not bracketed)": at an LR not tried it may do better). A run whose loss
became non-finite scores 0 for its seed. Each round is a grid of the study runner, so an interrupted sweep
resumes. The cost: every LR tried trains len(SWEEP_SEEDS) cells of full length, so a sweep of 3 LRs costs
twice the variant's 3 evaluation cells (bench/study_budget.py predicts it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from training.studies.common import StudyContext, grid
from training.studies.runner import Cell, GridSpec

START = (0.5, 1.0, 2.0)    # multiples of a variant's starting LR tried first
FACTOR = 2.0               # one step of the grid, and of each extension
MAX_EXTENSIONS = 3         # rounds that extend the grid past an edge winner
SWEEP_SEEDS = (100, 101)   # weights and batch order of sweep cells: never an evaluation seed


def sweep_epochs(epochs: float) -> float:
    """Epochs of a sweep cell for a stage whose evaluation cells train `epochs`: as many."""
    return epochs


@dataclass
class LRChoice:
    variant: str
    scores: dict[float, dict[int, float]] = field(default_factory=dict)  # LR -> seed -> held-out accuracy
    diverged: set[float] = field(default_factory=set)                     # LRs with a seed that diverged

    @property
    def tried(self) -> dict[float, float]:
        """LR -> mean held-out accuracy over the sweep seeds (a seed that diverged counts 0)."""
        return {lr: sum(by.values()) / len(by) for lr, by in self.scores.items()}

    def add(self, lr: float, seed: int, acc: float, diverged: bool = False) -> None:
        self.scores.setdefault(lr, {})[seed] = 0.0 if diverged else acc
        if diverged:
            self.diverged.add(lr)

    @property
    def chosen(self) -> float:
        # ties go to the smaller LR: the safer of two equal choices
        tried = self.tried
        return max(sorted(tried), key=lambda lr: tried[lr])

    @property
    def bracketed(self) -> bool:
        lrs = sorted(self.tried)
        return len(lrs) >= 3 and lrs[0] < self.chosen < lrs[-1]

    def next_lr(self, factor: float) -> float | None:
        """The LR past the edge the winner sits on, or None when the winner is bracketed."""
        if self.bracketed:
            return None
        lrs = sorted(self.tried)
        return lrs[0] / factor if self.chosen == lrs[0] else lrs[-1] * factor

    def as_dict(self) -> dict:
        """What the results files keep: every LR tried with its mean held-out accuracy and each seed's, the
        choice, whether it is bracketed, the seeds."""
        return {"tried": {lr_key(lr): acc for lr, acc in sorted(self.tried.items())},
                "per_seed": {lr_key(lr): {str(s): a for s, a in sorted(by.items())}
                             for lr, by in sorted(self.scores.items())},
                "chosen": self.chosen, "bracketed": self.bracketed, "diverged": sorted(self.diverged),
                "seeds": sorted({s for by in self.scores.values() for s in by})}

    def cells(self) -> str:
        """'0.025: 41.0% (40.2, 41.8), **0.05: 43.1% (42.8, 43.4)**, ...': the mean, then each seed's."""
        chosen = self.chosen

        def one(lr: float, acc: float) -> str:
            seeds = ", ".join("diverged" if lr in self.diverged and a == 0 else f"{100 * a:.1f}"
                              for _, a in sorted(self.scores[lr].items()))
            bold = "**" if lr == chosen else ""
            return f"{bold}{lr:.3g}: {100 * acc:.1f}% ({seeds}){bold}"

        return ", ".join(one(lr, acc) for lr, acc in sorted(self.tried.items()))


def lr_key(lr: float) -> str:
    return f"{lr:.4g}"


def sweep_seeds(ctx: StudyContext) -> tuple[int, ...]:
    """The seeds a sweep trains each LR on: SWEEP_SEEDS; one of them on smoke, whose sweeps are cut to
    seconds for the tests (two LRs, no extension, one seed)."""
    return SWEEP_SEEDS[:1] if ctx.preset.name == "smoke" else SWEEP_SEEDS


def sweep_lrs(ctx: StudyContext, stage: str, dataset: str | dict[str, str],
              start: dict[str, float | tuple[float, ...]], run_cell: Callable[[str, float, int, float], dict], *,
              factor: float = FACTOR, epochs: float | None = None, config: dict | None = None) -> dict[str, LRChoice]:
    """variant -> its LRChoice. `start` gives a starting LR (tried at START multiples) or the grid itself;
    `dataset` names the variants' dataset, or each one's (variant -> dataset). run_cell(variant, lr, seed,
    epochs) trains one sweep cell with evaluate_on="val" and returns its record."""
    epochs = epochs if epochs is not None else sweep_epochs(ctx.preset.epochs_for(stage))
    data = dataset if isinstance(dataset, dict) else {v: dataset for v in start}
    seeds = sweep_seeds(ctx)
    if ctx.preset.name == "smoke":  # the tests: two points, no extension, so that smoke stays seconds
        grids = {v: tuple(g[:2]) if isinstance(g, tuple) else (g, g * factor) for v, g in start.items()}
        rounds = 1
    else:
        grids = {v: tuple(g) if isinstance(g, tuple) else tuple(g * m for m in START) for v, g in start.items()}
        rounds = 1 + MAX_EXTENSIONS
    choices = {v: LRChoice(v) for v in start}
    todo = {v: list(g) for v, g in grids.items()}
    for r in range(rounds):
        cells = [Cell(data[v], f"{v}@{lr_key(lr)}", seed) for v, lrs in todo.items() for lr in lrs for seed in seeds]
        if not cells:
            break

        def run(cell: Cell) -> dict:
            v, lr = cell.variant.split("@")
            return run_cell(v, float(lr), cell.seed, epochs)

        spec = GridSpec(f"{stage}-lr-sweep-{r}", cells,
                        {"stage": stage, "round": r, "cells": [c.id for c in cells], "epochs": epochs,
                         "seeds": list(seeds),
                         "preset": ctx.preset.name, "train_limit": ctx.preset.train_limit,
                         "val_images": ctx.preset.val_images, "data_seed": ctx.data_seed, **(config or {})}, run)
        for cid, rec in grid(ctx, spec).items():
            cell = Cell.parse(cid)
            v, lr = cell.variant.split("@")
            choices[v].add(float(lr), cell.seed, rec["val_acc"], bool(rec.get("diverged")))
        todo = {}
        for v, c in choices.items():
            nxt = c.next_lr(factor)
            if nxt is not None and r + 1 < rounds:
                todo[v] = [float(lr_key(nxt))]
    return choices


def sweep_table(choices: dict[str, LRChoice], epochs: float) -> tuple[list[str], list[list]]:
    seeds = sorted({s for c in choices.values() for by in c.scores.values() for s in by})
    header = ["variant", f"held-out accuracy per LR, mean (per seed) over sweep seed(s) "
                         f"{', '.join(map(str, seeds))}, {epochs:g} epoch(s) as the cells train", "chosen LR",
              "bracketed"]
    rows = [[v, c.cells(), f"{c.chosen:.3g}", "yes" if c.bracketed else "**no** (best at the edge of the grid)"]
            for v, c in choices.items()]
    return header, rows


def unbracketed(choices: dict[str, dict], *variants: str) -> str:
    """Of these variants, those whose sweep (as_dict) did not bracket its choice, comma-separated: a
    comparison naming one of them gets no verdict (stats.Comparison.unbracketed)."""
    return ", ".join(v for v in variants if v in choices and not choices[v]["bracketed"])
