"""One funnel for every error: one line on stderr (or one JSON object on stdout), the
exit code of SPEC §5, and a traceback only when DISPATCH_DEBUG=1."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from dispatch import __version__
from tests.cli.inprocess import InProcess
from tests.conftest import Env, Result

Cli = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    """The entry point in-process: the funnel is the same, the calls are cheaper."""
    return InProcess(capsys, monkeypatch, env)


def _one_line(done: Result) -> str:
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dispatch: error: ")
    assert "Traceback" not in done.stderr
    return lines[0]


def _json_error(done: Result, code: int, kind: str) -> str:
    assert done.code == code
    data = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert done.stdout.count("\n") == 1
    assert set(data) == {"error"}
    assert set(data["error"]) == {"code", "kind", "message"}
    assert (data["error"]["code"], data["error"]["kind"]) == (code, kind)
    assert done.stderr == ""
    return str(data["error"]["message"])


def _add(run: Cli, repo: Path) -> int:
    done = run("add", "a task", cwd=repo)
    assert done.code == 0, done.stderr
    return int(done.stdout)


# -- the exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["list", "--bogus"], "No such option: --bogus"),
        (["--bogus", "list"], "No such option: --bogus"),
        (["show", "abc"], "Invalid value for 'task'"),
        (["reset", "1x"], "Invalid value for 'task'"),
        (["events", "--task", "abc"], "Invalid value for '--task'"),
        (["show"], "Missing argument 'task'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["list", "--status", "nope"], "unknown status 'nope'"),
        (["add", "x", "--agent", "nope"], "unknown agent profile 'nope'"),
    ],
)
def test_usage_errors_exit_2(run: Cli, repo: Path, args: list[str], fragment: str) -> None:
    done = run(*args, cwd=repo)
    assert done.code == 2
    assert fragment in _one_line(done)
    as_json = run(*args, "--json", cwd=repo)
    assert fragment in _json_error(as_json, 2, "usage")


def test_no_command_shows_the_usage_and_exits_2(run: Cli) -> None:
    done = run()
    assert done.code == 2
    assert "Usage: dispatch" in done.stdout and "add" in done.stdout
    assert "error" not in done.stderr  # the usage says it all


def test_conflict_exits_3_and_names_the_status(run: Cli, repo: Path) -> None:
    task = _add(run, repo)
    done = run("reset", str(task))
    assert done.code == 3
    assert f"task {task} is ready" in _one_line(done)
    assert f"task {task} is ready" in _json_error(run("reset", str(task), "--json"), 3, "conflict")


@pytest.mark.parametrize(
    "args", [["show", "42"], ["reset", "42"], ["events", "--task", "42"], ["close", "42"]]
)
def test_unknown_ids_exit_4(run: Cli, repo: Path, args: list[str]) -> None:
    _add(run, repo)
    done = run(*args)
    assert done.code == 4
    assert "no task 42" in _one_line(done)
    assert "no task 42" in _json_error(run(*args, "--json"), 4, "not-found")


HUGE = "99999999999999999999"  # more than any 64-bit id or INTEGER column holds


@pytest.mark.parametrize(
    "args,missing",
    [
        (["show", HUGE], f"no task {HUGE}"),
        (["redispatch", HUGE], f"no task {HUGE}"),
        (["cancel", HUGE], f"no task {HUGE}"),
        (["redispatch", "--attempt", HUGE], f"no attempt {HUGE}"),
    ],
)
def test_ids_too_large_for_any_database_are_unknown(
    run: Cli, repo: Path, args: list[str], missing: str
) -> None:
    _add(run, repo)
    done = run(*args)
    assert done.code == 4
    assert missing in _one_line(done)


def test_bad_task_inputs_are_refused_and_nothing_is_added(run: Cli, repo: Path, env: Env) -> None:
    prompt = env.root / "nul.md"
    prompt.write_bytes(b"first half\0second half")
    file = repo / "README.md"
    refusals = [
        (["add", "x", "--priority", "99999999999999999999999"], 2, "from -2147483648 to"),
        (["add", "x", "--priority", "-2147483649"], 2, "from -2147483648 to 2147483647"),
        (["add", "x", "--prompt-file", str(prompt)], 2, "prompt contains a NUL byte"),
        (["add", "x", "--repo", str(file)], 7, f"{file} is not a directory"),
    ]
    for args, code, fragment in refusals:
        done = run(*args, cwd=repo)
        assert done.code == code, (args, done.stderr)
        assert fragment in _one_line(done)
    assert run("list", "--all", "--json").stdout.strip() == "[]"
    assert run("add", "x", "--priority", "2147483647", cwd=repo).code == 0


def test_a_closed_task_exits_5_until_reopened(run: Cli, repo: Path) -> None:
    task = str(_add(run, repo))
    assert run("cancel", task).code == 0
    closed = run("close", task)
    assert closed.code == 0, closed.stderr
    done = run("reset", task)
    assert done.code == 5
    line = _one_line(done)
    assert f"task {task} is closed" in line and f"dispatch reopen {task}" in line
    _json_error(run("reset", task, "--json"), 5, "gone")
    assert run("reopen", task).code == 0
    assert run("reset", task).code == 0


def test_not_a_repository_exits_7(run: Cli, env: Env) -> None:
    elsewhere = env.root / "not-a-repo"
    elsewhere.mkdir()
    done = run("add", "x", cwd=elsewhere)
    assert done.code == 7
    assert f"{elsewhere} is not a git repository" in _one_line(done)
    _json_error(run("add", "x", "--json", cwd=elsewhere), 7, "environment")


def _path_without(env: Env, missing: str) -> str:
    """A PATH holding only what `run` needs besides the tool that is `missing`."""
    tools = env.root / f"bin-without-{missing}"
    tools.mkdir()
    for program in ("git", "tmux", "sh"):
        found = shutil.which(program)
        assert found is not None
        if program != missing:
            os.symlink(found, tools / program)
    return str(tools)


@pytest.mark.sqlite_only  # the failure count, read from the file
@pytest.mark.parametrize("missing", ["tmux", "git"])
def test_run_without_tmux_or_git_exits_7_and_claims_nothing(
    cli: Cli, repo: Path, env: Env, missing: str
) -> None:
    """A host that lacks a tool is the host's problem: nothing is claimed, so there is
    nothing to roll back and no dispatch failure is counted against the task."""
    task = str(_add(cli, repo))
    path = _path_without(env, missing)
    for command in (["run", task], ["run", "--next"]):
        done = cli(*command, cwd=repo, extra_env={"PATH": path})
        assert done.code == 7, done.stderr
        assert f"{missing} cannot be run" in _one_line(done)
    message = _json_error(
        cli("run", task, "--json", cwd=repo, extra_env={"PATH": path}), 7, "environment"
    )
    assert f"{missing} cannot be run" in message
    shown = cli("show", task, "--json").json()
    assert (shown["status"], shown["attempts"]) == ("ready", [])
    assert [e["kind"] for e in shown["events"]] == ["created"]
    with closing(sqlite3.connect(env.db_path)) as conn:
        assert conn.execute("SELECT dispatch_failures FROM tasks").fetchall() == [(0,)]
    branches = ["git", "-C", str(repo), "branch", "--list", "dispatch/*"]
    assert subprocess.run(branches, capture_output=True, text=True, check=True).stdout == ""
    assert not (env.home / "worktrees" / repo.name).exists()


@pytest.mark.parametrize(
    "args",
    [
        ["events", "--since", "1000000d"],
        ["gc", "--older-than", "99999999999d"],
        ["sweep", "--stale-after", "1000000d"],
    ],
)
def test_a_duration_too_long_for_any_date_is_a_usage_error(run: Cli, args: list[str]) -> None:
    done = run(*args)
    assert done.code == 2, done.stderr
    assert repr(args[-1]) in _one_line(done)
    _json_error(run(*args, "--json"), 2, "usage")


@pytest.mark.parametrize(
    "args", [["list"], ["list", "--json"], ["show", "1"], ["show", "1", "--json"], ["events"]]
)
def test_a_reader_that_went_away_is_no_error(
    cli: Cli, repo: Path, env: Env, args: list[str]
) -> None:
    """`dispatch list | head -1`: the rest has nowhere to go, and nothing went wrong."""
    for _ in range(3):
        _add(cli, repo)
    gone, stdout = os.pipe()
    os.close(gone)  # the reader is gone before the first write: every write meets EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dispatch", *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(stdout)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.sqlite_only
def test_a_corrupt_database_exits_7(run: Cli, env: Env) -> None:
    env.home.mkdir()
    env.db_path.write_bytes(b"this is not a database\n" * 100)
    done = run("list")
    assert done.code == 7
    assert f"database {env.db_path} is unusable" in _one_line(done)
    _json_error(run("list", "--json"), 7, "environment")


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("nosuchdialect://host/db", "cannot use this URL"),
        ("mysql://user:secret@db.example/dispatch", "cannot use this URL"),
    ],
)
def test_an_unusable_database_url_exits_7_without_its_password(
    run: Cli, url: str, fragment: str
) -> None:
    done = run("--db", url, "list")
    assert done.code == 7
    line = _one_line(done)
    assert fragment in line and "secret" not in line


def test_a_database_path_below_a_file_exits_7(run: Cli, env: Env) -> None:
    blocker = env.root / "file"
    blocker.write_text("x")
    done = run("--db", str(blocker / "sub" / "dispatch.db"), "list")
    assert done.code == 7
    assert "cannot create the directory" in _one_line(done)


# -- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,where",
    [
        ("max_running = 2\ncolour = true\n", ":2: colour: unknown key"),
        ("[tmux]\nsession = 5\n", ":2: tmux.session: expected a name"),
        ('[agents.mine]\ncommand = ["x"]\ncompletion = "maybe"\n', ":3: agents.mine.completion"),
        ("spawn_timeout = 5\nlease_seconds = [\n", ":2: invalid TOML"),
        ('stale_after = "soon"\n', ":1: stale_after: not a duration"),
    ],
)
def test_an_invalid_config_is_one_line_naming_file_line_and_key(
    run: Cli, env: Env, text: str, where: str
) -> None:
    env.write_config(text)
    done = run("list")
    assert done.code == 7
    assert f"config {env.config}{where}" in _one_line(done)
    assert f"config {env.config}{where}" in _json_error(run("list", "--json"), 7, "environment")
    # The database is not even opened with a broken config.
    assert not env.db_path.exists()


def test_the_config_option_names_another_file(run: Cli, env: Env, repo: Path) -> None:
    other = env.root / "other.toml"
    other.write_text('default_agent = "aider"\n')
    done = run("--config", str(other), "add", "x", "--json", cwd=repo)
    assert done.code == 0, done.stderr
    assert json.loads(done.stdout)["agent"] == "aider"
    missing = run("--config", str(env.root / "missing.toml"), "list")
    assert missing.code == 7
    assert "missing.toml: no such file" in _one_line(missing)


def test_the_db_option_names_another_database(run: Cli, env: Env, repo: Path) -> None:
    other = env.root / "elsewhere" / "tasks.db"
    assert run("--db", str(other), "add", "x", cwd=repo).code == 0
    assert other.exists()
    assert json.loads(run("--db", str(other), "list", "--json").stdout)[0]["title"] == "x"
    assert json.loads(run("list", "--json").stdout) == []  # the default database is apart


# -- the funnel itself ----------------------------------------------------------------------


def _explode(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom\nsecond line")


def test_an_unexpected_error_exits_1_in_one_line(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dispatch.services.tasks.stream_task_list", _explode)
    done = run("list")
    assert done.code == 1
    assert _one_line(done) == "dispatch: error: RuntimeError: boom second line"
    assert "boom" in _json_error(run("list", "--json"), 1, "internal")


def _interrupted_while_making_a_class(*_args: object, **_kwargs: object) -> None:
    class Descriptor:
        def __set_name__(self, owner: type, name: str) -> None:
            raise KeyboardInterrupt  # a Ctrl-C as a module's dataclass is being made

    type("Made", (), {"field": Descriptor()})


def test_a_ctrl_c_while_a_class_is_made_is_an_interrupt(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11 hands it on as RuntimeError("Error calling __set_name__ …")."""
    monkeypatch.setattr(
        "dispatch.services.tasks.stream_task_list", _interrupted_while_making_a_class
    )
    done = run("list")
    assert (done.code, _one_line(done)) == (130, "dispatch: error: interrupted")


