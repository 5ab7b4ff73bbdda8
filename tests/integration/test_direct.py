"""The hot paths' statements: the same records and the same writes whichever way they run.

On a current SQLite file they run on the standard library's sqlite3; anything else goes
through `Database` (which checks, migrates or refuses first). Both run one SQL text, and
both must read and write exactly what the models do.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from dispatch.adapters.tmux import TmuxTerminal
from dispatch.app import App
from dispatch.cli.output import task_json
from dispatch.clock import utcnow
from dispatch.errors import DispatchFailed, EnvironmentProblem, NotFound
from dispatch.lifecycle import AttemptState
from dispatch.services.dispatching import dispatch_task
from dispatch.services.tasks import add_task
from dispatch.store import pages
from dispatch.store import statements as st
from dispatch.store.database import migrations_dir
from dispatch.store.direct import Direct, SqlAlchemyExecutor, SqliteExecutor, Tx, open_direct
from dispatch.store.models import Attempt, Event, Task
from dispatch.store.revisions import HEAD_REVISION, KNOWN_REVISIONS
from dispatch.store.statements import (
    acknowledge,
    census,
    heartbeat_and_cancel_asked,
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
from tests.integration.store_world import (
    HOSTILE,
    add_attempt,
    build_world,
    claim_like,
    must,
    orm_values,
    read_with,
    set_columns,
    write_with,
)
from tests.orm import orm_read, orm_write

# The stdlib sqlite3 path beside SQLAlchemy's on one SQLite file; PostgreSQL's
# statements are test_postgresql.py's.
pytestmark = pytest.mark.sqlite_only


def _both(app: App) -> tuple[Direct, Direct]:
    fast = open_direct(app.settings.database, lambda: app.db)
    assert isinstance(fast, SqliteExecutor)  # a current SQLite file: the stdlib way
    return fast, SqlAlchemyExecutor(app.db)


def test_list_reads_the_same_tasks_both_ways(make_app: Callable[..., App], repo: Path) -> None:
    app = make_app()
    ids = build_world(app, repo)
    fast, through_database = _both(app)

    filters = [((), False), ((), True), (("in-progress",), False), (("ready", "in-progress"), True)]
    for statuses, closed in filters:
        assert read_with(fast, list_tasks, statuses, closed) == read_with(
            through_database, list_tasks, statuses, closed
        )

    listed = read_with(fast, list_tasks)
    # Claim order: priority first, then age; closed tasks only when asked for.
    order = ["urgent", "running", "starting", "hostile", "stuck", "orphaned"]
    assert [t.id for t in listed] == [ids[name] for name in order]
    assert [t.id for t in read_with(fast, list_tasks, (), True)] == [ids["closed"]] + [
        t.id for t in listed
    ]
    assert {t.id for t in read_with(fast, list_tasks, ["in-progress"])} == {
        ids["running"], ids["starting"], ids["stuck"], ids["orphaned"]
    }  # fmt: skip
    hostile = next(t for t in listed if t.id == ids["hostile"])
    stored = must(orm_read(app.db, lambda s: s.get(Task, ids["hostile"])))
    assert hostile.title == HOSTILE  # verbatim, newline and all
    assert (hostile.created_at, hostile.updated_at) == (
        stored.created_at.isoformat().replace("+00:00", "Z"),
        stored.updated_at.isoformat().replace("+00:00", "Z"),
    )


def test_the_monitors_packed_board_rows_read_back_as_their_columns(
    make_app: Callable[..., App], repo: Path
) -> None:
    """On SQLite each board row is read as one JSON array text: it must give back every
    column as reading the columns does, hostile text, NULLs and numbers alike."""
    app = make_app()
    ids = build_world(app, repo)
    query = pages.TaskQuery(include_closed=True)
    for direct in _both(app):

        def read(tx: Tx) -> tuple[list[pages.StoredRow], list[Sequence[Any]]]:
            plain, params = pages.board_sql(query)
            return list(pages.stream_board(tx, query)), tx.rows(plain, params)

        packed, columns = direct.read(read)
        assert all(isinstance(row, str) for row in packed)
        assert len(packed) == len(columns) == read_with(direct, pages.count_tasks, query)
        for row, expected in zip(packed, columns, strict=True):
            task, attempt = pages.board_parts(row)
            assert [*task, *(attempt or [None] * (len(expected) - len(task)))] == list(expected)
        tasks = {task[0]: task for task, _ in map(pages.board_parts, packed)}
        assert tasks[ids["hostile"]][1] == HOSTILE


def test_list_gives_every_timestamp_as_show_does(make_app: Callable[..., App], repo: Path) -> None:
    """`list` renders its timestamps from the stored text; `show` from datetimes."""
    app = make_app()
    ids = build_world(app, repo)
    whole_second = utcnow().replace(microsecond=0)  # isoformat leaves the fraction out
    orm_write(app.db, lambda s: set_columns(s.get(Task, ids["urgent"]), updated_at=whole_second))
    for direct in _both(app):
        for summary in read_with(direct, list_tasks, (), True):
            row = read_with(direct, st.get_task, summary.id)
            assert task_json(summary) == task_json(row), summary.id
    urgent = read_with(app.direct, st.get_task, ids["urgent"])
    assert task_json(urgent)["updated_at"] == whole_second.strftime("%Y-%m-%dT%H:%M:%SZ")
    closed = read_with(app.direct, list_tasks, (), True)[0]
    assert closed.closed_at is not None and closed.closed_at.endswith("Z")


def test_the_census_reads_the_same_snapshot_both_ways(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = build_world(app, repo)
    fast, through_database = _both(app)
    asked = [ids["running"], ids["closed"], 999]

    seen = read_with(fast, census, asked)

    assert seen == read_with(through_database, census, asked)
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
    assert read_with(fast, census, []) == read_with(through_database, census, []) == ([], [], {})


def test_a_missing_database_is_created_by_database_not_by_the_fast_path(
    make_app: Callable[..., App], env: Env
) -> None:
    app = make_app()
    assert not env.db_path.exists()

    reader = app.direct

    assert isinstance(reader, SqlAlchemyExecutor)
    assert read_with(reader, list_tasks) == []  # migrated on first use, as every command does
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

    assert isinstance(reader, SqlAlchemyExecutor)  # Database migrates it before reading
    assert read_with(reader, list_tasks) == []
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
        assert isinstance(open_direct(url, database), SqlAlchemyExecutor), url  # type: ignore[arg-type]
    assert len(opened) == 4
    assert not env.db_path.exists()  # nothing was created on the way


def test_the_wrappers_statements_write_what_the_models_read_both_ways(
    make_app: Callable[..., App], repo: Path, env: Env
) -> None:
    app = make_app()
    ids = build_world(app, repo)
    for direct in _both(app):
        _start_and_beat(app, direct, env, ids["hostile"])


def _start_and_beat(app: App, direct: Direct, env: Env, task_id: int) -> None:
    attempt = orm_write(app.db, lambda s: add_attempt(s, task_id, AttemptState.STARTING))

    def stored() -> Attempt:
        return must(orm_read(app.db, lambda s: s.get(Attempt, attempt)))

    start = read_with(direct, wrapper_start, attempt)
    assert (start.task_id, start.state, start.prompt, start.resume) == (
        task_id, "starting", HOSTILE, False
    )  # fmt: skip
    # A whole second: SQLite must still get the six fraction digits the models write.
    now = utcnow().replace(microsecond=0)
    later = now + timedelta(seconds=2)

    assert write_with(direct, acknowledge, attempt, 4321, now)
    assert not write_with(
        direct, acknowledge, attempt, 9999, now
    )  # only from `starting`: one winner
    assert write_with(direct, record_agent_pid, attempt, 5555)
    assert not write_with(direct, heartbeat_and_cancel_asked, attempt, now + timedelta(seconds=1))
    orm_write(app.db, lambda s: set_columns(s.get(Attempt, attempt), cancel_requested_at=utcnow()))
    assert write_with(direct, heartbeat_and_cancel_asked, attempt, later)  # a cancel is seen

    assert (stored().state, stored().wrapper_pid, stored().agent_pid) == ("running", 4321, 5555)
    assert stored().heartbeat_at == later
    raw = sqlite3.connect(env.db_path)
    [(text,)] = raw.execute("SELECT heartbeat_at FROM attempts WHERE id = ?", (attempt,))
    raw.close()
    assert text == later.strftime("%Y-%m-%d %H:%M:%S.000000")

    orm_write(
        app.db, lambda s: set_columns(s.get(Attempt, attempt), state=AttemptState.ENDED.value)
    )
    assert not write_with(direct, record_agent_pid, attempt, 6666)  # fenced once it is not running
    write_with(direct, heartbeat_and_cancel_asked, attempt, later + timedelta(seconds=5))
    assert (stored().agent_pid, stored().heartbeat_at) == (5555, later)  # nothing landed


def test_an_unknown_attempt_is_not_found(make_app: Callable[..., App]) -> None:
    app = make_app()
    app.db.ensure_schema()
    for direct in _both(app):
        with pytest.raises(NotFound, match="no attempt 999"):
            read_with(direct, wrapper_start, 999)


def test_a_write_waits_for_another_writer_instead_of_failing(
    make_app: Callable[..., App], repo: Path, env: Env
) -> None:
    app = make_app()
    ids = build_world(app, repo)
    fast, _ = _both(app)
    blocker = sqlite3.connect(env.db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock well past busy_timeout
    release = threading.Timer(0.5, lambda: blocker.execute("COMMIT"))
    release.start()
    try:
        assert write_with(fast, record_agent_pid, ids["running_attempt"], 7777)
    finally:
        release.join()
        blocker.close()
    assert (
        must(orm_read(app.db, lambda s: s.get(Attempt, ids["running_attempt"]))).agent_pid == 7777
    )


def test_a_database_path_with_spaces_unicode_and_hashes_is_read_directly(
    make_app: Callable[..., App], env: Env, monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    odd = env.root / "my #1 données" / "dispatch.db"
    monkeypatch.setenv("DISPATCH_DB", str(odd))
    app = make_app()
    task = add_task(app, "in an odd place", repo=repo).id

    direct = open_direct(app.settings.database, lambda: app.db)

    assert isinstance(direct, SqliteExecutor)
    assert [t.id for t in read_with(direct, list_tasks)] == [task]
    direct.close()


def test_a_failed_write_changes_nothing_and_leaves_no_transaction_open(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = build_world(app, repo)
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

    stored = must(orm_read(app.db, lambda s: s.get(Attempt, attempt)))
    assert (stored.agent_pid, stored.task_id) == (4242, ids["running"])
    assert write_with(fast, record_agent_pid, attempt, 8888)  # the connection is usable at once
    assert must(orm_read(app.db, lambda s: s.get(Attempt, attempt))).agent_pid == 8888


def test_whole_rows_read_what_the_models_read_both_ways(
    make_app: Callable[..., App], repo: Path
) -> None:
    app = make_app()
    ids = build_world(app, repo)
    intent = {"worktree": HOSTILE, "branch_existed": True, "nested": {"n": [1, None]}}
    orm_write(
        app.db,
        lambda s: set_columns(s.get(Attempt, ids["running_attempt"]), intent=intent, resume=True),
    )
    task = orm_read(app.db, lambda s: s.get(Task, ids["hostile"]))
    attempt = orm_read(app.db, lambda s: s.get(Attempt, ids["running_attempt"]))

    for direct in _both(app):
        got_task = direct.read(lambda tx: st.get_task(tx, ids["hostile"]))
        got_attempt = direct.read(lambda tx: st.get_attempt(tx, ids["running_attempt"]))
        assert tuple(got_task) == orm_values(task, st.TaskRow._fields)
        assert tuple(got_attempt) == orm_values(attempt, st.AttemptRow._fields)
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
        claim_like(app, direct, add_task(app, HOSTILE, repo=repo).id)


def test_a_column_name_that_is_not_a_column_is_refused(make_app: Callable[..., App]) -> None:
    app = make_app()
    app.db.ensure_schema()
    fast, _ = _both(app)
    with pytest.raises(ValueError, match="unknown columns"):
        # Past the type check on purpose: what a typo that got through would do.
        hostile: Any = {"status = 'x', title": "y"}
        fast.write(lambda tx: st.update_task(tx, 1, **hostile))


def test_a_whole_dispatch_and_its_rollback_run_through_database_too(
    env: Env, make_app: Callable[..., App], repo: Path
) -> None:
    """Another backend takes the long way with the same SQL: dispatch, then a failed one."""
    write_config(env)  # it has the `sleeper` agent
    app = make_app()
    for title in ("works", "fails"):
        add_task(app, title, repo=repo, agent="sleeper")
    app.direct_ = SqlAlchemyExecutor(app.db)

    result = dispatch_task(app, 1)

    assert result is not None
    assert (result.task.status, result.attempt.state) == ("in-progress", "running")
    assert [a.id for a in result.attempts] == [result.attempt.id]
    assert [e["kind"] for e in events(env, 1)] == ["created", "claimed", "dispatched"]
    failing = make_app(terminal=Faulty(TmuxTerminal(env.socket), spawn=returns("")))
    failing.direct_ = SqlAlchemyExecutor(failing.db)
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


@pytest.mark.sqlite_only
def test_the_version_changes_with_every_commit_and_only_then(
    make_app: Callable[..., App], repo: Path
) -> None:
    add_task(make_app(), "seed", repo=repo, agent="shell")  # the database, made
    app, other = make_app(), make_app()
    assert isinstance(app.direct, SqliteExecutor)
    first = app.direct.version()
    app.direct.read(lambda tx: st.list_tasks(tx))
    assert app.direct.version() == first  # a read changes nothing

    add_task(app, "ours", repo=repo, agent="shell")  # this connection's commit
    ours = app.direct.version()
    assert ours != first
    add_task(other, "theirs", repo=repo, agent="shell")  # another connection's
    assert app.direct.version() not in (first, ours)
    assert SqlAlchemyExecutor(app.db).version() is None  # cannot tell: always read
