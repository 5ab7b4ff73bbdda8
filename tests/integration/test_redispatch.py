"""`dispatch redispatch`: a fresh attempt that reuses the task's worktree, branch and session."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dispatch.app import App
from dispatch.errors import Conflict
from dispatch.services import dispatching
from dispatch.services.control import close_task
from dispatch.services.dispatching import dispatch_task, redispatch
from tests.conftest import BASE_CONFIG, Cli, Env, GitRunner, MakeApp, windows
from tests.integration.recovery_helpers import (
    attempt_row,
    attempts_of,
    events_of,
    execute,
    new_task,
    run_all,
    running,
    settled,
    task_row,
    wait_for,
)

# Appends one line per run to a file in the worktree, then fails.
COUNTING = "echo run >> runs.txt; exit 1"

RESUMABLE = """
[agents.resumable]
command = ["sh", "-c", "echo command {session_id} >> session.log; exit 1"]
resume = ["sh", "-c", "echo resume {session_id} >> session.log; exit 1"]
"""

BROKEN_RESUME = """
[agents.broken-resume]
command = ["sh", "-c", "echo mine > user-file.txt; exit 1"]
resume = ["dispatch-test-no-such-agent"]
"""


def _failed_once(
    app: App, repo: Path, env: Env, prompt: str = COUNTING, agent: str = "shell"
) -> int:
    task_id = new_task(app, repo, prompt, agent=agent)
    dispatch_task(app, task_id)
    assert wait_for(lambda: settled(env, task_id), "the first attempt to end") == "failed"
    return task_id


def _redispatched(env: Env, task_id: int, count: int = 2) -> str:
    wait_for(lambda: len(attempts_of(env, task_id)) == count, "the new attempt")
    return wait_for(lambda: settled(env, task_id), "the new attempt to end")


RETRYABLE = ("failed", "incomplete", "interrupted", "cancelled")


def test_redispatch_starts_a_fresh_attempt_in_the_same_worktree(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    app = make_app()
    # One task per status a redispatch may start from, run side by side.
    tasks = {status: new_task(app, repo, COUNTING) for status in RETRYABLE}
    for task_id in tasks.values():
        dispatch_task(app, task_id)
    for status, task_id in tasks.items():
        assert wait_for(partial(settled, env, task_id), "a first attempt") == "failed"
        execute(env, "UPDATE tasks SET status = ? WHERE id = ?", status, task_id)
    firsts = {status: attempts_of(env, task_id)[0] for status, task_id in tasks.items()}
    before = {status: task_row(env, task_id) for status, task_id in tasks.items()}

    results = run_all(cli, *(("redispatch", str(t), "--json") for t in tasks.values()))

    for (status, task_id), result in zip(tasks.items(), results, strict=True):
        assert result.code == 0, (status, result.stderr)
        first, data = firsts[status], result.json()
        attempt = data["attempt"]
        assert attempt["id"] > first["id"]
        assert attempt["number"] == 2
        assert attempt["redispatch_of"] == first["id"]
        assert (attempt["worktree"], attempt["branch"]) == (first["worktree"], first["branch"])
        assert _redispatched(env, task_id) == "failed"
        task = task_row(env, task_id)
        for column in ("repo", "agent", "prompt", "base_ref"):
            assert task[column] == before[status][column]
        # The second run found the first run's file: the same worktree, its contents kept.
        assert (Path(first["worktree"]) / "runs.txt").read_text() == "run\nrun\n"
        assert [e["from_status"] for e in events_of(env, task_id, "redispatched")] == [status]
        assert "warning:" in result.stderr and "uncommitted changes" in result.stderr
        assert data["warnings"] and "uncommitted changes" in data["warnings"][0]


def test_redispatch_by_attempt_id(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    task_id = _failed_once(make_app(), repo, env)
    [first] = attempts_of(env, task_id)

    result = cli("redispatch", "--attempt", str(first["id"]), "--json")

    assert result.code == 0, result.stderr
    attempt = result.json()["attempt"]
    assert (attempt["task_id"], attempt["number"], attempt["redispatch_of"]) == (
        task_id,
        2,
        first["id"],
    )
    _redispatched(env, task_id)

    # The first attempt is no longer the latest: following it would record a history
    # that never happened (attempt 3 "redispatched from" attempt 1).
    stale = cli("redispatch", "--attempt", str(first["id"]), "--json")
    assert stale.code == 3, stale.stdout
    message = stale.json()["error"]["message"]
    assert f"task {task_id} has moved on: it is at attempt 2" in message
    assert "not at attempt 1" in message
    assert [a["number"] for a in attempts_of(env, task_id)] == [1, 2]
    latest = attempts_of(env, task_id)[-1]
    again = cli("redispatch", "--attempt", str(latest["id"]), "--json")
    assert again.code == 0, again.stdout
    assert again.json()["attempt"]["redispatch_of"] == latest["id"]
    _redispatched(env, task_id, count=3)


def test_redispatch_refusals(cli: Cli, make_app: MakeApp, repo: Path, env: Env) -> None:
    app = make_app()
    ready = new_task(app, repo)
    busy = new_task(app, repo, "sleep 30")
    dispatch_task(app, busy)
    busy_attempt = wait_for(lambda: running(env, busy), "the agent to start")
    done = new_task(app, repo, "true")
    dispatch_task(app, done)
    closed = _failed_once(app, repo, env)
    close_task(app, closed)
    wait_for(lambda: settled(env, done), "the quick agent to finish")

    # (An unknown attempt and usage errors: tests/cli/test_recovery_cli.py.)
    unknown_task, running_, ready_, done_, closed_ = run_all(
        cli,
        ("redispatch", "999"),
        ("redispatch", str(busy)),
        ("redispatch", str(ready)),
        ("redispatch", str(done)),
        ("redispatch", str(closed)),
    )

    assert unknown_task.code == 4
    assert running_.code == 3
    assert "in-progress" in running_.stderr and busy_attempt["tmux_target"] in running_.stderr
    assert ready_.code == 3 and "ready" in ready_.stderr
    assert done_.code == 3 and "done" in done_.stderr
    assert closed_.code == 5 and "reopen" in closed_.stderr
    # Nothing was started for any of them.
    assert [len(attempts_of(env, t)) for t in (ready, busy, done, closed)] == [0, 1, 1, 1]


def test_redispatch_keeps_commits_and_uncommitted_work(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    task_id = _failed_once(
        make_app(),
        repo,
        env,
        "echo committed > kept.txt && git add kept.txt && git commit -q -m kept && "
        "echo draft > draft.txt; exit 1",
    )
    [first] = attempts_of(env, task_id)
    worktree = Path(first["worktree"])

    result = cli("redispatch", str(task_id))

    assert result.code == 0, result.stderr
    assert f"worktree {worktree} has uncommitted changes" in result.stderr
    _redispatched(env, task_id)
    assert (worktree / "draft.txt").read_text() == "draft\n"
    assert git(repo, "log", "-1", "--format=%s", first["branch"]).strip() == "kept"


def test_redispatch_recreates_a_removed_worktree_from_its_branch(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    task_id = _failed_once(
        make_app(),
        repo,
        env,
        "echo v1 > kept.txt && git add kept.txt && git commit -q -m v1; exit 1",
    )
    [first] = attempts_of(env, task_id)
    git(repo, "worktree", "remove", "--force", first["worktree"])

    result = cli("redispatch", str(task_id))

    assert result.code == 0, result.stderr
    _redispatched(env, task_id)
    worktree = Path(first["worktree"])
    assert (worktree / "kept.txt").read_text() == "v1\n"
    assert git(worktree, "branch", "--show-current").strip() == first["branch"]


def test_redispatch_refuses_a_worktree_off_its_branch(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    """Detached, or its branch deleted: the agent's commits would belong to no branch."""
    task_id = _failed_once(
        make_app(),
        repo,
        env,
        "echo v1 > kept.txt && git add kept.txt && git commit -q -m v1; exit 1",
    )
    [first] = attempts_of(env, task_id)
    worktree, branch = Path(first["worktree"]), first["branch"]
    tip = git(worktree, "rev-parse", "HEAD").strip()

    git(worktree, "switch", "-q", "--detach")
    detached = cli("redispatch", str(task_id))
    git(worktree, "switch", "-q", branch)
    git(repo, "update-ref", "-d", f"refs/heads/{branch}")
    deleted = cli("redispatch", str(task_id))

    assert detached.code == 6, detached.stderr
    assert f"worktree {worktree}: it is on {tip}, not on {branch}" in detached.stderr
    assert f"git -C {worktree} switch {branch}" in detached.stderr
    assert deleted.code == 6, deleted.stderr
    assert f"its branch {branch} was deleted" in deleted.stderr
    assert task_row(env, task_id)["status"] == "failed"
    assert (worktree / "kept.txt").read_text() == "v1\n"  # nothing of the work is touched
    assert len(attempts_of(env, task_id)) == 3  # two rolled back, each recorded

    git(worktree, "switch", "-q", "-c", branch, tip)
    again = cli("redispatch", str(task_id))
    assert again.code == 0, again.stderr
    assert _redispatched(env, task_id, count=4) == "failed"
    assert git(worktree, "branch", "--show-current").strip() == branch


