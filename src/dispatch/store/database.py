"""The engine, transactions with bounded retry, and the schema check on first use (SPEC §7).

`direct`'s SQLAlchemy executor runs the store's statements on its connections whenever
the database is not a current SQLite file (another backend, or a database to create,
migrate or refuse); the schema commands (`db`, `doctor`) use it directly. Transactions
are Core connections: the models are the schema, not how rows are read or written.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

from dispatch.errors import EnvironmentProblem
from dispatch.flock import FileLock
from dispatch.store.direct import begin_sqlite, configure_sqlite, retry_while_locked
from dispatch.store.revisions import HEAD_REVISION, KNOWN_REVISIONS

T = TypeVar("T")


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, else the source tree."""
    packaged = resources.files("dispatch") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[3] / "migrations"
    if source.is_dir():
        return source
    raise EnvironmentProblem("the migration scripts are missing from this installation")


class Database:
    """One database: connections for reads and writes, and the schema check."""

    def __init__(self, url: str) -> None:
        try:
            self.url: URL = make_url(url)
            self.is_sqlite = self.url.get_backend_name() == "sqlite"
            self.path: Path | None = None
            if self.is_sqlite:
                self.path = self._prepare_sqlite_file()
                # Pooled: a dispatch or sweep runs many short transactions, and opening a
                # connection (with its pragmas) each time costs more than the statements.
                # In WAL mode an idle pooled connection holds no lock.
                self.engine: Engine = create_engine(self.url)
                _install_sqlite_listeners(self.engine)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            # An unknown dialect or a driver that is not installed: the setting is wrong.
            shown = url if "@" not in url else "…@" + url.rsplit("@", 1)[-1]  # no password
            raise EnvironmentProblem(
                f"database {shown}: cannot use this URL: {exc}",
                hint="give a SQLite path or an SQLAlchemy URL with an installed driver",
            ) from None
        reading: dict[str, Any] = {"dispatch_read": True}
        if not self.is_sqlite:
            # One snapshot for a whole read (the sweep's census, `show`), as SQLite gives.
            reading["isolation_level"] = "REPEATABLE READ"
        self._reader: Engine = self.engine.execution_options(**reading)
        self._checked = False

    def _prepare_sqlite_file(self) -> Path | None:
        database = self.url.database
        if not database or database == ":memory:":
            return None
        path = Path(database)
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise EnvironmentProblem(
                    f"database {path}: cannot create the directory {path.parent}: {exc.strerror}"
                ) from None
            try:
                # The database holds prompts: readable by its owner only (SPEC §7).
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass  # another process created it first
            except OSError as exc:
                reason = exc.strerror
                raise EnvironmentProblem(f"database {path}: cannot create: {reason}") from None
        elif path.is_dir():
            raise EnvironmentProblem(f"database {path}: is a directory")
        return path

    def dispose(self) -> None:
        self.engine.dispose()

    # -- transactions ------------------------------------------------------------------

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one write transaction (BEGIN IMMEDIATE on SQLite), retried when locked."""
        self.ensure_schema()

        def transaction() -> T:
            with self.engine.begin() as conn:
                return work(conn)

        try:
            return retry_while_locked(transaction, OperationalError)
        except OperationalError as exc:
            raise self._unusable(exc) from exc

    def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a read transaction (deferred: it takes no write lock)."""
        self.ensure_schema()
        try:
            with self._reader.begin() as conn:
                return work(conn)
        except OperationalError as exc:
            raise self._unusable(exc) from exc

    def _unusable(self, exc: SQLAlchemyError) -> EnvironmentProblem:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        return EnvironmentProblem(f"database {self._where()}: {reason}")

    def _where(self) -> str:
        """The database as messages name it: its path, or its URL without the password."""
        return str(self.path or self.url.render_as_string(hide_password=True))

    def server_version(self) -> str:
        """The database server's product and version ("PostgreSQL 15.4", "SQLite 3.40.1"),
        asked of the server itself: doctor's proof that it answers."""
        sql = "SELECT sqlite_version()" if self.is_sqlite else "SHOW server_version"
        try:
            with self.engine.execution_options(dispatch_read=True).connect() as conn:
                version = str(conn.execute(text(sql)).scalar_one())
        except DBAPIError as exc:
            raise self._unusable(exc) from exc
        return f"{'SQLite' if self.is_sqlite else 'PostgreSQL'} {version}"

    # -- schema ------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The database's Alembic revision; None for an empty database."""

        def look() -> str | None:
            with self.engine.execution_options(dispatch_read=True).connect() as conn:
                return _revision(conn, self._where())

        try:
            # A new SQLite file is in rollback-journal mode until it is migrated: while
            # the first process creates the schema, the others' reads wait for its commit.
            return retry_while_locked(look, DBAPIError)
        except DBAPIError as exc:
            raise self._corrupt(exc) from exc

    def ensure_schema(self) -> None:
        """Refuse an unusable or newer database; migrate an older or empty one."""
        if not self._checked:
            self.upgrade()

    def _check_known(self, revision: str | None) -> None:
        if revision is not None and revision not in KNOWN_REVISIONS:
            raise EnvironmentProblem(
                f"database {self._where()} has schema revision {revision}, newer than this "
                f"dispatch knows ({HEAD_REVISION}); it was left untouched",
                hint="upgrade dispatch",
            )

    def upgrade(self) -> str:
        """Apply pending migrations once, even when several processes start together."""
        # Checked before the lock too: a refused or current database gets no lock file.
        revision = self.current_revision()
        self._check_known(revision)
        if revision == HEAD_REVISION:
            self._checked = True
            return HEAD_REVISION
        with self._migration_lock() as conn:
            # Readers still in rollback-journal mode hold off the switch to WAL, and a
            # failed attempt is rolled back whole: so it is simply made again.
            retry_while_locked(lambda: self._migrate(conn), (DBAPIError, sqlite3.OperationalError))
        self._checked = True
        return HEAD_REVISION

    def _migrate(self, conn: Connection) -> None:
        # Re-checked under the lock: another process may have migrated meanwhile.
        revision = _revision(conn, self._where())
        self._check_known(revision)
        if revision == HEAD_REVISION:
            return
        if self.is_sqlite:
            # Persistent in the file; set here, under the lock, never on a refused file,
            # and outside a transaction, where SQLite refuses it.
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA journal_mode=WAL")
        # Alembic only when an upgrade is due: its import costs a third of a second.
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        if conn.in_transaction():
            conn.commit()

    @contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        try:
            if self.is_sqlite:
                target = self.path or Path.cwd() / "dispatch-memory.db"
                lock = FileLock(str(target) + ".migrate.lock")
                try:
                    lock.acquire()
                except OSError as exc:
                    raise EnvironmentProblem(
                        f"database {self._where()} cannot be migrated: its lock file "
                        f"{lock.path} cannot be taken ({exc.strerror or exc}); nothing "
                        "was migrated",
                        hint="remove or fix whatever is at that path",
                    ) from exc
                try:
                    with self.engine.connect() as conn:
                        yield conn
                finally:
                    lock.release()
            else:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT pg_advisory_lock(7307013)"))
                    conn.commit()
                    try:
                        yield conn
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(7307013)"))
                        conn.commit()
        except (DBAPIError, sqlite3.Error) as exc:
            raise self._corrupt(exc) from exc

    def _corrupt(self, exc: DBAPIError | sqlite3.Error) -> EnvironmentProblem:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return EnvironmentProblem(
            f"database {self._where()} is unusable: {reason}; it was left untouched"
        )


def _revision(conn: Connection, where: object) -> str | None:
    """The Alembic revision, ending the read transaction whatever happens.

    Ending it matters: `PRAGMA journal_mode=WAL` is silently ignored inside a transaction.
    """
    try:
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables:
            if tables:
                names = sorted(tables)
                listed = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
                raise EnvironmentProblem(
                    f"database {where} is not a dispatch database (it has tables {listed}); "
                    "it was left untouched",
                    hint="give another path with --db or DISPATCH_DB",
                )
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return None if row is None else str(row[0])
    finally:
        if conn.in_transaction():
            conn.rollback()


def _install_sqlite_listeners(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_sqlite(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get("dispatch_read", False)
        conn.exec_driver_sql(begin_sqlite(read_only))
