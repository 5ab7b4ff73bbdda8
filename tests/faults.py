"""Fault injection at the adapter seams, and what the dispatch tests check afterwards.

`Faulty(real, add=...)` wraps a real adapter (GitWorktrees, TmuxTerminal) and replaces
some of its methods; a replacement receives the real method first, so a fault can act
before, instead of, or after the real work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dispatch.errors import ToolFailed
from tests.conftest import BASE_CONFIG, Env, windows

T = TypeVar("T")
Fault = Callable[..., Any]
PYTHON = sys.executable


class Faulty:
    """A real adapter with some methods replaced by faults."""

    def __init__(self, real: Any, **faults: Fault) -> None:
        # A fault named after no method of the adapter would silently never fire.
        unknown = sorted(n for n in faults if not callable(getattr(real, n, None)))
        if unknown:
            raise TypeError(f"{type(real).__name__} has no method {', '.join(unknown)}")
        self._real = real
        self._faults = faults
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        original = getattr(self._real, name)
        fault = self._faults.get(name)
        if not callable(original):
            return original

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if fault is None:
                return original(*args, **kwargs)
            return fault(original, *args, **kwargs)

        return call


def raises(exc: BaseException) -> Fault:
    """Fail before doing anything."""

    def fault(_real: Callable[..., Any], *_args: Any, **_kwargs: Any) -> Any:
        raise exc

    return fault


def works_then_raises(exc: BaseException) -> Fault:
    """Do the real work, then fail: a program that exits non-zero after acting."""

    def fault(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise exc

    return fault


def returns(value: Any) -> Fault:
    """Report success without doing anything."""

    def fault(_real: Callable[..., Any], *_args: Any, **_kwargs: Any) -> Any:
        return value

    return fault


def fails_from_call(number: int, exc: BaseException) -> Fault:
    """Work for the first `number - 1` calls, then fail on every call.

    Counted per adapter: a case made once at import serves every test (and every
    backend) that uses it, each with an adapter of its own."""
    seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def fault(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        adapter = getattr(real, "__self__", real)
        seen[adapter] = seen.get(adapter, 0) + 1
        if seen[adapter] >= number:
            raise exc
        return real(*args, **kwargs)

    return fault


def spawns_instead(argv: list[str]) -> Fault:
    """Open the window, but running `argv` instead of the agent wrapper."""

    def fault(
        real: Callable[..., Any], session: str, name: str, _argv: list[str], *rest: Any
    ) -> Any:
        return real(session, name, argv, *rest)

    return fault


def tool_failed(command: str, stderr: str = "simulated failure", code: int = 1) -> ToolFailed:
    return ToolFailed(command.split(), code, stderr)


# -- configuration --------------------------------------------------------------------------


def agent_profile(name: str, command: list[str], completion: str = "exit") -> str:
    """An [agents.NAME] table; the argv is written as JSON, which TOML reads as well."""
    return f'\n[agents.{name}]\ncommand = {json.dumps(command)}\ncompletion = "{completion}"\n'


def committer_profile(name: str = "committer", line: str = "work") -> str:
    """An agent that commits a line to work.txt on its branch, then fails (exit 1)."""
    script = f"echo {line} >> work.txt && git add work.txt && git commit -qm work && exit 1"
    return agent_profile(name, ["sh", "-c", script])


def sleeper_command(seconds: int = 60) -> list[str]:
    return ["sleep", str(seconds)]


def write_config(env: Env, *profiles: str, **settings: object) -> None:
    """The base test config with `settings` overriding its keys, then the agent profiles.

    A `sleeper` profile (an agent that just waits) is always there.
    """
    values: dict[str, object] = {}
    for line in BASE_CONFIG.splitlines():
        key, _, value = line.partition("=")
        if value:
            values[key.strip()] = value.strip()
    values.update({k: json.dumps(v) for k, v in settings.items()})
    text = "".join(f"{k} = {v}\n" for k, v in values.items())
    text += agent_profile("sleeper", sleeper_command())
    env.write_config(text + "".join(profiles))


# -- witnesses --------------------------------------------------------------------------------


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Poll until probe returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rows(env: Env, query: str, *params: Any) -> list[dict[str, Any]]:
    """Read the database directly (not through dispatch), as an independent witness."""
    from tests import witness

    return [dict(r) for r in witness.rows(env, query, *params)]


def task(env: Env, task_id: int) -> dict[str, Any]:
    return rows(env, "SELECT * FROM tasks WHERE id = ?", task_id)[0]


def attempts(env: Env, task_id: int) -> list[dict[str, Any]]:
    found = rows(env, "SELECT * FROM attempts WHERE task_id = ? ORDER BY id", task_id)
    for row in found:
        row["intent"] = json.loads(row["intent"]) if row["intent"] else {}
    return found


def events(env: Env, task_id: int, kind: str | None = None) -> list[dict[str, Any]]:
    found = rows(env, "SELECT * FROM events WHERE task_id = ? ORDER BY id", task_id)
    for row in found:
        row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
    return [e for e in found if kind is None or e["kind"] == kind]


def wait_status(env: Env, task_id: int, *, leaving: str = "in-progress") -> str:
    """Wait until the task's status is no longer `leaving`; the new status."""
    return str(
        wait_for(
            lambda: (s := task(env, task_id)["status"]) != leaving and s,
            f"task {task_id} to leave {leaving}",
        )
    )


