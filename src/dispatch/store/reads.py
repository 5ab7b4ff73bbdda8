"""The reads commands run all day — `list`, the sweep's census — as plain SQL text.

Importing SQLAlchemy and mapping the models costs more than `dispatch list` over
10,000 tasks or an idle sweep from cron. So on a SQLite file whose schema is current,
these reads open it with the standard library's sqlite3. Anything else — another
backend, a database to create, migrate or refuse — goes through `Database`, which
checks the schema first and runs the very same SQL text through SQLAlchemy. The SQL
is portable, and the records are the same whichever way they were read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar
from urllib.parse import quote

from dispatch.errors import EnvironmentProblem
from dispatch.lifecycle import AttemptState, Status
from dispatch.store.revisions import HEAD_REVISION

if TYPE_CHECKING:
    from dispatch.store.database import Database

Statement = tuple[str, dict[str, Any]]
R = TypeVar("R", bound=tuple[Any, ...])


class Reader(Protocol):
    def read(self, statements: Sequence[Statement]) -> list[list[Sequence[Any]]]:
        """Each statement's rows, all read from one snapshot of the database."""
        ...

    def close(self) -> None: ...


def open_reader(url: str, database: Callable[[], Database]) -> Reader:
    """A stdlib connection to a current SQLite file, else reads through `Database`."""
    connection = _open_current_sqlite(url)
    if connection is None:
        return DatabaseReader(database())
    return SqliteReader(connection, url.removeprefix(_SQLITE))


_SQLITE = "sqlite:///"


def _open_current_sqlite(url: str) -> sqlite3.Connection | None:
    path = url.removeprefix(_SQLITE)
    # Only a plain file path: URL options, escapes and in-memory databases go the long way.
    if not url.startswith(_SQLITE) or not path or any(c in path for c in "?%") or ":" in path:
        return None
    try:
        # mode=rw never creates the file: a missing database is Database's to create, 0600.
        connection = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        row = None  # not a database, not ours, or empty: Database says which
    if row is None or row[0] != HEAD_REVISION:
        connection.close()
        return None
    return connection


class SqliteReader:
    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._connection = connection
        self._path = path

    def read(self, statements: Sequence[Statement]) -> list[list[Sequence[Any]]]:
        try:
            self._connection.execute("BEGIN")  # deferred: a read snapshot, no write lock
            try:
                return [self._connection.execute(sql, p).fetchall() for sql, p in statements]
            finally:
                self._connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise EnvironmentProblem(f"database {self._path}: {exc}") from None

    def close(self) -> None:
        self._connection.close()


class DatabaseReader:
    def __init__(self, database: Database) -> None:
        self._database = database

    def read(self, statements: Sequence[Statement]) -> list[list[Sequence[Any]]]:
        from sqlalchemy import text

        return self._database.read(
            lambda s: [list(s.execute(text(sql), p).all()) for sql, p in statements]
        )

    def close(self) -> None:
        pass  # the Database is the App's to dispose of


# -- records ----------------------------------------------------------------------------


def _utc(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite keeps text, others datetimes)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]


def _records(kind: type[R], rows: Sequence[Sequence[Any]], times: Sequence[str]) -> list[R]:
    fields: tuple[str, ...] = kind._fields  # type: ignore[attr-defined]
    at = [fields.index(name) for name in times]
    found = []
    for row in rows:
        values = list(row)
        for i in at:
            values[i] = _utc(values[i])
        found.append(kind._make(values))  # type: ignore[attr-defined]
    return found


def _in(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`IN (:name0, :name1, …)` and its parameters: one text for both ways of reading."""
    params = {f"{name}{i}": value for i, value in enumerate(values)}
    return "IN (" + ", ".join(f":{key}" for key in params) + ")", params


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
    reader: Reader, statuses: Sequence[str] = (), include_closed: bool = False
) -> list[TaskSummary]:
    """In the order `run --next` takes them: highest priority first, then oldest."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if statuses:
        clause, params = _in("status", statuses)
        where.append(f"status {clause}")
    if not include_closed:
        where.append("closed_at IS NULL")
    sql = f"SELECT {', '.join(TaskSummary._fields)} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY priority DESC, id"
    [rows] = reader.read([(sql, params)])
    return _records(TaskSummary, rows, _TASK_TIMES)


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


def census(reader: Reader, task_ids: Sequence[int]) -> Census:
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
        clause, params = _in("task", task_ids)
        statements.append((f"SELECT id, repo FROM tasks WHERE id {clause}", params))
    rows = reader.read(statements)
    stuck_tasks = [
        StuckTask(
            row[0],
            None if row[1] is None else _records(AttemptCheck, [row[1:]], _ATTEMPT_TIMES)[0],
        )
        for row in rows[1]
    ]
    repos = {task_id: repo for task_id, repo in rows[2]} if task_ids else {}
    return Census(_records(AttemptCheck, rows[0], _ATTEMPT_TIMES), stuck_tasks, repos)
