"""The reads of `list`, `events` and `show` use an index on SQLite: no statement they
run scans the event log, nor, with a filter, the tasks (EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import pytest

from dispatch.store import pages
from dispatch.store import statements as st
from dispatch.store.database import Database
from dispatch.store.direct import Params, _SqliteTx, configure_sqlite
from tests.conftest import Env

pytestmark = pytest.mark.sqlite_only  # SQLite's EXPLAIN QUERY PLAN


class Recording(_SqliteTx):
    """Runs every statement as the store would, and keeps what it ran."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__(connection)
        self.statements: list[tuple[str, Params]] = []

    def rows(self, sql: str, params: Params | None = None) -> list[Sequence[Any]]:
        self.statements.append((sql, params or {}))
        return super().rows(sql, params)

    def stream(self, sql: str, params: Params | None = None) -> Iterator[Sequence[Any]]:
        self.statements.append((sql, params or {}))
        return super().stream(sql, params)

    def plans(self) -> list[tuple[str, list[str]]]:
        return [
            (
                sql,
                [
                    str(row[3])
                    for row in super(Recording, self).rows(f"EXPLAIN QUERY PLAN {sql}", params)
                ],
            )
            for sql, params in self.statements
        ]


@pytest.fixture
def connection(env: Env) -> Iterator[sqlite3.Connection]:
    database = Database(f"sqlite:///{env.db_path}")
    database.ensure_schema()
    database.dispose()
    with closing(sqlite3.connect(env.db_path)) as conn:
        configure_sqlite(conn)
        yield conn


def _record(connection: sqlite3.Connection, read: Callable[[Recording], object]) -> Recording:
    tx = Recording(connection)
    result = read(tx)
    if isinstance(result, Iterator):
        list(result)
    return tx


NOW = datetime.now(UTC)
EVENT_QUERIES = [
    pages.EventQuery(),
    pages.EventQuery(task_id=3),
    pages.EventQuery(after=10),
    pages.EventQuery(since=NOW),
    pages.EventQuery(task_id=3, after=10, since=NOW),
]


@pytest.mark.parametrize("query", EVENT_QUERIES)
@pytest.mark.parametrize("limit", [None, 200])
def test_no_event_read_scans_the_log(
    connection: sqlite3.Connection, query: pages.EventQuery, limit: int | None
) -> None:
    reads: list[Callable[[Recording], object]] = [
        lambda tx: pages.stream_events(tx, query, limit, upto=pages.last_event_id(tx)),
        lambda tx: pages.count_events_before(tx, query, 500),
        # What `events --follow` polls.
        lambda tx: pages.stream_events(tx, pages.EventQuery(query.task_id, after=42)),
        # What `show` reads.
        lambda tx: st.events(tx, 3, limit),
    ]
    for read in reads:
        for sql, plan in _record(connection, read).plans():
            assert plan, sql
            for step in plan:
                assert not step.startswith("SCAN events"), (sql, plan)
            # By the primary key or an index (a bare "SEARCH events" is MAX(id)'s one look-up).
            assert any(step.startswith("SEARCH events") for step in plan), (sql, plan)


TASK_QUERIES = [
    (pages.TaskQuery(), "ix_tasks_open_order"),
    (pages.TaskQuery(statuses=("ready",)), "ix_tasks_claim_order"),
    (pages.TaskQuery(statuses=("ready",), include_closed=True), "ix_tasks_claim_order"),
    (pages.TaskQuery(statuses=("failed", "ready")), "ix_tasks_"),
    (pages.TaskQuery(repo="/r"), "ix_tasks_repo_order"),
    (pages.TaskQuery(repo="/r", include_closed=True), "ix_tasks_repo_order"),
    (pages.TaskQuery(agent="shell"), "ix_tasks_agent_order"),
    (pages.TaskQuery(host="alpha"), "ix_attempts_host_task_id"),
]


@pytest.mark.parametrize(("query", "index"), TASK_QUERIES)
def test_a_filtered_list_reads_tasks_by_an_index(
    connection: sqlite3.Connection, query: pages.TaskQuery, index: str
) -> None:
    for limit in (None, 100):
        tx = Recording(connection)
        list(pages.stream_tasks(tx, query, limit))
        pages.count_tasks(tx, query)
        for sql, plan in tx.plans():
            assert not any(step.startswith("SCAN tasks") for step in plan), (sql, plan)
            assert any(index in step for step in plan), (sql, plan)


def test_the_default_list_walks_the_open_tasks_in_order_without_sorting(
    connection: sqlite3.Connection,
) -> None:
    tx = _record(connection, lambda tx: pages.stream_tasks(tx, pages.TaskQuery(), 100))
    # Each task's latest host: one probe of the attempts' task index per row listed.
    latest_host = [
        "CORRELATED SCALAR SUBQUERY 1",
        "SEARCH a USING INDEX ix_attempts_task_id (task_id=?)",
    ]
    [(_, plan)] = tx.plans()
    assert plan == ["SEARCH tasks USING INDEX ix_tasks_open_order (closed_at=?)", *latest_host]
    # --all: the same order, from its own index, still without a sort.
    tx = _record(
        connection, lambda tx: pages.stream_tasks(tx, pages.TaskQuery(include_closed=True), 100)
    )
    [(_, plan)] = tx.plans()
    assert plan == ["SCAN tasks USING INDEX ix_tasks_list_order", *latest_host]


def test_the_order_indexes_are_descending_on_priority(connection: sqlite3.Connection) -> None:
    expected = {
        "ix_tasks_list_order": [("priority", 1), ("id", 0)],
        "ix_tasks_open_order": [("closed_at", 0), ("priority", 1), ("id", 0)],
        "ix_tasks_repo_order": [("repo", 0), ("priority", 1), ("id", 0)],
        "ix_tasks_agent_order": [("agent", 0), ("priority", 1), ("id", 0)],
    }
    for name, columns in expected.items():
        found = [
            (row[2], row[3])
            for row in connection.execute(f"PRAGMA index_xinfo({name})")
            if row[5]  # key columns only
        ]
        assert found == columns, name


@pytest.mark.parametrize(
    "query",
    [pages.TaskQuery(), pages.TaskQuery(include_closed=True), pages.TaskQuery(statuses=("ready",))],
)
def test_the_monitors_board_reads_each_tasks_latest_attempt_by_its_keys(
    connection: sqlite3.Connection, query: pages.TaskQuery
) -> None:
    tx = _record(connection, lambda tx: pages.stream_board(tx, query))
    [(_, plan)] = tx.plans()
    assert not any(step.startswith("SCAN a") or step.startswith("SCAN b") for step in plan), plan
    assert "SEARCH a USING INTEGER PRIMARY KEY (rowid=?) LEFT-JOIN" in plan, plan
    assert any(s.startswith("SEARCH b USING COVERING INDEX ix_attempts_task_id") for s in plan)
    assert not any("TEMP B-TREE" in step for step in plan), plan  # no sort: the list's order
