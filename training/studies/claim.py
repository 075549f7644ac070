"""Who does the work that follows a study, among all the processes that share its storage: a claim recorded
atomically in the study's own database.

Several processes (on one machine or many) finish a study together; what comes after it (the test-set
comparison, the report, the published model) must be done by exactly one of them. Each one that sees the
study complete calls `take(url, key)`: one row per key in the table `lab_claims` of the same database (SQLite
or PostgreSQL, whatever the study uses), created by a plain INSERT on a primary key, so the database lets
exactly one process win; the others read who holds it and leave. No file lock: workers on other machines
meet the same row.

The holder beats while it works (`Claim.held()`, every HEARTBEAT_S, in the database's clock). A claim whose
holder stopped beating for GRACE_S, or whose holder is a dead process on this machine, is taken over by the
next process that asks (a compare-and-swap on the holder and its beat count), so a killed publisher does not
block the study: rerun the command. A holder that fails releases its claim; one that finishes marks it done
with its result (`Claim.finish`), or releases it when the work may be done again (`Claim.release`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from training.studies.runner import GRACE_S, HEARTBEAT_S, StudyError, _open_racing_schema_creation, _safe_url

TABLE = "lab_claims"
_ENGINES: dict = {}


def me() -> str:
    """This process, as the trials record their worker: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _table():
    import sqlalchemy as sa

    meta = sa.MetaData()
    return sa.Table(TABLE, meta,
                    sa.Column("key", sa.String(512), primary_key=True),
                    sa.Column("holder", sa.String(255), nullable=False),    # host:pid
                    sa.Column("state", sa.String(16), nullable=False),     # running | done
                    sa.Column("beat", sa.Integer, nullable=False),         # counts heartbeats: the swap's guard
                    sa.Column("claimed", sa.DateTime, nullable=False),     # database clock
                    sa.Column("heartbeat", sa.DateTime, nullable=False),   # database clock
                    sa.Column("result", sa.Text, nullable=True))           # JSON, once done


def _engine(url: str):
    """(engine, table) for this database URL; the table is created if missing (racing workers tolerated)."""
    if url not in _ENGINES:
        import sqlalchemy as sa

        kw = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 60}
        try:
            engine = sa.create_engine(url, **kw)
            table = _table()
            _open_racing_schema_creation(lambda: table.metadata.create_all(engine))
        except Exception as e:
            raise StudyError(f"cannot record a claim in {_safe_url(url)}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        _ENGINES[url] = (engine, table)
    return _ENGINES[url]


def _alive_here(holder: str) -> bool | None:
    """Whether holder (host:pid) is a live process; None when it runs on another machine (unknown)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass
class Claim:
    url: str
    key: str
    holder: str                  # host:pid of the process that holds the claim
    mine: bool                   # this process holds it
    state: str                   # running | done
    result: dict | None = None   # what the holder recorded when it finished
    taken_over: str = ""         # the stale holder this process took the claim from
    lost: bool = field(default=False, repr=False)  # set by the heartbeat when the claim went to another

    def _where(self):
        engine, t = _engine(self.url)
        return engine, t, (t.c.key == self.key) & (t.c.holder == self.holder)

    def beat(self) -> bool:
        """One heartbeat; False when the claim is no longer this process's."""
        import sqlalchemy as sa

        engine, t, where = self._where()
        with engine.begin() as conn:
            n = conn.execute(sa.update(t).where(where & (t.c.state == "running"))
                             .values(heartbeat=sa.func.now(), beat=t.c.beat + 1)).rowcount
        if n != 1:
            self.lost = True
        return n == 1

    def check(self) -> None:
        """Raise StudyError unless this process still holds the claim (before an act that must happen once)."""
        if not self.mine or self.lost or not self.beat():
            raise StudyError(f"the claim {self.key!r} is no longer this process's ({me()}): another process "
                             f"took it over (this one was silent for over {GRACE_S} s); nothing published here")

    def finish(self, result: dict | None = None) -> None:
        """Mark the work done, with its result: later processes report it and do nothing."""
        import sqlalchemy as sa

        engine, t, where = self._where()
        with engine.begin() as conn:
            conn.execute(sa.update(t).where(where).values(state="done", result=json.dumps(result, default=str)))
        self.state, self.result = "done", result

    def release(self) -> None:
        """Give the claim up (the work failed, or may be done again): the next process to ask takes it."""
        import sqlalchemy as sa

        engine, t, where = self._where()
        with engine.begin() as conn:
            conn.execute(sa.delete(t).where(where & (t.c.state == "running")))

    @contextmanager
    def held(self):
        """Beat every HEARTBEAT_S while the block runs; release the claim if the block raises (a
        KeyboardInterrupt included), unless it finished first."""
        stop = threading.Event()

        def loop():
            while not stop.wait(HEARTBEAT_S):
                try:
                    if not self.beat():
                        return
                except Exception:  # the database is away for a moment: the next beat tries again
                    pass

        thread = threading.Thread(target=loop, name="claim-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        except BaseException:
            stop.set()
            thread.join()
            if self.state != "done":
                try:
                    self.release()
                except Exception:
                    pass
            raise
        finally:
            stop.set()
            thread.join()


def take(url: str, key: str, holder: str | None = None) -> Claim:
    """Claim `key` in the database at `url` for this process, atomically; the Claim says who holds it.

    A stale claim (no heartbeat for GRACE_S, or its holder a dead process on this machine) is taken over."""
    import sqlalchemy as sa
    import sqlalchemy.exc

    holder = holder or me()
    engine, t = _engine(url)
    for _ in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(sa.insert(t).values(key=key, holder=holder, state="running", beat=0,
                                                 claimed=sa.func.now(), heartbeat=sa.func.now()))
            return Claim(url, key, holder, True, "running")
        except sqlalchemy.exc.IntegrityError:  # the key exists: someone holds it, or held it
            pass
        with engine.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.key == key)).one_or_none()
            if row is None:  # released meanwhile: try again
                continue
            result = json.loads(row.result) if row.result else None
            if row.state == "done":
                return Claim(url, key, row.holder, row.holder == holder, "done", result)
            now = conn.execute(sa.select(sa.func.now())).scalar()
            silent = now.replace(tzinfo=None) - row.heartbeat.replace(tzinfo=None)
            alive = _alive_here(row.holder)
            if row.holder == holder or alive is False or silent > timedelta(seconds=GRACE_S):
                n = conn.execute(sa.update(t).where((t.c.key == key) & (t.c.holder == row.holder)
                                                    & (t.c.beat == row.beat) & (t.c.state == "running"))
                                 .values(holder=holder, beat=row.beat + 1, claimed=sa.func.now(),
                                         heartbeat=sa.func.now())).rowcount
                if n == 1:
                    return Claim(url, key, holder, True, "running",
                                 taken_over="" if row.holder == holder else row.holder)
                continue  # another process swapped first: read again
            return Claim(url, key, row.holder, False, "running")
    raise StudyError(f"could not read or take the claim {key!r} in {_safe_url(url)}")
