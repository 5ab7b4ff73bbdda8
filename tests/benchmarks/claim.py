"""Claims per second: 8 processes claiming from 10,000 ready tasks through dispatch's own
claim step, beside 8 processes making raw claims of the same rows, in the same run.

Two parts share the processes, the seeding and the counting: `claim` on a SQLite file
(the raw claim is `BEGIN IMMEDIATE` and `UPDATE … RETURNING`), and `claim-postgresql`
on a private PostgreSQL server started as the tests start theirs (tests/postgres.py),
where the raw claim takes its row with `FOR UPDATE SKIP LOCKED`, as a fleet would.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import time
from dataclasses import dataclass
from typing import Any

from tests.benchmarks import seed
from tests.benchmarks.harness import BenchError, Figure, Lab, Mode, migrate

CLAIM_TASKS = 10_000
CLAIM_PROCESSES = 8
# A process gives up after this many failed claims: a broken store cannot spin forever.
MAX_ERRORS = 100

RAW_CLAIM = (
    "UPDATE tasks SET status = 'in-progress', updated_at = ? WHERE id = ("
    "SELECT id FROM tasks WHERE status = 'ready' AND closed_at IS NULL "
    "ORDER BY priority DESC, id LIMIT 1) RETURNING id"
)
# The target's baseline: a raw claim making the rows dispatch's claim makes (the
# attempt, the task's pointer to it, the event). The bare UPDATE is a note beside it.
RAW_CLAIM_WRITES = (
    "INSERT INTO attempts (task_id, number, state, prior_status, host, resume, intent, "
    "started_at) VALUES (?, 1, 'starting', 'ready', 'bench', 0, '{}', ?) RETURNING id",
    "UPDATE tasks SET current_attempt_id = ? WHERE id = ?",
    "INSERT INTO events (task_id, attempt_id, kind, from_status, to_status, at, detail) "
    "VALUES (?, ?, 'claimed', 'ready', 'in-progress', ?, '{}')",
)
# The same on PostgreSQL, where concurrent claimers skip each other's locked rows.
PG_RAW_CLAIM = (
    "UPDATE tasks SET status = 'in-progress', updated_at = %(now)s WHERE id = ("
    "SELECT id FROM tasks WHERE status = 'ready' AND closed_at IS NULL "
    "ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
)
PG_RAW_WRITES = (
    "INSERT INTO attempts (task_id, number, state, prior_status, host, resume, intent, "
    "started_at) VALUES (%(task)s, 1, 'starting', 'ready', 'bench', false, '{}', %(now)s) "
    "RETURNING id",
    "UPDATE tasks SET current_attempt_id = %(attempt)s WHERE id = %(task)s",
    "INSERT INTO events (task_id, attempt_id, kind, from_status, to_status, at, detail) "
    "VALUES (%(task)s, %(attempt)s, 'claimed', 'ready', 'in-progress', %(now)s, '{}')",
)


def _is_postgresql(db: str) -> bool:
    """A claim run's database: a SQLite file's path, or a PostgreSQL URL."""
    return "://" in db


def _libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


@dataclass
class Report:
    """What one claiming process sends back."""

    claimed: list[int]
    locked: int = 0  # "database is locked" (or busy) failures that reached the caller
    other: int = 0
    first_error: str = ""

    def failed(self, message: str) -> None:
        if "locked" in message or "busy" in message:
            self.locked += 1
        else:
            self.other += 1
        self.first_error = self.first_error or message

    @property
    def errors(self) -> int:
        return self.locked + self.other


def _ready_left(db: str) -> bool:
    con = sqlite3.connect(db, timeout=30)
    try:
        return (
            con.execute("SELECT 1 FROM tasks WHERE status = 'ready' LIMIT 1").fetchone() is not None
        )
    finally:
        con.close()


def _claim_with_dispatch(env: dict[str, str], cap: float, barrier: Any) -> Report:
    from dispatch.app import App
    from dispatch.config import load_settings
    from dispatch.errors import DispatchError
    from dispatch.services.dispatching import Dispatch, claim

    report = Report([])
    db = env["DISPATCH_DB"]
    app = App(load_settings(env=env))
    app.db.ensure_schema()
    barrier.wait()
    deadline = time.monotonic() + cap
    while report.errors < MAX_ERRORS and time.monotonic() < deadline:
        d = Dispatch(app, None)
        try:
            if not claim(d):
                break
        except Exception as exc:
            if not _is_postgresql(db) and not _ready_left(db):
                break  # however this version says "nothing ready", it is not an error
            report.failed(exc.message if isinstance(exc, DispatchError) else repr(exc))
            continue
        assert d.task_id is not None
        report.claimed.append(d.task_id)
    app.close()
    return report


def _claim_raw_sqlite(kind: str, db: str, cap: float, barrier: Any) -> Report:
    report = Report([])
    con = sqlite3.connect(db, isolation_level=None, timeout=5)
    # The same connection settings dispatch uses, so the ratio measures the store.
    con.execute("PRAGMA busy_timeout = 5000")
    con.execute("PRAGMA synchronous = NORMAL")
    barrier.wait()
    deadline = time.monotonic() + cap
    while report.errors < MAX_ERRORS and time.monotonic() < deadline:
        try:
            con.execute("BEGIN IMMEDIATE")
            now = time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime())
            row = con.execute(RAW_CLAIM, (now,)).fetchone()
            if row is not None and kind == "raw-writes":
                attempt_sql, link_sql, event_sql = RAW_CLAIM_WRITES
                [attempt] = con.execute(attempt_sql, (row[0], now)).fetchone()
                con.execute(link_sql, (attempt, row[0]))
                con.execute(event_sql, (row[0], attempt, now))
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            report.failed(str(exc))
            continue
        if row is None:
            break
        report.claimed.append(row[0])
    con.close()
    return report


def _claim_raw_postgresql(url: str, cap: float, barrier: Any) -> Report:
    from datetime import UTC, datetime

    import psycopg

    report = Report([])
    with psycopg.connect(_libpq(url)) as conn:
        barrier.wait()
        deadline = time.monotonic() + cap
        while report.errors < MAX_ERRORS and time.monotonic() < deadline:
            now = datetime.now(UTC).replace(tzinfo=None)
            try:
                with conn.transaction():
                    row = conn.execute(PG_RAW_CLAIM, {"now": now}).fetchone()
                    if row is not None:
                        attempt_sql, link_sql, event_sql = PG_RAW_WRITES
                        values = {"task": row[0], "now": now}
                        [attempt] = conn.execute(attempt_sql, values).fetchone() or [0]
                        values["attempt"] = attempt
                        conn.execute(link_sql, values)
                        conn.execute(event_sql, values)
            except psycopg.Error as exc:
                report.failed(str(exc).splitlines()[0])
                continue
            if row is None:
                break
            report.claimed.append(row[0])
    return report


def _worker(kind: str, env: dict[str, str], cap: float, barrier: Any, results: Any) -> None:
    """One of the claiming processes.

    It stops when no task is left ready, or after `cap` seconds, so that a slow store
    cannot make the run endless; the rate is what counts.
    """
    db = env["DISPATCH_DB"]
    if kind == "dispatch":
        report = _claim_with_dispatch(env, cap, barrier)
    elif _is_postgresql(db):
        report = _claim_raw_postgresql(db, cap, barrier)
    else:
        report = _claim_raw_sqlite(kind, db, cap, barrier)
    results.put(report)


@dataclass
class ClaimRun:
    rate: float
    claims: int
    doubles: int
    locked: int
    other: int
    first_error: str
    per_process: list[int]

    @property
    def errors(self) -> int:
        return self.locked + self.other


def _in_progress_and_twice(db: str) -> tuple[int, int]:
    """Tasks left in progress, and tasks with more than one attempt."""
    in_progress = "SELECT COUNT(*) FROM tasks WHERE status = 'in-progress'"
    twice = (
        "SELECT COUNT(*) FROM (SELECT task_id FROM attempts GROUP BY task_id "
        "HAVING COUNT(*) > 1) AS t"
    )
    if _is_postgresql(db):
        import psycopg

        with psycopg.connect(_libpq(db)) as conn:
            found = [conn.execute(sql).fetchone() for sql in (in_progress, twice)]
        return found[0][0] if found[0] else 0, found[1][0] if found[1] else 0
    con = sqlite3.connect(db)
    try:
        return con.execute(in_progress).fetchone()[0], con.execute(twice).fetchone()[0]
    finally:
        con.close()


def _claim_run(kind: str, env: dict[str, str], db: str, cap: float) -> ClaimRun:
    """CLAIM_PROCESSES processes of one kind, released together once imported and connected."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CLAIM_PROCESSES + 1)
    results = ctx.Queue()
    env = dict(env, DISPATCH_DB=db)
    procs = [
        ctx.Process(target=_worker, args=(kind, env, cap, barrier, results))
        for _ in range(CLAIM_PROCESSES)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start = time.perf_counter()
    reports: list[Report] = [results.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(timeout=30)
    ids = [i for r in reports for i in r.claimed]
    # A double claim shows as an id claimed twice, a task with two attempts, or as many
    # in-progress tasks as claims not matching.
    in_progress, twice = _in_progress_and_twice(db)
    doubles = len(ids) - len(set(ids)) + twice + abs(in_progress - len(set(ids)))
    return ClaimRun(
        rate=len(ids) / elapsed,
        claims=len(ids),
        doubles=doubles,
        locked=sum(r.locked for r in reports),
        other=sum(r.other for r in reports),
        first_error=next((r.first_error for r in reports if r.first_error), ""),
        per_process=sorted(len(r.claimed) for r in reports),
    )


def _rates(runs: list[ClaimRun]) -> list[str]:
    return [f"{r.rate:,.0f}/s" for r in runs]


def bench_sqlite(lab: Lab, mode: Mode) -> list[Figure]:
    cap = mode.claim_cap
    world = lab.world("claim")
    (world.root / "repo").mkdir()  # a claim passes over tasks whose repository is missing
    migrate(world)
    seed.tasks(world.url, CLAIM_TASKS, repo=str(world.root / "repo"))
    con = sqlite3.connect(world.db_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    ours: list[ClaimRun] = []
    theirs: list[ClaimRun] = []
    writes: list[ClaimRun] = []
    for i in range(mode.reps["claim"]):
        for kind, into in (("raw", theirs), ("raw-writes", writes), ("dispatch", ours)):
            # Each run starts from the same rows.
            copy = world.root / f"claim-{kind}-{i}.db"
            shutil.copyfile(world.db_path, copy)
            into.append(_claim_run(kind, world.env, str(copy), cap))
            copy.unlink()
    rate = statistics.median(r.rate for r in ours)
    bare = statistics.median(r.rate for r in theirs)
    base = statistics.median(r.rate for r in writes)
    doubles = sum(r.doubles for r in ours)
    locked = sum(r.locked for r in ours)
    other = sum(r.other for r in ours)
    notes = [
        f"dispatch: {doubles} double claims, {locked} lock errors, {other} other errors, "
        f"claims per run {[r.claims for r in ours]} (a run stops after {cap:g} s), "
        f"per process (last run) {ours[-1].per_process}",
        f"raw with the same writes: {sum(r.doubles for r in writes)} double claims, "
        f"{sum(r.locked for r in writes)} lock errors, per process (last run) "
        f"{writes[-1].per_process}; runs {_rates(writes)}",
        f"the bare raw claim (one UPDATE … RETURNING, no attempt or event): {bare:,.0f}/s "
        f"(dispatch {rate / bare:.0%} of it); dispatch runs {_rates(ours)}",
    ]
    first = next((r.first_error for r in ours if r.first_error), "")
    if first:
        notes.append(f"dispatch's first error: {first}")
    return [
        Figure(
            f"claims/s, {CLAIM_PROCESSES} processes, {CLAIM_TASKS:,} tasks",
            f"{rate:,.0f}/s",
            "raw claim making the same rows (attempt, link, event)",
            f"{base:,.0f}/s",
            f"{rate / base:.0%}",
            ">= 50 %, 0 double, 0 locked",
            rate >= 0.5 * base and doubles == 0 and locked == 0 and other == 0,
            notes,
        )
    ]


def bench_postgresql(lab: Lab, mode: Mode) -> list[Figure]:
    from tests.postgres import start_server

    cap = mode.claim_cap
    server = start_server()
    if isinstance(server, str):
        raise BenchError(f"no PostgreSQL server: {server}")
    try:
        world = lab.world("claim-postgresql")
        repo = world.root / "repo"
        repo.mkdir()  # a claim passes over tasks whose repository is not on this host
        seeded = server.create_database()
        seed.tasks(seeded, CLAIM_TASKS, repo=str(repo))  # its first write migrates it
        # Each run gets a copy of the seeded database, so each starts from the same rows.
        template = seeded.split("://postgres@/", 1)[1].split("?", 1)[0]
        ours: list[ClaimRun] = []
        theirs: list[ClaimRun] = []
        for _ in range(mode.reps["claim"]):
            for kind, into in (("raw", theirs), ("dispatch", ours)):
                copy = server.create_database(template)
                into.append(_claim_run(kind, world.env, copy, cap))
    finally:
        server.stop()
    rate = statistics.median(r.rate for r in ours)
    base = statistics.median(r.rate for r in theirs)
    doubles = sum(r.doubles for r in ours)
    errors = sum(r.errors for r in ours)
    notes = [
        f"dispatch: {doubles} double claims, {errors} errors, claims per run "
        f"{[r.claims for r in ours]} (a run stops after {cap:g} s), per process (last run) "
        f"{ours[-1].per_process}",
        f"raw: {sum(r.doubles for r in theirs)} double claims, "
        f"{sum(r.errors for r in theirs)} errors, per process (last run) "
        f"{theirs[-1].per_process}",
    ]
    first = next((r.first_error for r in ours + theirs if r.first_error), "")
    if first:
        notes.append(f"first error: {first}")
    return [
        Figure(
            f"claims/s on PostgreSQL, {CLAIM_PROCESSES} processes, {CLAIM_TASKS:,} tasks",
            f"{rate:,.0f}/s",
            "raw SKIP LOCKED claim + attempt, link, event",
            f"{base:,.0f}/s",
            f"{rate / base:.0%}",
            ">= 50 %, 0 double, 0 errors",
            rate >= 0.5 * base and doubles == 0 and errors == 0,
            notes,
        )
    ]
