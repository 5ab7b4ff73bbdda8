"""The schema: migrations equal the models, the store's SQLite settings, and databases
dispatch must refuse and leave byte-for-byte untouched (SPEC §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dispatch.clock import utcnow
from dispatch.store.database import Database, migrations_dir
from dispatch.store.direct import BUSY_TIMEOUT_MS
from dispatch.store.models import Attempt, Base, Event, Task
from dispatch.store.revisions import HEAD_REVISION, KNOWN_REVISIONS
from tests.cli.inprocess import InProcess
from tests.conftest import Env, Result
from tests.orm import orm_write

Cli = Callable[..., Result]
TABLES = {"alembic_version", "tasks", "attempts", "events", "agent_sessions"}


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    return InProcess(capsys, monkeypatch, env)


@pytest.fixture
def db(env: Env) -> Iterator[Database]:
    database = Database(f"sqlite:///{env.db_path}")
    database.ensure_schema()
    yield database
    database.dispose()


def _script_directory() -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(config)


def _task(s: Session) -> Task:
    now = utcnow()
    task = Task(
        title="t", prompt="p", repo="/r", agent="shell", base_ref="main", priority=0,
        status="ready", dispatch_failures=0, created_at=now, updated_at=now,
    )  # fmt: skip
    s.add(task)
    s.flush()
    return task


# -- migrations and models -----------------------------------------------------------------


def test_the_code_knows_every_revision_and_the_head() -> None:
    scripts = _script_directory()
    assert scripts.get_heads() == [HEAD_REVISION]
    oldest_first = [r.revision for r in reversed(list(scripts.walk_revisions()))]
    assert list(KNOWN_REVISIONS) == oldest_first


def test_the_migrations_run_in_batch_mode() -> None:
    # SQLite cannot ALTER most things: later migrations must copy-and-move tables.
    env_py = (migrations_dir() / "env.py").read_text()
    assert "render_as_batch=True" in env_py


# Alembic cannot compare SQLite's expression indexes (`priority DESC`); the next test
# checks the claim order's directly, and tests/integration/test_query_plans.py the others.
EXPRESSION_INDEXES = {
    "ix_tasks_claim_order",
    "ix_tasks_list_order",
    "ix_tasks_open_order",
    "ix_tasks_repo_order",
    "ix_tasks_agent_order",
}


def _comparable(name: str | None, type_: str, _parent: object) -> bool:
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
def test_upgrading_an_empty_database_gives_exactly_the_models_schema(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": _comparable}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == HEAD_REVISION
        conn.rollback()


def test_claims_read_the_next_ready_task_from_an_index_without_sorting(db: Database) -> None:
    assert db.path is not None
    with closing(sqlite3.connect(db.path)) as conn:
        columns = [
            (row[2], row[3]) for row in conn.execute("PRAGMA index_xinfo(ix_tasks_claim_order)")
        ]
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE status = 'ready' "
                "AND closed_at IS NULL ORDER BY priority DESC, id LIMIT 1"
            )
        )
    # (column name, descending): status, priority DESC, id, then the rowid key.
    assert columns[:3] == [("status", 0), ("priority", 1), ("id", 0)]
    assert "ix_tasks_claim_order" in plan
    assert "TEMP B-TREE" not in plan


def test_an_empty_file_is_migrated(run: Cli, env: Env) -> None:
    env.home.mkdir()
    env.db_path.touch()
    assert run("list", "--json").stdout == "[]\n"
    with closing(sqlite3.connect(env.db_path, isolation_level=None)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)
        ]


def test_a_migration_lock_that_cannot_be_taken_is_one_line_and_the_next_run_migrates(
    run: Cli, env: Env, repo: Path
) -> None:
    env.home.mkdir()
    blocker = env.home / "dispatch.db.migrate.lock"
    blocker.mkdir()  # something that is no lock file stands where the lock goes
    for args in (["list"], ["add", "x"]):
        done = run(*args, cwd=repo)
        assert done.code == 7, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert "cannot be migrated" in done.stderr and str(blocker) in done.stderr
    as_json = run("list", "--json")
    assert as_json.code == 7
    assert "cannot be taken" in json.loads(as_json.stdout)["error"]["message"]
    blocker.rmdir()
    assert run("add", "x", cwd=repo).code == 0
    assert [task["title"] for task in run("list", "--json").json()] == ["x"]


# -- SQLite settings -----------------------------------------------------------------------


def test_a_new_database_is_private_and_in_wal_mode(run: Cli, env: Env, repo: Path) -> None:
    assert run("add", "x", cwd=repo).code == 0
    assert stat.S_IMODE(env.db_path.stat().st_mode) == 0o600
    # WAL is a property of the file, seen by any other connection.
    with closing(sqlite3.connect(env.db_path, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for sibling in env.home.glob("dispatch.db-*"):  # -wal, -shm when present
        assert stat.S_IMODE(sibling.stat().st_mode) == 0o600


def test_every_connection_has_busy_timeout_and_foreign_keys(db: Database) -> None:
    def pragmas(s: Connection) -> tuple[object, ...]:
        return tuple(
            s.execute(text(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys")
        )

    assert db.read(pragmas) == ("wal", BUSY_TIMEOUT_MS, 1)
    assert db.write(pragmas) == ("wal", BUSY_TIMEOUT_MS, 1)


def test_foreign_keys_are_enforced(db: Database) -> None:
    def orphan(s: Session) -> None:
        now = utcnow()
        s.add(
            Attempt(
                task_id=999, number=1, state="starting", prior_status="ready", host="h",
                resume=False, intent={}, started_at=now,
            )
        )  # fmt: skip

    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        orm_write(db, orphan)


def test_writes_begin_immediate_and_reads_do_not(db: Database) -> None:
    from sqlalchemy import event

    begins: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("BEGIN"):
            begins.append(statement)

    db.write(lambda s: s.execute(text("SELECT count(*) FROM tasks")).scalar())
    db.read(lambda s: s.execute(text("SELECT count(*) FROM tasks")).scalar())
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]


def test_a_read_then_write_transaction_waits_for_another_writer_and_runs_once(
    db: Database, env: Env
) -> None:
    # A deferred transaction would read a snapshot, then fail to write once the other
    # writer commits, and have to start over: the work would run twice.
    orm_write(db, _task)
    other = sqlite3.connect(env.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE tasks SET priority = 7")
    runs: list[int] = []

    def work(s: Connection) -> int:
        priority = int(s.execute(text("SELECT priority FROM tasks")).scalar_one())
        runs.append(priority)
        s.execute(text("UPDATE tasks SET priority = priority + 1"))
        return priority

    results: list[int] = []
    writer = threading.Thread(target=lambda: results.append(db.write(work)))
    writer.start()
    time.sleep(0.3)  # let the writer queue behind the lock; correctness does not depend on it
    other.execute("COMMIT")
    other.close()
    writer.join(timeout=30)
    assert results == [7]
    assert runs == [7]
    assert db.read(lambda s: s.execute(text("SELECT priority FROM tasks")).scalar()) == 8


def test_events_are_append_only(db: Database, env: Env) -> None:
    def add_event(s: Session) -> None:
        task = _task(s)
        s.add(Event(task_id=task.id, kind="created", to_status="ready", at=utcnow(), detail={}))

    orm_write(db, add_event)
    with closing(sqlite3.connect(env.db_path, isolation_level=None)) as conn:
        for statement in ("UPDATE events SET kind = 'forged'", "DELETE FROM events"):
            with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
                conn.execute(statement)
        # Deleting the task would cascade into its events: refused as well.
        conn.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
            conn.execute("DELETE FROM tasks")
        assert conn.execute("SELECT kind FROM events").fetchall() == [("created",)]
    with pytest.raises((IntegrityError, OperationalError), match="append-only"):
        db.write(lambda s: s.execute(text("UPDATE events SET detail = '{}'")))


# -- databases to refuse -------------------------------------------------------------------


def _newer(path: Path, env: Env, run: Cli) -> None:
    """A valid dispatch database stamped with a revision from the future."""
    assert run("list").code == 0
    os.replace(env.db_path, path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")


def _foreign(path: Path, env: Env, run: Cli) -> None:
    """Someone else's SQLite database, in WAL mode like ours."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('mine')")


