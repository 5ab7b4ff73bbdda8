"""Reads are true when made: list, show and run --next first reap this host's dead agents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dispatch.adapters.git import GitWorktrees
from dispatch.services.dispatching import dispatch_task
from dispatch.services.sweep import sweep
from dispatch.services.tasks import list_tasks
from tests.conftest import Cli, Env, GitRunner, MakeApp, windows
from tests.faults import Faulty, raises, tool_failed
from tests.integration.recovery_helpers import (
    crashed_dispatch,
    events_of,
    new_task,
    run_all,
    running,
    task_row,
    terminal_events,
    wait_for,
)


def _killed_agent(make_app: MakeApp, repo: Path, env: Env) -> int:
    """A task whose wrapper and agent were SIGKILLed: nothing recorded their end."""
    app = make_app()
    task_id = new_task(app, repo, "sleep 30")
    dispatch_task(app, task_id)
    attempt = wait_for(lambda: running(env, task_id), "the agent to start")
    os.kill(attempt["agent_pid"], 9)
    os.kill(attempt["wrapper_pid"], 9)
    wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")
    assert task_row(env, task_id)["status"] == "in-progress"
    return task_id


def test_list_shows_a_killed_agent_as_interrupted_at_once(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id = _killed_agent(make_app, repo, env)

    quiet = cli("list", "--json", "--no-reap")
    by_env = cli("show", str(task_id), "--json", extra_env={"DISPATCH_NO_REAP": "1"})

    assert [t["status"] for t in quiet.json()] == ["in-progress"]
    assert by_env.json()["status"] == "in-progress"
    assert events_of(env, task_id, "reaped") == []

    listed = cli("list", "--json")

    assert listed.code == 0, listed.stderr
    assert [t["status"] for t in listed.json()] == ["interrupted"]
    [reaped] = events_of(env, task_id, "reaped")
    assert reaped["to_status"] == "interrupted"


def test_racing_readers_reap_once(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    task_id = _killed_agent(make_app, repo, env)

    results = run_all(
        cli, ("list", "--json"), ("show", str(task_id), "--json"), ("list",), ("show", str(task_id))
    )

    assert all(r.code == 0 for r in results), [r.stderr for r in results]
    assert "database is locked" not in "".join(r.stderr for r in results)
    assert results[1].json()["status"] == "interrupted"
    assert len(events_of(env, task_id, "reaped")) == 1
    assert len(terminal_events(env, task_id)) == 1


def test_run_next_counts_a_dead_agent_out_of_max_running(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    env.write_config(env.config.read_text() + "max_running = 1\n")
    dead = _killed_agent(make_app, repo, env)
    waiting = new_task(make_app(), repo, "sleep 30")

    ran = cli("run", "--next", "--json")

    assert ran.code == 0, ran.stderr
    assert [r["task"]["id"] for r in ran.json()] == [waiting]
    assert task_row(env, dead)["status"] == "interrupted"


def test_a_live_agent_is_left_alone_by_a_read(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    task_id = new_task(app, repo, "sleep 30")
    dispatch_task(app, task_id)
    wait_for(lambda: running(env, task_id), "the agent to start")

    listed = cli("list", "--json")

    assert [t["status"] for t in listed.json()] == ["in-progress"]
    assert events_of(env, task_id, "reaped") == []


@pytest.mark.sqlite_only  # a file deleted: a server's database is not
def test_a_database_deleted_under_a_running_agent_is_refused_not_recreated(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    task_id = new_task(app, repo, "sleep 30")
    dispatch_task(app, task_id)
    attempt = wait_for(lambda: running(env, task_id), "the agent to start")
    app.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{env.db_path}{suffix}").unlink(missing_ok=True)

    for args in (("list",), ("doctor",), ("add", "another")):
        done = cli(*args, cwd=repo)
        assert done.code == 7, (args, done.stderr)
        said = done.stdout + done.stderr  # doctor lists its checks on stdout
        assert f"database {env.db_path} is missing, but agents" in said
        assert str(attempt["agent_pid"]) in said
    assert not env.db_path.exists()

    os.kill(attempt["agent_pid"], 9)
    wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")
    assert cli("list", "--json").json() == []  # nothing runs against it any more: a new one


@pytest.mark.parametrize("reaper", ["read", "sweep"])
def test_what_the_undo_of_a_dead_dispatch_could_not_remove_is_kept_in_its_event(
    make_app: MakeApp, repo: Path, env: Env, git: GitRunner, reaper: str
) -> None:
    """A read that reconciles reports nothing: whoever reaps, the event says what is left."""
    busy = raises(tool_failed("git worktree", "busy"))
    app = make_app(worktrees=Faulty(GitWorktrees(env.home / "locks"), remove=busy))
    task_id, _, intent = crashed_dispatch(app, git, repo)

    if reaper == "read":
        list_tasks(app)
    else:
        report = sweep(app)
        assert any("busy" in problem for problem in report.problems), report.problems

    [failed] = events_of(env, task_id, "dispatch-failed")
    detail = json.loads(failed["detail"]) if isinstance(failed["detail"], str) else failed["detail"]
    assert detail["step"] == "sweep"
    assert [e for e in detail["undo_errors"] if "git worktree: busy" in e], detail
    assert task_row(env, task_id)["status"] == "ready"
    assert Path(intent["worktree"]).is_dir()  # not removed, and said so
