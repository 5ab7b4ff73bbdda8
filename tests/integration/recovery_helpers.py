"""Shared set-up for the sweep and recovery tests: tasks, rows, windows, waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.lifecycle import Status
from dispatch.services.naming import branch_name, worktree_path
from dispatch.services.tasks import add_task
from dispatch.store.models import Attempt, Task
from tests import witness
from tests.conftest import Env, tmux
from tests.faults import wait_for as wait_for  # one poller for every test module
from tests.orm import orm_write


def rows(env: Env, query: str, *params: Any) -> list[Any]:
    """Read the database directly, as an independent witness (either backend)."""
    return witness.rows(env, query, *params)


def execute(env: Env, statement: str, *params: Any) -> None:
    """Change the database behind dispatch's back (a stale heartbeat, an expired lease)."""
    witness.execute(env, statement, *params)


def db_time(moment: datetime) -> str:
    """A UTC datetime as dispatch stores it in SQLite (naive UTC)."""
    return moment.replace(tzinfo=None).isoformat(sep=" ")


def hours_ago(hours: float = 1.0) -> str:
    return db_time(utcnow() - timedelta(hours=hours))


def task_row(env: Env, task_id: int) -> Any:
    return rows(env, "SELECT * FROM tasks WHERE id = ?", task_id)[0]


def attempt_row(env: Env, attempt_id: int) -> Any:
    return rows(env, "SELECT * FROM attempts WHERE id = ?", attempt_id)[0]


def attempts_of(env: Env, task_id: int) -> list[Any]:
    return rows(env, "SELECT * FROM attempts WHERE task_id = ? ORDER BY id", task_id)


def events_of(env: Env, task_id: int, kind: str | None = None) -> list[Any]:
    if kind is None:
        return rows(env, "SELECT * FROM events WHERE task_id = ? ORDER BY id", task_id)
    return rows(
        env, "SELECT * FROM events WHERE task_id = ? AND kind = ? ORDER BY id", task_id, kind
    )


def terminal_events(env: Env, task_id: int) -> list[Any]:
    """Events that took the task out of in-progress: exactly one per attempt that ended it."""
    return rows(
        env,
        "SELECT * FROM events WHERE task_id = ? AND from_status = 'in-progress' ORDER BY id",
        task_id,
    )


def dump(env: Env) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every dispatch table, to compare before and after."""
    return {
        table: [tuple(r) for r in rows(env, f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("tasks", "attempts", "events", "agent_sessions")
    }


def new_task(
    app: App, repo: Path, prompt: str = "sleep 30", *, agent: str = "shell", title: str = "job"
) -> int:
    return add_task(app, title, prompt=prompt, repo=repo, agent=agent).id


def seed_attempt(
    app: App,
    task_id: int,
    *,
    state: str = "running",
    host: str | None = None,
    target: str | None = None,
    heartbeat: datetime | None = None,
    lease: datetime | None = None,
    dispatcher_pid: int | None = None,
    started: datetime | None = None,
    intent: dict[str, Any] | None = None,
    socket: str | None = None,
    prior: str = "ready",
) -> int:
    """An attempt row and its task in-progress, as a dispatch would have left them."""

    def work(s: Any) -> int:
        task = s.get(Task, task_id)
        number = len(s.scalars(select(Attempt).where(Attempt.task_id == task_id)).all()) + 1
        attempt = Attempt(
            task_id=task_id,
            number=number,
            state=state,
            prior_status=prior,
            host=host or app.settings.host,
            dispatcher_pid=dispatcher_pid,
            tmux_session=app.settings.tmux_session,
            tmux_socket=app.settings.tmux_socket if socket is None else socket,
            tmux_target=target,
            worktree=(intent or {}).get("worktree"),
            branch=(intent or {}).get("branch"),
            intent=intent or {},
            heartbeat_at=heartbeat,
            lease_expires_at=lease,
            started_at=started or utcnow() - timedelta(minutes=5),
        )
        s.add(attempt)
        s.flush()
        task.status = Status.IN_PROGRESS.value
        task.current_attempt_id = attempt.id
        return int(attempt.id)

    return orm_write(app.db, work)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def open_window(env: Env, name: str, *command: str, session: str = "dispatch") -> str:
    """A window on the test's tmux server running command; its id ("@N")."""
    has = tmux(env, "has-session", "-t", f"={session}")
    verb = (
        ["new-window", "-d", "-t", f"={session}:"]
        if has.returncode == 0
        else ["new-session", "-d", "-s", session]
    )
    done = tmux(env, *verb, "-n", name, "-P", "-F", "#{window_id}", "--", *command)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def window_ids(env: Env) -> list[str]:
    done = tmux(env, "list-windows", "-a", "-F", "#{window_id}")
    return done.stdout.split() if done.returncode == 0 else []


