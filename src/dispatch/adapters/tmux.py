"""tmux through one chokepoint that runs the `tmux` binary with an argv list (no shell).

libtmux stays off the hot paths: importing it costs 100-160 ms, and its object
listing asks tmux for about 125 fields per window (320 ms for 1,000 windows), while
the sweep needs a handful of fields in one raw `list-panes -a` call. Talking to the
binary directly keeps both costs at a few milliseconds. Where a person waits anyway
(doctor), `health` reads the server through libtmux's objects, imported there only.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from dispatch.adapters.program import run_program
from dispatch.adapters.protocols import Pane
from dispatch.errors import EnvironmentProblem, ToolFailed

# A tmux command that takes longer than this means a wedged server; failing beats hanging.
_TIMEOUT_SECONDS = 30.0

_PANE_FIELDS = (
    "session_name",
    "window_id",
    "window_name",
    "pane_id",
    "pane_pid",
    "pane_dead",
    "pane_dead_status",
    "pane_start_command",
)
# The one listing's format (the benchmark times the raw command with it too). tmux
# escapes tabs and newlines in names and start commands, so a tab splits safely.
PANE_FORMAT = "\t".join(f"#{{{field}}}" for field in _PANE_FIELDS)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _no_server(stderr: str) -> bool:
    """Whether tmux failed because no server with a session answers on the socket."""
    # Besides the plain "no server": "server exited unexpectedly" when we connected as
    # the server was shutting down, and "no current target" when it is up without any
    # session (starting, or its last session just ended). Either way it has no pane.
    return stderr.startswith(
        (
            "no server running",
            "error connecting to",
            "server exited unexpectedly",
            "no current target",
        )
    )


def _gone(stderr: str) -> bool:
    """Whether tmux failed because the target (or the whole server) no longer exists."""
    return _no_server(stderr) or stderr.startswith(
        ("can't find window", "can't find pane", "can't find session")
    )


def _not_found() -> EnvironmentProblem:
    return EnvironmentProblem(
        "tmux cannot be run: it was not found on PATH", hint="install tmux or put it on PATH"
    )


def _last_line(text: str) -> str:
    """What a one-line message keeps of tmux's stderr: its last line says what failed."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no reason given"


def _literal(text: str) -> str:
    """Protect text that tmux expands as a format (-n, -c, -s, pipe-pane's command)."""
    return text.replace("#", "##")


def _unseparated(arg: str) -> str:
    """Keep an argument ending in ';' whole: tmux would read that ';' as "next command"."""
    # tmux strips a trailing ';' and starts a new command, unless it is preceded by a
    # backslash, which it then drops; without this, "x;" followed by "run-shell" in an
    # agent's argv would run a tmux command of the agent's argv's choosing.
    return arg[:-1] + "\\;" if arg.endswith(";") else arg


