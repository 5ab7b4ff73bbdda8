"""Every statement the services run, as SQL text that SQLite and PostgreSQL both take.

Each function runs inside a transaction its caller opened (`App.direct.read` or
`.write`) and never commits. The insert functions write every column explicitly:
the models' Python-side defaults apply to ORM inserts only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypedDict, Unpack

from dispatch.clock import utcnow
from dispatch.errors import Conflict, NotFound
from dispatch.lifecycle import AttemptState, Outcome, Status
from dispatch.store.convert import iso_utc, json_value
from dispatch.store.direct import Tx, in_clause, records


class TaskSummary(NamedTuple):
    """A task as `list` shows it; its timestamps are already ISO 8601 text (`…Z`)."""

    id: int
    title: str
    status: str
    repo: str
    agent: str
    base_ref: str
    priority: int
    closed_at: str | None
    last_error: str | None
    created_at: str
    updated_at: str
    branch: str | None
    worktree: str | None
    host: str | None  # the host of its latest attempt (SPEC §10), None before any


_TASK_TIMES = ("closed_at", "created_at", "updated_at")
# One indexed probe per listed task: the latest attempt is the one with the largest id.
LATEST_HOST = (
    "(SELECT a.host FROM attempts a WHERE a.task_id = tasks.id ORDER BY a.id DESC LIMIT 1) AS host"
)


def list_tasks(
    tx: Tx, statuses: Sequence[str] = (), include_closed: bool = False
) -> list[TaskSummary]:
    """In the order `run --next` takes them: highest priority first, then oldest."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if statuses:
        clause, params = in_clause("status", statuses)
        where.append(f"status {clause}")
    if not include_closed:
        where.append("closed_at IS NULL")
    sql = f"SELECT {', '.join(TaskSummary._fields[:-1])}, {LATEST_HOST} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY priority DESC, id"
    return records(TaskSummary, tx.rows(sql, params), _TASK_TIMES, convert=iso_utc)


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


def census(tx: Tx, task_ids: Sequence[int]) -> Census:
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
    rows = [tx.rows(live, states), tx.rows(stuck, states)]
    if task_ids:
        clause, params = in_clause("task", task_ids)
        rows.append(tx.rows(f"SELECT id, repo FROM tasks WHERE id {clause}", params))
    stuck_tasks = [
        StuckTask(
            row[0],
            None if row[1] is None else records(AttemptCheck, [row[1:]], _ATTEMPT_TIMES)[0],
        )
        for row in rows[1]
    ]
    repos = {task_id: repo for task_id, repo in rows[2]} if task_ids else {}
    return Census(records(AttemptCheck, rows[0], _ATTEMPT_TIMES), stuck_tasks, repos)


def live_here(tx: Tx, host: str) -> list[AttemptCheck]:
    """This host's attempts not yet ended: what a read reconciles first (by the state index)."""
    sql = (
        f"SELECT {_ATTEMPT_COLUMNS}, t.dispatch_failures FROM attempts a"
        " JOIN tasks t ON t.id = a.task_id"
        " WHERE a.state IN (:starting, :running) AND a.host = :host ORDER BY a.id"
    )
    params = {
        "starting": AttemptState.STARTING.value,
        "running": AttemptState.RUNNING.value,
        "host": host,
    }
    return records(AttemptCheck, tx.rows(sql, params), _ATTEMPT_TIMES)


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


def wrapper_start(tx: Tx, attempt_id: int) -> WrapperStart:
    sql = (
        "SELECT a.id, a.task_id, a.state, COALESCE(a.worktree, t.worktree), a.branch,"
        " a.session_id, a.resume, t.agent, t.prompt"
        " FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE a.id = :id"
    )
    rows = tx.rows(sql, {"id": attempt_id})
    if not rows:
        raise NotFound(f"no attempt {attempt_id}")
    values = list(rows[0])
    values[6] = bool(values[6])  # SQLite keeps 0 and 1
    return WrapperStart._make(values)


def acknowledge(tx: Tx, attempt_id: int, wrapper_pid: int, now: datetime) -> bool:
    """starting -> running: the wrapper's side of the spawn race; False if it lost."""
    return move_attempt(
        tx,
        attempt_id,
        expected=[AttemptState.STARTING],
        target=AttemptState.RUNNING,
        wrapper_pid=wrapper_pid,
        heartbeat_at=now,
    )


