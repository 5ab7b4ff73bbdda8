"""Rows for the parts to measure, written by the store's own statements.

Thousands of CLI calls would take minutes, so tasks and attempts are inserted by the
statements dispatch itself runs (`dispatch.store.statements`), through the same
executor it picks (`dispatch.store.direct`): the stdlib sqlite3 on a current SQLite
file, SQLAlchemy Core on PostgreSQL. The rows are the ones dispatch would write, and
no ORM is imported to write them. The year of history (`scale`) is too large even
for that, and is written by plain `executemany` there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tests.benchmarks.harness import HOST, SESSION, BenchError

if TYPE_CHECKING:
    from dispatch.store.database import Database
    from dispatch.store.direct import Direct, Tx


@contextlib.contextmanager
def store(url: str) -> Iterator[Direct]:
    """The store as dispatch opens it; a database that is not yet at the schema's head
    (an empty PostgreSQL one) is migrated by its first write."""
    from dispatch.store.direct import open_direct

    opened: list[Database] = []

    def database() -> Database:
        from dispatch.store.database import Database

        opened.append(Database(url))
        return opened[0]

    direct = open_direct(url, database)
    try:
        yield direct
    finally:
        direct.close()
        for db in opened:
            db.dispose()


def tasks(url: str, count: int, *, repo: str, status: str = "ready") -> list[int]:
    """`count` tasks in one transaction, priorities 0 to 4 in turn; their ids."""
    from dispatch import clock
    from dispatch.store import statements as st

    now = clock.utcnow()

    def work(tx: Tx) -> list[int]:
        return [
            st.insert_task(
                tx,
                title=f"benchmark task {i}",
                prompt=f"do thing {i}",
                repo=repo,
                agent="shell",
                base_ref="main",
                priority=i % 5,
                status=status,
                dispatch_failures=0,
                created_at=now,
                updated_at=now,
            )
            for i in range(count)
        ]

    with store(url) as direct:
        return direct.write(work)


def running(url: str, *, repo: str, socket: str, windows: Sequence[str]) -> None:
    """One in-progress task and one running attempt per live window, on this host."""
    from dispatch import clock
    from dispatch.store import statements as st

    now = clock.utcnow()

    def work(tx: Tx) -> None:
        for i, window in enumerate(windows, start=1):
            task_id = st.insert_task(
                tx,
                title=f"running task {i}",
                prompt="sleep 600",
                repo=repo,
                agent="shell",
                base_ref="main",
                priority=0,
                status="in-progress",
                dispatch_failures=0,
                created_at=now,
                updated_at=now,
            )
            attempt_id = st.insert_attempt(
                tx,
                task_id=task_id,
                number=1,
                state="running",
                prior_status="ready",
                host=HOST,
                tmux_session=SESSION,
                tmux_socket=socket,
                tmux_target=f"{SESSION}:{window}",
                intent={},
                resume=False,
                started_at=now,
                heartbeat_at=now,
            )
            # The pane's start command names the attempt (`agent-exec N`), as the sweep
            # expects: window N must be attempt N.
            if attempt_id != i:
                raise BenchError(f"attempt {attempt_id} seeded for window {i}: not a fresh store")
            st.update_task(tx, task_id, current_attempt_id=attempt_id)

    with store(url) as direct:
        direct.write(work)


def ended_attempts(url: str, task_ids: Sequence[int]) -> None:
    """One ended (failed) attempt for each task: the monitor lists each task with its latest."""
    from dispatch import clock
    from dispatch.store import statements as st

    now = clock.utcnow()

    def work(tx: Tx) -> None:
        for task_id in task_ids:
            st.insert_attempt(
                tx,
                task_id=task_id,
                number=1,
                state="ended",
                outcome="failed",
                exit_code=1,
                prior_status="ready",
                host="bench",
                resume=False,
                intent={},
                started_at=now,
                ended_at=now,
            )

    with store(url) as direct:
        direct.write(work)
