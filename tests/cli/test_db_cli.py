"""`dispatch db upgrade|current` and `dispatch doctor`."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from dispatch.store.revisions import HEAD_REVISION
from tests.cli.inprocess import InProcess
from tests.conftest import BASE_CONFIG, Env, Result

Cli = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    return InProcess(capsys, monkeypatch, env)


def _revisions(path: Path) -> list[tuple[str]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall()


def test_db_upgrade_and_current(run: Cli, env: Env) -> None:
    before = run("db", "current")
    assert before.code == 0, before.stderr
    assert before.stdout.startswith(f"empty (head is {HEAD_REVISION}")
    upgraded = run("db", "upgrade")
    assert (upgraded.code, upgraded.stdout) == (0, f"empty -> {HEAD_REVISION}\n")
    assert _revisions(env.db_path) == [(HEAD_REVISION,)]
    again = run("db", "upgrade")
    assert (again.code, again.stdout) == (0, f"already at {HEAD_REVISION}\n")
    current = run("db", "current")
    assert (current.code, current.stdout) == (0, f"{HEAD_REVISION} (head)\n")


def test_db_commands_follow_the_db_option(run: Cli, env: Env) -> None:
    other = env.root / "other" / "x.db"
    assert run("--db", str(other), "db", "upgrade").code == 0
    assert _revisions(other) == [(HEAD_REVISION,)]
    assert not env.db_path.exists()
    assert run("--db", f"sqlite:///{other}", "db", "current").stdout == f"{HEAD_REVISION} (head)\n"


def _doctor(run: Cli, *args: str) -> tuple[int, dict[str, tuple[bool, str]]]:
    done = run("doctor", "--json", *args)
    assert done.stderr == ""
    checks = {c["name"]: (c["ok"], c["detail"]) for c in json.loads(done.stdout)}
    return done.code, checks


def test_doctor_passes_when_everything_is_there(run: Cli, env: Env) -> None:
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    code, checks = _doctor(run)
    assert code == 0, checks
    assert set(checks) == {"config", "tmux", "git", "database", "migrations", "agent shell"}
    assert all(ok for ok, _ in checks.values())
    assert checks["config"][1] == str(env.config)
    assert checks["migrations"][1] == f"at head ({HEAD_REVISION})"
    people = run("doctor")
    assert people.code == 0
    assert "FAIL" not in people.stdout and people.stdout.count("ok ") == 6


def test_doctor_names_each_missing_agent_command(run: Cli, env: Env) -> None:
    env.write_config(
        BASE_CONFIG
        + 'default_agent = "shell"\n[agents.ghost]\ncommand = ["no-such-agent-here", "{prompt}"]\n'
    )
    code, checks = _doctor(run)
    assert code == 7
    assert checks["agent ghost"] == (False, "'no-such-agent-here' not found on PATH")
    assert checks["agent shell"][0] is True
    people = run("doctor")
    assert people.code == 7
    assert "FAIL agent ghost" in people.stdout


def test_doctor_reports_a_broken_config(run: Cli, env: Env) -> None:
    env.write_config("max_running = [\n")
    code, checks = _doctor(run)
    assert code == 7
    ok, detail = checks["config"]
    assert not ok and f"{env.config}:1: invalid TOML" in detail


def test_doctor_reports_an_unusable_database_and_carries_on(run: Cli, env: Env) -> None:
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    env.home.mkdir()
    env.db_path.write_bytes(b"\x00garbage" * 64)
    code, checks = _doctor(run)
    assert code == 7
    assert checks["database"][0] is False and "unusable" in checks["database"][1]
    assert checks["migrations"][0] is False
    assert checks["tmux"][0] is True and checks["git"][0] is True  # every check still ran


def test_doctor_reports_missing_tmux(cli: Cli, env: Env) -> None:
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    tools = env.root / "bin"
    tools.mkdir()
    for program in ("git", "sh"):
        found = shutil.which(program)
        assert found is not None
        os.symlink(found, tools / program)
    done = cli("doctor", "--json", extra_env={"PATH": str(tools)})
    assert done.code == 7
    checks = {c["name"]: c for c in done.json()}
    assert checks["tmux"]["ok"] is False and "tmux" in checks["tmux"]["detail"]
    assert checks["git"]["ok"] is True
