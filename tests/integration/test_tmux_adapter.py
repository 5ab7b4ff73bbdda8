"""TmuxTerminal against a real tmux server on a private socket."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dispatch.adapters.protocols import Pane
from dispatch.adapters.tmux import TmuxTerminal
from dispatch.errors import EnvironmentProblem
from tests.conftest import Env

# tmux alone: no database to run twice.
pytestmark = pytest.mark.no_database

# Writes its arguments (after the output path) as JSON, atomically, then waits to be killed.
ECHO_ARGS = (
    "import json, os, sys, time\n"
    "out = sys.argv[1]\n"
    "with open(out + '.tmp', 'w') as f: json.dump(sys.argv[2:], f)\n"
    "os.rename(out + '.tmp', out)\n"
    "time.sleep(60)\n"
)
REPORT_ENV = (
    "import json, os, sys, time\n"
    "out = sys.argv[1]\n"
    "data = {'cwd': os.getcwd(), 'task': os.environ.get('DISPATCH_TASK_ID'),\n"
    "        'weird': os.environ.get('WEIRD')}\n"
    "with open(out + '.tmp', 'w') as f: json.dump(data, f)\n"
    "os.rename(out + '.tmp', out)\n"
    "time.sleep(60)\n"
)
SLEEP = ["sleep", "60"]


@pytest.fixture
def tmux(env: Env) -> TmuxTerminal:
    return TmuxTerminal(env.socket)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until condition holds; whether it did within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def raw_tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True)


def panes_by_window(tmux: TmuxTerminal) -> dict[str, Pane]:
    return {pane.window_id: pane for pane in tmux.list_panes()}


def test_spawn_passes_argv_verbatim_without_a_shell(tmux: TmuxTerminal, tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    work = tmp_path / "work"
    work.mkdir()
    hostile = [
        "$(touch pwned)",
        "`touch pwned2`; touch pwned3",
        'it\'s "quoted"',
        "two  words ",
        "line1\nline2\ttab",
        "#{session_name} #S",
        "*",
        "",
        "-x",
        # tmux reads a trailing ';' as a command separator: none may become a tmux command.
        "end;",
        "run-shell",
        f"touch {tmp_path / 'pwned4'};",
        ";",
        "kill-server",
        "x\\;",
        "y\\\\;",
    ]

    window = tmux.spawn(
        "dispatch", "t1", [sys.executable, "-c", ECHO_ARGS, str(out), *hostile], work, {}
    )

    assert re.fullmatch(r"@\d+", window)
    assert wait_for(out.exists)
    assert json.loads(out.read_text()) == hostile
    leftovers = {p.name for p in work.iterdir()} | {p.name for p in tmp_path.iterdir()}
    assert not leftovers & {"pwned", "pwned2", "pwned3", "pwned4"}
    assert tmux.window_exists(window)


def test_spawn_runs_a_single_argument_without_a_shell(tmux: TmuxTerminal, tmp_path: Path) -> None:
    # One argument is where tmux itself would use `sh -c`; this name would then misfire.
    program = tmp_path / "my prog $(touch pwned);x"
    marker = tmp_path / "ran"
    program.write_text(f"#!/bin/sh\ntouch '{marker}'\nexec sleep 60\n")
    program.chmod(0o755)

    tmux.spawn("dispatch", "single", [str(program)], tmp_path, {})

    assert wait_for(marker.exists)
    assert not (tmp_path / "pwned").exists()


def test_spawn_sets_cwd_and_environment(tmux: TmuxTerminal, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    work = tmp_path / "odd #{session_name} dir's"
    work.mkdir()
    weird = "a b $HOME `x` #{pane_id} 'q' \"d\""

    tmux.spawn(
        "dispatch",
        "t2",
        [sys.executable, "-c", REPORT_ENV, str(out)],
        work,
        {"DISPATCH_TASK_ID": "2", "WEIRD": weird},
    )

    assert wait_for(out.exists)
    report = json.loads(out.read_text())
    assert os.path.realpath(report["cwd"]) == os.path.realpath(work)
    assert report["task"] == "2"
    assert report["weird"] == weird


def test_spawn_environment_stays_with_its_window(
    tmux: TmuxTerminal, env: Env, tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {"DISPATCH_TASK_ID": "1", "WEIRD": "w;"})

    tmux.spawn("dispatch", "t2", [sys.executable, "-c", REPORT_ENV, str(out)], tmp_path, {})

    # The session was created with t1's variables; neither the session nor t2 keeps them.
    assert wait_for(out.exists)
    assert json.loads(out.read_text())["task"] is None
    session_env = raw_tmux(env.socket, "show-environment", "-t", "=dispatch").stdout
    assert "DISPATCH_TASK_ID" not in session_env
    assert "WEIRD" not in session_env


def test_spawn_rejects_a_missing_cwd_instead_of_starting_elsewhere(
    tmux: TmuxTerminal, tmp_path: Path
) -> None:
    with pytest.raises(EnvironmentProblem, match="not a directory"):
        tmux.spawn("dispatch", "t3", SLEEP, tmp_path / "gone", {})

    assert tmux.list_panes() == []


def test_spawn_rejects_session_names_tmux_would_rewrite(tmux: TmuxTerminal, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="session name"):
        tmux.spawn("my.session", "t4", SLEEP, tmp_path, {})

    assert tmux.list_panes() == []


def test_spawn_creates_the_session_once_without_placeholder_windows(
    tmux: TmuxTerminal, tmp_path: Path
) -> None:
    first = tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {})
    calls_for_first = len(tmux.calls)
    second = tmux.spawn("dispatch", "t2", SLEEP, tmp_path, {})

    panes = tmux.list_panes()
    assert first != second
    assert sorted((p.session, p.window_id, p.window_name) for p in panes) == sorted(
        [("dispatch", first, "t1"), ("dispatch", second, "t2")]
    )
    # No server yet: a failed new-window, then new-session; afterwards one call per spawn.
    assert calls_for_first == 2
    assert len(tmux.calls) == calls_for_first + 2  # second spawn + the listing


def test_spawn_matches_the_session_name_exactly(tmux: TmuxTerminal, tmp_path: Path) -> None:
    other = tmux.spawn("dispatch-old", "old", SLEEP, tmp_path, {})

    mine = tmux.spawn("dispatch", "new", SLEEP, tmp_path, {})

    sessions = {p.window_id: p.session for p in tmux.list_panes()}
    assert sessions == {other: "dispatch-old", mine: "dispatch"}


def test_window_names_are_literal(tmux: TmuxTerminal, tmp_path: Path) -> None:
    window = tmux.spawn("dispatch", "t#{session_name}", SLEEP, tmp_path, {})

    assert panes_by_window(tmux)[window].window_name == "t#{session_name}"


def test_concurrent_spawns_into_a_new_session_all_succeed(env: Env, tmp_path: Path) -> None:
    def spawn(i: int) -> str:
        # Separate adapters, as separate dispatcher processes would have.
        return TmuxTerminal(env.socket).spawn("dispatch", f"t{i}", SLEEP, tmp_path, {})

    with ThreadPoolExecutor(max_workers=6) as pool:
        windows = list(pool.map(spawn, range(6)))

    panes = TmuxTerminal(env.socket).list_panes()
    assert len(set(windows)) == 6
    assert sorted(p.window_id for p in panes) == sorted(windows)
    assert {p.session for p in panes} == {"dispatch"}


def test_window_exists_and_kill_window(tmux: TmuxTerminal, tmp_path: Path) -> None:
    keep = tmux.spawn("dispatch", "keep", SLEEP, tmp_path, {})
    doomed = tmux.spawn("dispatch", "doomed", SLEEP, tmp_path, {})
    assert tmux.window_exists(doomed)

    tmux.kill_window(doomed)
    tmux.kill_window(doomed)

    assert not tmux.window_exists(doomed)
    assert not tmux.window_exists("@999")
    assert tmux.window_exists(keep)


def test_without_a_server_listing_is_empty_and_kill_is_a_no_op(tmux: TmuxTerminal) -> None:
    assert tmux.list_panes() == []
    assert tmux.window_exists("@0") is False
    tmux.kill_window("@0")
    tmux.send_interrupt("@0")
    assert tmux.list_panes() == []


def test_list_panes_reports_live_and_dead_panes(
    tmux: TmuxTerminal, env: Env, tmp_path: Path
) -> None:
    live = tmux.spawn("dispatch", "live", SLEEP, tmp_path, {})
    assert raw_tmux(env.socket, "set-option", "-gw", "remain-on-exit", "on").returncode == 0
    dead = tmux.spawn("dispatch", "dead", ["sh", "-c", "exit 3"], tmp_path, {})

    server_pid = int(raw_tmux(env.socket, "display-message", "-p", "#{pid}").stdout)

    def status_known() -> bool:
        pane = panes_by_window(tmux)[dead]
        if pane.dead and pane.dead_status is None:
            # tmux marks a pane dead when its pty closes and learns the exit status only
            # on SIGCHLD, which tmux built with libutempter can miss (tmux/tmux#311):
            # the child stays a zombie until the next SIGCHLD. Send that one.
            os.kill(server_pid, signal.SIGCHLD)
        return pane.dead_status is not None

    assert wait_for(status_known)
    tmux.calls.clear()
    panes = panes_by_window(tmux)

    assert len(tmux.calls) == 1
    assert panes[dead].dead is True
    assert panes[dead].dead_status == 3
    assert panes[dead].window_name == "dead"
    assert "exit 3" in panes[dead].start_command
    assert panes[live].dead is False
    assert panes[live].dead_status is None
    assert panes[live].session == "dispatch"
    assert panes[live].pane_id.startswith("%")
    assert panes[live].start_command == "sleep 60"
    os.kill(panes[live].pane_pid, 0)  # a live process: raises if the pid were wrong


def test_calls_record_each_argv_on_the_pinned_socket(
    tmux: TmuxTerminal, env: Env, tmp_path: Path
) -> None:
    window = tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {})
    tmux.calls.clear()

    tmux.window_exists(window)
    tmux.list_panes()

    assert len(tmux.calls) == 2
    assert all(call[1:3] == ["-L", env.socket] for call in tmux.calls)
    assert os.path.basename(tmux.calls[0][0]) == "tmux"


def test_pipe_pane_appends_output_to_a_log(tmux: TmuxTerminal, tmp_path: Path) -> None:
    log = tmp_path / "logs #{x} it's" / "attempt 1.log"
    go = tmp_path / "go"
    # Prints only once the pipe is in place, so the test does not race the first lines.
    script = f"while [ ! -e '{go}' ]; do sleep 0.05; done; echo hello-from-pane; sleep 60"
    window = tmux.spawn("dispatch", "t1", ["sh", "-c", script], tmp_path, {})
    pane = panes_by_window(tmux)[window].pane_id

    tmux.pipe_pane(pane, log)
    tmux.pipe_pane(pane, log)  # a second call must not switch logging off
    go.touch()

    assert wait_for(lambda: log.exists() and "hello-from-pane" in log.read_text())
    assert log.read_text().count("hello-from-pane") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("logs")] == [log.parent.name]


def test_send_interrupt_stops_a_sleep(tmux: TmuxTerminal, tmp_path: Path) -> None:
    window = tmux.spawn("dispatch", "t1", ["sleep", "600"], tmp_path, {})
    pid = panes_by_window(tmux)[window].pane_pid
    # A C-c that reaches the pty before the child has taken it as its controlling
    # terminal signals no one; once `sleep` runs, the terminal is set up.
    assert wait_for(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep")

    tmux.send_interrupt(window)

    assert wait_for(lambda: not tmux.window_exists(window), timeout=5)
    tmux.send_interrupt(window)  # gone: not an error


def test_attach_argv(env: Env) -> None:
    tmux_path = shutil.which("tmux")

    assert TmuxTerminal(env.socket).attach_argv("@3", inside_tmux=False) == [
        tmux_path,
        "-L",
        env.socket,
        "attach-session",
        "-t",
        "@3",
    ]
    assert TmuxTerminal(env.socket).attach_argv("@3", inside_tmux=True) == [
        tmux_path,
        "-L",
        env.socket,
        "switch-client",
        "-t",
        "@3",
    ]
    # No socket: the user's default server, so no -L.
    assert TmuxTerminal("").attach_argv("@3", inside_tmux=False) == [
        tmux_path,
        "attach-session",
        "-t",
        "@3",
    ]
    assert TmuxTerminal(None).attach_argv("@3", inside_tmux=True)[1] == "switch-client"


# Logs each argv it is run with (one line, space-separated), then runs the real tmux.
LOGGING_SHIM = """#!/bin/sh
echo "$*" >> '{log}'
exec '{real}' "$@"
"""


def _logging_tmux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `tmux` first on PATH that records every argv; the path of its log."""
    real = shutil.which("tmux")
    assert real
    shim, log = tmp_path / "shim", tmp_path / "tmux-argv.log"
    shim.mkdir()
    (shim / "tmux").write_text(LOGGING_SHIM.format(log=log, real=real))
    (shim / "tmux").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    return log