def test_redispatch_resumes_the_agent_session(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env
) -> None:
    env.write_config(BASE_CONFIG + RESUMABLE)
    app = make_app()
    task_id = _failed_once(app, repo, env, agent="resumable")

    redispatch(app, task_id)
    assert _redispatched(env, task_id, 2) == "failed"
    redispatch(app, task_id)
    assert _redispatched(env, task_id, 3) == "failed"

    attempts = attempts_of(env, task_id)
    session = attempts[0]["session_id"]
    assert session and {a["session_id"] for a in attempts} == {session}
    log = (Path(attempts[0]["worktree"]) / "session.log").read_text().splitlines()
    assert log == [f"command {session}", f"resume {session}", f"resume {session}"]


def test_a_failed_redispatch_rolls_back_and_keeps_the_work(
    cli: Cli, make_app: MakeApp, repo: Path, env: Env, git: GitRunner
) -> None:
    env.write_config(BASE_CONFIG + BROKEN_RESUME)
    task_id = _failed_once(make_app(), repo, env, agent="broken-resume")
    [first] = attempts_of(env, task_id)
    worktree = Path(first["worktree"])
    (worktree / "notes.txt").write_text("the user's notes\n")

    result = cli("redispatch", str(task_id))

    assert result.code == 6
    assert "failed at confirm" in result.stderr and "task is failed" in result.stderr
    task = task_row(env, task_id)
    assert (task["status"], task["current_attempt_id"]) == ("failed", None)
    second = attempts_of(env, task_id)[-1]
    assert (second["number"], second["outcome"]) == (2, "dispatch-failed")
    assert "dispatch-test-no-such-agent" in attempt_row(env, second["id"])["error"]
    assert (worktree / "user-file.txt").read_text() == "mine\n"
    assert (worktree / "notes.txt").read_text() == "the user's notes\n"
    assert git(repo, "branch", "--list", first["branch"]).strip() != ""
    assert f"t{task_id}" not in windows(env)


def test_an_expected_attempt_is_checked_by_the_claim_itself(
    make_app: MakeApp, repo: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The monitor's stale-page guard: another redispatch lands after the claim has read
    # the task and found attempt 1, before it writes. The claim must see that and refuse,
    # not start a third attempt nobody asked for.
    app = make_app()
    task_id = _failed_once(app, repo, env)
    real_plan = dispatching._plan
    raced: list[int] = []

    def plan_then_race(d: dispatching.Dispatch, *args: Any) -> Any:
        planned = real_plan(d, *args)
        if d.expected_attempt is not None and not raced:
            raced.append(redispatch(make_app(), task_id).attempt.number)
        return planned

    monkeypatch.setattr(dispatching, "_plan", plan_then_race)

    with pytest.raises(Conflict):
        redispatch(app, task_id, expected_attempt=1)

    assert raced == [2]
    assert [a["number"] for a in attempts_of(env, task_id)] == [1, 2]
    _redispatched(env, task_id)
    stale = pytest.raises(Conflict, match="has moved on: it is at attempt 2")
    with stale:
        redispatch(app, task_id, expected_attempt=1)
    assert redispatch(app, task_id, expected_attempt=2).attempt.number == 3
