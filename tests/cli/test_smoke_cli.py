"""The CLI starts, and add / list / run work end to end with the shell agent."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import Cli, Env, windows


def test_add_list_run_done(cli: Cli, repo: Path, env: Env) -> None:
    added = cli("add", "hello", "--agent", "shell", "--prompt", "echo hi > out.txt", cwd=repo)
    assert added.code == 0, added.stderr
    assert added.stdout.strip() == "1"
    ran = cli("run", "1", "--json")
    assert ran.code == 0, ran.stderr
    data = ran.json()
    assert data["task"]["id"] == 1
    assert data["attempt"]["number"] == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = cli("show", "1", "--json").json()["status"]
        if status != "in-progress":
            break
        time.sleep(0.1)
    assert status == "done"
    worktree = Path(data["attempt"]["worktree"])
    assert (worktree / "out.txt").read_text() == "hi\n"
    assert "t1" not in windows(env)
