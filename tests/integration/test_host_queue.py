"""`run --next` takes only tasks this host can run (SPEC §10): one whose repository is
not here is passed over, stays `ready` for a host that has it, and blocks nothing."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Env, Result
from tests.faults import agent_profile, write_config


def test_a_task_whose_repository_is_not_here_is_passed_over(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    write_config(env, agent_profile("quick", ["true"]))
    elsewhere = env.root / "elsewhere"
    shutil.copytree(repo, elsewhere)
    add = ("add", "--agent", "quick", "--prompt", "p")
    assert cli(*add, "--priority", "9", "not here", cwd=elsewhere).code == 0
    assert cli(*add, "here", cwd=repo).code == 0
    elsewhere.rename(env.root / "on-another-host")

    ran = cli("run", "--next", "--max", "5", "--json")

    assert ran.code == 0, ran.stderr
    assert [item["task"]["title"] for item in ran.json()] == ["here"]
    skipped = cli("show", "1", "--json").json()
    assert (skipped["status"], skipped["attempts"], skipped["last_error"]) == ("ready", [], None)
    assert [e["kind"] for e in skipped["events"]] == ["created"]
    (env.root / "on-another-host").rename(elsewhere)  # the host that has it comes by
    again = cli("run", "--next", "--json")
    assert [item["task"]["title"] for item in again.json()] == ["not here"]


def test_a_task_named_on_a_host_without_its_repository_is_refused_up_front(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    write_config(env, agent_profile("quick", ["true"]))
    elsewhere = env.root / "elsewhere"
    shutil.copytree(repo, elsewhere)
    assert cli("add", "--agent", "quick", "--prompt", "p", "theirs", cwd=elsewhere).code == 0
    elsewhere.rename(env.root / "on-another-host")

    refused = cli("run", "1")

    assert refused.code == 7, refused.stderr
    assert refused.stderr.startswith(
        f"dispatch: error: task 1: its repository {elsewhere} is not on this host"
    )
    assert len(refused.stderr.strip().splitlines()) == 1
    shown = cli("show", "1", "--json").json()
    assert (shown["status"], shown["attempts"], shown["last_error"]) == ("ready", [], None)
    assert [e["kind"] for e in shown["events"]] == ["created"]


def test_run_next_that_starts_nothing_says_why_the_ready_tasks_are_passed_over(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    """`list` shows them ready: "nothing ready" would not be the truth."""
    write_config(env, agent_profile("quick", ["true"]) + agent_profile("gone", ["true"]))
    elsewhere = env.root / "elsewhere"
    shutil.copytree(repo, elsewhere)
    add = ("add", "--agent", "quick", "--prompt", "p")
    for title in ("theirs", "theirs too"):
        assert cli(*add, title, cwd=elsewhere).code == 0
    assert cli("add", "--agent", "gone", "--prompt", "p", "old profile", cwd=repo).code == 0
    elsewhere.rename(env.root / "on-another-host")
    write_config(env, agent_profile("quick", ["true"]))  # the profile "gone" is removed

    ran = cli("run", "--next", "--json", extra_env={"DISPATCH_HOST": "this-host"})

    assert (ran.code, ran.json()) == (0, [])
    assert ran.stderr.splitlines() == [
        "nothing ready to start on this-host:",
        f"  2 tasks, the first 1: repository {elsewhere} is not on this host",
        "  task 3: agent profile 'gone' is not in the config",
    ]
    assert [t["status"] for t in cli("list", "--json").json()] == ["ready"] * 3

    assert cli("cancel", "3").code == 0
    (env.root / "on-another-host").rename(elsewhere)
    shutil.rmtree(elsewhere)
    for task_id in ("1", "2"):
        assert cli("cancel", task_id).code == 0
    assert cli("run", "--next").stderr == "nothing ready\n"
