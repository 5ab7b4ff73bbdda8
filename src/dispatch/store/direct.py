"""Running the store's SQL text (`statements`) with or without SQLAlchemy.

Importing SQLAlchemy and mapping the models costs more than `dispatch list` over
10,000 tasks, an idle sweep from cron, the wrapper's acknowledgement, or the whole of
a `dispatch run` past its git and tmux calls. So there are two executors behind one
`Tx`: on a SQLite file whose schema is current, `SqliteExecutor` runs statements on the
standard library's sqlite3 with the settings `Database` uses. Anything else — another
backend, a database to create, migrate or refuse — goes to `SqlAlchemyExecutor`, which
runs the very same SQL text on a SQLAlchemy Core connection from `Database` (which
checks the schema first); no ORM session is involved. The SQL is portable, and both
bind and read values by one table (`convert`), so what they read or write is the same.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote

from dispatch.errors import EnvironmentProblem
from dispatch.store.convert import sqlite_params, stored_time, to_engine
from dispatch.store.revisions import HEAD_REVISION

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import TextClause

    from dispatch.store.database import Database

Params = Mapping[str, Any]
R = TypeVar("R", bound=tuple[Any, ...])
T = TypeVar("T")

# SQLite's own busy handler sleeps in growing steps (up to 100 ms) while a writer holds
# the lock, so under contention most of a write is spent asleep. A short busy_timeout
# and our own retry with short random pauses keeps writers moving; the deadline, not a
# count, bounds it: busy_timeout alone still lets long contended runs fail.
BUSY_TIMEOUT_MS = 50
WRITE_PATIENCE_SECONDS = 30.0
# Rows fetched at a time by `Tx.stream`.
STREAM_BATCH = 500


# PostgreSQL's "try the transaction again" codes: a deadlock between two writers that
# lock the same rows in another order (the dispatcher's record and a quick agent's exit),
# and a serialisation failure. The whole transaction is what is retried.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})


def begin_sqlite(read_only: bool) -> str:
    """How every SQLite transaction of dispatch begins, on either executor: a read takes
    no lock; a write takes the write lock at once, so it waits its turn (busy_timeout)
    instead of failing half way when it first writes (a deferred transaction would)."""
    return "BEGIN" if read_only else "BEGIN IMMEDIATE"


def retry_while_locked(
    transaction: Callable[[], T], errors: type[Exception] | tuple[type[Exception], ...]
) -> T:
    """Run a whole transaction again, after a short random pause, while it fails only
    because another writer holds the lock (or won a deadlock); for at most
    WRITE_PATIENCE_SECONDS. Any other error, and the last one, is raised as it is.
    Writes, and the schema check of a new SQLite file, which its creator's commit and
    switch to WAL keep locked."""
    deadline = time.monotonic() + WRITE_PATIENCE_SECONDS
    while True:
        try:
            return transaction()
        except errors as exc:
            if not is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.001, 0.01))


def is_locked(exc: BaseException) -> bool:
    """Whether the write lost a race it may simply run again (SQLite busy, PostgreSQL
    deadlock or serialisation failure)."""
    orig = getattr(exc, "orig", exc)
    if getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    message = str(orig).lower()
    return "database is locked" in message or "database is busy" in message


class Tx(Protocol):
    """One open transaction that runs SQL text with named (`:name`) parameters."""

    @property
    def dialect(self) -> str:
        """ "sqlite", "postgresql", …: for the few statements that differ."""
        ...

    def rows(self, sql: str, params: Params | None = None) -> list[Sequence[Any]]: ...

    def stream(self, sql: str, params: Params | None = None) -> Iterator[Sequence[Any]]:
        """The rows one by one as the database yields them: memory does not grow with them."""
        ...

    def change(self, sql: str, params: Params | None = None) -> int:
        """Run a write; how many rows it changed."""
        ...


class Direct(Protocol):
    def read(self, work: Callable[[Tx], T]) -> T:
        """Run `work` in a read transaction: one snapshot, no write lock (on PostgreSQL,
        REPEATABLE READ)."""
        ...

    def write(self, work: Callable[[Tx], T]) -> T:
        """Run `work` in one write transaction, retried while another writer holds the lock
        (so `work` must change nothing but the database)."""
        ...

    def version(self) -> Hashable | None:
        """A value that is the same only while nothing was committed to the database
        since (None: this executor cannot tell, so every read must be made)."""
        ...

    def close(self) -> None: ...


def open_direct(url: str, database: Callable[[], Database]) -> Direct:
    """A stdlib connection to a current SQLite file, else a connection from `Database`."""
    connection = _open_current_sqlite(url)
    if connection is None:
        return SqlAlchemyExecutor(database())
    return SqliteExecutor(connection, url.removeprefix(_SQLITE))


_SQLITE = "sqlite:///"


def _open_current_sqlite(url: str) -> sqlite3.Connection | None:
    path = url.removeprefix(_SQLITE)
    # Only a plain file path: URL options, escapes and in-memory databases go the long way.
    if not url.startswith(_SQLITE) or not path or any(c in path for c in "?%:"):
        return None
    try:
        # mode=rw never creates the file: a missing database is Database's to create, 0600.
        connection = sqlite3.connect(
            f"file:{quote(path)}?mode=rw", uri=True, check_same_thread=False
        )
    except sqlite3.Error:
        return None
    try:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        row = None  # not a database, not ours, or empty: Database says which
    if row is None or row[0] != HEAD_REVISION:
        connection.close()
        return None
    configure_sqlite(connection)
    return connection


def configure_sqlite(connection: sqlite3.Connection) -> None:
    """What every connection to a SQLite file gets, here and in Database.

    We emit BEGIN ourselves (pysqlite's deferred BEGIN makes a read-then-write
    transaction fail at once with SQLITE_BUSY under contention). None of the pragmas
    writes to the file: a refused database stays byte-for-byte intact.
    """
    connection.isolation_level = None
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA synchronous = NORMAL")


class _SqliteTx:
    dialect = "sqlite"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def _execute(self, sql: str, params: Params | None) -> sqlite3.Cursor:
        return self._connection.execute(sql, sqlite_params(params))

    def rows(self, sql: str, params: Params | None = None) -> list[Sequence[Any]]:
        return self._execute(sql, params).fetchall()

    def stream(self, sql: str, params: Params | None = None) -> Iterator[Sequence[Any]]:
        cursor = self._execute(sql, params)
        cursor.arraysize = STREAM_BATCH
        while batch := cursor.fetchmany():
            yield from batch

    def change(self, sql: str, params: Params | None = None) -> int:
        return self._execute(sql, params).rowcount


class SqliteExecutor:
    """Statements on the standard library's sqlite3, over one connection to a current file."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._connection = connection
        self._path = path
        # One connection, and the wrapper's heartbeat thread shares it: one transaction
        # at a time.
        self._lock = threading.Lock()
        # Write transactions committed on this connection, which SQLite's data_version
        # leaves out.
        self._commits = 0

    def read(self, work: Callable[[Tx], T]) -> T:
        try:
            return self._transaction(work, read_only=True)
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None

    def write(self, work: Callable[[Tx], T]) -> T:
        try:
            return retry_while_locked(
                lambda: self._transaction(work, read_only=False),
                sqlite3.OperationalError,
            )
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None

    def version(self) -> Hashable:
        """SQLite's data_version (it changes with every commit of another connection)
        and this connection's own commits."""
        with self._lock:
            try:
                (changed,) = self._connection.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error as exc:
                raise self._unusable(exc) from None
            return (changed, self._commits)

    def _transaction(self, work: Callable[[Tx], T], *, read_only: bool) -> T:
        connection = self._connection
        with self._lock:
            try:
                connection.execute(begin_sqlite(read_only))
                result = work(_SqliteTx(connection))
                connection.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: a transaction left open would make every
                # retry fail with "cannot start a transaction within a transaction".
                if connection.in_transaction:
                    connection.rollback()
                raise
            finally:
                # Under the lock, so that `version` never sees a commit before its count.
                if not read_only:
                    self._commits += 1
        return result

    def _unusable(self, exc: sqlite3.Error) -> EnvironmentProblem:
        return EnvironmentProblem(f"database {self._path}: {exc}")

    def close(self) -> None:
        self._connection.close()