def record_agent_pid(tx: Tx, attempt_id: int, agent_pid: int) -> bool:
    """The agent started: its pid, and the `dispatched` event, since this is when a spawn
    counts (SPEC §3 step 5) and comes before anything the agent's exit records. False
    when the attempt stopped being `running` (rolled back while starting)."""
    if not move_attempt(tx, attempt_id, expected=[AttemptState.RUNNING], agent_pid=agent_pid):
        return False
    sql = "SELECT task_id, tmux_target FROM attempts WHERE id = :id"
    [(task_id, target)] = tx.rows(sql, {"id": attempt_id})
    # The window is named once the dispatcher has recorded it, which it does as soon as
    # tmux answers; a wrapper that got here first leaves it out rather than guess.
    window = target.rpartition(":")[2] if target else None
    record_event(tx, "dispatched", task_id=task_id, attempt_id=attempt_id, window=window)
    return True


def heartbeat_and_cancel_asked(tx: Tx, attempt_id: int, now: datetime) -> bool:
    """Beat while `running`; whether a cancel was requested (from any host)."""
    move_attempt(tx, attempt_id, expected=[AttemptState.RUNNING], heartbeat_at=now)
    sql = "SELECT cancel_requested_at FROM attempts WHERE id = :id"
    rows = tx.rows(sql, {"id": attempt_id})
    return bool(rows) and rows[0][0] is not None


# -- whole rows ---------------------------------------------------------------------------


class TaskRow(NamedTuple):
    """Every column of a task."""

    id: int
    title: str
    prompt: str
    repo: str
    agent: str
    base_ref: str
    priority: int
    status: str
    closed_at: datetime | None
    last_error: str | None
    dispatch_failures: int
    current_attempt_id: int | None
    branch: str | None
    worktree: str | None
    created_at: datetime
    updated_at: datetime


class AttemptRow(NamedTuple):
    """Every column of an attempt."""

    id: int
    task_id: int
    number: int
    state: str
    outcome: str | None
    exit_code: int | None
    prior_status: str
    host: str
    dispatcher_pid: int | None
    wrapper_pid: int | None
    agent_pid: int | None
    tmux_session: str | None
    tmux_socket: str | None
    tmux_target: str | None
    worktree: str | None
    branch: str | None
    base_commit: str | None
    session_id: str | None
    resume: bool
    intent: dict[str, Any]
    done_signalled_at: datetime | None
    cancel_requested_at: datetime | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    redispatch_of: int | None


class EventRow(NamedTuple):
    """An event of the audit log."""

    id: int
    task_id: int | None
    attempt_id: int | None
    kind: str
    from_status: str | None
    to_status: str | None
    at: datetime
    detail: dict[str, Any]


_TASK_SELECT = f"SELECT {', '.join(TaskRow._fields)} FROM tasks"
_ATTEMPT_SELECT = f"SELECT {', '.join(AttemptRow._fields)} FROM attempts"
# The columns a write may name, checked on every write (a claim makes three).
_TASK_NAMES = frozenset(TaskRow._fields)
_ATTEMPT_NAMES = frozenset(AttemptRow._fields)
_ATTEMPT_ROW_TIMES = tuple(name for name in AttemptRow._fields if name.endswith("_at"))


def _tasks(tx: Tx, where: str, params: dict[str, Any]) -> list[TaskRow]:
    return records(TaskRow, tx.rows(f"{_TASK_SELECT} {where}", params), _TASK_TIMES)


def _attempts(tx: Tx, where: str, params: dict[str, Any]) -> list[AttemptRow]:
    found = records(AttemptRow, tx.rows(f"{_ATTEMPT_SELECT} {where}", params), _ATTEMPT_ROW_TIMES)
    # SQLite keeps booleans as 0 and 1 and JSON as text.
    return [a._replace(resume=bool(a.resume), intent=json_value(a.intent)) for a in found]


# Ids are 64-bit integers in every database: a larger number names nothing (and would
# not even bind as a parameter).
_ID_MAX = 2**63 - 1


def get_task(tx: Tx, task_id: int) -> TaskRow:
    found = _tasks(tx, "WHERE id = :id", {"id": task_id}) if 0 < task_id <= _ID_MAX else []
    if not found:
        raise NotFound(f"no task {task_id}", hint="`dispatch list --all` shows every task")
    return found[0]


def get_attempt(tx: Tx, attempt_id: int) -> AttemptRow:
    found = _attempts(tx, "WHERE id = :id", {"id": attempt_id}) if 0 < attempt_id <= _ID_MAX else []
    if not found:
        raise NotFound(f"no attempt {attempt_id}")
    return found[0]


