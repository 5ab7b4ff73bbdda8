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
