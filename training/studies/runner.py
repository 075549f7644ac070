"""The study runner: a grid of (dataset x variant x seed) cells, trained through the engine, recorded in
one results database, resumable, and spread over as many worker processes or machines as you start.

Why Optuna's RDB storage with its GridSampler: the tuning stage already keeps its trials there, and it
gives the grid everything a runner needs without a second mechanism. A cell is a trial; the sampler
hands each worker a cell no one has started; a finished cell is a COMPLETE trial whose user attribute
"record" holds everything measured (config, seed, history, accuracy, times, parameters); a worker that
dies leaves a RUNNING trial whose heartbeat stops, and the next worker to look marks it failed and
queues its cell again (RetryHeartbeatStaleTrialCallback). The storage is a SQLite file by default (one
results file, no set-up) or any database URL (PostgreSQL for many machines), and optuna-dashboard shows
the grid filling in live.

    spec = GridSpec(name="kernels", cells=[Cell("cifar10", "3x3", 0), ...], config={...}, run_cell=fn)
    records = run_grid(spec, storage_url)          # returns when every cell is done
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

# A worker beats every HEARTBEAT_S; one silent for GRACE_S is dead: its cell is queued again.
GRACE_S = int(os.environ.get("LAB_STUDY_GRACE_S", "30"))
HEARTBEAT_S = max(1, GRACE_S // 3)


class StudyError(RuntimeError):
    """A study that cannot run as asked (another configuration in the storage, a bad URL): one line."""


@dataclass(frozen=True)
class Cell:
    dataset: str
    variant: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.variant}/seed{self.seed}"

    @classmethod
    def parse(cls, cid: str) -> "Cell":
        dataset, variant, seed = cid.rsplit("/", 2)
        return cls(dataset, variant, int(seed.removeprefix("seed")))


@dataclass
class GridSpec:
    name: str                                  # the study's name in the storage
    cells: list[Cell]
    config: dict                               # what the cells mean: a different config is another study
    run_cell: Callable[[Cell], dict] = field(repr=False)  # trains one cell, returns its record

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def storage_for(url: str):
    """An RDB storage with heartbeats: stale cells (a dead worker's) are queued again."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # heartbeats and their retry callback are marked experimental (since Optuna 2.8); we rely on them
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if "://" not in url:
        raise StudyError(f"storage {url!r} is not a database URL: use sqlite:///path/results.db or "
                         f"postgresql+psycopg://user@host:5432/db")
    try:
        engine = {"pool_pre_ping": True}
        if url.startswith("sqlite"):  # several local processes on one file: wait for the lock, do not fail
            engine["connect_args"] = {"timeout": 60}
        return _open_racing_schema_creation(lambda: RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3), engine_kwargs=engine))
    except Exception as e:  # an unknown driver, a database that does not answer, a bad URL
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"cannot open the study storage {_safe_url(url)}: {type(e).__name__}: {reason}. "
                         f"Check the URL, and that the database server is running") from None
    finally:
        del optuna


def _open_racing_schema_creation(open_storage, attempts: int = 5):
    """open_storage(), opened again when it lost a race to create the schema.

    RDBStorage creates its tables, its version row and alembic's stamp check-then-create. Workers that
    open an empty database at the same moment race there: the losers fail with "relation ... already
    exists" or a duplicate key (PostgreSQL), though the schema they wanted is now there. Opened again,
    they find it and go on. Any other error is raised at once."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return open_storage()
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError) as e:
            text = str(e).lower()
            lost_race = "already exists" in text or "duplicate key" in text or "unique constraint" in text
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return url


def open_study(spec: GridSpec, url: str, fresh: bool = False):
    import optuna

    storage = storage_for(url)
    if fresh:
        try:
            optuna.delete_study(study_name=spec.name, storage=storage)
        except KeyError:
            pass
    sampler = optuna.samplers.GridSampler({"cell": [c.id for c in spec.cells]}, seed=0)
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                direction="maximize", load_if_exists=True)
    have = study.user_attrs.get("config_hash")
    if have is None:
        study.set_user_attr("config_hash", spec.config_hash)
        study.set_user_attr("config", json.loads(json.dumps(spec.config, default=str)))
    elif have != spec.config_hash:
        raise StudyError(f"the storage {_safe_url(url)} holds a study {spec.name!r} made with another configuration "
                         f"({have} vs {spec.config_hash}): its finished cells stay there; pass --fresh to start "
                         f"this study over, or use another --study-storage")
    return study


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def records(study) -> dict[str, dict]:
    """cell id -> the record of its first COMPLETE trial."""
    from optuna.trial import TrialState

    out = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        cid = t.params.get("cell")
        if cid is not None and cid not in out and "record" in t.user_attrs:
            out[cid] = t.user_attrs["record"]
    return out


def _cell_of(trial) -> str | None:
    """The cell a trial is (or will be) about: its parameter, or its queued parameter."""
    return trial.params.get("cell") or trial.system_attrs.get("fixed_params", {}).get("cell")


def run_grid(spec: GridSpec, url: str, *, fresh: bool = False, progress: bool = True, log=print,
             wait_for_others: bool = True) -> dict[str, dict]:
    """Run every cell of the grid not yet done (by this or any other worker); returns cell id -> record."""
    import optuna
    from optuna.trial import TrialState
    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, url, fresh=fresh)
    wanted = {c.id for c in spec.cells}
    done = set(records(study)) & wanted
    if done:
        log(f"  {spec.name}: {len(done)}/{len(wanted)} cells already done in {_safe_url(url)}")
    bar = tqdm(total=len(wanted), initial=len(done), desc=spec.name, disable=not progress, file=sys.stderr,
               leave=False)

    def objective(trial):
        cid = trial.suggest_categorical("cell", sorted(wanted))
        trial.set_user_attr("worker", _worker_id())
        if cid in records(study):  # another worker finished it meanwhile (the grid's end is racy)
            raise optuna.TrialPruned(f"{cid} is already done")
        t0 = time.perf_counter()
        record = spec.run_cell(Cell.parse(cid))
        record.update(cell=cid, worker=_worker_id(), cell_seconds=round(time.perf_counter() - t0, 2))
        trial.set_user_attr("record", json.loads(json.dumps(record, default=float)))
        bar.update(1)
        scored = "test" if "test_acc" in record else "val"  # cells that choose settings never see the test set
        log(f"  {spec.name} {cid}: {scored} accuracy {100 * record[f'{scored}_acc']:.2f}% "
            f"({record['cell_seconds']:.0f} s)")
        return record[f"{scored}_acc"]

    while True:
        missing = wanted - set(records(study))
        if not missing:
            break
        trials = study.get_trials(deepcopy=False)
        busy = {_cell_of(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        tried = {_cell_of(t) for t in trials}
        for cid in sorted((missing & tried) - busy):  # failed before (a crash, an error): queue it again,
            study.enqueue_trial({"cell": cid})        # the grid sampler counts a failed cell as visited
        todo = missing - {_cell_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if todo:
            study.optimize(objective, n_trials=len(todo), catch=())
            continue
        if not wait_for_others:
            break
        # every missing cell is RUNNING: another worker's, or a dead one's (failed after GRACE_S, then queued)
        time.sleep(min(5, GRACE_S))
        optuna.storages.fail_stale_trials(study)
    bar.close()
    got = records(study)
    return {cid: got[cid] for cid in sorted(wanted) if cid in got}