def attempts_of(tx: Tx, task_id: int) -> list[AttemptRow]:
    """A task's attempts, oldest first."""
    return _attempts(tx, "WHERE task_id = :task ORDER BY id", {"task": task_id})


def live_attempts(tx: Tx) -> list[AttemptRow]:
    """Attempts not yet ended, oldest first."""
    return _attempts(tx, "WHERE state != :ended ORDER BY id", {"ended": AttemptState.ENDED.value})


def events(tx: Tx, task_id: int | None = None, limit: int | None = None) -> list[EventRow]:
    """The audit log (of one task), oldest first; with `limit`, the newest `limit` events."""
    sql = f"SELECT {', '.join(EventRow._fields)} FROM events"
    params: dict[str, Any] = {}
    if task_id is not None:
        sql += " WHERE task_id = :task"
        params["task"] = task_id
    if limit is not None:
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT :limit) AS newest"
        params["limit"] = limit
    found = records(EventRow, tx.rows(sql + " ORDER BY id", params), ("at",))
    return [e._replace(detail=json_value(e.detail)) for e in found]


def latest_attempt(tx: Tx, task_id: int, *, before: int | None = None) -> AttemptRow | None:
    """The task's newest attempt (with `before`, the newest older than that attempt)."""
    where = "WHERE task_id = :task" + ("" if before is None else " AND id < :before")
    params = {"task": task_id, "before": before}
    found = _attempts(tx, f"{where} ORDER BY id DESC LIMIT 1", params)
    return found[0] if found else None


def next_ready(
    tx: Tx,
    skip: Collection[int] = (),
    agents: Collection[str] | None = None,
    absent_repos: Collection[str] = (),
) -> TaskRow | None:
    """The first ready task in claim order, other than those in `skip` or in a
    repository of `absent_repos` and, when `agents` is given, one whose agent profile
    is among them.

    On PostgreSQL the row is locked until the transaction ends, and rows other
    claimers hold are skipped before the limit applies: concurrent claimers, on any
    number of hosts, each take the next free task instead of waiting or finding
    nothing. SQLite has one writer at a time and needs no row locks.
    """
    where, params = _ready_where(skip)
    if absent_repos:
        clause, repos = in_clause("absent", sorted(absent_repos))
        where += f" AND repo NOT {clause}"
        params.update(repos)
    if agents is not None:
        clause, named = in_clause("agent", sorted(agents))
        where += f" AND agent {clause}" if agents else " AND 1 = 0"
        params.update(named)
    found = _tasks(tx, where + " ORDER BY priority DESC, id LIMIT 1" + _skip_locked(tx), params)
    return found[0] if found else None


def ready_without_profile(
    tx: Tx, agents: Collection[str], before: TaskRow | None, limit: int
) -> list[tuple[int, str]]:
    """(id, agent) of ready tasks whose agent profile is not among `agents`, in claim
    order and ahead of `before` (all of them when None), not yet marked as skipped."""
    where, params = _ready_where()
    where += f" AND (last_error IS NULL OR last_error NOT LIKE '{SKIPPED_PROFILE}%')"
    if agents:
        clause, named = in_clause("agent", sorted(agents))
        where += f" AND agent NOT {clause}"
        params.update(named)
    if before is not None:
        where += " AND (priority > :priority OR (priority = :priority AND id < :id))"
        params.update(priority=before.priority, id=before.id)
    sql = f"SELECT id, agent FROM tasks {where} ORDER BY priority DESC, id LIMIT :limit"
    rows = tx.rows(sql + _skip_locked(tx), {**params, "limit": limit})
    return [(row[0], row[1]) for row in rows]


def ready_groups(tx: Tx, skip: Collection[int] = ()) -> list[tuple[str, str, int, int]]:
    """The ready tasks other than those in `skip`, by agent and repository: (agent,
    repo, how many, the lowest id). What `run --next` passed over when it started none."""
    where, params = _ready_where(skip)
    sql = (
        f"SELECT agent, repo, COUNT(*), MIN(id) FROM tasks {where} "
        "GROUP BY agent, repo ORDER BY MIN(id)"
    )
    return [(row[0], row[1], int(row[2]), int(row[3])) for row in tx.rows(sql, params)]


# How `last_error` begins on a task a claim passed over for its agent profile.
SKIPPED_PROFILE = "unknown agent profile"


