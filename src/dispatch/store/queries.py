"""Queries services compose inside their own transactions; nothing here commits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dispatch.errors import NotFound
from dispatch.lifecycle import AttemptState, Status
from dispatch.store.models import AgentSession, Attempt, Event, Task, utcnow

_NO_SYNC = {"synchronize_session": False}


def get_task(session: Session, task_id: int) -> Task:
    task = session.get(Task, task_id, populate_existing=True)
    if task is None:
        raise NotFound(f"no task {task_id}", hint="`dispatch list --all` shows every task")
    return task


def get_attempt(session: Session, attempt_id: int) -> Attempt:
    attempt = session.get(Attempt, attempt_id, populate_existing=True)
    if attempt is None:
        raise NotFound(f"no attempt {attempt_id}")
    return attempt


def attempts_of(session: Session, task_ids: Sequence[int]) -> dict[int, list[Attempt]]:
    """Attempts of many tasks in one statement, oldest first."""
    found: dict[int, list[Attempt]] = {t: [] for t in task_ids}
    if not task_ids:
        return found
    query = select(Attempt).where(Attempt.task_id.in_(task_ids)).order_by(Attempt.id)
    for attempt in session.scalars(query):
        found[attempt.task_id].append(attempt)
    return found


def latest_attempts(session: Session, task_ids: Sequence[int] | None = None) -> dict[int, Attempt]:
    """Each task's newest attempt, in one statement."""
    newest = select(func.max(Attempt.id)).group_by(Attempt.task_id)
    if task_ids is not None:
        newest = newest.where(Attempt.task_id.in_(task_ids))
    query = select(Attempt).where(Attempt.id.in_(newest.scalar_subquery()))
    return {a.task_id: a for a in session.scalars(query)}


def events(session: Session, task_id: int | None = None, limit: int | None = None) -> list[Event]:
    query = select(Event).order_by(Event.id)
    if task_id is not None:
        query = query.where(Event.task_id == task_id)
    if limit is not None:
        query = query.order_by(None).order_by(Event.id.desc()).limit(limit)
        return list(reversed(session.scalars(query).all()))
    return list(session.scalars(query))


def record_event(
    session: Session,
    kind: str,
    *,
    task_id: int | None,
    attempt_id: int | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    **detail: Any,
) -> Event:
    event = Event(
        task_id=task_id,
        attempt_id=attempt_id,
        kind=kind,
        from_status=from_status,
        to_status=to_status,
        at=utcnow(),
        detail={k: v for k, v in detail.items() if v is not None},
    )
    session.add(event)
    return event


def move_task(
    session: Session,
    task_id: int,
    *,
    expected: Status,
    target: Status,
    attempt_id: int | None = None,
    fence_attempt: bool = False,
    **values: Any,
) -> bool:
    """Conditional status change; False when another writer got there first (nothing changed).

    With `fence_attempt`, the task must still belong to `attempt_id`: a stale writer
    whose attempt was reaped or superseded changes nothing.
    """
    query = update(Task).where(Task.id == task_id, Task.status == expected.value)
    if fence_attempt:
        query = query.where(Task.current_attempt_id == attempt_id)
    query = query.values(status=target.value, updated_at=utcnow(), **values)
    return session.execute(query.returning(Task.id), execution_options=_NO_SYNC).first() is not None


def release_task(
    session: Session,
    task_id: int,
    *,
    attempt_id: int | None,
    target: Status,
    kind: str,
    values: dict[str, Any] | None = None,
    **detail: Any,
) -> bool:
    """The task leaves in-progress on behalf of its current attempt: one fenced
    conditional update and, only if it won, its one event. False: someone else did."""
    moved = move_task(
        session,
        task_id,
        expected=Status.IN_PROGRESS,
        target=target,
        attempt_id=attempt_id,
        fence_attempt=True,
        current_attempt_id=None,
        **(values or {}),
    )
    if moved:
        record_event(
            session,
            kind,
            task_id=task_id,
            attempt_id=attempt_id,
            from_status=Status.IN_PROGRESS,
            to_status=target,
            **detail,
        )
    return moved


def close(session: Session, task_id: int) -> bool:
    """Archive a task unless it already is: the row count says who closed it."""
    query = (
        update(Task)
        .where(Task.id == task_id, Task.closed_at.is_(None))
        .values(closed_at=utcnow(), updated_at=utcnow())
        .returning(Task.id)
    )
    return session.execute(query, execution_options=_NO_SYNC).first() is not None


def update_task(session: Session, task_id: int, **values: Any) -> bool:
    query = update(Task).where(Task.id == task_id).values(updated_at=utcnow(), **values)
    return session.execute(query.returning(Task.id), execution_options=_NO_SYNC).first() is not None


def move_attempt(
    session: Session,
    attempt_id: int,
    *,
    expected: Iterable[AttemptState],
    target: AttemptState | None = None,
    **values: Any,
) -> bool:
    """Conditional attempt update: only from one of the `expected` states."""
    states = [s.value for s in expected]
    query = update(Attempt).where(Attempt.id == attempt_id, Attempt.state.in_(states))
    if target is not None:
        values["state"] = target.value
    query = query.values(**values)
    return (
        session.execute(query.returning(Attempt.id), execution_options=_NO_SYNC).first() is not None
    )


def update_attempt(session: Session, attempt_id: int, **values: Any) -> None:
    session.execute(
        update(Attempt).where(Attempt.id == attempt_id).values(**values), execution_options=_NO_SYNC
    )


def last_attempt_of(session: Session, task_id: int) -> tuple[int | None, int]:
    """(id, number) of a task's newest attempt; (None, 0) before its first."""
    query = (
        select(Attempt.id, Attempt.number)
        .where(Attempt.task_id == task_id)
        .order_by(Attempt.id.desc())
        .limit(1)
    )
    row = session.execute(query).first()
    return (None, 0) if row is None else (row.id, row.number)


def count_in_progress(session: Session) -> int:
    query = select(func.count()).select_from(Task).where(Task.status == Status.IN_PROGRESS.value)
    return int(session.scalar(query) or 0)


def ready_tasks(session: Session, limit: int) -> list[tuple[int, str]]:
    """(id, agent) of ready tasks, highest priority first; on PostgreSQL rows other
    claimers hold are skipped."""
    query = (
        select(Task.id, Task.agent)
        .where(Task.status == Status.READY.value, Task.closed_at.is_(None))
        .order_by(Task.priority.desc(), Task.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(row.id, row.agent) for row in session.execute(query)]


def live_attempts(session: Session) -> Sequence[Attempt]:
    """Attempts not yet ended, with nothing else loaded: the sweep's one query."""
    query = select(Attempt).where(Attempt.state != AttemptState.ENDED.value).order_by(Attempt.id)
    return session.scalars(query).all()


def agent_session(session: Session, key: str) -> AgentSession | None:
    return session.get(AgentSession, key)
