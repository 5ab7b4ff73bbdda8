"""cancel, close/reopen, done, logs and attach against real agents in tmux."""

from __future__ import annotations

import json
import select
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from dispatch.app import App
from dispatch.services import control
from dispatch.services.control import attach_argv, cancel_task, close_task
from dispatch.services.dispatching import dispatch_task, redispatch
from tests.conftest import BASE_CONFIG, Cli, Env, MakeApp, tmux, windows
from tests.integration.recovery_helpers import (
    attempt_row,
    attempts_of,
    events_of,
    execute,
    new_task,
    resume_process,
    run_all,
    running,
    settled,
    signal_quietly,
    task_row,
    terminal_events,
    wait_for,
)

WAITER = """
[agents.waiter]
command = ["sh", "-c", "while [ ! -e stop ]; do sleep 0.05; done"]
completion = "signal"
"""


def _start(
    app: App, repo: Path, env: Env, prompt: str = "sleep 30", agent: str = "shell"
) -> tuple[int, sqlite3.Row]:
    task_id = new_task(app, repo, prompt, agent=agent)
    dispatch_task(app, task_id)
    return task_id, wait_for(lambda: running(env, task_id), "the agent to start")


def _is_agent_of(pid: int, attempt_id: int) -> bool:
    """Whether pid is a live (not zombie) process started for the attempt."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return state != "Z" and f"DISPATCH_ATTEMPT_ID={attempt_id}".encode() in environ


def _window_gone(env: Env, task_id: int) -> bool:
    return f"t{task_id}" not in windows(env)


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_stops_the_agent_and_is_idempotent(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app(), repo, env)

    first = cli("cancel", str(task_id))

    assert first.code == 0, first.stderr
    assert f"task {task_id} is cancelled" in first.stderr
    task = task_row(env, task_id)
    assert (task["status"], task["current_attempt_id"]) == ("cancelled", None)
    ended = attempt_row(env, attempt["id"])
    assert (ended["state"], ended["outcome"]) == ("ended", "cancelled")
    wait_for(lambda: _window_gone(env, task_id), "the window to close")
    assert len(terminal_events(env, task_id)) == 1
    assert len(events_of(env, task_id, "cancel-requested")) == 1
    events = len(events_of(env, task_id))

    second = cli("cancel", str(task_id))

    assert second.code == 0
    assert "already cancelled" in second.stderr
    assert len(events_of(env, task_id)) == events


@pytest.mark.parametrize("stopped", [False, True], ids=["ignores-ctrl-c", "wrapper-stopped"])
def test_cancel_kills_the_window_after_the_grace(
    make_app: MakeApp, repo: Path, env: Env, monkeypatch: pytest.MonkeyPatch, stopped: bool
) -> None:
    monkeypatch.setattr(control, "CANCEL_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(control, "KILL_GRACE_SECONDS", 0.5)
    app = make_app()
    # An agent deaf to Ctrl-C and to the hangup the window's kill sends.
    task_id, attempt = _start(app, repo, env, "trap '' INT HUP; sleep 30")
    if stopped:  # the wrapper cannot record anything: cancel records it itself
        signal_quietly(attempt["wrapper_pid"], signal.SIGSTOP)
    try:
        view = cancel_task(app, task_id)
        # Cancelled means stopped: the agent is gone before the wrapper runs again (its
        # pid may already be another process's on a busy machine: look at who has it).
        assert not _is_agent_of(attempt["agent_pid"], attempt["id"])
    finally:
        resume_process(attempt["wrapper_pid"])

    assert view.task.status == "cancelled"
    assert _window_gone(env, task_id)
    assert attempt_row(env, attempt["id"])["outcome"] == "cancelled"
    assert len(terminal_events(env, task_id)) == 1


def test_cancel_a_ready_task_and_refuse_a_done_one(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    ready = new_task(app, repo)
    finished = new_task(app, repo, "true")
    dispatch_task(app, finished)
    wait_for(lambda: settled(env, finished), "the agent to finish")

    cancelled = cli("cancel", str(ready), "--json")
    refused = cli("cancel", str(finished))

    assert cancelled.code == 0, cancelled.stderr
    assert cancelled.json()["status"] == "cancelled"
    [event] = events_of(env, ready, "cancelled")
    assert (event["from_status"], event["to_status"]) == ("ready", "cancelled")
    assert refused.code == 3
    assert "done" in refused.stderr
    assert task_row(env, finished)["status"] == "done"


# -- close / reopen ---------------------------------------------------------------------------


def test_close_cancels_the_running_attempt_and_archives(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app(), repo, env)

    closed = cli("close", str(task_id))

    assert closed.code == 0, closed.stderr
    task = task_row(env, task_id)
    assert task["closed_at"] is not None
    assert task["status"] == "cancelled"
    assert attempt_row(env, attempt["id"])["outcome"] == "cancelled"
    wait_for(lambda: _window_gone(env, task_id), "the window to close")
    [request] = events_of(env, task_id, "cancel-requested")
    assert json.loads(request["detail"])["reason"] == "closed with task"
    [close_event] = events_of(env, task_id, "closed")
    assert json.loads(close_event["detail"])["cancelled_attempt"] == attempt["id"]

    again = cli("close", str(task_id))

    assert again.code == 0
    assert "already closed" in again.stderr
    assert len(events_of(env, task_id, "closed")) == 1


def test_concurrent_closes_archive_once_with_one_event(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id = new_task(make_app(), repo)

    results = run_all(cli, *[("close", str(task_id))] * 4)

    assert [r.code for r in results] == [0, 0, 0, 0]
    assert sum("already closed" in r.stderr for r in results) == 3
    assert len(events_of(env, task_id, "closed")) == 1
    assert task_row(env, task_id)["closed_at"] is not None


def test_closed_tasks_are_hidden_refused_and_reopened(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    ready = new_task(app, repo)
    cancelled = new_task(app, repo)
    cancel_task(app, cancelled)
    for task_id in (ready, cancelled):
        close_task(app, task_id)
    refusals = (("run", str(ready)), ("redispatch", str(cancelled)), ("reset", str(cancelled)))

    listed, everything, *refused = run_all(
        cli, ("list", "--json"), ("list", "--all", "--json"), *refusals
    )

    assert listed.json() == []
    assert {t["id"]: t["closed"] for t in everything.json()} == {ready: True, cancelled: True}
    for args, result in zip(refusals, refused, strict=True):
        assert result.code == 5, (args, result.stderr)
        assert "reopen" in result.stderr
    assert task_row(env, ready)["status"] == "ready"
    assert task_row(env, cancelled)["status"] == "cancelled"
    assert attempts_of(env, ready) == []

    reopened = cli("reopen", str(cancelled), "--json")
    assert reopened.code == 0, reopened.stderr
    assert (reopened.json()["closed"], reopened.json()["status"]) == (False, "cancelled")
    assert [t["id"] for t in cli("list", "--json").json()] == [cancelled]
    assert cli("reset", str(cancelled)).code == 0


# -- done -------------------------------------------------------------------------------------


def test_done_resolves_task_then_attempt_env_then_cwd(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    env.write_config(BASE_CONFIG + WAITER)
    app = make_app()
    by_task, a1 = _start(app, repo, env, agent="waiter")
    by_env, a2 = _start(app, repo, env, agent="waiter")
    by_cwd, a3 = _start(app, repo, env, agent="waiter")
    unsignalled, a4 = _start(app, repo, env, agent="waiter")
    subdir = Path(a3["worktree"]) / "deep" / "er"
    subdir.mkdir(parents=True)

    with ThreadPoolExecutor(max_workers=3) as pool:
        calls = [
            pool.submit(cli, "done", str(by_task)),
            # An explicit TASK wins over the environment, which wins over the cwd.
            pool.submit(
                cli,
                "done",
                extra_env={"DISPATCH_ATTEMPT_ID": str(a2["id"])},
                cwd=Path(a4["worktree"]),
            ),
            pool.submit(cli, "done", cwd=subdir),
        ]
        results = [call.result() for call in calls]

    for result in results:
        assert result.code == 0, result.stderr
    for attempt in (a1, a2, a3, a4):
        (Path(attempt["worktree"]) / "stop").touch()
    outcomes = {
        t: wait_for(partial(settled, env, t), "the agent to finish")
        for t in (by_task, by_env, by_cwd, unsignalled)
    }
    assert outcomes == {
        by_task: "done",
        by_env: "done",
        by_cwd: "done",
        unsignalled: "incomplete",
    }


def test_done_twice_records_one_signal(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    env.write_config(BASE_CONFIG + WAITER)
    task_id, attempt = _start(make_app(), repo, env, agent="waiter")

    first = cli("done", str(task_id))
    second = cli("done", str(task_id))

    assert (first.code, second.code) == (0, 0), second.stderr
    assert f"attempt {attempt['id']} of task {task_id} marked done" in first.stderr
    assert "was already marked done" in second.stderr
    assert len(events_of(env, task_id, "done-signalled")) == 1
    (Path(attempt["worktree"]) / "stop").touch()
    assert wait_for(lambda: settled(env, task_id), "the agent to finish") == "done"


def test_done_refuses_to_guess(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    app = make_app()
    first, a1 = _start(app, repo, env)
    second, a2 = _start(app, repo, env)
    ready = new_task(app, repo)
    # Two running attempts claim the same directory: the cwd cannot tell which is meant.
    execute(env, "UPDATE attempts SET worktree = ? WHERE id = ?", a1["worktree"], a2["id"])

    with ThreadPoolExecutor(max_workers=3) as pool:
        calls = [
            pool.submit(cli, "done", cwd=Path(a1["worktree"])),
            pool.submit(cli, "done", cwd=repo),
            pool.submit(cli, "done", str(ready)),
        ]
        ambiguous, nowhere, idle = (call.result() for call in calls)

    assert ambiguous.code == 2
    assert f"{first}, {second}" in ambiguous.stderr
    assert nowhere.code == 4
    assert "no running attempt" in nowhere.stderr
    assert idle.code == 3
    assert "ready" in idle.stderr
    for attempt in (a1, a2):
        assert attempt_row(env, attempt["id"])["done_signalled_at"] is None


# -- logs -------------------------------------------------------------------------------------


def test_logs_outlive_the_window_and_pick_an_attempt(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    task_id = new_task(app, repo, "echo output-of-attempt-$DISPATCH_ATTEMPT_ID; exit 1")
    dispatch_task(app, task_id)
    assert wait_for(lambda: settled(env, task_id), "the first attempt to fail") == "failed"
    redispatch(app, task_id)
    wait_for(lambda: len(attempts_of(env, task_id)) == 2 and settled(env, task_id), "a rerun")
    wait_for(lambda: _window_gone(env, task_id), "the window to close")
    first, second = (a["id"] for a in attempts_of(env, task_id))

    latest, older, missing = run_all(
        cli,
        ("logs", str(task_id)),
        ("logs", str(task_id), "--attempt", "1"),
        ("logs", str(task_id), "--attempt", "7"),
    )

    assert latest.code == 0, latest.stderr
    assert f"output-of-attempt-{second}" in latest.stdout
    assert f"output-of-attempt-{first}" not in latest.stdout
    assert f"output-of-attempt-{first}" in older.stdout
    assert missing.code == 4


def test_logs_follow_ends_when_the_attempt_ends(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    release = env.root / "release"
    task_id, _attempt = _start(
        app,
        repo,
        env,
        f"echo first-line; while [ ! -e '{release}' ]; do sleep 0.05; done; echo last-line",
    )
    follower = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "logs", str(task_id), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Following for real: the first line has come through before the agent may end.
        assert follower.stdout is not None
        assert select.select([follower.stdout], [], [], 20)[0], "nothing followed"
        assert "first-line" in follower.stdout.readline()
        release.touch()
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0, err
    assert "last-line" in out
    assert settled(env, task_id) == "done"


def test_logs_of_a_task_never_dispatched(cli: Cli, make_app: MakeApp, repo: Path) -> None:
    task_id = new_task(make_app(), repo)
    result = cli("logs", str(task_id))
    assert result.code == 4
    assert "not been dispatched" in result.stderr


# -- attach -----------------------------------------------------------------------------------


def test_attach_without_a_window_is_a_conflict(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id = new_task(make_app(), repo)
    result = cli("attach", str(task_id))
    assert result.code == 3
    assert "ready" in result.stderr


def test_attach_without_a_terminal_says_so_and_names_the_command(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app(), repo, env)
    window = attempt["tmux_target"].split(":")[1]
    result = cli("attach", str(task_id), input="", extra_env={"TMUX": ""})
    assert result.code == 7, result.stderr
    [line] = result.stderr.splitlines()
    assert f"task {task_id}'s window needs a terminal" in line
    assert line.endswith(f"-L {env.socket} attach-session -t {window})")
    assert "open terminal failed" not in result.stderr


def test_attach_argv_inside_and_outside_tmux(
    make_app: MakeApp, repo: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    task_id, attempt = _start(app, repo, env)
    window = attempt["tmux_target"].split(":")[1]

    outside = attach_argv(app, task_id)
    monkeypatch.setenv("TMUX", f"/tmp/tmux-0/{env.socket},1,0")
    inside = attach_argv(app, task_id)
    # A client of another tmux server cannot switch-client to ours: it attaches instead.
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    elsewhere = attach_argv(app, task_id)

    assert outside[1:] == ["-L", env.socket, "attach-session", "-t", window]
    assert inside[1:] == ["-L", env.socket, "switch-client", "-t", window]
    assert elsewhere[1:] == ["-L", env.socket, "attach-session", "-t", window]
    # The target names the task's own window on the task's own server.
    shown = tmux(env, "display-message", "-p", "-t", window, "#{window_name}")
    assert shown.stdout.strip() == f"t{task_id}"
