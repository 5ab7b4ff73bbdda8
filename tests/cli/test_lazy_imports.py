"""Commands import only what they use: the heavy libraries load on first need.

Speed itself is measured by the benchmark script; these tests check the cause of
slowness that a change most easily brings back: an import at module level.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Env, Result
from tests.faults import wait_for

# What a command imports on SQLite's stdlib path; on PostgreSQL SQLAlchemy is the executor.
pytestmark = pytest.mark.sqlite_only

HEAVY = {"sqlalchemy", "alembic", "libtmux", "git", "pydantic"}


def _imported(*args: str, cwd: Path) -> tuple[int, set[str]]:
    """The top-level packages `python -m dispatch ARGS` imports, from -X importtime."""
    code, names, _ = _run(*args, cwd=cwd)
    return code, names


def _run(*args: str, cwd: Path, whole_names: bool = False) -> tuple[int, set[str], str]:
    """Exit code, top-level packages imported (from -X importtime; every module's whole
    name with `whole_names`) and stdout."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dispatch", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )  # fmt: skip
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name if whole_names else name.split(".")[0])
    assert "dispatch" in names  # the probe works: it sees dispatch itself
    return done.returncode, names, done.stdout


def test_version_and_help_import_no_heavy_library(env: Env) -> None:
    for args in (["--version"], ["--help"]):
        code, names = _imported(*args, cwd=env.root)
        assert code == 0
        assert not names & HEAVY, (args, sorted(names & HEAVY))


def test_list_reads_a_current_database_without_sqlalchemy(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "first task", cwd=repo).code == 0
    code, names, stdout = _run("list", "--json", cwd=env.root)
    assert code == 0
    assert [t["title"] for t in json.loads(stdout)] == ["first task"]  # it did read it
    assert not names & HEAVY, sorted(names & HEAVY)


def test_show_imports_neither_tmux_nor_git(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "x", cwd=repo).code == 0
    code, names, stdout = _run("show", "1", "--json", cwd=env.root)
    assert code == 0
    assert json.loads(stdout)["title"] == "x"  # it did read the database
    assert not names & HEAVY, sorted(names & HEAVY)


