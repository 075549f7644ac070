"""Each variant at its own learning rate: a short sweep scored on held-out training images, bracketed.

    lrs = sweep_lrs(ctx, "kernels", "cifar10", {"3x3": 0.05, "5x5": 0.05}, run)  # variant -> starting LR
    lrs["3x3"].chosen                                                              # the LR the study uses

The sweep trains every variant at its starting LR times START on SWEEP_SEED (a seed no evaluation
cell uses) for a quarter of the stage's epochs (SWEEP_FRACTION, at least one), with the schedule compressed to that length, and scores the
accuracy on the held-out split (`train_cell(..., evaluate_on="val")`: the test images are never read).
A winner at the edge of what was tried is not a choice: the grid is extended by one step beyond that
edge (x or / `factor`) and the new points are trained, until the best LR has a worse neighbour on both
sides or MAX_EXTENSIONS is spent (then the sweep says "unbracketed"). A run whose loss became
non-finite scores 0. Each round is a grid of the study runner, so an interrupted sweep resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from training.studies.common import StudyContext, grid
from training.studies.runner import Cell, GridSpec

START = (0.5, 1.0, 2.0)    # multiples of a variant's starting LR tried first
FACTOR = 2.0               # one step of the grid, and of each extension
MAX_EXTENSIONS = 3         # rounds that extend the grid past an edge winner
SWEEP_SEED = 100           # weights and batch order of sweep cells: never an evaluation seed
SWEEP_FRACTION = 0.25      # of a stage's epochs (or passes) that a sweep cell trains


def sweep_epochs(epochs: float) -> float:
    """Epochs of a sweep cell for a stage whose evaluation cells train `epochs`."""
    return max(1.0, epochs * SWEEP_FRACTION)


@dataclass
class LRChoice:
    variant: str
    tried: dict[float, float] = field(default_factory=dict)   # LR -> held-out accuracy (0 when it diverged)
    diverged: set[float] = field(default_factory=set)

    @property
    def chosen(self) -> float:
        # ties go to the smaller LR: the safer of two equal choices
        return max(sorted(self.tried), key=lambda lr: self.tried[lr])

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
        """What the results files keep: every LR tried with its held-out accuracy, the choice, the seed."""
        return {"tried": {lr_key(lr): acc for lr, acc in sorted(self.tried.items())}, "chosen": self.chosen,
                "bracketed": self.bracketed, "diverged": sorted(self.diverged), "seed": SWEEP_SEED}

    def cells(self) -> str:
        return ", ".join(f"{'**' if lr == self.chosen else ''}{lr:.3g}: "
                         f"{'diverged' if lr in self.diverged else f'{100 * acc:.1f}%'}"
                         f"{'**' if lr == self.chosen else ''}" for lr, acc in sorted(self.tried.items()))


def lr_key(lr: float) -> str:
    return f"{lr:.4g}"


def sweep_lrs(ctx: StudyContext, stage: str, dataset: str, start: dict[str, float | tuple[float, ...]],
              run_cell: Callable[[str, float, int, float], dict], *, factor: float = FACTOR,
              epochs: float | None = None, config: dict | None = None) -> dict[str, LRChoice]:
    """variant -> its LRChoice. `start` gives a starting LR (tried at START multiples) or the grid itself.
    run_cell(variant, lr, seed, epochs) trains one sweep cell with evaluate_on="val" and returns its record."""
    epochs = epochs if epochs is not None else sweep_epochs(ctx.preset.epochs_for(stage))
    if ctx.preset.name == "smoke":  # the tests: two points, no extension, so that smoke stays seconds
        grids = {v: tuple(g[:2]) if isinstance(g, tuple) else (g, g * factor) for v, g in start.items()}
        rounds = 1
    else:
        grids = {v: tuple(g) if isinstance(g, tuple) else tuple(g * m for m in START) for v, g in start.items()}
        rounds = 1 + MAX_EXTENSIONS
    choices = {v: LRChoice(v) for v in start}
    todo = {v: list(g) for v, g in grids.items()}
    for r in range(rounds):
        cells = [Cell(dataset, f"{v}@{lr_key(lr)}", SWEEP_SEED) for v, lrs in todo.items() for lr in lrs]
        if not cells:
            break

        def run(cell: Cell) -> dict:
            v, lr = cell.variant.split("@")
            return run_cell(v, float(lr), cell.seed, epochs)

        spec = GridSpec(f"{stage}-lr-sweep-{r}", cells,
                        {"stage": stage, "round": r, "cells": [c.id for c in cells], "epochs": epochs,
                         "preset": ctx.preset.name, "train_limit": ctx.preset.train_limit,
                         "val_images": ctx.preset.val_images, "data_seed": ctx.data_seed, **(config or {})}, run)
        for cid, rec in grid(ctx, spec).items():
            v, lr = Cell.parse(cid).variant.split("@")
            choices[v].tried[float(lr)] = 0.0 if rec.get("diverged") else rec["val_acc"]
            if rec.get("diverged"):
                choices[v].diverged.add(float(lr))
        todo = {}
        for v, c in choices.items():
            nxt = c.next_lr(factor)
            if nxt is not None and r + 1 < rounds:
                todo[v] = [float(lr_key(nxt))]
    return choices


def sweep_table(choices: dict[str, LRChoice], epochs: float) -> tuple[list[str], list[list]]:
    header = ["variant", f"held-out accuracy per LR (sweep seed {SWEEP_SEED}, {epochs:g} epoch(s))", "chosen LR",
              "bracketed"]
    rows = [[v, c.cells(), f"{c.chosen:.3g}", "yes" if c.bracketed else "**no** (best at the edge of the grid)"]
            for v, c in choices.items()]
    return header, rows
