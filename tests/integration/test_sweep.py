"""`dispatch sweep` against real git, tmux, SQLite and processes (SPEC §4)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Hashable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dispatch.adapters.tmux import TmuxTerminal
from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.services.dispatching import dispatch_task, redispatch
from dispatch.services.sweep import sweep
from dispatch.services.wrapper import finish
from dispatch.store.direct import Direct, Tx
from tests.conftest import Cli, Env, GitRunner, MakeApp, tmux, windows
from tests.integration.recovery_helpers import (
    attempt_row,
    attempts_of,
    dead_pid,
    dispatch_process,
    dump,
    events_of,
    execute,
    hours_ago,
    new_task,
    open_window,
    resume_process,
    running,
    seed_attempt,
    settled,
    signal_quietly,
    task_row,
    terminal_events,
    wait_for,
    window_ids,
)

FAST_LEASE = "spawn_timeout = 10\nheartbeat_interval = 1\nlease_seconds = 1\n"


def _worktrees(git: Callable[..., str], repo: Path) -> list[str]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


def _dispatch_branches(git: Callable[..., str], repo: Path) -> list[str]:
    return git(repo, "branch", "--list", "dispatch/*", "--format=%(refname:short)").split()


def _assert_clean(git: Callable[..., str], repo: Path, env: Env, task_id: int) -> None:
    """Nothing the dead dispatch made is left: worktree, branch, directory, window."""
    assert _worktrees(git, repo) == [str(repo)]
    assert _dispatch_branches(git, repo) == []
    assert not (env.home / "worktrees" / repo.name / f"task-{task_id}").exists()
    assert windows(env) == []


def _gate(env: Env) -> tuple[Path, Path, str]:
    """Marker files and a shell snippet that announces itself and waits to be released."""
    started, release = env.root / "gate-started", env.root / "gate-release"
    script = (
        f"touch '{started}'; i=0; "
        f"while [ ! -e '{release}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    )
    return started, release, script


def _install_hook(repo: Path, script: str) -> Path:
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\n{script}\n")
    hook.chmod(0o755)
    return hook


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the dispatcher and everything it started (git, its hook or filter)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes its pipes


def _lease_of(env: Env, attempt_id: int) -> datetime:
    value = attempt_row(env, attempt_id)["lease_expires_at"]
    return datetime.fromisoformat(value).replace(tzinfo=utcnow().tzinfo)


def _run_to_done(app: App, env: Env, task_id: int) -> None:
    assert dispatch_task(app, task_id) is not None
    assert wait_for(lambda: settled(env, task_id), "the agent to finish") == "done"


Gated = list[subprocess.Popen[str]]


@pytest.fixture
def gated_proc() -> Iterator[Gated]:
    """Background dispatchers, killed with their process groups if a test leaves them."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            _kill_group(proc)


# -- a dispatcher that died mid-dispatch ---------------------------------------------------------


def test_dispatcher_killed_inside_git_worktree_add_is_undone_by_sweep(
    cli: Cli,
    make_app: MakeApp,
    repo: Path,
    env: Env,
    git: GitRunner,
    gated_proc: list[subprocess.Popen[str]],
) -> None:
    env.write_config(FAST_LEASE)
    task_id = new_task(make_app(), repo, "echo hi > out.txt")
    started, _release, script = _gate(env)
    hook = _install_hook(repo, script)
    proc = dispatch_process(env, "run", str(task_id))
    gated_proc.append(proc)
    wait_for(started.exists, "the post-checkout hook to start")
    [attempt] = attempts_of(env, task_id)
    assert attempt["state"] == "starting"
    _kill_group(proc)
    # The dead dispatch left its worktree and branch behind, and the task in-progress.
    assert len(_worktrees(git, repo)) == 2
    assert _dispatch_branches(git, repo) != []
    lease = _lease_of(env, attempt["id"])
    wait_for(lambda: utcnow() > lease, "the dispatcher's lease to expire")

    swept = cli("sweep", "--json")

    assert swept.code == 0, swept.stderr
    assert swept.json()["reaped"] == [
        {
            "task_id": task_id,
            "attempt_id": attempt["id"],
            "reason": "dispatcher died",
            "status": "ready",
        }
    ]
    task = task_row(env, task_id)
    assert (task["status"], task["current_attempt_id"]) == ("ready", None)
    ended = attempt_row(env, attempt["id"])
    assert (ended["state"], ended["outcome"], ended["error"]) == (
        "ended",
        "dispatch-failed",
        "dispatcher died",
    )
    assert len(events_of(env, task_id, "dispatch-failed")) == 1
    _assert_clean(git, repo, env, task_id)

    # Nothing left in the way: the task now dispatches cleanly.
    hook.unlink()
    _run_to_done(make_app(), env, task_id)
    worktree = Path(attempts_of(env, task_id)[-1]["worktree"])
    assert (worktree / "out.txt").read_text() == "hi\n"


