"""Queries services compose inside their own transactions; nothing here commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dispatch.errors import NotFound
from dispatch.lifecycle import AttemptState, Status
from dispatch.store import statements as st
from dispatch.store.direct import on_session
from dispatch.store.models import AgentSession, Attempt, Event, Task


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


# The conditional writes are `statements`' SQL text, run inside the caller's transaction.


def record_event(session: Session, kind: str, **values: Any) -> None:
    st.record_event(on_session(session), kind, **values)


def move_task(session: Session, task_id: int, **values: Any) -> bool:
    return st.move_task(on_session(session), task_id, **values)


def release_task(session: Session, task_id: int, **values: Any) -> bool:
    return st.release_task(on_session(session), task_id, **values)


def close(session: Session, task_id: int) -> bool:
    return st.close_task(on_session(session), task_id)


def update_task(session: Session, task_id: int, **values: Any) -> bool:
    return st.update_task(on_session(session), task_id, **values)


def move_attempt(session: Session, attempt_id: int, **values: Any) -> bool:
    return st.move_attempt(on_session(session), attempt_id, **values)


def update_attempt(session: Session, attempt_id: int, **values: Any) -> None:
    st.update_attempt(on_session(session), attempt_id, **values)


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
