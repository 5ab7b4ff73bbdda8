"""`cancelled` means stopped: every process of the agent is gone, wherever its window is."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatch.errors import Conflict
from dispatch.services import control
from dispatch.services.control import attach_argv
from dispatch.services.dispatching import dispatch_task
from dispatch.store import statements as st
from tests.conftest import TMUX, Cli, Env, MakeApp, Result, tmux, windows
from tests.integration.recovery_helpers import (
    DEAF,
    alive,
    attempt_row,
    events_of,
    execute,
    in_worktree,
    new_task,
    running,
    seed_attempt,
    settled,
    signal_quietly,
    sleepers,
    task_row,
    terminal_events,
    wait_for,
)


def _start(make_app: MakeApp, repo: Path, env: Env, prompt: str) -> tuple[int, dict[str, Any]]:
    app = make_app()
    task_id = new_task(app, repo, prompt)
    dispatch_task(app, task_id)
    attempt = dict(wait_for(lambda: running(env, task_id), "the agent to start"))
    wait_for(lambda: sleepers(attempt["worktree"]), "the agent's child to start")
    return task_id, attempt


def _assert_cancelled(env: Env, task_id: int, attempt: dict[str, Any], cancel: Result) -> None:
    assert cancel.code == 0, cancel.stderr
    assert f"task {task_id} is cancelled" in cancel.stderr
    # The wrapper, whose directory the worktree is too, prints its last line and exits.
    wait_for(lambda: f"t{task_id}" not in windows(env), "the wrapper to exit")
    assert in_worktree(attempt["worktree"]) == set()
    assert task_row(env, task_id)["status"] == "cancelled"
    assert attempt_row(env, attempt["id"])["outcome"] == "cancelled"
    assert len(terminal_events(env, task_id)) == 1


def test_cancel_ends_the_children_that_ignore_every_signal(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app, repo, env, DEAF)
    children = sleepers(attempt["worktree"])

    cancel = cli("cancel", str(task_id))

    _assert_cancelled(env, task_id, attempt, cancel)
    assert not any(alive(pid) for pid in children)
    assert f"t{task_id}" not in windows(env)


def test_cancel_finds_the_window_on_the_attempts_own_tmux_server(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app, repo, env, DEAF)

    # cron, say, with another socket in its environment than the shell that ran it
    cancel = cli("cancel", str(task_id), extra_env={"DISPATCH_TMUX_SOCKET": "elsewhere-socket"})

    _assert_cancelled(env, task_id, attempt, cancel)
    assert f"t{task_id}" not in windows(env)  # the attempt's own server's window is gone
    assert tmux(env, "-L", "elsewhere-socket", "list-sessions").returncode != 0


KILL_CALLER_SHIM = """#!/bin/sh
"{real}" "$@" || exit $?
for arg in "$@"; do
  case "$arg" in
    new-window|new-session) kill -9 $PPID; exit 0 ;;
  esac
done
"""


def test_a_window_whose_id_was_never_recorded_is_found_attached_and_cancelled(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, tmp_path: Path
) -> None:
    """The dispatcher dies right after tmux made the window: the attempt runs unrecorded."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "tmux").write_text(KILL_CALLER_SHIM.format(real=TMUX))
    (shim / "tmux").chmod(0o755)
    app = make_app()
    task_id = new_task(app, repo, DEAF)
    path = f"{shim}{os.pathsep}{os.environ['PATH']}"

    ran = cli("run", str(task_id), extra_env={"PATH": path})

    assert ran.code == -9
    attempt = dict(wait_for(lambda: running(env, task_id), "the orphaned agent to start"))
    assert attempt["tmux_target"] is None
    wait_for(lambda: sleepers(attempt["worktree"]), "the agent's child to start")
    argv = attach_argv(make_app(), task_id)
    [window] = tmux(env, "list-windows", "-a", "-F", "#{window_id}").stdout.split()
    assert argv[-2:] == ["-t", window]

    cancel = cli("cancel", str(task_id))

    _assert_cancelled(env, task_id, attempt, cancel)
    assert windows(env) == []