def _ready_where(skip: Collection[int] = ()) -> tuple[str, dict[str, Any]]:
    """Open ready tasks, other than those in `skip`."""
    where, params = "WHERE status = :ready AND closed_at IS NULL", {"ready": Status.READY.value}
    if skip:
        clause, skipped = in_clause("skip", sorted(skip))
        where += f" AND id NOT {clause}"
        params.update(skipped)
    return where, params


def _skip_locked(tx: Tx) -> str:
    """Rows another claimer holds are passed over, never waited for (PostgreSQL)."""
    return "" if tx.dialect == "sqlite" else " FOR UPDATE SKIP LOCKED"


def expect_latest_attempt(tx: Tx, task: TaskRow, expected: int) -> None:
    """Conflict when the task's latest attempt is not number `expected` (0: none yet):
    the caller acted on a state the task has since left (the monitor's page), or named
    an attempt that is no longer the latest. Checked inside the transaction that acts,
    so nothing can start in between."""
    latest = latest_attempt(tx, task.id)
    number = latest.number if latest else 0
    if number != expected:
        now = f"attempt {number} ({task.status})" if latest else f"no attempt ({task.status})"
        raise Conflict(
            f"task {task.id} has moved on: it is at {now}, not at attempt {expected}",
            hint=f"look again before acting (dispatch show {task.id})",
        )


def lock_task(tx: Tx, task_id: int) -> None:
    """Hold the task's row for the rest of the transaction (PostgreSQL), so a second claim
    of the same task waits for the first and then sees it taken, instead of numbering
    its attempt from the same last one. SQLite's write transaction holds the whole
    database already: nothing to run there."""
    if tx.dialect != "sqlite":
        tx.rows("SELECT id FROM tasks WHERE id = :id FOR UPDATE", {"id": task_id})


def count_in_progress(tx: Tx) -> int:
    sql = "SELECT COUNT(*) FROM tasks WHERE status = :status"
    return int(tx.rows(sql, {"status": Status.IN_PROGRESS.value})[0][0])


def use_agent_session(
    tx: Tx, key: str, *, task_id: int, agent: str, fresh_id: str, renew: bool
) -> str:
    """The session id a task's attempt uses: the stored one, else (or with `renew`) `fresh_id`."""
    renewing = ", session_id = excluded.session_id" if renew else ""
    sql = (
        "INSERT INTO agent_sessions (key, task_id, agent, session_id, created_at, last_used_at)"
        " VALUES (:key, :task, :agent, :session, :now, :now)"
        f" ON CONFLICT (key) DO UPDATE SET last_used_at = excluded.last_used_at{renewing}"
        " RETURNING session_id"
    )
    params = {"key": key, "task": task_id, "agent": agent, "session": fresh_id, "now": utcnow()}
    return str(tx.rows(sql, params)[0][0])


# -- writes ---------------------------------------------------------------------------------


class TaskColumns(TypedDict, total=False):
    """The columns a write may set on a task, typed: a misspelt one fails the type check."""

    title: str
    prompt: str
    repo: str
    agent: str
    base_ref: str
    priority: int
    status: str
    closed_at: datetime | None
    last_error: str | None
    dispatch_failures: int
    current_attempt_id: int | None
    branch: str | None
    worktree: str | None
    created_at: datetime
    updated_at: datetime


class AttemptColumns(TypedDict, total=False):
    """The columns a write may set on an attempt."""

    task_id: int
    number: int
    state: str
    outcome: str | None
    exit_code: int | None
    prior_status: str
    host: str
    dispatcher_pid: int | None
    wrapper_pid: int | None
    agent_pid: int | None
    tmux_session: str | None
    tmux_socket: str | None
    tmux_target: str | None
    worktree: str | None
    branch: str | None
    base_commit: str | None
    session_id: str | None
    resume: bool
    intent: dict[str, Any]
    done_signalled_at: datetime | None
    cancel_requested_at: datetime | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    redispatch_of: int | None


# Column names come from code, never from users; they are checked against the rows' fields
# all the same, since they are spelled into the SQL.


def _assignments(values: Mapping[str, Any], allowed: frozenset[str]) -> str:
    unknown = values.keys() - allowed
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")
    return ", ".join(f"{column} = :{column}" for column in values)


def _insert(tx: Tx, table: str, allowed: frozenset[str], values: Mapping[str, Any]) -> int:
    _assignments(values, allowed)
    columns = ", ".join(values)
    placeholders = ", ".join(f":{column}" for column in values)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) RETURNING id"
    return int(tx.rows(sql, dict(values))[0][0])


