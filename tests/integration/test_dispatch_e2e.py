"""Dispatch end to end through real programs: git hooks, a tmux shim, signals, real agents."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.adapters.git import GitWorktrees
from dispatch.adapters.tmux import TmuxTerminal
from dispatch.app import App
from dispatch.errors import DispatchFailed
from dispatch.services.dispatching import dispatch_task, redispatch
from dispatch.services.tasks import add_task
from tests.conftest import Env, Result, tmux, windows
from tests.faults import (
    PYTHON,
    Faulty,
    agent_profile,
    assert_nothing_left,
    assert_rolled_back,
    attempts,
    branches,
    committer_profile,
    events,
    run_cli,
    spawns_instead,
    task,
    tmux_binary,
    wait_for,
    wait_status,
    worktree_list,
    write_config,
)

Cli = Callable[..., Result]


def _hook(repo: Path, body: str) -> None:
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)


Add = Callable[..., int]


@pytest.fixture
def add(repo: Path, make_app: Callable[..., App]) -> Add:
    """Add a task in this process: the CLI's own start-up is not what these tests are about."""

    def add(agent: str, title: str = "Fix the parser", priority: int = 0) -> int:
        app = make_app()
        return add_task(app, title, prompt="p", repo=repo, agent=agent, priority=priority).id

    return add


def _user_session(env: Env) -> None:
    started = tmux(env, "new-session", "-d", "-s", "dispatch", "-n", "user", "sleep", "600")
    assert started.returncode == 0, started.stderr


# -- git -----------------------------------------------------------------------------------


def test_a_failing_post_checkout_hook_leaves_no_branch_or_worktree(
    cli: Cli, env: Env, repo: Path, add: Add
) -> None:
    """git exits non-zero after it made both the branch and the worktree."""
    write_config(env)
    _hook(repo, "echo 'hook says no' >&2\nexit 1\n")
    add("sleeper")
    ran = cli("run", "1")
    assert ran.code == 6, ran.stderr
    assert "dispatch of task 1 failed at worktree" in ran.stderr
    assert "task is ready" in ran.stderr
    assert ran.stdout == ""
    assert_rolled_back(env, 1, "ready", step="worktree")
    assert_nothing_left(env, repo, 1)


def test_a_worktree_lock_that_cannot_be_taken_fails_the_step_before_git_runs(
    env: Env, repo: Path, add: Add, make_app: Callable[..., App], tmp_path: Path
) -> None:
    """The per-repository lock's file cannot be made (its directory is a file): the
    worktree step fails by exception, git is never asked to add, and all is undone."""
    write_config(env)
    task_id = add("sleeper")
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    worktrees = GitWorktrees(blocked / "locks")
    app = make_app(worktrees=worktrees)
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, task_id)
    assert "failed at worktree" in caught.value.message
    assert [argv for argv in worktrees.calls if argv[3:5] == ["worktree", "add"]] == []
    assert_rolled_back(env, task_id, "ready", step="worktree")
    assert_nothing_left(env, repo, task_id)
    assert blocked.read_text() == ""  # what was there is left as it was


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_git_worktree_add_runs_the_undos(
    cli: Cli, env: Env, repo: Path, add: Add, tmp_path: Path, signum: int
) -> None:
    write_config(env)
    started, release, finished = (tmp_path / n for n in ("hook-started", "release", "hook-done"))
    _hook(
        repo,
        f"touch '{started}'\n"
        f"i=0; while [ ! -e '{release}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n"
        f"touch '{finished}'\n",
    )
    add("sleeper")
    dispatcher = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "run", "1"],
        cwd=repo,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(started.exists, "git to run the post-checkout hook")
        dispatcher.send_signal(signum)
        _, stderr = dispatcher.communicate(timeout=60)
    finally:
        release.touch()
        if dispatcher.poll() is None:
            dispatcher.kill()
    assert dispatcher.returncode == 6, stderr
    name = signal.Signals(signum).name
    assert f"failed at worktree: interrupted by {name}" in stderr
    assert "task is ready" in stderr
    wait_for(finished.exists, "the hook to finish")
    assert_rolled_back(env, 1, "ready", step="worktree")
    assert_nothing_left(env, repo, 1)


# -- tmux ------------------------------------------------------------------------------------


SHIM = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = new-window ]; then
    case "$SHIM_MODE" in
      fail) echo "shim: new-window refused" >&2; exit 1 ;;
      create-then-fail) "{real}" "$@" >> "{log}"; echo "shim: lost the reply" >&2; exit 1 ;;
      silent) exit 0 ;;
    esac
  fi
