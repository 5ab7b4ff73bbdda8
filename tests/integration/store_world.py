"""A database in every shape the store's statements must read the same on any backend,
and the checks shared by the SQLite and PostgreSQL tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.lifecycle import AttemptState, Status
from dispatch.services.tasks import add_task
from dispatch.store import statements as st
from dispatch.store.direct import Direct, Tx
from dispatch.store.models import Attempt, Event, Task
from tests.orm import orm_read, orm_write

T = TypeVar("T")
HOSTILE = "$(touch x); `id` ../../etc\n'\"naïve ✓ 日本"


def read_with(direct: Direct, statement: Callable[..., T], *args: Any) -> T:
    return direct.read(lambda tx: statement(tx, *args))


def write_with(direct: Direct, statement: Callable[..., T], *args: Any) -> T:
    return direct.write(lambda tx: statement(tx, *args))


def must(row: T | None) -> T:
    """A row the test made (a read of it returns None only if something is wrong)."""
    assert row is not None
    return row


def set_columns(row: object, **values: object) -> None:
    """Change a row through the models: what the direct statements must agree with."""
    for name, value in values.items():
        setattr(row, name, value)


def add_attempt(s: Session, task_id: int, state: AttemptState, **values: object) -> int:
    number = len(s.scalars(select(Attempt).where(Attempt.task_id == task_id)).all()) + 1
    attempt = Attempt(
        task_id=task_id,
        number=number,
        state=state.value,
        prior_status=Status.READY.value,
        host="here",
        intent={},
        started_at=utcnow() - timedelta(minutes=5),
        **values,
    )
    s.add(attempt)
    s.flush()
    return attempt.id


def build_world(app: App, repo: Path) -> dict[str, int]:
    """Tasks in every shape the two reads must agree on."""
    ids = {
        name: add_task(app, title, repo=repo, priority=priority).id
        for name, title, priority in [
            ("hostile", HOSTILE, 0),
            ("urgent", "urgent", 5),
            ("closed", "closed", 9),
            ("running", "running", 1),
            ("starting", "starting", 1),
            ("stuck", "stuck", 0),
            ("orphaned", "no attempt", 0),
        ]
    }

    def shape(s: Session) -> None:
        set_columns(s.get(Task, ids["closed"]), closed_at=utcnow(), last_error="gave up")
        running = add_attempt(
            s,
            ids["running"],
            AttemptState.RUNNING,
            heartbeat_at=utcnow(),
            agent_pid=4242,
            tmux_target="dispatch:@7",
            tmux_session="dispatch",
        )
        starting = add_attempt(
            s,
            ids["starting"],
            AttemptState.STARTING,
            dispatcher_pid=1,
            lease_expires_at=utcnow() + timedelta(minutes=1),
        )
        ended = add_attempt(s, ids["stuck"], AttemptState.ENDED, error="rollback died")
        for name, attempt in (("running", running), ("starting", starting), ("stuck", ended)):
            set_columns(
                s.get(Task, ids[name]), status=Status.IN_PROGRESS.value, current_attempt_id=attempt
            )
        set_columns(
            s.get(Task, ids["orphaned"]), status=Status.IN_PROGRESS.value, dispatch_failures=2
        )
        ids.update(running_attempt=running, starting_attempt=starting, ended_attempt=ended)

    orm_write(app.db, shape)
    return ids


def orm_values(obj: object, fields: tuple[str, ...]) -> tuple[object, ...]:
    return tuple(getattr(obj, name) for name in fields)


def claim_like(app: App, direct: Direct, task_id: int) -> None:
    def claim(tx: Tx) -> tuple[int, str, str, str]:
        key = f"shell:{task_id}"
        first = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="one", renew=True
        )  # a new key: the fresh id, whatever `renew` says
        kept = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="two", renew=False
        )
        renewed = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="three", renew=True
        )
        attempt = st.insert_attempt(
            tx,
            task_id=task_id,
            number=1,
            state=AttemptState.STARTING.value,
            prior_status=Status.READY.value,
            host="here",
            resume=False,
            intent={"branch": HOSTILE},
            started_at=utcnow(),
        )
        assert st.move_task(
            tx,
            task_id,
            expected=Status.READY,
            target=Status.IN_PROGRESS,
            current_attempt_id=attempt,
        )
        # Conditional: it is no longer ready.
        assert not st.move_task(tx, task_id, expected=Status.READY, target=Status.CANCELLED)
        st.record_event(tx, "claimed", task_id=task_id, attempt_id=attempt, note=HOSTILE, gone=None)
        return attempt, first, kept, renewed

    attempt_id, first, kept, renewed = direct.write(claim)

    assert (first, kept, renewed) == ("one", "one", "three")
    stored_task = must(orm_read(app.db, lambda s: s.get(Task, task_id)))
    assert (stored_task.status, stored_task.current_attempt_id) == ("in-progress", attempt_id)
    stored = must(orm_read(app.db, lambda s: s.get(Attempt, attempt_id)))
    assert (stored.intent, stored.resume, stored.started_at.tzinfo) == (
        {"branch": HOSTILE},
        False,
        UTC,
    )
    event = orm_read(
        app.db,
        lambda s: s.scalars(select(Event).where(Event.task_id == task_id).order_by(Event.id)).all(),
    )[-1]
    assert (event.kind, event.attempt_id, event.detail) == (
        "claimed",
        attempt_id,
        {"note": HOSTILE},
    )
    assert direct.write(lambda tx: st.close_task(tx, task_id))
    assert not direct.write(lambda tx: st.close_task(tx, task_id))  # once only