def insert_task(tx: Tx, **values: Unpack[TaskColumns]) -> int:
    """A new task row; its id."""
    return _insert(tx, "tasks", _TASK_NAMES, values)


def insert_attempt(tx: Tx, **values: Unpack[AttemptColumns]) -> int:
    """A new attempt row; its id."""
    return _insert(tx, "attempts", _ATTEMPT_NAMES, values)


_NEXT_ATTEMPT_COLUMNS = (
    "task_id", "state", "prior_status", "host", "dispatcher_pid", "tmux_session",
    "tmux_socket", "worktree", "branch", "session_id", "resume", "intent",
    "lease_expires_at", "started_at",
)  # fmt: skip
_NEXT_ATTEMPT_NAMES = frozenset(_NEXT_ATTEMPT_COLUMNS)
_NEXT_ATTEMPT = (
    f"INSERT INTO attempts ({', '.join(_NEXT_ATTEMPT_COLUMNS)}, number, redispatch_of)"
    f" SELECT {', '.join(':' + c for c in _NEXT_ATTEMPT_COLUMNS)},"
    " COALESCE(MAX(number), 0) + 1,"
    " CASE WHEN :redispatch = 1 THEN COALESCE(:redispatch_of, MAX(id)) END"
    " FROM attempts WHERE task_id = :task_id RETURNING id, number"
)


def insert_next_attempt(
    tx: Tx, *, redispatch: bool, redispatch_of: int | None, **values: Any
) -> tuple[int, int]:
    """The task's next attempt (numbered after its last), in one statement; its id and
    number.

    A redispatch records the attempt it follows: `redispatch_of`, else the task's latest.
    """
    if values.keys() != _NEXT_ATTEMPT_NAMES:
        raise ValueError(f"columns {sorted(values.keys() ^ _NEXT_ATTEMPT_NAMES)}")
    params = {**values, "redispatch": int(redispatch), "redispatch_of": redispatch_of}
    [(attempt_id, number)] = tx.rows(_NEXT_ATTEMPT, params)
    return int(attempt_id), int(number)


def move_task(
    tx: Tx,
    task_id: int,
    *,
    expected: Status,
    target: Status,
    attempt_id: int | None = None,
    fence_attempt: bool = False,
    unchanged_since: datetime | None = None,
    **values: Unpack[TaskColumns],
) -> bool:
    """Conditional status change; False when another writer got there first (nothing changed).

    With `fence_attempt`, the task must still belong to `attempt_id`: a stale writer
    whose attempt was reaped or superseded changes nothing. With `unchanged_since`, the
    task must not have been written since it was read with that `updated_at` (every
    write of a task sets it).
    """
    changes: dict[str, Any] = {**values, "status": target.value, "updated_at": utcnow()}
    sql = f"UPDATE tasks SET {_assignments(changes, _TASK_NAMES)}"
    sql += " WHERE id = :where_id AND status = :where_status"
    params = {**changes, "where_id": task_id, "where_status": expected.value}
    if unchanged_since is not None:
        sql += " AND updated_at = :where_updated"
        params["where_updated"] = unchanged_since
    if fence_attempt and attempt_id is None:  # a task stuck without an attempt
        sql += " AND current_attempt_id IS NULL"
    elif fence_attempt:
        sql += " AND current_attempt_id = :where_attempt"
        params["where_attempt"] = attempt_id
    return tx.change(sql, params) == 1


def update_task(tx: Tx, task_id: int, **values: Unpack[TaskColumns]) -> bool:
    changes: dict[str, Any] = {**values, "updated_at": utcnow()}
    sql = f"UPDATE tasks SET {_assignments(changes, _TASK_NAMES)} WHERE id = :where_id"
    return tx.change(sql, {**changes, "where_id": task_id}) == 1


def close_task(tx: Tx, task_id: int) -> bool:
    """Archive a task unless it already is: the row count says who closed it."""
    now = utcnow()
    sql = "UPDATE tasks SET closed_at = :now, updated_at = :now WHERE id = :id"
    return tx.change(sql + " AND closed_at IS NULL", {"now": now, "id": task_id}) == 1