def test_dispatch_debug_adds_the_traceback(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dispatch.services.tasks.stream_task_list", _explode)
    done = run("list", extra_env={"DISPATCH_DEBUG": "1"})
    assert done.code == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last == "dispatch: error: RuntimeError: boom second line"


def test_the_real_program_reports_in_one_line_and_with_debug_a_traceback(
    cli: Cli, repo: Path
) -> None:
    # Through the console script's own process: exit status, flushing, no stray output.
    quiet = cli("show", "9")
    assert quiet.code == 4
    assert quiet.stdout == ""
    assert quiet.stderr == (
        "dispatch: error: no task 9 (hint: `dispatch list --all` shows every task)\n"
    )
    loud = cli("show", "9", extra_env={"DISPATCH_DEBUG": "1"})
    assert loud.code == 4
    assert "Traceback (most recent call last):" in loud.stderr
    assert "dispatch.errors.NotFound: no task 9" in loud.stderr
    as_json = cli("show", "9", "--json")
    assert as_json.code == 4 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["error"]["code"] == 4


def test_version_and_help(cli: Cli) -> None:
    version = cli("--version")
    assert (version.code, version.stdout, version.stderr) == (0, f"dispatch {__version__}\n", "")
    helped = cli("--help")
    assert helped.code == 0
    for command in ("add", "list", "show", "run", "sweep", "events", "doctor", "db"):
        assert f" {command} " in helped.stdout
    assert "--db" in helped.stdout and "--config" in helped.stdout


def test_ctrl_c_at_any_moment_of_start_up_is_one_line_and_130(cli: Cli, repo: Path) -> None:
    """From the moment dispatch's own code runs (no program chooses how the interpreter
    answers before that) to the command's end, through every import of the CLI."""
    import signal
    import subprocess
    import sys
    import time

    assert cli("add", "x", cwd=repo).code == 0
    program = Path(sys.executable).with_name("dispatch")  # the console script users run
    interrupted = 0
    for step in range(20):
        # -X importtime reports each module as it is loaded: the funnel's module comes
        # right after the console script has put its Ctrl-C handler in place.
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", str(program), "list"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.rstrip().endswith("dispatch.cli.funnel"):
                break
        time.sleep(step * 0.008)  # then anywhere in the imports, the command, its exit
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
        said = [line for line in rest.splitlines() if not line.startswith("import time:")]
        assert not any("Traceback" in line for line in said), rest
        assert proc.returncode in (0, 130), (proc.returncode, said)
        if proc.returncode == 130:
            interrupted += 1
            assert said == ["dispatch: error: interrupted"]
    assert interrupted  # the signal did land while the command ran
