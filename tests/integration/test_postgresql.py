"""The same code on PostgreSQL (SPEC §7): a private server, started for these tests.

The server runs from a temporary directory on a Unix socket only (no TCP), one
database per test. Where PostgreSQL or psycopg is not installed, these tests skip;
`.ci/run` installs both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from dispatch.app import App
from dispatch.cli.output import task_json
from dispatch.services.dispatching import Dispatch, claim
from dispatch.services.tasks import add_task
from dispatch.store import statements as st
from dispatch.store.direct import SqlAlchemyExecutor, Tx
from dispatch.store.models import Base, Task
from dispatch.store.revisions import HEAD_REVISION
from tests.conftest import Env, Result, windows
from tests.faults import agent_profile, wait_for, write_config
from tests.integration.store_world import (
    HOSTILE,
    build_world,
    claim_like,
    orm_values,
    read_with,
)
from tests.orm import orm_read

pytest.importorskip("psycopg", reason="psycopg is not installed")


def test_the_migrations_build_the_models_schema(pg: str, make_app: Callable[..., App]) -> None:
    app = make_app()
    assert app.db.upgrade() == HEAD_REVISION
    with app.db.engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        columns = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in tables}
    for table in Base.metadata.sorted_tables:
        assert table.name in tables
        assert columns[table.name] == set(table.columns.keys()), table.name


def test_the_statements_read_and_write_what_the_models_do(
    pg: str, make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = build_world(app, repo)
    direct = app.direct
    assert isinstance(direct, SqlAlchemyExecutor)  # not a SQLite file: through the engine

    listed = direct.read(lambda tx: st.list_tasks(tx))
    assert [t.id for t in listed][:2] == [ids["urgent"], ids["running"]]
    stored = orm_read(app.db, lambda s: s.get(Task, ids["hostile"]))
    assert tuple(direct.read(lambda tx: st.get_task(tx, ids["hostile"]))) == orm_values(
        stored, st.TaskRow._fields
    )
    assert stored is not None and stored.title == HOSTILE
    seen = direct.read(lambda tx: st.census(tx, [ids["running"]]))
    assert [a.id for a in seen.live] == [ids["running_attempt"], ids["starting_attempt"]]
    assert {t.id for t in seen.stuck} == {ids["stuck"], ids["orphaned"]}
    # `list` renders timestamps from the datetimes PostgreSQL returns, `show` too.
    for summary in read_with(direct, st.list_tasks, (), True):
        assert task_json(summary) == task_json(read_with(direct, st.get_task, summary.id))
    claim_like(app, direct, add_task(app, "claimed here", repo=repo).id)


def test_a_task_runs_to_done_and_is_swept_clean(
    pg: str, env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    added = cli("add", "on postgres", "--agent", "shell", "--prompt", "echo hi > out.txt", cwd=repo)
    assert added.code == 0, (added.stdout, added.stderr)
    ran = cli("run", "1", "--json")
    assert ran.code == 0, (ran.stdout, ran.stderr)
    assert ran.json()["attempt"]["state"] in {"running", "ended"}

    def status() -> str | None:
        value: str = cli("show", "1", "--json").json()["status"]
        return value if value != "in-progress" else None

    assert wait_for(status, "the agent to finish") == "done"
    worktree = Path(ran.json()["attempt"]["worktree"])
    assert (worktree / "out.txt").read_text() == "hi\n"
    kinds = [e["kind"] for e in cli("events", "--json").json()]
    # A quick agent may finish before `run` records its dispatch: both are there, once.
    assert sorted(kinds) == ["claimed", "created", "dispatched", "finished"]
    swept = cli("sweep", "--json")
    assert swept.code == 0 and swept.json()["reaped"] == []


def test_four_run_next_at_once_claim_four_distinct_tasks(
    pg: str, env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    app = make_app()
    for n in range(6):
        add_task(app, f"task {n}", prompt="p", repo=repo, agent="sleeper")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dispatch", "run", "--next", "--json"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    started: list[int] = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (stdout, stderr)
        started += [item["task"]["id"] for item in json.loads(stdout)]
    assert sorted(started) == [1, 2, 3, 4]  # SKIP LOCKED: each once, the oldest first
    assert sorted(windows(env)) == ["t1", "t2", "t3", "t4"]
    statuses = [t.status for t in app.direct.read(lambda tx: st.list_tasks(tx))]
    assert sorted(statuses) == ["in-progress"] * 4 + ["ready"] * 2


def test_a_claim_takes_the_next_task_when_another_claimer_holds_the_first(
    pg: str, make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = [add_task(app, f"task {n}", repo=repo).id for n in range(3)]
    other = app.db.engine.connect()  # another host's claim, its transaction still open
    try:
        other.begin()
        other.execute(text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": ids[0]})

        taken = app.direct.read(lambda tx: st.next_ready(tx))
        past_two = app.direct.read(lambda tx: st.next_ready(tx, {ids[1]}))
    finally:
        other.rollback()
        other.close()

    assert taken is not None and taken.id == ids[1]  # skipped, not waited for
    assert past_two is not None and past_two.id == ids[2]
    first = app.direct.read(lambda tx: st.next_ready(tx))
    assert first is not None and first.id == ids[0]  # free again: claim order


def test_a_task_whose_profile_is_gone_is_passed_over_and_marked(
    pg: str, env: Env, make_app: Callable[..., App], repo: Path
) -> None:
    write_config(env, agent_profile("custom", ["true"]))
    orphan = add_task(make_app(), "orphan", repo=repo, agent="custom").id
    write_config(env)  # the `custom` profile is removed from the config
    app = make_app()
    fine = add_task(app, "runnable", repo=repo, agent="sleeper").id

    d = Dispatch(app, None)
    assert claim(d) and d.task_id == fine
    orphan_row = app.direct.read(lambda tx: st.get_task(tx, orphan))
    assert orphan_row.status == "ready"
    assert orphan_row.last_error == "unknown agent profile 'custom'; skipped"


def test_gc_and_restore_on_postgresql(
    pg: str, env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    prompt = "echo hi > out.txt && echo more >> README.md"
    assert cli("add", "collected", "--agent", "shell", "--prompt", prompt, cwd=repo).code == 0
    assert cli("run", "1").code == 0

    def status() -> str | None:
        value: str = cli("show", "1", "--json").json()["status"]
        return value if value != "in-progress" else None

    assert wait_for(status, "the agent to finish") == "done"
    assert cli("gc", "--json").json()["removed"] == []  # younger than gc_after
    collected = cli("gc", "--older-than", "0s", "--json")
    assert collected.code == 0, (collected.stdout, collected.stderr)
    (removed,) = collected.json()["removed"]
    assert removed["task_id"] == 1 and removed["snapshot"].startswith("refs/dispatch/wip/1-")
    worktree = Path(removed["worktree"])
    assert not worktree.exists()

    restored = cli("restore", "1", "--json")

    assert restored.code == 0, (restored.stdout, restored.stderr)
    assert restored.json()["restored"] is True
    assert (worktree / "out.txt").read_text() == "hi\n"
    assert (worktree / "README.md").read_text() == "hello\nmore\n"
    kinds = [e["kind"] for e in cli("events", "--task", "1", "--json").json()]
    assert kinds[-2:] == ["gc", "restored"]


def test_two_writers_that_deadlock_both_land(
    pg: str, make_app: Callable[..., App], repo: Path
) -> None:
    """Rows locked in opposite orders (the dispatcher's record, a quick agent's exit):
    PostgreSQL aborts one writer with a deadlock, and its transaction is run again."""
    import threading

    app = make_app()
    first, second = (add_task(app, name, repo=repo).id for name in ("first", "second"))
    both_hold_one = threading.Barrier(2, timeout=10)
    tries: list[str] = []

    def writer(name: str, order: tuple[int, int]) -> None:
        def work(tx: Tx) -> None:
            tries.append(name)
            tx.change("UPDATE tasks SET priority = priority + 1 WHERE id = :id", {"id": order[0]})
            if tries.count(name) == 1:
                both_hold_one.wait()  # each holds one row and now asks for the other's
            tx.change("UPDATE tasks SET priority = priority + 1 WHERE id = :id", {"id": order[1]})

        make_app().direct.write(work)

    threads = [
        threading.Thread(target=writer, args=("a", (first, second))),
        threading.Thread(target=writer, args=("b", (second, first))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(tries) == 3  # one of the two ran again after the deadlock
    priorities = app.direct.read(lambda tx: [st.get_task(tx, t).priority for t in (first, second)])
    assert priorities == [2, 2]  # both writers' changes, each once
