"""SQLAlchemy 2.x models for tasks, attempts, events and agent sessions (SPEC §1).

They are the schema: what the migrations are checked against and what the schema tests
read and write as an independent witness. Dispatch itself runs SQL text (`statements`):
of its own code only the migrations import them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dispatch.clock import utcnow
from dispatch.store.convert import naive_utc, sqlite_time, stored_time

# Deterministic constraint names: Alembic's batch mode on SQLite needs them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend, converted as
    the store's statements convert them (`convert`)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else naive_utc(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # SQLite keeps text: written by the function the statements' executors use, not
        # by SQLAlchemy's own DateTime, so one format holds whichever wrote the row.
        def to_text(value: datetime | None) -> str | None:
            return None if value is None else sqlite_time(value)

        return to_text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return stored_time(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Task(Base):
    __tablename__ = "tasks"
    # In claim order (`run --next`): the next ready task is the index's first entry,
    # with no sort over every ready row on each claim.
    # `list` pages in the same order, filtered or not (migration 0003).
    __table_args__ = (
        Index("ix_tasks_claim_order", "status", text("priority DESC"), "id"),
        Index("ix_tasks_list_order", text("priority DESC"), "id"),
        Index("ix_tasks_open_order", "closed_at", text("priority DESC"), "id"),
        Index("ix_tasks_repo_order", "repo", text("priority DESC"), "id"),
        Index("ix_tasks_agent_order", "agent", text("priority DESC"), "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    repo: Mapped[str] = mapped_column(Text)
    agent: Mapped[str] = mapped_column(String(100))
    base_ref: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), index=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Consecutive failed dispatches; reaching max_dispatch_failures parks the task in `failed`.
    dispatch_failures: Mapped[int] = mapped_column(Integer, default=0)
    # Fences attempt-bound transitions: only the current attempt may change the task.
    current_attempt_id: Mapped[int | None] = mapped_column(
        ForeignKey("attempts.id", use_alter=True, ondelete="SET NULL")
    )
    branch: Mapped[str | None] = mapped_column(Text)
    worktree: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("task_id", "number"),
        Index("ix_attempts_host_task_id", "host", "task_id"),  # `list --host`
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), index=True)
    outcome: Mapped[str | None] = mapped_column(String(20))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    # The task status to return to when this dispatch rolls back.
    prior_status: Mapped[str] = mapped_column(String(20))
    host: Mapped[str] = mapped_column(Text)
    dispatcher_pid: Mapped[int | None] = mapped_column(Integer)
    wrapper_pid: Mapped[int | None] = mapped_column(Integer)
    agent_pid: Mapped[int | None] = mapped_column(Integer)
    tmux_session: Mapped[str | None] = mapped_column(Text)
    tmux_socket: Mapped[str | None] = mapped_column(Text)
    tmux_target: Mapped[str | None] = mapped_column(Text)
    worktree: Mapped[str | None] = mapped_column(Text)
    branch: Mapped[str | None] = mapped_column(Text)
    base_commit: Mapped[str | None] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(Text)
    resume: Mapped[bool] = mapped_column(default=False)
    # Write-ahead intent: what this dispatch is about to create and what existed before,
    # recorded before each external action so a sweep can finish an interrupted undo.
    intent: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Completion evidence for `completion = "signal"`.
    done_signalled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    redispatch_of: Mapped[int | None] = mapped_column(
        ForeignKey("attempts.id", ondelete="SET NULL")
    )


class Event(Base):
    """Append-only audit log: rows are inserted, never updated or deleted."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_task_id_id", "task_id", "id"),
        Index("ix_events_at", "at"),  # `events --since`
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("attempts.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AgentSession(Base):
    """The agent session a task's attempts resume, keyed `<agent>:<repo>:<task>`."""

    __tablename__ = "agent_sessions"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    agent: Mapped[str] = mapped_column(String(100))
    session_id: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
