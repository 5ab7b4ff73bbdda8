"""The reads whose cost must follow what is printed, not what is stored: `list` and the
event log, a page at a time or streamed, each by an index (migration 0003).

Like `statements`, SQL text both SQLite and PostgreSQL take, run inside a transaction
the caller opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from itertools import islice
from typing import Any, NamedTuple, cast

from dispatch.store.convert import iso_utc
from dispatch.store.direct import Tx, in_clause
from dispatch.store.statements import LATEST_HOST, AttemptSummary, TaskSummary


class TaskQuery(NamedTuple):
    """Which tasks `list` shows; every filter runs in SQL."""

    statuses: Sequence[str] = ()
    include_closed: bool = False
    repo: str | None = None
    agent: str | None = None
    host: str | None = None  # the host of the task's latest attempt


# The last field, the latest attempt's host, is a subquery (an indexed probe per row).
_SUMMARY_COLUMNS = ", ".join(TaskSummary._fields[:-1]) + ", " + LATEST_HOST
_SUMMARY_TIMES = [TaskSummary._fields.index(n) for n in ("closed_at", "created_at", "updated_at")]


def _task_where(q: TaskQuery) -> tuple[str, dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if q.statuses:
        clause, named = in_clause("status", sorted(set(q.statuses)))
        where.append(f"status {clause}")
        params.update(named)
    if not q.include_closed:
        where.append("closed_at IS NULL")
    if q.repo is not None:
        where.append("repo = :repo")
        params["repo"] = q.repo
    if q.agent is not None:
        where.append("agent = :agent")
        params["agent"] = q.agent
    if q.host is not None:
        # The latest attempt is the one with the highest id among the task's attempts.
        where.append(
            "id IN (SELECT a.task_id FROM attempts a WHERE a.host = :host AND a.id ="
            " (SELECT MAX(b.id) FROM attempts b WHERE b.task_id = a.task_id))"
        )
        params["host"] = q.host
    return (" WHERE " + " AND ".join(where)) if where else "", params


def task_page_sql(q: TaskQuery, limit: int | None) -> tuple[str, dict[str, Any]]:
    """The statement `stream_tasks` runs (the query-plan test reads it)."""
    where, params = _task_where(q)
    sql = f"SELECT {_SUMMARY_COLUMNS} FROM tasks{where} ORDER BY priority DESC, id"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    return sql, params


def task_count_sql(q: TaskQuery) -> tuple[str, dict[str, Any]]:
    where, params = _task_where(q)
    return f"SELECT COUNT(*) FROM tasks{where}", params


def stream_tasks(tx: Tx, q: TaskQuery, limit: int | None = None) -> Iterator[TaskSummary]:
    """In the order `run --next` takes them, as they are read; at most `limit`."""
    return map(task_summary, stream_task_rows(tx, q, limit))


def stream_task_rows(tx: Tx, q: TaskQuery, limit: int | None = None) -> Iterator[Sequence[Any]]:
    """`stream_tasks`' rows as stored, before any conversion: the monitor keeps what it
    made of each, and looks a row up by exactly what was read."""
    sql, params = task_page_sql(q, limit)
    return tx.stream(sql, params)


def task_summary(row: Sequence[Any]) -> TaskSummary:
    values = list(row)
    for i in _SUMMARY_TIMES:
        values[i] = iso_utc(values[i])
    return TaskSummary._make(values)


# The monitor's board: each task with its latest attempt, in one statement (and the
# task's host is that attempt's, not a second probe). Attempt columns, after the task's.
_BOARD_COLUMNS = ", ".join(
    [*(f"tasks.{c}" for c in TaskSummary._fields[:-1]), "a.host"]
    + [f"a.{c}" for c in AttemptSummary._fields]
)


def board_sql(q: TaskQuery, *, packed: bool = False) -> tuple[str, dict[str, Any]]:
    """The statement `stream_board` runs (the query-plan test reads it); `packed`: each
    row as one JSON array text (SQLite's `json_array`) instead of its columns."""
    if q.repo is not None or q.agent is not None or q.host is not None:
        raise ValueError("the board filters by status and closed only")
    where, params = _task_where(q)
    columns = f"json_array({_BOARD_COLUMNS})" if packed else _BOARD_COLUMNS
    sql = (
        f"SELECT {columns} FROM tasks"
        " LEFT JOIN attempts a ON a.id ="
        " (SELECT MAX(b.id) FROM attempts b WHERE b.task_id = tasks.id)"
        f"{where} ORDER BY tasks.priority DESC, tasks.id"
    )
    return sql, params


# A board row as read, before any conversion: equal rows make equal JSON, so the
# monitor keeps what it made of each and converts only the rows that changed. On SQLite
# the row is one text, the JSON array of its columns: reading 10,000 rows of 30 columns
# into Python objects cost twice what SQLite took to make them, and a text is quick to
# look up; `board_parts` reads the values back (SQLite's values are JSON's: numbers,
# text, null).
StoredRow = str | tuple[Any, ...]


def stream_board(tx: Tx, q: TaskQuery) -> Iterator[StoredRow]:
    """Each task's columns as `stream_task_rows` reads them, then its latest attempt's
    as stored (all None before any), in `list`'s order; on SQLite as one text:
    `board_parts` splits one."""
    if tx.dialect == "sqlite":
        sql, params = board_sql(q, packed=True)
        return (row[0] for row in tx.stream(sql, params))
    sql, params = board_sql(q)
    return map(tuple, tx.stream(sql, params))


_TASK_WIDTH = len(TaskSummary._fields)


def board_parts(row: StoredRow) -> tuple[Sequence[Any], Sequence[Any] | None]:
    """A board row's task and latest attempt (None before any)."""
    values = json.loads(row) if isinstance(row, str) else row
    attempt = values[_TASK_WIDTH:]
    return values[:_TASK_WIDTH], None if attempt[0] is None else attempt


def count_tasks(tx: Tx, q: TaskQuery) -> int:
    sql, params = task_count_sql(q)
    return int(tx.rows(sql, params)[0][0])


# -- the event log ----------------------------------------------------------------------------


class EventQuery(NamedTuple):
    """Which events `events` and `show` print."""

    task_id: int | None = None
    after: int | None = None  # only events with a higher id
    since: datetime | None = None  # only events at or after this time


class EventLine(NamedTuple):
    """An event as printed: `at` is ISO 8601 text (`…Z`), `detail` the stored JSON (text
    on SQLite, decoded on other backends), so a million of them stream without parsing."""

    id: int
    task_id: int | None
    attempt_id: int | None
    kind: str
    from_status: str | None
    to_status: str | None
    at: str
    detail: Any


_EVENT_COLUMNS = ", ".join(EventLine._fields)


def _event_where(tx: Tx, q: EventQuery) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if q.task_id is not None:
        where.append("task_id = :task")
        params["task"] = q.task_id
    if q.after is not None:
        where.append("id > :after")
        params["after"] = q.after
    if q.since is not None:
        # Events are appended in time order, give or take concurrent writers: from the
        # first id at or after the time (by the `at` index), then by id as everywhere else.
        # `id + 0`: read by the `at` index; a bare MIN(id) walks the log from its start.
        since_sql = "SELECT MIN(id + 0) FROM events WHERE at >= :since"
        first = tx.rows(since_sql, {"since": q.since})
        where.append("id >= :first AND at >= :since")
        params.update(first=first[0][0] if first[0][0] is not None else -1, since=q.since)
        if first[0][0] is None:
            where.append("1 = 0")
    return where, params


def _where(clauses: list[str]) -> str:
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def event_page_sql(
    tx: Tx, q: EventQuery, limit: int | None, upto: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Oldest first; with `limit`, the newest `limit` of them (still oldest first); with
    `upto`, none above that id (a page ends where its snapshot's log ended)."""
    clauses, params = _event_where(tx, q)
    if upto is not None:
        clauses.append("id <= :upto")
        params["upto"] = upto
    sql = f"SELECT {_EVENT_COLUMNS} FROM events{_where(clauses)}"
    if limit is None:
        return sql + " ORDER BY id", params
    params["limit"] = limit
    return f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT :limit) AS newest ORDER BY id", params


# Events `stream_event_batches` hands over at a time.
EVENT_BATCH = 500


def stream_event_batches(
    tx: Tx, q: EventQuery, limit: int | None = None, upto: int | None = None
) -> Iterator[list[EventLine]]:
    """`stream_events`' events a batch at a time: a million of them are printed faster
    a batch per call than an event per call."""
    sql, params = event_page_sql(tx, q, limit, upto)
    rows = tx.stream(sql, params)
    while batch := list(islice(rows, EVENT_BATCH)):
        # `at` is NOT NULL: its text is never None.
        yield [
            EventLine(i, t, a, k, f, to, cast(str, iso_utc(at)), d)
            for i, t, a, k, f, to, at, d in batch
        ]


def stream_events(
    tx: Tx, q: EventQuery, limit: int | None = None, upto: int | None = None
) -> Iterator[EventLine]:
    for batch in stream_event_batches(tx, q, limit, upto):
        yield from batch


def count_events_before(tx: Tx, q: EventQuery, before: int) -> int:
    """How many events match `q` with an id below `before`: what a limit left out."""
    clauses, params = _event_where(tx, q)
    clauses.append("id < :before")
    sql = f"SELECT COUNT(*) FROM events{_where(clauses)}"
    return int(tx.rows(sql, {**params, "before": before})[0][0])


def last_event_id(tx: Tx) -> int:
    return int(tx.rows("SELECT COALESCE(MAX(id), 0) FROM events")[0][0])