class SqlAlchemyExecutor:
    """Statements on a SQLAlchemy Core connection in one of `Database`'s transactions."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def read(self, work: Callable[[Tx], T]) -> T:
        return self._database.read(lambda conn: work(_ConnectionTx(conn)))

    def write(self, work: Callable[[Tx], T]) -> T:
        return self._database.write(lambda conn: work(_ConnectionTx(conn)))

    def version(self) -> Hashable | None:
        return None  # a server shared by hosts says nothing cheap about what changed

    def close(self) -> None:
        pass  # the Database is the App's to dispose of


class _ConnectionTx:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.dialect: str = connection.dialect.name

    def _statement(self, sql: str, params: Params | None) -> tuple[TextClause, dict[str, Any]]:
        """The statement and its parameters, bound by the conversion table as the models
        bind them: on SQLite the very values the stdlib executor binds."""
        from sqlalchemy import JSON, DateTime, bindparam, text

        if self.dialect == "sqlite":
            return text(sql), sqlite_params(params)
        values = {k: to_engine(v) for k, v in (params or {}).items()}
        typed = [
            bindparam(k, type_=DateTime() if isinstance(v, datetime) else JSON())
            for k, v in values.items()
            if isinstance(v, datetime | dict | list)
        ]
        return text(sql).bindparams(*typed), values

    def rows(self, sql: str, params: Params | None = None) -> list[Sequence[Any]]:
        return list(self._connection.execute(*self._statement(sql, params)).all())

    def stream(self, sql: str, params: Params | None = None) -> Iterator[Sequence[Any]]:
        # A server-side cursor where the driver has one (psycopg): rows arrive in batches.
        result = self._connection.execute(
            *self._statement(sql, params), execution_options={"yield_per": STREAM_BATCH}
        )
        for batch in result.partitions():
            yield from batch

    def change(self, sql: str, params: Params | None = None) -> int:
        return int(self._connection.execute(*self._statement(sql, params)).rowcount)


# -- records ----------------------------------------------------------------------------


def records(
    kind: type[R],
    rows: Sequence[Sequence[Any]],
    times: Sequence[str],
    convert: Callable[[Any], Any] = stored_time,
) -> list[R]:
    """Rows as `kind`, their `times` columns converted (to aware UTC datetimes)."""
    fields: tuple[str, ...] = kind._fields  # type: ignore[attr-defined]
    at = [fields.index(name) for name in times]
    found = []
    for row in rows:
        values = list(row)
        for i in at:
            values[i] = convert(values[i])
        found.append(kind._make(values))  # type: ignore[attr-defined]
    return found


def in_clause(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`IN (:name0, :name1, …)` and its parameters: one text for both ways of running it."""
    params = {f"{name}{i}": value for i, value in enumerate(values)}
    return "IN (" + ", ".join(f":{key}" for key in params) + ")", params
