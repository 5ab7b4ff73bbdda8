"""Concurrent dispatchers: one claim per task, distinct tasks, no "database is locked"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dispatch.app import App
from dispatch.services.tasks import add_task
from tests.conftest import Env, windows
from tests.faults import attempts, events, rows, write_config


def _run_at_once(cwd: Path, argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every `dispatch` command before waiting for any; (code, stdout, stderr) each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dispatch", *argv],
            cwd=cwd,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        results.append((proc.returncode, stdout, stderr))
    return results


def test_six_runs_of_one_task_start_exactly_one_agent(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    add_task(make_app(), "Only once", prompt="p", repo=repo, agent="sleeper")
    results = _run_at_once(repo, [["run", "1"]] * 6)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3, 3, 3, 3, 3], [r[2] for r in results if r[0] != 3]
    for code, _, stderr in results:
        if code == 3:
            assert "task 1 is in-progress" in stderr
        assert "database is locked" not in stderr
    assert windows(env) == ["t1"]
    assert len(attempts(env, 1)) == 1
    assert len(events(env, 1, "claimed")) == 1
    assert rows(env, "SELECT status FROM tasks WHERE id = 1") == [{"status": "in-progress"}]


def test_four_run_next_at_once_claim_four_distinct_tasks(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    app = make_app()
    for n in range(8):
        add_task(app, f"task {n}", prompt="p", repo=repo, agent="sleeper")
    results = _run_at_once(repo, [["run", "--next", "--json"]] * 4)
    started: list[int] = []
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "database is locked" not in stderr
        started += [item["task"]["id"] for item in json.loads(stdout)]
    assert sorted(started) == [1, 2, 3, 4]  # equal priority: the oldest first, each once
    assert sorted(windows(env)) == ["t1", "t2", "t3", "t4"]
    statuses = rows(env, "SELECT id, status FROM tasks ORDER BY id")
    assert [r["status"] for r in statuses] == ["in-progress"] * 4 + ["ready"] * 4
    assert rows(env, "SELECT COUNT(*) AS n FROM attempts") == [{"n": 4}]


def test_parallel_run_next_into_one_repository_never_fails_spuriously(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    """git fails `worktree list` while another add is half done: every such look is locked."""
    write_config(env)
    app = make_app()
    for round_ in range(2):
        first = round_ * 16 + 1
        for n in range(16):
            add_task(app, f"round {round_} task {n}", prompt="true", repo=repo, agent="shell")
        results = _run_at_once(repo, [["run", "--next", "--max", "2", "--json"]] * 8)
        started: list[int] = []
        for code, stdout, stderr in results:
            assert code == 0, stderr
            started += [item["task"]["id"] for item in json.loads(stdout)]
        assert sorted(started) == list(range(first, first + 16))
        failed = "SELECT COUNT(*) AS n FROM {} WHERE {} = 'dispatch-failed'"
        assert rows(env, failed.format("events", "kind")) == [{"n": 0}]
        assert rows(env, failed.format("attempts", "outcome")) == [{"n": 0}]