def test_what_an_agent_leaves_running_ends_with_it(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    # The agent starts a deaf background job and exits 0 at once.
    task_id = new_task(app, repo, f"({DEAF}) & sleep 0.5; exit 0")
    dispatch_task(app, task_id)
    worktree = str(wait_for(lambda: attempt_row_of(env, task_id), "the attempt")["worktree"])

    assert wait_for(lambda: settled(env, task_id), "the agent to finish", timeout=20) == "done"

    wait_for(lambda: f"t{task_id}" not in windows(env), "the wrapper to exit")
    assert in_worktree(worktree) == set()
    assert len(events_of(env, task_id, "finished")) == 1


# A deaf child started with an emptied environment: it carries none of the attempt's
# variables, only its descent from the agent (and its working directory, the witness).
UNMARKED = f"env -i /bin/sh -c '{DEAF}'"


def test_cancel_ends_a_child_that_carries_none_of_the_attempts_variables(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id, attempt = _start(make_app, repo, env, f"{UNMARKED} & wait")
    children = sleepers(attempt["worktree"])
    [child] = children
    assert b"DISPATCH_ATTEMPT_ID" not in Path(f"/proc/{child}/environ").read_bytes()

    cancel = cli("cancel", str(task_id))

    _assert_cancelled(env, task_id, attempt, cancel)
    assert not alive(child)


def _deaf_sleepers(worktree: str) -> set[int]:
    """DEAF's `sleep 300`, not the agent's own `sleep 2`."""
    return {
        p
        for p in sleepers(worktree)
        if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x00300\x00"
    }


def test_what_an_agent_orphans_with_an_emptied_environment_ends_with_it(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    """The agent exits at once: its unmarked child is orphaned, adopted by the wrapper
    (not by init), and stopped before the attempt is recorded as ended."""
    app = make_app()
    task_id = new_task(app, repo, f"{UNMARKED} & sleep 2; exit 0")
    dispatch_task(app, task_id)
    worktree = str(wait_for(lambda: attempt_row_of(env, task_id), "the attempt")["worktree"])
    [child] = wait_for(lambda: _deaf_sleepers(worktree), "the orphan to start")

    assert wait_for(lambda: settled(env, task_id), "the agent to finish", timeout=20) == "done"

    wait_for(lambda: f"t{task_id}" not in windows(env), "the wrapper to exit")
    assert not alive(child)
    assert in_worktree(worktree) == set()


def test_a_recorded_wrapper_pid_that_runs_something_else_adopts_nothing(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    """Pids are reused: the descendants of whatever now has the wrapper's pid are not the
    attempt's unless that process still runs this attempt's wrapper."""
    app = make_app()
    attempt_id = seed_attempt(app, new_task(app, repo))
    stranger = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
    try:
        wait_for(lambda: _children_of(stranger.pid), "the stranger's child to start")
        execute(env, "UPDATE attempts SET wrapper_pid = ? WHERE id = ?", stranger.pid, attempt_id)
        attempt = app.direct.read(lambda tx: st.get_attempt(tx, attempt_id))

        assert control.agent_processes(app, attempt) == set()
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()


def _children_of(pid: int) -> set[int]:
    return {
        int(name) for name in os.listdir("/proc") if name.isdigit() and _parent(int(name)) == pid
    }


def _zombie_children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        try:
            state, parent = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(parent) == pid and state == "Z":
            found.add(int(name))
    return found


def test_the_wrapper_collects_the_orphans_it_adopted_as_they_end(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    """Adopting orphans makes their exits the wrapper's to collect: none stays a zombie
    for as long as the agent runs."""
    app = make_app()
    # Three children orphaned at once (their subshell exits), each ending a second later.
    task_id = new_task(app, repo, "(sleep 1 & sleep 1 & sleep 1 &); sleep 300")
    dispatch_task(app, task_id)
    attempt = dict(wait_for(lambda: running(env, task_id), "the agent to start"))
    wrapper = attempt["wrapper_pid"]

    def adopted() -> set[int]:
        return {
            int(name)
            for name in os.listdir("/proc")
            if name.isdigit()
            and Path(f"/proc/{name}/stat").exists()
            and _parent(int(name)) == wrapper
            and Path(f"/proc/{name}/cmdline").read_bytes() == b"sleep\x001\x00"
        }

    wait_for(adopted, "the orphans to be adopted by the wrapper")
    wait_for(lambda: not adopted(), "the orphans to end", timeout=10)
    time.sleep(0.5)  # more than the wrapper's 0.2 s between looks

    assert _zombie_children(wrapper) == set()
    assert cli("cancel", str(task_id)).code == 0


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def attempt_row_of(env: Env, task_id: int) -> dict[str, Any] | None:
    current = task_row(env, task_id)["current_attempt_id"]
    return dict(attempt_row(env, current)) if current else None


@contextlib.contextmanager
def _orphaned(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> Iterator[tuple[int, dict[str, Any], set[int]]]:
    """A deaf agent whose wrapper was killed outright: its window closes, the sweep calls
    the task interrupted (rightly: the wrapper is gone), and the agent works on. Whatever
    still works in the worktree is killed afterwards."""
    task_id, attempt = _start(make_app, repo, env, DEAF)
    try:
        os.kill(attempt["wrapper_pid"], 9)
        wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")
        assert cli("sweep").code == 0
        assert task_row(env, task_id)["status"] == "interrupted"
        left = sleepers(attempt["worktree"])
        assert left  # deaf to the hangup: still working in the worktree
        yield task_id, attempt, left
    finally:
        for pid in in_worktree(attempt["worktree"]):
            signal_quietly(pid, signal.SIGKILL)


def test_redispatch_refuses_while_the_last_attempts_processes_run(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    with _orphaned(cli, make_app, repo, env) as (task_id, attempt, left):
        refused = cli("redispatch", str(task_id))

        assert refused.code == 3, refused.stderr
        assert f"of attempt {attempt['id']} are still running" in refused.stderr
        assert f"stop them: `dispatch cancel {task_id}`" in refused.stderr
        assert events_of(env, task_id, "redispatched") == []
        # Nor through a reset: neither `run` of the task nor `run --next` starts a second agent.
        assert cli("reset", str(task_id)).code == 0
        named = cli("run", str(task_id))
        assert named.code == 3, named.stderr
        assert f"of attempt {attempt['id']} are still running" in named.stderr
        assert "stop them: kill " in named.stderr  # a cancel would cancel the ready task
        picked = cli("run", "--next")
        assert picked.code == 6, picked.stderr
        assert f"of attempt {attempt['id']} are still running" in picked.stderr
        assert "rolled back, task is ready" in picked.stderr
        assert task_row(env, task_id)["status"] == "ready"
        assert [e["attempt_id"] for e in events_of(env, task_id, "dispatched")] == [attempt["id"]]
        assert sleepers(attempt["worktree"]) == left
        for pid in left:
            os.kill(pid, 9)
        wait_for(lambda: not sleepers(attempt["worktree"]), "the leftovers to die")
        again = cli("run", str(task_id))
        assert again.code == 0, again.stderr


def test_cancel_stops_what_an_ended_attempt_left_running(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    with _orphaned(cli, make_app, repo, env) as (task_id, attempt, left):
        cancel = cli("cancel", str(task_id))

        assert cancel.code == 0, cancel.stderr
        said = cancel.stderr.removeprefix("stopped processes ")
        pids, _, rest = said.partition(" of attempt ")
        assert rest == (
            f"{attempt['id']}, which ran on after it ended; task {task_id} is interrupted\n"
        )
        assert left <= {int(pid) for pid in pids.split()}
        assert in_worktree(attempt["worktree"]) == set()
        assert task_row(env, task_id)["status"] == "interrupted"  # how the attempt ended
        [stopped] = events_of(env, task_id, "leftovers-stopped")
        assert stopped["attempt_id"] == attempt["id"]
        detail = json.loads(stopped["detail"])
        assert (detail["pids"], detail["still_running"]) == (sorted(map(int, pids.split())), [])
        # With nothing left, the status graph answers as before: an interrupted task
        # is not cancelled.
        again = cli("cancel", str(task_id))
        assert again.code == 3, again.stderr
        assert "interrupted" in again.stderr
        assert len(events_of(env, task_id, "leftovers-stopped")) == 1
        assert cli("redispatch", str(task_id)).code == 0  # no longer refused


FREEZER = Path("/sys/fs/cgroup/freezer")


@contextlib.contextmanager
def frozen(pids: set[int]) -> Iterator[None]:
    """The processes frozen by the cgroup freezer, which tmux cannot undo (as it does a
    SIGSTOP): no signal takes effect on them until they are thawed."""
    group = FREEZER / f"dispatch-test-{uuid.uuid4().hex[:10]}"
    group.mkdir()
    try:
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (group / "freezer.state").read_text().strip() == "FROZEN", "the freeze")
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        wait_for(lambda: _emptied(group), "the freezer group to empty")


def _emptied(group: Path) -> bool:
    """Move what is left in the group back to the root and remove it; False while a
    member (one exiting, or a child forked meanwhile) keeps it busy."""
    for member in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            (FREEZER / "cgroup.procs").write_text(member)
    try:
        group.rmdir()
    except OSError:
        return False
    return True


@pytest.mark.one_backend  # about processes and hosts, whatever the database
def test_cancel_leaves_alone_what_an_attempt_of_another_host_left(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    """Another host's processes are not seen from here: the pids found here would be
    someone else's. The status graph answers, and nothing is signalled."""
    with _orphaned(cli, make_app, repo, env) as (task_id, attempt, left):
        execute(env, "UPDATE attempts SET host = 'elsewhere' WHERE id = ?", attempt["id"])
        refused = cli("cancel", str(task_id))
        assert refused.code == 3, refused.stderr
        assert refused.stderr.startswith(f"dispatch: error: task {task_id} is interrupted")
        assert sleepers(attempt["worktree"]) == left
        assert events_of(env, task_id, "leftovers-stopped") == []


@pytest.mark.one_backend
def test_cancel_of_a_reset_task_also_stops_what_its_last_attempt_left(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    with _orphaned(cli, make_app, repo, env) as (task_id, attempt, _left):
        assert cli("reset", str(task_id)).code == 0
        cancel = cli("cancel", str(task_id))
        assert cancel.code == 0, cancel.stderr
        assert cancel.stderr.endswith(f"; task {task_id} is cancelled\n")
        assert in_worktree(attempt["worktree"]) == set()
        assert task_row(env, task_id)["status"] == "cancelled"
        assert len(events_of(env, task_id, "leftovers-stopped")) == 1


@pytest.mark.one_backend
@pytest.mark.skipif(
    not (FREEZER / "cgroup.procs").exists() or os.geteuid() != 0,
    reason="needs the cgroup v1 freezer, as root",
)
def test_cancel_says_which_leftovers_outlived_sigkill(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "STOP_GRACE_SECONDS", 0.2)
    with _orphaned(cli, make_app, repo, env) as (task_id, attempt, _left):
        agent = in_worktree(attempt["worktree"])

        with frozen(agent):
            with pytest.raises(Conflict) as refused:
                control.cancel_task(make_app(), task_id)

            pids = " ".join(map(str, sorted(agent)))
            assert refused.value.message.endswith(f"; processes {pids} still run")
            assert task_row(env, task_id)["status"] == "interrupted"
            [stopped] = events_of(env, task_id, "leftovers-stopped")
            assert json.loads(stopped["detail"])["still_running"] == sorted(agent)

        # Thawed, the SIGKILL already sent takes effect.
        wait_for(lambda: not in_worktree(attempt["worktree"]), "the leftovers to die")


@pytest.mark.one_backend  # what it proves is about processes, whatever the database
@pytest.mark.skipif(
    not (FREEZER / "cgroup.procs").exists() or os.geteuid() != 0,
    reason="needs the cgroup v1 freezer, as root",
)
def test_a_cancel_that_cannot_stop_the_agent_says_so_and_leaves_it_in_progress(
    make_app: MakeApp, repo: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "CANCEL_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(control, "KILL_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(control, "STOP_GRACE_SECONDS", 0.2)
    task_id, attempt = _start(make_app, repo, env, DEAF)
    agent = in_worktree(attempt["worktree"])

    with frozen(agent):
        view = control.cancel_task(make_app(), task_id)

        assert view.task.status == "in-progress"
        [notice] = view.notices
        assert f"cancel requested; attempt {attempt['id']} processes" in notice
        assert "of its agent are still running" in notice
        assert in_worktree(attempt["worktree"]) == agent
        assert attempt_row(env, attempt["id"])["cancel_requested_at"] is not None
        assert terminal_events(env, task_id) == []

    # Thawed, the signals already sent take effect and the wrapper records the end.
    wait_for(lambda: settled(env, task_id) == "cancelled", "the cancel to land")
    wait_for(lambda: f"t{task_id}" not in windows(env), "the wrapper to exit")
    assert in_worktree(attempt["worktree"]) == set()
    assert len(terminal_events(env, task_id)) == 1
