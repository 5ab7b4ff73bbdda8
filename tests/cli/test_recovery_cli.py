"""Exit codes, stdout against stderr, and JSON errors of the recovery and control commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.errors import DispatchFailed
from dispatch.services.dispatching import dispatch_task
from tests.conftest import BASE_CONFIG, Cli, Env, MakeApp
from tests.integration.recovery_helpers import events_of, new_task, run_all, task_row

NO_SUCH_AGENT = """
max_dispatch_failures = 2

[agents.missing]
command = ["dispatch-test-no-such-agent"]
"""


def test_unknown_tasks_and_attempts_are_not_found(cli: Cli, make_app: MakeApp, repo: Path) -> None:
    make_app().db.ensure_schema()
    commands = [
        ("cancel", "999"),
        ("done", "999"),
        ("close", "999"),
        ("logs", "999"),
        ("attach", "999"),
        ("redispatch", "--attempt", "999"),
    ]
    for args, result in zip(commands, run_all(cli, *commands), strict=True):
        assert result.code == 4, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("dispatch: error: no ") and "999" in result.stderr


def test_json_errors_go_to_stdout_only(cli: Cli, make_app: MakeApp, repo: Path) -> None:
    task_id = new_task(make_app(), repo)
    calls = [
        ("redispatch", str(task_id), "--json"),
        ("cancel", "999", "--json"),
        ("reset", str(task_id), "--json"),
    ]
    conflict, missing, reset = run_all(cli, *calls)

    assert (conflict.code, conflict.stderr) == (3, "")
    assert conflict.json()["error"]["kind"] == "conflict"
    assert "ready" in conflict.json()["error"]["message"]
    assert (missing.code, missing.stderr) == (4, "")
    assert missing.json() == {"error": {"code": 4, "kind": "not-found", "message": "no task 999"}}
    assert reset.code == 3 and reset.json()["error"]["code"] == 3


def test_usage_errors(cli: Cli) -> None:
    neither, both, duration = run_all(
        cli, ("redispatch",), ("redispatch", "1", "--attempt", "2"), ("sweep", "--stale-after", "x")
    )
    for result in (neither, both, duration):
        assert result.code == 2, result.stderr
        assert result.stdout == ""


def test_reopening_an_open_task_is_a_no_op(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id = new_task(make_app(), repo)

    result = cli("reopen", str(task_id))

    assert result.code == 0
    assert "not closed" in result.stderr
    assert events_of(env, task_id, "reopened") == []


def test_reset_clears_the_failure_count(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    env.write_config(BASE_CONFIG + NO_SUCH_AGENT)
    task_id = new_task(make_app(), repo, agent="missing")

    first = cli("run", str(task_id))
    second = cli("run", str(task_id))

    assert (first.code, second.code) == (6, 6)
    assert "task is ready" in first.stderr
    assert "task is failed" in second.stderr  # max_dispatch_failures = 2 parks it
    assert task_row(env, task_id)["dispatch_failures"] == 2

    reset = cli("reset", str(task_id), "--json")

    assert reset.code == 0, reset.stderr
    assert reset.json()["status"] == "ready"
    assert task_row(env, task_id)["dispatch_failures"] == 0
    [event] = events_of(env, task_id, "reset")
    assert (event["from_status"], event["to_status"]) == ("failed", "ready")
    # Counting starts again: one more failure leaves it ready, not failed.
    with pytest.raises(DispatchFailed, match="task is ready"):
        dispatch_task(make_app(), task_id)
    assert task_row(env, task_id)["status"] == "ready"


def test_reset_refuses_what_is_not_retryable(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    task_id = new_task(make_app(), repo)

    result = cli("reset", str(task_id))

    assert result.code == 3
    assert "ready" in result.stderr
    assert events_of(env, task_id, "reset") == []


def test_sweep_quiet_json_when_idle_prints_nothing(cli: Cli, make_app: MakeApp) -> None:
    make_app().db.ensure_schema()
    result = cli("sweep", "-q", "--json")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
