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