done
exec "{real}" "$@"
"""


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("fail", "shim: new-window refused"),
        ("create-then-fail", "shim: lost the reply"),
        ("silent", "reported success but did not do its work"),
    ],
)
def test_a_tmux_that_fails_or_lies_about_new_window(
    cli: Cli, env: Env, repo: Path, add: Add, tmp_path: Path, mode: str, reason: str
) -> None:
    write_config(env)
    shim_dir, log = tmp_path / "shim", tmp_path / "shim.log"
    shim_dir.mkdir()
    (shim_dir / "tmux").write_text(SHIM.format(real=tmux_binary(), log=log))
    (shim_dir / "tmux").chmod(0o755)
    _user_session(env)
    add("sleeper")
    path = f"{shim_dir}{os.pathsep}{os.environ['PATH']}"
    ran = cli("run", "1", extra_env={"PATH": path, "SHIM_MODE": mode})
    assert ran.code == 6, ran.stderr
    assert "dispatch of task 1 failed at spawn" in ran.stderr
    assert reason in ran.stderr
    assert "task is ready" in ran.stderr
    if mode == "create-then-fail":
        made = log.read_text().split()
        assert len(made) == 1 and made[0].startswith("@")  # the window really was made
    assert_rolled_back(env, 1, "ready", step="spawn")
    assert_nothing_left(env, repo, 1)
    assert windows(env) == ["user"]


def test_no_acknowledgement_rolls_back_and_a_late_wrapper_starts_nothing(
    env: Env, repo: Path, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    """The window never runs the wrapper; once the dispatcher gave up, it alone decided."""
    side_effect = tmp_path / "agent-ran"
    write_config(
        env,
        agent_profile("marker", ["touch", str(side_effect)]),
        spawn_timeout=2,
    )
    terminal = Faulty(TmuxTerminal(env.socket), spawn=spawns_instead(["sleep", "60"]))
    app = make_app(terminal=terminal)
    task_id = add_task(app, "Late wrapper", prompt="p", repo=repo, agent="marker").id
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, task_id)
    assert "failed at confirm: no acknowledgement from the agent wrapper within 2s" in (
        caught.value.message
    )
    attempt = assert_rolled_back(env, task_id, "ready", step="confirm")
    assert_nothing_left(env, repo, task_id)

    late = subprocess.run(
        [sys.executable, "-m", "dispatch", "agent-exec", str(attempt["id"])],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert late.returncode == 0, late.stderr
    assert "the agent is not started" in late.stderr
    assert not side_effect.exists()
    after = attempts(env, task_id)[-1]
    assert (after["state"], after["outcome"], after["agent_pid"]) == (
        "ended",
        "dispatch-failed",
        None,
    )
    assert task(env, task_id)["status"] == "ready"


# -- agents ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [(0, "done"), (3, "failed")])
def test_the_agent_exit_decides_the_task(
    cli: Cli, env: Env, repo: Path, add: Add, code: int, status: str
) -> None:
    write_config(env, agent_profile("exiter", ["sh", "-c", f"exit {code}"]))
    add("exiter")
    ran = cli("run", "1", "--json")
    assert ran.code == 0, ran.stderr
    data = ran.json()
    assert data["task"]["id"] == 1
    assert data["attempt"]["tmux_target"].startswith("dispatch:@")
    assert wait_status(env, 1) == status
    attempt = attempts(env, 1)[-1]
    assert attempt["exit_code"] == code
    assert attempt["outcome"] == ("success" if code == 0 else "failed")
    row = task(env, 1)
    assert row["last_error"] == (None if code == 0 else f"agent failed (exit {code})")
    assert row["branch"] == "dispatch/1-fix-the-parser"
    # The agent's work is kept either way.
    assert Path(row["worktree"]).is_dir()
    assert "dispatch/1-fix-the-parser" in branches(repo)
    finished = events(env, 1, "finished")
    assert [(e["to_status"], e["detail"]["exit_code"]) for e in finished] == [(status, code)]
    # An agent this quick exits before its dispatcher has finished: the timeline still
    # says it was dispatched before it finished.
    timeline = events(env, 1)
    assert [e["kind"] for e in timeline] == ["created", "claimed", "dispatched", "finished"]
    window = data["attempt"]["tmux_target"].rpartition(":")[2]
    assert timeline[2]["attempt_id"] == attempt["id"]
    assert timeline[2]["detail"].get("window") in (None, window)


def test_a_repository_that_holds_python_modules_does_not_replace_the_wrappers(
    cli: Cli, env: Env, repo: Path, add: Add
) -> None:
    """The wrapper runs in the worktree: its modules must not come from the repository's
    tree, whatever names that uses (a project called dispatch, a `tomllib.py`)."""
    (repo / "dispatch").mkdir()
    (repo / "dispatch" / "__init__.py").write_text("")
    (repo / "dispatch" / "__main__.py").write_text("raise SystemExit('the repository ran')\n")
    (repo / "tomllib.py").write_text("raise SystemExit('the repository ran')\n")
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "modules"], check=True, capture_output=True)
    write_config(env, agent_profile("exiter", ["sh", "-c", "exit 0"]), spawn_timeout=5)
    add("exiter")
    ran = cli("run", "1", "--json")
    assert ran.code == 0, ran.stderr
    worktree = Path(ran.json()["attempt"]["worktree"])
    assert (worktree / "dispatch" / "__main__.py").is_file()  # the modules were there
    assert wait_status(env, 1) == "done"
    assert attempts(env, 1)[-1]["exit_code"] == 0


def test_a_missing_agent_binary_rolls_back_naming_the_command(
    cli: Cli, env: Env, repo: Path, add: Add
) -> None:
    write_config(env, agent_profile("ghost", ["ghost-agent-does-not-exist", "{prompt}"]))
    add("ghost")
    ran = cli("run", "1")
    assert ran.code == 6, ran.stderr
    assert "failed at confirm: agent command 'ghost-agent-does-not-exist' not found" in ran.stderr
    assert "task is ready" in ran.stderr
    assert_rolled_back(env, 1, "ready", step="confirm")
    assert_nothing_left(env, repo, 1)


DONE = [PYTHON, "-m", "dispatch", "done"]
COMMIT = ["sh", "-c", "echo change > change.txt && git add change.txt && git commit -qm change"]


@pytest.mark.parametrize(
    ("completion", "command", "status"),
    [
        ("signal", DONE, "done"),
        ("signal", ["true"], "incomplete"),
        ("commits", COMMIT, "done"),
        ("commits", ["sh", "-c", "echo uncommitted > change.txt"], "incomplete"),
    ],
    ids=["signal-done", "signal-none", "commits-one", "commits-none"],
)
def test_completion_modes(
    env: Env,
    repo: Path,
    make_app: Callable[..., App],
    completion: str,
    command: list[str],
    status: str,
) -> None:
    write_config(env, agent_profile("agent", command, completion))
    app = make_app()
    add_task(app, "Complete me", prompt="p", repo=repo, agent="agent")
    assert dispatch_task(app, 1) is not None
    assert wait_status(env, 1) == status
    attempt = attempts(env, 1)[-1]
    assert attempt["exit_code"] == 0
    assert attempt["outcome"] == ("success" if status == "done" else "incomplete")
    assert (attempt["done_signalled_at"] is not None) == (command == DONE)


NASTY_PROMPT = (
    'it\'s "quoted" $(touch pwned1) `touch pwned2` ; touch pwned3 && echo $HOME\n'
    "second line\twith a tab \\ backslash %s %d {prompt} #{window_id} ${PATH}\n"
    "ünïcødé 🚀 日本語 -- --help ;"
)


def test_the_prompt_arrives_byte_for_byte_and_nothing_is_executed(
    env: Env, repo: Path, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    out = tmp_path / "out"
    script = (
        "import sys, pathlib; out = pathlib.Path(sys.argv[1]); "
        "out.joinpath('argv').write_bytes(sys.argv[2].encode('utf-8', 'surrogateescape')); "
        "out.joinpath('file').write_bytes(pathlib.Path(sys.argv[3]).read_bytes()); "
        "out.joinpath('count').write_text(str(len(sys.argv)))"
    )
    write_config(
        env, agent_profile("echo", [PYTHON, "-c", script, str(out), "{prompt}", "{prompt_file}"])
    )
    out.mkdir()
    app = make_app()
    add_task(app, "Quote me", prompt=NASTY_PROMPT, repo=repo, agent="echo")
    assert dispatch_task(app, 1) is not None
    assert wait_status(env, 1) == "done"
    assert (out / "argv").read_bytes() == NASTY_PROMPT.encode()
    assert (out / "file").read_bytes() == NASTY_PROMPT.encode()
    assert (out / "count").read_text() == "4"  # the prompt stayed one argument
    assert list(tmp_path.rglob("pwned*")) == []


def test_a_hostile_title_gives_a_safe_branch_and_a_worktree_inside_the_root(
    cli: Cli, env: Env, repo: Path, tmp_path: Path
) -> None:
    write_config(env)
    added = cli("add", "$(touch x); ../../etc", "--agent", "sleeper", "--prompt", "p", cwd=repo)
    assert (added.code, added.stdout) == (0, "1\n"), added.stderr
    ran = cli("run", "1", "--json", cwd=repo)
    assert ran.code == 0, ran.stderr
    attempt = ran.json()["attempt"]
    assert attempt["branch"] == "dispatch/1-touch-x-etc"
    root = (env.home / "worktrees").resolve()
    worktree = Path(attempt["worktree"])
    assert worktree == root / "repo" / "task-1"
    assert worktree.resolve().is_relative_to(root)
    assert worktree_list(repo) == [str(worktree)]
    assert "dispatch/1-touch-x-etc" in branches(repo)
    assert list(tmp_path.rglob("x")) == []
    assert windows(env) == ["t1"]


# -- run --next ---------------------------------------------------------------------------------


def _started_ids(stdout: str) -> list[int]:
    return [item["task"]["id"] for item in json.loads(stdout)]


def test_run_next_takes_the_highest_priority_first(
    env: Env, add: Add, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(env)
    for title, priority in (("low", 0), ("high", 5), ("middle", 1), ("high too", 5)):
        add("sleeper", title, priority)
    code, out, err = run_cli(capsys, "run", "--next", "--json")
    assert code == 0, err
    assert _started_ids(out) == [2]  # priority 5, the older of the two; --max is 1
    code, out, err = run_cli(capsys, "run", "--next", "--max", "2", "--json")
    assert code == 0, err
    assert _started_ids(out) == [4, 3]
    assert [task(env, i)["status"] for i in (1, 2, 3, 4)] == [
        "ready",
        "in-progress",
        "in-progress",
        "in-progress",
    ]
    assert sorted(windows(env)) == ["t2", "t3", "t4"]


def test_run_next_respects_max_running(
    env: Env, add: Add, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(env, max_running=2)
    for n in range(3):
        add("sleeper", f"task {n}")
    code, out, err = run_cli(capsys, "run", "--next", "--max", "3", "--json")
    assert code == 0, err
    assert _started_ids(out) == [1, 2]
    assert "max_running" in err
    code, out, err = run_cli(capsys, "run", "--next")
    assert code == 0, err
    assert "nothing to dispatch" in err and "max_running" in err
    assert task(env, 3)["status"] == "ready"
    assert sorted(windows(env)) == ["t1", "t2"]


def test_run_next_does_not_retry_a_broken_task_in_the_same_run(
    env: Env, add: Add, capsys: pytest.CaptureFixture[str]
) -> None:
    """One broken task must not use up its failure allowance at once, nor block the queue."""
    write_config(env, agent_profile("ghost", ["ghost-agent-xyz"]))
    add("ghost", "broken", 9)
    add("sleeper", "fine")
    code, out, err = run_cli(capsys, "run", "--next", "--max", "3", "--json")
    assert code == 6, err
    assert _started_ids(out) == [2]
    assert "dispatch of task 1 failed at confirm: agent command 'ghost-agent-xyz'" in err
    assert task(env, 1)["status"] == "ready"
    assert task(env, 1)["dispatch_failures"] == 1
    assert len(attempts(env, 1)) == 1
    assert windows(env) == ["t2"]


def test_run_next_with_nothing_ready(
    env: Env, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(env)
    code, out, err = run_cli(capsys, "run", "--next", "--json")
    assert code == 0, err
    assert json.loads(out) == []
    assert "nothing ready" in err


def test_redispatch_after_the_worktree_directory_was_deleted_by_hand(
    env: Env, repo: Path, make_app: Callable[..., App], git: Callable[..., str]
) -> None:
    """A stale worktree entry must not block the redispatch; the branch's work comes back."""
    write_config(env, committer_profile(line="$$"))
    app = make_app()
    add_task(app, "Commit then fail", prompt="p", repo=repo, agent="committer")
    first = dispatch_task(app, 1)
    assert first is not None
    assert wait_status(env, 1) == "failed"
    worktree = Path(first.attempt.worktree or "")
    shutil.rmtree(worktree)
    assert worktree_list(repo) == [str(worktree)]  # git still lists it

    second = redispatch(app, 1)
    assert second.attempt.worktree == str(worktree)
    assert wait_status(env, 1, leaving="in-progress") == "failed"
    assert attempts(env, 1)[-1]["exit_code"] == 1
    log = git(repo, "log", "--format=%s", "dispatch/1-commit-then-fail").split()
    assert log == ["work", "work", "initial"]  # the first commit survived, a second was made
    assert len((worktree / "work.txt").read_text().split()) == 2


def test_the_window_opens_in_the_configured_session_on_the_test_socket(
    env: Env, add: Add, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(env, '\n[tmux]\nsession = "work"\n')
    add("sleeper")
    code, out, err = run_cli(capsys, "run", "1", "--json")
    assert code == 0, err
    session, window = json.loads(out)["attempt"]["tmux_target"].split(":")
    assert session == "work"
    assert window.startswith("@")
    listed = tmux(env, "list-windows", "-t", "=work", "-F", "#{window_id} #{window_name}")
    assert listed.stdout.splitlines() == [f"{window} t1"]