def signal_quietly(pid: int | None, signum: int) -> None:
    if pid:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def resume_process(pid: int | None) -> None:
    signal_quietly(pid, signal.SIGCONT)


def dispatch_process(env: Env, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`dispatch ARGS` in the background, in its own process group (killable as a whole)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dispatch", *args],
        cwd=cwd or env.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def running(env: Env, task_id: int) -> Any:
    """The task's current attempt once its wrapper has started the agent."""
    found = rows(
        env,
        "SELECT a.* FROM attempts a JOIN tasks t ON t.current_attempt_id = a.id "
        "WHERE t.id = ? AND a.state = 'running' AND a.agent_pid IS NOT NULL",
        task_id,
    )
    return found[0] if found else None


def run_all(cli: Callable[..., Any], *calls: tuple[str, ...]) -> list[Any]:
    """Independent `dispatch` commands side by side (each is its own process), in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: cli(*args), calls))


def settled(env: Env, task_id: int) -> str | None:
    """The task's status once it is no longer in-progress."""
    status = str(task_row(env, task_id)["status"])
    return None if status == "in-progress" else status


def made_worktree(app: App, git: Callable[..., str], repo: Path, task_id: int) -> dict[str, Any]:
    """A worktree and branch made as a dispatch makes them, and the intent it records."""
    path = worktree_path(app.settings.worktree_root, str(repo), task_id)
    branch = branch_name(task_id, "job")
    path.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--no-track", "-b", branch, str(path), "main")
    return {
        "repo": str(repo),
        "base": "main",
        "branch": branch,
        "branch_existed": False,
        "worktree": str(path),
        "worktree_existed": False,
    }


def crashed_dispatch(
    app: App, git: Callable[..., str], repo: Path, **extra: Any
) -> tuple[int, int, dict[str, Any]]:
    """A task whose dispatcher died mid-saga, its lease run out, after it made the
    worktree and branch its intent names: the task, its attempt and the intent."""
    task_id = new_task(app, repo)
    intent = made_worktree(app, git, repo, task_id)
    values: dict[str, Any] = {
        "state": "starting",
        "lease": utcnow() - timedelta(minutes=1),
        "dispatcher_pid": dead_pid(),
    }
    values.update(extra)
    return task_id, seed_attempt(app, task_id, intent=intent, **values), intent


# An agent's shell deaf to every polite signal, whose `sleep` inherits the deafness:
# what build tools and language servers under a real agent often are, and an agent
# that outlives a wrapper killed outright.
DEAF = 'trap "" TERM INT HUP; sleep 300'


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for whoever inherited it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def in_worktree(worktree: str | Path) -> set[int]:
    """Live processes whose working directory is in the worktree, also once it has been
    deleted under them: a witness independent of dispatch."""
    root = str(worktree)
    found = set()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{name}/cwd").removesuffix(" (deleted)")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + os.sep)) and alive(int(name)):
            found.add(int(name))
    return found


def sleepers(worktree: str | Path) -> set[int]:
    """The `sleep` processes (an agent's, once it has exec'd) working in the worktree."""
    found = set()
    for pid in in_worktree(worktree):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep":
                found.add(pid)
        except OSError:
            continue
    return found
