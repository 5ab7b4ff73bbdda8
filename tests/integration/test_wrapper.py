"""The agent wrapper (`dispatch agent-exec`) in a real tmux window, around real agents."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.app import App
from dispatch.errors import Conflict, DispatchFailed
from dispatch.services.dispatching import DispatchResult, dispatch_task, redispatch
from dispatch.services.sweep import sweep
from dispatch.services.tasks import add_task
from tests.conftest import Env, tmux, windows
from tests.faults import (
    PYTHON,
    agent_profile,
    assert_nothing_left,
    assert_rolled_back,
    attempts,
    events,
    task,
    wait_for,
    wait_status,
    write_config,
)

Start = Callable[..., DispatchResult]

# An agent that says it is ready, then waits for `release-<attempt>` and exits with argv[2].
WAITER = (
    "import pathlib, sys, time\n"
    "out = pathlib.Path(sys.argv[1])\n"
    "out.joinpath('ready-' + sys.argv[3]).touch()\n"
    "while not out.joinpath('release-' + sys.argv[3]).exists(): time.sleep(0.05)\n"
    "sys.exit(int(sys.argv[2]))\n"
)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def start(repo: Path, make_app: Callable[..., App]) -> Start:
    """Add a task for `agent` and dispatch it (after the test wrote its config)."""

    def start(agent: str, prompt: str = "Do the thing.") -> DispatchResult:
        app = make_app()
        task_id = add_task(app, "Wrapped", prompt=prompt, repo=repo, agent=agent).id
        result = dispatch_task(app, task_id)
        assert result is not None
        return result

    return start


def test_the_agent_gets_its_argv_environment_and_directory(
    env: Env, out: Path, start: Start
) -> None:
    script = (
        "import json, os, sys\n"
        "names = ['DISPATCH_TASK_ID', 'DISPATCH_ATTEMPT_ID', 'DISPATCH_DB',"
        " 'DISPATCH_WORKTREE', 'DISPATCH_BRANCH']\n"
        "data = {'argv': sys.argv[2:], 'cwd': os.getcwd(),"
        " 'env': {n: os.environ.get(n) for n in names}}\n"
        "open(sys.argv[1], 'w').write(json.dumps(data))\n"
    )
    command = [
        PYTHON,
        "-c",
        script,
        str(out / "seen.json"),
        "{prompt}",
        "{prompt_file}",
        "{task_id}",
        "{attempt_id}",
        "{worktree}",
        "{branch}",
        "{session_id}",
        "t{task_id}-a{attempt_id}",
    ]
    write_config(env, agent_profile("probe", command))
    result = start("probe", prompt="two words")
    assert wait_status(env, 1) == "done"
    seen = json.loads((out / "seen.json").read_text())
    attempt = attempts(env, 1)[-1]
    worktree, branch = attempt["worktree"], attempt["branch"]
    prompt_file = str(env.home / "attempts" / str(attempt["id"]) / "prompt.md")
    assert seen["argv"] == [
        "two words",
        prompt_file,
        "1",
        str(attempt["id"]),
        worktree,
        branch,
        attempt["session_id"],
        f"t1-a{attempt['id']}",
    ]
    assert Path(prompt_file).read_text() == "two words"
    assert os.path.samefile(seen["cwd"], worktree)
    assert seen["env"] == {
        "DISPATCH_TASK_ID": "1",
        "DISPATCH_ATTEMPT_ID": str(attempt["id"]),
        "DISPATCH_DB": os.environ.get("DISPATCH_DB", f"sqlite:///{env.db_path}"),
        "DISPATCH_WORKTREE": worktree,
        "DISPATCH_BRANCH": branch,
    }
    assert result.attempt.agent_pid is not None


def test_the_pane_is_logged_and_heartbeats_come(env: Env, out: Path, start: Start) -> None:
    script = "import sys; print('hello from the agent', flush=True); exec(sys.argv[4])"
    write_config(env, agent_profile("talker", [PYTHON, "-c", script, str(out), "0", "1", WAITER]))
    result = start("talker")
    log = env.home / "logs" / f"attempt-{result.attempt.id}.log"
    wait_for(lambda: log.exists() and "hello from the agent" in log.read_text(), "the pane log")
    first = attempts(env, 1)[-1]["heartbeat_at"]
    assert first is not None  # set by the acknowledgement
    wait_for(lambda: attempts(env, 1)[-1]["heartbeat_at"] > first, "a heartbeat")
    (out / "release-1").touch()
    assert wait_status(env, 1) == "done"
    wait_for(lambda: "t1" not in windows(env), "the window to close")
    assert "hello from the agent" in log.read_text()  # kept after the window is gone


def test_sigterm_to_the_wrapper_reaches_the_agent_and_interrupts(
    env: Env, out: Path, start: Start
) -> None:
    script = (
        "import pathlib, signal, sys, time\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "def stop(n, f):\n"
        "    out.joinpath('got').write_text(signal.Signals(n).name); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "out.joinpath('ready').touch()\n"
        "time.sleep(60)\n"
    )
    write_config(env, agent_profile("polite", [PYTHON, "-c", script, str(out)]))
    start("polite")
    wait_for((out / "ready").exists, "the agent to start")
    wrapper_pid = attempts(env, 1)[-1]["wrapper_pid"]
    os.kill(wrapper_pid, signal.SIGTERM)
    assert wait_status(env, 1) == "interrupted"
    assert (out / "got").read_text() == "SIGTERM"
    attempt = attempts(env, 1)[-1]
    assert (attempt["state"], attempt["outcome"], attempt["exit_code"]) == (
        "ended",
        "interrupted",
        0,
    )
    assert task(env, 1)["last_error"] == "agent interrupted (exit 0)"


def test_closing_the_window_hangs_up_the_agent_and_interrupts(env: Env, start: Start) -> None:
    write_config(env)
    start("sleeper")
    assert tmux(env, "kill-window", "-t", "=dispatch:t1").returncode == 0
    assert wait_status(env, 1) == "interrupted"
    attempt = attempts(env, 1)[-1]
    assert attempt["outcome"] == "interrupted"
    assert attempt["exit_code"] == 128 + signal.SIGHUP


def test_an_agent_that_cannot_be_executed_rolls_the_dispatch_back(
    env: Env, repo: Path, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    """It passes the PATH check but exec fails (no #! line): the wrapper hands back."""
    bad = tmp_path / "bad-agent"
    bad.write_bytes(b"\x7fELF-not-really")
    bad.chmod(0o755)
    write_config(env, agent_profile("bad", [str(bad)]))
    app = make_app()
    add_task(app, "Bad agent", prompt="p", repo=repo, agent="bad")
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, 1)
    assert f"failed at confirm: cannot start agent command '{bad}'" in caught.value.message
    assert "Exec format error" in caught.value.message
    assert_rolled_back(env, 1, "ready", step="confirm")
    assert_nothing_left(env, repo, 1)