def _random(path: Path, env: Env, run: Cli) -> None:
    path.write_bytes(os.urandom(8192))


def _text(path: Path, env: Env, run: Cli) -> None:
    path.write_text("database = 'not really'\n" * 50)


def _truncated(path: Path, env: Env, run: Cli) -> None:
    """The first page of a real database and nothing else."""
    assert run("list").code == 0
    path.write_bytes(env.db_path.read_bytes()[:100] + b"\0" * 50)
    env.db_path.unlink()


REFUSED = {
    "newer revision": (_newer, "schema revision 9999, newer than this dispatch knows"),
    "unrelated tables": (_foreign, "is not a dispatch database (it has tables notes)"),
    "random bytes": (_random, "is unusable: file is not a database"),
    "a text file": (_text, "is unusable: file is not a database"),
    "truncated": (_truncated, "is unusable"),
}


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_database_dispatch_cannot_use_is_refused_and_left_untouched(
    run: Cli, env: Env, repo: Path, case: str
) -> None:
    make, message = REFUSED[case]
    place = env.root / "kept"
    place.mkdir()
    path = place / "precious.db"
    make(path, env, run)
    before = _snapshot(place)
    for args in (["list"], ["add", "x"], ["db", "upgrade"], ["doctor"]):
        done = run("--db", str(path), *args, cwd=repo)
        assert done.code == 7, (args, done.stderr)
        if args != ["doctor"]:
            assert message in done.stderr and str(path) in done.stderr
        assert _snapshot(place) == before, args  # same bytes, no -wal, -shm or lock files
    as_json = run("--db", str(path), "list", "--json")
    assert message in json.loads(as_json.stdout)["error"]["message"]
    assert _snapshot(place) == before


def test_db_current_reports_a_newer_database_without_touching_it(run: Cli, env: Env) -> None:
    place = env.root / "kept"
    place.mkdir()
    path = place / "newer.db"
    _newer(path, env, run)
    before = _snapshot(place)
    done = run("--db", str(path), "db", "current")
    assert done.code == 0
    assert done.stdout == f"9999 (newer than this dispatch, whose head is {HEAD_REVISION})\n"
    assert _snapshot(place) == before


# -- Alembic only when due -----------------------------------------------------------------

PROBE = """
import sys
from dispatch.cli.main import run
code = run(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"alembic", "sqlalchemy"})
print("MODULES", code, ",".join(loaded), file=sys.stderr)
"""


def _modules_used(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("MODULES ")][-1]
    _, code, modules = line.split(" ", 2)
    return int(code), [m for m in modules.split(",") if m]


def test_alembic_is_imported_only_when_an_upgrade_is_due(env: Env) -> None:
    code, first = _modules_used("list", "--json")
    assert code == 0
    assert first == ["alembic", "sqlalchemy"]  # a fresh database is migrated
    for command in ("list", "events"):
        code, later = _modules_used(command, "--json")
        assert (code, later) == (0, [])  # a current SQLite file is used without either
    code, current = _modules_used("db", "current")
    assert (code, current) == (0, ["sqlalchemy"])  # through the engine, still no Alembic
