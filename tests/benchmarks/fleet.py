"""Claims on PostgreSQL, as a fleet makes them: bench.py's `claim-postgresql` section.

8 processes claim from 10,000 ready tasks through dispatch's own claim, beside a raw
claim in the same run on the same server: `UPDATE … WHERE id = (SELECT … FOR UPDATE
SKIP LOCKED) RETURNING id`, making the same rows dispatch's claim makes (the attempt,
the task's link to it, the claimed event). The server is a private one, started here
as the tests start theirs (tests/postgres.py), and stopped at the end.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 8
TASKS = 10_000

RAW_CLAIM = (
    "UPDATE tasks SET status = 'in-progress', updated_at = %(now)s WHERE id = ("
    "SELECT id FROM tasks WHERE status = 'ready' AND closed_at IS NULL "
    "ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
)
RAW_WRITES = (
    "INSERT INTO attempts (task_id, number, state, prior_status, host, resume, intent, "
    "started_at) VALUES (%(task)s, 1, 'starting', 'ready', 'bench', false, '{}', %(now)s) "
    "RETURNING id",
    "UPDATE tasks SET current_attempt_id = %(attempt)s WHERE id = %(task)s",
    "INSERT INTO events (task_id, attempt_id, kind, from_status, to_status, at, detail) "
    "VALUES (%(task)s, %(attempt)s, 'claimed', 'ready', 'in-progress', %(now)s, '{}')",
)


def _libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def _worker(kind: str, env: dict[str, str], cap: float, barrier: Any, results: Any) -> None:
    """One claiming process; reports (claimed ids, errors, first error)."""
    claimed: list[int] = []
    errors = 0
    first_error = ""
    url = env["DISPATCH_DB"]
    if kind == "dispatch":
        from dispatch.app import App
        from dispatch.config import load_settings
        from dispatch.errors import DispatchError
        from dispatch.services.dispatching import Dispatch, claim

        app = App(load_settings(env=env))
        app.db.ensure_schema()
        barrier.wait()
        deadline = time.monotonic() + cap
        while errors < 100 and time.monotonic() < deadline:
            d = Dispatch(app, None)
            try:
                if not claim(d):
                    break
            except Exception as exc:
                errors += 1
                first_error = first_error or (
                    exc.message if isinstance(exc, DispatchError) else repr(exc)
                )
                continue
            assert d.task_id is not None
            claimed.append(d.task_id)
        app.close()
    else:
        from datetime import UTC, datetime

        import psycopg

        with psycopg.connect(_libpq(url)) as conn:
            barrier.wait()
            deadline = time.monotonic() + cap
            while errors < 100 and time.monotonic() < deadline:
                now = datetime.now(UTC).replace(tzinfo=None)
                try:
                    with conn.transaction():
                        row = conn.execute(RAW_CLAIM, {"now": now}).fetchone()
                        if row is not None:
                            attempt_sql, link_sql, event_sql = RAW_WRITES
                            values = {"task": row[0], "now": now}
                            [attempt] = conn.execute(attempt_sql, values).fetchone() or [0]
                            values["attempt"] = attempt
                            conn.execute(link_sql, values)
                            conn.execute(event_sql, values)
                except psycopg.Error as exc:
                    errors += 1
                    first_error = first_error or str(exc).splitlines()[0]
                    continue
                if row is None:
                    break
                claimed.append(row[0])
    results.put((claimed, errors, first_error))


@dataclass
class Run:
    rate: float
    claims: int
    doubles: int
    errors: int
    first_error: str
    per_process: list[int]


def _run(kind: str, env: dict[str, str], url: str, cap: float) -> Run:
    import multiprocessing

    import psycopg

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    env = dict(env, DISPATCH_DB=url)
    procs = [
        ctx.Process(target=_worker, args=(kind, env, cap, barrier, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start = time.perf_counter()
    reports = [results.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(timeout=30)
    ids = [i for r in reports for i in r[0]]
    with psycopg.connect(_libpq(url)) as conn:
        in_progress = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE status = 'in-progress'"
        ).fetchone()
        twice = conn.execute(
            "SELECT COUNT(*) FROM (SELECT task_id FROM attempts GROUP BY task_id "
            "HAVING COUNT(*) > 1) AS t"
        ).fetchone()
    doubles = len(ids) - len(set(ids)) + (twice[0] if twice else 0)
    doubles += abs((in_progress[0] if in_progress else 0) - len(set(ids)))
    return Run(
        rate=len(ids) / elapsed,
        claims=len(ids),
        doubles=doubles,
        errors=sum(r[1] for r in reports),
        first_error=next((r[2] for r in reports if r[2]), ""),
        per_process=sorted(len(r[0]) for r in reports),
    )


def _seed(url: str, repo: str) -> None:
    from sqlalchemy import insert

    from dispatch.clock import utcnow
    from dispatch.store.database import Database
    from dispatch.store.models import Task

    now = utcnow()
    rows = [
        {
            "title": f"benchmark task {i}",
            "prompt": f"do thing {i}",
            "repo": repo,
            "agent": "shell",
            "base_ref": "main",
            "priority": i % 5,
            "status": "ready",
            "dispatch_failures": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(TASKS)
    ]
    db = Database(url)
    try:
        db.upgrade()
        db.write(lambda s: s.execute(insert(Task), rows))
    finally:
        db.dispose()


class Unavailable(Exception):
    """No PostgreSQL server can be started here."""


def bench_claim_postgresql(lab: Any, reps: int, cap: float, figure: Any) -> list[Any]:
    """The figure (made by `figure`, bench.py's Figure): dispatch's claims/s against the
    raw claim's, 0 double claims, 0 errors."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/postgres.py, and the spawned workers
    from tests.postgres import start_server

    server = start_server()
    if isinstance(server, str):
        raise Unavailable(f"no PostgreSQL server: {server}")
    try:
        world = lab.world("claim-postgresql")
        repo = world.root / "repo"
        repo.mkdir()  # a claim passes over tasks whose repository is not on this host
        seeded = server.create_database()
        _seed(seeded, str(repo))
        template = seeded.split("://postgres@/", 1)[1].split("?", 1)[0]
        ours: list[Run] = []
        theirs: list[Run] = []
        for _ in range(reps):
            for kind, into in (("raw", theirs), ("dispatch", ours)):
                into.append(_run(kind, world.env, server.create_database(template), cap))
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
        figure(
            f"claims/s on PostgreSQL, {PROCESSES} processes, {TASKS:,} tasks",
            f"{rate:,.0f}/s",
            "raw SKIP LOCKED claim + attempt, link, event",
            f"{base:,.0f}/s",
            f"{rate / base:.0%}",
            ">= 50 %, 0 double, 0 errors",
            rate >= 0.5 * base and doubles == 0 and errors == 0,
            notes,
        )
    ]
