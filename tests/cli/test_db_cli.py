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


@pytest.mark.sqlite_only  # an empty file, then its revision as sqlite3 reads it
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


def test_doctor_passes_when_everything_is_there(run: Cli, env: Env, backend: str) -> None:
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    code, checks = _doctor(run)
    assert code == 0, checks
    assert set(checks) == {
        "config",
        "tmux",
        "git",
        "database server",
        "database",
        "migrations",
        "host",
        "agent shell",
    }
    assert all(ok for ok, _ in checks.values())
    assert checks["config"][1] == str(env.config)
    # The test's own tmux server, asked on its socket; nothing has started it yet.
    assert checks["tmux"][1].endswith(
        f"server {env.socket!r} is not running (the first run starts it)"
    )
    assert checks["migrations"][1] == f"at head ({HEAD_REVISION})"
    server = checks["database server"][1]
    if backend == "sqlite":
        assert server == f"SQLite {sqlite3.sqlite_version}"
    else:
        assert server.startswith("PostgreSQL 1")
    people = run("doctor")
    assert people.code == 0
    assert "FAIL" not in people.stdout and people.stdout.count("ok ") == 8


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
    # What needs nothing from the config is still checked; what it names is not.
    assert set(checks) == {"config", "tmux", "git"}
    assert checks["tmux"][0] is True and checks["git"][0] is True
    assert checks["tmux"][1].endswith(
        f"server {env.socket!r} is not running (the first run starts it)"
    )


def test_doctor_with_a_broken_config_still_finds_tmux_missing(cli: Cli, env: Env) -> None:
    env.write_config('max_running = "many"\n')
    tools = env.root / "bin"
    tools.mkdir()
    found = shutil.which("git")
    assert found is not None
    os.symlink(found, tools / "git")
    done = cli("doctor", extra_env={"PATH": str(tools)})
    assert done.code == 7
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [
        ["FAIL", "config"],
        ["FAIL", "tmux"],
        ["ok", "git"],
    ], done.stdout
    assert "max_running: expected a whole number" in lines[1]


@pytest.mark.sqlite_only
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


def test_doctor_names_the_postgresql_server_it_reached(pg: str, run: Cli, env: Env) -> None:
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    code, checks = _doctor(run)
    assert code == 0, checks
    ok, detail = checks["database server"]
    assert ok and detail.startswith("PostgreSQL 1")


def test_doctor_reports_a_postgresql_server_it_cannot_reach(
    run: Cli, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    env.write_config(BASE_CONFIG + 'default_agent = "shell"\n')
    nowhere = env.root / "no-server-here"
    nowhere.mkdir()
    monkeypatch.setenv("DISPATCH_DB", f"postgresql+psycopg://postgres@/dispatch?host={nowhere}")
    code, checks = _doctor(run)
    assert code == 7
    ok, detail = checks["database server"]
    assert not ok and str(nowhere) in detail and "\n" not in detail
    assert checks["tmux"][0] is True  # every check still ran


def test_doctor_finds_this_host_name_used_by_another_live_host(
    cli: Cli, env: Env, repo: Path
) -> None:
    from tests.faults import agent_profile, wait_for

    env.write_config(BASE_CONFIG + agent_profile("sleeper", ["sleep", "60"]))
    twin = {"DISPATCH_HOST": "twin"}
    assert cli("add", "long", "--agent", "sleeper", "--prompt", "p", cwd=repo).code == 0
    assert cli("run", "1", extra_env=twin).code == 0

    def beating() -> bool:
        attempt = cli("show", "1", "--json").json()["attempts"][0]
        return attempt["heartbeat_at"] is not None

    wait_for(beating, "the wrapper's first heartbeat")
    # Another machine with a copy of this one's settings: none of its tmux servers is ours.
    elsewhere = env.root / "another-machine-tmux"
    elsewhere.mkdir()
    copied = {**twin, "TMUX_TMPDIR": str(elsewhere)}

    found = cli("doctor", "--json", extra_env=copied)

    assert found.code == 7, found.stdout
    host = next(c for c in found.json() if c["name"] == "host")
    assert host["ok"] is False
    assert "'twin' is also used by another live host: attempt 1" in host["detail"]
    for environ in (twin, {"DISPATCH_HOST": "other", "TMUX_TMPDIR": str(elsewhere)}):
        fine = cli("doctor", "--json", extra_env=environ)
        checks = {c["name"]: c for c in fine.json()}
        assert checks["host"]["ok"] is True, checks["host"]
    assert cli("show", "1", "--json", extra_env=twin).json()["status"] == "in-progress"
