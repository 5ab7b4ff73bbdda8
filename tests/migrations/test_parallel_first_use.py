"""Six processes meeting a brand-new database at once: all succeed, one migrates (SPEC §7)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest

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
        assert code == 0, stderr
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
