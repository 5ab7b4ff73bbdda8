"""The hot paths' statements: the same records and the same writes whichever way they run.

On a current SQLite file they run on the standard library's sqlite3; anything else goes
through `Database` (which checks, migrates or refuses first). Both run one SQL text, and
both must read and write exactly what the models do.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch.adapters.tmux import TmuxTerminal
from dispatch.app import App
from dispatch.errors import DispatchFailed, EnvironmentProblem, NotFound
from dispatch.lifecycle import AttemptState, Status
from dispatch.services.dispatching import dispatch_task
from dispatch.services.tasks import add_task
from dispatch.store import statements as st
from dispatch.store.database import migrations_dir
from dispatch.store.direct import Direct, SqliteFile, ThroughDatabase, Tx, open_direct, utcnow
from dispatch.store.models import Attempt, Event, Task
from dispatch.store.revisions import HEAD_REVISION, KNOWN_REVISIONS
from dispatch.store.statements import (
    acknowledge,
    census,
    heartbeat,
    list_tasks,
    record_agent_pid,
    wrapper_start,
)
from tests.conftest import Env, windows
from tests.faults import (
    Faulty,
    assert_rolled_back,
    branches,
    events,
    returns,
    write_config,
)

T = TypeVar("T")
HOSTILE = "$(touch x); `id` ../../etc\n'\"naïve ✓ 日本"


def _read(direct: Direct, statement: Callable[..., T], *args: Any) -> T:
    return direct.read(lambda tx: statement(tx, *args))


def _write(direct: Direct, statement: Callable[..., T], *args: Any) -> T:
    return direct.write(lambda tx: statement(tx, *args))


def _set(row: object, **values: object) -> None:
    """Change a row through the models: what the direct statements must agree with."""
    for name, value in values.items():
        setattr(row, name, value)


def _attempt(s: Session, task_id: int, state: AttemptState, **values: object) -> int:
    number = len(s.scalars(select(Attempt).where(Attempt.task_id == task_id)).all()) + 1
    attempt = Attempt(
        task_id=task_id,
        number=number,
        state=state.value,
        prior_status=Status.READY.value,
        host="here",
        intent={},
        started_at=utcnow() - timedelta(minutes=5),
        **values,
    )
    s.add(attempt)
    s.flush()
    return attempt.id


def _world(app: App, repo: Path) -> dict[str, int]:
    """Tasks in every shape the two reads must agree on."""
    ids = {
        name: add_task(app, title, repo=repo, priority=priority).id
        for name, title, priority in [
            ("hostile", HOSTILE, 0),
            ("urgent", "urgent", 5),
            ("closed", "closed", 9),
            ("running", "running", 1),
            ("starting", "starting", 1),
            ("stuck", "stuck", 0),
            ("orphaned", "no attempt", 0),
        ]
    }

    def shape(s: Session) -> None:
        _set(s.get(Task, ids["closed"]), closed_at=utcnow(), last_error="gave up")
        running = _attempt(
            s,
            ids["running"],
            AttemptState.RUNNING,
            heartbeat_at=utcnow(),
            agent_pid=4242,
            tmux_target="dispatch:@7",
            tmux_session="dispatch",
        )
        starting = _attempt(
            s,
            ids["starting"],
            AttemptState.STARTING,
            dispatcher_pid=1,
            lease_expires_at=utcnow() + timedelta(minutes=1),
        )
        ended = _attempt(s, ids["stuck"], AttemptState.ENDED, error="rollback died")
        for name, attempt in (("running", running), ("starting", starting), ("stuck", ended)):
            _set(
                s.get(Task, ids[name]), status=Status.IN_PROGRESS.value, current_attempt_id=attempt
            )
        _set(s.get(Task, ids["orphaned"]), status=Status.IN_PROGRESS.value, dispatch_failures=2)
        ids.update(running_attempt=running, starting_attempt=starting, ended_attempt=ended)

    app.db.write(shape)
    return ids


def _both(app: App) -> tuple[Direct, Direct]:
    fast = open_direct(app.settings.database, lambda: app.db)
    assert isinstance(fast, SqliteFile)  # a current SQLite file: the stdlib way
    return fast, ThroughDatabase(app.db)


def test_list_reads_the_same_tasks_both_ways(make_app: Callable[..., App], repo: Path) -> None:
    app = make_app()
    ids = _world(app, repo)
    fast, through_database = _both(app)

    filters = [((), False), ((), True), (("in-progress",), False), (("ready", "in-progress"), True)]
    for statuses, closed in filters:
        assert _read(fast, list_tasks, statuses, closed) == _read(
            through_database, list_tasks, statuses, closed
        )

    listed = _read(fast, list_tasks)
    # Claim order: priority first, then age; closed tasks only when asked for.
    order = ["urgent", "running", "starting", "hostile", "stuck", "orphaned"]
    assert [t.id for t in listed] == [ids[name] for name in order]
    assert [t.id for t in _read(fast, list_tasks, (), True)] == [ids["closed"]] + [
        t.id for t in listed
    ]
    assert {t.id for t in _read(fast, list_tasks, ["in-progress"])} == {
        ids["running"], ids["starting"], ids["stuck"], ids["orphaned"]
    }  # fmt: skip
    hostile = next(t for t in listed if t.id == ids["hostile"])
    stored = app.db.read(lambda s: s.get(Task, ids["hostile"]))
    assert hostile.title == HOSTILE  # verbatim, newline and all
    assert (hostile.created_at, hostile.updated_at) == (stored.created_at, stored.updated_at)
    assert hostile.created_at.tzinfo is UTC


def test_the_census_reads_the_same_snapshot_both_ways(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = _world(app, repo)
    fast, through_database = _both(app)
    asked = [ids["running"], ids["closed"], 999]

    seen = _read(fast, census, asked)

    assert seen == _read(through_database, census, asked)
    assert [a.id for a in seen.live] == [ids["running_attempt"], ids["starting_attempt"]]
    running = seen.live[0]
    assert (running.task_id, running.state, running.agent_pid) == (ids["running"], "running", 4242)
    assert running.tmux_target == "dispatch:@7"
    assert running.heartbeat_at is not None and running.heartbeat_at.tzinfo is UTC
    stuck = {t.id: t.attempt for t in seen.stuck}
    assert set(stuck) == {ids["stuck"], ids["orphaned"]}
    assert stuck[ids["orphaned"]] is None
    ended = stuck[ids["stuck"]]
    assert ended is not None and (ended.id, ended.error) == (ids["ended_attempt"], "rollback died")
    assert seen.repos == {ids["running"]: str(repo), ids["closed"]: str(repo)}  # 999: none


def test_an_empty_census_asks_for_no_repositories(make_app: Callable[..., App]) -> None:
    app = make_app()
    app.db.ensure_schema()
    fast, through_database = _both(app)
    assert _read(fast, census, []) == _read(through_database, census, []) == ([], [], {})


def test_a_missing_database_is_created_by_database_not_by_the_fast_path(
    make_app: Callable[..., App], env: Env
) -> None:
    app = make_app()
    assert not env.db_path.exists()

    reader = app.direct

    assert isinstance(reader, ThroughDatabase)
    assert _read(reader, list_tasks) == []  # migrated on first use, as every command does
    assert env.db_path.stat().st_mode & 0o777 == 0o600


def test_a_database_not_at_head_goes_through_database(
    make_app: Callable[..., App], env: Env
) -> None:
    env.db_path.parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{env.db_path}")
    command.upgrade(config, KNOWN_REVISIONS[0])

    reader = make_app().direct

    assert isinstance(reader, ThroughDatabase)  # Database migrates it before reading
    assert _read(reader, list_tasks) == []
    connection = sqlite3.connect(env.db_path)
    assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
        (HEAD_REVISION,)
    ]
    connection.close()


def test_urls_that_are_not_a_plain_file_go_through_database(env: Env) -> None:
    opened: list[str] = []

    class Stand:  # stands in for the Database the fallback would use
        pass

    def database() -> Stand:
        opened.append("database")
        return Stand()

    for url in ("sqlite://", "sqlite:///:memory:", f"sqlite:///{env.db_path}?mode=ro",
                "postgresql://user@host/db"):  # fmt: skip
        assert isinstance(open_direct(url, database), ThroughDatabase), url  # type: ignore[arg-type]
    assert len(opened) == 4
    assert not env.db_path.exists()  # nothing was created on the way


def test_the_wrappers_statements_write_what_the_models_read_both_ways(
    make_app: Callable[..., App], repo: Path, env: Env
) -> None:
    app = make_app()
    ids = _world(app, repo)
    for direct in _both(app):
        _start_and_beat(app, direct, env, ids["hostile"])


def _start_and_beat(app: App, direct: Direct, env: Env, task_id: int) -> None:
    attempt = app.db.write(lambda s: _attempt(s, task_id, AttemptState.STARTING))
    stored = lambda: app.db.read(lambda s: s.get(Attempt, attempt))  # noqa: E731
    start = _read(direct, wrapper_start, attempt)
    assert (start.task_id, start.state, start.prompt, start.resume) == (
        task_id, "starting", HOSTILE, False
    )  # fmt: skip
    # A whole second: SQLite must still get the six fraction digits the models write.
    now = utcnow().replace(microsecond=0)
    later = now + timedelta(seconds=2)

    assert _write(direct, acknowledge, attempt, 4321, now)
    assert not _write(direct, acknowledge, attempt, 9999, now)  # only from `starting`: one winner
    assert _write(direct, record_agent_pid, attempt, 5555)
    assert not _write(direct, heartbeat, attempt, now + timedelta(seconds=1))
    app.db.write(lambda s: _set(s.get(Attempt, attempt), cancel_requested_at=utcnow()))
    assert _write(direct, heartbeat, attempt, later)  # a cancel is seen

    assert (stored().state, stored().wrapper_pid, stored().agent_pid) == ("running", 4321, 5555)
    assert stored().heartbeat_at == later
    raw = sqlite3.connect(env.db_path)
    [(text,)] = raw.execute("SELECT heartbeat_at FROM attempts WHERE id = ?", (attempt,))
    raw.close()
    assert text == later.strftime("%Y-%m-%d %H:%M:%S.000000")

    app.db.write(lambda s: _set(s.get(Attempt, attempt), state=AttemptState.ENDED.value))
    assert not _write(direct, record_agent_pid, attempt, 6666)  # fenced once it is not running
    _write(direct, heartbeat, attempt, later + timedelta(seconds=5))
    assert (stored().agent_pid, stored().heartbeat_at) == (5555, later)  # nothing landed


def test_an_unknown_attempt_is_not_found(make_app: Callable[..., App]) -> None:
    app = make_app()
    app.db.ensure_schema()
    for direct in _both(app):
        with pytest.raises(NotFound, match="no attempt 999"):
            _read(direct, wrapper_start, 999)


def test_a_write_waits_for_another_writer_instead_of_failing(
    make_app: Callable[..., App], repo: Path, env: Env
) -> None:
    app = make_app()
    ids = _world(app, repo)
    fast, _ = _both(app)
    blocker = sqlite3.connect(env.db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock well past busy_timeout
    release = threading.Timer(0.5, lambda: blocker.execute("COMMIT"))
    release.start()
    try:
        assert _write(fast, record_agent_pid, ids["running_attempt"], 7777)
    finally:
        release.join()
        blocker.close()
    assert app.db.read(lambda s: s.get(Attempt, ids["running_attempt"])).agent_pid == 7777


def test_a_database_path_with_spaces_unicode_and_hashes_is_read_directly(
    make_app: Callable[..., App], env: Env, monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    odd = env.root / "my #1 données" / "dispatch.db"
    monkeypatch.setenv("DISPATCH_DB", str(odd))
    app = make_app()
    task = add_task(app, "in an odd place", repo=repo).id

    direct = open_direct(app.settings.database, lambda: app.db)

    assert isinstance(direct, SqliteFile)
    assert [t.id for t in _read(direct, list_tasks)] == [task]
    direct.close()


def test_a_failed_write_changes_nothing_and_leaves_no_transaction_open(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = _world(app, repo)
    fast, _ = _both(app)
    attempt = ids["running_attempt"]

    def pid_then_orphan(tx: Tx) -> None:
        tx.change("UPDATE attempts SET agent_pid = :pid WHERE id = :id", {"pid": 1, "id": attempt})
        tx.change(
            "UPDATE attempts SET task_id = :task WHERE id = :id", {"task": 999, "id": attempt}
        )

    # Foreign keys are on, as Database has them: the second statement fails, the first
    # is rolled back with it.
    with pytest.raises(EnvironmentProblem, match="FOREIGN KEY constraint failed"):
        fast.write(pid_then_orphan)

    stored = app.db.read(lambda s: s.get(Attempt, attempt))
    assert (stored.agent_pid, stored.task_id) == (4242, ids["running"])
    assert _write(fast, record_agent_pid, attempt, 8888)  # the connection is usable at once
    assert app.db.read(lambda s: s.get(Attempt, attempt)).agent_pid == 8888


def _orm_values(obj: object, fields: tuple[str, ...]) -> tuple[object, ...]:
    return tuple(getattr(obj, name) for name in fields)


def test_whole_rows_read_what_the_models_read_both_ways(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = _world(app, repo)
    intent = {"worktree": HOSTILE, "branch_existed": True, "nested": {"n": [1, None]}}
    app.db.write(lambda s: _set(s.get(Attempt, ids["running_attempt"]), intent=intent, resume=True))
    task = app.db.read(lambda s: s.get(Task, ids["hostile"]))
    attempt = app.db.read(lambda s: s.get(Attempt, ids["running_attempt"]))

    for direct in _both(app):
        got_task = direct.read(lambda tx: st.get_task(tx, ids["hostile"]))
        got_attempt = direct.read(lambda tx: st.get_attempt(tx, ids["running_attempt"]))
        assert tuple(got_task) == _orm_values(task, st.TaskRow._fields)
        assert tuple(got_attempt) == _orm_values(attempt, st.AttemptRow._fields)
        assert got_attempt.intent == intent and got_attempt.resume is True
        assert direct.read(lambda tx: st.attempts_of(tx, ids["running"])) == [got_attempt]
        assert direct.read(lambda tx: st.latest_attempt(tx, ids["hostile"])) is None
        with pytest.raises(NotFound, match="no task 999"):
            direct.read(lambda tx: st.get_task(tx, 999))
        with pytest.raises(NotFound, match="no attempt 999"):
            direct.read(lambda tx: st.get_attempt(tx, 999))


def test_the_shared_writes_land_what_the_models_read_both_ways(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    app.db.ensure_schema()
    for direct in _both(app):
        _claim_like(app, direct, add_task(app, HOSTILE, repo=repo).id)


def _claim_like(app: App, direct: Direct, task_id: int) -> None:
    def claim(tx: Tx) -> tuple[int, str, str, str]:
        key = f"shell:{task_id}"
        first = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="one", renew=True
        )  # a new key: the fresh id, whatever `renew` says
        kept = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="two", renew=False
        )
        renewed = st.use_agent_session(
            tx, key, task_id=task_id, agent="shell", fresh_id="three", renew=True
        )
        attempt = st.insert_attempt(
            tx,
            task_id=task_id,
            number=1,
            state=AttemptState.STARTING.value,
            prior_status=Status.READY.value,
            host="here",
            resume=False,
            intent={"branch": HOSTILE},
            started_at=utcnow(),
        )
        assert st.move_task(
            tx,
            task_id,
            expected=Status.READY,
            target=Status.IN_PROGRESS,
            current_attempt_id=attempt,
        )
        # Conditional: it is no longer ready.
        assert not st.move_task(tx, task_id, expected=Status.READY, target=Status.CANCELLED)
        st.record_event(tx, "claimed", task_id=task_id, attempt_id=attempt, note=HOSTILE, gone=None)
        return attempt, first, kept, renewed

    attempt_id, first, kept, renewed = direct.write(claim)

    assert (first, kept, renewed) == ("one", "one", "three")
    stored_task = app.db.read(lambda s: s.get(Task, task_id))
    assert (stored_task.status, stored_task.current_attempt_id) == ("in-progress", attempt_id)
    stored = app.db.read(lambda s: s.get(Attempt, attempt_id))
    assert (stored.intent, stored.resume, stored.started_at.tzinfo) == (
        {"branch": HOSTILE},
        False,
        UTC,
    )
    event = app.db.read(
        lambda s: s.scalars(select(Event).where(Event.task_id == task_id).order_by(Event.id)).all()
    )[-1]
    assert (event.kind, event.attempt_id, event.detail) == (
        "claimed",
        attempt_id,
        {"note": HOSTILE},
    )
    assert direct.write(lambda tx: st.close_task(tx, task_id))
    assert not direct.write(lambda tx: st.close_task(tx, task_id))  # once only


def test_a_column_name_that_is_not_a_column_is_refused(make_app: Callable[..., App]) -> None:
    app = make_app()
    app.db.ensure_schema()
    fast, _ = _both(app)
    with pytest.raises(ValueError, match="unknown columns"):
        fast.write(lambda tx: st.update_task(tx, 1, **{"status = 'x', title": "y"}))


def test_a_whole_dispatch_and_its_rollback_run_through_database_too(
    env: Env, make_app: Callable[..., App], repo: Path
) -> None:
    """Another backend takes the long way with the same SQL: dispatch, then a failed one."""
    write_config(env)  # it has the `sleeper` agent
    app = make_app()
    for title in ("works", "fails"):
        add_task(app, title, repo=repo, agent="sleeper")
    app.direct_ = ThroughDatabase(app.db)

    result = dispatch_task(app, 1)

    assert result is not None
    assert (result.task.status, result.attempt.state) == ("in-progress", "running")
    assert [a.id for a in result.attempts] == [result.attempt.id]
    assert [e["kind"] for e in events(env, 1)] == ["created", "claimed", "dispatched"]
    failing = make_app(terminal=Faulty(TmuxTerminal(env.socket), spawn=returns("")))
    failing.direct_ = ThroughDatabase(failing.db)
    with pytest.raises(DispatchFailed, match="failed at spawn"):
        dispatch_task(failing, 2)
    assert_rolled_back(env, 2, "ready", step="spawn")
    assert [b for b in branches(repo) if b.startswith("dispatch/2-")] == []
    assert not (env.home / "worktrees" / repo.name / "task-2").exists()
    assert windows(env) == ["t1"]


def test_the_row_records_have_every_column_of_the_models() -> None:
    """A column added to the models must be read by the statements too."""
    for row, model in ((st.TaskRow, Task), (st.AttemptRow, Attempt), (st.EventRow, Event)):
        assert set(row._fields) == set(model.__table__.columns.keys()), row.__name__