def test_dispatcher_killed_mid_checkout_leaves_a_locked_worktree_that_sweep_removes(
    cli: Cli,
    make_app: MakeApp,
    repo: Path,
    env: Env,
    git: GitRunner,
    gated_proc: list[subprocess.Popen[str]],
) -> None:
    started, release, script = _gate(env)
    (repo / ".gitattributes").write_text("*.slow filter=slow\n")
    (repo / "data.slow").write_text("payload\n")
    git(repo, "add", ".gitattributes", "data.slow")
    git(repo, "commit", "-q", "-m", "slow file")
    # The smudge filter runs during the new worktree's checkout, while git holds it locked.
    git(repo, "config", "filter.slow.smudge", f"{script}; cat")
    task_id = new_task(make_app(), repo, "cat data.slow > out.txt")
    proc = dispatch_process(env, "run", str(task_id))
    gated_proc.append(proc)
    wait_for(started.exists, "the checkout filter to start")
    [attempt] = attempts_of(env, task_id)
    _kill_group(proc)
    assert "\nlocked" in git(repo, "worktree", "list", "--porcelain")

    # Still inside its lease: a dispatch is never touched then, dead or not.
    assert sweep(make_app()).reaped == []
    assert attempt_row(env, attempt["id"])["state"] == "starting"
    assert task_row(env, task_id)["status"] == "in-progress"
    assert len(_worktrees(git, repo)) == 2

    execute(
        env, "UPDATE attempts SET lease_expires_at = ? WHERE id = ?", hours_ago(), attempt["id"]
    )
    swept = cli("sweep", "--json")

    assert swept.code == 0, swept.stderr
    assert [r["status"] for r in swept.json()["reaped"]] == ["ready"]
    assert task_row(env, task_id)["status"] == "ready"
    assert attempt_row(env, attempt["id"])["outcome"] == "dispatch-failed"
    _assert_clean(git, repo, env, task_id)
    release.touch()
    _run_to_done(make_app(), env, task_id)
    worktree = Path(attempts_of(env, task_id)[-1]["worktree"])
    assert (worktree / "out.txt").read_text() == "payload\n"


def test_a_live_dispatcher_past_its_lease_is_never_touched(
    cli: Cli,
    make_app: MakeApp,
    repo: Path,
    env: Env,
    git: GitRunner,
    gated_proc: list[subprocess.Popen[str]],
) -> None:
    task_id = new_task(make_app(), repo, "echo hi > out.txt")
    started, release, script = _gate(env)
    _install_hook(repo, script)
    proc = dispatch_process(env, "run", str(task_id))
    gated_proc.append(proc)
    wait_for(started.exists, "the post-checkout hook to start")
    [attempt] = attempts_of(env, task_id)
    # A slow step on this host: the lease has run out but the dispatcher is alive.
    execute(
        env, "UPDATE attempts SET lease_expires_at = ? WHERE id = ?", hours_ago(), attempt["id"]
    )

    report = sweep(make_app())

    assert report.reaped == []
    assert attempt_row(env, attempt["id"])["state"] == "starting"
    assert len(_worktrees(git, repo)) == 2
    release.touch()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert wait_for(lambda: settled(env, task_id), "the agent to finish") == "done"


def test_a_dead_dispatcher_is_told_from_a_live_process_that_reuses_its_pid(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    stranger = subprocess.Popen(["sleep", "30"])
    zombie = subprocess.Popen(["true"])  # exits, and is not waited for until the end
    try:
        wait_for(lambda: _is_zombie(zombie.pid), "the child to become a zombie")
        expired = utcnow() - timedelta(minutes=1)
        reused = seed_attempt(
            app,
            new_task(app, repo),
            state="starting",
            lease=expired,
            dispatcher_pid=stranger.pid,  # started after the attempt: not its dispatcher
            started=utcnow() - timedelta(hours=1),
        )
        undead = seed_attempt(
            app, new_task(app, repo), state="starting", lease=expired, dispatcher_pid=zombie.pid
        )
        alive = seed_attempt(
            app,
            new_task(app, repo),
            state="starting",
            lease=expired,
            dispatcher_pid=os.getpid(),
            started=utcnow(),
        )

        report = sweep(app)

        assert sorted(r.attempt_id or 0 for r in report.reaped) == [reused, undead]
        assert {r.reason for r in report.reaped} == {"dispatcher died"}
        assert attempt_row(env, alive)["state"] == "starting"
    finally:
        stranger.kill()
        stranger.wait()
        zombie.wait()


def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] == "Z"


