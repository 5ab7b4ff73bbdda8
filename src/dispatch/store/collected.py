"""The statements `gc` and `restore` run: which worktrees may go, and what became of them.

Like `statements`, SQL text both SQLite and PostgreSQL take, run inside the caller's
transaction; events are written with `statements.record_event`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from dispatch.lifecycle import AttemptState, Status
from dispatch.store.convert import json_value
from dispatch.store.direct import Tx, in_clause, records
from dispatch.store.statements import EventRow

# The event kinds a worktree's life after its task ended is told by.
GC, RESTORED = "gc", "restored"


class GcCandidate(NamedTuple):
    """A finished task with a worktree, as `gc` judges it."""

    id: int
    status: str
    closed_at: datetime | None
    repo: str
    base_ref: str
    branch: str | None
    worktree: str
    updated_at: datetime
    attempt_id: int | None  # its latest attempt: the one that last used the worktree
    host: str | None  # where that attempt ran, and so where the worktree is


def gc_candidates(tx: Tx, statuses: Sequence[str], before: datetime) -> list[GcCandidate]:
    """Tasks in `statuses`, or closed, not changed since `before`, that had a worktree;
    never one in-progress or ready."""
    clause, params = in_clause("status", list(statuses))
    params.update(before=before, in_progress=Status.IN_PROGRESS.value, ready=Status.READY.value)
    sql = (
        "SELECT t.id, t.status, t.closed_at, t.repo, t.base_ref, t.branch, t.worktree,"
        " t.updated_at, l.id, l.host FROM tasks t"
        " LEFT JOIN attempts l ON l.id = (SELECT MAX(a.id) FROM attempts a WHERE a.task_id = t.id)"
        " WHERE t.worktree IS NOT NULL"
        " AND t.status != :in_progress AND t.status != :ready"
        f" AND (t.status {clause} OR t.closed_at IS NOT NULL)"
        " AND t.updated_at < :before ORDER BY t.id"
    )
    return records(GcCandidate, tx.rows(sql, params), ("closed_at", "updated_at"))


def last_collection(tx: Tx, task_id: int) -> EventRow | None:
    """The task's latest worktree removal by gc or restore, or None: the removal
    (kind `gc` with a `worktree` in its detail) says the worktree is collected.

    Only these kinds are read, newest first: a redispatch asks this of a task that may
    have thousands of events."""
    clause, params = in_clause("kind", [GC, RESTORED])
    sql = (
        f"SELECT {', '.join(EventRow._fields)} FROM events"
        f" WHERE task_id = :task AND kind {clause} ORDER BY id DESC LIMIT 50"
    )
    for event in records(EventRow, tx.rows(sql, {**params, "task": task_id}), ("at",)):
        detail = json_value(event.detail) or {}
        if event.kind == RESTORED or (event.kind == GC and "worktree" in detail):
            return EventRow(*event[:-1], detail)
    return None


def is_collected(event: EventRow | None) -> bool:
    return event is not None and event.kind == GC


def live_worktrees(tx: Tx) -> dict[str, int]:
    """Worktree path -> task id of every attempt not ended: never to be collected."""
    sql = (
        "SELECT a.worktree, a.task_id FROM attempts a"
        " WHERE a.state != :ended AND a.worktree IS NOT NULL"
    )
    rows = tx.rows(sql, {"ended": AttemptState.ENDED.value})
    return {str(path): int(task_id) for path, task_id in rows}
