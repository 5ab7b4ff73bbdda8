"""The tests' own look at the database, not through dispatch: sqlite3 on the SQLite
file, psycopg on PostgreSQL (whichever this test's `DISPATCH_DB` names).

Rows read the same on both: indexed by position or by column name, timestamps as the
text SQLite holds (`YYYY-MM-DD HH:MM:SS.ffffff`, naive UTC) and JSON as its text, so
one assertion serves both backends. Statements use `?` placeholders.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tests.conftest import Env


class Row(Protocol):
    def __getitem__(self, key: int | str) -> Any: ...
    def keys(self) -> Sequence[str]: ...


class _PgRow:
    """What sqlite3.Row offers: row[0], row["name"], keys(), dict(row)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._names = list(names)
        self._values = [_as_sqlite_holds(v) for v in values]

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names.index(key)]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return repr(dict(zip(self._names, self._values, strict=True)))


def _as_sqlite_holds(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


def postgres_url() -> str | None:
    """This test's PostgreSQL URL, or None when it runs on SQLite."""
    url = os.environ.get("DISPATCH_DB", "")
    return url if url.startswith("postgresql") else None


def _libpq(url: str) -> str:
    """The SQLAlchemy URL (`postgresql+psycopg://…`) as libpq takes it."""
    return "postgresql://" + url.split("://", 1)[1]


def _pg_sql(query: str) -> str:
    return query.replace("%", "%%").replace("?", "%s")


def rows(env: Env, query: str, *params: Any) -> list[Any]:
    """Read the database directly, as an independent witness."""
    url = postgres_url()
    if url is None:
        conn = sqlite3.connect(env.db_path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with closing(psycopg.connect(_libpq(url), autocommit=True)) as pg:
        cursor = pg.execute(_pg_sql(query), params)
        names = [c.name for c in cursor.description or ()]
        return [_PgRow(names, values) for values in cursor.fetchall()]


def execute(env: Env, statement: str, *params: Any) -> None:
    """Change the database behind dispatch's back (a stale heartbeat, an expired lease)."""
    url = postgres_url()
    if url is None:
        conn = sqlite3.connect(env.db_path, timeout=10)
        try:
            with conn:
                conn.execute(statement, params)
        finally:
            conn.close()
        return
    import psycopg

    with closing(psycopg.connect(_libpq(url), autocommit=True)) as pg:
        pg.execute(_pg_sql(statement), params)


@contextmanager
def raw(env: Env) -> Iterator[Any]:
    """A connection of the backend's own driver, for what the helpers above cannot say."""
    url = postgres_url()
    if url is None:
        with closing(sqlite3.connect(env.db_path, timeout=10)) as conn:
            yield conn
        return
    import psycopg

    with closing(psycopg.connect(_libpq(url), autocommit=True)) as pg:
        yield pg