# -- running attempts on this host: tmux is the authority ----------------------------------------


def _start(app: App, repo: Path, env: Env, prompt: str = "sleep 30") -> tuple[int, sqlite3.Row]:
    """A task whose shell agent is running in its window; (task id, attempt row)."""
    task_id = new_task(app, repo, prompt)
    dispatch_task(app, task_id)
    attempt = wait_for(lambda: running(env, task_id), "the agent to start")
    return task_id, attempt


@pytest.mark.parametrize("requeue", [False, True], ids=["reap", "requeue"])
def test_sigkilled_wrapper_is_reaped_as_interrupted(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, requeue: bool
) -> None:
    task_id, attempt = _start(make_app(), repo, env)
    signal_quietly(attempt["wrapper_pid"], signal.SIGKILL)
    wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")

    swept = cli("sweep", "--json", *(["--requeue"] if requeue else []))

    assert swept.code == 0, swept.stderr
    status = "ready" if requeue else "interrupted"
    assert swept.json()["reaped"] == [
        {
            "task_id": task_id,
            "attempt_id": attempt["id"],
            "reason": "agent window gone",
            "status": status,
        }
    ]
    task = task_row(env, task_id)
    assert (task["status"], task["current_attempt_id"]) == (status, None)
    ended = attempt_row(env, attempt["id"])
    assert (ended["state"], ended["outcome"]) == ("ended", "interrupted")
    [reaped] = terminal_events(env, task_id)
    assert (reaped["kind"], reaped["to_status"]) == ("reaped", status)
    # Idempotent: a second sweep finds nothing more to do.
    assert sweep(make_app()).reaped == []
    assert len(terminal_events(env, task_id)) == 1


def test_a_live_pane_is_never_reaped_even_with_a_stale_heartbeat(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app(), repo, env)
    # A laptop that slept: the wrapper cannot beat, its heartbeat is an hour old.
    signal_quietly(attempt["wrapper_pid"], signal.SIGSTOP)
    try:
        execute(
            env, "UPDATE attempts SET heartbeat_at = ? WHERE id = ?", hours_ago(), attempt["id"]
        )

        swept = cli("sweep", "--json", "--stale-after", "1s")

        assert swept.code == 0, swept.stderr
        assert swept.json()["reaped"] == []
        assert task_row(env, task_id)["status"] == "in-progress"
        assert attempt_row(env, attempt["id"])["state"] == "running"
        assert events_of(env, task_id, "reaped") == []
    finally:
        resume_process(attempt["wrapper_pid"])


def test_killed_window_of_a_stopped_wrapper_is_not_left_in_progress(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app(), repo, env)
    signal_quietly(attempt["wrapper_pid"], signal.SIGSTOP)
    try:
        assert tmux(env, "kill-window", "-t", attempt["tmux_target"]).returncode == 0

        sweep(make_app())

        assert task_row(env, task_id)["status"] != "in-progress"
        assert attempt_row(env, attempt["id"])["state"] == "ended"
        assert len(terminal_events(env, task_id)) == 1
    finally:
        resume_process(attempt["wrapper_pid"])


