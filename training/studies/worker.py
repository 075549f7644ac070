"""A helper worker: runs cells of one grid of a study stage until none is left, then exits (no report). It
runs the stage from its start, so that the grids before its own (finished: their records are read back)
decide what its grid holds, as they did in the process that started it (an LR sweep's later rounds).

Started by the stage itself for --study-workers N on one machine; on other machines, start the same
`run_all.py --only <stage> --study-storage <shared database URL>` command instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    from training.studies import STAGES
    from training.studies.common import StudyContext, WorkerDone, get_study_preset

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stage", choices=list(STAGES))
    ap.add_argument("--grid", required=True, help="the stage's grid to work on (the grids before it are finished)")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ctx = StudyContext(get_study_preset(args.preset), args.data_root, args.out, args.storage, command="",
                       progress=False, log=lambda *_: None, data_seed=args.data_seed, workers=args.workers,
                       is_worker=True, stage=args.stage, join=args.grid)
    try:
        STAGES[args.stage](ctx, "")
    except WorkerDone:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
