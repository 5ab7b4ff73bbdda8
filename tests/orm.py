"""The models as the tests' witness of the schema: an ORM session inside one of
`Database`'s own transactions (dispatch itself runs SQL text on Core connections).

The session joins the connection's transaction, so what a test changes through it
takes the same locks, retries and commit as the store's writes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dispatch.store.database import Database
from dispatch.store.models import Attempt, Event

T = TypeVar("T")


def orm_read(db: Database, work: Callable[[Session], T]) -> T:
    """`work` on a session in a read transaction; the objects it returns stay loaded."""
    return db.read(lambda conn: _in_session(conn, work))


def orm_write(db: Database, work: Callable[[Session], T]) -> T:
    """`work` on a session in one write transaction, flushed before it commits."""
    return db.write(lambda conn: _in_session(conn, work))


def _in_session(conn: Connection, work: Callable[[Session], T]) -> T:
    # Bound to a connection already in a transaction, the session never commits or ends
    # it: Database does, once `work` is flushed.
    with Session(conn, expire_on_commit=False) as session:
        result = work(session)
        session.flush()
        return result


def ended_attempt(
    db: Database,
    task_id: int,
    *,
    tmux_target: str = "dispatch:@7",
    error: str = "exit 3",
    detail: dict[str, Any] | None = None,
) -> int:
    """A failed, ended attempt of the task and its `finished` event, as a dispatch would
    have left them; the attempt's id."""
    now = datetime.now(UTC)

    def work(s: Session) -> int:
        attempt = Attempt(
            task_id=task_id, number=1, state="ended", outcome="failed", exit_code=3,
            prior_status="ready", host="builder", tmux_target=tmux_target,
            worktree="/w/task-1", branch="dispatch/1-x", session_id="s-1", resume=False,
            intent={}, started_at=now, ended_at=now, heartbeat_at=now, error=error,
        )  # fmt: skip
        s.add(attempt)
        s.flush()
        s.add(
            Event(
                task_id=task_id, attempt_id=attempt.id, kind="finished",
                from_status="in-progress", to_status="failed", at=now,
                detail={"exit_code": 3} if detail is None else detail,
            )
        )  # fmt: skip
        return attempt.id

    return orm_write(db, work)