def test_tmux_server_killed_under_several_agents(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    started = [_start(app, repo, env) for _ in range(3)]
    assert tmux(env, "kill-server").returncode == 0

    sweep(app)

    for task_id, attempt in started:
        # Each wrapper got SIGHUP and may have recorded `interrupted` itself before the
        # sweep looked; either way exactly one of them ended the task.
        assert task_row(env, task_id)["status"] == "interrupted"
        assert attempt_row(env, attempt["id"])["outcome"] == "interrupted"
        assert len(terminal_events(env, task_id)) == 1


def test_a_dead_pane_without_a_recorded_exit_is_reaped(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    open_window(env, "keep", "sleep", "30")
    assert tmux(env, "set-option", "-g", "remain-on-exit", "on").returncode == 0
    attempt_id = seed_attempt(app, new_task(app, repo))
    window = open_window(env, "t9", *_wrapper_like(attempt_id, "exit 3"))
    execute(
        env, "UPDATE attempts SET tmux_target = ? WHERE id = ?", f"dispatch:{window}", attempt_id
    )
    wait_for(
        lambda: (
            tmux(env, "display-message", "-p", "-t", window, "#{pane_dead}").stdout.strip() == "1"
        ),
        "the pane to die",
    )

    report = sweep(app)

    assert [(r.attempt_id, r.reason, r.status) for r in report.reaped] == [
        (attempt_id, "agent pane dead without a recorded exit", "interrupted")
    ]


def test_the_pane_is_known_by_the_wrapper_it_runs(make_app: MakeApp, repo: Path, env: Env) -> None:
    app = make_app()
    # The window id recorded now names a window running something else (tmux restarted).
    reused = seed_attempt(app, new_task(app, repo))
    other = open_window(env, "other", "sleep", "30")
    execute(env, "UPDATE attempts SET tmux_target = ? WHERE id = ?", f"dispatch:{other}", reused)
    # The dispatcher died before recording the window its wrapper runs in.
    unrecorded = seed_attempt(app, new_task(app, repo))
    open_window(env, "t2", *_wrapper_like(unrecorded))

    report = sweep(app)

    assert [(r.attempt_id, r.reason) for r in report.reaped] == [(reused, "agent window gone")]
    assert attempt_row(env, unrecorded)["state"] == "running"


def test_a_cancel_whose_agent_vanished_is_reaped_as_cancelled(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    task_id = new_task(app, repo)
    attempt_id = seed_attempt(app, task_id, target="dispatch:@999")
    execute(
        env, "UPDATE attempts SET cancel_requested_at = ? WHERE id = ?", hours_ago(), attempt_id
    )

    report = sweep(app)

    assert [r.status for r in report.reaped] == ["cancelled"]
    assert task_row(env, task_id)["status"] == "cancelled"
    assert attempt_row(env, attempt_id)["outcome"] == "cancelled"


def test_an_attempt_from_another_tmux_server_is_judged_by_its_heartbeat(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    fresh = seed_attempt(
        app, new_task(app, repo), target="dispatch:@0", socket="another", heartbeat=utcnow()
    )
    stale = seed_attempt(
        app,
        new_task(app, repo),
        target="dispatch:@0",
        socket="another",
        heartbeat=utcnow() - timedelta(hours=1),
    )

    report = sweep(app)

    assert [r.attempt_id for r in report.reaped] == [stale]
    assert attempt_row(env, fresh)["state"] == "running"


def _wrapper_like(attempt_id: int, script: str = "sleep 60") -> list[str]:
    """A command that tmux shows as the wrapper of attempt_id (`… agent-exec ID`)."""
    return ["sh", "-c", script, "dispatch", "agent-exec", str(attempt_id)]


# -- other hosts: the heartbeat decides; a late wrapper is fenced ----------------------------------


def test_other_host_attempt_is_reaped_by_heartbeat_and_its_late_exit_is_fenced(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    lost_task = new_task(app, repo)
    lost = seed_attempt(app, lost_task, host="elsewhere", heartbeat=utcnow() - timedelta(hours=1))
    alive = seed_attempt(
        app, new_task(app, repo), host="elsewhere", heartbeat=utcnow() - timedelta(seconds=5)
    )

    swept = cli("sweep", "--json", "--stale-after", "10m")

    assert swept.code == 0, swept.stderr
    [reap] = swept.json()["reaped"]
    assert (reap["task_id"], reap["attempt_id"], reap["status"]) == (
        lost_task,
        lost,
        "interrupted",
    )
    assert "heartbeat" in reap["reason"] and "elsewhere" in reap["reason"]
    assert attempt_row(env, alive)["state"] == "running"

    # The task is redispatched here; then the old wrapper on the other host reports its exit.
    new_attempt = redispatch(app, lost_task).attempt.id
    wait_for(lambda: running(env, lost_task), "the new agent to start")
    before = task_row(env, lost_task)

    assert finish(app, lost, 0, interrupted=False) is None

    after = task_row(env, lost_task)
    assert (after["status"], after["current_attempt_id"]) == ("in-progress", new_attempt)
    assert after["last_error"] == before["last_error"]
    old = attempt_row(env, lost)
    assert (old["state"], old["outcome"], old["exit_code"]) == ("ended", "interrupted", 0)
    assert len(events_of(env, lost_task, "late-exit")) == 1
    assert len(terminal_events(env, lost_task)) == 1  # the reap; the new attempt still runs


# -- options and output --------------------------------------------------------------------------


def _reapable(app: App, repo: Path, env: Env) -> dict[str, int]:
    """One attempt of each kind a sweep reaps, made of rows only; task ids by kind."""
    gone = new_task(app, repo)
    seed_attempt(app, gone, target="dispatch:@999")
    remote = new_task(app, repo)
    seed_attempt(app, remote, host="elsewhere", heartbeat=utcnow() - timedelta(hours=2))
    crashed = new_task(app, repo)
    seed_attempt(
        app,
        crashed,
        state="starting",
        lease=utcnow() - timedelta(minutes=1),
        dispatcher_pid=dead_pid(),
    )
    return {"gone": gone, "remote": remote, "crashed": crashed}


def test_dry_run_changes_nothing(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    tasks = _reapable(make_app(), repo, env)
    before = dump(env)

    swept = cli("sweep", "--dry-run", "--json")

    assert swept.code == 0, swept.stderr
    assert {r["task_id"]: r["status"] for r in swept.json()["reaped"]} == {
        tasks["gone"]: "interrupted",
        tasks["remote"]: "interrupted",
        tasks["crashed"]: "ready",
    }
    assert dump(env) == before
    text = cli("sweep", "--dry-run", "--requeue")
    assert text.code == 0, text.stderr
    assert f"would reap task {tasks['gone']}" in text.stdout
    assert dump(env) == before
    # And the real thing does what the dry run said.
    real = cli("sweep", "--json")
    assert {r["task_id"]: r["status"] for r in real.json()["reaped"]} == {
        tasks["gone"]: "interrupted",
        tasks["remote"]: "interrupted",
        tasks["crashed"]: "ready",
    }


def test_quiet_prints_nothing_when_idle(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    new_task(make_app(), repo)

    quiet = cli("sweep", "-q")
    loud = cli("sweep")

    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert loud.code == 0
    assert "checked 0 attempt(s), reaped 0" in loud.stderr


def test_quiet_still_reports_reaps(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    tasks = _reapable(make_app(), repo, env)

    quiet = cli("sweep", "-q")

    assert quiet.code == 0, quiet.stderr
    assert len(quiet.stdout.splitlines()) == 3
    assert f"reaped task {tasks['gone']}" in quiet.stdout


def test_json_shape(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    tasks = _reapable(make_app(), repo, env)

    data = cli("sweep", "--json").json()

    assert set(data) == {"checked", "reaped", "orphan_windows", "orphan_worktrees"}
    assert data["checked"] == 3
    assert all(set(r) == {"task_id", "attempt_id", "reason", "status"} for r in data["reaped"])
    assert sorted(r["task_id"] for r in data["reaped"]) == sorted(tasks.values())
    assert data["orphan_windows"] == [] and data["orphan_worktrees"] == []


def test_orphans_are_reported_and_never_deleted(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    task_id, _attempt = _start(app, repo, env)
    # A wrapper window whose attempt is not live, a user's own window, and a shell.
    orphan = open_window(env, "t77", "sh", "-c", "sleep 30", "dispatch", "agent-exec", "77")
    open_window(env, "mine", "sleep", "30")
    root = env.home / "worktrees" / repo.name
    stray = root / "task-4242"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("keep me\n")
    other_repo = env.home / "worktrees" / "another-repo" / f"task-{task_id}"
    other_repo.mkdir(parents=True)

    data = cli("sweep", "--json").json()

    assert data["reaped"] == []
    assert data["orphan_windows"] == [f"dispatch:{orphan} (t77)"]
    assert sorted(data["orphan_worktrees"]) == sorted(
        [str(other_repo.resolve()), str(stray.resolve())]
    )
    assert (stray / "notes.txt").read_text() == "keep me\n"
    assert other_repo.is_dir()
    assert orphan in window_ids(env)
    assert task_row(env, task_id)["status"] == "in-progress"
    text = cli("sweep")
    assert f"orphan worktree {stray.resolve()}" in text.stdout
    assert "not removed" in text.stdout and "not killed" in text.stdout


def test_undo_kills_only_the_dead_dispatch_s_own_window(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    crashed_task = new_task(app, repo)
    crashed = seed_attempt(
        app,
        crashed_task,
        state="starting",
        lease=utcnow() - timedelta(minutes=1),
        dispatcher_pid=dead_pid(),
    )
    own = open_window(env, "own", "sh", "-c", "sleep 30", "dispatch", "agent-exec", str(crashed))
    # `agent-exec 1` is a prefix of `agent-exec 12`: that window must survive.
    lookalike = open_window(
        env, "lookalike", "sh", "-c", "sleep 30", "dispatch", "agent-exec", f"{crashed}2"
    )

    report = sweep(app)

    assert [r.attempt_id for r in report.reaped] == [crashed]
    assert own not in window_ids(env)
    assert lookalike in window_ids(env)


# -- cost ----------------------------------------------------------------------------------------


def _live_attempts(app: App, repo: Path, env: Env, count: int) -> None:
    """`count` running attempts whose windows are alive, half of them on other hosts."""
    for n in range(count):
        task_id = new_task(app, repo)
        if n % 2:
            seed_attempt(app, task_id, host="elsewhere", heartbeat=utcnow())
        else:
            attempt_id = seed_attempt(app, task_id)
            window = open_window(env, f"t{task_id}", *_wrapper_like(attempt_id))
            target = f"dispatch:{window}"
            execute(env, "UPDATE attempts SET tmux_target = ? WHERE id = ?", target, attempt_id)


def test_one_tmux_listing_per_sweep(make_app: MakeApp, repo: Path, env: Env) -> None:
    app = make_app()
    _live_attempts(app, repo, env, 10)
    terminal = app.terminal
    assert isinstance(terminal, TmuxTerminal)
    calls_before = len(terminal.calls)

    report = sweep(app)

    assert report.reaped == [] and report.checked == 10
    calls = terminal.calls[calls_before:]
    assert len(calls) == 1
    assert "list-panes" in calls[0]


class _CountingTx:
    """A transaction that counts the statements run through it."""

    def __init__(self, real: Tx, seen: list[str]) -> None:
        self.real, self.seen, self.dialect = real, seen, real.dialect

    def rows(self, sql: str, params: Any = None) -> Any:
        self.seen.append(sql)
        return self.real.rows(sql, params)

    def stream(self, sql: str, params: Any = None) -> Any:
        self.seen.append(sql)
        return self.real.stream(sql, params)

    def change(self, sql: str, params: Any = None) -> int:
        self.seen.append(sql)
        return self.real.change(sql, params)


class _CountingDirect:
    def __init__(self, real: Direct, seen: list[str]) -> None:
        self.real, self.seen = real, seen

    def read(self, work: Callable[[Tx], Any]) -> Any:
        return self.real.read(lambda tx: work(_CountingTx(tx, self.seen)))

    def write(self, work: Callable[[Tx], Any]) -> Any:
        return self.real.write(lambda tx: work(_CountingTx(tx, self.seen)))

    def version(self) -> Hashable | None:
        return self.real.version()

    def close(self) -> None:
        self.real.close()


def _statements_for_sweep(make_app: MakeApp, repo: Path, env: Env, count: int) -> int:
    _live_attempts(make_app(), repo, env, count)
    app = make_app()
    seen: list[str] = []
    app.direct_ = _CountingDirect(app.direct, seen)
    report = sweep(app)
    assert report.checked == count and report.reaped == []
    return len(seen)


def test_sql_statements_do_not_grow_with_the_number_of_tasks(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    few = _statements_for_sweep(make_app, repo, env, 3)
    execute(env, "UPDATE tasks SET status = 'cancelled', current_attempt_id = NULL")
    execute(env, "UPDATE attempts SET state = 'ended'")
    many = _statements_for_sweep(make_app, repo, env, 30)
    assert few == many > 0


def test_an_in_progress_task_without_an_attempt_is_reaped_once(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    """A task left in-progress with no attempt at all (its claim died half-written by
    hand or by a tool) is put back, once: the fence is `current_attempt_id IS NULL`."""
    app = make_app()
    task_id = new_task(app, repo)
    execute(env, "UPDATE tasks SET status = 'in-progress' WHERE id = ?", task_id)

    first = sweep(app)
    second = sweep(app)

    assert [(r.task_id, r.attempt_id, r.status) for r in first.reaped] == [
        (task_id, None, "interrupted")
    ]
    assert second.reaped == []
    assert task_row(env, task_id)["status"] == "interrupted"
    assert [e["kind"] for e in events_of(env, task_id, "reaped")] == ["reaped"]
