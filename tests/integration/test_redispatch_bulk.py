"""`dispatch redispatch --status S`: every open task in S through the same saga."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from tests.conftest import Cli, Env, Result
from tests.integration.recovery_helpers import rows, wait_for


def _status(env: Env, task_id: int) -> str:
    return str(rows(env, "SELECT status FROM tasks WHERE id = ?", task_id)[0]["status"])


def _status_is(env: Env, task_id: int, status: str) -> bool:
    return _status(env, task_id) == status


def _failed_task(cli: Cli, repo: Path, env: Env, title: str) -> int:
    # The agent succeeds only once a file named `ok` exists in its worktree.
    added = cli("add", title, "--agent", "shell", "--prompt", "test -f ok", cwd=repo)
    assert added.code == 0, added.stderr
    task_id = int(added.stdout)
    ran = cli("run", str(task_id))
    assert ran.code == 0, ran.stderr
    wait_for(lambda: _status(env, task_id) == "failed", f"task {task_id} to fail")
    return task_id


def test_bulk_redispatch_takes_every_open_task_in_the_status(
    cli: Cli, repo: Path, env: Env
) -> None:
    first, second, closed = (_failed_task(cli, repo, env, f"job {n}") for n in range(3))
    assert cli("close", str(closed)).code == 0
    for task_id in (first, second):
        worktree = rows(env, "SELECT worktree FROM tasks WHERE id = ?", task_id)[0]["worktree"]
        (Path(worktree) / "ok").write_text("")

    result: Result = cli("redispatch", "--status", "failed", "--json")

    assert result.code == 0, result.stderr
    data = result.json()
    assert [d["task_id"] for d in data] == [first, second]
    assert all(d["error"] is None and d["attempt"]["number"] == 2 for d in data)
    for task_id in (first, second):
        wait_for(partial(_status_is, env, task_id, "done"), f"task {task_id} done")
    assert _status(env, closed) == "failed"  # closed tasks are left alone


def test_bulk_redispatch_goes_on_after_a_failure_and_exits_non_zero(
    cli: Cli, repo: Path, env: Env
) -> None:
    broken, fine = (_failed_task(cli, repo, env, f"job {n}") for n in range(2))
    # Squat the broken task's worktree path with a plain directory: its redispatch must fail.
    worktree = Path(rows(env, "SELECT worktree FROM tasks WHERE id = ?", broken)[0]["worktree"])
    shutil.rmtree(worktree)
    worktree.mkdir()
    (worktree / "mine.txt").write_text("user data")
    fine_tree = rows(env, "SELECT worktree FROM tasks WHERE id = ?", fine)[0]["worktree"]
    (Path(fine_tree) / "ok").write_text("")

    result = cli("redispatch", "--status", "failed")

    assert result.code == 6, result.stderr
    assert f"{broken}" in result.stdout and "error" in result.stdout
    wait_for(lambda: _status(env, fine) == "done", "the healthy task to finish")
    assert _status(env, broken) == "failed"
    assert (worktree / "mine.txt").read_text() == "user data"


def test_bulk_redispatch_refuses_statuses_it_cannot_take(cli: Cli, env: Env) -> None:
    result = cli("redispatch", "--status", "ready")
    assert result.code == 2
    assert "cannot redispatch 'ready'" in result.stderr
    nothing = cli("redispatch", "--status", "interrupted")
    assert nothing.code == 0
    assert "nothing to do" in nothing.stderr
