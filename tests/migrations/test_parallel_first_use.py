"""Six processes meeting a brand-new database at once: all succeed, one migrates (SPEC §7)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest

from dispatch.errors import EnvironmentProblem
from dispatch.store import direct
from dispatch.store.database import Database
from dispatch.store.revisions import HEAD_REVISION
from tests.conftest import Env

PROCESSES = 6

# Each process imports everything first, then waits for the same signal, so that they
# reach the empty database together rather than one import time apart.
STARTER = """
import os, sys, time
import dispatch.cli.entry, dispatch.cli.main, dispatch.app
import dispatch.store.database, dispatch.services.tasks
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.005)
sys.argv = ["dispatch", "list", "--json"]
dispatch.cli.entry.main()
"""


@pytest.mark.slow
def test_six_processes_on_a_new_database_all_succeed_and_migrate_once(env: Env) -> None:
    go = env.root / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    time.sleep(0.5)  # let them finish importing; only contention depends on it
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, stdout, stderr in results:
        assert code == 0, stdout + stderr  # --json puts an error on stdout
        assert json.loads(stdout) == []
        assert stderr == ""
    with closing(sqlite3.connect(env.db_path)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)
        ]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"tasks", "attempts", "events", "agent_sessions"} <= tables
        triggers = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
        assert triggers == {"events_no_update", "events_no_delete"}
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    "lock",
    [
        pytest.param("BEGIN EXCLUSIVE", id="writing"),  # as the first process creating it
        pytest.param("BEGIN; SELECT count(*) FROM sqlite_master", id="reading"),
    ],
)
def test_a_new_database_held_by_another_process_is_waited_for(env: Env, lock: str) -> None:
    """While a brand-new file is still in rollback-journal mode, a writer keeps readers
    out and a reader keeps the switch to WAL out, each for longer than SQLite's busy
    timeout when the machine is loaded: the schema check waits, it does not call the
    database unusable."""
    env.db_path.parent.mkdir(parents=True, exist_ok=True)
    holder = sqlite3.connect(env.db_path, isolation_level=None, check_same_thread=False)
    for statement in lock.split("; "):
        holder.execute(statement)
    release = threading.Timer(0.5, holder.commit)
    release.start()
    database = Database(f"sqlite:///{env.db_path}")
    try:
        assert database.upgrade() == HEAD_REVISION
    finally:
        release.join()
        holder.close()
        database.dispose()
    with closing(sqlite3.connect(env.db_path)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    "lock",
    [
        pytest.param("BEGIN EXCLUSIVE", id="writing"),
        pytest.param("BEGIN; SELECT count(*) FROM sqlite_master", id="reading"),
    ],
)
def test_a_new_database_held_past_all_patience_is_refused_untouched(
    env: Env, lock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is bounded: held for longer, it is one clear environment error, and the
    file is as it was (no schema, not switched to WAL)."""
    monkeypatch.setattr(direct, "WRITE_PATIENCE_SECONDS", 0.3)
    env.db_path.parent.mkdir(parents=True, exist_ok=True)
    holder = sqlite3.connect(env.db_path, isolation_level=None)
    database = Database(f"sqlite:///{env.db_path}")
    try:
        for statement in lock.split("; "):
            holder.execute(statement)
        with pytest.raises(EnvironmentProblem) as refused:
            database.upgrade()
        assert refused.value.message == (
            f"database {env.db_path} is unusable: database is locked; it was left untouched"
        )
    finally:
        holder.close()
        database.dispose()
    with closing(sqlite3.connect(env.db_path)) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
        assert (tables, conn.execute("PRAGMA journal_mode").fetchone()) == ([], ("delete",))