class TmuxTerminal:
    """The `Terminal` adapter: one tmux server, chosen by socket name (`tmux -L`)."""

    def __init__(self, socket: str | None) -> None:
        self.socket = socket or None
        self.calls: list[list[str]] = []
        self._binary: str | None = None

    def require(self) -> None:
        self._prefix()

    def _prefix(self) -> list[str]:
        if self._binary is None:
            found = shutil.which("tmux")
            if found is None:
                raise _not_found()
            self._binary = found
        return [self._binary, "-L", self.socket] if self.socket else [self._binary]

    def _run(
        self, args: list[str], *, then: Sequence[list[str]] = (), check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a tmux command (and the `then` ones, if it succeeds) on our server.

        The one place that finds tmux, pins the socket, records the argv and maps
        failures to domain errors.
        """
        argv = [*self._prefix(), *map(_unseparated, args)]
        for command in then:
            argv += [";", *map(_unseparated, command)]
        self.calls.append(argv)
        result = run_program(argv, timeout=_TIMEOUT_SECONDS)
        if check and result.returncode != 0:
            raise ToolFailed(argv, result.returncode, result.stderr)
        return result

    def health(self, session: str) -> str:
        """For doctor: tmux's version and what our server holds of session, through libtmux.

        EnvironmentProblem when tmux is missing or a server is there but does not answer;
        no server at all is healthy, the first spawn starts it.
        """
        self._prefix()  # a missing tmux is our one-line problem before libtmux looks for it
        from libtmux import Server
        from libtmux.exc import LibTmuxException, TmuxCommandNotFound

        # socket_name is what `-L` takes (libtmux passes it as `-L<name>`); None is the
        # default server, as our own calls have no -L then.
        server = Server(socket_name=self.socket)
        where = f"server {self.socket!r}" if self.socket else "the default server"
        # libtmux waits for tmux without a timeout, and doctor is what a person runs when
        # the server is wedged: the server is asked first through our own call, which
        # gives up; libtmux then reads only a server that answered.
        try:
            answer = self._run(["list-sessions"], check=False)
        except ToolFailed as exc:
            raise EnvironmentProblem(f"tmux {where} does not answer: {exc.stderr}") from None
        try:
            version = " ".join(server.cmd("-V").stdout).removeprefix("tmux ")
            if answer.returncode != 0:
                # A socket we may not use is no missing server: the first spawn would fail.
                if _no_server(answer.stderr) and "Permission denied" not in answer.stderr:
                    return f"{version}; {where} is not running (the first run starts it)"
                raise EnvironmentProblem(
                    f"tmux {where} does not answer: {_last_line(answer.stderr)}"
                )
            ours = server.sessions.filter(session_name=session)
            windows = len(ours[0].windows) if ours else 0
        except TmuxCommandNotFound:
            raise _not_found() from None
        except LibTmuxException as exc:
            raise EnvironmentProblem(
                f"tmux {where} does not answer: {_last_line(str(exc))}"
            ) from exc
        if not ours:
            return f"{version}; {where} is up, without a session {session!r}"
        plural = "" if windows == 1 else "s"
        return f"{version}; {where}: session {session!r} with {windows} window{plural}"

    def spawn(
        self, session: str, name: str, argv: list[str], cwd: Path, env: Mapping[str, str]
    ) -> str:
        """Open a detached window running argv (no shell) in session; return its window id.

        The session is created on demand with this window as its first one, so it
        holds no idle placeholder window: it lives exactly as long as it has work.
        env is set for this window only.
        """
        if not argv:
            raise ValueError("spawn needs a command")
        if not session or any(char in session for char in ":."):
            # tmux silently rewrites ':' and '.' in session names, so targets would miss.
            raise EnvironmentProblem(f"invalid tmux session name {session!r}: no ':' or '.'")
        if not cwd.is_dir():
            # tmux silently starts in another directory when this one is missing.
            raise EnvironmentProblem(f"cannot start window {name}: {cwd} is not a directory")
        # tmux runs a single argument through `sh -c`; a fixed trampoline keeps it verbatim.
        command = argv if len(argv) > 1 else ["sh", "-c", 'exec "$@"', "sh", argv[0]]
        directory = _literal(os.path.abspath(cwd))
        options = ["-n", _literal(name), "-c", directory, "-P", "-F", "#{window_id}"]
        for key, value in env.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"invalid environment variable name {key!r}")
            options += ["-e", f"{key}={value}"]
        new_window = ["new-window", "-d", "-t", f"={session}:", *options, "--", *command]

        result = self._run(new_window, check=False)
        if result.returncode == 0:
            return result.stdout.strip()
        if not (_no_server(result.stderr) or result.stderr.startswith("can't find session")):
            raise ToolFailed(result.args, result.returncode, result.stderr)
        new_session = ["new-session", "-d", "-s", _literal(session), *options, "--", *command]
        # new-session's -e also sets the *session* environment, which every later
        # window (a user's own included) would inherit: unset it in the same call.
        cleanup = [["set-environment", "-t", f"={session}", "-u", key] for key in env]
        created = self._run(new_session, then=cleanup, check=False)
        if created.returncode == 0:
            return created.stdout.strip()
        if not created.stderr.startswith("duplicate session"):
            raise ToolFailed(created.args, created.returncode, created.stderr)
        # Another process created the session between our two calls: join it.
        return self._run(new_window).stdout.strip()

    def list_panes(self) -> list[Pane]:
        """Every pane of the server in one call; [] when no server runs."""
        result = self._run(["list-panes", "-a", "-F", PANE_FORMAT], check=False)
        if result.returncode != 0:
            if _no_server(result.stderr):
                return []
            raise ToolFailed(result.args, result.returncode, result.stderr)
        panes: list[Pane] = []
        for line in result.stdout.splitlines():
            fields = line.split("\t", len(_PANE_FIELDS) - 1)
            if len(fields) != len(_PANE_FIELDS):
                raise ToolFailed(result.args, 0, f"unexpected list-panes line: {line!r}")
            session, window_id, window_name, pane_id, pid, dead, status, start = fields
            panes.append(
                Pane(
                    session=session,
                    window_id=window_id,
                    window_name=window_name,
                    pane_id=pane_id,
                    pane_pid=int(pid) if pid else 0,
                    dead=dead == "1",
                    dead_status=int(status) if status else None,
                    start_command=start,
                )
            )
        return panes

    def window_exists(self, window_id: str) -> bool:
        """Whether the window is there, by exact id; False when no server runs."""
        # A listing rather than `display-message -t`, which falls back to the current
        # window when the target is gone.
        result = self._run(["list-windows", "-a", "-F", "#{window_id}"], check=False)
        if result.returncode != 0:
            if _no_server(result.stderr):
                return False
            raise ToolFailed(result.args, result.returncode, result.stderr)
        return window_id in result.stdout.split()

    def kill_window(self, window_id: str) -> None:
        """Kill a window (its process gets SIGHUP); a window already gone is not an error."""
        result = self._run(["kill-window", "-t", window_id], check=False)
        if result.returncode != 0 and not _gone(result.stderr):
            raise ToolFailed(result.args, result.returncode, result.stderr)

    def send_interrupt(self, window_id: str) -> None:
        """Send C-c to the window's active pane; a window already gone is not an error."""
        result = self._run(["send-keys", "-t", window_id, "C-c"], check=False)
        if result.returncode != 0 and not _gone(result.stderr):
            raise ToolFailed(result.args, result.returncode, result.stderr)

    def pipe_pane(self, pane_id: str, log_path: Path) -> None:
        """Append everything the pane prints to log_path (kept after the window is gone)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # The one shell string: tmux runs pipe-pane's command with sh, and the only
        # variable part is our own path, quoted. No -o: with it a second call would
        # toggle the pipe off; without it, it replaces the pipe and appending goes on.
        command = _literal(f"cat >> {shlex.quote(str(log_path))}")
        self._run(["pipe-pane", "-t", pane_id, command])

    def attach_argv(self, window_id: str, inside_tmux: bool) -> list[str]:
        """The argv that attaches to (or, inside tmux, switches to) the window."""
        verb = "switch-client" if inside_tmux else "attach-session"
        return [*self._prefix(), verb, "-t", window_id]