def test_commands_on_a_current_database_need_no_sqlalchemy(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    """SQLAlchemy loads only to create, migrate or refuse a database, or for another backend."""
    assert cli("add", "first", cwd=repo).code == 0  # creates and migrates the database
    steps = [
        (["add", "second", "--json"], repo, "second"),
        (["events", "--json"], env.root, "created"),
        (["cancel", "2", "--json"], env.root, "cancelled"),
        (["reset", "2", "--json"], env.root, "ready"),
        (["close", "2", "--json"], env.root, "second"),
        (["reopen", "2", "--json"], env.root, "second"),
    ]
    for args, cwd, seen in steps:
        code, names, stdout = _run(*args, cwd=cwd)
        assert code == 0, args
        assert seen in stdout, (args, stdout)  # it did its work
        assert "sqlalchemy" not in names, args


def test_a_sweep_with_nothing_to_reap_only_reads_without_sqlalchemy(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "busy", "--agent", "shell", "--prompt", "sleep 30", cwd=repo).code == 0
    assert cli("run", "1").code == 0
    code, names, stdout = _run("sweep", "--json", cwd=env.root)
    assert code == 0
    report = json.loads(stdout)
    assert (report["checked"], report["reaped"]) == (1, [])  # it saw the live attempt
    assert not names & HEAVY, sorted(names & HEAVY)


def test_statements_on_a_core_connection_load_neither_the_orm_nor_the_models(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    """The way other backends go runs SQL text on a SQLAlchemy connection: the models
    are the schema's, loaded only to migrate."""
    assert cli("add", "first", cwd=repo).code == 0  # creates and migrates the database
    # URL options send even a current SQLite file through SQLAlchemy.
    url = f"sqlite:///{env.db_path}?timeout=5"
    for args, cwd, seen in (
        (["--db", url, "add", "second", "--json"], repo, "second"),
        (["--db", url, "list", "--json"], env.root, "first"),
    ):
        code, modules, stdout = _run(*args, cwd=cwd, whole_names=True)
        assert code == 0, args
        assert seen in stdout, (args, stdout)  # it did its work
        assert "sqlalchemy" in modules, args  # the probe sees the way it went
        assert not {"sqlalchemy.orm", "dispatch.store.models"} & modules, args


def test_add_runs_git_without_gitpython(env: Env, repo: Path) -> None:
    code, names, stdout = _run("add", "x", "--json", cwd=repo)
    assert code == 0
    assert json.loads(stdout)["base_ref"] == "main"  # it did ask git
    assert not names & {"git", "libtmux"}, sorted(names & HEAVY)


def test_doctor_and_a_redispatch_into_a_worktree_read_it_with_gitpython(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    code, names, _ = _run("doctor", cwd=repo)
    assert "git" in names  # doctor's git check is GitPython's view of git
    assert "libtmux" in names  # and its tmux check libtmux's view of the server
    assert cli("add", "x", "--agent", "shell", "--prompt", "exit 1", cwd=repo).code == 0
    assert cli("run", "1").code == 0
    wait_for(lambda: "failed" in cli("show", "1").stdout, "the agent to fail")
    code, names, stdout = _run("redispatch", "1", "--json", cwd=env.root)
    assert code == 0, stdout
    assert "git" in names  # whether the reused worktree is dirty


def _maps_sqlalchemy() -> bool:
    """Whether an interpreter that imports SQLAlchemy shows it in /proc/PID/maps."""
    probe = "import sqlalchemy; print('sqlalchemy/' in open('/proc/self/maps').read())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() == "True"


def test_the_wrapper_starts_the_agent_without_sqlalchemy(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    if not _maps_sqlalchemy():
        pytest.skip("this SQLAlchemy has no compiled modules to see in /proc/PID/maps")
    seen = env.root / "wrapper-maps"
    # The agent's parent is the wrapper: what the wrapper has loaded while the agent runs.
    script = f"grep -c sqlalchemy/ /proc/$PPID/maps > {shlex.quote(str(seen))}; sleep 30"
    assert cli("add", "probe", "--agent", "shell", "--prompt", script, cwd=repo).code == 0

    assert cli("run", "1").code == 0

    count = wait_for(lambda: seen.exists() and seen.read_text().strip(), "the agent's probe")
    assert count == "0"


# Started by every Python that has it on PYTHONPATH (site imports it): it logs, with the
# process's arguments, each import of the modules named below, as the import happens:
# the wrapper leaves through os._exit, so nothing at exit would run.
IMPORT_PROBE = """\
import os, sys

class _Probe:
    def find_spec(self, name, path=None, target=None):
        if name in ("libtmux", "dispatch.services.wrapper"):
            with open(os.environ["IMPORT_PROBE_LOG"], "a") as log:
                log.write(name + " " + " ".join(sys.argv[1:]) + "\\n")
        return None

sys.meta_path.insert(0, _Probe())
"""


def test_the_wrapper_runs_an_agent_to_its_end_without_libtmux(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    probe, log = env.root / "import-probe", env.root / "imports.log"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(IMPORT_PROBE)
    # The dispatcher starts the tmux server, so the wrapper in its window inherits these.
    traced = {"PYTHONPATH": str(probe), "IMPORT_PROBE_LOG": str(log)}
    assert cli("add", "quick", "--agent", "shell", "--prompt", "true", cwd=repo).code == 0

    assert cli("run", "1", extra_env=traced).code == 0

    wait_for(lambda: cli("show", "1", "--json").json()["status"] == "done", "the task to end")
    imports = log.read_text().splitlines()
    assert "dispatch.services.wrapper agent-exec 1" in imports  # the probe saw the wrapper
    assert not [line for line in imports if line.startswith("libtmux")], imports


def test_run_dispatches_without_sqlalchemy(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "busy", "--agent", "shell", "--prompt", "sleep 30", cwd=repo).code == 0
    code, names, stdout = _run("run", "1", "--json", cwd=env.root)
    assert code == 0
    result = json.loads(stdout)
    assert (result["task"]["status"], result["attempt"]["state"]) == ("in-progress", "running")
    assert Path(result["attempt"]["worktree"]).is_dir()  # it did make the worktree
    assert not names & HEAVY, sorted(names & HEAVY)


WEB = {"starlette", "uvicorn", "anyio", "h11"}


def test_only_serve_imports_the_web_server(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "busy", "--agent", "shell", "--prompt", "sleep 30", cwd=repo).code == 0
    for args, cwd in (
        (["--version"], env.root),
        (["--help"], env.root),
        (["list", "--json"], env.root),
        (["run", "1", "--json"], env.root),
        (["sweep", "--json"], env.root),
        (["add", "other"], repo),
    ):
        code, names = _imported(*args, cwd=cwd)
        assert code == 0, args
        assert not names & WEB, (args, sorted(names & WEB))
    # The probe sees them when they are imported: `serve` with a port that cannot be had.
    code, names = _imported("serve", "--port", "1", "--host", "192.0.2.1", cwd=env.root)
    assert code == 7
    assert {"starlette", "uvicorn"} <= names


def test_gc_reads_repositories_with_gitpython_and_only_when_there_is_a_worktree(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    code, names, stdout = _run("gc", "--dry-run", "--json", cwd=env.root)
    assert code == 0 and json.loads(stdout)["removed"] == []
    assert "git" not in names and "libtmux" not in names  # nothing to look at

    assert cli("add", "quick", "--agent", "shell", "--prompt", "true", cwd=repo).code == 0
    assert cli("run", "1").code == 0
    wait_for(lambda: cli("show", "1", "--json").json()["status"] == "done", "the task to end")
    code, names, stdout = _run("gc", "--dry-run", "--older-than", "0s", "--json", cwd=env.root)
    assert code == 0 and [r["task_id"] for r in json.loads(stdout)["removed"]] == [1]
    assert "git" in names and "libtmux" not in names


def test_shell_completion_completes_commands_and_options_and_stays_off_other_commands(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    script = cli("--show-completion", "bash")
    assert script.code == 0, script.stderr
    assert "_DISPATCH_COMPLETE=complete_bash" in script.stdout
    asked = {"_DISPATCH_COMPLETE": "complete_bash", "COMP_WORDS": "dispatch re", "COMP_CWORD": "1"}
    words = cli(extra_env=asked).stdout.split()
    assert {"redispatch", "reset", "reopen", "restore"} <= set(words)
    asked.update(COMP_WORDS="dispatch list --st", COMP_CWORD="2")
    assert cli(extra_env=asked).stdout.split() == ["--status"]

    installed = cli("--install-completion", "bash")
    assert installed.code == 0, installed.stderr
    bashrc = Path(os.environ["HOME"]) / ".bashrc"  # the test's own home, never the user's
    assert "dispatch" in bashrc.read_text()

    # What answers at once stays without any of it (typer itself imports shellingham).
    _, names = _imported("--version", cwd=repo)
    assert not names & {"typer", "click", "shellingham"}, sorted(names)
