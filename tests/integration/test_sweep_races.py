"""Sweeps racing each other, dispatches, and rollbacks: one reap per task, never two."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from dispatch.clock import utcnow
from dispatch.flock import FileLock
from dispatch.services import reaping
from dispatch.services.dispatching import dispatch_task
from dispatch.services.naming import branch_name, worktree_path
from dispatch.services.panes import Panes
from dispatch.services.reaping import _finish_undo
from dispatch.services.sweep import sweep
from tests.conftest import Env, GitRunner, MakeApp
from tests.integration.recovery_helpers import (
    attempt_row,
    crashed_dispatch,
    dead_pid,
    dispatch_process,
    events_of,
    new_task,
    running,
    seed_attempt,
    task_row,
    terminal_events,
    wait_for,
    window_ids,
)


def test_four_concurrent_sweeps_reap_each_task_exactly_once(
    make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    app = make_app()
    tasks: list[int] = []
    for _ in range(3):
        tasks.append(new_task(app, repo))
        seed_attempt(app, tasks[-1], target="dispatch:@999")
    for _ in range(2):
        tasks.append(new_task(app, repo))
        seed_attempt(app, tasks[-1], host="elsewhere", heartbeat=utcnow() - timedelta(hours=1))
    crashed_task, _crashed_attempt, intent = crashed_dispatch(app, git, repo)
    tasks.append(crashed_task)

    procs = [dispatch_process(env, "sweep", "--json") for _ in range(4)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))

    reported = [r["task_id"] for data in outputs for r in data["reaped"]]
    assert sorted(reported) == sorted(tasks)  # each reap reported by one sweep only
    for task_id in tasks:
        assert task_row(env, task_id)["status"] != "in-progress"
        assert len(terminal_events(env, task_id)) == 1
    assert len(events_of(env, crashed_task, "dispatch-failed")) == 1
    assert task_row(env, crashed_task)["status"] == "ready"
    assert not Path(intent["worktree"]).exists()
    assert git(repo, "branch", "--list", intent["branch"]) == ""


def test_sweeps_running_alongside_dispatches_touch_none_of_them(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    tasks = [new_task(app, repo) for _ in range(3)]
    runs = [dispatch_process(env, "run", str(t)) for t in tasks]
    sweeps = 0
    while any(p.poll() is None for p in runs) or sweeps < 2:
        sweeper = dispatch_process(env, "sweep", "--json")
        out, err = sweeper.communicate(timeout=60)
        assert sweeper.returncode == 0, err
        assert json.loads(out)["reaped"] == []
        sweeps += 1
    for proc in runs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    for task_id in tasks:
        assert running(env, task_id) is not None
        kinds = {e["kind"] for e in events_of(env, task_id)}
        assert kinds == {"created", "claimed", "dispatched"}


def test_an_unfinished_rollback_is_finished_once_its_dispatcher_is_gone(
    make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    app = make_app()
    # The dispatcher fenced its attempt, then died before its undos and rollback ran.
    task_id, attempt_id, intent = crashed_dispatch(
        app, git, repo, state="ended", prior="failed", dispatcher_pid=dead_pid()
    )
    # A rollback in progress: its dispatcher is alive (this very process) and in its lease.
    busy_task, busy_attempt, busy_intent = crashed_dispatch(
        app,
        git,
        repo,
        state="ended",
        dispatcher_pid=os.getpid(),
        started=utcnow(),
        lease=utcnow() + timedelta(minutes=1),
    )

    report = sweep(app)

    assert [(r.task_id, r.status) for r in report.reaped] == [(task_id, "failed")]
    assert attempt_row(env, attempt_id)["state"] == "ended"
    assert not Path(intent["worktree"]).exists()
    assert git(repo, "branch", "--list", intent["branch"]) == ""
    assert len(events_of(env, task_id, "dispatch-failed")) == 1
    assert task_row(env, busy_task)["status"] == "in-progress"
    assert Path(busy_intent["worktree"]).is_dir()
    assert attempt_row(env, busy_attempt)["error"] is None


def test_a_sweep_with_an_old_snapshot_never_undoes_a_newer_dispatch(
    make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    app = make_app()
    task_id = new_task(app, repo)
    crashed = seed_attempt(
        app,
        task_id,
        state="starting",
        lease=utcnow() - timedelta(minutes=1),
        dispatcher_pid=dead_pid(),
        intent={
            "repo": str(repo),
            "base": "main",
            "branch": branch_name(task_id, "job"),
            "branch_existed": False,
            "worktree": str(worktree_path(app.settings.worktree_root, str(repo), task_id)),
            "worktree_existed": False,
        },
    )
    assert [r.attempt_id for r in sweep(app).reaped] == [crashed]
    # The task is dispatched again, into the very worktree and branch the intent names.
    result = dispatch_task(app, task_id)
    assert result is not None
    attempt = wait_for(lambda: running(env, task_id), "the new agent to start")
    window = attempt["tmux_target"].split(":")[1]

    # A second sweep that read its snapshot before the first one's rollback now acts on it.
    late, _ = _finish_undo(app, crashed, "dispatcher died", Panes.of([]))

    assert late is None
    assert Path(attempt["worktree"]).is_dir()
    assert git(repo, "branch", "--list", attempt["branch"]).strip() != ""
    assert window in window_ids(env)
    assert task_row(env, task_id)["status"] == "in-progress"
    assert len(events_of(env, task_id, "dispatch-failed")) == 1


def test_a_sweep_that_finds_the_undo_lock_held_leaves_the_task_to_the_next_sweep(
    make_app: MakeApp, repo: Path, env: Env, git: GitRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another sweep still undoing: this one waits its timeout, says so, changes nothing."""
    app = make_app()
    task_id, crashed, intent = crashed_dispatch(app, git, repo)
    monkeypatch.setattr(reaping, "UNDO_LOCK_SECONDS", 0.2)
    app.settings.locks_dir.mkdir(parents=True, exist_ok=True)
    other = FileLock(app.settings.locks_dir / "sweep-undo.lock")  # as another sweep holds it

    with other:
        undone, problems = _finish_undo(app, crashed, "dispatcher died", Panes.of([]))

    assert undone is None
    assert problems == [f"attempt {crashed}: another sweep is still undoing it"]
    assert task_row(env, task_id)["status"] == "in-progress"
    assert attempt_row(env, crashed)["state"] == "starting"
    assert Path(intent["worktree"]).is_dir()
    assert events_of(env, task_id, "dispatch-failed") == []
    # Once the lock is free, the next sweep finishes it.
    assert [r.attempt_id for r in sweep(app).reaped] == [crashed]
    assert task_row(env, task_id)["status"] == "ready"
    assert not Path(intent["worktree"]).exists()