def test_a_superseded_wrapper_records_its_exit_but_never_the_task(
    env: Env, out: Path, make_app: Callable[..., App], start: Start
) -> None:
    """Reaped by another host's sweep, then redispatched: the old agent's exit is fenced."""
    write_config(
        env, agent_profile("waiter", [PYTHON, "-c", WAITER, str(out), "0", "{attempt_id}"])
    )
    first = start("waiter").attempt.id
    wait_for((out / f"ready-{first}").exists, "the first agent")

    elsewhere = make_app()
    elsewhere.settings = elsewhere.settings.with_overrides(host="another-host")
    report = sweep(elsewhere, stale_after=0)
    assert [(r.task_id, r.attempt_id) for r in report.reaped] == [(1, first)]
    assert task(env, 1)["status"] == "interrupted"

    # Here, where the first agent still runs, a second one would share its worktree.
    with pytest.raises(Conflict, match=r"processes \d+ of attempt 1 are still running"):
        redispatch(make_app(), 1)
    assert [a["id"] for a in attempts(env, 1)] == [first]

    second = redispatch(elsewhere, 1).attempt.id
    wait_for((out / f"ready-{second}").exists, "the second agent")
    (out / f"release-{first}").touch()
    wait_for(lambda: events(env, 1, "late-exit"), "the first wrapper's late exit")
    row = task(env, 1)
    assert (row["status"], row["current_attempt_id"]) == ("in-progress", second)
    old = attempts(env, 1)[0]
    assert (old["outcome"], old["exit_code"]) == ("interrupted", 0)
    assert [e["kind"] for e in events(env, 1) if e["attempt_id"] == first][-1] == "late-exit"

    (out / f"release-{second}").touch()
    assert wait_status(env, 1) == "done"
    assert attempts(env, 1)[-1]["outcome"] == "success"