def wait_attempt_ended(env: Env, task_id: int) -> dict[str, Any]:
    return wait_for(
        lambda: next((a for a in attempts(env, task_id)[-1:] if a["state"] == "ended"), None),
        f"the last attempt of task {task_id} to end",
    )


def branches(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(repo), "branch", "--list", "--format=%(refname:short)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def worktree_list(repo: Path) -> list[str]:
    """Registered worktrees other than the main one, as git lists them."""
    out = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]
    return paths[1:]


def assert_nothing_left(env: Env, repo: Path, task_id: int) -> None:
    """No branch, worktree directory, registered worktree or window the dispatch created."""
    assert [b for b in branches(repo) if b.startswith(f"dispatch/{task_id}-")] == []
    assert worktree_list(repo) == []
    assert not (env.home / "worktrees" / repo.name / f"task-{task_id}").exists()
    assert f"t{task_id}" not in windows(env)
    attempt_ids = [a["id"] for a in attempts(env, task_id)]
    for attempt_id in attempt_ids:
        assert not (env.home / "attempts" / str(attempt_id) / "prompt.md").exists()


def assert_rolled_back(
    env: Env, task_id: int, status: str = "ready", step: str | None = None
) -> dict[str, Any]:
    """Task back in `status` with its error and event; the last attempt ended dispatch-failed."""
    row = task(env, task_id)
    assert row["status"] == status
    assert row["current_attempt_id"] is None
    assert row["last_error"]
    if step is not None:
        assert row["last_error"].startswith(f"{step}: "), row["last_error"]
    attempt = attempts(env, task_id)[-1]
    assert attempt["state"] == "ended"
    assert attempt["outcome"] == "dispatch-failed"
    assert attempt["error"] == row["last_error"]
    failed = events(env, task_id, "dispatch-failed")
    assert failed, "no dispatch-failed event"
    assert failed[-1]["attempt_id"] == attempt["id"]
    assert failed[-1]["from_status"] == "in-progress"
    assert failed[-1]["to_status"] == status
    return attempt


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point in this process: (exit code, stdout, stderr).

    For tests of what a command prints and returns, without paying an interpreter start;
    tests of signals, PATH or concurrency run the program itself.
    """
    from dispatch.cli.main import run

    capsys.readouterr()
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tmux_binary() -> str:
    found = shutil.which("tmux")
    assert found, "tmux is needed for these tests"
    return found
