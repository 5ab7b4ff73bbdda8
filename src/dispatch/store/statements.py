"""The hot paths' statements as SQL text — `list`, the sweep's census, the agent wrapper's
start and heartbeat — run by `direct` without SQLAlchemy where it can (see there why).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from dispatch.errors import NotFound
from dispatch.lifecycle import AttemptState, Status
from dispatch.store.direct import Direct, Statement, in_clause, records


class TaskSummary(NamedTuple):
    """A task as `list` shows it."""

    id: int
    title: str
    status: str
    repo: str
    agent: str
    base_ref: str
    priority: int
    closed_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    branch: str | None
    worktree: str | None


_TASK_TIMES = ("closed_at", "created_at", "updated_at")


def list_tasks(
    direct: Direct, statuses: Sequence[str] = (), include_closed: bool = False
) -> list[TaskSummary]:
    """In the order `run --next` takes them: highest priority first, then oldest."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if statuses:
        clause, params = in_clause("status", statuses)
        where.append(f"status {clause}")
    if not include_closed:
        where.append("closed_at IS NULL")
    sql = f"SELECT {', '.join(TaskSummary._fields)} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY priority DESC, id"
    [rows] = direct.read([(sql, params)])
    return records(TaskSummary, rows, _TASK_TIMES)


class AttemptCheck(NamedTuple):
    """What the sweep judges an attempt by, with its task's failure count."""

    id: int
    task_id: int
    state: str
    prior_status: str
    host: str
    dispatcher_pid: int | None
    agent_pid: int | None
    tmux_session: str | None
    tmux_socket: str | None
    tmux_target: str | None
    error: str | None
    cancel_requested_at: datetime | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    started_at: datetime
    task_failures: int


_ATTEMPT_TIMES = ("cancel_requested_at", "heartbeat_at", "lease_expires_at", "started_at")
_ATTEMPT_COLUMNS = ", ".join(f"a.{name}" for name in AttemptCheck._fields[:-1])


class StuckTask(NamedTuple):
    """An in-progress task whose attempt has ended (or that has none)."""

    id: int
    attempt: AttemptCheck | None


class Census(NamedTuple):
    """One snapshot of what the sweep checks."""

    live: list[AttemptCheck]  # attempts not ended
    stuck: list[StuckTask]  # a dispatcher or sweep died mid-rollback
    repos: dict[int, str]  # the repository of each asked-for task that exists


def census(direct: Direct, task_ids: Sequence[int]) -> Census:
    """Live attempts, stuck tasks and the repositories of `task_ids`, in one snapshot."""
    states = {"ended": AttemptState.ENDED.value, "in_progress": Status.IN_PROGRESS.value}
    live = (
        f"SELECT {_ATTEMPT_COLUMNS}, t.dispatch_failures FROM attempts a"
        " JOIN tasks t ON t.id = a.task_id WHERE a.state != :ended ORDER BY a.id"
    )
    stuck = (
        f"SELECT t.id, {_ATTEMPT_COLUMNS}, t.dispatch_failures FROM tasks t"
        " LEFT JOIN attempts a ON a.id = t.current_attempt_id"
        " WHERE t.status = :in_progress AND (a.id IS NULL OR a.state = :ended)"
    )
    statements: list[Statement] = [(live, states), (stuck, states)]
    if task_ids:
        clause, params = in_clause("task", task_ids)
        statements.append((f"SELECT id, repo FROM tasks WHERE id {clause}", params))
    rows = direct.read(statements)
    stuck_tasks = [
        StuckTask(
            row[0],
            None if row[1] is None else records(AttemptCheck, [row[1:]], _ATTEMPT_TIMES)[0],
        )
        for row in rows[1]
    ]
    repos = {task_id: repo for task_id, repo in rows[2]} if task_ids else {}
    return Census(records(AttemptCheck, rows[0], _ATTEMPT_TIMES), stuck_tasks, repos)


class WrapperStart(NamedTuple):
    """What the agent wrapper needs to start its attempt's agent."""

    attempt_id: int
    task_id: int
    state: str
    worktree: str | None  # the attempt's, else the task's
    branch: str | None
    session_id: str | None
    resume: bool
    agent: str
    prompt: str


def wrapper_start(direct: Direct, attempt_id: int) -> WrapperStart:
    sql = (
        "SELECT a.id, a.task_id, a.state, COALESCE(a.worktree, t.worktree), a.branch,"
        " a.session_id, a.resume, t.agent, t.prompt"
        " FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE a.id = :id"
    )
    [rows] = direct.read([(sql, {"id": attempt_id})])
    if not rows:
        raise NotFound(f"no attempt {attempt_id}")
    values = list(rows[0])
    values[6] = bool(values[6])  # SQLite keeps 0 and 1
    return WrapperStart._make(values)


def _move_attempt(attempt_id: int, expected: AttemptState, **values: Any) -> Statement:
    """One conditional update: it changes the attempt only from the `expected` state."""
    assignments = ", ".join(f"{column} = :{column}" for column in values)
    sql = f"UPDATE attempts SET {assignments} WHERE id = :id AND state = :expected"
    return sql, {**values, "id": attempt_id, "expected": expected.value}


def acknowledge(direct: Direct, attempt_id: int, wrapper_pid: int, now: datetime) -> bool:
    """starting -> running: the wrapper's side of the spawn race; False if it lost."""
    [changed] = direct.write(
        [
            _move_attempt(
                attempt_id,
                AttemptState.STARTING,
                state=AttemptState.RUNNING.value,
                wrapper_pid=wrapper_pid,
                heartbeat_at=now,
            )
        ]
    )
    return changed == 1


def record_agent_pid(direct: Direct, attempt_id: int, agent_pid: int) -> bool:
    """False when the attempt stopped being `running` (rolled back while starting)."""
    statement = _move_attempt(attempt_id, AttemptState.RUNNING, agent_pid=agent_pid)
    [changed] = direct.write([statement])
    return changed == 1


def heartbeat(direct: Direct, attempt_id: int, now: datetime) -> bool:
    """Beat while `running`; whether a cancel was requested (from any host)."""
    direct.write([_move_attempt(attempt_id, AttemptState.RUNNING, heartbeat_at=now)])
    sql = "SELECT cancel_requested_at FROM attempts WHERE id = :id"
    [rows] = direct.read([(sql, {"id": attempt_id})])
    return bool(rows) and rows[0][0] is not None