def test_health_reports_the_version_and_the_session_of_our_server(
    tmux: TmuxTerminal, tmp_path: Path
) -> None:
    assert re.fullmatch(r"\d+\.\d+[a-z]?; server '.+' is not running \(.+\)", tmux.health("x"))
    tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {})
    tmux.spawn("dispatch", "t2", SLEEP, tmp_path, {})
    calls = len(tmux.calls)

    assert tmux.health("dispatch").endswith(": session 'dispatch' with 2 windows")
    assert tmux.health("other").endswith(" is up, without a session 'other'")
    # libtmux runs tmux itself, not through the chokepoint that the hot paths use: the
    # only calls there are the timed question whether the server answers at all.
    assert [argv[-1] for argv in tmux.calls[calls:]] == ["list-sessions"] * 2


def test_health_asks_only_the_configured_socket(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    TmuxTerminal(env.socket).spawn("dispatch", "t1", SLEEP, tmp_path, {})
    log = _logging_tmux(tmp_path, monkeypatch)

    assert "with 1 window" in TmuxTerminal(env.socket).health("dispatch")

    # Every tmux that libtmux ran named our server: never the user's default one.
    asked = log.read_text().splitlines()
    assert len(asked) >= 3  # version, the session listing, the session's windows
    assert all(argv.startswith((f"-L{env.socket} ", f"-L {env.socket} ")) for argv in asked), asked


def test_health_without_a_socket_asks_the_default_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The "default" server of a private tmux directory: the user's own stays untouched.
    private = tmp_path / "tmux-dir"
    private.mkdir()
    monkeypatch.setenv("TMUX_TMPDIR", str(private))
    log = _logging_tmux(tmp_path, monkeypatch)

    assert "the default server is not running" in TmuxTerminal(None).health("dispatch")

    asked = log.read_text().splitlines()
    assert asked and not any(argv.startswith(("-L", "-S")) for argv in asked), asked


def test_health_of_a_server_that_does_not_answer_is_an_environment_problem(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.which("tmux")
    shim = tmp_path / "shim"
    shim.mkdir()
    refusing = f"""#!/bin/sh
case "$*" in *list-sessions*) printf 'lost server\\naccess not allowed\\n' >&2; exit 1;; esac
exec '{real}' "$@"
"""
    (shim / "tmux").write_text(refusing)
    (shim / "tmux").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(EnvironmentProblem) as problem:
        TmuxTerminal(env.socket).health("dispatch")

    assert problem.value.exit_code == 7
    assert (
        problem.value.message == f"tmux server {env.socket!r} does not answer: access not allowed"
    )


def test_health_of_a_wedged_server_gives_up_instead_of_hanging(
    tmux: TmuxTerminal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped server takes connections and never answers: doctor must say so."""
    tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {})
    [pid] = tmux._run(["display-message", "-p", "#{pid}"]).stdout.split()
    monkeypatch.setattr("dispatch.adapters.tmux._TIMEOUT_SECONDS", 1.0)
    os.kill(int(pid), signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(EnvironmentProblem) as problem:
            tmux.health("dispatch")
        took = time.monotonic() - started
    finally:
        os.kill(int(pid), signal.SIGCONT)

    assert took < 5
    assert problem.value.exit_code == 7
    assert problem.value.message == (
        f"tmux server {tmux.socket!r} does not answer: no answer within 1 s"
    )
    # Once it runs again, so does the check.
    assert tmux.health("dispatch").endswith(": session 'dispatch' with 1 window")


def test_missing_tmux_is_an_environment_problem(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    tmux = TmuxTerminal(env.socket)

    # A context, so that PATH is back before any fixture's teardown needs a program.
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(empty))
        with pytest.raises(EnvironmentProblem, match="tmux") as problem:
            tmux.health("dispatch")
        with pytest.raises(EnvironmentProblem):
            tmux.list_panes()
        with pytest.raises(EnvironmentProblem):
            tmux.spawn("dispatch", "t1", SLEEP, tmp_path, {})

    assert problem.value.exit_code == 7
    assert "\n" not in problem.value.message
    assert tmux.calls == []
