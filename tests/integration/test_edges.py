"""Edges where a status could lie: stubborn agents, remote closes, a queue blocked by a
missing profile, session ids after a reset, and what `run --json` shows."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from dispatch.services.dispatching import Dispatch, _write_intent, claim
from dispatch.services.tasks import add_task
from dispatch.store import statements as st
from tests.conftest import Cli, Env, MakeApp
from tests.faults import agent_profile, events, write_config
from tests.integration.recovery_helpers import rows, running, task_row, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _add(cli: Cli, repo: Path, prompt: str, *extra: str) -> int:
    added = cli("add", "job", "--agent", "shell", "--prompt", prompt, *extra, cwd=repo)
    assert added.code == 0, added.stderr
    return int(added.stdout)


def test_cancel_kills_an_agent_that_ignores_every_polite_signal(
    cli: Cli, repo: Path, env: Env
) -> None:
    # A distinctive sleep so the orphan it leaves (sh is killed, sleep is not) can be found.
    nap = "61.4321"
    task_id = _add(cli, repo, f"trap '' INT HUP TERM; sleep {nap}; echo after > stubborn.txt")
    try:
        assert cli("run", str(task_id)).code == 0
        agent_pid = int(wait_for(lambda: running(env, task_id), "the agent")["agent_pid"])

        cancelled = cli("cancel", str(task_id))

        assert cancelled.code == 0, cancelled.stderr
        assert task_row(env, task_id)["status"] == "cancelled"
        # The task says cancelled only once its agent is really gone.
        assert not _alive(agent_pid)
        worktree = Path(task_row(env, task_id)["worktree"])
        time.sleep(0.5)
        assert not (worktree / "stubborn.txt").exists()
    finally:
        subprocess.run(["pkill", "-f", f"sleep {nap}"], check=False)


def test_close_of_a_task_running_on_another_host_archives_it_and_stops_it_there(
    cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _add(cli, repo, "sleep 30")
    elsewhere = {"DISPATCH_HOST": "host-b"}
    assert cli("run", str(task_id), extra_env=elsewhere).code == 0
    wait_for(lambda: running(env, task_id), "the agent on host-b")

    closed = cli("close", str(task_id))

    assert closed.code == 0, closed.stderr
    assert "host-b" in closed.stderr
    assert task_row(env, task_id)["closed_at"] is not None
    # host-b's wrapper sees the cancel at its next heartbeat (1 s in the test config).
    wait_for(lambda: task_row(env, task_id)["status"] == "cancelled", "the remote cancel")
    assert len(events(env, task_id, "closed")) == 1
    again = cli("close", str(task_id))
    assert again.code == 0 and "already closed" in again.stderr
    assert len(events(env, task_id, "closed")) == 1


def test_run_next_skips_a_task_whose_profile_is_gone_and_says_why(
    cli: Cli, repo: Path, env: Env
) -> None:
    write_config(env, agent_profile("custom", ["true"]))
    orphan = int(cli("add", "first", "--agent", "custom", "--priority", "5", cwd=repo).stdout)
    write_config(env)  # the `custom` profile is removed from the config
    fine = _add(cli, repo, "true")

    ran = cli("run", "--next", "--json")

    assert ran.code == 0, ran.stderr
    assert [r["task"]["id"] for r in ran.json()] == [fine]
    left = task_row(env, orphan)
    assert left["status"] == "ready"
    assert "unknown agent profile 'custom'" in left["last_error"]


def test_run_after_a_reset_starts_a_new_session_and_redispatch_keeps_it(
    cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _add(cli, repo, "exit 3")
    assert cli("run", str(task_id)).code == 0
    wait_for(lambda: task_row(env, task_id)["status"] == "failed", "the first failure")
    assert cli("redispatch", str(task_id)).code == 0
    wait_for(lambda: task_row(env, task_id)["status"] == "failed", "the second failure")
    assert cli("reset", str(task_id)).code == 0
    assert cli("run", str(task_id)).code == 0
    wait_for(lambda: task_row(env, task_id)["status"] == "failed", "the third failure")
    assert cli("redispatch", str(task_id)).code == 0
    wait_for(lambda: task_row(env, task_id)["status"] == "failed", "the fourth failure")

    sessions = [
        r["session_id"]
        for r in rows(env, "SELECT session_id FROM attempts WHERE task_id = ? ORDER BY id", task_id)
    ]
    assert sessions[0] == sessions[1]  # the redispatch resumed the same session
    assert sessions[2] != sessions[1]  # the run after the reset started over
    assert sessions[3] == sessions[2]  # and its new session is the one resumed next


def test_a_run_superseded_before_its_worktree_does_not_replace_the_session(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    # A run's new session is recorded with its first intent, and only while its attempt
    # is still the task's: one reaped meanwhile must not replace what its successor resumes.
    app = make_app()
    task_id = add_task(app, "t", repo=repo, agent="shell").id
    d = Dispatch(app, task_id)
    assert claim(d) and d.claimed is not None
    claimed = d.claimed
    assert claimed.new_session is not None
    app.direct.write(lambda tx: st.update_task(tx, task_id, current_attempt_id=None))

    _write_intent(claimed, repo=str(repo))

    assert rows(env, "SELECT session_id FROM agent_sessions") == []
    intent = rows(env, "SELECT intent FROM attempts WHERE id = ?", claimed.attempt_id)
    assert json.loads(intent[0]["intent"])["repo"] == str(repo)  # the intent itself is kept

    # While it is the task's, the same write records the session.
    app.direct.write(lambda tx: st.update_task(tx, task_id, current_attempt_id=claimed.attempt_id))
    claimed.new_session = "s-1"
    _write_intent(claimed, repo=str(repo))
    assert [r["session_id"] for r in rows(env, "SELECT session_id FROM agent_sessions")] == ["s-1"]


def test_run_json_shows_the_task_with_its_attempts(cli: Cli, repo: Path, env: Env) -> None:
    task_id = _add(cli, repo, "exit 1")
    assert cli("run", str(task_id)).code == 0
    wait_for(lambda: task_row(env, task_id)["status"] == "failed", "the failure")

    again = cli("redispatch", str(task_id), "--json")

    assert again.code == 0, again.stderr
    data = again.json()
    assert [a["number"] for a in data["task"]["attempts"]] == [1, 2]
    assert data["task"]["attempts"][-1]["id"] == data["attempt"]["id"]


def test_any_number_of_tasks_whose_profile_is_gone_never_block_the_queue(
    make_app: MakeApp, repo: Path, env: Env
) -> None:
    write_config(env, agent_profile("custom", ["true"]))
    app = make_app()
    orphans = [add_task(app, f"o{n}", repo=repo, agent="custom").id for n in range(25)]
    write_config(env)  # the `custom` profile is removed from the config
    later = make_app()
    fine = add_task(later, "runnable", repo=repo, agent="sleeper").id

    d = Dispatch(later, None)
    assert claim(d)

    assert d.task_id == fine  # behind 25 tasks it cannot run
    marked = [t for t in orphans if task_row(env, t)["last_error"]]
    assert marked == orphans[:20]  # at most 20 said so per claim
    assert {task_row(env, t)["status"] for t in orphans} == {"ready"}
    assert not claim(Dispatch(later, None))  # nothing runnable left
    assert all("unknown agent profile 'custom'" in task_row(env, t)["last_error"] for t in orphans)