def move_attempt(
    tx: Tx,
    attempt_id: int,
    *,
    expected: Iterable[AttemptState],
    target: AttemptState | None = None,
    **values: Unpack[AttemptColumns],
) -> bool:
    """Conditional attempt update: only from one of the `expected` states."""
    changes: dict[str, Any] = dict(values)
    if target is not None:
        changes["state"] = target.value
    clause, states = in_clause("where_state", [s.value for s in expected])
    sql = f"UPDATE attempts SET {_assignments(changes, _ATTEMPT_NAMES)}"
    sql += f" WHERE id = :where_id AND state {clause}"
    return tx.change(sql, {**changes, **states, "where_id": attempt_id}) == 1


def end_failed_dispatch(
    tx: Tx, attempt_id: int, *, expected: Iterable[AttemptState], error: str | None = None
) -> bool:
    """The attempt ends as a failed dispatch, only from one of the `expected` states:
    whoever ends it first — dispatcher, wrapper or sweep — decides, and once."""
    return move_attempt(
        tx,
        attempt_id,
        expected=expected,
        target=AttemptState.ENDED,
        outcome=Outcome.DISPATCH_FAILED.value,
        ended_at=utcnow(),
        error=error,
    )


def update_attempt(tx: Tx, attempt_id: int, **values: Unpack[AttemptColumns]) -> None:
    sql = f"UPDATE attempts SET {_assignments(values, _ATTEMPT_NAMES)} WHERE id = :where_id"
    tx.change(sql, {**values, "where_id": attempt_id})


def record_event(
    tx: Tx,
    kind: str,
    *,
    task_id: int | None,
    attempt_id: int | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    **detail: Any,
) -> None:
    """Append one event (events are never updated or deleted)."""
    sql = (
        "INSERT INTO events (task_id, attempt_id, kind, from_status, to_status, at, detail)"
        " VALUES (:task, :attempt, :kind, :from_status, :to_status, :at, :detail)"
    )
    params = {
        "task": task_id,
        "attempt": attempt_id,
        "kind": kind,
        "from_status": from_status,
        "to_status": to_status,
        "at": utcnow(),
        "detail": {k: v for k, v in detail.items() if v is not None},
    }
    tx.change(sql, params)


def release_task(
    tx: Tx,
    task_id: int,
    *,
    attempt_id: int | None,
    target: Status,
    kind: str,
    columns: TaskColumns | None = None,
    detail: Mapping[str, Any] | None = None,
) -> bool:
    """The task leaves in-progress on behalf of its current attempt: one fenced
    conditional update (also setting `columns`) and, only if it won, its one event
    (with `detail`). False: someone else did."""
    changes: TaskColumns = {**(columns or TaskColumns()), "current_attempt_id": None}
    moved = move_task(
        tx,
        task_id,
        expected=Status.IN_PROGRESS,
        target=target,
        attempt_id=attempt_id,
        fence_attempt=True,
        **changes,
    )
    if moved:
        record_event(
            tx,
            kind,
            task_id=task_id,
            attempt_id=attempt_id,
            from_status=Status.IN_PROGRESS,
            to_status=target,
            **(detail or {}),
        )
    return moved


class AttemptSummary(NamedTuple):
    """An attempt as the monitor's task list shows it; its timestamps are ISO 8601 text."""

    id: int
    task_id: int
    number: int
    state: str
    outcome: str | None
    exit_code: int | None
    host: str
    tmux_target: str | None
    worktree: str | None
    branch: str | None
    session_id: str | None
    started_at: str
    ended_at: str | None
    heartbeat_at: str | None
    error: str | None
    redispatch_of: int | None


_SUMMARY_TIMES = ("started_at", "ended_at", "heartbeat_at")


def attempt_summary(row: Sequence[Any]) -> AttemptSummary:
    return records(AttemptSummary, [row], _SUMMARY_TIMES, convert=iso_utc)[0]


def events_after(
    tx: Tx, after: int, task_id: int | None = None, limit: int = 1000
) -> list[EventRow]:
    """Events newer than `after`, oldest first: a range read on the primary key."""
    sql = f"SELECT {', '.join(EventRow._fields)} FROM events WHERE id > :after"
    params: dict[str, Any] = {"after": after, "limit": limit}
    if task_id is not None:
        sql += " AND task_id = :task"
        params["task"] = task_id
    found = records(EventRow, tx.rows(sql + " ORDER BY id LIMIT :limit", params), ("at",))
    return [e._replace(detail=json_value(e.detail)) for e in found]


def last_event_id(tx: Tx) -> int:
    return int(tx.rows("SELECT COALESCE(MAX(id), 0) FROM events")[0][0])
